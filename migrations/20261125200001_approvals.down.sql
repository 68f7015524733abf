DROP TABLE approvals;
DROP FUNCTION approvals_resolve_once();
DROP FUNCTION approvals_tenant_exists();
