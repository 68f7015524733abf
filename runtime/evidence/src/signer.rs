//! The producer-side signing interface and the signers a process can run with.

use crate::batch::{BatchTree, Inclusion};
use crate::code::EvidenceCode;
use crate::envelope::{Algorithm, Envelope, EnvelopeError, Signed, now_ms};
use crate::kms::KmsSigner;
use crate::local::LocalEd25519Signer;
use crate::verify::{KeyError, KeyRecord, PublicKey};
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::future::Future;

/// Signs canonical event bytes, one event at a time or a batch under one signature.
/// Implementations hold (or reach) one private key and sign envelopes only.
///
/// A single signature covers the envelope of [`crate::envelope::signing_input`]: the sha256 of
/// the exact canonical bytes plus the key id, algorithm, signing time and producer id. A batch
/// signature covers the same metadata with the Merkle root of the batch's events
/// ([`crate::batch`]), and each event gets its inclusion proof.
pub trait Signer: Send + Sync {
    /// The key's registry id.
    fn key_id(&self) -> &str;

    /// The algorithm of every signature this signer makes.
    fn algorithm(&self) -> Algorithm;

    /// The producer identity stamped into every signature.
    fn producer_id(&self) -> &str;

    /// The public key, to publish in the key registry and to check own signatures.
    fn public_key(&self) -> &PublicKey;

    /// The signature bytes over one envelope (64 bytes; ECDSA as r‖s, low S).
    ///
    /// # Errors
    /// [`SignError`]; nothing is retried here beyond the backend client's own bounded retries.
    fn sign_envelope(
        &self,
        envelope: &Envelope,
    ) -> impl Future<Output = Result<Vec<u8>, SignError>> + Send;

