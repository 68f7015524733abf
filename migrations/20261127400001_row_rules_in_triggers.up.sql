-- The row rules of the three tables every write batch inserts into (reservations, the journal,
-- the audit outbox) are checked by triggers instead of CHECK constraints
-- (docs/design/ledger-row-rules.md). The rules are the same, and a broken one is still refused
-- with SQLSTATE 23514 (check_violation) naming the rule as the constraint.
--
-- Why: PostgreSQL reads every CHECK of a table from its stored text, plans and compiles it for
-- each statement that writes the table (for reservations twice when one statement creates
-- reservations and resolves others, as most batches do). At 1,000 pairs/s that was ~17% of the
-- cached path's database time, the one session every batch queues on. A PL/pgSQL function is
-- compiled once per session.
--
-- Dropping a CHECK scans nothing. The triggers check every row written from now on, as the
-- CHECKs did; rows written before were checked by them.

-- Raises what a broken CHECK raised: check_violation, with the schema, the table and the
-- rule's name.
CREATE FUNCTION spendguard_row_rule_broken(schema_name text, relation text, rule text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'new row for relation "%" violates check constraint "%"', relation, rule
        USING ERRCODE = 'check_violation', SCHEMA = schema_name, TABLE = relation,
              CONSTRAINT = rule;
END $$;

-- One expression per row. Each WHEN is a former CHECK under its name (the two PostgreSQL had
-- named `reservations_check` and `reservations_check1` got names that say what they hold); a
-- rule that evaluates to NULL passes, as a CHECK does. When several break, the first WHEN
-- names the error.
CREATE FUNCTION reservations_row_rules() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    broken text;
BEGIN
    broken := CASE
        WHEN NOT (cardinality(NEW.budget_ids) BETWEEN 1 AND 8) THEN 'reservations_budget_ids_check'
        WHEN NOT (cardinality(NEW.window_starts) = cardinality(NEW.budget_ids))
            THEN 'reservations_one_window_per_budget'
        WHEN NOT (NEW.amount_nano_usd BETWEEN 1 AND 1000000000000000000)
            THEN 'reservations_amount_nano_usd_check'
        WHEN NOT (NEW.fencing_epoch >= 1) THEN 'reservations_fencing_epoch_check'
        WHEN NOT (NEW.expires_at > NEW.created_at) THEN 'reservations_expires_after_created'
        WHEN NOT (NEW.state IN ('reserved', 'committed', 'released', 'expired'))
            THEN 'reservations_state_check'
        WHEN NOT (NEW.actual_nano_usd >= 0) THEN 'reservations_actual_nano_usd_check'
        WHEN NOT (NEW.committed_nano_usd >= 0) THEN 'reservations_committed_nano_usd_check'
        WHEN NOT (NEW.released_nano_usd >= 0) THEN 'reservations_released_nano_usd_check'
        WHEN NOT (NEW.overrun_nano_usd >= 0) THEN 'reservations_overrun_nano_usd_check'
        WHEN NOT ((NEW.state = 'reserved') = (NEW.resolved_at IS NULL)
                  AND (NEW.state = 'reserved'
                       OR NEW.committed_nano_usd + NEW.released_nano_usd + NEW.drawn_nano_usd
                          = NEW.amount_nano_usd))
            THEN 'reservations_resolution_complete'
        WHEN NOT (NEW.drawn_nano_usd BETWEEN 0 AND NEW.amount_nano_usd)
            THEN 'reservations_drawn_within_amount'
        WHEN NOT (NEW.is_credit OR NEW.drawn_nano_usd = 0) THEN 'reservations_only_credits_are_drawn'
        WHEN NOT (NOT NEW.is_credit OR NEW.drawn_from_reservation_id IS NULL)
            THEN 'reservations_credits_are_not_drawn_from_credits'
        WHEN NOT (NOT NEW.is_credit OR NEW.state <> 'committed')
            THEN 'reservations_credits_are_never_committed'
    END;
    IF broken IS NOT NULL THEN
        PERFORM spendguard_row_rule_broken(TG_TABLE_SCHEMA, TG_TABLE_NAME, broken);
    END IF;
    RETURN NEW;
END $$;
-- BEFORE row triggers fire in name order: this one after reservations_resolve_once, so it judges
-- the row as it will be stored. A later BEFORE trigger that changes NEW must sort before it.
CREATE TRIGGER reservations_row_rules BEFORE INSERT OR UPDATE ON reservations
    FOR EACH ROW EXECUTE FUNCTION reservations_row_rules();
-- It only checks, so it may fire where a CHECK would and ordinary triggers do not: under
-- session_replication_role = replica (logical replication's apply, pg_restore's data load).
ALTER TABLE reservations ENABLE ALWAYS TRIGGER reservations_row_rules;

ALTER TABLE reservations
    DROP CONSTRAINT reservations_budget_ids_check,
    DROP CONSTRAINT reservations_check,
    DROP CONSTRAINT reservations_amount_nano_usd_check,
    DROP CONSTRAINT reservations_fencing_epoch_check,
    DROP CONSTRAINT reservations_check1,
    DROP CONSTRAINT reservations_state_check,
    DROP CONSTRAINT reservations_actual_nano_usd_check,
    DROP CONSTRAINT reservations_committed_nano_usd_check,
    DROP CONSTRAINT reservations_released_nano_usd_check,
    DROP CONSTRAINT reservations_overrun_nano_usd_check,
    DROP CONSTRAINT reservations_resolution_complete,
    DROP CONSTRAINT reservations_drawn_within_amount,
    DROP CONSTRAINT reservations_only_credits_are_drawn,
    DROP CONSTRAINT reservations_credits_are_not_drawn_from_credits,
    DROP CONSTRAINT reservations_credits_are_never_committed;

-- The journal's statement trigger reads its new entries once: their row rules (the two CHECKs
-- it had; the one PostgreSQL had named `ledger_entries_check` is now
-- `ledger_entries_reservation_matches_kind`), the reservations they name, the windows they move. The rest is unchanged from
-- 20261125300001_fail_open_records.
CREATE OR REPLACE FUNCTION ledger_entries_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    broken text;
    found_records integer;
    wanted integer;
    updated integer;
    ids uuid[];
    tenants text[];
    budgets text[];
    found integer;
