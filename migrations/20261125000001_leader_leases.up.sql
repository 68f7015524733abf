-- Leader leases for singleton work outside Kubernetes (spec S1, mode `postgres`). One row per
-- lease name; a candidate acquires or renews it with one compare-and-set UPDATE on the database
-- clock (see runtime/leader/src/postgres.rs).
CREATE TABLE leader_leases (
    lease_name    text PRIMARY KEY CHECK (length(lease_name) BETWEEN 1 AND 253),
    holder        text NOT NULL CHECK (length(holder) BETWEEN 1 AND 253),
    acquired_at   timestamptz NOT NULL,
    renewed_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL CHECK (expires_at > renewed_at),
    transitions   bigint NOT NULL DEFAULT 0 CHECK (transitions >= 0)
);
