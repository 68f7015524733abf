//! Migrations apply, revert and re-apply cleanly (reversible pairs), so a rollback needs no
//! database surgery.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_ledger::store::{MIGRATOR, Store};
use spendguard_testkit::ledger::shared_cluster;

async fn tables(store: &Store) -> Vec<String> {
    sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations' ORDER BY 1")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn up_down_up() {
    let url = shared_cluster().create_database().await.unwrap();
    let store = Store::connect(&url, 2).await.unwrap();
    assert!(!store.ready().await, "a fresh database is not ready");
    store.migrate().await.unwrap();
    assert!(store.ready().await);
    let created = tables(&store).await;
    assert!(
        created.contains(&"reservations".to_owned())
            && created.contains(&"audit_outbox".to_owned()),
        "{created:?}"
    );
    MIGRATOR.undo(store.pool(), 0).await.unwrap();
    assert!(
        tables(&store).await.is_empty(),
        "down migration leaves nothing behind"
    );
    assert!(!store.ready().await);
    store.migrate().await.unwrap();
    assert_eq!(tables(&store).await, created);
    assert!(store.ready().await);
}

#[tokio::test]
async fn ledger_sessions_carry_their_timeouts_and_plan_mode() {
    let url = shared_cluster().create_database().await.unwrap();
    let store = Store::connect(&url, 1).await.unwrap();
    let show = |name: &'static str| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {name}")))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(show("statement_timeout").await, "5s");
    assert_eq!(show("lock_timeout").await, "2s");
    assert_eq!(show("plan_cache_mode").await, "force_custom_plan");
}
