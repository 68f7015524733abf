-- Ledger core: tenants, budgets, windows, append-only journal, reservations, fencing scopes,
-- audit producers and the audit outbox.
--
-- Invariants live here, not only in application code:
--   * window money: reserved >= 0, committed >= 0, overrun >= 0, committed + reserved <= limit;
--   * window money changes only through journal entries (a statement trigger applies their sums),
--     so the journal always sums to the balances;
--   * a reservation is resolved at most once, and its identity never changes;
--   * journal, scope history and outbox are append-only;
--   * fencing epochs only ever rise, by exactly one per transition.
-- Money is integer nano-USD (1 USD = 10^9), bounded by 10^18 per field so sums cannot overflow.

CREATE TABLE tenants (
    tenant_id    text PRIMARY KEY CHECK (tenant_id ~ '^[a-z0-9]([a-z0-9._:/-]{0,251}[a-z0-9])?$'),
    display_name text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE budgets (
    tenant_id         text NOT NULL REFERENCES tenants (tenant_id),
    budget_id         text NOT NULL CHECK (budget_id ~ '^[a-z0-9]([a-z0-9._:/-]{0,251}[a-z0-9])?$'),
    limit_nano_usd    bigint NOT NULL CHECK (limit_nano_usd BETWEEN 0 AND 1000000000000000000),
    soft_cap_nano_usd bigint CHECK (soft_cap_nano_usd BETWEEN 0 AND limit_nano_usd),
    window_kind       text NOT NULL CHECK (window_kind IN ('lifetime', 'calendar_day_utc', 'calendar_month_utc')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, budget_id)
);

CREATE TABLE budget_windows (
    tenant_id           text NOT NULL,
    budget_id           text NOT NULL,
    window_start        timestamptz NOT NULL,
    limit_nano_usd      bigint NOT NULL DEFAULT 0 CHECK (limit_nano_usd BETWEEN 0 AND 1000000000000000000),
    reserved_nano_usd   bigint NOT NULL DEFAULT 0 CHECK (reserved_nano_usd >= 0),
    committed_nano_usd  bigint NOT NULL DEFAULT 0 CHECK (committed_nano_usd >= 0),
    overrun_nano_usd    bigint NOT NULL DEFAULT 0 CHECK (overrun_nano_usd >= 0),
    CONSTRAINT budget_windows_no_overspend CHECK (committed_nano_usd + reserved_nano_usd <= limit_nano_usd),
    PRIMARY KEY (tenant_id, budget_id, window_start),
    FOREIGN KEY (tenant_id, budget_id) REFERENCES budgets (tenant_id, budget_id)
);

CREATE TABLE reservations (
    reservation_id      uuid PRIMARY KEY,
    -- No per-row foreign keys on the hot tables (reservations, ledger_entries, audit_outbox): each
    -- would run a locking lookup per row. Statement-level triggers below check the same references
    -- once per INSERT, and the referenced rows are never deleted.
    tenant_id           text NOT NULL,
    idempotency_key     text NOT NULL,
    request_sha256      text NOT NULL,
    budget_ids          text[] NOT NULL CHECK (cardinality(budget_ids) BETWEEN 1 AND 8),
    window_starts       timestamptz[] NOT NULL CHECK (cardinality(window_starts) = cardinality(budget_ids)),
    amount_nano_usd     bigint NOT NULL CHECK (amount_nano_usd BETWEEN 1 AND 1000000000000000000),
    fencing_scope_id    text NOT NULL,
    fencing_epoch       bigint NOT NULL CHECK (fencing_epoch >= 1),
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL CHECK (expires_at > created_at),
    state               text NOT NULL DEFAULT 'reserved'
                        CHECK (state IN ('reserved', 'committed', 'released', 'expired')),
    resolved_at         timestamptz,
    resolved_epoch      bigint,
    actual_nano_usd     bigint CHECK (actual_nano_usd >= 0),
    committed_nano_usd  bigint CHECK (committed_nano_usd >= 0),
    released_nano_usd   bigint CHECK (released_nano_usd >= 0),
    overrun_nano_usd    bigint CHECK (overrun_nano_usd >= 0),
    UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT reservations_resolution_complete CHECK (
        (state = 'reserved') = (resolved_at IS NULL)
        AND (state = 'reserved' OR committed_nano_usd + released_nano_usd = amount_nano_usd)
    )
);
CREATE INDEX reservations_open_by_expiry ON reservations (expires_at) WHERE state = 'reserved';

-- A reservation resolves at most once, and nothing but its resolution ever changes.
CREATE FUNCTION reservations_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'reservations are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.state <> 'reserved' THEN
        RAISE EXCEPTION 'reservation % is already %', OLD.reservation_id, OLD.state
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (NEW.reservation_id, NEW.tenant_id, NEW.idempotency_key, NEW.request_sha256, NEW.budget_ids,
        NEW.window_starts, NEW.amount_nano_usd, NEW.fencing_scope_id, NEW.fencing_epoch,
        NEW.created_at, NEW.expires_at)
       IS DISTINCT FROM
       (OLD.reservation_id, OLD.tenant_id, OLD.idempotency_key, OLD.request_sha256, OLD.budget_ids,
        OLD.window_starts, OLD.amount_nano_usd, OLD.fencing_scope_id, OLD.fencing_epoch,
        OLD.created_at, OLD.expires_at) THEN
        RAISE EXCEPTION 'reservation % identity is immutable', OLD.reservation_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER reservations_resolve_once BEFORE UPDATE OR DELETE ON reservations
    FOR EACH ROW EXECUTE FUNCTION reservations_resolve_once();

CREATE TABLE ledger_entries (
    entry_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id            text NOT NULL,
    budget_id            text NOT NULL,
    window_start         timestamptz NOT NULL,
    reservation_id       uuid,
    kind                 text NOT NULL CHECK (kind IN ('window_open', 'limit_set', 'reserve', 'commit',
                                                       'overrun', 'release', 'expire')),
    limit_delta          bigint NOT NULL DEFAULT 0,
    reserved_delta       bigint NOT NULL DEFAULT 0,
    committed_delta      bigint NOT NULL DEFAULT 0,
    overrun_delta        bigint NOT NULL DEFAULT 0,
    created_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((reservation_id IS NULL) = (kind IN ('window_open', 'limit_set')))
);
-- Per reservation and budget: one reserve entry, one resolution (commit, release or expire) and
-- at most one overrun entry.
CREATE UNIQUE INDEX ledger_entries_once ON ledger_entries (
    reservation_id, budget_id,
    (CASE kind WHEN 'reserve' THEN 0 WHEN 'overrun' THEN 2 ELSE 1 END)
) WHERE reservation_id IS NOT NULL;

-- Window balances are the sums of their entries: the only path that changes them. Also checks,
-- once per statement, that every entry names an existing window and reservation of its tenant.
CREATE FUNCTION ledger_entries_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    wanted integer;
    updated integer;
    ids uuid[];
    found integer;
BEGIN
    -- `= ANY(array)` keeps these lookups on the primary key: a join against the transition table
    -- (which has no statistics) can be planned as a scan of the whole table.
    ids := ARRAY(SELECT DISTINCT reservation_id FROM inserted WHERE reservation_id IS NOT NULL);
    SELECT count(*) INTO found FROM reservations r
     WHERE r.reservation_id = ANY(ids)
       AND r.tenant_id = ALL (SELECT i.tenant_id FROM inserted i WHERE i.reservation_id = r.reservation_id);
    IF found <> cardinality(ids) THEN
        RAISE EXCEPTION 'journal entry for an unknown reservation' USING ERRCODE = 'foreign_key_violation';
    END IF;
    SELECT count(DISTINCT (tenant_id, budget_id, window_start)) INTO wanted FROM inserted;
    UPDATE budget_windows w
       SET limit_nano_usd     = w.limit_nano_usd + d.limit_delta,
           reserved_nano_usd  = w.reserved_nano_usd + d.reserved_delta,
           committed_nano_usd = w.committed_nano_usd + d.committed_delta,
           overrun_nano_usd   = w.overrun_nano_usd + d.overrun_delta
      FROM (SELECT tenant_id, budget_id, window_start,
                   sum(limit_delta)::bigint AS limit_delta,
                   sum(reserved_delta)::bigint AS reserved_delta,
                   sum(committed_delta)::bigint AS committed_delta,
                   sum(overrun_delta)::bigint AS overrun_delta
              FROM inserted GROUP BY tenant_id, budget_id, window_start) d
     WHERE w.tenant_id = d.tenant_id AND w.budget_id = d.budget_id AND w.window_start = d.window_start
       AND w.tenant_id = ANY(ARRAY(SELECT DISTINCT tenant_id FROM inserted))
       AND w.budget_id = ANY(ARRAY(SELECT DISTINCT budget_id FROM inserted));
    GET DIAGNOSTICS updated = ROW_COUNT;
    IF updated <> wanted THEN
        RAISE EXCEPTION 'journal entry for an unknown budget window' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ledger_entries_apply AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_apply();

CREATE FUNCTION budget_windows_money_via_journal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'budget windows are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF (NEW.limit_nano_usd, NEW.reserved_nano_usd, NEW.committed_nano_usd, NEW.overrun_nano_usd)
           <> (0, 0, 0, 0) THEN
            RAISE EXCEPTION 'a budget window opens empty; its limit arrives as a journal entry'
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END IF;
    -- Depth 1 is a direct UPDATE; the journal trigger's UPDATE runs at depth 2.
    IF pg_trigger_depth() < 2 AND
       (NEW.limit_nano_usd, NEW.reserved_nano_usd, NEW.committed_nano_usd, NEW.overrun_nano_usd)
       IS DISTINCT FROM
       (OLD.limit_nano_usd, OLD.reserved_nano_usd, OLD.committed_nano_usd, OLD.overrun_nano_usd) THEN
        RAISE EXCEPTION 'budget window money changes only through ledger_entries'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER budget_windows_money_via_journal BEFORE INSERT OR UPDATE OR DELETE ON budget_windows
    FOR EACH ROW EXECUTE FUNCTION budget_windows_money_via_journal();

CREATE TABLE fencing_scopes (
    scope_id              text PRIMARY KEY,
    tenant_id             text NOT NULL REFERENCES tenants (tenant_id),
    owner_workload_id     text NOT NULL,
    epoch                 bigint NOT NULL CHECK (epoch >= 1),
    expires_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Epochs start at 1, never fall, and rise by exactly one per transition.
CREATE FUNCTION fencing_scopes_epoch_monotonic() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'fencing scopes are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'INSERT' AND NEW.epoch <> 1 THEN
        RAISE EXCEPTION 'a fencing scope starts at epoch 1' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.epoch NOT IN (OLD.epoch, OLD.epoch + 1) OR NEW.tenant_id <> OLD.tenant_id) THEN
        RAISE EXCEPTION 'fencing epoch of % may only rise by one (% -> %)', OLD.scope_id, OLD.epoch, NEW.epoch
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fencing_scopes_epoch_monotonic BEFORE INSERT OR UPDATE OR DELETE ON fencing_scopes
    FOR EACH ROW EXECUTE FUNCTION fencing_scopes_epoch_monotonic();

CREATE TABLE fencing_scope_events (
    event_id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope_id              text NOT NULL REFERENCES fencing_scopes (scope_id),
    tenant_id             text NOT NULL,
    workload_instance_id  text NOT NULL,
    outcome               text NOT NULL CHECK (outcome IN ('acquired', 'renewed', 'restarted', 'taken_over', 'forced')),
    previous_epoch        bigint NOT NULL,
    epoch                 bigint NOT NULL,
    expires_at            timestamptz NOT NULL,
    occurred_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_producers (
    producer_instance_id  text PRIMARY KEY,
    -- Rewritten by each process that claims the id; every write checks it (S2 fail-closed).
    claim_token           uuid NOT NULL,
    next_sequence         bigint NOT NULL DEFAULT 1 CHECK (next_sequence >= 1),
    claimed_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE audit_outbox (
    producer_instance_id  text NOT NULL,
    producer_sequence     bigint NOT NULL CHECK (producer_sequence >= 1),
    tenant_id             text NOT NULL,
    event_type            text NOT NULL,
    occurred_at           timestamptz NOT NULL,
    -- RFC 8785 canonical bytes exactly as they will be signed.
    canonical_event       bytea NOT NULL,
    event_sha256          bytea NOT NULL CHECK (length(event_sha256) = 32),
    PRIMARY KEY (producer_instance_id, producer_sequence)
);
CREATE INDEX audit_outbox_by_tenant ON audit_outbox (tenant_id, occurred_at);

-- Every sequence must have been allocated from its producer's counter (checked per statement).
CREATE FUNCTION audit_outbox_sequence_allocated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted i LEFT JOIN audit_producers p USING (producer_instance_id)
                WHERE p.producer_instance_id IS NULL OR i.producer_sequence >= p.next_sequence) THEN
        RAISE EXCEPTION 'audit outbox sequence was not allocated from its producer'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER audit_outbox_sequence_allocated AFTER INSERT ON audit_outbox
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION audit_outbox_sequence_allocated();

CREATE FUNCTION reservations_tenant_exists() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted i WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.tenant_id = i.tenant_id)) THEN
        RAISE EXCEPTION 'reservation for an unknown tenant' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER reservations_tenant_exists AFTER INSERT ON reservations
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION reservations_tenant_exists();

CREATE FUNCTION append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER tenants_never_deleted BEFORE DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER fencing_scope_events_append_only BEFORE UPDATE OR DELETE ON fencing_scope_events
    FOR EACH ROW EXECUTE FUNCTION append_only();
CREATE TRIGGER audit_outbox_append_only BEFORE UPDATE OR DELETE ON audit_outbox
    FOR EACH ROW EXECUTE FUNCTION append_only();
