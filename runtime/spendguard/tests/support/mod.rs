//! Shared set-up of the tests that run the `spendguard sidecar` binary.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // Each test binary uses a part; tests fail loudly.

use serde_json::json;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::free_port;
use spendguard_testkit::ledger::{LedgerClient, TestLedger, connect, http_get};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

pub const BUDGET: &str = "spool/llm";

/// The `spendguard sidecar` command of workload `workload`, listening on `port` and `admin`.
pub fn sidecar_command(
    ledger: std::net::SocketAddr,
    bundle: &Path,
    spool: &Path,
    mock: u16,
    (workload, port, admin): (&str, u16, u16),
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spendguard"));
    command
        .arg("sidecar")
        .env("SPENDGUARD_LEDGER_URL", format!("http://{ledger}"))
        .env("SPENDGUARD_BUNDLE_DIR", bundle)
        .env("SPENDGUARD_WORKLOAD_INSTANCE_ID", workload)
        .env("SPENDGUARD_SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "SPENDGUARD_SIDECAR_GRPC_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("SPENDGUARD_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
        .env(
            "SPENDGUARD_OPENAI_BASE_URL",
            format!("http://127.0.0.1:{mock}"),
        )
        .env(
            "SPENDGUARD_ANTHROPIC_BASE_URL",
            format!("http://127.0.0.1:{mock}"),
        )
        .env("SPENDGUARD_FAIL_OPEN_SPOOL_DIR", spool)
        .env("SPENDGUARD_LOG", "warn")
        .kill_on_drop(true);
    command
}

/// Sends SIGTERM to `child` and asserts it exits successfully within `within` (it drains and
/// shuts down cleanly).
pub async fn terminates_cleanly(child: &mut tokio::process::Child, within: Duration) {
    let pid = child.id().expect("the process is running");
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(within, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// Runs `sidecar` until it exits, which it must do within 30 s and unsuccessfully (it refuses to
/// start): its stderr.
pub async fn refused_startup(mut sidecar: Command) -> String {
    let output = tokio::time::timeout(Duration::from_secs(30), sidecar.output())
        .await
        .expect("a sidecar that must refuse to start kept running")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    stderr
}

/// Spawns what `command` builds for a data port and an admin port, and waits until it is
/// ready. The ports come from `free_port`, below the kernel's ephemeral range, so no outgoing
/// connection can take one before the child binds it. A child that exits before it is ready
/// fails the test with its status (its stderr, inherited, says why).
pub async fn spawn_ready(
    command: impl FnOnce(u16, u16) -> Command,
) -> (tokio::process::Child, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let mut child = command(port, admin).spawn().expect("spawn");
    if !ready_unless_exited(&mut child, admin).await {
        let status = child.wait().await.expect("the child's status");
        panic!("exited before it was ready ({status})");
    }
    (child, port, admin)
}

/// Waits (up to 10 s) until `child` on `admin` is ready: false when it exits first (also right
/// after a ready answer, which then came from whoever holds the port).
async fn ready_unless_exited(child: &mut tokio::process::Child, admin: u16) -> bool {
    for _ in 0..200 {
        let ready = matches!(http_get(admin, "/readyz").await, Ok((200, _)));
        if child.try_wait().expect("the child's status").is_some() {
            return false;
        }
        if ready {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not ready within 10 s");
}

/// Waits (up to 10 s) until the sidecar on `admin` is ready.
pub async fn wait_ready(admin: u16) {
    for _ in 0..200 {
        if matches!(http_get(admin, "/readyz").await, Ok((200, _))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sidecar did not become ready");
}

/// The pricing every binary test registers: gpt-4o-mini at $0.15 / $0.60 per million tokens,
/// claude-sonnet-4-5 at $3 / $15.
fn pricing() -> spendguard_core::pricing::PricingSnapshot {
    serde_json::from_value(json!({
        "version": "crash-2026-11",
        "entries": [{"provider": "openai", "model": "gpt-4o-mini",
                     "price": {"input": 150_000_000, "cached_input": 75_000_000,
                               "cache_write": 150_000_000, "output": 600_000_000}},
                    {"provider": "anthropic", "model": "claude-sonnet-4-5",
                     "price": {"input": 3_000_000_000_i64, "cached_input": 300_000_000,
                               "cache_write": 3_750_000_000_i64, "output": 15_000_000_000_i64}}]}))
    .unwrap()
}

/// A directory holding the bundle of `contract` (with [`pricing`]) for a sidecar of `tenant`,
/// as the operator's ConfigMap mounts it; returns it and the bundle's hash.
pub fn write_bundle(tenant: &str, contract: serde_json::Value) -> (tempfile::TempDir, String) {
    let contract: spendguard_core::contract::Contract = serde_json::from_value(contract).unwrap();
    let bundle = tempfile::tempdir().unwrap();
    let (bytes, sha) = spendguard_core::contract::Bundle::canonical(&contract, &pricing()).unwrap();
    spendguard_sidecar::bundle::write(bundle.path(), &bytes, &sha, tenant, &[BUDGET]).unwrap();
    (bundle, sha)
}

/// A ledger with tenant `tenant`, its budget and pricing registered, the bundle of `contract`
/// written for a sidecar, and the mock provider serving: (ledger, bundle directory, mock port).
pub async fn data_path(
    tenant: &str,
    contract: serde_json::Value,
) -> (TestLedger, tempfile::TempDir, u16) {
    let mut ledger = TestLedger::start().await.unwrap();
    register_data_path(&mut ledger.client, tenant).await;
    let (bundle, _) = write_bundle(tenant, contract);
    (ledger, bundle, spawn_mock())
}

/// What the operator registers for a sidecar of `tenant`: the tenant, [`BUDGET`] (100 USD) and
/// the bundle's pricing.
pub async fn register_data_path(client: &mut LedgerClient, tenant: &str) {
    spendguard_testkit::ledger::tenant(client, tenant)
        .await
        .unwrap();
    spendguard_testkit::ledger::budget(client, tenant, BUDGET, 100_000_000_000)
        .await
        .unwrap();
    let snapshot = spendguard_core::pricing::Pricing::new(pricing()).unwrap();
    spendguard_testkit::ledger::register_pricing(
        client,
        tenant,
        spendguard_sidecar::bundle::pricing_ref(&snapshot),
    )
    .await
    .unwrap();
}

/// The mock provider, serving in this process with its default usage: its port.
pub fn spawn_mock() -> u16 {
    let mock = spendguard_mock_provider::MockProvider::new(
        spendguard_mock_provider::MockConfig::default(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    mock.spawn(tokio::net::TcpListener::from_std(listener).unwrap());
    port
}

/// The `spendguard ledger` process on database `url` (the owner's URL of a migrated database;
/// the process logs in as the runtime role): sidecars' RPCs on port `data`, the operator's (and
/// the tests' set-up) on `control`.
pub fn ledger_command(url: &str, data: u16, control: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spendguard"));
    command
        .arg("ledger")
        .env(
            "SPENDGUARD_LEDGER_DATABASE_URL",
            spendguard_testkit::postgres::runtime_url(url),
        )
        .env("SPENDGUARD_LEDGER_INSTANCE_ID", "ledger-crash")
        .envs(spendguard_testkit::signing::ledger_env().expect("signing key"))
        .env("SPENDGUARD_LEDGER_LISTEN_ADDR", format!("127.0.0.1:{data}"))
        .env(
            "SPENDGUARD_LEDGER_CONTROL_LISTEN_ADDR",
            format!("127.0.0.1:{control}"),
        )
        .env(
            "SPENDGUARD_ADMIN_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("SPENDGUARD_LOG", "warn")
        .kill_on_drop(true);
    command
}

/// Waits (up to 20 s) until the ledger serves on `control`: a client of it.
pub async fn wait_for_ledger(control: u16) -> LedgerClient {
    let addr = format!("127.0.0.1:{control}").parse().unwrap();
    for _ in 0..200 {
        if let Ok(mut client) = connect(addr).await {
            // Connected is not serving: the producer claim may still be held by the dead session.
            if client
                .sweep_expired(pb::SweepExpiredRequest {
                    max_reservations: 1,
                })
                .await
                .is_ok()
            {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ledger on port {control} did not come up");
}

/// A proxied call of `path` with `body` and `headers` (each ending in CRLF), read to the end:
/// the whole response.
pub async fn proxy_call(port: u16, path: &str, headers: &str, body: &serde_json::Value) -> String {
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

pub fn chat_request(stream: bool, extra_headers: &str) -> String {
    let body = json!({"model": "gpt-4o-mini", "stream": stream,
                      "messages": [{"role": "user", "content": "Say hello in one word."}]})
    .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer sk-app\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A proxied chat call, read to the end; its HTTP status.
pub async fn chat(port: u16) -> u16 {
    status_of(&chat_with(port, "").await)
}

/// A proxied chat call with `extra_headers` (each ending in CRLF), read to the end: the whole
/// response.
pub async fn chat_with(port: u16, extra_headers: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(chat_request(false, extra_headers).as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// A `spendguard ledger` process on a fresh database, with a tenant's data path registered, and
/// a bundle for its sidecars; restarted on the same database and ports after a kill.
pub struct LedgerProcess {
    pub url: String,
    pub data: u16,
    pub control: u16,
    pub child: tokio::process::Child,
    pub pool: sqlx::PgPool,
    pub data_addr: std::net::SocketAddr,
    pub bundle: tempfile::TempDir,
    configure: Box<dyn Fn(&mut Command) + Send + Sync>,
}

impl LedgerProcess {
    /// The ledger with `tenant`'s data path, and the bundle of `contract`.
    pub async fn start(tenant: &str, contract: serde_json::Value) -> Self {
        Self::start_with(tenant, contract, |_| {}).await
    }

    /// As [`Self::start`], with `configure` applied to the ledger's command (its environment),
    /// at every start.
    pub async fn start_with(
        tenant: &str,
        contract: serde_json::Value,
        configure: impl Fn(&mut Command) + Send + Sync + 'static,
    ) -> Self {
        let url = spendguard_testkit::ledger::shared_cluster()
            .create_database()
            .await
            .unwrap();
        spendguard_testkit::ledger::migrate(&url).await.unwrap();
        let (data, control) = (free_port(), free_port());
        let mut command = ledger_command(&url, data, control);
        configure(&mut command);
        let child = command.spawn().unwrap();
        register_data_path(&mut wait_for_ledger(control).await, tenant).await;
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let (bundle, _) = write_bundle(tenant, contract);
        Self {
            data_addr: format!("127.0.0.1:{data}").parse().unwrap(),
            url,
            data,
            control,
            child,
            pool,
            bundle,
            configure: Box::new(configure),
        }
    }

    /// Starts the ledger again on the same database and ports (after its child was killed).
    pub async fn restart(&mut self) {
        let mut command = ledger_command(&self.url, self.data, self.control);
        (self.configure)(&mut command);
        self.child = command.spawn().unwrap();
        wait_for_ledger(self.control).await;
    }
}
