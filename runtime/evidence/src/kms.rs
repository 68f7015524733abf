//! AWS KMS signing: ECDSA_SHA_256 on an ECC_NIST_P256 key through `aws-sdk-kms`.
//!
//! ```text
//! startup:  GetPublicKey(kms_key) ─► check usage/algorithms/spec ─► P-256 SPKI ─► key_id
//! sign:     envelope (≤ 512 B) ─► Sign(RAW, ECDSA_SHA_256) ─► DER ─► low-S r‖s ─► verify locally
//! ```
//!
//! The runtime needs only `kms:Sign` and `kms:GetPublicKey` on the one key. The envelope is always
//! sent as a RAW message (KMS's limit is 4096 bytes); DIGEST is never used, which also sidesteps
//! moto's DIGEST gap. Every signature is checked against the public key fetched at startup before
//! it is returned, so a misrouted key or a corrupted response never reaches the evidence.

use crate::config::{ConfigError, SigningMode};
use crate::envelope::{Algorithm, Envelope, check_identifier};
use crate::signer::{SignError, Signer};
use crate::verify::PublicKey;
use aws_config::{BehaviorVersion, Region, timeout::TimeoutConfig};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use p256::ecdsa::signature::Verifier as _;
use std::fmt;
use std::time::Duration;

/// Where and how to reach KMS. Credentials and (by default) the region come from the standard
/// AWS chain: environment, shared config/credentials files, web identity (IRSA), ECS, IMDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsSettings {
    /// KMS key id, key ARN, alias name or alias ARN.
    pub kms_key: String,
    /// Endpoint override (moto, a VPC endpoint); `None` for the regional AWS endpoint.
    pub endpoint_url: Option<String>,
    /// Region override; `None` takes it from the chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// Deadline for one KMS operation, retries included.
    pub operation_timeout: Duration,
}

/// The HTTPS client every KMS call uses: hyper 1 with rustls on `ring` (no aws-lc-rs).
pub fn https_client() -> aws_sdk_kms::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// Signs through AWS KMS. Holds no private key; the client's credentials stay inside the SDK.
pub struct KmsSigner {
    client: aws_sdk_kms::Client,
    kms_key: String,
    key_id: String,
    producer_id: String,
    public_key: PublicKey,
    verifying_key: p256::ecdsa::VerifyingKey,
}

impl fmt::Debug for KmsSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written: the SDK client (and its credentials provider) is not formatted.
        f.debug_struct("KmsSigner")
            .field("kms_key", &self.kms_key)
            .field("key_id", &self.key_id)
            .field("producer_id", &self.producer_id)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl KmsSigner {
    /// Builds a KMS client from the standard AWS chain plus `settings`, then
    /// [`KmsSigner::from_client`].
    ///
    /// # Errors
    /// [`ConfigError::Missing`] when no region is configured anywhere; otherwise as
    /// [`KmsSigner::from_client`] (no credentials shows up as [`ConfigError::Kms`]).
    pub async fn connect(
        settings: &KmsSettings,
        key_id: Option<&str>,
        producer_id: &str,
    ) -> Result<Self, ConfigError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(https_client())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(settings.operation_timeout)
                    .build(),
            );
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint_url) = &settings.endpoint_url {
            loader = loader.endpoint_url(endpoint_url);
        }
        let sdk_config = loader.load().await;
        if sdk_config.region().is_none() {
            return Err(ConfigError::Missing {
                mode: SigningMode::Kms,
                setting: "a region (SPENDGUARD_SIGNING_KMS_REGION or AWS_REGION)",
            });
        }
        let client = aws_sdk_kms::Client::new(&sdk_config);
        Self::from_client(client, &settings.kms_key, key_id, producer_id).await
    }

    /// Fetches the key's public key once and checks that the key can make ECDSA_SHA_256
    /// signatures on P-256.
    ///
    /// `key_id` overrides the id derived from the public key ([`PublicKey::derived_key_id`]).
    ///
    /// # Errors
    /// [`ConfigError::Kms`] when GetPublicKey fails, [`ConfigError::KmsKeyUnsupported`] for a
    /// key that is not a P-256 SIGN_VERIFY key, [`ConfigError::Invalid`] for bad identifiers.
    pub async fn from_client(
        client: aws_sdk_kms::Client,
        kms_key: &str,
        key_id: Option<&str>,
        producer_id: &str,
    ) -> Result<Self, ConfigError> {
        check_identifier("producer_id", producer_id)?;
        let unsupported = |reason: &'static str| ConfigError::KmsKeyUnsupported {
            kms_key: kms_key.to_owned(),
            reason,
        };
        let output = client
            .get_public_key()
            .key_id(kms_key)
            .send()
            .await
            .map_err(|error| ConfigError::Kms(classify(kms_key, &error)))?;
        if output
            .key_usage()
            .is_some_and(|usage| *usage != KeyUsageType::SignVerify)
        {
            return Err(unsupported("key usage is not SIGN_VERIFY"));
        }
        // moto omits KeySpec (it sends the older CustomerMasterKeySpec); real KMS sends both.
        if output
            .key_spec()
            .is_some_and(|spec| *spec != KeySpec::EccNistP256)
        {
            return Err(unsupported("key spec is not ECC_NIST_P256"));
        }
        if !output
            .signing_algorithms()
            .contains(&SigningAlgorithmSpec::EcdsaSha256)
        {
            return Err(unsupported("key does not offer ECDSA_SHA_256"));
        }
        let spki = output
            .public_key()
            .ok_or_else(|| unsupported("GetPublicKey returned no public key"))?;
        let public_key = PublicKey::from_bytes(Algorithm::EcdsaP256Sha256, spki.as_ref())
            .map_err(|_| unsupported("public key is not a P-256 key"))?;
        let PublicKey::EcdsaP256(verifying_key) = public_key.clone() else {
            unreachable!("parsed as EcdsaP256Sha256 above");
        };
        let key_id = key_id.map_or_else(|| public_key.derived_key_id(), str::to_owned);
        check_identifier("key_id", &key_id)?;
        Ok(Self {
            client,
            kms_key: kms_key.to_owned(),
            key_id,
            producer_id: producer_id.to_owned(),
            public_key,
            verifying_key,
        })
    }

    /// The configured KMS key (id, ARN or alias).
    pub fn kms_key(&self) -> &str {
        &self.kms_key
    }
}

