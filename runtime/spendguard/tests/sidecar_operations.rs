//! Operations of the `spendguard sidecar` binary (S4): it refuses a bundle that is not what its
//! hash says, before it takes any lease; it is live but not ready until it holds its fencing
//! lease, ready while it holds it, and not ready again once the lease is lost. No API key
//! reaches its logs, and SIGTERM ends it cleanly. A ledger that cannot sign evidence never
//! lets a call through, even under a fail-open contract.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use serde_json::json;
use spendguard_testkit::free_port;
use spendguard_testkit::ledger::{TestLedger, http_get};
use std::time::Duration;

mod support;
use support::*;

const TENANT: &str = "tenant-ops";

/// Runs the sidecar on `bundle` until it exits (it must, within 30 s): its stderr.
async fn refused(ledger: std::net::SocketAddr, bundle: &std::path::Path, mock: u16) -> String {
    let spool = tempfile::tempdir().unwrap();
    refused_startup(sidecar_command(
        ledger,
        bundle,
        spool.path(),
        mock,
        ("agent-ops", free_port(), free_port()),
    ))
    .await
}

#[tokio::test]
async fn a_bundle_that_is_not_what_its_hash_says_refuses_startup() {
    let (mut ledger, bundle, mock) =
        data_path(TENANT, json!({"version": "ops", "max_output_tokens": 64})).await;
    let addr = ledger.ledger.as_ref().unwrap().addr;
    let pool = ledger.store().pool().clone();
    let original = std::fs::read(bundle.path().join("bundle.json")).unwrap();

    // One byte changed (a price): the bytes no longer hash to the id the operator wrote.
    let text = String::from_utf8(original.clone()).unwrap();
    let tampered = text.replacen("600000000", "600000001", 1);
    assert_ne!(tampered, text);
    std::fs::write(bundle.path().join("bundle.json"), &tampered).unwrap();
    let stderr = refused(addr, bundle.path(), mock).await;
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("does not match"),
        "{stderr}"
    );

    // A field nobody compiled: refused, though the fields it knows still hash to the id.
    let mut value: serde_json::Value = serde_json::from_slice(&original).unwrap();
    value["contract"]["surprise"] = json!(true);
    std::fs::write(
        bundle.path().join("bundle.json"),
        serde_json::to_vec(&value).unwrap(),
    )
    .unwrap();
    let stderr = refused(addr, bundle.path(), mock).await;
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("surprise"),
        "{stderr}"
    );

    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM fencing_scopes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(leases, 0, "refused before taking any lease");
    ledger.stop().await;
}

