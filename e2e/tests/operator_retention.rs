//! The RetentionPolicy controller on a real kube-apiserver and a real ledger (PostgreSQL): a
//! RetentionPolicy becomes the tenant's ledger policy with `Ready=True` for its generation, an
//! update changes it (with an Event), a deletion keeps it, and a ledger refusal shows as
//! `Ready=False` with the ledger's code. The operator runs as the chart's ServiceAccount
//! (impersonated), so the chart's RBAC is exercised too.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

mod operator_support;

use spendguard_operator::metrics::Metrics;
use spendguard_operator::{Context, controller};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::ControlPlane;
use std::path::Path;
use std::sync::Arc;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;
const NAMESPACE: &str = "spendguard";

fn example() -> String {
    std::fs::read_to_string(format!("{ROOT}/config/examples/retention-policy.yaml")).unwrap()
}

/// Polls a jsonpath of RetentionPolicy `name` in `default` until it equals `expected`.
async fn wait_for(plane: &ControlPlane, name: &str, jsonpath: &str, expected: &str) {
    let path = format!("jsonpath={jsonpath}");
    plane
        .poll(
            &["get", "retentionpolicy", name, "-n", "default", "-o", &path],
            |t| t == expected,
        )
        .await;
}

/// Polls until RetentionPolicy `name` has as many Events with `reason` as `count`.
async fn wait_for_events(plane: &ControlPlane, name: &str, reason: &str, count: usize) {
    let selector = format!("involvedObject.name={name},reason={reason}");
    plane
        .poll(
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &selector,
                "-o",
                "jsonpath={.items[*].type}",
            ],
            |t| t.split_whitespace().count() == count,
        )
        .await;
}

async fn ledger_policy(ledger: &TestLedger, tenant: &str) -> pb::GetRetentionPolicyResponse {
    ledger
        .client
        .clone()
        .get_retention_policy(pb::GetRetentionPolicyRequest {
            tenant_id: tenant.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

const READY_STATUS: &str = "{.status.conditions[?(@.type==\"Ready\")].status}";
const READY_REASON: &str = "{.status.conditions[?(@.type==\"Ready\")].reason}";
const READY_GENERATION: &str = "{.status.conditions[?(@.type==\"Ready\")].observedGeneration}";

#[tokio::test]
async fn retention_policies_are_recorded_in_the_ledger_and_kept_on_delete() {
    // Goal: apply → ledger policy and Ready=True for generation 1; update → changed policy,
    // generation 2 and an Event; delete → the ledger keeps the policy; a tenant id the ledger
    // refuses → Ready=False with the ledger's code. Method: kubectl against the real
    // apiserver, GetRetentionPolicy against the real ledger.
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    plane.admin(&["create", "namespace", NAMESPACE], None);
    plane.admin(
        &["apply", "-f", "-"],
        Some(&operator_support::chart_rbac(NAMESPACE)),
    );
    let ledger = TestLedger::start().await.unwrap();
    let kube = operator_support::service_account_client(&plane, NAMESPACE).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let context = Context::new(kube, ledger.client.clone(), metrics, "e2e-operator");
    let operator = tokio::spawn(controller::retention_policy::run(context));
    assert!(!ledger_policy(&ledger, "acme").await.found);

    plane.admin(&["apply", "-f", "-"], Some(&example()));
    wait_for(&plane, "acme", READY_STATUS, "True").await;
    wait_for(&plane, "acme", READY_REASON, "Recorded").await;
    wait_for(&plane, "acme", READY_GENERATION, "1").await;
    let recorded = ledger_policy(&ledger, "acme").await;
    assert!(recorded.found);
    let policy = recorded.policy.unwrap();
    assert_eq!(
        (
            policy.audit_retention_days,
            policy.redact_payloads_after_days
        ),
        (400, Some(30))
    );
    wait_for_events(&plane, "acme", "LedgerPolicyCreated", 1).await;

    // An update changes the ledger's policy (redaction dropped) for generation 2.
    let updated = example()
        .replace("auditRetentionDays: 400", "auditRetentionDays: 730")
        .replace("  redactPayloadsAfterDays: 30\n", "");
    assert_ne!(updated, example());
    plane.admin(&["replace", "-f", "-"], Some(&updated));
    wait_for(&plane, "acme", READY_GENERATION, "2").await;
    let policy = ledger_policy(&ledger, "acme").await.policy.unwrap();
    assert_eq!(
        (
            policy.audit_retention_days,
            policy.redact_payloads_after_days
        ),
        (730, None)
    );
    wait_for_events(&plane, "acme", "LedgerPolicyChanged", 1).await;

    // Deleting the object keeps the ledger's policy: retention never disappears silently.
    plane.admin(
        &["delete", "retentionpolicy", "acme", "-n", "default"],
        None,
    );
    let policy = ledger_policy(&ledger, "acme").await.policy.unwrap();
    assert_eq!(policy.audit_retention_days, 730);

    // A tenant id the CRD lets through but the ledger refuses: Ready=False, code in message.
    let refused = example()
        .replace("name: acme", "name: refused")
        .replace("tenant: acme", "tenant: Acme_Corp");
    plane.admin(&["apply", "-f", "-"], Some(&refused));
    wait_for(&plane, "refused", READY_REASON, "LedgerRefused").await;
    let message = plane.admin(
        &[
            "get",
            "retentionpolicy",
            "refused",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
        ],
        None,
    );
    assert!(message.contains("ID_MALFORMED"), "{message}");
    operator.abort();
}
