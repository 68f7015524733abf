//! A throwaway PostgreSQL 15 cluster: initdb + pg_ctl on a free loopback port in a temporary
//! directory, removed when dropped — and, should the test process die first, by a watchdog that
//! stops the cluster as soon as the process is gone. Nothing depends on a server that happens to
//! be running.
//!
//! PostgreSQL refuses to run as root; as root the harness runs its binaries as `postgres` through
//! `runuser`. Binaries come from `SPENDGUARD_PG_BIN` or `/usr/lib/postgresql/15/bin` (`make deps`
//! installs them).

use crate::process::{cleanup_after_exit, run};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The login every test cluster has for SpendGuard's processes: a member of the group role
/// `spendguard_runtime` (migration `20261127600001_runtime_role`), owning nothing.
pub const RUNTIME_LOGIN: &str = "spendguard_app";

/// `url` (the owner's, as [`PgCluster::create_database`] returns it) logged in as
/// [`RUNTIME_LOGIN`] instead: what the ledger and the forwarder connect with.
///
/// # Panics
/// When `url` is not a URL.
pub fn runtime_url(url: &str) -> String {
    let mut url = url::Url::parse(url).expect("a PostgreSQL URL");
    url.set_username(RUNTIME_LOGIN).expect("a URL with a user");
    url.to_string()
}

/// How the database refused a statement: tests of its rules assert which rule refused, since
/// "some error" also passes for a typo, a missing privilege or another rule.
#[derive(Debug)]
pub struct Refusal {
    /// The SQLSTATE.
    pub code: String,
    /// The constraint it names (CHECKs, and the row rules that stand for them).
    pub constraint: Option<String>,
    pub message: String,
}

impl Refusal {
    /// SQLSTATE `code`, with `rule` as the constraint's name or within the message.
    pub fn is(&self, code: &str, rule: &str) -> bool {
        self.code == code
            && (self.constraint.as_deref() == Some(rule) || self.message.contains(rule))
    }
}

/// Runs `sql` on `pool` and returns the database's refusal.
///
/// # Panics
/// When the database accepts `sql`, or the error is not the database's.
pub async fn refusal(pool: &sqlx::PgPool, sql: &str) -> Refusal {
    let error = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .expect_err(&format!("the database accepted: {sql}"));
    let database = error
        .as_database_error()
        .unwrap_or_else(|| panic!("{sql}: {error}"))
        .downcast_ref::<sqlx::postgres::PgDatabaseError>();
    Refusal {
        code: database.code().to_owned(),
        constraint: database.constraint().map(str::to_owned),
        message: database.message().to_owned(),
    }
}

/// Another replica's transaction as a test plays it: it locks rows (`FOR UPDATE`) one at a time
/// and holds them until [`OtherReplica::commit`]. Its lock waits end after 5 s, so a test
/// whose ledger holds a row it should not fails instead of hanging.
pub struct OtherReplica(sqlx::Transaction<'static, sqlx::Postgres>);

impl OtherReplica {
    /// Begins the transaction on `pool`.
    ///
    /// # Panics
    /// When the database cannot be reached.
    pub async fn begin(pool: &sqlx::PgPool) -> Self {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await
            .expect("set lock_timeout");
        Self(tx)
    }

    /// Locks the row of `table` whose `key` column is `id`, waiting for it.
    ///
    /// # Errors
    /// The database's, e.g. a deadlock or the lock timeout.
    pub async fn lock(&mut self, table: &str, key: &str, id: uuid::Uuid) -> sqlx::Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM {table} WHERE {key} = $1 FOR UPDATE"
        )))
        .bind(id)
        .execute(&mut *self.0)
        .await
        .map(drop)
    }

    /// Commits, letting go of every row.
    ///
    /// # Panics
    /// When the commit fails.
    pub async fn commit(self) {
        self.0.commit().await.expect("commit");
    }
}

