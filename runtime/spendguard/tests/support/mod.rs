//! Shared set-up of the tests that run the `spendguard sidecar` binary.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // Each test binary uses a part; tests fail loudly.

use serde_json::json;
use spendguard_testkit::free_port;
use spendguard_testkit::ledger::{TestLedger, http_get};
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

/// The pricing every binary test registers: gpt-4o-mini at $0.15 / $0.60 per million tokens.
fn pricing() -> spendguard_core::pricing::PricingSnapshot {
    serde_json::from_value(json!({
        "version": "crash-2026-11",
        "entries": [{"provider": "openai", "model": "gpt-4o-mini",
                     "price": {"input": 150_000_000, "cached_input": 75_000_000,
                               "cache_write": 150_000_000, "output": 600_000_000}}]}))
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
    spendguard_testkit::ledger::tenant(&mut ledger.client, tenant)
        .await
        .unwrap();
    spendguard_testkit::ledger::budget(&mut ledger.client, tenant, BUDGET, 100_000_000_000)
        .await
        .unwrap();
    let snapshot = spendguard_core::pricing::Pricing::new(pricing()).unwrap();
    spendguard_testkit::ledger::register_pricing(
        &mut ledger.client,
        tenant,
        spendguard_sidecar::bundle::pricing_ref(&snapshot),
    )
    .await
    .unwrap();
    let (bundle, _) = write_bundle(tenant, contract);
    let mock = spendguard_mock_provider::MockProvider::new(
        spendguard_mock_provider::MockConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock_port = listener.local_addr().unwrap().port();
    mock.spawn(listener);
    (ledger, bundle, mock_port)
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
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(chat_request(false, "").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    status_of(&response)
}
