//! TLS for the ledger's own PostgreSQL sessions (the cached path's and the reads'), set up from
//! sqlx's reading of the same URL and `PGSSL*` environment as the pool, so both kinds of
//! session connect alike. The modes mean what sqlx (and libpq) mean:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `allow`, `prefer` | if the server offers it | no |
//! | `require` | yes | no |
//! | `verify-ca` | yes | signed by a root (`sslrootcert`, else the system's) |
//! | `verify-full` | yes | as `verify-ca`, and issued for the host connected to |
//!
//! `sslcert` and `sslkey` present a client certificate. Everything is read once, at start: a
//! root or key that cannot be read fails the start, not the first batch.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// How one of the ledger's tokio-postgres sessions connects: its settings and its TLS.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Host, user, database, options.
    pub pg: tokio_postgres::Config,
    /// TLS as the URL's `sslmode` asks.
    pub tls: PgTls,
}

impl SessionConfig {
    /// Opens a session; the returned connection must be polled (spawned) for it to work.
    ///
    /// # Errors
    /// As tokio-postgres connects.
    pub async fn connect(
        &self,
    ) -> std::result::Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, PgTlsStream<tokio_postgres::Socket>>,
        ),
        tokio_postgres::Error,
    > {
        self.pg.connect(self.tls.clone()).await
    }
}

/// Connects the ledger's tokio-postgres sessions with TLS as `sslmode` asks.
#[derive(Clone)]
pub struct PgTls {
    /// `None` under `sslmode=disable` (tokio-postgres makes a connector, and never uses it).
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("enabled", &self.config.is_some())
            .finish()
    }
}

impl PgTls {
    /// TLS as `options` (the pool's reading of the URL and environment) asks.
    ///
    /// # Errors
    /// [`Error::Startup`] when a root, certificate or key cannot be read or used, or a verifying
    /// mode has no root to verify with.
    pub fn from_options(options: &PgConnectOptions) -> Result<Self> {
        let mode = options.get_ssl_mode();
        if matches!(mode, PgSslMode::Disable) {
            return Ok(Self { config: None });
        }
        let files = CertificateFiles::of(options);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            PgSslMode::VerifyCa | PgSslMode::VerifyFull => Arc::new(VerifyChain {
                roots: Arc::new(roots(files.root.as_ref())?),
                provider: provider.clone(),
                check_name: matches!(mode, PgSslMode::VerifyFull),
            }),
            _ => Arc::new(EncryptOnly {
                provider: provider.clone(),
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(startup)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (files.cert, files.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(&cert)?;
                let key = PrivateKeyDer::from_pem_slice(&cert_bytes(&key)?)
                    .map_err(|e| Error::Startup(format!("PostgreSQL client key (sslkey): {e}")))?;
                builder.with_client_auth_cert(chain, key).map_err(startup)?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(Error::Startup(
                    "PostgreSQL client certificate: sslcert and sslkey go together".into(),
                ));
            }
        };
        Ok(Self {
            config: Some(Arc::new(config)),
        })
    }
}

fn startup(e: impl std::fmt::Display) -> Error {
    Error::Startup(format!("PostgreSQL TLS: {e}"))
}

/// A certificate or key as sqlx holds it: a file, or PEM inline in the URL or environment.
enum Source {
    File(std::path::PathBuf),
    Inline(Vec<u8>),
}

struct CertificateFiles {
    root: Option<Source>,
    cert: Option<Source>,
    key: Option<Source>,
}

impl CertificateFiles {
    /// sqlx keeps these private; its URL form writes each as `file: <path>` or the PEM itself.
    fn of(options: &PgConnectOptions) -> Self {
        let url = options.to_url_lossy();
        let find = |name: &str| {
            url.query_pairs()
                .find(|(key, _)| key == name)
                .map(|(_, value)| match value.strip_prefix("file: ") {
                    Some(path) => Source::File(path.into()),
                    None => Source::Inline(value.as_bytes().to_vec()),
                })
        };
        Self {
            root: find("sslrootcert"),
            cert: find("sslcert"),
            key: find("sslkey"),
        }
    }
}

fn cert_bytes(source: &Source) -> Result<Vec<u8>> {
    match source {
        Source::Inline(pem) => Ok(pem.clone()),
        Source::File(path) => std::fs::read(path)
            .map_err(|e| Error::Startup(format!("PostgreSQL TLS: {}: {e}", path.display()))),
    }
}

fn certificates(source: &Source) -> Result<Vec<CertificateDer<'static>>> {
    let pem = cert_bytes(source)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(startup)?;
    if certificates.is_empty() {
        return Err(startup("no PEM certificate found"));
    }
    Ok(certificates)
}

/// `sslrootcert`'s certificates, else the system's.
fn roots(root: Option<&Source>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root {
        Some(source) => {
            for certificate in certificates(source)? {
                store.add(certificate).map_err(|e| {
                    Error::Startup(format!("PostgreSQL root certificate (sslrootcert): {e}"))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    if store.is_empty() {
        return Err(Error::Startup(
            "PostgreSQL TLS: sslmode verify-ca or verify-full needs a root certificate (sslrootcert), and the system has none".into(),
        ));
    }
    Ok(store)
}

/// `verify-ca` and `verify-full`: the server's chain must end at a root; under `verify-full`
/// the certificate must also name the host connected to.
#[derive(Debug)]
struct VerifyChain {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    check_name: bool,
}

impl ServerCertVerifier for VerifyChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let certificate = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&certificate, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `allow`, `prefer` and `require`: encrypted, with the server's certificate unchecked (libpq's
/// and sqlx's meaning). The handshake's signatures are still checked against that certificate.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<PgTlsConnect> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name,
        })
    }
}

/// One connection's TLS handshake.
pub struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| {
                io::Error::other("TLS asked for under sslmode=disable (a tokio-postgres change?)")
            })?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(self.name, stream)
                .await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// An encrypted session's stream.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    /// No channel binding: SCRAM authenticates without it (libpq's `channel_binding=prefer`).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
