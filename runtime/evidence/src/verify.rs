//! Verification: public keys, key records with validity windows and revocation, and the key
//! registry that judges a [`Signed`] against the exact canonical bytes.
//!
//! Order of checks, so that each refusal has one precise reason:
//!
//! ```text
//! key id known? ─no─► KEY_UNKNOWN
//!   algorithm = key's? ─no─► ALGORITHM_MISMATCH
//!     envelope renderable, signature well formed? ─no─► SIGNATURE_MALFORMED
//!       signature valid over envelope(event sha256, key id, algorithm, signed_at, producer)?
//!                                                  ─no─► SIGNATURE_INVALID
//!         signed_at ≥ revoked_at? ─yes─► KEY_REVOKED
//!           valid_from ≤ signed_at < valid_until? ─no─► KEY_OUTSIDE_WINDOW
//!             (verify_at only) signed_at ≤ now + skew? ─no─► SIGNED_AT_IN_FUTURE
//! ```
//!
//! The cryptographic check comes before the time checks: `signed_at` is only trusted once the
//! signature over it holds, so a forged time can never pick its own quarantine reason.

use crate::code::EvidenceCode;
use crate::envelope::{Algorithm, EnvelopeError, Signed};
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;

/// A parsed public key. Construction validates it, so verification never meets a bad key.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// Ed25519 (never a weak key).
    Ed25519(ed25519_dalek::VerifyingKey),
    /// ECDSA P-256.
    EcdsaP256(p256::ecdsa::VerifyingKey),
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({}, {})",
            self.algorithm(),
            hex::encode(self.to_bytes())
        )
    }
}

/// Why a public key or key record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The bytes are not a valid public key of the algorithm.
    #[error("public key is not a valid {algorithm} key: {reason}")]
    PublicKeyInvalid {
        /// Declared algorithm.
        algorithm: Algorithm,
        /// What is wrong.
        reason: &'static str,
    },
    /// `valid_until` is not after `valid_from`.
    #[error("key {key_id}: valid_until must be after valid_from")]
    WindowInvalid {
        /// Key id.
        key_id: String,
    },
    /// A key id with bad characters or length.
    #[error("key id: {0}")]
    KeyIdInvalid(EnvelopeError),
    /// The id is registered with a different public key or algorithm.
    #[error("key id {0} is already registered with a different public key")]
    KeyIdConflict(String),
    /// No key with this id is registered.
    #[error("key {0} is not in the registry")]
    KeyUnknown(String),
    /// An update tried to clear or postpone a revocation.
    #[error("key {0} is revoked; a revocation can only be moved earlier, never cleared")]
    RevocationIrreversible(String),
}

impl KeyError {
    /// The stable code.
    pub fn code(&self) -> EvidenceCode {
        match self {
            Self::PublicKeyInvalid { .. } => EvidenceCode::PublicKeyInvalid,
            Self::WindowInvalid { .. } => EvidenceCode::KeyWindowInvalid,
            Self::KeyIdInvalid(_) => EvidenceCode::PublicKeyInvalid,
            Self::KeyIdConflict(_) => EvidenceCode::KeyIdConflict,
            Self::KeyUnknown(_) => EvidenceCode::KeyUnknown,
            Self::RevocationIrreversible(_) => EvidenceCode::KeyRevocationIrreversible,
        }
    }
}