    /// Signs one event with an explicit signing time (whole milliseconds). Producers call
    /// [`Signer::sign`]; this exists for tests and for tools that re-sign at a recorded instant.
    ///
    /// # Errors
    /// As [`Signer::sign_envelope`], and [`SignError::Input`] for metadata no envelope can hold.
    fn sign_at(
        &self,
        canonical_event: &[u8],
        signed_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<Signed, SignError>> + Send {
        async move {
            let envelope = Envelope::of_event(
                self.key_id(),
                self.algorithm(),
                signed_at,
                self.producer_id(),
                canonical_event,
            )?;
            let signature = self.sign_envelope(&envelope).await?;
            Ok(signed_by(self, signed_at, signature, None))
        }
    }

    /// Signs one event at the current time (UTC, truncated to milliseconds).
    ///
    /// # Errors
    /// As [`Signer::sign_at`].
    fn sign(
        &self,
        canonical_event: &[u8],
    ) -> impl Future<Output = Result<Signed, SignError>> + Send {
        self.sign_at(canonical_event, now_ms())
    }

    /// Signs a batch of events with one signature: one [`Signed`] per event, in order, each
    /// sharing the signature and carrying its own inclusion proof.
    ///
    /// # Errors
    /// As [`Signer::sign_at`]; [`EnvelopeError::BatchSizeInvalid`] (as [`SignError::Input`]) for
    /// no events or more than [`crate::batch::BATCH_EVENTS_MAX`].
    fn sign_batch_at(
        &self,
        canonical_events: &[&[u8]],
        signed_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<Signed>, SignError>> + Send {
        let hashes: Vec<[u8; 32]> = canonical_events
            .iter()
            .map(|event| Sha256::digest(event).into())
            .collect();
        async move { self.sign_batch_of_hashes_at(&hashes, signed_at).await }
    }

    /// [`Signer::sign_batch_at`] for events given by their sha256 (a producer that stamped them
    /// has it already), in order.
    ///
    /// # Errors
    /// As [`Signer::sign_batch_at`].
    fn sign_batch_of_hashes_at(
        &self,
        event_sha256s: &[[u8; 32]],
        signed_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<Signed>, SignError>> + Send {
        async move {
            let hashes = event_sha256s;
            let tree = BatchTree::of(hashes).ok_or(EnvelopeError::BatchSizeInvalid)?;
            let count = u32::try_from(hashes.len()).map_err(|_| EnvelopeError::BatchSizeInvalid)?;
            let envelope = Envelope::of_batch(
                self.key_id(),
                self.algorithm(),
                signed_at,
                self.producer_id(),
                &tree.root,
                count,
            )?;
            let signature = self.sign_envelope(&envelope).await?;
            Ok(tree
                .inclusions
                .into_iter()
                .map(|inclusion| signed_by(self, signed_at, signature.clone(), Some(inclusion)))
                .collect())
        }
    }

    /// [`Signer::sign_batch_at`] at the current time (UTC, truncated to milliseconds).
    ///
    /// # Errors
    /// As [`Signer::sign_batch_at`].
    fn sign_batch(
        &self,
        canonical_events: &[&[u8]],
    ) -> impl Future<Output = Result<Vec<Signed>, SignError>> + Send {
        self.sign_batch_at(canonical_events, now_ms())
    }

    /// The registry record that publishes this signer's key for a validity window.
    ///
    /// # Errors
    /// A window that ends before it starts.
    fn key_record(
        &self,
        valid_from: DateTime<Utc>,
        valid_until: Option<DateTime<Utc>>,
    ) -> Result<KeyRecord, KeyError> {
        KeyRecord::new(
            self.key_id(),
            self.algorithm(),
            &self.public_key().to_bytes(),
            valid_from,
            valid_until,
        )
    }
}

/// A [`Signed`] of this signer's key and producer.
fn signed_by<S: Signer + ?Sized>(
    signer: &S,
    signed_at: DateTime<Utc>,
    signature: Vec<u8>,
    inclusion: Option<Inclusion>,
) -> Signed {
    Signed {
        key_id: signer.key_id().to_owned(),
        algorithm: signer.algorithm(),
        signed_at,
        producer_id: signer.producer_id().to_owned(),
        signature,
        inclusion,
    }
}

/// Why a signature could not be made. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The signing time or identifiers cannot be put into an envelope.
    #[error("signing input rejected: {0}")]
    Input(#[from] EnvelopeError),
    /// KMS refuses to sign with this key (disabled, pending deletion, deleted, wrong usage, access
    /// denied). An operator must act; retrying does not help.
    #[error("kms key {kms_key} cannot sign ({kms_code}): {message}")]
    KeyUnavailable {
        /// The configured KMS key (id, ARN or alias).
        kms_key: String,
        /// The KMS error code.
        kms_code: String,
        /// The KMS error message.
        message: String,
    },
    /// The AWS credential chain found no credentials (or an invalid configuration for them).
    #[error("no usable AWS credentials for kms: {0}")]
    CredentialsMissing(String),
    /// KMS could not be reached or asked to retry later (timeout, throttling, internal error).
    #[error("kms is unavailable: {0}")]
    BackendUnavailable(String),
    /// KMS answered with something that is not a valid signature by the expected key.
    #[error("kms returned an unusable signature: {0}")]
    BackendInvalidResponse(&'static str),
}

impl SignError {
    /// The stable code.
    pub fn code(&self) -> EvidenceCode {
        match self {
            Self::Input(_) => EvidenceCode::SigningInputInvalid,
            Self::KeyUnavailable { .. } => EvidenceCode::SigningKeyUnavailable,
            Self::CredentialsMissing(_) => EvidenceCode::SigningCredentialsMissing,
            Self::BackendUnavailable(_) => EvidenceCode::SigningBackendUnavailable,
            Self::BackendInvalidResponse(_) => EvidenceCode::SigningBackendInvalidResponse,
        }
    }

    /// True when the same call may succeed later without anyone changing configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::BackendUnavailable(_))
    }
}

/// The signer a process was configured with (enum dispatch: no boxing, no `async-trait`).
#[derive(Debug)]
pub enum ProducerSigner {
    /// Local Ed25519 key from a file.
    Local(LocalEd25519Signer),
    /// AWS KMS ECDSA P-256 key.
    Kms(KmsSigner),
}

impl Signer for ProducerSigner {
    fn key_id(&self) -> &str {
        match self {
            Self::Local(s) => s.key_id(),
            Self::Kms(s) => s.key_id(),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Self::Local(s) => s.algorithm(),
            Self::Kms(s) => s.algorithm(),
        }
    }

    fn producer_id(&self) -> &str {
        match self {
            Self::Local(s) => s.producer_id(),
            Self::Kms(s) => s.producer_id(),
        }
    }

    fn public_key(&self) -> &PublicKey {
        match self {
            Self::Local(s) => s.public_key(),
            Self::Kms(s) => s.public_key(),
        }
    }

    async fn sign_envelope(&self, envelope: &Envelope) -> Result<Vec<u8>, SignError> {
        match self {
            Self::Local(s) => s.sign_envelope(envelope).await,
            Self::Kms(s) => s.sign_envelope(envelope).await,
        }
    }
}
