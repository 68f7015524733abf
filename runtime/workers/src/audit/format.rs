//! The on-disk export format (`spendguard.audit-export.v2`; v1 had no inclusion proofs), shared by the exporter and the
//! offline verifier. Field names are a stored contract: auditors keep these files for years.
//!
//! ```text
//! DIR/
//!   manifest.json        tenant, range, anchor, per batch {file, events, first/last seq, sha256},
//!                        sha256 of keys.json, cursor = last exported {chain_seq, chain_hash}
//!   keys.json            public keys that signed exported events, with windows and revocations
//!   batch-000001.jsonl   one EventLine per line, in chain order
//!   batch-000002.jsonl   …
//!   checkpoint.txt       the newest signed checkpoint (C2SP signed note, see
//!                        `crate::checkpoint`) whose tree size lies in the exported span, if any
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write as _;
use std::path::Path;

/// Format tag in the manifest and keys file that the exporter writes. v2 added a batch
/// signature's inclusion proof to an event line's signature (`SignatureMeta::inclusion`).
pub const FORMAT: &str = "spendguard.audit-export.v2";

/// Every format tag the verifier reads: v1 exports (single-event signatures only) stay verifiable.
pub const FORMATS_READ: &[&str] = &["spendguard.audit-export.v1", FORMAT];
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The keys file's name.
pub const KEYS_FILE: &str = "keys.json";
/// The checkpoint note's file name. Not listed in the manifest: the note is signed on its own.
pub const CHECKPOINT_FILE: &str = "checkpoint.txt";

/// The name of the `n`th batch (1-based). The verifier accepts only these names, in order, so a
/// manifest can never point outside the export directory.
pub fn batch_file_name(n: usize) -> String {
    format!("batch-{n:06}.jsonl")
}

/// One chained event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLine {
    /// Tenant of the chain.
    pub tenant_id: String,
    /// Position in the tenant's chain (1-based, contiguous).
    pub chain_seq: i64,
    /// Producer that emitted the event (the signature's producer id).
    pub producer_instance_id: String,
    /// The producer's sequence number.
    pub producer_sequence: i64,
    /// Event type.
    pub event_type: String,
    /// Occurrence time as the canonical event states it (RFC 3339, UTC, microseconds).
    pub occurred_at: String,
    /// The exact canonical bytes, standard base64.
    pub canonical_event: String,
    /// Hex sha256 of the canonical bytes.
    pub event_sha256: String,
    /// The producer's signature; absent only for events chained under the demo profile.
    pub signature: Option<SignatureMeta>,
    /// Hex link before this event.
    pub prev_chain_hash: String,
    /// Hex link of this event.
    pub chain_hash: String,
}

/// Signature metadata, as `spendguard_evidence::Signed` minus the producer (the event's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureMeta {
    /// Key registry id.
    pub key_id: String,
    /// `ed25519` or `ecdsa-p256-sha256`.
    pub algorithm: String,
    /// Signed time (whole milliseconds).
    pub signed_at: DateTime<Utc>,
    /// Signature bytes, standard base64.
    pub signature: String,
    /// For a batch signature, the event's inclusion proof (`spendguard_evidence::Inclusion`'s
    /// stored form), standard base64; absent when the signature covers this event alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inclusion: Option<String>,
}

/// The export's table of contents and commit point: a batch exists once the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The one tenant of every event.
    pub tenant_id: String,
    /// The requested occurrence range (`from` inclusive, `to` exclusive).
    pub range: Range,
    /// Chain position of the first exported event; `None` while nothing is exported.
    pub first_chain_seq: Option<i64>,
    /// Hex `prev_chain_hash` of the first exported event: 32 zero bytes when the export starts
    /// at the chain's beginning, otherwise the link a checkpoint must vouch for.
    pub anchor_prev_chain_hash: Option<String>,
    /// Batches in order.
    pub batches: Vec<BatchEntry>,
    /// Hex sha256 of keys.json as written with this manifest.
    pub keys_sha256: String,
    /// The last exported event; `--resume` continues after it.
    pub cursor: Option<Cursor>,
}

/// The requested occurrence range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    /// Inclusive start.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive end.
    pub to: Option<DateTime<Utc>>,
}

/// One batch file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchEntry {
    /// File name ([`batch_file_name`]).
    pub file: String,
    /// Number of events (lines).
    pub events: u64,
    /// Chain position of the first line.
    pub first_chain_seq: i64,
    /// Chain position of the last line.
    pub last_chain_seq: i64,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
}

/// The resume point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// Last exported chain position.
    pub chain_seq: i64,
    /// Its hex chain hash; the next exported event must link to it.
    pub chain_hash: String,
}

/// keys.json.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// [`FORMAT`].
    pub format: String,
    /// Keys sorted by id.
    pub keys: Vec<KeyEntry>,
}

/// A public key as `signing_keys` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Registry id.
    pub key_id: String,
    /// `ed25519` or `ecdsa-p256-sha256`.
    pub algorithm: String,
    /// Canonical public key bytes (raw Ed25519 or P-256 SPKI), standard base64.
    pub public_key: String,
    /// Inclusive window start.
    pub valid_from: DateTime<Utc>,
    /// Exclusive window end.
    pub valid_until: Option<DateTime<Utc>>,
    /// Signatures at or after this instant are refused.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Pretty JSON with a trailing newline (manifest and keys are read by people too).
pub fn to_pretty(value: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("export types always serialize");
    bytes.push(b'\n');
    bytes
}

/// Replaces `dir/name` with `bytes` so that a reader sees the old or the new file, never a mix:
/// write a temp file, fsync it, rename it over the target, fsync the directory.
///
/// # Errors
/// Any I/O failure; the target is then unchanged.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
