//! Singleton workers (spec S1, S2, S8), each doing work only while it holds a leader lease:
//!
//! - `spendguard worker outbox-forwarder`: canonical ingest: outbox rows → verified → per-tenant
//!   hash chain, or quarantine ([`forwarder`], [`chain`]);
//! - `spendguard worker ttl-sweeper`: expires reservations past their TTL ([`sweeper`]).
//!
//! It also holds `spendguard audit export|verify` (spec S9, [`audit`]), which reads the chains.

pub mod audit;
pub mod chain;
pub mod checkpoint;
pub mod forwarder;
pub mod sweeper;

use clap::{Args, Subcommand};
use prometheus_client::registry::Registry;
use spendguard_leader::{LeaderConfig, LeaderHandle, Mode};
use spendguard_platform::{AdminServer, CommonArgs};
use std::sync::Arc;
use std::time::Duration;

/// `spendguard worker …`.
#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Canonical ingest: verify outbox rows and append them to per-tenant hash chains.
    OutboxForwarder(ForwarderArgs),
    /// Expire reservations whose TTL passed.
    TtlSweeper(SweeperArgs),
}

/// Lease settings shared by the workers (`SPENDGUARD_LEADER_*`, S1).
#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    /// `k8s`, `postgres` or `disabled` (exactly one replica only).
    #[arg(long, env = "SPENDGUARD_LEADER_ELECTION_MODE", default_value = "k8s")]
    pub leader_election_mode: String,
    /// Lease name (one per worker kind).
    #[arg(long, env = "SPENDGUARD_LEADER_LEASE_NAME")]
    pub leader_lease_name: Option<String>,
    /// Namespace of the Lease (k8s mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_lease_namespace: String,
    /// This candidate (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "spendguard-worker")]
    pub leader_identity: String,
    /// Renew interval.
    #[arg(
        long,
        env = "SPENDGUARD_LEADER_RENEW_INTERVAL_MS",
        default_value_t = 2_000
    )]
    pub leader_renew_interval_ms: u64,
    /// Lease TTL.
    #[arg(long, env = "SPENDGUARD_LEADER_TTL_MS", default_value_t = 15_000)]
    pub leader_ttl_ms: u64,
}

impl LeaseArgs {
    /// Starts the elector for `default_lease` (postgres mode uses `pool`).
    ///
    /// # Errors
    /// Unknown mode, bad timings, or no Kubernetes client in k8s mode.
    pub async fn leader(
        &self,
        default_lease: &str,
        pool: Option<sqlx::PgPool>,
    ) -> anyhow::Result<LeaderHandle> {
        let config = LeaderConfig {
            namespace: self.leader_lease_namespace.clone(),
            lease_name: self
                .leader_lease_name
                .clone()
                .unwrap_or_else(|| default_lease.to_owned()),
            identity: self.leader_identity.clone(),
            renew_interval: Duration::from_millis(self.leader_renew_interval_ms),
            ttl: Duration::from_millis(self.leader_ttl_ms),
        };
        let mode = Mode::parse(&self.leader_election_mode)?;
        let kube = match mode {
            Mode::K8s => Some(kube::Client::try_default().await?),
            Mode::Postgres | Mode::Disabled => None,
        };
        Ok(spendguard_leader::start(mode, config, kube, pool)?)
    }
}

