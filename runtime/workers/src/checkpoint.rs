//! Signed checkpoints over a tenant's audit hash chain, in the C2SP
//! [signed-note](https://c2sp.org/signed-note) / [tlog-checkpoint](https://c2sp.org/tlog-checkpoint)
//! format:
//!
//! ```text
//! spendguard.io/audit/<tenant>
//! <tree size>
//! <base64 root hash>
//!
//! — <key name> <base64(4-byte key hash || 64-byte Ed25519 signature)>
//! ```
//!
//! The signature covers the note body (the three lines, each ending in `\n`); the key hash is the
//! first 4 bytes of `SHA-256(key name || 0x0A || 0x01 || public key)` (0x01 = Ed25519).
//!
//! **The root hash is the hash chain head, not an RFC 6962 Merkle root.** The tree size is the
//! chain length and the root is `chain_hash` at `chain_seq = tree size`, which commits to every
//! entry before it (see [`crate::chain::link`]). Consequences: consistency between two
//! checkpoints, and inclusion of one entry, can only be shown by replaying the chain from the
//! start up to the checkpoint's size (O(n)); there are no logarithmic inclusion or consistency
//! proofs, and generic tlog tooling that expects a Merkle root cannot check these proofs even
//! though it can parse and verify the note itself.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use spendguard_evidence::{LocalEd25519Signer, Signer as _};

/// Origin prefix; the tenant id follows.
pub const ORIGIN_PREFIX: &str = "spendguard.io/audit/";

/// Default key name of the forwarder's checkpoint key.
pub const DEFAULT_KEY_NAME: &str = "spendguard-forwarder";

/// Signature type byte of Ed25519 in the signed-note key hash.
const ED25519_TYPE: u8 = 0x01;

/// Signature line prefix: U+2014 EM DASH and a space.
const SIG_PREFIX: &str = "\u{2014} ";

/// The parsed, verified content of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// `spendguard.io/audit/<tenant>`.
    pub origin: String,
    /// Chain length.
    pub size: u64,
    /// Chain head hash at `size`.
    pub root: [u8; 32],
}

/// Why a checkpoint cannot be built or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The note text is not a well-formed checkpoint.
    #[error("checkpoint malformed: {0}")]
    Malformed(&'static str),
    /// A key name is empty or has whitespace or `+`.
    #[error("invalid checkpoint key name")]
    KeyName,
    /// The public key is not an Ed25519 key.
    #[error("invalid checkpoint public key")]
    PublicKey,
    /// No signature line by the given key name and key hash.
    #[error("no signature by key {0}")]
    NoSignature(String),
    /// The signature by the given key does not verify.
    #[error("checkpoint signature by {0} does not verify")]
    BadSignature(String),
}

/// `spendguard.io/audit/<tenant>`.
pub fn origin(tenant_id: &str) -> String {
    format!("{ORIGIN_PREFIX}{tenant_id}")
}

/// Checks a signed-note key name: non-empty, no Unicode whitespace, no `+`.
fn check_key_name(name: &str) -> Result<(), CheckpointError> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '+') {
        return Err(CheckpointError::KeyName);
    }
    Ok(())
}

