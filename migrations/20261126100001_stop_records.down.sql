-- The `decision.stopped` events already written stay in the outbox and the audit chain.
DROP TABLE stop_records;
DROP FUNCTION stop_records_immutable();
