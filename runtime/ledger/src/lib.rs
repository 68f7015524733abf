//! The SpendGuard ledger: the only authority over money, fencing epochs and the audit outbox.
//!
//! ```text
//! gRPC ─► grpc.rs (validate via convert.rs) ─► writer.rs (group commit queue)
//!                                                  ├─► cache.rs hit: core::plan on cached rows ─►
//!                                                  │     store.rs: one guarded statement
//!                                                  └─► store.rs: one transaction per batch
//!                                                        lock rows ─► core::plan ─► write + outbox
//! ```
//!
//! Every mutation — reserve, commit, release, expiry, lease acquisition, tenant and budget upsert —
//! goes through the single writer task, so this process's audit producer sequence is allocated in
//! order and contiguously, inside the transaction that makes the change.

pub mod cache;
pub mod convert;
pub mod error;
pub mod evidence_gate;
pub mod grpc;
pub mod key_standing;
pub mod metrics;
pub mod oversized;
pub mod store;
pub mod writer;

use crate::error::{Error, Result};
use crate::evidence_gate::EvidenceGate;
use crate::key_standing::KeyStanding;
use crate::metrics::Metrics;
use crate::store::{EventSigner, ProducerClaim, Store};
use crate::writer::{Batching, Writer};
use clap::Args;
use prometheus_client::registry::Registry;
use spendguard_evidence::{Signer, Signing, SigningArgs};
use spendguard_platform::supervise::{spawn_supervised, stop_all_if_it_ends_unasked};
use spendguard_platform::{AdminServer, CommonArgs, Readiness};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{error, info, warn};

/// How often the producer claim's session is checked; a lost session stops writes within this.
const PRODUCER_PING_INTERVAL: Duration = Duration::from_secs(1);

/// `spendguard ledger` flags.
#[derive(Debug, Clone, Args)]
pub struct LedgerArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Data-path gRPC listen address (sidecars): decisions, settlements, their evidence, leases
    /// and run budgets.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_LISTEN_ADDR",
        default_value = "127.0.0.1:7100"
    )]
    pub listen_addr: SocketAddr,
    /// Control gRPC listen address (the operator, the workers, administrators): every RPC,
    /// including tenants, budgets, pricing, signing keys, approval decisions and sweeps. Expose
    /// it to the control plane only (the chart's NetworkPolicy does).
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_CONTROL_LISTEN_ADDR",
        default_value = "127.0.0.1:7101"
    )]
    pub control_listen_addr: SocketAddr,
    /// PostgreSQL URL. Prefer --database-url-file in production so it stays out of the env.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_DATABASE_URL",
        hide_env_values = true,
        required_unless_present = "database_url_file"
    )]
    pub database_url: Option<String>,
    /// File holding the PostgreSQL URL (e.g. a mounted Secret).
    #[arg(long, env = "SPENDGUARD_LEDGER_DATABASE_URL_FILE")]
    pub database_url_file: Option<std::path::PathBuf>,
    /// Stable, unique producer instance id of this replica (the pod name). Two live processes
    /// with the same id are refused (S2).
    #[arg(long, env = "SPENDGUARD_LEDGER_INSTANCE_ID")]
    pub instance_id: String,
    /// Evidence signing (S6): `SPENDGUARD_SIGNING_MODE`, keys, profile.
    #[command(flatten)]
    pub signing: SigningArgs,
    #[command(flatten)]
    pub tuning: LedgerTuning,
}

