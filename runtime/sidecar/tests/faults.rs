//! Faults on the data path: the ledger going away, the epoch forced forward, a restart, an
//! explicit fail-open contract, answers that are not the ledger's, and a drain on shutdown.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use spendguard_proto::ledger::v1 as pb;
use std::time::Duration;
use support::*;

#[tokio::test]
async fn ledger_down_fails_closed_and_in_flight_calls_settle_once_after_it_returns() {
    let mut stack = Stack::start(Options::default()).await;
    let chat = stack.url("/v1/chat/completions");
    // A slow stream is in flight when the ledger goes away.
    let in_flight = tokio::spawn({
        let chat = chat.clone();
        async move {
            post_json(
                &chat,
                &[OPENAI_KEY, ("x-mock-chunk-delay-ms", "150")],
                &chat_body("gpt-4o-mini", true),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = stack.balance().await.reserved_nano_usd;
    assert!(held > 0);
    stack.ledger.stop().await;

    // New calls fail closed with the stable code; nothing reaches the provider.
    let before = stack.upstream_requests().len();
    let refused = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
    assert_eq!(refused.json()["error"]["type"], "spendguard_unavailable");
    assert_eq!(stack.upstream_requests().len(), before);

    // The in-flight stream finishes for the client; its commit waits for the ledger.
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(String::from_utf8_lossy(&reply.body).contains("[DONE]"));

    stack.restart_ledger().await;
    let balance = stack.settled_balance().await;
    // Exactly one commit of the reported usage (9 input + 16 output tokens).
    assert_eq!(balance.committed_nano_usd, 10_950);
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
    let commits: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE tenant_id = $1 AND state = 'committed'",
    )
    .bind(TENANT)
    .fetch_one(stack.ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(commits, 1);

    // Once the lease is held again (readiness), new calls go through again.
    let mut lease = stack.sidecar().lease.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        lease.wait_for(|s| matches!(s, spendguard_sidecar::lease::LeaseState::Held { .. })),
    )
    .await
    .unwrap();
    let ok = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn epoch_forced_forward_fails_the_next_decision_closed() {
    // Goal: a forced epoch fails the next decision closed, also under an explicitly fail-open
    // contract: fail-open is for a ledger that cannot answer, never for one that says this
    // sidecar is fenced.
    for contract in [json!({}), json!({"fail_policy": "open"})] {
        let mut stack = Stack::start(Options {
            contract: contract.clone(),
            ..Options::default()
        })
        .await;
        let chat = stack.url("/v1/chat/completions");
        assert_eq!(
            post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false))
                .await
                .status,
            200
        );
        stack.force_epoch_forward().await;
        let refused = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
        assert_eq!(refused.status, 503, "{contract}");
        assert_eq!(refused.json()["error"]["code"], "LEASE_UNAVAILABLE");
        assert_eq!(stack.upstream_requests().len(), 1, "{contract}");
        assert!(stack.sidecar().decider.fail_open_queue().is_empty());
    }
}

#[tokio::test]
async fn a_lease_lapsed_past_its_grace_fails_closed_under_a_fail_open_contract() {
    // Goal: fail-open covers a ledger away within the lease's grace, not a sidecar whose lease
    // has lapsed: once it drains, calls are 503 LEASE_UNAVAILABLE and nothing goes ahead.
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let mut lease = stack.sidecar().lease.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(15),
        lease.wait_for(|s| !matches!(s, spendguard_sidecar::lease::LeaseState::Held { .. })),
    )
    .await
    .expect("the lease lapses past its grace");
    let refused = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.json());
    assert_eq!(refused.json()["error"]["code"], "LEASE_UNAVAILABLE");
    assert!(stack.upstream_requests().is_empty());
    assert!(stack.sidecar().decider.fail_open_queue().is_empty());
}

