//! Evidence signing for test ledgers: real Ed25519 keys, never the unsigned demo mode.

use anyhow::{Context, Result};
use spendguard_evidence::{LocalEd25519Signer, ProducerSigner, Signing};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// An in-process signer with a fresh random key.
///
/// # Panics
/// Never in practice: a random 32-byte seed is a valid Ed25519 key.
pub fn test_signing(producer_id: &str) -> Signing {
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    signing_with_seed(seed, producer_id)
}

/// An in-process signer with the Ed25519 key of `seed`: the same key (and key id) every call,
/// for tests that start a ledger again with the key of an earlier one.
///
/// # Panics
/// Never in practice: every 32-byte seed is a valid Ed25519 key.
pub fn signing_with_seed(seed: [u8; 32], producer_id: &str) -> Signing {
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    #[allow(clippy::expect_used)]
    let signer = LocalEd25519Signer::from_signing_key(key, None, producer_id)
        .expect("an Ed25519 key from a seed is valid");
    Signing::Enabled(ProducerSigner::Local(signer))
}

/// A PKCS#8 PEM Ed25519 key made by `openssl genpkey`, once per test process, for ledgers that run
/// as their own process.
///
/// # Errors
/// When openssl is missing or fails.
pub fn key_file() -> Result<&'static Path> {
    static FILE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    if let Some((_, path)) = FILE.get() {
        return Ok(path);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ledger-signing.pem");
    let status = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .status()
        .context("running openssl (make deps installs it)")?;
    anyhow::ensure!(status.success(), "openssl genpkey failed");
    let (_, path) = FILE.get_or_init(|| (dir, path));
    Ok(path)
}

/// The environment that makes a `spendguard ledger` process sign with [`key_file`].
///
/// # Errors
/// As [`key_file`].
pub fn ledger_env() -> Result<[(&'static str, String); 2]> {
    Ok([
        ("SPENDGUARD_SIGNING_MODE", "local".to_owned()),
        (
            "SPENDGUARD_SIGNING_KEY_FILE",
            key_file()?.display().to_string(),
        ),
    ])
}

/// The key registry as the database's `signing_keys` publish it (windows open-ended), for tests
/// that verify stored evidence the way an auditor would.
///
/// # Errors
/// A query failure or a stored key that does not parse.
pub async fn registry(pool: &sqlx::PgPool) -> Result<spendguard_evidence::KeyRegistry> {
    use spendguard_evidence::{Algorithm, KeyRecord, KeyRegistry};
    type Row = (
        String,
        String,
        Vec<u8>,
        sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>,
    );
    let keys: Vec<Row> =
        sqlx::query_as("SELECT key_id, algorithm, public_key, valid_from FROM signing_keys")
            .fetch_all(pool)
            .await?;
    let mut registry = KeyRegistry::new();
    for (id, algorithm, public_key, from) in keys {
        let algorithm: Algorithm = algorithm.parse()?;
        registry.upsert(KeyRecord::new(id, algorithm, &public_key, from, None)?)?;
    }
    Ok(registry)
}
