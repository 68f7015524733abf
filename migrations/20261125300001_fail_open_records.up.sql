-- Fail-open evidence (spec S22): a call the sidecar let through without a reservation while the
-- ledger was unreachable is recorded here once the ledger answers again (RecordFailOpen), with
-- its decision context and actual cost, and in the same transaction the cost is journaled as an
-- `overrun` entry per budget (reserved = 0) and the audit event `decision.fail_open` is written.
-- Ids are UUIDv5 over (tenant, call id) in a namespace of their own, so they never collide with
-- reservation ids; the journal's `reservation_id` column names the record for those entries
-- (the unique index `ledger_entries_once` then allows one overrun per record and budget).
CREATE TABLE fail_open_records (
    record_id            uuid PRIMARY KEY,
    tenant_id            text NOT NULL REFERENCES tenants (tenant_id),
    call_id              text NOT NULL,
    request_sha256       text NOT NULL CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
    budget_ids           text[] NOT NULL CHECK (cardinality(budget_ids) BETWEEN 1 AND 8),
    window_starts        timestamptz[] NOT NULL CHECK (cardinality(window_starts) = cardinality(budget_ids)),
    actual_nano_usd      bigint NOT NULL CHECK (actual_nano_usd BETWEEN 0 AND 1000000000000000000),
    -- The scope and epoch the sidecar presented (recorded as presented, possibly stale) and the
    -- scope's epoch when the record was written.
    fencing_scope_id     text NOT NULL,
    fencing_epoch        bigint NOT NULL CHECK (fencing_epoch >= 1),
    epoch_current        bigint NOT NULL CHECK (epoch_current >= 1),
    -- Sidecar clock: when it decided. Database clock: when the ledger recorded it.
    decided_at           timestamptz NOT NULL,
    recorded_at          timestamptz NOT NULL,
    UNIQUE (tenant_id, call_id)
);

-- Evidence is immutable: never updated, never deleted.
CREATE FUNCTION fail_open_records_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fail-open records are immutable' USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER fail_open_records_immutable BEFORE UPDATE OR DELETE ON fail_open_records
    FOR EACH ROW EXECUTE FUNCTION fail_open_records_immutable();

-- The journal accepts entries naming a fail-open record (overrun entries only).
CREATE OR REPLACE FUNCTION ledger_entries_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    found_records integer;
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
    -- A fail-open record stands in for a reservation of 0: only overrun entries may name it.
    -- Looked up only when some id is not a reservation, so reserve/commit batches (the hot path)
    -- pay nothing for it.
    found_records := 0;
    IF found <> cardinality(ids) THEN
        SELECT count(*) INTO found_records FROM fail_open_records f
         WHERE f.record_id = ANY(ids)
           AND f.tenant_id = ALL (SELECT i.tenant_id FROM inserted i WHERE i.reservation_id = f.record_id)
           AND 'overrun' = ALL (SELECT i.kind FROM inserted i WHERE i.reservation_id = f.record_id);
    END IF;
    IF found + found_records <> cardinality(ids) THEN
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
