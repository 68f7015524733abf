//! The provider-compatible proxy against the real ledger and the mock upstream: every path
//! settles exactly once, refusals come in the provider's error format, and bad input reserves
//! nothing.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use spendguard_proto::ledger::v1 as pb;
use support::*;

/// 9 prompt tokens (22 bytes of text / 4, rounded up, + 3 for the message) at $0.15/M and
/// 16 output tokens at $0.60/M: 1_350 + 9_600 nano-USD.
const HELLO_CHAT_COST: i64 = 10_950;

#[tokio::test]
async fn openai_chat_commits_reported_usage_and_enforces_the_output_cap() {
    let mut stack = Stack::start(Options::default()).await;
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
    let body = reply.json();
    assert_eq!(body["usage"]["prompt_tokens"], 9);
    assert_eq!(reply.header("x-spendguard-decision"), Some("CONTINUE"));
    assert_eq!(reply.header("x-spendguard-reason"), Some("WITHIN_BUDGET"));
    assert_eq!(
        reply.header("x-spendguard-contract-version"),
        Some("test-contract")
    );
    assert_eq!(
        reply.header("x-spendguard-pricing-version"),
        Some("test-2026-11")
    );
    assert!(reply.header("x-spendguard-reservation-id").is_some());

    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, HELLO_CHAT_COST);
    assert_eq!(balance.overrun_nano_usd, 0);

    let sent = stack.upstream_requests();
    assert_eq!(sent.len(), 1);
    // No client limit: the contract's cap was set so the reserve is a true worst case.
    assert_eq!(sent[0]["body"]["max_completion_tokens"], 4096);
    // The app's own key passed through; the guard's headers did not.
    assert_eq!(sent[0]["headers"]["authorization"], "Bearer sk-app-test");
    assert!(sent[0]["headers"].get("x-spendguard-call-id").is_none());
}

#[tokio::test]
async fn configured_keys_replace_the_apps_own_which_otherwise_pass_through() {
    // Goal: "upstream base URLs and keys are configuration; the app's own API key passes
    // through by default". Method: a stack without key files sends each app key as it came
    // (OpenAI `Authorization`, Anthropic `x-api-key`); one given key files sends those instead.
    async fn calls(stack: &Stack) -> Vec<Value> {
        for (path, key, body) in [
            (
                "/v1/chat/completions",
                OPENAI_KEY,
                chat_body("gpt-4o-mini", false),
            ),
            ("/v1/messages", ANTHROPIC_KEY, messages_body(false)),
        ] {
            let reply = post_json(&stack.url(path), &[key], &body).await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.json());
        }
        stack.upstream_requests()
    }
    let plain = Stack::start(Options::default()).await;
    let sent = calls(&plain).await;
    assert_eq!(sent[0]["headers"]["authorization"], "Bearer sk-app-test");
    assert_eq!(sent[1]["headers"]["x-api-key"], "sk-ant-app-test");

    let keys = tempfile::tempdir().unwrap();
    let openai = keys.path().join("openai");
    let anthropic = keys.path().join("anthropic");
    std::fs::write(&openai, "sk-configured-openai\n").unwrap();
    std::fs::write(&anthropic, "sk-ant-configured\n").unwrap();
    let configured = Stack::start(Options {
        flags: vec![
            format!("--openai-api-key-file={}", openai.display()),
            format!("--anthropic-api-key-file={}", anthropic.display()),
        ],
        ..Options::default()
    })
    .await;
    let sent = calls(&configured).await;
    assert_eq!(
        sent[0]["headers"]["authorization"],
        "Bearer sk-configured-openai"
    );
    assert_eq!(sent[1]["headers"]["x-api-key"], "sk-ant-configured");
}

