//! RecordFailOpen (S22) against the real ledger on a real PostgreSQL database: a call the
//! sidecar let through fail-open is recorded once with its decision context, its cost shows as
//! a flagged overrun in the balances and shrinks later reservations, the `decision.fail_open`
//! event is in the outbox, retries replay, a reused call id with other fields conflicts, a stale
//! epoch is recorded as presented, and bad input is refused with stable codes and nothing
//! written. After each test the ledger's invariants (including contiguous producer sequences and
//! one overrun entry per record and budget) are checked.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::error_code;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{force_takeover, outbox_events, reserve_request, test_pricing};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";
const DECIDED_AT_UNIX_MS: i64 = 1_764_000_000_000;

async fn setup() -> (TestLedger, pb::FencingToken) {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "team", 1_000).await.unwrap();
    ledger.budget(T, "tenant", 10_000).await.unwrap();
    (ledger, fencing)
}

fn code(status: &tonic::Status) -> pb::ErrorCode {
    error_code(status).unwrap_or_else(|| panic!("status without error detail: {status:?}"))
}

fn request(call_id: &str, actual: i64, fencing: &pb::FencingToken) -> pb::RecordFailOpenRequest {
    pb::RecordFailOpenRequest {
        tenant_id: T.into(),
        call_id: call_id.into(),
        budget_ids: vec!["team".into(), "tenant".into()],
        actual_nano_usd: actual,
        fencing: Some(fencing.clone()),
        pricing: Some(test_pricing()),
        contract_sha256_hex: "cd".repeat(32),
        decided_at_unix_ms: DECIDED_AT_UNIX_MS,
        context: Some(pb::DecisionContext {
            run_id: "run-1".into(),
            provider: "openai".into(),
            model: "gpt-test".into(),
            contract_version: "v7".into(),
            ..Default::default()
        }),
    }
}

async fn record(
    ledger: &mut TestLedger,
    request: pb::RecordFailOpenRequest,
) -> pb::RecordFailOpenResponse {
    ledger
        .client
        .record_fail_open(request)
        .await
        .unwrap()
        .into_inner()
}

async fn balance(ledger: &mut TestLedger, budget: &str) -> pb::BudgetBalance {
    ledger.balance(T, budget).await.unwrap()
}

/// `decision.fail_open` events in the outbox, as parsed canonical JSON.
async fn fail_open_events(ledger: &TestLedger) -> Vec<serde_json::Value> {
    outbox_events(ledger.store().pool(), "decision.fail_open")
        .await
        .unwrap()
}

