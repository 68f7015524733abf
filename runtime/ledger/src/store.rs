//! PostgreSQL persistence: the only module that speaks SQL.
//!
//! One batch is one transaction:
//!
//! ```text
//! BEGIN ─► now() ─► lock scopes ─► lock sweep candidates (SKIP LOCKED) ─► lock reservations
//!       ─► read tenants ─► lock budgets ─► lock windows ─► plan_batch (pure)
//!       ─► write tenants, budgets, windows, scopes, reservations, journal ─► allocate
//!          producer sequences (claim-token checked) ─► outbox ─► COMMIT
//! ```
//!
//! Hot batches whose rows the writer has cached skip the load: they are planned on the cache and
//! written by one statement outside a transaction whose guard re-checks every row the plan read
//! ([`Store::prepare_cached`], [`Store::send_cached`], `store/fast_guard.sql`,
//! docs/design/ledger-cached-path.md).
//!
//! Locks are always taken in that order, each set sorted by key, by the load path and by the
//! cached statement's guard alike, so concurrent batches (also from other ledger replicas)
//! do not deadlock. A sweep locks its batch's scopes before it takes its candidates (SKIP
//! LOCKED, never waiting), so that holds for sweeps too. Window money is changed only by the
//! journal trigger, and the schema's constraints re-check every invariant on the result.

mod pgpass;
mod pipeline;
mod reads;
pub mod tls;

pub use pipeline::Sent;

use crate::cache::{CLOCK_TOLERANCE, Expected};
use crate::error::{Error, Result};
use crate::key_standing::{KeyStanding, KeyWindow};
use chrono::{DateTime, Utc};
use spendguard_core::audit::{ProducerStamp, format_time};
use spendguard_core::lease::{LeaseGrant, LeaseOutcome, LeaseState, RecordedAcquire};
use spendguard_core::plan::{
    ApprovalContext, ApprovalRow, ApprovalState, Balance, BudgetKey, BudgetRow, Command, Effects,
    FailOpenRow, Needs, Outcome, RegisterSigningKey, ReservationRow, ReservationState, Resolution,
    RetentionPolicy, SigningKeyRow, Snapshot, StopRow, WindowKey, WindowRow,
    plan_batch_keeping_state, windows_needed,
};
use spendguard_core::window::BudgetWindow;
use spendguard_core::{LedgerError, NanoUsd};
use spendguard_evidence::envelope::truncate_to_ms;
use spendguard_evidence::{Inclusion, KeyRecord, ProducerSigner, Signed, Signer};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow, PgSslMode};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row, Transaction};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type as PgType};
use uuid::Uuid;

/// Embedded migrations (`migrations/` at the repository root).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long one statement may run before the batch fails (and rolls back).
const STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// Longest wait for a data-path read (or for its session to open) before the session counts as
/// broken.
const READ_ANSWER_DEADLINE: Duration = Duration::from_millis(1_500);
/// How long a batch waits for a row lock held by another transaction.
const LOCK_TIMEOUT_MS: u64 = 2_000;
/// How long ending a broken cached-path session's backend may take (milliseconds): a backend
/// waiting on a lock or in the executor exits at once; one in a commit's WAL flush exits once
/// the flush returns. Below the pool's statement timeout, so the wait ends first.
pub const END_BACKEND_WAIT_MS: i64 = 4_000;

/// What signs a batch's events: the producer's signer, and its key's standing in the registry
/// (a revoked key, or one outside its window, signs nothing: `key_standing.rs`).
#[derive(Debug)]
pub struct EventSigner {
    /// The signer.
    pub signer: ProducerSigner,
    /// Its key's registry row, kept current.
    pub standing: Arc<KeyStanding>,
}

/// A connection pool plus this process's producer identity.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// The data path's reads on the request path (see [`reads`]).
    reads: Arc<reads::Reads>,
    /// The cached path's session (see [`cached_path_options`]).
    cached_path: Arc<tokio::sync::Mutex<pipeline::Pipeline>>,
    /// Signs every audit event (S6); `None` only under the demo profile.
    signer: Option<Arc<EventSigner>>,
}

/// Where one batch spent its time (exported as metrics, so a slow ledger says why).
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchTimings {
    /// Begin, lock and read rows.
    pub load: Duration,
    /// Decide every command (pure).
    pub plan: Duration,
    /// Write effects and outbox.
    pub write: Duration,
    /// Commit (WAL flush).
    pub commit: Duration,
}

/// A committed batch.
#[derive(Debug)]
pub struct Committed {
    /// One result per command.
    pub outcomes: Vec<Result<Outcome, LedgerError>>,
    /// Where the time went.
    pub timings: BatchTimings,
    /// Every row the batch read or wrote, as committed (for the writer's cache).
    pub state: Snapshot,
    /// The database clock read by a load, and this host's clock just before it.
    pub clock: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// A cached batch planned and signed, not yet sent ([`Store::prepare_cached`]).
pub struct PreparedBatch {
    /// One result per command; they stand only if the statement commits.
    pub outcomes: Vec<Result<Outcome, LedgerError>>,
    /// Every row the batch read or wrote, as it leaves them.
    pub state: Snapshot,
    /// The producer sequence after this batch.
    pub next_sequence: u64,
    /// Time spent planning and signing.
    pub plan: Duration,
    /// What [`Store::send_cached`] sends.
    pub statement: CachedStatement,
}

/// The cached statement's parameters, bound and signed (opaque outside this module).
pub struct CachedStatement {
    shape: CachedShape,
    params: CachedParams,
}

impl CachedStatement {
    /// Which of the cached statements carries this batch.
    #[must_use]
    pub fn shape(&self) -> CachedShape {
        self.shape
    }

    /// The same batch under another statement: only for tests proving that a statement refuses
    /// a batch with effects it does not carry.
    #[doc(hidden)]
    #[must_use]
    pub fn with_shape(self, shape: CachedShape) -> Self {
        Self { shape, ..self }
    }
}

/// This process's claim on its producer instance id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerClaim {
    /// Stable id (S2).
    pub producer_instance_id: String,
    /// Token rewritten by every claim; writes carrying an older token are refused.
    pub claim_token: Uuid,
}

/// The writer's view of its producer: the claim and the next sequence to assign. Sequences are
/// assigned in memory and confirmed by a compare-and-set in the batch's write statement, so a
/// batch needs no extra round trip to allocate them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerCursor {
    /// The claim.
    pub claim: ProducerClaim,
    /// Next sequence to assign.
    pub next_sequence: u64,
}

/// Holds the session-level advisory lock that makes a producer id exclusive. Dropping it (or the
/// process dying) closes the session and frees the id at once.
pub struct ProducerLock {
    connection: PgConnection,
}

impl ProducerLock {
    /// Checks the lock's session is alive.
    ///
    /// # Errors
    /// [`Error::Database`] when the session is gone: the claim must be treated as lost.
    pub async fn ping(&mut self) -> Result<()> {
        self.connection.ping().await.map_err(Error::from)
    }
}

/// `database_url` as every component reads it (`spendguard_postgres`).
fn read_url(database_url: &str) -> Result<PgConnectOptions> {
    spendguard_postgres::connect_options(database_url)
        .map_err(|e| Error::Startup(format!("{}: {e}", e.code())))
}

fn options(database_url: &str) -> Result<PgConnectOptions> {
    let options = read_url(database_url)?;
    Ok(options.application_name("spendguard-ledger").options([
        ("statement_timeout", STATEMENT_TIMEOUT_MS.to_string()),
        ("lock_timeout", LOCK_TIMEOUT_MS.to_string()),
        // Batch statements take arrays whose length changes every batch. A generic plan made
        // while a table was small keeps scanning it as it grows (seen: the reservations update
        // went from 0.2 ms to several ms); planning each execution is cheaper and stable.
        ("plan_cache_mode", "force_custom_plan".to_owned()),
    ]))
}

/// The cached path's session: its one statement touches a handful of rows by key, so it is
/// planned once per session (a generic plan) with scans other than index lookups disabled, so
/// that plan cannot turn into a table scan as tables grow. Saves planning the statement on
/// every batch.
///
/// It connects as the pool does: host, port, socket, user, database, TLS mode and the URL's own
/// `options` come from sqlx's reading of the URL and the `PG*` environment (the session's
/// settings are appended). The password comes, as for the pool, from the URL, else
/// `PGPASSWORD`, else the password file (`PGPASSFILE` or `~/.pgpass`).
fn cached_path_config(database_url: &str) -> Result<tokio_postgres::Config> {
    use tokio_postgres::config::SslMode;
    let url = read_url(database_url)?;
    let mut config = tokio_postgres::Config::new();
    match url.get_socket() {
        Some(directory) => config.host_path(directory),
        None => config.host(url.get_host()),
    };
    config.port(url.get_port()).user(url.get_username());
    if let Some(database) = url.get_database() {
        config.dbname(database);
    }
    let password = url_password(database_url)
        .or_else(|| std::env::var("PGPASSWORD").ok())
        .or_else(|| {
            pgpass::lookup(
                url.get_host(),
                url.get_port(),
                url.get_database(),
                url.get_username(),
            )
        });
    if let Some(password) = password {
        config.password(password);
    }
    config.ssl_mode(match url.get_ssl_mode() {
        PgSslMode::Disable => SslMode::Disable,
        PgSslMode::Allow | PgSslMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    let settings = format!(
        "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS} \
         -c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c enable_hashjoin=off \
         -c enable_mergejoin=off -c enable_bitmapscan=off"
    );
    let options = match url.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{own} {settings}"),
        _ => settings,
    };
    // A host that stops answering must not hold the writer for the OS's TCP timeouts.
    config
        .application_name("spendguard-ledger")
        .options(options)
        .connect_timeout(Duration::from_secs(5))
        .keepalives_idle(Duration::from_secs(10))
        .tcp_user_timeout(Duration::from_secs(10));
    Ok(config)
}

#[doc(hidden)] // For tests: not part of the ledger's interface.
/// The plans the cached path's session makes for its statements, one per [`CachedShape`], as
/// `EXPLAIN (FORMAT JSON)` gives them: a session configured as the writer's (one generic plan
/// each, index lookups only), with no parameter values. For checks that every row is found by
/// its key, so that a statement's cost cannot grow with a table (tests/ledger_cache.rs).
///
/// # Errors
/// As [`session_config`]; [`Error::Database`] when the database refuses a statement.
pub async fn cached_path_plans(database_url: &str) -> Result<Vec<serde_json::Value>> {
    let (client, connection) = session_config(database_url)?.connect().await?;
    let connection = tokio::spawn(connection);
    let types = CACHED_BATCH_TYPES
        .iter()
        .map(PgType::name)
        .collect::<Vec<_>>()
        .join(", ");
    let nulls = vec!["NULL"; CACHED_BATCH_TYPES.len()].join(", ");
    let mut plans = Vec::with_capacity(CACHED_BATCHES.len());
    for (shape, statement) in CACHED_BATCHES.iter().enumerate() {
        client
            .batch_execute(&format!(
                "PREPARE spendguard_shape_{shape} ({types}) AS {statement}"
            ))
            .await?;
        let rows = client
            .simple_query(&format!(
                "EXPLAIN (FORMAT JSON) EXECUTE spendguard_shape_{shape} ({nulls})"
            ))
            .await?;
        let text = rows
            .iter()
            .find_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
                _ => None,
            })
            .ok_or_else(|| Error::Database("EXPLAIN returned no plan".into()))?;
        plans.push(
            serde_json::from_str(text)
                .map_err(|e| Error::Database(format!("EXPLAIN returned no JSON: {e}")))?,
        );
    }
    drop(client);
    let _ = connection.await;
    Ok(plans)
}

/// How the ledger's own sessions (the cached path's, the reads') connect to `database_url`:
/// as [`cached_path_config`] says, with TLS as its `sslmode` says (`tls.rs`).
///
/// # Errors
/// [`Error::Database`] for a URL sqlx does not read; [`Error::Startup`] for TLS files that
/// cannot be read or used.
pub fn session_config(database_url: &str) -> Result<tls::SessionConfig> {
    Ok(tls::SessionConfig {
        pg: cached_path_config(database_url)?,
        tls: tls::PgTls::from_url(database_url, &read_url(database_url)?)?,
    })
}

