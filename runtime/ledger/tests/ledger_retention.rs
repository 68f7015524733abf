//! Retention policies (S19 admin RPCs) against the real ledger on a real PostgreSQL database:
//! validated, audited once per change, idempotent, and bounded by the database as well.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::error_code;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::outbox_events;
use spendguard_testkit::postgres::refusal;
use spendguard_testkit::{TestLedger, invariants};

const T: &str = "tenant-a";

fn request(days: u32, redact: Option<u32>) -> pb::UpsertRetentionPolicyRequest {
    pb::UpsertRetentionPolicyRequest {
        tenant_id: T.into(),
        audit_retention_days: days,
        redact_payloads_after_days: redact,
    }
}

async fn retention_events(ledger: &TestLedger) -> Vec<serde_json::Value> {
    outbox_events(ledger.store().pool(), "retention_policy.upserted")
        .await
        .unwrap()
}

#[tokio::test]
async fn upsert_get_and_audit() {
    // Goal: a policy is stored, read back, changed and audited once per change; an identical
    // repeat writes nothing.
    let mut ledger = TestLedger::start().await.unwrap();
    ledger.tenant_with_lease(T).await.unwrap();
    let missing = ledger
        .client
        .get_retention_policy(pb::GetRetentionPolicyRequest {
            tenant_id: T.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!missing.found && missing.policy.is_none());

    let first = ledger
        .client
        .upsert_retention_policy(request(365, Some(30)))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created && first.changed);
    let again = ledger
        .client
        .upsert_retention_policy(request(365, Some(30)))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created && !again.changed);
    assert_eq!(again.policy, first.policy);
    let changed = ledger
        .client
        .upsert_retention_policy(request(90, None))
        .await
        .unwrap()
        .into_inner();
    assert!(!changed.created && changed.changed);

    let got = ledger
        .client
        .get_retention_policy(pb::GetRetentionPolicyRequest {
            tenant_id: T.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.found);
    let policy = got.policy.unwrap();
    assert_eq!(
        (
            policy.tenant_id.as_str(),
            policy.audit_retention_days,
            policy.redact_payloads_after_days
        ),
        (T, 90, None)
    );
    let events = retention_events(&ledger).await;
    assert_eq!(events.len(), 2, "one event per change, none for the repeat");
    assert_eq!(events[0]["data"]["previous"], serde_json::Value::Null);
    assert_eq!(
        events[0]["data"]["policy"]["redact_payloads_after_days"],
        30
    );
    assert_eq!(events[1]["data"]["previous"]["audit_retention_days"], 365);
    assert_eq!(events[1]["data"]["policy"]["audit_retention_days"], 90);
    invariants::check(ledger.store().pool()).await.unwrap();
}

#[tokio::test]
async fn bad_policies_get_stable_codes_and_write_nothing() {
    let mut ledger = TestLedger::start().await.unwrap();
    ledger.tenant_with_lease(T).await.unwrap();
    let cases = [
        (
            "zero days",
            request(0, None),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "over ten years",
            request(3_651, None),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "redaction after retention",
            request(30, Some(31)),
            pb::ErrorCode::InvalidArgument,
        ),
        (
            "unknown tenant",
            pb::UpsertRetentionPolicyRequest {
                tenant_id: "tenant-z".into(),
                ..request(30, None)
            },
            pb::ErrorCode::TenantNotFound,
        ),
        (
            "malformed tenant",
            pb::UpsertRetentionPolicyRequest {
                tenant_id: "Tenant A".into(),
                ..request(30, None)
            },
            pb::ErrorCode::IdMalformed,
        ),
    ];
    for (name, request, expected) in cases {
        let err = ledger
            .client
            .upsert_retention_policy(request)
            .await
            .unwrap_err();
        assert_eq!(error_code(&err), Some(expected), "{name}");
    }
    assert!(retention_events(&ledger).await.is_empty());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM retention_policies")
        .fetch_one(ledger.store().pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);

    // The database holds the same bounds even if validation were skipped.
    ledger
        .client
        .upsert_retention_policy(request(30, Some(7)))
        .await
        .unwrap();
    for (sql, code, rule) in [
        (
            "UPDATE retention_policies SET redact_payloads_after_days = 31",
            "23514",
            "retention_redaction_within_retention",
        ),
        (
            "UPDATE retention_policies SET audit_retention_days = 0",
            "23514",
            "retention_policies_audit_retention_days_check",
        ),
        (
            "INSERT INTO retention_policies (tenant_id, audit_retention_days) VALUES ('tenant-z', 30)",
            "23503",
            "retention_policies_tenant_id_fkey",
        ),
    ] {
        let refused = refusal(ledger.store().pool(), sql).await;
        assert!(refused.is(code, rule), "{sql}: {refused:?}");
    }
    invariants::check(ledger.store().pool()).await.unwrap();
}
