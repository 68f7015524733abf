-- The outbox is read only by producer and sequence (its primary key: the forwarder). The index by
-- tenant and time served no query, and every event paid an index entry for it on the ledger's hot
-- path (docs/benchmarks.md, 2026-11-26). Per-tenant reads go to audit_chain (audit_chain_by_time).
DROP INDEX audit_outbox_by_tenant;
