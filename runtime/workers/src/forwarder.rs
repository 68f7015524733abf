//! `spendguard worker outbox-forwarder`: canonical ingest (S8). Under a leader lease it reads each
//! producer's outbox rows in sequence order, verifies them, and appends the valid ones to their
//! tenant's hash chain; the others go to quarantine with a stable reason. One transaction per
//! pass holds the appends, the quarantine rows and the cursor compare-and-set, so a row is
//! forwarded at most once even if two forwarders overlap, and never lost.
//!
//! Checks, in order (the first failure is the quarantine reason):
//! 1. `SCHEMA_INVALID`: the bytes' sha256 is not `event_sha256`, they are not a JSON object of the
//!    audit schema, or their producer, sequence, tenant or type differ from the row's columns.
//! 2. `UNSIGNED`: no signature, under strict mode (the default outside the demo profile).
//! 3. The key registry's verdict on the signature and its signed time: `KEY_UNKNOWN`,
//!    `SIGNATURE_INVALID`, `KEY_REVOKED`, `KEY_OUTSIDE_WINDOW`, …
//!
//! With a checkpoint signer ([`Forwarder::with_checkpoint_signer`]) each pass that appended to a
//! tenant's chain also writes a signed checkpoint of the new head to `audit_checkpoints`, in the
//! same transaction.

use crate::chain::{GENESIS, link};
use crate::checkpoint;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use sha2::{Digest, Sha256};
use spendguard_core::audit::EVENT_SCHEMA;
use spendguard_evidence::{
    Algorithm, Inclusion, KeyRecord, KeyRegistry, LocalEd25519Signer, Signed, VerifiedSignatures,
};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{info, warn};

/// Why a pass failed (nothing was forwarded by it).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Another forwarder moved a cursor first (overlapping leaders); the pass rolled back.
    #[error("forwarder cursor of {0} moved concurrently")]
    CursorConflict(String),
    /// A stored signing key does not parse.
    #[error("signing key {key_id} in the registry is invalid: {reason}")]
    KeyInvalid {
        /// Key.
        key_id: String,
        /// Why.
        reason: String,
    },
    /// A checkpoint could not be signed (the pass rolled back).
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Another forwarder's pass wrote what this one read or writes (overlapping leaders): a
    /// serialization conflict of the pass's snapshot, or a chain row it inserted first. The
    /// pass rolled back.
    #[error("a concurrent forwarder pass: {0}")]
    Overlapped(sqlx::Error),
    /// The database failed.
    #[error("database: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for ForwardError {
    fn from(error: sqlx::Error) -> Self {
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        match code.as_deref() {
            // serialization_failure, unique_violation: only another pass makes either here.
            Some("40001" | "23505") => Self::Overlapped(error),
            _ => Self::Database(error),
        }
    }
}

impl ForwardError {
    /// The stable code.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::CursorConflict(_) | Self::Overlapped(_) => "FORWARDER_CURSOR_CONFLICT",
            Self::KeyInvalid { .. } => "SIGNING_KEY_INVALID",
            Self::Checkpoint(_) => "CHECKPOINT_INVALID",
            Self::Database(_) => "DEPENDENCY_UNAVAILABLE",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Ingest metrics.
#[derive(Clone, Default)]
pub struct ForwarderMetrics {
    accepted: Counter,
    quarantined: Family<ReasonLabels, Counter>,
}

impl ForwarderMetrics {
    /// Registers `spendguard_ingest_accepted_total` and `spendguard_ingest_quarantined_total{reason}`
    /// (reason `KEY_UNKNOWN` is the unknown-key count).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix("spendguard_ingest");
        registry.register(
            "accepted",
            "Events appended to a tenant chain",
            metrics.accepted.clone(),
        );
        registry.register(
            "quarantined",
            "Events refused into quarantine, by reason",
            metrics.quarantined.clone(),
        );
        metrics
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Events appended to chains.
    pub accepted: u64,
    /// Events quarantined, by reason.
    pub quarantined: Vec<(String, String)>,
}

/// The forwarder.
pub struct Forwarder {
    pool: PgPool,
    strict: bool,
    batch: i64,
    metrics: ForwarderMetrics,
    checkpoints: Option<(Arc<LocalEd25519Signer>, String)>,
}

struct OutboxRow {
    producer: String,
    sequence: i64,
    tenant_id: String,
    event_type: String,
    occurred_at: DateTime<Utc>,
    bytes: Vec<u8>,
    sha256: Vec<u8>,
    key_id: Option<String>,
    algorithm: Option<String>,
    signed_at: Option<DateTime<Utc>>,
    signature: Option<Vec<u8>>,
    /// The event's place in a batch signature; `None` when the signature covers it alone.
    inclusion: Option<Vec<u8>>,
}

impl Forwarder {
    /// A forwarder; `strict` quarantines unsigned events (off only under the demo profile).
    pub fn new(pool: PgPool, strict: bool, batch: i64, metrics: ForwarderMetrics) -> Self {
        Self {
            pool,
            strict,
            batch,
            metrics,
            checkpoints: None,
        }
    }