/// A decision over the sidecar's gRPC API on `port`.
async fn decide(port: u16) -> Result<(), String> {
    use spendguard_proto::sidecar::v1 as sc;
    let mut client = sc::sidecar_client::SidecarClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|e| e.to_string())?;
    client
        .decide(sc::DecideRequest {
            call_id: uuid::Uuid::new_v4().to_string(),
            provider: "openai".into(),
            model: "gpt-4o-mini".into(),
            input_tokens_upper_bound: 100,
            max_output_tokens: Some(10),
            choices: None,
            run_id: String::new(),
            workflow_id: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn probe(admin: u16, path: &str) -> u16 {
    http_get(admin, path).await.map_or(0, |(status, _)| status)
}

/// Waits up to `within` for `path` on `admin` to answer `status`.
async fn answers(admin: u16, path: &str, status: u16, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if probe(admin, path).await == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn live_always_and_ready_only_while_the_lease_is_held() {
    let (mut ledger, bundle, mock) =
        data_path(TENANT, json!({"version": "ops", "max_output_tokens": 64})).await;
    let addr = ledger.ledger.as_ref().unwrap().addr;
    let database_url = ledger.database_url.clone();
    // The ledger is away when the sidecar starts: it cannot take its lease.
    ledger.stop().await;
    let spool = tempfile::tempdir().unwrap();
    let (port, admin, grpc) = (free_port(), free_port(), free_port());
    let mut sidecar = sidecar_command(
        addr,
        bundle.path(),
        spool.path(),
        mock,
        ("agent-ops", port, admin),
    )
    .env(
        "SPENDGUARD_SIDECAR_GRPC_LISTEN",
        format!("127.0.0.1:{grpc}"),
    )
    .env("SPENDGUARD_LEASE_TTL_MS", "3000")
    .env("SPENDGUARD_LEASE_GRACE_MS", "1500")
    .env("SPENDGUARD_LEASE_SAFETY_MARGIN_MS", "200")
    .spawn()
    .unwrap();
    assert!(
        answers(admin, "/healthz", 200, Duration::from_secs(10)).await,
        "live"
    );
    assert_eq!(
        probe(admin, "/readyz").await,
        503,
        "not ready without a lease"
    );
    // Nor does it serve calls: the proxy answers nothing before the lease.
    let served = tokio::time::timeout(Duration::from_millis(500), chat(port)).await;
    assert!(served.is_err(), "no answer before the lease");
    let decided = tokio::time::timeout(Duration::from_millis(500), decide(grpc)).await;
    assert!(
        decided.is_err(),
        "no gRPC answer before the lease: {decided:?}"
    );

    // The ledger comes back: the lease is taken, and the sidecar is ready and serves.
    let mut ledger = TestLedger::start_at(&database_url, "ledger-0", addr)
        .await
        .unwrap();
    assert!(answers(admin, "/readyz", 200, Duration::from_secs(10)).await);
    assert_eq!(chat(port).await, 200);
    assert!(
        decide(grpc).await.is_ok(),
        "the gRPC decision API serves too"
    );

    // The ledger goes away again: past the lease's grace the sidecar is no longer ready, and
    // still live (a restart would not bring the ledger back).
    ledger.stop().await;
    assert!(
        answers(admin, "/readyz", 503, Duration::from_secs(10)).await,
        "not ready once the lease is lost"
    );
    assert_eq!(probe(admin, "/healthz").await, 200);
    sidecar.kill().await.unwrap();
}

#[tokio::test]
async fn no_api_key_reaches_the_logs_even_at_trace_and_sigterm_ends_cleanly() {
    // Goal: issue 3's "the app's own API key passes through by default and is never logged",
    // and a configured key neither, with every crate logging at trace; and the binary's SIGTERM
    // wiring: it drains and exits 0. Method: the sidecar binary at SPENDGUARD_LOG=trace with a
    // configured Anthropic key file; an OpenAI call passing the app's key, one the provider
    // fails (500), an Anthropic call sent with the configured key, a refused call; then SIGTERM,
    // and its whole stderr holds neither key.
    const APP_KEY: &str = "sk-app-secret-5f0e3c";
    const CONFIGURED_KEY: &str = "sk-ant-configured-7a1c9d";
    let (mut ledger, bundle, mock) =
        data_path(TENANT, json!({"version": "ops", "max_output_tokens": 64})).await;
    let addr = ledger.ledger.as_ref().unwrap().addr;
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("anthropic-key");
    std::fs::write(&key_file, format!("{CONFIGURED_KEY}\n")).unwrap();
    let spool = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut sidecar = sidecar_command(
        addr,
        bundle.path(),
        spool.path(),
        mock,
        ("agent-keys", port, admin),
    )
    .env("SPENDGUARD_LOG", "trace")
    .env("SPENDGUARD_ANTHROPIC_API_KEY_FILE", &key_file)
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Read as it comes: trace output would fill the pipe and stall the sidecar.
    let mut stderr = sidecar.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut out)
            .await
            .unwrap();
        out
    });
    wait_ready(admin).await;

    let openai = format!("Authorization: Bearer {APP_KEY}\r\n");
    let chat = json!({"model": "gpt-4o-mini",
                      "messages": [{"role": "user", "content": "Say hello in one word."}]});
    let ok = proxy_call(port, "/v1/chat/completions", &openai, &chat).await;
    assert_eq!(status_of(&ok), 200, "{ok}");
    let failed = proxy_call(
        port,
        "/v1/chat/completions",
        &format!("{openai}x-mock-fail: status:500\r\n"),
        &chat,
    )
    .await;
    assert_eq!(status_of(&failed), 500, "{failed}");
    let messages = json!({"model": "claude-sonnet-4-5", "max_tokens": 32,
                          "messages": [{"role": "user", "content": "Say hello."}]});
    let anthropic = proxy_call(
        port,
        "/v1/messages",
        &format!("x-api-key: {APP_KEY}\r\nanthropic-version: 2023-06-01\r\n"),
        &messages,
    )
    .await;
    assert_eq!(status_of(&anthropic), 200, "{anthropic}");
    let refused = proxy_call(
        port,
        "/v1/chat/completions",
        &openai,
        &json!({"model": "gpt-unknown", "messages": []}),
    )
    .await;
    assert_eq!(status_of(&refused), 402, "{refused}");

    terminates_cleanly(&mut sidecar, Duration::from_secs(30)).await;
    let logs = String::from_utf8_lossy(&logs.await.unwrap()).into_owned();
    assert!(
        logs.contains("TRACE") && logs.contains(&format!("connected to 127.0.0.1:{mock}")),
        "trace logging was on and saw the upstream connections: {}",
        &logs[..logs.len().min(3000)]
    );
    for key in [APP_KEY, CONFIGURED_KEY] {
        let leaked: Vec<&str> = logs.lines().filter(|line| line.contains(key)).collect();
        assert!(leaked.is_empty(), "{key} in the logs: {leaked:#?}");
    }
    ledger.stop().await;
}

