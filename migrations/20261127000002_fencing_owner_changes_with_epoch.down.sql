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
    RETURN NEW;
END $$;
