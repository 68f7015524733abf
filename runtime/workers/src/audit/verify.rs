//! `spendguard audit verify DIR | s3://bucket/prefix`: offline verification of an export, without
//! a database. An S3 export is first copied to a temporary directory ([`verify_s3`]); the checks
//! are the same code either way.
//!
//! Checks, in order; the first failure is reported with its stable code:
//! 1. manifest and keys: parse, format, keys.json's sha256 (`MANIFEST_INVALID`,
//!    `MANIFEST_MISMATCH`, `KEYS_INVALID`);
//! 2. each batch: its file's sha256, event count and first/last position (`MANIFEST_MISMATCH`);
//! 3. each event, in chain order:
//!    - the line's tenant (`TENANT_MISMATCH`) and contiguous position (`CHAIN_GAP`);
//!    - sha256 over the canonical bytes (`EVENT_HASH_MISMATCH`);
//!    - the canonical bytes' schema, tenant, producer, sequence, type and time equal the line's
//!      (`TENANT_MISMATCH`, `EVENT_METADATA_MISMATCH`): the signed bytes, not the line, are the truth;
//!    - the signature through evidence's `KeyRegistry` (signed time inside the key's window, not
//!      revoked): `UNSIGNED`, `KEY_UNKNOWN`, `SIGNATURE_INVALID`, `KEY_REVOKED`, …;
//!    - each producer's signed sequence rises along the chain (`PRODUCER_SEQUENCE_OUT_OF_ORDER`):
//!      ingest appends a producer's events in its sequence order, and the sequence is in the
//!      signed bytes, so a duplicated or reordered event is caught even when its positions and
//!      links were recomputed (a deleted one is not: other tenants' events leave gaps anyway);
//!    - the link: `prev_chain_hash` continues the previous event and
//!      `chain_hash = chain::link(prev, event_sha256)` (`CHAIN_BROKEN`);
//! 4. the manifest's cursor names the last event (`MANIFEST_MISMATCH`);
//! 5. with a checkpoint key ([`VerifyOptions::checkpoint`]): checkpoint.txt exists
//!    (`CHECKPOINT_MISSING`), its signed note verifies under that key name and key
//!    (`CHECKPOINT_INVALID`), its origin is the export's tenant, its tree size is a position of the
//!    export and its root equals that event's `chain_hash` (`CHECKPOINT_MISMATCH`).
//!
//! The checkpoint closes the "cut the tail and rewrite the manifest" gap for everything up to the
//! checkpoint's size: a cut below it leaves the checkpointed position outside the export, and
//! the signed root vouches for every link back to the manifest's anchor (so a mid-chain anchor is
//! no longer taken as given either). Events after the checkpoint's size are covered only by the
//! chain links and the manifest, and an attacker holding an *older* valid checkpoint can still
//! present a consistently truncated export at that older size: only a verifier that knows a newer
//! size (from an independently obtained checkpoint) can tell.

use super::format::{
    BatchEntry, CHECKPOINT_FILE, EventLine, FORMATS_READ, KEYS_FILE, KeysFile, MANIFEST_FILE,
    Manifest, batch_file_name, sha256_hex,
};
use super::sink::{S3Store, SinkError};
use crate::chain::{GENESIS, link};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use sha2::{Digest, Sha256};
use spendguard_core::audit::EVENT_SCHEMA;
use spendguard_evidence::{
    Algorithm, Inclusion, KeyRecord, KeyRegistry, Signed, VerifiedSignatures, VerifyError,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Verification settings.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// A trusted keys file to verify against instead of the export's own keys.json (whose hash
    /// is then not required to match: the auditor's keys are the trust root).
    pub keys: Option<PathBuf>,
    /// Accept unsigned events (exports of a demo-profile installation only).
    pub allow_unsigned: bool,
    /// Require checkpoint.txt signed by this key (name, raw 32-byte Ed25519 public key).
    pub checkpoint: Option<(String, Vec<u8>)>,
    /// A checkpoint note obtained independently of the export (e.g. published with
    /// `spendguard audit publish-checkpoints`), checked under [`VerifyOptions::checkpoint`]
    /// instead of the export's own checkpoint.txt.
    pub checkpoint_note: Option<Vec<u8>>,
}

