//! Two candidates on a real apiserver: exactly one leads at any moment, and when the leader dies
//! the standby takes over after the TTL — never while the old leader may still work.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_leader::{Elector, LeaderConfig, LeaderHandle, Mode};
use spendguard_testkit::control_plane::{ControlPlane, User};
use std::time::Duration;

async fn client(plane: &ControlPlane) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig(User::Admin)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn config(identity: &str) -> LeaderConfig {
    LeaderConfig {
        namespace: "default".into(),
        lease_name: "spendguard-test".into(),
        identity: identity.into(),
        renew_interval: Duration::from_millis(300),
        ttl: Duration::from_secs(2),
    }
}

/// Samples both handles for `duration`, failing if both ever lead; returns who led last.
async fn watch_exclusive(a: &LeaderHandle, b: &LeaderHandle, duration: Duration) -> (bool, bool) {
    let deadline = tokio::time::Instant::now() + duration;
    let mut last = (false, false);
    while tokio::time::Instant::now() < deadline {
        last = (a.is_leader(), b.is_leader());
        assert!(!(last.0 && last.1), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    last
}

#[tokio::test]
async fn one_leader_and_takeover_after_ttl() {
    let plane = ControlPlane::start().expect("control plane");
    let kube = client(&plane).await;
    let (a, handle_a) = Elector::new(kube.clone(), config("pod-a")).unwrap();
    let (b, handle_b) = Elector::new(kube.clone(), config("pod-b")).unwrap();
    let task_a = tokio::spawn(a.run());
    let task_b = tokio::spawn(b.run());

    let (a_leads, b_leads) = watch_exclusive(&handle_a, &handle_b, Duration::from_secs(3)).await;
    assert!(a_leads ^ b_leads, "exactly one leader after settling");

    // Kill the leader (its lease is not released): the standby waits out the TTL, then leads.
    let (dead, survivor) = if a_leads {
        (task_a, &handle_b)
    } else {
        (task_b, &handle_a)
    };
    dead.abort();
    let (a_leads, b_leads) = watch_exclusive(&handle_a, &handle_b, Duration::from_secs(5)).await;
    assert!(
        survivor.is_leader(),
        "standby took over ({a_leads}, {b_leads})"
    );

    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(kube, "default");
    let spec = leases.get("spendguard-test").await.unwrap().spec.unwrap();
    assert_eq!(spec.lease_transitions, Some(1));
    let expected = if a_leads { "pod-a" } else { "pod-b" };
    assert_eq!(spec.holder_identity.as_deref(), Some(expected));
}

#[test]
fn modes_and_configuration() {
    assert_eq!(Mode::parse("k8s"), Ok(Mode::K8s));
    assert_eq!(Mode::parse("disabled"), Ok(Mode::Disabled));
    assert_eq!(Mode::parse("postgres"), Ok(Mode::Postgres));
    assert!(Mode::parse("etcd").is_err(), "refused, not defaulted");
    assert!(Mode::parse("K8S").is_err());
    assert!(LeaderHandle::always().is_leader());
}

/// Mode `postgres`: the same guarantees with the lease in a PostgreSQL row.
#[tokio::test]
async fn postgres_one_leader_and_takeover_after_ttl() {
    let database_url = spendguard_testkit::ledger::shared_cluster()
        .create_database()
        .await
        .unwrap();
    let owner = sqlx::PgPool::connect(&database_url).await.unwrap();
    sqlx::migrate!("../../migrations")
        .run(&owner)
        .await
        .unwrap();
    // As the workers and the operator run: the runtime login.
    let pool = sqlx::PgPool::connect(&spendguard_testkit::postgres::runtime_url(&database_url))
        .await
        .unwrap();
    let (a, handle_a) = spendguard_leader::PgElector::new(pool.clone(), config("pod-a")).unwrap();
    let (b, handle_b) = spendguard_leader::PgElector::new(pool.clone(), config("pod-b")).unwrap();
    assert!(
        !handle_a.is_leader() && !handle_b.is_leader(),
        "no work before a lease"
    );
    let task_a = tokio::spawn(a.run());
    let task_b = tokio::spawn(b.run());

    let (a_leads, b_leads) = watch_exclusive(&handle_a, &handle_b, Duration::from_secs(2)).await;
    assert!(a_leads ^ b_leads, "exactly one leader after settling");
    let (dead, survivor) = if a_leads {
        (task_a, &handle_b)
    } else {
        (task_b, &handle_a)
    };
    dead.abort();
    let (a_leads, b_leads) = watch_exclusive(&handle_a, &handle_b, Duration::from_secs(4)).await;
    assert!(
        survivor.is_leader(),
        "standby took over ({a_leads}, {b_leads})"
    );
    let (holder, transitions): (String, i64) =
        sqlx::query_as("SELECT holder, transitions FROM leader_leases WHERE lease_name = $1")
            .bind("spendguard-test")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(transitions, 1);
    assert_eq!(holder, if a_leads { "pod-a" } else { "pod-b" });

    // A database that stops answering ends leadership at the local deadline.
    pool.close().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!handle_a.is_leader() && !handle_b.is_leader());
}
