//! S4 against the real ledger: no decision before acquire, renewal keeps the epoch, a restart
//! bumps it (no reuse), a takeover or forced epoch makes the old holder fail closed, an unreachable
//! ledger drains after the grace window, shutdown drains at once, and an acquire whose answer
//! was lost is answered once when the keeper sends it again.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::v1 as pb;
use spendguard_sidecar::lease::{Lease, LeaseConfig, LeaseError, LeaseKeeper, LeaseState};
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;
use std::time::Duration;
use tokio::sync::oneshot;

const T: &str = "tenant-s4";

fn config(workload: &str) -> LeaseConfig {
    LeaseConfig {
        scope_id: "tenant-s4/pod-a".into(),
        tenant_id: T.into(),
        workload_instance_id: workload.into(),
        ttl: Duration::from_millis(1_500),
        grace: Duration::from_millis(900),
        safety_margin: Duration::from_millis(100),
    }
}

struct Running {
    lease: Lease,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start(ledger: &TestLedger, workload: &str) -> Running {
    let (keeper, lease) = LeaseKeeper::new(ledger.client.clone(), config(workload)).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(keeper.run(async move {
        let _ = stopped.await;
    }));
    Running { lease, stop, task }
}

async fn held_epoch(lease: &mut Lease) -> u64 {
    let state = tokio::time::timeout(
        Duration::from_secs(10),
        lease.wait_for(|s| matches!(s, LeaseState::Held { .. })),
    )
    .await
    .unwrap();
    match state {
        LeaseState::Held { epoch, .. } => epoch,
        other => panic!("not held: {other:?}"),
    }
}

async fn setup() -> TestLedger {
    let mut ledger = TestLedger::start().await.unwrap();
    spendguard_testkit::ledger::tenant(&mut ledger.client, T)
        .await
        .unwrap();
    ledger.budget(T, "b", 1_000).await.unwrap();
    spendguard_testkit::ledger::register_pricing(
        &mut ledger.client,
        T,
        spendguard_testkit::ledger::test_pricing(),
    )
    .await
    .unwrap();
    ledger
}

#[tokio::test]
async fn acquire_renew_restart_and_takeover() {
    let ledger = setup().await;
    let mut first = start(&ledger, "pod-a");
    let epoch = held_epoch(&mut first.lease).await;
    assert!(epoch >= 1);
    assert_eq!(first.lease.epoch_for_decision(), Ok(epoch));
    assert!(first.lease.is_ready());

    // Renewals (every ttl/3) keep the epoch.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(first.lease.epoch_for_decision(), Ok(epoch));

    // A decision with the lease's epoch is accepted by the ledger.
    let fencing = pb::FencingToken {
        scope_id: "tenant-s4/pod-a".into(),
        epoch,
    };
    let mut client = ledger.client.clone();
    client
        .reserve_set(reserve_request(T, "ok", &["b"], 1, &fencing))
        .await
        .unwrap();

    // The same pod restarting acquires afresh: the ledger bumps the epoch (no reuse)…
    let mut second = start(&ledger, "pod-a");
    let bumped = held_epoch(&mut second.lease).await;
    assert_eq!(bumped, epoch + 1);
    // …and the old incarnation fails closed at its next renewal.
    let lost = tokio::time::timeout(
        Duration::from_secs(5),
        first.lease.wait_for(|s| *s == LeaseState::Lost),
    )
    .await
    .unwrap();
    assert_eq!(lost, LeaseState::Lost);
    assert_eq!(first.lease.epoch_for_decision(), Err(LeaseError::Lost));
    assert!(!first.lease.is_ready());
    // The old incarnation does not fight back: the new one keeps its epoch through renewals.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(second.lease.epoch_for_decision(), Ok(bumped));
    assert_eq!(first.lease.state(), LeaseState::Lost);
    // The ledger refuses the old epoch regardless of what the old process believes.
    let stale = client
        .reserve_set(reserve_request(T, "stale", &["b"], 1, &fencing))
        .await
        .unwrap_err();
    assert_eq!(
        spendguard_proto::ledger::error_code(&stale),
        Some(pb::ErrorCode::FencingEpochStale)
    );

    // An administrator forcing the epoch forward in the ledger makes the holder fail closed too.
    client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: "tenant-s4/pod-a".into(),
            tenant_id: T.into(),
            workload_instance_id: "admin".into(),
            ttl_ms: 60_000,
            expected_epoch: 0,
            force: true,
            request_id: String::new(),
        })
        .await
        .unwrap();
    let lost = tokio::time::timeout(
        Duration::from_secs(5),
        second.lease.wait_for(|s| *s == LeaseState::Lost),
    )
    .await
    .unwrap();
    assert_eq!(lost, LeaseState::Lost);

    for running in [first, second] {
        let _ = running.stop.send(());
        running.task.await.unwrap();
    }
}

