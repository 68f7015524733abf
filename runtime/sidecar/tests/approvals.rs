//! What a call answered REQUIRE_APPROVAL gets when it is retried once a human decided (S16):
//! approved, it resumes once, through the ledger's checks, under a reservation of its own;
//! denied or expired, it is a STOP naming the approval; still pending, REQUIRE_APPROVAL again.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use spendguard_proto::ledger::v1 as pb;
use support::*;

/// 1,000 input and 1,000 output tokens of gpt-4o-mini: 750,000 nano-USD, past the soft cap.
const BIG: i64 = 750_000;

fn decide_body(call_id: &str) -> Value {
    json!({"call_id": call_id, "provider": "openai", "model": "gpt-4o-mini",
           "input_tokens_upper_bound": 1_000, "max_output_tokens": 1_000})
}

/// A stack whose budget has a soft cap of 500,000 nano-USD under a limit of `limit`.
async fn soft_cap_stack(limit: i64) -> Stack {
    Stack::start(Options {
        limit,
        soft_cap: 500_000,
        ..Options::default()
    })
    .await
}

async fn decide(stack: &Stack, call_id: &str) -> Value {
    stack.decide_ok(&decide_body(call_id)).await
}

/// A decide of `call_id` over HTTP, whatever its status.
async fn decide_reply(stack: &Stack, call_id: &str) -> Reply {
    post_json(
        &stack.url("/v1/spendguard/decide"),
        &[],
        &decide_body(call_id),
    )
    .await
}

/// Asks for approval with `call_id` and returns the approval's id.
async fn ask(stack: &Stack, call_id: &str) -> String {
    let asked = decide(stack, call_id).await;
    assert_eq!(asked["decision"], "REQUIRE_APPROVAL", "{asked}");
    asked["approval_id"].as_str().unwrap().to_owned()
}

async fn resolve(stack: &mut Stack, approval_id: &str, decision: pb::ApprovalDecision) {
    stack
        .ledger
        .client
        .resolve_approval(pb::ResolveApprovalRequest {
            tenant_id: TENANT.into(),
            approval_id: approval_id.into(),
            decision: decision.into(),
            approver: "alice@example.com".into(),
            reason: "reviewed".into(),
        })
        .await
        .unwrap();
}

/// Reservations of the call, by idempotency key: (key, state, amount).
async fn reservations_of(stack: &Stack, call_id: &str) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT idempotency_key, state, amount_nano_usd FROM reservations
          WHERE idempotency_key LIKE $1 || '%' ORDER BY created_at, idempotency_key",
    )
    .bind(call_id)
    .fetch_all(stack.ledger.store().pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn an_approved_call_resumes_once_under_a_reservation_of_its_own() {
    // Goal: S16's resume. A retry while the approval is pending is REQUIRE_APPROVAL again; once
    // approved, the retry is CONTINUE (reason APPROVED) under a fresh reservation keyed by the
    // call and the approval, checked by the ledger again; further retries replay it and never
    // reserve twice; it settles like any call; and a sidecar that forgot the call, retried
    // after the settlement, refuses it. Method: the decision API and the ledger's rows.
    let mut stack = soft_cap_stack(100_000_000).await;
    let approval_id = ask(&stack, "c-1").await;
    let pending = decide(&stack, "c-1").await;
    assert_eq!(pending["decision"], "REQUIRE_APPROVAL");
    assert_eq!(pending["approval_id"], approval_id.as_str());
    assert_eq!(pending["replayed"], true);
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);

    resolve(&mut stack, &approval_id, pb::ApprovalDecision::Approve).await;
    let resumed = decide(&stack, "c-1").await;
    assert_eq!(resumed["decision"], "CONTINUE", "{resumed}");
    assert_eq!(resumed["reason"], "APPROVED");
    assert_eq!(resumed["approval_id"], approval_id.as_str());
    assert_eq!(resumed["replayed"], false);
    assert_eq!(resumed["reserved_nano_usd"], BIG);
    assert_eq!(stack.balance().await.reserved_nano_usd, BIG);
    let again = decide(&stack, "c-1").await;
    assert_eq!(again["decision"], "CONTINUE");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["reservation_id"], resumed["reservation_id"]);
    assert_eq!(
        stack.balance().await.reserved_nano_usd,
        BIG,
        "reserved once"
    );
    assert_eq!(
        reservations_of(&stack, "c-1").await,
        [
            ("c-1".to_owned(), "released".to_owned(), BIG),
            (
                format!("c-1/approved/{approval_id}"),
                "reserved".to_owned(),
                BIG
            ),
        ]
    );
    // The resumed reservation's signed event names the approval it goes ahead under; the
    // first one's does not.
    let contexts: Vec<Value> = stack
        .events("reservation.reserved")
        .await
        .iter()
        .map(|e| e["data"]["context"].clone())
        .collect();
    assert_eq!(contexts.len(), 2, "{contexts:?}");
    assert!(contexts[0].get("approval_id").is_none(), "{contexts:?}");
    assert_eq!(contexts[1]["approval_id"], approval_id.as_str());

    let committed = post_json(
        &stack.url("/v1/spendguard/commit"),
        &[],
        &json!({"call_id": "c-1", "usage_format": "openai_chat",
                "usage": {"prompt_tokens": 10, "completion_tokens": 10}}),
    )
    .await;
    assert_eq!(committed.status, 200);
    let balance = stack.balance().await;
    assert_eq!(balance.reserved_nano_usd, 0);
    assert_eq!(balance.committed_nano_usd, 10 * 150 + 10 * 600);

    stack
        .sidecar()
        .decider
        .forget_older_than(std::time::Duration::ZERO);
    let forgotten = decide_reply(&stack, "c-1").await;
    assert_eq!(forgotten.status, 409, "{}", forgotten.json());
    assert_eq!(forgotten.json()["error"]["code"], "CALL_ALREADY_RESOLVED");
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
}

