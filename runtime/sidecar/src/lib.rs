//! The SpendGuard sidecar: every guarded LLM call passes through it.
//!
//! ```text
//! app ──HTTP──► proxy (/v1/chat/completions, /v1/responses, /v1/messages) ─┐
//! SDK ──HTTP/gRPC──► decision API (/v1/spendguard/*, spendguard.sidecar.v1) ┤
//!                                                                            ▼
//!                    decider: contract + frozen pricing ─► ledger ReserveSet/Commit/Release
//!                                                        ▲
//!                    lease keeper: fencing epoch ────────┘  Acquiring ─► Held ─┬ renew fails past grace ─► Draining
//!                                                                             └ shutdown ─► Draining ─► in-flight done ─► Stopped
//! ```
//!
//! Startup: load and verify the bundle, then acquire the fencing lease, and only then serve.
//! Shutdown (SIGTERM): refuse new decisions, finish in-flight calls and their settlements with the
//! last epoch, exit; the lease lapses on the ledger after its TTL, so a successor never overlaps.

pub mod api;
pub mod bundle;
pub mod credit;
pub mod decider;
pub mod error;
pub mod fail_open;
mod frames;
mod journal;
mod known_budgets;
pub mod lease;
pub mod metrics;
pub mod pending_commits;
pub mod proxy;
pub mod settling;
pub mod stop_evidence;
mod sync;

use crate::decider::{Decider, Identity};
use crate::error::SidecarError;
use crate::fail_open::FailOpenQueue;
use crate::lease::{Lease, LeaseConfig, LeaseKeeper, LeaseState};
use crate::metrics::Metrics;
use crate::pending_commits::PendingCommits;
use crate::proxy::upstream::{Upstream, UpstreamConfig};
use crate::stop_evidence::StopEvidence;
use axum::serve::ListenerExt as _;
use prometheus_client::registry::Registry;
use spendguard_platform::supervise::{Supervised, spawn_supervised};
use spendguard_platform::{AdminServer, CommonArgs, Readiness};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// `spendguard sidecar` settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// Logging and admin server.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Proxy and HTTP decision API address.
    #[arg(
        long,
        env = "SPENDGUARD_SIDECAR_LISTEN",
        default_value = "127.0.0.1:8787"
    )]
    pub listen_addr: SocketAddr,
    /// gRPC decision API address.
    #[arg(
        long,
        env = "SPENDGUARD_SIDECAR_GRPC_LISTEN",
        default_value = "127.0.0.1:8788"
    )]
    pub grpc_listen_addr: SocketAddr,
    /// Ledger gRPC URL, e.g. `http://spendguard-ledger:7070`.
    #[arg(long, env = "SPENDGUARD_LEDGER_URL")]
    pub ledger_url: String,
    /// Directory of the compiled bundle (the operator's ConfigMap): `bundle.json`,
    /// `bundle.sha256`, `tenant`, `budgets`.
    #[arg(long, env = "SPENDGUARD_BUNDLE_DIR")]
    pub bundle_dir: PathBuf,
    /// This workload instance (the pod name, from the downward API).
    #[arg(long, env = "SPENDGUARD_WORKLOAD_INSTANCE_ID")]
    pub workload_instance_id: String,
    /// Everything else.
    #[command(flatten)]
    pub tuning: SidecarTuning,
}

