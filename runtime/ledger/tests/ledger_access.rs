//! The two listeners: the data path (sidecars, next to the agents they guard) and the control
//! listener (the operator, the workers). An agent whose pod reaches the data path can reserve,
//! settle and record evidence, but cannot create tenants, raise or add budgets, register pricing
//! or keys, decide approvals, change retention, sweep or force a lease takeover: each is
//! PERMISSION_DENIED and changes nothing. A sidecar may create its runs' budgets, never change
//! one.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::error_code;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{LedgerClient, connect, reserve_request, test_pricing};
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";

async fn setup() -> (TestLedger, LedgerClient, pb::FencingToken) {
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "team", 1_000).await.unwrap();
    let data = connect(ledger.ledger.as_ref().unwrap().addr).await.unwrap();
    (ledger, data, fencing)
}

fn denied<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status:?}"
    );
    assert_eq!(
        error_code(&status),
        Some(pb::ErrorCode::PermissionDenied),
        "{what}"
    );
}

async fn outbox(ledger: &TestLedger) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap()
}

fn budget(
    budget_id: &str,
    limit: i64,
    soft_cap: i64,
    window: pb::BudgetWindow,
) -> pb::UpsertBudgetRequest {
    pb::UpsertBudgetRequest {
        tenant_id: T.into(),
        budget_id: budget_id.into(),
        limit_nano_usd: limit,
        soft_cap_nano_usd: soft_cap,
        window: window.into(),
    }
}