#[tokio::test]
async fn unreachable_ledger_drains_after_grace_and_shutdown_drains_at_once() {
    let mut ledger = setup().await;
    let mut running = start(&ledger, "pod-a");
    let epoch = held_epoch(&mut running.lease).await;
    ledger.stop().await;
    // Within the grace window decisions may continue; past it, they are refused.
    let draining = tokio::time::timeout(
        Duration::from_secs(5),
        running
            .lease
            .wait_for(|s| matches!(s, LeaseState::Draining { .. })),
    )
    .await
    .unwrap();
    assert!(matches!(draining, LeaseState::Draining { epoch: Some(_) }));
    assert_eq!(
        running.lease.epoch_for_decision(),
        Err(LeaseError::Draining)
    );
    assert!(epoch >= 1);
    let _ = running.stop.send(());
    running.task.await.unwrap();

    // Shutdown drains immediately, even with a healthy ledger.
    let ledger = setup().await;
    let mut running = start(&ledger, "pod-b");
    held_epoch(&mut running.lease).await;
    let _ = running.stop.send(());
    running.task.await.unwrap();
    assert!(matches!(
        running.lease.state(),
        LeaseState::Draining { epoch: Some(_) }
    ));
    assert_eq!(
        running.lease.epoch_for_decision(),
        Err(LeaseError::Draining)
    );
}

#[test]
fn unsafe_configurations_are_refused() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_static("http://127.0.0.1:1").connect_lazy();
        let client = pb::ledger_client::LedgerClient::new(channel);
        let mut bad = config("pod");
        bad.grace = bad.ttl;
        assert!(matches!(
            LeaseKeeper::new(client.clone(), bad),
            Err(LeaseError::Config(_))
        ));
        let mut short = config("pod");
        short.ttl = Duration::from_millis(500);
        assert!(matches!(
            LeaseKeeper::new(client, short),
            Err(LeaseError::Config(_))
        ));
    });
}

