DROP TABLE forwarder_cursors;
DROP TABLE audit_quarantine;
DROP TABLE audit_chain_heads;
DROP TABLE audit_chain;
DROP FUNCTION evidence_append_only();