/// The password in `database_url`, percent-decoded.
fn url_password(database_url: &str) -> Option<String> {
    let url = url::Url::parse(database_url).ok()?;
    let password = url.password()?;
    percent_encoding::percent_decode_str(password)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

impl Store {
    /// Connects a pool of `max_connections`.
    ///
    /// # Errors
    /// [`Error::Startup`] when the URL (or the `PGSSL*` environment) is refused or its TLS files
    /// cannot be read or used; [`Error::Database`] when the database is unreachable.
    pub async fn connect(database_url: &str, max_connections: u32) -> Result<Self> {
        // First: a root or key that cannot be used is named as such, not as a failed connect.
        let cached_path_session = session_config(database_url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options(database_url)?)
            .await
            .map_err(Error::from)?;
        let mut reads_session = cached_path_session.clone();
        let cached_path = Arc::new(tokio::sync::Mutex::new(pipeline::Pipeline::new(
            cached_path_session,
            &*CACHED_BATCHES,
            CACHED_BATCH_TYPES,
            // Up to four batches in flight (the depth's limit) may each run to the statement
            // timeout before this one is answered.
            Duration::from_millis(STATEMENT_TIMEOUT_MS * 5),
        )));
        // Opened on first use (`spendguard migrate` never uses it). Its statements look up one
        // row by key, so the cached path's session settings (a generic plan, index lookups
        // only) suit them too.
        reads_session.pg.application_name("spendguard-ledger-reads");
        // Well inside a sidecar's 5 s RPC deadline, so a half-open session is replaced (and the
        // read tried again) while the sidecar still waits: a one-row read takes milliseconds.
        let reads = Arc::new(reads::Reads::new(reads_session, READ_ANSWER_DEADLINE));
        Ok(Self {
            pool,
            reads,
            cached_path,
            signer: None,
        })
    }

    /// Whether a sweep would find anything now: an open reservation or a pending approval past
    /// its expiry on the database clock (both on their partial indexes). A read on the pool, so
    /// the sweeper's idle ticks, the usual case, need not pass through the writer, whose load
    /// path would drain the pipeline of hot batches for a sweep with nothing to do.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn anything_expired(&self) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM reservations WHERE state = 'reserved' AND expires_at <= now())
                 OR EXISTS (SELECT 1 FROM approvals WHERE state = 'pending' AND expires_at <= now())",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// The fencing lease of `scope_id` as committed now (`None` for an unknown scope), and the
    /// database clock's now: a read on the read session (no lock, no cache).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn fencing_lease(
        &self,
        scope_id: &str,
    ) -> Result<(Option<LeaseState>, DateTime<Utc>)> {
        self.reads.fencing_lease(scope_id).await
    }

    /// Signs every audit event this store writes with `signer`.
    #[must_use]
    pub fn with_signer(mut self, signer: Arc<EventSigner>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// The registry's validity window of `key_id`, if it is registered.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn signing_key_window(&self, key_id: &str) -> Result<Option<KeyWindow>> {
        let row = sqlx::query(
            "SELECT valid_from, valid_until, revoked_at FROM signing_keys WHERE key_id = $1",
        )
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(KeyWindow {
                valid_from: row.try_get("valid_from")?,
                valid_until: row.try_get("valid_until")?,
                revoked_at: row.try_get("revoked_at")?,
            })
        })
        .transpose()
    }

    /// Publishes this ledger's own key, `record`, in the key registry (`signing_keys`) as
    /// `claim`'s producer, unless the registry holds it already. Publication is a batch like
    /// RegisterSigningKey's, so it writes its signed `signing_key.registered` event: a key
    /// appears in the registry only with evidence that it did (S7: a rotation is itself
    /// audited). A key id that exists with the same public key is left alone (its window and
    /// revocation as the registry holds them); one with another public key is refused.
    ///
    /// # Errors
    /// [`Error::Startup`] for a key id already bound to another key, or a publication refused;
    /// [`Error::Database`].
    pub async fn publish_own_key(&self, record: &KeyRecord, claim: &ProducerClaim) -> Result<()> {
        if self.own_key_registered(record).await? {
            return Ok(());
        }
        let mut cursor = self.producer_cursor(claim).await?;
        let command = Command::RegisterSigningKey(RegisterSigningKey {
            key_id: record.key_id.clone(),
            key: SigningKeyRow {
                algorithm: record.algorithm().as_str().to_owned(),
                public_key: record.public_key.to_bytes(),
                valid_from: record.valid_from,
                valid_until: record.valid_until,
                revoked_at: None,
            },
        });
        let refused = match self.run_batch(&mut cursor, &[command]).await {
            Ok(mut committed) => match committed.outcomes.remove(0) {
                Ok(_) => return Ok(()),
                Err(refused) => refused.to_string(),
            },
            // Replicas sharing one key start together: the other's row, committed while this
            // batch's insert waited, makes it a unique violation (a row that did not exist
            // could not be locked first).
            Err(Error::Invariant(message)) => message,
            Err(e) => return Err(e),
        };
        // Another process published the key first (a conflict on its own start, or the unique
        // violation above): judged like a key registered earlier.
        if self.own_key_registered(record).await? {
            return Ok(());
        }
        Err(Error::Startup(format!(
            "publishing signing key {}: {refused}",
            record.key_id
        )))
    }

    /// Whether the registry holds `record`'s key id, with its public key.
    ///
    /// # Errors
    /// [`Error::Startup`] when it holds the id with another public key; [`Error::Database`].
    async fn own_key_registered(&self, record: &KeyRecord) -> Result<bool> {
        let existing: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT public_key FROM signing_keys WHERE key_id = $1")
                .bind(&record.key_id)
                .fetch_optional(&self.pool)
                .await?;
        match existing {
            None => Ok(false),
            Some(key) if key == record.public_key.to_bytes() => Ok(true),
            Some(_) => Err(Error::Startup(format!(
                "signing key id {} is registered with another public key",
                record.key_id
            ))),
        }
    }

    /// The pool (tests inspect tables through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations under the migrator's advisory lock (safe with many replicas).
    ///
    /// # Errors
    /// [`Error::Migration`].
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Whether the database answers and every embedded migration is applied.
    pub async fn ready(&self) -> bool {
        let applied: Result<Vec<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await;
        match applied {
            Ok(applied) => MIGRATOR
                .iter()
                .all(|m| m.migration_type.is_down_migration() || applied.contains(&m.version)),
            Err(_) => false,
        }
    }

    /// Claims `producer_instance_id` for this process (S2): takes a session advisory lock on a
    /// dedicated connection, then rewrites the claim token that every write checks.
    ///
    /// # Errors
    /// [`Error::ProducerInstanceConflict`] when another live session holds the id.
    pub async fn claim_producer(
        &self,
        database_url: &str,
        producer_instance_id: &str,
    ) -> Result<(ProducerClaim, ProducerLock)> {
        let mut connection = PgConnection::connect_with(&options(database_url)?)
            .await
            .map_err(Error::from)?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtextextended('spendguard.producer:' || $1, 0))",
        )
        .bind(producer_instance_id)
        .fetch_one(&mut connection)
        .await?;
        if !locked {
            return Err(Error::ProducerInstanceConflict(
                producer_instance_id.to_owned(),
            ));
        }
        let claim_token = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO audit_producers (producer_instance_id, claim_token) VALUES ($1, $2)
             ON CONFLICT (producer_instance_id)
             DO UPDATE SET claim_token = EXCLUDED.claim_token, claimed_at = now()",
        )
        .bind(producer_instance_id)
        .bind(claim_token)
        .execute(&mut connection)
        .await?;
        let claim = ProducerClaim {
            producer_instance_id: producer_instance_id.to_owned(),
            claim_token,
        };
        Ok((claim, ProducerLock { connection }))
    }

    /// Reads the producer's next sequence, checking the claim is still ours.
    ///
    /// # Errors
    /// [`Error::ProducerSequenceMoved`] when another process re-claimed the id.
    pub async fn producer_cursor(&self, claim: &ProducerClaim) -> Result<ProducerCursor> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT next_sequence FROM audit_producers WHERE producer_instance_id = $1 AND claim_token = $2",
        )
        .bind(&claim.producer_instance_id)
        .bind(claim.claim_token)
        .fetch_optional(&self.pool)
        .await?;
        let next =
            next.ok_or_else(|| Error::ProducerSequenceMoved(claim.producer_instance_id.clone()))?;
        Ok(ProducerCursor {
            claim: claim.clone(),
            next_sequence: epoch(next)?,
        })
    }

    /// Runs `commands` in one transaction: locks and loads every row they need, plans, writes.
    ///
    /// # Errors
    /// When the transaction fails as a whole (database unavailable, producer claim lost, an
    /// invariant fired); then nothing was written.
    /// On success `cursor` has advanced past the events written.
    pub async fn run_batch(
        &self,
        cursor: &mut ProducerCursor,
        commands: &[Command],
    ) -> Result<Committed> {
        let started = Instant::now();
        let local_before = Utc::now();
        let mut tx = self.pool.begin().await?;
        let (snapshot, existing_scopes) = load(&mut tx, commands).await?;
        let loaded = Instant::now();
        let now = snapshot.now;
        let existing_keys: BTreeSet<String> = snapshot.signing_keys.keys().cloned().collect();
        let (outcomes, effects, state) = plan_batch_keeping_state(snapshot, commands);
        let planned = Instant::now();
        let mut next_sequence = cursor.next_sequence;
        if !effects.is_empty() {
            let signer = self.signer.as_deref();
            let existing = Existing {
                scopes: &existing_scopes,
                signing_keys: &existing_keys,
            };
            next_sequence = write(&mut tx, cursor, now, &existing, &effects, signer).await?;
        }
        let written = Instant::now();
        tx.commit().await?;
        cursor.next_sequence = next_sequence;
        // A change to this ledger's own key takes effect for the next batch, not at the next
        // registry read: a revoked key signs nothing more here.
        if let Some(signer) = &self.signer
            && let Some(key) = effects.signing_keys.get(signer.standing.key_id())
        {
            signer.standing.set(KeyWindow {
                valid_from: key.valid_from,
                valid_until: key.valid_until,
                revoked_at: key.revoked_at,
            });
        }
        Ok(Committed {
            outcomes,
            timings: BatchTimings {
                load: loaded - started,
                plan: planned - loaded,
                write: written - planned,
                commit: written.elapsed(),
            },
            state,
            clock: Some((now, local_before)),
        })
    }

    /// Plans hot `commands` (reserve, commit, release) on `snapshot`, the writer's cached rows,
    /// and signs their events with the sequences after `cursor`: one self-validating statement,
    /// ready for [`Store::send_cached`]. Nothing is written yet.
    ///
    /// # Errors
    /// [`Error::Stale`] when the batch cannot take the cached path (it writes something other
    /// than money, or nothing: denials and replays are answered by the load path from locked
    /// rows); a signing error.
    pub async fn prepare_cached(
        &self,
        cursor: &ProducerCursor,
        snapshot: Snapshot,
        expected: &Expected,
        commands: &[Command],
    ) -> Result<PreparedBatch> {
        let started = Instant::now();
        let now = snapshot.now;
        let (outcomes, effects, state) = plan_batch_keeping_state(snapshot, commands);
        if !effects.only_moves_money() || effects.is_empty() {
            return Err(Error::Stale);
        }
        // The credits the plan read, with what it drew from each (the statement checks each one's
        // total, so even a refused draw's answer rests on a fresh total).
        let credits = CreditDraws::of(&effects, expected)?;
        let effects = EffectParams::of(cursor, now, &effects, self.signer.as_deref()).await?;
        let next_sequence = effects.next_sequence;
        Ok(PreparedBatch {
            outcomes,
            state,
            next_sequence,
            plan: started.elapsed(),
            statement: CachedStatement {
                shape: CachedShape::of(&effects, &credits),
                params: CachedParams {
                    effects,
                    guard: GuardParams::of(expected),
                    clock_tolerance_ms: CLOCK_TOLERANCE.num_milliseconds() as f64,
                    absent_reservations: expected.absent_reservations.clone(),
                    open_reservations: expected.open_reservations.clone(),
                    credits,
                },
            },
        })
    }

    /// Sends a prepared batch on the cached path's session, behind any batch still in flight,
    /// and returns its answer. It resolves to `Ok` once the batch committed, to [`Error::Stale`]
    /// when a row the plan read changed (or the clock estimate is off, or an earlier batch in
    /// flight failed), and to any other error as [`Store::run_batch`]. Only a connection lost
    /// after sending leaves the outcome unknown, as for any commit.
    ///
    /// # Errors
    /// [`Error::Database`] when the session cannot be opened.
    pub async fn send_cached(&self, statement: CachedStatement) -> Result<Sent> {
        let mut cached_path = self.cached_path.lock().await;
        // A session that broke since the last send is ended before a new one opens.
        self.end_broken(&mut cached_path).await?;
        cached_path
            .send(statement.shape as usize, statement.params)
            .await
    }

    /// Sets how long the cached path waits for an answer before it counts its session as broken
    /// (`SPENDGUARD_LEDGER_CACHED_ANSWER_DEADLINE_MS`).
    pub async fn set_cached_answer_deadline(&self, deadline: Duration) {
        self.cached_path.lock().await.set_answer_deadline(deadline);
    }

    /// Ends the cached path's session if it broke (no answer within the deadline, or its
    /// connection failed), and waits until its backend is gone. That backend does not know the
    /// client gave up: statements already sent to it may still be running, and may commit. Run
    /// again on the load path before they end, a batch could be answered as refused (its
    /// producer sequence moved under it) while the statement it was first sent as commits after
    /// all. Once the backend is gone, a rerun sees whatever it did, and a batch it committed is
    /// answered as the replay it is.
    ///
    /// # Errors
    /// [`Error::Database`] when the backend cannot be confirmed gone (the database unreachable,
    /// or the backend still there after [`END_BACKEND_WAIT_MS`]): what it committed is then
    /// unknown.
    pub async fn end_broken_cached_session(&self) -> Result<()> {
        self.end_broken(&mut *self.cached_path.lock().await).await
    }

    /// [`Store::end_broken_cached_session`] with the cached path already locked.
    async fn end_broken(&self, cached_path: &mut pipeline::Pipeline) -> Result<()> {
        let Some(backend) = cached_path.broken_backend() else {
            return Ok(());
        };
        // With a timeout, pg_terminate_backend waits for the process to exit (no row: it is gone
        // already; a closed connection often means it died). Whether it is gone is then read
        // once, whatever the signal answered.
        sqlx::query(
            "SELECT pg_terminate_backend(pid, $3) FROM pg_stat_activity \
              WHERE pid = $1 AND (extract(epoch FROM backend_start) * 1000000)::int8 = $2",
        )
        .bind(backend.pid)
        .bind(backend.started_micros)
        .bind(END_BACKEND_WAIT_MS)
        .execute(&self.pool)
        .await?;
        if backend_alive(&self.pool, backend).await? {
            return Err(Error::Database(format!(
                "the broken cached-path session's backend (pid {}) did not end within \
                 {END_BACKEND_WAIT_MS} ms",
                backend.pid
            )));
        }
        tracing::warn!(
            pid = backend.pid,
            "cached-path session broke; its backend is gone, its batches run again"
        );
        cached_path.forget_broken();
        Ok(())
    }

    /// Current-window balances of `budget_ids` (all must exist in `tenant_id`).
    ///
    /// # Errors
    /// [`LedgerError::BudgetNotFound`] for the first unknown budget.
    pub async fn balances(&self, tenant_id: &str, budget_ids: &[String]) -> Result<Vec<Balance>> {
        let mut tx = self.pool.begin().await?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *tx)
            .await?;
        let keys: BTreeSet<BudgetKey> = budget_ids
            .iter()
            .map(|b| BudgetKey {
                tenant_id: tenant_id.to_owned(),
                budget_id: b.clone(),
            })
            .collect();
        let budgets = load_budgets(&mut tx, &keys).await?;
        let mut windows = BTreeSet::new();
        for (key, budget) in &budgets {
            windows.insert(WindowKey {
                budget: key.clone(),
                start: budget.window.start_containing(now),
            });
        }
        let rows = load_windows(&mut tx, &windows, "").await?;
        tx.commit().await?;
        budget_ids
            .iter()
            .map(|budget_id| {
                let key = BudgetKey {
                    tenant_id: tenant_id.to_owned(),
                    budget_id: budget_id.clone(),
                };
                let budget = budgets
                    .get(&key)
                    .ok_or_else(|| LedgerError::BudgetNotFound {
                        tenant_id: tenant_id.to_owned(),
                        budget_id: budget_id.clone(),
                    })?;
                let start = budget.window.start_containing(now);
                let money = rows
                    .get(&WindowKey { budget: key, start })
                    .copied()
                    .unwrap_or(WindowRow {
                        limit: budget.limit,
                        ..WindowRow::default()
                    })
                    .under_budget_limit(budget.limit);
                Ok(Balance {
                    budget_id: budget_id.clone(),
                    window: budget.window,
                    window_start: start,
                    soft_cap: budget.soft_cap,
                    money,
                })
            })
            .collect()
    }

    /// One page of approvals ordered by id, after `after`, optionally of one tenant and one
    /// state (read-only; the operator mirrors pending approvals from it). Returns the page and
    /// whether more rows follow.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn list_approvals(
        &self,
        tenant_id: Option<&str>,
        state: Option<ApprovalState>,
        after: Option<Uuid>,
        page_size: u32,
    ) -> Result<(Vec<ApprovalRow>, bool)> {
        let limit = i64::from(page_size).saturating_add(1);
        let rows = sqlx::query(
            "SELECT approval_id, tenant_id, idempotency_key, request_sha256, budget_ids, budget_id,
                    amount_nano_usd, context, fencing_scope_id, fencing_epoch, created_at, expires_at,
                    state, resolved_by, resolved_at, resolution_reason
               FROM approvals
              WHERE ($1::text IS NULL OR tenant_id = $1)
                AND ($2::text IS NULL OR state = $2)
                AND ($3::uuid IS NULL OR approval_id > $3)
              ORDER BY approval_id
              LIMIT $4",
        )
        .bind(tenant_id)
        .bind(state.map(ApprovalState::as_str))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() > page_size as usize;
        let approvals = rows
            .iter()
            .take(page_size as usize)
            .map(approval_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok((approvals, more))
    }

    /// One approval of `tenant_id`, in any state, or `None` when the id is unknown or names
    /// another tenant's approval (read-only; callers answer both as not found, so the
    /// existence of another tenant's approval never leaks).
    ///
    /// # Errors
    /// [`Error::Database`], or [`Error::Invariant`] for a stored row out of range.
    pub async fn approval(
        &self,
        tenant_id: &str,
        approval_id: Uuid,
    ) -> Result<Option<ApprovalRow>> {
        let row = sqlx::query(
            "SELECT approval_id, tenant_id, idempotency_key, request_sha256, budget_ids, budget_id,
                    amount_nano_usd, context, fencing_scope_id, fencing_epoch, created_at, expires_at,
                    state, resolved_by, resolved_at, resolution_reason
               FROM approvals
              WHERE approval_id = $1 AND tenant_id = $2",
        )
        .bind(approval_id)
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        let approval = row.as_ref().map(approval_from_row).transpose()?;
        if let Some(approval) = &approval {
            debug_assert_eq!(approval.id, approval_id);
            debug_assert_eq!(approval.tenant_id, tenant_id);
        }
        Ok(approval)
    }

    /// A tenant's retention policy and its last update, if one was set (read-only).
    ///
    /// # Errors
    /// [`Error::Database`], or [`Error::Invariant`] for a stored value out of range.
    pub async fn retention_policy(
        &self,
        tenant_id: &str,
    ) -> Result<Option<(RetentionPolicy, DateTime<Utc>)>> {
        let row = sqlx::query(
            "SELECT audit_retention_days, redact_payloads_after_days, updated_at
               FROM retention_policies WHERE tenant_id = $1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(retention_from_row).transpose()
    }

    /// Audit events in the outbox that the forwarder has not yet moved into the canonical chain
    /// (for the gauge): a forwarder that is down or behind shows here, not as lost evidence.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn evidence_unforwarded(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(sum(p.next_sequence - coalesce(c.next_sequence, 1)), 0)::bigint
               FROM audit_producers p LEFT JOIN forwarder_cursors c USING (producer_instance_id)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Age, on the database clock, of the oldest audit event not yet forwarded into the
    /// canonical chain: for each producer, the first event at or after its forwarder cursor (one
    /// index probe per producer; "at or after", so a gap that stalls the forwarder still counts
    /// the events behind it); `None` when nothing waits.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn oldest_unforwarded_age_ms(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT (extract(epoch FROM now() - min(o.occurred_at)) * 1000)::bigint
               FROM audit_producers p
               LEFT JOIN forwarder_cursors c USING (producer_instance_id)
               CROSS JOIN LATERAL (
                   SELECT occurred_at FROM audit_outbox o
                    WHERE o.producer_instance_id = p.producer_instance_id
                      AND o.producer_sequence >= coalesce(c.next_sequence, 1)
                    ORDER BY o.producer_sequence LIMIT 1) o",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether the reservation `id` exists (in any state): a ReserveSet naming it is a replay
    /// (or a conflict), never new spend, since reservations are never deleted.
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn holds_reservation(&self, id: Uuid) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM reservations WHERE reservation_id = $1)",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether the approval `id` exists (in any state): see [`Self::holds_reservation`].
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn holds_approval(&self, id: Uuid) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM approvals WHERE approval_id = $1)")
                .bind(id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Number of open reservations (for the gauge).
    ///
    /// # Errors
    /// [`Error::Database`].
    pub async fn open_reservations(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM reservations WHERE state = 'reserved'")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

// === Loading ===

/// Whether `backend` (a pid and its start time, since a pid may be reused) still runs.
async fn backend_alive(pool: &PgPool, backend: pipeline::Backend) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 \
           AND (extract(epoch FROM backend_start) * 1000000)::int8 = $2)",
    )
    .bind(backend.pid)
    .bind(backend.started_micros)
    .fetch_one(pool)
    .await?)
}