#[tokio::test]
async fn approval_never_skips_the_hard_cap() {
    // Goal: "approval cannot be used to exceed budget without a fresh ledger check". Method:
    // approve a call, then spend the budget down (another approved call) so the resumed call
    // no longer fits: its retry is STOP BUDGET_EXHAUSTED with its stop record, nothing held.
    let mut stack = soft_cap_stack(1_000_000).await;
    let first = ask(&stack, "c-first").await;
    let second = ask(&stack, "c-second").await;
    resolve(&mut stack, &first, pb::ApprovalDecision::Approve).await;
    resolve(&mut stack, &second, pb::ApprovalDecision::Approve).await;
    assert_eq!(decide(&stack, "c-first").await["decision"], "CONTINUE");
    let stopped = decide(&stack, "c-second").await;
    assert_eq!(stopped["decision"], "STOP", "{stopped}");
    assert_eq!(stopped["reason"], "BUDGET_EXHAUSTED");
    assert!(stopped["evidence_id"].is_string(), "{stopped}");
    assert_eq!(stack.balance().await.reserved_nano_usd, BIG);
}

/// A proxied chat call with `call_id` whose worst case (1,000 output tokens) is past the soft cap.
async fn proxied(stack: &Stack, call_id: &str) -> Reply {
    post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY, ("x-spendguard-call-id", call_id)],
        &json!({"model": "gpt-4o-mini", "max_tokens": 1_000,
                "messages": [{"role": "user", "content": "Say hello in one word."}]}),
    )
    .await
}

