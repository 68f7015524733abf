-- The ledger's processes stop owning what guards them.
--
-- Until now the ledger connected as the role that ran the migrations: the owner of every table,
-- who can TRUNCATE the journal (no row trigger fires), disable any trigger, or drop a rule. The
-- database's rules are meant to hold when application code is wrong, so the code that runs
-- must not be able to switch them off. From here on:
--
--   * the migrations run as the owner (`spendguard migrate`, a Helm hook Job);
--   * the ledger and the outbox forwarder log in as a role that is a member of the group role
--     `spendguard_runtime`, owns nothing, and holds exactly the privileges below: SELECT and
--     INSERT everywhere it writes, UPDATE only where rows change or are upserted (of the
--     columns that change, where that is a few; of one column where an immutable row is only
--     locked FOR UPDATE), DELETE and TRUNCATE nowhere;
--   * TRUNCATE is refused on every ledger table, for the owner too (a statement trigger):
--     history leaves only by DELETE, which the row triggers judge (retention, S19).
--
-- Roles belong to the cluster, not the database: the group role is created once (a role with
-- CREATEROLE runs this migration, or an administrator creates it first), and the down
-- migration revokes its privileges here but leaves it for other databases.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'spendguard_runtime') THEN
        BEGIN
            CREATE ROLE spendguard_runtime NOLOGIN;
        EXCEPTION
            -- Another database's migration created it meanwhile.
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'the migrating role % cannot create the group role spendguard_runtime', current_user
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'a superuser or a role with CREATEROLE runs once: CREATE ROLE spendguard_runtime NOLOGIN; then migrate again';
        END;
    END IF;
END $$;

-- No temporary objects for anyone but the owner: a table in the session's temporary schema
-- shadows the real one of the same name in the rules' unqualified lookups, and a temporary
-- trigger function could move money at a trigger depth the rules trust. The database is
-- SpendGuard's own. (Only its owner may revoke: under another role this is a warning and does
-- nothing, and the ledger then refuses to start, naming the statement.)
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END $$;
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO spendguard_runtime', current_schema());
END $$;

-- Every table has its decision here; tests/database_roles.rs fails on a table without one.
GRANT SELECT ON _sqlx_migrations TO spendguard_runtime;  -- /readyz: every migration applied
GRANT SELECT, INSERT, UPDATE ON
    reservations, fencing_scopes, audit_producers, approvals, signing_keys, audit_chain_heads,
    forwarder_cursors, leader_leases
    TO spendguard_runtime;
-- Where only some columns change, only they may: a window's money (which the journal's trigger
-- applies; its key moved would take the money away from the window the ledger reads), a
-- budget's settings, a tenant's name, a retention policy's terms.
GRANT SELECT, INSERT ON tenants, budgets, budget_windows, retention_policies TO spendguard_runtime;
GRANT UPDATE (display_name, updated_at) ON tenants TO spendguard_runtime;
GRANT UPDATE (limit_nano_usd, soft_cap_nano_usd, window_kind, updated_at) ON budgets
    TO spendguard_runtime;
GRANT UPDATE (limit_nano_usd, reserved_nano_usd, committed_nano_usd, overrun_nano_usd)
    ON budget_windows TO spendguard_runtime;
GRANT UPDATE (audit_retention_days, redact_payloads_after_days, updated_at) ON retention_policies
    TO spendguard_runtime;
GRANT SELECT, INSERT ON
    ledger_entries, fencing_scope_events, audit_outbox, approval_uses, fail_open_records,
    stop_records, pricing_registrations, audit_chain, audit_checkpoints, audit_quarantine
    TO spendguard_runtime;
-- Immutable, but locked FOR UPDATE to serialise two records of one call: PostgreSQL wants
-- UPDATE on one column for the lock; the row trigger refuses any actual change.
GRANT UPDATE (record_id) ON fail_open_records TO spendguard_runtime;
GRANT USAGE ON SEQUENCE audit_quarantine_quarantine_id_seq TO spendguard_runtime;

CREATE FUNCTION spendguard_refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% cannot be truncated: rows leave the ledger only by DELETE, under its row rules', TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END $$;

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
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION spendguard_refuse_truncate()',
                       t || '_never_truncated', t);
        -- Also under session_replication_role = replica: it only refuses.
        EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER %I', t, t || '_never_truncated');
    END LOOP;
END $$;