fn money(value: i64) -> Result<NanoUsd> {
    NanoUsd::new(value).map_err(|e| Error::Invariant(format!("stored amount out of range: {e}")))
}

fn epoch(value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Invariant(format!("stored epoch {value} is negative")))
}

fn to_i64(value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Invariant(format!("value {value} exceeds i64")))
}

/// A fencing scope as `load_batch.sql` returns it.
#[derive(serde::Deserialize)]
struct ScopeJson {
    scope_id: String,
    tenant_id: String,
    owner_workload_id: String,
    epoch: i64,
    expires_at: DateTime<Utc>,
}

/// A reservation as `load_batch.sql` returns it.
#[derive(serde::Deserialize)]
struct ReservationJson {
    reservation_id: Uuid,
    tenant_id: String,
    idempotency_key: String,
    request_sha256: String,
    budget_ids: Vec<String>,
    window_starts: Vec<DateTime<Utc>>,
    amount_nano_usd: i64,
    fencing_scope_id: String,
    fencing_epoch: i64,
    expires_at: DateTime<Utc>,
    state: String,
    resolved_epoch: Option<i64>,
    actual_nano_usd: Option<i64>,
    committed_nano_usd: Option<i64>,
    released_nano_usd: Option<i64>,
    overrun_nano_usd: Option<i64>,
    is_credit: bool,
    drawn_nano_usd: i64,
    drawn_from_reservation_id: Option<Uuid>,
}

/// A tenant as `load_batch.sql` returns it.
#[derive(serde::Deserialize)]
struct TenantJson {
    tenant_id: String,
    display_name: String,
}

/// A pricing registration as `load_batch.sql` returns it.
#[derive(serde::Deserialize)]
struct PricingJson {
    tenant_id: String,
    version: String,
    sha256_hex: String,
}

