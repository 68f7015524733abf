-- Revokes what 20261127600001_runtime_role.up.sql granted, drops its TRUNCATE triggers and
-- gives PUBLIC back its default TEMPORARY on the database. The group role stays: roles belong
-- to the cluster, and other databases may grant to it.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tg.tgname, c.relname FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
              WHERE tg.tgfoid = 'spendguard_refuse_truncate'::regproc LOOP
        EXECUTE format('DROP TRIGGER %I ON %I', t.tgname, t.relname);
    END LOOP;
    -- Column grants go with the table's.
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() LOOP
        EXECUTE format('REVOKE ALL ON %I FROM spendguard_runtime', t.tablename);
    END LOOP;
END $$;
DROP FUNCTION spendguard_refuse_truncate();
DO $$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
    EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM spendguard_runtime', current_schema());
END $$;
REVOKE ALL ON SEQUENCE audit_quarantine_quarantine_id_seq FROM spendguard_runtime;
