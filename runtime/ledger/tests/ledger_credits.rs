//! Credits (docs/design/credits.md): a reservation a sidecar opens once and draws calls from.
//! Against the real ledger on a real PostgreSQL database; every test ends with the database
//! invariants, which include that a credit's drawn total is the sum of its draws.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::error_code;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{outbox_events, reserve_request};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-credit";
const BUDGETS: [&str; 2] = ["run", "tenant"];

async fn setup() -> (TestLedger, pb::FencingToken) {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "run", 1_000).await.unwrap();
    ledger.budget(T, "tenant", 10_000).await.unwrap();
    (ledger, fencing)
}

fn open_credit(key: &str, amount: i64, fencing: &pb::FencingToken) -> pb::ReserveSetRequest {
    pb::ReserveSetRequest {
        credit: true,
        ..reserve_request(T, key, &BUDGETS, amount, fencing)
    }
}

fn draw(credit: &str, key: &str, amount: i64, fencing: &pb::FencingToken) -> pb::ReserveSetRequest {
    pb::ReserveSetRequest {
        draw_from_reservation_id: credit.into(),
        ..reserve_request(T, key, &BUDGETS, amount, fencing)
    }
}

async fn reserve(ledger: &mut TestLedger, request: pb::ReserveSetRequest) -> pb::Reservation {
    let response = ledger
        .client
        .reserve_set(request)
        .await
        .unwrap()
        .into_inner();
    match response.outcome {
        Some(pb::reserve_set_response::Outcome::Reserved(r)) => r,
        other => panic!("expected a reservation, got {other:?}"),
    }
}

async fn refused(ledger: &mut TestLedger, request: pb::ReserveSetRequest) -> pb::ErrorCode {
    let status = ledger.client.reserve_set(request).await.unwrap_err();
    error_code(&status).unwrap_or_else(|| panic!("status without error detail: {status:?}"))
}

/// Reserved and committed of a budget's current window.
async fn money(ledger: &mut TestLedger, budget: &str) -> (i64, i64) {
    let b = ledger.balance(T, budget).await.unwrap();
    (b.reserved_nano_usd, b.committed_nano_usd)
}

async fn outbox_count(ledger: &TestLedger) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap()
}

fn release(id: &str, fencing: &pb::FencingToken) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        tenant_id: T.into(),
        reservation_id: id.into(),
        fencing: Some(fencing.clone()),
        reason: "done".into(),
        deferrable: false,
    }
}