#[tokio::test]
async fn a_restart_acquires_a_new_epoch_and_keeps_deciding() {
    let mut stack = Stack::start(Options::default()).await;
    let first = stack.sidecar().lease.epoch_for_decision().unwrap();
    stack.stop_sidecar().await;
    stack.start_sidecar().await;
    let second = stack.sidecar().lease.epoch_for_decision().unwrap();
    assert_eq!(second, first + 1, "a restart never reuses an epoch");
    let ok = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn shutdown_drains_in_flight_streams_before_exiting() {
    let mut stack = Stack::start(Options::default()).await;
    let chat = stack.url("/v1/chat/completions");
    let in_flight = tokio::spawn(async move {
        post_json(
            &chat,
            &[OPENAI_KEY, ("x-mock-chunk-delay-ms", "100")],
            &chat_body("gpt-4o-mini", true),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.stop_sidecar().await;
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(String::from_utf8_lossy(&reply.body).contains("[DONE]"));
    // Settled with the last epoch while draining.
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, 10_950);
}

#[tokio::test]
async fn an_explicit_fail_open_contract_lets_calls_through_marked_fail_open() {
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let decide = post_json(
        &stack.url("/v1/spendguard/decide"),
        &[],
        &json!({"call_id": "c-open", "provider": "openai", "model": "gpt-4o-mini",
                "input_tokens_upper_bound": 100, "max_output_tokens": 10}),
    )
    .await;
    assert_eq!(decide.status, 200);
    let decision = decide.json();
    assert_eq!(decision["decision"], "CONTINUE");
    assert_eq!(decision["fail_open"], true);
    assert_eq!(decision["reason"], "FAIL_OPEN");
    assert!(decision["reservation_id"].is_null());
    let proxied = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(proxied.status, 200);
    // Never for a denied model: contract refusals do not depend on the ledger.
    let denied = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4-denied", false),
    )
    .await;
    assert_eq!(denied.status, 402);
}

#[tokio::test]
async fn an_approval_the_ledger_cannot_record_fails_closed_even_under_fail_open() {
    // Goal: REQUIRE_APPROVAL never names an approval that does not exist, and a soft cap never
    // fails open. Method: a trigger makes every insert into the approvals table fail the way a
    // lock timeout does, so CreateApproval gets DEPENDENCY_UNAVAILABLE while ReserveSet still
    // works; the decision must be a 503 with the reservation still held, and a retry once the
    // fault is gone must replay the same reservation and open the approval.
    let mut stack = Stack::start(Options {
        limit: 100_000_000_000,
        soft_cap: 1_000,
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    let decide_url = stack.url("/v1/spendguard/decide");
    let body = json!({"call_id": "c-approval", "provider": "openai", "model": "gpt-4o-mini",
                      "input_tokens_upper_bound": 100, "max_output_tokens": 10});
    let pool = stack.ledger.owner.clone();
    for sql in [
        "CREATE FUNCTION test_approvals_unavailable() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'simulated lock timeout' USING ERRCODE = 'lock_not_available'; END $$",
        "CREATE TRIGGER test_approvals_unavailable BEFORE INSERT ON approvals
         FOR EACH ROW EXECUTE FUNCTION test_approvals_unavailable()",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let refused = post_json(&decide_url, &[], &body).await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
    assert!(
        stack.balance().await.reserved_nano_usd > 0,
        "the reservation stays held until the approval is recorded"
    );
    let approvals: i64 = sqlx::query_scalar("SELECT count(*) FROM approvals")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(approvals, 0);
    sqlx::query("DROP TRIGGER test_approvals_unavailable ON approvals")
        .execute(&pool)
        .await
        .unwrap();

    // A lease renewal batched with the failed CreateApproval failed with it; should that have
    // made the lease drain, wait for it to be renewed.
    let mut retried = post_json(&decide_url, &[], &body).await;
    for _ in 0..100 {
        if retried.status != 503 || retried.json()["error"]["code"] != "LEASE_UNAVAILABLE" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retried = post_json(&decide_url, &[], &body).await;
    }
    assert_eq!(
        retried.status,
        200,
        "{}",
        String::from_utf8_lossy(&retried.body)
    );
    let decision = retried.json();
    assert_eq!(decision["decision"], "REQUIRE_APPROVAL");
    let approval_id = decision["approval_id"].as_str().unwrap().to_owned();
    let pending = stack
        .ledger
        .client
        .list_approvals(pb::ListApprovalsRequest {
            state: pb::ApprovalState::Pending.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].approval_id, approval_id);
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
}

/// Each recorded call id with its `decision.fail_open` event count, and the sum of their costs.
async fn fail_open_events(stack: &Stack) -> (Vec<(String, i64)>, i64) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT (convert_from(canonical_event, 'UTF8')::jsonb) #>> '{data,call_id}', count(*)
           FROM audit_outbox WHERE event_type = 'decision.fail_open' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(stack.ledger.store().pool())
    .await
    .unwrap();
    let total: Option<i64> = sqlx::query_scalar(
        "SELECT sum(((convert_from(canonical_event, 'UTF8')::jsonb) #>> '{data,actual_nano_usd}')::bigint)::bigint
           FROM audit_outbox WHERE event_type = 'decision.fail_open'",
    )
    .fetch_one(stack.ledger.store().pool())
    .await
    .unwrap();
    (rows, total.unwrap_or(0))
}

#[tokio::test]
async fn fail_open_calls_reach_the_evidence_chain_and_the_budget_once_the_ledger_returns() {
    // Goal: a call let through fail-open is not lost: once the ledger answers again, each one
    // has exactly one `decision.fail_open` event and its cost shows in the budget as overrun.
    // Method: fail-open contract, stop the ledger, make three proxied calls (CONTINUE, 200),
    // restart the ledger on the same database and wait for the sidecar's drain task.
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    let chat = stack.url("/v1/chat/completions");
    stack.ledger.stop().await;
    let mut call_ids = Vec::new();
    for _ in 0..3 {
        let reply = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        call_ids.push(reply.header("x-spendguard-call-id").unwrap().to_owned());
    }
    assert_eq!(stack.upstream_requests().len(), 3);
    assert_eq!(stack.sidecar().decider.fail_open_queue().len(), 3);

    stack.restart_ledger().await;
    assert!(
        stack.fail_open_drained().await,
        "the drain task records every fail-open call once the ledger answers"
    );
    let (events, total) = fail_open_events(&stack).await;
    call_ids.sort();
    let expected: Vec<(String, i64)> = call_ids.iter().map(|c| (c.clone(), 1)).collect();
    assert_eq!(events, expected, "one decision.fail_open per call");
    // Each call reported 9 input + 16 output tokens: 10_950 nano-USD.
    assert_eq!(total, 3 * 10_950);
    let balance = stack.balance().await;
    assert_eq!(balance.overrun_nano_usd, 3 * 10_950);
    assert_eq!(balance.reserved_nano_usd, 0);
    assert_eq!(balance.committed_nano_usd, 0);
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_full_fail_open_queue_fails_the_next_call_closed() {
    // Goal: fail-open is only allowed while its evidence can be kept. Method: a queue of one
    // record; with the ledger down the first call goes through and fills it, the second gets
    // 503 DEPENDENCY_UNAVAILABLE and never reaches the provider; once the ledger is back the
    // queued record is recorded and calls go through again.
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        flags: vec!["--fail-open-queue-records=1".into()],
        ..Options::default()
    })
    .await;
    let chat = stack.url("/v1/chat/completions");
    stack.ledger.stop().await;
    let first = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(first.status, 200);
    let refused = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
    assert_eq!(
        stack.upstream_requests().len(),
        1,
        "the refused call never left"
    );

    stack.restart_ledger().await;
    assert!(stack.fail_open_drained().await);
    let (events, total) = fail_open_events(&stack).await;
    assert_eq!(events.len(), 1);
    assert_eq!(total, 10_950);
    assert_eq!(stack.balance().await.overrun_nano_usd, 10_950);
}

#[tokio::test]
async fn shutdown_sends_queued_fail_open_records_within_its_deadline() {
    // Goal: on SIGTERM the queued records are sent if the ledger answers, and shutdown does not
    // hang on a ledger that stays away: past the deadline the records are given up (logged at
    // ERROR). Method: two sidecar lifetimes on one database. First, one fail-open call with the
    // ledger down, then stop the sidecar with the ledger still down: shutdown ends within the
    // drain deadline and the queue is empty (abandoned). Second, one fail-open call, restart the
    // ledger and stop the sidecar at once: the record is in the outbox exactly once.
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        flags: vec!["--fail-open-drain-ms=1000".into()],
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let lost = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(lost.status, 200);
    let decider = stack.sidecar().decider.clone();
    assert_eq!(decider.fail_open_queue().len(), 1);
    let started = tokio::time::Instant::now();
    stack.stop_sidecar().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown is bounded by the drain deadline"
    );
    assert!(
        decider.fail_open_queue().is_empty(),
        "unsent records are given up"
    );

    stack.restart_ledger().await;
    stack.start_sidecar().await;
    stack.ledger.stop().await;
    let kept = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(kept.status, 200);
    let kept_call_id = kept.header("x-spendguard-call-id").unwrap().to_owned();
    stack.restart_ledger().await;
    stack.stop_sidecar().await;
    let (events, total) = fail_open_events(&stack).await;
    assert_eq!(events, vec![(kept_call_id, 1)]);
    assert_eq!(total, 10_950);
    assert_eq!(stack.balance().await.overrun_nano_usd, 10_950);
}

#[tokio::test]
async fn shutdown_sends_a_queue_many_passes_long_within_its_deadline() {
    // Goal: a queue much longer than one pass of the drain (64 records) is sent within the
    // deadline once the ledger answers: the drain goes on at once after a pass that shrank the
    // queue, and waits only after one that did not. (A version that waited after every pass
    // with records left, doubling from 100 ms, sent at most seven passes, 448 records, in 8 s.)
    // Method: 500 fail-open decisions with the ledger down (unsettled, so only the drain sends
    // them), the ledger back, the sidecar stopped at once.
    const CALLS: usize = 500;
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        flags: vec!["--fail-open-drain-ms=8000".into()],
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let url = stack.url("/v1/spendguard/decide");
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..CALLS {
        let url = url.clone();
        calls.spawn(async move {
            let body = json!({"call_id": format!("c-{n}"), "provider": "openai",
                              "model": "gpt-4o-mini", "input_tokens_upper_bound": 10,
                              "max_output_tokens": 10});
            post_json(&url, &[], &body).await.json()
        });
        if calls.len() >= 16 {
            let decision = calls.join_next().await.unwrap().unwrap();
            assert_eq!(decision["fail_open"], true, "{decision}");
        }
    }
    for decision in calls.join_all().await {
        assert_eq!(decision["fail_open"], true, "{decision}");
    }
    let decider = stack.sidecar().decider.clone();
    assert_eq!(decider.fail_open_queue().len(), CALLS);
    stack.restart_ledger().await;
    stack.stop_sidecar().await;
    assert!(decider.fail_open_queue().is_empty());
    let (events, _) = fail_open_events(&stack).await;
    assert_eq!(events.len(), CALLS, "every record reached the ledger");
    assert!(events.iter().all(|(_, n)| *n == 1), "each once");
}

#[tokio::test]
async fn a_fail_open_spool_carries_records_across_a_restart_during_an_outage() {
    // Goal: with a spool, calls let through during an outage keep their evidence even when the
    // sidecar stops before the ledger returns: the next start sends each record exactly once.
    // Without a spool the same sequence loses them (previous test). Method: fail-open contract
    // and a spool directory; ledger down; two calls go through; the sidecar stops (its drain
    // deadline passes with the ledger still down); the ledger returns; a new sidecar on the same
    // spool records both calls.
    let spool = tempfile::tempdir().unwrap();
    let spool_file = spool
        .path()
        .join(spendguard_sidecar::fail_open::spool::SPOOL_FILE);
    let spooled_bytes = || std::fs::metadata(&spool_file).unwrap().len();
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        flags: vec![
            "--fail-open-drain-ms=500".into(),
            format!("--fail-open-spool-dir={}", spool.path().display()),
        ],
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let mut call_ids = Vec::new();
    for _ in 0..2 {
        let reply = post_json(
            &stack.url("/v1/chat/completions"),
            &[OPENAI_KEY],
            &chat_body("gpt-4o-mini", false),
        )
        .await;
        assert_eq!(reply.status, 200);
        call_ids.push(reply.header("x-spendguard-call-id").unwrap().to_owned());
    }
    stack.wait_no_open_calls().await;
    stack.stop_sidecar().await;
    assert!(spooled_bytes() > 0, "the unsent records stay on disk");

    stack.restart_ledger().await;
    stack.start_sidecar().await;
    assert!(
        stack.fail_open_drained().await,
        "the new sidecar sends what the spool held"
    );
    let (events, total) = fail_open_events(&stack).await;
    call_ids.sort();
    let expected: Vec<(String, i64)> = call_ids.iter().map(|c| (c.clone(), 1)).collect();
    assert_eq!(events, expected, "one decision.fail_open per call");
    assert_eq!(total, 2 * 10_950, "settled at their reported usage");
    assert_eq!(stack.balance().await.overrun_nano_usd, 2 * 10_950);
    stack.stop_sidecar().await;
    assert_eq!(spooled_bytes(), 0, "a drained spool is empty");
}

#[tokio::test]
async fn a_ledger_refusing_new_spend_for_an_evidence_backlog_fails_closed_even_under_fail_open() {
    // Goal: S22's durability policy reaches the caller as an explicit refusal: a ledger bounding
    // how long evidence may wait outside the canonical chain refuses new spend with
    // EVIDENCE_BACKLOG, and the sidecar answers 503 EVIDENCE_BACKLOG, never fail-open (the
    // ledger answered; it is not an outage), with nothing forwarded upstream. Method: a fail-open
    // contract; the ledger restarted with a 1 s bound and no forwarder running (the stack's
    // setup events age); decide until the refusal shows, then a proxied call.
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let tuning = spendguard_testkit::ledger::LedgerTuning {
        max_evidence_lag_seconds: 1,
        ..Default::default()
    };
    stack.restart_ledger_tuned(&tuning).await;
    let mut refused = None;
    for i in 0..100 {
        let reply = post_json(
            &stack.url("/v1/spendguard/decide"),
            &[],
            &json!({"call_id": format!("c-{i}"), "provider": "openai", "model": "gpt-4o-mini",
                    "input_tokens_upper_bound": 100, "max_output_tokens": 10}),
        )
        .await;
        if reply.status != 200 {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.json()["fail_open"], false, "{}", reply.json());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("refused once the oldest event is older than 1 s");
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused.json()["error"]["code"],
        "EVIDENCE_BACKLOG",
        "{}",
        refused.json()
    );
    let proxied = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(proxied.status, 503);
    assert_eq!(proxied.json()["error"]["code"], "EVIDENCE_BACKLOG");
    assert_eq!(proxied.json()["error"]["type"], "spendguard_unavailable");
    assert!(stack.upstream_requests().is_empty(), "nothing went out");
    assert!(stack.sidecar().decider.fail_open_queue().is_empty());
}

#[tokio::test]
async fn a_fail_open_call_on_stale_pricing_is_recorded_with_both_markers() {
    // Goal: S22's two explicit exceptions compose and both show in the evidence: a call let
    // through fail-open while the pricing is older than the contract accepts (under
    // `on_stale: continue`) is recorded, once the ledger answers, as `decision.fail_open` whose
    // context carries `"pricing_stale": true`. Method: such a contract and pricing, the ledger
    // stopped, one proxied call, the ledger back; then read the event.
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open",
                         "pricing_max_age": {"hours": 24, "on_stale": "continue"}}),
        pricing_published_at: Some("2020-01-01T00:00:00Z".into()),
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    stack.restart_ledger().await;
    assert!(stack.fail_open_drained().await);
    let events = spendguard_testkit::ledger::outbox_events(
        stack.ledger.store().pool(),
        "decision.fail_open",
    )
    .await
    .unwrap();
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event["data"]["context"]["pricing_stale"], true, "{event}");
    assert_eq!(event["data"]["overrun"], true, "{event}");
}

