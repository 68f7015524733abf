//! How every SpendGuard component reads a PostgreSQL URL (the ledger, `spendguard migrate`, the
//! outbox forwarder, audit export, the Postgres leader lease): sqlx's reading of the URL and of
//! libpq's `PG*` variables, with TLS made to mean no less than libpq's where sqlx means less.
//!
//! - `sslmode=allow` is read as `prefer`: sqlx's `allow` never encrypts, libpq's encrypts when
//!   the server insists.
//! - `sslmode=verify-ca` is refused: sqlx trusts the system's public roots *and* `sslrootcert`,
//!   so a chain check without a host name check would pass any publicly issued certificate.
//!   `verify-full` checks the name too, which a public CA issues only to the name's owner.
//! - An unknown `PGSSLMODE` is refused (sqlx falls back to `prefer` silently), and so is an
//!   empty `PGSSLROOTCERT`, `PGSSLCERT` or `PGSSLKEY` (sqlx would read the file `""`).
//! - `sslmode=require` with a root certificate encrypts without checking the server, as sqlx
//!   does (libpq would check the chain): logged as a warning, since the root suggests otherwise.

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::path::PathBuf;
use std::str::FromStr;
use tracing::warn;

/// A PostgreSQL URL, or the environment beside it, that no component connects with.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// sqlx does not read the URL.
    #[error("invalid PostgreSQL URL: {0}")]
    Invalid(String),
    /// `PGSSLMODE` holds no mode.
    #[error(
        "PGSSLMODE={0:?} is not an sslmode (disable, allow, prefer, require, verify-ca, verify-full)"
    )]
    SslMode(String),
    /// A `PGSSL*` file variable is set to nothing.
    #[error("{0} is set but empty: unset it, or name a file")]
    EmptyVariable(&'static str),
    /// `sslmode=verify-ca`, which would verify nothing here.
    #[error(
        "sslmode=verify-ca is refused: the connection would trust the system's public roots besides sslrootcert, and without the host name check any publicly issued certificate would pass; use sslmode=verify-full"
    )]
    VerifyCaRefused,
}

impl UrlError {
    /// Stable code, for logs and startup errors.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "POSTGRES_URL_INVALID",
            Self::SslMode(_) => "POSTGRES_SSLMODE_INVALID",
            Self::EmptyVariable(_) => "POSTGRES_TLS_VARIABLE_EMPTY",
            Self::VerifyCaRefused => "POSTGRES_VERIFY_CA_REFUSED",
        }
    }
}

const SSL_MODES: [&str; 6] = [
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// The connect options of `url`, as every component connects.
///
/// # Errors
/// [`UrlError`].
pub fn connect_options(url: &str) -> Result<PgConnectOptions, UrlError> {
    if let Ok(mode) = std::env::var("PGSSLMODE")
        && !SSL_MODES.contains(&mode.as_str())
    {
        return Err(UrlError::SslMode(mode));
    }
    for name in ["PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"] {
        if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
            return Err(UrlError::EmptyVariable(name));
        }
    }
    let mut options =
        PgConnectOptions::from_str(url).map_err(|e| UrlError::Invalid(e.to_string()))?;
    match options.get_ssl_mode() {
        PgSslMode::Allow => options = options.ssl_mode(PgSslMode::Prefer),
        PgSslMode::VerifyCa => return Err(UrlError::VerifyCaRefused),
        PgSslMode::Require if tls_files(&options).root.is_some() => warn!(
            "sslmode=require with a root certificate: the connection is encrypted, but the server's certificate is not checked; use sslmode=verify-full"
        ),
        _ => {}
    }
    Ok(options)
}

/// A certificate or key as sqlx holds it: a file (URL parameters always are), or PEM given
/// inline in a `PGSSL*` variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file's path.
    File(PathBuf),
    /// The PEM itself.
    Inline(Vec<u8>),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Inline(_) => f.write_str("inline PEM"),
        }
    }
}

impl Source {
    /// The PEM bytes.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Self::File(path) => std::fs::read(path),
            Self::Inline(pem) => Ok(pem.clone()),
        }
    }
}

/// The TLS files of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `sslrootcert`: the roots that verify the server (else the system's).
    pub root: Option<Source>,
    /// `sslcert`: the client certificate.
    pub cert: Option<Source>,
    /// `sslkey`: its key.
    pub key: Option<Source>,
}

/// The TLS files `options` names. sqlx keeps them private; its URL form writes each as
/// `file: <path>` or as the PEM itself.
pub fn tls_files(options: &PgConnectOptions) -> TlsFiles {
    let url = options.to_url_lossy();
    let find = |name: &str| {
        url.query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| match value.strip_prefix("file: ") {
                Some(path) => Source::File(path.into()),
                None => Source::Inline(value.as_bytes().to_vec()),
            })
    };
    TlsFiles {
        root: find("sslrootcert"),
        cert: find("sslcert"),
        key: find("sslkey"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tls_modes_mean_no_less_than_libpq() {
        let mode = |url: &str| connect_options(url).map(|o| o.get_ssl_mode());
        assert!(matches!(
            mode("postgres://u@db/x?sslmode=allow"),
            Ok(PgSslMode::Prefer)
        ));
        assert!(matches!(
            mode("postgres://u@db/x?sslmode=verify-ca&sslrootcert=/ca.pem"),
            Err(UrlError::VerifyCaRefused)
        ));
        assert!(matches!(
            mode("postgres://u@db/x?sslmode=verify-full&sslrootcert=/ca.pem"),
            Ok(PgSslMode::VerifyFull)
        ));
        assert!(matches!(
            mode("postgres://u@db/x?sslmode=require"),
            Ok(PgSslMode::Require)
        ));
        assert!(matches!(
            mode("postgres://u@db/x?sslmode=verify_full"),
            Err(UrlError::Invalid(_))
        ));
    }

    #[test]
    fn tls_files_are_read_back_from_the_url_exactly() {
        let options = connect_options(
            "postgres://u@db/x?sslmode=verify-full&sslrootcert=/etc/my%20ca/r%26d.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(
            tls_files(&options),
            TlsFiles {
                root: Some(Source::File("/etc/my ca/r&d.pem".into())),
                cert: Some(Source::File("/c.pem".into())),
                key: Some(Source::File("/k.pem".into())),
            }
        );
        assert_eq!(
            tls_files(&connect_options("postgres://u@db/x").unwrap()),
            TlsFiles::default()
        );
    }
}