async fn count(ledger: &TestLedger, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(ledger.store().pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn recorded_once_with_context_and_the_cost_as_overrun() {
    // Goal: one fail-open call becomes one record, one overrun entry per budget and one signed
    // event naming the decision context. Method: record it, then read the response, the
    // balances, the journal and the outbox.
    let (mut ledger, fencing) = setup().await;
    let response = record(&mut ledger, request("call-1", 700, &fencing)).await;
    assert!(!response.replayed);
    assert!(!response.epoch_stale);
    assert_eq!(response.epoch_current, fencing.epoch);
    assert_eq!(response.balances.len(), 2);
    assert_eq!(response.balances[0].budget_id, "team");
    assert_eq!(response.balances[0].overrun_nano_usd, 700);
    assert_eq!(response.balances[0].remaining_nano_usd, 300);
    assert_eq!(response.balances[0].reserved_nano_usd, 0);
    assert_eq!(response.balances[0].committed_nano_usd, 0);
    assert_eq!(response.balances[1].overrun_nano_usd, 700);

    let team = balance(&mut ledger, "team").await;
    assert_eq!((team.overrun_nano_usd, team.remaining_nano_usd), (700, 300));
    let overruns = count(
        &ledger,
        "SELECT count(*) FROM ledger_entries WHERE kind = 'overrun' AND overrun_delta = 700",
    )
    .await;
    assert_eq!(overruns, 2, "one overrun entry per budget");

    let events = fail_open_events(&ledger).await;
    assert_eq!(events.len(), 1);
    let text = events[0].to_string();
    assert!(text.contains(&response.record_id), "{text}");
    assert!(text.contains("\"call_id\":\"call-1\""), "{text}");
    assert!(text.contains("\"actual_nano_usd\":\"700\""), "{text}");
    assert!(text.contains("\"model\":\"gpt-test\""), "{text}");
    assert!(text.contains("\"run_id\":\"run-1\""), "{text}");
    assert!(text.contains("\"contract_version\":\"v7\""), "{text}");
    assert!(text.contains(&"cd".repeat(32)), "{text}");
    assert!(text.contains(&test_pricing().sha256_hex), "{text}");
    assert!(text.contains("\"epoch_stale\":false"), "{text}");
    assert!(
        text.contains("2025-11-24T16:00:00"),
        "decided_at as sent: {text}"
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn later_reservations_see_less_room() {
    // Goal: fail-open spend is not lost: the next reservation is sized against it. Method:
    // record 700 on a 1_000 budget, then reserve 400 (denied, 300 left) and 300 (granted).
    let (mut ledger, fencing) = setup().await;
    record(&mut ledger, request("call-1", 700, &fencing)).await;
    let denied = ledger
        .client
        .reserve_set(reserve_request(T, "r-1", &["team"], 400, &fencing))
        .await
        .unwrap()
        .into_inner();
    match denied.outcome {
        Some(pb::reserve_set_response::Outcome::Denied(d)) => {
            assert_eq!((d.budget_id.as_str(), d.remaining_nano_usd), ("team", 300));
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    let granted = ledger
        .client
        .reserve_set(reserve_request(T, "r-2", &["team"], 300, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        granted.outcome,
        Some(pb::reserve_set_response::Outcome::Reserved(_))
    ));
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn retry_replays_and_writes_nothing() {
    // Goal: the sidecar's drain may send a record twice (a lost response); the second is a
    // replay with the original answer and no second entry or event. Method: record twice, count.
    let (mut ledger, fencing) = setup().await;
    let first = record(&mut ledger, request("call-1", 700, &fencing)).await;
    let second = record(&mut ledger, request("call-1", 700, &fencing)).await;
    assert!(second.replayed);
    assert_eq!(second.record_id, first.record_id);
    assert_eq!(second.epoch_current, first.epoch_current);
    assert_eq!(balance(&mut ledger, "team").await.overrun_nano_usd, 700);
    assert_eq!(fail_open_events(&ledger).await.len(), 1);
    assert_eq!(
        count(&ledger, "SELECT count(*) FROM fail_open_records").await,
        1
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn same_call_with_other_fields_conflicts() {
    // Goal: a reused call id with another cost, budget set or model is refused, never merged.
    // Method: record, then send three variants; the balance and outbox stay as after the first.
    let (mut ledger, fencing) = setup().await;
    record(&mut ledger, request("call-1", 700, &fencing)).await;
    let mut other_cost = request("call-1", 701, &fencing);
    let mut other_budgets = request("call-1", 700, &fencing);
    other_budgets.budget_ids = vec!["team".into()];
    let mut other_model = request("call-1", 700, &fencing);
    other_model.context.as_mut().unwrap().model = "gpt-other".into();
    other_cost.decided_at_unix_ms = DECIDED_AT_UNIX_MS;
    for variant in [other_cost, other_budgets, other_model] {
        let status = ledger.client.record_fail_open(variant).await.unwrap_err();
        assert_eq!(code(&status), pb::ErrorCode::IdempotencyConflict);
    }
    assert_eq!(balance(&mut ledger, "team").await.overrun_nano_usd, 700);
    assert_eq!(fail_open_events(&ledger).await.len(), 1);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn stale_epoch_is_recorded_as_presented() {
    // Goal: the lease moved on while the ledger was down; the record is still accepted (the
    // money was spent) and says which epoch decided and which was current. Method: take the
    // scope over (epoch + 1), then record with the old token.
    let (mut ledger, fencing) = setup().await;
    let taken = force_takeover(&mut ledger.client, T, &fencing)
        .await
        .unwrap();
    let response = record(&mut ledger, request("call-1", 250, &fencing)).await;
    assert!(response.epoch_stale);
    assert_eq!(response.epoch_current, taken.epoch);
    let stored: (i64, i64) = sqlx::query_as(
        "SELECT fencing_epoch, epoch_current FROM fail_open_records WHERE call_id = 'call-1'",
    )
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(
        stored,
        (
            i64::try_from(fencing.epoch).unwrap(),
            i64::try_from(taken.epoch).unwrap()
        )
    );
    let text = fail_open_events(&ledger).await[0].to_string();
    assert!(text.contains("\"epoch_stale\":true"), "{text}");
    assert_eq!(balance(&mut ledger, "team").await.overrun_nano_usd, 250);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn failed_call_is_recorded_without_money() {
    // Goal: a fail-open call whose provider call failed still leaves evidence, with cost 0 and
    // no journal entry. Method: record 0; the event exists and the balance is untouched.
    let (mut ledger, fencing) = setup().await;
    let response = record(&mut ledger, request("call-0", 0, &fencing)).await;
    assert!(!response.replayed);
    assert_eq!(response.balances[0].overrun_nano_usd, 0);
    assert_eq!(fail_open_events(&ledger).await.len(), 1);
    assert_eq!(
        count(
            &ledger,
            "SELECT count(*) FROM ledger_entries WHERE kind = 'overrun'"
        )
        .await,
        0
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn fail_open_records_are_immutable() {
    // Goal: evidence cannot be edited or removed behind the ledger's back. Method: UPDATE and
    // DELETE the row directly; the database refuses both.
    let (mut ledger, fencing) = setup().await;
    record(&mut ledger, request("call-1", 700, &fencing)).await;
    for sql in [
        "UPDATE fail_open_records SET actual_nano_usd = 1",
        "DELETE FROM fail_open_records",
    ] {
        let error = sqlx::query(sql).execute(&ledger.owner).await.unwrap_err();
        assert!(error.to_string().contains("immutable"), "{error}");
    }
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_with_stable_codes_and_nothing_written() {
    // Goal: every malformed field is refused before planning, with a stable code, and unknown
    // references are refused by the planner; nothing is written either way. Method: one base
    // request, one broken field at a time; then the outbox and records are empty.
    let (mut ledger, fencing) = setup().await;
    let events_before = count(&ledger, "SELECT count(*) FROM audit_outbox").await;
    type Breaker = fn(&mut pb::RecordFailOpenRequest);
    let cases: Vec<(&str, Breaker, pb::ErrorCode)> = vec![
        (
            "empty call id",
            |r| r.call_id.clear(),
            pb::ErrorCode::IdMalformed,
        ),
        (
            "bad tenant",
            |r| r.tenant_id = "Tenant A".into(),
            pb::ErrorCode::IdMalformed,
        ),
        (
            "no budgets",
            |r| r.budget_ids.clear(),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "nine budgets",
            |r| r.budget_ids = (0..9).map(|i| format!("b{i}")).collect(),
            pb::ErrorCode::RequestTooLarge,
        ),
        (
            "duplicate budget",
            |r| r.budget_ids = vec!["team".into(), "team".into()],
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "negative cost",
            |r| r.actual_nano_usd = -1,
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "cost above 10^18",
            |r| r.actual_nano_usd = 1_000_000_000_000_000_001,
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "no fencing",
            |r| r.fencing = None,
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "an epoch the scope never had",
            |r| r.fencing.as_mut().unwrap().epoch += 1,
            pb::ErrorCode::FencingEpochStale,
        ),
        (
            "an epoch past what the database holds",
            |r| r.fencing.as_mut().unwrap().epoch = 1 << 63,
            pb::ErrorCode::FencingEpochStale,
        ),
        (
            "epoch 0",
            |r| r.fencing.as_mut().unwrap().epoch = 0,
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "no pricing",
            |r| r.pricing = None,
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "bad contract hash",
            |r| r.contract_sha256_hex = "XYZ".into(),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "no decision time",
            |r| r.decided_at_unix_ms = 0,
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "context names another call",
            |r| r.context.as_mut().unwrap().call_id = "call-2".into(),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "unknown tenant",
            |r| r.tenant_id = "tenant-z".into(),
            pb::ErrorCode::TenantNotFound,
        ),
        (
            "unknown budget",
            |r| r.budget_ids = vec!["team".into(), "nope".into()],
            pb::ErrorCode::BudgetNotFound,
        ),
        (
            "unknown scope",
            |r| r.fencing.as_mut().unwrap().scope_id = "other-scope".into(),
            pb::ErrorCode::FencingScopeNotFound,
        ),
        (
            "unregistered pricing",
            |r| r.pricing.as_mut().unwrap().version = "v-unknown".into(),
            pb::ErrorCode::PricingUnknown,
        ),
    ];
    for (name, breaker, expected) in cases {
        let mut broken = request("call-1", 700, &fencing);
        breaker(&mut broken);
        let status = ledger.client.record_fail_open(broken).await.unwrap_err();
        assert_eq!(code(&status), expected, "{name}: {status:?}");
    }
    assert_eq!(
        count(&ledger, "SELECT count(*) FROM audit_outbox").await,
        events_before
    );
    assert_eq!(
        count(&ledger, "SELECT count(*) FROM fail_open_records").await,
        0
    );
    assert_eq!(balance(&mut ledger, "team").await.overrun_nano_usd, 0);
    // The valid request still goes through afterwards.
    record(&mut ledger, request("call-1", 700, &fencing)).await;
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn records_take_the_load_path_and_the_cache_sees_their_overrun() {
    // Goal: RecordFailOpen never runs on the cached path (it writes a table the cached statement
    // does not), and a cached reservation after it is sized against the new overrun. Method:
    // warm the cache with two reservations, record 700, check the loaded-batch counter rose and
    // the cached one did not, then reserve what would fit without the overrun (denied) and what
    // fits with it (granted).
    let (mut ledger, fencing) = setup().await;
    for key in ["warm-1", "warm-2"] {
        ledger
            .client
            .reserve_set(reserve_request(T, key, &["team"], 100, &fencing))
            .await
            .unwrap();
    }
    let cached_before = ledger.batches("cached");
    let loaded_before = ledger.batches("loaded");
    assert!(cached_before > 0, "the warm-up used the cached path");
    record(&mut ledger, request("call-1", 700, &fencing)).await;
    assert_eq!(ledger.batches("cached"), cached_before);
    assert_eq!(ledger.batches("loaded"), loaded_before + 1);
    let denied = ledger
        .client
        .reserve_set(reserve_request(T, "after-1", &["team"], 101, &fencing))
        .await
        .unwrap()
        .into_inner();
    match denied.outcome {
        Some(pb::reserve_set_response::Outcome::Denied(d)) => {
            assert_eq!(d.remaining_nano_usd, 100);
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    let granted = ledger
        .client
        .reserve_set(reserve_request(T, "after-2", &["team"], 100, &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        granted.outcome,
        Some(pb::reserve_set_response::Outcome::Reserved(_))
    ));
    invariants::check(ledger.store().pool()).await.unwrap();
}
