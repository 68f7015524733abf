-- STOP evidence (spec S22: "each decision outcome must be auditable or explicitly marked as not
-- published"). A sidecar publishes the STOPs it answered with RecordStops, after the fact and in
-- batches; each record becomes a row here and, in the same transaction, the audit event
-- `decision.stopped` (one call) or `decision.stops_unpublished` (a summary of STOPs the sidecar
-- could not publish one by one). Moves no money: no journal entry names a stop record.
-- Record ids are UUIDs the sidecar chose when it decided; the row exists so that a retried
-- request replays instead of writing a second event (`request_sha256` is what a retry must match).
CREATE TABLE stop_records (
    record_id          uuid PRIMARY KEY,
    tenant_id          text NOT NULL REFERENCES tenants (tenant_id),
    -- NULL for a summary.
    call_id            text,
    reason             text NOT NULL CHECK (reason ~ '^[A-Z][A-Z0-9_]{0,63}$'),
    stop_count         bigint NOT NULL CHECK (stop_count >= 1),
    request_sha256     text NOT NULL CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
    -- Database clock.
    recorded_at        timestamptz NOT NULL,
    CHECK (call_id IS NULL OR stop_count = 1)
);

-- Evidence is immutable: never updated, never deleted (retention, S19, will prune through the
-- audit chain's own rules, not by deleting here one row at a time).
CREATE FUNCTION stop_records_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'stop records are immutable' USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER stop_records_immutable BEFORE UPDATE OR DELETE ON stop_records
    FOR EACH ROW EXECUTE FUNCTION stop_records_immutable();