/// A signing key as `load_batch.sql` returns it.
#[derive(serde::Deserialize)]
struct SigningKeyJson {
    key_id: String,
    algorithm: String,
    public_key_hex: String,
    valid_from: DateTime<Utc>,
    valid_until: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

/// A budget as `load_batch.sql` returns it.
#[derive(serde::Deserialize)]
struct BudgetJson {
    tenant_id: String,
    budget_id: String,
    limit_nano_usd: i64,
    soft_cap_nano_usd: Option<i64>,
    window_kind: String,
}

async fn load(
    tx: &mut Transaction<'_, Postgres>,
    commands: &[Command],
) -> Result<(Snapshot, BTreeSet<String>)> {
    let needs = Needs::of(commands);
    let mut reservation_ids: BTreeSet<Uuid> = needs.reservation_ids.clone();
    let mut expired_candidates = Vec::new();
    if needs.sweep_max > 0 {
        // The scopes come first in the lock order, also before the sweep's candidates: a
        // candidate taken before a scope the batch then waits for could be the reservation a
        // cached commit on another replica, holding that scope, waits for.
        if !needs.scope_ids.is_empty() {
            let scope_ids: Vec<&str> = needs.scope_ids.iter().map(String::as_str).collect();
            sqlx::query(
                "SELECT 1 FROM fencing_scopes WHERE scope_id = ANY($1) ORDER BY scope_id FOR UPDATE",
            )
            .bind(&scope_ids)
            .execute(&mut **tx)
            .await?;
        }
        // Then the reservations the batch names, waiting for them in the lock order, before
        // it holds any candidate: a candidate held while it waits for a named one could be
        // the row the holder of that one waits for next (a deadlock between replicas).
        if !needs.reservation_ids.is_empty() {
            let named: Vec<Uuid> = needs.reservation_ids.iter().copied().collect();
            sqlx::query(
                "SELECT 1 FROM reservations WHERE reservation_id = ANY($1)
                  ORDER BY reservation_id FOR UPDATE",
            )
            .bind(&named)
            .execute(&mut **tx)
            .await?;
        }
        // SKIP LOCKED never waits, so taking these last cannot break the lock order.
        expired_candidates = sqlx::query_scalar(
            "SELECT reservation_id FROM reservations WHERE state = 'reserved' AND expires_at <= now()
             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(needs.sweep_max))
        .fetch_all(&mut **tx)
        .await?;
        reservation_ids.extend(expired_candidates.iter().copied());
    }
    let upserting = commands
        .iter()
        .any(|c| matches!(c, Command::UpsertBudget(_)));
    let sql = if upserting {
        &*LOAD_BATCH_FOR_UPDATE
    } else {
        &*LOAD_BATCH_FOR_SHARE
    };
    let scope_ids: Vec<&str> = needs.scope_ids.iter().map(String::as_str).collect();
    let reservation_ids: Vec<Uuid> = reservation_ids.into_iter().collect();
    let tenant_ids: Vec<&str> = needs.tenant_ids.iter().map(String::as_str).collect();
    let budget_tenants: Vec<&str> = needs.budgets.iter().map(|k| k.tenant_id.as_str()).collect();
    let budget_ids: Vec<&str> = needs.budgets.iter().map(|k| k.budget_id.as_str()).collect();
    let pricing_tenants: Vec<&str> = needs.pricing.iter().map(|(t, _)| t.as_str()).collect();
    let pricing_versions: Vec<&str> = needs.pricing.iter().map(|(_, v)| v.as_str()).collect();
    let signing_key_ids: Vec<&str> = needs.signing_key_ids.iter().map(String::as_str).collect();
    let row = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(&scope_ids)
        .bind(&reservation_ids)
        .bind(&tenant_ids)
        .bind(&budget_tenants)
        .bind(&budget_ids)
        .bind(&pricing_tenants)
        .bind(&pricing_versions)
        .bind(&signing_key_ids)
        .fetch_one(&mut **tx)
        .await?;
    let mut snapshot = Snapshot {
        now: row.try_get("now")?,
        expired_candidates,
        ..Snapshot::default()
    };
    let Json(scopes): Json<Vec<ScopeJson>> = row.try_get("scopes")?;
    for s in scopes {
        let state = LeaseState {
            tenant_id: s.tenant_id,
            owner: s.owner_workload_id,
            epoch: epoch(s.epoch)?,
            expires_at: s.expires_at,
        };
        snapshot.scopes.insert(s.scope_id, state);
    }
    let existing_scopes = snapshot.scopes.keys().cloned().collect();
    let Json(reservations): Json<Vec<ReservationJson>> = row.try_get("reservations")?;
    for r in reservations {
        let reservation = reservation_from_json(r)?;
        snapshot.reservations.insert(reservation.id, reservation);
    }
    let Json(tenants): Json<Vec<TenantJson>> = row.try_get("tenants")?;
    for t in tenants {
        snapshot.tenants.insert(t.tenant_id, t.display_name);
    }
    let Json(budgets): Json<Vec<BudgetJson>> = row.try_get("budgets")?;
    for b in budgets {
        let key = BudgetKey {
            tenant_id: b.tenant_id,
            budget_id: b.budget_id,
        };
        if !needs.budgets.contains(&key) {
            continue; // Over-fetched by the per-column ANY predicates.
        }
        let window = BudgetWindow::parse(&b.window_kind)
            .ok_or_else(|| Error::Invariant(format!("unknown window kind {}", b.window_kind)))?;
        let soft_cap = b.soft_cap_nano_usd.map(money).transpose()?;
        snapshot.budgets.insert(
            key,
            BudgetRow {
                limit: money(b.limit_nano_usd)?,
                soft_cap,
                window,
            },
        );
    }
    let Json(pricing): Json<Vec<PricingJson>> = row.try_get("pricing")?;
    for p in pricing {
        let key = (p.tenant_id, p.version);
        if needs.pricing.contains(&key) {
            snapshot.pricing.insert(key, p.sha256_hex);
        }
    }
    let Json(signing_keys): Json<Vec<SigningKeyJson>> = row.try_get("signing_keys")?;
    for k in signing_keys {
        let public_key = hex::decode(&k.public_key_hex)
            .map_err(|e| Error::Invariant(format!("signing key {}: {e}", k.key_id)))?;
        snapshot.signing_keys.insert(
            k.key_id,
            SigningKeyRow {
                algorithm: k.algorithm,
                public_key,
                valid_from: k.valid_from,
                valid_until: k.valid_until,
                revoked_at: k.revoked_at,
            },
        );
    }
    let window_keys = windows_needed(commands, &snapshot);
    snapshot.windows = load_windows(tx, &window_keys, "FOR UPDATE").await?;
    load_approvals(tx, &needs, &mut snapshot).await?;
    load_fail_open_records(tx, &needs, &mut snapshot).await?;
    load_stop_records(tx, &needs, &mut snapshot).await?;
    load_lease_requests(tx, &needs, &mut snapshot).await?;
    load_retention_policies(tx, &needs, &mut snapshot).await?;
    Ok((snapshot, existing_scopes))
}

/// Retention policies the batch sets (an admin path with its own query), locked last.
async fn load_retention_policies(
    tx: &mut Transaction<'_, Postgres>,
    needs: &Needs,
    snapshot: &mut Snapshot,
) -> Result<()> {
    if needs.retention_tenant_ids.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = needs
        .retention_tenant_ids
        .iter()
        .map(String::as_str)
        .collect();
    let rows = sqlx::query(
        "SELECT tenant_id, audit_retention_days, redact_payloads_after_days, updated_at
           FROM retention_policies WHERE tenant_id = ANY($1) ORDER BY tenant_id FOR UPDATE",
    )
    .bind(&tenants)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let tenant_id: String = row.try_get("tenant_id")?;
        snapshot
            .retention_policies
            .insert(tenant_id, retention_from_row(row)?);
    }
    Ok(())
}

fn retention_from_row(row: &PgRow) -> Result<(RetentionPolicy, DateTime<Utc>)> {
    let days = |value: i32| {
        u32::try_from(value)
            .map_err(|_| Error::Invariant(format!("stored retention days {value} are negative")))
    };
    let redact: Option<i32> = row.try_get("redact_payloads_after_days")?;
    Ok((
        RetentionPolicy {
            audit_retention_days: days(row.try_get("audit_retention_days")?)?,
            redact_payloads_after_days: redact.map(days).transpose()?,
        },
        row.try_get("updated_at")?,
    ))
}

/// Approvals the batch names, and pending ones past their expiry when it sweeps: a separate
/// query (approvals are rare; the hot path's load statement stays as it is), locked last in the
/// lock order, sorted by id. Sweep candidates are taken after the named ones, with SKIP LOCKED,
/// which never waits: a candidate held while the batch waits for a named approval could be the
/// one the holder of that approval waits for next.
async fn load_approvals(
    tx: &mut Transaction<'_, Postgres>,
    needs: &Needs,
    snapshot: &mut Snapshot,
) -> Result<()> {
    let mut ids: BTreeSet<Uuid> = needs.approval_ids.clone();
    if needs.sweep_max > 0 {
        if !ids.is_empty() {
            let named: Vec<Uuid> = ids.iter().copied().collect();
            sqlx::query(
                "SELECT 1 FROM approvals WHERE approval_id = ANY($1) ORDER BY approval_id FOR UPDATE",
            )
            .bind(&named)
            .execute(&mut **tx)
            .await?;
        }
        snapshot.expired_approval_candidates = sqlx::query_scalar(
            "SELECT approval_id FROM approvals WHERE state = 'pending' AND expires_at <= now()
             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(needs.sweep_max))
        .fetch_all(&mut **tx)
        .await?;
        ids.extend(snapshot.expired_approval_candidates.iter().copied());
    }
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let rows = sqlx::query(
        "SELECT approval_id, tenant_id, idempotency_key, request_sha256, budget_ids, budget_id,
                amount_nano_usd, context, fencing_scope_id, fencing_epoch, created_at, expires_at,
                state, resolved_by, resolved_at, resolution_reason
           FROM approvals WHERE approval_id = ANY($1) ORDER BY approval_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let approval = approval_from_row(row)?;
        snapshot.approvals.insert(approval.id, approval);
    }
    Ok(())
}

/// Fail-open records the batch names (a rare path with its own query), locked last, by id.
async fn load_fail_open_records(
    tx: &mut Transaction<'_, Postgres>,
    needs: &Needs,
    snapshot: &mut Snapshot,
) -> Result<()> {
    if needs.fail_open_ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = needs.fail_open_ids.iter().copied().collect();
    let rows = sqlx::query(
        "SELECT record_id, tenant_id, call_id, request_sha256, budget_ids, window_starts,
                actual_nano_usd, fencing_scope_id, fencing_epoch, epoch_current, decided_at,
                recorded_at
           FROM fail_open_records WHERE record_id = ANY($1) ORDER BY record_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let record = fail_open_from_row(row)?;
        snapshot.fail_open_records.insert(record.id, record);
    }
    Ok(())
}

/// The acquires recorded with the request ids the batch's acquires carry (an admin path with
/// its own query; their scopes are locked already, and only an acquire under that lock writes
/// a history row).
async fn load_lease_requests(
    tx: &mut Transaction<'_, Postgres>,
    needs: &Needs,
    snapshot: &mut Snapshot,
) -> Result<()> {
    if needs.lease_requests.is_empty() {
        return Ok(());
    }
    let (scopes, ids): (Vec<&str>, Vec<&str>) = needs
        .lease_requests
        .iter()
        .map(|(scope, id)| (scope.as_str(), id.as_str()))
        .unzip();
    let rows = sqlx::query(
        "SELECT e.scope_id, e.request_id, e.request_sha256, e.tenant_id, e.workload_instance_id,
                e.outcome, e.previous_epoch, e.epoch, e.expires_at
           FROM fencing_scope_events e
           JOIN unnest($1::text[], $2::text[]) AS k(scope_id, request_id)
             ON e.scope_id = k.scope_id AND e.request_id = k.request_id",
    )
    .bind(&scopes)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let outcome: String = row.try_get("outcome")?;
        let grant = LeaseGrant {
            outcome: LeaseOutcome::parse(&outcome)
                .ok_or_else(|| Error::Invariant(format!("unknown lease outcome {outcome}")))?,
            previous_epoch: epoch(row.try_get("previous_epoch")?)?,
            state: LeaseState {
                tenant_id: row.try_get("tenant_id")?,
                owner: row.try_get("workload_instance_id")?,
                epoch: epoch(row.try_get("epoch")?)?,
                expires_at: row.try_get("expires_at")?,
            },
        };
        snapshot.lease_requests.insert(
            (row.try_get("scope_id")?, row.try_get("request_id")?),
            RecordedAcquire {
                request_sha256: row.try_get("request_sha256")?,
                grant,
            },
        );
    }
    Ok(())
}

