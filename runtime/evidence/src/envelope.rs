//! What a signature covers: a small RFC 8785 envelope that binds the event's sha256 to the key id,
//! the algorithm, the signing time and the producer identity.
//!
//! ```text
//! canonical event bytes ──sha256──┐
//! key_id, algorithm, signed_at,   ├─► {"algorithm":…,"event_sha256":…,"key_id":…,"producer_id":…,
//! producer_id ────────────────────┘    "schema":"spendguard.signature.v1","signed_at":…}  ──► sign
//! ```
//!
//! Signing the envelope instead of the bare event bytes means a verifier can trust the signed time
//! (it judges key windows against it) and the producer identity, and nobody can move a signature
//! to another key id. The envelope is at most a few hundred bytes, so AWS KMS always takes it as a
//! RAW message (RAW is limited to 4096 bytes; DIGEST is avoided, see docs/design/evidence-signing.md).

use crate::batch::Inclusion;
use chrono::{DateTime, SecondsFormat, Timelike, Utc};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// Schema tag inside every envelope; it separates signatures over events from anything else a
/// SpendGuard key signs (checkpoints use the C2SP note format, which can never parse as this).
pub const ENVELOPE_SCHEMA: &str = "spendguard.signature.v1";

/// Schema tag of a batch envelope: a signature over the Merkle root of several events
/// ([`crate::batch`]). A different tag, so a batch root can never pass for one event's sha256.
pub const BATCH_ENVELOPE_SCHEMA: &str = "spendguard.batch-signature.v1";

/// Longest key id or producer id, in bytes. Keeps the envelope far below KMS's 4096-byte RAW limit.
pub const IDENTIFIER_LEN_MAX: usize = 128;

/// Upper bound on an envelope's size (two identifiers at their maximum plus fixed fields).
pub const ENVELOPE_LEN_MAX: usize = 512;

/// A signature algorithm. The string forms are a stored contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Ed25519 (RFC 8032), verified strictly (no malleable signatures, no weak keys).
    Ed25519,
    /// ECDSA over NIST P-256 with SHA-256; signatures are stored as 64 bytes r‖s with low S.
    EcdsaP256Sha256,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: &'static [Algorithm] = &[Algorithm::Ed25519, Algorithm::EcdsaP256Sha256];

    /// The stable string form.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
        }
    }

    /// Prefix of key ids derived from public keys of this algorithm.
    pub const fn key_id_prefix(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256Sha256 => "ecdsa-p256",
        }
    }

    /// Length of a signature in bytes.
    pub const fn signature_len(self) -> usize {
        64
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = EnvelopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| EnvelopeError::AlgorithmUnknown(s.chars().take(32).collect()))
    }
}

/// A producer's signature over canonical event bytes, with the metadata it covers.
///
/// The event bytes themselves are not held here: they are stored next to the signature and
/// handed to the verifier separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// Key registry id of the signing key.
    pub key_id: String,
    /// Signature algorithm.
    pub algorithm: Algorithm,
    /// Signing time, UTC, whole milliseconds.
    pub signed_at: DateTime<Utc>,
    /// Identity of the producing instance (e.g. the ledger's producer instance id).
    pub producer_id: String,
    /// Signature bytes: 64 for both algorithms (ECDSA as r‖s, low S).
    pub signature: Vec<u8>,
    /// Set when the signature covers a batch: where this event sits in it. `None` for a
    /// signature over this one event.
    pub inclusion: Option<Inclusion>,
}

impl Signed {
    /// The exact bytes this signature covers, given the event's canonical bytes: the event's
    /// own envelope, or the envelope of the batch root its inclusion proof leads to.
    ///
    /// # Errors
    /// When the metadata cannot be part of an envelope (see [`signing_input`]), or the inclusion
    /// proof does not fit its index and count ([`EnvelopeError::InclusionInvalid`]).
    pub fn signing_input(&self, canonical_event: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        match &self.inclusion {
            None => signing_input(
                &self.key_id,
                self.algorithm,
                self.signed_at,
                &self.producer_id,
                canonical_event,
            ),
            Some(inclusion) => {
                let event_sha256: [u8; 32] = Sha256::digest(canonical_event).into();
                let root = inclusion
                    .root(&event_sha256)
                    .ok_or(EnvelopeError::InclusionInvalid)?;
                batch_signing_input(
                    &self.key_id,
                    self.algorithm,
                    self.signed_at,
                    &self.producer_id,
                    &root,
                    inclusion.count,
                )
            }
        }
    }
}

/// The bytes a signer signs: an event or batch envelope rendered by this module. Signers take
/// nothing else, so a producer key never signs bytes that are not an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope(Vec<u8>);

impl Envelope {
    /// The envelope of one event ([`signing_input`]). Crate-private: the signer's provided
    /// methods render envelopes with its own key id, algorithm and producer only.
    ///
    /// # Errors
    /// As [`signing_input`].
    pub(crate) fn of_event(
        key_id: &str,
        algorithm: Algorithm,
        signed_at: DateTime<Utc>,
        producer_id: &str,
        canonical_event: &[u8],
    ) -> Result<Self, EnvelopeError> {
        signing_input(key_id, algorithm, signed_at, producer_id, canonical_event).map(Self)
    }

