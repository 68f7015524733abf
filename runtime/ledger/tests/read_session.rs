//! The read session behind CheckFencing, when its connection stops answering in the middle of a
//! read (a half-open connection: a NAT or a node gone, with no reset). A real ledger and a real
//! PostgreSQL, with a TCP relay between them that can go silent on the read session's
//! connection.
#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::TestLedger;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: &str = "tenant-r";

/// Relays TCP connections to PostgreSQL; the read session's connections open so far can be
/// silenced (bytes either way dropped, the connection kept open).
struct Relay {
    port: u16,
    opened: AtomicU64,
    silenced_through: AtomicU64,
}

impl Relay {
    async fn start(postgres_port: u16) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Arc::new(Self {
            port: listener.local_addr().unwrap().port(),
            opened: AtomicU64::new(0),
            silenced_through: AtomicU64::new(0),
        });
        let accepting = relay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", postgres_port)).await else {
                    continue;
                };
                let id = accepting.opened.fetch_add(1, Ordering::SeqCst) + 1;
                let reads = Arc::new(AtomicBool::new(false));
                let (client_in, client_out) = client.into_split();
                let (server_in, server_out) = server.into_split();
                tokio::spawn(accepting.clone().pump(
                    id,
                    reads.clone(),
                    client_in,
                    server_out,
                    true,
                ));
                tokio::spawn(
                    accepting
                        .clone()
                        .pump(id, reads, server_in, client_out, false),
                );
            }
        });
        relay
    }

    /// Silences the read session's connections open now.
    fn silence_open_reads(&self) {
        self.silenced_through
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    async fn pump(
        self: Arc<Self>,
        id: u64,
        reads: Arc<AtomicBool>,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        from_client: bool,
    ) {
        let mut buffer = vec![0; 16_384];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The startup message names the session: under the default sslmode=prefer the session
            // first asks for TLS, this cluster declines, and the startup goes in the clear.
            if from_client
                && buffer[..n]
                    .windows(23)
                    .any(|w| w == b"spendguard-ledger-reads")
            {
                reads.store(true, Ordering::SeqCst);
            }
            if reads.load(Ordering::SeqCst) && id <= self.silenced_through.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test]
async fn a_check_whose_read_session_goes_silent_is_answered_on_a_new_session() {
    // Goal: a lease check whose read is sent on a session that no longer answers (no reset,
    // no error: the packets go nowhere) is not lost to it: the read's 1.5 s answer deadline
    // drops that session, and the read is tried once more on a new one, inside a sidecar's 5 s
    // deadline. Without the retry the check would fail, and every call inside a credit with it.
    let cluster = spendguard_testkit::ledger::shared_cluster();
    let url = cluster.create_database().await.unwrap();
    let relay = Relay::start(cluster.port()).await;
    let relayed = url.replacen(
        &format!(":{}/", cluster.port()),
        &format!(":{}/", relay.port),
        1,
    );
    assert_ne!(relayed, url);
    let mut ledger = TestLedger::start_on(&relayed, "ledger-0").await.unwrap();
    let fencing = ledger.tenant_with_lease(T).await.unwrap();
    let check = pb::CheckFencingRequest {
        tenant_id: T.into(),
        fencing: Some(fencing),
    };
    ledger.client.check_fencing(check.clone()).await.unwrap();

    relay.silence_open_reads();
    let started = Instant::now();
    ledger.client.check_fencing(check.clone()).await.unwrap();
    let took = started.elapsed();
    println!("answered after {took:?}");
    assert!(
        took >= Duration::from_millis(1_400),
        "answered on the silenced session? {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The new session answers within the read deadline (not through another retry).
    let started = Instant::now();
    ledger.client.check_fencing(check).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(1_500));
}
