//! `spendguard audit export`: one tenant's chain segment to a directory, read-only and resumable.
//!
//! The range selects a *contiguous* chain segment: from the first to the last chain position whose
//! `occurred_at` is in `[from, to)`. Producers interleave, so a few events inside that segment may
//! have occurred just outside the range; they are kept, because dropping them would leave gaps
//! that no verifier could tell from deletions.
//!
//! Every batch commits in this order: batch file, keys.json, manifest (each written whole or not
//! at all, through a [`Sink`]: a directory or an S3 prefix). The manifest is the commit point; a
//! crash leaves at most an unlisted batch file, which the next `--resume` overwrites (directory)
//! or must find byte-identical (S3, where batch objects are never overwritten).

use super::format::{
    BatchEntry, CHECKPOINT_FILE, Cursor, EventLine, FORMAT, FORMATS_READ, KEYS_FILE, KeyEntry,
    KeysFile, MANIFEST_FILE, Manifest, Range, SignatureMeta, batch_file_name, sha256_hex,
    to_pretty,
};
use super::sink::{Sink, SinkError};
use crate::chain::{GENESIS, link};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::collections::BTreeSet;
use std::path::Path;

/// Largest accepted batch size; bounds the memory of one batch.
pub const BATCH_SIZE_MAX: usize = 100_000;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The one tenant to export.
    pub tenant_id: String,
    /// Occurrence range; on `--resume` it must equal the manifest's or be left out.
    pub range: Range,
    /// Events per batch file.
    pub batch_size: usize,
    /// Continue an existing export after its cursor (an empty or missing directory starts one).
    pub resume: bool,
    /// Stop after this many new batches (bounded runs); `None` exports to the end of the range.
    pub max_batches: Option<usize>,
}

/// What a run wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// New batch files.
    pub batches: usize,
    /// New events.
    pub events: u64,
    /// Last exported chain position (all runs).
    pub cursor: Option<i64>,
    /// True when the range is exported to its current end.
    pub complete: bool,
}

/// Why an export stopped. Nothing listed in the manifest is ever lost or changed by an error.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Without `--resume`, the output must be a new or empty directory or S3 prefix.
    #[error("{0} is not empty; use --resume to continue an export")]
    DirNotEmpty(String),
    /// The existing manifest cannot be read.
    #[error("manifest {object}: {reason}")]
    ManifestInvalid {
        /// File or object.
        object: String,
        /// Why.
        reason: String,
    },
    /// The directory holds another tenant's export.
    #[error("the export in this directory is for tenant {manifest:?}, not {requested:?}")]
    TenantMismatch {
        /// Tenant of the manifest.
        manifest: String,
        /// Tenant asked for.
        requested: String,
    },
    /// `--from`/`--to` differ from the manifest's on resume, or `from >= to`.
    #[error("range: {0}")]
    RangeInvalid(String),
    /// Batch size out of bounds.
    #[error("batch size must be 1..={BATCH_SIZE_MAX}")]
    BatchSizeInvalid,
    /// The stored chain does not continue the export (a gap, a bad link): refuse to export
    /// something that cannot verify, and alert.
    #[error("stored chain of {tenant_id} is inconsistent at {chain_seq}: {what}")]
    ChainInconsistent {
        /// Tenant.
        tenant_id: String,
        /// Position.
        chain_seq: i64,
        /// What is wrong.
        what: &'static str,
    },
    /// An exported event names a key that `signing_keys` does not hold.
    #[error("signing key {0} of an exported event is not in signing_keys")]
    KeyMissing(String),
    /// Reading or writing the export location failed (directory or S3), with the sink's code.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The newest checkpoint in the database is older than the one already published there:
    /// the database was restored from an older backup, or points at another installation.
    #[error(
        "tenant {tenant_id}: the published checkpoint has tree size {published}, the database's \
         newest only {newest}; refusing to move the published checkpoint back"
    )]
    CheckpointRollback {
        /// Tenant.
        tenant_id: String,
        /// Tree size already published.
        published: u64,
        /// Newest tree size in the database.
        newest: u64,
    },
    /// A published `latest` checkpoint is not a checkpoint note of this tenant.
    #[error("{object}: {reason}")]
    PublishedCheckpointInvalid {
        /// Object.
        object: String,
        /// Why.
        reason: &'static str,
    },
    /// The database's chain no longer has the root that an earlier publication recorded at that
    /// tree size: history was rewritten, or this is another chain.
    #[error(
        "tenant {tenant_id}: the chain hash at {tree_size} differs from the published checkpoint's root"
    )]
    CheckpointFork {
        /// Tenant.
        tenant_id: String,
        /// Tree size of the published checkpoint.
        tree_size: u64,
    },
    /// The database URL (or the `PGSSL*` environment beside it) is refused.
    #[error(transparent)]
    DatabaseUrl(#[from] spendguard_postgres::UrlError),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl ExportError {
    /// The stable code.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::DirNotEmpty(_) => "EXPORT_DIR_NOT_EMPTY",
            Self::ManifestInvalid { .. } => "MANIFEST_INVALID",
            Self::TenantMismatch { .. } => "TENANT_MISMATCH",
            Self::RangeInvalid(_) => "EXPORT_RANGE_INVALID",
            Self::BatchSizeInvalid => "EXPORT_BATCH_SIZE_INVALID",
            Self::ChainInconsistent { .. } => "EXPORT_CHAIN_INCONSISTENT",
            Self::KeyMissing(_) => "KEY_UNKNOWN",
            Self::Sink(error) => error.code(),
            Self::CheckpointRollback { .. } => "EXPORT_CHECKPOINT_ROLLBACK",
            Self::CheckpointFork { .. } => "EXPORT_CHECKPOINT_FORK",
            Self::PublishedCheckpointInvalid { .. } => "EXPORT_PUBLISHED_CHECKPOINT_INVALID",
            Self::DatabaseUrl(error) => error.code(),
            Self::Database(_) => "DEPENDENCY_UNAVAILABLE",
        }
    }
}

