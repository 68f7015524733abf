//! STOP evidence (S22: every decision outcome is auditable or explicitly marked as not
//! published): every STOP the sidecar answers, from the contract or from the ledger, through the
//! decision API or the proxy, reaches the ledger as one signed `decision.stopped` event named by
//! the decision's `evidence_id`; STOPs past the queue's bound arrive as a counted summary; a
//! shutdown sends what is queued.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

/// 1,000 input and 1,000 output tokens of gpt-4o-mini: 150,000 + 600,000 nano-USD.
const WORST_CASE: i64 = 750_000;

fn decide_body(call_id: &str, model: &str) -> Value {
    json!({"call_id": call_id, "provider": "openai", "model": model,
           "input_tokens_upper_bound": 1_000, "max_output_tokens": 1_000})
}

async fn decide(stack: &Stack, call_id: &str, model: &str) -> Value {
    stack.decide_ok(&decide_body(call_id, model)).await
}

#[tokio::test]
async fn every_stop_is_published_once_under_the_id_its_answer_carries() {
    // Goal: contract STOPs and ledger STOPs, answered through the decision API or the proxy,
    // each become one `decision.stopped` event whose record id is the answer's `evidence_id`; a
    // replayed STOP points at the same record and publishes nothing more. Method: a denied
    // model, a call larger than the budget, that call again, eight concurrent tries of another,
    // and a denied model through the proxy; then read the outbox.
    let mut stack = Stack::start(Options {
        limit: 100_000,
        ..Options::default()
    })
    .await;
    let denied = decide(&stack, "c-denied", "gpt-4-denied").await;
    assert_eq!(
        (denied["decision"].as_str(), denied["reason"].as_str()),
        (Some("STOP"), Some("MODEL_DENIED"))
    );
    let over = decide(&stack, "c-over", "gpt-4o-mini").await;
    assert_eq!(over["reason"], "BUDGET_EXHAUSTED", "{over}");
    let again = decide(&stack, "c-over", "gpt-4o-mini").await;
    assert_eq!(again["replayed"], true);
    assert_eq!(again["evidence_id"], over["evidence_id"]);
    // A model name no ledger field could hold (too long, a control character) is still recorded,
    // fitted to the ledger's limits.
    let odd_model = format!("{}\u{7}", "m".repeat(300));
    let odd = decide(&stack, "c-odd", &odd_model).await;
    assert_eq!(odd["reason"], "MODEL_PRICE_UNKNOWN", "{odd}");
    // Concurrent retries of one call: each may reach the ledger before any answer is stored;
    // all are answered with the first decision, and only that one is published.
    let mut tries = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = stack.url("/v1/spendguard/decide");
        tries.spawn(async move {
            post_json(&url, &[], &decide_body("c-race", "gpt-4o-mini"))
                .await
                .json()
        });
    }
    let racing = tries.join_all().await;
    let race_evidence = racing[0]["evidence_id"].clone();
    assert!(
        racing.iter().all(|d| d["evidence_id"] == race_evidence),
        "{racing:?}"
    );
    let proxied = post_json(
        &stack.url("/v1/chat/completions"),
        &[OPENAI_KEY],
        &chat_body("gpt-4-denied", false),
    )
    .await;
    assert_eq!(proxied.status, 402);
    let proxied_evidence = proxied.json()["error"]["evidence_id"].clone();
    assert_eq!(
        proxied.header("x-spendguard-evidence-id"),
        proxied_evidence.as_str(),
        "the header names the same record"
    );
    assert_eq!(
        proxied_evidence.as_str().map(str::len),
        Some(36),
        "{}",
        proxied.json()
    );
    // A CONTINUE carries none.
    let budgets_fine = Stack::start(Options::default()).await;
    let allowed = decide(&budgets_fine, "c-ok", "gpt-4o-mini").await;
    assert_eq!(allowed["decision"], "CONTINUE");
    assert!(allowed["evidence_id"].is_null());

    let stopped = stack.published("decision.stopped", 5).await;
    let ids: Vec<&Value> = stopped.iter().map(|e| &e["data"]["record_id"]).collect();
    assert_eq!(
        ids,
        [
            &denied["evidence_id"],
            &over["evidence_id"],
            &odd["evidence_id"],
            &race_evidence,
            &proxied_evidence
        ],
        "one event per STOP, none for the replays"
    );
    let fitted = stopped[2]["data"]["context"]["model"].as_str().unwrap();
    assert!(fitted.len() <= 256 && fitted.ends_with('…'), "{fitted}");
    assert!(!fitted.contains('\u{7}'));
    let ledger_stop = &stopped[1]["data"];
    assert_eq!(ledger_stop["call_id"], "c-over");
    assert_eq!(ledger_stop["reason"], "BUDGET_EXHAUSTED");
    assert_eq!(ledger_stop["budget_id"], BUDGET);
    assert_eq!(ledger_stop["worst_case_nano_usd"], WORST_CASE.to_string());
    assert_eq!(ledger_stop["context"]["model"], "gpt-4o-mini");
    assert_eq!(
        ledger_stop["fencing"]["scope_id"],
        format!("{TENANT}/{WORKLOAD}")
    );
    let epoch = ledger_stop["fencing"]["epoch"].as_u64().unwrap();
    assert!(epoch >= 1, "decided under the lease: {ledger_stop}");
    assert_eq!(stopped[0]["data"]["reason"], "MODEL_DENIED");
    assert_eq!(stopped[0]["data"]["call_id"], "c-denied");
    assert_eq!(
        stopped[0]["data"]["contract_sha256_hex"],
        stack.sidecar().decider.bundle().sha256_hex.as_str()
    );
    assert_eq!(stack.balance().await.reserved_nano_usd, 0);
    let metrics = stack.metrics_text();
    assert!(
        metrics.contains("spendguard_sidecar_stop_evidence_published_total 5"),
        "{metrics}"
    );
    // Every decide is timed, from every entry point: the decision API's 4 + 8 tries, the proxy's.
    assert!(
        metrics
            .contains(r#"spendguard_sidecar_decision_duration_seconds_count{decision="STOP"} 13"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn stops_past_the_queue_bound_are_published_as_a_count_not_lost() {
    // Goal: a denial storm while the ledger is away neither grows the sidecar without bound nor
    // loses the STOPs: past the bound they are counted per reason and published as one summary.
    // Method: a queue of 2, the ledger stopped, five denied calls (answered: contract STOPs
    // need no ledger), the ledger back; then two `decision.stopped` and one
    // `decision.stops_unpublished` with count 3.
    let mut stack = Stack::start(Options {
        flags: vec!["--stop-evidence-queue-records=2".into()],
        ..Options::default()
    })
    .await;
    stack.ledger.stop().await;
    let mut answers = Vec::new();
    for i in 0..5 {
        let stop = decide(&stack, &format!("c-{i}"), "gpt-4-denied").await;
        assert_eq!(stop["decision"], "STOP");
        answers.push(stop);
    }
    // Two queued and three counted; more queued and fewer counted when a failed send was in
    // flight meanwhile (it puts its records back, past the bound).
    let queued = stack.sidecar().decider.stop_evidence().len();
    assert!((2..=4).contains(&queued), "{queued} queued");
    stack.restart_ledger().await;
    let summaries = stack.published("decision.stops_unpublished", 1).await;
    assert_eq!(summaries.len(), 1);
    let summary = &summaries[0]["data"];
    let counted = summary["count"].as_u64().unwrap();
    assert!((1..=3).contains(&counted), "{summary}");
    assert_eq!(summary["reason"], "MODEL_DENIED");
    assert!(summary["call_id"].is_null());
    let calls: Vec<Value> = stack
        .events("decision.stopped")
        .await
        .iter()
        .map(|e| e["data"]["call_id"].clone())
        .collect();
    assert_eq!(
        calls.len() as u64 + counted,
        5,
        "every STOP is published or counted: {calls:?}"
    );
    assert_eq!(calls[..2], [json!("c-0"), json!("c-1")]);
    // Only a STOP published one by one names a record; a counted one names none.
    let named: Vec<Value> = answers
        .iter()
        .filter(|a| !a["evidence_id"].is_null())
        .map(|a| a["call_id"].clone())
        .collect();
    assert_eq!(named, calls);
    let metrics = stack.metrics_text();
    assert!(
        metrics.contains(&format!(
            "spendguard_sidecar_stop_evidence_unpublished_total {counted}"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn shutdown_publishes_the_stops_still_queued() {
    // Goal: SIGTERM does not lose queued STOP records. Method: a STOP queued while the ledger is
    // away; shutdown starts with the ledger still away (so the background publisher cannot send
    // it before it stops), and the ledger comes back during the drain: the record is in the
    // outbox when shutdown returns.
    let mut stack = Stack::start(Options::default()).await;
    stack.ledger.stop().await;
    let stop = decide(&stack, "c-late", "gpt-4-denied").await;
    assert_eq!(stop["decision"], "STOP");
    let sidecar = stack.sidecar.take().unwrap();
    let shutdown = tokio::spawn(sidecar.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.restart_ledger().await;
    shutdown.await.unwrap();
    let stopped = stack.events("decision.stopped").await;
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["data"]["record_id"], stop["evidence_id"]);
}

#[tokio::test]
async fn a_record_the_ledger_refuses_is_published_as_a_count_and_holds_back_no_other() {
    // Goal: RecordStops fails a request as a whole, so one malformed record must not take the
    // rest of its batch down, and the STOP it stands for is still published, as a count. Method: with the ledger away (so both go in one batch), a
    // malformed record queued ahead of a real STOP, as a bug would queue it; the ledger back:
    // the STOP is published, and the malformed one arrives as a summary of one.
    let mut stack = Stack::start(Options::default()).await;
    stack.ledger.stop().await;
    let evidence = stack.sidecar().decider.stop_evidence();
    evidence.push(spendguard_proto::ledger::v1::StopRecord {
        record_id: "not-a-uuid".into(),
        call_id: "c-bad".into(),
        reason: "MODEL_DENIED".into(),
        first_decided_at_unix_ms: 1,
        last_decided_at_unix_ms: 1,
        count: 1,
        ..Default::default()
    });
    let stop = decide(&stack, "c-good", "gpt-4-denied").await;
    // Both queued (a failed send in flight puts its batch back).
    for _ in 0..100 {
        if evidence.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(evidence.len(), 2);
    stack.restart_ledger().await;
    let stopped = stack.published("decision.stopped", 1).await;
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["data"]["record_id"], stop["evidence_id"]);
    let summaries = stack.published("decision.stops_unpublished", 1).await;
    assert_eq!(summaries[0]["data"]["count"], 1);
    assert_eq!(summaries[0]["data"]["reason"], "MODEL_DENIED");
    let metrics = stack.metrics_text();
    assert!(
        metrics.contains("spendguard_sidecar_stop_evidence_unpublished_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spendguard_sidecar_stop_evidence_dropped_total 0"),
        "{metrics}"
    );
}
