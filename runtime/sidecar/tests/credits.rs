//! Credits (docs/design/credits.md): the sidecar admits calls inside money it reserved once, and
//! the ledger still records every call's reservation, settles it, and never lets the budget be
//! overspent. Real ledger and PostgreSQL, the mock provider, the proxy.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use std::time::Duration;
use support::*;

/// The proxy's worst case for `chat_body("gpt-4o-mini", false)`: (body bytes + 64) input tokens
/// at 150 nano-USD and the contract's 4096 output tokens at 600 nano-USD.
fn worst_case() -> i64 {
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", false)).unwrap();
    (i64::try_from(body.len()).unwrap() + 64) * 150 + 4096 * 600
}

/// What the mock reports for one call, priced.
const COMMITTED_PER_CALL: i64 = 10_950;

async fn chat(stack: &Stack) -> Reply {
    post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await
}

async fn count(stack: &Stack, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(stack.ledger.store().pool())
        .await
        .unwrap()
}

/// Waits (up to 10 s) until the ledger holds `n` open credits.
async fn open_credits(stack: &Stack, n: i64) {
    for _ in 0..400 {
        let open = count(
            stack,
            "SELECT count(*) FROM reservations WHERE is_credit AND state = 'reserved'",
        )
        .await;
        if open == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("expected {n} open credits");
}

/// A stack started with `options` whose sidecar holds an open credit (its first call, reserved
/// one by one, asked for it), with no call in flight.
async fn stack_with_an_open_credit(options: Options) -> Stack {
    let stack = Stack::start(options).await;
    assert_eq!(chat(&stack).await.status, 200);
    open_credits(&stack, 1).await;
    stack.wait_no_open_calls().await;
    stack
}

/// A stack whose sidecar holds an open credit of 20 worst cases, with no call in flight.
async fn with_an_open_credit() -> Stack {
    stack_with_an_open_credit(Options {
        flags: fixed_credits(20 * worst_case()),
        ..Options::default()
    })
    .await
}

/// No call admitted inside a credit lost its draw, and none became a fail-open record.
async fn nothing_lost(stack: &Stack) {
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_draws_lost_total"),
        0.0
    );
    assert_eq!(
        count(stack, "SELECT count(*) FROM fail_open_records").await,
        0
    );
}

