DROP TABLE signing_keys;
DROP FUNCTION signing_keys_additive();
ALTER TABLE audit_outbox
    DROP CONSTRAINT audit_outbox_signature_complete,
    DROP COLUMN signature,
    DROP COLUMN signed_at,
    DROP COLUMN signing_algorithm,
    DROP COLUMN signing_key_id;
