-- Rows signed in batches cannot be verified without their proofs: run this only on a database
-- whose batch-signed evidence has been exported or is no longer needed.
ALTER TABLE audit_quarantine DROP COLUMN signature_inclusion;
ALTER TABLE audit_chain DROP COLUMN signature_inclusion;
ALTER TABLE audit_outbox DROP COLUMN signature_inclusion;
