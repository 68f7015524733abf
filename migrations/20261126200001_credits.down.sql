-- Refused while a credit is open: code without credits would release its whole amount, money
-- its draws still hold. Release them (or let them expire), then migrate down. Rows of resolved
-- credits and of draws stay; without the columns, a draw's reserve entry of 0 is no longer
-- explained by its credit, but every balance stays right.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM reservations WHERE is_credit AND state = 'reserved') THEN
        RAISE EXCEPTION 'open credits exist; release them before migrating down';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION reservations_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
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

ALTER TABLE reservations DROP CONSTRAINT reservations_resolution_complete;
ALTER TABLE reservations ADD CONSTRAINT reservations_resolution_complete CHECK (
    (state = 'reserved') = (resolved_at IS NULL)
    AND (state = 'reserved' OR committed_nano_usd + released_nano_usd = amount_nano_usd)
) NOT VALID;

ALTER TABLE reservations
    DROP CONSTRAINT reservations_drawn_within_amount,
    DROP CONSTRAINT reservations_only_credits_are_drawn,
    DROP CONSTRAINT reservations_credits_are_not_drawn_from_credits,
    DROP CONSTRAINT reservations_credits_are_never_committed,
    DROP COLUMN is_credit,
    DROP COLUMN drawn_nano_usd,
    DROP COLUMN drawn_from_reservation_id;