/// Settings with safe defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarTuning {
    /// OpenAI origin (without `/v1`).
    #[arg(
        long,
        env = "SPENDGUARD_OPENAI_BASE_URL",
        default_value = "https://api.openai.com"
    )]
    pub openai_base_url: String,
    /// Anthropic origin.
    #[arg(
        long,
        env = "SPENDGUARD_ANTHROPIC_BASE_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_base_url: String,
    /// File holding an OpenAI key that replaces the app's own (default: pass the app's through).
    #[arg(long, env = "SPENDGUARD_OPENAI_API_KEY_FILE")]
    pub openai_api_key_file: Option<PathBuf>,
    /// File holding an Anthropic key that replaces the app's own.
    #[arg(long, env = "SPENDGUARD_ANTHROPIC_API_KEY_FILE")]
    pub anthropic_api_key_file: Option<PathBuf>,
    /// Time allowed until upstream response headers, and between stream chunks.
    #[arg(
        long,
        env = "SPENDGUARD_UPSTREAM_TIMEOUT_MS",
        default_value_t = 600_000
    )]
    pub upstream_timeout_ms: u64,
    /// Largest request body accepted by the proxy.
    #[arg(long, env = "SPENDGUARD_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// How long a reservation lives on the ledger: must cover the longest call.
    #[arg(long, env = "SPENDGUARD_RESERVATION_TTL_MS", default_value_t = 900_000)]
    pub reservation_ttl_ms: u64,
    /// Fencing lease length.
    #[arg(long, env = "SPENDGUARD_LEASE_TTL_MS", default_value_t = 15_000)]
    pub lease_ttl_ms: u64,
    /// How long renewals may fail before new decisions are refused.
    #[arg(long, env = "SPENDGUARD_LEASE_GRACE_MS", default_value_t = 9_000)]
    pub lease_grace_ms: u64,
    /// Margin subtracted from the lease's local validity.
    #[arg(
        long,
        env = "SPENDGUARD_LEASE_SAFETY_MARGIN_MS",
        default_value_t = 1_000
    )]
    pub lease_safety_margin_ms: u64,
    /// How long shutdown waits for in-flight calls and their settlements.
    #[arg(long, env = "SPENDGUARD_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,
    /// Fail-open records held until the ledger records them (S22). When full, new fail-open
    /// decisions fail closed (503 DEPENDENCY_UNAVAILABLE).
    #[arg(
        long,
        env = "SPENDGUARD_FAIL_OPEN_QUEUE_RECORDS",
        default_value_t = fail_open::FAIL_OPEN_QUEUE_RECORDS_DEFAULT,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    pub fail_open_queue_records: usize,
    /// Directory of the fail-open spool (an emptyDir): each fail-open record is flushed there
    /// before its call goes through, and records left by a crash or a shutdown during an outage
    /// are sent by the next start. STOP records and credit admissions are journaled there too.
    /// Unset: records are held in memory only, and a crash while the ledger is down loses them.
    #[arg(long, env = "SPENDGUARD_FAIL_OPEN_SPOOL_DIR")]
    pub fail_open_spool_dir: Option<PathBuf>,
    /// On shutdown, how long to keep sending queued fail-open records after in-flight calls
    /// settled; what is left stays in the spool (or, without one, is logged at ERROR and lost).
    #[arg(long, env = "SPENDGUARD_FAIL_OPEN_DRAIN_MS", default_value_t = 10_000)]
    pub fail_open_drain_ms: u64,
    /// STOP records held until the ledger records them (S22). When full, further STOPs are
    /// counted per reason and published as one summary record each (`decision.stops_unpublished`).
    /// On shutdown they are sent within the fail-open drain deadline too; with a spool, what is
    /// left (or left by a kill) is published by the next start.
    #[arg(
        long,
        env = "SPENDGUARD_STOP_EVIDENCE_QUEUE_RECORDS",
        default_value_t = stop_evidence::STOP_EVIDENCE_QUEUE_DEFAULT,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    pub stop_evidence_queue_records: usize,
    /// Largest credit, nano-USD (docs/design/credits.md): calls of the sidecar's own budgets are
    /// admitted inside a credit without waiting for the ledger, and their reservations are drawn
    /// from it in the background. 0 (the default) reserves every call synchronously. Credits
    /// are off under a contract that asks for approval above soft caps.
    #[arg(
        long,
        env = "SPENDGUARD_CREDIT_NANO_USD",
        default_value_t = 0,
        value_parser = clap::builder::RangedI64ValueParser::<i64>::new().range(0..=1_000_000_000_000_000_000)
    )]
    pub credit_nano_usd: i64,
    /// How much of the sidecar's demand each credit holds: the worst cases of the calls asked
    /// for in the last second, times this (at most `credit_nano_usd`); a credit is opened only
    /// if it holds 8 calls like the one asking. 0: every credit is `credit_nano_usd`.
    #[arg(
        long,
        env = "SPENDGUARD_CREDIT_AHEAD_MS",
        default_value_t = 2_000,
        value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(0..=600_000)
    )]
    pub credit_ahead_ms: u64,
    /// How long each credit lives on the ledger; it admits calls for the first three quarters.
    #[arg(
        long,
        env = "SPENDGUARD_CREDIT_TTL_MS",
        default_value_t = 60_000,
        value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(credit::CREDIT_TTL_MS_MIN..=credit::CREDIT_TTL_MS_MAX)
    )]
    pub credit_ttl_ms: u64,
    /// A pod asked to decide nothing for this long releases its current credit (0: twice
    /// `credit_ahead_ms`, at least a quarter of `credit_ttl_ms`).
    #[arg(
        long,
        env = "SPENDGUARD_CREDIT_QUIET_MS",
        default_value_t = 0,
        value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(0..=credit::CREDIT_TTL_MS_MAX)
    )]
    pub credit_quiet_ms: u64,
}

