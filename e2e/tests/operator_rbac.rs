//! The chart's RBAC is enough for everything the controllers do: the operator runs as the
//! chart's ServiceAccount (impersonated) and reconciles a Budget, a PricingVersion and a
//! ContractBundle (status, finalizer, ConfigMap, Events), then runs the Budget finalizer.
//! Real apiserver with RBAC on, real ledger and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_operator::metrics::Metrics;
use spendguard_operator::{Context, controller};
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User, binaries_dir};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const NAMESPACE: &str = "spendguard";

fn example(name: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/config/examples/{name}.yaml")).unwrap()
}

/// The chart's operator manifests (ServiceAccount, ClusterRole, binding, Deployment).
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
    let ledger = TestLedger::start().await.unwrap();
    let kube = service_account_client(&plane).await;
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
    plane.admin(
        &[
            "delete",
            "budget",
            "team-research",
            "-n",
            "default",
            "--wait=false",
        ],
        None,
    );
    plane
        .poll(
            &[
                "get",
                "budget",
                "team-research",
                "-n",
                "default",
                "--ignore-not-found",
                "-o",
                "name",
            ],
            str::is_empty,
        )
        .await;
    assert_eq!(
        wait_for_event(&plane, "team-research", "LedgerBudgetClosed").await,
        "Normal"
    );
    operator.abort();
}