    /// The envelope of a batch ([`batch_signing_input`]); crate-private like [`Envelope::of_event`].
    ///
    /// # Errors
    /// As [`batch_signing_input`].
    pub(crate) fn of_batch(
        key_id: &str,
        algorithm: Algorithm,
        signed_at: DateTime<Utc>,
        producer_id: &str,
        events_root: &[u8; 32],
        event_count: u32,
    ) -> Result<Self, EnvelopeError> {
        batch_signing_input(
            key_id,
            algorithm,
            signed_at,
            producer_id,
            events_root,
            event_count,
        )
        .map(Self)
    }

    /// The canonical bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Why metadata cannot be put into an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A key id or producer id is empty, too long or has characters outside `[A-Za-z0-9._:/@-]`.
    #[error("{field} must be 1..={IDENTIFIER_LEN_MAX} characters of [A-Za-z0-9._:/@-]")]
    IdentifierInvalid {
        /// `key_id` or `producer_id`.
        field: &'static str,
    },
    /// The signing time has a sub-millisecond part or is outside years 1970..=9999.
    #[error("signed_at must be whole milliseconds between 1970 and 9999")]
    SignedAtInvalid,
    /// An algorithm name this version does not know.
    #[error("unknown signature algorithm {0:?}")]
    AlgorithmUnknown(String),
    /// A batch inclusion proof whose path does not fit its index and count.
    #[error("inclusion proof does not fit its index and count")]
    InclusionInvalid,
    /// A batch of no events, or of more than [`crate::batch::BATCH_EVENTS_MAX`].
    #[error(
        "a batch signature covers 1..={} events",
        crate::batch::BATCH_EVENTS_MAX
    )]
    BatchSizeInvalid,
}

/// Checks a key id or producer id.
///
/// # Errors
/// [`EnvelopeError::IdentifierInvalid`].
pub fn check_identifier(field: &'static str, value: &str) -> Result<(), EnvelopeError> {
    let ok = !value.is_empty()
        && value.len() <= IDENTIFIER_LEN_MAX
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'@' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(EnvelopeError::IdentifierInvalid { field })
    }
}

/// The current time, truncated to whole milliseconds (what signers stamp).
pub fn now_ms() -> DateTime<Utc> {
    truncate_to_ms(Utc::now())
}

/// Truncates a time to whole milliseconds.
pub fn truncate_to_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = t.nanosecond() % 1_000_000_000;
    let keep = nanos - nanos % 1_000_000;
    t.with_nanosecond(keep)
        .expect("a nanosecond value below the original's is valid")
}

fn check_signed_at(t: DateTime<Utc>) -> Result<(), EnvelopeError> {
    let whole_ms = t.nanosecond().is_multiple_of(1_000_000) && t.nanosecond() < 1_000_000_000;
    let in_range = t >= DateTime::UNIX_EPOCH && t.timestamp() <= 253_402_300_799; // 9999-12-31T23:59:59Z
    if whole_ms && in_range {
        Ok(())
    } else {
        Err(EnvelopeError::SignedAtInvalid)
    }
}

/// Renders the envelope that a signature covers.
///
/// # Errors
/// When an identifier or the time cannot be represented exactly (see [`EnvelopeError`]).
///
/// # Guarantees
/// The output is RFC 8785 canonical JSON of at most [`ENVELOPE_LEN_MAX`] bytes; equal inputs give
/// equal bytes, and any change to any input changes the bytes.
pub fn signing_input(
    key_id: &str,
    algorithm: Algorithm,
    signed_at: DateTime<Utc>,
    producer_id: &str,
    canonical_event: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    check_metadata(key_id, producer_id, signed_at)?;
    Ok(render(&json!({
        "schema": ENVELOPE_SCHEMA,
        "key_id": key_id,
        "algorithm": algorithm.as_str(),
        "signed_at": signed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "producer_id": producer_id,
        "event_sha256": hex::encode(Sha256::digest(canonical_event)),
    })))
}

/// Checks the metadata every envelope carries.
fn check_metadata(
    key_id: &str,
    producer_id: &str,
    signed_at: DateTime<Utc>,
) -> Result<(), EnvelopeError> {
    check_identifier("key_id", key_id)?;
    check_identifier("producer_id", producer_id)?;
    check_signed_at(signed_at)
}

/// The canonical bytes of an envelope whose fields were checked.
fn render(envelope: &serde_json::Value) -> Vec<u8> {
    let bytes = serde_json_canonicalizer::to_vec(envelope)
        .expect("an object of strings and integers always canonicalizes");
    assert!(
        bytes.len() <= ENVELOPE_LEN_MAX,
        "envelope bounded by its checked fields"
    );
    bytes
}

