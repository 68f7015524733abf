//! `kubectl apply` of a Budget drives the ledger: the operator creates the tenant and budget with
//! the exact limit, reports balances and Ready in status, follows spec changes, and shows spend
//! that happened in the ledger. Real apiserver, real ledger, real PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_operator::{Context, controller};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::ledger::reserve_request;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn kubectl(plane: &ControlPlane, args: &[&str], stdin: Option<&str>) -> String {
    let mut command = plane.kubectl(User::Admin);
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubectl {args:?}: {text}");
    text
}

/// Polls `jsonpath` of the Budget until it equals `expected`.
async fn wait_for(plane: &ControlPlane, jsonpath: &str, expected: &str) {
    let mut last = String::new();
    for _ in 0..100 {
        last = kubectl(
            plane,
            &[
                "get",
                "budget",
                "team-research",
                "-n",
                "default",
                "-o",
                &format!("jsonpath={jsonpath}"),
            ],
            None,
        );
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{jsonpath} stayed {last:?}, expected {expected:?}");
}

#[tokio::test]
async fn budget_cr_reconciles_into_the_ledger() {
    let plane = ControlPlane::start().expect("control plane");
    kubectl(
        &plane,
        &[
            "apply",
            "-f",
            &format!("{ROOT}/crds/generated/spendguard.io.yaml"),
        ],
        None,
    );
    kubectl(
        &plane,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "--all",
            "crd",
        ],
        None,
    );
    let mut ledger = TestLedger::start().await.unwrap();

    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig(User::Admin)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let context = Context {
        kube: kube::Client::try_from(config).unwrap(),
        ledger: ledger.client.clone(),
    };
    let operator = tokio::spawn(controller::budget::run(context));

    let budget = std::fs::read_to_string(format!("{ROOT}/config/examples/budget.yaml")).unwrap();
    kubectl(&plane, &["apply", "-f", "-"], Some(&budget));
    wait_for(
        &plane,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    )
    .await;
    wait_for(&plane, "{.status.remaining}", "100").await;

    let balances = |client: &mut spendguard_testkit::ledger::LedgerClient| {
        let mut client = client.clone();
        async move {
            client
                .get_balances(pb::GetBalancesRequest {
                    tenant_id: "acme".into(),
                    budget_ids: vec!["default/team-research".into()],
                })
                .await
                .unwrap()
                .into_inner()
                .balances
                .remove(0)
        }
    };
    let b = balances(&mut ledger.client).await;
    assert_eq!(
        (b.limit_nano_usd, b.soft_cap_nano_usd),
        (100_000_000_000, 80_000_000_000)
    );
    assert_eq!(b.window, pb::BudgetWindow::CalendarMonthUtc as i32);

    // A spec change flows to the ledger.
    kubectl(
        &plane,
        &["apply", "-f", "-"],
        Some(&budget.replace("limit: \"100.00\"", "limit: \"150.25\"")),
    );
    wait_for(&plane, "{.status.limit}", "150.25").await;
    assert_eq!(
        balances(&mut ledger.client).await.limit_nano_usd,
        150_250_000_000
    );

    // Spend in the ledger shows in status after the next reconcile (a spec touch triggers one).
    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    ledger
        .client
        .reserve_set(reserve_request(
            "acme",
            "k1",
            &["default/team-research"],
            250_000_000,
            &fencing,
        ))
        .await
        .unwrap();
    kubectl(
        &plane,
        &[
            "annotate",
            "budget",
            "team-research",
            "-n",
            "default",
            "touch=1",
        ],
        None,
    );
    wait_for(&plane, "{.status.reserved}", "0.25").await;
    let table = kubectl(&plane, &["get", "budgets", "-n", "default"], None);
    assert!(
        table.contains("150.25") && table.contains("150") && table.contains("True"),
        "{table}"
    );

    operator.abort();
}

#[tokio::test]
async fn ledger_outage_shows_as_ready_false_and_recovers() {
    let plane = ControlPlane::start().expect("control plane");
    kubectl(
        &plane,
        &[
            "apply",
            "-f",
            &format!("{ROOT}/crds/generated/spendguard.io.yaml"),
        ],
        None,
    );
    kubectl(
        &plane,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "--all",
            "crd",
        ],
        None,
    );
    let mut ledger = TestLedger::start().await.unwrap();
    let database_url = ledger.database_url.clone();
    let addr = ledger.ledger.as_ref().unwrap().addr;
    // The operator keeps one lazily reconnecting channel to the ledger's address.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let kubeconfig = kube::config::Kubeconfig::read_from(plane.kubeconfig(User::Admin)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let context = Context {
        kube: kube::Client::try_from(config).unwrap(),
        ledger: pb::ledger_client::LedgerClient::new(channel),
    };
    // Ledger down before the Budget arrives.
    ledger.stop().await;
    let operator = tokio::spawn(controller::budget::run(context));
    let budget = std::fs::read_to_string(format!("{ROOT}/config/examples/budget.yaml")).unwrap();
    kubectl(&plane, &["apply", "-f", "-"], Some(&budget));
    wait_for(
        &plane,
        "{.status.conditions[?(@.type==\"Ready\")].reason}",
        "LedgerUnavailable",
    )
    .await;
    wait_for(
        &plane,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "False",
    )
    .await;

    // The ledger comes back on the same address: the retry reconciles.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut registry = Default::default();
    let restarted = spendguard_ledger::start(
        &database_url,
        "ledger-0",
        &Default::default(),
        listener,
        &mut registry,
    )
    .await
    .unwrap();
    wait_for(
        &plane,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    )
    .await;
    wait_for(&plane, "{.status.limit}", "100").await;
    operator.abort();
    restarted.shutdown().await;
}
