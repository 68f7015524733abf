//! Approvals (S14) against the real ledger on a real PostgreSQL database: create, approve, deny,
//! idempotent retries, conflicting decisions, expiry exactly once on the database clock,
//! immutability enforced by the database, audit events in the outbox, bad input refused with
//! stable codes and nothing written, the operator's paged listing and its single-approval read. After each test the
//! ledger's invariants (including contiguous producer sequences) are checked.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::error_code;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{outbox_events, reserve_request, test_pricing};
use spendguard_testkit::postgres::refusal;
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";

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

fn create_request(key: &str, fencing: &pb::FencingToken) -> pb::CreateApprovalRequest {
    pb::CreateApprovalRequest {
        tenant_id: T.into(),
        idempotency_key: key.into(),
        budget_ids: vec!["team".into(), "tenant".into()],
        budget_id: "team".into(),
        amount_nano_usd: 700,
        fencing: Some(fencing.clone()),
        ttl_ms: 600_000,
        reason_code: "SOFT_CAP_REACHED".into(),
        requested_by: "tenant-a-w".into(),
        pricing: Some(test_pricing()),
        bundle_sha256_hex: "ab".repeat(32),
        context: Some(pb::DecisionContext {
            run_id: "run-1".into(),
            call_id: key.into(),
            provider: "openai".into(),
            model: "gpt-test".into(),
            contract_version: "v1".into(),
            ..Default::default()
        }),
    }
}

fn resolve_request(
    approval_id: &str,
    decision: pb::ApprovalDecision,
    approver: &str,
) -> pb::ResolveApprovalRequest {
    pb::ResolveApprovalRequest {
        tenant_id: T.into(),
        approval_id: approval_id.into(),
        decision: decision.into(),
        approver: approver.into(),
        reason: "looked fine".into(),
    }
}

async fn create(ledger: &mut TestLedger, request: pb::CreateApprovalRequest) -> pb::Approval {
    let response = ledger
        .client
        .create_approval(request)
        .await
        .unwrap()
        .into_inner();
    assert!(!response.replayed);
    response.approval.unwrap()
}

async fn events(ledger: &TestLedger) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM audit_outbox ORDER BY producer_sequence")
        .fetch_all(ledger.store().pool())
        .await
        .unwrap()
}

async fn approval_events(ledger: &TestLedger) -> Vec<String> {
    events(ledger)
        .await
        .into_iter()
        .filter(|e| e.starts_with("approval."))
        .collect()
}

async fn db_state(ledger: &TestLedger, approval_id: &str) -> String {
    sqlx::query_scalar("SELECT state FROM approvals WHERE approval_id = $1::uuid")
        .bind(approval_id)
        .fetch_one(ledger.store().pool())
        .await
        .unwrap()
}

