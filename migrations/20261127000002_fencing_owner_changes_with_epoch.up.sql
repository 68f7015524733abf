-- A fencing scope changes hands only with a new epoch (S3): a renewal keeps the owner and the
-- epoch, a restart of the owner or a takeover by another raises the epoch by one. Before this, an
-- owner change at the same epoch was refused only by the planner; now the database refuses it too,
-- so a writer whose plan lost a race with another replica cannot hand the scope over silently.
CREATE OR REPLACE FUNCTION fencing_scopes_epoch_monotonic() RETURNS trigger LANGUAGE plpgsql AS $$
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
    IF TG_OP = 'UPDATE' AND NEW.owner_workload_id <> OLD.owner_workload_id AND NEW.epoch = OLD.epoch THEN
        RAISE EXCEPTION 'fencing scope % changes hands only with a new epoch', OLD.scope_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
