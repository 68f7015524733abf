//! Crash drill: kill -9 the `spendguard ledger` process under load and restart it. No
//! acknowledged reservation or commit is lost, none is resolved twice, no outbox row is lost and
//! producer sequences stay contiguous.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{reserve_request, shared_cluster};
use spendguard_testkit::{free_port, invariants};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::Child;

mod support;
use support::{ledger_command, wait_for_ledger};

const T: &str = "tenant-crash";

/// The ledger process; the drill drives set-up, load and sweeps through one client on the
/// control listener, which serves every RPC.
fn spawn_ledger(url: &str, port: u16) -> Child {
    ledger_command(url, free_port(), port)
        .spawn()
        .expect("spawn spendguard ledger")
}

#[derive(Default)]
struct Acked {
    reserved: BTreeSet<String>,
    committed: BTreeSet<String>,
}

#[tokio::test]
async fn kill_dash_nine_under_load_loses_nothing() {
    let url = shared_cluster().create_database().await.unwrap();
    spendguard_testkit::ledger::migrate(&url).await.unwrap();
    let port = free_port();
    let mut ledger = spawn_ledger(&url, port);
    let mut client = wait_for_ledger(port).await;
    spendguard_testkit::ledger::tenant(&mut client, T)
        .await
        .unwrap();
    spendguard_testkit::ledger::register_pricing(
        &mut client,
        T,
        spendguard_testkit::ledger::test_pricing(),
    )
    .await
    .unwrap();
    client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: T.into(),
            budget_id: "b".into(),
            limit_nano_usd: 1_000_000_000,
            soft_cap_nano_usd: 0,
            window: pb::BudgetWindow::Lifetime.into(),
        })
        .await
        .unwrap();
    let lease = client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: "crash-scope".into(),
            tenant_id: T.into(),
            workload_instance_id: "w".into(),
            ttl_ms: 600_000,
            expected_epoch: 0,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    let fencing = pb::FencingToken {
        scope_id: "crash-scope".into(),
        epoch: lease.epoch,
    };

    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut load = Vec::new();
    for worker in 0..16 {
        let (mut client, fencing, acked) = (client.clone(), fencing.clone(), acked.clone());
        load.push(tokio::spawn(async move {
            for n in 0.. {
                let Ok(response) = client
                    .reserve_set(reserve_request(
                        T,
                        &format!("w{worker}-{n}"),
                        &["b"],
                        10,
                        &fencing,
                    ))
                    .await
                else {
                    return;
                };
                let Some(pb::reserve_set_response::Outcome::Reserved(r)) =
                    response.into_inner().outcome
                else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .reserved
                    .insert(r.reservation_id.clone());
                let commit = pb::CommitRequest {
                    tenant_id: T.into(),
                    reservation_id: r.reservation_id.clone(),
                    actual_nano_usd: 7,
                    fencing: Some(fencing.clone()),
                    // Half the workers' commits may be held for a batch (the defer window): a
                    // held commit acknowledged is as durable as any other.
                    deferrable: worker % 2 == 0,
                };
                if client.commit(commit).await.is_err() {
                    return;
                }
                acked.lock().unwrap().committed.insert(r.reservation_id);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    ledger.start_kill().unwrap(); // SIGKILL
    ledger.wait().await.unwrap();
    for task in load {
        task.await.unwrap();
    }
    let acked = Arc::try_unwrap(acked).ok().unwrap().into_inner().unwrap();
    assert!(
        acked.committed.len() > 10,
        "the load ran ({} commits)",
        acked.committed.len()
    );

    let mut ledger = spawn_ledger(&url, port);
    let mut client = wait_for_ledger(port).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for id in &acked.reserved {
        let state: String =
            sqlx::query_scalar("SELECT state FROM reservations WHERE reservation_id = $1::uuid")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("acknowledged reservation {id} lost: {e}"));
        if acked.committed.contains(id) {
            assert_eq!(state, "committed", "{id}");
        }
    }
    // Every acknowledged effect has its audit event: one per reservation, one per commit.
    for (event_type, acknowledged) in [
        ("reservation.reserved", &acked.reserved),
        ("reservation.committed", &acked.committed),
    ] {
        let named = events_by_reservation(&pool, event_type).await;
        for id in acknowledged {
            assert_eq!(named.get(id), Some(&1), "{event_type} of {id}");
        }
    }
    // Every reservation that was reserved but not committed can still be settled exactly once:
    // committed now unless its commit landed before the kill without its answer (a replay).
    for id in acked.reserved.difference(&acked.committed) {
        let commit = pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: id.clone(),
            actual_nano_usd: 7,
            fencing: Some(fencing.clone()),
            deferrable: false,
        };
        let first = client.commit(commit.clone()).await.unwrap().into_inner();
        assert_eq!((first.committed_nano_usd, first.overrun_nano_usd), (7, 0));
        let again = client.commit(commit).await.unwrap().into_inner();
        assert!(again.replayed, "{first:?}");
        assert_eq!(again.committed_nano_usd, 7);
    }
    let committed = events_by_reservation(&pool, "reservation.committed").await;
    for id in &acked.reserved {
        assert_eq!(committed.get(id), Some(&1), "one commit event for {id}");
    }
    // The restarted process continues the same producer's sequence with no gap.
    client
        .reserve_set(reserve_request(T, "after-restart", &["b"], 10, &fencing))
        .await
        .unwrap();
    invariants::check(&pool).await.unwrap();
    ledger.start_kill().unwrap();
    ledger.wait().await.unwrap();
}

/// How many `event_type` events the outbox holds per reservation they name.
async fn events_by_reservation(
    pool: &sqlx::PgPool,
    event_type: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut named = std::collections::BTreeMap::new();
    for event in spendguard_testkit::ledger::outbox_events(pool, event_type)
        .await
        .unwrap()
    {
        let id = event["data"]["reservation_id"].as_str().unwrap().to_owned();
        *named.entry(id).or_insert(0) += 1;
    }
    named
}
