//! The generated CRDs install on the real apiserver, become Established, accept the examples and
//! reject invalid objects with their messages (OpenAPI patterns and CEL rules).
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_testkit::control_plane::{ControlPlane, User};

fn apply(plane: &ControlPlane, yaml: &str) -> (bool, String) {
    plane.run_kubectl(User::Admin, &["apply", "-f", "-"], Some(yaml))
}

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;

#[test]
fn crds_install_accept_examples_and_enforce_rules() {
    let plane = ControlPlane::start().expect("start the control plane");
    let crds =
        std::fs::read_to_string(format!("{ROOT}/crds/generated/spendguard.io.yaml")).unwrap();
    let (ok, text) = apply(&plane, &crds);
    assert!(ok, "{text}");
    let text = plane.admin(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "--all",
            "crd",
        ],
        None,
    );
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
    let text = plane.admin(&["get", "sgbudget", "-n", "default"], None);
    assert!(text.contains("LIMIT") && text.contains("100.00"), "{text}");

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

    // A ContractBundle names at most 7 Budgets (a call with a run id adds an 8th, the ledger's
    // most), each a Kubernetes object name: what the sidecar would refuse at start never gets in.
    let bundle =
        std::fs::read_to_string(format!("{ROOT}/config/examples/contract-bundle.yaml")).unwrap();
    let eight = (1..=8)
        .map(|i| format!("\"b{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let (ok, text) = apply(
        &plane,
        &bundle.replace(
            r#"budgets: ["team-research"]"#,
            &format!("budgets: [{eight}]"),
        ),
    );
    assert!(!ok && text.contains("spec.budgets"), "{text}");
    let (ok, text) = apply(
        &plane,
        &bundle.replace(
            r#"budgets: ["team-research"]"#,
            r#"budgets: ["Team-Research"]"#,
        ),
    );
    assert!(!ok && text.contains("spec.budgets"), "{text}");

    // PricingVersion is immutable.
    let pricing =
        std::fs::read_to_string(format!("{ROOT}/config/examples/pricing-version.yaml")).unwrap();
    let (ok, text) = apply(&plane, &pricing.replace("output: 10000000000", "output: 1"));
    assert!(!ok && text.contains("immutable"), "{text}");
    // publishedAt: only the RFC 3339 the sidecar's parser reads alike (a lower-case `t`, a leap
    // second, a date without a time or a time without a zone are refused by the apiserver,
    // whose `date-time` format alone accepts the lower-case `t`).
    for published_at in [
        "2026-11-01t00:00:00Z",
        "2026-12-31T23:59:60Z",
        "2026-11-01",
        "2026-11-01T00:00:00",
    ] {
        let other = pricing
            .replace("name: pricing-2026-11-01", "name: pricing-misdated")
            .replace("2026-11-01T00:00:00Z", published_at);
        let (ok, text) = apply(&plane, &other);
        assert!(
            !ok && text.contains("spec.publishedAt"),
            "{published_at}: {text}"
        );
    }

    // A decided approval cannot change its decision.
    let status = |phase: &str| {
        let patch = format!("{{\"status\":{{\"phase\":\"{phase}\"}}}}");
        let args = [
            "patch",
            "approvalrequest",
            "research-agent-call-7f3a",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ];
        plane.run_kubectl(User::Admin, &args, None)
    };
    let (ok, text) = status("Approved");
    assert!(ok, "{text}");
    let (ok, text) = status("Denied");
    assert!(!ok && text.contains("cannot change its decision"), "{text}");

    // RBAC applies to the new kinds like any other: the outsider sees nothing.
    let (ok, text) = plane.run_kubectl(User::Outsider, &["get", "budgets", "-n", "default"], None);
    assert!(!ok && text.contains("forbidden"), "{text}");
}