/// Stop records the batch names (a rare path with its own query), by id. Not locked: a row is
/// immutable, and a concurrent insert of the same id fails this batch on the primary key.
async fn load_stop_records(
    tx: &mut Transaction<'_, Postgres>,
    needs: &Needs,
    snapshot: &mut Snapshot,
) -> Result<()> {
    if needs.stop_ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = needs.stop_ids.iter().copied().collect();
    let rows = sqlx::query(
        "SELECT record_id, tenant_id, call_id, reason, stop_count, request_sha256
           FROM stop_records WHERE record_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let count: i64 = row.try_get("stop_count")?;
        let record = StopRow {
            id: row.try_get("record_id")?,
            tenant_id: row.try_get("tenant_id")?,
            call_id: row.try_get("call_id")?,
            reason: row.try_get("reason")?,
            count: u64::try_from(count)
                .map_err(|_| Error::Invariant("negative stop count".into()))?,
            fingerprint: row.try_get("request_sha256")?,
        };
        snapshot.stop_records.insert(record.id, record);
    }
    Ok(())
}

fn fail_open_from_row(row: &PgRow) -> Result<FailOpenRow> {
    let tenant_id: String = row.try_get("tenant_id")?;
    let budget_ids: Vec<String> = row.try_get("budget_ids")?;
    let starts: Vec<DateTime<Utc>> = row.try_get("window_starts")?;
    if budget_ids.len() != starts.len() {
        return Err(Error::Invariant(
            "fail-open record windows do not match its budgets".into(),
        ));
    }
    let windows = budget_ids
        .into_iter()
        .zip(starts)
        .map(|(budget_id, start)| WindowKey {
            budget: BudgetKey {
                tenant_id: tenant_id.clone(),
                budget_id,
            },
            start,
        })
        .collect();
    Ok(FailOpenRow {
        id: row.try_get("record_id")?,
        tenant_id,
        call_id: row.try_get("call_id")?,
        fingerprint: row.try_get("request_sha256")?,
        windows,
        actual: money(row.try_get("actual_nano_usd")?)?,
        fencing_scope_id: row.try_get("fencing_scope_id")?,
        fencing_epoch: epoch(row.try_get("fencing_epoch")?)?,
        epoch_current: epoch(row.try_get("epoch_current")?)?,
        decided_at: row.try_get("decided_at")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

fn approval_from_row(row: &PgRow) -> Result<ApprovalRow> {
    let state: String = row.try_get("state")?;
    let state = ApprovalState::parse(&state)
        .ok_or_else(|| Error::Invariant(format!("unknown approval state {state}")))?;
    let Json(context): Json<ApprovalContext> = row.try_get("context")?;
    Ok(ApprovalRow {
        id: row.try_get("approval_id")?,
        tenant_id: row.try_get("tenant_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        fingerprint: row.try_get("request_sha256")?,
        budget_ids: row.try_get("budget_ids")?,
        budget_id: row.try_get("budget_id")?,
        amount: money(row.try_get("amount_nano_usd")?)?,
        context,
        fencing_scope_id: row.try_get("fencing_scope_id")?,
        fencing_epoch: epoch(row.try_get("fencing_epoch")?)?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        state,
        resolved_by: row.try_get("resolved_by")?,
        resolved_at: row.try_get("resolved_at")?,
        resolution_reason: row.try_get("resolution_reason")?,
    })
}

static LOAD_BATCH_FOR_SHARE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    include_str!("store/load_batch.sql").replace("{budget_lock}", "FOR SHARE")
});
static LOAD_BATCH_FOR_UPDATE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    include_str!("store/load_batch.sql").replace("{budget_lock}", "FOR UPDATE")
});

fn reservation_from_json(r: ReservationJson) -> Result<ReservationRow> {
    let windows = r
        .budget_ids
        .into_iter()
        .zip(r.window_starts)
        .map(|(budget_id, start)| WindowKey {
            budget: BudgetKey {
                tenant_id: r.tenant_id.clone(),
                budget_id,
            },
            start,
        })
        .collect();
    let state = ReservationState::parse(&r.state)
        .ok_or_else(|| Error::Invariant(format!("unknown reservation state {}", r.state)))?;
    let resolution = match state {
        ReservationState::Reserved => None,
        state => Some(Resolution {
            state,
            actual: money(r.actual_nano_usd.unwrap_or(0))?,
            committed: money(r.committed_nano_usd.unwrap_or(0))?,
            released: money(r.released_nano_usd.unwrap_or(0))?,
            overrun: money(r.overrun_nano_usd.unwrap_or(0))?,
            epoch: epoch(r.resolved_epoch.unwrap_or(0))?,
        }),
    };
    Ok(ReservationRow {
        id: r.reservation_id,
        tenant_id: r.tenant_id,
        idempotency_key: r.idempotency_key,
        fingerprint: r.request_sha256,
        windows,
        amount: money(r.amount_nano_usd)?,
        fencing_scope_id: r.fencing_scope_id,
        fencing_epoch: epoch(r.fencing_epoch)?,
        expires_at: r.expires_at,
        resolution,
        is_credit: r.is_credit,
        drawn: money(r.drawn_nano_usd)?,
        drawn_from: r.drawn_from_reservation_id,
    })
}

async fn load_budgets(
    tx: &mut Transaction<'_, Postgres>,
    keys: &BTreeSet<BudgetKey>,
) -> Result<BTreeMap<BudgetKey, BudgetRow>> {
    let mut budgets = BTreeMap::new();
    if keys.is_empty() {
        return Ok(budgets);
    }
    let (tenants, ids): (Vec<String>, Vec<String>) = keys
        .iter()
        .map(|k| (k.tenant_id.clone(), k.budget_id.clone()))
        .unzip();
    // Read-only (GetBalances); batches read budgets under lock in load_batch.sql.
    let rows = sqlx::query(
        "SELECT tenant_id, budget_id, limit_nano_usd, soft_cap_nano_usd, window_kind FROM budgets
          WHERE tenant_id = ANY($1) AND budget_id = ANY($2)",
    )
    .bind(&tenants)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    for row in rows {
        let window_name: String = row.try_get("window_kind")?;
        let window = BudgetWindow::parse(&window_name)
            .ok_or_else(|| Error::Invariant(format!("unknown window kind {window_name}")))?;
        let soft_cap: Option<i64> = row.try_get("soft_cap_nano_usd")?;
        budgets.insert(
            BudgetKey {
                tenant_id: row.try_get("tenant_id")?,
                budget_id: row.try_get("budget_id")?,
            },
            BudgetRow {
                limit: money(row.try_get("limit_nano_usd")?)?,
                soft_cap: soft_cap.map(money).transpose()?,
                window,
            },
        );
    }
    Ok(budgets)
}

async fn load_windows(
    tx: &mut Transaction<'_, Postgres>,
    keys: &BTreeSet<WindowKey>,
    lock: &str,
) -> Result<BTreeMap<WindowKey, WindowRow>> {
    let mut windows = BTreeMap::new();
    if keys.is_empty() {
        return Ok(windows);
    }
    let mut tenants = Vec::with_capacity(keys.len());
    let mut ids = Vec::with_capacity(keys.len());
    let mut starts = Vec::with_capacity(keys.len());
    for key in keys {
        tenants.push(key.budget.tenant_id.clone());
        ids.push(key.budget.budget_id.clone());
        starts.push(key.start);
    }
    let sql = format!(
        "SELECT tenant_id, budget_id, window_start, limit_nano_usd, reserved_nano_usd,
                committed_nano_usd, overrun_nano_usd
           FROM budget_windows
          WHERE tenant_id = ANY($1) AND budget_id = ANY($2) AND window_start = ANY($3)
          ORDER BY tenant_id, budget_id, window_start {lock}"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&tenants)
        .bind(&ids)
        .bind(&starts)
        .fetch_all(&mut **tx)
        .await?;
    for row in rows {
        let key = WindowKey {
            budget: BudgetKey {
                tenant_id: row.try_get("tenant_id")?,
                budget_id: row.try_get("budget_id")?,
            },
            start: row.try_get("window_start")?,
        };
        if !keys.contains(&key) {
            continue; // Over-fetched by the per-column ANY predicates.
        }
        windows.insert(
            key,
            WindowRow {
                limit: money(row.try_get("limit_nano_usd")?)?,
                reserved: money(row.try_get("reserved_nano_usd")?)?,
                committed: money(row.try_get("committed_nano_usd")?)?,
                overrun: money(row.try_get("overrun_nano_usd")?)?,
            },
        );
    }
    Ok(windows)
}

// === Writing ===

/// Rows of the batch that existed when it loaded (updated, not inserted).
struct Existing<'a> {
    scopes: &'a BTreeSet<String>,
    signing_keys: &'a BTreeSet<String>,
}

/// Writes the batch and returns the producer's next sequence after it.
async fn write(
    tx: &mut Transaction<'_, Postgres>,
    cursor: &ProducerCursor,
    now: DateTime<Utc>,
    existing: &Existing<'_>,
    effects: &Effects,
    signer: Option<&EventSigner>,
) -> Result<u64> {
    // Rare paths (admin, leases, first use of a window) get their own statements...
    write_tenants_and_budgets(tx, existing.signing_keys, effects).await?;
    write_leases(tx, existing.scopes, effects).await?;
    write_approvals(tx, effects).await?;
    write_retention_policies(tx, effects).await?;
    // Before the journal: the overrun entries name these records.
    write_fail_open_records(tx, effects).await?;
    write_stop_records(tx, now, effects).await?;
    // Before any resolution of the same credits in the hot path's statement (one statement
    // cannot update a row twice).
    write_credit_draws(tx, effects).await?;
    write_late_usage(tx, effects).await?;
    // ...the hot path is one statement.
    let next_sequence = write_money_and_outbox(tx, cursor, now, effects, signer).await?;
    // After the reservations they name.
    write_approval_uses(tx, effects).await?;
    Ok(next_sequence)
}

/// Usage committed after a reservation expired in an earlier transaction, on its expired row,
/// with the committing epoch as its resolved epoch (the load path only:
/// `Effects::only_moves_money`). The row must still be a plain expiry (no usage, no resolved
/// epoch); the resolve-once trigger allows exactly this one change of an expired row.
async fn write_late_usage(tx: &mut Transaction<'_, Postgres>, effects: &Effects) -> Result<()> {
    if effects.late_usage.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(effects.late_usage.len());
    let mut actual = Vec::with_capacity(effects.late_usage.len());
    let mut epochs = Vec::with_capacity(effects.late_usage.len());
    for (id, amount, epoch) in &effects.late_usage {
        ids.push(*id);
        actual.push(amount.get());
        epochs.push(to_i64(*epoch)?);
    }
    let updated = sqlx::query(
        "UPDATE reservations r
            SET actual_nano_usd = u.actual, overrun_nano_usd = u.actual, resolved_epoch = u.epoch
           FROM unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS u(id, actual, epoch)
          WHERE r.reservation_id = u.id AND r.reservation_id = ANY($1)
            AND r.state = 'expired' AND r.resolved_epoch IS NULL
            AND r.actual_nano_usd = 0 AND r.overrun_nano_usd = 0",
    )
    .bind(&ids)
    .bind(&actual)
    .bind(&epochs)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if updated != ids.len() as u64 {
        return Err(Error::Invariant(format!(
            "late usage: {updated} of {} expired reservations still carried no usage",
            ids.len()
        )));
    }
    Ok(())
}

/// Credits' new drawn totals, on the load path (whose rows are locked, so the totals are exact;
/// the cached path writes them in its own statement, `store/effects_credit_draws.sql`).
async fn write_credit_draws(tx: &mut Transaction<'_, Postgres>, effects: &Effects) -> Result<()> {
    if effects.credit_draws.is_empty() {
        return Ok(());
    }
    let (ids, drawn): (Vec<Uuid>, Vec<i64>) = effects
        .credit_draws
        .iter()
        .map(|(id, drawn)| (*id, drawn.get()))
        .unzip();
    let updated = sqlx::query(
        "UPDATE reservations r SET drawn_nano_usd = u.drawn
           FROM unnest($1::uuid[], $2::bigint[]) AS u(id, drawn)
          WHERE r.reservation_id = u.id AND r.reservation_id = ANY($1) AND r.is_credit",
    )
    .bind(&ids)
    .bind(&drawn)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if u64::try_from(ids.len()).ok() != Some(updated) {
        return Err(Error::Invariant(format!(
            "{updated} of {} credits found to draw from",
            ids.len()
        )));
    }
    Ok(())
}