impl PublicKey {
    /// Parses a public key: Ed25519 as 32 raw bytes or DER SubjectPublicKeyInfo; P-256 as DER
    /// SubjectPublicKeyInfo (what KMS GetPublicKey returns) or a SEC1 point.
    ///
    /// # Errors
    /// [`KeyError::PublicKeyInvalid`] for anything else, including weak Ed25519 keys.
    pub fn from_bytes(algorithm: Algorithm, bytes: &[u8]) -> Result<Self, KeyError> {
        let invalid = |reason| KeyError::PublicKeyInvalid { algorithm, reason };
        match algorithm {
            Algorithm::Ed25519 => {
                use ed25519_dalek::pkcs8::DecodePublicKey;
                let key = match <&[u8; 32]>::try_from(bytes) {
                    Ok(raw) => ed25519_dalek::VerifyingKey::from_bytes(raw)
                        .map_err(|_| invalid("not a point on the curve"))?,
                    Err(_) => ed25519_dalek::VerifyingKey::from_public_key_der(bytes)
                        .map_err(|_| invalid("neither 32 raw bytes nor an Ed25519 SPKI"))?,
                };
                if key.is_weak() {
                    return Err(invalid("weak (small-order) key"));
                }
                Ok(Self::Ed25519(key))
            }
            Algorithm::EcdsaP256Sha256 => {
                use p256::pkcs8::DecodePublicKey;
                p256::ecdsa::VerifyingKey::from_public_key_der(bytes)
                    .or_else(|_| p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes))
                    .map(Self::EcdsaP256)
                    .map_err(|_| invalid("neither a P-256 SPKI nor a SEC1 point"))
            }
        }
    }

    /// The algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::Ed25519,
            Self::EcdsaP256(_) => Algorithm::EcdsaP256Sha256,
        }
    }

    /// Canonical bytes: raw 32 bytes for Ed25519, DER SPKI (uncompressed point) for P-256. These
    /// are what SigningKey CRs carry (base64) and what key ids are derived from.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Ed25519(key) => key.to_bytes().to_vec(),
            Self::EcdsaP256(key) => {
                use p256::pkcs8::EncodePublicKey;
                key.to_public_key_der()
                    .expect("a valid P-256 key always encodes")
                    .as_bytes()
                    .to_vec()
            }
        }
    }

    /// The key id derived from the key: `<prefix>:<first 16 hex digits of sha256(canonical bytes)>`,
    /// e.g. `ed25519:3f1c…` or `ecdsa-p256:9a0b…`.
    pub fn derived_key_id(&self) -> String {
        let digest = Sha256::digest(self.to_bytes());
        format!(
            "{}:{}",
            self.algorithm().key_id_prefix(),
            hex::encode(&digest[..8])
        )
    }

    /// Checks a signature over `message`.
    fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureCheck> {
        match self {
            Self::Ed25519(key) => {
                let bytes =
                    <&[u8; 64]>::try_from(signature).map_err(|_| SignatureCheck::Malformed)?;
                let signature = ed25519_dalek::Signature::from_bytes(bytes);
                key.verify_strict(message, &signature)
                    .map_err(|_| SignatureCheck::Invalid)
            }
            Self::EcdsaP256(key) => {
                use p256::ecdsa::signature::Verifier as _;
                if signature.len() != 64 {
                    return Err(SignatureCheck::Malformed);
                }
                let signature = p256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| SignatureCheck::Malformed)?;
                // Only the low-S form is accepted, so no event has two valid signatures.
                if signature.normalize_s().is_some() {
                    return Err(SignatureCheck::Malformed);
                }
                key.verify(message, &signature)
                    .map_err(|_| SignatureCheck::Invalid)
            }
        }
    }
}

enum SignatureCheck {
    Malformed,
    Invalid,
}

/// A verification key with its validity window and revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Registry id (derived with [`PublicKey::derived_key_id`] unless configured).
    pub key_id: String,
    /// The public key; it determines the algorithm.
    pub public_key: PublicKey,
    /// First instant at which signatures are valid (inclusive).
    pub valid_from: DateTime<Utc>,
    /// End of validity (exclusive); `None` while the key is current.
    pub valid_until: Option<DateTime<Utc>>,
    /// Signatures made at or after this instant are refused. Set it no later than the first
    /// instant the key may have been exposed.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyRecord {
    /// Why a signature made at `signed_at` would not verify under this record's revocation and
    /// window (`KEY_REVOKED`, `KEY_OUTSIDE_WINDOW`), if it would not. Verification applies it
    /// after the signature holds; a producer applies it before signing.
    pub fn refusal_at(&self, signed_at: DateTime<Utc>) -> Option<VerifyError> {
        if let Some(revoked_at) = self.revoked_at
            && signed_at >= revoked_at
        {
            return Some(VerifyError::KeyRevoked {
                key_id: self.key_id.clone(),
                revoked_at: rfc3339(revoked_at),
                signed_at: rfc3339(signed_at),
            });
        }
        let after_start = signed_at >= self.valid_from;
        let before_end = self.valid_until.is_none_or(|until| signed_at < until);
        (!(after_start && before_end)).then(|| VerifyError::KeyOutsideWindow {
            key_id: self.key_id.clone(),
            valid_from: rfc3339(self.valid_from),
            valid_until: self.valid_until.map_or_else(|| "open".to_owned(), rfc3339),
            signed_at: rfc3339(signed_at),
        })
    }

    /// Builds a record from stored or CR fields.
    ///
    /// # Errors
    /// A bad key id, public key or window.
    pub fn new(
        key_id: impl Into<String>,
        algorithm: Algorithm,
        public_key: &[u8],
        valid_from: DateTime<Utc>,
        valid_until: Option<DateTime<Utc>>,
    ) -> Result<Self, KeyError> {
        let record = Self {
            key_id: key_id.into(),
            public_key: PublicKey::from_bytes(algorithm, public_key)?,
            valid_from,
            valid_until,
            revoked_at: None,
        };
        record.check()?;
        Ok(record)
    }

    /// The record's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.public_key.algorithm()
    }

    /// Returns the record revoked from `at` on.
    pub fn revoked(mut self, at: DateTime<Utc>) -> Self {
        self.revoked_at = Some(at);
        self
    }

    fn check(&self) -> Result<(), KeyError> {
        crate::envelope::check_identifier("key_id", &self.key_id)
            .map_err(KeyError::KeyIdInvalid)?;
        if self
            .valid_until
            .is_some_and(|until| until <= self.valid_from)
        {
            return Err(KeyError::WindowInvalid {
                key_id: self.key_id.clone(),
            });
        }
        Ok(())
    }
}

