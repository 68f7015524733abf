//! The local control plane is real: the built apiserver version answers, RBAC is enforced for the
//! token-file users, and tests can define roles and bindings.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_testkit::control_plane::{ControlPlane, K8S_VERSION, User};

#[test]
fn apiserver_runs_with_rbac_and_token_users() {
    let plane = ControlPlane::start().expect("start the control plane");
    let (ok, text) = plane.run_kubectl(User::Admin, &["version", "-o", "json"], None);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("\"gitVersion\": \"v{K8S_VERSION}\"")),
        "{text}"
    );

    // Aggregated roles such as `view` get their rules from kube-controller-manager, which this
    // harness does not run; tests define the roles they need.
    let (ok, text) = plane.run_kubectl(
        User::Admin,
        &[
            "create",
            "clusterrole",
            "configmap-reader",
            "--verb=get,list,watch",
            "--resource=configmaps",
        ],
        None,
    );
    assert!(ok, "{text}");
    let (ok, text) = plane.run_kubectl(
        User::Admin,
        &[
            "create",
            "clusterrolebinding",
            "viewers",
            "--clusterrole=configmap-reader",
            "--group=spendguard:viewers",
        ],
        None,
    );
    assert!(ok, "{text}");

    // The RBAC authorizer learns of new bindings through a watch: allow it a moment.
    let mut result = (false, String::new());
    for _ in 0..50 {
        result = plane.run_kubectl(User::Viewer, &["get", "configmaps", "-n", "default"], None);
        if result.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(result.0, "viewer can read: {}", result.1);

    let (ok, text) = plane.run_kubectl(
        User::Viewer,
        &["create", "configmap", "nope", "-n", "default"],
        None,
    );
    assert!(
        !ok && text.contains("forbidden"),
        "viewer cannot write: {text}"
    );

    let (ok, text) = plane.run_kubectl(
        User::Outsider,
        &["get", "configmaps", "-n", "default"],
        None,
    );
    assert!(
        !ok && text.contains("forbidden"),
        "outsider cannot read: {text}"
    );

    let (ok, text) = plane.run_kubectl(
        User::Admin,
        &["create", "configmap", "yes", "-n", "default"],
        None,
    );
    assert!(ok, "admin can write: {text}");
}
