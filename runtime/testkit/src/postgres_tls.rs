//! A throwaway PostgreSQL cluster that accepts TCP connections over TLS only (`hostssl` lines
//! alone in its `pg_hba.conf`), with a certificate from a test CA issued for `localhost` and not
//! for `127.0.0.1`: a client that verifies the host name passes through the one and fails
//! through the other. A second CA signed nothing the server holds. One role,
//! [`CERTIFICATE_USER`], may log in only with a client certificate from the test CA naming it
//! (`cert` authentication); every other role is trusted.

use crate::postgres::{PgCluster, is_root};
use crate::process::{cleanup_after_exit, run};
use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::PathBuf;
use std::process::Command;

/// The role that logs in with a client certificate only.
pub const CERTIFICATE_USER: &str = "spendguard_cert";

/// A running TLS-only cluster and its certificates.
pub struct TlsCluster {
    /// The cluster.
    pub cluster: PgCluster,
    /// PEM file of the CA that issued the server's certificate.
    pub ca: PathBuf,
    /// PEM file of a CA that issued nothing the server holds.
    pub other_ca: PathBuf,
    /// PEM file of a client certificate for [`CERTIFICATE_USER`], issued by the test CA.
    pub client_cert: PathBuf,
    /// Its key (PKCS#8 PEM, readable by its owner only).
    pub client_key: PathBuf,
    _files: tempfile::TempDir,
}

fn ca(name: &str) -> Result<(CertificateParams, KeyPair, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let pem = params.self_signed(&key)?.pem();
    Ok((params, key, pem))
}

impl TlsCluster {
    /// Starts the cluster.
    ///
    /// # Errors
    /// When the certificates cannot be made or the cluster fails to start.
    pub fn start() -> Result<Self> {
        let files = tempfile::Builder::new()
            .prefix("spendguard-pg-tls-")
            .tempdir()?;
        // A cluster kept in a static is never dropped: its key goes when the process does.
        cleanup_after_exit(&format!("rm -rf {}", files.path().display()))?;
        let (ca_params, ca_key, ca_pem) = ca("spendguard test CA")?;
        let (_, _, other_pem) = ca("another test CA")?;
        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let issuer = Issuer::new(ca_params, &ca_key);
        let server_pem = server.signed_by(&server_key, &issuer)?.pem();
        let client_key = KeyPair::generate()?;
        let mut client = CertificateParams::default();
        client
            .distinguished_name
            .push(DnType::CommonName, CERTIFICATE_USER);
        let client_pem = client.signed_by(&client_key, &issuer)?.pem();

        let path = |name: &str| files.path().join(name);
        std::fs::write(path("ca.pem"), ca_pem)?;
        std::fs::write(path("other-ca.pem"), other_pem)?;
        std::fs::write(path("server.crt"), server_pem)?;
        std::fs::write(path("server.key"), server_key.serialize_pem())?;
        std::fs::write(path("client.crt"), client_pem)?;
        std::fs::write(path("client.key"), client_key.serialize_pem())?;
        // Lines match in order: the certificate user's first.
        std::fs::write(
            path("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all {CERTIFICATE_USER} 127.0.0.1/32 cert\n\
                 hostssl all {CERTIFICATE_USER} ::1/128 cert\n\
                 hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n"
            ),
        )?;
        // PostgreSQL reads them as its own user and refuses a key others can read.
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(files.path()))?;
        }
        run(Command::new("chmod").arg("600").arg(path("server.key")))?;
        run(Command::new("chmod").arg("600").arg(path("client.key")))?;
        let [cert, key, hba, ca] = ["server.crt", "server.key", "pg_hba.conf", "ca.pem"]
            .map(|name| path(name).display().to_string());
        let cluster = PgCluster::start(&[
            ("ssl", "on"),
            ("ssl_cert_file", &cert),
            ("ssl_key_file", &key),
            // Client certificates are checked against the test CA.
            ("ssl_ca_file", &ca),
            ("hba_file", &hba),
        ])?;
        Ok(Self {
            cluster,
            ca: path("ca.pem"),
            other_ca: path("other-ca.pem"),
            client_cert: path("client.crt"),
            client_key: path("client.key"),
            _files: files,
        })
    }

    /// Creates a new database and returns its name.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn create_database(&self) -> Result<String> {
        let url = self.cluster.create_database().await?;
        Ok(url.rsplit('/').next().unwrap_or_default().to_owned())
    }

    /// Creates a new database owned by [`CERTIFICATE_USER`] (created with it the first time)
    /// and returns its name.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn create_certificate_user_database(&self) -> Result<String> {
        let database = self.create_database().await?;
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.cluster.url("postgres"))
            .await?;
        // Tests of one binary may race to create the role: a duplicate is fine.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DO $$ BEGIN CREATE ROLE {CERTIFICATE_USER} LOGIN;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )))
        .execute(&admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {database} OWNER TO {CERTIFICATE_USER}"
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
        Ok(database)
    }

    /// The URL of `database` through `host` (`localhost` or `127.0.0.1`) with `query` (such as
    /// `sslmode=verify-full&sslrootcert=…`).
    pub fn url(&self, host: &str, database: &str, query: &str) -> String {
        self.url_as("postgres", host, database, query)
    }

    /// [`Self::url`] for role `user`.
    pub fn url_as(&self, user: &str, host: &str, database: &str, query: &str) -> String {
        format!(
            "postgres://{user}@{host}:{}/{database}?{query}",
            self.cluster.port()
        )
    }
}