/// Limits and sizes, each with its reason.
#[derive(Debug, Clone, Args)]
pub struct LedgerTuning {
    /// Pooled database connections: load-path batches use one at a time, reads the rest. The
    /// cached path and the producer claim each hold one more session of their own.
    #[arg(long, env = "SPENDGUARD_LEDGER_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,
    /// Commands that may wait for the writer; beyond this callers get OVERLOADED at once.
    #[arg(long, env = "SPENDGUARD_LEDGER_QUEUE_CAPACITY", default_value_t = 8192)]
    pub queue_capacity: usize,
    /// Longest a batch waits for stragglers when the previous batch was larger (microseconds).
    /// Trades up to this much latency under load for far fewer transactions.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_BATCH_LINGER_US",
        default_value_t = 1_000
    )]
    pub batch_linger_us: u64,
    /// Longest a batch of deferrable commands only (settlements and credit draws a sidecar sends
    /// in the background, nobody waiting on them) is held for more to share its transaction
    /// (microseconds; 0 never holds). An urgent command sends a held batch at once.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_DEFER_MAX_US",
        default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(0..=100_000)
    )]
    pub defer_max_us: u64,
    /// Cached-path batches sent to PostgreSQL before the oldest is answered (1 to 4). 2 keeps
    /// the next batch queued behind the running one; 1 waits for each answer before sending.
    #[arg(long, env = "SPENDGUARD_LEDGER_PIPELINE_DEPTH", default_value_t = 2,
          value_parser = clap::value_parser!(u8).range(1..=4))]
    pub pipeline_depth: u8,
    /// Largest accepted gRPC message; valid requests are far smaller.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_MAX_MESSAGE_BYTES",
        default_value_t = 65_536
    )]
    pub max_message_bytes: usize,
    /// Apply migrations at startup (under the migrator's advisory lock). Only the owner of the
    /// tables can, so this needs `--allow-privileged-database-role` too; in production the
    /// owner runs `spendguard migrate` (the chart's hook Job) and the ledger connects as a
    /// member of `spendguard_runtime`.
    #[arg(long, env = "SPENDGUARD_LEDGER_MIGRATE_ON_START", default_value_t = false, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
    /// Serve even when the database role is a superuser or can act as the owner of the
    /// ledger's tables, which could truncate the journal or switch its rules off. Without it
    /// such a role is refused at startup (`LEDGER_DATABASE_ROLE_PRIVILEGED`); a local demo
    /// that migrates on start sets it.
    #[arg(long, env = "SPENDGUARD_LEDGER_ALLOW_PRIVILEGED_DATABASE_ROLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_privileged_database_role: bool,
    /// How long shutdown waits for in-flight RPCs.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_SHUTDOWN_GRACE_MS",
        default_value_t = 10_000
    )]
    pub shutdown_grace_ms: u64,
    /// The durability policy for evidence outside the canonical chain (S22): 0 (the default)
    /// lets decisions go on however far the forwarder falls behind; N refuses new reservations
    /// and approvals (`EVIDENCE_BACKLOG`) while the oldest unforwarded audit event is older than
    /// N seconds. Evidence is never dropped either way.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_MAX_EVIDENCE_LAG_SECONDS",
        default_value_t = 0
    )]
    pub max_evidence_lag_seconds: u64,
    /// How often the gauges that need a database count (open reservations, unforwarded
    /// evidence) are refreshed, in milliseconds. Each refresh is two counts.
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_GAUGE_REFRESH_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(100..=600_000)
    )]
    pub gauge_refresh_ms: u64,
    /// How long the cached path waits for a statement's answer before it counts its session as
    /// broken (a half-open connection), in milliseconds. The default, five statement timeouts,
    /// covers the batches queued ahead of it; the session's backend is then ended and confirmed
    /// gone before its batches run again. Below the 5 s statement timeout, a statement that
    /// only waits on a row lock also ends its session (tests use that).
    #[arg(
        long,
        env = "SPENDGUARD_LEDGER_CACHED_ANSWER_DEADLINE_MS",
        default_value_t = 25_000,
        value_parser = clap::value_parser!(u64).range(100..=600_000)
    )]
    pub cached_answer_deadline_ms: u64,
}

impl Default for LedgerTuning {
    fn default() -> Self {
        Self {
            db_pool_size: 8,
            queue_capacity: 8192,
            batch_linger_us: 1_000,
            defer_max_us: 5_000,
            pipeline_depth: 2,
            max_message_bytes: 65_536,
            migrate_on_start: false,
            allow_privileged_database_role: false,
            shutdown_grace_ms: 10_000,
            max_evidence_lag_seconds: 0,
            gauge_refresh_ms: 10_000,
            cached_answer_deadline_ms: 25_000,
        }
    }
}

/// A running ledger.
pub struct RunningLedger {
    /// Bound data-path gRPC address.
    pub addr: SocketAddr,
    /// Bound control gRPC address.
    pub control_addr: SocketAddr,
    /// The store (tests inspect the database through it).
    pub store: Store,
    claim: watch::Receiver<Option<ProducerClaim>>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    /// The writer, under [`stop_all_if_it_ends_unasked`] (`spendguard_platform::supervise`).
    writer: JoinHandle<Result<(), tokio::task::JoinError>>,
    /// Tasks that run until the ledger stops (each also supervised: [`spawn_supervised`]).
    background: Vec<AbortHandle>,
}