#[tokio::test]
async fn a_renewal_failed_by_a_slow_ledger_is_retried_before_the_lease_lapses() {
    // Goal: a renewal that fails late (the ledger's batch waited out its lock timeout on the
    // scope row) is retried at once, not a full renewal period later, by which time the lease
    // would have lapsed locally and decisions been refused.
    use sqlx::Connection as _;
    let ledger = setup().await;
    let config = LeaseConfig {
        ttl: Duration::from_millis(6_000), // renewals every 2 s
        grace: Duration::from_millis(4_500),
        ..config("pod-a")
    };
    let (keeper, mut lease) = LeaseKeeper::new(ledger.client.clone(), config).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(keeper.run(async move {
        let _ = stopped.await;
    }));
    held_epoch(&mut lease).await;
    let acquired = tokio::time::Instant::now();

    // Another transaction holds the scope's row across the first renewal (at ~2 s), longer than
    // the ledger's 2 s lock timeout, so that renewal fails at ~4 s.
    let mut holder = sqlx::PgConnection::connect(&ledger.database_url)
        .await
        .unwrap();
    tokio::time::sleep_until(acquired + Duration::from_millis(1_500)).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM fencing_scopes WHERE scope_id = 'tenant-s4/pod-a' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let release = acquired + Duration::from_millis(4_600);
    let mut refused = Vec::new();
    let mut released = false;
    while tokio::time::Instant::now() < acquired + Duration::from_millis(7_500) {
        if !released && tokio::time::Instant::now() >= release {
            sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
            released = true;
        }
        if let Err(e) = lease.epoch_for_decision() {
            refused.push((acquired.elapsed(), e));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The renewal at ~2 s cannot succeed while the row is held (it locks the row), and both its
    // own deadline (ttl / 3) and the ledger's lock timeout end it before the row is let go.
    assert!(refused.is_empty(), "decisions refused: {refused:?}");
    let _ = stop.send(());
    task.await.unwrap();
}

/// A TCP proxy to `target` that loses the answers of its first connection: it forwards what the
/// client sends for `hold`, throws away what comes back, then closes. Later connections are
/// relayed both ways.
async fn proxy_losing_first_answers(
    target: std::net::SocketAddr,
    hold: Duration,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (inbound, _) = listener.accept().await.unwrap();
            let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
            let lose_answers = std::mem::take(&mut first);
            tokio::spawn(async move {
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                if lose_answers {
                    let mut sink = tokio::io::sink();
                    let _ = tokio::time::timeout(hold, async {
                        tokio::join!(
                            tokio::io::copy(&mut in_read, &mut out_write),
                            tokio::io::copy(&mut out_read, &mut sink),
                        )
                    })
                    .await;
                    return; // Both connections close here.
                }
                let _ = tokio::join!(
                    tokio::io::copy(&mut in_read, &mut out_write),
                    tokio::io::copy(&mut out_read, &mut in_write),
                );
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_acquire_whose_answer_was_lost_is_answered_once_when_retried() {
    // Goal: the keeper's first acquire reaches the ledger and is granted, but its answer is lost
    // (the connection dies). The keeper sends it again with the same request id and gets the
    // first grant, epoch 1, instead of restarting to epoch 2 and fencing out the grant its first
    // send had landed. Method: a proxy that relays the first connection's request and drops its
    // answers; the ledger's RPC count shows both sends reached it, its history shows one acquire.
    let ledger = setup().await;
    let data = ledger.ledger.as_ref().unwrap().addr;
    let proxy = proxy_losing_first_answers(data, Duration::from_secs(2)).await;
    let client = spendguard_testkit::ledger::connect(proxy).await.unwrap();
    // The defaults' proportions: a lease long enough that the retry, about 2.25 s after the
    // first send (the proxy holds the first connection 2 s), is within its life and reuses the
    // id.
    let (keeper, mut lease) = LeaseKeeper::new(
        client,
        LeaseConfig {
            ttl: Duration::from_secs(15),
            grace: Duration::from_secs(9),
            safety_margin: Duration::from_secs(1),
            ..config("pod-a")
        },
    )
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(keeper.run(async move {
        let _ = stopped.await;
    }));
    assert_eq!(held_epoch(&mut lease).await, 1, "the first grant, replayed");
    let sends = ledger
        .metrics_text()
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"spendguard_ledger_rpc_duration_seconds_count{rpc="AcquireFencingLease"} "#,
            )
            .map(|n| n.parse::<u64>().unwrap())
        })
        .unwrap_or(0);
    assert!(
        sends >= 2,
        "the lost send and its retry both reached the ledger ({sends})"
    );
    let history: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT epoch, outcome, request_id FROM fencing_scope_events
          WHERE scope_id = 'tenant-s4/pod-a' ORDER BY event_id",
    )
    .fetch_all(&ledger.owner)
    .await
    .unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!((history[0].0, history[0].1.as_str()), (1, "acquired"));
    assert!(
        history[0]
            .2
            .as_deref()
            .is_some_and(|id| id.starts_with("lease/")),
        "{history:?}"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}
