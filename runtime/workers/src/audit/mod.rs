//! Audit export and offline verification (spec S9): `spendguard audit export` writes one tenant's
//! chain segment to a directory or an S3 prefix as hashed batches with a manifest and the
//! signing keys; `spendguard audit verify` checks such an export without a database;
//! `spendguard audit publish-checkpoints` copies each tenant's newest signed checkpoint out of the
//! database for auditors. See docs/design/audit-export.md.
//!
//! ```text
//! audit_chain, signing_keys, audit_checkpoints ──read-only──► export / publish ──► Sink
//!                                                                   Directory | S3 (aws-sdk-s3)
//! Sink ──(S3: download to a temp dir)──► verify (offline, one code path)
//! ```
//!
//! The exporter is a separate, read-only process: it never shares a transaction, a lock or a
//! connection pool with the ledger, so an export failure cannot reach the decision path.

pub mod export;
pub mod format;
pub mod publish;
pub mod sink;
pub mod verify;

use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use sink::{Location, S3Settings, Sink};
use std::path::PathBuf;

/// `spendguard audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Export one tenant's audit chain (optionally an occurrence range) to a directory or an
    /// S3 prefix.
    Export(ExportArgs),
    /// Verify an export offline: manifest, event hashes, signatures, chain links, checkpoint.
    Verify(VerifyArgs),
    /// Publish each tenant's newest signed checkpoint to a directory or an S3 prefix.
    PublishCheckpoints(PublishArgs),
}

/// Where S3 is; credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID, profiles,
/// web identity, ECS, IMDS), never from flags.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// Endpoint of an S3-compatible store (MinIO, Ceph, a VPC endpoint); path-style addressing
    /// is used when set. Default: the AWS regional endpoint.
    #[arg(long, env = "SPENDGUARD_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Region of the bucket. Default: from the AWS chain (AWS_REGION, profile).
    #[arg(long, env = "SPENDGUARD_S3_REGION")]
    pub s3_region: Option<String>,
}

impl S3Args {
    fn settings(&self) -> S3Settings {
        let Self {
            s3_endpoint,
            s3_region,
        } = self;
        S3Settings {
            endpoint_url: s3_endpoint.clone(),
            region: s3_region.clone(),
        }
    }
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
    /// Output directory or `s3://bucket/prefix` (new or empty, unless --resume).
    #[arg(long)]
    pub out: Location,
    /// Events per batch file.
    #[arg(long, default_value_t = 1_000)]
    pub batch_size: usize,
    /// Continue the export in --out after its manifest's cursor.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many new batches (resume later).
    #[arg(long)]
    pub max_batches: Option<usize>,
    /// S3 settings (only for an `s3://` --out).
    #[command(flatten)]
    pub s3: S3Args,
}

/// `spendguard audit publish-checkpoints` settings.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The ledger database; sessions are opened read-only.
    #[arg(long, env = "SPENDGUARD_LEDGER_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Directory or `s3://bucket/prefix` that receives `checkpoints/<tenant>/…`.
    #[arg(long)]
    pub out: Location,
    /// Publish only these tenants (repeatable). Default: every tenant with a checkpoint.
    #[arg(long)]
    pub tenant: Vec<String>,
    /// S3 settings (only for an `s3://` --out).
    #[command(flatten)]
    pub s3: S3Args,
}

/// `spendguard audit verify` settings.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The export: a directory or `s3://bucket/prefix`.
    #[arg(value_name = "DIR_OR_S3_URL")]
    pub source: Location,
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
    /// Check this independently obtained checkpoint note instead of the export's checkpoint.txt:
    /// a file, or the object `s3://bucket/<prefix>checkpoints/<tenant>/latest` written by
    /// `publish-checkpoints`. Requires --checkpoint-key.
    #[arg(long, requires = "checkpoint_key")]
    pub checkpoint_note: Option<String>,
    /// S3 settings (for an `s3://` export or checkpoint note).
    #[command(flatten)]
    pub s3: S3Args,
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

/// The bytes of `--checkpoint-note`: a local file or one S3 object (the exact key given).
async fn read_note(value: &str, settings: &S3Settings) -> Result<Vec<u8>, verify::VerifyFailure> {
    match Location::parse(value).map_err(verify::VerifyFailure::Source)? {
        Location::Directory(path) => {
            std::fs::read(&path).map_err(|e| verify::VerifyFailure::Unreadable {
                path,
                reason: e.to_string(),
            })
        }
        Location::S3 { bucket, prefix } => {
            let store = sink::S3Store::connect(&bucket, "", settings)
                .await
                .map_err(verify::VerifyFailure::Source)?;
            // Location normalised the key to end in '/'; the note is the object itself.
            let key = prefix.trim_end_matches('/');
            store
                .get_key(key)
                .await
                .map_err(verify::VerifyFailure::Source)?
                .ok_or_else(|| verify::VerifyFailure::Unreadable {
                    path: PathBuf::from(value),
                    reason: "no such object".into(),
                })
        }
    }
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
                let sink = Sink::open(&args.out, &args.s3.settings())
                    .await
                    .map_err(|e| fail(e.code(), &e))?;
                let report = export::export_to(&pool, &sink, &options)
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
                let fail = |e: verify::VerifyFailure| anyhow::anyhow!("{}: {e}", e.code());
                let settings = args.s3.settings();
                let checkpoint_note = match &args.checkpoint_note {
                    Some(note) => Some(read_note(note, &settings).await.map_err(fail)?),
                    None => None,
                };
                let options = verify::VerifyOptions {
                    keys: args.keys,
                    allow_unsigned: args.allow_unsigned,
                    checkpoint: match &args.checkpoint_key {
                        Some(key) => Some((args.checkpoint_key_name.clone(), checkpoint_key(key)?)),
                        None => None,
                    },
                    checkpoint_note,
                };
                let report = match &args.source {
                    Location::Directory(dir) => verify::verify(dir, &options),
                    Location::S3 { bucket, prefix } => {
                        let store = sink::S3Store::connect(bucket, prefix, &settings)
                            .await
                            .map_err(|e| fail(verify::VerifyFailure::Source(e)))?;
                        verify::verify_s3(&store, &args.source.to_string(), &options).await
                    }
                };
                report.map(|report| report.to_string()).map_err(fail)
            }
            Self::PublishCheckpoints(args) => {
                let fail = |e: export::ExportError| anyhow::anyhow!("{}: {e}", e.code());
                let pool = export::connect_read_only(&args.database_url)
                    .await
                    .map_err(fail)?;
                let sink = Sink::open(&args.out, &args.s3.settings())
                    .await
                    .map_err(|e| fail(e.into()))?;
                let published = publish::publish_checkpoints(&pool, &sink, &args.tenant)
                    .await
                    .map_err(fail)?;
                let tenants: Vec<String> = published
                    .iter()
                    .map(|p| format!("{}@{}", p.tenant_id, p.tree_size))
                    .collect();
                Ok(format!(
                    "published tenants={} advanced={} [{}]",
                    published.len(),
                    published.iter().filter(|p| p.advanced).count(),
                    tenants.join(" ")
                ))
            }
        }
    }
}
