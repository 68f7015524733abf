//! Two `spendguard operator` processes elect one leader on a real apiserver; killing it (-9)
//! hands the work to the other within the lease TTL, and the ledger sees no duplicate writes.
//! A leader that loses its lease stays up as a standby and leads again later.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::ledger::http_get;
use spendguard_testkit::{TestLedger, free_port};
use tokio::process::{Child, Command};

/// The checkout, as cargo names it to this run (`spendguard_testkit::paths`).
const ROOT: &spendguard_testkit::paths::RepoRoot = spendguard_testkit::paths::REPO_ROOT;

fn operator(plane: &ControlPlane, ledger_port: u16, name: &str) -> Child {
    operator_with_admin(plane, ledger_port, name, free_port(), 2_000)
}

fn operator_with_admin(
    plane: &ControlPlane,
    ledger_port: u16,
    name: &str,
    admin_port: u16,
    ttl_ms: u32,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .arg("operator")
        .env("KUBECONFIG", plane.kubeconfig(User::Admin))
        .env(
            "SPENDGUARD_OPERATOR_LEDGER_ADDR",
            format!("http://127.0.0.1:{ledger_port}"),
        )
        .env("SPENDGUARD_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env("SPENDGUARD_LEADER_ELECTION_MODE", "k8s")
        .env("SPENDGUARD_LEADER_RENEW_INTERVAL_MS", "300")
        .env("SPENDGUARD_LEADER_TTL_MS", ttl_ms.to_string())
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", "default")
        .env("SPENDGUARD_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// `kubectl get` of the example Budget's Ready status and limit (`True/100`).
const READY: [&str; 7] = [
    "get",
    "budget",
    "team-research",
    "-n",
    "default",
    "-o",
    "jsonpath={.status.conditions[0].status}/{.status.limit}",
];

/// `kubectl get` of the operator Lease's holder.
const HOLDER_OF: [&str; 7] = [
    "get",
    "lease",
    "spendguard-operator",
    "-n",
    "default",
    "-o",
    "jsonpath={.spec.holderIdentity}",
];

/// A control plane with the CRDs, a ledger, and the example Budget (limit 100) as text.
async fn plane_ledger_and_budget() -> (ControlPlane, TestLedger, String) {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&std::path::Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    let ledger = TestLedger::start().await.unwrap();
    let budget = std::fs::read_to_string(format!("{ROOT}/config/examples/budget.yaml")).unwrap();
    (plane, ledger, budget)
}

/// The example Budget with another limit (`"100.00"` in the file).
fn with_limit(budget: &str, limit: &str) -> String {
    budget.replace("\"100.00\"", &format!("\"{limit}\""))
}

/// No duplicate ledger writes: one tenant event, and one budget event per spec change.
async fn assert_upserts(ledger: &TestLedger, budget_changes: i64) {
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_type, count(*) FROM audit_outbox WHERE event_type IN ('tenant.upserted', 'budget.upserted') GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(
        counts,
        [
            ("budget.upserted".to_owned(), budget_changes),
            ("tenant.upserted".to_owned(), 1)
        ]
    );
}

#[tokio::test]
async fn standby_takes_over_when_the_leader_is_killed() {
    let (plane, ledger, budget) = plane_ledger_and_budget().await;
    let port = ledger.ledger.as_ref().unwrap().control_addr.port();
    let mut a = operator(&plane, port, "op-a");
    let mut b = operator(&plane, port, "op-b");

    plane.admin(&["apply", "-f", "-"], Some(&budget));
    plane.poll(&READY, |t| t == "True/100").await;
    let leader = plane.poll(&HOLDER_OF, |t| t == "op-a" || t == "op-b").await;

    // kill -9 the leader: its lease is not released; the standby takes over after the TTL.
    let (dead, survivor) = if leader == "op-a" {
        (&mut a, "op-b")
    } else {
        (&mut b, "op-a")
    };
    dead.start_kill().unwrap();
    dead.wait().await.unwrap();
    plane.poll(&HOLDER_OF, |t| t == survivor).await;

    // The new leader reconciles changes.
    plane.admin(&["apply", "-f", "-"], Some(&with_limit(&budget, "120.00")));
    plane.poll(&READY, |t| t == "True/120").await;
    assert_upserts(&ledger, 2).await;
    let _ = a.start_kill();
    let _ = b.start_kill();
}

/// The operator's `spendguard_operator_leader` gauge, once its admin server answers.
async fn leader_gauge(admin_port: u16) -> Option<u8> {
    let (status, body) = http_get(admin_port, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|line| line.strip_prefix("spendguard_operator_leader "))
        .and_then(|value| value.trim().parse().ok())
}

async fn wait_for_gauge(admin_port: u16, want: u8) {
    for _ in 0..300 {
        if leader_gauge(admin_port).await == Some(want) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!(
        "leader gauge never became {want}: {:?}",
        leader_gauge(admin_port).await
    );
}

#[tokio::test]
async fn a_leader_that_loses_its_lease_stays_up_as_a_standby_and_leads_again() {
    // Goal: losing the lease stops the controllers, not the process, so the webhooks it serves
    // stay up (with one replica and `failurePolicy: Fail`, an exit would refuse every pod
    // injection, CR write and approval decision until the restart). While standby it
    // reconciles nothing; once it leads again its new controllers reconcile.
    // Method: another holder takes the Lease and renews it for a while; once that holder stops
    // renewing, the operator takes the Lease back after a TTL.
    let (plane, ledger, budget) = plane_ledger_and_budget().await;
    let port = ledger.ledger.as_ref().unwrap().control_addr.port();
    let admin_port = free_port();
    // A TTL well above the other holder's renewal gaps (three kubectl runs and a 300 ms sleep
    // on a loaded machine), so the operator cannot take the Lease back while it renews.
    let mut op = operator_with_admin(&plane, port, "op-a", admin_port, 8_000);
    plane.admin(&["apply", "-f", "-"], Some(&budget));
    plane.poll(&READY, |t| t == "True/100").await;
    plane.poll(&HOLDER_OF, |t| t == "op-a").await;
    wait_for_gauge(admin_port, 1).await;

    // Another holder takes the Lease and renews it, as a leader would.
    let intruder_renews = |plane: &ControlPlane| {
        let now = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"])
            .output()
            .unwrap();
        let now = String::from_utf8(now.stdout).unwrap();
        let patch = format!(
            r#"{{"spec": {{"holderIdentity": "intruder", "renewTime": "{}"}}}}"#,
            now.trim()
        );
        plane.admin(
            &[
                "patch",
                "lease",
                "spendguard-operator",
                "-n",
                "default",
                "--type=merge",
                "-p",
                &patch,
            ],
            None,
        );
    };
    intruder_renews(&plane);
    wait_for_gauge(admin_port, 0).await;
    assert!(
        op.try_wait().unwrap().is_none(),
        "the operator exited on losing its lease"
    );
    let (ready_status, _) = http_get(admin_port, "/readyz").await.unwrap();
    assert_eq!(
        ready_status, 200,
        "a standby is ready: it serves the webhooks"
    );

    // While the other holder renews, a change is not reconciled here.
    plane.admin(&["apply", "-f", "-"], Some(&with_limit(&budget, "110.00")));
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        intruder_renews(&plane);
        assert_eq!(
            plane.admin(&READY, None),
            "True/100",
            "a standby reconciled"
        );
    }
    assert_eq!(leader_gauge(admin_port).await, Some(0));

    // The other holder stops renewing: after a TTL the operator leads again, and its new
    // controllers reconcile the change.
    plane.poll(&HOLDER_OF, |t| t == "op-a").await;
    wait_for_gauge(admin_port, 1).await;
    plane.poll(&READY, |t| t == "True/110").await;
    assert!(op.try_wait().unwrap().is_none());
    // Each spec change reached the ledger once: the one before the loss and the one after.
    assert_upserts(&ledger, 2).await;
    let _ = op.start_kill();
}
