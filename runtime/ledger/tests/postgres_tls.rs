//! TLS to PostgreSQL: the ledger connects every one of its sessions (sqlx's pool, the cached
//! path's, the reads') to a server that accepts only TLS, verifying the server's certificate as
//! the URL's `sslmode` says. A real PostgreSQL 15 cluster with `hostssl` lines only and a test CA.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_ledger::store::session_config;
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use spendguard_testkit::ledger::reserve_request;
use spendguard_testkit::postgres_tls::{CERTIFICATE_USER, TlsCluster};
use std::sync::OnceLock;

const T: &str = "tenant-tls";

fn cluster() -> &'static TlsCluster {
    static CLUSTER: OnceLock<TlsCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| TlsCluster::start().unwrap())
}

/// Whether the ledger's own session for `url` opens, and is encrypted by the server's account.
async fn session_opens(url: &str) -> Result<bool, String> {
    let config = session_config(url).map_err(|e| e.to_string())?;
    let (client, connection) = config.connect().await.map_err(|e| format!("{e:?}"))?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// Starts a ledger on `url` and uses every session it opens: the pool (migrations, the load
/// path), the cached path's (four reserve+commit pairs on one budget) and the reads' (a lease
/// check). Fails unless each of them worked.
async fn ledger_using_every_session(url: &str) -> TestLedger {
    let mut ledger = TestLedger::start_on(url, "ledger-0").await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    ledger.budget(T, "run", 1_000_000).await.unwrap();
    for n in 0..4 {
        let reserved = ledger
            .client
            .reserve_set(reserve_request(
                T,
                &format!("k{n}"),
                &["run"],
                100,
                &fencing,
            ))
            .await
            .unwrap()
            .into_inner();
        let Some(pb::reserve_set_response::Outcome::Reserved(reserved)) = reserved.outcome else {
            panic!("not reserved: {reserved:?}");
        };
        ledger
            .client
            .commit(pb::CommitRequest {
                tenant_id: T.into(),
                reservation_id: reserved.reservation_id,
                actual_nano_usd: 60,
                fencing: Some(fencing.clone()),
                deferrable: false,
            })
            .await
            .unwrap();
    }
    assert!(
        ledger.batches("cached") > 0,
        "the cached path's session was used"
    );
    ledger
        .client
        .check_fencing(pb::CheckFencingRequest {
            tenant_id: T.into(),
            fencing: Some(fencing),
        })
        .await
        .unwrap();
    ledger
}

/// The ledger's sessions PostgreSQL lists (the pool's and the cached path's share a name):
/// name, whether encrypted, the client certificate's name. Fails unless both names are there.
async fn ledger_sessions(ledger: &TestLedger) -> Vec<(String, bool, Option<String>)> {
    let sessions: Vec<(String, bool, Option<String>)> = sqlx::query_as(
        "SELECT a.application_name, s.ssl, s.client_dn
           FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.datname = current_database() AND a.application_name LIKE 'spendguard-ledger%'",
    )
    .fetch_all(ledger.store().pool())
    .await
    .unwrap();
    for name in ["spendguard-ledger", "spendguard-ledger-reads"] {
        assert!(
            sessions.iter().any(|(n, _, _)| n == name),
            "no {name} session: {sessions:?}"
        );
    }
    sessions
}

#[tokio::test]
async fn the_ledger_serves_with_every_session_encrypted_and_the_server_verified() {
    // Goal: a ledger pointed at a database that requires TLS, with `sslmode=verify-full` and
    // the database's CA, starts (migrations over the pool), takes the cached path and answers
    // a lease check (its two sessions of its own), and PostgreSQL counts every session of the
    // ledger as encrypted.
    let tls = cluster();
    let database = tls.create_database().await.unwrap();
    let ca = tls.ca.display().to_string();
    let url = tls.url(
        "localhost",
        &database,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let mut ledger = ledger_using_every_session(&url).await;
    let sessions = ledger_sessions(&ledger).await;
    assert!(
        sessions.iter().all(|(_, ssl, _)| *ssl),
        "a session in the clear: {sessions:?}"
    );
    let balance = ledger.balance(T, "run").await.unwrap();
    assert_eq!(balance.committed_nano_usd, 240);
}

#[tokio::test]
async fn the_ledgers_sessions_verify_the_server_as_sslmode_says() {
    // Goal: the ledger's own sessions (cached path, reads) check the server's certificate as
    // sslmode says: verify-full checks the chain and the host name, require and prefer (and
    // allow, read as prefer) encrypt without checking; a server outside the given root is
    // refused; verify-ca is refused outright (the pool would also trust the system's public
    // roots, and without the name check that verifies nothing); the server refuses a session
    // in the clear.
    let tls = cluster();
    let database = tls.create_database().await.unwrap();
    let ca = tls.ca.display().to_string();
    let other = tls.other_ca.display().to_string();
    let url = |host: &str, query: &str| tls.url(host, &database, query);
    let opens = |url: String| async move { session_opens(&url).await };

    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    assert_eq!(opens(url("localhost", &full)).await, Ok(true));
    let wrong_name = opens(url("127.0.0.1", &full)).await.unwrap_err();
    assert!(wrong_name.contains("NotValidForName"), "{wrong_name}");

    let unknown_issuer = opens(url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert!(unknown_issuer.contains("UnknownIssuer"), "{unknown_issuer}");
    let chain_only = opens(url(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(
        chain_only.contains("POSTGRES_VERIFY_CA_REFUSED") && chain_only.contains("verify-full"),
        "{chain_only}"
    );

    let unchecked = format!("sslmode=require&sslrootcert={other}");
    assert_eq!(opens(url("127.0.0.1", &unchecked)).await, Ok(true));
    assert_eq!(opens(url("127.0.0.1", "sslmode=prefer")).await, Ok(true));
    assert_eq!(opens(url("127.0.0.1", "sslmode=allow")).await, Ok(true));

    let clear = opens(url("127.0.0.1", "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(clear.contains("no encryption"), "{clear}");
}

#[tokio::test]
async fn every_session_presents_the_client_certificate_a_server_asks_for() {
    // Goal: with `sslcert` and `sslkey`, every session of the ledger (the pool, the cached
    // path's, the reads') presents the client certificate, so a role the server lets in only
    // with a certificate (`cert` authentication) works; the same URL without them is refused.
    let tls = cluster();
    let database = tls.create_certificate_user_database().await.unwrap();
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let url = |query: &str| tls.url_as(CERTIFICATE_USER, "localhost", &database, query);
    let without = format!("sslmode=verify-full&sslrootcert={ca}");
    let refused = TestLedger::start_on(&url(&without), "ledger-0")
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
        .unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    assert!(
        session_opens(&url(&without))
            .await
            .unwrap_err()
            .contains("certificate"),
        "the ledger's own session is refused too"
    );

    let mut ledger =
        ledger_using_every_session(&url(&format!("{without}&sslcert={cert}&sslkey={key}"))).await;
    let sessions = ledger_sessions(&ledger).await;
    let dn = format!("/CN={CERTIFICATE_USER}");
    assert!(
        sessions
            .iter()
            .all(|(_, _, d)| d.as_deref() == Some(dn.as_str())),
        "a session without the certificate: {sessions:?}"
    );
    ledger.stop().await;
}

#[tokio::test]
async fn a_new_session_reads_the_root_certificate_file_again() {
    // Goal: the TLS files are read for every session the ledger opens, so a rotated root
    // certificate takes effect without a restart. The reads session, closed by the server,
    // reopens under the file's content at that moment: refused while it names another CA,
    // verified again once it names the server's.
    let tls = cluster();
    let database = tls.create_database().await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let root = files.path().join("root.pem");
    std::fs::copy(&tls.ca, &root).unwrap();
    let url = tls.url(
        "localhost",
        &database,
        &format!("sslmode=verify-full&sslrootcert={}", root.display()),
    );
    let mut ledger = TestLedger::start_on(&url, "ledger-0").await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    let mut client = ledger.client.clone();
    let mut check = async || {
        client
            .check_fencing(pb::CheckFencingRequest {
                tenant_id: T.into(),
                fencing: Some(fencing.clone()),
            })
            .await
    };
    check().await.expect("the first reads session verifies");
    let admin = sqlx::PgPool::connect(&tls.url(
        "localhost",
        &database,
        &format!("sslmode=verify-full&sslrootcert={}", tls.ca.display()),
    ))
    .await
    .unwrap();
    let close_reads_session = async || {
        let closed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'spendguard-ledger-reads'",
        )
        .fetch_all(&admin)
        .await
        .unwrap();
        assert_eq!(closed, vec![true], "one reads session, closed");
    };

    std::fs::copy(&tls.other_ca, &root).unwrap();
    close_reads_session().await;
    let refused = check()
        .await
        .expect_err("a session opened under the other CA");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    std::fs::copy(&tls.ca, &root).unwrap();
    // A failed open is retried at most once a second.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    check()
        .await
        .expect("verified again under the restored root");
    ledger.stop().await;
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start_with_their_name() {
    // Goal: a root certificate that is missing or holds no certificate, or a client
    // certificate without its key, fails the ledger's start naming the problem, before it
    // connects anything.
    let tls = cluster();
    let database = tls.create_database().await.unwrap();
    let url = |query: &str| tls.url("localhost", &database, query);
    let missing = TestLedger::start_on(
        &url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
        "ledger-0",
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("{e:#}"))
    .unwrap_err();
    assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let empty = session_config(&url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        empty.display()
    )))
    .unwrap_err()
    .to_string();
    assert!(
        empty.contains("no PEM certificate") && empty.contains("empty.pem"),
        "{empty}"
    );
    let ca = tls.ca.display().to_string();
    let half = session_config(&url(&format!(
        "sslmode=verify-full&sslrootcert={ca}&sslcert={ca}"
    )))
    .unwrap_err()
    .to_string();
    assert!(half.contains("needs both sslcert and sslkey"), "{half}");
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'budgets'")
            .fetch_one(
                &sqlx::PgPool::connect(&url(&format!("sslmode=verify-full&sslrootcert={ca}")))
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
    assert_eq!(count, 0, "nothing was migrated");
}

#[tokio::test]
async fn over_a_unix_socket_every_session_opens_without_tls() {
    // Goal: a URL naming a socket directory works for every session of the ledger, as it did
    // before TLS: a socket has no host name and never uses TLS (whatever sslmode says short of
    // requiring it), so the ledger's own sessions must not fail while making their connector.
    let cluster = spendguard_testkit::ledger::shared_cluster();
    let url = cluster.create_database().await.unwrap();
    let database = url.rsplit('/').next().unwrap();
    let socket = format!(
        "postgres://postgres@localhost/{database}?host={}&port={}",
        cluster.path().display(),
        cluster.port()
    );
    assert_eq!(session_opens(&socket).await, Ok(false));
    ledger_using_every_session(&socket).await;
}