impl RunningLedger {
    /// Readiness: the database answers, migrations are applied and the producer id is claimed.
    pub fn readiness(&self) -> Readiness {
        let store = self.store.clone();
        let claim = self.claim.clone();
        Arc::new(move || {
            let store = store.clone();
            let claimed = claim.borrow().is_some();
            Box::pin(async move {
                if !claimed {
                    return Err("producer instance id not claimed".to_owned());
                }
                if store.ready().await {
                    Ok(())
                } else {
                    Err("database unreachable or migrations pending".to_owned())
                }
            })
        })
    }

    /// Resolves when the ledger stopped serving on its own (a gRPC server, the writer or a
    /// background task ended without being asked, which for the writer and the tasks means a
    /// panic): the process should exit, so that it is restarted.
    pub async fn failed(&self) {
        let mut stopped = self.stop.subscribe();
        let _ = stopped.wait_for(|stop| *stop).await;
    }

    /// Stops accepting RPCs, lets in-flight ones finish, drains the writer and frees the
    /// producer id.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for server in self.servers {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "grpc server ended with an error"),
                Err(e) => warn!(error = %e, "grpc server task failed"),
            }
        }
        // The server owned the last writer handles; the writer ends once its queue is drained.
        match self.writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "writer task failed"),
            Err(e) => warn!(error = %e, "writer's supervisor failed"),
        }
        for task in self.background {
            task.abort();
        }
    }
}

