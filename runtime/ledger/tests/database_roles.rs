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

/// Tables the runtime role may UPDATE (rows that change or are upserted); every other table
/// it may only read and append to (`fail_open_records` also has one column updatable, which
/// `FOR UPDATE` needs; its trigger refuses changes).
const UPDATED: [&str; 12] = [
    "approvals",
    "audit_chain_heads",
    "audit_producers",
    "budget_windows",
    "budgets",
    "fencing_scopes",
    "forwarder_cursors",
    "leader_leases",
    "reservations",
    "retention_policies",
    "signing_keys",
    "tenants",
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
                AND NOT has_table_privilege('spendguard_runtime', attrelid, 'UPDATE')",
        )
        .bind(&table)
        .fetch_all(&owner)
        .await
        .unwrap();
        let locked: &[&str] = match table.as_str() {
            "fail_open_records" => &["record_id"],
            _ => &[],
        };
        assert_eq!(
            columns, locked,
            "{table}: columns updatable for a lock only"
        );
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
            let refused = refused(&owner, &format!("TRUNCATE {table} CASCADE")).await;
            assert!(
                refused.starts_with("23000 ") && refused.contains("cannot be truncated"),
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
    // Goal: a ledger does not serve as a role that could switch its rules off, however it
    // could: through membership in the owner of a table or function, by owning the schema
    // (whose owner may drop what is in it), by CREATEROLE (which may grant itself any
    // membership), by temporary tables or objects of its own in the schema (which would shadow
    // the tables the rules read), or by setting session_replication_role; unless told to. Method: for each, a login that is also a member of
    // spendguard_runtime, on a database of its own; the start is refused, naming why; with the
    // allowance the first serves.
    let cases: [(&str, &[&str], &str); 6] = [
        (
            "roles_test_member",
            &[
                "CREATE ROLE roles_test_owner NOLOGIN",
                "CREATE ROLE roles_test_member LOGIN IN ROLE spendguard_runtime, roles_test_owner",
                "ALTER TABLE stop_records OWNER TO roles_test_owner",
                "ALTER FUNCTION append_only() OWNER TO roles_test_owner",
            ],
            "roles_test_member owns (or may act as the owner of) stop_records; \
             roles_test_member owns (or may act as the owner of) the functions append_only()",
        ),
        (
            "roles_test_database_owner",
            &[
                "CREATE ROLE roles_test_database_owner LOGIN IN ROLE spendguard_runtime",
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I OWNER TO roles_test_database_owner', current_database()); END $$",
            ],
            "roles_test_database_owner owns (or may act as the owner of) the schema public",
        ),
        (
            "roles_test_creator",
            &["CREATE ROLE roles_test_creator LOGIN CREATEROLE IN ROLE spendguard_runtime"],
            "roles_test_creator may create roles (CREATEROLE)",
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
            "roles_test_schema_writer may create objects in the schema public",
        ),
        (
            "roles_test_replica",
            &[
                "CREATE ROLE roles_test_replica LOGIN IN ROLE spendguard_runtime",
                "GRANT SET ON PARAMETER session_replication_role TO roles_test_replica",
            ],
            "roles_test_replica may set session_replication_role",
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
    // and migrates once an administrator has created it. Method: a cluster of its own,
    // without the roles the test clusters are given.
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
}