#[tokio::test]
async fn openai_chat_stream_passes_chunks_through_and_commits_final_usage() {
    // Goal: a chat stream passes through, its usage is committed, and the usage chunk the guard
    // asked for reaches the client only if the client asked for it too (an unchanged client
    // reading `chunk.choices[0]` would fail on a chunk without choices).
    let mut stack = Stack::start(Options::default()).await;
    let mut asking = chat_body("gpt-4o-mini", true);
    asking["stream_options"] = json!({"include_usage": true});
    for (body, usage_shown) in [(chat_body("gpt-4o-mini", true), false), (asking, true)] {
        let reply = post_json(&stack.url("/v1/chat/completions"), &[OPENAI_KEY], &body).await;
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .header("content-type")
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = String::from_utf8(reply.body.to_vec()).unwrap();
        let events: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
        // role chunk + 16 content chunks + finish chunk (+ usage chunk) + [DONE]
        assert_eq!(events.len(), 19 + usize::from(usage_shown), "{text}");
        assert_eq!(*events.last().unwrap(), "data: [DONE]");
        let usage_chunks = events
            .iter()
            .filter(|e| e.contains("\"choices\":[]") && e.contains("\"prompt_tokens\""))
            .count();
        assert_eq!(usage_chunks, usize::from(usage_shown), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    let sent = stack.upstream_requests();
    assert_eq!(sent[0]["body"]["stream_options"]["include_usage"], true);
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, 2 * HELLO_CHAT_COST);
}

#[tokio::test]
async fn several_choices_reserve_every_output_and_commit_their_usage() {
    // Goal: OpenAI chat `n` is a worst case of n outputs, and the usage of every choice is what
    // gets committed, streamed or not. Method: n = 1 and n = 3 with the same body length (so the
    // same input bound) and an explicit limit of 20 tokens per choice; their reservations differ
    // by exactly 2 × 20 output tokens at $0.60/M. Then a stream with n = 2.
    let mut stack = Stack::start(Options::default()).await;
    let chat = stack.url("/v1/chat/completions");
    let body = |n: u32, stream: bool| {
        let mut body = chat_body("gpt-4o-mini", stream);
        body["n"] = json!(n);
        body["max_completion_tokens"] = json!(20);
        body
    };
    let one = post_json(&chat, &[OPENAI_KEY], &body(1, false)).await;
    assert_eq!(one.status, 200);
    let three = post_json(&chat, &[OPENAI_KEY], &body(3, false)).await;
    assert_eq!(
        three.status,
        200,
        "{}",
        String::from_utf8_lossy(&three.body)
    );
    let answer = three.json();
    assert_eq!(answer["choices"].as_array().unwrap().len(), 3);
    assert_eq!(answer["usage"]["completion_tokens"], 48);
    let balance = stack.settled_balance().await;
    // 9 input tokens once, 16 output tokens per choice: 1_350 + 4 × 16 × 600 nano-USD.
    assert_eq!(
        balance.committed_nano_usd,
        HELLO_CHAT_COST + 1_350 + 3 * 9_600
    );

    let amounts: Vec<i64> =
        sqlx::query_scalar("SELECT amount_nano_usd FROM reservations ORDER BY amount_nano_usd")
            .fetch_all(stack.ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(amounts.len(), 2);
    assert_eq!(amounts[1] - amounts[0], 2 * 20 * 600);
    assert_eq!(stack.upstream_requests()[1]["body"]["n"], 3);

    let streamed = post_json(&chat, &[OPENAI_KEY], &body(2, true)).await;
    assert_eq!(streamed.status, 200);
    let text = String::from_utf8(streamed.body.to_vec()).unwrap();
    let events = text.lines().filter(|l| l.starts_with("data: ")).count();
    // Per choice: a role chunk, 16 content chunks and a finish chunk; then [DONE] (the usage
    // chunk the guard asked for is not shown to a client that did not ask).
    assert_eq!(events, 2 * 18 + 1, "{text}");
    let balance = stack.settled_balance().await;
    assert_eq!(
        balance.committed_nano_usd,
        HELLO_CHAT_COST + (1_350 + 3 * 9_600) + (1_350 + 2 * 9_600)
    );
}

#[tokio::test]
async fn anthropic_and_responses_streams_commit_their_usage() {
    let mut stack = Stack::start(Options::default()).await;
    let reply = post_json(
        &stack.url("/v1/messages"),
        &[ANTHROPIC_KEY, ("anthropic-version", "2023-06-01")],
        &messages_body(true),
    )
    .await;
    assert_eq!(reply.status, 200);
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    // "Say hello." = 10 bytes -> 3 + 3 = 6 input tokens at $3/M; 16 output at $15/M.
    let anthropic_cost = 6 * 3_000 + 16 * 15_000;
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, anthropic_cost);
    let sent = stack.upstream_requests();
    assert_eq!(sent[0]["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(
        sent[0]["body"]["max_tokens"], 256,
        "a client limit under the cap is kept"
    );

    let reply = post_json(
        &stack.url("/v1/responses"),
        &[OPENAI_KEY],
        &json!({"model": "gpt-4o-mini", "input": "Say hello in one word.", "stream": true}),
    )
    .await;
    assert_eq!(reply.status, 200);
    // 22 bytes -> 6 + 3 = 9 input tokens, 16 output: same as the chat call.
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, anthropic_cost + HELLO_CHAT_COST);
    assert_eq!(
        stack.upstream_requests()[1]["body"]["max_output_tokens"],
        4096
    );
}

#[tokio::test]
async fn stop_decisions_are_402_in_the_provider_format_and_reserve_nothing() {
    let mut stack = Stack::start(Options {
        // Fits the worst case of no call: 4096 output tokens at $0.60/M is 2_457_600.
        limit: 1_000_000,
        ..Options::default()
    })
    .await;
    let denied = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4-denied", false),
    )
    .await;
    assert_eq!(denied.status, 402);
    let error = &denied.json()["error"];
    assert_eq!(error["code"], "MODEL_DENIED");
    assert_eq!(error["type"], "spendguard_budget_exceeded");
    assert_eq!(error["contract_version"], "test-contract");
    assert_eq!(error["pricing_version"], "test-2026-11");
    assert_eq!(denied.header("x-spendguard-code"), Some("MODEL_DENIED"));
    assert_eq!(denied.header("x-spendguard-reason"), Some("MODEL_DENIED"));
    assert_eq!(
        denied.header("x-spendguard-pricing-version"),
        Some("test-2026-11")
    );

    let exhausted = post_json(
        &stack.url("/v1/messages"),
        &[ANTHROPIC_KEY],
        &messages_body(false),
    )
    .await;
    assert_eq!(exhausted.status, 402);
    let body = exhausted.json();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["code"], "BUDGET_EXHAUSTED");
    assert_eq!(body["error"]["budget_id"], BUDGET);

    let balance = stack.balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, 0)
    );
    assert!(
        stack.upstream_requests().is_empty(),
        "nothing reached the provider"
    );
}