/// A running sidecar. Stop it with [`RunningSidecar::shutdown`]: dropping it stops nothing (its
/// supervisors hold the stop channel), so its servers and lease keeper would run on.
pub struct RunningSidecar {
    /// Proxy and HTTP decision API.
    pub http_addr: SocketAddr,
    /// gRPC decision API.
    pub grpc_addr: SocketAddr,
    /// The lease (readiness, tests).
    pub lease: Lease,
    /// The decider (tests inspect open reservations).
    pub decider: Arc<Decider>,
    /// `true` asks every part to stop; a part that ends unasked sends it too (see
    /// [`RunningSidecar::failed`]).
    stop: watch::Sender<bool>,
    // Every long-running part is supervised (`spendguard_platform::supervise`): one that ends
    // on its own (a server that failed, a loop that panicked) stops the sidecar, which exits to
    // be restarted. A dead lease keeper would otherwise leave the pod deciding nothing once the
    // lease lapsed, and a dead publisher its evidence queued, until someone restarted it.
    servers: Vec<Supervised<()>>,
    lease_task: Supervised<()>,
    settlements: TaskTracker,
    grace: Duration,
    fail_open_task: Supervised<()>,
    fail_open_drain: Duration,
    stops_task: Supervised<()>,
}

impl RunningSidecar {
    /// Readiness: a valid fencing lease.
    pub fn readiness(&self) -> Readiness {
        let lease = self.lease.clone();
        Arc::new(move || {
            let ready = lease.epoch_for_decision().map(|_| ());
            Box::pin(async move { ready.map_err(|e| format!("no valid fencing lease: {e}")) })
        })
    }

    /// Resolves when the sidecar stopped on its own: a server, the lease keeper or a background
    /// loop ended without being asked. The process should then drain and exit non-zero, so that
    /// it is restarted.
    pub async fn failed(&self) {
        wait_true(self.stop.subscribe()).await;
    }

    /// Drains: new decisions are refused at once, in-flight calls finish and settle (within the
    /// grace period), then the servers stop.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.lease_task.await;
        let drain = async {
            for server in self.servers {
                let _ = server.await;
            }
            self.settlements.close();
            self.settlements.wait().await;
        };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            warn!(
                open = self.decider.open_reservations(),
                pending_commits = self.decider.pending_commits(),
                "shutdown grace elapsed with calls in flight: the ledger's TTL sweep releases the open reservations; pending commits are sent by the pod's next process if the pod has a spool"
            );
        }
        // Settled calls' draws have landed (those of calls still in flight past the grace end
        // by their credit's life); what the credits did not admit goes back now.
        if let Some(credits) = self.decider.credits() {
            credits.close(self.fail_open_drain).await;
        }
        // The loop stops at its next wait; a pass in progress ends within one RPC timeout.
        let mut fail_open_task = self.fail_open_task;
        if tokio::time::timeout(self.fail_open_drain, &mut fail_open_task)
            .await
            .is_err()
        {
            fail_open_task.abort();
            // Resolves once the aborted task is dropped, so what it held is back in the queue
            // before the drain reads it.
            let _ = (&mut fail_open_task).await;
        }
        drain_fail_open(&self.decider, self.fail_open_drain).await;
        // The loop ends at its next wait; a publish still running past the deadline is aborted,
        // which puts its unconfirmed records back for the drain (publishing is cancel-safe).
        let mut stops_task = self.stops_task;
        if tokio::time::timeout(self.fail_open_drain, &mut stops_task)
            .await
            .is_err()
        {
            stops_task.abort();
            // Resolves once the aborted task is dropped: its unconfirmed records are back.
            let _ = (&mut stops_task).await;
        }
        drain_stops(&self.decider, self.fail_open_drain).await;
    }
}