/// A one-connection pool whose sessions are read-only in the database itself
/// (`default_transaction_read_only`), so the exporter cannot write evidence even by mistake, and
/// whose statements are bounded (`statement_timeout`), so it cannot load the ledger's database
/// for long.
///
/// # Errors
/// A bad URL or an unreachable database.
pub async fn connect_read_only(database_url: &str) -> Result<PgPool, ExportError> {
    let options = spendguard_postgres::connect_options(database_url)?
        .options([
            ("default_transaction_read_only", "on"),
            ("statement_timeout", "30s"),
        ])
        .application_name("spendguard-audit-export");
    Ok(PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?)
}

type ChainRow = (
    i64,
    String,
    i64,
    String,
    DateTime<Utc>,
    Vec<u8>,
    Vec<u8>,
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<Vec<u8>>,
    Vec<u8>,
    Vec<u8>,
    Option<Vec<u8>>,
);

/// Exports `options.tenant_id` into the directory `dir` ([`export_to`] a [`Sink::Directory`]).
///
/// # Errors
/// As [`export_to`].
pub async fn export(
    pool: &PgPool,
    dir: &Path,
    options: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    export_to(pool, &Sink::Directory(dir.to_owned()), options).await
}

/// Exports `options.tenant_id` into `sink`.
///
/// # Errors
/// [`ExportError`]; batches committed before the error stay valid and `--resume` continues.
///
/// # Guarantees
/// Every query is scoped by `tenant_id = $1`; each row is checked to continue the chain from the
/// cursor (contiguous position, linked hash) before it is written, so a resumed export has no
/// duplicate and no gap. The manifest is written last in every commit, so whatever the sink holds
/// after an error claims only the batches that were written whole.
pub async fn export_to(
    pool: &PgPool,
    sink: &Sink,
    options: &ExportOptions,
) -> Result<ExportReport, ExportError> {
    if options.batch_size == 0 || options.batch_size > BATCH_SIZE_MAX {
        return Err(ExportError::BatchSizeInvalid);
    }
    if let (Some(from), Some(to)) = (options.range.from, options.range.to)
        && from >= to
    {
        return Err(ExportError::RangeInvalid(
            "--from must be before --to".into(),
        ));
    }
    let (mut manifest, manifest_exists) = prepare(sink, options).await?;
    let tenant = manifest.tenant_id.clone();
    let range = manifest.range;

    // The segment's end is fixed at the start of the run; later appends wait for the next run.
    let (first, last): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT min(chain_seq), max(chain_seq) FROM audit_chain
          WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR occurred_at >= $2)
                AND ($3::timestamptz IS NULL OR occurred_at < $3)",
    )
    .bind(&tenant)
    .bind(range.from)
    .bind(range.to)
    .fetch_one(pool)
    .await?;
    // `prev` is the link the next row must continue; `None` for a start in the middle of the
    // chain, whose predecessor is outside the export and becomes the manifest's anchor.
    let (mut next, mut prev) = match &manifest.cursor {
        Some(cursor) => (
            cursor.chain_seq + 1,
            Some(parse_hash(&cursor.chain_hash, sink)?),
        ),
        None => match first {
            Some(first) if first > 1 => (first, None),
            _ => (1, Some(GENESIS)),
        },
    };
    let end = last.unwrap_or(0);
    if let Some(cursor) = &manifest.cursor
        && cursor.chain_seq > end
    {
        // The segment's end only grows (the chain is append-only), so an end behind the cursor
        // means lost evidence or the wrong database, never "nothing new".
        return Err(inconsistent(
            &tenant,
            end + 1,
            "chain is shorter than the export",
        ));
    }
    let mut key_ids: BTreeSet<String> = read_key_ids(sink).await?;
    if !manifest_exists {
        // An empty manifest first, so a crash inside the first batch still leaves a resumable
        // export rather than a location that `--resume` must refuse as foreign.
        commit(pool, sink, &mut manifest, &key_ids).await?;
    }
    let mut report = ExportReport {
        batches: 0,
        events: 0,
        cursor: manifest.cursor.as_ref().map(|c| c.chain_seq),
        complete: false,
    };
    while next <= end && options.max_batches.is_none_or(|max| report.batches < max) {
        let limit = i64::try_from(options.batch_size).unwrap_or(i64::MAX);
        let rows: Vec<ChainRow> = sqlx::query_as(
            "SELECT chain_seq, producer_instance_id, producer_sequence, event_type, occurred_at,
                    canonical_event, event_sha256, signing_key_id, signing_algorithm, signed_at,
                    signature, prev_chain_hash, chain_hash, signature_inclusion
               FROM audit_chain WHERE tenant_id = $1 AND chain_seq >= $2 AND chain_seq <= $3
              ORDER BY chain_seq LIMIT $4",
        )
        .bind(&tenant)
        .bind(next)
        .bind(end)
        .bind(limit)
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            return Err(inconsistent(&tenant, next, "missing"));
        }
        let mut body = Vec::new();
        let first_seq = next;
        for row in rows {
            let line = to_line(&tenant, row, next, &mut prev)?;
            if manifest.anchor_prev_chain_hash.is_none() {
                manifest.first_chain_seq = Some(line.chain_seq);
                manifest.anchor_prev_chain_hash = Some(line.prev_chain_hash.clone());
            }
            if let Some(signature) = &line.signature {
                key_ids.insert(signature.key_id.clone());
            }
            manifest.cursor = Some(Cursor {
                chain_seq: line.chain_seq,
                chain_hash: line.chain_hash.clone(),
            });
            body.extend(serde_json::to_vec(&line).expect("an event line always serializes"));
            body.push(b'\n');
            next += 1;
        }
        let file = batch_file_name(manifest.batches.len() + 1);
        sink.write_batch(&file, &body).await?;
        let events = u64::try_from(next - first_seq).unwrap_or(0);
        manifest.batches.push(BatchEntry {
            file,
            events,
            first_chain_seq: first_seq,
            last_chain_seq: next - 1,
            sha256: sha256_hex(&body),
        });
        commit(pool, sink, &mut manifest, &key_ids).await?;
        report.batches += 1;
        report.events += events;
        report.cursor = Some(next - 1);
    }
    if report.batches == 0 {
        // Also repairs keys.json after a crash between it and the manifest.
        commit(pool, sink, &mut manifest, &key_ids).await?;
    }
    write_checkpoint(pool, sink, &manifest).await?;
    report.complete = next > end;
    Ok(report)
}

