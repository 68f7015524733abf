-- Back to resolve-once without late usage. Rows that carry late usage stay as they are (an
-- expired row with its late actual and overrun); only further late bookings are refused.
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