/// A verified export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Tenant.
    pub tenant_id: String,
    /// Batches.
    pub batches: usize,
    /// Events.
    pub events: u64,
    /// First and last chain positions, when any.
    pub span: Option<(i64, i64)>,
    /// Keys in the registry used.
    pub keys: usize,
    /// Tree size of the verified checkpoint, when one was required.
    pub checkpoint: Option<u64>,
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OK tenant={} batches={} events={} keys={}",
            self.tenant_id, self.batches, self.events, self.keys
        )?;
        if let Some((first, last)) = self.span {
            write!(f, " chain_seq={first}..={last}")?;
        }
        match self.checkpoint {
            Some(size) => write!(f, " checkpoint={size}"),
            None => Ok(()),
        }
    }
}

/// The first failure found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFailure {
    /// A file cannot be read.
    #[error("{path}: {reason}")]
    Unreadable {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The manifest does not parse, has another format, or names an unexpected file.
    #[error("manifest: {0}")]
    ManifestInvalid(String),
    /// A file or the cursor differs from what the manifest records.
    #[error("{file} differs from the manifest: {what}")]
    ManifestMismatch {
        /// File.
        file: String,
        /// Which property.
        what: &'static str,
    },
    /// keys.json does not parse or holds an invalid key.
    #[error("keys: {0}")]
    KeysInvalid(String),
    /// A batch line does not parse.
    #[error("{file} line {line}: {reason}")]
    BatchInvalid {
        /// File.
        file: String,
        /// 1-based line.
        line: usize,
        /// Why.
        reason: String,
    },
    /// An event of another tenant.
    #[error("event {chain_seq} belongs to {found:?}, the export to {expected:?}")]
    TenantMismatch {
        /// Position.
        chain_seq: i64,
        /// Export's tenant.
        expected: String,
        /// Event's tenant.
        found: String,
    },
    /// A position is missing, repeated or out of order.
    #[error("expected chain_seq {expected}, found {found}")]
    ChainGap {
        /// Expected position.
        expected: i64,
        /// Found position.
        found: i64,
    },
    /// The canonical bytes do not hash to `event_sha256`.
    #[error("event {chain_seq}: event_sha256 does not match the canonical bytes")]
    EventHashMismatch {
        /// Position.
        chain_seq: i64,
    },
    /// A line field differs from the canonical (signed) event.
    #[error("event {chain_seq}: {field} differs from the canonical event")]
    EventMetadataMismatch {
        /// Position.
        chain_seq: i64,
        /// Field.
        field: &'static str,
    },
    /// No signature, and unsigned events are not allowed.
    #[error("event {chain_seq} is unsigned")]
    Unsigned {
        /// Position.
        chain_seq: i64,
    },
    /// The key registry refused the signature.
    #[error("event {chain_seq}: {source}")]
    Signature {
        /// Position.
        chain_seq: i64,
        /// The registry's verdict.
        source: VerifyError,
    },
    /// A checkpoint was required and checkpoint.txt is absent.
    #[error("checkpoint.txt is missing")]
    CheckpointMissing,
    /// checkpoint.txt does not verify under the given key.
    #[error("checkpoint: {0}")]
    CheckpointInvalid(crate::checkpoint::CheckpointError),
    /// The checkpoint does not match the export.
    #[error("checkpoint does not match the export: {0}")]
    CheckpointMismatch(&'static str),
    /// The export's location (an S3 prefix) cannot be read.
    #[error(transparent)]
    Source(SinkError),
    /// A producer's signed sequence does not rise along the chain: an event repeated or moved.
    #[error("event {chain_seq}: producer {producer} sequence {sequence} after {previous}")]
    ProducerSequenceOutOfOrder {
        /// Position.
        chain_seq: i64,
        /// Producer.
        producer: String,
        /// This event's sequence.
        sequence: i64,
        /// The producer's sequence before it in the chain.
        previous: i64,
    },
    /// A link does not continue the previous one or does not recompute.
    #[error("event {chain_seq}: {what} breaks the chain")]
    ChainBroken {
        /// Position.
        chain_seq: i64,
        /// Which hash.
        what: &'static str,
    },
}

impl VerifyFailure {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unreadable { .. } => "EXPORT_UNREADABLE",
            Self::ManifestInvalid(_) => "MANIFEST_INVALID",
            Self::ManifestMismatch { .. } => "MANIFEST_MISMATCH",
            Self::KeysInvalid(_) => "KEYS_INVALID",
            Self::BatchInvalid { .. } => "BATCH_INVALID",
            Self::TenantMismatch { .. } => "TENANT_MISMATCH",
            Self::ChainGap { .. } => "CHAIN_GAP",
            Self::EventHashMismatch { .. } => "EVENT_HASH_MISMATCH",
            Self::EventMetadataMismatch { .. } => "EVENT_METADATA_MISMATCH",
            Self::Unsigned { .. } => "UNSIGNED",
            Self::Signature { source, .. } => source.code().as_str(),
            Self::ChainBroken { .. } => "CHAIN_BROKEN",
            Self::ProducerSequenceOutOfOrder { .. } => "PRODUCER_SEQUENCE_OUT_OF_ORDER",
            Self::CheckpointMissing => "CHECKPOINT_MISSING",
            Self::CheckpointInvalid(_) => "CHECKPOINT_INVALID",
            Self::CheckpointMismatch(_) => "CHECKPOINT_MISMATCH",
            Self::Source(error) => error.code(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, VerifyFailure> {
    std::fs::read(path).map_err(|e| VerifyFailure::Unreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Verifies the export in `dir`.
///
/// # Errors
/// The first [`VerifyFailure`].
pub fn verify(dir: &Path, options: &VerifyOptions) -> Result<VerifyReport, VerifyFailure> {
    let manifest: Manifest = serde_json::from_slice(&read(&dir.join(MANIFEST_FILE))?)
        .map_err(|e| VerifyFailure::ManifestInvalid(e.to_string()))?;
    if !FORMATS_READ.contains(&manifest.format.as_str()) {
        return Err(VerifyFailure::ManifestInvalid(format!(
            "unknown format {:?}",
            manifest.format
        )));
    }
    let keys_bytes = match &options.keys {
        Some(path) => read(path)?,
        None => {
            let bytes = read(&dir.join(KEYS_FILE))?;
            if sha256_hex(&bytes) != manifest.keys_sha256 {
                return Err(mismatch(KEYS_FILE, "sha256"));
            }
            bytes
        }
    };
    let registry = registry(&keys_bytes)?;
    let checkpoint = match &options.checkpoint {
        Some((name, key)) => {
            let note = match &options.checkpoint_note {
                Some(note) => note.clone(),
                None => {
                    let path = dir.join(CHECKPOINT_FILE);
                    if !path.exists() {
                        return Err(VerifyFailure::CheckpointMissing);
                    }
                    read(&path)?
                }
            };
            let note = String::from_utf8(note).map_err(|_| {
                VerifyFailure::CheckpointInvalid(crate::checkpoint::CheckpointError::Malformed(
                    "not UTF-8",
                ))
            })?;
            let cp = crate::checkpoint::verify(&note, name, key)
                .map_err(VerifyFailure::CheckpointInvalid)?;
            if cp.origin != crate::checkpoint::origin(&manifest.tenant_id) {
                return Err(VerifyFailure::CheckpointMismatch(
                    "origin is another tenant",
                ));
            }
            Some(cp)
        }
        None => None,
    };
    if !manifest.batches.is_empty()
        && (manifest.first_chain_seq.is_none() || manifest.anchor_prev_chain_hash.is_none())
    {
        return Err(VerifyFailure::ManifestInvalid(
            "batches without first_chain_seq and anchor_prev_chain_hash".into(),
        ));
    }

    let mut chain = ChainState {
        tenant_id: &manifest.tenant_id,
        registry: &registry,
        allow_unsigned: options.allow_unsigned,
        next_seq: manifest.first_chain_seq,
        prev: match &manifest.anchor_prev_chain_hash {
            Some(anchor) => Some(hash32(anchor).ok_or_else(|| {
                VerifyFailure::ManifestInvalid("anchor_prev_chain_hash is not 32 hex bytes".into())
            })?),
            None => None,
        },
        events: 0,
        producer_sequences: HashMap::new(),
        checkpoint_at: checkpoint
            .as_ref()
            .map(|cp| i64::try_from(cp.size).unwrap_or(i64::MAX)),
        checkpoint_hash: None,
        verified: VerifiedSignatures::default(),
    };
    if chain.next_seq == Some(1) && chain.prev != Some(GENESIS) {
        return Err(VerifyFailure::ChainBroken {
            chain_seq: 1,
            what: "anchor_prev_chain_hash of the chain's first event",
        });
    }
    for (index, batch) in manifest.batches.iter().enumerate() {
        if batch.file != batch_file_name(index + 1) {
            return Err(VerifyFailure::ManifestInvalid(format!(
                "batch {} must be named {}",
                index + 1,
                batch_file_name(index + 1)
            )));
        }
        verify_batch(dir, batch, &mut chain)?;
    }
    let last = chain.next_seq.map(|next| next - 1);
    let cursor_ok = match (&manifest.cursor, chain.events) {
        (None, 0) => true,
        (Some(cursor), n) if n > 0 => {
            Some(cursor.chain_seq) == last && hash32(&cursor.chain_hash) == chain.prev
        }
        _ => false,
    };
    if !cursor_ok {
        return Err(mismatch(MANIFEST_FILE, "cursor"));
    }
    if let Some(cp) = &checkpoint {
        match chain.checkpoint_hash {
            None => {
                return Err(VerifyFailure::CheckpointMismatch(
                    "its tree size is not a position of the export (truncated?)",
                ));
            }
            Some(hash) if hash != cp.root => {
                return Err(VerifyFailure::CheckpointMismatch(
                    "root differs from the chain hash at its tree size",
                ));
            }
            Some(_) => {}
        }
    }
    Ok(VerifyReport {
        tenant_id: manifest.tenant_id.clone(),
        batches: manifest.batches.len(),
        events: chain.events,
        span: manifest
            .first_chain_seq
            .zip(last)
            .filter(|_| chain.events > 0),
        keys: registry.len(),
        checkpoint: checkpoint.map(|cp| cp.size),
    })
}

/// Verifies the export under an S3 prefix: copies it into a temporary directory
/// ([`S3Store::download_export`]) and runs [`verify`] there.
///
/// # Errors
/// [`VerifyFailure::Source`] when the store cannot be read; otherwise the first failure of
/// [`verify`], with file paths shown as the objects' URLs.
pub async fn verify_s3(
    store: &S3Store,
    url: &str,
    options: &VerifyOptions,
) -> Result<VerifyReport, VerifyFailure> {
    let dir = tempfile::tempdir().map_err(|e| VerifyFailure::Unreadable {
        path: std::env::temp_dir(),
        reason: e.to_string(),
    })?;
    store
        .download_export(dir.path())
        .await
        .map_err(VerifyFailure::Source)?;
    verify(dir.path(), options).map_err(|failure| match failure {
        VerifyFailure::Unreadable { path, reason } => {
            let name = path.strip_prefix(dir.path()).map_or_else(
                |_| path.display().to_string(),
                |name| format!("{}/{}", url.trim_end_matches('/'), name.display()),
            );
            VerifyFailure::Unreadable {
                path: PathBuf::from(name),
                reason,
            }
        }
        other => other,
    })
}

fn mismatch(file: &str, what: &'static str) -> VerifyFailure {
    VerifyFailure::ManifestMismatch {
        file: file.to_owned(),
        what,
    }
}

fn hash32(hex_hash: &str) -> Option<[u8; 32]> {
    hex::decode(hex_hash).ok()?.try_into().ok()
}

fn registry(bytes: &[u8]) -> Result<KeyRegistry, VerifyFailure> {
    let invalid = |reason: String| VerifyFailure::KeysInvalid(reason);
    let file: KeysFile = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    if !FORMATS_READ.contains(&file.format.as_str()) {
        return Err(invalid(format!("unknown format {:?}", file.format)));
    }
    let mut registry = KeyRegistry::new();
    for key in file.keys {
        let algorithm: Algorithm = key
            .algorithm
            .parse()
            .map_err(|e| invalid(format!("{}: {e}", key.key_id)))?;
        let public_key = BASE64
            .decode(&key.public_key)
            .map_err(|e| invalid(format!("{}: public_key: {e}", key.key_id)))?;
        let mut record = KeyRecord::new(
            key.key_id.clone(),
            algorithm,
            &public_key,
            key.valid_from,
            key.valid_until,
        )
        .map_err(|e| invalid(e.to_string()))?;
        if let Some(at) = key.revoked_at {
            record = record.revoked(at);
        }
        // A repeated id is refused rather than letting the later entry win silently.
        if registry.get(&key.key_id).is_some() {
            return Err(invalid(format!("{} is listed twice", key.key_id)));
        }
        registry
            .upsert(record)
            .map_err(|e| invalid(e.to_string()))?;
    }
    Ok(registry)
}

/// What the next event must continue.
struct ChainState<'a> {
    tenant_id: &'a str,
    registry: &'a KeyRegistry,
    allow_unsigned: bool,
    next_seq: Option<i64>,
    prev: Option<[u8; 32]>,
    events: u64,
    /// Position a checkpoint names, and the verified chain hash found there.
    checkpoint_at: Option<i64>,
    checkpoint_hash: Option<[u8; 32]>,
    /// Batch signatures already checked (events of one batch share one).
    verified: VerifiedSignatures,
    /// Each producer's last sequence seen along the chain.
    producer_sequences: HashMap<String, i64>,
}

fn verify_batch(
    dir: &Path,
    batch: &BatchEntry,
    chain: &mut ChainState<'_>,
) -> Result<(), VerifyFailure> {
    let bytes = read(&dir.join(&batch.file))?;
    if sha256_hex(&bytes) != batch.sha256 {
        return Err(mismatch(&batch.file, "sha256"));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| VerifyFailure::BatchInvalid {
        file: batch.file.clone(),
        line: 0,
        reason: "not UTF-8".into(),
    })?;
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = Vec::new();
    for (index, raw) in body.split('\n').enumerate() {
        let line: EventLine =
            serde_json::from_str(raw).map_err(|e| VerifyFailure::BatchInvalid {
                file: batch.file.clone(),
                line: index + 1,
                reason: e.to_string(),
            })?;
        lines.push(line);
    }
    let count_ok = u64::try_from(lines.len()).is_ok_and(|n| n == batch.events);
    let first_ok = lines.first().map(|l| l.chain_seq) == Some(batch.first_chain_seq);
    let last_ok = lines.last().map(|l| l.chain_seq) == Some(batch.last_chain_seq);
    if !(count_ok && first_ok && last_ok) {
        return Err(mismatch(&batch.file, "event count or first/last chain_seq"));
    }
    for (index, line) in lines.iter().enumerate() {
        verify_event(&batch.file, index + 1, line, chain)?;
    }
    Ok(())
}

fn verify_event(
    file: &str,
    line_no: usize,
    line: &EventLine,
    chain: &mut ChainState<'_>,
) -> Result<(), VerifyFailure> {
    let seq = line.chain_seq;
    let malformed = |reason: String| VerifyFailure::BatchInvalid {
        file: file.to_owned(),
        line: line_no,
        reason,
    };
    if line.tenant_id != chain.tenant_id {
        return Err(VerifyFailure::TenantMismatch {
            chain_seq: seq,
            expected: chain.tenant_id.to_owned(),
            found: line.tenant_id.clone(),
        });
    }
    let expected = chain.next_seq.unwrap_or(seq);
    if seq != expected {
        return Err(VerifyFailure::ChainGap {
            expected,
            found: seq,
        });
    }
    let bytes = BASE64
        .decode(&line.canonical_event)
        .map_err(|e| malformed(format!("canonical_event: {e}")))?;
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    if hash32(&line.event_sha256) != Some(digest) {
        return Err(VerifyFailure::EventHashMismatch { chain_seq: seq });
    }
    check_canonical(line, &bytes, chain.tenant_id)?;
    match &line.signature {
        None if chain.allow_unsigned => {}
        None => return Err(VerifyFailure::Unsigned { chain_seq: seq }),
        Some(meta) => {
            let signed = Signed {
                key_id: meta.key_id.clone(),
                algorithm: meta
                    .algorithm
                    .parse()
                    .map_err(|_| VerifyFailure::Signature {
                        chain_seq: seq,
                        source: VerifyError::Malformed("algorithm"),
                    })?,
                signed_at: meta.signed_at,
                producer_id: line.producer_instance_id.clone(),
                signature: BASE64
                    .decode(&meta.signature)
                    .map_err(|e| malformed(format!("signature: {e}")))?,
                inclusion: meta
                    .inclusion
                    .as_ref()
                    .map(|proof| {
                        let bytes = BASE64
                            .decode(proof)
                            .map_err(|e| malformed(format!("inclusion: {e}")))?;
                        Inclusion::from_bytes(&bytes).map_err(|_| VerifyFailure::Signature {
                            chain_seq: seq,
                            source: VerifyError::Malformed("inclusion proof"),
                        })
                    })
                    .transpose()?,
            };
            chain
                .registry
                .verify_cached(&signed, &bytes, &mut chain.verified)
                .map_err(|source| VerifyFailure::Signature {
                    chain_seq: seq,
                    source,
                })?;
        }
    }
    // The sequence is the signed one (check_canonical compared it with the signed bytes).
    if let Some(previous) = chain
        .producer_sequences
        .insert(line.producer_instance_id.clone(), line.producer_sequence)
        && line.producer_sequence <= previous
    {
        return Err(VerifyFailure::ProducerSequenceOutOfOrder {
            chain_seq: seq,
            producer: line.producer_instance_id.clone(),
            sequence: line.producer_sequence,
            previous,
        });
    }
    // Set from the manifest's anchor before the first event, then from each verified link.
    let prev = chain.prev.unwrap_or(GENESIS);
    if hash32(&line.prev_chain_hash) != Some(prev) {
        return Err(VerifyFailure::ChainBroken {
            chain_seq: seq,
            what: "prev_chain_hash",
        });
    }
    let next = link(&prev, &digest);
    if hash32(&line.chain_hash) != Some(next) {
        return Err(VerifyFailure::ChainBroken {
            chain_seq: seq,
            what: "chain_hash",
        });
    }
    chain.prev = Some(next);
    if chain.checkpoint_at == Some(seq) {
        chain.checkpoint_hash = Some(next);
    }
    chain.next_seq = Some(seq + 1);
    chain.events += 1;
    Ok(())
}

/// The signed canonical bytes are the evidence; the line's columns must agree with them.
fn check_canonical(line: &EventLine, bytes: &[u8], tenant_id: &str) -> Result<(), VerifyFailure> {
    let seq = line.chain_seq;
    let differs = |field| VerifyFailure::EventMetadataMismatch {
        chain_seq: seq,
        field,
    };
    let event: Value = serde_json::from_slice(bytes).map_err(|_| differs("canonical_event"))?;
    let field = |name: &str| event.get(name).cloned().unwrap_or(Value::Null);
    if field("tenant_id") != tenant_id {
        return Err(VerifyFailure::TenantMismatch {
            chain_seq: seq,
            expected: tenant_id.to_owned(),
            found: field("tenant_id").to_string(),
        });
    }
    let expected = [
        ("schema", Value::from(EVENT_SCHEMA)),
        (
            "producer_instance_id",
            Value::from(line.producer_instance_id.as_str()),
        ),
        ("producer_sequence", Value::from(line.producer_sequence)),
        ("event_type", Value::from(line.event_type.as_str())),
        ("occurred_at", Value::from(line.occurred_at.as_str())),
    ];
    for (name, want) in expected {
        if field(name) != want {
            return Err(differs(name));
        }
    }
    Ok(())
}