/// Writes the newest checkpoint whose tree size lies in the exported span to
/// [`CHECKPOINT_FILE`] (nothing when there is none, e.g. no checkpoint signer configured).
async fn write_checkpoint(
    pool: &PgPool,
    sink: &Sink,
    manifest: &Manifest,
) -> Result<(), ExportError> {
    let (Some(first), Some(cursor)) = (manifest.first_chain_seq, &manifest.cursor) else {
        return Ok(());
    };
    let note: Option<String> = sqlx::query_scalar(
        "SELECT note FROM audit_checkpoints
          WHERE tenant_id = $1 AND tree_size >= $2 AND tree_size <= $3
          ORDER BY tree_size DESC LIMIT 1",
    )
    .bind(&manifest.tenant_id)
    .bind(first)
    .bind(cursor.chain_seq)
    .fetch_optional(pool)
    .await?;
    if let Some(note) = note {
        sink.replace(CHECKPOINT_FILE, note.as_bytes()).await?;
    }
    Ok(())
}

/// The manifest to continue: the location's on `--resume`, otherwise a new one; and whether the
/// location already holds it.
async fn prepare(sink: &Sink, options: &ExportOptions) -> Result<(Manifest, bool), ExportError> {
    // Read even without --resume: an S3 sink then writes the first manifest only if still absent.
    let existing = sink.read(MANIFEST_FILE).await?;
    let fresh = Manifest {
        format: FORMAT.into(),
        tenant_id: options.tenant_id.clone(),
        range: options.range,
        first_chain_seq: None,
        anchor_prev_chain_hash: None,
        batches: Vec::new(),
        keys_sha256: String::new(),
        cursor: None,
    };
    let bytes = match existing {
        Some(bytes) if options.resume => bytes,
        _ => {
            return if sink.is_empty().await? {
                Ok((fresh, false))
            } else {
                Err(ExportError::DirNotEmpty(sink.describe()))
            };
        }
    };
    let invalid = |reason: String| ExportError::ManifestInvalid {
        object: format!("{}/{MANIFEST_FILE}", sink.describe().trim_end_matches('/')),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if manifest.format != FORMAT {
        // An older format still verifies, but a directory holds one format: a new one is needed.
        let why = if FORMATS_READ.contains(&manifest.format.as_str()) {
            format!(
                "format {:?} cannot be resumed in {FORMAT}; export to a new directory",
                manifest.format
            )
        } else {
            format!("unknown format {:?}", manifest.format)
        };
        return Err(invalid(why));
    }
    if manifest.tenant_id != options.tenant_id {
        return Err(ExportError::TenantMismatch {
            manifest: manifest.tenant_id,
            requested: options.tenant_id.clone(),
        });
    }
    let conflicts = |given: Option<DateTime<Utc>>, stored| given.is_some_and(|g| Some(g) != stored);
    if conflicts(options.range.from, manifest.range.from)
        || conflicts(options.range.to, manifest.range.to)
    {
        return Err(ExportError::RangeInvalid(
            "--from/--to differ from the manifest's range; a resumed export keeps its range".into(),
        ));
    }
    Ok((manifest, true))
}

fn inconsistent(tenant: &str, chain_seq: i64, what: &'static str) -> ExportError {
    ExportError::ChainInconsistent {
        tenant_id: tenant.to_owned(),
        chain_seq,
        what,
    }
}

fn parse_hash(hex_hash: &str, sink: &Sink) -> Result<[u8; 32], ExportError> {
    hex::decode(hex_hash)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| ExportError::ManifestInvalid {
            object: format!("{}/{MANIFEST_FILE}", sink.describe().trim_end_matches('/')),
            reason: "cursor chain_hash is not 32 hex bytes".into(),
        })
}

