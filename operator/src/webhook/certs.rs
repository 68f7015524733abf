//! Webhook certificates, made in-process: one CA shared by every replica through a Secret, and a
//! serving certificate per replica, signed by it and re-issued before it expires.
//!
//! Sharing the CA is what keeps replicas from fighting over `caBundle`: every replica patches the
//! same bytes, so the patches are idempotent. The CA is created once (create-if-absent; the loser
//! of a create race reads the winner's Secret), and its key never leaves the operator namespace.

use super::WebhookError;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The CA's subject. Fixed, because a replica rebuilds the issuer from it and the Secret's key.
const CA_COMMON_NAME: &str = "spendguard-webhook-ca";
/// CA lifetime. To rotate the CA, delete (or replace) the Secret: replicas follow it within a
/// minute.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Serving certificate lifetime.
pub const SERVING_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the serving certificate is re-issued (well within its lifetime).
pub const SERVING_RENEWAL: Duration = Duration::from_secs(24 * 3600);
/// Backdating tolerates clocks slightly behind ours (the apiserver's).
const BACKDATE: Duration = Duration::from_secs(3600);

/// The shared CA: its certificate (the `caBundle`) and its key.
pub struct WebhookCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for WebhookCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCa").finish_non_exhaustive()
    }
}

fn validity(lifetime: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - BACKDATE, now + lifetime)
}

/// The parameters the issuer is rebuilt from: the subject, key-identifier method and key usages
/// must be the same ones the CA certificate was made with.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(CA_VALIDITY);
    params
}

fn certificate_error(e: rcgen::Error) -> WebhookError {
    WebhookError::Certificate(e.to_string())
}

impl WebhookCa {
    /// A new CA (ECDSA P-256).
    ///
    /// # Errors
    /// [`WebhookError::Certificate`].
    pub fn generate() -> Result<Self, WebhookError> {
        let key = KeyPair::generate().map_err(certificate_error)?;
        let cert = ca_params().self_signed(&key).map_err(certificate_error)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA stored in a Secret.
    ///
    /// # Errors
    /// [`WebhookError::CaSecretInvalid`] when the key does not parse.
    pub fn from_pem(cert_pem: String, key_pem: &str) -> Result<Self, WebhookError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| WebhookError::CaSecretInvalid(format!("tls.key: {e}")))?;
        if !cert_pem.contains("BEGIN CERTIFICATE") {
            return Err(WebhookError::CaSecretInvalid(
                "tls.crt holds no PEM certificate".into(),
            ));
        }
        Ok(Self { cert_pem, key })
    }

    /// The CA certificate in PEM: the webhook configurations' `caBundle`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A serving certificate for `names` (DNS names or IP addresses), signed by this CA.
    ///
    /// # Errors
    /// [`WebhookError::Certificate`] when a name is invalid or signing fails.
    pub fn issue_serving(&self, names: &[String]) -> Result<Arc<CertifiedKey>, WebhookError> {
        let Some(first) = names.first() else {
            return Err(WebhookError::Config(
                "the serving certificate needs at least one DNS name or IP".into(),
            ));
        };
        let key = KeyPair::generate().map_err(certificate_error)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(certificate_error)?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, first.as_str());
        params.distinguished_name = subject;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(SERVING_VALIDITY);
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(certificate_error)?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(
            vec![CertificateDer::from(cert.der().to_vec())],
            private,
            &provider(),
        )
        .map_err(|e| WebhookError::Tls(e.to_string()))?;
        Ok(Arc::new(certified))
    }
}

/// The crypto provider (ring, as everywhere else in the workspace).
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Reads the CA from `namespace/name`, creating the Secret first when it does not exist.
///
/// # Errors
/// [`WebhookError::CaSecret`] for API failures, [`WebhookError::CaSecretInvalid`] for a Secret
/// that does not hold a CA.
pub async fn load_or_create_ca(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<WebhookCa, WebhookError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(secret) = secrets
        .get_opt(name)
        .await
        .map_err(WebhookError::CaSecret)?
    {
        return from_secret(&secret);
    }
    let ca = WebhookCa::generate()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "spendguard".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(ca.cert_pem.clone().into())),
            (
                "tls.key".to_owned(),
                ByteString(ca.key.serialize_pem().into()),
            ),
        ])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(ca),
        // Another replica created it first: use theirs, so both serve under one CA.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(name).await.map_err(WebhookError::CaSecret)?;
            from_secret(&secret)
        }
        Err(e) => Err(WebhookError::CaSecret(e)),
    }
}

fn from_secret(secret: &Secret) -> Result<WebhookCa, WebhookError> {
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| WebhookError::CaSecretInvalid(format!("{key} missing or not UTF-8")))
    };
    WebhookCa::from_pem(field("tls.crt")?, &field("tls.key")?)
}

/// Hands out the current serving certificate; [`CertResolver::replace`] swaps it without
/// restarting the listener.
#[derive(Debug)]
pub struct CertResolver(RwLock<Arc<CertifiedKey>>);

impl CertResolver {
    /// A resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Self(RwLock::new(key))
    }

    /// Serves `key` from the next handshake on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        // A poisoned lock only means a writer panicked mid-assignment of an Arc; take it over.
        let mut guard = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = key;
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let guard = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(Arc::clone(&guard))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn a_ca_rebuilt_from_its_pem_signs_certificates_that_chain_to_it() {
        let ca = WebhookCa::generate().unwrap();
        let key_pem = ca.key.serialize_pem();
        let rebuilt = WebhookCa::from_pem(ca.cert_pem().to_owned(), &key_pem).unwrap();
        let served = rebuilt
            .issue_serving(&["spendguard-webhook.ns.svc".into(), "127.0.0.1".into()])
            .unwrap();
        // Verify the leaf against the original CA certificate, as the apiserver does.
        let mut roots = rustls::RootCertStore::empty();
        let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(ca.cert_pem().as_bytes())
            .map(|d: CertificateDer<'static>| d)
            .unwrap();
        roots.add(ca_der).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(provider()),
        )
        .build()
        .unwrap();
        for name in ["spendguard-webhook.ns.svc", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &served.cert[0],
                    &[],
                    &rustls::pki_types::ServerName::try_from(name).unwrap(),
                    &[],
                    rustls::pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = verifier.verify_server_cert(
            &served.cert[0],
            &[],
            &rustls::pki_types::ServerName::try_from("elsewhere.ns.svc").unwrap(),
            &[],
            rustls::pki_types::UnixTime::now(),
        );
        assert!(other.is_err());
    }

    #[test]
    fn a_secret_without_a_ca_is_refused() {
        let ca = WebhookCa::generate().unwrap();
        assert!(matches!(
            WebhookCa::from_pem(ca.cert_pem().to_owned(), "not a key"),
            Err(WebhookError::CaSecretInvalid(_))
        ));
        assert!(matches!(
            WebhookCa::from_pem("junk".into(), &ca.key.serialize_pem()),
            Err(WebhookError::CaSecretInvalid(_))
        ));
        assert!(matches!(
            from_secret(&Secret::default()),
            Err(WebhookError::CaSecretInvalid(_))
        ));
    }
}