/// Starts the ledger: check its database role, migrate (optionally), claim the producer id,
/// publish the signing key (with its audit event, if the registry lacks it), start the writer
/// and serve gRPC, the data path on `listener` and every RPC on `control_listener`. Every
/// audit event is signed with `signing` (unsigned only when it is [`Signing::Disabled`], which
/// the demo profile alone can build).
///
/// # Errors
/// [`Error::DatabaseRolePrivileged`], [`Error::Database`], [`Error::Migration`],
/// [`Error::ProducerInstanceConflict`], [`Error::Signing`] when the key cannot sign its own
/// registration, or [`Error::Startup`] for a signing key id already bound to another key, a
/// key the registry holds revoked or outside its window, or a publication refused.
pub async fn start(
    database_url: &str,
    instance_id: &str,
    tuning: &LedgerTuning,
    signing: Signing,
    listener: TcpListener,
    control_listener: TcpListener,
    registry: &mut Registry,
) -> Result<RunningLedger> {
    spendguard_core::ids::check_name("instance_id", instance_id)?;
    let mut store = Store::connect(database_url, tuning.db_pool_size).await?;
    store
        .set_cached_answer_deadline(Duration::from_millis(tuning.cached_answer_deadline_ms))
        .await;
    // Before migrating: a role that may migrate is one the ledger does not serve as, unless
    // allowed.
    spendguard_postgres::require_unprivileged(
        store.pool(),
        tuning.allow_privileged_database_role,
        "SPENDGUARD_LEDGER_ALLOW_PRIVILEGED_DATABASE_ROLE",
    )
    .await
    .map_err(|e| match e {
        spendguard_postgres::RoleError::Database(e) => Error::from(e),
        privileged @ spendguard_postgres::RoleError::Privileged { .. } => {
            Error::DatabaseRolePrivileged(privileged.to_string())
        }
    })?;
    if tuning.migrate_on_start {
        store.migrate().await?;
    }
    // Claimed before anything is written, the signing key's registration included: a second
    // process started with this id by mistake is refused before it leaves a trace.
    let (claim, lock) = store.claim_producer(database_url, instance_id).await?;
    info!(
        producer_instance_id = instance_id,
        "producer instance id claimed"
    );
    let mut key_standing = None;
    match signing {
        Signing::Enabled(signer) => {
            // On the database's clock, which events are signed by (the batch's time), in whole
            // milliseconds like them: on the host's, a host clock ahead of the database's would
            // put every batch's signing time before the window until the host's clock passed.
            let now = database_clock(&store).await?;
            let record = signer
                .key_record(now, None)
                .map_err(|e| Error::Startup(format!("signing key: {e}")))?;
            let key_id = record.key_id.clone();
            let standing = Arc::new(KeyStanding::new(record.clone()));
            store = store.with_signer(Arc::new(EventSigner {
                signer,
                standing: standing.clone(),
            }));
            // A new key is published with its audit event, signed by itself (its window opens
            // at `now`, before the batch's time).
            store.publish_own_key(&record, &claim).await?;
            // The registry may hold the key revoked, or its window closed, since an earlier
            // start: such a key signs nothing, so the ledger does not start with it.
            let window = store
                .signing_key_window(&key_id)
                .await?
                .ok_or_else(|| Error::Startup(format!("signing key {key_id} vanished")))?;
            standing.set(window);
            // At a fresh reading of the database clock: a replica that published the same key
            // first opened its window at its own, later, start.
            standing
                .check(database_clock(&store).await?)
                .map_err(Error::Startup)?;
            info!(key_id = %key_id, algorithm = record.algorithm().as_str(), "audit events are signed");
            key_standing = Some(standing);
        }
        Signing::Disabled => warn!("audit events are NOT signed (demo profile)"),
    }
    let (claim_tx, claim_rx) = watch::channel(Some(claim));
    let metrics = Metrics::register(registry);
    let (stop, stopped) = watch::channel(false);
    let (writer, writer_task) = Writer::spawn(
        store.clone(),
        claim_rx.clone(),
        tuning.queue_capacity,
        (
            Batching {
                linger_for: Duration::from_micros(tuning.batch_linger_us),
                defer_for: Duration::from_micros(tuning.defer_max_us),
                pipeline_depth: usize::from(tuning.pipeline_depth),
            },
            stopped.clone(),
        ),
        metrics.clone(),
    );
    let evidence_gate = Arc::new(EvidenceGate::new(tuning.max_evidence_lag_seconds));
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Startup(format!("listener: {e}")))?;
    let control_addr = control_listener
        .local_addr()
        .map_err(|e| Error::Startup(format!("control listener: {e}")))?;
    let servers = [
        (listener, grpc::Access::DataPath),
        (control_listener, grpc::Access::Control),
    ]
    .into_iter()
    .map(|(listener, access)| {
        let service = grpc::LedgerGrpc::new(
            writer.clone(),
            store.clone(),
            metrics.clone(),
            evidence_gate.clone(),
            access,
        );
        tokio::spawn(serve(
            service,
            listener,
            tuning.max_message_bytes,
            (stop.clone(), stopped.clone()),
        ))
    })
    .collect();
    drop(writer);
    // A writer that panicked would leave the ledger serving with every write refused
    // (SHUTTING_DOWN) and nothing to restart it; a background task that did would leave the
    // claim unwatched, the evidence gate or the key's standing frozen. Either stops the ledger.
    let writer_task = tokio::spawn(stop_all_if_it_ends_unasked(
        "writer",
        writer_task,
        stop.clone(),
    ));
    let mut background = vec![
        spawn_supervised(
            "producer-claim watch",
            watch_producer_claim(
                store.clone(),
                database_url.to_owned(),
                instance_id.to_owned(),
                lock,
                claim_tx,
            ),
            &stop,
        )
        .abort_handle(),
        spawn_supervised(
            "evidence gate",
            evidence_gate::watch(store.clone(), evidence_gate, metrics.clone()),
            &stop,
        )
        .abort_handle(),
        spawn_supervised(
            "gauges",
            refresh_gauges(
                store.clone(),
                metrics,
                Duration::from_millis(tuning.gauge_refresh_ms),
            ),
            &stop,
        )
        .abort_handle(),
    ];
    if let Some(standing) = key_standing {
        background.push(
            spawn_supervised(
                "key-standing watch",
                key_standing::watch(store.clone(), standing),
                &stop,
            )
            .abort_handle(),
        );
    }
    Ok(RunningLedger {
        addr,
        control_addr,
        store,
        claim: claim_rx,
        stop,
        servers,
        writer: writer_task,
        background,
    })
}

/// Serves `service` on `listener` until `stopped`, then lets in-flight requests finish.
async fn serve(
    service: grpc::LedgerGrpc,
    listener: TcpListener,
    max_message_bytes: usize,
    (stop, mut stopped): (watch::Sender<bool>, watch::Receiver<bool>),
) -> Result<(), tonic::transport::Error> {
    let shutdown = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
        info!("ledger draining in-flight requests");
    };
    stop_all_if_it_ends_unasked(
        "gRPC server",
        serve_until(service, listener, max_message_bytes, shutdown),
        stop,
    )
    .await
}

