DROP INDEX fencing_scope_events_request_once;
ALTER TABLE fencing_scope_events
    DROP CONSTRAINT fencing_scope_events_request_with_fingerprint,
    DROP COLUMN request_sha256,
    DROP COLUMN request_id;
