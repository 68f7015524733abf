-- One reservation per approval (S16), held by the database as well as by the planner: a human
-- decision lets one call go ahead. The planner accepts a reservation under an approval only
-- under the key `<call id>/approved/<approval id>` (one reservation id per approval); this
-- table's primary key refuses a second reservation for an approval even if that check were
-- wrong. Written in the transaction of the reservation (the load path: approvals never take
-- the cached path). Rows are never changed or deleted.
CREATE TABLE approval_uses (
    approval_id     uuid PRIMARY KEY REFERENCES approvals (approval_id),
    reservation_id  uuid NOT NULL UNIQUE REFERENCES reservations (reservation_id),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION approval_uses_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'approval uses are never changed or deleted'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER approval_uses_final BEFORE UPDATE OR DELETE ON approval_uses
    FOR EACH ROW EXECUTE FUNCTION approval_uses_final();

-- Reservations made under an approval before this table: exactly the one the planner makes, keyed
-- `<the approval's call id>/approved/<approval id>`, found by the reservations' unique key index
-- from the (few) approvals, never by scanning reservations (the ledger's sessions, migrations
-- included, run under a 5 s statement timeout). A reservation made before the key check of
-- 2026-11-27 under another key gets no row: that approval can still back its one resumed call.
INSERT INTO approval_uses (approval_id, reservation_id, created_at)
SELECT a.approval_id, r.reservation_id, r.created_at
  FROM approvals a
  JOIN reservations r
    ON r.tenant_id = a.tenant_id
   AND r.idempotency_key = a.idempotency_key || '/approved/' || a.approval_id::text;