#[tokio::test]
async fn calls_inside_credits_are_drawn_settled_and_the_credits_returned() {
    // Just under three worst cases per credit: each holds two calls and runs low after them, so
    // several are opened, retired and released while calls go on (and a third call must not be
    // taken from what is left).
    let credit = 3 * worst_case() - 1;
    let mut stack = Stack::start(Options {
        flags: fixed_credits(credit),
        ..Options::default()
    })
    .await;
    let calls = 12;
    for _ in 0..calls {
        let reply = chat(&stack).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        // Give the background opening a moment, as traffic would.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stack.wait_no_open_calls().await;
    let drawn = count(
        &stack,
        "SELECT count(*) FROM reservations WHERE drawn_from_reservation_id IS NOT NULL",
    )
    .await;
    let credits = count(&stack, "SELECT count(*) FROM reservations WHERE is_credit").await;
    assert!(
        drawn >= 6,
        "most calls were admitted inside a credit ({drawn})"
    );
    assert!(
        credits >= 2,
        "credits were opened as they ran low ({credits})"
    );
    // Every call, drawn or not, is one committed reservation of its own.
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations WHERE NOT is_credit AND state = 'committed'"
        )
        .await,
        calls
    );
    assert!(stack.metric("spendguard_sidecar_credit_admitted_total") >= 6.0);
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_draws_lost_total"),
        0.0
    );

    // Shutdown returns what the credits did not admit: nothing stays reserved.
    stack.stop_sidecar().await;
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations WHERE is_credit AND state <> 'released'"
        )
        .await,
        0
    );
    // Draws and settlements are sent in the background, each as a request the ledger may hold
    // to batch (openings are not: a call may wait on one; nor are the releases at shutdown),
    // and so are the releases of credits retired on the way.
    assert!(stack.ledger.commands("deferrable") >= u64::try_from(drawn + calls).unwrap());
    let balance = stack.balance().await;
    assert_eq!(balance.reserved_nano_usd, 0);
    assert_eq!(balance.committed_nano_usd, calls * COMMITTED_PER_CALL);
    assert_eq!(balance.overrun_nano_usd, 0);
    assert_eq!(
        stack.upstream_requests().len(),
        usize::try_from(calls).unwrap()
    );
    let reserved = spendguard_testkit::ledger::outbox_events(
        stack.ledger.store().pool(),
        "reservation.reserved",
    )
    .await
    .unwrap();
    let drawn_events = reserved
        .iter()
        .filter(|e| e["data"]["drawn_from_reservation_id"].is_string())
        .count();
    assert_eq!(
        i64::try_from(drawn_events).unwrap(),
        drawn,
        "every draw is evidenced"
    );
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_settled_through_the_decision_api_is_drawn_urgently() {
    // Goal: a decision-API caller waits for its Commit, and a Commit inside a credit waits for
    // the call's draw, so neither may be held by the ledger's defer window. Method: the
    // ledger's count of commands by urgency across a decide and commit through the API, the
    // call admitted inside a credit.
    let stack = stack_with_an_open_credit(Options {
        flags: fixed_credits(10 * worst_case()),
        ..Options::default()
    })
    .await;
    let admitted = stack.metric("spendguard_sidecar_credit_admitted_total");
    let deferrable = stack.ledger.commands("deferrable");
    let decided = stack
        .decide_ok(
            &json!({"call_id": "api", "provider": "openai", "model": "gpt-4o-mini",
                    "input_tokens_upper_bound": 1_000, "max_output_tokens": 1_000}),
        )
        .await;
    assert_eq!(decided["decision"], "CONTINUE");
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_admitted_total"),
        admitted + 1.0,
        "admitted inside the credit"
    );
    let committed = post_json(
        &stack.url("/v1/spendguard/commit"),
        &[],
        &json!({"call_id": "api", "usage_format": "openai_chat",
                "usage": {"prompt_tokens": 10, "completion_tokens": 10}}),
    )
    .await;
    assert_eq!(committed.status, 200);
    assert_eq!(stack.ledger.commands("deferrable"), deferrable);
    let drawn = count(
        &stack,
        "SELECT count(*) FROM reservations WHERE drawn_from_reservation_id IS NOT NULL AND state = 'committed'",
    )
    .await;
    assert!(drawn >= 1, "the API call was drawn and committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_inside_credits_never_pass_the_limit() {
    let limit = 30 * worst_case();
    let mut stack = Stack::start(Options {
        limit,
        // Just under ten worst cases: a tenth call must not be taken from what is left.
        flags: fixed_credits(10 * worst_case() - 1),
        ..Options::default()
    })
    .await;
    // Warm: the first call opens the first credit.
    assert_eq!(chat(&stack).await.status, 200);
    open_credits(&stack, 1).await;
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", false)).unwrap();
    let url = stack.url("/v1/chat/completions");
    let calls: Vec<_> = (0..120)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                post(&url, &[OPENAI_KEY, ("x-mock-latency-ms", "200")], &body).await
            })
        })
        .collect();
    let mut continued = 1;
    for call in calls {
        let reply = call.await.unwrap();
        match reply.status {
            200 => continued += 1,
            402 => assert_eq!(reply.json()["error"]["code"], "BUDGET_EXHAUSTED"),
            other => panic!(
                "unexpected {other}: {}",
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
    assert!(continued < 121, "the budget did not fit every call at once");
    stack.wait_no_open_calls().await;
    let drawn = count(
        &stack,
        "SELECT count(*) FROM reservations WHERE drawn_from_reservation_id IS NOT NULL",
    )
    .await;
    println!("continued {continued}, drawn from credits {drawn}");
    assert!(drawn >= 5, "calls were admitted inside credits ({drawn})");
    stack.stop_sidecar().await;
    let balance = stack.balance().await;
    assert_eq!(balance.reserved_nano_usd, 0);
    assert_eq!(balance.committed_nano_usd, continued * COMMITTED_PER_CALL);
    // Nothing was admitted that its credit did not hold: no draw was lost, no spend went
    // around a reservation.
    assert_eq!(balance.overrun_nano_usd, 0);
    assert_eq!(
        count(&stack, "SELECT count(*) FROM fail_open_records").await,
        0
    );
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_whose_draw_is_refused_is_recorded_as_a_fail_open_call() {
    let mut stack = Stack::start(Options {
        flags: fixed_credits(20 * worst_case()),
        ..Options::default()
    })
    .await;
    assert_eq!(chat(&stack).await.status, 200);
    open_credits(&stack, 1).await;
    // Someone releases the sidecar's credit behind its back (with its scope's epoch).
    let pool = stack.ledger.store().pool().clone();
    let (credit, scope, epoch): (uuid::Uuid, String, i64) = sqlx::query_as(
        "SELECT r.reservation_id, r.fencing_scope_id, f.epoch FROM reservations r
           JOIN fencing_scopes f ON f.scope_id = r.fencing_scope_id
          WHERE r.is_credit AND r.state = 'reserved'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    stack
        .ledger
        .client
        .release(spendguard_proto::ledger::v1::ReleaseRequest {
            tenant_id: TENANT.into(),
            reservation_id: credit.to_string(),
            fencing: Some(spendguard_proto::ledger::v1::FencingToken {
                scope_id: scope,
                epoch: u64::try_from(epoch).unwrap(),
            }),
            reason: "test".into(),
            deferrable: false,
        })
        .await
        .unwrap();

    // The sidecar still counts on it. A call decided inside it is queued as a fail-open call
    // as soon as its draw is refused, before (and whether or not) it settles.
    let decided = stack
        .decide_ok(
            &json!({"call_id": "unsettled", "provider": "openai", "model": "gpt-4o-mini",
                           "input_tokens_upper_bound": 1_000, "max_output_tokens": 1_000}),
        )
        .await;
    assert_eq!(decided["decision"], "CONTINUE");
    let queue = stack.sidecar().decider.fail_open_queue();
    for _ in 0..200 {
        if queue.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(queue.len(), 1, "queued without a settlement");
    // A proxied call goes through, its draw is refused, and it is recorded with its cost.
    assert_eq!(chat(&stack).await.status, 200);
    let released = post_json(
        &stack.url("/v1/spendguard/release"),
        &[],
        &json!({"call_id": "unsettled", "reason": "not needed"}),
    )
    .await;
    assert_eq!(
        released.status,
        200,
        "{}",
        String::from_utf8_lossy(&released.body)
    );
    stack.wait_no_open_calls().await;
    assert!(stack.fail_open_drained().await);
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_draws_lost_total"),
        2.0
    );
    let actuals: Vec<(String, i64)> = sqlx::query_as(
        "SELECT call_id, actual_nano_usd FROM fail_open_records ORDER BY actual_nano_usd",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(actuals.len(), 2);
    assert_eq!(actuals[0], ("unsettled".to_owned(), 0));
    let actual = actuals[1].1;
    assert_eq!(actual, COMMITTED_PER_CALL);
    let balance = stack.balance().await;
    assert_eq!(balance.committed_nano_usd, COMMITTED_PER_CALL);
    assert_eq!(balance.overrun_nano_usd, COMMITTED_PER_CALL);
    spendguard_testkit::invariants::check(&pool).await.unwrap();
}

#[tokio::test]
async fn without_room_for_a_credit_or_under_approvals_calls_reserve_one_by_one() {
    // A credit larger than the budget is denied: calls reserve one by one and still stop at
    // the limit.
    let limit = 2 * worst_case();
    let stack = Stack::start(Options {
        limit,
        flags: fixed_credits(20 * worst_case()),
        mock: spendguard_mock_provider::MockConfig::default(),
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(chat(&stack).await.status, 200);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stack.wait_no_open_calls().await;
    assert_eq!(
        count(&stack, "SELECT count(*) FROM reservations WHERE is_credit").await,
        0
    );
    assert_eq!(stack.metric("spendguard_sidecar_credits_opened_total"), 0.0);

    // Under a contract that asks for approval above soft caps, a budget with a soft cap gets
    // no credit (the one opened to find out is released at once).
    let stack = Stack::start(Options {
        soft_cap: 50 * worst_case(),
        contract: json!({"approval_above_soft_cap": true}),
        flags: fixed_credits(20 * worst_case()),
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(chat(&stack).await.status, 200);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stack.wait_no_open_calls().await;
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations WHERE drawn_from_reservation_id IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations WHERE is_credit AND state = 'reserved'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_denied_credit_retires_the_current_one_so_its_remainder_goes_back() {
    // Goal: near a budget's end the next credit is denied, and the current one is retired and
    // released after its last draw, instead of holding its remainder (which could refuse calls
    // the budget can still take one by one) until its TTL. Method: a credit of 1.2 worst cases
    // on a budget of 2.3: the first call opens it, the second is drawn from it and leaves it
    // low, the next credit does not fit.
    let w = worst_case();
    let mut stack = stack_with_an_open_credit(Options {
        limit: 23 * w / 10,
        flags: fixed_credits(12 * w / 10),
        ..Options::default()
    })
    .await;
    assert_eq!(chat(&stack).await.status, 200);
    // The draw goes out in the background (and the ledger may hold it a moment).
    let mut drawn = 0;
    for _ in 0..400 {
        drawn = count(
            &stack,
            "SELECT count(*) FROM reservations WHERE drawn_from_reservation_id IS NOT NULL",
        )
        .await;
        if drawn == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(drawn, 1, "the second call was drawn from the credit");
    // The credit is released while the sidecar runs (not at shutdown, not at its TTL), and
    // nothing stays reserved.
    open_credits(&stack, 0).await;
    stack.wait_no_open_calls().await;
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, 2 * COMMITTED_PER_CALL);
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations WHERE is_credit AND state = 'released'"
        )
        .await,
        1
    );
    assert_eq!(stack.metric("spendguard_sidecar_credits_opened_total"), 1.0);
    // Calls go on (reserved one by one, or inside a new credit once the pool's quiet second
    // after the denial has passed and the budget has room for one).
    assert_eq!(chat(&stack).await.status, 200);
    stack.wait_no_open_calls().await;
    for _ in 0..200 {
        if stack.balance().await.committed_nano_usd == 3 * COMMITTED_PER_CALL {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        stack.balance().await.committed_nano_usd,
        3 * COMMITTED_PER_CALL
    );
}

#[tokio::test]
async fn draws_of_calls_admitted_during_an_outage_land_under_the_leases_next_epoch() {
    // Goal: calls admitted inside a credit while the ledger is away are recorded once it is
    // back, even though the sidecar's lease lapsed meanwhile and was taken again under a new
    // epoch: their draws are sent again under it (the scope is the same), not lost to
    // fail-open records. Under a fail-open contract only: the fail-closed default refuses calls
    // the ledger cannot confirm (above). Method: the ledger stopped past the lease TTL (3 s in
    // these tests).
    let mut stack = stack_with_an_open_credit(Options {
        flags: fixed_credits(10 * worst_case()),
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    let epoch_before: i64 = sqlx::query_scalar("SELECT max(epoch) FROM fencing_scopes")
        .fetch_one(stack.ledger.store().pool())
        .await
        .unwrap();

    stack.ledger.stop().await;
    for _ in 0..2 {
        assert_eq!(chat(&stack).await.status, 200, "admitted inside the credit");
    }
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    stack.restart_ledger().await;
    stack.wait_no_open_calls().await;

    let epoch_after: i64 = sqlx::query_scalar("SELECT max(epoch) FROM fencing_scopes")
        .fetch_one(stack.ledger.store().pool())
        .await
        .unwrap();
    assert!(epoch_after > epoch_before, "the lease was taken again");
    let drawn: Vec<i64> = sqlx::query_scalar(
        "SELECT fencing_epoch FROM reservations
          WHERE drawn_from_reservation_id IS NOT NULL AND state = 'committed' ORDER BY 1",
    )
    .fetch_all(stack.ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(
        drawn,
        vec![epoch_after, epoch_after],
        "both drawn, under the new epoch"
    );
    nothing_lost(&stack).await;
    let balance = stack.balance().await;
    assert_eq!(balance.committed_nano_usd, 3 * COMMITTED_PER_CALL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_pod_holds_no_credit_and_a_busy_one_holds_its_recent_demand() {
    // The largest credit is far above the budget's needs: only the sizing keeps credits small.
    let mut stack = Stack::start(Options {
        flags: vec![
            "--credit-nano-usd=1000000000000".into(),
            "--credit-ahead-ms=2000".into(),
        ],
        ..Options::default()
    })
    .await;
    // Three calls a second apart: each second's demand is one worst case, under the eight a
    // credit must hold. They reserve one by one.
    for _ in 0..3 {
        assert_eq!(chat(&stack).await.status, 200);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    let credits = || count(&stack, "SELECT count(*) FROM reservations WHERE is_credit");
    assert_eq!(credits().await, 0, "a quiet pod holds no money idle");

    // A burst of 40 calls: the demand of the last second asks for a credit of 2 s of it.
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", false)).unwrap();
    let url = stack.url("/v1/chat/completions");
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move { post(&url, &[OPENAI_KEY], &body).await })
        })
        .collect();
    for call in burst {
        assert_eq!(call.await.unwrap().status, 200);
    }
    open_credits(&stack, 1).await;
    let amount: i64 = sqlx::query_scalar(
        "SELECT amount_nano_usd FROM reservations WHERE is_credit ORDER BY created_at LIMIT 1",
    )
    .fetch_one(stack.ledger.store().pool())
    .await
    .unwrap();
    let w = worst_case();
    assert!(
        (8 * w..=2 * 41 * w).contains(&amount),
        "sized on the last second's demand (at most 41 calls, 2 s ahead): {amount} for a worst case of {w}"
    );
    stack.stop_sidecar().await;
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_call_inside_a_credit_fails_closed_at_once_when_the_epoch_is_forced_forward() {
    // Goal (issue 3, S4): "the epoch forced forward in the database makes the next decision
    // fail closed" holds inside a credit too: the sidecar confirms its epoch with the ledger
    // (CheckFencing, a read) before it admits a call inside a credit, so no call goes out on a
    // stale epoch, none is recorded as a lost draw, and the credit keeps its money.
    let mut stack = with_an_open_credit().await;
    assert_eq!(chat(&stack).await.status, 200, "admitted inside the credit");
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_admitted_total"),
        1.0
    );
    let remaining = stack.metric("spendguard_sidecar_credit_remaining_nano_usd");
    let forwarded = stack.upstream_requests().len();
    // Another holder forces the scope to a newer epoch behind the sidecar's back.
    stack.force_epoch_forward().await;
    for _ in 0..3 {
        let refused = chat(&stack).await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.json()["error"]["code"], "LEASE_UNAVAILABLE");
    }
    assert_eq!(
        stack.upstream_requests().len(),
        forwarded,
        "nothing went out"
    );
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_admitted_total"),
        1.0,
        "none admitted inside the credit"
    );
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_remaining_nano_usd"),
        remaining,
        "what the refused calls took went back to the credit"
    );
    nothing_lost(&stack).await;
}

/// How many CheckFencing reads the ledger answered.
fn lease_checks_answered(stack: &Stack) -> u64 {
    stack
        .ledger
        .metrics_text()
        .lines()
        .find_map(|l| {
            l.strip_prefix("spendguard_ledger_rpc_duration_seconds_count{rpc=\"CheckFencing\"} ")
        })
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_inside_a_credit_share_their_lease_checks() {
    // Goal: at a high call rate the lease check does not cost the ledger a read per call.
    // Calls that ask while a check is in flight gather and share the next one, which is sent
    // after all of them asked (so each still sees an epoch forced forward before it asked:
    // the test above). 64 calls at once take far fewer reads than calls, every one admitted.
    let stack = stack_with_an_open_credit(Options {
        flags: fixed_credits(200 * worst_case()),
        ..Options::default()
    })
    .await;
    let admitted = stack.metric("spendguard_sidecar_credit_admitted_total");
    let checks = lease_checks_answered(&stack);
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let stack_url = stack.url("/v1/chat/completions");
            tokio::spawn(async move {
                post_json(&stack_url, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false))
                    .await
                    .status
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_admitted_total") - admitted,
        64.0,
        "every call admitted inside the credit"
    );
    let reads = lease_checks_answered(&stack) - checks;
    println!("64 calls, {reads} lease checks");
    assert!((1..48).contains(&reads), "{reads} reads for 64 calls");
    assert_eq!(
        stack.metric("spendguard_sidecar_lease_checks_total"),
        f64::from(u32::try_from(lease_checks_answered(&stack)).unwrap()),
        "the sidecar counts what it sent"
    );
    stack.wait_no_open_calls().await;
    nothing_lost(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_ask_while_a_check_is_in_flight_are_told_by_a_read_sent_after_it() {
    // Goal: sharing lease checks never hands a call the answer of a read made before it
    // asked. Call 1's check has read the lease (current) and its answer is held in flight;
    // eight calls ask meanwhile; then the epoch is forced forward in the database, and the
    // answer let go. Call 1 goes ahead on its read. The eight must not take that answer: they
    // share one read, sent after it, which sees the forced epoch, so all are refused and
    // nothing of theirs goes out. (Joining the check in flight would admit all eight.)
    let gate = ledger_front::Gate::closed();
    let mut stack = stack_with_an_open_credit(Options {
        flags: fixed_credits(200 * worst_case()),
        ledger_front: Some(ledger_front::CheckFencing::Held(gate.clone())),
        ..Options::default()
    })
    .await;
    // (Its first call reserved one by one: no lease check went through the gate yet.)
    let forwarded = stack.upstream_requests().len();
    let url = stack.url("/v1/chat/completions");
    let call = || {
        let url = url.clone();
        tokio::spawn(async move {
            post_json(&url, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await
        })
    };
    let first = call();
    gate.holding(1).await;
    let later: Vec<_> = (0..8).map(|_| call()).collect();
    // They reach the sidecar and wait for the check in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.force_epoch_forward().await;
    gate.open();
    assert_eq!(first.await.unwrap().status, 200, "checked before the force");
    for call in later {
        let refused = call.await.unwrap();
        assert_eq!(refused.status, 503);
        assert_eq!(refused.json()["error"]["code"], "LEASE_UNAVAILABLE");
    }
    // One read for call 1, one shared by the eight (a call slow to reach the sidecar would
    // open a third, after the force too).
    let reads = gate.sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!((2..=3).contains(&reads), "{reads} reads");
    assert_eq!(stack.upstream_requests().len(), forwarded + 1);
    stack.wait_no_open_calls().await;
    // Call 1's draw, sent after the force, is refused as stale: the documented window between
    // a check and its draw. It is recorded as a fail-open call, not lost.
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_draws_lost_total"),
        1.0
    );
    for _ in 0..200 {
        if count(&stack, "SELECT count(*) FROM fail_open_records").await == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("call 1 was not recorded as a fail-open call");
}

#[tokio::test]
async fn against_a_ledger_without_the_lease_check_calls_reserve_one_by_one_and_no_credit_is_held() {
    // Goal: a ledger older than CheckFencing (a rollback of the ledger alone) answers the lease
    // check UNIMPLEMENTED. No call may go ahead unchecked inside a credit, and none may be
    // refused for it: each reserves one by one (which checks its epoch), and the credit already
    // open goes back, since it would only hold money. No other credit is opened.
    let stack = Stack::start(Options {
        flags: fixed_credits(20 * worst_case()),
        ledger_front: Some(ledger_front::CheckFencing::Unimplemented),
        ..Options::default()
    })
    .await;
    // The first call finds no credit: it reserves one by one and asks for one.
    assert_eq!(chat(&stack).await.status, 200);
    open_credits(&stack, 1).await;
    for _ in 0..5 {
        assert_eq!(chat(&stack).await.status, 200);
    }
    open_credits(&stack, 0).await;
    stack.wait_no_open_calls().await;
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_admitted_total"),
        0.0
    );
    assert_eq!(stack.metric("spendguard_sidecar_credits_opened_total"), 1.0);
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations \
              WHERE NOT is_credit AND drawn_from_reservation_id IS NULL AND state = 'committed'"
        )
        .await,
        6,
        "every call reserved and committed on its own"
    );
    nothing_lost(&stack).await;
}

#[tokio::test]
async fn a_call_inside_a_credit_fails_closed_while_the_ledger_is_away() {
    // Goal (issue 3): "ledger unreachable is 503 DEPENDENCY_UNAVAILABLE (fail-closed)" holds
    // with credits on: a credit holds money, but without the ledger's answer the sidecar does
    // not know its lease is still current, so under the default (fail-closed) contract the call
    // is refused and goes nowhere; once the ledger is back, calls are admitted inside the credit
    // again.
    let mut stack = with_an_open_credit().await;
    let forwarded = stack.upstream_requests().len();
    stack.ledger.stop().await;
    for _ in 0..2 {
        let refused = chat(&stack).await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
    }
    assert_eq!(
        stack.upstream_requests().len(),
        forwarded,
        "nothing went out"
    );
    stack.restart_ledger().await;
    let mut admitted = false;
    for _ in 0..100 {
        if chat(&stack).await.status == 200 {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "calls go on once the ledger is back");
    nothing_lost(&stack).await;
}

#[tokio::test]
async fn a_decision_dropped_during_its_lease_check_gives_its_amount_back() {
    // Goal: a decide API client that goes away while the sidecar waits for the ledger's lease
    // check (a ledger that accepts connections and never answers) does not leave its amount
    // taken from the credit: the credit's remainder is what it was, and nothing is counted as
    // admitted. Without the give-back, every such call would hold part of the credit (and a
    // place among the draws in flight) for good.
    let mut stack = with_an_open_credit().await;
    let remaining = stack.metric("spendguard_sidecar_credit_remaining_nano_usd");
    let admitted = stack.metric("spendguard_sidecar_credit_admitted_total");
    assert!(remaining > 0.0);

    // The ledger's address now accepts connections and never answers.
    stack.ledger.stop().await;
    let silent = std::net::TcpListener::bind(stack.ledger_addr).unwrap();
    let held = std::thread::spawn(move || {
        let mut connections = Vec::new();
        for connection in silent.incoming().take(4) {
            connections.push(connection);
        }
        std::thread::sleep(Duration::from_secs(30));
        drop(connections);
    });
    let body = json!({"call_id": "gone", "provider": "openai", "model": "gpt-4o-mini",
                      "input_tokens_upper_bound": 1_000, "max_output_tokens": 1_000});
    let url = stack.url("/v1/spendguard/decide");
    let gave_up =
        tokio::time::timeout(Duration::from_millis(1_500), post_json(&url, &[], &body)).await;
    assert!(gave_up.is_err(), "the lease check cannot be answered");
    // The sidecar notices the closed connection when it next polls it; the check itself waits
    // up to its 5 s deadline, which the dropped decision no longer does.
    let mut given_back = false;
    for _ in 0..100 {
        if stack.metric("spendguard_sidecar_credit_remaining_nano_usd") == remaining {
            given_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        given_back,
        "remaining {} instead of {remaining}",
        stack.metric("spendguard_sidecar_credit_remaining_nano_usd")
    );
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_admitted_total"),
        admitted
    );
    drop(held);
}

#[tokio::test]
async fn a_settled_call_id_sent_again_after_a_restart_is_drawn_and_committed_as_a_call_of_its_own()
{
    // Goal (docs/design/credits.md): a call id the sidecar does not remember (sent again after
    // a restart) whose reservation the ledger already settled is admitted inside the credit
    // like any call; its draw finds the settled reservation, so it is drawn again under a key
    // of its own (`<call id>/again/<uuid>`), and its commit goes to that reservation, not to
    // the settled one: both calls are booked, each at its usage, and nothing stays open.
    let mut stack = Stack::start(Options {
        flags: fixed_credits(20 * worst_case()),
        ..Options::default()
    })
    .await;
    let call = |stack: &Stack, id: &'static str| {
        let url = stack.url("/v1/chat/completions");
        async move {
            post_json(
                &url,
                &[OPENAI_KEY, ("x-spendguard-call-id", id)],
                &chat_body("gpt-4o-mini", false),
            )
            .await
        }
    };
    let opened = |stack: &Stack| stack.metric("spendguard_sidecar_credits_opened_total");
    assert_eq!(call(&stack, "warm-1").await.status, 200);
    for _ in 0..200 {
        if opened(&stack) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(call(&stack, "dup").await.status, 200);
    stack.wait_no_open_calls().await;

    stack.stop_sidecar().await;
    stack.start_sidecar().await;
    assert_eq!(call(&stack, "warm-2").await.status, 200);
    for _ in 0..200 {
        if opened(&stack) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let admitted = stack.metric("spendguard_sidecar_credit_admitted_total");
    assert_eq!(call(&stack, "dup").await.status, 200, "admitted again");
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_admitted_total"),
        admitted + 1.0,
        "inside the credit"
    );
    stack.wait_no_open_calls().await;
    let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT idempotency_key, state, actual_nano_usd FROM reservations
          WHERE idempotency_key LIKE 'dup%' ORDER BY created_at",
    )
    .fetch_all(stack.ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, "dup");
    assert!(rows[1].0.starts_with("dup/again/"), "{rows:?}");
    for (key, state, actual) in &rows {
        assert_eq!(state, "committed", "{key}");
        assert_eq!(*actual, Some(COMMITTED_PER_CALL), "{key}");
    }
    assert_eq!(
        stack.metric("spendguard_sidecar_credit_draws_lost_total"),
        0.0
    );
    stack.stop_sidecar().await;
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, 4 * COMMITTED_PER_CALL);
}

#[tokio::test]
async fn a_pod_that_goes_quiet_releases_its_credit_before_it_lapses() {
    // Goal: an idle pod does not hold money other pods' calls could use until its credit lapses.
    // Method: credits of 8 s (quiet after a quarter of that, 2 s); one call opens a credit and
    // nothing follows; the credit is released (not expired) well before its TTL.
    let mut stack = Stack::start(Options {
        flags: [
            fixed_credits(20 * worst_case()),
            vec!["--credit-ttl-ms=8000".into()],
        ]
        .concat(),
        ..Options::default()
    })
    .await;
    assert_eq!(chat(&stack).await.status, 200);
    open_credits(&stack, 1).await;
    // Without a call, nothing else retires it: it would stay open until it expired at 8 s.
    open_credits(&stack, 0).await;
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations WHERE is_credit AND state = 'released'"
        )
        .await,
        1,
        "released, not expired"
    );
    stack.wait_no_open_calls().await;
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
}

#[tokio::test]
async fn a_draw_answered_by_something_other_than_the_ledger_is_retried_not_lost() {
    // Goal: a draw (the ReserveSet of a call admitted inside a credit) answered without the
    // ledger's detail under a code that is not a transport failure's (a stream reset in a
    // proxy: INTERNAL) is no refusal. It is offered again until the ledger answers, and the
    // call is neither lost nor recorded as a fail-open call.
    let bare = std::sync::Arc::new(ledger_front::Bare::default());
    let stack = stack_with_an_open_credit(Options {
        flags: fixed_credits(20 * worst_case()),
        bare_answers: Some(bare.clone()),
        ..Options::default()
    })
    .await;
    bare.answer("ReserveSet", tonic::Code::Internal);
    assert_eq!(chat(&stack).await.status, 200);
    bare.wait_given("ReserveSet", 2).await;
    bare.forward_all();
    stack.wait_no_open_calls().await;
    nothing_lost(&stack).await;
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM reservations WHERE drawn_from_reservation_id IS NOT NULL"
        )
        .await,
        1,
        "the call was drawn from its credit"
    );
}
