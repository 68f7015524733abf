-- Retention per tenant (S19, mirrored from RetentionPolicy CRs by the operator through
-- UpsertRetentionPolicy, which audits every change as `retention_policy.upserted`). The bounds
-- match the CRD's: evidence is kept 1 to 3650 days; payloads, when redacted at all, are redacted
-- no later than their audit records are dropped. Nothing enforces retention yet: the retention
-- sweeper that reads this table is a later slice.
CREATE TABLE retention_policies (
    tenant_id                   text PRIMARY KEY REFERENCES tenants (tenant_id),
    audit_retention_days        integer NOT NULL CHECK (audit_retention_days BETWEEN 1 AND 3650),
    redact_payloads_after_days  integer CHECK (redact_payloads_after_days BETWEEN 0 AND 3650),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT retention_redaction_within_retention
        CHECK (redact_payloads_after_days IS NULL OR redact_payloads_after_days <= audit_retention_days)
);
