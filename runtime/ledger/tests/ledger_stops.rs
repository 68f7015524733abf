//! RecordStops (S22: every decision outcome is auditable or explicitly marked as not published)
//! against the real ledger on a real PostgreSQL database: each STOP record becomes one immutable
//! row and one signed `decision.stopped` event (a summary becomes `decision.stops_unpublished`),
//! money does not move, a retried request replays without a second event, a record id reused
//! with other fields refuses the whole request, and bad input is refused with stable codes and
//! nothing written. After each test the ledger's invariants are checked.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::error_code;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{outbox_events, reserve_request, test_pricing};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";
const DECIDED_AT_UNIX_MS: i64 = 1_764_000_000_000;

async fn setup() -> (TestLedger, pb::FencingToken) {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "team", 1_000).await.unwrap();
    (ledger, fencing)
}

fn code(status: &tonic::Status) -> pb::ErrorCode {
    error_code(status).unwrap_or_else(|| panic!("status without error detail: {status:?}"))
}

fn stop(record_id: &str, call_id: &str, epoch: u64) -> pb::StopRecord {
    pb::StopRecord {
        record_id: record_id.into(),
        call_id: call_id.into(),
        reason: "BUDGET_EXHAUSTED".into(),
        detail: "budget team has 10 nano-USD left; the call's worst case is 400".into(),
        budget_id: "team".into(),
        worst_case_nano_usd: 400,
        first_decided_at_unix_ms: DECIDED_AT_UNIX_MS,
        last_decided_at_unix_ms: DECIDED_AT_UNIX_MS,
        count: 1,
        fencing_epoch: epoch,
        context: Some(pb::DecisionContext {
            run_id: "run-1".into(),
            provider: "openai".into(),
            model: "gpt-test".into(),
            contract_version: "v7".into(),
            ..Default::default()
        }),
    }
}

fn summary(record_id: &str, count: u64) -> pb::StopRecord {
    pb::StopRecord {
        record_id: record_id.into(),
        reason: "MODEL_DENIED".into(),
        detail: format!("{count} STOP decisions (MODEL_DENIED) were not published one by one"),
        first_decided_at_unix_ms: DECIDED_AT_UNIX_MS,
        last_decided_at_unix_ms: DECIDED_AT_UNIX_MS + 5_000,
        count,
        ..Default::default()
    }
}

fn request(fencing: &pb::FencingToken, stops: Vec<pb::StopRecord>) -> pb::RecordStopsRequest {
    pb::RecordStopsRequest {
        tenant_id: T.into(),
        fencing_scope_id: fencing.scope_id.clone(),
        pricing: Some(test_pricing()),
        contract_sha256_hex: "cd".repeat(32),
        stops,
    }
}

const ID_1: &str = "6f1c2a3b-0000-4000-8000-000000000001";
const ID_2: &str = "6f1c2a3b-0000-4000-8000-000000000002";
const ID_3: &str = "6f1c2a3b-0000-4000-8000-000000000003";