#[tokio::test]
async fn soft_cap_requires_approval_and_returns_the_reservation() {
    let mut stack = Stack::start(Options {
        limit: 100_000_000,
        soft_cap: 1_000_000,
        ..Options::default()
    })
    .await;
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(reply.status, 402);
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "spendguard_approval_required");
    assert_eq!(error["code"], "SOFT_CAP_REACHED");
    assert_eq!(
        reply.header("x-spendguard-decision"),
        Some("REQUIRE_APPROVAL")
    );
    // The 402 names an approval that exists in the ledger, pending, for this call's budget.
    let approval_id = error["approval_id"]
        .as_str()
        .expect("approval id in the 402")
        .to_owned();
    let pending = stack
        .ledger
        .client
        .list_approvals(pb::ListApprovalsRequest {
            tenant_id: TENANT.into(),
            state: pb::ApprovalState::Pending.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let approval = &pending[0];
    assert_eq!(approval.approval_id, approval_id);
    assert_eq!(approval.budget_id, BUDGET);
    assert_eq!(approval.reason_code, "SOFT_CAP_REACHED");
    assert!(approval.amount_nano_usd > 0);
    assert_eq!(approval.context.as_ref().unwrap().model, "gpt-4o-mini");
    assert_eq!(approval.requested_by, format!("{TENANT}/{WORKLOAD}"));
    let balance = stack.balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, 0)
    );
    assert!(stack.upstream_requests().is_empty());
}

#[tokio::test]
async fn bad_input_is_refused_in_the_provider_format_with_nothing_reserved() {
    // Goal: issue 3's bad input (malformed JSON, an unknown model, negative or absurd output
    // limits, an oversized body) and input the guard cannot bound, on each of the three APIs,
    // streaming and not: a 4xx (402 for the contract's refusals) in that provider's own error
    // format with the stable code in the body and the header, nothing reserved and nothing sent
    // upstream. Each API names its output limit differently, so each is checked on its own. An
    // OpenAI service tier the pricing does not price is refused likewise.
    let mut stack = Stack::start(Options {
        flags: vec!["--max-body-bytes=2048".into()],
        ..Options::default()
    })
    .await;
    struct Api {
        path: &'static str,
        key: (&'static str, &'static str),
        model: &'static str,
        limit: &'static str,
        body: fn(&str) -> Value,
        unbounded: Value,
        anthropic: bool,
    }
    let apis = [
        Api {
            path: "/v1/chat/completions",
            key: OPENAI_KEY,
            model: "gpt-4o-mini",
            limit: "max_tokens",
            body: |model| json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            unbounded: json!({"model": "gpt-4o-mini", "web_search_options": {},
                              "messages": [{"role": "user", "content": "hi"}]}),
            anthropic: false,
        },
        Api {
            path: "/v1/responses",
            key: OPENAI_KEY,
            model: "gpt-4o-mini",
            limit: "max_output_tokens",
            body: |model| json!({"model": model, "input": "hi"}),
            unbounded: json!({"model": "gpt-4o-mini", "input": "hi",
                              "previous_response_id": "resp_123"}),
            anthropic: false,
        },
        Api {
            path: "/v1/messages",
            key: ANTHROPIC_KEY,
            model: "claude-sonnet-4-5",
            limit: "max_tokens",
            body: |model| {
                json!({"model": model, "max_tokens": 100,
                                 "messages": [{"role": "user", "content": "hi"}]})
            },
            unbounded: json!({"model": "claude-sonnet-4-5", "max_tokens": 100,
                              "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}],
                              "messages": [{"role": "user", "content": "hi"}]}),
            anthropic: true,
        },
    ];
    for api in &apis {
        for stream in [false, true] {
            let with = |mut body: Value, limit: Option<Value>| {
                body["stream"] = json!(stream);
                if let Some(limit) = limit {
                    body[api.limit] = limit;
                }
                serde_json::to_vec(&body).unwrap()
            };
            let mut oversized = (api.body)(api.model);
            oversized["messages"] = json!([{"role": "user", "content": "x".repeat(4096)}]);
            oversized["input"] = json!("x".repeat(4096));
            let mut cases: Vec<(Vec<u8>, u16, &str)> = vec![
                (b"{not json".to_vec(), 400, "INVALID_JSON"),
                (
                    with((api.body)(api.model), Some(json!(-5))),
                    400,
                    "INVALID_ARGUMENT",
                ),
                (
                    with((api.body)(api.model), Some(json!(1_000_000_000_000_i64))),
                    400,
                    "INVALID_ARGUMENT",
                ),
                (
                    with((api.body)(api.model), Some(json!(5000))),
                    402,
                    "MAX_OUTPUT_TOKENS_ABOVE_CAP",
                ),
                (
                    with((api.body)("model-unknown"), None),
                    402,
                    "MODEL_PRICE_UNKNOWN",
                ),
                (with(oversized, None), 413, "REQUEST_TOO_LARGE"),
                (with(api.unbounded.clone(), None), 400, "UNBOUNDED_INPUT"),
            ];
            if !api.anthropic {
                let mut priority = (api.body)(api.model);
                priority["service_tier"] = json!("priority");
                cases.push((with(priority, None), 400, "UNPRICED_TIER"));
            }
            for (body, status, code) in cases {
                let reply = post(&stack.url(api.path), &[api.key], &body).await;
                let what = format!("{} stream={stream} {code}", api.path);
                assert_eq!(
                    reply.status,
                    status,
                    "{what}: {}",
                    String::from_utf8_lossy(&reply.body)
                );
                let error = &reply.json()["error"];
                assert_eq!(error["code"], code, "{what}");
                assert_eq!(reply.header("x-spendguard-code"), Some(code), "{what}");
                let kind = error["type"].as_str().unwrap_or_default();
                if api.anthropic {
                    assert_eq!(reply.json()["type"], "error", "{what}");
                    let expected = match status {
                        413 => "request_too_large",
                        402 => "spendguard_budget_exceeded",
                        _ => "invalid_request_error",
                    };
                    assert_eq!(kind, expected, "{what}");
                } else {
                    assert!(reply.json().get("type").is_none(), "{what}");
                    assert!(error.get("param").is_some(), "{what}: OpenAI's shape");
                }
            }
        }
    }

    let balance = stack.balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, 0)
    );
    assert!(stack.upstream_requests().is_empty());
}

