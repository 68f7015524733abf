CREATE INDEX audit_outbox_by_tenant ON audit_outbox (tenant_id, occurred_at);