/// Loads the bundle, connects to the ledger, starts the lease keeper, and serves on the given
/// listeners once the lease is held.
///
/// # Errors
/// [`SidecarError`] for an invalid bundle, configuration or ledger URL.
pub async fn start(
    args: &SidecarArgs,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    registry: &mut Registry,
) -> Result<RunningSidecar, SidecarError> {
    let loaded = bundle::load(&args.bundle_dir)?;
    let tuning = &args.tuning;
    spendguard_core::ids::check_name("workload_instance_id", &args.workload_instance_id)
        .map_err(|e| SidecarError::invalid("workload_instance_id", e.to_string()))?;
    let identity = Identity {
        scope_id: format!("{}/{}", loaded.tenant_id, args.workload_instance_id),
        tenant_id: loaded.tenant_id.clone(),
        budget_ids: loaded.budget_ids.clone(),
    };
    let channel = tonic::transport::Endpoint::from_shared(args.ledger_url.clone())
        .map_err(|e| SidecarError::invalid("ledger_url", e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy();
    let ledger = spendguard_proto::ledger::v1::ledger_client::LedgerClient::new(channel);
    let reservation_ttl = Duration::from_millis(tuning.reservation_ttl_ms);
    // A fail-open call settles within the reservation TTL like any other; past it, its record is
    // sent at its worst case. Opened before the lease is acquired: a second process refused the
    // spool's directory must not first take over the lease of the one that holds it.
    let fail_open = Arc::new(match &tuning.fail_open_spool_dir {
        Some(dir) => {
            FailOpenQueue::with_spool(tuning.fail_open_queue_records, reservation_ttl, dir)
                .map_err(|e| spool_error(e.code(), &e))?
        }
        None => FailOpenQueue::new(tuning.fail_open_queue_records, reservation_ttl),
    });
    let (keeper, lease) = LeaseKeeper::new(
        ledger.clone(),
        LeaseConfig {
            scope_id: identity.scope_id.clone(),
            tenant_id: identity.tenant_id.clone(),
            workload_instance_id: args.workload_instance_id.clone(),
            ttl: Duration::from_millis(tuning.lease_ttl_ms),
            grace: Duration::from_millis(tuning.lease_grace_ms),
            safety_margin: Duration::from_millis(tuning.lease_safety_margin_ms),
        },
    )
    .map_err(|e| SidecarError::invalid("lease", e.to_string()))?;
    let (stop, stopped) = watch::channel(false);
    let lease_task = spawn_supervised(
        "lease keeper",
        keeper.run(wait_true(stopped.clone())),
        &stop,
    );

    fail_open.register(registry);
    let stops = Arc::new(match &tuning.fail_open_spool_dir {
        // The spool directory belongs to this process alone (the fail-open queue holds its lock).
        Some(dir) => StopEvidence::with_journal(
            tuning.stop_evidence_queue_records,
            dir,
            decider::stop_envelope(&identity, &loaded.bundle),
        )
        .map_err(|e| spool_error(e.code(), &e))?,
        None => StopEvidence::new(tuning.stop_evidence_queue_records),
    });
    stops.register(registry);
    Metrics::register_pricing(registry, &loaded.bundle);
    let mut decider = Decider::new(
        ledger,
        lease.clone(),
        Arc::new(loaded.bundle),
        identity,
        reservation_ttl,
        fail_open,
        stops,
    );
    if tuning.credit_nano_usd > 0 {
        decider = decider
            .with_credits(
                credit::CreditPolicy {
                    max_nano_usd: tuning.credit_nano_usd,
                    ahead: Duration::from_millis(tuning.credit_ahead_ms),
                    ttl: Duration::from_millis(tuning.credit_ttl_ms),
                    quiet: (tuning.credit_quiet_ms > 0)
                        .then(|| Duration::from_millis(tuning.credit_quiet_ms)),
                },
                // The spool directory belongs to this process alone (it holds its lock).
                tuning.fail_open_spool_dir.as_deref(),
            )
            .map_err(|e| spool_error(e.code(), &e))?;
    }
    // The spool directory belongs to this process alone (the fail-open queue holds its lock).
    let left_commits = match &tuning.fail_open_spool_dir {
        Some(dir) => {
            let (pending, left) = PendingCommits::open(dir, chrono::Utc::now().timestamp_millis())
                .map_err(|e| spool_error(e.code(), &e))?;
            decider = decider.with_pending_commits(pending);
            left
        }
        None => Vec::new(),
    };
    let decider = Arc::new(decider);
    decider.register_metrics(registry);
    let metrics = Metrics::register(registry);
    let upstream = Upstream::new(UpstreamConfig {
        openai_base_url: tuning.openai_base_url.clone(),
        anthropic_base_url: tuning.anthropic_base_url.clone(),
        openai_authorization: read_key(tuning.openai_api_key_file.as_ref())?
            .map(|key| proxy::upstream::openai_authorization(&key))
            .transpose()?,
        anthropic_api_key: read_key(tuning.anthropic_api_key_file.as_ref())?
            .map(|key| proxy::upstream::anthropic_api_key(&key))
            .transpose()?,
        timeout: Duration::from_millis(tuning.upstream_timeout_ms),
    })?;
    let settlements = TaskTracker::new();
    let proxy = proxy::Proxy {
        decider: decider.clone(),
        upstream,
        body_limit_bytes: tuning.max_body_bytes,
        settlements: settlements.clone(),
        metrics: metrics.clone(),
    };
    let router = proxy::routes(proxy).merge(api::http::routes(decider.clone(), metrics.clone()));
    let http_addr = local_addr(&http_listener)?;
    let grpc_addr = local_addr(&grpc_listener)?;

    // Serve only once the lease is held: before that every decision would fail closed anyway.
    let first_lease = |mut lease: Lease| async move {
        let _ = lease
            .wait_for(|s| !matches!(s, LeaseState::Acquiring))
            .await;
    };
    let gate = tokio::spawn(first_lease(lease.clone()));
    let grpc_gate = first_lease(lease.clone());
    // What a previous process of the pod left, once the lease is held: first the calls it
    // admitted inside credits and did not draw (drawn again now), then its pending commits,
    // among them those of such calls, which need their draw to have landed.
    let credits = decider.credits_handle();
    if !left_commits.is_empty() || credits.is_some() {
        let (mut held, decider, metrics) = (lease.clone(), decider.clone(), metrics);
        settlements.spawn(async move {
            // A process stopped before it ever held the lease leaves everything to the next.
            let state = held
                .wait_for(|s| matches!(s, LeaseState::Held { .. }))
                .await;
            if !matches!(state, LeaseState::Held { .. }) {
                return;
            }
            let drawn = match credits {
                Some(credits) => credits.recover_left_over().await,
                None => HashMap::new(),
            };
            proxy::resume_pending_commits(decider, metrics, left_commits, &drawn).await;
        });
    }
    let http_stopped = stopped.clone();
    let http = spawn_supervised(
        "HTTP server",
        async move {
            let _ = gate.await;
            // No Nagle delay: SSE chunks and small responses leave as soon as they are written.
            let listener = http_listener.tap_io(|stream| {
                let _ = stream.set_nodelay(true);
            });
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(wait_true(http_stopped))
                .await;
            if let Err(e) = served {
                warn!(error = %e, "http server failed");
            }
        },
        &stop,
    );
    let grpc_service = api::grpc::SidecarService::new(decider.clone());
    let grpc_stopped = stopped.clone();
    let grpc = spawn_supervised(
        "gRPC server",
        async move {
            grpc_gate.await;
            let incoming =
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            let served = tonic::transport::Server::builder()
                .add_service(grpc_service)
                .serve_with_incoming_shutdown(incoming, wait_true(grpc_stopped))
                .await;
            if let Err(e) = served {
                warn!(error = %e, "grpc server failed");
            }
        },
        &stop,
    );
    if let Some(credits) = decider.credits_handle() {
        // Detached: it ends with the stop; ending before it stops the sidecar.
        drop(spawn_supervised(
            "credit release when quiet",
            credits.release_when_quiet(wait_true(stopped.clone())),
            &stop,
        ));
    }
    let fail_open_task = spawn_supervised(
        "fail-open recorder",
        record_fail_open_loop(decider.clone(), stopped.clone()),
        &stop,
    );
    let stops_task = spawn_supervised(
        "STOP publisher",
        publish_stops_loop(decider.clone(), stopped.clone()),
        &stop,
    );
    let forget = {
        let decider = decider.clone();
        let mut stopped = stopped;
        // Calls older than their reservation's TTL are settled or expired on the ledger.
        let age = reservation_ttl + Duration::from_secs(300);
        spawn_supervised(
            "call-table pruning",
            async move {
                loop {
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                    decider.forget_older_than(age);
                }
            },
            &stop,
        )
    };
    info!(%http_addr, %grpc_addr, bundle_sha256 = %decider.bundle().sha256_hex,
          contract_version = %decider.bundle().contract.version, "sidecar starting");
    Ok(RunningSidecar {
        http_addr,
        grpc_addr,
        lease,
        decider,
        stop,
        servers: vec![http, grpc, forget],
        lease_task,
        settlements,
        grace: Duration::from_millis(tuning.shutdown_grace_ms),
        fail_open_task,
        fail_open_drain: Duration::from_millis(tuning.fail_open_drain_ms),
        stops_task,
    })
}

/// Publishes STOP records as they queue: a record queued while a request is in flight goes in
/// the next, so a burst batches itself. Runs until `stopped` (STOPs are answered until the
/// servers stop, so [`drain_stops`] sends the rest).
async fn publish_stops_loop(decider: Arc<Decider>, mut stopped: watch::Receiver<bool>) {
    let mut backoff = Duration::ZERO;
    loop {
        let work = async {
            if decider.stop_evidence().is_empty() {
                decider.stop_evidence().notified().await;
            }
            tokio::time::sleep(backoff).await;
        };
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            () = work => {}
        }
        // Outside the select, so a stop signal does not cut a send short (cutting it would be
        // safe: unconfirmed records go back).
        backoff = if decider.publish_stops().await {
            fail_open::next_backoff(backoff)
        } else {
            Duration::ZERO
        };
    }
}

/// Shutdown: sends the queued STOP records until none is left or `deadline` passes; what is
/// left, a send cut short by the deadline included (its records go back first), stays in the
/// spool's journal for the next start, or without a spool is logged at ERROR: those STOPs may be
/// missing from the audit chain.
async fn drain_stops(decider: &Decider, deadline: Duration) {
    let evidence = decider.stop_evidence();
    let drained = tokio::time::timeout(deadline, async {
        let mut backoff = Duration::ZERO;
        while !evidence.is_empty() {
            if decider.publish_stops().await {
                backoff = fail_open::next_backoff(backoff);
                tokio::time::sleep(backoff).await;
            }
        }
    })
    .await;
    let left = evidence.abandon();
    if drained.is_err() && !left.is_empty() {
        if left.journaled {
            warn!(records = left.records, unpublished_by_reason = ?left.overflow,
                  "shutdown deadline passed with STOP records unpublished; they stay in the spool and the next start publishes them");
        } else {
            error!(records = left.records, unpublished_by_reason = ?left.overflow,
                   "shutdown deadline passed with STOP records unpublished and no spool: these STOP decisions are not in the audit chain");
        }
    }
}

/// Sends fail-open records to the ledger until `stopped`: at once when a settlement makes one
/// ready, every second for records past their settle deadline, and with a capped exponential
/// backoff while the ledger does not answer.
async fn record_fail_open_loop(decider: Arc<Decider>, mut stopped: watch::Receiver<bool>) {
    let queue_poll = Duration::from_secs(1);
    let mut backoff = Duration::ZERO;
    loop {
        let wait = if backoff.is_zero() {
            queue_poll
        } else {
            backoff
        };
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            () = decider.fail_open_queue().notified(), if backoff.is_zero() => {}
            () = tokio::time::sleep(wait) => {}
        }
        let waiting = decider.record_fail_open_batch(false).await;
        backoff = if waiting == 0 {
            Duration::ZERO
        } else {
            fail_open::next_backoff(backoff)
        };
    }
}

