//! The approvals webhook on the real apiserver: decisions on ApprovalRequests are admitted only
//! for users RBAC lets `approve` (a SubjectAccessReview), and carry the caller's identity
//! stamped from userInfo, whatever the client claimed. The webhook server runs in-process on
//! 127.0.0.1 as the chart's ServiceAccount (impersonated), with the chart's RBAC, so a missing
//! permission fails these tests. The `kubectl spendguard` plugin (tools/kubectl-spendguard) is
//! run through kubectl's own plugin dispatch with the approver's, viewer's and outsider's tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

mod operator_support;

use serde_json::Value;
use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::free_port;
use std::path::Path;
use std::time::Duration;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;
const OPERATOR_NAMESPACE: &str = "spendguard-system";
const OPERATOR: &str = "system:serviceaccount:spendguard-system:spendguard-operator";
/// Approvers get the example Role here (config/examples/approver-rbac.yaml) ...
const TEAM: &str = "team";
/// ... and the chart's ClusterRole `spendguard-approver` through a RoleBinding here.
const OPS: &str = "ops";

/// A control plane with the CRDs, namespaces, the chart's RBAC, approvers bound in both team
/// namespaces, a viewer in `team` who may patch status but not `approve`, and the approvals
/// webhook configuration (no caBundle yet). `requests` are created Pending first: once the
/// configuration exists, every status write waits for the webhook.
fn setup(port: u16, requests: &[(&str, &str)]) -> ControlPlane {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    for namespace in [OPERATOR_NAMESPACE, TEAM, OPS] {
        plane.admin(&["create", "namespace", namespace], None);
    }
    let rbac = operator_support::chart_rbac(OPERATOR_NAMESPACE);
    plane.admin(&["apply", "-f", "-"], Some(&rbac));
    let example =
        std::fs::read_to_string(format!("{ROOT}/config/examples/approver-rbac.yaml")).unwrap();
    plane.admin(
        &["apply", "-f", "-"],
        Some(&example.replace("namespace: default", &format!("namespace: {TEAM}"))),
    );
    plane.admin(
        &[
            "create",
            "rolebinding",
            "approvers",
            "-n",
            OPS,
            "--clusterrole=spendguard-approver",
            "--group=spendguard:approvers",
        ],
        None,
    );
    plane.admin(
        &[
            "create",
            "role",
            "approval-editor",
            "-n",
            TEAM,
            "--verb=get,list,patch",
            "--resource=approvalrequests.spendguard.io,approvalrequests.spendguard.io/status",
        ],
        None,
    );
    plane.admin(
        &[
            "create",
            "rolebinding",
            "approval-editor",
            "-n",
            TEAM,
            "--role=approval-editor",
            "--user=viewer",
        ],
        None,
    );
    for (namespace, name) in requests {
        pending_request(&plane, namespace, name);
    }
    plane.admin(
        &["apply", "-f", "-"],
        Some(&spendguard_testkit::control_plane::approvals_webhook_configuration(port)),
    );
    plane
}

/// An ApprovalRequest as the operator mirrors it: created, then status Pending.
fn pending_request(plane: &ControlPlane, namespace: &str, name: &str) {
    let example =
        std::fs::read_to_string(format!("{ROOT}/config/examples/approval-request.yaml")).unwrap();
    let object = example
        .replace("name: research-agent-call-7f3a", &format!("name: {name}"))
        .replace("namespace: default", &format!("namespace: {namespace}"));
    plane.admin(&["create", "-f", "-"], Some(&object));
    patch_status(
        plane,
        User::Admin,
        namespace,
        name,
        r#"{"status":{"phase":"Pending"}}"#,
    )
    .unwrap();
}

fn patch_status(
    plane: &ControlPlane,
    user: User,
    namespace: &str,
    name: &str,
    body: &str,
) -> Result<String, String> {
    let (ok, text) = plane.run_kubectl(
        user,
        &[
            "patch",
            "approvalrequest",
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            body,
        ],
        None,
    );
    if ok { Ok(text) } else { Err(text) }
}

