//! The Helm chart: values are validated by its schema and templates (unsafe multi-replica and
//! lease settings are refused), the rendered manifests, CRDs included, pass server-side
//! validation on the real apiserver, and leases are granted only in the release namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_testkit::control_plane::{ControlPlane, User, binaries_dir};
use std::io::Write;
use std::process::{Command, Stdio};

/// The chart of the checkout under test (`spendguard_testkit::paths`).
fn chart() -> &'static str {
    static CHART: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHART.get_or_init(|| format!("{}/charts/spendguard", spendguard_testkit::paths::REPO_ROOT))
}

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(binaries_dir().join("helm"))
        .args(args)
        .output()
        .expect("run helm (make control-plane builds it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn values_are_validated() {
    let (ok, text) = helm(&["lint", chart()]);
    assert!(ok, "{text}");
    let disabled_two = [
        "template",
        "sg",
        chart(),
        "--set",
        "operator.replicas=2",
        "--set",
        "leaderElection.mode=disabled",
    ];
    let (ok, text) = helm(&disabled_two);
    assert!(
        !ok && text.contains("/operator/replicas") && text.contains("maximum"),
        "{text}"
    );
    // The singleton workers follow the same rule: standbys need leader election (S5).
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "leaderElection.mode=disabled",
        "--set",
        "workers.replicas=2",
    ]);
    assert!(!ok && text.contains("/workers/replicas"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "leaderElection.mode=disabled",
        "--set",
        "workers.replicas=1",
    ]);
    assert!(
        ok && text.contains("spendguard-outbox-forwarder")
            && text.contains("spendguard-ttl-sweeper"),
        "{text}"
    );
    // Without leader election a rollout must not overlap two singletons: the operator and both
    // workers are replaced, not rolled (the ledger, which needs no leader, still rolls).
    assert_eq!(
        text.matches("strategy: {type: Recreate}").count(),
        3,
        "{text}"
    );
    let (ok, text) = helm(&["template", "sg", chart()]);
    assert!(ok && !text.contains("Recreate"), "{text}");
    let (ok, text) = helm(&["template", "sg", chart(), "--set", "operator.replicas=2"]);
    assert!(
        ok && text.contains("replicas: 2"),
        "two replicas with k8s leader election: {text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "leaderElection.ttlMs=1000",
        "--set",
        "leaderElection.renewIntervalMs=2000",
    ]);
    assert!(!ok && text.contains("ttlMs must be greater"), "{text}");
    let (ok, text) = helm(&["template", "sg", chart(), "--set", "ledger.typo=1"]);
    assert!(!ok && text.contains("typo"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "leaderElection.mode=postgres",
    ]);
    assert!(!ok && text.contains("outside Kubernetes"), "{text}");
    // Evidence signing cannot be switched off through the chart, and kms needs its key.
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "ledger.signing.mode=disabled",
    ]);
    assert!(!ok && text.contains("mode"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "ledger.signing.mode=kms",
    ]);
    assert!(!ok && text.contains("kmsKey"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "leaderElection.mode=etcd",
    ]);
    assert!(!ok && text.contains("mode"), "{text}");
    // Webhooks: on by default with the sidecar image defaulting to the chart's image; off
    // removes the configurations and tells the operator not to serve.
    let (ok, text) = helm(&["template", "sg", chart(), "--namespace", "sg-system"]);
    assert!(
        ok && text.contains("kind: MutatingWebhookConfiguration")
            && text.contains("values: [\"sg-system\"]")
            && text.contains("value: \"ghcr.io/spendguard/spendguard:0.1.0\""),
        "{text}"
    );
    let (ok, text) = helm(&["template", "sg", chart(), "--set", "webhook.enabled=false"]);
    assert!(
        ok && !text.contains("WebhookConfiguration") && text.contains("value: \"false\""),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "webhook.injectionFailurePolicy=Maybe",
    ]);
    assert!(!ok && text.contains("injectionFailurePolicy"), "{text}");

    // Approvers: the ClusterRole always, a cluster-wide binding only for listed groups.
    let (ok, text) = helm(&["template", "sg", chart()]);
    assert!(
        ok && text.contains("name: spendguard-approver")
            && text.contains(r#"verbs: ["get", "list", "watch", "approve"]"#)
            && !text.contains("kind: ClusterRoleBinding\nmetadata:\n  name: spendguard-approver"),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "approvals.approverGroups={finance,sre}",
    ]);
    assert!(
        ok && text.contains("kind: ClusterRoleBinding\nmetadata:\n  name: spendguard-approver")
            && text
                .contains(r#"{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "finance"}"#)
            && text.contains(r#"{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "sre"}"#),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "approvals.approverGroups[0]=",
    ]);
    assert!(!ok && text.contains("approverGroups"), "{text}");

    // Credits for injected sidecars: on by default (largest credit 10 USD), an integer (never
    // `1e+10`), never negative, 0 turns them off.
    let (ok, text) = helm(&["template", "sg", chart()]);
    assert!(
        ok && text.contains(
            "name: SPENDGUARD_SIDECAR_CREDIT_NANO_USD\n              value: \"10000000000\""
        ),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "sidecar.creditNanoUsd=0",
    ]);
    assert!(
        ok && text.contains("name: SPENDGUARD_SIDECAR_CREDIT_NANO_USD\n              value: \"0\""),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "sidecar.creditNanoUsd=5000000000",
    ]);
    assert!(ok && text.contains("value: \"5000000000\""), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "sidecar.creditNanoUsd=-1",
    ]);
    assert!(!ok && text.contains("creditNanoUsd"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "sidecar.creditTtlMs=1000",
    ]);
    assert!(!ok && text.contains("creditTtlMs"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "sidecar.creditAheadMs=1500,sidecar.creditQuietMs=30000",
    ]);
    assert!(
        ok && text
            .contains("name: SPENDGUARD_SIDECAR_CREDIT_AHEAD_MS\n              value: \"1500\"")
            && text.contains(
                "name: SPENDGUARD_SIDECAR_CREDIT_QUIET_MS\n              value: \"30000\""
            ),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "sidecar.creditQuietMs=-1",
    ]);
    assert!(!ok && text.contains("creditQuietMs"), "{text}");

    // The database's CA: none by default (the URL's sslmode and the system's roots decide);
    // a Secret's `ca.crt` reaches the three that connect: the ledger, the outbox forwarder and
    // the migration Job.
    let (ok, text) = helm(&["template", "sg", chart()]);
    assert!(ok && !text.contains("PGSSLROOTCERT"), "{text}");
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "ledger.databaseCaSecret=db-ca",
    ]);
    assert!(ok, "{text}");
    let root = "name: PGSSLROOTCERT\n              value: /var/run/spendguard/db-ca/ca.crt";
    assert_eq!(text.matches(root).count(), 3, "{text}");
    assert_eq!(text.matches("secretName: db-ca").count(), 3, "{text}");
    assert_eq!(
        text.matches("mountPath: /var/run/spendguard/db-ca").count(),
        3,
        "{text}"
    );

    // Database roles: the owner's URL goes to the migration Job only, a hook that runs before
    // install and upgrade; the ledger and the forwarder get the runtime login's Secret.
    let (ok, text) = helm(&["template", "sg", chart()]);
    assert!(ok, "{text}");
    let job = text
        .split("\n---")
        .find(|doc| doc.contains("kind: Job"))
        .expect("a migration Job");
    assert!(
        job.contains("args: [\"migrate\"]")
            && job.contains("\"helm.sh/hook\": pre-install,pre-upgrade")
            && job.contains("secretKeyRef: {name: spendguard-db-owner, key: url}"),
        "{job}"
    );
    assert_eq!(text.matches("spendguard-db-owner").count(), 1, "{text}");
    assert!(
        !text.contains("SPENDGUARD_LEDGER_MIGRATE_ON_START"),
        "{text}"
    );
    let (ok, text) = helm(&[
        "template",
        "sg",
        chart(),
        "--set",
        "ledger.ownerDatabaseSecret=",
    ]);
    assert!(!ok && text.contains("ownerDatabaseSecret"), "{text}");
}