/// `spendguard worker outbox-forwarder` settings.
#[derive(Debug, Args)]
pub struct ForwarderArgs {
    /// Logging and admin server.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Lease.
    #[command(flatten)]
    pub lease: LeaseArgs,
    /// The ledger database (outbox, key registry, chains).
    #[arg(long, env = "SPENDGUARD_LEDGER_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// `production` (strict: unsigned events are quarantined) or `demo`.
    #[arg(long, env = "SPENDGUARD_PROFILE", default_value = "production")]
    pub profile: String,
    /// Run even when the database login could get around the ledger's rules (a superuser, an
    /// owner, ...; refused otherwise, as the ledger refuses it:
    /// docs/design/ledger-database-roles.md).
    #[arg(long, env = "SPENDGUARD_FORWARDER_ALLOW_PRIVILEGED_DATABASE_ROLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_privileged_database_role: bool,
    /// Rows per producer per pass.
    #[arg(long, env = "SPENDGUARD_FORWARDER_BATCH", default_value_t = 1_000)]
    pub batch: i64,
    /// Pause between passes.
    #[arg(long, env = "SPENDGUARD_FORWARDER_POLL_MS", default_value_t = 500)]
    pub poll_ms: u64,
    /// Ed25519 PKCS#8 PEM key signing the per-tenant chain checkpoints (required in production).
    #[arg(long, env = "SPENDGUARD_CHECKPOINT_KEY_FILE")]
    pub checkpoint_key_file: Option<std::path::PathBuf>,
    /// Key name in the checkpoints' signature lines.
    #[arg(
        long,
        env = "SPENDGUARD_CHECKPOINT_KEY_NAME",
        default_value = checkpoint::DEFAULT_KEY_NAME
    )]
    pub checkpoint_key_name: String,
}

/// `spendguard worker ttl-sweeper` settings.
#[derive(Debug, Args)]
pub struct SweeperArgs {
    /// Logging and admin server.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Lease.
    #[command(flatten)]
    pub lease: LeaseArgs,
    /// Ledger gRPC URL.
    #[arg(long, env = "SPENDGUARD_LEDGER_URL")]
    pub ledger_url: String,
    /// Database for the lease in postgres mode.
    #[arg(long, env = "SPENDGUARD_LEADER_DATABASE_URL", hide_env_values = true)]
    pub leader_database_url: Option<String>,
    /// Pause between sweeps.
    #[arg(long, env = "SPENDGUARD_SWEEP_INTERVAL_MS", default_value_t = 1_000)]
    pub interval_ms: u64,
}

/// The forwarder's checkpoint signer: required under the production profile (`strict`),
/// optional under the demo profile.
fn checkpoint_signer(
    args: &ForwarderArgs,
    strict: bool,
) -> anyhow::Result<Option<Arc<spendguard_evidence::LocalEd25519Signer>>> {
    match &args.checkpoint_key_file {
        Some(path) => Ok(Some(Arc::new(
            spendguard_evidence::LocalEd25519Signer::from_pem_file(
                path,
                None,
                "spendguard-forwarder",
            )?,
        ))),
        None if strict => anyhow::bail!(
            "the production profile requires a checkpoint signing key \
             (--checkpoint-key-file / SPENDGUARD_CHECKPOINT_KEY_FILE)"
        ),
        None => Ok(None),
    }
}

/// `/healthz`, `/readyz` and `/metrics`. A standby is ready too: it is healthy, just waiting.
async fn serve_admin(
    common: &CommonArgs,
    registry: Registry,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let readiness: spendguard_platform::Readiness =
        Arc::new(|| Box::pin(async { Ok::<(), String>(()) }));
    let admin = AdminServer::bind(common.admin_addr, registry, readiness).await?;
    Ok(tokio::spawn(async move {
        let _ = admin.serve(std::future::pending()).await;
    }))
}