/// Why a signature was refused. [`VerifyError::code`] is the quarantine reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No key with this id is registered.
    #[error("key {0} is not in the registry")]
    KeyUnknown(String),
    /// The signature claims another algorithm than the key's.
    #[error("key {key_id} is {expected}, the signature claims {claimed}")]
    AlgorithmMismatch {
        /// Key id.
        key_id: String,
        /// The key's algorithm.
        expected: Algorithm,
        /// The signature's.
        claimed: Algorithm,
    },
    /// Metadata or signature bytes that no signer of ours produces.
    #[error("signature is malformed: {0}")]
    Malformed(&'static str),
    /// The signature does not verify over the envelope of these bytes.
    #[error("signature by {key_id} does not verify")]
    SignatureInvalid {
        /// Key id.
        key_id: String,
    },
    /// Authentic, but made at or after the key's revocation.
    #[error("key {key_id} was revoked at {revoked_at}; signed at {signed_at}")]
    KeyRevoked {
        /// Key id.
        key_id: String,
        /// Revocation instant (RFC 3339).
        revoked_at: String,
        /// Signing instant (RFC 3339).
        signed_at: String,
    },
    /// Authentic, but made outside the key's validity window.
    #[error("key {key_id} is valid {valid_from} until {valid_until}; signed at {signed_at}")]
    KeyOutsideWindow {
        /// Key id.
        key_id: String,
        /// Window start (RFC 3339).
        valid_from: String,
        /// Window end (RFC 3339, or `open`).
        valid_until: String,
        /// Signing instant (RFC 3339).
        signed_at: String,
    },
    /// Authentic, but claims a signing time later than the verifier's clock allows.
    #[error("signed at {signed_at}, later than now {now} plus the allowed skew")]
    SignedAtInFuture {
        /// Signing instant (RFC 3339).
        signed_at: String,
        /// Verifier's time (RFC 3339).
        now: String,
    },
}