async fn sweep(ledger: &mut TestLedger) -> pb::SweepExpiredResponse {
    ledger
        .client
        .sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 100,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn create_then_approve_is_audited_and_moves_no_money() {
    // Goal: the happy path writes a pending record and its event, approval records the
    // approver, and neither touches a budget. Method: create, approve, read balances and outbox.
    let (mut ledger, fencing) = setup().await;
    let approval = create(&mut ledger, create_request("call-1", &fencing)).await;
    assert_eq!(approval.state(), pb::ApprovalState::Pending);
    assert_eq!(approval.amount_nano_usd, 700);
    assert_eq!(approval.budget_id, "team");
    assert_eq!(approval.reason_code, "SOFT_CAP_REACHED");
    assert_eq!(approval.requested_by, "tenant-a-w");
    assert_eq!(approval.context.as_ref().unwrap().call_id, "call-1");
    assert!(approval.expires_at_unix_ms > approval.created_at_unix_ms);
    assert_eq!(db_state(&ledger, &approval.approval_id).await, "pending");

    let resolved = ledger
        .client
        .resolve_approval(resolve_request(
            &approval.approval_id,
            pb::ApprovalDecision::Approve,
            "alice@example.com",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!resolved.replayed);
    let resolved = resolved.approval.unwrap();
    assert_eq!(resolved.state(), pb::ApprovalState::Approved);
    assert_eq!(resolved.resolved_by, "alice@example.com");
    assert_eq!(resolved.resolution_reason, "looked fine");
    assert!(resolved.resolved_at_unix_ms >= resolved.created_at_unix_ms);
    assert_eq!(db_state(&ledger, &approval.approval_id).await, "approved");

    // Approving reserved nothing: the resumed call needs a fresh ReserveSet.
    let balances = ledger
        .client
        .get_balances(pb::GetBalancesRequest {
            tenant_id: T.into(),
            budget_ids: vec!["team".into(), "tenant".into()],
        })
        .await
        .unwrap()
        .into_inner();
    for b in balances.balances {
        assert_eq!((b.reserved_nano_usd, b.committed_nano_usd), (0, 0));
    }
    assert_eq!(
        approval_events(&ledger).await,
        ["approval.created", "approval.approved"]
    );
    // The event carries the approver and the immutable context.
    let approved = outbox_events(ledger.store().pool(), "approval.approved")
        .await
        .unwrap();
    let event = &approved[0];
    assert_eq!(event["data"]["approver"], "alice@example.com");
    assert_eq!(event["data"]["approval_id"], approval.approval_id.as_str());
    let created = outbox_events(ledger.store().pool(), "approval.created")
        .await
        .unwrap();
    let event = &created[0];
    assert_eq!(event["data"]["context"]["decision"]["model"], "gpt-test");
    assert_eq!(event["data"]["amount_nano_usd"], "700");
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn create_then_deny_and_conflicting_decisions_are_refused() {
    // Goal: deny is final; the same decision replays, the other decision is refused with a
    // stable code and writes nothing.
    let (mut ledger, fencing) = setup().await;
    let approval = create(&mut ledger, create_request("call-1", &fencing)).await;
    let id = approval.approval_id.clone();
    let denied = ledger
        .client
        .resolve_approval(resolve_request(&id, pb::ApprovalDecision::Deny, "bob"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.approval.unwrap().state(), pb::ApprovalState::Denied);
    let before = events(&ledger).await.len();

    let again = ledger
        .client
        .resolve_approval(resolve_request(&id, pb::ApprovalDecision::Deny, "carol"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(
        again.approval.unwrap().resolved_by,
        "bob",
        "a replay reports the original approver"
    );
    let err = ledger
        .client
        .resolve_approval(resolve_request(&id, pb::ApprovalDecision::Approve, "carol"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::ApprovalAlreadyResolved);
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(events(&ledger).await.len(), before, "nothing written");
    assert_eq!(db_state(&ledger, &id).await, "denied");
    assert_eq!(
        approval_events(&ledger).await,
        ["approval.created", "approval.denied"]
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn create_is_idempotent_by_key_and_conflicts_on_other_fields() {
    // Goal: a retry gets the same approval and writes nothing; the same key with other fields
    // is IDEMPOTENCY_CONFLICT; approval ids differ from the same key's reservation id.
    let (mut ledger, fencing) = setup().await;
    let first = create(&mut ledger, create_request("call-1", &fencing)).await;
    let before = events(&ledger).await.len();
    let retry = ledger
        .client
        .create_approval(create_request("call-1", &fencing))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.replayed);
    assert_eq!(retry.approval.unwrap(), first);
    assert_eq!(events(&ledger).await.len(), before);

    let mut other = create_request("call-1", &fencing);
    other.amount_nano_usd = 701;
    let err = ledger.client.create_approval(other).await.unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::IdempotencyConflict);
    assert_eq!(events(&ledger).await.len(), before);

    let reservation = ledger
        .client
        .reserve_set(reserve_request(T, "call-1", &["team"], 10, &fencing))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(r)) = reservation.outcome else {
        panic!("expected a reservation");
    };
    assert_ne!(r.reservation_id, first.approval_id);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM approvals")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap();
    assert_eq!(count, 1);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn expiry_happens_once_on_the_database_clock() {
    // Goal: a pending approval past its expiry becomes expired exactly once, whether a late
    // resolve or the sweep finds it first. Method: short TTLs (1 s, the minimum), then wait.
    let (mut ledger, fencing) = setup().await;
    let mut short = create_request("late-resolve", &fencing);
    short.ttl_ms = 1_000;
    let late = create(&mut ledger, short).await;
    let mut short = create_request("swept", &fencing);
    short.ttl_ms = 1_000;
    let swept = create(&mut ledger, short).await;
    let kept = create(&mut ledger, create_request("kept", &fencing)).await;
    assert_eq!(sweep(&mut ledger).await.approvals_expired, 0);
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;

    // A resolve after expiry is refused and expires the record...
    let err = ledger
        .client
        .resolve_approval(resolve_request(
            &late.approval_id,
            pb::ApprovalDecision::Approve,
            "alice",
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::ApprovalExpired);
    assert_eq!(db_state(&ledger, &late.approval_id).await, "expired");
    // ...once: a second attempt is refused the same way and writes nothing more.
    let err = ledger
        .client
        .resolve_approval(resolve_request(
            &late.approval_id,
            pb::ApprovalDecision::Deny,
            "alice",
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::ApprovalExpired);

    // The sweep expires the other one and leaves the expired and the unexpired ones alone.
    let first = sweep(&mut ledger).await;
    assert_eq!((first.expired, first.approvals_expired), (0, 1));
    assert_eq!(sweep(&mut ledger).await.approvals_expired, 0);
    assert_eq!(db_state(&ledger, &swept.approval_id).await, "expired");
    assert_eq!(db_state(&ledger, &kept.approval_id).await, "pending");
    let err = ledger
        .client
        .resolve_approval(resolve_request(
            &swept.approval_id,
            pb::ApprovalDecision::Approve,
            "alice",
        ))
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::ApprovalExpired);

    assert_eq!(
        approval_events(&ledger).await,
        [
            "approval.created",
            "approval.created",
            "approval.created",
            "approval.expired",
            "approval.expired"
        ]
    );
    let resolved_at: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("SELECT resolved_at FROM approvals WHERE state = 'expired'")
            .fetch_all(ledger.store().pool())
            .await
            .unwrap();
    assert!(resolved_at.iter().all(Option::is_some));
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn the_database_keeps_context_immutable_and_resolution_single() {
    // Goal: even if application code were wrong, the database refuses to rewrite an approval's
    // amount or context, to resolve it twice, to approve without an approver, or to delete it.
    let (mut ledger, fencing) = setup().await;
    let approval = create(&mut ledger, create_request("call-1", &fencing)).await;
    // As the tables' owner: the runtime role may not even try some of these (DELETE), and the
    // rules must hold against the owner too.
    let pool = ledger.owner.clone();
    let id = uuid::Uuid::parse_str(&approval.approval_id).unwrap();
    let immutable = format!("approval {id} amount and decision context are immutable");
    let refused = [
        (
            "UPDATE approvals SET context = context || '{\"reason_code\": \"X\"}'",
            ("23000", immutable.as_str()),
        ),
        (
            "UPDATE approvals SET amount_nano_usd = 1",
            ("23000", &immutable),
        ),
        (
            "UPDATE approvals SET expires_at = expires_at + interval '1 day'",
            ("23000", &immutable),
        ),
        (
            "UPDATE approvals SET state = 'approved', resolved_at = now()",
            ("23514", "approvals_resolution_complete"),
        ),
        (
            "DELETE FROM approvals",
            ("23000", "approvals are never deleted"),
        ),
    ];
    for (sql, (code, rule)) in refused {
        let refused = refusal(&pool, sql).await;
        assert!(refused.is(code, rule), "{sql}: {refused:?}");
    }
    sqlx::query(
        "UPDATE approvals SET state = 'denied', resolved_at = now(), resolved_by = 'x' WHERE approval_id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();
    let twice = refusal(
        &pool,
        "UPDATE approvals SET state = 'approved', resolved_by = 'y'",
    )
    .await;
    assert!(
        twice.is("23000", &format!("approval {id} is already denied")),
        "an approval leaves pending at most once: {twice:?}"
    );
    let orphan = refusal(
        &pool,
        "INSERT INTO approvals (approval_id, tenant_id, idempotency_key, request_sha256, budget_ids,
             budget_id, amount_nano_usd, context, fencing_scope_id, fencing_epoch, created_at, expires_at)
         SELECT gen_random_uuid(), 'tenant-z', 'k2', request_sha256, budget_ids, budget_id,
                amount_nano_usd, context, fencing_scope_id, fencing_epoch, created_at, expires_at
           FROM approvals",
    )
    .await;
    assert!(
        orphan.is("23503", "approval for an unknown tenant"),
        "an approval needs an existing tenant: {orphan:?}"
    );
}

#[tokio::test]
async fn bad_input_gets_its_stable_code_and_writes_nothing() {
    let (mut ledger, fencing) = setup().await;
    let ok = create_request("k", &fencing);
    let before = events(&ledger).await.len();
    let cases: Vec<(&str, pb::CreateApprovalRequest, pb::ErrorCode)> = vec![
        (
            // `<call id>/approved/<approval id>` would not fit an idempotency key.
            "call id too long to resume under",
            pb::CreateApprovalRequest {
                idempotency_key: "k".repeat(155),
                ..ok.clone()
            },
            pb::ErrorCode::IdMalformed,
        ),
        (
            "unknown tenant",
            pb::CreateApprovalRequest {
                tenant_id: "tenant-z".into(),
                ..ok.clone()
            },
            pb::ErrorCode::TenantNotFound,
        ),
        (
            "unknown budget",
            pb::CreateApprovalRequest {
                budget_ids: vec!["nope".into()],
                budget_id: "nope".into(),
                ..ok.clone()
            },
            pb::ErrorCode::BudgetNotFound,
        ),
        (
            "crossed budget not among the call's budgets",
            pb::CreateApprovalRequest {
                budget_id: "other".into(),
                ..ok.clone()
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "epoch zero",
            pb::CreateApprovalRequest {
                fencing: Some(pb::FencingToken {
                    scope_id: fencing.scope_id.clone(),
                    epoch: 0,
                }),
                ..ok.clone()
            },
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "missing fencing",
            pb::CreateApprovalRequest {
                fencing: None,
                ..ok.clone()
            },
            pb::ErrorCode::FencingEpochMissing,
        ),
        (
            "stale epoch",
            pb::CreateApprovalRequest {
                fencing: Some(pb::FencingToken {
                    scope_id: fencing.scope_id.clone(),
                    epoch: fencing.epoch + 1,
                }),
                ..ok.clone()
            },
            pb::ErrorCode::FencingEpochStale,
        ),
        (
            "zero amount",
            pb::CreateApprovalRequest {
                amount_nano_usd: 0,
                ..ok.clone()
            },
            pb::ErrorCode::AmountInvalid,
        ),
        (
            "ttl too long",
            pb::CreateApprovalRequest {
                ttl_ms: 604_800_001,
                ..ok.clone()
            },
            pb::ErrorCode::TtlInvalid,
        ),
        (
            "oversized context",
            pb::CreateApprovalRequest {
                context: Some(pb::DecisionContext {
                    model: "m".repeat(257),
                    ..Default::default()
                }),
                ..ok.clone()
            },
            pb::ErrorCode::RequestTooLarge,
        ),
        (
            "missing reason code",
            pb::CreateApprovalRequest {
                reason_code: String::new(),
                ..ok.clone()
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "malformed key",
            pb::CreateApprovalRequest {
                idempotency_key: "has space".into(),
                ..ok.clone()
            },
            pb::ErrorCode::IdMalformed,
        ),
    ];
    for (name, request, expected) in cases {
        let err = ledger.client.create_approval(request).await.unwrap_err();
        assert_eq!(code(&err), expected, "{name}");
    }

    let approval = create(&mut ledger, ok).await;
    let after_create = events(&ledger).await.len();
    assert_eq!(after_create, before + 1);
    let resolve_cases: Vec<(&str, pb::ResolveApprovalRequest, pb::ErrorCode)> = vec![
        (
            "empty approver",
            resolve_request(&approval.approval_id, pb::ApprovalDecision::Approve, ""),
            pb::ErrorCode::ApproverRequired,
        ),
        (
            "blank approver",
            resolve_request(&approval.approval_id, pb::ApprovalDecision::Approve, "  "),
            pb::ErrorCode::ApproverRequired,
        ),
        (
            "no decision",
            resolve_request(
                &approval.approval_id,
                pb::ApprovalDecision::Unspecified,
                "alice",
            ),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "unknown approval",
            resolve_request(
                &uuid::Uuid::new_v4().to_string(),
                pb::ApprovalDecision::Approve,
                "alice",
            ),
            pb::ErrorCode::ApprovalNotFound,
        ),
        (
            "another tenant's approval",
            pb::ResolveApprovalRequest {
                tenant_id: "tenant-b".into(),
                ..resolve_request(&approval.approval_id, pb::ApprovalDecision::Approve, "a")
            },
            pb::ErrorCode::ApprovalNotFound,
        ),
        (
            "malformed id",
            resolve_request("not-a-uuid", pb::ApprovalDecision::Approve, "alice"),
            pb::ErrorCode::IdMalformed,
        ),
    ];
    for (name, request, expected) in resolve_cases {
        let err = ledger.client.resolve_approval(request).await.unwrap_err();
        assert_eq!(code(&err), expected, "{name}");
    }
    assert_eq!(events(&ledger).await.len(), after_create, "nothing written");
    assert_eq!(db_state(&ledger, &approval.approval_id).await, "pending");
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn list_pages_by_tenant_and_state() {
    // Goal: the operator can page through every tenant's pending approvals without gaps or
    // repeats, and filter by tenant and state.
    let (mut ledger, fencing) = setup().await;
    let other = ledger.tenant_with_lease("tenant-b").await.unwrap();
    ledger.budget("tenant-b", "team", 1_000).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            create(&mut ledger, create_request(&format!("a-{i}"), &fencing))
                .await
                .approval_id,
        );
    }
    let mut b = create_request("b-0", &other);
    b.tenant_id = "tenant-b".into();
    b.budget_ids = vec!["team".into()];
    ids.push(create(&mut ledger, b).await.approval_id);
    ledger
        .client
        .resolve_approval(resolve_request(
            &ids[0],
            pb::ApprovalDecision::Approve,
            "alice",
        ))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = ledger
            .client
            .list_approvals(pb::ListApprovalsRequest {
                tenant_id: String::new(),
                state: pb::ApprovalState::Pending.into(),
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.approvals.len() <= 2);
        seen.extend(page.approvals.into_iter().map(|a| a.approval_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<String> = ids[1..].to_vec();
    expected.sort();
    assert_eq!(seen, expected, "every pending approval once, in id order");
    assert_eq!(pages, 3);

    let tenant_b = ledger
        .client
        .list_approvals(pb::ListApprovalsRequest {
            tenant_id: "tenant-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tenant_b.approvals.len(), 1);
    assert_eq!(tenant_b.approvals[0].tenant_id, "tenant-b");
    let approved = ledger
        .client
        .list_approvals(pb::ListApprovalsRequest {
            tenant_id: T.into(),
            state: pb::ApprovalState::Approved.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.approvals.len(), 1);
    assert_eq!(approved.approvals[0].resolved_by, "alice");
    let err = ledger
        .client
        .list_approvals(pb::ListApprovalsRequest {
            page_size: 501,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(code(&err), pb::ErrorCode::RequestTooLarge);
    invariants::check(ledger.store().pool()).await.unwrap();
}

fn get_request(tenant_id: &str, approval_id: &str) -> pb::GetApprovalRequest {
    pb::GetApprovalRequest {
        tenant_id: tenant_id.into(),
        approval_id: approval_id.into(),
    }
}

async fn get(ledger: &mut TestLedger, tenant_id: &str, approval_id: &str) -> pb::Approval {
    let response = ledger
        .client
        .get_approval(get_request(tenant_id, approval_id))
        .await
        .unwrap()
        .into_inner();
    response.approval.unwrap()
}

#[tokio::test]
async fn get_reads_one_approval_of_its_tenant_in_every_state() {
    // Goal: GetApproval returns exactly the record the writing RPCs returned, pending, decided
    // or expired. Method: read after create, after approve, after deny and after the sweep
    // expired one; compare with the RPC responses field by field (whole messages).
    let (mut ledger, fencing) = setup().await;
    let pending = create(&mut ledger, create_request("pending", &fencing)).await;
    assert_eq!(get(&mut ledger, T, &pending.approval_id).await, pending);

    let approved = create(&mut ledger, create_request("approved", &fencing)).await;
    let approved = ledger
        .client
        .resolve_approval(resolve_request(
            &approved.approval_id,
            pb::ApprovalDecision::Approve,
            "alice",
        ))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    let read = get(&mut ledger, T, &approved.approval_id).await;
    assert_eq!(read.state(), pb::ApprovalState::Approved);
    assert_eq!(read.resolved_by, "alice");
    assert_eq!(read, approved);

    let denied = create(&mut ledger, create_request("denied", &fencing)).await;
    let denied = ledger
        .client
        .resolve_approval(resolve_request(
            &denied.approval_id,
            pb::ApprovalDecision::Deny,
            "bob",
        ))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(get(&mut ledger, T, &denied.approval_id).await, denied);

    let mut short = create_request("expired", &fencing);
    short.ttl_ms = 1_000;
    let expired = create(&mut ledger, short).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(
        get(&mut ledger, T, &expired.approval_id).await.state(),
        pb::ApprovalState::Pending,
        "a read never expires a record: the sweep or a resolve does"
    );
    assert_eq!(sweep(&mut ledger).await.approvals_expired, 1);
    let read = get(&mut ledger, T, &expired.approval_id).await;
    assert_eq!(read.state(), pb::ApprovalState::Expired);
    assert!(read.resolved_by.is_empty());
    assert!(read.resolved_at_unix_ms >= read.expires_at_unix_ms);
    assert_eq!(
        pb::Approval {
            state: expired.state,
            resolved_at_unix_ms: expired.resolved_at_unix_ms,
            ..read
        },
        expired,
        "expiry changes only the state and the resolution time"
    );
    // The uppercase form of an id is the same UUID (as for ResolveApproval).
    assert_eq!(
        get(&mut ledger, T, &pending.approval_id.to_uppercase()).await,
        pending
    );
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn get_refuses_unknown_foreign_and_malformed_ids_and_writes_nothing() {
    // Goal: another tenant's approval is as unknown as a missing one (no cross-tenant existence
    // leak), a malformed id gets ID_MALFORMED naming its field, and a read writes nothing.
    // Method: one approval per tenant, then each bad request; the outbox must not grow.
    let (mut ledger, fencing) = setup().await;
    let other = ledger.tenant_with_lease("tenant-b").await.unwrap();
    ledger.budget("tenant-b", "team", 1_000).await.unwrap();
    let mine = create(&mut ledger, create_request("mine", &fencing)).await;
    let mut b = create_request("theirs", &other);
    b.tenant_id = "tenant-b".into();
    b.budget_ids = vec!["team".into()];
    let theirs = create(&mut ledger, b).await;
    assert_eq!(
        get(&mut ledger, "tenant-b", &theirs.approval_id).await,
        theirs
    );
    let before = events(&ledger).await.len();

    let not_found = [
        (
            "another tenant's approval",
            get_request(T, &theirs.approval_id),
        ),
        (
            "mine asked as another tenant",
            get_request("tenant-b", &mine.approval_id),
        ),
        ("unknown tenant", get_request("tenant-z", &mine.approval_id)),
        (
            "unknown id",
            get_request(T, "00000000-0000-4000-8000-000000000000"),
        ),
    ];
    for (case, request) in not_found {
        let err = ledger.client.get_approval(request).await.unwrap_err();
        assert_eq!(code(&err), pb::ErrorCode::ApprovalNotFound, "{case}");
        assert_eq!(err.code(), tonic::Code::NotFound, "{case}");
    }

    let malformed = [
        ("empty id", get_request(T, ""), "approval_id"),
        ("not a uuid", get_request(T, "apr-1"), "approval_id"),
        (
            "uuid with a trailing byte",
            get_request(T, &format!("{}0", mine.approval_id)),
            "approval_id",
        ),
        (
            "empty tenant",
            get_request("", &mine.approval_id),
            "tenant_id",
        ),
        (
            "uppercase tenant",
            get_request("Tenant-A", &mine.approval_id),
            "tenant_id",
        ),
    ];
    for (case, request, field) in malformed {
        let err = ledger.client.get_approval(request).await.unwrap_err();
        assert_eq!(code(&err), pb::ErrorCode::IdMalformed, "{case}");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{case}");
        let detail = <pb::ErrorDetail as prost::Message>::decode(err.details()).unwrap();
        assert_eq!(detail.field, field, "{case}");
    }
    assert_eq!(events(&ledger).await.len(), before, "reads write nothing");
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn concurrent_resolutions_decide_once() {
    // Goal: approvers racing with opposite decisions resolve an approval exactly once. Method:
    // 16 concurrent approve/deny calls from separate clients; exactly one decision wins, every
    // call agreeing with it succeeds (replayed but one), every other is ALREADY_RESOLVED, and
    // exactly one resolution event is written.
    let (mut ledger, fencing) = setup().await;
    let approval = create(&mut ledger, create_request("race", &fencing)).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut client = ledger.client.clone();
        let decision = if i % 2 == 0 {
            pb::ApprovalDecision::Approve
        } else {
            pb::ApprovalDecision::Deny
        };
        let request = resolve_request(&approval.approval_id, decision, &format!("approver-{i}"));
        tasks.push(tokio::spawn(async move {
            (decision, client.resolve_approval(request).await)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let fresh: Vec<_> = results
        .iter()
        .filter_map(|(d, r)| {
            r.as_ref()
                .ok()
                .filter(|r| !r.get_ref().replayed)
                .map(|_| *d)
        })
        .collect();
    assert_eq!(fresh.len(), 1, "exactly one call resolved it");
    let winner = fresh[0];
    for (decision, result) in &results {
        match result {
            Ok(_) => assert_eq!(*decision, winner),
            Err(status) => {
                assert_ne!(*decision, winner);
                assert_eq!(code(status), pb::ErrorCode::ApprovalAlreadyResolved);
            }
        }
    }
    let resolutions: Vec<String> = approval_events(&ledger)
        .await
        .into_iter()
        .filter(|e| e != "approval.created")
        .collect();
    assert_eq!(resolutions.len(), 1, "{resolutions:?}");
    invariants::check(ledger.store().pool()).await.unwrap();
}

/// The ReserveSet of `call-1` resumed under `approval_id`: the key and context a sidecar sends.
fn resumed(
    approval_id: &str,
    budgets: &[&str],
    amount: i64,
    fencing: &pb::FencingToken,
) -> pb::ReserveSetRequest {
    let mut request = reserve_request(
        T,
        &format!("call-1/approved/{approval_id}"),
        budgets,
        amount,
        fencing,
    );
    request.context = Some(pb::DecisionContext {
        call_id: "call-1".into(),
        approval_id: approval_id.into(),
        ..Default::default()
    });
    request
}

#[tokio::test]
async fn a_reservation_under_an_approval_is_checked_against_it_and_names_it() {
    // Goal (S16): a ReserveSet that names the approval it goes ahead under is refused, with a
    // stable code and nothing written, unless that approval is the tenant's, approved, asked
    // for the same budgets and for at least the amount; the reservation then names it in its
    // signed event, so the evidence ties the spend to the human decision.
    let (mut ledger, fencing) = setup().await;
    let approval = create(&mut ledger, create_request("call-1", &fencing)).await;
    let denied = create(&mut ledger, create_request("call-2", &fencing)).await;
    let under = |approval_id: &str, budgets: &[&str], amount: i64| {
        resumed(approval_id, budgets, amount, &fencing)
    };
    let both = ["team", "tenant"];
    let written = events(&ledger).await.len();
    let client = ledger.client.clone();
    let refused = |request: pb::ReserveSetRequest| {
        let mut client = client.clone();
        async move { code(&client.reserve_set(request).await.unwrap_err()) }
    };
    assert_eq!(
        refused(under(&approval.approval_id, &both, 700)).await,
        pb::ErrorCode::ApprovalNotApproved,
        "pending"
    );
    ledger
        .client
        .resolve_approval(resolve_request(
            &approval.approval_id,
            pb::ApprovalDecision::Approve,
            "alice@example.com",
        ))
        .await
        .unwrap();
    ledger
        .client
        .resolve_approval(resolve_request(
            &denied.approval_id,
            pb::ApprovalDecision::Deny,
            "alice@example.com",
        ))
        .await
        .unwrap();
    let written = written + 2; // the two decisions
    for (name, request, expected) in [
        (
            "denied",
            pb::ReserveSetRequest {
                idempotency_key: format!("call-2/approved/{}", denied.approval_id),
                context: Some(pb::DecisionContext {
                    call_id: "call-2".into(),
                    approval_id: denied.approval_id.clone(),
                    ..Default::default()
                }),
                ..under(&denied.approval_id, &both, 700)
            },
            pb::ErrorCode::ApprovalNotApproved,
        ),
        (
            "more than approved",
            under(&approval.approval_id, &both, 701),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "other budgets",
            under(&approval.approval_id, &["team"], 700),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "unknown",
            under(&uuid::Uuid::new_v4().to_string(), &both, 700),
            pb::ErrorCode::ApprovalNotFound,
        ),
        (
            "another call",
            pb::ReserveSetRequest {
                context: Some(pb::DecisionContext {
                    call_id: "call-9".into(),
                    approval_id: approval.approval_id.clone(),
                    ..Default::default()
                }),
                ..under(&approval.approval_id, &both, 700)
            },
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "malformed",
            under("not-a-uuid", &both, 700),
            pb::ErrorCode::IdMalformed,
        ),
        (
            "another key for the same call and approval",
            pb::ReserveSetRequest {
                idempotency_key: "call-1".into(),
                ..under(&approval.approval_id, &both, 700)
            },
            pb::ErrorCode::InvalidArgument,
        ),
    ] {
        assert_eq!(refused(request).await, expected, "{name}");
    }
    assert_eq!(
        events(&ledger).await.len(),
        written,
        "refusals write nothing"
    );

    let reserved = ledger
        .client
        .reserve_set(under(&approval.approval_id, &both, 650))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            reserved.outcome,
            Some(pb::reserve_set_response::Outcome::Reserved(_))
        ),
        "{reserved:?}"
    );
    let reserved_events = outbox_events(ledger.store().pool(), "reservation.reserved")
        .await
        .unwrap();
    assert_eq!(
        reserved_events.last().unwrap()["data"]["context"]["approval_id"],
        approval.approval_id.as_str()
    );
    // One decision backs one reservation: a retry replays it, and no other key reserves again
    // under the approval (one approval would otherwise let as many calls go ahead).
    let retried = ledger
        .client
        .reserve_set(under(&approval.approval_id, &both, 650))
        .await
        .unwrap()
        .into_inner();
    assert!(retried.replayed);
    for key in [
        format!("call-1/approved/{}/2", approval.approval_id),
        format!("call-1/approved/{}", approval.approval_id.to_uppercase()),
    ] {
        let again = pb::ReserveSetRequest {
            idempotency_key: key.clone(),
            ..under(&approval.approval_id, &both, 650)
        };
        let refused = ledger.client.reserve_set(again).await.unwrap_err();
        assert_eq!(code(&refused), pb::ErrorCode::InvalidArgument, "{key}");
    }
    let under_approval: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reservations WHERE idempotency_key LIKE 'call-1/%'",
    )
    .fetch_one(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(under_approval, 1);
    // The database holds it too: the reservation is the approval's one use, and a second
    // use (as a wrong planner would write) or any change of it is refused.
    let Some(pb::reserve_set_response::Outcome::Reserved(reserved)) = reserved.outcome else {
        unreachable!()
    };
    let uses: Vec<(uuid::Uuid, uuid::Uuid)> =
        sqlx::query_as("SELECT approval_id, reservation_id FROM approval_uses")
            .fetch_all(ledger.store().pool())
            .await
            .unwrap();
    assert_eq!(
        uses,
        [(
            approval.approval_id.parse().unwrap(),
            reserved.reservation_id.parse().unwrap()
        )]
    );
    let plain = ledger
        .client
        .reserve_set(reserve_request(T, "plain", &both, 10, &fencing))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(plain)) = plain.outcome else {
        panic!("not reserved: {plain:?}")
    };
    let other: uuid::Uuid = plain.reservation_id.parse().unwrap();
    for (what, sql) in [
        (
            "a second use",
            "INSERT INTO approval_uses (approval_id, reservation_id) VALUES ($1, $2)",
        ),
        (
            "a changed use",
            "UPDATE approval_uses SET reservation_id = $2 WHERE approval_id = $1",
        ),
        (
            "a deleted use",
            "DELETE FROM approval_uses WHERE approval_id = $1 AND $2::uuid IS NOT NULL",
        ),
    ] {
        let refused = sqlx::query(sql)
            .bind(approval.approval_id.parse::<uuid::Uuid>().unwrap())
            .bind(other)
            .execute(&ledger.owner)
            .await
            .unwrap_err();
        // Class 23 (integrity): the writer isolates such a command and commits the others.
        let state = refused.as_database_error().and_then(|e| e.code()).unwrap();
        assert!(state.starts_with("23"), "{what}: {state} {refused}");
    }
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn the_approval_uses_migration_backfills_reservations_made_before_it() {
    // Goal: a database upgraded with reservations already made under approvals gets their
    // uses from the keys that name the approvals, so the one-use rule holds for them too.
    // (Reverting the migration and applying it again stands for the upgrade.)
    let (mut ledger, fencing) = setup().await;
    let approval = create(&mut ledger, create_request("call-1", &fencing)).await;
    ledger
        .client
        .resolve_approval(resolve_request(
            &approval.approval_id,
            pb::ApprovalDecision::Approve,
            "alice@example.com",
        ))
        .await
        .unwrap();
    // Keys that merely look like a use are not taken for one: another call's prefix before
    // the real approval's id (an ordinary reservation, made before the resume), and a key of
    // no approval.
    for key in [
        format!("x/approved/{}", approval.approval_id),
        format!("call-1/approved/{}", uuid::Uuid::new_v4()),
    ] {
        ledger
            .client
            .reserve_set(reserve_request(T, &key, &["tenant"], 10, &fencing))
            .await
            .unwrap();
    }
    ledger
        .client
        .reserve_set(resumed(
            &approval.approval_id,
            &["team", "tenant"],
            650,
            &fencing,
        ))
        .await
        .unwrap();
    let uses = || async {
        sqlx::query_as::<_, (uuid::Uuid, String)>(
            "SELECT u.approval_id, r.idempotency_key
               FROM approval_uses u JOIN reservations r USING (reservation_id)",
        )
        .fetch_all(ledger.store().pool())
        .await
        .unwrap()
    };
    let written = uses().await;
    assert_eq!(written.len(), 1);
    spendguard_ledger::store::MIGRATOR
        .undo(&ledger.owner, 20_261_127_200_001)
        .await
        .unwrap();
    spendguard_ledger::store::MIGRATOR
        .run(&ledger.owner)
        .await
        .unwrap();
    assert_eq!(uses().await, written);
}

#[tokio::test]
async fn a_sweep_batch_waits_for_the_approvals_it_names_before_it_holds_any_candidate() {
    // Goal: as for reservations (tests/ledger_batches.rs), a batch that sweeps and resolves
    // approval X cannot deadlock with a session that holds X and then wants Y, a pending approval
    // past its expiry that the sweep would take (ids ordered X < Y).
    let (mut ledger, fencing) = setup().await;
    let x = create(&mut ledger, create_request("call-x", &fencing)).await;
    let x_id = uuid::Uuid::parse_str(&x.approval_id).unwrap();
    let y_key = (0..)
        .map(|n| format!("call-y{n}"))
        .find(|key| spendguard_core::plan::approval_id_for(T, key) > x_id)
        .unwrap();
    let y = create(
        &mut ledger,
        pb::CreateApprovalRequest {
            ttl_ms: 1_000,
            ..create_request(&y_key, &fencing)
        },
    )
    .await;
    let y_id = uuid::Uuid::parse_str(&y.approval_id).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;

    // Another replica holds X, then wants Y once the batch waits for X.
    let outcomes = ledger
        .batch_beside_another_replica(
            ("approvals", "approval_id"),
            (x_id, y_id),
            vec![
                spendguard_core::plan::Command::SweepExpired(10),
                spendguard_core::plan::Command::ResolveApproval(
                    spendguard_core::plan::ResolveApproval {
                        tenant_id: T.into(),
                        approval_id: x_id,
                        decision: spendguard_core::plan::ApprovalDecision::Approve,
                        approver: "alice".into(),
                        reason: String::new(),
                    },
                ),
            ],
        )
        .await;
    assert!(
        matches!(
            outcomes[0],
            Ok(spendguard_core::plan::Outcome::Swept {
                reservations: 0,
                approvals: 1
            })
        ),
        "{outcomes:?}"
    );
    assert!(outcomes[1].is_ok(), "{outcomes:?}");
    invariants::check(ledger.store().pool()).await.unwrap();
}