/// Renders the envelope of a batch signature: the Merkle root of the batch's events
/// ([`crate::batch::BatchTree`]) and their count, with the same metadata as [`signing_input`].
///
/// # Errors
/// As [`signing_input`].
///
/// # Guarantees
/// As [`signing_input`]; its schema tag differs from the single-event envelope's, so no batch
/// envelope equals any event envelope.
pub fn batch_signing_input(
    key_id: &str,
    algorithm: Algorithm,
    signed_at: DateTime<Utc>,
    producer_id: &str,
    events_root: &[u8; 32],
    event_count: u32,
) -> Result<Vec<u8>, EnvelopeError> {
    check_metadata(key_id, producer_id, signed_at)?;
    Ok(render(&json!({
        "schema": BATCH_ENVELOPE_SCHEMA,
        "key_id": key_id,
        "algorithm": algorithm.as_str(),
        "signed_at": signed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "producer_id": producer_id,
        "events_root": hex::encode(events_root),
        "event_count": event_count,
    })))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn envelope_is_canonical_and_pinned() {
        // Goal: the envelope bytes are a stored contract; pin them exactly.
        let at = Utc.timestamp_millis_opt(1_767_225_600_123).unwrap();
        let bytes = signing_input(
            "ed25519:0011223344556677",
            Algorithm::Ed25519,
            at,
            "ledger-0",
            b"{}",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            concat!(
                r#"{"algorithm":"ed25519","#,
                r#""event_sha256":"44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","#,
                r#""key_id":"ed25519:0011223344556677","producer_id":"ledger-0","#,
                r#""schema":"spendguard.signature.v1","signed_at":"2026-01-01T00:00:00.123Z"}"#
            )
        );
    }

    #[test]
    fn batch_envelope_is_canonical_pinned_and_never_an_event_envelope() {
        // Goal: the batch envelope bytes are a stored contract too, and carry their own schema.
        let at = Utc.timestamp_millis_opt(1_767_225_600_123).unwrap();
        let bytes = batch_signing_input(
            "ed25519:0011223344556677",
            Algorithm::Ed25519,
            at,
            "ledger-0",
            &[0xab; 32],
            3,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            concat!(
                r#"{"algorithm":"ed25519","event_count":3,"#,
                r#""events_root":"abababababababababababababababababababababababababababababababab","#,
                r#""key_id":"ed25519:0011223344556677","producer_id":"ledger-0","#,
                r#""schema":"spendguard.batch-signature.v1","signed_at":"2026-01-01T00:00:00.123Z"}"#
            )
        );
        let longest = "x".repeat(IDENTIFIER_LEN_MAX);
        let max_at = Utc.timestamp_millis_opt(253_402_300_799_999).unwrap();
        let bytes = batch_signing_input(
            &longest,
            Algorithm::EcdsaP256Sha256,
            max_at,
            &longest,
            &[0xff; 32],
            u32::MAX,
        )
        .unwrap();
        assert!(bytes.len() <= ENVELOPE_LEN_MAX);
    }

    #[test]
    fn envelope_refuses_what_it_cannot_represent_exactly() {
        // Goal: no two distinct metadata values render to the same envelope.
        let at = Utc.timestamp_millis_opt(1_000).unwrap();
        let sub_ms = at + chrono::Duration::microseconds(1);
        assert_eq!(
            signing_input("k", Algorithm::Ed25519, sub_ms, "p", b""),
            Err(EnvelopeError::SignedAtInvalid)
        );
        let before_epoch = DateTime::UNIX_EPOCH - chrono::Duration::milliseconds(1);
        assert_eq!(
            signing_input("k", Algorithm::Ed25519, before_epoch, "p", b""),
            Err(EnvelopeError::SignedAtInvalid)
        );
        for bad in ["", "a b", "a\"b", "ä", &"x".repeat(IDENTIFIER_LEN_MAX + 1)] {
            assert!(
                signing_input(bad, Algorithm::Ed25519, at, "p", b"").is_err(),
                "{bad:?}"
            );
            assert!(
                signing_input("k", Algorithm::Ed25519, at, bad, b"").is_err(),
                "{bad:?}"
            );
        }
        let longest = "x".repeat(IDENTIFIER_LEN_MAX);
        let max_at = Utc.timestamp_millis_opt(253_402_300_799_999).unwrap();
        let bytes =
            signing_input(&longest, Algorithm::EcdsaP256Sha256, max_at, &longest, b"").unwrap();
        assert!(bytes.len() <= ENVELOPE_LEN_MAX);
    }

    #[test]
    fn truncation_keeps_whole_milliseconds() {
        let t = Utc.timestamp_nanos(1_700_000_000_123_456_789);
        assert_eq!(
            truncate_to_ms(t),
            Utc.timestamp_millis_opt(1_700_000_000_123).unwrap()
        );
        assert!(check_signed_at(now_ms()).is_ok());
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>().unwrap(), *a);
        }
        assert!("rsa".parse::<Algorithm>().is_err());
    }
}
