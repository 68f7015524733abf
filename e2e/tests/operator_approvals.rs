//! The ApprovalRequest controller on a real kube-apiserver and a real ledger (PostgreSQL):
//! pending ledger approvals appear as ApprovalRequests with the ledger's spec; a decision with
//! a stamped approver resolves the ledger approval with that approver; a decision without one
//! is not forwarded; a ledger that decided otherwise, or expired the approval, is reflected;
//! a request naming an approval the ledger does not hold for its tenant is refused.
//! The operator runs as the chart's ServiceAccount (impersonated), so the chart's RBAC is
//! exercised too. The approvals webhook is not running here: an admin's status patch that sets
//! `decidedBy` stands in for the identity the webhook stamps (webhook_approvals.rs tests that
//! stamping). The last test pins down the exact requests of the mirror and the expiry branch
//! on the tower-test mock apiserver, with the same real ledger.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

mod operator_support;

use operator_support::{TENANT, ledger_record, open};

use serde_json::{Value, json};
use spendguard_operator::Context;
use spendguard_operator::controller::approval_request::{self, Settings};
use spendguard_operator::metrics::Metrics;
use spendguard_operator::mock_apiserver::{self, Method, StatusCode};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::ControlPlane;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;
/// The release namespace; the chart points the operator's approvals namespace at it.
const NAMESPACE: &str = "spendguard";

/// Control plane with the CRDs and the chart's operator RBAC; ledger with tenant, lease and a
/// budget; the ApprovalRequest controller running as the chart's ServiceAccount.
async fn setup() -> (
    ControlPlane,
    TestLedger,
    pb::FencingToken,
    tokio::task::JoinHandle<()>,
) {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    plane.admin(&["create", "namespace", NAMESPACE], None);
    plane.admin(
        &["apply", "-f", "-"],
        Some(&operator_support::chart_rbac(NAMESPACE)),
    );
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(TENANT).await.unwrap();
    ledger
        .budget(TENANT, "team", 1_000_000_000_000)
        .await
        .unwrap();
    let kube = operator_support::service_account_client(&plane, NAMESPACE).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let context = Context::new(kube, ledger.client.clone(), metrics, "e2e-operator");
    let settings = Settings {
        namespace: NAMESPACE.into(),
        poll_interval: Duration::from_millis(200),
        // As the operator serving the approvals webhook runs; here an admin's status patch
        // stands in for the identity the webhook stamps (webhook_approvals.rs tests that).
        approver_stamped_by_webhook: true,
    };
    let operator = tokio::spawn(approval_request::run(context, settings));
    (plane, ledger, fencing, operator)
}

fn name(approval: &pb::Approval) -> String {
    format!("apr-{}", approval.approval_id)
}

/// Polls a jsonpath of an ApprovalRequest until `want` accepts it; returns it.
async fn wait_for(
    plane: &ControlPlane,
    approval: &pb::Approval,
    jsonpath: &str,
    want: impl Fn(&str) -> bool,
) -> String {
    let path = format!("jsonpath={jsonpath}");
    plane
        .poll(
            &[
                "get",
                "approvalrequest",
                &name(approval),
                "-n",
                NAMESPACE,
                "-o",
                &path,
            ],
            want,
        )
        .await
}

async fn wait_for_resolved(plane: &ControlPlane, approval: &pb::Approval, reason: &str) {
    wait_for(
        plane,
        approval,
        "{.status.conditions[?(@.type==\"Resolved\")].reason}",
        |r| r == reason,
    )
    .await;
}

/// Polls until the ApprovalRequest has an Event with `reason`, and returns its type.
async fn wait_for_event(plane: &ControlPlane, approval: &pb::Approval, reason: &str) -> String {
    let selector = format!("involvedObject.name={},reason={reason}", name(approval));
    plane
        .poll(
            &[
                "get",
                "events",
                "-n",
                NAMESPACE,
                "--field-selector",
                &selector,
                "-o",
                "jsonpath={.items[*].type}",
            ],
            |t| !t.is_empty(),
        )
        .await
}

/// An admin's status patch standing in for `kubectl spendguard approve|deny` plus the
/// webhook's stamp.
fn decide(plane: &ControlPlane, approval: &pb::Approval, status: &str) {
    plane.admin(
        &[
            "patch",
            "approvalrequest",
            &name(approval),
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!("{{\"status\":{status}}}"),
        ],
        None,
    );
}

