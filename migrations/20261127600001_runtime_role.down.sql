-- Revokes what 20261127600001_runtime_role.up.sql granted, drops its TRUNCATE triggers and
-- gives PUBLIC back its default TEMPORARY on the database. The group role stays: roles belong
-- to the cluster, and other databases may grant to it.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['tenants', 'budgets', 'budget_windows', 'reservations',
                             'ledger_entries', 'fencing_scopes', 'fencing_scope_events',
                             'audit_producers', 'audit_outbox', 'approvals', 'approval_uses',
                             'fail_open_records', 'stop_records', 'retention_policies',
                             'pricing_registrations', 'signing_keys', 'audit_chain',
                             'audit_chain_heads', 'audit_checkpoints', 'audit_quarantine',
                             'forwarder_cursors', 'leader_leases'] LOOP
        EXECUTE format('DROP TRIGGER %I ON %I', t || '_never_truncated', t);
        EXECUTE format('REVOKE ALL ON %I FROM spendguard_runtime', t);
    END LOOP;
END $$;
DROP FUNCTION spendguard_refuse_truncate();
DO $$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
    EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM spendguard_runtime', current_schema());
END $$;
REVOKE ALL ON _sqlx_migrations FROM spendguard_runtime;
REVOKE UPDATE (record_id) ON fail_open_records FROM spendguard_runtime;
REVOKE ALL ON SEQUENCE audit_quarantine_quarantine_id_seq FROM spendguard_runtime;
