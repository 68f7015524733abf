//! The chart's RBAC is enough for everything the controllers do: the operator runs as the
//! chart's ServiceAccount (impersonated) and reconciles a Budget, a PricingVersion and a
//! ContractBundle (status, finalizer, ConfigMap, Events), then runs the Budget finalizer.
//! Leader election works with the chart's lease Role in the release namespace, and only there.
//! Real apiserver with RBAC on, real ledger and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_leader::{Elector, LeaderConfig, LeaderHandle, Leadership};
use spendguard_operator::metrics::Metrics;
use spendguard_operator::{Context, controller};
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User, binaries_dir};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;
const NAMESPACE: &str = "spendguard";

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/config/examples/{name}.yaml")).unwrap()
}

/// The chart's operator manifests (ServiceAccount, ClusterRole, lease Role, bindings, Deployment).
fn rendered_operator() -> String {
    let out = Command::new(binaries_dir().join("helm"))
        .args([
            "template",
            "sg",
            &format!("{ROOT}/charts/spendguard"),
            "--namespace",
            NAMESPACE,
            "--show-only",
            "templates/operator.yaml",
        ])
        .output()
        .expect("run helm (make control-plane builds it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A client acting as the chart's ServiceAccount.
async fn service_account_client(plane: &ControlPlane) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig(User::Admin)).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{NAMESPACE}:spendguard-operator"
    ));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{NAMESPACE}"),
        "system:authenticated".into(),
    ]);
    kube::Client::try_from(config).unwrap()
}

async fn wait_for_event(plane: &ControlPlane, object: &str, reason: &str) -> String {
    let selector = format!("involvedObject.name={object},reason={reason}");
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
            |t| !t.is_empty(),
        )
        .await
}

/// The operator's elector, as the chart's ServiceAccount, in `namespace` (short timings).
fn elect(kube: &kube::Client, namespace: &str) -> (tokio::task::JoinHandle<()>, LeaderHandle) {
    let config = LeaderConfig {
        namespace: namespace.into(),
        lease_name: "spendguard-operator".into(),
        identity: "rbac-test".into(),
        renew_interval: Duration::from_millis(200),
        ttl: Duration::from_millis(1_000),
    };
    let (elector, handle) = Elector::new(kube.clone(), config).unwrap();
    (tokio::spawn(elector.run()), handle)
}

/// Leader election needs only the chart's lease Role: in the release namespace the elector
/// creates the Lease and keeps renewing it (an update every round); in any other namespace it
/// never leads. Method: the real elector with a 1 s TTL, checked across several TTLs.
async fn leader_election_works_in_the_release_namespace_only(
    plane: &ControlPlane,
    kube: &kube::Client,
) {
    let (release, release_handle) = elect(kube, NAMESPACE);
    let (other, other_handle) = elect(kube, "default");
    let holder = plane
        .poll(
            &[
                "get",
                "lease",
                "spendguard-operator",
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
            |t| t == "rbac-test",
        )
        .await;
    assert_eq!(holder, "rbac-test");
    // Leadership lapses within the TTL unless renewals (updates) succeed.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(release_handle.is_leader(), "renewal in {NAMESPACE} failed");
        assert_eq!(other_handle.state(), Leadership::Unknown, "led in default");
    }
    let (_, text) = plane.run_kubectl(
        User::Admin,
        &[
            "get",
            "lease",
            "spendguard-operator",
            "-n",
            "default",
            "-o",
            "name",
        ],
        None,
    );
    assert!(text.contains("NotFound"), "a lease in default: {text}");
    release.abort();
    other.abort();
}

#[tokio::test]
async fn the_chart_rbac_covers_every_controller_write() {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    plane.admin(&["create", "namespace", NAMESPACE], None);
    let account = format!("--as=system:serviceaccount:{NAMESPACE}:spendguard-operator");
    let can_i = |resource: &str| {
        let (_, answer) = plane.run_kubectl(
            User::Admin,
            &[
                "auth", "can-i", "create", resource, "-n", "default", &account,
            ],
            None,
        );
        answer.trim().to_owned()
    };
    assert_eq!(can_i("events.events.k8s.io"), "no", "before the chart");
    plane.admin(&["apply", "-f", "-"], Some(&rendered_operator()));
    assert_eq!(can_i("events.events.k8s.io"), "yes");
    assert_eq!(can_i("events"), "yes");
    // Writes to the custom resources are patches only: no `update` of whole objects.
    let can = |verb: &str, subresource: &str| {
        let (_, answer) = plane.run_kubectl(
            User::Admin,
            &[
                "auth",
                "can-i",
                verb,
                "budgets.spendguard.io",
                &format!("--subresource={subresource}"),
                "-n",
                "default",
                &account,
            ],
            None,
        );
        answer.trim().to_owned()
    };
    for subresource in ["", "status"] {
        assert_eq!(can("patch", subresource), "yes", "patch {subresource}");
        assert_eq!(can("update", subresource), "no", "update {subresource}");
    }
    // Leader election: the Lease verbs in the release namespace only (a Role, not the
    // ClusterRole).
    let can_i_lease = |verb: &str, namespace: &str| {
        let (_, answer) = plane.run_kubectl(
            User::Admin,
            &[
                "auth",
                "can-i",
                verb,
                "leases.coordination.k8s.io",
                "-n",
                namespace,
                &account,
            ],
            None,
        );
        answer.trim().to_owned()
    };
    for verb in ["get", "create", "update"] {
        assert_eq!(can_i_lease(verb, NAMESPACE), "yes", "{verb} in {NAMESPACE}");
        assert_eq!(can_i_lease(verb, "default"), "no", "{verb} in default");
    }
    assert_eq!(can_i_lease("delete", NAMESPACE), "no");
    let kube = service_account_client(&plane).await;
    leader_election_works_in_the_release_namespace_only(&plane, &kube).await;
    let ledger = TestLedger::start().await.unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let context = Context::new(kube, ledger.client.clone(), metrics, "rbac-test");
    let operator = tokio::spawn(async move {
        tokio::join!(
            controller::budget::run(context.clone()),
            controller::pricing_version::run(context.clone()),
            controller::contract_bundle::run(context)
        )
    });

    for name in ["budget", "pricing-version", "contract-bundle"] {
        plane.admin(&["apply", "-f", "-"], Some(&example(name)));
    }
    let ready = |kind: &'static str, name: &'static str| {
        [
            "get",
            kind,
            name,
            "-n",
            "default",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
        ]
    };
    plane
        .poll(&ready("budget", "team-research"), |r| r == "Reconciled")
        .await;
    plane
        .poll(&ready("contractbundle", "research-agent"), |r| {
            r == "Compiled"
        })
        .await;
    plane
        .poll(
            &[
                "get",
                "configmap",
                "spendguard-bundle-research-agent",
                "-n",
                "default",
                "-o",
                "name",
            ],
            |t| !t.is_empty(),
        )
        .await;
    assert_eq!(
        wait_for_event(&plane, "team-research", "Reconciled").await,
        "Normal"
    );
    assert_eq!(
        wait_for_event(&plane, "research-agent", "Compiled").await,
        "Normal"
    );

    // The finalizer (a patch of the Budget itself) also runs under the chart's role.
    plane
        .delete_and_wait_gone("budget", "team-research", "default")
        .await;
    assert_eq!(
        wait_for_event(&plane, "team-research", "LedgerBudgetClosed").await,
        "Normal"
    );
    operator.abort();
}
