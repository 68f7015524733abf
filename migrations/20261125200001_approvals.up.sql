-- Approvals (spec S14): REQUIRE_APPROVAL becomes a first-class, resumable record owned by the
-- ledger. A record is created pending (CreateApproval, fenced like ReserveSet), then leaves
-- `pending` exactly once: approved or denied by a named approver (ResolveApproval), or expired on
-- the database clock (SweepExpired, or a resolve that arrives too late). Approving moves no
-- money: the resumed call makes a fresh ReserveSet. Every change writes its audit event in the
-- same transaction (approval.created / .approved / .denied / .expired).
CREATE TABLE approvals (
    approval_id         uuid PRIMARY KEY,
    -- No per-row foreign key (as for reservations): a statement trigger checks the tenant.
    tenant_id           text NOT NULL,
    idempotency_key     text NOT NULL,
    request_sha256      text NOT NULL CHECK (request_sha256 ~ '^[0-9a-f]{64}$'),
    budget_ids          text[] NOT NULL CHECK (cardinality(budget_ids) BETWEEN 1 AND 8),
    -- The budget whose soft cap the call would cross; one of budget_ids.
    budget_id           text NOT NULL CHECK (budget_id = ANY (budget_ids)),
    amount_nano_usd     bigint NOT NULL CHECK (amount_nano_usd BETWEEN 1 AND 1000000000000000000),
    -- Immutable decision context, RFC 8785 canonical JSON rendered by the ledger: reason code,
    -- requesting workload, call/run/workflow ids, provider, model, contract version, pricing
    -- version and hash, bundle hash.
    context             jsonb NOT NULL CHECK (jsonb_typeof(context) = 'object'
                                              AND octet_length(context::text) <= 8192),
    fencing_scope_id    text NOT NULL,
    fencing_epoch       bigint NOT NULL CHECK (fencing_epoch >= 1),
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL CHECK (expires_at > created_at),
    state               text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
    resolved_by         text CHECK (length(resolved_by) BETWEEN 1 AND 256),
    resolved_at         timestamptz,
    resolution_reason   text CHECK (length(resolution_reason) <= 256),
    UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT approvals_resolution_complete CHECK (
        (state = 'pending') = (resolved_at IS NULL)
        AND (state NOT IN ('approved', 'denied') OR resolved_by IS NOT NULL)
        AND (state <> 'pending' OR (resolved_by IS NULL AND resolution_reason IS NULL))
    )
);
CREATE INDEX approvals_pending_by_expiry ON approvals (expires_at) WHERE state = 'pending';
CREATE INDEX approvals_by_state ON approvals (state, approval_id);

-- An approval leaves `pending` at most once, and nothing but its resolution ever changes: the
-- amount and decision context are immutable after insert.
CREATE FUNCTION approvals_resolve_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'approvals are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF (NEW.approval_id, NEW.tenant_id, NEW.idempotency_key, NEW.request_sha256, NEW.budget_ids,
        NEW.budget_id, NEW.amount_nano_usd, NEW.context, NEW.fencing_scope_id, NEW.fencing_epoch,
        NEW.created_at, NEW.expires_at)
       IS DISTINCT FROM
       (OLD.approval_id, OLD.tenant_id, OLD.idempotency_key, OLD.request_sha256, OLD.budget_ids,
        OLD.budget_id, OLD.amount_nano_usd, OLD.context, OLD.fencing_scope_id, OLD.fencing_epoch,
        OLD.created_at, OLD.expires_at) THEN
        RAISE EXCEPTION 'approval % amount and decision context are immutable', OLD.approval_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.state <> 'pending' THEN
        RAISE EXCEPTION 'approval % is already %', OLD.approval_id, OLD.state
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER approvals_resolve_once BEFORE UPDATE OR DELETE ON approvals
    FOR EACH ROW EXECUTE FUNCTION approvals_resolve_once();

CREATE FUNCTION approvals_tenant_exists() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows n WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.tenant_id = n.tenant_id)) THEN
        RAISE EXCEPTION 'approval for an unknown tenant' USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER approvals_tenant_exists AFTER INSERT ON approvals
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION approvals_tenant_exists();
