//! The one SpendGuard binary. Each subcommand is a component; later issues add `operator`,
//! `sidecar`, `worker …`, `doctor` and `crdgen`.

use clap::{Parser, Subcommand};
use spendguard_ledger::LedgerArgs;

#[derive(Debug, Parser)]
#[command(
    name = "spendguard",
    version,
    about = "Runtime spend guard for LLM agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Component,
}

#[derive(Debug, Subcommand)]
enum Component {
    /// Serve the ledger gRPC API.
    Ledger(Box<LedgerArgs>),
    /// Run a singleton worker under a leader lease.
    Worker {
        #[command(subcommand)]
        kind: Box<spendguard_workers::WorkerCommand>,
    },
    /// Run the sidecar: decision API and OpenAI/Anthropic-compatible proxy.
    Sidecar(Box<spendguard_sidecar::SidecarArgs>),
    /// Export a tenant's audit chain (directory or S3), verify an export offline, or publish
    /// the newest signed checkpoints.
    Audit {
        #[command(subcommand)]
        kind: Box<spendguard_workers::audit::AuditCommand>,
    },
    /// Run the Kubernetes operator (so far: the Budget controller).
    Operator(Box<spendguard_operator::OperatorArgs>),
    /// Apply database migrations and exit.
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "SPENDGUARD_LEDGER_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

/// mimalloc instead of glibc malloc: the ledger and the sidecar allocate per request, and glibc's
/// allocator was ~15% of the ledger's CPU under load (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Component::Ledger(args) => args
                .run()
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", e.startup_code())),
            Component::Sidecar(args) => args.run().await,
            Component::Worker { kind } => kind.run().await,
            Component::Audit { kind } => {
                println!("{}", kind.run().await?);
                Ok(())
            }
            Component::Operator(args) => args.run().await.map_err(|e| anyhow::anyhow!("{e}")),
            Component::Migrate { database_url } => {
                let store = spendguard_ledger::store::Store::connect(&database_url, 1).await?;
                store.migrate().await?;
                println!("migrations applied");
                Ok(())
            }
        }
    })
}