fn status(plane: &ControlPlane, namespace: &str, name: &str) -> Value {
    let text = plane.admin(
        &[
            "get",
            "approvalrequest",
            name,
            "-n",
            namespace,
            "-o",
            "json",
        ],
        None,
    );
    serde_json::from_str::<Value>(&text).unwrap()["status"].clone()
}

/// Pending, with no trace of a decision.
fn assert_pending(plane: &ControlPlane, namespace: &str, name: &str) {
    let status = status(plane, namespace, name);
    assert_eq!(status["phase"], "Pending", "{status}");
    for field in ["decidedBy", "decidedAt", "decisionReason"] {
        assert!(status.get(field).is_none(), "{field} in {status}");
    }
}

fn assert_recent(decided_at: &Value) {
    let at = chrono::DateTime::parse_from_rfc3339(decided_at.as_str().unwrap()).unwrap();
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        age >= chrono::Duration::seconds(-5) && age <= chrono::Duration::seconds(120),
        "decidedAt {decided_at} is not now"
    );
}

// Multi-threaded: kubectl calls block their thread while the webhook server answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_need_the_approve_verb_and_carry_the_callers_identity() {
    // Goal: every branch of the webhook as the apiserver drives it. Method: status patches with
    // kubectl as users with and without the approve verb, then a read-back as admin.
    let port = free_port();
    let plane = setup(port, &[(TEAM, "a"), (TEAM, "b"), (TEAM, "c"), (OPS, "d")]);

    // While the webhook is down (no caBundle, nothing listening), nobody can decide.
    let approve = r#"{"status":{"phase":"Approved"}}"#;
    let refused = patch_status(&plane, User::Approver, TEAM, "a", approve).unwrap_err();
    assert!(refused.contains("failed calling webhook"), "{refused}");
    assert_pending(&plane, TEAM, "a");

    let _webhook =
        operator_support::start_approvals_webhook(&plane, OPERATOR_NAMESPACE, port).await;

    // The viewer may patch status (RBAC) but not approve: the webhook refuses, nothing changes.
    for phase in ["Approved", "Denied"] {
        let body = format!(r#"{{"status":{{"phase":"{phase}"}}}}"#);
        let refused = patch_status(&plane, User::Viewer, TEAM, "a", &body).unwrap_err();
        assert!(
            refused.contains("SPENDGUARD_APPROVAL_FORBIDDEN")
                && refused.contains(
                    r#"user "viewer" may not approve or deny ApprovalRequests in namespace "team""#
                )
                && refused.contains(r#"the RBAC verb "approve""#),
            "{refused}"
        );
    }
    assert_pending(&plane, TEAM, "a");
    // The outsider has no RBAC at all: the apiserver refuses before any webhook.
    let refused = patch_status(&plane, User::Outsider, TEAM, "a", approve).unwrap_err();
    assert!(
        refused.contains("forbidden") && refused.contains("approvalrequests/status"),
        "{refused}"
    );

    // Claiming an identity without deciding, or expiring as a human, is refused.
    let refused = patch_status(
        &plane,
        User::Approver,
        TEAM,
        "a",
        r#"{"status":{"decidedBy":"admin"}}"#,
    )
    .unwrap_err();
    assert!(
        refused.contains("SPENDGUARD_APPROVAL_FIELDS_WITHOUT_DECISION"),
        "{refused}"
    );
    let refused = patch_status(
        &plane,
        User::Approver,
        TEAM,
        "a",
        r#"{"status":{"phase":"Expired"}}"#,
    )
    .unwrap_err();
    assert!(
        refused.contains("SPENDGUARD_APPROVAL_EXPIRY_RESERVED"),
        "{refused}"
    );
    assert_pending(&plane, TEAM, "a");

    // The approver approves while claiming to be admin: the stamp says approver, now.
    patch_status(
        &plane,
        User::Approver,
        TEAM,
        "a",
        r#"{"status":{"phase":"Approved","decidedBy":"admin","decidedAt":"2000-01-01T00:00:00Z","decisionReason":"known batch job"}}"#,
    )
    .unwrap();
    let decided = status(&plane, TEAM, "a");
    assert_eq!(decided["phase"], "Approved");
    assert_eq!(decided["decidedBy"], "approver");
    assert_eq!(decided["decisionReason"], "known batch job");
    assert_recent(&decided["decidedAt"]);

    // A decision never changes: not the phase (approver), not the identity (admin).
    let refused = patch_status(
        &plane,
        User::Approver,
        TEAM,
        "a",
        r#"{"status":{"phase":"Denied"}}"#,
    )
    .unwrap_err();
    assert!(
        refused.contains("SPENDGUARD_APPROVAL_ALREADY_DECIDED")
            && refused.contains("already Approved by approver at"),
        "{refused}"
    );
    for body in [
        r#"{"status":{"decidedBy":"admin"}}"#,
        r#"{"status":{"decidedAt":"2000-01-01T00:00:00Z"}}"#,
        r#"{"status":{"decisionReason":"rewritten"}}"#,
        r#"{"status":null}"#,
    ] {
        let refused = patch_status(&plane, User::Admin, TEAM, "a", body).unwrap_err();
        assert!(
            refused.contains("SPENDGUARD_APPROVAL_ALREADY_DECIDED"),
            "{body}: {refused}"
        );
    }
    assert_eq!(status(&plane, TEAM, "a"), decided);

    // Status is a subresource: a write of the main resource cannot decide (the apiserver keeps
    // the old status), so it needs no webhook.
    plane.admin(
        &[
            "patch",
            "approvalrequest",
            "b",
            "-n",
            TEAM,
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"x":"y"}},"status":{"phase":"Approved","decidedBy":"admin"}}"#,
        ],
        None,
    );
    assert_pending(&plane, TEAM, "b");

    // Deny works the same way; in `ops` the approver holds the chart's ClusterRole.
    patch_status(
        &plane,
        User::Approver,
        OPS,
        "d",
        r#"{"status":{"phase":"Denied"}}"#,
    )
    .unwrap();
    let denied = status(&plane, OPS, "d");
    assert_eq!(denied["phase"], "Denied");
    assert_eq!(denied["decidedBy"], "approver");
    assert_recent(&denied["decidedAt"]);

    // The operator's ServiceAccount expires, and never decides.
    let as_operator = |name: &str, body: &str| {
        plane.run_kubectl(
            User::Admin,
            &[
                "--as",
                OPERATOR,
                "patch",
                "approvalrequest",
                name,
                "-n",
                TEAM,
                "--subresource=status",
                "--type=merge",
                "-p",
                body,
            ],
            None,
        )
    };
    let (ok, text) = as_operator("c", r#"{"status":{"phase":"Approved"}}"#);
    assert!(
        !ok && text.contains("SPENDGUARD_APPROVAL_OPERATOR_CANNOT_DECIDE"),
        "{text}"
    );
    let (ok, text) = as_operator("b", r#"{"status":{"phase":"Expired"}}"#);
    assert!(ok, "{text}");
    let expired = status(&plane, TEAM, "b");
    assert_eq!(expired["phase"], "Expired");
    assert_eq!(expired["decidedBy"], OPERATOR);
    assert_recent(&expired["decidedAt"]);

    // Fail closed: when the webhook cannot ask (its SubjectAccessReview permission is gone), a
    // decision is refused, not admitted unchecked.
    plane.admin(
        &[
            "delete",
            "clusterrolebinding",
            "spendguard-operator-webhook",
        ],
        None,
    );
    let mut refused = String::new();
    for _ in 0..100 {
        match patch_status(&plane, User::Approver, TEAM, "c", approve) {
            Err(text) if text.contains("SPENDGUARD_APPROVAL_AUTHORIZATION_FAILED") => {
                refused = text;
                break;
            }
            Err(text) => refused = text,
            Ok(text) => panic!("a decision was admitted without a SubjectAccessReview: {text}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        refused.contains("SPENDGUARD_APPROVAL_AUTHORIZATION_FAILED")
            && refused.contains("refusing to decide unchecked"),
        "{refused}"
    );
    assert_pending(&plane, TEAM, "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubectl_plugin_approves_denies_and_explains_refusals() {
    // Goal: `kubectl spendguard approve|deny|list` as approvers use it. Method: the plugin runs
    // through kubectl's plugin dispatch against the real apiserver and webhook.
    let port = free_port();
    let plane = setup(port, &[(TEAM, "p1"), (TEAM, "p2"), (TEAM, "p3")]);
    let _webhook =
        operator_support::start_approvals_webhook(&plane, OPERATOR_NAMESPACE, port).await;

    let (ok, text) = plane.run_plugin(User::Approver, &["list", "-n", TEAM]);
    assert!(ok, "{text}");
    assert!(text.starts_with("NAMESPACE\tNAME\tTENANT"), "{text}");
    for name in ["p1", "p2", "p3"] {
        assert!(
            text.contains(&format!("team\t{name}\tacme\t1.20\t")),
            "{text}"
        );
    }

    let reason = "known \"batch\" job\\nightly";
    let (ok, text) = plane.run_plugin(
        User::Approver,
        &["approve", "p1", "-n", TEAM, "--reason", reason],
    );
    assert!(
        ok && text.starts_with("ApprovalRequest team/p1 approved by approver at "),
        "{text}"
    );
    let approved = status(&plane, TEAM, "p1");
    assert_eq!(approved["phase"], "Approved");
    assert_eq!(approved["decidedBy"], "approver");
    assert_eq!(approved["decisionReason"], reason);

    // Already decided: the plugin says so (and by whom) instead of sending the write.
    let (ok, text) = plane.run_plugin(User::Approver, &["deny", "p1", "-n", TEAM]);
    assert!(
        !ok && text.contains("error: ApprovalRequest team/p1 is already Approved (by approver at")
            && text.contains("a decision cannot change"),
        "{text}"
    );
    assert_eq!(status(&plane, TEAM, "p1"), approved);

    let (ok, text) = plane.run_plugin(User::Approver, &["deny", "--namespace=team", "p2"]);
    assert!(
        ok && text.starts_with("ApprovalRequest team/p2 denied by approver at "),
        "{text}"
    );
    assert_eq!(status(&plane, TEAM, "p2")["phase"], "Denied");

    let (ok, text) = plane.run_plugin(User::Approver, &["approve", "nope", "-n", TEAM]);
    assert!(
        !ok && text.contains(r#"approvalrequests.spendguard.io "nope" not found"#),
        "{text}"
    );

    // The viewer may patch status but lacks the approve verb: the webhook's message reaches
    // the terminal, and nothing changes.
    let (ok, text) = plane.run_plugin(User::Viewer, &["approve", "p3", "-n", TEAM]);
    assert!(
        !ok && text.contains("SPENDGUARD_APPROVAL_FORBIDDEN")
            && text.contains(r#"user "viewer" may not approve or deny"#),
        "{text}"
    );
    // The outsider cannot even read it.
    let (ok, text) = plane.run_plugin(User::Outsider, &["approve", "p3", "-n", TEAM]);
    assert!(
        !ok && text.contains(r#"User "outsider" cannot get resource "approvalrequests""#),
        "{text}"
    );
    assert_pending(&plane, TEAM, "p3");

    let (ok, text) = plane.run_plugin(User::Approver, &["list", "-n", TEAM]);
    assert!(
        ok && text.contains("team\tp3\t") && !text.contains("\tp1\t"),
        "{text}"
    );
    let (ok, text) = plane.run_plugin(User::Approver, &["approve", "-n", TEAM]);
    assert!(!ok && text.contains("approve needs the NAME"), "{text}");
}
