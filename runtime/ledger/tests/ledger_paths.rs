//! Every reserve/commit/release/expire path, idempotent retries, and every error code, against the
//! real ledger on a real PostgreSQL database. After each test the database invariants are checked.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_core::money::AMOUNT_MAX_NANO_USD as AMOUNT_MAX;
use spendguard_proto::ledger::error_code;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{force_takeover, reserve_request};
use spendguard_testkit::postgres::{await_ledger_lock_waits, refusal};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";

async fn setup() -> (TestLedger, pb::FencingToken) {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "run", 1_000).await.unwrap();
    ledger.budget(T, "tenant", 10_000).await.unwrap();
    (ledger, fencing)
}

fn code(status: &tonic::Status) -> pb::ErrorCode {
    error_code(status).unwrap_or_else(|| panic!("status without error detail: {status:?}"))
}

/// An acquire of `scope_id` for `owner` (a 10-minute lease, no expected epoch, not forced): a
/// first acquire, or a restart of the same owner, which takes the scope's next epoch.
fn lease_for(scope_id: &str, owner: &str) -> pb::AcquireFencingLeaseRequest {
    pb::AcquireFencingLeaseRequest {
        scope_id: scope_id.into(),
        tenant_id: T.into(),
        workload_instance_id: owner.into(),
        ttl_ms: 600_000,
        expected_epoch: 0,
        force: false,
        request_id: String::new(),
    }
}

fn reserved(response: pb::ReserveSetResponse) -> pb::Reservation {
    match response.outcome {
        Some(pb::reserve_set_response::Outcome::Reserved(r)) => r,
        other => panic!("expected a reservation, got {other:?}"),
    }
}

async fn balance(ledger: &mut TestLedger, budget: &str) -> pb::BudgetBalance {
    ledger.balance(T, budget).await.unwrap()
}

async fn outbox_count(ledger: &TestLedger) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn reserve_then_commit_releases_the_rest_on_every_budget() {
    let (mut ledger, fencing) = setup().await;
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k1", &["run", "tenant"], 300, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(r.balances.len(), 2);
    assert_eq!(
        (
            r.balances[0].reserved_nano_usd,
            r.balances[0].remaining_nano_usd
        ),
        (300, 700)
    );
    assert_eq!(r.balances[1].remaining_nano_usd, 9_700);

    let c = ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id.clone(),
            actual_nano_usd: 120,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            c.committed_nano_usd,
            c.released_nano_usd,
            c.overrun_nano_usd,
            c.replayed
        ),
        (120, 180, 0, false)
    );
    for (budget, limit) in [("run", 1_000), ("tenant", 10_000)] {
        let b = balance(&mut ledger, budget).await;
        assert_eq!(
            (
                b.reserved_nano_usd,
                b.committed_nano_usd,
                b.remaining_nano_usd
            ),
            (0, 120, limit - 120)
        );
    }
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn commit_above_the_reservation_is_a_flagged_overrun_never_dropped() {
    let (mut ledger, fencing) = setup().await;
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k1", &["run"], 100, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    let c = ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id,
            actual_nano_usd: 150,
            fencing: Some(fencing),
            deferrable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            c.committed_nano_usd,
            c.released_nano_usd,
            c.overrun_nano_usd
        ),
        (100, 0, 50)
    );
    let b = balance(&mut ledger, "run").await;
    assert_eq!(
        (
            b.committed_nano_usd,
            b.overrun_nano_usd,
            b.remaining_nano_usd
        ),
        (100, 50, 850)
    );
    let flagged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries WHERE kind = 'overrun' AND overrun_delta = 50",
    )
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(flagged, 1);
    let event: Vec<u8> = sqlx::query_scalar(
        "SELECT canonical_event FROM audit_outbox WHERE event_type = 'reservation.committed'",
    )
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert!(
        String::from_utf8(event)
            .unwrap()
            .contains(r#""overrun":true"#)
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn release_returns_everything_and_retries_replay() {
    let (mut ledger, fencing) = setup().await;
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k1", &["run"], 400, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    let release = pb::ReleaseRequest {
        tenant_id: T.into(),
        reservation_id: r.reservation_id.clone(),
        fencing: Some(fencing.clone()),
        reason: "client_disconnect".into(),
        deferrable: false,
    };
    let first = ledger
        .client
        .release(release.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.released_nano_usd, first.replayed), (400, false));
    let events = outbox_count(&ledger).await;
    let again = ledger.client.release(release).await.unwrap().into_inner();
    assert_eq!((again.released_nano_usd, again.replayed), (400, true));
    assert_eq!(
        outbox_count(&ledger).await,
        events,
        "a replay writes nothing"
    );
    assert_eq!(balance(&mut ledger, "run").await.remaining_nano_usd, 1_000);
    // Resolved one way, it cannot be resolved another.
    let err = ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id.clone(),
            actual_nano_usd: 1,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::ReservationAlreadyResolved);
    // A new reservation is open; its replay says where it stands now: released, so nothing
    // may be spent under it (the sidecar refuses such a retry).
    assert_eq!(r.state(), pb::ReservationState::Open);
    let replay = ledger
        .client
        .reserve_set(reserve_request(T, "k1", &["run"], 400, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed);
    assert_eq!(reserved(replay).state(), pb::ReservationState::Released);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn idempotent_reserve_and_commit() {
    let (mut ledger, fencing) = setup().await;
    let request = reserve_request(T, "same-key", &["run"], 250, &fencing);
    let first = ledger
        .client
        .reserve_set(request.clone())
        .await
        .unwrap()
        .into_inner();
    let events = outbox_count(&ledger).await;
    let second = ledger
        .client
        .reserve_set(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed && second.replayed);
    assert_eq!(
        reserved(first.clone()).reservation_id,
        reserved(second).reservation_id
    );
    assert_eq!(outbox_count(&ledger).await, events);
    assert_eq!(
        balance(&mut ledger, "run").await.reserved_nano_usd,
        250,
        "reserved once"
    );

    let mut different = request;
    different.amount_nano_usd = 251;
    let err = ledger.client.reserve_set(different).await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::IdempotencyConflict);

    let id = reserved(first).reservation_id;
    let commit = pb::CommitRequest {
        tenant_id: T.into(),
        reservation_id: id,
        actual_nano_usd: 100,
        fencing: Some(fencing),
        deferrable: false,
    };
    assert!(
        !ledger
            .client
            .commit(commit.clone())
            .await
            .unwrap()
            .into_inner()
            .replayed
    );
    assert!(
        ledger
            .client
            .commit(commit.clone())
            .await
            .unwrap()
            .into_inner()
            .replayed
    );
    let mut other_actual = commit;
    other_actual.actual_nano_usd = 101;
    assert_eq!(
        code(&ledger.client.commit(other_actual).await.unwrap_err()),
        pb::ErrorCode::IdempotencyConflict
    );
    assert_eq!(balance(&mut ledger, "run").await.committed_nano_usd, 100);
    invariants::check(ledger.store().pool()).await.unwrap();
}

