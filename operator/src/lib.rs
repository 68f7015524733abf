//! The SpendGuard operator: reconciles SpendGuard custom resources into the ledger and reports
//! status conditions.
//!
//! ```text
//! kube-apiserver ──watch Budget──► controller/budget.rs ──UpsertTenant/UpsertBudget──► ledger
//!        ▲                                   │
//!        └──── status (SSA, field manager "spendguard-operator") ◄──── balances ─────┘
//! ```
//!
//! Built so far: the Budget controller. Leader election, the other controllers, finalizers and
//! the admission webhooks arrive with the rest of issue 4.

pub mod controller;
pub mod error;

use clap::Args;
use spendguard_platform::CommonArgs;
use spendguard_proto::ledger::v1::ledger_client::LedgerClient;
use tonic::transport::Channel;

/// Shared state of every reconciler.
#[derive(Clone)]
pub struct Context {
    /// Kubernetes client.
    pub kube: kube::Client,
    /// Ledger admin client.
    pub ledger: LedgerClient<Channel>,
}

/// `spendguard operator` flags.
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Ledger gRPC address.
    #[arg(
        long,
        env = "SPENDGUARD_OPERATOR_LEDGER_ADDR",
        default_value = "http://127.0.0.1:7100"
    )]
    pub ledger_addr: String,
}

impl OperatorArgs {
    /// Runs the controllers until SIGTERM/SIGINT. The Kubernetes client comes from the in-cluster
    /// environment or `KUBECONFIG`.
    ///
    /// # Errors
    /// When logging, the Kubernetes client or the ledger connection cannot be set up.
    pub async fn run(self) -> Result<(), error::Error> {
        let Self {
            common,
            ledger_addr,
        } = self;
        common
            .init_tracing()
            .map_err(|e| error::Error::Startup(e.to_string()))?;
        let kube = kube::Client::try_default()
            .await
            .map_err(error::Error::Kube)?;
        let ledger = LedgerClient::connect(ledger_addr.clone())
            .await
            .map_err(|e| {
                error::Error::Startup(format!("connecting to the ledger at {ledger_addr}: {e}"))
            })?;
        let context = Context { kube, ledger };
        tokio::select! {
            () = controller::budget::run(context) => {}
            () = spendguard_platform::shutdown::signalled() => {}
        }
        Ok(())
    }
}
