-- Late usage (docs/ledger.md, "Commits after the TTL"): a call can outlive its reservation's
-- TTL. Its commit is then booked, never dropped: the reservation stays `expired` (what it held
-- went back to the budgets), and the usage is an overrun entry in the journal. When the sweep
-- expired the row in an earlier transaction, the late commit records itself on that row: the
-- one change an expired row ever takes, once, from a plain expiry (no usage, no resolved epoch)
-- to the late usage (actual and overrun alike, 0 included) and the committing epoch as its
-- resolved epoch; committed, released and everything else unchanged.
CREATE OR REPLACE FUNCTION reservations_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'reservations are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.state = 'expired' AND NOT OLD.is_credit AND OLD.resolved_epoch IS NULL
       AND OLD.actual_nano_usd = 0 AND OLD.overrun_nano_usd = 0
       AND NEW.resolved_epoch >= 1
       AND NEW.actual_nano_usd >= 0 AND NEW.overrun_nano_usd = NEW.actual_nano_usd
       AND (NEW.reservation_id, NEW.tenant_id, NEW.idempotency_key, NEW.request_sha256,
            NEW.budget_ids, NEW.window_starts, NEW.amount_nano_usd, NEW.fencing_scope_id,
            NEW.fencing_epoch, NEW.created_at, NEW.expires_at, NEW.is_credit,
            NEW.drawn_from_reservation_id, NEW.state, NEW.resolved_at,
            NEW.committed_nano_usd, NEW.released_nano_usd, NEW.drawn_nano_usd)
           IS NOT DISTINCT FROM
           (OLD.reservation_id, OLD.tenant_id, OLD.idempotency_key, OLD.request_sha256,
            OLD.budget_ids, OLD.window_starts, OLD.amount_nano_usd, OLD.fencing_scope_id,
            OLD.fencing_epoch, OLD.created_at, OLD.expires_at, OLD.is_credit,
            OLD.drawn_from_reservation_id, OLD.state, OLD.resolved_at,
            OLD.committed_nano_usd, OLD.released_nano_usd, OLD.drawn_nano_usd) THEN
        RETURN NEW;
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