/// A soft-cap approval of 100 nano-USD on "team", as a sidecar opens it.
fn approval_request(key: &str, fencing: &pb::FencingToken) -> pb::CreateApprovalRequest {
    pb::CreateApprovalRequest {
        tenant_id: T.into(),
        idempotency_key: key.into(),
        budget_ids: vec!["team".into()],
        budget_id: "team".into(),
        amount_nano_usd: 100,
        fencing: Some(fencing.clone()),
        ttl_ms: 60_000,
        reason_code: "SOFT_CAP_REACHED".into(),
        pricing: Some(test_pricing()),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_data_path_refuses_every_control_rpc_and_nothing_changes() {
    // Goal: what would let an agent spend past its limits (a larger budget, an approval of its
    // own call, a forced takeover of another sidecar's scope) is not served where agents can
    // reach. Method: each control RPC on the data listener, with a request the control listener
    // would accept; then the outbox and the budget are unchanged.
    let (mut ledger, mut data, fencing) = setup().await;
    // An approval pending on the control side, for the resolve attempt.
    let approval = ledger
        .client
        .create_approval(approval_request("needs-a-human", &fencing))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    let before = outbox(&ledger).await;

    denied(
        "UpsertTenant",
        data.upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: "tenant-new".into(),
            display_name: "New".into(),
        })
        .await,
    );
    // Refused before validation: a malformed request learns nothing either.
    denied(
        "a malformed UpsertTenant",
        data.upsert_tenant(pb::UpsertTenantRequest {
            tenant_id: "Not An Id".into(),
            display_name: String::new(),
        })
        .await,
    );
    denied(
        "raise a budget",
        data.upsert_budget(budget("team", 1_000_000, 0, pb::BudgetWindow::Lifetime))
            .await,
    );
    denied(
        "add a budget",
        data.upsert_budget(budget("extra", 1_000_000, 0, pb::BudgetWindow::Lifetime))
            .await,
    );
    denied(
        "a run budget with a soft cap",
        data.upsert_budget(budget("runs/r1", 1_000, 500, pb::BudgetWindow::Lifetime))
            .await,
    );
    denied(
        "a run budget with a window",
        data.upsert_budget(budget(
            "runs/r1",
            1_000,
            0,
            pb::BudgetWindow::CalendarDayUtc,
        ))
        .await,
    );
    denied(
        "RegisterPricing",
        data.register_pricing(pb::RegisterPricingRequest {
            tenant_id: T.into(),
            pricing: Some(pb::PricingRef {
                version: "cheaper".into(),
                sha256_hex: "cd".repeat(32),
            }),
        })
        .await,
    );
    denied(
        "RegisterSigningKey",
        data.register_signing_key(pb::RegisterSigningKeyRequest {
            key_id: "ed25519:forged".into(),
            algorithm: "ed25519".into(),
            public_key: vec![7; 32],
            valid_from_unix_ms: 1,
            ..Default::default()
        })
        .await,
    );
    denied(
        "approve its own call",
        data.resolve_approval(pb::ResolveApprovalRequest {
            tenant_id: T.into(),
            approval_id: approval.approval_id.clone(),
            decision: pb::ApprovalDecision::Approve.into(),
            approver: "agent".into(),
            reason: "self-approved".into(),
        })
        .await,
    );
    denied(
        "ListApprovals",
        data.list_approvals(pb::ListApprovalsRequest::default())
            .await,
    );
    denied(
        "UpsertRetentionPolicy",
        data.upsert_retention_policy(pb::UpsertRetentionPolicyRequest {
            tenant_id: T.into(),
            audit_retention_days: 1,
            redact_payloads_after_days: None,
        })
        .await,
    );
    denied(
        "GetRetentionPolicy",
        data.get_retention_policy(pb::GetRetentionPolicyRequest {
            tenant_id: T.into(),
        })
        .await,
    );
    denied(
        "SweepExpired",
        data.sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 10,
        })
        .await,
    );
    denied(
        "a forced takeover",
        data.acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            tenant_id: T.into(),
            scope_id: fencing.scope_id.clone(),
            workload_instance_id: "intruder".into(),
            ttl_ms: 10_000,
            expected_epoch: 0,
            force: true,
            request_id: String::new(),
        })
        .await,
    );

    assert_eq!(outbox(&ledger).await, before, "nothing was written");
    let team = ledger.balance(T, "team").await.unwrap();
    assert_eq!(team.limit_nano_usd, 1_000);
    let still_pending = ledger
        .client
        .get_approval(pb::GetApprovalRequest {
            tenant_id: T.into(),
            approval_id: approval.approval_id,
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(still_pending.state, pb::ApprovalState::Pending as i32);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn the_data_path_serves_what_a_sidecar_does() {
    // Goal: the split takes nothing from sidecars. Method: on the data listener, a sidecar's
    // lease renewal, a run budget created and created again identically, a reservation against
    // it, its commit, a release, an approval opened and read, balances and a STOP record.
    let (ledger, mut data, fencing) = setup().await;
    let renewed = data
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            tenant_id: T.into(),
            scope_id: fencing.scope_id.clone(),
            workload_instance_id: format!("{T}-w"),
            ttl_ms: 600_000,
            expected_epoch: fencing.epoch,
            force: false,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.epoch, fencing.epoch, "a renewal keeps the epoch");
    let run = budget("runs/r1", 500, 0, pb::BudgetWindow::Lifetime);
    assert!(
        data.upsert_budget(run.clone())
            .await
            .unwrap()
            .into_inner()
            .created
    );
    assert!(!data.upsert_budget(run).await.unwrap().into_inner().created);
    let reserved = data
        .reserve_set(reserve_request(
            T,
            "k1",
            &["team", "runs/r1"],
            100,
            &fencing,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(reserved)) = reserved.outcome else {
        panic!("denied")
    };
    data.commit(pb::CommitRequest {
        tenant_id: T.into(),
        reservation_id: reserved.reservation_id,
        actual_nano_usd: 60,
        fencing: Some(fencing.clone()),
        deferrable: false,
    })
    .await
    .unwrap();
    let second = data
        .reserve_set(reserve_request(T, "k2", &["team"], 100, &fencing))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(second)) = second.outcome else {
        panic!("denied")
    };
    data.release(pb::ReleaseRequest {
        tenant_id: T.into(),
        reservation_id: second.reservation_id,
        fencing: Some(fencing.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let approval = data
        .create_approval(approval_request("k3", &fencing))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    data.get_approval(pb::GetApprovalRequest {
        tenant_id: T.into(),
        approval_id: approval.approval_id,
    })
    .await
    .unwrap();
    let balances = data
        .get_balances(pb::GetBalancesRequest {
            tenant_id: T.into(),
            budget_ids: vec!["runs/r1".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balances.balances[0].committed_nano_usd, 60);
    data.record_stops(pb::RecordStopsRequest {
        tenant_id: T.into(),
        fencing_scope_id: fencing.scope_id.clone(),
        pricing: Some(test_pricing()),
        contract_sha256_hex: String::new(),
        stops: vec![pb::StopRecord {
            record_id: "6f1c2a3b-0000-4000-8000-000000000001".into(),
            call_id: "k4".into(),
            reason: "MODEL_DENIED".into(),
            first_decided_at_unix_ms: 1,
            last_decided_at_unix_ms: 1,
            count: 1,
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn a_sidecar_may_create_a_run_budget_but_never_change_one() {
    // Goal: a per-run limit set by the contract cannot be raised from the data path, even for
    // the run's own budget. Method: create runs/r1 at 500 on the data path, then try 5,000 there
    // (PERMISSION_DENIED, limit still 500), then on the control listener (accepted).
    let (mut ledger, mut data, _) = setup().await;
    data.upsert_budget(budget("runs/r1", 500, 0, pb::BudgetWindow::Lifetime))
        .await
        .unwrap();
    denied(
        "raise a run budget",
        data.upsert_budget(budget("runs/r1", 5_000, 0, pb::BudgetWindow::Lifetime))
            .await,
    );
    assert_eq!(
        ledger.balance(T, "runs/r1").await.unwrap().limit_nano_usd,
        500
    );
    ledger
        .client
        .upsert_budget(budget("runs/r1", 5_000, 0, pb::BudgetWindow::Lifetime))
        .await
        .unwrap();
    assert_eq!(
        ledger.balance(T, "runs/r1").await.unwrap().limit_nano_usd,
        5_000
    );
}