/// Checks that `row` continues the chain at `expected` after `prev`, and renders it.
fn to_line(
    tenant: &str,
    row: ChainRow,
    expected: i64,
    prev: &mut Option<[u8; 32]>,
) -> Result<EventLine, ExportError> {
    let (seq, producer, producer_seq, event_type, occurred_at, bytes, sha, key_id, algorithm) = (
        row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8,
    );
    let (signed_at, signature, prev_hash, chain_hash, inclusion) =
        (row.9, row.10, row.11, row.12, row.13);
    if seq != expected {
        return Err(inconsistent(tenant, expected, "missing"));
    }
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    if sha != digest {
        return Err(inconsistent(tenant, seq, "event_sha256"));
    }
    // A mid-chain start takes its predecessor's link from the row; the manifest records it as the
    // anchor that a checkpoint must vouch for.
    let expected_prev = match *prev {
        Some(prev) => prev,
        None => <[u8; 32]>::try_from(prev_hash.as_slice())
            .map_err(|_| inconsistent(tenant, seq, "prev_chain_hash"))?,
    };
    let next = link(&expected_prev, &digest);
    if prev_hash != expected_prev || chain_hash != next {
        return Err(inconsistent(tenant, seq, "chain link"));
    }
    *prev = Some(next);
    let signature = match (key_id, algorithm, signed_at, signature) {
        (Some(key_id), Some(algorithm), Some(signed_at), Some(signature)) => Some(SignatureMeta {
            key_id,
            algorithm,
            signed_at,
            signature: BASE64.encode(signature),
            inclusion: inclusion.map(|proof| BASE64.encode(proof)),
        }),
        _ => None,
    };
    Ok(EventLine {
        tenant_id: tenant.to_owned(),
        chain_seq: seq,
        producer_instance_id: producer,
        producer_sequence: producer_seq,
        event_type,
        occurred_at: spendguard_core::audit::format_time(occurred_at),
        canonical_event: BASE64.encode(&bytes),
        event_sha256: hex::encode(digest),
        signature,
        prev_chain_hash: hex::encode(expected_prev),
        chain_hash: hex::encode(next),
    })
}

