//! Database roles (migration `20261127600001_runtime_role`, docs/design/ledger-database-roles.md):
//! the ledger's processes log in as a member of `spendguard_runtime`, which owns nothing and
//! cannot switch the ledger's rules off; nobody can TRUNCATE a ledger table; a ledger refuses
//! to serve as a role that could.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_ledger::LedgerTuning;
use spendguard_testkit::PgCluster;
use spendguard_testkit::ledger::{TestLedger, migrate, shared_cluster};
use spendguard_testkit::postgres::runtime_url;
use sqlx::{Executor, PgPool};

/// Tables the runtime role may UPDATE whole (rows that change or are upserted); the others it
/// may only read and append to, or UPDATE only the columns of [`UPDATED_COLUMNS`].
const UPDATED: [&str; 8] = [
    "approvals",
    "audit_chain_heads",
    "audit_producers",
    "fencing_scopes",
    "forwarder_cursors",
    "leader_leases",
    "reservations",
    "signing_keys",
];

/// Columns the runtime role may UPDATE in tables it may not UPDATE whole (`fail_open_records`:
/// for its `FOR UPDATE` lock only; its trigger refuses changes), in column order.
const UPDATED_COLUMNS: [(&str, &[&str]); 5] = [
    (
        "budget_windows",
        &[
            "limit_nano_usd",
            "reserved_nano_usd",
            "committed_nano_usd",
            "overrun_nano_usd",
        ],
    ),
    (
        "budgets",
        &[
            "limit_nano_usd",
            "soft_cap_nano_usd",
            "window_kind",
            "updated_at",
        ],
    ),
    ("fail_open_records", &["record_id"]),
    (
        "retention_policies",
        &[
            "audit_retention_days",
            "redact_payloads_after_days",
            "updated_at",
        ],
    ),
    ("tenants", &["display_name", "updated_at"]),
];

async fn tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables
          WHERE schemaname = current_schema() AND tablename <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The SQLSTATE `sql` fails with.
async fn refused(pool: &PgPool, sql: &str) -> String {
    let error = pool
        .execute(sqlx::AssertSqlSafe(sql.to_owned()))
        .await
        .expect_err(sql);
    let database = error.as_database_error().expect("a database error");
    format!("{} {}", database.code().unwrap(), database.message())
}

#[tokio::test]
async fn every_table_grants_the_runtime_role_exactly_its_decision() {
    // Goal: the runtime role may do on each table what the ledger's code does there and nothing
    // more, and a table added without a decision fails here. Method: the catalogue's privileges
    // of spendguard_runtime on every table of the schema.
    let url = shared_cluster().create_database().await.unwrap();
    migrate(&url).await.unwrap();
    let owner = PgPool::connect(&url).await.unwrap();
    for table in tables(&owner).await {
        let held: Vec<String> = sqlx::query_scalar(
            "SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE',
                                        'REFERENCES', 'TRIGGER']) p
              WHERE has_table_privilege('spendguard_runtime', $1::regclass, p) ORDER BY 1",
        )
        .bind(&table)
        .fetch_all(&owner)
        .await
        .unwrap();
        let want: &[&str] = if UPDATED.contains(&table.as_str()) {
            &["INSERT", "SELECT", "UPDATE"]
        } else {
            &["INSERT", "SELECT"]
        };
        assert_eq!(held, want, "{table}");
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute
              WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped
                AND has_column_privilege('spendguard_runtime', attrelid, attnum, 'UPDATE')
                AND NOT has_table_privilege('spendguard_runtime', attrelid, 'UPDATE')
              ORDER BY attnum",
        )
        .bind(&table)
        .fetch_all(&owner)
        .await
        .unwrap();
        let want_columns = UPDATED_COLUMNS
            .iter()
            .find(|(name, _)| *name == table)
            .map_or(&[][..], |(_, columns)| *columns);
        assert_eq!(columns, want_columns, "{table}: columns it may update");
    }
    let owns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relowner = 'spendguard_runtime'::regrole",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(owns, 0);
}

#[tokio::test]
async fn the_runtime_role_cannot_switch_the_rules_off() {
    // Goal: what the ledger connects as cannot empty the journal, change history, disable a
    // rule or replace one. Method: a ledger's database with one reservation made; each
    // statement as the runtime login is refused for want of privilege (42501), and the rows
    // are all still there.
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease("t").await.unwrap();
    ledger.budget("t", "b", 1_000).await.unwrap();
    let reserved = ledger
        .client
        .reserve_set(spendguard_testkit::ledger::reserve_request(
            "t",
            "k",
            &["b"],
            10,
            &fencing,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            reserved.outcome,
            Some(spendguard_proto::ledger::v1::reserve_set_response::Outcome::Reserved(_))
        ),
        "{reserved:?}"
    );
    let runtime = PgPool::connect(&runtime_url(&ledger.database_url))
        .await
        .unwrap();
    let count = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM ledger_entries) + (SELECT count(*) FROM reservations)",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = count(runtime.clone()).await;
    assert!(before >= 2, "{before}");
    for sql in [
        "TRUNCATE ledger_entries",
        "TRUNCATE audit_outbox CASCADE",
        "DELETE FROM reservations",
        "UPDATE ledger_entries SET committed_delta = 0",
        // A window's money moved away from the key the ledger reads it by.
        "UPDATE budget_windows SET window_start = window_start - interval '1 day'",
        "UPDATE budgets SET budget_id = budget_id || '-old'",
        "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
        "ALTER TABLE reservations DISABLE TRIGGER reservations_row_rules",
        "DROP TRIGGER ledger_entries_append_only ON ledger_entries",
        "CREATE OR REPLACE FUNCTION append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
        "CREATE TABLE ledger_entries_shadow (id int)",
        // A temporary table would shadow the one the journal's rule reads.
        "CREATE TEMPORARY TABLE reservations (id int)",
        "SET session_replication_role = replica",
    ] {
        let refused = refused(&runtime, sql).await;
        assert!(refused.starts_with("42501 "), "{sql}: {refused}");
    }
    assert_eq!(count(runtime).await, before);
}

