//! Startup configuration: `SPENDGUARD_SIGNING_MODE=local|kms|disabled`, the profile gate for
//! `disabled`, and the clap arguments every producing binary flattens into its own `Args`.
//!
//! ```text
//! mode unset ── demo profile ──► Disabled          (logged)
//!            └─ production ───► SIGNING_MODE_MISSING
//! disabled ──── demo profile ──► Disabled          (logged)
//!            └─ production ───► SIGNING_DISABLED_OUTSIDE_DEMO
//! local ─► key file ─► LocalEd25519Signer           kms ─► GetPublicKey ─► KmsSigner
//! ```

use crate::code::EvidenceCode;
use crate::envelope::EnvelopeError;
use crate::kms::{KmsSettings, KmsSigner};
use crate::local::LocalEd25519Signer;
use crate::signer::{ProducerSigner, SignError, Signer as _};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How a producer signs its audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SigningMode {
    /// Ed25519 key from a PKCS#8 PEM file.
    Local,
    /// AWS KMS ECDSA P-256 key.
    Kms,
    /// No signatures: only under the demo profile.
    Disabled,
}

impl SigningMode {
    /// The stable string form (the env value).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Kms => "kms",
            Self::Disabled => "disabled",
        }
    }
}

impl fmt::Display for SigningMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Deployment profile. Anything other than `demo` is held to production rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Local demos and tests: unsigned evidence is allowed when asked for explicitly.
    Demo,
    /// Everything else.
    Production,
}

impl Profile {
    /// The stable string form (the env value).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Demo => "demo",
            Self::Production => "production",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the signing configuration was refused at startup. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No mode outside the demo profile.
    #[error(
        "SPENDGUARD_SIGNING_MODE is not set; set it to local or kms \
         (disabled is allowed only with SPENDGUARD_PROFILE=demo)"
    )]
    ModeMissing,
    /// `disabled` outside the demo profile.
    #[error(
        "SPENDGUARD_SIGNING_MODE=disabled is refused under profile {profile}: unsigned evidence \
         is allowed only with SPENDGUARD_PROFILE=demo"
    )]
    DisabledOutsideDemo {
        /// The profile in force.
        profile: Profile,
    },
    /// A setting the mode needs is absent.
    #[error("signing mode {mode} needs {setting}")]
    Missing {
        /// The mode.
        mode: SigningMode,
        /// What is missing (flag and env names).
        setting: &'static str,
    },
    /// A setting that belongs to another mode is present (it would be silently ignored).
    #[error("signing mode {mode} does not use {setting}; remove it")]
    Conflict {
        /// The mode.
        mode: SigningMode,
        /// The stray setting.
        setting: &'static str,
    },
    /// A key id or producer id that cannot go into a signature.
    #[error("invalid signing identity: {0}")]
    Invalid(#[from] EnvelopeError),
    /// The key file cannot be read.
    #[error("signing key file {path} cannot be read: {reason}", path = path.display())]
    KeyFileUnreadable {
        /// The path.
        path: PathBuf,
        /// The IO error kind.
        reason: String,
    },
    /// The key file does not hold a usable key.
    #[error("signing key is invalid: {reason}")]
    KeyInvalid {
        /// What is wrong (never any part of the key).
        reason: &'static str,
    },
    /// The KMS key is not a P-256 signing key.
    #[error("kms key {kms_key} cannot be used: {reason}")]
    KmsKeyUnsupported {
        /// The configured KMS key.
        kms_key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// KMS refused or failed GetPublicKey.
    #[error("kms: {0}")]
    Kms(SignError),
}

impl ConfigError {
    /// The stable code.
    pub fn code(&self) -> EvidenceCode {
        match self {
            Self::ModeMissing => EvidenceCode::SigningModeMissing,
            Self::DisabledOutsideDemo { .. } => EvidenceCode::SigningDisabledOutsideDemo,
            Self::Missing { .. } => EvidenceCode::SigningConfigMissing,
            Self::Conflict { .. } => EvidenceCode::SigningConfigConflict,
            Self::Invalid(_) => EvidenceCode::SigningConfigInvalid,
            Self::KeyFileUnreadable { .. } => EvidenceCode::SigningKeyFileUnreadable,
            Self::KeyInvalid { .. } => EvidenceCode::SigningKeyInvalid,
            Self::KmsKeyUnsupported { .. } => EvidenceCode::SigningKmsKeyUnsupported,
            Self::Kms(error) => error.code(),
        }
    }
}

/// Default deadline for one KMS operation, retries included: KMS Sign is single-digit
/// milliseconds in-region, so 2 s only fires when KMS is unreachable.
pub const KMS_OPERATION_TIMEOUT_MS_DEFAULT: u64 = 2_000;

/// Signing flags, for `#[command(flatten)]` into a producing binary's `Args`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SigningArgs {
    /// How audit events are signed: local (Ed25519 key file), kms (AWS KMS P-256 key) or
    /// disabled (only with the demo profile). Required outside the demo profile.
    #[arg(long, env = "SPENDGUARD_SIGNING_MODE", value_enum)]
    pub signing_mode: Option<SigningMode>,

    /// Deployment profile; `demo` is the only one that may run without signatures.
    // A process-wide setting: move it to the platform's common arguments once more than signing
    // reads it.
    #[arg(
        long,
        env = "SPENDGUARD_PROFILE",
        value_enum,
        default_value = "production"
    )]
    pub profile: Profile,

    /// Path of the Ed25519 private key, PKCS#8 PEM (mode local; a mounted Secret).
    #[arg(long, env = "SPENDGUARD_SIGNING_KEY_FILE")]
    pub signing_key_file: Option<PathBuf>,

    /// Key registry id of the signing key; derived from the public key when unset.
    #[arg(long, env = "SPENDGUARD_SIGNING_KEY_ID")]
    pub signing_key_id: Option<String>,

    /// KMS key id, ARN or alias (mode kms).
    #[arg(long, env = "SPENDGUARD_SIGNING_KMS_KEY")]
    pub signing_kms_key: Option<String>,

    /// KMS endpoint override, e.g. a VPC endpoint or a local emulator (mode kms).
    #[arg(long, env = "SPENDGUARD_SIGNING_KMS_ENDPOINT_URL")]
    pub signing_kms_endpoint_url: Option<String>,

    /// KMS region; taken from the AWS chain (AWS_REGION, profile) when unset (mode kms).
    #[arg(long, env = "SPENDGUARD_SIGNING_KMS_REGION")]
    pub signing_kms_region: Option<String>,

    /// Deadline for one KMS operation, retries included, in milliseconds (mode kms).
    #[arg(long, env = "SPENDGUARD_SIGNING_KMS_TIMEOUT_MS", default_value_t = KMS_OPERATION_TIMEOUT_MS_DEFAULT)]
    pub signing_kms_timeout_ms: u64,
}

