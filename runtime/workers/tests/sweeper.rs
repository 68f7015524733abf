//! The TTL sweeper does nothing as a standby and expires due reservations once it leads.
#![allow(clippy::unwrap_used)]

use spendguard_leader::{LeaderConfig, PgElector};
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;
use std::time::Duration;

async fn state(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar("SELECT state FROM reservations")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_standby_sweeps_nothing_and_the_leader_expires_due_reservations() {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    ledger.budget("acme", "b", 1_000).await.unwrap();
    let mut request = reserve_request("acme", "short", &["b"], 100, &fencing);
    request.ttl_ms = 1_000;
    ledger.client.reserve_set(request).await.unwrap();
    let pool = ledger.store().pool().clone();
    // Another replica holds the sweeper lease for three more seconds.
    sqlx::query(
        "INSERT INTO leader_leases (lease_name, holder, acquired_at, renewed_at, expires_at)
         VALUES ('sweeper', 'other-replica', now(), now(), now() + interval '3 seconds')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (elector, handle) = PgElector::new(
        pool.clone(),
        LeaderConfig {
            namespace: String::new(),
            lease_name: "sweeper".into(),
            identity: "sweeper-0".into(),
            renew_interval: Duration::from_millis(200),
            ttl: Duration::from_millis(1_500),
        },
    )
    .unwrap();
    let elector = tokio::spawn(elector.run());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(spendguard_workers::sweeper::run(
        ledger.client.clone(),
        handle.clone(),
        Duration::from_millis(100),
        async move {
            let _ = stopped.await;
        },
    ));

    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(!handle.is_leader());
    assert_eq!(state(&pool).await, "reserved", "a standby does no work");

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        handle.is_leader(),
        "took over after the other lease expired"
    );
    assert_eq!(state(&pool).await, "expired");
    let balance = ledger
        .client
        .get_balances(spendguard_proto::ledger::v1::GetBalancesRequest {
            tenant_id: "acme".into(),
            budget_ids: vec!["b".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .balances
        .remove(0);
    assert_eq!(balance.reserved_nano_usd, 0);
    let _ = stop.send(());
    worker.await.unwrap();
    elector.abort();
}