#[tokio::test]
async fn a_ledger_that_cannot_sign_evidence_never_lets_a_call_through() {
    // Goal: S22's matrix, "signing never fails open": a ledger signing with KMS whose key
    // disappears answers SIGNING_UNAVAILABLE and writes nothing, and the sidecar answers 503,
    // even under an explicitly fail-open contract (a call that cannot be recorded does not go
    // ahead unrecorded). Method: the ledger process signs with a KMS key in moto; one call goes
    // through; moto forgets the key; the next call is 503 and nothing is queued as fail-open.
    let moto = spendguard_testkit::moto::MotoServer::start();
    let (endpoint, key) = (moto.endpoint(), moto.create_p256_signing_key());
    let ledger = LedgerProcess::start_with(
        TENANT,
        json!({"version": "ops", "max_output_tokens": 64, "fail_policy": "open"}),
        move |ledger| {
            ledger
                .env("SPENDGUARD_SIGNING_MODE", "kms")
                .env_remove("SPENDGUARD_SIGNING_KEY_FILE")
                .env("SPENDGUARD_SIGNING_KMS_KEY", &key)
                .env(
                    "SPENDGUARD_SIGNING_KMS_REGION",
                    spendguard_testkit::moto::REGION,
                )
                .env("SPENDGUARD_SIGNING_KMS_ENDPOINT_URL", &endpoint)
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test");
        },
    )
    .await;
    let spool = tempfile::tempdir().unwrap();
    let mock = spawn_mock();
    let (mut sidecar, port, admin) = spawn_ready(|port, admin| {
        sidecar_command(
            ledger.data_addr,
            ledger.bundle.path(),
            spool.path(),
            mock,
            ("agent-kms", port, admin),
        )
    })
    .await;
    assert_eq!(chat(port).await, 200, "signed and recorded");

    moto.reset(); // the key is gone
    let refused = chat_with(port, "").await;
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(refused.contains("SIGNING_UNAVAILABLE"), "{refused}");
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("spendguard_sidecar_fail_open_queued_total 0"),
        "nothing went ahead fail-open: {metrics}"
    );
    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(&ledger.pool)
        .await
        .unwrap();
    assert_eq!(reservations, 1, "the refused call reserved nothing");
    sidecar.kill().await.unwrap();
}
