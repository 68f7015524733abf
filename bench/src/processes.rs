//! SpendGuard components as their own processes, as in production.

use anyhow::{Context, Result, bail};
use spendguard_testkit::ledger::{LedgerClient, connect};
use std::time::Duration;

/// `spendguard ledger` running as its own process, as in production: `url` is the owner's,
/// which migrates; the ledger serves as the runtime role.
pub(crate) struct LedgerProcess {
    pub(crate) child: tokio::process::Child,
    /// On the control listener.
    pub(crate) client: LedgerClient,
    /// Data path.
    pub(crate) port: u16,
    /// Control listener.
    pub(crate) control_port: u16,
    pub(crate) admin_port: u16,
}

impl LedgerProcess {
    pub(crate) async fn spawn(
        spendguard_bin: &std::path::Path,
        url: &str,
        instance_id: &str,
    ) -> Result<Self> {
        let port = spendguard_testkit::free_port();
        let control_port = spendguard_testkit::free_port();
        let admin_port = spendguard_testkit::free_port();
        // As the chart does: the owner migrates, the ledger logs in as the runtime role.
        let migrated = tokio::process::Command::new(spendguard_bin)
            .arg("migrate")
            .env("SPENDGUARD_LEDGER_DATABASE_URL", url)
            .output()
            .await
            .context("running spendguard migrate")?;
        anyhow::ensure!(
            migrated.status.success(),
            "spendguard migrate failed: {}",
            String::from_utf8_lossy(&migrated.stderr)
        );
        let child = tokio::process::Command::new(spendguard_bin)
            .arg("ledger")
            .env(
                "SPENDGUARD_LEDGER_DATABASE_URL",
                spendguard_testkit::postgres::runtime_url(url),
            )
            .env("SPENDGUARD_LEDGER_INSTANCE_ID", instance_id)
            .envs(spendguard_testkit::signing::ledger_env()?)
            .env("SPENDGUARD_LEDGER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "SPENDGUARD_LEDGER_CONTROL_LISTEN_ADDR",
                format!("127.0.0.1:{control_port}"),
            )
            .env("SPENDGUARD_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("SPENDGUARD_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .context("starting spendguard ledger")?;
        // Setup (tenants, budgets, pricing) and sweeps go to the control listener, as the operator's
        // and the sweeper's do; load and sidecars use `port`, the data path.
        let control: std::net::SocketAddr = format!("127.0.0.1:{control_port}").parse()?;
        for _ in 0..100 {
            if let Ok(client) = connect(control).await {
                return Ok(Self {
                    child,
                    client,
                    port,
                    control_port,
                    admin_port,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("ledger did not come up")
    }
}

/// A child process that is killed when dropped.
pub(crate) struct Child(pub(crate) tokio::process::Child);

impl Child {
    pub(crate) async fn stop(mut self) -> Result<()> {
        self.0.start_kill()?;
        self.0.wait().await?;
        Ok(())
    }
}

/// Waits until `127.0.0.1:port` `path` answers 200.
async fn wait_http_ok(port: u16, path: &str, what: &str) -> Result<()> {
    for _ in 0..150 {
        if let Ok((200, _)) = spendguard_testkit::ledger::http_get(port, path).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not become ready on port {port}")
}

/// `spendguard-mock-provider` (built next to the `spendguard` binary).
pub(crate) async fn spawn_mock(
    spendguard_bin: &std::path::Path,
    output_tokens: u32,
    latency_ms: u64,
) -> Result<(Child, u16)> {
    let port = spendguard_testkit::free_port();
    let bin = spendguard_bin.with_file_name("spendguard-mock-provider");
    let child = tokio::process::Command::new(&bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--output-tokens",
            &output_tokens.to_string(),
            "--latency-ms",
            &latency_ms.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((Child(child), port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("mock provider did not come up")
}

/// `spendguard sidecar` on a bundle directory, with both providers pointed at the mock. Returns
/// once it is ready (its fencing lease is held).
pub(crate) async fn spawn_sidecar(
    spendguard_bin: &std::path::Path,
    ledger_port: u16,
    bundle_dir: &std::path::Path,
    mock_port: u16,
    workload: &str,
    extra_env: &[(&str, String)],
) -> Result<(Child, u16, u16)> {
    let port = spendguard_testkit::free_port();
    let admin_port = spendguard_testkit::free_port();
    let child = tokio::process::Command::new(spendguard_bin)
        .arg("sidecar")
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .env(
            "SPENDGUARD_LEDGER_URL",
            format!("http://127.0.0.1:{ledger_port}"),
        )
        .env("SPENDGUARD_BUNDLE_DIR", bundle_dir)
        .env("SPENDGUARD_WORKLOAD_INSTANCE_ID", workload)
        .env("SPENDGUARD_SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "SPENDGUARD_SIDECAR_GRPC_LISTEN",
            format!("127.0.0.1:{}", spendguard_testkit::free_port()),
        )
        .env("SPENDGUARD_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
        .env(
            "SPENDGUARD_OPENAI_BASE_URL",
            format!("http://127.0.0.1:{mock_port}"),
        )
        .env(
            "SPENDGUARD_ANTHROPIC_BASE_URL",
            format!("http://127.0.0.1:{mock_port}"),
        )
        .env("SPENDGUARD_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .context("starting spendguard sidecar")?;
    wait_http_ok(admin_port, "/readyz", "sidecar").await?;
    Ok((Child(child), port, admin_port))
}