#[tokio::test]
async fn upstream_failures_release_and_cut_streams_commit_the_worst_case() {
    let mut stack = Stack::start(Options::default()).await;
    let chat = stack.url("/v1/chat/completions");
    let failed = post_json(
        &chat,
        &[OPENAI_KEY, ("x-mock-fail", "status:500")],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(
        failed.status, 500,
        "the provider's own error passes through"
    );
    assert_eq!(failed.json()["error"]["type"], "server_error");
    let balance = stack.settled_balance().await;
    assert_eq!(
        balance.committed_nano_usd, 0,
        "a refused call is not billed"
    );

    let cut = client()
        .request(request(
            &chat,
            &[
                OPENAI_KEY,
                ("x-mock-fail", "drop-mid-stream"),
                ("x-mock-chunk-delay-ms", "100"),
            ],
            serde_json::to_vec(&chat_body("gpt-4o-mini", true)).unwrap(),
        ))
        .await
        .unwrap();
    assert_eq!(cut.status(), 200);
    let reservation: i64 = {
        use http_body_util::BodyExt;
        let reserved = stack.balance().await.reserved_nano_usd;
        let _ = cut.into_body().collect().await; // ends with an error: the upstream dropped
        reserved
    };
    assert!(reservation > 0);
    let balance = stack.settled_balance().await;
    assert_eq!(
        balance.committed_nano_usd, reservation,
        "usage unknown: the whole reservation is committed, never less"
    );
}

#[tokio::test]
async fn cached_input_is_priced_as_each_provider_reports_it() {
    // The same call twice, the second with 4 of its input tokens read from the prompt cache:
    // OpenAI counts them inside `prompt_tokens` (a subset), Anthropic outside `input_tokens`.
    // Either way the second costs exactly 4 tokens' difference between input and cached input.
    let mut stack = Stack::start(Options::default()).await;
    let mut committed = Vec::new();
    for (path, key, body, stream) in [
        (
            "/v1/chat/completions",
            OPENAI_KEY,
            chat_body("gpt-4o-mini", false),
            false,
        ),
        (
            "/v1/chat/completions",
            OPENAI_KEY,
            chat_body("gpt-4o-mini", true),
            true,
        ),
        ("/v1/messages", ANTHROPIC_KEY, messages_body(false), false),
        ("/v1/messages", ANTHROPIC_KEY, messages_body(true), true),
    ] {
        let mut costs = Vec::new();
        for cached in ["0", "4"] {
            let before = stack.settled_balance().await.committed_nano_usd;
            let reply = post_json(
                &stack.url(path),
                &[key, ("x-mock-cached-tokens", cached)],
                &body,
            )
            .await;
            assert_eq!(reply.status, 200, "{path} stream={stream}");
            costs.push(stack.settled_balance().await.committed_nano_usd - before);
        }
        committed.push((path, stream, costs[0] - costs[1]));
    }
    // $0.15 and $0.075 per million (gpt-4o-mini); $3 and $0.30 (Claude Sonnet).
    assert_eq!(
        committed,
        vec![
            ("/v1/chat/completions", false, 4 * (150 - 75)),
            ("/v1/chat/completions", true, 4 * (150 - 75)),
            ("/v1/messages", false, 4 * (3_000 - 300)),
            ("/v1/messages", true, 4 * (3_000 - 300)),
        ]
    );
}

/// What the stack's ledger reserved, over every reservation.
async fn reserved_total(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(amount_nano_usd), 0)::bigint FROM reservations")
        .fetch_one(stack.ledger.store().pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_provider_that_never_answers_is_billed_at_the_worst_case() {
    let mut stack = Stack::start(Options {
        flags: vec!["--upstream-timeout-ms=400".into()],
        ..Options::default()
    })
    .await;
    let chat = stack.url("/v1/chat/completions");
    // No response headers within the timeout: 504, and the request went out, so the provider
    // may bill it: the whole reservation is committed, never released.
    let silent = post_json(
        &chat,
        &[OPENAI_KEY, ("x-mock-fail", "hang")],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(silent.status, 504);
    assert_eq!(silent.json()["error"]["code"], "UPSTREAM_NO_ANSWER");
    assert_eq!(silent.json()["error"]["type"], "api_error");
    let reserved = reserved_total(&stack).await;
    assert!(reserved > 0);
    let balance = stack.settled_balance().await;
    assert_eq!(balance.reserved_nano_usd, 0, "nothing leaks");
    assert_eq!(balance.committed_nano_usd, reserved);

    // A stream that goes silent past the timeout between chunks ends, and is billed likewise.
    let idle = client()
        .request(request(
            &chat,
            &[OPENAI_KEY, ("x-mock-chunk-delay-ms", "1500")],
            serde_json::to_vec(&chat_body("gpt-4o-mini", true)).unwrap(),
        ))
        .await
        .unwrap();
    assert_eq!(idle.status(), 200);
    {
        use http_body_util::BodyExt;
        let _ = idle.into_body().collect().await; // ends with an error: idle past the timeout
    }
    let balance = stack.settled_balance().await;
    assert_eq!(balance.reserved_nano_usd, 0, "nothing leaks");
    assert_eq!(balance.committed_nano_usd, reserved_total(&stack).await);
    assert!(
        balance.committed_nano_usd > reserved,
        "the stream's worst case too"
    );
    stack.wait_no_open_calls().await;
}

#[tokio::test]
async fn an_unreachable_provider_gets_nothing_and_the_reservation_goes_back() {
    let closed = format!("http://127.0.0.1:{}", spendguard_testkit::free_port());
    let mut stack = Stack::start(Options {
        flags: vec![format!("--anthropic-base-url={closed}")],
        ..Options::default()
    })
    .await;
    let refused = post_json(
        &stack.url("/v1/messages"),
        &[ANTHROPIC_KEY],
        &messages_body(false),
    )
    .await;
    assert_eq!(refused.status, 502);
    assert_eq!(refused.json()["type"], "error", "Anthropic's error shape");
    assert_eq!(refused.json()["error"]["code"], "UPSTREAM_UNAVAILABLE");
    assert!(reserved_total(&stack).await > 0, "it was reserved first");
    let balance = stack.settled_balance().await;
    assert_eq!(balance.reserved_nano_usd, 0);
    assert_eq!(
        balance.committed_nano_usd, 0,
        "nothing reached the provider: nothing is billed"
    );
    stack.wait_no_open_calls().await;

    // A provider that accepts the connection and never completes the TLS handshake: no request
    // was written, so the timeout releases the reservation rather than billing it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("https://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            open.push(connection);
        }
    });
    let mut stack = Stack::start(Options {
        flags: vec![
            format!("--openai-base-url={silent_url}"),
            "--upstream-timeout-ms=400".into(),
        ],
        ..Options::default()
    })
    .await;
    let refused = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(refused.status, 502);
    assert_eq!(refused.json()["error"]["code"], "UPSTREAM_UNAVAILABLE");
    assert!(reserved_total(&stack).await > 0, "it was reserved first");
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, 0, "no request was written");
    stack.wait_no_open_calls().await;
    held.abort();
}

