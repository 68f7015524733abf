CREATE OR REPLACE FUNCTION signing_keys_additive() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'signing keys are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.key_id <> OLD.key_id OR NEW.algorithm <> OLD.algorithm OR NEW.public_key <> OLD.public_key
       OR NEW.valid_from <> OLD.valid_from THEN
        RAISE EXCEPTION 'a signing key keeps its id, algorithm, public key and start' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.revoked_at IS NOT NULL AND (NEW.revoked_at IS NULL OR NEW.revoked_at > OLD.revoked_at) THEN
        RAISE EXCEPTION 'a revocation can only move earlier' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
