//! The SpendGuard operator: reconciles SpendGuard custom resources into the ledger and reports
//! status conditions.
//!
//! ```text
//! kube-apiserver ──watch Budget──► controller/budget.rs ──UpsertTenant/UpsertBudget──► ledger
//!        ▲                                   │
//!        └──── status (SSA, field manager "spendguard-operator") ◄──── balances ─────┘
//! ```
//!
//! Built so far: the Budget (with its ledger-cleanup finalizer), PricingVersion,
//! ContractBundle and SigningKey (evidence key registry feed) controllers under leader election, Events on condition transitions
//! (`events`), per-object retry backoff (`backoff`), metrics (`metrics`) on the admin server
//! (`admin`), and the admission webhooks (`webhook`: sidecar injection, validation, and the
//! approver identity on ApprovalRequest decisions), which
//! every replica serves. `mock_apiserver` is the tower-test harness of the reconciler tests.
//! RetentionPolicies are recorded in the ledger (`controller/retention_policy.rs`), and
//! pending ledger approvals are mirrored as ApprovalRequests whose stamped decisions resolve
//! them (`controller/approval_request.rs`).

pub mod admin;
pub mod backoff;
pub mod controller;
pub mod error;
pub mod events;
pub mod metrics;
#[cfg(any(test, feature = "mock-apiserver"))]
pub mod mock_apiserver;
pub mod webhook;

use clap::Args;
use prometheus_client::registry::Registry;
use spendguard_platform::{AdminServer, CommonArgs};
use spendguard_proto::ledger::v1::ledger_client::LedgerClient;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::transport::Channel;

/// Shared state of every reconciler.
#[derive(Clone)]
pub struct Context {
    /// Kubernetes client.
    pub kube: kube::Client,
    /// Ledger admin client.
    pub ledger: LedgerClient<Channel>,
    /// Event publisher.
    pub events: events::Events,
    /// Reconcile metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Per-object retry backoff.
    pub backoff: Arc<backoff::Backoff>,
    /// Set once the leadership term this context works for has ended.
    term_ended: Arc<tokio::sync::watch::Sender<bool>>,
    /// The failure status write still running for an object (by `object_key`): its next
    /// reconcile waits for it, so a late failure never lands over a newer outcome.
    failure_reports: Arc<std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>,
}

impl Context {
    /// A context whose Events report `instance` (the pod name) as their source.
    pub fn new(
        kube: kube::Client,
        ledger: LedgerClient<Channel>,
        metrics: Arc<metrics::Metrics>,
        instance: &str,
    ) -> Self {
        Self {
            events: events::Events::new(kube.clone(), instance),
            kube,
            ledger,
            metrics,
            backoff: Arc::default(),
            term_ended: Arc::new(tokio::sync::watch::Sender::new(false)),
            failure_reports: Arc::default(),
        }
    }

    /// Keeps `report`, the failure status write for the object `key`, until the object's next
    /// reconcile ([`Context::after_failure_report`]). A report still running for the same key
    /// (never, as each follows a reconcile that waited for the one before) is superseded.
    pub fn hold_failure_report(&self, key: String, report: tokio::task::JoinHandle<()>) {
        let mut reports = self
            .failure_reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Objects deleted after a failure leave finished reports behind: drop those.
        reports.retain(|_, report| !report.is_finished());
        if let Some(superseded) = reports.insert(key, report) {
            superseded.abort();
        }
    }

    /// Waits for the failure status write of the object `key`, if one is still running.
    pub async fn after_failure_report(&self, key: &str) {
        let report = self
            .failure_reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
        if let Some(report) = report {
            let _ = report.await;
        }
    }

    /// A context for a new leadership term: the same clients and backoff, and a term of its
    /// own, which [`Context::end_term`] ends.
    #[must_use]
    pub fn next_term(&self) -> Self {
        Self {
            term_ended: Arc::new(tokio::sync::watch::Sender::new(false)),
            failure_reports: Arc::default(),
            ..self.clone()
        }
    }

    /// Ends this context's term: work it left running in the background is abandoned.
    pub fn end_term(&self) {
        self.term_ended.send_replace(true);
    }

    /// Resolves once this context's term has ended.
    pub async fn term_ended(&self) {
        let mut ended = self.term_ended.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = ended.wait_for(|ended| *ended).await;
    }
}

/// `spendguard operator` flags.
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,
    /// The ledger's control gRPC address (`SPENDGUARD_LEDGER_CONTROL_LISTEN_ADDR`): the operator
    /// registers tenants, budgets, pricing and signing keys and resolves approvals.
    #[arg(
        long,
        env = "SPENDGUARD_OPERATOR_LEDGER_ADDR",
        default_value = "http://127.0.0.1:7101"
    )]
    pub ledger_addr: String,
    /// Leader election (S1).
    #[command(flatten)]
    pub leader: LeaderArgs,
    /// Admission webhooks and sidecar injection.
    #[command(flatten)]
    pub webhook: webhook::WebhookArgs,
    /// ApprovalRequest mirror and resolution.
    #[command(flatten)]
    pub approvals: controller::approval_request::ApprovalArgs,
}

