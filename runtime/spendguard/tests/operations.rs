//! Operations of the `spendguard ledger` binary: liveness and readiness differ when the database
//! goes away, metrics carry RPC latency and error codes, and SIGTERM shuts down cleanly.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::ledger::{connect, http_get};
use spendguard_testkit::{PgCluster, free_port};
use std::time::Duration;
use tokio::process::Command;

mod support;

async fn get(port: u16, path: &str) -> (u16, String) {
    http_get(port, path).await.unwrap()
}

/// Whether the admin server on `port` answers 200 on `path` within 10 s.
async fn answers_ok(port: u16, path: &str) -> bool {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
            && get(port, path).await.0 == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `spendguard ledger` on `url` with the data path on `port`, the control listener on `control`
/// and the admin server on `admin`.
fn ledger(url: &str, (port, control, admin): (u16, u16, u16)) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spendguard"));
    command
        .arg("ledger")
        .env("SPENDGUARD_LEDGER_DATABASE_URL", url)
        .env("SPENDGUARD_LEDGER_INSTANCE_ID", "ledger-ops")
        .envs(spendguard_testkit::signing::ledger_env().unwrap())
        .env("SPENDGUARD_LEDGER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "SPENDGUARD_LEDGER_CONTROL_LISTEN_ADDR",
            format!("127.0.0.1:{control}"),
        )
        .env("SPENDGUARD_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
        .env("SPENDGUARD_LOG", "error")
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn the_production_set_up_migrates_as_the_owner_and_serves_as_the_runtime_role() {
    // Goal: the ledger does not serve as a role that could switch its rules off (the cluster's
    // superuser owns every table here), migrating on start included; `spendguard migrate`
    // applies the schema as the owner, after which the ledger serves as a member of
    // spendguard_runtime; the outbox forwarder likewise. Method: the binaries, in the order
    // the chart runs them.
    let url = spendguard_testkit::ledger::shared_cluster()
        .create_database()
        .await
        .unwrap();
    let runtime = spendguard_testkit::postgres::runtime_url(&url);
    let migrate = |url: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spendguard"));
        command
            .arg("migrate")
            .env("SPENDGUARD_LEDGER_DATABASE_URL", url);
        command
    };
    // The runtime role cannot migrate: it may not create tables in the schema.
    let refused = migrate(&runtime).output().await.unwrap();
    assert!(!refused.status.success());
    let applied = migrate(&url).output().await.unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let ports = (free_port(), free_port(), free_port());
    for migrate_on_start in ["false", "true"] {
        let refused = tokio::time::timeout(
            Duration::from_secs(30),
            ledger(&url, ports)
                .env("SPENDGUARD_LEDGER_MIGRATE_ON_START", migrate_on_start)
                .output(),
        )
        .await
        .expect("the ledger served as the superuser")
        .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{stderr}");
        assert!(
            stderr.contains("LEDGER_DATABASE_ROLE_PRIVILEGED")
                && stderr.contains("postgres is a superuser"),
            "{stderr}"
        );
    }
    let mut serving = ledger(&runtime, ports).spawn().unwrap();
    let mut client = support::wait_for_ledger(ports.1).await;
    spendguard_testkit::ledger::tenant(&mut client, "t")
        .await
        .unwrap();
    // The outbox forwarder holds itself to the same rule.
    let forwarder = |url: &str, admin: u16| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spendguard"));
        command
            .args(["worker", "outbox-forwarder"])
            .env("SPENDGUARD_LEDGER_DATABASE_URL", url)
            .env("SPENDGUARD_LEADER_ELECTION_MODE", "disabled")
            .env("SPENDGUARD_PROFILE", "demo")
            .env("SPENDGUARD_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
            .env("SPENDGUARD_LOG", "error")
            .kill_on_drop(true);
        command
    };
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        forwarder(&url, free_port()).output(),
    )
    .await
    .expect("the forwarder ran as the superuser")
    .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("FORWARDER_DATABASE_ROLE_PRIVILEGED"),
        "{stderr}"
    );
    let admin = free_port();
    let mut forwarding = forwarder(&runtime, admin).spawn().unwrap();
    assert!(
        answers_ok(admin, "/healthz").await,
        "the forwarder did not serve as the runtime role"
    );
    support::terminates_cleanly(&mut forwarding, Duration::from_secs(15)).await;
    support::terminates_cleanly(&mut serving, Duration::from_secs(15)).await;
}

#[tokio::test]
async fn health_readiness_metrics_and_graceful_shutdown() {
    let cluster = PgCluster::start(&[("fsync", "off")]).unwrap();
    let url = cluster.create_database().await.unwrap();
    spendguard_testkit::ledger::migrate(&url).await.unwrap();
    let (port, control, admin) = (free_port(), free_port(), free_port());
    let mut ledger = ledger(
        &spendguard_testkit::postgres::runtime_url(&url),
        (port, control, admin),
    )
    .spawn()
    .unwrap();
    assert!(
        answers_ok(admin, "/readyz").await,
        "ledger never became ready"
    );
    assert_eq!(get(admin, "/healthz").await.0, 200);

    // Tenants are set up on the control listener; the data path refuses it.
    let mut data = connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let refused = spendguard_testkit::ledger::tenant(&mut data, "t")
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("PERMISSION_DENIED"),
        "{refused:#}"
    );
    let mut client = connect(format!("127.0.0.1:{control}").parse().unwrap())
        .await
        .unwrap();
    spendguard_testkit::ledger::tenant(&mut client, "t")
        .await
        .unwrap();
    let refused = client
        .get_balances(pb::GetBalancesRequest {
            tenant_id: "t".into(),
            budget_ids: vec!["missing".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(
        spendguard_proto::ledger::error_code(&refused),
        Some(pb::ErrorCode::BudgetNotFound)
    );
    let (status, metrics) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"spendguard_ledger_rpc_duration_seconds_count{rpc="UpsertTenant"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"spendguard_ledger_rpc_errors_total{rpc="UpsertTenant",code="PERMISSION_DENIED"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"spendguard_ledger_rpc_errors_total{rpc="GetBalances",code="BUDGET_NOT_FOUND"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("spendguard_ledger_open_reservations"),
        "{metrics}"
    );

    // The fencing check's read session is open before the database goes.
    let fencing = spendguard_testkit::ledger::tenant_with_lease(&mut client, "t-lease")
        .await
        .unwrap();
    let check = || pb::CheckFencingRequest {
        tenant_id: "t-lease".into(),
        fencing: Some(fencing.clone()),
    };
    data.check_fencing(check()).await.unwrap();

    // Database gone: not ready, still alive; a fencing check fails as the ledger away.
    cluster.stop_immediately().unwrap();
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(get(admin, "/healthz").await.0, 200);
    let away = data.check_fencing(check()).await.unwrap_err();
    assert_eq!(
        spendguard_proto::ledger::error_code(&away),
        Some(pb::ErrorCode::DependencyUnavailable),
        "{away:?}"
    );
    cluster.restart().unwrap();
    let mut back = false;
    for _ in 0..100 {
        if get(admin, "/readyz").await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "ledger did not become ready again after the database returned"
    );
    // The read session broke with the database: checks open another, once a second has passed
    // since the last failed open (meanwhile they fail at once instead of queueing on connects).
    let mut checked = Err(String::new());
    for _ in 0..40 {
        checked = data
            .check_fencing(check())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        if checked.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    checked.unwrap();

    // SIGTERM: drains and exits successfully.
    support::terminates_cleanly(&mut ledger, Duration::from_secs(15)).await;
}