#[tokio::test]
async fn draws_settle_like_calls_and_the_credit_returns_only_what_was_not_drawn() {
    let (mut ledger, fencing) = setup().await;
    let credit = reserve(&mut ledger, open_credit("credit-1", 600, &fencing)).await;
    assert_eq!(credit.credit_remaining_nano_usd, 600);
    assert_eq!(money(&mut ledger, "run").await, (600, 0));

    // Draws move no money in the budgets: the credit already holds it.
    let d1 = reserve(
        &mut ledger,
        draw(&credit.reservation_id, "call-1", 200, &fencing),
    )
    .await;
    let d2 = reserve(
        &mut ledger,
        draw(&credit.reservation_id, "call-2", 300, &fencing),
    )
    .await;
    assert_eq!(
        (d1.credit_remaining_nano_usd, d2.credit_remaining_nano_usd),
        (400, 100)
    );
    assert_eq!(d1.amount_nano_usd, 200);
    assert_eq!(money(&mut ledger, "run").await, (600, 0));
    assert_eq!(money(&mut ledger, "tenant").await, (600, 0));

    // More than is left: refused, nothing written.
    let before = outbox_count(&ledger).await;
    assert_eq!(
        refused(
            &mut ledger,
            draw(&credit.reservation_id, "call-3", 101, &fencing)
        )
        .await,
        pb::ErrorCode::CreditUnavailable
    );
    assert_eq!(outbox_count(&ledger).await, before);

    // The credit's money is taken: an ordinary reservation sees only the rest of the budget.
    let ordinary = ledger
        .client
        .reserve_set(reserve_request(T, "plain", &BUDGETS, 401, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            ordinary.outcome,
            Some(pb::reserve_set_response::Outcome::Denied(_))
        ),
        "{ordinary:?}"
    );

    // A drawn reservation commits like any other: its rest goes back to the budgets.
    let committed = ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: d1.reservation_id.clone(),
            actual_nano_usd: 150,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.released_nano_usd, 50);
    assert_eq!(money(&mut ledger, "run").await, (400, 150));

    // Releasing the credit returns what no call drew; the open draw keeps its money.
    let released = ledger
        .client
        .release(release(&credit.reservation_id, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released_nano_usd, 100);
    assert_eq!(money(&mut ledger, "run").await, (300, 150));
    assert_eq!(
        refused(
            &mut ledger,
            draw(&credit.reservation_id, "call-4", 1, &fencing)
        )
        .await,
        pb::ErrorCode::CreditUnavailable
    );
    ledger
        .client
        .release(release(&d2.reservation_id, &fencing))
        .await
        .unwrap();
    assert_eq!(money(&mut ledger, "run").await, (0, 150));

    // The evidence says which reservation is a credit and where each draw came from.
    let pool = ledger.store().pool().clone();
    let reserved = outbox_events(&pool, "reservation.reserved").await.unwrap();
    let by_id = |id: &str| {
        reserved
            .iter()
            .find(|e| e["data"]["reservation_id"] == id)
            .unwrap()["data"]
            .clone()
    };
    assert_eq!(by_id(&credit.reservation_id)["credit"], true);
    assert_eq!(
        by_id(&d1.reservation_id)["drawn_from_reservation_id"],
        credit.reservation_id.as_str()
    );
    let plain: Vec<_> = reserved
        .iter()
        .filter(|e| e["data"]["idempotency_key"] == "plain")
        .collect();
    assert!(plain.is_empty(), "a denial writes nothing");
    let released_events = outbox_events(&pool, "reservation.released").await.unwrap();
    let credit_release = released_events
        .iter()
        .find(|e| e["data"]["reservation_id"] == credit.reservation_id.as_str())
        .unwrap();
    assert_eq!(credit_release["data"]["released_nano_usd"], "100");
    assert_eq!(credit_release["data"]["credit_drawn_nano_usd"], "500");

    invariants::check(&pool).await.unwrap();
}

