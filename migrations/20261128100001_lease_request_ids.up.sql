-- AcquireFencingLease's optional request id (S3, "idempotency everywhere"): an acquire that
-- carries one is recorded with it and the fingerprint of its fields on its history row, so a
-- retry finds the first answer instead of raising the epoch again. Unique per scope, checked by
-- the ledger's planner against the row it loads, and by this index if two ever raced.
-- Adding nullable columns without a default rewrites nothing; the index is built inside the
-- migration's transaction, so acquires wait while it builds (seconds for millions of rows).
ALTER TABLE fencing_scope_events
    ADD COLUMN request_id text CHECK (length(request_id) BETWEEN 1 AND 200),
    ADD COLUMN request_sha256 text CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
    ADD CONSTRAINT fencing_scope_events_request_with_fingerprint
        CHECK ((request_id IS NULL) = (request_sha256 IS NULL));

CREATE UNIQUE INDEX fencing_scope_events_request_once
    ON fencing_scope_events (scope_id, request_id) WHERE request_id IS NOT NULL;