/// Amounts run to 10^18 nano-USD, past 2^53, where RFC 8785 prints numbers as doubles: two such
/// amounts one apart canonicalize alike, so the fingerprint hashes integers exactly.
#[tokio::test]
async fn a_retry_with_an_amount_one_nano_usd_apart_above_two_to_the_53_is_a_conflict() {
    let (mut ledger, fencing) = setup().await;
    ledger.budget(T, "large", AMOUNT_MAX).await.unwrap();
    let request = reserve_request(T, "large", &["large"], AMOUNT_MAX - 1, &fencing);
    let first = reserved(
        ledger
            .client
            .reserve_set(request.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    let events = outbox_count(&ledger).await;
    let mut other = request.clone();
    other.amount_nano_usd = AMOUNT_MAX;
    assert_eq!(
        code(&ledger.client.reserve_set(other).await.unwrap_err()),
        pb::ErrorCode::IdempotencyConflict
    );
    let again = ledger
        .client
        .reserve_set(request)
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(reserved(again).reservation_id, first.reservation_id);
    assert_eq!(outbox_count(&ledger).await, events, "neither retry wrote");
    assert_eq!(
        balance(&mut ledger, "large").await.reserved_nano_usd,
        AMOUNT_MAX - 1
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn denial_names_the_budget_and_reserves_nothing_anywhere() {
    let (mut ledger, fencing) = setup().await;
    let response = ledger
        .client
        .reserve_set(reserve_request(
            T,
            "big",
            &["tenant", "run"],
            1_001,
            &fencing,
        ))
        .await
        .unwrap()
        .into_inner();
    match response.outcome {
        Some(pb::reserve_set_response::Outcome::Denied(d)) => {
            assert_eq!((d.budget_id.as_str(), d.remaining_nano_usd), ("run", 1_000));
            assert_eq!(d.code, pb::ErrorCode::BudgetExhausted as i32);
        }
        other => panic!("expected denial, got {other:?}"),
    }
    assert_eq!(
        balance(&mut ledger, "tenant").await.reserved_nano_usd,
        0,
        "all or nothing"
    );
    // Exactly the remaining headroom fits.
    reserved(
        ledger
            .client
            .reserve_set(reserve_request(
                T,
                "fits",
                &["tenant", "run"],
                1_000,
                &fencing,
            ))
            .await
            .unwrap()
            .into_inner(),
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn expiry_runs_on_the_database_clock_and_a_late_commit_is_booked_as_an_overrun() {
    // Goal: a reservation lapses at its TTL on the database clock (the sweep expires it once;
    // a release after is RESERVATION_EXPIRED), and the usage of a call that outlived it is
    // booked, never dropped: a commit after the TTL, before or after the sweep, leaves the
    // reservation expired (what it held back in the budgets) and books all of its actual as an
    // overrun on the reservation's own windows, flagged late; its retry replays, another actual
    // conflicts.
    let (mut ledger, fencing) = setup().await;
    let short = |key: &str, budgets: &[&str], amount: i64| {
        let mut request = reserve_request(T, key, budgets, amount, &fencing);
        request.ttl_ms = 1_000;
        request
    };
    let mut reserve = async |request: pb::ReserveSetRequest| {
        reserved(
            ledger
                .client
                .reserve_set(request)
                .await
                .unwrap()
                .into_inner(),
        )
    };
    let r1 = reserve(short("short-1", &["run", "tenant"], 500)).await;
    let r2 = reserve(short("short-2", &["run"], 200)).await;
    let keep = reserve(reserve_request(T, "long", &["run"], 100, &fencing)).await;
    let sweep = |ledger: &mut TestLedger| {
        let mut client = ledger.client.clone();
        async move {
            client
                .sweep_expired(pb::SweepExpiredRequest {
                    max_reservations: 100,
                })
                .await
                .unwrap()
                .into_inner()
                .expired
        }
    };
    let loaded = ledger.batches("loaded");
    assert_eq!(sweep(&mut ledger).await, 0, "not yet expired");
    assert_eq!(
        ledger.batches("loaded"),
        loaded,
        "a sweep with nothing to do is answered without the writer's load path"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    // Lapsed but not swept yet: a replay already reports it expired (nothing may be spent).
    let replay = ledger
        .client
        .reserve_set(short("short-1", &["run", "tenant"], 500))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed);
    assert_eq!(reserved(replay).state(), pb::ReservationState::Expired);

    let commit = |id: &str, actual: i64| pb::CommitRequest {
        tenant_id: T.into(),
        reservation_id: id.to_owned(),
        actual_nano_usd: actual,
        fencing: Some(fencing.clone()),
        deferrable: false,
    };
    // Before the sweep: expired now, and all 700 booked late.
    let late = ledger
        .client
        .commit(commit(&r1.reservation_id, 700))
        .await
        .unwrap()
        .into_inner();
    assert!(late.late && !late.replayed, "{late:?}");
    assert_eq!(
        (
            late.committed_nano_usd,
            late.released_nano_usd,
            late.overrun_nano_usd
        ),
        (0, 500, 700)
    );
    let again = ledger
        .client
        .commit(commit(&r1.reservation_id, 700))
        .await
        .unwrap()
        .into_inner();
    assert!(again.late && again.replayed);
    let other = ledger
        .client
        .commit(commit(&r1.reservation_id, 701))
        .await
        .unwrap_err();
    assert_eq!(code(&other), pb::ErrorCode::IdempotencyConflict);
    // Lapsed, not swept: a release is RESERVATION_EXPIRED too, and writes nothing (the sweep
    // below still finds r2 open).
    let release = pb::ReleaseRequest {
        tenant_id: T.into(),
        reservation_id: r2.reservation_id.clone(),
        fencing: Some(fencing.clone()),
        reason: String::new(),
        deferrable: false,
    };
    assert_eq!(
        code(&ledger.client.release(release.clone()).await.unwrap_err()),
        pb::ErrorCode::ReservationExpired
    );
    let loaded = ledger.batches("loaded");
    assert_eq!(
        sweep(&mut ledger).await,
        1,
        "only the second is left to expire"
    );
    assert_eq!(ledger.batches("loaded"), loaded + 1, "a sweep that expires");
    assert_eq!(
        sweep(&mut ledger).await,
        0,
        "an expired reservation expires once"
    );

    // After the sweep: nothing left to release; a commit books its 50 late on the expired row.
    assert_eq!(
        code(&ledger.client.release(release).await.unwrap_err()),
        pb::ErrorCode::ReservationExpired
    );
    let late = ledger
        .client
        .commit(commit(&r2.reservation_id, 50))
        .await
        .unwrap()
        .into_inner();
    assert!(late.late && !late.replayed, "{late:?}");
    assert_eq!(
        (
            late.committed_nano_usd,
            late.released_nano_usd,
            late.overrun_nano_usd
        ),
        (0, 200, 50)
    );
    assert!(
        ledger
            .client
            .commit(commit(&r2.reservation_id, 50))
            .await
            .unwrap()
            .into_inner()
            .replayed
    );

    let run = balance(&mut ledger, "run").await;
    assert_eq!(
        (
            run.reserved_nano_usd,
            run.committed_nano_usd,
            run.overrun_nano_usd
        ),
        (100, 0, 750),
        "only the live reservation is held; both late usages are booked"
    );
    let tenant = balance(&mut ledger, "tenant").await;
    assert_eq!(
        (tenant.reserved_nano_usd, tenant.overrun_nano_usd),
        (0, 700)
    );
    let pool = ledger.store().pool().clone();
    let rows: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(
        "SELECT state, actual_nano_usd, overrun_nano_usd, resolved_epoch FROM reservations
          WHERE reservation_id = ANY($1::uuid[]) ORDER BY amount_nano_usd DESC",
    )
    .bind(vec![r1.reservation_id.clone(), r2.reservation_id.clone()])
    .fetch_all(&pool)
    .await
    .unwrap();
    let epoch = Some(i64::try_from(fencing.epoch).unwrap());
    assert_eq!(
        rows,
        [
            ("expired".into(), 700, 700, epoch),
            ("expired".into(), 50, 50, epoch)
        ],
        "each carries its late usage and the committing epoch"
    );
    let flagged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_outbox WHERE event_type = 'reservation.committed_late'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        flagged, 2,
        "one event per late booking, none for the replays"
    );
    ledger
        .client
        .commit(commit(&keep.reservation_id, 100))
        .await
        .unwrap();
    invariants::check(&pool).await.unwrap();
}

#[tokio::test]
async fn calendar_windows_start_at_utc_boundaries() {
    let (mut ledger, fencing) = setup().await;
    ledger
        .client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: T.into(),
            budget_id: "daily".into(),
            limit_nano_usd: 500,
            soft_cap_nano_usd: 400,
            window: pb::BudgetWindow::CalendarDayUtc.into(),
        })
        .await
        .unwrap();
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "d1", &["daily"], 100, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    let b = &r.balances[0];
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert_eq!(
        b.window_start_unix_ms % 86_400_000,
        0,
        "day windows start at 00:00 UTC"
    );
    assert!(now_ms - b.window_start_unix_ms < 86_400_000 + 60_000);
    assert_eq!(
        (b.soft_cap_nano_usd, b.window),
        (400, pb::BudgetWindow::CalendarDayUtc as i32)
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn lowering_a_limit_below_usage_clamps_the_current_window_and_stops_spending() {
    let (mut ledger, fencing) = setup().await;
    reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k", &["run"], 600, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    let response = ledger
        .client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: T.into(),
            budget_id: "run".into(),
            limit_nano_usd: 100,
            soft_cap_nano_usd: 0,
            window: pb::BudgetWindow::Lifetime.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let b = response.balance.unwrap();
    assert_eq!((b.limit_nano_usd, b.remaining_nano_usd), (600, 0));
    let denied = ledger
        .client
        .reserve_set(reserve_request(T, "k2", &["run"], 1, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        denied.outcome,
        Some(pb::reserve_set_response::Outcome::Denied(_))
    ));
    // What the open reservation releases afterwards is not spendable again: the limit is 100.
    let held = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k", &["run"], 600, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: held.reservation_id,
            actual_nano_usd: 40,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap();
    let b = balance(&mut ledger, "run").await;
    assert_eq!(
        (b.limit_nano_usd, b.committed_nano_usd, b.remaining_nano_usd),
        (100, 40, 60),
        "the 560 released is not room under a limit of 100"
    );
    // A replay of the reservation answers its window as GetBalances does, not the stored 600.
    let replay = ledger
        .client
        .reserve_set(reserve_request(T, "k", &["run"], 600, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed);
    let shown = &reserved(replay).balances[0];
    assert_eq!(
        (shown.limit_nano_usd, shown.remaining_nano_usd),
        (b.limit_nano_usd, b.remaining_nano_usd)
    );
    let over = ledger
        .client
        .reserve_set(reserve_request(T, "k3", &["run"], 61, &fencing))
        .await
        .unwrap()
        .into_inner();
    match over.outcome {
        Some(pb::reserve_set_response::Outcome::Denied(d)) => {
            assert_eq!(d.remaining_nano_usd, 60);
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    let fits = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k4", &["run"], 60, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        (
            fits.balances[0].limit_nano_usd,
            fits.balances[0].remaining_nano_usd
        ),
        (100, 0)
    );
    // The window's stored limit came down with that reservation, so the database's own check
    // holds it to the budget's limit.
    let stored: i64 = sqlx::query_scalar(
        "SELECT limit_nano_usd FROM budget_windows WHERE tenant_id = $1 AND budget_id = 'run'",
    )
    .bind(T)
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(stored, 100);
    // Raising it again takes effect at once.
    ledger
        .client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: T.into(),
            budget_id: "run".into(),
            limit_nano_usd: 2_000,
            soft_cap_nano_usd: 0,
            window: pb::BudgetWindow::Lifetime.into(),
        })
        .await
        .unwrap();
    assert_eq!(balance(&mut ledger, "run").await.remaining_nano_usd, 1_900);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn reservations_need_registered_pricing_and_registrations_are_immutable() {
    let (mut ledger, fencing) = setup().await;
    let before = outbox_count(&ledger).await;
    let mut unknown = reserve_request(T, "p-1", &["run"], 10, &fencing);
    unknown.pricing = Some(pb::PricingRef {
        version: "never-registered".into(),
        sha256_hex: "ab".repeat(32),
    });
    let err = ledger.client.reserve_set(unknown).await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::PricingUnknown);
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let mut wrong_hash = reserve_request(T, "p-2", &["run"], 10, &fencing);
    wrong_hash.pricing = Some(pb::PricingRef {
        version: spendguard_testkit::ledger::test_pricing().version,
        sha256_hex: "cd".repeat(32),
    });
    let err = ledger.client.reserve_set(wrong_hash).await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::PricingUnknown);
    assert_eq!(balance(&mut ledger, "run").await.reserved_nano_usd, 0);
    assert_eq!(
        outbox_count(&ledger).await,
        before,
        "refusals write nothing"
    );

    // Registering the same snapshot again is a no-op; another hash for the version is refused.
    let again = ledger
        .client
        .register_pricing(pb::RegisterPricingRequest {
            tenant_id: T.into(),
            pricing: Some(spendguard_testkit::ledger::test_pricing()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    let conflict = ledger
        .client
        .register_pricing(pb::RegisterPricingRequest {
            tenant_id: T.into(),
            pricing: Some(pb::PricingRef {
                version: "test-v1".into(),
                sha256_hex: "cd".repeat(32),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&conflict), pb::ErrorCode::PricingConflict);
    assert_eq!(outbox_count(&ledger).await, before);

    // A new version for this tenant only: another tenant cannot use it.
    let v2 = pb::PricingRef {
        version: "test-v2".into(),
        sha256_hex: "ef".repeat(32),
    };
    let created = ledger
        .client
        .register_pricing(pb::RegisterPricingRequest {
            tenant_id: T.into(),
            pricing: Some(v2.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    let mut ok = reserve_request(T, "p-3", &["run"], 10, &fencing);
    ok.pricing = Some(v2);
    reserved(ledger.client.reserve_set(ok).await.unwrap().into_inner());
    let unregistered_tenant = ledger
        .client
        .register_pricing(pb::RegisterPricingRequest {
            tenant_id: "nobody".into(),
            pricing: Some(spendguard_testkit::ledger::test_pricing()),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&unregistered_tenant), pb::ErrorCode::TenantNotFound);

    // The database refuses to rewrite a registration even if application code tried.
    let rewrite =
        sqlx::query("UPDATE pricing_registrations SET sha256_hex = $1 WHERE tenant_id = $2")
            .bind("00".repeat(32))
            .bind(T)
            .execute(ledger.store().pool())
            .await;
    assert!(rewrite.is_err());
}

#[tokio::test]
async fn every_audit_event_is_signed_by_a_registered_key() {
    use spendguard_evidence::{Inclusion, Signed};
    let (mut ledger, fencing) = setup().await;
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "signed-1", &["run"], 40, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id,
            actual_nano_usd: 30,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap();
    let pool = ledger.store().pool();
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM signing_keys")
            .fetch_one(pool)
            .await
            .unwrap(),
        1,
        "the ledger published its key at startup"
    );
    let registry = spendguard_testkit::signing::registry(pool).await.unwrap();
    type Row = (
        Vec<u8>,
        String,
        Option<String>,
        Option<String>,
        Option<chrono::DateTime<chrono::Utc>>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT canonical_event, producer_instance_id, signing_key_id, signing_algorithm, signed_at,
                signature, signature_inclusion FROM audit_outbox ORDER BY producer_sequence",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(rows.len() >= 5);
    // Every row is batch-signed: one signature per write batch, the row's proof places it.
    let mut batches: std::collections::HashMap<Vec<u8>, Vec<Inclusion>> =
        std::collections::HashMap::new();
    for (bytes, producer, key_id, algorithm, signed_at, signature, inclusion) in rows {
        let inclusion = Inclusion::from_bytes(&inclusion.expect("batch-signed")).unwrap();
        let signed = Signed {
            key_id: key_id.expect("signed"),
            algorithm: algorithm.expect("signed").parse().unwrap(),
            signed_at: signed_at.expect("signed"),
            producer_id: producer,
            signature: signature.expect("signed"),
            inclusion: Some(inclusion.clone()),
        };
        registry.verify(&signed, &bytes).unwrap();
        let mut tampered = bytes.clone();
        tampered[bytes.len() / 2] ^= 1;
        assert!(registry.verify(&signed, &tampered).is_err());
        batches.entry(signed.signature).or_default().push(inclusion);
    }
    // Each signature's rows are exactly the places 0..count of its batch.
    for inclusions in batches.values() {
        let count = inclusions[0].count;
        let mut places: Vec<u32> = inclusions.iter().map(|i| i.index).collect();
        places.sort_unstable();
        assert!(inclusions.iter().all(|i| i.count == count));
        assert_eq!(places, (0..count).collect::<Vec<_>>());
    }
    // A half-signed row, or a proof without a signature, is refused by the database itself
    // (an insert: the outbox is append-only, so an update would fail on that trigger instead).
    for (columns, constraint) in [
        ("signing_key_id", "audit_outbox_signature_complete"),
        ("signature_inclusion", "audit_outbox_inclusion_signed"),
    ] {
        // The column lists are this test's constants.
        let error = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO audit_outbox (producer_instance_id, producer_sequence, tenant_id, event_type,
                                       occurred_at, canonical_event, event_sha256, {columns})
             SELECT producer_instance_id, producer_sequence + 1000000, tenant_id, event_type,
                    occurred_at, canonical_event, event_sha256, {columns}
               FROM audit_outbox ORDER BY producer_sequence LIMIT 1"
        )))
        .execute(pool)
        .await
        .unwrap_err();
        assert_eq!(
            error.as_database_error().and_then(|e| e.constraint()),
            Some(constraint),
            "{error}"
        );
    }
}

#[tokio::test]
async fn upserts_are_idempotent() {
    let (mut ledger, _) = setup().await;
    let events = outbox_count(&ledger).await;
    let t = ledger
        .client
        .upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: T.into(),
            display_name: T.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!t.created);
    ledger.budget(T, "run", 1_000).await.unwrap();
    assert_eq!(
        outbox_count(&ledger).await,
        events,
        "an unchanged upsert writes nothing"
    );
}

#[tokio::test]
async fn bad_input_gets_its_stable_code_and_writes_nothing() {
    let (mut ledger, fencing) = setup().await;
    // An open reservation, for settlements that name it with bad fencing.
    let open = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "open-1", &["run"], 10, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    let before = outbox_count(&ledger).await;
    let journal_before = journal(&ledger).await;
    let ok = reserve_request(T, "k", &["run"], 10, &fencing);
    let cases: Vec<(&str, pb::ReserveSetRequest, pb::ErrorCode)> = vec![
        (
            "negative amount",
            pb::ReserveSetRequest {
                amount_nano_usd: -1,
                ..ok.clone()
            },
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "zero amount",
            pb::ReserveSetRequest {
                amount_nano_usd: 0,
                ..ok.clone()
            },
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "overflowing amount",
            pb::ReserveSetRequest {
                amount_nano_usd: i64::MAX,
                ..ok.clone()
            },
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "one past the largest amount",
            pb::ReserveSetRequest {
                amount_nano_usd: AMOUNT_MAX + 1,
                ..ok.clone()
            },
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "unknown budget",
            pb::ReserveSetRequest {
                budget_ids: vec!["nope".into()],
                ..ok.clone()
            },
            pb::ErrorCode::BudgetNotFound,
        ),
        (
            "unknown tenant",
            pb::ReserveSetRequest {
                tenant_id: "tenant-z".into(),
                ..ok.clone()
            },
            pb::ErrorCode::TenantNotFound,
        ),
        (
            "malformed tenant",
            pb::ReserveSetRequest {
                tenant_id: "Tenant A".into(),
                ..ok.clone()
            },
            pb::ErrorCode::IdMalformed,
        ),
        (
            "malformed key",
            pb::ReserveSetRequest {
                idempotency_key: "has space".into(),
                ..ok.clone()
            },
            pb::ErrorCode::IdMalformed,
        ),
        (
            "malformed budget",
            pb::ReserveSetRequest {
                budget_ids: vec!["Run".into()],
                ..ok.clone()
            },
            pb::ErrorCode::IdMalformed,
        ),
        (
            "malformed scope",
            pb::ReserveSetRequest {
                fencing: Some(pb::FencingToken {
                    scope_id: "a scope".into(),
                    ..fencing.clone()
                }),
                ..ok.clone()
            },
            pb::ErrorCode::IdMalformed,
        ),
        (
            "missing fencing",
            pb::ReserveSetRequest {
                fencing: None,
                ..ok.clone()
            },
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "epoch zero",
            pb::ReserveSetRequest {
                fencing: Some(pb::FencingToken {
                    epoch: 0,
                    ..fencing.clone()
                }),
                ..ok.clone()
            },
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "stale epoch",
            pb::ReserveSetRequest {
                fencing: Some(pb::FencingToken {
                    epoch: fencing.epoch + 1,
                    ..fencing.clone()
                }),
                ..ok.clone()
            },
            pb::ErrorCode::FencingEpochStale,
        ),
        (
            "unknown scope",
            pb::ReserveSetRequest {
                fencing: Some(pb::FencingToken {
                    scope_id: "nope".into(),
                    ..fencing.clone()
                }),
                ..ok.clone()
            },
            pb::ErrorCode::FencingScopeNotFound,
        ),
        (
            "ttl too short",
            pb::ReserveSetRequest {
                ttl_ms: 999,
                ..ok.clone()
            },
            pb::ErrorCode::TtlInvalid,
        ),
        (
            "too many budgets",
            pb::ReserveSetRequest {
                budget_ids: (0..9).map(|i| format!("b{i}")).collect(),
                ..ok.clone()
            },
            pb::ErrorCode::RequestTooLarge,
        ),
        (
            "duplicate budget",
            pb::ReserveSetRequest {
                budget_ids: vec!["run".into(), "run".into()],
                ..ok.clone()
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "no budgets",
            pb::ReserveSetRequest {
                budget_ids: vec![],
                ..ok.clone()
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "oversized context",
            pb::ReserveSetRequest {
                context: Some(pb::DecisionContext {
                    run_id: "r".repeat(257),
                    ..Default::default()
                }),
                ..ok.clone()
            },
            pb::ErrorCode::RequestTooLarge,
        ),
        (
            "missing pricing",
            pb::ReserveSetRequest {
                pricing: None,
                ..ok.clone()
            },
            pb::ErrorCode::InvalidArgument,
        ),
    ];
    for (name, request, expected) in cases {
        let err = ledger.client.reserve_set(request).await.expect_err(name);
        assert_eq!(code(&err), expected, "{name}: {err:?}");
        assert_eq!(
            err.metadata()
                .get("spendguard-error-code")
                .and_then(|v| v.to_str().ok()),
            expected.as_str_name().strip_prefix("ERROR_CODE_"),
            "{name}"
        );
    }
    // A request beyond the transport limit (64 KiB) is refused before parsing, with the same
    // stable code as a field too long, and writes nothing.
    let huge = pb::ReserveSetRequest {
        idempotency_key: "k".repeat(70_000),
        ..ok.clone()
    };
    let too_large_before = too_large_counted(&ledger);
    let err = ledger.client.reserve_set(huge).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(code(&err), pb::ErrorCode::RequestTooLarge, "{err:?}");
    assert_eq!(
        err.metadata()
            .get("spendguard-error-code")
            .and_then(|v| v.to_str().ok()),
        Some("REQUEST_TOO_LARGE")
    );
    assert!(err.message().contains("of 65536"), "{err:?}");
    let detail = <pb::ErrorDetail as prost::Message>::decode(err.details()).unwrap();
    assert_eq!(detail.field, "request (bytes)");
    // Counted like every refusal, though no handler ran.
    assert_eq!(too_large_counted(&ledger), too_large_before + 1);

    let commit_cases: Vec<(pb::CommitRequest, pb::ErrorCode)> = vec![
        (
            pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: "not-a-uuid".into(),
                actual_nano_usd: 1,
                fencing: Some(fencing.clone()),
                deferrable: false,
            },
            pb::ErrorCode::IdMalformed,
        ),
        (
            pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: uuid::Uuid::new_v4().to_string(),
                actual_nano_usd: 1,
                fencing: Some(fencing.clone()),
                deferrable: false,
            },
            pb::ErrorCode::ReservationNotFound,
        ),
        (
            pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: uuid::Uuid::new_v4().to_string(),
                actual_nano_usd: -5,
                fencing: Some(fencing.clone()),
                deferrable: false,
            },
            pb::ErrorCode::AmountInvalid,
        ),
        (
            pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: open.reservation_id.clone(),
                actual_nano_usd: AMOUNT_MAX + 1,
                fencing: Some(fencing.clone()),
                deferrable: false,
            },
            pb::ErrorCode::AmountInvalid,
        ),
        (
            pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: open.reservation_id.clone(),
                actual_nano_usd: i64::MAX,
                fencing: Some(fencing.clone()),
                deferrable: false,
            },
            pb::ErrorCode::AmountInvalid,
        ),
    ];
    for (request, expected) in commit_cases {
        assert_eq!(
            code(&ledger.client.commit(request).await.unwrap_err()),
            expected
        );
    }
    // Settling needs the scope's current epoch too: none, 0 or another one is refused. An epoch
    // ahead of the scope's (one the caller minted) is refused as stale; an epoch behind it (the
    // pre-takeover writer) is tested with the takeover below.
    let zero = pb::FencingToken {
        epoch: 0,
        ..fencing.clone()
    };
    let ahead = pb::FencingToken {
        epoch: fencing.epoch + 1,
        ..fencing.clone()
    };
    for (name, token, expected) in [
        ("missing fencing", None, pb::ErrorCode::FencingEpochMissing),
        ("epoch zero", Some(zero), pb::ErrorCode::FencingEpochMissing),
        (
            "epoch ahead of the scope's",
            Some(ahead),
            pb::ErrorCode::FencingEpochStale,
        ),
    ] {
        let commit = pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: open.reservation_id.clone(),
            actual_nano_usd: 1,
            fencing: token.clone(),
            deferrable: false,
        };
        let err = ledger.client.commit(commit).await.unwrap_err();
        assert_eq!(code(&err), expected, "commit, {name}");
        let release = pb::ReleaseRequest {
            tenant_id: T.into(),
            reservation_id: open.reservation_id.clone(),
            fencing: token,
            reason: String::new(),
            deferrable: false,
        };
        let err = ledger.client.release(release).await.unwrap_err();
        assert_eq!(code(&err), expected, "release, {name}");
    }
    let bad_budget = pb::UpsertBudgetRequest {
        tenant_id: T.into(),
        budget_id: "b".into(),
        limit_nano_usd: 10,
        soft_cap_nano_usd: 11,
        window: pb::BudgetWindow::Lifetime.into(),
    };
    assert_eq!(
        code(
            &ledger
                .client
                .upsert_budget(bad_budget.clone())
                .await
                .unwrap_err()
        ),
        pb::ErrorCode::BudgetInvalid
    );
    let no_window = pb::UpsertBudgetRequest {
        soft_cap_nano_usd: 0,
        window: 0,
        ..bad_budget
    };
    assert_eq!(
        code(&ledger.client.upsert_budget(no_window).await.unwrap_err()),
        pb::ErrorCode::BudgetInvalid
    );
    assert_eq!(
        code(
            &ledger
                .client
                .sweep_expired(pb::SweepExpiredRequest {
                    max_reservations: 0
                })
                .await
                .unwrap_err()
        ),
        pb::ErrorCode::InvalidArgument
    );
    assert_eq!(
        outbox_count(&ledger).await,
        before,
        "refused requests write nothing"
    );
    let reservations: Vec<String> = sqlx::query_scalar("SELECT state FROM reservations")
        .fetch_all(ledger.store().pool())
        .await
        .unwrap();
    assert_eq!(reservations, ["reserved"], "only the open one, still open");
    assert_eq!(
        journal(&ledger).await,
        journal_before,
        "nor any journal entry or balance"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

/// The journal's length and every window's balances: what a refused request must not change.
async fn journal(ledger: &TestLedger) -> (i64, Vec<(String, i64, i64, i64, i64)>) {
    let pool = ledger.store().pool();
    let entries = sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(pool)
        .await
        .unwrap();
    let windows = sqlx::query_as(
        "SELECT budget_id, limit_nano_usd, reserved_nano_usd, committed_nano_usd, overrun_nano_usd
           FROM budget_windows ORDER BY tenant_id, budget_id, window_start",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    (entries, windows)
}

#[tokio::test]
async fn a_plan_the_database_refuses_is_internal_and_fails_only_itself() {
    // Goal: when a database rule refuses what the ledger planned (a bug in the ledger, or a rule
    // it does not know), the call gets INTERNAL, nothing of it is written, and the calls batched
    // with it still succeed.
    let (mut ledger, fencing) = setup().await;
    // Warm the writer's cache, so the refused call takes the cached path first.
    reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "warm", &["run"], 10, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    // A rule only the database knows: no reservation of 77.
    sqlx::query(
        "ALTER TABLE reservations ADD CONSTRAINT no_77 CHECK (amount_nano_usd <> 77) NOT VALID",
    )
    .execute(&ledger.owner)
    .await
    .unwrap();
    let before = (outbox_count(&ledger).await, journal(&ledger).await);
    let calls: Vec<_> = [("refused", 77), ("neighbour-1", 10), ("neighbour-2", 11)]
        .into_iter()
        .map(|(key, amount)| {
            let mut client = ledger.client.clone();
            let request = reserve_request(T, key, &["run"], amount, &fencing);
            tokio::spawn(async move { client.reserve_set(request).await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let refused = answers.remove(0).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}");
    assert_eq!(code(&refused), pb::ErrorCode::Internal);
    for answer in answers {
        reserved(answer.unwrap().into_inner());
    }
    // The neighbours wrote their two events and entries; the refused call nothing.
    let after = (outbox_count(&ledger).await, journal(&ledger).await);
    assert_eq!(after.0, before.0 + 2);
    assert_eq!(after.1.0, before.1.0 + 2);
    let run = balance(&mut ledger, "run").await;
    assert_eq!(run.reserved_nano_usd, 10 + 10 + 11);
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM reservations ORDER BY 1")
            .fetch_all(&ledger.owner)
            .await
            .unwrap();
    assert_eq!(keys, ["neighbour-1", "neighbour-2", "warm"]);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn tenants_cannot_touch_each_other() {
    let (mut ledger, fencing_a) = setup().await;
    let fencing_b = ledger.tenant_with_lease("tenant-b").await.unwrap();
    ledger.budget("tenant-b", "run", 1_000).await.unwrap();
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k", &["run"], 10, &fencing_a))
            .await
            .unwrap()
            .into_inner(),
    );
    // Tenant B cannot settle A's reservation, nor use A's scope, nor reserve on A's budget;
    // none of it writes anything.
    let events = outbox_count(&ledger).await;
    let err = ledger
        .client
        .release(pb::ReleaseRequest {
            tenant_id: "tenant-b".into(),
            reservation_id: r.reservation_id.clone(),
            fencing: Some(fencing_b.clone()),
            reason: String::new(),
            deferrable: false,
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::ReservationNotFound);
    let err = ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: "tenant-b".into(),
            reservation_id: r.reservation_id.clone(),
            actual_nano_usd: 1,
            fencing: Some(fencing_b.clone()),
            deferrable: false,
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::ReservationNotFound);
    // A's budget `tenant`, named by B with B's own lease: B has no such budget.
    let err = ledger
        .client
        .reserve_set(reserve_request(
            "tenant-b",
            "k",
            &["tenant"],
            10,
            &fencing_b,
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::BudgetNotFound);
    let err = ledger
        .client
        .reserve_set(reserve_request("tenant-b", "k", &["run"], 10, &fencing_a))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::FencingScopeNotFound);
    let err = ledger
        .client
        .get_balances(pb::GetBalancesRequest {
            tenant_id: "tenant-b".into(),
            budget_ids: vec!["tenant".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::BudgetNotFound);
    assert_eq!(
        outbox_count(&ledger).await,
        events,
        "refusals write nothing"
    );
    let state: String =
        sqlx::query_scalar("SELECT state FROM reservations WHERE reservation_id = $1::uuid")
            .bind(&r.reservation_id)
            .fetch_one(ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(state, "reserved", "A's reservation is untouched");
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn leases_renew_take_over_and_fence_stale_writers() {
    let (mut ledger, fencing) = setup().await;
    let acquire = |owner: &str, expected_epoch: u64, force: bool, ttl_ms: u32| {
        pb::AcquireFencingLeaseRequest {
            scope_id: fencing.scope_id.clone(),
            tenant_id: T.into(),
            workload_instance_id: owner.into(),
            ttl_ms,
            expected_epoch,
            force,
            request_id: String::new(),
        }
    };
    let renewed = ledger
        .client
        .acquire_fencing_lease(acquire("tenant-a-w", fencing.epoch, false, 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (renewed.epoch, renewed.outcome),
        (fencing.epoch, pb::LeaseOutcome::Renewed as i32)
    );
    let held = ledger
        .client
        .acquire_fencing_lease(acquire("other", 0, false, 10_000))
        .await
        .unwrap_err();
    assert_eq!(code(&held), pb::ErrorCode::FencingLeaseHeld);
    // A reservation made under the old epoch…
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "old", &["run"], 50, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let expired = ledger
        .client
        .reserve_set(reserve_request(T, "late", &["run"], 50, &fencing))
        .await
        .unwrap_err();
    assert_eq!(code(&expired), pb::ErrorCode::FencingLeaseExpired);
    // With the force flag too, an expired lease is taken over, not forced.
    let taken = ledger
        .client
        .acquire_fencing_lease(acquire("other", 0, true, 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (taken.epoch, taken.outcome),
        (fencing.epoch + 1, pb::LeaseOutcome::TakenOver as i32)
    );
    // …cannot be settled by the pre-takeover writer, but can by the new holder.
    let stale = ledger
        .client
        .release(pb::ReleaseRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id.clone(),
            fencing: Some(fencing.clone()),
            reason: String::new(),
            deferrable: false,
        })
        .await
        .unwrap_err();
    assert_eq!(code(&stale), pb::ErrorCode::FencingEpochStale);
    let fresh = pb::FencingToken {
        scope_id: fencing.scope_id.clone(),
        epoch: taken.epoch,
    };
    ledger
        .client
        .release(pb::ReleaseRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id,
            fencing: Some(fresh),
            reason: "takeover".into(),
            deferrable: false,
        })
        .await
        .unwrap();
    let forced = ledger
        .client
        .acquire_fencing_lease(acquire("admin", 0, true, 60_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (forced.epoch, forced.outcome),
        (fencing.epoch + 2, pb::LeaseOutcome::Forced as i32)
    );
    let minted = ledger
        .client
        .acquire_fencing_lease(acquire("admin", 99, false, 60_000))
        .await
        .unwrap_err();
    assert_eq!(code(&minted), pb::ErrorCode::FencingEpochStale);
    let history: Vec<String> =
        sqlx::query_scalar("SELECT outcome FROM fencing_scope_events ORDER BY event_id")
            .fetch_all(ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(history, ["acquired", "renewed", "taken_over", "forced"]);
    // The audit events say the same: only the takeover before expiry was forced.
    let events =
        spendguard_testkit::ledger::outbox_events(ledger.store().pool(), "fencing.lease_acquired")
            .await
            .unwrap();
    let said: Vec<(&str, bool)> = events
        .iter()
        .map(|e| {
            let data = &e["data"];
            (
                data["outcome"].as_str().unwrap(),
                data["forced"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        said,
        [
            ("acquired", false),
            ("renewed", false),
            ("taken_over", false),
            ("forced", true)
        ]
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_lease_acquire_retried_with_its_request_id_is_answered_once_and_changes_nothing() {
    // Goal: idempotency reaches AcquireFencingLease. An acquire afresh whose answer was lost,
    // sent again with its request id, gets the first answer instead of raising the epoch again
    // (which would fence out the epoch its first send had been granted); the same id with other
    // fields is IDEMPOTENCY_CONFLICT; neither writes anything. Without an id, as before, every
    // acquire is a new one.
    let (ledger, _) = setup().await;
    let with_id = |owner: &str, expected_epoch: u64, id: &str| pb::AcquireFencingLeaseRequest {
        expected_epoch,
        request_id: id.into(),
        ..lease_for("retried", owner)
    };
    let history = |ledger: &TestLedger| {
        let pool = ledger.store().pool().clone();
        async move {
            let rows: Vec<(i64, Option<String>)> = sqlx::query_as(
                "SELECT epoch, request_id FROM fencing_scope_events
                  WHERE scope_id = 'retried' ORDER BY event_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            rows
        }
    };
    let mut client = ledger.client.clone();
    let first = client
        .acquire_fencing_lease(with_id("w", 0, "start-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.epoch, first.replayed), (1, false));
    let (outbox_before, scope_before) = (outbox_count(&ledger).await, history(&ledger).await);
    let again = client
        .acquire_fencing_lease(with_id("w", 0, "start-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again,
        pb::AcquireFencingLeaseResponse {
            replayed: true,
            ..first
        },
        "the first answer, expiry included"
    );
    for (field, other) in [
        (
            "ttl_ms",
            pb::AcquireFencingLeaseRequest {
                ttl_ms: 60_000,
                ..with_id("w", 0, "start-1")
            },
        ),
        ("workload_instance_id", with_id("w2", 0, "start-1")),
        ("expected_epoch", with_id("w", 1, "start-1")),
    ] {
        let conflict = client.acquire_fencing_lease(other).await.unwrap_err();
        assert_eq!(
            code(&conflict),
            pb::ErrorCode::IdempotencyConflict,
            "{field}"
        );
    }
    assert_eq!(
        outbox_count(&ledger).await,
        outbox_before,
        "a replay and a conflict write no event"
    );
    assert_eq!(history(&ledger).await, scope_before, "nor any history");

    // A renewal with its own id extends the lease once; its retry does not extend it again.
    let renewed = client
        .acquire_fencing_lease(with_id("w", 1, "renew-1"))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let renewed_again = client
        .acquire_fencing_lease(with_id("w", 1, "renew-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            renewed_again.epoch,
            renewed_again.expires_at_unix_ms,
            renewed_again.replayed
        ),
        (1, renewed.expires_at_unix_ms, true)
    );
    // Without an id, an acquire afresh sent twice is a restart twice: epochs 2 and 3.
    for expected in [2, 3] {
        let restarted = client
            .acquire_fencing_lease(lease_for("retried", "w"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(restarted.epoch, expected);
    }
    // A retry that comes after the lease moved on still gets its first answer: epoch 1, which
    // the caller's next write or renewal learns is stale.
    let late = client
        .acquire_fencing_lease(with_id("w", 0, "start-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((late.epoch, late.replayed), (1, true));
    // Ids are per scope: the same id names a new acquire of another scope.
    let elsewhere = client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: "retried-elsewhere".into(),
            ..with_id("w", 0, "start-1")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((elsewhere.epoch, elsewhere.replayed), (1, false));
    // A malformed id is refused and writes nothing.
    let (outbox_before, scope_before) = (outbox_count(&ledger).await, history(&ledger).await);
    for bad in ["has space", &"k".repeat(201)] {
        let refused = client
            .acquire_fencing_lease(with_id("w", 0, bad))
            .await
            .unwrap_err();
        assert_eq!(code(&refused), pb::ErrorCode::IdMalformed, "{bad}");
    }
    assert_eq!(outbox_count(&ledger).await, outbox_before);
    assert_eq!(history(&ledger).await, scope_before);
    assert_eq!(
        history(&ledger).await,
        [
            (1, Some("start-1".to_owned())),
            (1, Some("renew-1".to_owned())),
            (2, None),
            (3, None)
        ]
    );
    // Two acquires with one id in one batch: the second is the first's replay.
    let mut other_client = ledger.client.clone();
    let (a, b) = tokio::join!(
        other_client.acquire_fencing_lease(with_id("w", 3, "renew-2")),
        client.acquire_fencing_lease(with_id("w", 3, "renew-2")),
    );
    let (a, b) = (a.unwrap().into_inner(), b.unwrap().into_inner());
    assert_eq!(
        (a.epoch, a.expires_at_unix_ms),
        (b.epoch, b.expires_at_unix_ms)
    );
    assert!(
        a.replayed != b.replayed,
        "one of them was the acquire: {a:?} {b:?}"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn outbox_events_are_canonical_and_sequenced() {
    let (mut ledger, fencing) = setup().await;
    reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k", &["run"], 10, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT producer_sequence, canonical_event, event_sha256 FROM audit_outbox ORDER BY 1",
    )
    .fetch_all(ledger.store().pool())
    .await
    .unwrap();
    for (i, (sequence, bytes, sha)) in rows.iter().enumerate() {
        assert_eq!(*sequence, i64::try_from(i).unwrap() + 1);
        let value: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(
            &serde_json_canonicalizer::to_vec(&value).unwrap(),
            bytes,
            "stored bytes are RFC 8785 canonical"
        );
        assert_eq!(value["producer_sequence"], *sequence);
        assert_eq!(value["producer_instance_id"], "ledger-0");
        use sha2::Digest;
        assert_eq!(sha2::Sha256::digest(bytes).to_vec(), *sha);
    }
    let types: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM audit_outbox ORDER BY producer_sequence")
            .fetch_all(ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(
        types,
        [
            // The ledger's own key, published at its start with its evidence.
            "signing_key.registered",
            "tenant.upserted",
            "pricing.registered",
            "fencing.lease_acquired",
            "budget.upserted",
            "budget.upserted",
            "reservation.reserved"
        ]
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

/// A ledger holding one open reservation of 10 on `run` (key `k`): the ledger, its lease, a
/// pool as the tables' owner (the rules hold against it too) and the reservation's id.
async fn with_an_open_reservation() -> (TestLedger, pb::FencingToken, sqlx::PgPool, uuid::Uuid) {
    let (mut ledger, fencing) = setup().await;
    let r = reserved(
        ledger
            .client
            .reserve_set(reserve_request(T, "k", &["run"], 10, &fencing))
            .await
            .unwrap()
            .into_inner(),
    );
    let pool = ledger.owner.clone();
    let id = uuid::Uuid::parse_str(&r.reservation_id).unwrap();
    (ledger, fencing, pool, id)
}

#[tokio::test]
async fn database_constraints_hold_even_if_application_code_is_wrong() {
    let (mut ledger, fencing, pool, id) = with_an_open_reservation().await;
    // Each attempt with the refusal it must get: SQLSTATE, and the rule's name or its message.
    // A refusal for another reason (a typo, a missing privilege, another rule) fails the test.
    let attempts = [
        (
            "UPDATE budget_windows SET committed_nano_usd = committed_nano_usd + 1".to_owned(),
            ("23000", "money changes only through ledger_entries"),
        ),
        (
            // A journal entry, for the open reservation, that would overspend.
            format!("INSERT INTO ledger_entries (tenant_id, budget_id, window_start, reservation_id, kind, committed_delta) SELECT tenant_id, budget_id, window_start, '{id}', 'commit', 991 FROM budget_windows WHERE budget_id = 'run'"),
            ("23514", "budget_windows_no_overspend"),
        ),
        (
            format!("INSERT INTO ledger_entries (tenant_id, budget_id, window_start, reservation_id, kind, reserved_delta) SELECT tenant_id, budget_id, window_start, '{id}', 'release', -11 FROM budget_windows WHERE budget_id = 'run'"),
            ("23514", "budget_windows_reserved_nano_usd_check"),
        ),
        (
            // An entry for a reservation that does not exist.
            format!("INSERT INTO ledger_entries (tenant_id, budget_id, window_start, reservation_id, kind, reserved_delta) SELECT tenant_id, budget_id, window_start, '{}', 'reserve', 1 FROM budget_windows WHERE budget_id = 'run'", uuid::Uuid::new_v4()),
            ("23503", "journal entry for an unknown reservation"),
        ),
        // History rewritten.
        ("DELETE FROM ledger_entries".to_owned(), ("23000", "ledger_entries is append-only")),
        (
            "UPDATE audit_outbox SET event_type = 'x'".to_owned(),
            ("23000", "audit_outbox is append-only"),
        ),
        (
            "UPDATE fencing_scopes SET epoch = epoch + 5".to_owned(),
            ("23000", "may only rise by one"),
        ),
        (
            "UPDATE fencing_scopes SET owner_workload_id = 'thief'".to_owned(),
            ("23000", "changes hands only with a new epoch"),
        ),
        (
            // A lease extended without its history row (checked at COMMIT).
            "UPDATE fencing_scopes SET expires_at = expires_at + interval '1 hour'".to_owned(),
            ("23000", "without its history row"),
        ),
        (
            // Set to the expiry its acquire recorded: only a row of this transaction counts.
            "UPDATE fencing_scopes f SET expires_at = (SELECT e.expires_at FROM fencing_scope_events e
                WHERE e.scope_id = f.scope_id ORDER BY e.event_id LIMIT 1)"
                .to_owned(),
            ("23000", "without its history row"),
        ),
        (
            // A history row that does not name the change: another expiry.
            "WITH moved AS (UPDATE fencing_scopes SET expires_at = expires_at + interval '1 hour' RETURNING *)
             INSERT INTO fencing_scope_events (scope_id, tenant_id, workload_instance_id, outcome, previous_epoch, epoch, expires_at)
             SELECT scope_id, tenant_id, owner_workload_id, 'renewed', epoch, epoch, expires_at - interval '1 second' FROM moved".to_owned(),
            ("23000", "without its history row"),
        ),
        (
            // A sequence nobody allocated, on a copy of a signed event.
            "INSERT INTO audit_outbox (producer_instance_id, producer_sequence, tenant_id, event_type, occurred_at, canonical_event, event_sha256, signing_key_id, signing_algorithm, signed_at, signature, signature_inclusion) SELECT producer_instance_id, producer_sequence + 1000, tenant_id, event_type, occurred_at, canonical_event, event_sha256, signing_key_id, signing_algorithm, signed_at, signature, signature_inclusion FROM audit_outbox LIMIT 1".to_owned(),
            ("23000", "sequence was not allocated from its producer"),
        ),
    ];
    for (sql, (code, rule)) in &attempts {
        let refused = refusal(&pool, sql).await;
        assert!(
            refused.is(code, rule),
            "{sql}: {refused:?}, not {code} {rule}"
        );
    }
    // Resolving twice is refused by the trigger.
    sqlx::query("UPDATE reservations SET state = 'released', resolved_at = now(), committed_nano_usd = 0, released_nano_usd = amount_nano_usd WHERE reservation_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    for sql in [
        format!(
            "UPDATE reservations SET state = 'committed', committed_nano_usd = amount_nano_usd, released_nano_usd = 0 WHERE reservation_id = '{id}'"
        ),
        format!("UPDATE reservations SET state = 'expired' WHERE reservation_id = '{id}'"),
    ] {
        let refused = refusal(&pool, &sql).await;
        assert!(
            refused.is("23000", &format!("reservation {id} is already released")),
            "{sql}: {refused:?}"
        );
    }
    // An expired row takes its late usage once (with the committing epoch), and nothing else.
    let expired = reserved(
        ledger
            .client
            .reserve_set({
                let mut request = reserve_request(T, "lapses", &["run"], 10, &fencing);
                request.ttl_ms = 1_000;
                request
            })
            .await
            .unwrap()
            .into_inner(),
    );
    let expired = uuid::Uuid::parse_str(&expired.reservation_id).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    ledger
        .client
        .sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 10,
        })
        .await
        .unwrap();
    let late =
        |set: &str| format!("UPDATE reservations SET {set} WHERE reservation_id = '{expired}'");
    let already_expired = format!("reservation {expired} is already expired");
    for wrong in [
        // No committing epoch: it would still read as a plain expiry.
        "actual_nano_usd = 5, overrun_nano_usd = 5",
        // Usage that is not all overrun.
        "actual_nano_usd = 5, overrun_nano_usd = 4, resolved_epoch = 1",
        // Money moved on the row.
        "actual_nano_usd = 5, overrun_nano_usd = 5, resolved_epoch = 1, released_nano_usd = 0, committed_nano_usd = 10",
    ] {
        let refused = refusal(&pool, &late(wrong)).await;
        assert!(
            refused.is("23000", &already_expired),
            "{wrong}: {refused:?}"
        );
    }
    let once = late("actual_nano_usd = 5, overrun_nano_usd = 5, resolved_epoch = 1");
    sqlx::query(sqlx::AssertSqlSafe(once))
        .execute(&pool)
        .await
        .expect("a late usage, once");
    let twice = late("actual_nano_usd = 6, overrun_nano_usd = 6, resolved_epoch = 1");
    let refused = refusal(&pool, &twice).await;
    assert!(
        refused.is("23000", &already_expired),
        "and never twice: {refused:?}"
    );
}

/// Fencing held by the database (migration 20261128000001), as money is: after a takeover, a
/// reservation created or resolved under the old owner's epoch is refused even when it reaches
/// the tables without the planner (whose FENCING_EPOCH_STALE comes first); under the new
/// owner's epoch the same statements are written.
#[tokio::test]
async fn the_database_refuses_reservations_written_under_a_stale_epoch() {
    let (mut ledger, fencing, pool, id) = with_an_open_reservation().await;
    let takeover = force_takeover(&mut ledger.client, T, &fencing)
        .await
        .unwrap();
    let (old, new) = (fencing.epoch, takeover.epoch);
    // A copy of the open reservation under another key, with its reserve entry.
    let create = |key: &str, epoch: u64| {
        format!(
            "WITH created AS (
                 INSERT INTO reservations (reservation_id, tenant_id, idempotency_key, request_sha256,
                                           budget_ids, window_starts, amount_nano_usd, fencing_scope_id,
                                           fencing_epoch, created_at, expires_at)
                 SELECT gen_random_uuid(), tenant_id, '{key}', request_sha256, budget_ids, window_starts,
                        amount_nano_usd, fencing_scope_id, {epoch}, now(), now() + interval '1 hour'
                   FROM reservations WHERE reservation_id = '{id}'
                 RETURNING reservation_id, amount_nano_usd)
             INSERT INTO ledger_entries (tenant_id, budget_id, window_start, reservation_id, kind, reserved_delta)
             SELECT w.tenant_id, w.budget_id, w.window_start, c.reservation_id, 'reserve', c.amount_nano_usd
               FROM budget_windows w, created c WHERE w.budget_id = 'run'"
        )
    };
    // The open reservation released, with its release entry.
    let release = |epoch: u64| {
        format!(
            "WITH released AS (
                 UPDATE reservations SET state = 'released', resolved_at = now(), resolved_epoch = {epoch},
                        committed_nano_usd = 0, released_nano_usd = amount_nano_usd
                  WHERE reservation_id = '{id}' RETURNING amount_nano_usd)
             INSERT INTO ledger_entries (tenant_id, budget_id, window_start, reservation_id, kind, reserved_delta)
             SELECT w.tenant_id, w.budget_id, w.window_start, '{id}', 'release', -r.amount_nano_usd
               FROM budget_windows w, released r WHERE w.budget_id = 'run'"
        )
    };
    // The same trigger still names a reservation of an unknown tenant as such.
    let unknown_tenant = create("of-nobody", new).replacen(
        "SELECT gen_random_uuid(), tenant_id,",
        "SELECT gen_random_uuid(), 'tenant-nobody',",
        1,
    );
    for (sql, (code, rule)) in [
        (
            create("by-the-old-owner", old),
            ("23000", "created under an epoch"),
        ),
        (
            create("never-issued", new + 1),
            ("23000", "created under an epoch"),
        ),
        (release(old), ("23000", "resolved under an epoch")),
        (
            unknown_tenant,
            ("23503", "reservation for an unknown tenant"),
        ),
    ] {
        let refused = refusal(&pool, &sql).await;
        assert!(refused.is(code, rule), "{sql}: {refused:?}");
    }
    for sql in [create("by-the-new-owner", new), release(new)] {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let balance = ledger.balance(T, "run").await.unwrap();
    assert_eq!(
        balance.reserved_nano_usd, 10,
        "the new one holds, the old one went back"
    );
}

/// The row rules of reservations, the journal and the outbox (checked by triggers since
/// migration 20261127400001, by CHECK constraints before): each one, broken alone on a row that
/// otherwise passes, is refused on insert with check_violation naming it; some reservation
/// rules on update too, and under `session_replication_role = replica`, where ordinary triggers
/// do not fire.
#[tokio::test]
async fn every_row_rule_is_refused_by_the_database_under_its_name() {
    let (_ledger, _, pool, id) = with_an_open_reservation().await;
    let refused_as = |sql: String, rule: &'static str| {
        let pool = pool.clone();
        async move {
            let error = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&pool)
                .await
                .expect_err(&format!("the database accepted: {sql}"));
            let database = error
                .as_database_error()
                .unwrap()
                .downcast_ref::<sqlx::postgres::PgDatabaseError>();
            // Each rule is named after its table, as the CHECKs were.
            let table = ["reservations", "ledger_entries", "audit_outbox"]
                .into_iter()
                .find(|t| rule.starts_with(t));
            assert_eq!(
                (
                    database.code(),
                    database.constraint(),
                    database.schema(),
                    database.table()
                ),
                ("23514", Some(rule), Some("public"), table),
                "{sql}: {error}"
            );
        }
    };
    // A copy of the open reservation under a new id and key, with some columns replaced.
    const COLUMNS: [&str; 19] = [
        "tenant_id",
        "request_sha256",
        "budget_ids",
        "window_starts",
        "amount_nano_usd",
        "fencing_scope_id",
        "fencing_epoch",
        "created_at",
        "expires_at",
        "state",
        "resolved_at",
        "resolved_epoch",
        "actual_nano_usd",
        "committed_nano_usd",
        "released_nano_usd",
        "overrun_nano_usd",
        "is_credit",
        "drawn_nano_usd",
        "drawn_from_reservation_id",
    ];
    let copy = |replaced: &[(&str, &str)]| {
        let values: Vec<String> = COLUMNS
            .iter()
            .map(|column| {
                replaced
                    .iter()
                    .find(|(c, _)| c == column)
                    .map_or_else(|| (*column).to_owned(), |(_, v)| (*v).to_owned())
            })
            .collect();
        format!(
            "INSERT INTO reservations (reservation_id, idempotency_key, {})
             SELECT gen_random_uuid(), gen_random_uuid()::text, {} FROM reservations
              WHERE reservation_id = '{id}'",
            COLUMNS.join(", "),
            values.join(", ")
        )
    };
    // The copy itself passes: each case below fails on its own change.
    sqlx::query(sqlx::AssertSqlSafe(copy(&[])))
        .execute(&pool)
        .await
        .unwrap();
    let resolved = |committed: &'static str, released: &'static str| {
        [
            ("state", "'committed'"),
            ("resolved_at", "now()"),
            ("committed_nano_usd", committed),
            ("released_nano_usd", released),
        ]
    };
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("budget_ids", "'{}'"), ("window_starts", "'{}'")],
            "reservations_budget_ids_check",
        ),
        (
            vec![
                ("budget_ids", "array_fill('run'::text, ARRAY[9])"),
                ("window_starts", "array_fill(now(), ARRAY[9])"),
            ],
            "reservations_budget_ids_check",
        ),
        (
            vec![("window_starts", "window_starts || now()")],
            "reservations_one_window_per_budget",
        ),
        (
            vec![("amount_nano_usd", "0")],
            "reservations_amount_nano_usd_check",
        ),
        (
            vec![("amount_nano_usd", "1000000000000000001")],
            "reservations_amount_nano_usd_check",
        ),
        (
            vec![("fencing_epoch", "0")],
            "reservations_fencing_epoch_check",
        ),
        (
            vec![("expires_at", "created_at")],
            "reservations_expires_after_created",
        ),
        (
            vec![
                ("state", "'lost'"),
                ("resolved_at", "now()"),
                ("committed_nano_usd", "0"),
                ("released_nano_usd", "amount_nano_usd"),
            ],
            "reservations_state_check",
        ),
        (
            vec![("actual_nano_usd", "-1")],
            "reservations_actual_nano_usd_check",
        ),
        (
            resolved("-1", "amount_nano_usd + 1").to_vec(),
            "reservations_committed_nano_usd_check",
        ),
        (
            resolved("amount_nano_usd + 1", "-1").to_vec(),
            "reservations_released_nano_usd_check",
        ),
        (
            vec![("overrun_nano_usd", "-1")],
            "reservations_overrun_nano_usd_check",
        ),
        (
            resolved("1", "1").to_vec(),
            "reservations_resolution_complete",
        ),
        (
            vec![("resolved_at", "now()")],
            "reservations_resolution_complete",
        ),
        (
            vec![
                ("state", "'released'"),
                ("committed_nano_usd", "0"),
                ("released_nano_usd", "amount_nano_usd"),
            ],
            "reservations_resolution_complete",
        ),
        (
            vec![("is_credit", "true"), ("drawn_nano_usd", "-1")],
            "reservations_drawn_within_amount",
        ),
        (
            vec![
                ("is_credit", "true"),
                ("drawn_nano_usd", "amount_nano_usd + 1"),
            ],
            "reservations_drawn_within_amount",
        ),
        (
            vec![("drawn_nano_usd", "1")],
            "reservations_only_credits_are_drawn",
        ),
        (
            vec![
                ("is_credit", "true"),
                ("drawn_from_reservation_id", "reservation_id"),
            ],
            "reservations_credits_are_not_drawn_from_credits",
        ),
        (
            [
                resolved("amount_nano_usd", "0").to_vec(),
                vec![("is_credit", "true")],
            ]
            .concat(),
            "reservations_credits_are_never_committed",
        ),
    ];
    for (replaced, rule) in cases {
        refused_as(copy(&replaced), rule).await;
    }
    // On update too: the open reservation resolved with a negative commit, without accounting
    // for its amount, or into an unknown state.
    for (set, rule) in [
        (
            "state = 'committed', resolved_at = now(), actual_nano_usd = 0,
             committed_nano_usd = -1, released_nano_usd = amount_nano_usd + 1",
            "reservations_committed_nano_usd_check",
        ),
        (
            "state = 'committed', resolved_at = now(), actual_nano_usd = 1,
             committed_nano_usd = 1, released_nano_usd = 1",
            "reservations_resolution_complete",
        ),
        (
            "state = 'lost', resolved_at = now(), committed_nano_usd = 0,
             released_nano_usd = amount_nano_usd",
            "reservations_state_check",
        ),
    ] {
        refused_as(
            format!("UPDATE reservations SET {set} WHERE reservation_id = '{id}'"),
            rule,
        )
        .await;
    }
    // The reservation rules judge the row as stored: they are the last BEFORE row trigger (by
    // name, PostgreSQL's order), and fire even where ordinary triggers do not.
    let before_row_triggers: Vec<(String, String)> = sqlx::query_as(
        "SELECT tgname::text, tgenabled::text FROM pg_trigger
          WHERE tgrelid = 'reservations'::regclass AND NOT tgisinternal
            AND tgtype & 3 = 3 -- FOR EACH ROW, BEFORE
          ORDER BY tgname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        before_row_triggers.last(),
        Some(&("reservations_row_rules".to_owned(), "A".to_owned())),
        "{before_row_triggers:?}"
    );
    let mut replica = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *replica)
        .await
        .unwrap();
    let error = sqlx::query(sqlx::AssertSqlSafe(copy(&[("fencing_epoch", "0")])))
        .execute(&mut *replica)
        .await
        .expect_err("the rules hold under session_replication_role = replica");
    assert_eq!(
        error.as_database_error().and_then(|e| e.constraint()),
        Some("reservations_fencing_epoch_check")
    );
    drop(replica);
    // The journal: an unknown kind, and a money entry naming no reservation.
    let entry = |kind: &str, reservation: &str| {
        format!(
            "INSERT INTO ledger_entries (tenant_id, budget_id, window_start, reservation_id, kind)
             SELECT tenant_id, budget_id, window_start, {reservation}, '{kind}'
               FROM budget_windows WHERE budget_id = 'run'"
        )
    };
    refused_as(
        entry("bonus", &format!("'{id}'::uuid")),
        "ledger_entries_kind_check",
    )
    .await;
    refused_as(
        entry("reserve", "NULL"),
        "ledger_entries_reservation_matches_kind",
    )
    .await;
    refused_as(
        entry("limit_set", &format!("'{id}'::uuid")),
        "ledger_entries_reservation_matches_kind",
    )
    .await;
    // The outbox: a sequence below 1 and a digest that is not 32 bytes (the signature rules are
    // `every_audit_event_is_signed_by_a_registered_key`'s cases). The second row's sequence was
    // never allocated either: the row rule is refused first, as the CHECK was.
    for (sequence, digest, rule) in [
        ("0", "event_sha256", "audit_outbox_producer_sequence_check"),
        (
            "producer_sequence + 1000000",
            "'\\x00'::bytea",
            "audit_outbox_event_sha256_check",
        ),
    ] {
        refused_as(
            format!(
                "INSERT INTO audit_outbox (producer_instance_id, producer_sequence, tenant_id,
                                           event_type, occurred_at, canonical_event, event_sha256)
                 SELECT producer_instance_id, {sequence}, tenant_id, event_type, occurred_at,
                        canonical_event, {digest}
                   FROM audit_outbox ORDER BY producer_sequence LIMIT 1"
            ),
            rule,
        )
        .await;
    }
}

/// RFC 8032 test vector public keys (valid, not small-order).
const ED25519_KEY_1: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
const ED25519_KEY_2: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";

fn signing_key_request(key_id: &str, public_key_hex: &str) -> pb::RegisterSigningKeyRequest {
    pb::RegisterSigningKeyRequest {
        key_id: key_id.into(),
        algorithm: "ed25519".into(),
        public_key: hex::decode(public_key_hex).unwrap(),
        valid_from_unix_ms: 1_767_225_600_000,
        // 2100-01-01: far enough that tests changing the window never meet an ended one.
        valid_until_unix_ms: 4_102_444_800_000,
        revoked_at_unix_ms: 0,
    }
}

/// The tenant and type of every audit event about `key_id` (not the ledger's own key's).
async fn signing_key_events(ledger: &TestLedger, key_id: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT tenant_id, event_type FROM audit_outbox
          WHERE event_type LIKE 'signing_key.%'
            AND convert_from(canonical_event, 'UTF8')::jsonb -> 'data' ->> 'key_id' = $1
          ORDER BY producer_sequence",
    )
    .bind(key_id)
    .fetch_all(ledger.store().pool())
    .await
    .unwrap()
}

/// Another ledger on the database of `database_url` (the owner's), as `instance`, signing with
/// the Ed25519 key of `seed`: the same key every start with the same seed.
async fn start_keyed(
    database_url: String,
    instance: &'static str,
    seed: [u8; 32],
) -> Result<spendguard_ledger::RunningLedger, spendguard_ledger::error::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    spendguard_ledger::start(
        &spendguard_testkit::postgres::runtime_url(&database_url),
        instance,
        &spendguard_ledger::LedgerTuning::default(),
        spendguard_testkit::signing::signing_with_seed(seed, instance),
        listener,
        control,
        &mut prometheus_client::registry::Registry::default(),
    )
    .await
}

#[tokio::test]
async fn a_ledger_publishes_its_own_key_once_with_signed_evidence() {
    // Goal: a key enters the registry only with an audit event (S7: a rotation is itself
    // audited), also the key a ledger publishes for itself at start; a restart with a key the
    // registry holds writes nothing.
    let (ledger, _) = setup().await;
    let start_as = |instance: &'static str, seed: [u8; 32]| {
        let started = start_keyed(ledger.database_url.clone(), instance, seed);
        async move { started.await.unwrap() }
    };
    let start = || start_as("ledger-rotated", [9; 32]);
    let pool = ledger.store().pool();
    // (key id, signing key id, producer) of every registration event.
    let registrations = || async {
        let rows: Vec<(Vec<u8>, Option<String>, String)> = sqlx::query_as(
            "SELECT canonical_event, signing_key_id, producer_instance_id FROM audit_outbox
              WHERE event_type = 'signing_key.registered' ORDER BY producer_instance_id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(bytes, signed_by, producer)| {
                let event: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let key_id = event["data"]["key_id"].as_str().unwrap().to_owned();
                (key_id, signed_by.unwrap(), producer)
            })
            .collect::<Vec<_>>()
    };
    let keys = || async {
        sqlx::query_scalar::<_, String>("SELECT key_id FROM signing_keys ORDER BY key_id")
            .fetch_all(pool)
            .await
            .unwrap()
    };
    // The first ledger's key (`setup`): one event, signed by the key it registers.
    let first = registrations().await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].0, first[0].1);
    assert_eq!(keys().await, [first[0].0.clone()]);

    let rotated = start().await;
    let after = registrations().await;
    assert_eq!(after.len(), 2, "{after:?}");
    let new = after.iter().find(|r| r.2 == "ledger-rotated").unwrap();
    assert_eq!(new.0, new.1, "signed by the key it registers");
    let mut expected = vec![first[0].0.clone(), new.0.clone()];
    expected.sort();
    assert_eq!(
        keys().await,
        expected,
        "every key in the registry has its event"
    );

    rotated.shutdown().await;
    let restarted = start().await;
    assert_eq!(
        registrations().await,
        after,
        "a known key is not published again"
    );
    restarted.shutdown().await;

    // Two replicas sharing a new key start together. Inserts into the registry wait behind a
    // table lock until both have found the key missing and tried to publish it: one insert
    // wins, the other's is a unique violation, and that replica accepts the winner's row.
    let mut blocker = ledger.owner.begin().await.unwrap();
    sqlx::query("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let a = tokio::spawn(start_as("ledger-a", [5; 32]));
    let b = tokio::spawn(start_as("ledger-b", [5; 32]));
    await_ledger_lock_waits(&ledger.owner, 2).await;
    blocker.commit().await.unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let shared = registrations().await;
    assert_eq!(shared.len(), 3, "one event for the shared key: {shared:?}");
    assert_eq!(keys().await.len(), 3);
    a.shutdown().await;
    b.shutdown().await;
    invariants::check(pool).await.unwrap();
}

#[tokio::test]
async fn a_revoked_ledger_key_signs_nothing_more_and_does_not_start_again() {
    // Goal: a ledger whose own signing key is revoked in the registry signs nothing more (what
    // it signed after the revocation would be quarantined at ingest: money moved without
    // evidence that can be chained), and a ledger does not start with a revoked key. Method: a
    // second ledger on the same database with a fixed key; the key revoked through the control
    // listener; its next ReserveSet is SIGNING_UNAVAILABLE and writes nothing; a third start
    // with that key fails. Then a fourth ledger, whose key is revoked in the registry behind its
    // back (as through another replica), stops signing once it reads the registry again.
    let (ledger, fencing) = setup().await;
    let start = |instance: &'static str, seed: [u8; 32]| {
        start_keyed(ledger.database_url.clone(), instance, seed)
    };
    let second = start("ledger-keyed", [7; 32]).await.unwrap();
    let mut data = spendguard_testkit::ledger::connect(second.addr)
        .await
        .unwrap();
    let mut control = spendguard_testkit::ledger::connect(second.control_addr)
        .await
        .unwrap();
    let reserve = |key: &str| reserve_request(T, key, &["run"], 10, &fencing);
    reserved(
        data.reserve_set(reserve("signed"))
            .await
            .unwrap()
            .into_inner(),
    );
    let pool = ledger.store().pool();
    let (key_id, public_key, valid_from): (String, Vec<u8>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT s.key_id, s.public_key, s.valid_from FROM signing_keys s
               JOIN audit_outbox o ON o.signing_key_id = s.key_id
              WHERE o.producer_instance_id = 'ledger-keyed' LIMIT 1",
        )
        .fetch_one(pool)
        .await
        .unwrap();
    control
        .register_signing_key(pb::RegisterSigningKeyRequest {
            key_id: key_id.clone(),
            algorithm: "ed25519".into(),
            public_key,
            valid_from_unix_ms: valid_from.timestamp_millis(),
            valid_until_unix_ms: 0,
            revoked_at_unix_ms: chrono::Utc::now().timestamp_millis(),
        })
        .await
        .unwrap();
    let events = outbox_count(&ledger).await;
    let refused = data.reserve_set(reserve("after")).await.unwrap_err();
    assert_eq!(code(&refused), pb::ErrorCode::SigningUnavailable);
    assert!(refused.message().contains("revoked"), "{refused:?}");
    assert_eq!(outbox_count(&ledger).await, events, "nothing written");
    let again = start("ledger-keyed-again", [7; 32]).await;
    let Err(error) = again else {
        panic!("a ledger started with a revoked key");
    };
    assert!(error.to_string().contains("revoked"), "{error}");

    let watched = start("ledger-watched", [8; 32]).await.unwrap();
    let mut data = spendguard_testkit::ledger::connect(watched.addr)
        .await
        .unwrap();
    reserved(
        data.reserve_set(reserve("w-signed"))
            .await
            .unwrap()
            .into_inner(),
    );
    sqlx::query(
        "UPDATE signing_keys SET revoked_at = now() WHERE key_id IN
           (SELECT signing_key_id FROM audit_outbox WHERE producer_instance_id = 'ledger-watched')",
    )
    .execute(pool)
    .await
    .unwrap();
    let mut refused = None;
    for attempt in 0..50 {
        match data.reserve_set(reserve(&format!("w-{attempt}"))).await {
            Err(status) => {
                refused = Some(status);
                break;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let refused = refused.expect("refused once the registry was read again");
    assert_eq!(code(&refused), pb::ErrorCode::SigningUnavailable);
    invariants::check(pool).await.unwrap();
}

#[tokio::test]
async fn signing_keys_register_revoke_and_never_un_revoke() {
    let (mut ledger, _fencing) = setup().await;
    let key_id = "ed25519:feed0000cafe0001";
    let request = signing_key_request(key_id, ED25519_KEY_1);

    // Register: a row, one audit event under the system tenant.
    let first = ledger
        .client
        .register_signing_key(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created && first.changed);
    let row: (String, Vec<u8>, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "SELECT algorithm, public_key, revoked_at FROM signing_keys WHERE key_id = $1",
    )
    .bind(key_id)
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(row.0, "ed25519");
    assert_eq!(row.1, hex::decode(ED25519_KEY_1).unwrap());
    assert!(row.2.is_none());
    assert_eq!(
        signing_key_events(&ledger, key_id).await,
        vec![("spendguard-system".into(), "signing_key.registered".into())]
    );

    // An identical repeat writes nothing.
    let before = outbox_count(&ledger).await;
    let again = ledger
        .client
        .register_signing_key(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created && !again.changed);
    assert_eq!(outbox_count(&ledger).await, before);

    // Another key, algorithm or start under the same id is refused.
    let other_key = signing_key_request(key_id, ED25519_KEY_2);
    let err = ledger
        .client
        .register_signing_key(other_key)
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::SigningKeyConflict);
    let mut other_start = request.clone();
    other_start.valid_from_unix_ms += 1;
    let err = ledger
        .client
        .register_signing_key(other_start)
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::SigningKeyConflict);
    assert_eq!(outbox_count(&ledger).await, before);

    // Invalid input is refused before the writer.
    let mut bad_key = signing_key_request("ed25519:bad", ED25519_KEY_1);
    bad_key.public_key.truncate(31);
    let err = ledger
        .client
        .register_signing_key(bad_key)
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::InvalidArgument);
    let mut bad_algorithm = signing_key_request("ed25519:bad", ED25519_KEY_1);
    bad_algorithm.algorithm = "rsa".into();
    let err = ledger
        .client
        .register_signing_key(bad_algorithm)
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::InvalidArgument);
    let err = ledger
        .client
        .register_signing_key(signing_key_request(&"k".repeat(129), ED25519_KEY_1))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::IdMalformed);

    // Shortening the window is audited.
    let mut shorter = request.clone();
    shorter.valid_until_unix_ms -= 1_000;
    let changed = ledger
        .client
        .register_signing_key(shorter.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!changed.created && changed.changed);

    // Revoke, then move the revocation earlier; both audited.
    let mut revoked = shorter.clone();
    revoked.revoked_at_unix_ms = 1_780_000_000_000;
    assert!(
        ledger
            .client
            .register_signing_key(revoked.clone())
            .await
            .unwrap()
            .into_inner()
            .changed
    );
    let mut earlier = revoked.clone();
    earlier.revoked_at_unix_ms -= 60_000;
    assert!(
        ledger
            .client
            .register_signing_key(earlier.clone())
            .await
            .unwrap()
            .into_inner()
            .changed
    );

    // Clearing or postponing the revocation is refused and writes nothing.
    let before = outbox_count(&ledger).await;
    for revoked_at in [0, earlier.revoked_at_unix_ms + 1] {
        let mut undo = earlier.clone();
        undo.revoked_at_unix_ms = revoked_at;
        let err = ledger.client.register_signing_key(undo).await.unwrap_err();
        assert_eq!(code(&err), pb::ErrorCode::SigningKeyRevocationIrreversible);
    }
    assert_eq!(outbox_count(&ledger).await, before);
    let revoked_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT revoked_at FROM signing_keys WHERE key_id = $1")
            .bind(key_id)
            .fetch_one(ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(revoked_at.timestamp_millis(), earlier.revoked_at_unix_ms);

    let types: Vec<String> = signing_key_events(&ledger, key_id)
        .await
        .into_iter()
        .map(|(tenant, event_type)| {
            assert_eq!(tenant, "spendguard-system");
            event_type
        })
        .collect();
    assert_eq!(
        types,
        [
            "signing_key.registered",
            "signing_key.window_changed",
            "signing_key.revoked",
            "signing_key.revoked"
        ]
    );

    // The system tenant id cannot be created as a customer tenant.
    let err = ledger
        .client
        .upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: "spendguard-system".into(),
            display_name: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::IdMalformed);
}

#[tokio::test]
async fn a_reserve_retried_after_a_restart_replays_and_a_stale_or_foreign_retry_does_not() {
    // Goal: the epoch authorises a ReserveSet but is not part of what it asks, so the sidecar
    // that restarted (same workload, the scope's next epoch) gets its reservation back; the
    // pre-restart epoch is still fenced off, and another scope using the key conflicts.
    let (mut ledger, fencing) = setup().await;
    let request = reserve_request(T, "restart-key", &["run"], 250, &fencing);
    let first = reserved(
        ledger
            .client
            .reserve_set(request.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    let restarted = ledger
        .client
        .acquire_fencing_lease(lease_for(&fencing.scope_id, "tenant-a-w"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restarted.epoch, fencing.epoch + 1);
    let current = pb::FencingToken {
        scope_id: fencing.scope_id.clone(),
        epoch: restarted.epoch,
    };
    let events = outbox_count(&ledger).await;

    let mut retry = request.clone();
    retry.fencing = Some(current.clone());
    let replay = ledger.client.reserve_set(retry).await.unwrap().into_inner();
    assert!(replay.replayed);
    assert_eq!(reserved(replay).reservation_id, first.reservation_id);
    assert_eq!(
        outbox_count(&ledger).await,
        events,
        "a replay writes nothing"
    );
    assert_eq!(balance(&mut ledger, "run").await.reserved_nano_usd, 250);

    let stale = ledger
        .client
        .reserve_set(request.clone())
        .await
        .unwrap_err();
    assert_eq!(code(&stale), pb::ErrorCode::FencingEpochStale);

    let other = ledger
        .client
        .acquire_fencing_lease(lease_for("tenant-a-other-scope", "tenant-a-other-w"))
        .await
        .unwrap()
        .into_inner();
    let mut foreign = request;
    foreign.fencing = Some(pb::FencingToken {
        scope_id: "tenant-a-other-scope".into(),
        epoch: other.epoch,
    });
    let events = outbox_count(&ledger).await;
    let conflict = ledger.client.reserve_set(foreign).await.unwrap_err();
    assert_eq!(code(&conflict), pb::ErrorCode::IdempotencyConflict);
    assert_eq!(outbox_count(&ledger).await, events);

    let committed = ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: first.reservation_id,
            actual_nano_usd: 100,
            fencing: Some(current),
            deferrable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.committed_nano_usd, 100);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_reservation_written_before_the_fingerprint_change_still_replays() {
    // Goal: rows written by ledgers before 2026-11-26 hold a fingerprint of the whole request,
    // fencing epoch included; a retry of such a reservation, under its epoch or the scope's
    // next one, replays (as for new rows), and another scope's use of the key still conflicts.
    // Method: reserve, rewrite the row's fingerprint to the old form (with the identity trigger
    // off for that one statement, as an old ledger would have written it), then retry through a
    // second ledger on the database, whose cache never saw the row.
    let (ledger, fencing) = setup().await;
    let mut client = ledger.client.clone();
    let request = reserve_request(T, "old-row", &["run"], 250, &fencing);
    let first = reserved(
        client
            .reserve_set(request.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    let old = spendguard_ledger::convert::reserve_set(&request)
        .unwrap()
        .fingerprint_before_2026_11_26(fencing.epoch);
    let mut tx = ledger.owner.begin().await.unwrap();
    sqlx::query("ALTER TABLE reservations DISABLE TRIGGER reservations_resolve_once")
        .execute(&mut *tx)
        .await
        .unwrap();
    let rewritten =
        sqlx::query("UPDATE reservations SET request_sha256 = $1 WHERE reservation_id = $2::uuid")
            .bind(&old)
            .bind(&first.reservation_id)
            .execute(&mut *tx)
            .await
            .unwrap();
    assert_eq!(rewritten.rows_affected(), 1);
    sqlx::query("ALTER TABLE reservations ENABLE TRIGGER reservations_resolve_once")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut other = TestLedger::start_on(&ledger.database_url, "ledger-1")
        .await
        .unwrap();
    let events = outbox_count(&other).await;
    let same_epoch = other.client.reserve_set(request.clone()).await.unwrap();
    assert!(same_epoch.get_ref().replayed);
    assert_eq!(
        reserved(same_epoch.into_inner()).reservation_id,
        first.reservation_id
    );
    let restarted = other
        .client
        .acquire_fencing_lease(lease_for(&fencing.scope_id, "tenant-a-w"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        restarted.epoch,
        fencing.epoch + 1,
        "a restart takes the next epoch"
    );
    let last: (String, i64, i64) = sqlx::query_as(
        "SELECT outcome, previous_epoch, epoch FROM fencing_scope_events
          WHERE scope_id = $1 ORDER BY event_id DESC LIMIT 1",
    )
    .bind(&fencing.scope_id)
    .fetch_one(other.store().pool())
    .await
    .unwrap();
    let epoch = i64::try_from(fencing.epoch).unwrap();
    assert_eq!(
        last,
        ("restarted".to_owned(), epoch, epoch + 1),
        "the restart is in the scope's history"
    );
    let mut next_epoch = request.clone();
    next_epoch.fencing = Some(pb::FencingToken {
        scope_id: fencing.scope_id.clone(),
        epoch: restarted.epoch,
    });
    let events = events + 1; // the lease's own event
    let replay = other.client.reserve_set(next_epoch.clone()).await.unwrap();
    assert!(replay.get_ref().replayed);
    assert_eq!(outbox_count(&other).await, events, "replays write nothing");
    let mut changed = next_epoch;
    changed.amount_nano_usd = 251;
    let conflict = other.client.reserve_set(changed).await.unwrap_err();
    assert_eq!(code(&conflict), pb::ErrorCode::IdempotencyConflict);
    invariants::check(other.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_stuck_database_is_overloaded_at_once_and_unavailable_at_its_lock_timeout() {
    // Goal: OVERLOADED and DEPENDENCY_UNAVAILABLE through the RPCs, writing nothing. Method: a
    // ledger whose queue holds one command; its budget windows locked away by another session;
    // 32 concurrent ReserveSets. Those the writer holds wait for the lock and get
    // DEPENDENCY_UNAVAILABLE at its lock timeout (2 s); the rest, past the full queue, get
    // OVERLOADED at once. Once the lock is gone nothing was reserved and a ReserveSet goes
    // through.
    let tuning = spendguard_testkit::ledger::LedgerTuning {
        queue_capacity: 1,
        ..Default::default()
    };
    let mut ledger = TestLedger::start_with(&tuning).await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "run", 1_000_000).await.unwrap();
    let events = outbox_count(&ledger).await;
    let pool = ledger.owner.clone();
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE budget_windows IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let attempts: Vec<_> = (0..32)
        .map(|n| {
            let (mut client, fencing) = (ledger.client.clone(), fencing.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let request = reserve_request(T, &format!("stuck-{n}"), &["run"], 100, &fencing);
                let answer = client.reserve_set(request).await;
                (answer, started.elapsed())
            })
        })
        .collect();
    let mut by_code = std::collections::BTreeMap::<&str, Vec<std::time::Duration>>::new();
    for attempt in attempts {
        let (answer, took) = attempt.await.unwrap();
        let status = answer.expect_err("nothing goes through a locked database");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        by_code
            .entry(code(&status).as_str_name())
            .or_default()
            .push(took);
    }
    locker.rollback().await.unwrap();
    let overloaded = by_code.remove("ERROR_CODE_OVERLOADED").unwrap_or_default();
    let unavailable = by_code
        .remove("ERROR_CODE_DEPENDENCY_UNAVAILABLE")
        .unwrap_or_default();
    assert!(by_code.is_empty(), "only those two codes: {by_code:?}");
    assert!(!overloaded.is_empty() && !unavailable.is_empty());
    assert!(
        overloaded
            .iter()
            .all(|took| *took < std::time::Duration::from_millis(1_500)),
        "refused without waiting for the lock: {overloaded:?}"
    );
    assert!(
        unavailable
            .iter()
            .all(|took| *took >= std::time::Duration::from_millis(1_500)),
        "waited for the lock: {unavailable:?}"
    );
    let reserved: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(reserved, 0);
    assert_eq!(outbox_count(&ledger).await, events, "nothing written");
    ledger
        .client
        .reserve_set(reserve_request(T, "after", &["run"], 100, &fencing))
        .await
        .expect("served again once the database is");
    invariants::check(&pool).await.unwrap();
}

/// ReserveSets refused `REQUEST_TOO_LARGE`, as the ledger's metrics count them.
fn too_large_counted(ledger: &TestLedger) -> u64 {
    let counted =
        r#"spendguard_ledger_rpc_errors_total{rpc="ReserveSet",code="REQUEST_TOO_LARGE"} "#;
    ledger
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(counted)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (up to 10 s) until the ledger's open-reservations gauge reads `open`.
async fn gauge_reads(ledger: &TestLedger, open: i64) {
    let line = format!("spendguard_ledger_open_reservations {open}");
    for _ in 0..200 {
        if ledger.metrics_text().lines().any(|l| l == line) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never read `{line}`:\n{}", ledger.metrics_text());
}

#[tokio::test]
async fn the_open_reservations_gauge_counts_what_is_held() {
    let tuning = spendguard_testkit::ledger::LedgerTuning {
        gauge_refresh_ms: 100,
        ..Default::default()
    };
    let mut ledger = TestLedger::start_with(&tuning).await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "run", 1_000).await.unwrap();
    gauge_reads(&ledger, 0).await;
    let mut held = Vec::new();
    for key in ["g-1", "g-2"] {
        let response = ledger
            .client
            .reserve_set(reserve_request(T, key, &["run"], 100, &fencing))
            .await
            .unwrap();
        held.push(reserved(response.into_inner()).reservation_id);
    }
    gauge_reads(&ledger, 2).await;
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: held[0].clone(),
            actual_nano_usd: 40,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap();
    gauge_reads(&ledger, 1).await;
}

#[tokio::test]
async fn check_fencing_reads_the_lease_as_a_reservation_would_and_writes_nothing() {
    // Goal: CheckFencing (what a sidecar asks before admitting a call inside a credit) answers
    // exactly as a ReserveSet's fencing check would, from the database itself: a current token
    // passes; a stale, expired, unknown, foreign or zero one is refused with its stable code;
    // an epoch moved forward in the database behind the ledger's caches is seen at once; and
    // nothing is written.
    let (mut ledger, fencing) = setup().await;
    let check = |tenant: &str, token: Option<pb::FencingToken>| pb::CheckFencingRequest {
        tenant_id: tenant.into(),
        fencing: token,
    };
    let token = |epoch: u64| {
        Some(pb::FencingToken {
            scope_id: fencing.scope_id.clone(),
            epoch,
        })
    };
    ledger.tenant_with_lease("tenant-b").await.unwrap();
    let written = outbox_count(&ledger).await;
    let current = ledger
        .client
        .check_fencing(check(T, Some(fencing.clone())))
        .await
        .unwrap()
        .into_inner();
    let stored: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT expires_at FROM fencing_scopes WHERE scope_id = $1")
            .bind(&fencing.scope_id)
            .fetch_one(ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(current.expires_at_unix_ms, stored.timestamp_millis());

    let unknown = pb::FencingToken {
        scope_id: "tenant-a/nobody".into(),
        epoch: 1,
    };
    for (name, request, expected) in [
        (
            "epoch 0",
            check(T, token(0)),
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "no token",
            check(T, None),
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "an epoch it never had",
            check(T, token(fencing.epoch + 1)),
            pb::ErrorCode::FencingEpochStale,
        ),
        (
            "unknown scope",
            check(T, Some(unknown)),
            pb::ErrorCode::FencingScopeNotFound,
        ),
        (
            "another tenant's scope",
            check("tenant-b", Some(fencing.clone())),
            pb::ErrorCode::FencingScopeNotFound,
        ),
        (
            "malformed tenant",
            check("bad tenant!", Some(fencing.clone())),
            pb::ErrorCode::IdMalformed,
        ),
    ] {
        let refused = ledger.client.check_fencing(request).await.unwrap_err();
        assert_eq!(code(&refused), expected, "{name}");
    }

    // Moved forward in the database, not through the ledger: the next check sees it, as the
    // next reservation would.
    // (With its history row, as an administrator's forced acquire would write.)
    sqlx::query(
        "WITH moved AS (UPDATE fencing_scopes SET epoch = epoch + 1, owner_workload_id = 'admin'
                         WHERE scope_id = $1 RETURNING *)
         INSERT INTO fencing_scope_events
                (scope_id, tenant_id, workload_instance_id, outcome, previous_epoch, epoch, expires_at)
         SELECT scope_id, tenant_id, owner_workload_id, 'forced', epoch - 1, epoch, expires_at FROM moved",
    )
    .bind(&fencing.scope_id)
    .execute(ledger.store().pool())
    .await
    .unwrap();
    let stale = ledger
        .client
        .check_fencing(check(T, Some(fencing.clone())))
        .await
        .unwrap_err();
    assert_eq!(code(&stale), pb::ErrorCode::FencingEpochStale);
    ledger
        .client
        .check_fencing(check(T, token(fencing.epoch + 1)))
        .await
        .unwrap();

    // Expired on the database clock: refused, as new exposure is. (With its history row too.)
    sqlx::query(
        "WITH lapsed AS (UPDATE fencing_scopes SET expires_at = now() - interval '1 second'
                          WHERE scope_id = $1 RETURNING *)
         INSERT INTO fencing_scope_events
                (scope_id, tenant_id, workload_instance_id, outcome, previous_epoch, epoch, expires_at)
         SELECT scope_id, tenant_id, owner_workload_id, 'renewed', epoch, epoch, expires_at FROM lapsed",
    )
    .bind(&fencing.scope_id)
    .execute(ledger.store().pool())
    .await
    .unwrap();
    let expired = ledger
        .client
        .check_fencing(check(T, token(fencing.epoch + 1)))
        .await
        .unwrap_err();
    assert_eq!(code(&expired), pb::ErrorCode::FencingLeaseExpired);
    let reserve = ledger
        .client
        .reserve_set(reserve_request(
            T,
            "after-expiry",
            &["run"],
            1,
            &pb::FencingToken {
                scope_id: fencing.scope_id.clone(),
                epoch: fencing.epoch + 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        code(&reserve),
        pb::ErrorCode::FencingLeaseExpired,
        "the same answer"
    );
    assert_eq!(outbox_count(&ledger).await, written, "checks write nothing");

    // The read session's backend ends (an administrator's termination, as a database restart
    // does): the next check is still answered, on a new session.
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'spendguard-ledger-reads'",
    )
    .fetch_all(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(terminated, [true], "one read session was open");
    let again = ledger
        .client
        .check_fencing(check(T, token(fencing.epoch + 1)))
        .await
        .unwrap_err();
    assert_eq!(code(&again), pb::ErrorCode::FencingLeaseExpired, "answered");
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_signing_key_window_that_has_ended_is_final() {
    // Goal: reopening a key's validity end that has passed would make signatures made after it
    // (with a key that may have leaked since) valid again. The ledger refuses any change of such
    // an end with SIGNING_KEY_WINDOW_CLOSED and writes nothing; the database refuses it too.
    // Closing a window that is still open, even at an instant already past (a rotation closes
    // the old key's window just after its last signature), stays allowed, and so does revoking
    // an ended key.
    let (mut ledger, _) = setup().await;
    let client = ledger.client.clone();
    // Whether a registration the ledger took changed the registry.
    let changed = |request: pb::RegisterSigningKeyRequest| {
        let mut client = client.clone();
        async move {
            let answer = client.register_signing_key(request).await.unwrap();
            answer.into_inner().changed
        }
    };
    let ended = pb::RegisterSigningKeyRequest {
        valid_from_unix_ms: 1_735_689_600_000,  // 2025-01-01
        valid_until_unix_ms: 1_767_225_600_000, // 2026-01-01: passed
        ..signing_key_request("k-ended", ED25519_KEY_1)
    };
    assert!(changed(ended.clone()).await);
    let before = outbox_count(&ledger).await;
    for (name, valid_until) in [
        ("extended", 1_798_761_600_000),
        ("cleared", 0),
        ("moved earlier", 1_767_225_599_000),
    ] {
        let change = pb::RegisterSigningKeyRequest {
            valid_until_unix_ms: valid_until,
            ..ended.clone()
        };
        let refused = ledger
            .client
            .register_signing_key(change)
            .await
            .unwrap_err();
        assert_eq!(
            code(&refused),
            pb::ErrorCode::SigningKeyWindowClosed,
            "{name}"
        );
    }
    assert_eq!(outbox_count(&ledger).await, before, "nothing written");
    let direct = sqlx::query("UPDATE signing_keys SET valid_until = NULL WHERE key_id = 'k-ended'")
        .execute(ledger.store().pool())
        .await
        .unwrap_err();
    assert!(direct.to_string().contains("final"), "{direct}");

    // Revoking the ended key is allowed, also when the request carries a changed end (the
    // SigningKey controller sends the whole spec, maybe with a `notAfter` edited after the end
    // passed): the revocation applies and the ended window stays. Closing an open window in
    // the past is allowed too.
    let revoked = pb::RegisterSigningKeyRequest {
        revoked_at_unix_ms: 1_766_000_000_000,
        valid_until_unix_ms: 1_798_761_600_000,
        ..ended.clone()
    };
    assert!(changed(revoked.clone()).await);
    let (valid_until, revoked_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT valid_until, revoked_at FROM signing_keys WHERE key_id = 'k-ended'")
            .fetch_one(ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(valid_until.timestamp_millis(), ended.valid_until_unix_ms);
    assert_eq!(revoked_at.timestamp_millis(), 1_766_000_000_000);
    assert!(!changed(revoked).await, "a repeat changes nothing");
    let open = pb::RegisterSigningKeyRequest {
        valid_until_unix_ms: 0,
        ..signing_key_request("k-rotated", ED25519_KEY_2)
    };
    assert!(changed(open.clone()).await);
    let closed = pb::RegisterSigningKeyRequest {
        valid_until_unix_ms: 1_769_904_000_000, // 2026-02-01: already past
        ..open
    };
    assert!(changed(closed).await);
    invariants::check(ledger.store().pool()).await.unwrap();
}