async fn serve_until(
    service: grpc::LedgerGrpc,
    listener: TcpListener,
    max_message_bytes: usize,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(service.into_server(max_message_bytes))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, Nagle's algorithm and delayed ACKs stall small replies by
            // tens of milliseconds.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// Keeps the producer claim alive; on a lost session, stops writes (fail closed) and re-claims.
async fn watch_producer_claim(
    store: Store,
    database_url: String,
    instance_id: String,
    mut lock: store::ProducerLock,
    claim: watch::Sender<Option<ProducerClaim>>,
) {
    loop {
        tokio::time::sleep(PRODUCER_PING_INTERVAL).await;
        if lock.ping().await.is_ok() {
            continue;
        }
        warn!(producer_instance_id = %instance_id, "producer claim session lost; writes stopped until re-claimed");
        claim.send_replace(None);
        loop {
            tokio::time::sleep(PRODUCER_PING_INTERVAL).await;
            match store.claim_producer(&database_url, &instance_id).await {
                Ok((fresh, fresh_lock)) => {
                    lock = fresh_lock;
                    claim.send_replace(Some(fresh));
                    info!(producer_instance_id = %instance_id, "producer instance id re-claimed");
                    break;
                }
                Err(e) => warn!(error = %e, "re-claiming producer instance id failed"),
            }
        }
    }
}

/// Keeps the gauges that need a database count (open reservations, unforwarded evidence) fresh.
async fn refresh_gauges(store: Store, metrics: Metrics, interval: Duration) {
    loop {
        match store.open_reservations().await {
            Ok(open) => {
                metrics.open_reservations.set(open);
            }
            Err(e) => warn!(error = %e, "counting open reservations failed"),
        }
        match store.evidence_unforwarded().await {
            Ok(waiting) => {
                metrics.evidence_unforwarded.set(waiting);
            }
            Err(e) => warn!(error = %e, "counting unforwarded audit events failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

impl LedgerArgs {
    /// Runs `spendguard ledger` until SIGTERM/SIGINT.
    ///
    /// # Errors
    /// Startup failures (bad config, database, producer conflict, bind).
    pub async fn run(self) -> Result<()> {
        let Self {
            common,
            listen_addr,
            control_listen_addr,
            database_url,
            database_url_file,
            instance_id,
            signing,
            tuning,
        } = self;
        common
            .init_tracing()
            .map_err(|e| Error::Startup(e.to_string()))?;
        let signing = signing
            .build(&instance_id)
            .await
            .map_err(|e| Error::Startup(format!("{}: {e}", e.code().as_str())))?;
        let database_url = match (database_url, database_url_file) {
            (_, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| Error::Startup(format!("reading {}: {e}", path.display())))?
                .trim()
                .to_owned(),
            (Some(url), None) => url,
            (None, None) => return Err(Error::Startup("a database URL is required".into())),
        };
        info!(%listen_addr, admin_addr = %common.admin_addr, %instance_id, ?tuning, "starting ledger");
        let listener = TcpListener::bind(listen_addr)
            .await
            .map_err(|e| Error::Startup(format!("binding {listen_addr}: {e}")))?;
        let control_listener = TcpListener::bind(control_listen_addr)
            .await
            .map_err(|e| Error::Startup(format!("binding {control_listen_addr}: {e}")))?;
        let mut registry = Registry::default();
        let ledger = start(
            &database_url,
            &instance_id,
            &tuning,
            signing,
            listener,
            control_listener,
            &mut registry,
        )
        .await?;
        let admin = AdminServer::bind(common.admin_addr, registry, ledger.readiness())
            .await
            .map_err(|e| Error::Startup(format!("binding admin {}: {e}", common.admin_addr)))?;
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(admin.serve(async move {
            let _ = admin_stopped.await;
        }));
        info!(addr = %ledger.addr, control_addr = %ledger.control_addr, "ledger serving");
        let failed = tokio::select! {
            () = spendguard_platform::shutdown::signalled() => false,
            () = ledger.failed() => true,
        };
        let grace = Duration::from_millis(tuning.shutdown_grace_ms);
        if tokio::time::timeout(grace, ledger.shutdown())
            .await
            .is_err()
        {
            error!("shutdown grace period elapsed; exiting with requests in flight");
        }
        let _ = admin_stop.send(());
        let _ = admin_task.await;
        if failed {
            return Err(Error::ServingStopped(
                "a gRPC server, the writer or a background task ended on its own; exiting so \
                 that the ledger is restarted"
                    .into(),
            ));
        }
        info!("ledger stopped");
        Ok(())
    }
}

/// The database clock in whole milliseconds, as events are signed.
async fn database_clock(store: &Store) -> Result<chrono::DateTime<chrono::Utc>> {
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(store.pool())
        .await
        .map_err(|e| Error::Startup(format!("database clock: {e}")))?;
    Ok(spendguard_evidence::envelope::truncate_to_ms(now))
}
