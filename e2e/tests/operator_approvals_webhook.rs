//! The whole approval path with the approvals webhook in front of the ApprovalRequest
//! controller, on a real kube-apiserver and a real ledger: the operator mirrors a pending
//! approval (its own status writes pass the webhook), an approver decides with their own token
//! while claiming someone else's name, the webhook stamps the real identity, and the ledger
//! records that identity; an expiry set by the operator is admitted and stamped as the
//! operator. Both the webhook and the controller run in-process as the chart's ServiceAccount
//! (impersonated) with the chart's RBAC.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

mod operator_support;

use operator_support::{TENANT, ledger_record, open};

use spendguard_operator::Context;
use spendguard_operator::controller::approval_request::{self, Settings};
use spendguard_operator::metrics::Metrics;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::free_port;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;
/// The release namespace: the operator's, and (as the chart sets it) the approvals namespace.
const NAMESPACE: &str = "spendguard-system";
const OPERATOR: &str = "system:serviceaccount:spendguard-system:spendguard-operator";

async fn wait_for(plane: &ControlPlane, approval: &pb::Approval, jsonpath: &str, want: &str) {
    let name = format!("apr-{}", approval.approval_id);
    let path = format!("jsonpath={jsonpath}");
    plane
        .poll(
            &[
                "get",
                "approvalrequest",
                &name,
                "-n",
                NAMESPACE,
                "-o",
                &path,
            ],
            |t| t == want,
        )
        .await;
}

const RESOLVED: &str = "{.status.conditions[?(@.type==\"Resolved\")].reason}";

// Multi-threaded: kubectl runs blocking on one thread while the in-process webhook answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stamped_approver_is_the_one_the_ledger_records() {
    // Goal: the identity in the ledger is the caller's, never the client's claim, and the
    // operator's own writes (Pending, conditions, Expired) pass the webhook. Method: chart RBAC,
    // the approver bound to the chart's `spendguard-approver` ClusterRole, the webhook and the
    // controller in-process, decisions with the approver's token.
    let port = free_port();
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    plane.admin(&["create", "namespace", NAMESPACE], None);
    plane.admin(
        &["apply", "-f", "-"],
        Some(&operator_support::chart_rbac(NAMESPACE)),
    );
    plane.admin(
        &[
            "create",
            "rolebinding",
            "approvers",
            "-n",
            NAMESPACE,
            "--clusterrole=spendguard-approver",
            "--user=approver",
        ],
        None,
    );
    plane.admin(
        &["apply", "-f", "-"],
        Some(&spendguard_testkit::control_plane::approvals_webhook_configuration(port)),
    );
    let _webhook = operator_support::start_approvals_webhook(&plane, NAMESPACE, port).await;

    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(TENANT).await.unwrap();
    ledger
        .budget(TENANT, "team", 1_000_000_000_000)
        .await
        .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let kube = operator_support::service_account_client(&plane, NAMESPACE).await;
    let context = Context::new(kube, ledger.client.clone(), metrics, "e2e-operator");
    let settings = Settings {
        namespace: NAMESPACE.into(),
        poll_interval: Duration::from_millis(200),
        approver_stamped_by_webhook: true,
    };
    let operator = tokio::spawn(approval_request::run(context, settings));

    let approved = open(
        &mut ledger,
        &fencing,
        "call-approved",
        2_500_000_000,
        600_000,
    )
    .await;
    let expiring = open(&mut ledger, &fencing, "call-expiring", 2_500_000_000, 1_000).await;
    wait_for(&plane, &approved, "{.status.phase}", "Pending").await;
    wait_for(&plane, &approved, RESOLVED, "AwaitingDecision").await;
    wait_for(&plane, &expiring, "{.status.phase}", "Pending").await;

    // The approver claims to be someone else; the webhook stamps who they are.
    let name = format!("apr-{}", approved.approval_id);
    let (ok, out) = plane.run_kubectl(
        User::Approver,
        &[
            "patch",
            "approvalrequest",
            &name,
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Approved","decidedBy":"mallory","decisionReason":"ok"}}"#,
        ],
        None,
    );
    assert!(ok, "{out}");
    wait_for(&plane, &approved, "{.status.decidedBy}", "approver").await;
    wait_for(&plane, &approved, RESOLVED, "LedgerResolved").await;
    let record = ledger_record(&ledger, &approved).await;
    assert_eq!(record.state(), pb::ApprovalState::Approved);
    assert_eq!(record.resolved_by, "approver");

    // Expired by the ledger's sweep: the operator's Expired write is admitted and stamped.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let swept = ledger
        .client
        .sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(swept.approvals_expired, 1);
    wait_for(&plane, &expiring, "{.status.phase}", "Expired").await;
    wait_for(&plane, &expiring, "{.status.decidedBy}", OPERATOR).await;
    wait_for(&plane, &expiring, RESOLVED, "LedgerExpired").await;
    operator.abort();
}
