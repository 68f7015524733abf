//! The SpendGuard operator: reconciles SpendGuard custom resources into the ledger and reports
//! status conditions.
//!
//! ```text
//! kube-apiserver ──watch Budget──► controller/budget.rs ──UpsertTenant/UpsertBudget──► ledger
//!        ▲                                   │
//!        └──── status (SSA, field manager "spendguard-operator") ◄──── balances ─────┘
//! ```
//!
//! Built so far: the Budget, PricingVersion and ContractBundle controllers. Leader election, the other controllers, finalizers and
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
    /// Leader election (S1).
    #[command(flatten)]
    pub leader: LeaderArgs,
}

/// `SPENDGUARD_LEADER_*` settings.
#[derive(Debug, Clone, Args)]
pub struct LeaderArgs {
    /// `k8s` (a coordination.k8s.io Lease) or `disabled` (exactly one replica only).
    #[arg(
        long = "leader-election-mode",
        env = "SPENDGUARD_LEADER_ELECTION_MODE",
        default_value = "k8s"
    )]
    pub mode: String,
    /// Lease name.
    #[arg(
        long = "leader-lease-name",
        env = "SPENDGUARD_LEADER_LEASE_NAME",
        default_value = "spendguard-operator"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (the pod's namespace).
    #[arg(
        long = "leader-lease-namespace",
        env = "POD_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// This candidate's identity (the pod name).
    #[arg(
        long = "leader-identity",
        env = "POD_NAME",
        default_value = "spendguard-operator"
    )]
    pub identity: String,
    /// Renew interval.
    #[arg(
        long = "leader-renew-interval-ms",
        env = "SPENDGUARD_LEADER_RENEW_INTERVAL_MS",
        default_value_t = 2_000
    )]
    pub renew_interval_ms: u64,
    /// Lease TTL: a dead leader is replaced after about this long.
    #[arg(
        long = "leader-ttl-ms",
        env = "SPENDGUARD_LEADER_TTL_MS",
        default_value_t = 15_000
    )]
    pub ttl_ms: u64,
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
            leader,
        } = self;
        let mode = spendguard_leader::Mode::parse(&leader.mode)
            .map_err(|e| error::Error::Startup(e.to_string()))?;
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
        let handle = match mode {
            spendguard_leader::Mode::Disabled => spendguard_leader::LeaderHandle::always(),
            spendguard_leader::Mode::K8s => {
                let config = spendguard_leader::LeaderConfig {
                    namespace: leader.namespace,
                    lease_name: leader.lease_name,
                    identity: leader.identity,
                    renew_interval: std::time::Duration::from_millis(leader.renew_interval_ms),
                    ttl: std::time::Duration::from_millis(leader.ttl_ms),
                };
                let (elector, handle) = spendguard_leader::Elector::new(kube.clone(), config)
                    .map_err(|e| error::Error::Startup(e.to_string()))?;
                tokio::spawn(elector.run());
                handle
            }
        };
        let context = Context { kube, ledger };
        tokio::select! {
            result = lead(handle, context) => result,
            () = spendguard_platform::shutdown::signalled() => Ok(()),
        }
    }
}

/// How often a standby checks whether it became leader, and a leader whether it still is.
const LEADERSHIP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Waits for leadership, then runs the controllers until it is lost. Losing it ends the process
/// (client-go's rule): a restarted pod rejoins as a standby, and no controller keeps a stale
/// cache or half-finished work.
async fn lead(
    handle: spendguard_leader::LeaderHandle,
    context: Context,
) -> Result<(), error::Error> {
    while !handle.is_leader() {
        tokio::time::sleep(LEADERSHIP_POLL).await;
    }
    tracing::info!("leading: controllers started");
    let lost = async {
        while handle.is_leader() {
            tokio::time::sleep(LEADERSHIP_POLL).await;
        }
    };
    let controllers = async {
        tokio::join!(
            controller::budget::run(context.clone()),
            controller::pricing_version::run(context)
        );
    };
    tokio::select! {
        () = controllers => Ok(()),
        () = lost => Err(error::Error::Startup("lost leadership; exiting so a standby can take over".into())),
    }
}
