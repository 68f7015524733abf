-- Canonical ingest (spec S8): the outbox forwarder verifies each outbox row (schema, producer
-- sequence, signature against signing_keys) and appends it to its tenant's hash chain, or puts it
-- in quarantine with the reason. Both are append-only; the forwarder's cursor advances in the same
-- transaction, so no row is forwarded twice.

-- One row per tenant chain entry. chain_hash = sha256("spendguard.chain.v1" || prev || event_sha256).
CREATE TABLE audit_chain (
    tenant_id             text NOT NULL,
    chain_seq             bigint NOT NULL CHECK (chain_seq >= 1),
    producer_instance_id  text NOT NULL,
    producer_sequence     bigint NOT NULL,
    event_type            text NOT NULL,
    occurred_at           timestamptz NOT NULL,
    canonical_event       bytea NOT NULL,
    event_sha256          bytea NOT NULL CHECK (length(event_sha256) = 32),
    signing_key_id        text,
    signing_algorithm     text,
    signed_at             timestamptz,
    signature             bytea,
    prev_chain_hash       bytea NOT NULL CHECK (length(prev_chain_hash) = 32),
    chain_hash            bytea NOT NULL CHECK (length(chain_hash) = 32),
    ingested_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, chain_seq),
    UNIQUE (producer_instance_id, producer_sequence)
);
CREATE INDEX audit_chain_by_time ON audit_chain (tenant_id, occurred_at);

-- Each tenant's head, for O(1) appends; the chain row it names must exist.
CREATE TABLE audit_chain_heads (
    tenant_id   text PRIMARY KEY,
    chain_seq   bigint NOT NULL,
    chain_hash  bytea NOT NULL CHECK (length(chain_hash) = 32),
    FOREIGN KEY (tenant_id, chain_seq) REFERENCES audit_chain (tenant_id, chain_seq) DEFERRABLE INITIALLY DEFERRED
);

-- Rows that failed verification, with enough to debug them. Never enter the chain.
CREATE TABLE audit_quarantine (
    quarantine_id         bigserial PRIMARY KEY,
    producer_instance_id  text NOT NULL,
    producer_sequence     bigint NOT NULL,
    tenant_id             text NOT NULL,
    event_type            text NOT NULL,
    reason_code           text NOT NULL,
    detail                text NOT NULL,
    canonical_event       bytea NOT NULL,
    event_sha256          bytea NOT NULL,
    signing_key_id        text,
    signing_algorithm     text,
    signed_at             timestamptz,
    signature             bytea,
    quarantined_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (producer_instance_id, producer_sequence)
);

-- Next outbox sequence to forward, per producer.
CREATE TABLE forwarder_cursors (
    producer_instance_id  text PRIMARY KEY,
    next_sequence         bigint NOT NULL CHECK (next_sequence >= 1),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION evidence_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER audit_chain_append_only BEFORE UPDATE OR DELETE ON audit_chain
    FOR EACH ROW EXECUTE FUNCTION evidence_append_only();
CREATE TRIGGER audit_quarantine_append_only BEFORE UPDATE OR DELETE ON audit_quarantine
    FOR EACH ROW EXECUTE FUNCTION evidence_append_only();