    /// Signs a checkpoint ([`crate::checkpoint`]) for each tenant whose chain a pass appended
    /// to, under `key_name`, in the pass's transaction.
    ///
    /// # Errors
    /// [`crate::checkpoint::CheckpointError::KeyName`] for an invalid key name.
    pub fn with_checkpoint_signer(
        mut self,
        signer: Arc<LocalEd25519Signer>,
        key_name: &str,
    ) -> Result<Self, crate::checkpoint::CheckpointError> {
        // Validate the name now rather than on the first pass.
        checkpoint::sign(&signer, key_name, "probe", 1, &GENESIS)?;
        self.checkpoints = Some((signer, key_name.to_owned()));
        Ok(self)
    }

    /// Forwards up to `batch` rows per producer in one transaction.
    ///
    /// # Errors
    /// [`ForwardError`]; the transaction is rolled back and the next pass retries.
    pub async fn pass(&self) -> Result<PassReport, ForwardError> {
        let mut tx = self.pool.begin().await?;
        // One snapshot for the registry and the rows: a key is registered before anything it
        // signs, so every row the pass sees is signed by a key it sees. Under READ COMMITTED a
        // key registered between the two reads left its first rows quarantined as KEY_UNKNOWN,
        // for good. A forwarder that overlaps this one now fails on a serialization conflict
        // where it failed on the cursor's compare-and-set; either way the pass is retried.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let registry = load_registry(&mut tx).await?;
        // The database clock: an event signed later than this (plus the skew) is quarantined.
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *tx)
            .await?;
        // The rows of one batch signature share it: one cryptographic check for all of them.
        let mut verified = VerifiedSignatures::default();
        let producers: Vec<(String, Option<i64>)> = sqlx::query_as(
            "SELECT p.producer_instance_id, c.next_sequence
               FROM audit_producers p LEFT JOIN forwarder_cursors c USING (producer_instance_id)
              ORDER BY 1",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut heads: HashMap<String, (i64, [u8; 32])> = HashMap::new();
        let mut report = PassReport::default();
        for (producer, cursor) in producers {
            let start = cursor.unwrap_or(1);
            let rows = outbox_rows(&mut tx, &producer, start, self.batch).await?;
            let mut next = start;
            for row in rows {
                if row.sequence != next {
                    break; // Not visible yet; sequences are contiguous per producer.
                }
                match check(&row, &registry, &mut verified, self.strict, now) {
                    Ok(()) => {
                        append(&mut tx, &mut heads, &row).await?;
                        report.accepted += 1;
                    }
                    Err((reason, detail)) => {
                        quarantine(&mut tx, &row, &reason, &detail).await?;
                        report.quarantined.push((reason, detail));
                    }
                }
                next += 1;
            }
            if next != start {
                advance(&mut tx, &producer, cursor, next).await?;
            }
        }
        for (tenant, (seq, hash)) in &heads {
            sqlx::query(
                "INSERT INTO audit_chain_heads (tenant_id, chain_seq, chain_hash) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant_id) DO UPDATE SET chain_seq = EXCLUDED.chain_seq, chain_hash = EXCLUDED.chain_hash",
            )
            .bind(tenant)
            .bind(seq)
            .bind(hash.to_vec())
            .execute(&mut *tx)
            .await?;
            if let Some((signer, key_name)) = &self.checkpoints {
                let size = u64::try_from(*seq).unwrap_or(0);
                let note = checkpoint::sign(signer, key_name, tenant, size, hash)?;
                sqlx::query(
                    "INSERT INTO audit_checkpoints (tenant_id, tree_size, root_hash, note, key_name)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, tree_size) DO NOTHING",
                )
                .bind(tenant)
                .bind(seq)
                .bind(hash.to_vec())
                .bind(note)
                .bind(key_name)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        self.metrics.accepted.inc_by(report.accepted);
        for (reason, detail) in &report.quarantined {
            warn!(reason, detail, "audit event quarantined");
            self.metrics
                .quarantined
                .get_or_create(&ReasonLabels {
                    reason: reason.clone(),
                })
                .inc();
        }
        Ok(report)
    }

    /// Runs passes every `poll` while `leader` leads, until `shutdown` resolves. A standby does
    /// nothing; a lost lease stops new passes before the next poll.
    pub async fn run(
        &self,
        leader: spendguard_leader::LeaderHandle,
        poll: std::time::Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            if leader.is_leader() {
                match self.pass().await {
                    Ok(report) if report.accepted > 0 || !report.quarantined.is_empty() => {
                        info!(
                            accepted = report.accepted,
                            quarantined = report.quarantined.len(),
                            "forwarded"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => warn!(code = e.code(), error = %e, "forwarder pass failed"),
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(poll) => {}
            }
        }
    }
}

async fn load_registry(tx: &mut Transaction<'_, Postgres>) -> Result<KeyRegistry, ForwardError> {
    type KeyRow = (
        String,
        String,
        Vec<u8>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT key_id, algorithm, public_key, valid_from, valid_until, revoked_at FROM signing_keys",
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut registry = KeyRegistry::new();
    for (key_id, algorithm, public_key, from, until, revoked_at) in rows {
        let invalid = |reason: String| ForwardError::KeyInvalid {
            key_id: key_id.clone(),
            reason,
        };
        let algorithm: Algorithm = algorithm.parse().map_err(|e| invalid(format!("{e}")))?;
        let mut record = KeyRecord::new(key_id.clone(), algorithm, &public_key, from, until)
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(at) = revoked_at {
            record = record.revoked(at);
        }
        registry
            .upsert(record)
            .map_err(|e| invalid(e.to_string()))?;
    }
    Ok(registry)
}

async fn outbox_rows(
    tx: &mut Transaction<'_, Postgres>,
    producer: &str,
    start: i64,
    batch: i64,
) -> Result<Vec<OutboxRow>, ForwardError> {
    type Row = (
        i64,
        String,
        String,
        DateTime<Utc>,
        Vec<u8>,
        Vec<u8>,
        Option<String>,
        Option<String>,
        Option<DateTime<Utc>>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT producer_sequence, tenant_id, event_type, occurred_at, canonical_event, event_sha256,
                signing_key_id, signing_algorithm, signed_at, signature, signature_inclusion
           FROM audit_outbox WHERE producer_instance_id = $1 AND producer_sequence >= $2
          ORDER BY producer_sequence LIMIT $3",
    )
    .bind(producer)
    .bind(start)
    .bind(batch)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxRow {
            producer: producer.to_owned(),
            sequence: r.0,
            tenant_id: r.1,
            event_type: r.2,
            occurred_at: r.3,
            bytes: r.4,
            sha256: r.5,
            key_id: r.6,
            algorithm: r.7,
            signed_at: r.8,
            signature: r.9,
            inclusion: r.10,
        })
        .collect())
}

/// The quarantine reason and detail of a row, or `Ok` when it may enter the chain.
fn check(
    row: &OutboxRow,
    registry: &KeyRegistry,
    verified: &mut VerifiedSignatures,
    strict: bool,
    now: DateTime<Utc>,
) -> Result<(), (String, String)> {
    let schema = |detail: String| ("SCHEMA_INVALID".to_owned(), detail);
    let digest: [u8; 32] = Sha256::digest(&row.bytes).into();
    if row.sha256 != digest {
        return Err(schema(
            "event_sha256 does not match the canonical bytes".into(),
        ));
    }
    let event: Value = serde_json::from_slice(&row.bytes)
        .map_err(|e| schema(format!("canonical bytes are not JSON: {e}")))?;
    let field = |name: &str| event.get(name).cloned().unwrap_or(Value::Null);
    let expected = [
        ("schema", Value::from(EVENT_SCHEMA)),
        ("producer_instance_id", Value::from(row.producer.clone())),
        ("producer_sequence", Value::from(row.sequence)),
        ("tenant_id", Value::from(row.tenant_id.clone())),
        ("event_type", Value::from(row.event_type.clone())),
    ];
    for (name, want) in expected {
        if field(name) != want {
            return Err(schema(format!("{name} differs from the stored row")));
        }
    }
    let (Some(key_id), Some(algorithm), Some(signed_at), Some(signature)) = (
        row.key_id.clone(),
        row.algorithm.as_deref(),
        row.signed_at,
        row.signature.clone(),
    ) else {
        return if strict {
            Err((
                "UNSIGNED".into(),
                "strict ingest requires a signature".into(),
            ))
        } else {
            Ok(())
        };
    };
    let algorithm: Algorithm = algorithm
        .parse()
        .map_err(|e| ("SIGNATURE_MALFORMED".to_owned(), format!("{e}")))?;
    let inclusion = row
        .inclusion
        .as_deref()
        .map(Inclusion::from_bytes)
        .transpose()
        .map_err(|e| ("SIGNATURE_MALFORMED".to_owned(), format!("{e}")))?;
    let signed = Signed {
        key_id,
        algorithm,
        signed_at,
        producer_id: row.producer.clone(),
        signature,
        inclusion,
    };
    // A signing time ahead of the database clock (beyond clock skew) is a producer clock gone
    // wrong or an event pre-dated into a key's future window: either way, not chained.
    registry
        .verify_cached_at(&signed, &row.bytes, verified, now, MAX_SIGNED_AT_AHEAD)
        .map(|_| ())
        .map_err(|e| (e.code().as_str().to_owned(), e.to_string()))
}

/// How far a signing time may run ahead of the database clock (the producers' and the database's
/// clocks drift apart by far less).
pub const MAX_SIGNED_AT_AHEAD: chrono::Duration = chrono::Duration::minutes(5);

async fn append(
    tx: &mut Transaction<'_, Postgres>,
    heads: &mut HashMap<String, (i64, [u8; 32])>,
    row: &OutboxRow,
) -> Result<(), ForwardError> {
    if !heads.contains_key(&row.tenant_id) {
        let head: Option<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT chain_seq, chain_hash FROM audit_chain_heads WHERE tenant_id = $1 FOR UPDATE",
        )
        .bind(&row.tenant_id)
        .fetch_optional(&mut **tx)
        .await?;
        let head = match head {
            Some((seq, hash)) => (seq, hash.try_into().unwrap_or(GENESIS)),
            None => (0, GENESIS),
        };
        heads.insert(row.tenant_id.clone(), head);
    }
    let (seq, prev) = heads.get(&row.tenant_id).copied().unwrap_or((0, GENESIS));
    let digest: [u8; 32] = Sha256::digest(&row.bytes).into();
    let next = link(&prev, &digest);
    sqlx::query(
        "INSERT INTO audit_chain (tenant_id, chain_seq, producer_instance_id, producer_sequence, event_type,
                                  occurred_at, canonical_event, event_sha256, signing_key_id,
                                  signing_algorithm, signed_at, signature, prev_chain_hash, chain_hash,
                                  signature_inclusion)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(&row.tenant_id)
    .bind(seq + 1)
    .bind(&row.producer)
    .bind(row.sequence)
    .bind(&row.event_type)
    .bind(row.occurred_at)
    .bind(&row.bytes)
    .bind(digest.to_vec())
    .bind(&row.key_id)
    .bind(&row.algorithm)
    .bind(row.signed_at)
    .bind(&row.signature)
    .bind(prev.to_vec())
    .bind(next.to_vec())
    .bind(&row.inclusion)
    .execute(&mut **tx)
    .await?;
    heads.insert(row.tenant_id.clone(), (seq + 1, next));
    Ok(())
}

async fn quarantine(
    tx: &mut Transaction<'_, Postgres>,
    row: &OutboxRow,
    reason: &str,
    detail: &str,
) -> Result<(), ForwardError> {
    sqlx::query(
        "INSERT INTO audit_quarantine (producer_instance_id, producer_sequence, tenant_id, event_type,
                                       reason_code, detail, canonical_event, event_sha256,
                                       signing_key_id, signing_algorithm, signed_at, signature,
                                       signature_inclusion)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(&row.producer)
    .bind(row.sequence)
    .bind(&row.tenant_id)
    .bind(&row.event_type)
    .bind(reason)
    .bind(detail)
    .bind(&row.bytes)
    .bind(&row.sha256)
    .bind(&row.key_id)
    .bind(&row.algorithm)
    .bind(row.signed_at)
    .bind(&row.signature)
    .bind(&row.inclusion)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Moves the producer's cursor from what this pass read to `next`, or fails if another
/// forwarder moved it meanwhile.
async fn advance(
    tx: &mut Transaction<'_, Postgres>,
    producer: &str,
    read: Option<i64>,
    next: i64,
) -> Result<(), ForwardError> {
    let moved = match read {
        None => sqlx::query(
            "INSERT INTO forwarder_cursors (producer_instance_id, next_sequence) VALUES ($1, $2)
             ON CONFLICT (producer_instance_id) DO NOTHING",
        )
        .bind(producer)
        .bind(next)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
        Some(read) => sqlx::query(
            "UPDATE forwarder_cursors SET next_sequence = $3, updated_at = now()
              WHERE producer_instance_id = $1 AND next_sequence = $2",
        )
        .bind(producer)
        .bind(read)
        .bind(next)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
    };
    if moved == 1 {
        Ok(())
    } else {
        Err(ForwardError::CursorConflict(producer.to_owned()))
    }
}