#[tokio::test]
async fn no_ledger_table_can_be_truncated_even_by_its_owner() {
    // Goal: TRUNCATE, which no row trigger sees, is refused on every ledger table for the owner
    // too, also where ordinary triggers are off (session_replication_role = replica). Method:
    // as the cluster's superuser, TRUNCATE ... CASCADE (past the foreign keys) of each table
    // in both replication roles.
    let url = shared_cluster().create_database().await.unwrap();
    migrate(&url).await.unwrap();
    let owner = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let all = tables(&owner).await;
    assert!(all.len() >= 22, "{all:?}");
    for role in ["origin", "replica"] {
        owner
            .execute(sqlx::AssertSqlSafe(format!(
                "SET session_replication_role = {role}"
            )))
            .await
            .unwrap();
        for table in &all {
            // With CASCADE past the foreign keys: the table's own trigger refuses first.
            let refused = refused(&owner, &format!("TRUNCATE {table} CASCADE")).await;
            assert!(
                refused.starts_with(&format!("23000 {table} cannot be truncated")),
                "{role}, {table}: {refused}"
            );
        }
    }
}

/// Starts a ledger on `url` logged in as `login`.
async fn start_as(
    url: &str,
    login: &str,
    allow: bool,
) -> spendguard_ledger::error::Result<spendguard_ledger::RunningLedger> {
    let mut url = url::Url::parse(url).unwrap();
    url.set_username(login).unwrap();
    let tuning = LedgerTuning {
        allow_privileged_database_role: allow,
        ..LedgerTuning::default()
    };
    spendguard_ledger::start(
        url.as_str(),
        "ledger-roles",
        &tuning,
        spendguard_testkit::signing::test_signing("ledger-roles"),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &mut prometheus_client::registry::Registry::default(),
    )
    .await
}

