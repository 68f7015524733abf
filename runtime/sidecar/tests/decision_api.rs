//! The decision API over gRPC and HTTP/JSON: decide, commit, release, replays and stable codes.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use spendguard_proto::sidecar::v1 as pb;
use support::*;

fn code(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("spendguard-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn decide(call_id: &str, max_output_tokens: u32) -> pb::DecideRequest {
    pb::DecideRequest {
        call_id: call_id.into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        input_tokens_upper_bound: 1_000,
        max_output_tokens: Some(max_output_tokens),
        choices: None,
        run_id: String::new(),
        workflow_id: "wf-1".into(),
    }
}

#[tokio::test]
async fn grpc_decide_commit_release_and_replays() {
    let mut stack = Stack::start(Options::default()).await;
    let addr = stack.sidecar().grpc_addr;
    let mut client = pb::sidecar_client::SidecarClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let d = client
        .decide(decide("g-1", 500))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.decision(), pb::Decision::Continue);
    assert_eq!(d.reason, "WITHIN_BUDGET");
    // 1000 input tokens at 150 + 500 output tokens at 600 nano-USD.
    assert_eq!(d.reserved_nano_usd, 150_000 + 300_000);
    assert_eq!(d.max_output_tokens, 500);
    assert_eq!(d.contract_version, "test-contract");
    assert_eq!(d.pricing_version, "test-2026-11");
    assert_eq!(stack.balance().await.reserved_nano_usd, 450_000);

    let again = client
        .decide(decide("g-1", 500))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.reservation_id, d.reservation_id);
    let conflict = client.decide(decide("g-1", 501)).await.unwrap_err();
    assert_eq!(code(&conflict), "IDEMPOTENCY_CONFLICT");

    let usage = r#"{"prompt_tokens": 800, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 200}}"#;
    let commit = pb::CommitRequest {
        call_id: "g-1".into(),
        usage_format: "openai_chat".into(),
        usage_json: usage.into(),
    };
    let c = client.commit(commit.clone()).await.unwrap().into_inner();
    // 600 uncached at 150 + 200 cached at 75 + 100 output at 600.
    assert_eq!(c.actual_nano_usd, 90_000 + 15_000 + 60_000);
    assert_eq!(c.committed_nano_usd, 165_000);
    assert_eq!(c.released_nano_usd, 450_000 - 165_000);
    assert!(!c.replayed);
    let replay = client.commit(commit).await.unwrap().into_inner();
    assert!(replay.replayed);
    assert_eq!(replay.committed_nano_usd, 165_000);
    let late = client
        .release(pb::ReleaseRequest {
            call_id: "g-1".into(),
            reason: "late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&late), "CALL_ALREADY_RESOLVED");
    let balance = stack.balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, 165_000)
    );

    client.decide(decide("g-2", 10)).await.unwrap();
    let released = client
        .release(pb::ReleaseRequest {
            call_id: "g-2".into(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released_nano_usd, 150_000 + 6_000);

    let unknown = client
        .release(pb::ReleaseRequest {
            call_id: "nope".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(code(&unknown), "CALL_NOT_FOUND");
    let mut bad = decide("g-3", 10);
    bad.provider = "cohere".into();
    let bad = client.decide(bad).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let bad_usage = client
        .commit(pb::CommitRequest {
            call_id: "g-2".into(),
            usage_format: "openai_chat".into(),
            usage_json: "{".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(code(&bad_usage), "USAGE_INVALID");
}

#[tokio::test]
async fn http_errors_have_stable_codes_and_change_nothing() {
    let mut stack = Stack::start(Options::default()).await;
    let decide = stack.url("/v1/spendguard/decide");
    let cases = [
        (
            json!({"call_id": "h 1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1, "max_output_tokens": -1}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1, "choices": 0}),
            400,
            "INVALID_ARGUMENT",
        ),
        // A workflow id the ledger could not record (too long; a control character).
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1, "workflow_id": "w".repeat(257)}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1, "workflow_id": "wf\t1"}),
            400,
            "INVALID_ARGUMENT",
        ),
        // A valid name, but too long to prefix with `runs/` as the run's own budget id.
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1, "run_id": "r".repeat(250)}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1, "choices": 129}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": -1}),
            400,
            "INVALID_JSON",
        ),
        (
            json!({"call_id": "h-1", "provider": "openai", "model": "gpt-4o-mini", "input_tokens_upper_bound": 1, "extra": 1}),
            400,
            "INVALID_JSON",
        ),
    ];
    for (body, status, code) in cases {
        let reply = post_json(&decide, &[], &body).await;
        assert_eq!(reply.status, status, "{body}");
        assert_eq!(reply.json()["error"]["code"], code, "{body}");
    }
    let reply = post_json(
        &stack.url("/v1/spendguard/commit"),
        &[],
        &json!({"call_id": "missing", "usage_format": "anthropic", "usage": {"input_tokens": 1, "output_tokens": 1}}),
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "CALL_NOT_FOUND");
    let balance = stack.balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, 0)
    );
}