#[tokio::test]
async fn a_client_gone_before_the_answer_leaves_nothing_open() {
    let mut stack = Stack::start(Options::default()).await;
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", false)).unwrap();
    let url = stack.url("/v1/chat/completions");
    // The client gives up while the provider is still working on the call.
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        post(&url, &[OPENAI_KEY, ("x-mock-latency-ms", "2000")], &body),
    )
    .await;
    assert!(gave_up.is_err(), "the client left before the answer");
    let reserved = reserved_total(&stack).await;
    let balance = stack.settled_balance().await;
    assert_eq!(balance.reserved_nano_usd, 0, "nothing leaks");
    assert_eq!(
        balance.committed_nano_usd, reserved,
        "the provider may bill a call it received: its worst case is committed"
    );
    stack.wait_no_open_calls().await;
}

#[tokio::test]
async fn usage_above_the_worst_case_is_booked_as_an_overrun_and_counted() {
    // Goal: a provider that bills more than the worst case the guard reserved (the guard's bound
    // undercounted, or the provider ignored the limit) is booked in full, the excess as the
    // ledger's flagged overrun, and counted by the sidecar (`overruns_total`) so it can alert.
    // Method: a limit of 10 output tokens, a provider that bills 2,000.
    let mut stack = Stack::start(Options::default()).await;
    let mut body = chat_body("gpt-4o-mini", false);
    body["max_tokens"] = json!(10);
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &[
            OPENAI_KEY,
            ("x-mock-output-tokens", "2000"),
            ("x-mock-fail", "over-limit"),
        ],
        &body,
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["usage"]["completion_tokens"], 2000);
    let balance = stack.settled_balance().await;
    // 9 prompt tokens at $0.15/M, 2,000 output tokens at $0.60/M.
    assert_eq!(
        balance.committed_nano_usd + balance.overrun_nano_usd,
        1_350 + 2_000 * 600
    );
    assert!(balance.overrun_nano_usd > 0, "{balance:?}");
    // The sidecar counts it once the ledger answered its commit.
    let mut metrics = stack.metrics_text();
    for _ in 0..40 {
        if metrics.contains("spendguard_sidecar_overruns_total 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        metrics = stack.metrics_text();
    }
    assert!(
        metrics.contains("spendguard_sidecar_overruns_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_gone_while_its_reservation_is_made_leaves_nothing_held() {
    // Goal: a client that goes away while the ledger is still reserving for its call (its
    // handler is dropped mid-decision) does not leave the worst case held until the
    // reservation's TTL (15 min here): the CONTINUE nobody forwards is released. Method: a
    // transaction holds the budget's window row, so the reservation waits for it; the client
    // gives up; the row is let go and the reservation lands.
    let mut stack = Stack::start(Options::default()).await;
    let url = stack.url("/v1/chat/completions");
    let first = post_json(&url, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(first.status, 200, "opens the window");
    stack.settled_balance().await;
    let pool = stack.ledger.store().pool().clone();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM budget_windows WHERE budget_id = $1 FOR UPDATE")
        .bind(BUDGET)
        .execute(&mut *holder)
        .await
        .unwrap();
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini", false)).unwrap();
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        post(&url, &[OPENAI_KEY], &body),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the client left while the ledger reserved"
    );
    holder.rollback().await.unwrap();
    let mut released = false;
    for _ in 0..100 {
        let reserves: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reservations WHERE state = 'released' AND budget_ids = ARRAY[$1]",
        )
        .bind(BUDGET)
        .fetch_one(&pool)
        .await
        .unwrap();
        if reserves == 1 {
            released = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(released, "the reservation made for nobody was released");
    let balance = stack.settled_balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, HELLO_CHAT_COST),
        "only the first call is spent"
    );
    assert_eq!(stack.upstream_requests().len(), 1, "nothing forwarded");
}

#[tokio::test]
async fn client_disconnect_mid_stream_resolves_the_reservation() {
    // Goal: a client gone mid-stream never leaks its reservation, on each streaming API: it is
    // committed at the worst case it reserved (the provider may bill what it generated).
    let mut stack = Stack::start(Options::default()).await;
    let streams = [
        (
            "/v1/chat/completions",
            OPENAI_KEY,
            chat_body("gpt-4o-mini", true),
        ),
        (
            "/v1/responses",
            OPENAI_KEY,
            json!({"model": "gpt-4o-mini", "input": "hi", "stream": true}),
        ),
        ("/v1/messages", ANTHROPIC_KEY, messages_body(true)),
    ];
    for (path, key, stream) in streams {
        let committed_before = stack.balance().await.committed_nano_usd;
        let response = client()
            .request(request(
                &stack.url(path),
                &[key, ("x-mock-chunk-delay-ms", "200")],
                serde_json::to_vec(&stream).unwrap(),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let mut body = response.into_body();
        {
            use http_body_util::BodyExt;
            let first = body.frame().await.unwrap().unwrap();
            assert!(first.is_data(), "{path}");
        }
        let held = stack.balance().await.reserved_nano_usd;
        assert!(held > 0, "{path}: the stream holds its reservation");
        drop(body); // the client goes away mid-stream
        let balance = stack.settled_balance().await;
        assert_eq!(balance.reserved_nano_usd, 0, "{path}");
        assert_eq!(
            balance.committed_nano_usd - committed_before,
            held,
            "{path}"
        );
        stack.wait_no_open_calls().await;
    }
}

#[tokio::test]
async fn the_next_call_waits_for_a_stream_whose_usage_went_out() {
    // Goal: a stream's settlement is marked in flight when its usage event passes, so a client
    // that sends its next call on reading the usage (before the stream's end) is not refused
    // because the stream's worst case was still held. Method: a budget that fits one worst case
    // (4,096 output tokens at $0.60/M: ~2.46 M) but not two; stream A's `[DONE]` comes 100 ms
    // after its usage chunk; call B is sent as soon as the usage was read, and must go through.
    // Without the mark, A's settlement starts only at the stream's end and B is refused at once.
    use http_body_util::BodyExt;
    let mut stack = Stack::start(Options {
        limit: 4_000_000,
        ..Options::default()
    })
    .await;
    let url = stack.url("/v1/chat/completions");
    let mut asking = chat_body("gpt-4o-mini", true);
    asking["stream_options"] = json!({"include_usage": true});
    let response = client()
        .request(request(
            &url,
            &[OPENAI_KEY, ("x-mock-chunk-delay-ms", "100")],
            serde_json::to_vec(&asking).unwrap(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut seen = String::new();
    while !seen.contains("\"prompt_tokens\"") {
        let frame = body.frame().await.expect("the usage chunk comes").unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(!seen.contains("[DONE]"), "the stream has not ended: {seen}");
    let rest = tokio::spawn(async move { body.collect().await.unwrap().to_bytes() });
    let next = post_json(&url, &[OPENAI_KEY], &chat_body("gpt-4o-mini", false)).await;
    assert_eq!(next.status, 200, "{:?}", next.json());
    let rest = String::from_utf8(rest.await.unwrap().to_vec()).unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, 2 * HELLO_CHAT_COST);
}

#[tokio::test]
async fn a_call_that_outlives_its_reservation_is_still_billed() {
    // Goal: "committed with whatever usage the provider reported", also for a call that outlives
    // its reservation's TTL: the ledger books its usage late, all as an overrun, and the
    // sidecar counts it as such. Method: reservations of 1 s, a provider answering in 1.5 s.
    let mut stack = Stack::start(Options {
        flags: vec!["--reservation-ttl-ms=1000".into()],
        ..Options::default()
    })
    .await;
    let reply = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY, ("x-mock-latency-ms", "1500")],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.json());
    let mut booked = 0;
    for _ in 0..100 {
        booked = stack.balance().await.overrun_nano_usd;
        if booked > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(booked, HELLO_CHAT_COST, "all of its usage, as an overrun");
    let balance = stack.balance().await;
    assert_eq!(
        (balance.reserved_nano_usd, balance.committed_nano_usd),
        (0, 0)
    );
    stack.wait_no_open_calls().await;
    assert!(
        stack
            .metrics_text()
            .contains(r#"spendguard_sidecar_settlements_total{outcome="commit_late"} 1"#),
        "{}",
        stack.metrics_text()
    );
}

/// Sends a chat call the mock answers after `latency_ms`, and stops the ledger once the call
/// reserved (so its settlement finds the ledger away): the call's reply to come.
async fn answered_after_the_ledger_stopped(
    stack: &mut Stack,
    latency_ms: u32,
) -> tokio::task::JoinHandle<Reply> {
    let url = stack.url("/v1/chat/completions");
    let latency = latency_ms.to_string();
    let call = tokio::spawn(async move {
        post_json(
            &url,
            &[OPENAI_KEY, ("x-mock-latency-ms", latency.as_str())],
            &chat_body("gpt-4o-mini", false),
        )
        .await
    });
    for _ in 0..100 {
        if stack.balance().await.reserved_nano_usd > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stack.ledger.stop().await;
    call
}

#[tokio::test]
async fn a_commit_keeps_being_offered_past_the_ttl_while_the_ledger_is_away() {
    // Goal: a proxied call's usage is not dropped because the ledger was away until after the
    // reservation's TTL: the settlement keeps retrying (a release would not: it is moot after
    // the TTL), and the ledger books it late once it is back. Method: reservations of 1 s (a
    // lease long enough to stay held), the ledger stopped while the call waits upstream and
    // restarted 2 s later, the call table having forgotten the call meanwhile.
    let mut stack = Stack::start(Options {
        flags: vec![
            "--reservation-ttl-ms=1000".into(),
            "--lease-ttl-ms=20000".into(),
            "--lease-grace-ms=15000".into(),
        ],
        ..Options::default()
    })
    .await;
    let call = answered_after_the_ledger_stopped(&mut stack, 300).await;
    let reply = call.await.unwrap();
    assert_eq!(reply.status, 200, "answered while the ledger is away");
    tokio::time::sleep(std::time::Duration::from_millis(2_000)).await;
    // The call table forgets calls (TTL + 5 min after their decision in production, long before
    // a commit's 24 h bound): the retries send the pending commit by reservation id, so this
    // does not end them.
    assert_eq!(
        stack
            .sidecar()
            .decider
            .forget_older_than(std::time::Duration::ZERO),
        1
    );
    stack.restart_ledger().await;
    let mut booked = 0;
    for _ in 0..200 {
        booked = stack.balance().await.overrun_nano_usd;
        if booked > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(booked, HELLO_CHAT_COST, "booked late, in full");
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
}

#[tokio::test]
async fn a_commit_that_lands_on_retry_settles_its_call() {
    // Goal: a proxied call whose commit waited for the ledger is settled in the call table once
    // the retry lands (the shutdown warning counts open reservations from that table). Method:
    // the ledger stopped while the call waits upstream; while it is away the call counts as a
    // pending commit, not an open reservation; once it is back and the commit landed, as neither.
    let mut stack = Stack::start(Options {
        flags: vec![
            "--lease-ttl-ms=20000".into(),
            "--lease-grace-ms=15000".into(),
        ],
        ..Options::default()
    })
    .await;
    let call = answered_after_the_ledger_stopped(&mut stack, 1_500).await;
    assert_eq!(call.await.unwrap().status, 200);
    let decider = &stack.sidecar().decider;
    for _ in 0..100 {
        if decider.pending_commits() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(decider.pending_commits(), 1, "the first attempt failed");
    assert_eq!(
        decider.open_reservations(),
        0,
        "a pending commit is not left to the TTL"
    );
    stack.restart_ledger().await;
    let mut committed = 0;
    for _ in 0..200 {
        committed = stack.balance().await.committed_nano_usd;
        if committed > 0 && stack.sidecar().decider.pending_commits() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(committed, HELLO_CHAT_COST);
    let decider = &stack.sidecar().decider;
    assert_eq!(decider.pending_commits(), 0);
    assert_eq!(decider.open_reservations(), 0, "settled in the call table");
}

#[tokio::test]
async fn a_call_id_is_forwarded_once() {
    let mut stack = Stack::start(Options::default()).await;
    let headers = [OPENAI_KEY, ("x-spendguard-call-id", "call-once")];
    let body = chat_body("gpt-4o-mini", false);
    let first = post_json(&stack.url("/v1/chat/completions"), &headers, &body).await;
    assert_eq!(first.status, 200);
    let again = post_json(&stack.url("/v1/chat/completions"), &headers, &body).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["error"]["code"], "CALL_ID_REUSED");
    assert_eq!(stack.upstream_requests().len(), 1);
    assert_eq!(
        stack.settled_balance().await.committed_nano_usd,
        HELLO_CHAT_COST
    );
    // Nor after a restart, which forgets the call: the ledger replays its (settled) reservation
    // to the new epoch, and that is a refusal too.
    stack.stop_sidecar().await;
    stack.start_sidecar().await;
    let after_restart = post_json(&stack.url("/v1/chat/completions"), &headers, &body).await;
    assert_eq!(after_restart.status, 409);
    assert_eq!(
        after_restart.json()["error"]["code"],
        "CALL_ALREADY_RESOLVED"
    );
    assert_eq!(stack.upstream_requests().len(), 1);
    assert_eq!(
        stack.settled_balance().await.committed_nano_usd,
        HELLO_CHAT_COST
    );
}

#[tokio::test]
async fn per_run_budgets_stop_a_run_without_stopping_others() {
    // Each run may spend 3 worst cases of the hello call (4096 output tokens ≈ 2.46 M nano-USD).
    let mut stack = Stack::start(Options {
        contract: json!({"per_run_limit_nano_usd": 7_500_000}),
        ..Options::default()
    })
    .await;
    let chat = stack.url("/v1/chat/completions");
    let body = chat_body("gpt-4o-mini", false);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        // Held reservations count: hang on to each by streaming slowly is not needed, since the
        // worst case is reserved before forwarding; use a limit smaller than the worst case.
        let reply = post_json(
            &chat,
            &[OPENAI_KEY, ("x-spendguard-run-id", "run-1")],
            &json!({"model": "gpt-4o-mini", "max_tokens": 4096,
                    "messages": body["messages"].clone(), "stream": false}),
        )
        .await;
        statuses.push(reply.status);
    }
    // Commits release the unused part, so every call fits: spend per call is tiny.
    assert_eq!(statuses, vec![200, 200, 200, 200]);
    stack.settled_balance().await; // settlements run in the background
    let run = stack
        .ledger
        .client
        .get_balances(spendguard_proto::ledger::v1::GetBalancesRequest {
            tenant_id: TENANT.into(),
            budget_ids: vec!["runs/run-1".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .balances
        .remove(0);
    assert_eq!(run.limit_nano_usd, 7_500_000);
    assert_eq!(run.committed_nano_usd, 4 * HELLO_CHAT_COST);

    // A run whose remaining budget is below one worst case stops; another run is unaffected.
    let tight = json!({"model": "gpt-4o-mini", "max_tokens": 4096,
                       "messages": [{"role": "user", "content": "x".repeat(100)}]});
    let mut stopped = None;
    for i in 0..200 {
        let reply = post_json(
            &chat,
            &[
                OPENAI_KEY,
                ("x-spendguard-run-id", "run-1"),
                ("x-mock-output-tokens", "4096"),
            ],
            &tight,
        )
        .await;
        if reply.status == 402 {
            stopped = Some((i, reply.json()["error"]["budget_id"].clone()));
            break;
        }
    }
    let (_, budget) = stopped.expect("run-1 runs out");
    assert_eq!(budget, Value::from("runs/run-1"));
    let other = post_json(
        &chat,
        &[OPENAI_KEY, ("x-spendguard-run-id", "run-2")],
        &body,
    )
    .await;
    assert_eq!(other.status, 200);
    let malformed = post_json(
        &chat,
        &[OPENAI_KEY, ("x-spendguard-run-id", "Run 3")],
        &body,
    )
    .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["error"]["code"], "INVALID_ARGUMENT");
}

#[tokio::test]
async fn a_left_over_commit_is_given_up_at_its_bound_counted_from_when_it_was_first_kept() {
    // Goal: the 24 h bound of a pending commit runs from when it was first kept, across
    // restarts, not from the resume. Method: a commit a previous process kept 24 h minus 300 ms
    // ago, resumed while the ledger is away: it is given up within its last 300 ms (retried for
    // a day otherwise; the test's 10 s timeout fails it) and forgotten.
    let mut stack = Stack::start(Options::default()).await;
    stack.ledger.stop().await;
    let day = i64::try_from(spendguard_sidecar::pending_commits::PENDING_MAX.as_millis()).unwrap();
    let pending = spendguard_sidecar::pending_commits::PendingCommit {
        call_id: "kept-yesterday".into(),
        reservation_id: uuid::Uuid::new_v4().to_string(),
        actual_nano_usd: HELLO_CHAT_COST,
        since_unix_ms: chrono::Utc::now().timestamp_millis() - day + 300,
    };
    let decider = stack.sidecar().decider.clone();
    decider.hold_pending_commit(&pending);
    assert_eq!(decider.pending_commits(), 1);
    let metrics = spendguard_sidecar::metrics::Metrics::register(
        &mut prometheus_client::registry::Registry::default(),
    );
    let drawn = std::collections::HashMap::new();
    let resumed = spendguard_sidecar::proxy::resume_pending_commits(
        decider.clone(),
        metrics,
        vec![pending],
        &drawn,
    );
    tokio::time::timeout(std::time::Duration::from_secs(10), resumed)
        .await
        .expect("given up at its bound");
    assert_eq!(decider.pending_commits(), 0, "forgotten once given up");
}

#[tokio::test]
async fn an_answer_billed_at_an_unpriced_tier_is_committed_at_its_worst_case() {
    // Goal: a request that asked for no tier can still be served (and billed) at one the pricing
    // snapshot does not hold, e.g. by a project whose default tier is `priority`. The answer
    // passes through, and its usage is not priced at the standard rate: the call is committed
    // at its worst case (the most it was allowed to cost), streamed or not.
    let mut stack = Stack::start(Options::default()).await;
    let chat = stack.url("/v1/chat/completions");
    let whole = post_json(
        &chat,
        &[OPENAI_KEY, ("x-mock-service-tier", "priority")],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.body)
    );
    assert_eq!(whole.json()["service_tier"], "priority");
    let reserved = reserved_total(&stack).await;
    let balance = stack.settled_balance().await;
    assert_eq!(
        balance.committed_nano_usd, reserved,
        "the worst case, not the usage"
    );
    assert!(reserved > HELLO_CHAT_COST);

    let streamed = post_json(
        &chat,
        &[OPENAI_KEY, ("x-mock-service-tier", "priority")],
        &chat_body("gpt-4o-mini", true),
    )
    .await;
    assert_eq!(streamed.status, 200);
    let reserved = reserved_total(&stack).await;
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, reserved);

    // The tier the snapshot prices is committed at its usage, as always.
    let standard = post_json(
        &chat,
        &[OPENAI_KEY, ("x-mock-service-tier", "default")],
        &chat_body("gpt-4o-mini", false),
    )
    .await;
    assert_eq!(standard.status, 200);
    let balance = stack.settled_balance().await;
    assert_eq!(balance.committed_nano_usd, reserved + HELLO_CHAT_COST);
}

#[tokio::test]
async fn anthropic_long_context_input_under_the_1m_beta_is_refused_as_an_unpriced_tier() {
    // Goal: with Anthropic's `context-1m` beta, input above 200k tokens is billed at
    // long-context prices the snapshot does not hold, so such a request is refused before
    // anything is reserved or sent: 400 `UNPRICED_TIER` in Anthropic's error format, read from
    // the `anthropic-beta` header as clients send it (a comma-separated list). The same input
    // without the beta, and the beta with short input, go through.
    let mut stack = Stack::start(Options::default()).await;
    let messages = stack.url("/v1/messages");
    let mut long = messages_body(false);
    long["messages"][0]["content"] = json!("word ".repeat(50_000)); // 250 kB of text
    let beta = (
        "anthropic-beta",
        "prompt-caching-2024-07-31, context-1m-2025-08-07",
    );
    let version = ("anthropic-version", "2023-06-01");
    let refused = post_json(&messages, &[ANTHROPIC_KEY, version, beta], &long).await;
    assert_eq!(
        refused.status,
        400,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["type"], "error");
    assert_eq!(refused.json()["error"]["code"], "UNPRICED_TIER");
    assert!(stack.upstream_requests().is_empty(), "nothing sent");
    assert_eq!(reserved_total(&stack).await, 0, "nothing reserved");

    let without_beta = post_json(&messages, &[ANTHROPIC_KEY, version], &long).await;
    assert_eq!(without_beta.status, 200);
    let short = post_json(
        &messages,
        &[ANTHROPIC_KEY, version, beta],
        &messages_body(false),
    )
    .await;
    assert_eq!(short.status, 200);
    assert_eq!(stack.upstream_requests().len(), 2);
    assert_eq!(stack.settled_balance().await.reserved_nano_usd, 0);
}