/// Key ids already in keys.json (resume keeps them).
async fn read_key_ids(sink: &Sink) -> Result<BTreeSet<String>, ExportError> {
    let Some(bytes) = sink.read(KEYS_FILE).await? else {
        return Ok(BTreeSet::new());
    };
    let keys: KeysFile =
        serde_json::from_slice(&bytes).map_err(|e| ExportError::ManifestInvalid {
            object: format!("{}/{KEYS_FILE}", sink.describe().trim_end_matches('/')),
            reason: e.to_string(),
        })?;
    Ok(keys.keys.into_iter().map(|k| k.key_id).collect())
}

/// Rewrites keys.json (current windows and revocations of every key used) and then the manifest.
async fn commit(
    pool: &PgPool,
    sink: &Sink,
    manifest: &mut Manifest,
    key_ids: &BTreeSet<String>,
) -> Result<(), ExportError> {
    type KeyRow = (
        String,
        String,
        Vec<u8>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let ids: Vec<String> = key_ids.iter().cloned().collect();
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT key_id, algorithm, public_key, valid_from, valid_until, revoked_at
           FROM signing_keys WHERE key_id = ANY($1) ORDER BY key_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    if let Some(missing) = ids.iter().find(|id| !rows.iter().any(|r| &r.0 == *id)) {
        return Err(ExportError::KeyMissing(missing.clone()));
    }
    let keys = KeysFile {
        format: FORMAT.into(),
        keys: rows
            .into_iter()
            .map(
                |(key_id, algorithm, public_key, valid_from, valid_until, revoked_at)| KeyEntry {
                    key_id,
                    algorithm,
                    public_key: BASE64.encode(public_key),
                    valid_from,
                    valid_until,
                    revoked_at,
                },
            )
            .collect(),
    };
    let keys_bytes = to_pretty(&keys);
    sink.replace(KEYS_FILE, &keys_bytes).await?;
    manifest.keys_sha256 = sha256_hex(&keys_bytes);
    sink.replace(MANIFEST_FILE, &to_pretty(manifest)).await?;
    Ok(())
}