/// First 4 bytes of `SHA-256(name || 0x0A || 0x01 || public key)`.
pub fn key_hash(name: &str, public_key: &[u8; 32]) -> [u8; 4] {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([b'\n', ED25519_TYPE]);
    hasher.update(public_key);
    let digest = hasher.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// The note body: origin, size and base64 root, each line ending in `\n`.
///
/// # Errors
/// [`CheckpointError::Malformed`] if the tenant id would break the origin line.
pub fn body(tenant_id: &str, size: u64, root: &[u8; 32]) -> Result<String, CheckpointError> {
    if tenant_id.is_empty() || tenant_id.chars().any(char::is_control) {
        return Err(CheckpointError::Malformed(
            "tenant id unusable in an origin",
        ));
    }
    Ok(format!(
        "{}\n{size}\n{}\n",
        origin(tenant_id),
        B64.encode(root)
    ))
}

/// Builds and signs a checkpoint note for a tenant chain of `size` entries with head `root`.
///
/// # Errors
/// [`CheckpointError::KeyName`], or [`CheckpointError::Malformed`] for an unusable tenant id.
pub fn sign(
    signer: &LocalEd25519Signer,
    key_name: &str,
    tenant_id: &str,
    size: u64,
    root: &[u8; 32],
) -> Result<String, CheckpointError> {
    check_key_name(key_name)?;
    let public: [u8; 32] = signer
        .public_key()
        .to_bytes()
        .try_into()
        .map_err(|_| CheckpointError::PublicKey)?;
    let body = body(tenant_id, size, root)?;
    let mut blob = key_hash(key_name, &public).to_vec();
    blob.extend_from_slice(&signer.sign_raw(body.as_bytes()));
    Ok(format!(
        "{body}\n{SIG_PREFIX}{key_name} {}\n",
        B64.encode(blob)
    ))
}

/// Parses a note and verifies its signature by `key_name` / `public_key`; returns its content.
///
/// Exactly the three tlog-checkpoint body lines are accepted (no extension lines). Signature
/// lines by other keys are ignored, as the signed-note spec requires; one by this key name and
/// key hash must verify.
///
/// # Errors
/// [`CheckpointError`].
pub fn verify(
    note: &str,
    key_name: &str,
    public_key: &[u8],
) -> Result<Checkpoint, CheckpointError> {
    check_key_name(key_name)?;
    let public: [u8; 32] = public_key
        .try_into()
        .map_err(|_| CheckpointError::PublicKey)?;
    let verifying = VerifyingKey::from_bytes(&public).map_err(|_| CheckpointError::PublicKey)?;
    let split = note
        .find("\n\n")
        .ok_or(CheckpointError::Malformed("no blank line"))?;
    let (body, sigs) = (&note[..=split], &note[split + 2..]);
    let lines: Vec<&str> = body[..body.len() - 1].split('\n').collect();
    let [origin, size, root] = lines[..] else {
        return Err(CheckpointError::Malformed(
            "body is not origin, size, root hash",
        ));
    };
    if origin.is_empty() {
        return Err(CheckpointError::Malformed("empty origin"));
    }
    if size.is_empty()
        || !size.bytes().all(|b| b.is_ascii_digit())
        || (size.len() > 1 && size.starts_with('0'))
    {
        return Err(CheckpointError::Malformed("tree size is not a decimal"));
    }
    let size: u64 = size
        .parse()
        .map_err(|_| CheckpointError::Malformed("tree size is not a decimal"))?;
    let root: [u8; 32] = B64
        .decode(root)
        .ok()
        .and_then(|r| r.try_into().ok())
        .ok_or(CheckpointError::Malformed(
            "root hash is not 32 base64 bytes",
        ))?;
    if sigs.is_empty() || !sigs.ends_with('\n') {
        return Err(CheckpointError::Malformed("no signature lines"));
    }
    let want_hash = key_hash(key_name, &public);
    let mut found = false;
    for line in sigs[..sigs.len() - 1].split('\n') {
        let rest = line
            .strip_prefix(SIG_PREFIX)
            .ok_or(CheckpointError::Malformed("signature line without em dash"))?;
        let (name, blob) = rest.split_once(' ').ok_or(CheckpointError::Malformed(
            "signature line without key name",
        ))?;
        let blob = B64
            .decode(blob)
            .map_err(|_| CheckpointError::Malformed("signature is not base64"))?;
        if blob.len() < 5 {
            return Err(CheckpointError::Malformed("signature too short"));
        }
        if name != key_name || blob[..4] != want_hash {
            continue;
        }
        found = true;
        let signature = Signature::from_slice(&blob[4..])
            .map_err(|_| CheckpointError::BadSignature(key_name.to_owned()))?;
        verifying
            .verify_strict(body.as_bytes(), &signature)
            .map_err(|_| CheckpointError::BadSignature(key_name.to_owned()))?;
    }
    if !found {
        return Err(CheckpointError::NoSignature(key_name.to_owned()));
    }
    Ok(Checkpoint {
        origin: origin.to_owned(),
        size,
        root,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn signer() -> LocalEd25519Signer {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        LocalEd25519Signer::from_signing_key(key, None, "forwarder").unwrap()
    }

    #[test]
    fn signs_and_verifies_and_rejects_tampering() {
        let s = signer();
        let public = s.public_key().to_bytes();
        let note = sign(&s, "k", "acme", 7, &[9; 32]).unwrap();
        let cp = verify(&note, "k", &public).unwrap();
        assert_eq!(
            (cp.origin.as_str(), cp.size, cp.root),
            ("spendguard.io/audit/acme", 7, [9; 32])
        );
        assert!(verify(&note.replace("\n7\n", "\n6\n"), "k", &public).is_err());
        assert!(matches!(
            verify(&note, "other", &public),
            Err(CheckpointError::NoSignature(_))
        ));
        let other = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        assert!(verify(&note, "k", other.verifying_key().as_bytes()).is_err());
        assert!(sign(&s, "has space", "acme", 1, &[0; 32]).is_err());
        assert!(sign(&s, "k", "a\nb", 1, &[0; 32]).is_err());
        assert!(verify("x\n1\n", "k", &public).is_err());
    }
}
