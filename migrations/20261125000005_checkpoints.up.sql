-- Signed checkpoints over each tenant's audit hash chain (spec S8), in the C2SP signed-note /
-- tlog-checkpoint format. The forwarder writes one after each pass that appended to a tenant's
-- chain; root_hash is the chain head (chain_hash at chain_seq = tree_size), not a Merkle root.
CREATE TABLE audit_checkpoints (
    tenant_id   text NOT NULL,
    tree_size   bigint NOT NULL CHECK (tree_size >= 1),
    root_hash   bytea NOT NULL CHECK (length(root_hash) = 32),
    note        text NOT NULL,
    key_name    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, tree_size)
);

CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION evidence_append_only();