#[tokio::test]
async fn a_fail_open_call_whose_run_budget_has_another_limit_is_still_recorded() {
    // Goal: a fail-open call's spend is never dropped because its run's budget cannot be created
    // the way the contract says (it exists with another limit: the contract's per-run limit
    // changed, or it was created elsewhere; the data path refuses to change it). Method: the
    // run's budget created beforehand with another limit, the ledger stopped, one proxied call
    // of that run (fail-open), the ledger back: one `decision.fail_open`, its cost booked as
    // overrun on the run's budget.
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open", "per_run_limit_nano_usd": 1_000_000_000}),
        ..Options::default()
    })
    .await;
    stack
        .ledger
        .client
        .upsert_budget(pb::UpsertBudgetRequest {
            tenant_id: TENANT.into(),
            budget_id: "runs/run-7".into(),
            limit_nano_usd: 5_000_000_000,
            soft_cap_nano_usd: 0,
            window: pb::BudgetWindow::Lifetime.into(),
        })
        .await
        .unwrap();
    stack.ledger.stop().await;
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY, ("x-spendguard-run-id", "run-7")],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    stack.restart_ledger().await;
    assert!(stack.fail_open_drained().await);
    let (events, total) = fail_open_events(&stack).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(total, 10_950);
    let run = stack.ledger.balance(TENANT, "runs/run-7").await.unwrap();
    assert_eq!(run.overrun_nano_usd, 10_950);
    assert_eq!(
        run.limit_nano_usd, 5_000_000_000,
        "the data path did not change it"
    );
}