impl WorkerCommand {
    /// Runs the worker until SIGTERM/SIGINT.
    ///
    /// # Errors
    /// Startup failures.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::OutboxForwarder(args) => {
                args.common.init_tracing()?;
                let strict = match args.profile.as_str() {
                    "production" => true,
                    "demo" => false,
                    other => anyhow::bail!("unknown profile {other:?} (production | demo)"),
                };
                let checkpoint_signer = checkpoint_signer(&args, strict)?;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .connect_with(spendguard_postgres::connect_options(&args.database_url)?)
                    .await?;
                spendguard_postgres::require_unprivileged(
                    &pool,
                    args.allow_privileged_database_role,
                    "SPENDGUARD_FORWARDER_ALLOW_PRIVILEGED_DATABASE_ROLE",
                )
                .await
                .map_err(|e| match e {
                    spendguard_postgres::RoleError::Privileged { .. } => {
                        anyhow::anyhow!("FORWARDER_DATABASE_ROLE_PRIVILEGED: {e}")
                    }
                    spendguard_postgres::RoleError::Database(_) => anyhow::Error::new(e),
                })?;
                let leader = args
                    .lease
                    .leader("spendguard-outbox-forwarder", Some(pool.clone()))
                    .await?;
                let mut registry = Registry::default();
                let metrics = forwarder::ForwarderMetrics::register(&mut registry);
                let _admin = serve_admin(&args.common, registry).await?;
                let mut forwarder = forwarder::Forwarder::new(pool, strict, args.batch, metrics);
                if let Some(signer) = checkpoint_signer {
                    forwarder =
                        forwarder.with_checkpoint_signer(signer, &args.checkpoint_key_name)?;
                }
                forwarder
                    .run(
                        leader,
                        Duration::from_millis(args.poll_ms),
                        spendguard_platform::shutdown::signalled(),
                    )
                    .await;
                Ok(())
            }
            Self::TtlSweeper(args) => {
                args.common.init_tracing()?;
                let pool = match &args.leader_database_url {
                    Some(url) => Some(
                        sqlx::postgres::PgPoolOptions::new()
                            .max_connections(2)
                            .connect_lazy_with(spendguard_postgres::connect_options(url)?),
                    ),
                    None => None,
                };
                let leader = args.lease.leader("spendguard-ttl-sweeper", pool).await?;
                let channel = tonic::transport::Endpoint::from_shared(args.ledger_url.clone())?
                    .connect_lazy();
                let ledger =
                    spendguard_proto::ledger::v1::ledger_client::LedgerClient::new(channel);
                let _admin = serve_admin(&args.common, Registry::default()).await?;
                sweeper::run(
                    ledger,
                    leader,
                    Duration::from_millis(args.interval_ms),
                    spendguard_platform::shutdown::signalled(),
                )
                .await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        worker: WorkerCommand,
    }

    fn forwarder_args(extra: &[&str]) -> ForwarderArgs {
        let base = [
            "spendguard-worker",
            "outbox-forwarder",
            "--database-url",
            "postgres://unused",
        ];
        match Cli::try_parse_from(base.iter().chain(extra))
            .unwrap()
            .worker
        {
            WorkerCommand::OutboxForwarder(args) => args,
            WorkerCommand::TtlSweeper(_) => unreachable!(),
        }
    }

    #[test]
    fn production_requires_a_checkpoint_key_and_demo_does_not() {
        let args = forwarder_args(&[]);
        assert_eq!(args.checkpoint_key_name, checkpoint::DEFAULT_KEY_NAME);
        let error = checkpoint_signer(&args, true).unwrap_err().to_string();
        assert!(error.contains("SPENDGUARD_CHECKPOINT_KEY_FILE"), "{error}");
        assert!(checkpoint_signer(&args, false).unwrap().is_none());

        let missing = forwarder_args(&["--checkpoint-key-file", "/nonexistent/key.pem"]);
        assert!(checkpoint_signer(&missing, true).is_err());
        assert!(
            checkpoint_signer(&missing, false).is_err(),
            "a given key must load"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let pem = {
            use ed25519_dalek::pkcs8::EncodePrivateKey as _;
            ed25519_dalek::SigningKey::from_bytes(&[5; 32])
                .to_pkcs8_pem(Default::default())
                .unwrap()
        };
        std::fs::write(&path, pem.as_bytes()).unwrap();
        let args = forwarder_args(&[
            "--checkpoint-key-file",
            path.to_str().unwrap(),
            "--checkpoint-key-name",
            "sg-prod",
        ]);
        assert!(checkpoint_signer(&args, true).unwrap().is_some());
        assert_eq!(args.checkpoint_key_name, "sg-prod");
    }
}
