//! `kubectl apply` of a Budget drives the ledger: the operator creates the tenant and budget with
//! the exact limit, reports balances and Ready in status, follows spec changes, shows spend that
//! happened in the ledger, and reports a ledger outage. Real apiserver, ledger and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_operator::{Context, controller};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::ledger::{LedgerClient, reserve_request};
use std::path::Path;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

async fn plane_with_crds() -> ControlPlane {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    plane
}

/// Polls a jsonpath of the example Budget until it equals `expected`.
async fn wait_for(plane: &ControlPlane, jsonpath: &str, expected: &str) {
    let path = format!("jsonpath={jsonpath}");
    plane
        .poll(
            &[
                "get",
                "budget",
                "team-research",
                "-n",
                "default",
                "-o",
                &path,
            ],
            |t| t == expected,
        )
        .await;
}

async fn balance(client: &LedgerClient) -> pb::BudgetBalance {
    let request = pb::GetBalancesRequest {
        tenant_id: "acme".into(),
        budget_ids: vec!["default/team-research".into()],
    };
    client
        .clone()
        .get_balances(request)
        .await
        .unwrap()
        .into_inner()
        .balances
        .remove(0)
}

fn example_budget() -> String {
    std::fs::read_to_string(format!("{ROOT}/config/examples/budget.yaml")).unwrap()
}

#[tokio::test]
async fn budget_cr_reconciles_into_the_ledger() {
    let plane = plane_with_crds().await;
    let mut ledger = TestLedger::start().await.unwrap();
    let context = Context {
        kube: plane.client(User::Admin).await.unwrap(),
        ledger: ledger.client.clone(),
    };
    let operator = tokio::spawn(controller::budget::run(context));

    let budget = example_budget();
    plane.admin(&["apply", "-f", "-"], Some(&budget));
    wait_for(
        &plane,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    )
    .await;
    wait_for(&plane, "{.status.remaining}", "100").await;
    let b = balance(&ledger.client).await;
    assert_eq!(
        (b.limit_nano_usd, b.soft_cap_nano_usd),
        (100_000_000_000, 80_000_000_000)
    );
    assert_eq!(b.window, pb::BudgetWindow::CalendarMonthUtc as i32);

    // A spec change flows to the ledger.
    plane.admin(
        &["apply", "-f", "-"],
        Some(&budget.replace("limit: \"100.00\"", "limit: \"150.25\"")),
    );
    wait_for(&plane, "{.status.limit}", "150.25").await;
    assert_eq!(
        balance(&ledger.client).await.limit_nano_usd,
        150_250_000_000
    );

    // Spend in the ledger shows in status after the next reconcile (a metadata touch triggers one).
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
    plane.admin(
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
    let table = plane.admin(&["get", "budgets", "-n", "default"], None);
    assert!(
        table.contains("150.25") && table.contains("True"),
        "{table}"
    );
    operator.abort();
}

#[tokio::test]
async fn ledger_outage_shows_as_ready_false_and_recovers() {
    let plane = plane_with_crds().await;
    let mut ledger = TestLedger::start().await.unwrap();
    let database_url = ledger.database_url.clone();
    let addr = ledger.ledger.as_ref().unwrap().addr;
    // The operator keeps one lazily reconnecting channel to the ledger's address.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let context = Context {
        kube: plane.client(User::Admin).await.unwrap(),
        ledger: pb::ledger_client::LedgerClient::new(channel),
    };
    // Ledger down before the Budget arrives.
    ledger.stop().await;
    let operator = tokio::spawn(controller::budget::run(context));
    plane.admin(&["apply", "-f", "-"], Some(&example_budget()));
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