#[tokio::test]
async fn the_ledger_refuses_a_role_that_could_act_as_an_owner_unless_allowed() {
    // Goal: a ledger does not serve as a login that could get around its rules, however it
    // could: through membership in the owner of a table or function, by owning the schema
    // (whose owner may drop what is in it), by CREATEROLE (which may grant itself any
    // membership), by temporary tables or objects of its own in a schema (which would shadow
    // what the rules read), by session_replication_role (settable, or set for it), by running
    // as another role than its login, or by a privilege the decision does not grant; roles it
    // belongs to without inheriting count too; unless told to. Method: for each, a login that
    // is also a member of spendguard_runtime, on a database of its own; the start is refused,
    // naming why; with the allowance the first serves.
    let cases: [(&str, &[&str], &str); 11] = [
        (
            "roles_test_member",
            &[
                "CREATE ROLE roles_test_owner NOLOGIN",
                "CREATE ROLE roles_test_member LOGIN IN ROLE spendguard_runtime, roles_test_owner",
                "ALTER TABLE stop_records OWNER TO roles_test_owner",
                "ALTER FUNCTION append_only() OWNER TO roles_test_owner",
            ],
            "roles_test_member owns (or may act as the owner of) public.append_only(), \
             public.stop_records",
        ),
        (
            "roles_test_database_owner",
            &[
                "CREATE ROLE roles_test_database_owner LOGIN IN ROLE spendguard_runtime",
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I OWNER TO roles_test_database_owner', current_database()); END $$",
            ],
            "roles_test_database_owner owns (or may act as the owner of) schema public",
        ),
        (
            "roles_test_creator",
            &["CREATE ROLE roles_test_creator LOGIN CREATEROLE IN ROLE spendguard_runtime"],
            "roles_test_creator may create roles (CREATEROLE: roles_test_creator)",
        ),
        (
            "roles_test_temporary",
            &[
                "CREATE ROLE roles_test_temporary LOGIN IN ROLE spendguard_runtime",
                "DO $$ BEGIN EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO roles_test_temporary', current_database()); END $$",
            ],
            "roles_test_temporary may create temporary tables (REVOKE TEMPORARY ON DATABASE",
        ),
        (
            "roles_test_schema_writer",
            &[
                "CREATE ROLE roles_test_schema_writer LOGIN IN ROLE spendguard_runtime",
                "GRANT CREATE ON SCHEMA public TO roles_test_schema_writer",
            ],
            "roles_test_schema_writer may create objects in the schemas public",
        ),
        (
            "roles_test_replica",
            &[
                "CREATE ROLE roles_test_replica LOGIN IN ROLE spendguard_runtime",
                "GRANT SET ON PARAMETER session_replication_role TO roles_test_replica",
            ],
            "roles_test_replica may set session_replication_role",
        ),
        (
            "roles_test_replica_session",
            &[
                "CREATE ROLE roles_test_replica_session LOGIN IN ROLE spendguard_runtime",
                "ALTER ROLE roles_test_replica_session SET session_replication_role = replica",
            ],
            "roles_test_replica_session has session_replication_role = replica",
        ),
        (
            "roles_test_switcher",
            &[
                "CREATE ROLE roles_test_switcher LOGIN IN ROLE spendguard_runtime",
                "ALTER ROLE roles_test_switcher SET role = spendguard_runtime",
            ],
            "roles_test_switcher runs as spendguard_runtime by SET ROLE",
        ),
        (
            // Not inherited, but one SET ROLE away.
            "roles_test_noinherit",
            &[
                "CREATE ROLE roles_test_schema_writers NOLOGIN",
                "GRANT CREATE ON SCHEMA public TO roles_test_schema_writers",
                "CREATE ROLE roles_test_noinherit LOGIN NOINHERIT \
                 IN ROLE spendguard_runtime, roles_test_schema_writers",
            ],
            "roles_test_noinherit may create objects in the schemas public",
        ),
        (
            "roles_test_super_member",
            &[
                "CREATE ROLE roles_test_supers NOLOGIN SUPERUSER",
                "CREATE ROLE roles_test_super_member LOGIN IN ROLE spendguard_runtime, roles_test_supers",
            ],
            "roles_test_super_member may become a superuser (SET ROLE roles_test_supers)",
        ),
        (
            "roles_test_deleter",
            &[
                "CREATE ROLE roles_test_deleter LOGIN IN ROLE spendguard_runtime",
                "GRANT DELETE ON audit_producers TO roles_test_deleter",
            ],
            "roles_test_deleter may delete audit_producers",
        ),
    ];
    for (login, set_up, why) in cases {
        let url = shared_cluster().create_database().await.unwrap();
        migrate(&url).await.unwrap();
        let owner = PgPool::connect(&url).await.unwrap();
        for sql in set_up {
            owner.execute(*sql).await.unwrap();
        }
        let Err(refused) = start_as(&url, login, false).await else {
            panic!("a ledger served as {login}");
        };
        assert_eq!(refused.startup_code(), "LEDGER_DATABASE_ROLE_PRIVILEGED");
        assert!(refused.to_string().contains(why), "{refused}");
        if login == "roles_test_member" {
            start_as(&url, login, true).await.unwrap().shutdown().await;
        }
    }
}

#[tokio::test]
async fn the_migration_creates_the_group_role_or_says_who_must() {
    // Goal: on a cluster without spendguard_runtime the first migration creates it; a migrating
    // role that may not create roles (a managed database's owner) gets a clear error instead,
    // and migrates once an administrator has created it, after which a runtime login serves.
    // Method: a cluster of its own, without the roles the test clusters are given.
    let cluster = PgCluster::start(&[("fsync", "off")]).unwrap();
    let admin = PgPool::connect(&cluster.url("postgres")).await.unwrap();
    for sql in [
        "CREATE ROLE plain_owner LOGIN",
        "CREATE DATABASE by_plain_owner OWNER plain_owner",
        "CREATE DATABASE by_superuser",
    ] {
        admin.execute(sql).await.unwrap();
    }
    let mut plain = url::Url::parse(&cluster.url("by_plain_owner")).unwrap();
    plain.set_username("plain_owner").unwrap();
    let failed = migrate(plain.as_str()).await.unwrap_err();
    assert!(
        format!("{failed:#}").contains("cannot create the group role spendguard_runtime"),
        "{failed:#}"
    );
    let runtime_exists = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'spendguard_runtime')",
        )
        .fetch_one(&admin)
        .await
        .unwrap()
    };
    assert!(!runtime_exists().await);
    migrate(&cluster.url("by_superuser")).await.unwrap();
    assert!(runtime_exists().await);
    // Created once, the group role lets the plain owner migrate: it grants on its own tables.
    migrate(plain.as_str()).await.unwrap();
    let by_plain = PgPool::connect(plain.as_str()).await.unwrap();
    let granted: bool = sqlx::query_scalar(
        "SELECT has_table_privilege('spendguard_runtime', 'reservations', 'INSERT')",
    )
    .fetch_one(&by_plain)
    .await
    .unwrap();
    assert!(granted);
    // The set-up docs/ledger.md gives, end to end: the database's owner migrated (so it could
    // revoke TEMPORARY), and a ledger serves as a runtime login.
    admin
        .execute("CREATE ROLE plain_runtime LOGIN IN ROLE spendguard_runtime")
        .await
        .unwrap();
    start_as(plain.as_str(), "plain_runtime", false)
        .await
        .unwrap()
        .shutdown()
        .await;
}