/// The outcome of startup: a signer, or (demo profile only) no signing at all.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "built once per process at startup"
)]
pub enum Signing {
    /// Sign every event with this signer.
    Enabled(ProducerSigner),
    /// Unsigned evidence (demo profile only; the events must say so).
    Disabled,
}

impl SigningArgs {
    /// Builds the configured signer for the producer `producer_id`, or refuses startup.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the missing, conflicting or invalid setting; in mode kms also
    /// when GetPublicKey fails or the key is not a P-256 signing key.
    ///
    /// # Guarantees
    /// [`Signing::Disabled`] is returned only under [`Profile::Demo`].
    pub async fn build(&self, producer_id: &str) -> Result<Signing, ConfigError> {
        let Self {
            signing_mode,
            profile,
            signing_key_file,
            signing_key_id,
            signing_kms_key,
            signing_kms_endpoint_url,
            signing_kms_region,
            signing_kms_timeout_ms: _,
        } = self;
        let mode = match (signing_mode, profile) {
            (Some(mode), _) => *mode,
            (None, Profile::Demo) => SigningMode::Disabled,
            (None, Profile::Production) => return Err(ConfigError::ModeMissing),
        };
        let conflict = |setting| Err(ConfigError::Conflict { mode, setting });
        let kms_settings = [
            (
                signing_kms_key.is_some(),
                "--signing-kms-key (SPENDGUARD_SIGNING_KMS_KEY)",
            ),
            (
                signing_kms_endpoint_url.is_some(),
                "--signing-kms-endpoint-url (SPENDGUARD_SIGNING_KMS_ENDPOINT_URL)",
            ),
            (
                signing_kms_region.is_some(),
                "--signing-kms-region (SPENDGUARD_SIGNING_KMS_REGION)",
            ),
        ];
        let key_file_setting = "--signing-key-file (SPENDGUARD_SIGNING_KEY_FILE)";
        let signing = match mode {
            SigningMode::Disabled => {
                if *profile != Profile::Demo {
                    return Err(ConfigError::DisabledOutsideDemo { profile: *profile });
                }
                if signing_key_file.is_some() {
                    return conflict(key_file_setting);
                }
                if signing_key_id.is_some() {
                    return conflict("--signing-key-id (SPENDGUARD_SIGNING_KEY_ID)");
                }
                if let Some((_, setting)) = kms_settings.iter().find(|(set, _)| *set) {
                    return conflict(setting);
                }
                tracing::warn!(
                    signing_mode = %mode,
                    profile = %profile,
                    "audit events are not signed (demo profile)"
                );
                return Ok(Signing::Disabled);
            }
            SigningMode::Local => {
                if let Some((_, setting)) = kms_settings.iter().find(|(set, _)| *set) {
                    return conflict(setting);
                }
                let path = signing_key_file.as_ref().ok_or(ConfigError::Missing {
                    mode,
                    setting: key_file_setting,
                })?;
                let signer = LocalEd25519Signer::from_pem_file(
                    path,
                    signing_key_id.as_deref(),
                    producer_id,
                )?;
                ProducerSigner::Local(signer)
            }
            SigningMode::Kms => {
                if signing_key_file.is_some() {
                    return conflict(key_file_setting);
                }
                let kms_key = signing_kms_key.clone().ok_or(ConfigError::Missing {
                    mode,
                    setting: "--signing-kms-key (SPENDGUARD_SIGNING_KMS_KEY)",
                })?;
                let settings = self.kms_settings(kms_key);
                let signer =
                    KmsSigner::connect(&settings, signing_key_id.as_deref(), producer_id).await?;
                ProducerSigner::Kms(signer)
            }
        };
        tracing::info!(
            signing_mode = %mode,
            profile = %profile,
            key_id = signing.key_id(),
            algorithm = %signing.algorithm(),
            producer_id,
            "audit event signing ready"
        );
        Ok(Signing::Enabled(signing))
    }

    fn kms_settings(&self, kms_key: String) -> KmsSettings {
        KmsSettings {
            kms_key,
            endpoint_url: self.signing_kms_endpoint_url.clone(),
            region: self.signing_kms_region.clone(),
            operation_timeout: Duration::from_millis(self.signing_kms_timeout_ms),
        }
    }
}
