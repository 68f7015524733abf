-- Producer signatures on audit events (spec S6) and the key registry (S7).
--
-- A signature covers the signed envelope of runtime/evidence (key id, algorithm, signing time,
-- producer id and the sha256 of `canonical_event`), so it is stored with exactly those fields.
-- Unsigned rows exist only under the demo profile; the four columns are all set or all null.
ALTER TABLE audit_outbox
    ADD COLUMN signing_key_id    text,
    ADD COLUMN signing_algorithm text,
    ADD COLUMN signed_at         timestamptz,
    ADD COLUMN signature         bytea,
    ADD CONSTRAINT audit_outbox_signature_complete CHECK (
        (signing_key_id IS NULL) = (signature IS NULL)
        AND (signing_algorithm IS NULL) = (signature IS NULL)
        AND (signed_at IS NULL) = (signature IS NULL));

-- Public keys that may sign evidence, with their validity windows. Verification judges an event's
-- signed time against its key's window and revocation. Keys are added, never re-pointed: a key
-- id keeps its public key forever (trigger below); a revocation may be set or moved earlier.
CREATE TABLE signing_keys (
    key_id        text PRIMARY KEY CHECK (length(key_id) BETWEEN 1 AND 128),
    algorithm     text NOT NULL CHECK (algorithm IN ('ed25519', 'ecdsa-p256-sha256')),
    public_key    bytea NOT NULL,
    valid_from    timestamptz NOT NULL,
    valid_until   timestamptz,
    revoked_at    timestamptz,
    registered_at timestamptz NOT NULL DEFAULT now(),
    CHECK (valid_until IS NULL OR valid_until > valid_from)
);

CREATE FUNCTION signing_keys_additive() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER signing_keys_additive BEFORE UPDATE OR DELETE ON signing_keys
    FOR EACH ROW EXECUTE FUNCTION signing_keys_additive();