#[tokio::test]
async fn a_denied_or_expired_approval_stops_the_call_by_name() {
    // Goal: a denial and an expiry each end the call with a STOP of their own code
    // (APPROVAL_DENIED, APPROVAL_EXPIRED) naming the approval, deterministically: a retry, a
    // sidecar that forgot the call, and the proxy (in the provider's error format) answer the
    // same, and nothing is reserved or sent upstream. Method: approvals denied through the
    // ledger, one expired by the sweep (created an hour earlier, as if that hour had passed).
    let mut stack = soft_cap_stack(100_000_000).await;
    let denied = ask(&stack, "c-denied").await;
    let expired = ask(&stack, "c-expired").await;
    let asked = proxied(&stack, "p-denied").await;
    assert_eq!(asked.status, 402);
    assert_eq!(
        asked.json()["error"]["type"],
        "spendguard_approval_required"
    );
    let proxy_approval = asked.json()["error"]["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pending = proxied(&stack, "p-denied").await;
    assert_eq!(
        pending.status, 402,
        "a pending call is asked again, not refused as reused"
    );
    assert_eq!(
        pending.json()["error"]["approval_id"],
        proxy_approval.as_str()
    );

    resolve(&mut stack, &denied, pb::ApprovalDecision::Deny).await;
    resolve(&mut stack, &proxy_approval, pb::ApprovalDecision::Deny).await;
    let pool = stack.ledger.owner.clone();
    sqlx::query("ALTER TABLE approvals DISABLE TRIGGER approvals_resolve_once")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE approvals SET created_at = now() - interval '1 hour', expires_at = now() - interval '1 second'
          WHERE approval_id = $1::uuid",
    )
    .bind(&expired)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ALTER TABLE approvals ENABLE TRIGGER approvals_resolve_once")
        .execute(&pool)
        .await
        .unwrap();
    let swept = stack
        .ledger
        .client
        .sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(swept.approvals_expired, 1);

    let mut evidence = Vec::new();
    for (call_id, approval_id, code) in [
        ("c-denied", &denied, "APPROVAL_DENIED"),
        ("c-expired", &expired, "APPROVAL_EXPIRED"),
    ] {
        let stop = decide(&stack, call_id).await;
        assert_eq!(stop["decision"], "STOP", "{stop}");
        assert_eq!(stop["reason"], code);
        assert_eq!(stop["approval_id"], approval_id.as_str());
        assert_eq!(stop["budget_id"], BUDGET);
        let retry = decide(&stack, call_id).await;
        assert_eq!(retry["reason"], code, "a retry");
        assert_eq!(
            retry["evidence_id"], stop["evidence_id"],
            "a retry is the same STOP"
        );
        evidence.push((call_id, code, stop["evidence_id"].clone()));
    }
    let refused = proxied(&stack, "p-denied").await;
    assert_eq!(refused.status, 402, "{}", refused.json());
    assert_eq!(refused.json()["error"]["code"], "APPROVAL_DENIED");
    assert_eq!(
        refused.json()["error"]["approval_id"],
        proxy_approval.as_str()
    );
    assert_eq!(refused.header("x-spendguard-code"), Some("APPROVAL_DENIED"));
    assert!(stack.upstream_requests().is_empty());
    evidence.push((
        "p-denied",
        "APPROVAL_DENIED",
        refused.json()["error"]["evidence_id"].clone(),
    ));

    // Each of those STOPs is published once, under the id its answer carried, with the
    // approval's amount as its worst case (the retries published nothing more).
    let stopped = stack.published("decision.stopped", 3).await;
    let published: Vec<(&str, &str, Value)> = stopped
        .iter()
        .map(|event| {
            let data = &event["data"];
            if data["call_id"] != "p-denied" {
                assert_eq!(data["worst_case_nano_usd"], BIG.to_string(), "{data}");
            }
            assert_eq!(data["budget_id"], BUDGET);
            (
                data["call_id"].as_str().unwrap(),
                data["reason"].as_str().unwrap(),
                data["record_id"].clone(),
            )
        })
        .collect();
    assert_eq!(published, evidence);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        stack.events("decision.stopped").await.len(),
        3,
        "nothing more is published"
    );

    stack
        .sidecar()
        .decider
        .forget_older_than(std::time::Duration::ZERO);
    assert_eq!(
        decide(&stack, "c-denied").await["reason"],
        "APPROVAL_DENIED",
        "the ledger's approval decides for a sidecar that forgot the call"
    );
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
}

#[tokio::test]
async fn a_call_waiting_for_approval_never_fails_open() {
    // Goal: a call past a soft cap never goes ahead unrecorded, even under an explicitly
    // fail-open contract: with the ledger gone (GetApproval fails), and with a ledger that
    // reads the approval but cannot reserve, its retry after approval is 503, nothing is let
    // through and no fail-open record is queued; once the ledger is whole the retry resumes it.
    // Method: approve, stop the ledger, retry; restart it and lock its budget windows past
    // its lock timeout, retry; unlock, retry.
    let mut stack = Stack::start(Options {
        limit: 100_000_000,
        soft_cap: 500_000,
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    let approval_id = ask(&stack, "c-open").await;
    resolve(&mut stack, &approval_id, pb::ApprovalDecision::Approve).await;
    stack.ledger.stop().await;
    let refused = decide_reply(&stack, "c-open").await;
    assert_eq!(refused.status, 503, "{}", refused.json());
    assert_eq!(refused.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
    assert!(stack.sidecar().decider.fail_open_queue().is_empty());
    assert!(stack.upstream_requests().is_empty());

    // The ledger answers GetApproval but cannot reserve (its budget windows are locked away
    // past its lock timeout): the resumed call's own reservation failed, and that too is 503.
    stack.restart_ledger().await;
    let pool = stack.ledger.owner.clone();
    let mut locker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE budget_windows IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let refused = decide_reply(&stack, "c-open").await;
    assert_eq!(refused.status, 503, "{}", refused.json());
    assert_eq!(refused.json()["error"]["code"], "DEPENDENCY_UNAVAILABLE");
    assert!(stack.sidecar().decider.fail_open_queue().is_empty());
    locker.rollback().await.unwrap();
    stack.wait_lease_held().await;
    assert!(
        reservations_of(&stack, "c-open/approved/").await.is_empty(),
        "the refused resume reserved nothing"
    );

    let resumed = decide(&stack, "c-open").await;
    assert_eq!(resumed["decision"], "CONTINUE", "{resumed}");
    assert_eq!(resumed["reason"], "APPROVED");
    assert_eq!(resumed["fail_open"], false);
}
