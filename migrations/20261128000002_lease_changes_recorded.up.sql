-- Every change of a fencing lease leaves its history row (spec S3: "every successful acquire
-- appends a fencing_scope_events row"), held by the database as the epoch is: a scope whose
-- holder, epoch or expiry is written must, by the end of its transaction, have a history row of
-- that same transaction (`occurred_at` defaults to its start, now()) that names exactly that
-- holder, epoch and expiry. An older row does not count: setting a lease back to an earlier
-- renewal's expiry would shorten it, and let a takeover in early, with no trace. The ledger
-- writes the scope and then its history rows (store.rs `write_leases`), so the check is deferred
-- to COMMIT; a renewal writes a row too (`renewed`), since its expiry changes. A refusal rolls the whole batch back (SQLSTATE 23000),
-- and the writer runs its commands again one at a time, as for any rule.

-- The lookup below, and any reading of one scope's history, by key instead of the whole table.
-- (Built inside the migration's transaction: lease acquires wait while it builds, which for a
-- history of millions of rows is seconds.)
CREATE INDEX fencing_scope_events_by_scope ON fencing_scope_events (scope_id, epoch, expires_at);

CREATE FUNCTION fencing_scopes_change_recorded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM fencing_scope_events e
                    WHERE e.scope_id = NEW.scope_id AND e.epoch = NEW.epoch
                      AND e.expires_at = NEW.expires_at
                      AND e.workload_instance_id = NEW.owner_workload_id
                      AND e.tenant_id = NEW.tenant_id
                      AND e.occurred_at = now()) THEN
        RAISE EXCEPTION 'fencing scope % changed (holder %, epoch %, expiry %) without its history row',
                        NEW.scope_id, NEW.owner_workload_id, NEW.epoch, NEW.expires_at
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER fencing_scopes_change_recorded
    AFTER INSERT OR UPDATE OF owner_workload_id, epoch, expires_at ON fencing_scopes
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION fencing_scopes_change_recorded();
