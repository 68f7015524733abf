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

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::path::PathBuf;
use std::str::FromStr;
use tracing::warn;
use url::Url;

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

/// The URL parameters sqlx reads for each setting (the last one given wins, as in sqlx).
const MODE_PARAMETERS: [&str; 2] = ["sslmode", "ssl-mode"];
const ROOT_PARAMETERS: [&str; 3] = ["sslrootcert", "ssl-root-cert", "ssl-ca"];
const CERT_PARAMETERS: [&str; 2] = ["sslcert", "ssl-cert"];
const KEY_PARAMETERS: [&str; 2] = ["sslkey", "ssl-key"];

/// The connect options of `url`, as every component connects.
///
/// # Errors
/// [`UrlError`].
pub fn connect_options(url: &str) -> Result<PgConnectOptions, UrlError> {
    connect_options_with(url, &|name| std::env::var(name).ok())
}

/// [`connect_options`] with the environment read through `env`.
fn connect_options_with(
    url: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PgConnectOptions, UrlError> {
    let parsed = Url::parse(url).map_err(|e| UrlError::Invalid(e.to_string()))?;
    // What sqlx takes from the environment only where the URL does not say.
    if parameter(&parsed, &MODE_PARAMETERS).is_none()
        && let Some(mode) = env("PGSSLMODE")
        && !SSL_MODES.contains(&mode.as_str())
    {
        return Err(UrlError::SslMode(mode));
    }
    for (name, parameters) in [
        ("PGSSLROOTCERT", &ROOT_PARAMETERS[..]),
        ("PGSSLCERT", &CERT_PARAMETERS[..]),
        ("PGSSLKEY", &KEY_PARAMETERS[..]),
    ] {
        if parameter(&parsed, parameters).is_none() && env(name).is_some_and(|v| v.is_empty()) {
            return Err(UrlError::EmptyVariable(name));
        }
    }
    let mut options =
        PgConnectOptions::from_str(url).map_err(|e| UrlError::Invalid(e.to_string()))?;
    match options.get_ssl_mode() {
        PgSslMode::Allow => options = options.ssl_mode(PgSslMode::Prefer),
        PgSslMode::VerifyCa => return Err(UrlError::VerifyCaRefused),
        PgSslMode::Require if tls_files_with(url, env)?.root.is_some() => warn!(
            "sslmode=require with a root certificate: the connection is encrypted, but the server's certificate is not checked; use sslmode=verify-full"
        ),
        _ => {}
    }
    Ok(options)
}

/// The last value of any of `names` in the URL's query.
fn parameter(url: &Url, names: &[&str]) -> Option<String> {
    url.query_pairs()
        .filter(|(key, _)| names.contains(&key.as_ref()))
        .last()
        .map(|(_, value)| value.into_owned())
}

/// A certificate or key as sqlx reads it: a file (URL parameters always are), or PEM given
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

    /// A `PGSSL*` value as sqlx reads it: PEM if it looks like PEM, else a path.
    fn from_variable(value: String) -> Self {
        let trimmed = value.trim();
        if trimmed.starts_with("-----BEGIN") && trimmed.ends_with("-----") {
            Self::Inline(value.into_bytes())
        } else {
            Self::File(value.into())
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

/// The TLS files `url` names, as sqlx reads them: the URL's parameter, else the `PGSSL*`
/// variable. (Read here rather than from sqlx, which keeps them private and can only give
/// them back through a URL it cannot build for every host it accepts.)
///
/// # Errors
/// [`UrlError::Invalid`].
pub fn tls_files(url: &str) -> Result<TlsFiles, UrlError> {
    tls_files_with(url, &|name| std::env::var(name).ok())
}

fn tls_files_with(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<TlsFiles, UrlError> {
    let parsed = Url::parse(url).map_err(|e| UrlError::Invalid(e.to_string()))?;
    let find = |parameters: &[&str], variable: &str| {
        parameter(&parsed, parameters)
            .map(|path| Source::File(path.into()))
            .or_else(|| env(variable).map(Source::from_variable))
    };
    Ok(TlsFiles {
        root: find(&ROOT_PARAMETERS, "PGSSLROOTCERT"),
        cert: find(&CERT_PARAMETERS, "PGSSLCERT"),
        key: find(&KEY_PARAMETERS, "PGSSLKEY"),
    })
}

/// Why a process does not serve on its database login.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The login could get around the ledger's rules ([`privileged`]), and no setting allows it.
    #[error(
        "the database role {reasons}: it could truncate the ledger's tables or switch its rules off. Connect as a member of spendguard_runtime (the owner runs `spendguard migrate`), or set {allow_variable}=true for a local demo"
    )]
    Privileged {
        /// Every reason, named.
        reasons: String,
        /// The setting that would allow it.
        allow_variable: &'static str,
    },
    /// The database could not be asked.
    #[error("database role check: {0}")]
    Database(#[from] sqlx::Error),
}

/// Refuses a login that could get around the ledger's rules ([`privileged`]), unless `allowed`
/// (by the setting `allow_variable`), which logs a warning instead: the one rule every process
/// that writes the ledger's tables starts by.
///
/// # Errors
/// [`RoleError`].
pub async fn require_unprivileged(
    pool: &sqlx::PgPool,
    allowed: bool,
    allow_variable: &'static str,
) -> Result<(), RoleError> {
    match privileged(pool).await? {
        Some(reasons) if allowed => {
            warn!(%reasons, "the database role could switch the ledger's rules off: allowed by {allow_variable}");
            Ok(())
        }
        Some(reasons) => Err(RoleError::Privileged {
            reasons,
            allow_variable,
        }),
        None => Ok(()),
    }
}

/// What lets the login of `pool` get around the ledger's database rules, if anything (each
/// reason named). The ledger's processes refuse such a login
/// (docs/design/ledger-database-roles.md). Judged for the session's login and every role it
/// is a member of (it may `SET ROLE` to any of them, NOINHERIT or not):
/// - a superuser (then the only reason given), a member of `pg_execute_server_program` or
///   `pg_write_server_files` (the server's files), or CREATEROLE (in PostgreSQL 15 it may grant
///   itself membership in any other role);
/// - a session running as another role (`SET ROLE`, which `RESET ROLE` undoes);
/// - owning a schema (whose owner may drop what is in it), a table, sequence or function (an
///   owner can truncate, alter, disable triggers or replace a rule's body);
/// - `session_replication_role` set, or SET on it (ordinary triggers off);
/// - temporary tables, or CREATE on the database or any schema: an object of its own named like
///   a table or function the rules use would shadow it through the search path it chooses;
/// - DELETE, TRUNCATE, TRIGGER or REFERENCES on a ledger table (none is granted).
///
/// # Errors
/// When the database cannot be asked.
pub async fn privileged(pool: &sqlx::PgPool) -> Result<Option<String>, sqlx::Error> {
    let (login, reasons): (String, Vec<String>) =
        sqlx::query_as(PRIVILEGED).fetch_one(pool).await?;
    Ok((!reasons.is_empty()).then(|| {
        reasons
            .iter()
            .map(|reason| format!("{login} {reason}"))
            .collect::<Vec<_>>()
            .join("; ")
    }))
}

/// The reasons of [`privileged`], for `session_user`.
const PRIVILEGED: &str = r"
WITH roles AS (
    SELECT oid, rolname::text AS name, rolsuper, rolcreaterole
      FROM pg_roles WHERE pg_has_role(session_user, oid, 'MEMBER')
), user_schemas AS (
    SELECT oid, nspname::text AS name, nspowner FROM pg_namespace
     WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
       AND nspname NOT LIKE 'pg\_temp\_%' AND nspname NOT LIKE 'pg\_toast\_temp\_%'
), owned AS (
    SELECT 'schema ' || n.name AS what FROM user_schemas n JOIN roles r ON r.oid = n.nspowner
    UNION ALL
    SELECT n.name || '.' || c.relname FROM pg_class c
      JOIN user_schemas n ON n.oid = c.relnamespace JOIN roles r ON r.oid = c.relowner
     WHERE c.relkind IN ('r', 'p', 'S', 'v', 'm', 'f')
    UNION ALL
    SELECT DISTINCT n.name || '.' || p.proname || '()' FROM pg_proc p
      JOIN user_schemas n ON n.oid = p.pronamespace JOIN roles r ON r.oid = p.proowner
)
SELECT session_user::text,
       CASE WHEN EXISTS (SELECT 1 FROM roles WHERE rolsuper)
       THEN ARRAY[CASE WHEN EXISTS (SELECT 1 FROM roles WHERE rolsuper AND name = session_user)
                  THEN 'is a superuser'
                  ELSE 'may become a superuser (SET ROLE '
                       || (SELECT string_agg(name, ', ' ORDER BY name) FROM roles WHERE rolsuper)
                       || ')' END]
       ELSE array_remove(ARRAY[
           CASE WHEN session_user <> current_user
                THEN 'runs as ' || current_user || ' by SET ROLE, which RESET ROLE undoes' END,
           CASE WHEN pg_has_role(session_user, 'pg_execute_server_program', 'MEMBER')
                  OR pg_has_role(session_user, 'pg_write_server_files', 'MEMBER')
                THEN 'may run programs or write files on the database server' END,
           (SELECT 'may create roles (CREATEROLE: ' || string_agg(name, ', ' ORDER BY name)
                   || '), and so make itself a member of the owner'
              FROM roles WHERE rolcreaterole HAVING count(*) > 0),
           (SELECT 'owns (or may act as the owner of) '
                   || array_to_string((array_agg(what ORDER BY what))[1:5], ', ')
                   || CASE WHEN count(*) > 5 THEN format(' and %s more', count(*) - 5) ELSE '' END
              FROM owned HAVING count(*) > 0),
           CASE WHEN current_setting('session_replication_role') <> 'origin'
                THEN 'has session_replication_role = ' || current_setting('session_replication_role')
                     || ' (ordinary triggers off)' END,
           (SELECT 'may set session_replication_role' FROM roles
             WHERE has_parameter_privilege(oid, 'session_replication_role', 'SET') LIMIT 1),
           (SELECT format('may create temporary tables (REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC)',
                          current_database())
              FROM roles WHERE has_database_privilege(oid, current_database(), 'TEMPORARY') LIMIT 1),
           (SELECT 'may create schemas in the database' FROM roles
             WHERE has_database_privilege(oid, current_database(), 'CREATE') LIMIT 1),
           (SELECT 'may create objects in the schemas ' || string_agg(DISTINCT n.name, ', ')
              FROM user_schemas n, roles r
             WHERE has_schema_privilege(r.oid, n.oid, 'CREATE') HAVING count(*) > 0),
           (SELECT 'may ' || string_agg(DISTINCT lower(p) || ' ' || c.relname, ', ')
              FROM pg_class c, roles r, unnest(ARRAY['DELETE', 'TRUNCATE', 'TRIGGER', 'REFERENCES']) p
             WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
               AND c.relkind IN ('r', 'p') AND has_table_privilege(r.oid, c.oid, p)
            HAVING count(*) > 0)
       ], NULL) END";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn tls_modes_mean_no_less_than_libpq() {
        let mode = |url: &str| connect_options_with(url, &no_env).map(|o| o.get_ssl_mode());
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
    fn the_environment_is_checked_only_where_the_url_does_not_say() {
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("verify_full".to_owned()),
            "PGSSLROOTCERT" => Some(String::new()),
            _ => None,
        };
        assert!(matches!(
            connect_options_with("postgres://u@db/x", &env),
            Err(UrlError::SslMode(_))
        ));
        assert!(matches!(
            connect_options_with("postgres://u@db/x?sslmode=require", &env),
            Err(UrlError::EmptyVariable("PGSSLROOTCERT"))
        ));
        assert!(
            connect_options_with(
                "postgres://u@db/x?sslmode=verify-full&sslrootcert=/ca.pem",
                &env
            )
            .is_ok()
        );
    }

    #[test]
    fn tls_files_come_from_the_url_else_the_environment() {
        let files = tls_files_with(
            "postgres://u@db/x?sslmode=verify-full&ssl-ca=/old.pem&sslrootcert=/etc/my%20ca/r%26d.pem&sslcert=/c.pem",
            &|name| (name == "PGSSLKEY").then(|| "/k.pem".to_owned()),
        )
        .unwrap();
        assert_eq!(
            files,
            TlsFiles {
                root: Some(Source::File("/etc/my ca/r&d.pem".into())),
                cert: Some(Source::File("/c.pem".into())),
                key: Some(Source::File("/k.pem".into())),
            }
        );
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".to_owned();
        let inline = tls_files_with("postgres:///x", &|name| {
            (name == "PGSSLROOTCERT").then(|| pem.clone())
        })
        .unwrap();
        assert_eq!(inline.root, Some(Source::Inline(pem.into_bytes())));
        assert_eq!(
            tls_files_with("postgres://u@db/x", &no_env).unwrap(),
            TlsFiles::default()
        );
    }
}