/// Shutdown: sends every queued fail-open record (unsettled ones at their worst case) until the
/// queue is empty or `deadline` passes. What is left stays in the spool for the next start
/// (without one, each record is logged at ERROR: it is lost).
async fn drain_fail_open(decider: &Decider, deadline: Duration) {
    let queue = decider.fail_open_queue();
    if queue.is_empty() {
        return;
    }
    let drained = tokio::time::timeout(deadline, async {
        let mut backoff = Duration::ZERO;
        while !queue.is_empty() {
            let before = queue.len();
            let taken = before.min(fail_open::DRAIN_BATCH_RECORDS_MAX);
            decider.record_fail_open_batch(true).await;
            // A pass takes a batch (everything is ready when forced). When all of it left the
            // queue, the next goes on at once. When some stayed (the ledger is away, asked for
            // a retry, or refused a record, which is dropped after a few refusals), the next
            // waits: otherwise the drain would send them back to back until the deadline and
            // spend a record's refusals in milliseconds.
            if before.saturating_sub(queue.len()) < taken {
                backoff = fail_open::next_backoff(backoff);
                tokio::time::sleep(backoff).await;
            } else {
                backoff = Duration::ZERO;
            }
        }
    })
    .await;
    if drained.is_ok() {
        info!("every fail-open record was recorded in the ledger before shutdown");
        return;
    }
    let abandoned = queue.abandon();
    if abandoned.kept {
        warn!(
            kept = abandoned.records.len(),
            "shutdown deadline passed with fail-open records unrecorded; they stay in the spool and the next start sends them"
        );
        return;
    }
    for record in &abandoned.records {
        error!(call_id = %record.call_id, tenant_id = %record.tenant_id,
               actual_nano_usd = record.actual_nano_usd, budget_ids = ?record.budget_ids,
               "fail-open record NOT recorded in the ledger before shutdown: its evidence and spend are lost");
    }
    error!(
        lost = abandoned.records.len(),
        "shutdown deadline passed with fail-open records unrecorded and no spool; reconcile them from these logs"
    );
}

