-- Batch signatures (docs/design/evidence-signing.md, "Batch signatures"): the ledger signs the
-- events of one write batch once, over the Merkle root of their sha256s. Each row keeps that
-- signature and its own inclusion proof (runtime/evidence/src/batch.rs), so it still verifies
-- alone. NULL: the signature covers this one event (every row written before this migration).
--
-- Adding a nullable column rewrites nothing. The checks are NOT VALID: they hold for every row
-- written from now on, and the rows before have no proof, so validating them (a full scan under
-- the migration's lock) would prove nothing new.
ALTER TABLE audit_outbox
    ADD COLUMN signature_inclusion bytea,
    ADD CONSTRAINT audit_outbox_inclusion_signed
        CHECK (signature_inclusion IS NULL OR signature IS NOT NULL) NOT VALID;
ALTER TABLE audit_chain
    ADD COLUMN signature_inclusion bytea,
    ADD CONSTRAINT audit_chain_inclusion_signed
        CHECK (signature_inclusion IS NULL OR signature IS NOT NULL) NOT VALID;
ALTER TABLE audit_quarantine
    ADD COLUMN signature_inclusion bytea;