#[tokio::test]
async fn pending_approvals_are_mirrored_and_stamped_decisions_resolve_them() {
    // Goal: the mirror, then each decision branch, end to end. Method: open approvals in the
    // ledger, wait for their ApprovalRequests, decide by status patches, read the ledger back.
    let (plane, mut ledger, fencing, operator) = setup().await;
    let approve = open(
        &mut ledger,
        &fencing,
        "call-approve",
        1_234_567_891,
        600_000,
    )
    .await;
    let deny = open(&mut ledger, &fencing, "call-deny", 7_000_000_000, 600_000).await;
    let unstamped = open(&mut ledger, &fencing, "call-unstamped", 1, 600_000).await;
    let elsewhere = open(&mut ledger, &fencing, "call-elsewhere", 2, 600_000).await;

    // Mirrored with the ledger's record as spec, exact money, Pending.
    let spec = wait_for(&plane, &approve, "{.spec}", |s| !s.is_empty()).await;
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    assert_eq!(spec["amount"], "1.234567891");
    assert_eq!(spec["tenant"], TENANT);
    assert_eq!(spec["budget"], "team");
    assert_eq!(spec["approvalId"], approve.approval_id.as_str());
    assert_eq!(spec["reason"], "SOFT_CAP_REACHED");
    assert_eq!(spec["requestedBy"], "acme/agent-7");
    let expires = chrono::DateTime::parse_from_rfc3339(spec["expiresAt"].as_str().unwrap())
        .unwrap()
        .timestamp_millis();
    assert_eq!(expires, approve.expires_at_unix_ms);
    wait_for(&plane, &approve, "{.status.phase}", |p| p == "Pending").await;
    wait_for_resolved(&plane, &approve, "AwaitingDecision").await;
    wait_for(&plane, &deny, "{.spec.amount}", |a| a == "7").await;
    wait_for(&plane, &unstamped, "{.spec.amount}", |a| a == "0.000000001").await;

    // Approved with a stamped identity: resolved in the ledger by that approver.
    decide(
        &plane,
        &approve,
        r#"{"phase":"Approved","decidedBy":"alice@example.com","decisionReason":"within plan"}"#,
    );
    wait_for_resolved(&plane, &approve, "LedgerResolved").await;
    let record = ledger_record(&ledger, &approve).await;
    assert_eq!(record.state(), pb::ApprovalState::Approved);
    assert_eq!(record.resolved_by, "alice@example.com");
    assert_eq!(record.resolution_reason, "within plan");
    assert_eq!(
        wait_for_event(&plane, &approve, "LedgerResolved").await,
        "Normal"
    );

    // Denied likewise.
    decide(&plane, &deny, r#"{"phase":"Denied","decidedBy":"bob"}"#);
    wait_for_resolved(&plane, &deny, "LedgerResolved").await;
    let record = ledger_record(&ledger, &deny).await;
    assert_eq!(record.state(), pb::ApprovalState::Denied);
    assert_eq!(record.resolved_by, "bob");

    // No stamped identity: never forwarded; the ledger keeps it pending.
    decide(&plane, &unstamped, r#"{"phase":"Approved"}"#);
    wait_for_resolved(&plane, &unstamped, "ApproverIdentityMissing").await;
    assert_eq!(
        wait_for_event(&plane, &unstamped, "ApproverIdentityMissing").await,
        "Warning"
    );
    assert_eq!(
        ledger_record(&ledger, &unstamped).await.state(),
        pb::ApprovalState::Pending
    );

    // The ledger already approved it (another client): a denial here has no effect, and the
    // request says so.
    ledger
        .client
        .resolve_approval(pb::ResolveApprovalRequest {
            tenant_id: TENANT.into(),
            approval_id: elsewhere.approval_id.clone(),
            decision: pb::ApprovalDecision::Approve.into(),
            approver: "carol".into(),
            reason: String::new(),
        })
        .await
        .unwrap();
    wait_for(&plane, &elsewhere, "{.status.phase}", |p| p == "Pending").await;
    decide(
        &plane,
        &elsewhere,
        r#"{"phase":"Denied","decidedBy":"bob"}"#,
    );
    wait_for_resolved(&plane, &elsewhere, "LedgerDecidedOtherwise").await;
    let message = wait_for(
        &plane,
        &elsewhere,
        "{.status.conditions[?(@.type==\"Resolved\")].message}",
        |m| !m.is_empty(),
    )
    .await;
    assert!(message.contains("approved by carol"), "{message}");
    assert_eq!(
        wait_for_event(&plane, &elsewhere, "LedgerDecidedOtherwise").await,
        "Warning"
    );
    let record = ledger_record(&ledger, &elsewhere).await;
    assert_eq!(
        (record.state(), record.resolved_by.as_str()),
        (pb::ApprovalState::Approved, "carol")
    );

    // A deleted request of a still-pending approval comes back on the next mirror pass.
    plane.admin(
        &[
            "delete",
            "approvalrequest",
            &name(&unstamped),
            "-n",
            NAMESPACE,
        ],
        None,
    );
    wait_for(&plane, &unstamped, "{.status.phase}", |p| p == "Pending").await;
    operator.abort();
}

#[tokio::test]
async fn ledger_expiry_turns_requests_expired_and_late_decisions_have_no_effect() {
    // Goal: the operator reflects the ledger's expiry, and a decision that reaches the ledger
    // after expiry is reported as having no effect. Method: approvals with a 1 s TTL; one is
    // expired by the sweep (SweepExpired, what the ttl-sweeper calls), the other is decided
    // after its expiry without a sweep.
    let (plane, mut ledger, fencing, operator) = setup().await;
    let swept = open(&mut ledger, &fencing, "call-swept", 5, 1_000).await;
    let late = open(&mut ledger, &fencing, "call-late", 6, 1_000).await;
    wait_for(&plane, &swept, "{.status.phase}", |p| p == "Pending").await;
    wait_for(&plane, &late, "{.status.phase}", |p| p == "Pending").await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // Decided after expiry, before any sweep: the ledger expires it in that call.
    decide(&plane, &late, r#"{"phase":"Approved","decidedBy":"alice"}"#);
    wait_for_resolved(&plane, &late, "DecidedAfterExpiry").await;
    assert_eq!(
        wait_for_event(&plane, &late, "DecidedAfterExpiry").await,
        "Warning"
    );
    assert_eq!(
        ledger_record(&ledger, &late).await.state(),
        pb::ApprovalState::Expired
    );
    // The decision itself stays as the approver made it: a decision never changes.
    wait_for(&plane, &late, "{.status.phase}", |p| p == "Approved").await;

    let sweep = ledger
        .client
        .sweep_expired(pb::SweepExpiredRequest {
            max_reservations: 100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sweep.approvals_expired, 1);
    wait_for(&plane, &swept, "{.status.phase}", |p| p == "Expired").await;
    wait_for_resolved(&plane, &swept, "LedgerExpired").await;
    assert_eq!(
        wait_for_event(&plane, &swept, "LedgerExpired").await,
        "Normal"
    );
    operator.abort();
}

/// An ApprovalRequest made by hand (not by the mirror) in the approvals namespace.
fn hand_made(name: &str, tenant: &str, approval_id: &str) -> String {
    format!(
        r#"apiVersion: spendguard.io/v1alpha1
kind: ApprovalRequest
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  tenant: {tenant}
  budget: team
  amount: "1"
  approvalId: {approval_id}
  reason: SOFT_CAP_REACHED
  requestedBy: someone
  expiresAt: "2099-01-01T00:00:00.000Z"
"#
    )
}

#[tokio::test]
async fn requests_the_ledger_does_not_hold_for_their_tenant_are_refused() {
    // Goal: the controller reads one approval with GetApproval scoped to the request's tenant:
    // an unknown id, and another tenant's approval, both read as APPROVAL_NOT_FOUND (Ready=False
    // LedgerRefused), never as that other tenant's record. Method: a real approval of TENANT,
    // then two hand-made requests: one with an id the ledger never issued, one naming the real
    // approval's id under another (existing) tenant.
    let (plane, mut ledger, fencing, operator) = setup().await;
    ledger.tenant_with_lease("other").await.unwrap();
    let known = open(&mut ledger, &fencing, "call-known", 3, 600_000).await;
    wait_for_resolved(&plane, &known, "AwaitingDecision").await;
    plane.admin(
        &["apply", "-f", "-"],
        Some(&hand_made(
            "hand-unknown",
            TENANT,
            "00000000-0000-4000-8000-000000000001",
        )),
    );
    plane.admin(
        &["apply", "-f", "-"],
        Some(&hand_made("hand-foreign", "other", &known.approval_id)),
    );
    for name in ["hand-unknown", "hand-foreign"] {
        let ready = plane
            .poll(
                &[
                    "get",
                    "approvalrequest",
                    name,
                    "-n",
                    NAMESPACE,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}: \
                     {.status.conditions[?(@.type==\"Ready\")].message}",
                ],
                |t| t.starts_with("LedgerRefused:"),
            )
            .await;
        assert!(ready.contains("APPROVAL_NOT_FOUND"), "{name}: {ready}");
    }
    // A request showing a misleading spec under the real approval's id: an approver's decision
    // on it is not forwarded, and the ledger's approval stays pending.
    plane.admin(
        &["apply", "-f", "-"],
        Some(&hand_made("hand-forged", TENANT, &known.approval_id)),
    );
    plane.admin(
        &[
            "patch",
            "approvalrequest",
            "hand-forged",
            "-n",
            NAMESPACE,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Approved","decidedBy":"approver"}}"#,
        ],
        None,
    );
    let forged = plane
        .poll(
            &[
                "get",
                "approvalrequest",
                "hand-forged",
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Resolved\")].reason}",
            ],
            |t| t == "SpecMismatch",
        )
        .await;
    assert_eq!(forged, "SpecMismatch");
    // The other tenant's request learned nothing about the real approval, and changed nothing.
    let resolved = plane
        .poll(
            &[
                "get",
                "approvalrequest",
                "hand-foreign",
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.status.phase}/{.status.conditions[?(@.type==\"Resolved\")].reason}",
            ],
            |t| t.starts_with("Pending/"),
        )
        .await;
    assert_eq!(
        resolved, "Pending/",
        "no Resolved condition from a foreign record"
    );
    assert_eq!(
        ledger_record(&ledger, &known).await.state(),
        pb::ApprovalState::Pending
    );
    wait_for_resolved(&plane, &known, "AwaitingDecision").await;
    operator.abort();
}

/// The ApprovalRequest the mirror creates for `approval`, as the apiserver would return it.
fn as_object(approval: &pb::Approval, status: Option<Value>) -> Value {
    let object = approval_request::mirror_object(approval, NAMESPACE).unwrap();
    let mut object = serde_json::to_value(object).unwrap();
    object["metadata"]["uid"] = json!(format!("u-{}", approval.approval_id));
    object["metadata"]["generation"] = json!(1);
    if let Some(status) = status {
        object["status"] = status;
    }
    object
}

#[tokio::test]
async fn mirror_and_expiry_send_exactly_these_requests() {
    // Goal: the wire shape of the ledger-facing branches. The mirror POSTs only missing
    // requests, under the operator's field manager, and takes AlreadyExists as present; a
    // pending request the ledger expired gets phase Expired from the phase field manager, then
    // Resolved=True; a request still pending requeues for just after its expiry (capped).
    // Method: the tower-test mock apiserver answers; the ledger is real.
    let mut ledger = TestLedger::start().await.unwrap();
    let fencing = ledger.tenant_with_lease(TENANT).await.unwrap();
    ledger
        .budget(TENANT, "team", 1_000_000_000_000)
        .await
        .unwrap();
    let long = open(&mut ledger, &fencing, "call-long", 10, 600_000).await;
    let short = open(&mut ledger, &fencing, "call-short", 20, 1_000).await;
    let (ctx, mut api, _registry) = mock_apiserver::context(ledger.client.clone());
    let collection =
        format!("/apis/spendguard.io/v1alpha1/namespaces/{NAMESPACE}/approvalrequests");

    // One exists already: only the other is created.
    let existing = [name(&long)].into_iter().collect();
    let task = {
        let ctx = ctx.clone();
        tokio::spawn(async move { approval_request::mirror(&ctx, NAMESPACE, &existing).await })
    };
    let post = api.expect(Method::POST, &collection).await;
    post.assert_query(&["fieldManager=spendguard-operator"]);
    assert_eq!(post.body["metadata"]["name"], json!(name(&short)));
    assert_eq!(
        post.body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "spendguard-operator"
    );
    assert_eq!(post.body["spec"]["amount"], "0.00000002");
    assert_eq!(post.body["spec"]["approvalId"], json!(short.approval_id));
    assert!(post.body.get("status").is_none());
    let created = as_object(&short, None);
    post.respond(StatusCode::CREATED, &created);
    let outcome = task.await.unwrap().unwrap();
    assert_eq!((outcome.pending, outcome.created), (2, 1));
    api.expect_no_request().await;

    // Nothing known: both are POSTed in id order; AlreadyExists counts as present.
    let task = {
        let ctx = ctx.clone();
        tokio::spawn(
            async move { approval_request::mirror(&ctx, NAMESPACE, &Default::default()).await },
        )
    };
    let mut ids = [long.approval_id.clone(), short.approval_id.clone()];
    ids.sort();
    let first = api.expect(Method::POST, &collection).await;
    assert_eq!(first.body["spec"]["approvalId"], json!(ids[0]));
    first.respond(
        StatusCode::CONFLICT,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "already exists", "reason": "AlreadyExists", "code": 409}),
    );
    let second = api.expect(Method::POST, &collection).await;
    assert_eq!(second.body["spec"]["approvalId"], json!(ids[1]));
    let body = second.body.clone();
    second.respond(StatusCode::CREATED, &body);
    let outcome = task.await.unwrap().unwrap();
    assert_eq!((outcome.pending, outcome.created), (2, 1));

    let shared = Arc::new(approval_request::ApprovalContext {
        ctx: ctx.as_ref().clone(),
        settings: Settings {
            namespace: NAMESPACE.into(),
            poll_interval: Duration::from_millis(200),
            approver_stamped_by_webhook: true,
        },
    });
    // Still pending, due in ten minutes: AwaitingDecision, looked at again at the cap.
    let pending = as_object(&long, Some(json!({"phase": "Pending"})));
    let status_path = |a: &pb::Approval| format!("{collection}/{}/status", name(a));
    let task = tokio::spawn(approval_request::reconcile(
        serde_json::from_value(pending.clone())
            .map(Arc::new)
            .unwrap(),
        shared.clone(),
    ));
    let body = api.expect_apply(&status_path(&long), &pending).await;
    let resolved = &body["status"]["conditions"][1];
    assert_eq!(
        (&resolved["type"], &resolved["status"], &resolved["reason"]),
        (
            &json!("Resolved"),
            &json!("False"),
            &json!("AwaitingDecision")
        )
    );
    assert_eq!(api.expect_event(NAMESPACE).await["type"], "Normal");
    assert_eq!(
        task.await.unwrap().unwrap(),
        kube::runtime::controller::Action::requeue(Duration::from_secs(600))
    );

    // Expired in the ledger (by the sweep): phase Expired from the phase manager, then
    // Resolved=True LedgerExpired and a Normal Event.
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
    let pending = as_object(&short, Some(json!({"phase": "Pending"})));
    let task = tokio::spawn(approval_request::reconcile(
        serde_json::from_value(pending.clone())
            .map(Arc::new)
            .unwrap(),
        shared,
    ));
    let phase = api.expect(Method::PATCH, &status_path(&short)).await;
    phase.assert_query(&["fieldManager=spendguard-operator-phase", "force=true"]);
    assert_eq!(phase.body["status"], json!({"phase": "Expired"}));
    let mut expired = pending.clone();
    expired["status"]["phase"] = json!("Expired");
    phase.respond(StatusCode::OK, &expired);
    let body = api.expect_apply(&status_path(&short), &expired).await;
    let resolved = &body["status"]["conditions"][1];
    assert_eq!(
        (&resolved["status"], &resolved["reason"]),
        (&json!("True"), &json!("LedgerExpired"))
    );
    let event = api.expect_event(NAMESPACE).await;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("LedgerExpired"))
    );
    assert_eq!(
        task.await.unwrap().unwrap(),
        kube::runtime::controller::Action::await_change()
    );
    api.expect_no_request().await;
}