#[tokio::test]
async fn settlements_without_money_and_a_misconfigured_guard_have_stable_codes() {
    // Goal: the decision API's remaining stable codes, each over HTTP with its status:
    // NO_RESERVATION (settling a call that was refused), RESERVATION_EXPIRED (releasing a call
    // whose reservation's TTL passed), GUARD_MISCONFIGURED (the ledger holds the run's budget
    // with another limit than the contract's), and nothing moves for any of them; while a
    // commit after the TTL is booked late, its usage all overrun, never dropped.
    let mut stack = Stack::start(Options {
        contract: json!({"per_run_limit_nano_usd": 5_000_000}),
        flags: vec!["--reservation-ttl-ms=1000".into()],
        ..Options::default()
    })
    .await;
    let base = stack.url("");
    let settle = |path: &'static str, call_id: &'static str| {
        let url = format!("{base}{path}");
        async move {
            post_json(
                &url,
                &[],
                &json!({"call_id": call_id, "usage_format": "openai_chat",
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
            )
            .await
        }
    };

    let refused = stack
        .decide_ok(&json!({"call_id": "c-stopped", "provider": "openai",
                           "model": "gpt-unknown", "input_tokens_upper_bound": 1}))
        .await;
    assert_eq!(refused["decision"], "STOP", "{refused}");
    let reply = settle("/v1/spendguard/commit", "c-stopped").await;
    assert_eq!(reply.status, 409, "{}", reply.json());
    assert_eq!(reply.json()["error"]["code"], "NO_RESERVATION");

    // Their TTL (1 s) passed before they settle; the sweep has not run yet.
    for call_id in ["c-late", "c-gone"] {
        let allowed = stack.decide_ok(&decide_body(call_id, 100)).await;
        assert_eq!(allowed["decision"], "CONTINUE", "{allowed}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let reply = post_json(
        &stack.url("/v1/spendguard/release"),
        &[],
        &json!({"call_id": "c-gone", "reason": "client_gone"}),
    )
    .await;
    assert_eq!(reply.status, 409, "{}", reply.json());
    assert_eq!(reply.json()["error"]["code"], "RESERVATION_EXPIRED");
    let late = settle("/v1/spendguard/commit", "c-late").await;
    assert_eq!(late.status, 200, "{}", late.json());
    let late = late.json();
    assert_eq!(late["late"], true, "{late}");
    assert_eq!(late["committed_nano_usd"], 0);
    let overrun = late["overrun_nano_usd"].as_i64().unwrap();
    assert!(overrun > 0 && late["actual_nano_usd"] == overrun, "{late}");

    // The run's budget, as an operator (or an earlier contract) set it: 1 USD, not 0.005.
    stack
        .ledger
        .client
        .upsert_budget(spendguard_proto::ledger::v1::UpsertBudgetRequest {
            tenant_id: TENANT.into(),
            budget_id: "runs/r-1".into(),
            limit_nano_usd: 1_000_000_000,
            soft_cap_nano_usd: 0,
            window: spendguard_proto::ledger::v1::BudgetWindow::Lifetime.into(),
        })
        .await
        .unwrap();
    let mut run_call = decide_body("c-run", 100);
    run_call["run_id"] = json!("r-1");
    let reply = post_json(&stack.url("/v1/spendguard/decide"), &[], &run_call).await;
    assert_eq!(reply.status, 503, "{}", reply.json());
    assert_eq!(reply.json()["error"]["code"], "GUARD_MISCONFIGURED");

    stack
        .ledger
        .client
        .sweep_expired(spendguard_proto::ledger::v1::SweepExpiredRequest {
            max_reservations: 10,
        })
        .await
        .unwrap();
    let balance = stack.balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, 0),
        "nothing held or committed"
    );
    assert_eq!(
        balance.overrun_nano_usd, overrun,
        "the late usage is booked"
    );
}

#[tokio::test]
async fn grpc_soft_cap_decision_names_a_pending_ledger_approval() {
    // Goal: REQUIRE_APPROVAL carries the id of an approval the ledger holds as pending, a replay
    // names the same one, and nothing stays reserved. Method: a soft cap below every worst case.
    use spendguard_proto::ledger::v1 as ledger_pb;
    let mut stack = Stack::start(Options {
        limit: 100_000_000,
        soft_cap: 100_000,
        ..Options::default()
    })
    .await;
    let addr = stack.sidecar().grpc_addr;
    let mut client = pb::sidecar_client::SidecarClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let d = client
        .decide(decide("a-1", 500))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.decision(), pb::Decision::RequireApproval);
    assert_eq!(d.reason, "SOFT_CAP_REACHED");
    assert!(!d.approval_id.is_empty());
    assert!(d.reservation_id.is_empty());
    let again = client
        .decide(decide("a-1", 500))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.approval_id, d.approval_id);

    let pending = stack
        .ledger
        .client
        .list_approvals(ledger_pb::ListApprovalsRequest {
            tenant_id: TENANT.into(),
            state: ledger_pb::ApprovalState::Pending.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].approval_id, d.approval_id);
    assert_eq!(pending[0].amount_nano_usd, 150_000 + 300_000);
    assert_eq!(pending[0].context.as_ref().unwrap().call_id, "a-1");
    assert_eq!(pending[0].context.as_ref().unwrap().workflow_id, "wf-1");
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
}