impl Signer for KmsSigner {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn algorithm(&self) -> Algorithm {
        Algorithm::EcdsaP256Sha256
    }

    fn producer_id(&self) -> &str {
        &self.producer_id
    }

    fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    async fn sign_envelope(&self, envelope: &Envelope) -> Result<Vec<u8>, SignError> {
        let message = envelope.as_bytes();
        let output = self
            .client
            .sign()
            .key_id(&self.kms_key)
            .message(Blob::new(message))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|error| classify(&self.kms_key, &error))?;
        let der = output.signature().ok_or(SignError::BackendInvalidResponse(
            "Sign returned no signature",
        ))?;
        let signature = p256::ecdsa::Signature::from_der(der.as_ref())
            .map_err(|_| SignError::BackendInvalidResponse("signature is not DER ECDSA"))?;
        let signature = signature.normalize_s().unwrap_or(signature);
        self.verifying_key
            .verify(message, &signature)
            .map_err(|_| {
                SignError::BackendInvalidResponse(
                    "signature does not verify under the key's public key",
                )
            })?;
        Ok(signature.to_bytes().to_vec())
    }
}

/// What a KMS error code means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsErrorClass {
    /// The key cannot sign until an operator acts.
    KeyUnavailable,
    /// Retry later.
    Transient,
}

/// Classifies a KMS error code (the `__type` of the error response).
///
/// Codes that name the key's state or the caller's permissions are not transient: retrying a
/// disabled, deleted or forbidden key only delays the alert. Unknown codes are treated as
/// transient, so a new throttling code never disables signing for good.
pub fn classify_code(code: &str) -> KmsErrorClass {
    match code {
        "DisabledException"
        | "KMSInvalidStateException"
        | "NotFoundException"
        | "InvalidKeyUsageException"
        | "IncorrectKeyException"
        | "InvalidGrantTokenException"
        | "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ValidationException" => KmsErrorClass::KeyUnavailable,
        _ => KmsErrorClass::Transient,
    }
}

fn classify<E, R>(kms_key: &str, error: &SdkError<E, R>) -> SignError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + 'static,
{
    if let SdkError::ServiceError(service) = error {
        let inner = service.err();
        let code = inner.code().unwrap_or("unknown");
        let message = inner.message().unwrap_or("").to_owned();
        return match classify_code(code) {
            KmsErrorClass::KeyUnavailable => SignError::KeyUnavailable {
                kms_key: kms_key.to_owned(),
                kms_code: code.to_owned(),
                message,
            },
            KmsErrorClass::Transient => SignError::BackendUnavailable(format!("{code}: {message}")),
        };
    }
    let text = DisplayErrorContext(error).to_string();
    if credentials_missing(error) {
        return SignError::CredentialsMissing(text);
    }
    SignError::BackendUnavailable(text)
}

/// True when the error comes from the credential chain finding nothing usable (as opposed to a
/// credential provider that failed for now, which stays transient).
fn credentials_missing(error: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut source = Some(error);
    while let Some(current) = source {
        if let Some(credentials) = current.downcast_ref::<CredentialsError>() {
            return matches!(
                credentials,
                CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_)
            );
        }
        source = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_state_codes_are_not_retried_and_unknown_codes_are() {
        // Goal: the KMS codes for a disabled, pending-deletion or deleted key and for missing
        // permissions surface as SIGNING_KEY_UNAVAILABLE (an operator must act); throttling,
        // internal errors and codes this version does not know stay transient.
        for code in [
            "DisabledException",
            "KMSInvalidStateException",
            "NotFoundException",
            "AccessDeniedException",
            "InvalidKeyUsageException",
        ] {
            assert_eq!(classify_code(code), KmsErrorClass::KeyUnavailable, "{code}");
        }
        for code in [
            "KeyUnavailableException",
            "DependencyTimeoutException",
            "KMSInternalException",
            "ThrottlingException",
            "SomethingNewException",
        ] {
            assert_eq!(classify_code(code), KmsErrorClass::Transient, "{code}");
        }
    }
}