BEGIN
    SELECT min(CASE
               WHEN NOT (i.kind IN ('window_open', 'limit_set', 'reserve', 'commit', 'overrun',
                                    'release', 'expire'))
                   THEN 'ledger_entries_kind_check'
               WHEN NOT ((i.reservation_id IS NULL) = (i.kind IN ('window_open', 'limit_set')))
                   THEN 'ledger_entries_reservation_matches_kind'
           END),
           coalesce(array_agg(DISTINCT i.reservation_id) FILTER (WHERE i.reservation_id IS NOT NULL),
                    '{}'),
           array_agg(DISTINCT i.tenant_id),
           array_agg(DISTINCT i.budget_id),
           count(DISTINCT (i.tenant_id, i.budget_id, i.window_start))
      INTO broken, ids, tenants, budgets, wanted
      FROM inserted i;
    IF broken IS NOT NULL THEN
        PERFORM spendguard_row_rule_broken(TG_TABLE_SCHEMA, TG_TABLE_NAME, broken);
    END IF;
    -- `= ANY(array)` keeps these lookups on the primary key: a join against the transition table
    -- (which has no statistics) can be planned as a scan of the whole table.
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
       AND w.tenant_id = ANY(tenants)
       AND w.budget_id = ANY(budgets);
    GET DIAGNOSTICS updated = ROW_COUNT;
    IF updated <> wanted THEN
        RAISE EXCEPTION 'journal entry for an unknown budget window' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_kind_check,
    DROP CONSTRAINT ledger_entries_check;

-- The outbox's statement trigger reads its new rows once: their row rules (the four CHECKs it
-- had, refused before the allocation, as the CHECKs were), and whether each sequence was
-- allocated from its producer's counter.
CREATE OR REPLACE FUNCTION audit_outbox_sequence_allocated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    broken text;
    unallocated boolean;
BEGIN
    SELECT min(CASE
               WHEN NOT (i.producer_sequence >= 1) THEN 'audit_outbox_producer_sequence_check'
               WHEN NOT (length(i.event_sha256) = 32) THEN 'audit_outbox_event_sha256_check'
               WHEN NOT ((i.signing_key_id IS NULL) = (i.signature IS NULL)
                         AND (i.signing_algorithm IS NULL) = (i.signature IS NULL)
                         AND (i.signed_at IS NULL) = (i.signature IS NULL))
                   THEN 'audit_outbox_signature_complete'
               WHEN NOT (i.signature_inclusion IS NULL OR i.signature IS NOT NULL)
                   THEN 'audit_outbox_inclusion_signed'
           END),
           bool_or(p.producer_instance_id IS NULL OR i.producer_sequence >= p.next_sequence)
      INTO broken, unallocated
      FROM inserted i LEFT JOIN audit_producers p USING (producer_instance_id);
    IF broken IS NOT NULL THEN
        PERFORM spendguard_row_rule_broken(TG_TABLE_SCHEMA, TG_TABLE_NAME, broken);
    END IF;
    IF unallocated THEN
        RAISE EXCEPTION 'audit outbox sequence was not allocated from its producer'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;

ALTER TABLE audit_outbox
    DROP CONSTRAINT audit_outbox_producer_sequence_check,
    DROP CONSTRAINT audit_outbox_event_sha256_check,
    DROP CONSTRAINT audit_outbox_signature_complete,
    DROP CONSTRAINT audit_outbox_inclusion_signed;