async fn wait_true(mut receiver: watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, SidecarError> {
    listener
        .local_addr()
        .map_err(|e| SidecarError::Internal(e.to_string()))
}

/// A spool directory the sidecar cannot use (its lock, a journal in it): refused at startup.
fn spool_error(code: &str, error: &dyn std::fmt::Display) -> SidecarError {
    SidecarError::invalid("fail_open_spool_dir", format!("{code}: {error}"))
}

fn read_key(path: Option<&PathBuf>) -> Result<Option<String>, SidecarError> {
    path.map(|p| {
        std::fs::read_to_string(p)
            .map(|k| k.trim().to_owned())
            // The path is named; the content never is.
            .map_err(|e| SidecarError::invalid("api_key_file", format!("{}: {e}", p.display())))
    })
    .transpose()
}

impl SidecarArgs {
    /// Runs `spendguard sidecar` until SIGTERM/SIGINT, or until a server, the lease keeper or a
    /// background loop ends on its own; then drains.
    ///
    /// # Errors
    /// Startup failures (bundle, configuration, bind), and `SIDECAR_STOPPED` when a part ended
    /// on its own (the process exits non-zero so that it is restarted).
    pub async fn run(self) -> anyhow::Result<()> {
        self.common.init_tracing()?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))
        };
        let http = bind(self.listen_addr).await?;
        let grpc = bind(self.grpc_listen_addr).await?;
        let mut registry = Registry::default();
        let sidecar = start(&self, http, grpc, &mut registry)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
        let admin = AdminServer::bind(self.common.admin_addr, registry, sidecar.readiness())
            .await
            .map_err(|e| anyhow::anyhow!("binding admin {}: {e}", self.common.admin_addr))?;
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin.serve(async move {
            let _ = admin_stopped.await;
        }));
        let failed = tokio::select! {
            () = spendguard_platform::shutdown::signalled() => false,
            () = sidecar.failed() => true,
        };
        sidecar.shutdown().await;
        let _ = admin_stop.send(());
        let _ = admin_task.await;
        if failed {
            anyhow::bail!(
                "SIDECAR_STOPPED: a server, the lease keeper or a background loop ended on its \
                 own; exiting so that the sidecar is restarted"
            );
        }
        info!("sidecar stopped");
        Ok(())
    }
}
