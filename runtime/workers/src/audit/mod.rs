//! Audit export and offline verification (spec S9): `spendguard audit export` writes one tenant's
//! chain segment to a directory as hashed batches with a manifest and the signing keys;
//! `spendguard audit verify` checks such a directory without a database. See
//! docs/design/audit-export.md.
//!
//! The exporter is a separate, read-only process: it never shares a transaction, a lock or a
//! connection pool with the ledger, so an export failure cannot reach the decision path.

pub mod export;
pub mod format;
pub mod verify;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `spendguard audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Export one tenant's audit chain (optionally an occurrence range) to a directory.
    Export(ExportArgs),
    /// Verify an exported directory offline: manifest, event hashes, signatures, chain links.
    Verify(VerifyArgs),
}

/// `spendguard audit export` settings.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The ledger database; sessions are opened read-only.
    #[arg(long, env = "SPENDGUARD_LEDGER_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The one tenant to export.
    #[arg(long)]
    pub tenant: String,
    /// Inclusive start of the occurrence range (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub from: Option<DateTime<Utc>>,
    /// Exclusive end of the occurrence range (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub to: Option<DateTime<Utc>>,
    /// Output directory (new or empty, unless --resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Events per batch file.
    #[arg(long, default_value_t = 1_000)]
    pub batch_size: usize,
    /// Continue the export in --out after its manifest's cursor.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many new batches (resume later).
    #[arg(long)]
    pub max_batches: Option<usize>,
}

/// `spendguard audit verify` settings.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The export directory.
    pub dir: PathBuf,
    /// Trusted keys file (keys.json format) to use instead of the export's own keys.json.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Accept unsigned events (demo-profile installations only).
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Require checkpoint.txt signed by this Ed25519 public key: base64 of the raw 32 bytes, or a
    /// file holding that or a PEM `PUBLIC KEY` (`openssl pkey -pubout`).
    #[arg(long)]
    pub checkpoint_key: Option<String>,
    /// Key name of the checkpoint signature line.
    #[arg(long, default_value = crate::checkpoint::DEFAULT_KEY_NAME)]
    pub checkpoint_key_name: String,
}

/// The raw Ed25519 public key from `--checkpoint-key`.
fn checkpoint_key(value: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    let path = std::path::Path::new(value);
    let text = if path.is_file() {
        std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("CHECKPOINT_KEY_INVALID: {}: {e}", path.display()))?
    } else {
        value.to_owned()
    };
    let text = text.trim();
    let key = if text.starts_with("-----BEGIN") {
        ed25519_dalek::VerifyingKey::from_public_key_pem(text)
            .map(|k| k.to_bytes().to_vec())
            .map_err(|_| anyhow::anyhow!("CHECKPOINT_KEY_INVALID: not an Ed25519 PUBLIC KEY PEM"))?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| anyhow::anyhow!("CHECKPOINT_KEY_INVALID: not base64 or a key file"))?
    };
    if key.len() != 32 {
        anyhow::bail!("CHECKPOINT_KEY_INVALID: an Ed25519 public key has 32 bytes");
    }
    Ok(key)
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time: {e}"))
}

impl AuditCommand {
    /// Runs the command and returns its one-line summary.
    ///
    /// # Errors
    /// `CODE: message` of the first failure (the process exits non-zero).
    pub async fn run(self) -> anyhow::Result<String> {
        match self {
            Self::Export(args) => {
                let fail = |code: &str, e: &dyn std::fmt::Display| anyhow::anyhow!("{code}: {e}");
                let pool = export::connect_read_only(&args.database_url)
                    .await
                    .map_err(|e| fail(e.code(), &e))?;
                let options = export::ExportOptions {
                    tenant_id: args.tenant,
                    range: format::Range {
                        from: args.from,
                        to: args.to,
                    },
                    batch_size: args.batch_size,
                    resume: args.resume,
                    max_batches: args.max_batches,
                };
                let report = export::export(&pool, &args.out, &options)
                    .await
                    .map_err(|e| fail(e.code(), &e))?;
                Ok(format!(
                    "exported tenant={} new_batches={} new_events={} cursor={} complete={}",
                    options.tenant_id,
                    report.batches,
                    report.events,
                    report
                        .cursor
                        .map_or_else(|| "none".into(), |c| c.to_string()),
                    report.complete
                ))
            }
            Self::Verify(args) => {
                let options = verify::VerifyOptions {
                    keys: args.keys,
                    allow_unsigned: args.allow_unsigned,
                    checkpoint: match &args.checkpoint_key {
                        Some(key) => Some((args.checkpoint_key_name.clone(), checkpoint_key(key)?)),
                        None => None,
                    },
                };
                verify::verify(&args.dir, &options)
                    .map(|report| report.to_string())
                    .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))
            }
        }
    }
}