async fn events(ledger: &TestLedger, event_type: &str) -> Vec<serde_json::Value> {
    outbox_events(ledger.store().pool(), event_type)
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
async fn each_stop_becomes_one_row_and_one_signed_event_and_moves_no_money() {
    // Goal: a batch of two STOPs and a summary is written as three rows and three events that
    // carry what the sidecar decided, and the budget does not move. Method: record them, then
    // read the response, the table, the outbox (events are signed: the ledger signs everything)
    // and the balance.
    let (mut ledger, fencing) = setup().await;
    let before = ledger.balance(T, "team").await.unwrap();
    let response = ledger
        .client
        .record_stops(request(
            &fencing,
            vec![
                stop(ID_1, "call-1", fencing.epoch),
                stop(ID_2, "call-2", 0),
                summary(ID_3, 17),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.recorded, response.replayed), (2 + 1, 0));
    assert_eq!(count(&ledger, "SELECT count(*) FROM stop_records").await, 3);
    assert_eq!(
        count(
            &ledger,
            "SELECT count(*) FROM stop_records WHERE call_id IS NULL AND stop_count = 17 AND reason = 'MODEL_DENIED'"
        )
        .await,
        1
    );

    let stopped = events(&ledger, "decision.stopped").await;
    assert_eq!(stopped.len(), 2);
    let first = &stopped[0];
    assert_eq!(first["tenant_id"], T, "{first}");
    let data = &first["data"];
    assert_eq!(data["record_id"], ID_1, "{first}");
    assert_eq!(data["call_id"], "call-1");
    assert_eq!(data["reason"], "BUDGET_EXHAUSTED");
    assert_eq!(data["budget_id"], "team");
    assert_eq!(data["worst_case_nano_usd"], "400");
    assert_eq!(data["count"], 1);
    assert_eq!(data["fencing"]["scope_id"], fencing.scope_id.as_str());
    assert_eq!(data["fencing"]["epoch"], fencing.epoch);
    assert_eq!(data["context"]["model"], "gpt-test");
    assert_eq!(
        data["context"]["call_id"], "call-1",
        "filled from the record"
    );
    assert_eq!(data["pricing"]["sha256_hex"], test_pricing().sha256_hex);
    assert_eq!(data["contract_sha256_hex"], "cd".repeat(32));
    assert!(
        data["first_decided_at"]
            .as_str()
            .unwrap()
            .starts_with("2025-11-24T16:00:00"),
        "{first}"
    );
    // A STOP answered without a lease says so: no epoch.
    assert_eq!(
        stopped[1]["data"]["fencing"]["epoch"],
        serde_json::Value::Null
    );

    let unpublished = events(&ledger, "decision.stops_unpublished").await;
    assert_eq!(unpublished.len(), 1);
    assert_eq!(unpublished[0]["data"]["count"], 17);
    assert_eq!(unpublished[0]["data"]["call_id"], serde_json::Value::Null);

    let after = ledger.balance(T, "team").await.unwrap();
    assert_eq!(after, before, "a STOP moves no money");
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_retried_request_replays_and_a_new_record_beside_old_ones_is_written() {
    // Goal: a request retried after a lost answer writes nothing twice, and a batch mixing
    // replayed and new records writes only the new ones. Method: send one record twice, then it
    // again with a second; count rows and events each time.
    let (mut ledger, fencing) = setup().await;
    let one = request(&fencing, vec![stop(ID_1, "call-1", fencing.epoch)]);
    ledger.client.record_stops(one.clone()).await.unwrap();
    let again = ledger.client.record_stops(one).await.unwrap().into_inner();
    assert_eq!((again.recorded, again.replayed), (0, 1));
    assert_eq!(events(&ledger, "decision.stopped").await.len(), 1);

    let mixed = ledger
        .client
        .record_stops(request(
            &fencing,
            vec![
                stop(ID_1, "call-1", fencing.epoch),
                stop(ID_2, "call-2", fencing.epoch),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((mixed.recorded, mixed.replayed), (1, 1));
    assert_eq!(events(&ledger, "decision.stopped").await.len(), 2);
    assert_eq!(count(&ledger, "SELECT count(*) FROM stop_records").await, 2);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_record_id_reused_with_other_fields_refuses_the_whole_request() {
    // Goal: evidence is never rewritten: a known id with different fields is
    // IDEMPOTENCY_CONFLICT, and the new record sent beside it is not written either. Method:
    // record ID_1, then send ID_1 with another reason together with ID_2.
    let (mut ledger, fencing) = setup().await;
    ledger
        .client
        .record_stops(request(&fencing, vec![stop(ID_1, "call-1", fencing.epoch)]))
        .await
        .unwrap();
    let mut changed = stop(ID_1, "call-1", fencing.epoch);
    changed.reason = "MODEL_DENIED".into();
    let status = ledger
        .client
        .record_stops(request(
            &fencing,
            vec![stop(ID_2, "call-2", fencing.epoch), changed],
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&status), pb::ErrorCode::IdempotencyConflict);
    assert_eq!(count(&ledger, "SELECT count(*) FROM stop_records").await, 1);
    assert_eq!(events(&ledger, "decision.stopped").await.len(), 1);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn stop_records_are_immutable() {
    // Goal: the database refuses to change or delete evidence even if application code tried.
    let (mut ledger, fencing) = setup().await;
    ledger
        .client
        .record_stops(request(&fencing, vec![stop(ID_1, "call-1", fencing.epoch)]))
        .await
        .unwrap();
    for sql in [
        "UPDATE stop_records SET reason = 'MODEL_DENIED'",
        "DELETE FROM stop_records",
    ] {
        let error = sqlx::query(sql).execute(&ledger.owner).await.unwrap_err();
        assert!(error.to_string().contains("immutable"), "{sql}: {error}");
    }
    assert_eq!(count(&ledger, "SELECT count(*) FROM stop_records").await, 1);
}

#[tokio::test]
async fn bad_input_is_refused_with_stable_codes_and_nothing_written() {
    // Goal: every malformed field is refused before planning with a stable code, unknown
    // references by the planner, and nothing is written. Method: one valid request, one broken
    // field at a time; then the outbox and the table are unchanged, and the valid request still
    // goes through.
    let (mut ledger, fencing) = setup().await;
    let events_before = count(&ledger, "SELECT count(*) FROM audit_outbox").await;
    type Breaker = fn(&mut pb::RecordStopsRequest);
    let cases: Vec<(&str, Breaker, pb::ErrorCode)> = vec![
        (
            "no records",
            |r| r.stops.clear(),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "257 records",
            |r| {
                r.stops = (0..257)
                    .map(|i| {
                        stop(
                            &format!("6f1c2a3b-0000-4000-8000-{i:012}"),
                            &format!("call-{i}"),
                            1,
                        )
                    })
                    .collect();
            },
            pb::ErrorCode::RequestTooLarge,
        ),
        (
            "bad tenant",
            |r| r.tenant_id = "Tenant A".into(),
            pb::ErrorCode::IdMalformed,
        ),
        (
            "bad scope",
            |r| r.fencing_scope_id = String::new(),
            pb::ErrorCode::IdMalformed,
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
            "record id not a UUID",
            |r| r.stops[0].record_id = "call-1".into(),
            pb::ErrorCode::IdMalformed,
        ),
        (
            "the same id twice",
            |r| r.stops.push(r.stops[0].clone()),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "empty reason",
            |r| r.stops[0].reason.clear(),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "lower-case reason",
            |r| r.stops[0].reason = "budget_exhausted".into(),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "detail too long",
            |r| r.stops[0].detail = "x".repeat(1_025),
            pb::ErrorCode::RequestTooLarge,
        ),
        (
            "bad budget id",
            |r| r.stops[0].budget_id = "Team".into(),
            pb::ErrorCode::IdMalformed,
        ),
        (
            "negative worst case",
            |r| r.stops[0].worst_case_nano_usd = -1,
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "no decision time",
            |r| r.stops[0].first_decided_at_unix_ms = 0,
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "last before first",
            |r| r.stops[0].last_decided_at_unix_ms = DECIDED_AT_UNIX_MS - 1,
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "a call counted twice",
            |r| r.stops[0].count = 2,
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "a summary of nothing",
            |r| r.stops[0] = summary(ID_1, 0),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "a summary with a context",
            |r| {
                r.stops[0].call_id.clear();
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "context names another call",
            |r| r.stops[0].context.as_mut().unwrap().call_id = "call-2".into(),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "unknown tenant",
            |r| r.tenant_id = "tenant-z".into(),
            pb::ErrorCode::TenantNotFound,
        ),
        (
            "unknown scope",
            |r| r.fencing_scope_id = "other-scope".into(),
            pb::ErrorCode::FencingScopeNotFound,
        ),
        (
            "an epoch the scope never had",
            |r| r.stops[0].fencing_epoch += 1,
            pb::ErrorCode::FencingEpochStale,
        ),
        (
            "a summary beyond what a JSON number holds exactly",
            |r| r.stops[0] = summary(ID_1, 1 << 53),
            pb::ErrorCode::InvalidArgument,
        ),
    ];
    for (name, breaker, expected) in cases {
        let mut broken = request(&fencing, vec![stop(ID_1, "call-1", fencing.epoch)]);
        breaker(&mut broken);
        let status = ledger.client.record_stops(broken).await.unwrap_err();
        assert_eq!(code(&status), expected, "{name}: {status:?}");
    }
    assert_eq!(
        count(&ledger, "SELECT count(*) FROM audit_outbox").await,
        events_before
    );
    assert_eq!(count(&ledger, "SELECT count(*) FROM stop_records").await, 0);
    ledger
        .client
        .record_stops(request(&fencing, vec![stop(ID_1, "call-1", fencing.epoch)]))
        .await
        .unwrap();
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn another_tenants_scope_is_refused() {
    // Goal: a sidecar cannot file evidence under another tenant's scope. Method: a second
    // tenant with its own lease; tenant-a's request naming tenant-b's scope is refused.
    let (mut ledger, _) = setup().await;
    let other = ledger.tenant_with_lease("tenant-b").await.unwrap();
    let status = ledger
        .client
        .record_stops(request(&other, vec![stop(ID_1, "call-1", other.epoch)]))
        .await
        .unwrap_err();
    assert_eq!(code(&status), pb::ErrorCode::FencingScopeNotFound);
    assert_eq!(count(&ledger, "SELECT count(*) FROM stop_records").await, 0);
}

#[tokio::test]
async fn records_take_the_load_path_and_leave_the_cache_right() {
    // Goal: RecordStops never runs on the cached path (it writes a table the cached statement
    // does not), and reservations after it still use the cache. Method: warm the cache, record,
    // check the loaded-batch counter rose and the cached one did not, then reserve again.
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
    ledger
        .client
        .record_stops(request(&fencing, vec![stop(ID_1, "call-1", fencing.epoch)]))
        .await
        .unwrap();
    assert_eq!(ledger.batches("cached"), cached_before);
    assert_eq!(ledger.batches("loaded"), loaded_before + 1);
    ledger
        .client
        .reserve_set(reserve_request(T, "after", &["team"], 100, &fencing))
        .await
        .unwrap();
    assert_eq!(
        ledger.balance(T, "team").await.unwrap().reserved_nano_usd,
        300
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}
