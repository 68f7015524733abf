-- Back to the CHECK constraints of before 20261127400001, and the two statement triggers'
-- earlier bodies. One difference: every CHECK comes back NOT VALID (pg_constraint.convalidated
-- false), also the 15 that were validated before. The rows written meanwhile were checked by the
-- triggers, and validating would scan the tables under the migration's statement timeout; run
-- ALTER TABLE ... VALIDATE CONSTRAINT by hand if it matters.
ALTER TABLE reservations
    ADD CONSTRAINT reservations_budget_ids_check
        CHECK (cardinality(budget_ids) BETWEEN 1 AND 8) NOT VALID,
    ADD CONSTRAINT reservations_check
        CHECK (cardinality(window_starts) = cardinality(budget_ids)) NOT VALID,
    ADD CONSTRAINT reservations_amount_nano_usd_check
        CHECK (amount_nano_usd BETWEEN 1 AND 1000000000000000000) NOT VALID,
    ADD CONSTRAINT reservations_fencing_epoch_check CHECK (fencing_epoch >= 1) NOT VALID,
    ADD CONSTRAINT reservations_check1 CHECK (expires_at > created_at) NOT VALID,
    ADD CONSTRAINT reservations_state_check
        CHECK (state IN ('reserved', 'committed', 'released', 'expired')) NOT VALID,
    ADD CONSTRAINT reservations_actual_nano_usd_check CHECK (actual_nano_usd >= 0) NOT VALID,
    ADD CONSTRAINT reservations_committed_nano_usd_check CHECK (committed_nano_usd >= 0) NOT VALID,
    ADD CONSTRAINT reservations_released_nano_usd_check CHECK (released_nano_usd >= 0) NOT VALID,
    ADD CONSTRAINT reservations_overrun_nano_usd_check CHECK (overrun_nano_usd >= 0) NOT VALID,
    ADD CONSTRAINT reservations_resolution_complete CHECK (
        (state = 'reserved') = (resolved_at IS NULL)
        AND (state = 'reserved' OR committed_nano_usd + released_nano_usd + drawn_nano_usd = amount_nano_usd)
    ) NOT VALID,
    ADD CONSTRAINT reservations_drawn_within_amount
        CHECK (drawn_nano_usd BETWEEN 0 AND amount_nano_usd) NOT VALID,
    ADD CONSTRAINT reservations_only_credits_are_drawn
        CHECK (is_credit OR drawn_nano_usd = 0) NOT VALID,
    ADD CONSTRAINT reservations_credits_are_not_drawn_from_credits
        CHECK (NOT is_credit OR drawn_from_reservation_id IS NULL) NOT VALID,
    ADD CONSTRAINT reservations_credits_are_never_committed
        CHECK (NOT is_credit OR state <> 'committed') NOT VALID;
DROP TRIGGER reservations_row_rules ON reservations;
DROP FUNCTION reservations_row_rules();

ALTER TABLE ledger_entries
    ADD CONSTRAINT ledger_entries_kind_check
        CHECK (kind IN ('window_open', 'limit_set', 'reserve', 'commit', 'overrun', 'release',
                        'expire')) NOT VALID,
    ADD CONSTRAINT ledger_entries_check
        CHECK ((reservation_id IS NULL) = (kind IN ('window_open', 'limit_set'))) NOT VALID;
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

ALTER TABLE audit_outbox
    ADD CONSTRAINT audit_outbox_producer_sequence_check CHECK (producer_sequence >= 1) NOT VALID,
    ADD CONSTRAINT audit_outbox_event_sha256_check CHECK (length(event_sha256) = 32) NOT VALID,
    ADD CONSTRAINT audit_outbox_signature_complete CHECK (
        (signing_key_id IS NULL) = (signature IS NULL)
        AND (signing_algorithm IS NULL) = (signature IS NULL)
        AND (signed_at IS NULL) = (signature IS NULL)) NOT VALID,
    ADD CONSTRAINT audit_outbox_inclusion_signed
        CHECK (signature_inclusion IS NULL OR signature IS NOT NULL) NOT VALID;
CREATE OR REPLACE FUNCTION audit_outbox_sequence_allocated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted i LEFT JOIN audit_producers p USING (producer_instance_id)
                WHERE p.producer_instance_id IS NULL OR i.producer_sequence >= p.next_sequence) THEN
        RAISE EXCEPTION 'audit outbox sequence was not allocated from its producer'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;

DROP FUNCTION spendguard_row_rule_broken(text, text, text);