#[tokio::test]
async fn concurrent_draws_never_take_more_than_the_credit_and_retries_replay() {
    let (mut ledger, fencing) = setup().await;
    let credit = reserve(&mut ledger, open_credit("credit-1", 500, &fencing)).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..40 {
        let mut client = ledger.client.clone();
        let request = draw(&credit.reservation_id, &format!("call-{i}"), 50, &fencing);
        calls.spawn(async move { client.reserve_set(request).await });
    }
    let (mut drawn, mut unavailable) = (0, 0);
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(_) => drawn += 1,
            Err(status) => {
                assert_eq!(
                    error_code(&status),
                    Some(pb::ErrorCode::CreditUnavailable),
                    "{status:?}"
                );
                unavailable += 1;
            }
        }
    }
    assert_eq!((drawn, unavailable), (10, 30));
    assert_eq!(money(&mut ledger, "run").await, (500, 0));

    // A retry of a draw that succeeded replays it: same reservation, nothing drawn twice.
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM reservations WHERE drawn_from_reservation_id IS NOT NULL",
    )
    .fetch_all(ledger.store().pool())
    .await
    .unwrap();
    let key = &ids[0];
    let before = outbox_count(&ledger).await;
    let response = ledger
        .client
        .reserve_set(draw(&credit.reservation_id, key, 50, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(response.replayed);
    let Some(pb::reserve_set_response::Outcome::Reserved(replay)) = response.outcome else {
        panic!("{response:?}");
    };
    assert_eq!(replay.credit_remaining_nano_usd, 0);
    assert_eq!(outbox_count(&ledger).await, before);
    // A retry through another credit (a sidecar restarted) is the same call: it replays, and
    // the other credit is not drawn from.
    let other = reserve(&mut ledger, open_credit("credit-2", 100, &fencing)).await;
    let through_other = ledger
        .client
        .reserve_set(draw(&other.reservation_id, key, 50, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(through_other.replayed);
    let drawn_from_other: i64 = sqlx::query_scalar(
        "SELECT drawn_nano_usd FROM reservations WHERE reservation_id = $1::uuid",
    )
    .bind(&other.reservation_id)
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(drawn_from_other, 0);
    // The same key asking for another amount is another request.
    assert_eq!(
        refused(&mut ledger, draw(&credit.reservation_id, key, 40, &fencing)).await,
        pb::ErrorCode::IdempotencyConflict
    );

    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_credit_refuses_what_it_cannot_cover_and_writes_nothing() {
    let (mut ledger, fencing) = setup().await;
    let credit = reserve(&mut ledger, open_credit("credit-1", 500, &fencing)).await;
    let ordinary = reserve(
        &mut ledger,
        reserve_request(T, "ordinary", &BUDGETS, 100, &fencing),
    )
    .await;
    // Another scope of the same tenant, and another tenant with a credit of its own.
    let other_scope = ledger
        .client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: "other-scope".into(),
            tenant_id: T.into(),
            workload_instance_id: "other-w".into(),
            ttl_ms: 600_000,
            expected_epoch: 0,
            force: false,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let other_fencing = pb::FencingToken {
        scope_id: "other-scope".into(),
        epoch: other_scope.epoch,
    };
    let before = outbox_count(&ledger).await;
    let balances = (
        money(&mut ledger, "run").await,
        money(&mut ledger, "tenant").await,
    );

    let cases: Vec<(&str, pb::ReserveSetRequest, pb::ErrorCode)> = vec![
        (
            "an ordinary reservation",
            draw(&ordinary.reservation_id, "c1", 10, &fencing),
            pb::ErrorCode::CreditUnavailable,
        ),
        (
            "other budgets",
            pb::ReserveSetRequest {
                budget_ids: vec!["run".into()],
                ..draw(&credit.reservation_id, "c2", 10, &fencing)
            },
            pb::ErrorCode::CreditUnavailable,
        ),
        (
            "the budgets in another order",
            pb::ReserveSetRequest {
                budget_ids: vec!["tenant".into(), "run".into()],
                ..draw(&credit.reservation_id, "c3", 10, &fencing)
            },
            pb::ErrorCode::CreditUnavailable,
        ),
        (
            "another scope",
            draw(&credit.reservation_id, "c4", 10, &other_fencing),
            pb::ErrorCode::CreditUnavailable,
        ),
        (
            "an unknown credit",
            draw("5b7e2a4c-9d61-4f0e-8c3a-0d1e6f2b7a91", "c5", 10, &fencing),
            pb::ErrorCode::ReservationNotFound,
        ),
        (
            "a malformed id",
            draw("not-a-uuid", "c6", 10, &fencing),
            pb::ErrorCode::IdMalformed,
        ),
        (
            "a credit drawn from a credit",
            pb::ReserveSetRequest {
                credit: true,
                ..draw(&credit.reservation_id, "c7", 10, &fencing)
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "more than the credit",
            draw(&credit.reservation_id, "c8", 501, &fencing),
            pb::ErrorCode::CreditUnavailable,
        ),
        (
            "a stale epoch",
            draw(
                &credit.reservation_id,
                "c9",
                10,
                &pb::FencingToken {
                    epoch: fencing.epoch + 1,
                    ..fencing.clone()
                },
            ),
            pb::ErrorCode::FencingEpochStale,
        ),
    ];
    for (name, request, expected) in cases {
        assert_eq!(refused(&mut ledger, request).await, expected, "{name}");
    }
    // Another tenant does not see this tenant's credit at all.
    let other_tenant = ledger.tenant_with_lease("tenant-other").await.unwrap();
    ledger.budget("tenant-other", "run", 1_000).await.unwrap();
    ledger
        .budget("tenant-other", "tenant", 1_000)
        .await
        .unwrap();
    let foreign = pb::ReserveSetRequest {
        tenant_id: "tenant-other".into(),
        draw_from_reservation_id: credit.reservation_id.clone(),
        ..reserve_request("tenant-other", "c10", &BUDGETS, 10, &other_tenant)
    };
    let status = ledger.client.reserve_set(foreign).await.unwrap_err();
    assert_eq!(
        error_code(&status),
        Some(pb::ErrorCode::ReservationNotFound)
    );
    let before = before + outbox_count_of_setup(&ledger, "tenant-other").await;

    // A credit is never committed.
    let status = ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: credit.reservation_id.clone(),
            actual_nano_usd: 10,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap_err();
    assert_eq!(error_code(&status), Some(pb::ErrorCode::InvalidArgument));

    assert_eq!(outbox_count(&ledger).await, before, "nothing written");
    assert_eq!(
        (
            money(&mut ledger, "run").await,
            money(&mut ledger, "tenant").await
        ),
        balances
    );
    let drawn: i64 = sqlx::query_scalar("SELECT drawn_nano_usd FROM reservations WHERE is_credit")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap();
    assert_eq!(drawn, 0);
    invariants::check(ledger.store().pool()).await.unwrap();
}

/// Events the setup of `tenant` wrote (tenant, pricing, lease, budgets).
async fn outbox_count_of_setup(ledger: &TestLedger, tenant: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_outbox WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(ledger.store().pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_expired_credit_returns_what_was_not_drawn_and_its_draws_live_on() {
    let (mut ledger, fencing) = setup().await;
    let credit = reserve(
        &mut ledger,
        pb::ReserveSetRequest {
            ttl_ms: 1_000,
            ..open_credit("credit-1", 500, &fencing)
        },
    )
    .await;
    let call = reserve(
        &mut ledger,
        draw(&credit.reservation_id, "call-1", 120, &fencing),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert_eq!(
        refused(
            &mut ledger,
            draw(&credit.reservation_id, "call-2", 10, &fencing)
        )
        .await,
        pb::ErrorCode::CreditUnavailable
    );
    let swept = ledger
        .client
        .sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(swept.expired, 1);
    assert_eq!(money(&mut ledger, "run").await, (120, 0));
    let pool = ledger.store().pool().clone();
    let expired = outbox_events(&pool, "reservation.expired").await.unwrap();
    assert_eq!(expired[0]["data"]["released_nano_usd"], "380");
    assert_eq!(expired[0]["data"]["credit_drawn_nano_usd"], "120");

    // The draw outlives its credit: it has its own TTL and settles on its own.
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: call.reservation_id.clone(),
            actual_nano_usd: 100,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap();
    assert_eq!(money(&mut ledger, "run").await, (0, 100));
    invariants::check(&pool).await.unwrap();
}

#[tokio::test]
async fn the_database_keeps_draws_within_their_credit_even_against_direct_writes() {
    let (mut ledger, fencing) = setup().await;
    let credit = reserve(&mut ledger, open_credit("credit-1", 500, &fencing)).await;
    reserve(
        &mut ledger,
        draw(&credit.reservation_id, "call-1", 200, &fencing),
    )
    .await;
    let ordinary = reserve(
        &mut ledger,
        reserve_request(T, "ordinary", &BUDGETS, 100, &fencing),
    )
    .await;
    let pool = ledger.store().pool().clone();
    let credit_id: uuid::Uuid = credit.reservation_id.parse().unwrap();
    let ordinary_id: uuid::Uuid = ordinary.reservation_id.parse().unwrap();
    for (name, sql, id) in [
        (
            "undrawn",
            "UPDATE reservations SET drawn_nano_usd = 100 WHERE reservation_id = $1",
            credit_id,
        ),
        (
            "drawn past its amount",
            "UPDATE reservations SET drawn_nano_usd = 501 WHERE reservation_id = $1",
            credit_id,
        ),
        (
            "an ordinary reservation drawn",
            "UPDATE reservations SET drawn_nano_usd = 1 WHERE reservation_id = $1",
            ordinary_id,
        ),
        (
            "made a credit",
            "UPDATE reservations SET is_credit = true WHERE reservation_id = $1",
            ordinary_id,
        ),
        (
            "committed",
            "UPDATE reservations SET state = 'committed', resolved_at = now(), actual_nano_usd = 300,
                    committed_nano_usd = 300, released_nano_usd = 0, overrun_nano_usd = 0
              WHERE reservation_id = $1",
            credit_id,
        ),
        (
            "released with its draws",
            "UPDATE reservations SET state = 'released', resolved_at = now(), actual_nano_usd = 0,
                    committed_nano_usd = 0, released_nano_usd = 500, overrun_nano_usd = 0
              WHERE reservation_id = $1",
            credit_id,
        ),
    ] {
        let error = sqlx::query(sql).bind(id).execute(&pool).await.unwrap_err();
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default()
            .into_owned();
        // Class 23: integrity constraint violation (a CHECK, or the trigger's own raise).
        assert!(code.starts_with("23"), "{name}: {error}");
    }
    invariants::check(&pool).await.unwrap();
}

#[tokio::test]
async fn draws_take_the_cached_path_and_see_another_replicas_draws() {
    let (mut a, fencing) = setup().await;
    let credit = reserve(&mut a, open_credit("credit-1", 500, &fencing)).await;
    reserve(&mut a, draw(&credit.reservation_id, "a-1", 100, &fencing)).await;
    let cached = a.batches("cached");
    let second = reserve(&mut a, draw(&credit.reservation_id, "a-2", 50, &fencing)).await;
    assert_eq!(second.credit_remaining_nano_usd, 350);
    assert!(
        a.batches("cached") > cached,
        "a draw is planned on the writer's cache"
    );

    // Another replica draws from the same credit: this writer's memory of it is stale.
    let mut b = TestLedger::start_on(&a.database_url, "ledger-1")
        .await
        .unwrap();
    reserve(&mut b, draw(&credit.reservation_id, "b-1", 300, &fencing)).await;
    // This writer remembers 150 drawn, 350 left; 50 are. Planned on its memory, a draw of 350
    // would fit, and would even write a drawn total (500) the database accepts: the statement's
    // check of the total it read is what refuses it, and the load path answers.
    let stale = a.batches("cached_stale");
    assert_eq!(
        refused(&mut a, draw(&credit.reservation_id, "a-3", 350, &fencing)).await,
        pb::ErrorCode::CreditUnavailable
    );
    assert!(a.batches("cached_stale") > stale, "{}", a.metrics_text());
    let last = reserve(&mut a, draw(&credit.reservation_id, "a-4", 50, &fencing)).await;
    assert_eq!(last.credit_remaining_nano_usd, 0);
    assert_eq!(money(&mut a, "run").await, (500, 0));
    invariants::check(a.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_draw_that_outlives_its_ttl_is_booked_late_and_its_credit_keeps_account() {
    // Goal: a commit after the TTL of a reservation drawn from a credit is booked late like any
    // other (all of it overrun, nothing committed), and the budgets' reserved money still
    // matches what is open: the draw's held amount leaves reserved once, by its expiry, and the
    // credit's release returns only what was never drawn. Method: a credit, a draw of 1 s,
    // once swept by the commit itself and once by the sweep.
    let (mut ledger, fencing) = setup().await;
    let credit = reserve(&mut ledger, open_credit("credit-1", 500, &fencing)).await;
    let short = |key: &str, amount: i64| pb::ReserveSetRequest {
        ttl_ms: 1_000,
        ..draw(&credit.reservation_id, key, amount, &fencing)
    };
    let unswept = reserve(&mut ledger, short("call-1", 120)).await;
    let swept = reserve(&mut ledger, short("call-2", 80)).await;
    assert_eq!(
        money(&mut ledger, "run").await,
        (500, 0),
        "the credit holds it all"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let commit = |id: &str, actual: i64| pb::CommitRequest {
        tenant_id: T.into(),
        reservation_id: id.into(),
        actual_nano_usd: actual,
        fencing: Some(fencing.clone()),
        deferrable: false,
    };
    let late = ledger
        .client
        .commit(commit(&unswept.reservation_id, 90))
        .await
        .unwrap()
        .into_inner();
    assert!(late.late);
    assert_eq!(
        money(&mut ledger, "run").await,
        (380, 0),
        "its 120 left reserved"
    );
    ledger
        .client
        .sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 100,
        })
        .await
        .unwrap();
    let late = ledger
        .client
        .commit(commit(&swept.reservation_id, 70))
        .await
        .unwrap()
        .into_inner();
    assert!(late.late);
    ledger
        .client
        .release(release(&credit.reservation_id, &fencing))
        .await
        .unwrap();
    let run = ledger.balance(T, "run").await.unwrap();
    assert_eq!(
        (
            run.reserved_nano_usd,
            run.committed_nano_usd,
            run.overrun_nano_usd
        ),
        (0, 0, 160),
        "nothing held, both late usages booked as overrun"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}