#[tokio::test]
async fn a_fail_open_contract_lets_calls_through_only_when_the_ledger_cannot_be_reached() {
    // Goal: a fail-open contract lets a call through when the ledger cannot be reached, never
    // on an answer that is not the ledger's. A status without SpendGuard's error detail under a
    // transport failure's gRPC code (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN) is the
    // ledger away; under any other (a ledger without the method, a proxy's refusal, a reset
    // stream) it fails closed, 502 LEDGER_ANSWER_UNREADABLE, and nothing reaches the provider.
    // A commit or a fail-open record answered so is kept and lands once the ledger answers.
    // Method: the sidecar reaches the ledger through a front that answers chosen methods
    // itself, bare.
    let bare = std::sync::Arc::new(ledger_front::Bare::default());
    let mut stack = Stack::start(Options {
        contract: json!({"fail_policy": "open"}),
        bare_answers: Some(bare.clone()),
        ..Options::default()
    })
    .await;
    let chat = stack.url("/v1/chat/completions");
    let unreadable = [
        tonic::Code::Unimplemented,
        tonic::Code::Internal,
        tonic::Code::PermissionDenied,
        tonic::Code::Unauthenticated,
        tonic::Code::ResourceExhausted,
        tonic::Code::InvalidArgument,
        tonic::Code::OutOfRange,
        tonic::Code::FailedPrecondition,
        tonic::Code::NotFound,
        tonic::Code::AlreadyExists,
        tonic::Code::Aborted,
        tonic::Code::DataLoss,
    ];
    for code in unreadable {
        bare.answer("ReserveSet", code);
        let refused = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
        assert_eq!(
            refused.status,
            502,
            "{code:?}: {}",
            String::from_utf8_lossy(&refused.body)
        );
        assert_eq!(
            refused.json()["error"]["code"],
            "LEDGER_ANSWER_UNREADABLE",
            "{code:?}"
        );
    }
    assert_eq!(bare.given("ReserveSet"), unreadable.len());
    assert!(stack.upstream_requests().is_empty());
    assert_eq!(stack.sidecar().decider.fail_open_queue().len(), 0);

    // The fail-open records wait while RecordFailOpen is answered bare INVALID_ARGUMENT: kept,
    // with no attempt counted, and offered again after a backoff.
    bare.answer("RecordFailOpen", tonic::Code::InvalidArgument);
    let transport = [
        tonic::Code::Unavailable,
        tonic::Code::DeadlineExceeded,
        tonic::Code::Cancelled,
        tonic::Code::Unknown,
    ];
    let mut let_through = Vec::new();
    for code in transport {
        bare.answer("ReserveSet", code);
        let open = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
        assert_eq!(
            open.status,
            200,
            "{code:?}: {}",
            String::from_utf8_lossy(&open.body)
        );
        assert_eq!(
            open.header("x-spendguard-reason"),
            Some("FAIL_OPEN"),
            "{code:?}"
        );
        let_through.push(open.header("x-spendguard-call-id").unwrap().to_owned());
    }
    assert_eq!(stack.upstream_requests().len(), transport.len());
    let attempts = usize::try_from(spendguard_sidecar::fail_open::RECORD_ATTEMPTS_MAX).unwrap();
    // Each pass offers every record (a refusal may be one record's alone), then backs off:
    // wait until each was offered more often than a refusal by the ledger allows.
    bare.wait_given("RecordFailOpen", transport.len() * (attempts + 1))
        .await;
    assert_eq!(
        stack.sidecar().decider.fail_open_queue().len(),
        transport.len(),
        "no record is dropped for an answer that was not the ledger's"
    );
    let dropped = "spendguard_sidecar_fail_open_dropped_total";
    assert!(
        stack.metrics_text().contains(dropped),
        "the counter is exported"
    );
    assert_eq!(stack.metric(dropped), 0.0);

    // A commit answered bare INTERNAL (a stream reset) is kept and offered again.
    bare.forward_all();
    bare.answer("Commit", tonic::Code::Internal);
    let held = post_json(&chat, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(held.status, 200);
    assert_ne!(held.header("x-spendguard-reason"), Some("FAIL_OPEN"));
    bare.wait_given("Commit", 2).await;
    assert!(stack.balance().await.reserved_nano_usd > 0);
    bare.forward_all();

    assert!(stack.fail_open_drained().await);
    let (events, total) = fail_open_events(&stack).await;
    let_through.sort();
    let expected: Vec<(String, i64)> = let_through.iter().map(|c| (c.clone(), 1)).collect();
    assert_eq!(
        events, expected,
        "one decision.fail_open per call let through"
    );
    // Each call reported 9 input + 16 output tokens: 10_950 nano-USD.
    assert_eq!(total, 4 * 10_950);
    let mut balance = stack.balance().await;
    for _ in 0..400 {
        if balance.reserved_nano_usd == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        balance = stack.balance().await;
    }
    assert_eq!(balance.reserved_nano_usd, 0, "the held commit landed");
    assert_eq!(balance.committed_nano_usd, 10_950);
    assert_eq!(balance.overrun_nano_usd, 4 * 10_950);
    spendguard_testkit::invariants::check(stack.ledger.store().pool())
        .await
        .unwrap();
}