async fn write_tenants_and_budgets(
    tx: &mut Transaction<'_, Postgres>,
    existing_keys: &BTreeSet<String>,
    effects: &Effects,
) -> Result<()> {
    if !effects.tenants.is_empty() {
        let (ids, names): (Vec<String>, Vec<String>) = effects
            .tenants
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unzip();
        sqlx::query(
            "INSERT INTO tenants (tenant_id, display_name) SELECT * FROM unnest($1::text[], $2::text[])
             ON CONFLICT (tenant_id) DO UPDATE SET display_name = EXCLUDED.display_name, updated_at = now()",
        )
        .bind(&ids)
        .bind(&names)
        .execute(&mut **tx)
        .await?;
    }
    if !effects.pricing.is_empty() {
        let mut tenants = Vec::new();
        let mut versions = Vec::new();
        let mut hashes = Vec::new();
        for ((tenant, version), sha) in &effects.pricing {
            tenants.push(tenant.as_str());
            versions.push(version.as_str());
            hashes.push(sha.as_str());
        }
        sqlx::query(
            "INSERT INTO pricing_registrations (tenant_id, version, sha256_hex)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
        )
        .bind(&tenants)
        .bind(&versions)
        .bind(&hashes)
        .execute(&mut **tx)
        .await?;
    }
    for (key_id, key) in &effects.signing_keys {
        // A plain INSERT for a new key: if another replica registered it first, the primary key
        // fails this batch instead of recording a second `signing_key.registered`. Updates are
        // re-checked by the table's trigger (only the end and an earlier revocation change).
        let sql = if existing_keys.contains(key_id) {
            "UPDATE signing_keys SET valid_until = $5, revoked_at = $6
              WHERE key_id = $1 AND algorithm = $2 AND public_key = $3 AND valid_from = $4"
        } else {
            "INSERT INTO signing_keys (key_id, algorithm, public_key, valid_from, valid_until, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6)"
        };
        sqlx::query(sql)
            .bind(key_id)
            .bind(&key.algorithm)
            .bind(&key.public_key)
            .bind(key.valid_from)
            .bind(key.valid_until)
            .bind(key.revoked_at)
            .execute(&mut **tx)
            .await?;
    }
    if !effects.budgets.is_empty() {
        let mut tenants = Vec::new();
        let mut ids = Vec::new();
        let mut limits = Vec::new();
        let mut soft_caps: Vec<Option<i64>> = Vec::new();
        let mut kinds = Vec::new();
        for (key, budget) in &effects.budgets {
            tenants.push(key.tenant_id.clone());
            ids.push(key.budget_id.clone());
            limits.push(budget.limit.get());
            soft_caps.push(budget.soft_cap.map(NanoUsd::get));
            kinds.push(budget.window.as_str().to_owned());
        }
        sqlx::query(
            "INSERT INTO budgets (tenant_id, budget_id, limit_nano_usd, soft_cap_nano_usd, window_kind)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[])
             ON CONFLICT (tenant_id, budget_id) DO UPDATE
                SET limit_nano_usd = EXCLUDED.limit_nano_usd, soft_cap_nano_usd = EXCLUDED.soft_cap_nano_usd,
                    window_kind = EXCLUDED.window_kind, updated_at = now()",
        )
        .bind(&tenants)
        .bind(&ids)
        .bind(&limits)
        .bind(&soft_caps)
        .bind(&kinds)
        .execute(&mut **tx)
        .await?;
    }
    if !effects.new_windows.is_empty() {
        let mut tenants = Vec::new();
        let mut ids = Vec::new();
        let mut starts = Vec::new();
        for key in &effects.new_windows {
            tenants.push(key.budget.tenant_id.clone());
            ids.push(key.budget.budget_id.clone());
            starts.push(key.start);
        }
        // A plain INSERT: if another replica opened the same window first, the unique key fails
        // this batch (and its commands are retried singly) instead of silently sharing the row.
        sqlx::query(
            "INSERT INTO budget_windows (tenant_id, budget_id, window_start)
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])",
        )
        .bind(&tenants)
        .bind(&ids)
        .bind(&starts)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn write_leases(
    tx: &mut Transaction<'_, Postgres>,
    existing_scopes: &BTreeSet<String>,
    effects: &Effects,
) -> Result<()> {
    for (scope_id, lease) in &effects.leases {
        let sql = if existing_scopes.contains(scope_id) {
            "UPDATE fencing_scopes SET owner_workload_id = $3, epoch = $4, expires_at = $5, updated_at = now()
              WHERE scope_id = $1 AND tenant_id = $2"
        } else {
            "INSERT INTO fencing_scopes (scope_id, tenant_id, owner_workload_id, epoch, expires_at)
             VALUES ($1, $2, $3, $4, $5)"
        };
        sqlx::query(sql)
            .bind(scope_id)
            .bind(&lease.tenant_id)
            .bind(&lease.owner)
            .bind(to_i64(lease.epoch)?)
            .bind(lease.expires_at)
            .execute(&mut **tx)
            .await?;
    }
    for event in &effects.lease_events {
        let grant = &event.grant;
        let (request_id, request_sha256) = event
            .request
            .as_ref()
            .map(|(id, sha)| (id.as_str(), sha.as_str()))
            .unzip();
        sqlx::query(
            "INSERT INTO fencing_scope_events
                (scope_id, tenant_id, workload_instance_id, outcome, previous_epoch, epoch, expires_at,
                 request_id, request_sha256)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&event.scope_id)
        .bind(&grant.state.tenant_id)
        .bind(&grant.state.owner)
        .bind(grant.outcome.as_str())
        .bind(to_i64(grant.previous_epoch)?)
        .bind(to_i64(grant.state.epoch)?)
        .bind(grant.state.expires_at)
        .bind(request_id)
        .bind(request_sha256)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn write_retention_policies(
    tx: &mut Transaction<'_, Postgres>,
    effects: &Effects,
) -> Result<()> {
    let days = |value: u32| {
        i32::try_from(value).map_err(|_| Error::Invariant(format!("{value} days exceed i32")))
    };
    for (tenant_id, policy) in &effects.retention_policies {
        sqlx::query(
            "INSERT INTO retention_policies (tenant_id, audit_retention_days, redact_payloads_after_days)
             VALUES ($1, $2, $3)
             ON CONFLICT (tenant_id) DO UPDATE
                SET audit_retention_days = EXCLUDED.audit_retention_days,
                    redact_payloads_after_days = EXCLUDED.redact_payloads_after_days,
                    updated_at = now()",
        )
        .bind(tenant_id)
        .bind(days(policy.audit_retention_days)?)
        .bind(policy.redact_payloads_after_days.map(days).transpose()?)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// One row per reservation made under an approval: the table's keys hold one reservation per
/// approval even if the planner's check were wrong.
async fn write_approval_uses(tx: &mut Transaction<'_, Postgres>, effects: &Effects) -> Result<()> {
    if effects.approval_uses.is_empty() {
        return Ok(());
    }
    let (approvals, reservations): (Vec<Uuid>, Vec<Uuid>) =
        effects.approval_uses.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO approval_uses (approval_id, reservation_id)
         SELECT * FROM unnest($1::uuid[], $2::uuid[])",
    )
    .bind(&approvals)
    .bind(&reservations)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Approvals created or resolved by the batch, one statement each (a rare path, so the hot
/// statement is untouched). A plain INSERT for a new approval: if another replica created it
/// first, the primary key fails this batch instead of writing a second `approval.created`.
/// The table's trigger re-checks that a resolution leaves `pending` once and changes nothing else.
async fn write_approvals(tx: &mut Transaction<'_, Postgres>, effects: &Effects) -> Result<()> {
    for (id, a) in &effects.approvals {
        if effects.new_approval_ids.contains(id) {
            let context = serde_json::to_value(&a.context)
                .map_err(|e| Error::Invariant(format!("approval context: {e}")))?;
            sqlx::query(
                "INSERT INTO approvals (approval_id, tenant_id, idempotency_key, request_sha256,
                     budget_ids, budget_id, amount_nano_usd, context, fencing_scope_id, fencing_epoch,
                     created_at, expires_at, state, resolved_by, resolved_at, resolution_reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            )
            .bind(id)
            .bind(&a.tenant_id)
            .bind(&a.idempotency_key)
            .bind(&a.fingerprint)
            .bind(&a.budget_ids)
            .bind(&a.budget_id)
            .bind(a.amount.get())
            .bind(Json(context))
            .bind(&a.fencing_scope_id)
            .bind(to_i64(a.fencing_epoch)?)
            .bind(a.created_at)
            .bind(a.expires_at)
            .bind(a.state.as_str())
            .bind(&a.resolved_by)
            .bind(a.resolved_at)
            .bind(&a.resolution_reason)
            .execute(&mut **tx)
            .await?;
        } else {
            let updated = sqlx::query(
                "UPDATE approvals SET state = $2, resolved_by = $3, resolved_at = $4,
                        resolution_reason = $5
                  WHERE approval_id = $1 AND state = 'pending'",
            )
            .bind(id)
            .bind(a.state.as_str())
            .bind(&a.resolved_by)
            .bind(a.resolved_at)
            .bind(&a.resolution_reason)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Err(Error::Invariant(format!(
                    "approval {id} was not pending when resolved"
                )));
            }
        }
    }
    Ok(())
}

/// Fail-open records, one plain INSERT each (a rare path): if another replica recorded the same
/// call first, the primary key fails this batch instead of writing a second `decision.fail_open`.
async fn write_fail_open_records(
    tx: &mut Transaction<'_, Postgres>,
    effects: &Effects,
) -> Result<()> {
    for f in &effects.fail_open_records {
        let budget_ids: Vec<&str> = f
            .windows
            .iter()
            .map(|w| w.budget.budget_id.as_str())
            .collect();
        let starts: Vec<DateTime<Utc>> = f.windows.iter().map(|w| w.start).collect();
        sqlx::query(
            "INSERT INTO fail_open_records (record_id, tenant_id, call_id, request_sha256,
                 budget_ids, window_starts, actual_nano_usd, fencing_scope_id, fencing_epoch,
                 epoch_current, decided_at, recorded_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(f.id)
        .bind(&f.tenant_id)
        .bind(&f.call_id)
        .bind(&f.fingerprint)
        .bind(&budget_ids)
        .bind(&starts)
        .bind(f.actual.get())
        .bind(&f.fencing_scope_id)
        .bind(to_i64(f.fencing_epoch)?)
        .bind(to_i64(f.epoch_current)?)
        .bind(f.decided_at)
        .bind(f.recorded_at)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Stop records, one statement for the batch. If another replica wrote one of them first, the
/// primary key fails this batch instead of writing a second event.
async fn write_stop_records(
    tx: &mut Transaction<'_, Postgres>,
    now: DateTime<Utc>,
    effects: &Effects,
) -> Result<()> {
    if effects.stop_records.is_empty() {
        return Ok(());
    }
    let (mut ids, mut tenants, mut fingerprints) = (Vec::new(), Vec::new(), Vec::new());
    let (mut call_ids, mut reasons, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for r in &effects.stop_records {
        ids.push(r.id);
        tenants.push(r.tenant_id.as_str());
        fingerprints.push(r.fingerprint.as_str());
        call_ids.push(r.call_id.as_deref());
        reasons.push(r.reason.as_str());
        counts.push(to_i64(r.count)?);
    }
    sqlx::query(
        "INSERT INTO stop_records (record_id, tenant_id, call_id, reason, stop_count,
             request_sha256, recorded_at)
         SELECT *, $7::timestamptz FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],
             $5::bigint[], $6::text[])",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&call_ids)
    .bind(&reasons)
    .bind(&counts)
    .bind(&fingerprints)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Reservations, resolutions, journal entries, the producer sequence compare-and-set and the
/// outbox, in one statement: one round trip for the whole hot path of a batch.
async fn write_money_and_outbox(
    tx: &mut Transaction<'_, Postgres>,
    cursor: &ProducerCursor,
    now: DateTime<Utc>,
    effects: &Effects,
    signer: Option<&EventSigner>,
) -> Result<u64> {
    let params = EffectParams::of(cursor, now, effects, signer).await?;
    let allocated: i64 = params
        .bind(sqlx::query_scalar(sqlx::AssertSqlSafe(
            WRITE_BATCH.as_str(),
        )))
        .fetch_one(&mut **tx)
        .await?;
    if allocated != 1 {
        // Someone else owns the id now, or our view of the sequence is stale: roll back.
        return Err(Error::ProducerSequenceMoved(
            cursor.claim.producer_instance_id.clone(),
        ));
    }
    Ok(params.next_sequence)
}

const EFFECTS_NEW_RESERVATIONS: &str = include_str!("store/effects_new_reservations.sql");
const EFFECTS_RESOLUTIONS: &str = include_str!("store/effects_resolutions.sql");
const EFFECTS_JOURNAL: &str = include_str!("store/effects_journal.sql");
const EFFECTS_CREDIT_DRAWS: &str = include_str!("store/effects_credit_draws.sql");

/// The write path's statement: the effects and the producer check.
static WRITE_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH {EFFECTS_NEW_RESERVATIONS},\n{EFFECTS_RESOLUTIONS},\n{EFFECTS_JOURNAL}\nSELECT count(*) FROM allocated"
    )
});

/// Which of a batch's effects its cached statement carries. A data-modifying CTE costs its
/// executor set-up (and its table's statement triggers) even when it writes no row, and at
/// moderate rates most batches are a single reserve or a single commit; a statement without the
/// part it has nothing for is measurably cheaper. The left-out part's parameters must be empty,
/// which the statement checks, so a wrong choice fails the batch instead of dropping effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedShape {
    /// New reservations, no resolutions.
    Reserves = 0,
    /// Resolutions, no new reservations.
    Resolutions = 1,
    /// Both.
    Mixed = 2,
    /// Draws from credits, with any new reservations and resolutions.
    Draws = 3,
}

impl CachedShape {
    fn of(effects: &EffectParams, credits: &CreditDraws) -> Self {
        if !credits.ids.is_empty() {
            return Self::Draws;
        }
        let reserves = effects
            .new_reservations
            .as_array()
            .is_some_and(|a| !a.is_empty());
        match (reserves, effects.resolved_ids.is_empty()) {
            (true, true) => Self::Reserves,
            (false, false) => Self::Resolutions,
            _ => Self::Mixed,
        }
    }
}

/// The cached path's statements, one per [`CachedShape`] in its order: the guard, the effects,
/// and one check of everything, which fails the statement (so nothing of the batch is written)
/// unless the batch was planned on fresh rows.
static CACHED_BATCHES: std::sync::LazyLock<[String; 4]> = std::sync::LazyLock::new(|| {
    let statement = |effects: String, resolutions_checked: &str| {
        format!(
            "WITH {},\n{effects}\nSELECT spendguard_require_fresh(
            (SELECT count(*) FROM guard_scopes) = cardinality($33::text[])
            AND (SELECT count(*) FROM guard_reservations WHERE state = 'reserved')
                = cardinality(ARRAY(SELECT DISTINCT unnest($52::uuid[])))
            AND (SELECT count(*) FROM guard_budgets) = cardinality($38::text[])
            AND (SELECT count(*) FROM guard_windows) = cardinality($43::text[])
            AND {resolutions_checked}
            AND (SELECT count(*) FROM allocated) = 1
            AND NOT EXISTS (SELECT 1 FROM reservations WHERE reservation_id = ANY($51::uuid[]))
            AND abs(extract(epoch FROM now() - $2::timestamptz)) * 1000 < $50)",
            include_str!("store/fast_guard.sql"),
        )
    };
    let resolved = "(SELECT count(*) FROM resolutions) = cardinality($3::uuid[])";
    let no_draws = "cardinality($53::uuid[]) = 0";
    [
        statement(
            format!("{EFFECTS_NEW_RESERVATIONS},\n{EFFECTS_JOURNAL}"),
            &format!("cardinality($3::uuid[]) = 0 AND {no_draws}"),
        ),
        statement(
            format!("{EFFECTS_RESOLUTIONS},\n{EFFECTS_JOURNAL}"),
            &format!("{resolved} AND jsonb_array_length($1::jsonb) = 0 AND {no_draws}"),
        ),
        statement(
            format!("{EFFECTS_NEW_RESERVATIONS},\n{EFFECTS_RESOLUTIONS},\n{EFFECTS_JOURNAL}"),
            &format!("{resolved} AND {no_draws}"),
        ),
        statement(
            format!(
                "{EFFECTS_NEW_RESERVATIONS},\n{EFFECTS_RESOLUTIONS},\n{EFFECTS_CREDIT_DRAWS},\n{EFFECTS_JOURNAL}"
            ),
            &format!(
                "{resolved} AND (SELECT count(*) FROM credit_draws) = cardinality($53::uuid[])"
            ),
        ),
    ]
});

type ScalarQuery<'q, O> = sqlx::query::QueryScalar<'q, Postgres, O, sqlx::postgres::PgArguments>;

/// The bound parameters ($1–$32) of a batch's effects (`store/effects_*.sql`), with every event signed.
struct EffectParams {
    now: DateTime<Utc>,
    new_reservations: serde_json::Value,
    resolved_ids: Vec<Uuid>,
    resolved_states: Vec<&'static str>,
    resolved_epochs: Vec<Option<i64>>,
    resolved_money: [Vec<i64>; 4],
    e_tenants: Vec<String>,
    e_budgets: Vec<String>,
    e_starts: Vec<DateTime<Utc>>,
    e_reservations: Vec<Option<Uuid>>,
    e_kinds: Vec<&'static str>,
    e_deltas: [Vec<i64>; 4],
    producer_instance_id: String,
    claim_token: Uuid,
    first_sequence: i64,
    next_sequence: u64,
    /// `next_sequence` as bound ($22).
    next_sequence_param: i64,
    sequences: Vec<i64>,
    o_tenants: Vec<String>,
    o_types: Vec<&'static str>,
    o_bytes: Vec<Vec<u8>>,
    o_hashes: Vec<Vec<u8>>,
    s_keys: Vec<Option<String>>,
    s_algorithms: Vec<Option<&'static str>>,
    s_times: Vec<Option<DateTime<Utc>>>,
    s_signatures: Vec<Option<Vec<u8>>>,
    /// Each event's place in its batch signature ([`spendguard_evidence::Inclusion`]).
    s_inclusions: Vec<Option<Vec<u8>>>,
}

impl EffectParams {
    async fn of(
        cursor: &ProducerCursor,
        now: DateTime<Utc>,
        effects: &Effects,
        signer: Option<&EventSigner>,
    ) -> Result<Self> {
        let new_reservations: Vec<serde_json::Value> = effects
            .new_reservations
            .iter()
            .map(|r| {
                let resolution = r.resolution;
                let mut row = serde_json::json!({
                    "reservation_id": r.id,
                    "tenant_id": r.tenant_id,
                    "idempotency_key": r.idempotency_key,
                    "request_sha256": r.fingerprint,
                    "budget_ids": r.windows.iter().map(|w| &w.budget.budget_id).collect::<Vec<_>>(),
                    "window_starts": r.windows.iter().map(|w| format_time(w.start)).collect::<Vec<_>>(),
                    "amount_nano_usd": r.amount.get(),
                    "fencing_scope_id": r.fencing_scope_id,
                    "fencing_epoch": r.fencing_epoch,
                    "expires_at": format_time(r.expires_at),
                    "state": r.state().as_str(),
                    "resolved_epoch": resolution.and_then(|x| (x.epoch != 0).then_some(x.epoch)),
                    "actual": resolution.map(|x| x.actual.get()),
                    "committed": resolution.map(|x| x.committed.get()),
                    "released": resolution.map(|x| x.released.get()),
                    "overrun": resolution.map(|x| x.overrun.get()),
                });
                // Credit members only where they apply: the hot path's rows stay as small.
                if r.is_credit {
                    row["is_credit"] = true.into();
                    row["drawn"] = r.drawn.get().into();
                }
                if let Some(credit) = r.drawn_from {
                    row["drawn_from"] = credit.to_string().into();
                }
                row
            })
            .collect();

        let mut resolved_ids = Vec::new();
        let mut resolved_states = Vec::new();
        let mut resolved_epochs: Vec<Option<i64>> = Vec::new();
        let mut resolved_money: [Vec<i64>; 4] = Default::default();
        for (id, r) in &effects.resolutions {
            resolved_ids.push(*id);
            resolved_states.push(r.state.as_str());
            resolved_epochs.push(if r.epoch == 0 {
                None
            } else {
                Some(to_i64(r.epoch)?)
            });
            for (column, amount) in
                resolved_money
                    .iter_mut()
                    .zip([r.actual, r.committed, r.released, r.overrun])
            {
                column.push(amount.get());
            }
        }

        let n = effects.entries.len();
        let mut e_tenants = Vec::with_capacity(n);
        let mut e_budgets = Vec::with_capacity(n);
        let mut e_starts = Vec::with_capacity(n);
        let mut e_reservations: Vec<Option<Uuid>> = Vec::with_capacity(n);
        let mut e_kinds = Vec::with_capacity(n);
        let mut e_deltas: [Vec<i64>; 4] = Default::default();
        for e in &effects.entries {
            e_tenants.push(e.window.budget.tenant_id.clone());
            e_budgets.push(e.window.budget.budget_id.clone());
            e_starts.push(e.window.start);
            e_reservations.push(e.reservation_id);
            e_kinds.push(e.kind.as_str());
            for (column, delta) in e_deltas.iter_mut().zip([
                e.limit_delta,
                e.reserved_delta,
                e.committed_delta,
                e.overrun_delta,
            ]) {
                column.push(delta);
            }
        }

        let first = cursor.next_sequence;
        let count = u64::try_from(effects.events.len())
            .map_err(|_| Error::Invariant("too many events".into()))?;
        let next = first
            .checked_add(count)
            .ok_or_else(|| Error::Invariant("producer sequence overflow".into()))?;
        let mut sequences = Vec::with_capacity(effects.events.len());
        let mut o_tenants = Vec::with_capacity(effects.events.len());
        let mut o_types = Vec::with_capacity(effects.events.len());
        let mut o_hashes = Vec::with_capacity(effects.events.len());
        let mut stamped = Vec::with_capacity(effects.events.len());
        let mut digests: Vec<[u8; 32]> = Vec::with_capacity(effects.events.len());
        for (sequence, draft) in (first..).zip(&effects.events) {
            let stamp = ProducerStamp {
                producer_instance_id: cursor.claim.producer_instance_id.clone(),
                producer_sequence: sequence,
                occurred_at: now,
            };
            let event = draft
                .stamp(&stamp)
                .map_err(|e| Error::Invariant(format!("event not canonical: {e}")))?;
            sequences.push(to_i64(sequence)?);
            o_tenants.push(draft.tenant_id.clone());
            o_types.push(draft.event_type);
            o_hashes.push(event.sha256.to_vec());
            digests.push(event.sha256);
            stamped.push(event.bytes);
        }
        // One signature per tenant of the batch, over the Merkle root of that tenant's events,
        // each row keeping its inclusion proof: a signing operation per batch and tenant instead
        // of per event (a KMS round trip each). Per tenant, so that a proof (exported with the
        // tenant's evidence) holds no hash of another tenant's events. A signing failure fails
        // the batch: no effect without evidence.
        let mut signed: Vec<Option<Signed>> = vec![None; stamped.len()];
        if let Some(EventSigner { signer, standing }) = signer {
            // On the database's clock, the batch's own time (the events' `occurred_at`), as
            // ingest judges it and the key windows are set: a ledger host whose clock ran ahead
            // would otherwise pass its own key check and sign events ingest quarantines as
            // signed in the future, while the money moved.
            let signed_at = truncate_to_ms(now);
            standing.check(signed_at).map_err(Error::Signing)?;
            let mut by_tenant: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (at, tenant) in o_tenants.iter().enumerate() {
                by_tenant.entry(tenant.as_str()).or_default().push(at);
            }
            let groups = by_tenant.into_values().map(|places| {
                // The stamp hashed each event already: the tree is built from those hashes.
                let hashes: Vec<[u8; 32]> = places.iter().map(|&at| digests[at]).collect();
                async move {
                    signer
                        .sign_batch_of_hashes_at(&hashes, signed_at)
                        .await
                        .map(|s| (places, s))
                }
            });
            for (places, group) in futures_util::future::try_join_all(groups)
                .await
                .map_err(|e| Error::Signing(format!("{}: {e}", e.code())))?
            {
                for (at, s) in places.into_iter().zip(group) {
                    signed[at] = Some(s);
                }
            }
        }
        let mut s_keys: Vec<Option<String>> = Vec::with_capacity(stamped.len());
        let mut s_algorithms: Vec<Option<&'static str>> = Vec::with_capacity(stamped.len());
        let mut s_times: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(stamped.len());
        let mut s_signatures: Vec<Option<Vec<u8>>> = Vec::with_capacity(stamped.len());
        let mut s_inclusions: Vec<Option<Vec<u8>>> = Vec::with_capacity(stamped.len());
        for s in signed {
            s_inclusions.push(
                s.as_ref()
                    .and_then(|s| s.inclusion.as_ref().map(Inclusion::to_bytes)),
            );
            s_keys.push(s.as_ref().map(|s| s.key_id.clone()));
            s_algorithms.push(s.as_ref().map(|s| s.algorithm.as_str()));
            s_times.push(s.as_ref().map(|s| s.signed_at));
            s_signatures.push(s.map(|s| s.signature));
        }
        let o_bytes = stamped;

        Ok(Self {
            now,
            new_reservations: serde_json::Value::Array(new_reservations),
            resolved_ids,
            resolved_states,
            resolved_epochs,
            resolved_money,
            e_tenants,
            e_budgets,
            e_starts,
            e_reservations,
            e_kinds,
            e_deltas,
            producer_instance_id: cursor.claim.producer_instance_id.clone(),
            claim_token: cursor.claim.claim_token,
            first_sequence: to_i64(first)?,
            next_sequence: next,
            next_sequence_param: to_i64(next)?,
            sequences,
            o_tenants,
            o_types,
            o_bytes,
            o_hashes,
            s_keys,
            s_algorithms,
            s_times,
            s_signatures,
            s_inclusions,
        })
    }

    /// Binds $1–$32.
    fn bind<'q, O>(&'q self, query: ScalarQuery<'q, O>) -> ScalarQuery<'q, O> {
        let [r_actual, r_committed, r_released, r_overrun] = &self.resolved_money;
        let [d_limit, d_reserved, d_committed, d_overrun] = &self.e_deltas;
        query
            .bind(&self.new_reservations)
            .bind(self.now)
            .bind(&self.resolved_ids)
            .bind(&self.resolved_states)
            .bind(&self.resolved_epochs)
            .bind(r_actual)
            .bind(r_committed)
            .bind(r_released)
            .bind(r_overrun)
            .bind(&self.e_tenants)
            .bind(&self.e_budgets)
            .bind(&self.e_starts)
            .bind(&self.e_reservations)
            .bind(&self.e_kinds)
            .bind(d_limit)
            .bind(d_reserved)
            .bind(d_committed)
            .bind(d_overrun)
            .bind(&self.producer_instance_id)
            .bind(self.claim_token)
            .bind(self.first_sequence)
            .bind(self.next_sequence_param)
            .bind(&self.sequences)
            .bind(&self.o_tenants)
            .bind(&self.o_types)
            .bind(&self.o_bytes)
            .bind(&self.o_hashes)
            .bind(&self.s_keys)
            .bind(&self.s_algorithms)
            .bind(&self.s_times)
            .bind(&self.s_signatures)
            .bind(&self.s_inclusions)
    }
}

/// The guard's parameters ($33–$49): the rows a cached batch was planned on.
struct GuardParams {
    scope_ids: Vec<String>,
    scope_tenants: Vec<String>,
    scope_owners: Vec<String>,
    scope_epochs: Vec<i64>,
    scope_expiries: Vec<DateTime<Utc>>,
    budget_tenants: Vec<String>,
    budget_ids: Vec<String>,
    budget_limits: Vec<i64>,
    budget_soft_caps: Vec<Option<i64>>,
    budget_windows: Vec<&'static str>,
    window_tenants: Vec<String>,
    window_budgets: Vec<String>,
    window_starts: Vec<DateTime<Utc>>,
    window_money: [Vec<i64>; 4],
}

impl GuardParams {
    fn of(expected: &Expected) -> Self {
        let mut guard = Self {
            scope_ids: Vec::new(),
            scope_tenants: Vec::new(),
            scope_owners: Vec::new(),
            scope_epochs: Vec::new(),
            scope_expiries: Vec::new(),
            budget_tenants: Vec::new(),
            budget_ids: Vec::new(),
            budget_limits: Vec::new(),
            budget_soft_caps: Vec::new(),
            budget_windows: Vec::new(),
            window_tenants: Vec::new(),
            window_budgets: Vec::new(),
            window_starts: Vec::new(),
            window_money: Default::default(),
        };
        for (scope_id, lease) in &expected.scopes {
            guard.scope_ids.push(scope_id.clone());
            guard.scope_tenants.push(lease.tenant_id.clone());
            guard.scope_owners.push(lease.owner.clone());
            // Epochs are minted by the ledger from 1 upwards; i64::MAX never matches a row.
            guard
                .scope_epochs
                .push(i64::try_from(lease.epoch).unwrap_or(i64::MAX));
            guard.scope_expiries.push(lease.expires_at);
        }
        for (key, budget) in &expected.budgets {
            guard.budget_tenants.push(key.tenant_id.clone());
            guard.budget_ids.push(key.budget_id.clone());
            guard.budget_limits.push(budget.limit.get());
            guard
                .budget_soft_caps
                .push(budget.soft_cap.map(NanoUsd::get));
            guard.budget_windows.push(budget.window.as_str());
        }
        for (key, row) in &expected.windows {
            guard.window_tenants.push(key.budget.tenant_id.clone());
            guard.window_budgets.push(key.budget.budget_id.clone());
            guard.window_starts.push(key.start);
            for (column, amount) in guard.window_money.iter_mut().zip([
                row.limit,
                row.reserved,
                row.committed,
                row.overrun,
            ]) {
                column.push(amount.get());
            }
        }
        guard
    }
}

/// Everything the cached statement binds: the batch's effects ($1–$32), the guard ($33–$49),
/// the clock tolerance ($50), the reservation ids planned as new ($51) and as open ($52), and
/// the credits drawn from ($53–$55).
struct CachedParams {
    effects: EffectParams,
    guard: GuardParams,
    clock_tolerance_ms: f64,
    absent_reservations: Vec<Uuid>,
    open_reservations: Vec<Uuid>,
    credits: CreditDraws,
}

/// Credits a cached batch draws from ($53–$55): id, what the batch drew, and the drawn total
/// the plan read.
#[derive(Default)]
struct CreditDraws {
    ids: Vec<Uuid>,
    delta: Vec<i64>,
    drawn_before: Vec<i64>,
}

impl CreditDraws {
    /// Every credit the plan read, with the batch's draws from it (0 for a credit whose draw
    /// was refused). A credit drawn from that the plan did not read from the cache, or one the
    /// batch also resolves (one statement cannot update a row twice; releasing a credit takes the
    /// load path anyway), sends the batch to the load path. So does a credit the guard would not
    /// lock as an open reservation: the draws' UPDATE checks no state of its own
    /// (`store/effects_credit_draws.sql`).
    fn of(effects: &Effects, expected: &Expected) -> Result<Self> {
        if effects
            .credit_draws
            .keys()
            .any(|id| !expected.credit_drawn.contains_key(id))
            || expected
                .credit_drawn
                .keys()
                .any(|id| !expected.open_reservations.contains(id))
        {
            return Err(Error::Stale);
        }
        let mut credits = Self::default();
        for (id, before) in &expected.credit_drawn {
            if effects.resolutions.iter().any(|(r, _)| r == id) {
                return Err(Error::Stale);
            }
            let drawn = effects.credit_draws.get(id).unwrap_or(before);
            credits.ids.push(*id);
            credits.delta.push(drawn.get().saturating_sub(before.get()));
            credits.drawn_before.push(before.get());
        }
        Ok(credits)
    }
}

/// The cached statement's parameter types, in order; the same types sqlx binds on the load
/// path for the effects (`store/effects_*.sql`).
static CACHED_BATCH_TYPES: &[PgType] = &[
    PgType::JSONB,
    PgType::TIMESTAMPTZ,
    PgType::UUID_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TIMESTAMPTZ_ARRAY,
    PgType::UUID_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::TEXT,
    PgType::UUID,
    PgType::INT8,
    PgType::INT8,
    PgType::INT8_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::BYTEA_ARRAY,
    PgType::BYTEA_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TIMESTAMPTZ_ARRAY,
    PgType::BYTEA_ARRAY,
    PgType::BYTEA_ARRAY,
    // The guard.
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::INT8_ARRAY,
    PgType::TIMESTAMPTZ_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TEXT_ARRAY,
    PgType::TIMESTAMPTZ_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
    PgType::FLOAT8,
    PgType::UUID_ARRAY,
    PgType::UUID_ARRAY,
    // Credits drawn from.
    PgType::UUID_ARRAY,
    PgType::INT8_ARRAY,
    PgType::INT8_ARRAY,
];

impl pipeline::Params for CachedParams {
    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        let e = &self.effects;
        let g = &self.guard;
        let [r_actual, r_committed, r_released, r_overrun] = &e.resolved_money;
        let [d_limit, d_reserved, d_committed, d_overrun] = &e.e_deltas;
        let [w_limit, w_reserved, w_committed, w_overrun] = &g.window_money;
        vec![
            &e.new_reservations,
            &e.now,
            &e.resolved_ids,
            &e.resolved_states,
            &e.resolved_epochs,
            r_actual,
            r_committed,
            r_released,
            r_overrun,
            &e.e_tenants,
            &e.e_budgets,
            &e.e_starts,
            &e.e_reservations,
            &e.e_kinds,
            d_limit,
            d_reserved,
            d_committed,
            d_overrun,
            &e.producer_instance_id,
            &e.claim_token,
            &e.first_sequence,
            &e.next_sequence_param,
            &e.sequences,
            &e.o_tenants,
            &e.o_types,
            &e.o_bytes,
            &e.o_hashes,
            &e.s_keys,
            &e.s_algorithms,
            &e.s_times,
            &e.s_signatures,
            &e.s_inclusions,
            &g.scope_ids,
            &g.scope_tenants,
            &g.scope_owners,
            &g.scope_epochs,
            &g.scope_expiries,
            &g.budget_tenants,
            &g.budget_ids,
            &g.budget_limits,
            &g.budget_soft_caps,
            &g.budget_windows,
            &g.window_tenants,
            &g.window_budgets,
            &g.window_starts,
            w_limit,
            w_reserved,
            w_committed,
            w_overrun,
            &self.clock_tolerance_ms,
            &self.absent_reservations,
            &self.open_reservations,
            &self.credits.ids,
            &self.credits.delta,
            &self.credits.drawn_before,
        ]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio_postgres::config::Host;

    #[test]
    fn the_cached_session_connects_as_the_pool_does_and_keeps_the_urls_options() {
        let config = cached_path_config(
            "postgres://ledger:p%40ss%2Fw@db.example:6543/money?options=-c%20search_path%3Dledger&sslmode=disable",
        )
        .unwrap();
        assert_eq!(config.get_hosts(), [Host::Tcp("db.example".into())]);
        assert_eq!(config.get_ports(), [6543]);
        assert_eq!(config.get_user(), Some("ledger"));
        assert_eq!(config.get_password(), Some(&b"p@ss/w"[..]));
        assert_eq!(config.get_dbname(), Some("money"));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        let options = config.get_options().unwrap();
        assert!(options.starts_with("-c search_path=ledger "), "{options}");
        assert!(
            options.contains("-c plan_cache_mode=force_generic_plan"),
            "{options}"
        );
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(5)));
    }

    #[test]
    fn a_url_with_sqlx_only_parameters_still_gives_a_session() {
        let config =
            cached_path_config("postgres://ledger@localhost/money?statement-cache-capacity=10")
                .unwrap();
        assert_eq!(config.get_dbname(), Some("money"));
        assert_eq!(config.get_user(), Some("ledger"));
    }
}