/// Waits until `n` sessions of the ledger's login ([`RUNTIME_LOGIN`]) wait for a lock: how a
/// test knows a batch, or a ledger starting, reached a row or table another session holds.
///
/// # Panics
/// After 10 s without.
pub async fn await_ledger_lock_waits(pool: &sqlx::PgPool, n: i64) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'",
        )
        .bind(RUNTIME_LOGIN)
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if waiting == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{n} sessions of {RUNTIME_LOGIN} never waited for a lock together");
}

/// A running cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres_user: bool,
    databases: AtomicU32,
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

impl PgCluster {
    /// Starts a cluster with PostgreSQL's defaults plus `settings` (e.g. `("fsync", "off")`).
    ///
    /// # Errors
    /// When the binaries are missing (with the fix in the message) or the cluster fails to start.
    pub fn start(settings: &[(&str, &str)]) -> Result<Self> {
        let bin = std::env::var_os("SPENDGUARD_PG_BIN")
            .map_or_else(|| PathBuf::from(DEFAULT_PG_BIN), PathBuf::from);
        if !bin.join("initdb").exists() {
            bail!(
                "PostgreSQL 15 binaries not found in {} (set SPENDGUARD_PG_BIN, or run `make deps`)",
                bin.display()
            );
        }
        let as_postgres_user = is_root();
        let dir = tempfile::Builder::new()
            .prefix("spendguard-pg-")
            .tempdir()?;
        if as_postgres_user {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()))?;
        }
        let mut cluster = Self {
            dir,
            bin,
            port: crate::free_port(),
            as_postgres_user,
            databases: AtomicU32::new(0),
        };
        let data = cluster.data_dir();
        run(cluster
            .pg("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
                "-D",
            ])
            .arg(&data))?;
        // The port was free when chosen, but any process (a client's ephemeral port included)
        // may take it before the postmaster binds it: then the server exits at once, and a new
        // port is tried. Chosen after initdb, so that window is short.
        cluster.port = crate::free_port();
        let mut attempt = 1;
        loop {
            let mut options = format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {}",
                cluster.port,
                cluster.dir.path().display()
            );
            for (name, value) in settings {
                options.push_str(&format!(" -c {name}={value}"));
            }
            let log = cluster.dir.path().join("postgres.log");
            let started = run(cluster
                .pg("pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-o", &options, "start"]));
            match started {
                Ok(()) => break,
                Err(e) => {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    if attempt < 5 && log.contains("could not bind") {
                        attempt += 1;
                        cluster.port = crate::free_port();
                        continue;
                    }
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    return Err(e.context(format!("postgres.log:\n{}", tail.join("\n"))));
                }
            }
        }
        cluster.spawn_watchdog()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// Stops the cluster and removes its directory once this process has exited, however it
    /// exits (a panic, SIGKILL of the test binary, a cancelled CI job).
    fn spawn_watchdog(&self) -> Result<()> {
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let stop = if self.as_postgres_user {
            format!("runuser -u postgres -- {pg_ctl}")
        } else {
            pg_ctl
        };
        cleanup_after_exit(&format!(
            "{stop} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            data = self.data_dir().display(),
            dir = self.dir.path().display(),
        ))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    ///
    /// # Errors
    /// When the server refuses.
    pub async fn create_database(&self) -> Result<String> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{n}");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url("postgres"))
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        // The roles an administrator creates once per cluster (docs/ledger.md, "Database
        // roles"); tests in parallel may race to create them, and one of them wins.
        for role in [
            "CREATE ROLE spendguard_runtime NOLOGIN",
            &format!("CREATE ROLE {RUNTIME_LOGIN} LOGIN IN ROLE spendguard_runtime"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DO $$ BEGIN {role}; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            )))
            .execute(&admin)
            .await?;
        }
        admin.close().await;
        Ok(self.url(&name))
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Kills the postmaster at once (crash drills).
    ///
    /// # Errors
    /// When pg_ctl fails.
    pub fn stop_immediately(&self) -> Result<()> {
        run(self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "stop"]))
    }

    /// Starts the stopped cluster again on the same port.
    ///
    /// # Errors
    /// When pg_ctl fails.
    pub fn restart(&self) -> Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        run(self
            .pg("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-o", &options, "start"]))
    }

    /// Path of the cluster directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