/// A stack whose budget has a soft cap of 500,000 nano-USD, far under its limit.
async fn soft_cap_stack() -> Stack {
    Stack::start(Options {
        limit: 100_000_000,
        soft_cap: 500_000,
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn only_settlements_nobody_waits_on_may_be_held_by_the_ledger() {
    // Goal: the proxy's settlements (sent after the response went out) ask the ledger to batch
    // them (`deferrable`); a Commit or Release through the decision API, whose caller waits,
    // never does, nor does a decision. Method: the ledger's count of commands by urgency.
    let mut stack = Stack::start(Options::default()).await;
    let deferrable = stack.ledger.commands("deferrable");
    for _ in 0..3 {
        let reply = post_json(
            &stack.url("/v1/chat/completions"),
            &[OPENAI_KEY],
            &chat_body("gpt-4o-mini", false),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    stack.settled_balance().await;
    stack.wait_no_open_calls().await;
    assert_eq!(stack.ledger.commands("deferrable"), deferrable + 3);

    let now = stack.ledger.commands("now");
    for (call_id, path, settle) in [
        (
            "api-commit",
            "/v1/spendguard/commit",
            json!({"usage_format": "openai_chat", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        ),
        (
            "api-release",
            "/v1/spendguard/release",
            json!({"reason": "not_called"}),
        ),
    ] {
        stack.decide_ok(&decide_body(call_id, 100)).await;
        let mut body = settle;
        body["call_id"] = json!(call_id);
        let reply = post_json(&stack.url(path), &[], &body).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    assert_eq!(stack.ledger.commands("deferrable"), deferrable + 3);
    // Two decisions and two settlements, and the sidecar's lease renewals meanwhile.
    assert!(stack.ledger.commands("now") >= now + 4);
}

/// A decide body of 1,000 input tokens: 150,000 nano-USD, plus 600 per output token.
fn decide_body(call_id: &str, max_output_tokens: u32) -> serde_json::Value {
    json!({"call_id": call_id, "provider": "openai", "model": "gpt-4o-mini",
           "input_tokens_upper_bound": 1_000, "max_output_tokens": max_output_tokens})
}

#[tokio::test]
async fn a_forgotten_call_is_never_continued_under_a_resolved_reservation() {
    // Goal: a retry the sidecar no longer remembers, of a call whose reservation was already
    // resolved, is never answered CONTINUE under a reservation that holds no money. A sidecar
    // forgets calls TTL + 5 min after deciding them (or loses them in a restart, or the client
    // lost the answer). Method: a REQUIRE_APPROVAL (its reservation is released at once) and a
    // committed CONTINUE; the call table emptied as the forget task does; both call ids again:
    // the first is answered REQUIRE_APPROVAL again with its approval (found by the call id), the
    // second 409 CALL_ALREADY_RESOLVED; nothing reserved. Before the fix the first answered
    // CONTINUE: the balances the ledger replays no longer include the released amount, so the
    // soft cap looked uncrossed. After a restart (a new fencing epoch, which is not part of
    // the ledger's idempotency fingerprint) the same retries get the same answers.
    let mut stack = soft_cap_stack().await;
    let decide_url = stack.url("/v1/spendguard/decide");
    // 1,000 input + 500 output tokens: 450,000 nano-USD, under the soft cap.
    let small = post_json(&decide_url, &[], &decide_body("c-small", 500)).await;
    assert_eq!(small.json()["decision"], "CONTINUE");
    let committed = post_json(
        &stack.url("/v1/spendguard/commit"),
        &[],
        &serde_json::json!({"call_id": "c-small", "usage_format": "openai_chat",
                            "usage": {"prompt_tokens": 10, "completion_tokens": 10}}),
    )
    .await;
    assert_eq!(committed.status, 200);
    // 1,000 input + 1,000 output tokens: 750,000 nano-USD would cross the soft cap.
    let big = post_json(&decide_url, &[], &decide_body("c-big", 1_000)).await;
    assert_eq!(big.json()["decision"], "REQUIRE_APPROVAL");
    let approval_id = big.json()["approval_id"].clone();
    assert!(approval_id.is_string(), "{}", big.json());

    assert_eq!(
        stack
            .sidecar()
            .decider
            .forget_older_than(std::time::Duration::ZERO),
        2
    );
    let again = post_json(&decide_url, &[], &decide_body("c-big", 1_000)).await;
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["decision"], "REQUIRE_APPROVAL");
    assert_eq!(again.json()["approval_id"], approval_id);
    assert_eq!(again.json()["replayed"], true);
    assert_eq!(again.json()["budget_id"], big.json()["budget_id"]);
    let again = post_json(&decide_url, &[], &decide_body("c-small", 500)).await;
    assert_eq!(
        again.status,
        409,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["error"]["code"], "CALL_ALREADY_RESOLVED");
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
    stack.stop_sidecar().await;
    stack.start_sidecar().await;
    let decide_url = stack.url("/v1/spendguard/decide");
    let again = post_json(&decide_url, &[], &decide_body("c-big", 1_000)).await;
    assert_eq!(
        again.json()["decision"],
        "REQUIRE_APPROVAL",
        "{}",
        again.json()
    );
    assert_eq!(again.json()["approval_id"], approval_id);
    let again = post_json(&decide_url, &[], &decide_body("c-small", 500)).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["error"]["code"], "CALL_ALREADY_RESOLVED");
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
}

#[tokio::test]
async fn a_call_retried_after_a_restart_gets_its_reservation_back_and_settles_it() {
    // Goal: the sidecar restarted between a CONTINUE and its retry (the client never got the
    // answer); the retry continues under the same reservation, which the new sidecar settles
    // with its new epoch. Before, the ledger answered IDEMPOTENCY_CONFLICT (its fingerprint
    // held the epoch), and the reservation stayed held until its TTL.
    let mut stack = soft_cap_stack().await;
    let body = decide_body("c-restart", 500);
    let first = post_json(&stack.url("/v1/spendguard/decide"), &[], &body).await;
    assert_eq!(first.json()["decision"], "CONTINUE");
    let epoch = stack.sidecar().lease.epoch_for_decision().unwrap();
    stack.stop_sidecar().await;
    stack.start_sidecar().await;
    assert_eq!(
        stack.sidecar().lease.epoch_for_decision().unwrap(),
        epoch + 1
    );

    let again = post_json(&stack.url("/v1/spendguard/decide"), &[], &body).await;
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["decision"], "CONTINUE");
    assert_eq!(again.json()["replayed"], true);
    assert_eq!(
        again.json()["reservation_id"],
        first.json()["reservation_id"]
    );
    let committed = post_json(
        &stack.url("/v1/spendguard/commit"),
        &[],
        &json!({"call_id": "c-restart", "usage_format": "openai_chat",
                "usage": {"prompt_tokens": 10, "completion_tokens": 10}}),
    )
    .await;
    assert_eq!(
        committed.status,
        200,
        "{}",
        String::from_utf8_lossy(&committed.body)
    );
    let balance = stack.balance().await;
    assert_eq!(balance.reserved_nano_usd, 0);
    assert!(balance.committed_nano_usd > 0);
}

#[tokio::test]
async fn a_call_with_an_approval_is_answered_require_approval_though_its_reservation_stayed_open() {
    // Goal: once a call has opened an approval, a replay of it answers that REQUIRE_APPROVAL,
    // whatever the balances say now. Here the approval exists and the call's reservation is
    // still open, as when the release after opening the approval failed and the sidecar then
    // forgot the call: the replay releases the reservation and answers REQUIRE_APPROVAL with
    // the approval, though the call is now far under the soft cap (before: CONTINUE).
    use spendguard_proto::ledger::v1 as ledger_pb;
    let mut stack = soft_cap_stack().await;
    let decide_url = stack.url("/v1/spendguard/decide");
    let body = decide_body("c-open", 500);
    let first = post_json(&decide_url, &[], &body).await;
    assert_eq!(first.json()["decision"], "CONTINUE");
    assert!(stack.balance().await.reserved_nano_usd > 0);

    // The approval an earlier try of this call opened.
    let (scope_id, epoch): (String, i64) =
        sqlx::query_as("SELECT scope_id, epoch FROM fencing_scopes WHERE tenant_id = $1")
            .bind(TENANT)
            .fetch_one(stack.ledger.store().pool())
            .await
            .unwrap();
    let snapshot = spendguard_core::pricing::Pricing::new(pricing()).unwrap();
    let opened = stack
        .ledger
        .client
        .create_approval(ledger_pb::CreateApprovalRequest {
            tenant_id: TENANT.into(),
            idempotency_key: "c-open".into(),
            budget_ids: vec![BUDGET.into()],
            budget_id: BUDGET.into(),
            amount_nano_usd: 750_000,
            fencing: Some(ledger_pb::FencingToken {
                scope_id: scope_id.clone(),
                epoch: u64::try_from(epoch).unwrap(),
            }),
            ttl_ms: 600_000,
            reason_code: "SOFT_CAP_REACHED".into(),
            requested_by: scope_id,
            pricing: Some(spendguard_sidecar::bundle::pricing_ref(&snapshot)),
            bundle_sha256_hex: String::new(),
            context: Some(ledger_pb::DecisionContext {
                call_id: "c-open".into(),
                provider: "openai".into(),
                model: "gpt-4o-mini".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();

    stack
        .sidecar()
        .decider
        .forget_older_than(std::time::Duration::ZERO);
    let again = post_json(&decide_url, &[], &body).await;
    assert_eq!(
        again.status,
        200,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["decision"], "REQUIRE_APPROVAL");
    assert_eq!(again.json()["approval_id"], opened.approval_id);
    assert_eq!(again.json()["replayed"], true);
    assert_eq!(
        stack.balance().await.reserved_nano_usd,
        0,
        "the reservation went back"
    );
}

#[tokio::test]
async fn pricing_older_than_the_contract_accepts_stops_the_call_or_marks_its_evidence() {
    // S22: pricing stale beyond the contract's threshold follows the contract's policy. Stop (the
    // default) refuses with PRICING_STALE and reserves nothing; continue decides as usual and
    // marks the decision and the ledger's evidence `pricing_stale` (the reservation's event and
    // an approval's context); fresh pricing is unmarked.
    let stale_at = "2020-01-01T00:00:00Z";
    let mut stopping = aged_pricing_stack(None, stale_at).await;
    let stopped = decide_json(&stopping, "c-stale", 10).await;
    assert_eq!(stopped["decision"], "STOP", "{stopped}");
    assert_eq!(stopped["reason"], "PRICING_STALE");
    assert!(stopped["reservation_id"].is_null());
    let proxied = post_json(
        &stopping.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(proxied.status, 402);
    assert_eq!(proxied.json()["error"]["code"], "PRICING_STALE");
    assert!(stopping.upstream_requests().is_empty());
    assert_eq!(stopping.balance().await.reserved_nano_usd, 0);
    assert_eq!(reservation_events(&stopping).await.len(), 0);

    let continuing = aged_pricing_stack(Some("continue"), stale_at).await;
    let marked = decide_json(&continuing, "c-marked", 10).await;
    assert_eq!(marked["decision"], "CONTINUE", "{marked}");
    assert_eq!(marked["pricing_stale"], true);
    let events = reservation_events(&continuing).await;
    assert_eq!(events.len(), 1);
    let context = &events[0]["data"]["context"];
    assert_eq!(context["pricing_stale"], true, "{}", events[0]);
    // 1,000 output tokens cross the soft cap: the approval's stored context is marked too.
    let approval = decide_json(&continuing, "c-approval", 1_000).await;
    assert_eq!(approval["decision"], "REQUIRE_APPROVAL", "{approval}");
    assert_eq!(approval["pricing_stale"], true);
    let stored: serde_json::Value = sqlx::query_scalar("SELECT context FROM approvals")
        .fetch_one(continuing.ledger.store().pool())
        .await
        .unwrap();
    assert_eq!(stored["decision"]["pricing_stale"], true, "{stored}");
    // What an alert compares before calls start to stop: 2020-01-01T00:00:00Z and 24 hours.
    let metrics = continuing.metrics_text();
    assert!(
        metrics.contains("spendguard_sidecar_pricing_published_timestamp_seconds 1577836800"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spendguard_sidecar_pricing_max_age_seconds 86400"),
        "{metrics}"
    );

    let fresh = aged_pricing_stack(None, &chrono::Utc::now().to_rfc3339()).await;
    let unmarked = decide_json(&fresh, "c-fresh", 10).await;
    assert_eq!(unmarked["decision"], "CONTINUE", "{unmarked}");
    assert_eq!(unmarked["pricing_stale"], false);
    let events = reservation_events(&fresh).await;
    assert_eq!(events.len(), 1);
    assert!(
        events[0]["data"]["context"].get("pricing_stale").is_none(),
        "{}",
        events[0]
    );
}

/// A soft-cap stack whose pricing was published at `published_at`, under a contract that accepts
/// pricing at most a day old and then does `on_stale` (its default when `None`).
async fn aged_pricing_stack(on_stale: Option<&str>, published_at: &str) -> Stack {
    let mut max_age = json!({"hours": 24});
    if let Some(on_stale) = on_stale {
        max_age["on_stale"] = json!(on_stale);
    }
    Stack::start(Options {
        limit: 100_000_000,
        soft_cap: 500_000,
        contract: json!({ "pricing_max_age": max_age }),
        pricing_published_at: Some(published_at.to_owned()),
        ..Options::default()
    })
    .await
}

/// The HTTP decide of [`decide_body`], answered 200, as JSON.
async fn decide_json(stack: &Stack, call_id: &str, max_output_tokens: u32) -> serde_json::Value {
    stack
        .decide_ok(&decide_body(call_id, max_output_tokens))
        .await
}

/// The `reservation.reserved` events in the ledger's outbox, parsed.
async fn reservation_events(stack: &Stack) -> Vec<serde_json::Value> {
    spendguard_testkit::ledger::outbox_events(stack.ledger.store().pool(), "reservation.reserved")
        .await
        .unwrap()
}

/// Decides `call_id` over HTTP in the background (its answer as JSON).
fn decide_in_background(stack: &Stack, call_id: &str) -> tokio::task::JoinHandle<Value> {
    let url = stack.url("/v1/spendguard/decide");
    let body = decide_body(call_id, 100);
    tokio::spawn(async move {
        let reply = post_json(&url, &[], &body).await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()
    })
}

/// Gives B's decision time to reach the wait, and checks that it waits for A's settlement.
async fn assert_b_waits<T>(decide: &tokio::task::JoinHandle<T>) {
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !decide.is_finished(),
        "the decision waits for the settlement in flight"
    );
}

/// The ledger stops while B waits for A's settlement in flight, which then ends: B's retry
/// after the wait cannot reach the ledger.
async fn ledger_gone_while_b_waits<T>(
    stack: &mut Stack,
    in_flight: spendguard_sidecar::settling::SettlingGuard,
    decide: &tokio::task::JoinHandle<T>,
) {
    assert_b_waits(decide).await;
    stack.ledger.stop().await;
    drop(in_flight);
}

/// Settles call A (`a-held`) as the proxy's background settlement would while B's decision
/// waits: A is committed (1 + 1 tokens, 750 nano-USD), then its in-flight mark ends. B's answer.
async fn a_commits_while_b_waits(
    stack: &Stack,
    (in_flight, decide): (
        spendguard_sidecar::settling::SettlingGuard,
        tokio::task::JoinHandle<Value>,
    ),
) -> Value {
    assert_b_waits(&decide).await;
    let reply = post_json(
        &stack.url("/v1/spendguard/commit"),
        &[],
        &json!({"call_id": "a-held", "usage_format": "openai_chat",
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.json());
    drop(in_flight);
    decide.await.unwrap()
}

/// Call A decided and holding its reservation, a settlement marked in flight as the proxy marks
/// A's, and call B being decided meanwhile: (A's in-flight mark, B's answer to come).
async fn b_decided_while_a_settles(
    stack: &Stack,
) -> (
    spendguard_sidecar::settling::SettlingGuard,
    tokio::task::JoinHandle<Value>,
) {
    let held = stack.decide_ok(&decide_body("a-held", 100)).await;
    assert_eq!(held["decision"], "CONTINUE", "{held}");
    let in_flight = stack.sidecar().decider.settlement_started();
    (in_flight, decide_in_background(stack, "b-next"))
}

#[tokio::test]
async fn a_refusal_for_lack_of_budget_waits_for_the_settlements_in_flight() {
    // Goal: an agent calling one LLM after another is not refused because the previous call's
    // reservation was still held while its background commit was on its way (the demo's last
    // calls varied with this timing). Method: a budget that fits one worst case (210,000) but
    // not two; call A holds its reservation and a settlement is marked in flight, as the proxy
    // marks it before the answer's end reaches the client; call B is decided meanwhile and must
    // wait; A commits 750; B reserves. A third call, with nothing in flight, is refused at once.
    let stack = Stack::start(Options {
        limit: 300_000,
        ..Options::default()
    })
    .await;
    let next = a_commits_while_b_waits(&stack, b_decided_while_a_settles(&stack).await).await;
    assert_eq!(next["decision"], "CONTINUE", "{next}");
    let over = stack.decide_ok(&decide_body("c-over", 100)).await;
    assert_eq!(over["decision"], "STOP", "{over}");
    assert_eq!(over["reason"], "BUDGET_EXHAUSTED", "{over}");
}

#[tokio::test]
async fn a_soft_cap_is_judged_again_once_the_settlements_in_flight_landed() {
    // Goal: as above for the soft cap: a call is not sent for approval because the previous
    // call's reservation was still held while its commit was on its way. Method: a soft cap of
    // 300,000 and calls of 210,000 worst case; B's reservation crosses it while A's is held and
    // A's settlement is in flight; once A committed 750, B is judged on the balances again.
    let stack = Stack::start(Options {
        soft_cap: 300_000,
        ..Options::default()
    })
    .await;
    let next = a_commits_while_b_waits(&stack, b_decided_while_a_settles(&stack).await).await;
    assert_eq!(next["decision"], "CONTINUE", "{next}");
}

#[tokio::test]
async fn a_refusal_stands_when_its_retry_cannot_reach_the_ledger() {
    // Goal: the retry after waiting for settlements never turns the ledger's refusal into a 503,
    // let alone a fail-open CONTINUE. Method: as above under a fail-open contract, but the
    // ledger stops while the refused call waits, so its retry cannot be sent.
    let mut stack = Stack::start(Options {
        limit: 300_000,
        contract: json!({"fail_policy": "open"}),
        ..Options::default()
    })
    .await;
    let (in_flight, next) = b_decided_while_a_settles(&stack).await;
    ledger_gone_while_b_waits(&mut stack, in_flight, &next).await;
    let next = next.await.unwrap();
    assert_eq!(next["decision"], "STOP", "{next}");
    assert_eq!(next["reason"], "BUDGET_EXHAUSTED", "{next}");
}

#[tokio::test]
async fn a_crossed_soft_cap_stands_when_the_balances_cannot_be_read_again() {
    // Goal: the soft cap is judged again only on balances that were read; a ledger gone during
    // the wait leaves the first verdict (approval needed), which then cannot be recorded: 503,
    // never a CONTINUE. Method: as the soft-cap test, with the ledger stopped during the wait.
    let mut stack = Stack::start(Options {
        soft_cap: 300_000,
        ..Options::default()
    })
    .await;
    let held = stack.decide_ok(&decide_body("a-held", 100)).await;
    assert_eq!(held["decision"], "CONTINUE", "{held}");
    let in_flight = stack.sidecar().decider.settlement_started();
    let url = stack.url("/v1/spendguard/decide");
    let next = tokio::spawn(async move { post_json(&url, &[], &decide_body("b-next", 100)).await });
    ledger_gone_while_b_waits(&mut stack, in_flight, &next).await;
    let reply = next.await.unwrap();
    assert_eq!(
        reply.status,
        503,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}
