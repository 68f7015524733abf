//! Concurrency: no overspend under contention, exactly one winner per expired scope, stale writers
//! fenced, and one producer id per live process.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_ledger::error::Error;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{connect, reserve_request};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";

#[tokio::test]
async fn two_hundred_concurrent_reserves_against_room_for_fifty() {
    // Goal: exactly 50 of 200 concurrent ReserveSets fit a budget of 50 × amount, across two
    // budgets of the same set, and balances and journal agree afterwards.
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 50 * 7).await.unwrap();
    ledger.budget(T, "roomy", 1_000_000).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut client = ledger.client.clone();
        let request = reserve_request(T, &format!("k{i}"), &["roomy", "hot"], 7, &fencing);
        tasks.push(tokio::spawn(async move {
            client.reserve_set(request).await.unwrap().into_inner()
        }));
    }
    let mut granted = 0;
    for task in tasks {
        match task.await.unwrap().outcome {
            Some(pb::reserve_set_response::Outcome::Reserved(_)) => granted += 1,
            Some(pb::reserve_set_response::Outcome::Denied(d)) => {
                assert_eq!(d.budget_id, "hot");
                assert_eq!(d.code(), pb::ErrorCode::BudgetExhausted);
            }
            None => panic!("no outcome"),
        }
    }
    assert_eq!(granted, 50);
    let balances = ledger
        .client
        .get_balances(pb::GetBalancesRequest {
            tenant_id: T.into(),
            budget_ids: vec!["hot".into(), "roomy".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .balances;
    assert_eq!(
        (
            balances[0].reserved_nano_usd,
            balances[0].remaining_nano_usd
        ),
        (350, 0)
    );
    assert_eq!(
        balances[1].reserved_nano_usd, 350,
        "all or nothing across the set"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn two_ledger_replicas_cannot_overspend_one_budget() {
    // Goal: two ledger processes (distinct producer ids) on one database share a hot budget;
    // row locks, not process memory, bound the spend.
    let mut a = TestLedger::start().await.unwrap();
    let fencing = a.tenant_with_lease(T).await.unwrap();
    a.budget(T, "hot", 100).await.unwrap();
    let b = TestLedger::start_on(&a.database_url, "ledger-1")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..120 {
        let mut client = if i % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        let request = reserve_request(T, &format!("k{i}"), &["hot"], 1, &fencing);
        let fencing = fencing.clone();
        tasks.push(tokio::spawn(async move {
            let response = client.reserve_set(request).await.unwrap().into_inner();
            let Some(pb::reserve_set_response::Outcome::Reserved(reservation)) = response.outcome
            else {
                return 0;
            };
            client
                .commit(pb::CommitRequest {
                    tenant_id: T.into(),
                    reservation_id: reservation.reservation_id,
                    actual_nano_usd: 1,
                    fencing: Some(fencing),
                    deferrable: false,
                })
                .await
                .unwrap();
            1
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap();
    }
    assert_eq!(committed, 100);
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn two_contenders_for_one_expired_scope_exactly_one_wins() {
    let mut ledger = TestLedger::start().await.unwrap();
    let first = ledger.tenant_with_lease(T).await.unwrap();
    lapse(&ledger.client, &first).await;
    let winners = contend([&ledger.client, &ledger.client], &first.scope_id).await;
    assert_eq!(winners.len(), 1);
    assert_eq!(
        winners[0].epoch,
        first.epoch + 1,
        "the epoch rises by exactly one"
    );
    // The pre-takeover writer is refused.
    ledger.budget(T, "b", 100).await.unwrap();
    let err = ledger
        .client
        .reserve_set(reserve_request(T, "stale", &["b"], 1, &first))
        .await
        .unwrap_err();
    assert_eq!(
        spendguard_proto::ledger::error_code(&err),
        Some(pb::ErrorCode::FencingEpochStale)
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

/// Shortens `lease` (renewing it with the minimum TTL) and lets it lapse.
async fn lapse(client: &spendguard_testkit::ledger::LedgerClient, lease: &pb::FencingToken) {
    client
        .clone()
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: lease.scope_id.clone(),
            tenant_id: T.into(),
            workload_instance_id: format!("{T}-w"),
            ttl_ms: 1_000,
            expected_epoch: lease.epoch,
            force: false,
            request_id: String::new(),
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
}

/// Six contenders for `scope_id`, alternating between two ledger clients: the winners' leases.
/// Every loser is refused FENCING_LEASE_HELD.
async fn contend(
    clients: [&spendguard_testkit::ledger::LedgerClient; 2],
    scope_id: &str,
) -> Vec<pb::AcquireFencingLeaseResponse> {
    let mut tasks = Vec::new();
    for n in 0..6 {
        let mut client = clients[n % 2].clone();
        let scope_id = scope_id.to_owned();
        tasks.push(tokio::spawn(async move {
            client
                .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
                    scope_id,
                    tenant_id: T.into(),
                    workload_instance_id: format!("pod-{n}"),
                    ttl_ms: 60_000,
                    expected_epoch: 0,
                    force: false,
                    request_id: String::new(),
                })
                .await
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(lease) => winners.push(lease.into_inner()),
            Err(status) => assert_eq!(
                spendguard_proto::ledger::error_code(&status),
                Some(pb::ErrorCode::FencingLeaseHeld),
                "{status:?}"
            ),
        }
    }
    winners
}

#[tokio::test]
async fn contenders_on_two_replicas_leave_one_winner_per_scope() {
    // Goal: S3's compare-and-set across ledger processes, where no process memory orders the
    // contenders and only the database does: for an expired scope and for a scope nobody held
    // yet, exactly one contender wins, the epoch rises by exactly one, and exactly one history
    // row records the win.
    let mut a = TestLedger::start().await.unwrap();
    let first = a.tenant_with_lease(T).await.unwrap();
    let b = TestLedger::start_on(&a.database_url, "ledger-1")
        .await
        .unwrap();
    lapse(&a.client, &first).await;
    let pool = a.store().pool().clone();
    let history = |scope_id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT outcome, epoch FROM fencing_scope_events WHERE scope_id = $1 ORDER BY event_id",
            )
            .bind(scope_id)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let before = history(first.scope_id.clone()).await.len();

    let taken = contend([&a.client, &b.client], &first.scope_id).await;
    assert_eq!(taken.len(), 1, "one winner of the expired scope");
    let epoch = i64::try_from(first.epoch + 1).unwrap();
    assert_eq!(
        taken[0].epoch,
        first.epoch + 1,
        "the epoch rises by exactly one"
    );
    assert_eq!(
        history(first.scope_id.clone()).await[before..],
        [("taken_over".to_owned(), epoch)]
    );

    let fresh = format!("{T}/fresh");
    let acquired = contend([&a.client, &b.client], &fresh).await;
    assert_eq!(acquired.len(), 1, "one winner of the new scope");
    assert_eq!(acquired[0].epoch, 1);
    assert_eq!(history(fresh).await, [("acquired".to_owned(), 1)]);
    invariants::check(&pool).await.unwrap();
}

#[tokio::test]
async fn two_processes_claiming_one_producer_id_fail_closed() {
    let ledger = TestLedger::start().await.unwrap();
    let second = TestLedger::start_on(&ledger.database_url, "ledger-0").await;
    match second {
        Err(e) => {
            let error = e.downcast_ref::<Error>().expect("a ledger error");
            assert_eq!(
                error.code(),
                spendguard_core::ErrorCode::ProducerInstanceConflict,
                "{error}"
            );
        }
        Ok(_) => panic!("a second process claimed a live producer id"),
    }
    // Refused before it wrote anything: its own signing key (another random one) included.
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM signing_keys")
        .fetch_one(&ledger.owner)
        .await
        .unwrap();
    assert_eq!(keys, 1, "only the first process's key is registered");
    // Once the first stops, the id is free at once (restart without waiting for a TTL).
    let mut ledger = ledger;
    let url = ledger.database_url.clone();
    ledger.stop().await;
    let mut restarted = TestLedger::start_on(&url, "ledger-0").await.unwrap();
    let fencing = restarted.tenant_with_lease(T).await.unwrap();
    assert_eq!(fencing.epoch, 1);
    invariants::check(restarted.store().pool()).await.unwrap();
    let _ = connect(restarted.ledger.as_ref().unwrap().addr)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stolen_producer_claim_stops_writes() {
    // Goal: if another process rewrites this producer's claim token (it took the id over after
    // our session died), our next write fails closed instead of interleaving sequences.
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "b", 100).await.unwrap();
    sqlx::query("UPDATE audit_producers SET claim_token = gen_random_uuid()")
        .execute(ledger.store().pool())
        .await
        .unwrap();
    let err = ledger
        .client
        .reserve_set(reserve_request(T, "k", &["b"], 1, &fencing))
        .await
        .unwrap_err();
    assert_eq!(
        spendguard_proto::ledger::error_code(&err),
        Some(pb::ErrorCode::ProducerInstanceConflict)
    );
    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap();
    assert_eq!(reservations, 0);
}

#[tokio::test]
async fn a_lone_command_that_loses_an_insert_race_to_another_replica_gets_the_second_answer() {
    // Goal: a command that loses a race to another replica on a row both create (a scope nobody
    // held, the same idempotency key) is answered as if it had arrived second, also when it is
    // alone in its batch: the lease held, or the replay. Before, only a batch of several was
    // re-run, and a lone command got INTERNAL for the unique violation. Each round sends one
    // command to each replica at once, so each writer's batch holds just that command.
    let mut a = TestLedger::start().await.unwrap();
    let fencing = a.tenant_with_lease(T).await.unwrap();
    a.budget(T, "b", 1_000_000).await.unwrap();
    let b = TestLedger::start_on(&a.database_url, "ledger-1")
        .await
        .unwrap();
    let acquire = |client: &spendguard_testkit::ledger::LedgerClient, scope: &str, owner: &str| {
        let mut client = client.clone();
        let request = pb::AcquireFencingLeaseRequest {
            scope_id: scope.to_owned(),
            tenant_id: T.into(),
            workload_instance_id: owner.to_owned(),
            ttl_ms: 60_000,
            expected_epoch: 0,
            force: false,
            request_id: String::new(),
        };
        async move { client.acquire_fencing_lease(request).await }
    };
    for round in 0..40 {
        let scope = format!("{T}/race-{round}");
        let (x, y) = tokio::join!(
            acquire(&a.client, &scope, "pod-a"),
            acquire(&b.client, &scope, "pod-b")
        );
        let (won, lost): (Vec<_>, Vec<_>) = [x, y].into_iter().partition(Result::is_ok);
        assert_eq!((won.len(), lost.len()), (1, 1), "round {round}: {lost:?}");
        let lost = lost.into_iter().next().unwrap().unwrap_err();
        assert_eq!(
            spendguard_proto::ledger::error_code(&lost),
            Some(pb::ErrorCode::FencingLeaseHeld),
            "round {round}: {lost:?}"
        );

        let request = reserve_request(T, &format!("key-{round}"), &["b"], 10, &fencing);
        let (mut to_a, mut to_b) = (a.client.clone(), b.client.clone());
        let (x, y) = tokio::join!(to_a.reserve_set(request.clone()), to_b.reserve_set(request));
        let (x, y) = (x.unwrap().into_inner(), y.unwrap().into_inner());
        assert_eq!(
            [x.replayed, y.replayed].iter().filter(|r| **r).count(),
            1,
            "round {round}: one answer is the replay"
        );
        assert_eq!(reservation_id(x), reservation_id(y), "round {round}");
    }
    invariants::check(a.store().pool()).await.unwrap();
}

fn reservation_id(response: pb::ReserveSetResponse) -> String {
    match response.outcome {
        Some(pb::reserve_set_response::Outcome::Reserved(r)) => r.reservation_id,
        other => panic!("expected a reservation, got {other:?}"),
    }
}

/// Returns once a ledger session of the database waits for a lock (the step a race test
/// arranges), so the test does not depend on how fast the machine is.
async fn until_a_ledger_backend_waits_for_a_lock(database_url: &str) {
    use sqlx::Connection as _;
    let mut watcher = sqlx::PgConnection::connect(database_url).await.unwrap();
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'spendguard-ledger'
                AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no ledger session came to wait for a lock");
}

#[tokio::test]
async fn a_cached_commit_and_another_replica_holding_its_reservation_do_not_deadlock() {
    // Goal: a cached statement locks the reservation it resolves before the budget's window, as
    // the load path does. Another replica's load path (a transaction doing what it does) holds
    // the reservation and then asks for the window: the cached commit waits for the reservation
    // while holding nothing, so the other gets the window at once and nobody is aborted. In the
    // opposite order the two wait for each other until PostgreSQL aborts one.
    use sqlx::Connection as _;
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 1_000).await.unwrap();
    let reserve = |key: &str| reserve_request(T, key, &["hot"], 10, &fencing);
    let commit = |reservation_id: String| pb::CommitRequest {
        tenant_id: T.into(),
        reservation_id,
        actual_nano_usd: 5,
        fencing: Some(fencing.clone()),
        deferrable: false,
    };
    let warm = reservation_id(
        ledger
            .client
            .reserve_set(reserve("warm"))
            .await
            .unwrap()
            .into_inner(),
    );
    ledger.client.commit(commit(warm)).await.unwrap();
    let contended = reservation_id(
        ledger
            .client
            .reserve_set(reserve("contended"))
            .await
            .unwrap()
            .into_inner(),
    );
    let (cached, stale) = (ledger.batches("cached"), ledger.batches("cached_stale"));

    let mut other = sqlx::PgConnection::connect(&ledger.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT 1 FROM reservations WHERE reservation_id = $1::uuid FOR UPDATE")
        .bind(&contended)
        .execute(&mut other)
        .await
        .unwrap();
    let mut client = ledger.client.clone();
    let request = commit(contended);
    let committing = tokio::spawn(async move { client.commit(request).await });
    // Until the cached statement waits (for the reservation, or in the old order for it after
    // taking the window).
    until_a_ledger_backend_waits_for_a_lock(&ledger.database_url).await;
    sqlx::query(
        "SELECT 1 FROM budget_windows WHERE tenant_id = $1 AND budget_id = 'hot' FOR UPDATE",
    )
    .bind(T)
    .execute(&mut other)
    .await
    .expect("the window is free: the waiting commit holds nothing");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    committing.await.unwrap().unwrap();
    assert_eq!(
        ledger.batches("cached_stale"),
        stale,
        "no cached batch was aborted"
    );
    assert!(
        ledger.batches("cached") > cached,
        "the commit took the cached path"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_sweep_batch_locks_its_scopes_before_its_candidates() {
    // Goal: a sweep batch that also carries a command on a scope locks that scope before it
    // takes an expired reservation, as every batch does. Another replica's cached commit of
    // that reservation (a transaction doing what its guard does) holds the scope shared and then
    // asks for the reservation: it gets it at once, and the sweep waits for the scope holding
    // nothing. In the opposite order each waits for the other until PostgreSQL aborts one,
    // which failed the sweep and the lease renewal batched with it.
    use sqlx::Connection as _;
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "hot", 1_000).await.unwrap();
    ledger.budget(T, "blocker", 1_000).await.unwrap();
    let mut request = reserve_request(T, "lapses", &["hot"], 10, &fencing);
    request.ttl_ms = 1_000;
    let lapsing = reservation_id(
        ledger
            .client
            .reserve_set(request)
            .await
            .unwrap()
            .into_inner(),
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let sleep = |ms| tokio::time::sleep(std::time::Duration::from_millis(ms));

    // Hold the writer in a batch of its own, so that the sweep and the renewal queue behind it
    // and run as one batch.
    let mut blocker = sqlx::PgConnection::connect(&ledger.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("SELECT 1 FROM budgets WHERE tenant_id = $1 AND budget_id = 'blocker' FOR UPDATE")
        .bind(T)
        .execute(&mut blocker)
        .await
        .unwrap();
    let mut client = ledger.client.clone();
    let upsert = tokio::spawn(async move {
        spendguard_testkit::ledger::budget(&mut client, T, "blocker", 2_000).await
    });
    sleep(200).await;
    let mut client = ledger.client.clone();
    let sweep = tokio::spawn(async move {
        client
            .sweep_expired(pb::SweepExpiredRequest {
                max_reservations: 100,
            })
            .await
    });
    let mut client = ledger.client.clone();
    let scope_id = fencing.scope_id.clone();
    let epoch = fencing.epoch;
    let renewal = tokio::spawn(async move {
        client
            .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
                scope_id,
                tenant_id: T.into(),
                workload_instance_id: format!("{T}-w"),
                ttl_ms: 600_000,
                expected_epoch: epoch,
                force: false,
                request_id: String::new(),
            })
            .await
    });
    sleep(200).await;

    // The other replica's cached commit: the scope, shared.
    let mut other = sqlx::PgConnection::connect(&ledger.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT 1 FROM fencing_scopes WHERE scope_id = $1 FOR SHARE")
        .bind(&fencing.scope_id)
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    upsert.await.unwrap().unwrap();
    // Until the sweep batch waits for the scope; then the cached commit asks for the reservation.
    until_a_ledger_backend_waits_for_a_lock(&ledger.database_url).await;
    sqlx::query("SELECT 1 FROM reservations WHERE reservation_id = $1::uuid FOR UPDATE")
        .bind(&lapsing)
        .execute(&mut other)
        .await
        .expect("the reservation is free: the waiting sweep holds no candidate yet");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();

    let swept = sweep.await.unwrap().expect("the sweep was not aborted");
    assert_eq!(swept.into_inner().expired, 1);
    let renewed = renewal.await.unwrap().expect("the renewal was not aborted");
    assert_eq!(renewed.into_inner().epoch, epoch);
    invariants::check(ledger.store().pool()).await.unwrap();
}
