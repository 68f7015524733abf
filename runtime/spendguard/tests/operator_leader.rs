//! Two `spendguard operator` processes elect one leader on a real apiserver; killing it (-9)
//! hands the work to the other within the lease TTL, and the ledger sees no duplicate writes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly on purpose.

use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::{TestLedger, free_port};
use tokio::process::{Child, Command};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn operator(plane: &ControlPlane, ledger_port: u16, name: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spendguard"))
        .arg("operator")
        .env("KUBECONFIG", plane.kubeconfig(User::Admin))
        .env(
            "SPENDGUARD_OPERATOR_LEDGER_ADDR",
            format!("http://127.0.0.1:{ledger_port}"),
        )
        .env(
            "SPENDGUARD_ADMIN_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("SPENDGUARD_LEADER_ELECTION_MODE", "k8s")
        .env("SPENDGUARD_LEADER_RENEW_INTERVAL_MS", "300")
        .env("SPENDGUARD_LEADER_TTL_MS", "2000")
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", "default")
        .env("SPENDGUARD_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn standby_takes_over_when_the_leader_is_killed() {
    let plane = ControlPlane::start().expect("control plane");
    plane.install_crds(&std::path::Path::new(ROOT).join("crds/generated/spendguard.io.yaml"));
    let ledger = TestLedger::start().await.unwrap();
    let port = ledger.ledger.as_ref().unwrap().control_addr.port();
    let mut a = operator(&plane, port, "op-a");
    let mut b = operator(&plane, port, "op-b");

    let budget = std::fs::read_to_string(format!("{ROOT}/config/examples/budget.yaml")).unwrap();
    plane.admin(&["apply", "-f", "-"], Some(&budget));
    let ready = [
        "get",
        "budget",
        "team-research",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.conditions[0].status}/{.status.limit}",
    ];
    plane.poll(&ready, |t| t == "True/100").await;
    let holder_of = [
        "get",
        "lease",
        "spendguard-operator",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ];
    let leader = plane.poll(&holder_of, |t| t == "op-a" || t == "op-b").await;

    // kill -9 the leader: its lease is not released; the standby takes over after the TTL.
    let (dead, survivor) = if leader == "op-a" {
        (&mut a, "op-b")
    } else {
        (&mut b, "op-a")
    };
    dead.start_kill().unwrap();
    dead.wait().await.unwrap();
    plane.poll(&holder_of, |t| t == survivor).await;

    // The new leader reconciles changes.
    plane.admin(
        &["apply", "-f", "-"],
        Some(&budget.replace("\"100.00\"", "\"120.00\"")),
    );
    plane.poll(&ready, |t| t == "True/120").await;

    // No duplicate ledger writes: one tenant event, one budget event per spec change.
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_type, count(*) FROM audit_outbox WHERE event_type IN ('tenant.upserted', 'budget.upserted') GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(ledger.store().pool())
    .await
    .unwrap();
    assert_eq!(
        counts,
        [
            ("budget.upserted".to_owned(), 2),
            ("tenant.upserted".to_owned(), 1)
        ]
    );
    let _ = a.start_kill();
    let _ = b.start_kill();
}
