//! The local control plane is real: the built apiserver version answers, RBAC is enforced for the
//! token-file users, and tests can define roles and bindings.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_testkit::control_plane::{ControlPlane, K8S_VERSION, User};

fn output(mut command: std::process::Command) -> (bool, String) {
    let out = command.output().expect("run kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn apiserver_runs_with_rbac_and_token_users() {
    let plane = ControlPlane::start().expect("start the control plane");
    let mut version = plane.kubectl(User::Admin);
    version.args(["version", "-o", "json"]);
    let (ok, text) = output(version);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("\"gitVersion\": \"v{K8S_VERSION}\"")),
        "{text}"
    );

    // Aggregated roles such as `view` get their rules from kube-controller-manager, which this
    // harness does not run; tests define the roles they need.
    let mut role = plane.kubectl(User::Admin);
    role.args([
        "create",
        "clusterrole",
        "configmap-reader",
        "--verb=get,list,watch",
        "--resource=configmaps",
    ]);
    let (ok, text) = output(role);
    assert!(ok, "{text}");
    let mut bind = plane.kubectl(User::Admin);
    bind.args([
        "create",
        "clusterrolebinding",
        "viewers",
        "--clusterrole=configmap-reader",
        "--group=spendguard:viewers",
    ]);
    let (ok, text) = output(bind);
    assert!(ok, "{text}");

    // The RBAC authorizer learns of new bindings through a watch: allow it a moment.
    let mut result = (false, String::new());
    for _ in 0..50 {
        let mut read = plane.kubectl(User::Viewer);
        read.args(["get", "configmaps", "-n", "default"]);
        result = output(read);
        if result.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(result.0, "viewer can read: {}", result.1);

    let mut write = plane.kubectl(User::Viewer);
    write.args(["create", "configmap", "nope", "-n", "default"]);
    let (ok, text) = output(write);
    assert!(
        !ok && text.contains("forbidden"),
        "viewer cannot write: {text}"
    );

    let mut outsider = plane.kubectl(User::Outsider);
    outsider.args(["get", "configmaps", "-n", "default"]);
    let (ok, text) = output(outsider);
    assert!(
        !ok && text.contains("forbidden"),
        "outsider cannot read: {text}"
    );

    let mut admin_write = plane.kubectl(User::Admin);
    admin_write.args(["create", "configmap", "yes", "-n", "default"]);
    let (ok, text) = output(admin_write);
    assert!(ok, "admin can write: {text}");
}
