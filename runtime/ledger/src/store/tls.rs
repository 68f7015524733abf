//! TLS for the ledger's own PostgreSQL sessions (the cached path's and the reads'), set up from
//! the same reading of the URL and `PGSSL*` environment as the pool
//! ([`spendguard_postgres::connect_options`], which also refuses `verify-ca` and reads `allow`
//! as `prefer`). The modes:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` (and `allow`) | if the server offers it | no |
//! | `require` | yes | no |
//! | `verify-full` | yes | signed by `sslrootcert` (else a system root), issued for the host |
//!
//! `sslcert` and `sslkey` present a client certificate. The files are read at start (a bad one
//! fails the start) and again for every session opened, so a rotated certificate or root is
//! used from the next session on, as the pool does.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use spendguard_postgres::{Source, TlsFiles, tls_files};
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
    /// As tokio-postgres connects (a TLS file that became unusable is a TLS error).
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
#[derive(Debug, Clone)]
pub struct PgTls {
    /// `None` under `sslmode=disable` (tokio-postgres makes a connector, and never uses it).
    settings: Option<Arc<Settings>>,
}

#[derive(Debug)]
struct Settings {
    verify: bool,
    files: TlsFiles,
}

impl PgTls {
    /// TLS as `url`, read into `options` by [`spendguard_postgres::connect_options`], asks.
    ///
    /// # Errors
    /// [`Error::Startup`] when a root, certificate or key cannot be read or used (named), or
    /// `verify-full` has no root to verify with, or the mode is `verify-ca`.
    pub fn from_url(url: &str, options: &PgConnectOptions) -> Result<Self> {
        let verify = match options.get_ssl_mode() {
            PgSslMode::Disable => return Ok(Self { settings: None }),
            PgSslMode::VerifyFull => true,
            PgSslMode::VerifyCa => {
                return Err(Error::Startup(
                    spendguard_postgres::UrlError::VerifyCaRefused.to_string(),
                ));
            }
            PgSslMode::Allow | PgSslMode::Prefer | PgSslMode::Require => false,
        };
        let settings = Settings {
            verify,
            files: tls_files(url).map_err(|e| Error::Startup(e.to_string()))?,
        };
        // Read now, so a file that cannot be used fails the start.
        settings.client_config().map_err(Error::Startup)?;
        Ok(Self {
            settings: Some(Arc::new(settings)),
        })
    }
}

impl Settings {
    /// A client configuration from the files as they are now.
    fn client_config(&self) -> std::result::Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = match (&self.files.cert, &self.files.key) {
            (Some(cert), Some(key)) => Some((
                certificates(cert, "sslcert")?,
                PrivateKeyDer::from_pem_slice(&read(key, "sslkey")?)
                    .map_err(|e| format!("PostgreSQL TLS: client key (sslkey) {key}: {e}"))?,
            )),
            (None, None) => None,
            _ => {
                return Err(
                    "PostgreSQL TLS: a client certificate needs both sslcert and sslkey".into(),
                );
            }
        };
        let verifier = Arc::new(ServerCheck {
            roots: if self.verify {
                Some(Arc::new(roots(self.files.root.as_ref())?))
            } else {
                None
            },
            provider: provider.clone(),
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("PostgreSQL TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match chain {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("PostgreSQL TLS: client certificate: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

fn read(source: &Source, what: &str) -> std::result::Result<Vec<u8>, String> {
    source
        .read()
        .map_err(|e| format!("PostgreSQL TLS: {what} {source}: {e}"))
}

fn certificates(
    source: &Source,
    what: &str,
) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(source, what)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("PostgreSQL TLS: {what} {source}: {e}"))?;
    if certificates.is_empty() {
        return Err(format!(
            "PostgreSQL TLS: {what} {source}: no PEM certificate found"
        ));
    }
    Ok(certificates)
}

/// `sslrootcert`'s certificates, else the system's.
fn roots(root: Option<&Source>) -> std::result::Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        Some(source) => {
            for certificate in certificates(source, "sslrootcert")? {
                store
                    .add(certificate)
                    .map_err(|e| format!("PostgreSQL TLS: sslrootcert {source}: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    if store.is_empty() {
        return Err(
            "PostgreSQL TLS: sslmode=verify-full needs a root certificate (sslrootcert), and the system has none".into(),
        );
    }
    Ok(store)
}

/// Checks the server as `sslmode` says. With `roots` (`verify-full`): the chain must end at one
/// of them and the certificate name the host connected to (rustls' own checks). Without
/// (`prefer`, `require`): the certificate is not checked (libpq's and sqlx's meaning). Either
/// way the handshake's signatures are checked against the certificate shown.
#[derive(Debug)]
struct ServerCheck {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let certificate = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &certificate,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
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

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<PgTlsConnect> {
        // A Unix socket has no host name (tokio-postgres asks with ""): it never uses TLS, and
        // must not fail here.
        let name = ServerName::try_from(host.to_owned()).ok();
        let config = match &self.settings {
            Some(settings) if name.is_some() => Some(
                settings
                    .client_config()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            ),
            _ => None,
        };
        Ok(PgTlsConnect { config, name })
    }
}

/// One connection's TLS handshake.
pub struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: Option<ServerName<'static>>,
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
            let (Some(config), Some(name)) = (self.config, self.name) else {
                return Err(io::Error::other(
                    "TLS asked for under sslmode=disable or without a host name (a tokio-postgres change?)",
                ));
            };
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
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
