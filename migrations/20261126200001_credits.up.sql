-- Credits (docs/design/credits.md): a reservation a sidecar opens once and then admits calls
-- inside, each call's reservation drawn from it instead of from the budgets' headroom. A draw
-- moves no money in the budget windows: the call's reserve entry carries 0, and the credit
-- counts the amount as drawn, so its release (or expiry) returns only what was not drawn.
--
-- Every constraint here is added NOT VALID: rows written before this migration have the
-- defaults (not a credit, nothing drawn, not drawn from a credit), which satisfy them, and
-- validating would scan the whole table under the ledger's statement timeout. New and updated
-- rows are checked.
ALTER TABLE reservations
    ADD COLUMN is_credit boolean NOT NULL DEFAULT false,
    ADD COLUMN drawn_nano_usd bigint NOT NULL DEFAULT 0,
    ADD COLUMN drawn_from_reservation_id uuid;

ALTER TABLE reservations
    ADD CONSTRAINT reservations_drawn_within_amount
        CHECK (drawn_nano_usd BETWEEN 0 AND amount_nano_usd) NOT VALID,
    ADD CONSTRAINT reservations_only_credits_are_drawn
        CHECK (is_credit OR drawn_nano_usd = 0) NOT VALID,
    ADD CONSTRAINT reservations_credits_are_not_drawn_from_credits
        CHECK (NOT is_credit OR drawn_from_reservation_id IS NULL) NOT VALID,
    ADD CONSTRAINT reservations_credits_are_never_committed
        CHECK (NOT is_credit OR state <> 'committed') NOT VALID;

-- A resolved reservation accounts for all of its amount: committed, released, or (a credit's)
-- drawn by the calls it admitted.
ALTER TABLE reservations DROP CONSTRAINT reservations_resolution_complete;
ALTER TABLE reservations ADD CONSTRAINT reservations_resolution_complete CHECK (
    (state = 'reserved') = (resolved_at IS NULL)
    AND (state = 'reserved' OR committed_nano_usd + released_nano_usd + drawn_nano_usd = amount_nano_usd)
) NOT VALID;

-- A reservation resolves at most once; besides its resolution, only a credit's drawn total
-- changes, only upwards, and only while it is open.
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
        NEW.created_at, NEW.expires_at, NEW.is_credit, NEW.drawn_from_reservation_id)
       IS DISTINCT FROM
       (OLD.reservation_id, OLD.tenant_id, OLD.idempotency_key, OLD.request_sha256, OLD.budget_ids,
        OLD.window_starts, OLD.amount_nano_usd, OLD.fencing_scope_id, OLD.fencing_epoch,
        OLD.created_at, OLD.expires_at, OLD.is_credit, OLD.drawn_from_reservation_id) THEN
        RAISE EXCEPTION 'reservation % identity is immutable', OLD.reservation_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.drawn_nano_usd < OLD.drawn_nano_usd THEN
        RAISE EXCEPTION 'credit % cannot be undrawn', OLD.reservation_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
