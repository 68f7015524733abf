//! The generated CRDs install on the real apiserver, become Established, accept the examples and
//! reject invalid objects with their messages (OpenAPI patterns and CEL rules).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_testkit::control_plane::{ControlPlane, User};
use std::io::Write;
use std::process::{Command, Stdio};

fn run(mut command: Command, stdin: Option<&str>) -> (bool, String) {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("run kubectl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn apply(plane: &ControlPlane, yaml: &str) -> (bool, String) {
    let mut command = plane.kubectl(User::Admin);
    command.args(["apply", "-f", "-"]);
    run(command, Some(yaml))
}

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

#[test]
fn crds_install_accept_examples_and_enforce_rules() {
    let plane = ControlPlane::start().expect("start the control plane");
    let crds =
        std::fs::read_to_string(format!("{ROOT}/crds/generated/spendguard.io.yaml")).unwrap();
    let (ok, text) = apply(&plane, &crds);
    assert!(ok, "{text}");
    let mut wait_all = plane.kubectl(User::Admin);
    wait_all.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "--all",
        "crd",
    ]);
    let (ok, text) = run(wait_all, None);
    assert!(ok, "{text}");
    for kind in [
        "budgets",
        "contractbundles",
        "pricingversions",
        "signingkeys",
        "retentionpolicies",
        "approvalrequests",
    ] {
        assert!(
            text.contains(&format!("{kind}.spendguard.io condition met")),
            "{kind}: {text}"
        );
    }

    for example in [
        "pricing-version",
        "budget",
        "contract-bundle",
        "signing-key",
        "retention-policy",
        "approval-request",
    ] {
        let yaml =
            std::fs::read_to_string(format!("{ROOT}/config/examples/{example}.yaml")).unwrap();
        let (ok, text) = apply(&plane, &yaml);
        assert!(ok, "{example}: {text}");
    }
    let mut get = plane.kubectl(User::Admin);
    get.args(["get", "sgbudget", "-n", "default"]);
    let (ok, text) = run(get, None);
    assert!(
        ok && text.contains("LIMIT") && text.contains("100.00"),
        "{text}"
    );

    let budget = |limit: &str, soft_cap: &str| {
        format!(
            "apiVersion: spendguard.io/v1alpha1\nkind: Budget\nmetadata: {{name: b-{}, namespace: default}}\nspec: {{tenant: acme, limit: {limit:?}, softCap: {soft_cap:?}, window: Lifetime}}\n",
            limit.replace('.', "-")
        )
    };
    let (ok, text) = apply(&plane, &budget("10.00", "11.00"));
    assert!(
        !ok && text.contains("softCap must not exceed limit"),
        "{text}"
    );
    let (ok, text) = apply(&plane, &budget("-1", "0"));
    assert!(!ok && text.contains("spec.limit"), "{text}");
    let (ok, text) = apply(&plane, &budget("10.1234567891", "0"));
    assert!(!ok && text.contains("spec.limit"), "{text}");

    // PricingVersion is immutable.
    let pricing =
        std::fs::read_to_string(format!("{ROOT}/config/examples/pricing-version.yaml")).unwrap();
    let (ok, text) = apply(&plane, &pricing.replace("output: 10000000000", "output: 1"));
    assert!(!ok && text.contains("immutable"), "{text}");

    // A decided approval cannot change its decision.
    let status = |phase: &str| {
        let mut patch = plane.kubectl(User::Admin);
        patch.args([
            "patch",
            "approvalrequest",
            "research-agent-call-7f3a",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!("{{\"status\":{{\"phase\":\"{phase}\"}}}}"),
        ]);
        run(patch, None)
    };
    let (ok, text) = status("Approved");
    assert!(ok, "{text}");
    let (ok, text) = status("Denied");
    assert!(!ok && text.contains("cannot change its decision"), "{text}");

    // RBAC applies to the new kinds like any other: the outsider sees nothing.
    let mut outsider = plane.kubectl(User::Outsider);
    outsider.args(["get", "budgets", "-n", "default"]);
    let (ok, text) = run(outsider, None);
    assert!(!ok && text.contains("forbidden"), "{text}");
}