#[test]
fn rendered_chart_passes_server_side_dry_run() {
    let (ok, rendered) = helm(&[
        "template",
        "sg",
        chart(),
        "--namespace",
        "spendguard-system",
        "--include-crds",
        "--set",
        "approvals.approverGroups={spendguard:approvers}",
    ]);
    assert!(ok, "{rendered}");
    let plane = ControlPlane::start().expect("control plane");
    let (ok, text) = {
        let out = plane
            .kubectl(User::Admin)
            .args(["create", "namespace", "spendguard-system"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(ok, "{text}");
    let mut apply = plane.kubectl(User::Admin);
    apply
        .args(["apply", "--dry-run=server", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = apply.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rendered.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for object in [
        "customresourcedefinition.apiextensions.k8s.io/budgets.spendguard.io created (server dry run)",
        "deployment.apps/spendguard-ledger created (server dry run)",
        "deployment.apps/spendguard-operator created (server dry run)",
        "clusterrole.rbac.authorization.k8s.io/spendguard-operator created (server dry run)",
        "service/spendguard-webhook created (server dry run)",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/spendguard-injector created (server dry run)",
        "validatingwebhookconfiguration.admissionregistration.k8s.io/spendguard-validator created (server dry run)",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/spendguard-approvals created (server dry run)",
        "clusterrole.rbac.authorization.k8s.io/spendguard-approver created (server dry run)",
        "clusterrolebinding.rbac.authorization.k8s.io/spendguard-approver created (server dry run)",
        "role.rbac.authorization.k8s.io/spendguard-operator-webhook created (server dry run)",
        "role.rbac.authorization.k8s.io/spendguard-operator-leases created (server dry run)",
        "rolebinding.rbac.authorization.k8s.io/spendguard-operator-leases created (server dry run)",
        "networkpolicy.networking.k8s.io/spendguard-ledger created (server dry run)",
        "job.batch/spendguard-migrate created (server dry run)",
    ] {
        assert!(text.contains(object), "missing {object:?} in:\n{text}");
    }
    // The control plane talks to the ledger's control port; sidecars get the data path.
    let value_after = |name: &str| {
        let mut lines = rendered.lines();
        lines.find(|l| l.trim() == format!("- name: {name}"));
        lines.next().unwrap_or_default().trim().to_owned()
    };
    assert!(value_after("SPENDGUARD_OPERATOR_LEDGER_ADDR").ends_with(":7101\""));
    assert!(
        value_after("SPENDGUARD_LEDGER_URL").ends_with(":7101\""),
        "the TTL sweeper"
    );
    assert!(value_after("SPENDGUARD_SIDECAR_LEDGER_URL").ends_with(":7100\""));
    leases_are_granted_only_in_the_release_namespace(&plane, &rendered);
}

/// Whether an RBAC rule grants access to coordination.k8s.io leases (wildcards included).
fn grants_leases(rule: &serde_json::Value) -> bool {
    let has = |key: &str, wanted: &str| {
        rule[key]
            .as_array()
            .is_some_and(|values| values.iter().any(|v| v == wanted || v == "*"))
    };
    has("apiGroups", "coordination.k8s.io") && has("resources", "leases")
}

/// Least privilege for leader election: leases live only in the release namespace, so no
/// ClusterRole may grant them, and the operator's and the workers' Roles there do. Method: the
/// objects as the apiserver would store them (server dry run, JSON), rule by rule.
fn leases_are_granted_only_in_the_release_namespace(plane: &ControlPlane, rendered: &str) {
    let mut apply = plane.kubectl(User::Admin);
    apply
        .args(["apply", "--dry-run=server", "-o", "json", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = apply.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rendered.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = list["items"]
        .as_array()
        .expect("a List of the applied objects");
    let of_kind = |kind: &str| -> Vec<&serde_json::Value> {
        items.iter().filter(|item| item["kind"] == kind).collect()
    };
    let cluster_roles = of_kind("ClusterRole");
    assert!(
        cluster_roles.len() >= 3,
        "operator, webhook and approver ClusterRoles expected, got {}",
        cluster_roles.len()
    );
    for role in cluster_roles {
        let rules = role["rules"].as_array().cloned().unwrap_or_default();
        assert!(
            !rules.iter().any(grants_leases),
            "ClusterRole {} grants leases: {rules:?}",
            role["metadata"]["name"]
        );
    }
    // Each lease holder's grant: a Role in the release namespace, bound to its ServiceAccount.
    for (role_name, account) in [
        ("spendguard-operator-leases", "spendguard-operator"),
        ("spendguard-workers", "spendguard-workers"),
    ] {
        let role = of_kind("Role")
            .into_iter()
            .find(|r| r["metadata"]["name"] == role_name)
            .unwrap_or_else(|| panic!("no Role {role_name}"));
        assert_eq!(role["metadata"]["namespace"], "spendguard-system");
        let rules = role["rules"].as_array().unwrap();
        assert!(rules.iter().any(grants_leases), "{role_name}: {rules:?}");
        let bound = of_kind("RoleBinding").into_iter().any(|b| {
            b["metadata"]["namespace"] == "spendguard-system"
                && b["roleRef"]["kind"] == "Role"
                && b["roleRef"]["name"] == role_name
                && b["subjects"].as_array().is_some_and(|subjects| {
                    subjects.iter().any(|s| {
                        s["kind"] == "ServiceAccount"
                            && s["name"] == account
                            && s["namespace"] == "spendguard-system"
                    })
                })
        });
        assert!(bound, "no RoleBinding of {role_name} to {account}");
    }
}
