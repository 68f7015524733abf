//! Local Ed25519 signing from a PKCS#8 PEM file (how a Kubernetes Secret is mounted).
//!
//! Generate a key with `openssl genpkey -algorithm ed25519 -out signing.pem`.

use crate::config::ConfigError;
use crate::envelope::{Algorithm, Envelope, check_identifier};
use crate::signer::{SignError, Signer};
use crate::verify::PublicKey;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use std::fmt;
use std::io::Read as _;
use std::path::Path;
use zeroize::Zeroizing;

/// Largest key file read. A PKCS#8 Ed25519 PEM is about 120 bytes; anything much larger is not
/// a key file, and reading it unbounded would be a way to exhaust memory at startup.
pub const KEY_FILE_LEN_MAX: u64 = 16 * 1024;

/// Ed25519 signer holding its private key in memory (zeroized on drop by `ed25519-dalek`).
pub struct LocalEd25519Signer {
    key: ed25519_dalek::SigningKey,
    public_key: PublicKey,
    key_id: String,
    producer_id: String,
}

impl fmt::Debug for LocalEd25519Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written: the private key is never formatted.
        f.debug_struct("LocalEd25519Signer")
            .field("key_id", &self.key_id)
            .field("producer_id", &self.producer_id)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl LocalEd25519Signer {
    /// Loads the key from a PKCS#8 PEM file.
    ///
    /// `key_id` overrides the id derived from the public key ([`PublicKey::derived_key_id`]).
    ///
    /// # Errors
    /// [`ConfigError::KeyFileUnreadable`] (missing, unreadable or over [`KEY_FILE_LEN_MAX`]),
    /// [`ConfigError::KeyInvalid`], [`ConfigError::Invalid`] for bad identifiers. No error
    /// carries any part of the file.
    pub fn from_pem_file(
        path: &Path,
        key_id: Option<&str>,
        producer_id: &str,
    ) -> Result<Self, ConfigError> {
        let unreadable = |reason: String| ConfigError::KeyFileUnreadable {
            path: path.to_owned(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| unreadable(e.kind().to_string()))?;
        let mut pem = Zeroizing::new(String::new());
        let read = file
            .take(KEY_FILE_LEN_MAX + 1)
            .read_to_string(&mut pem)
            .map_err(|e| unreadable(e.kind().to_string()))?;
        if u64::try_from(read).unwrap_or(u64::MAX) > KEY_FILE_LEN_MAX {
            return Err(unreadable(format!("larger than {KEY_FILE_LEN_MAX} bytes")));
        }
        Self::from_pkcs8_pem(&pem, key_id, producer_id)
    }

    /// Parses a PKCS#8 PEM Ed25519 private key (v1, or v2 with a matching public key).
    ///
    /// # Errors
    /// As [`LocalEd25519Signer::from_pem_file`], without the file errors.
    pub fn from_pkcs8_pem(
        pem: &str,
        key_id: Option<&str>,
        producer_id: &str,
    ) -> Result<Self, ConfigError> {
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.trim()).map_err(|_| {
            ConfigError::KeyInvalid {
                reason: "not an Ed25519 private key in PKCS#8 PEM \
                         (generate one with `openssl genpkey -algorithm ed25519`)",
            }
        })?;
        Self::from_signing_key(key, key_id, producer_id)
    }

    /// Wraps an in-memory key (key generation and rotation tooling, tests).
    ///
    /// # Errors
    /// [`ConfigError::KeyInvalid`] for a weak key, [`ConfigError::Invalid`] for bad identifiers.
    pub fn from_signing_key(
        key: ed25519_dalek::SigningKey,
        key_id: Option<&str>,
        producer_id: &str,
    ) -> Result<Self, ConfigError> {
        let public_key = PublicKey::from_bytes(Algorithm::Ed25519, key.verifying_key().as_bytes())
            .map_err(|_| ConfigError::KeyInvalid {
                reason: "weak Ed25519 key",
            })?;
        let key_id = key_id.map_or_else(|| public_key.derived_key_id(), str::to_owned);
        check_identifier("key_id", &key_id)?;
        check_identifier("producer_id", producer_id)?;
        Ok(Self {
            key,
            public_key,
            key_id,
            producer_id: producer_id.to_owned(),
        })
    }
}

impl LocalEd25519Signer {
    /// A raw Ed25519 signature over `message`, with no envelope, key id or signed time.
    ///
    /// For C2SP signed notes (audit chain checkpoints) only: there the signed bytes are the note
    /// body and the key is named by the note's own key hash. Audit events must be signed through
    /// [`Signer::sign_at`], whose signing input binds key id, algorithm, time and producer.
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.key.sign(message).to_bytes()
    }
}

impl Signer for LocalEd25519Signer {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::Ed25519
    }

    fn producer_id(&self) -> &str {
        &self.producer_id
    }

    fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    async fn sign_envelope(&self, envelope: &Envelope) -> Result<Vec<u8>, SignError> {
        use ed25519_dalek::Signer as _;
        Ok(self.key.sign(envelope.as_bytes()).to_bytes().to_vec())
    }
}
