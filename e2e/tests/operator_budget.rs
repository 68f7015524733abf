//! `kubectl apply` of a Budget drives the ledger: the operator creates the tenant and budget with
//! the exact limit, reports balances and Ready in status, follows spec changes, shows spend that
//! happened in the ledger, and reports a ledger outage; each condition change is an Event, and
//! the outcomes show in the admin server's metrics. Real apiserver, ledger and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_operator::metrics::Metrics;
use spendguard_operator::{Context, admin, controller};
use spendguard_platform::AdminServer;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::ledger::{LedgerClient, http_get, reserve_request};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;

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

/// Polls until the example Budget has an Event with `reason`, and returns its type.
async fn wait_for_event(plane: &ControlPlane, reason: &str) -> String {
    let selector = format!("involvedObject.name=team-research,reason={reason}");
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

fn context(
    kube: kube::Client,
    ledger: LedgerClient,
) -> (Context, prometheus_client::registry::Registry) {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    (
        Context::new(kube, ledger, metrics, "e2e-operator"),
        registry,
    )
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
    let kube = plane.client(User::Admin).await.unwrap();
    let (context, registry) = context(kube, ledger.client.clone());
    let operator = tokio::spawn(controller::budget::run(context));
    let reconciles = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(
                    "spendguard_operator_reconcile_duration_seconds_count{kind=\"Budget\"} ",
                )?
                .parse::<u64>()
                .ok()
            })
            .unwrap_or(0)
    };

    let budget = example_budget();
    plane.admin(&["apply", "-f", "-"], Some(&budget));
    wait_for(
        &plane,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    )
    .await;
    wait_for(&plane, "{.status.remaining}", "100").await;
    assert_eq!(wait_for_event(&plane, "Reconciled").await, "Normal");
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

    // Status writes (the controller's own, or anyone's) trigger no reconcile: a Budget being
    // spent from is not reconciled at round-trip speed. Settled first (the spec change's
    // reconcile wrote status), then a status-only patch: the count stays, and so does the
    // patched field until a real trigger.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let settled = reconciles();
    assert!(settled >= 2, "{settled}");
    plane.admin(
        &[
            "patch",
            "budget",
            "team-research",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"remaining":"1"}}"#,
        ],
        None,
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        reconciles(),
        settled,
        "a status write reconciled the Budget"
    );
    wait_for(&plane, "{.status.remaining}", "1").await;

    // Spend in the ledger shows in status after the next reconcile: the 30 s refresh, or at once
    // after an annotation change (its own status writes do not trigger one).
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
    let addr = ledger.ledger.as_ref().unwrap().control_addr;
    // The operator keeps one lazily reconnecting channel to the ledger's address.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let kube = plane.client(User::Admin).await.unwrap();
    let (context, registry) = context(kube.clone(), pb::ledger_client::LedgerClient::new(channel));
    let metrics = context.metrics.clone();
    // The admin server as `spendguard operator` runs it, on a free port.
    let running = admin::ControllersRunning::default();
    let readiness = admin::readiness(
        kube,
        spendguard_leader::LeaderHandle::always(),
        running.clone(),
    );
    let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), registry, readiness)
        .await
        .unwrap();
    let admin_port = server.local_addr().unwrap().port();
    let admin_task = tokio::spawn(server.serve(std::future::pending()));
    // A leader whose controllers are not running is not ready.
    let (code, body) = http_get(admin_port, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    // Ledger down before the Budget arrives.
    ledger.stop().await;
    running.set(true);
    metrics.set_leader(true);
    let operator = tokio::spawn(controller::budget::run(context));
    assert_eq!(http_get(admin_port, "/readyz").await.unwrap().0, 200);
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
    assert_eq!(wait_for_event(&plane, "LedgerUnavailable").await, "Warning");

    // The ledger comes back on the same (control) address: the retry reconciles.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut registry = Default::default();
    let restarted = spendguard_ledger::start(
        &spendguard_testkit::postgres::runtime_url(&database_url),
        "ledger-0",
        &Default::default(),
        spendguard_testkit::signing::test_signing("ledger-0"),
        listener,
        control_listener,
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
    assert_eq!(wait_for_event(&plane, "Reconciled").await, "Normal");

    // The outage and the recovery are in the metrics.
    let (code, text) = http_get(admin_port, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for expected in [
        "spendguard_operator_reconcile_errors_total{kind=\"Budget\",reason=\"LedgerUnavailable\"}",
        "spendguard_operator_reconciliations_total{kind=\"Budget\",result=\"error\"}",
        "spendguard_operator_reconciliations_total{kind=\"Budget\",result=\"success\"}",
        "spendguard_operator_reconcile_duration_seconds_count{kind=\"Budget\"}",
        "spendguard_operator_leader 1",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(expected))
            .unwrap_or_else(|| panic!("{expected} missing from\n{text}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value >= 1.0, "{line}");
    }
    operator.abort();
    admin_task.abort();
    restarted.shutdown().await;
}

#[tokio::test]
async fn deleting_a_budget_closes_its_ledger_budget_and_keeps_history() {
    // Goal: `kubectl delete budget` runs the finalizer: the ledger budget's limit becomes 0 (no
    // new reservation fits) while committed spend stays, and only then is the object gone.
    // Method: real apiserver, ledger and PostgreSQL; spend through the ledger, delete, compare.
    let plane = plane_with_crds().await;
    let mut ledger = TestLedger::start().await.unwrap();
    let kube = plane.client(User::Admin).await.unwrap();
    let (context, _registry) = context(kube, ledger.client.clone());
    let operator = tokio::spawn(controller::budget::run(context));
    plane.admin(&["apply", "-f", "-"], Some(&example_budget()));
    wait_for(
        &plane,
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    )
    .await;
    wait_for(
        &plane,
        "{.metadata.finalizers[0]}",
        "spendguard.io/ledger-cleanup",
    )
    .await;

    let fencing = ledger.tenant_with_lease("acme").await.unwrap();
    let reserved = ledger
        .client
        .reserve_set(reserve_request(
            "acme",
            "k1",
            &["default/team-research"],
            250_000_000,
            &fencing,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(reservation)) = reserved.outcome else {
        panic!("not reserved: {reserved:?}");
    };
    ledger
        .client
        .commit(pb::CommitRequest {
            tenant_id: "acme".into(),
            reservation_id: reservation.reservation_id,
            actual_nano_usd: 100_000_000,
            fencing: Some(fencing.clone()),
            deferrable: false,
        })
        .await
        .unwrap();

    plane
        .delete_and_wait_gone("budget", "team-research", "default")
        .await;
    // The definition's limit is 0; the current window clamps at its usage (the ledger's rule
    // for lowering a limit below usage), so nothing remains and the spend is kept.
    let b = balance(&ledger.client).await;
    assert_eq!(
        (
            b.limit_nano_usd,
            b.soft_cap_nano_usd,
            b.committed_nano_usd,
            b.remaining_nano_usd
        ),
        (100_000_000, 0, 100_000_000, 0)
    );
    assert_eq!(b.window, pb::BudgetWindow::CalendarMonthUtc as i32);
    // No new reservation fits a closed budget.
    let refused = ledger
        .client
        .reserve_set(reserve_request(
            "acme",
            "k2",
            &["default/team-research"],
            1,
            &fencing,
        ))
        .await;
    let denied = matches!(
        refused.as_ref().map(|r| &r.get_ref().outcome),
        Ok(Some(pb::reserve_set_response::Outcome::Denied(_)))
    );
    assert!(denied || refused.is_err(), "{refused:?}");
    assert_eq!(wait_for_event(&plane, "LedgerBudgetClosed").await, "Normal");
    operator.abort();
}