/// `SPENDGUARD_LEADER_*` settings.
#[derive(Debug, Clone, Args)]
pub struct LeaderArgs {
    /// `k8s` (a coordination.k8s.io Lease), `postgres` (a row in `leader_leases`, for runs
    /// outside Kubernetes) or `disabled` (exactly one replica only).
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
    /// PostgreSQL URL of the lease table (mode `postgres` only).
    #[arg(
        long = "leader-database-url",
        env = "SPENDGUARD_LEADER_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
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
            webhook,
            approvals,
        } = self;
        let mode = spendguard_leader::Mode::parse(&leader.mode)
            .map_err(|e| error::Error::Startup(e.to_string()))?;
        let approvals = approvals.settings(&leader.namespace, webhook.enabled)?;
        let webhook_config = webhook
            .config(&leader.namespace)
            .map_err(|e| error::Error::Startup(format!("{}: {e}", e.code())))?;
        common
            .init_tracing()
            .map_err(|e| error::Error::Startup(e.to_string()))?;
        let kube = kube::Client::try_default()
            .await
            .map_err(error::Error::Kube)?;
        let mut registry = Registry::default();
        let metrics = Arc::new(metrics::Metrics::register(&mut registry));
        let running = admin::ControllersRunning::default();
        // Every replica serves the webhooks (they are stateless); only the leader reconciles.
        let webhooks = match webhook_config {
            Some(config) => {
                let running = webhook::start(config, kube.clone())
                    .await
                    .map_err(|e| error::Error::Startup(format!("{}: {e}", e.code())))?;
                Some(running.task)
            }
            None => None,
        };
        let serving = async {
            match webhooks {
                Some(task) => match task.await {
                    Ok(Ok(())) => Err(error::Error::Startup("webhook server ended".into())),
                    Ok(Err(e)) => Err(error::Error::Startup(format!("{}: {e}", e.code()))),
                    Err(e) => Err(error::Error::Startup(format!("webhook server: {e}"))),
                },
                None => std::future::pending().await,
            }
        };
        // Lazy: a ledger that is down at startup is reported per object (LedgerUnavailable) and
        // retried, instead of taking the webhooks down with the process.
        let ledger = tonic::transport::Endpoint::from_shared(ledger_addr.clone())
            .map_err(|e| error::Error::Startup(format!("ledger address {ledger_addr}: {e}")))?
            .connect_lazy();
        let ledger = LedgerClient::new(ledger);
        let config = spendguard_leader::LeaderConfig {
            namespace: leader.namespace,
            lease_name: leader.lease_name,
            identity: leader.identity.clone(),
            renew_interval: std::time::Duration::from_millis(leader.renew_interval_ms),
            ttl: std::time::Duration::from_millis(leader.ttl_ms),
        };
        let pool = leader
            .database_url
            .as_deref()
            .map(|url| {
                spendguard_postgres::connect_options(url).map(|options| {
                    sqlx::postgres::PgPoolOptions::new()
                        .max_connections(2)
                        .connect_lazy_with(options)
                })
            })
            .transpose()
            .map_err(|e| error::Error::Startup(format!("leader database: {e}")))?;
        let handle = spendguard_leader::start(mode, config, Some(kube.clone()), pool)
            .map_err(|e| error::Error::Startup(e.to_string()))?;
        let readiness = admin::readiness(kube.clone(), handle.clone(), running.clone());
        let admin = AdminServer::bind(common.admin_addr, registry, readiness)
            .await
            .map_err(|e| {
                error::Error::Startup(format!("binding admin {}: {e}", common.admin_addr))
            })?;
        let admin = admin.serve(std::future::pending());
        let context = Context::new(kube, ledger, metrics, &leader.identity);
        tokio::select! {
            result = lead(handle, context, running, approvals) => result,
            result = admin => Err(error::Error::Startup(match result {
                Ok(()) => "admin server ended".to_owned(),
                Err(e) => format!("admin server: {e}"),
            })),
            result = serving => result,
            () = spendguard_platform::shutdown::signalled() => Ok(()),
        }
    }
}

/// Waits for leadership, then runs the controllers until it is lost, and so on for every term.
///
/// Losing leadership stops the controllers at once (their watches, caches and reconciles in
/// flight are dropped, and the status writes they left in the background are abandoned with
/// their term), and the replica goes back to standby. Unlike client-go's and controller-runtime's
/// controllers, which exit, it stays up: its admission webhooks serve through the loss, so a
/// single replica does not refuse every pod injection, CR write and approval decision
/// (`failurePolicy: Fail`) while it restarts. The next term starts from fresh caches, as after a
/// restart; the per-object retry backoff carries over, as a restart's crash-loop delay would
/// have damped a flapping lease.
async fn lead(
    handle: spendguard_leader::LeaderHandle,
    context: Context,
    running: admin::ControllersRunning,
    approvals: controller::approval_request::Settings,
) -> Result<(), error::Error> {
    loop {
        context.metrics.set_leader(false);
        handle
            .led()
            .await
            .map_err(|e| error::Error::Startup(e.to_string()))?;
        tracing::info!("leading: controllers started");
        let term = context.next_term();
        context.metrics.set_leader(true);
        running.set(true);
        let controllers = async {
            tokio::join!(
                controller::budget::run(term.clone()),
                controller::pricing_version::run(term.clone()),
                controller::contract_bundle::run(term.clone()),
                controller::signing_key::run(term.clone()),
                controller::retention_policy::run(term.clone()),
                controller::approval_request::run(term.clone(), approvals.clone())
            );
        };
        let ended = tokio::select! {
            () = controllers => true,
            () = handle.lost() => false,
        };
        running.set(false);
        term.end_term();
        if ended {
            return Ok(());
        }
        tracing::warn!("lost leadership: controllers stopped; standing by");
    }
}