impl VerifyError {
    /// The stable code (the quarantine reason).
    pub fn code(&self) -> EvidenceCode {
        match self {
            Self::KeyUnknown(_) => EvidenceCode::KeyUnknown,
            Self::AlgorithmMismatch { .. } => EvidenceCode::AlgorithmMismatch,
            Self::Malformed(_) => EvidenceCode::SignatureMalformed,
            Self::SignatureInvalid { .. } => EvidenceCode::SignatureInvalid,
            Self::KeyRevoked { .. } => EvidenceCode::KeyRevoked,
            Self::KeyOutsideWindow { .. } => EvidenceCode::KeyOutsideWindow,
            Self::SignedAtInFuture { .. } => EvidenceCode::SignedAtInFuture,
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Signatures a registry has already found valid over their envelopes, so the rows of one
/// batch signature pay one cryptographic check between them ([`KeyRegistry::verify_cached`]).
/// Only the cryptographic step is skipped: key lookup, algorithm, revocation and window are
/// judged for every event. Bounded: it forgets everything past [`VerifiedSignatures::CAPACITY`].
#[derive(Debug, Default)]
pub struct VerifiedSignatures {
    /// (envelope, signature) found valid; the envelope names the key.
    valid: std::collections::HashSet<(Vec<u8>, Vec<u8>)>,
    checks: u64,
}

impl VerifiedSignatures {
    /// Most entries kept; a pass of the forwarder reads a few hundred rows.
    pub const CAPACITY: usize = 4_096;

    /// Cryptographic signature checks made through this cache (the ones it could not skip).
    pub fn checks(&self) -> u64 {
        self.checks
    }
}

/// Public keys by id. Fed from SigningKey CRs (and, for KMS keys, GetPublicKey) by the caller;
/// readers that share it across tasks wrap it (an `Arc` swapped on change).
#[derive(Debug, Clone, Default)]
pub struct KeyRegistry {
    keys: HashMap<String, KeyRecord>,
}

impl KeyRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key, or updates the window and revocation of a registered one (same id, same key).
    ///
    /// # Errors
    /// - [`KeyError::KeyIdConflict`]: the id is registered with another key or algorithm;
    /// - [`KeyError::RevocationIrreversible`]: the update would clear or postpone a revocation;
    /// - [`KeyError::WindowInvalid`] / [`KeyError::KeyIdInvalid`]: a bad record.
    ///
    /// # Guarantees
    /// On error the registry is unchanged.
    pub fn upsert(&mut self, record: KeyRecord) -> Result<(), KeyError> {
        record.check()?;
        if let Some(existing) = self.keys.get(&record.key_id) {
            if existing.public_key != record.public_key {
                return Err(KeyError::KeyIdConflict(record.key_id));
            }
            if let Some(revoked) = existing.revoked_at
                && record.revoked_at.is_none_or(|new| new > revoked)
            {
                return Err(KeyError::RevocationIrreversible(record.key_id));
            }
        }
        self.keys.insert(record.key_id.clone(), record);
        Ok(())
    }

    /// Revokes a key from `at` on (an earlier instant than a previous revocation moves it back).
    ///
    /// # Errors
    /// [`KeyError::KeyUnknown`] when the id is not registered;
    /// [`KeyError::RevocationIrreversible`] when `at` is later than an existing revocation.
    pub fn revoke(&mut self, key_id: &str, at: DateTime<Utc>) -> Result<(), KeyError> {
        let Some(record) = self.keys.get(key_id) else {
            return Err(KeyError::KeyUnknown(key_id.to_owned()));
        };
        let record = record.clone().revoked(at);
        self.upsert(record)
    }

    /// The record of a key id.
    pub fn get(&self, key_id: &str) -> Option<&KeyRecord> {
        self.keys.get(key_id)
    }

    /// Number of registered keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is registered.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `signed` over `canonical_event`, judging its signed time against the key's
    /// validity window and revocation.
    ///
    /// # Errors
    /// A [`VerifyError`] whose code is the reason (see the module docs for the order of checks).
    ///
    /// # Guarantees
    /// `Ok` means: the key is registered with the claimed algorithm, the signature is valid over
    /// the envelope binding these exact bytes to the key id, algorithm, signed time and producer,
    /// the key was not revoked at the signed time, and the signed time is inside its window.
    pub fn verify(
        &self,
        signed: &Signed,
        canonical_event: &[u8],
    ) -> Result<&KeyRecord, VerifyError> {
        self.check(signed, canonical_event, None)
    }

    /// [`KeyRegistry::verify`], skipping the cryptographic check of a signature `cache` has
    /// already found valid over the same envelope under the same key (another event of the same
    /// batch). The same guarantees hold: the envelope is still rebuilt from these bytes and this
    /// proof, so an event outside the batch never matches a cached entry.
    ///
    /// # Errors
    /// As [`KeyRegistry::verify`].
    pub fn verify_cached(
        &self,
        signed: &Signed,
        canonical_event: &[u8],
        cache: &mut VerifiedSignatures,
    ) -> Result<&KeyRecord, VerifyError> {
        self.check(signed, canonical_event, Some(cache))
    }

    /// [`KeyRegistry::verify`] through `cache` when there is one.
    fn check(
        &self,
        signed: &Signed,
        canonical_event: &[u8],
        mut cache: Option<&mut VerifiedSignatures>,
    ) -> Result<&KeyRecord, VerifyError> {
        let record = self
            .keys
            .get(&signed.key_id)
            .ok_or_else(|| VerifyError::KeyUnknown(signed.key_id.clone()))?;
        if signed.algorithm != record.algorithm() {
            return Err(VerifyError::AlgorithmMismatch {
                key_id: record.key_id.clone(),
                expected: record.algorithm(),
                claimed: signed.algorithm,
            });
        }
        let message = signed
            .signing_input(canonical_event)
            .map_err(|error| match error {
                EnvelopeError::IdentifierInvalid { .. } => VerifyError::Malformed("producer id"),
                EnvelopeError::SignedAtInvalid => VerifyError::Malformed("signed_at"),
                EnvelopeError::AlgorithmUnknown(_) => VerifyError::Malformed("algorithm"),
                EnvelopeError::InclusionInvalid | EnvelopeError::BatchSizeInvalid => {
                    VerifyError::Malformed("inclusion proof")
                }
            })?;
        let cached = cache.as_ref().is_some_and(|cache| {
            cache
                .valid
                .contains(&(message.clone(), signed.signature.clone()))
        });
        if !cached {
            if let Some(cache) = cache.as_mut() {
                cache.checks += 1;
            }
            record
                .public_key
                .verify(&message, &signed.signature)
                .map_err(|check| match check {
                    SignatureCheck::Malformed => VerifyError::Malformed("signature encoding"),
                    SignatureCheck::Invalid => VerifyError::SignatureInvalid {
                        key_id: record.key_id.clone(),
                    },
                })?;
            if let Some(cache) = cache {
                if cache.valid.len() >= VerifiedSignatures::CAPACITY {
                    cache.valid.clear();
                }
                cache.valid.insert((message, signed.signature.clone()));
            }
        }
        match record.refusal_at(signed.signed_at) {
            Some(refused) => Err(refused),
            None => Ok(record),
        }
    }

    /// [`KeyRegistry::verify`], and also refuses signing times later than `now + max_future_skew`
    /// (ingest uses this: a producer cannot pre-date evidence into a key's future window).
    ///
    /// # Errors
    /// As [`KeyRegistry::verify`], plus [`VerifyError::SignedAtInFuture`].
    pub fn verify_at(
        &self,
        signed: &Signed,
        canonical_event: &[u8],
        now: DateTime<Utc>,
        max_future_skew: Duration,
    ) -> Result<&KeyRecord, VerifyError> {
        let record = self.verify(signed, canonical_event)?;
        not_in_future(signed, now, max_future_skew)?;
        Ok(record)
    }

    /// [`KeyRegistry::verify_at`] through `cache` ([`KeyRegistry::verify_cached`]): canonical
    /// ingest's check.
    ///
    /// # Errors
    /// As [`KeyRegistry::verify_at`].
    pub fn verify_cached_at(
        &self,
        signed: &Signed,
        canonical_event: &[u8],
        cache: &mut VerifiedSignatures,
        now: DateTime<Utc>,
        max_future_skew: Duration,
    ) -> Result<&KeyRecord, VerifyError> {
        let record = self.check(signed, canonical_event, Some(cache))?;
        not_in_future(signed, now, max_future_skew)?;
        Ok(record)
    }
}

/// Refuses a signing time later than `now + max_future_skew`: a producer cannot pre-date
/// evidence into a key's future window.
fn not_in_future(
    signed: &Signed,
    now: DateTime<Utc>,
    max_future_skew: Duration,
) -> Result<(), VerifyError> {
    if signed.signed_at > now + max_future_skew {
        return Err(VerifyError::SignedAtInFuture {
            signed_at: rfc3339(signed.signed_at),
            now: rfc3339(now),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).unwrap()
    }

    #[test]
    fn public_keys_parse_in_every_documented_form_and_nothing_else() {
        // Goal: CR bytes (raw Ed25519, SPKI P-256) and KMS SPKI parse; a key of the wrong
        // algorithm or garbage is refused with PUBLIC_KEY_INVALID.
        use ed25519_dalek::pkcs8::EncodePublicKey as _;
        let ed = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let raw = PublicKey::from_bytes(Algorithm::Ed25519, ed.as_bytes()).unwrap();
        let spki = ed.to_public_key_der().unwrap();
        assert_eq!(
            PublicKey::from_bytes(Algorithm::Ed25519, spki.as_bytes()).unwrap(),
            raw
        );
        assert_eq!(raw.to_bytes(), ed.as_bytes().to_vec());

        let ec = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
        let ec_pub = PublicKey::EcdsaP256(*ec.verifying_key());
        let der = ec_pub.to_bytes();
        assert_eq!(
            PublicKey::from_bytes(Algorithm::EcdsaP256Sha256, &der).unwrap(),
            ec_pub
        );
        let sec1 = ec.verifying_key().to_encoded_point(true);
        assert_eq!(
            PublicKey::from_bytes(Algorithm::EcdsaP256Sha256, sec1.as_bytes()).unwrap(),
            ec_pub
        );

        for (alg, bytes) in [
            (Algorithm::Ed25519, der),
            (Algorithm::EcdsaP256Sha256, ed.as_bytes().to_vec()),
            (Algorithm::Ed25519, vec![0; 31]),
            (Algorithm::Ed25519, vec![0; 32]), // the identity point: weak
        ] {
            let error = PublicKey::from_bytes(alg, &bytes).unwrap_err();
            assert_eq!(
                error.code(),
                EvidenceCode::PublicKeyInvalid,
                "{alg} {bytes:?}"
            );
        }
        assert!(raw.derived_key_id().starts_with("ed25519:"));
        assert_eq!(raw.derived_key_id().len(), "ed25519:".len() + 16);
        assert!(ec_pub.derived_key_id().starts_with("ecdsa-p256:"));
    }

    #[test]
    fn registry_updates_keep_key_identity_and_revocations() {
        // Goal: an id cannot be re-pointed at another key, a window is validated, and a
        // revocation can move earlier but never be cleared or postponed.
        let key_a = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let key_b = ed25519_dalek::SigningKey::from_bytes(&[2; 32]).verifying_key();
        let mut registry = KeyRegistry::new();
        let record = KeyRecord::new("k", Algorithm::Ed25519, key_a.as_bytes(), t(0), None).unwrap();
        registry.upsert(record.clone()).unwrap();

        let other = KeyRecord::new("k", Algorithm::Ed25519, key_b.as_bytes(), t(0), None).unwrap();
        assert_eq!(
            registry.upsert(other).unwrap_err().code(),
            EvidenceCode::KeyIdConflict
        );

        let bad_window =
            KeyRecord::new("w", Algorithm::Ed25519, key_b.as_bytes(), t(5), Some(t(5)));
        assert_eq!(
            bad_window.unwrap_err().code(),
            EvidenceCode::KeyWindowInvalid
        );

        let cutover = KeyRecord {
            valid_until: Some(t(100)),
            ..record
        };
        registry.upsert(cutover).unwrap();
        assert_eq!(registry.get("k").unwrap().valid_until, Some(t(100)));

        registry.revoke("k", t(50)).unwrap();
        let cleared = KeyRecord {
            revoked_at: None,
            ..registry.get("k").unwrap().clone()
        };
        assert_eq!(
            registry.upsert(cleared).unwrap_err().code(),
            EvidenceCode::KeyRevocationIrreversible
        );
        assert_eq!(
            registry.revoke("k", t(60)).unwrap_err().code(),
            EvidenceCode::KeyRevocationIrreversible
        );
        registry.revoke("k", t(40)).unwrap();
        assert_eq!(registry.get("k").unwrap().revoked_at, Some(t(40)));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn ecdsa_accepts_only_low_s_fixed_width_signatures() {
        // Goal: the same P-256 signature in its high-S twin or in DER is refused as malformed,
        // so an event has exactly one valid signature encoding.
        use p256::ecdsa::signature::Signer as _;
        let key = p256::ecdsa::SigningKey::from_slice(&[3; 32]).unwrap();
        let public = PublicKey::EcdsaP256(*key.verifying_key());
        let message = b"envelope";
        let signature: p256::ecdsa::Signature = key.sign(message);
        let low = signature.normalize_s().unwrap_or(signature);
        assert!(public.verify(message, &low.to_bytes()).is_ok());
        assert!(matches!(
            public.verify(b"other", &low.to_bytes()),
            Err(SignatureCheck::Invalid)
        ));
        let (r, s) = low.split_scalars();
        let high = p256::ecdsa::Signature::from_scalars(r, -s).unwrap();
        assert!(matches!(
            public.verify(message, &high.to_bytes()),
            Err(SignatureCheck::Malformed)
        ));
        assert!(matches!(
            public.verify(message, low.to_der().as_bytes()),
            Err(SignatureCheck::Malformed)
        ));
    }
}
