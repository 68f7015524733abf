//! Test support: a moto server (fake AWS KMS) on a free loopback port, killed on drop, and
//! small helpers shared by the test binaries.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long moto may take to start listening (it imports boto/cfn-lint; ~2 s warm here).
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Region every test client uses.
pub const REGION: &str = "us-east-1";

/// A running `moto_server`, killed (and reaped) on drop.
pub struct MotoServer {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl MotoServer {
    /// Creates the cached moto venv if needed and starts moto on a free loopback port.
    ///
    /// Panics with moto's own output when it cannot start: a test that needs KMS fails loudly
    /// rather than skipping.
    pub fn start() -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/moto-venv.sh");
        let venv = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            venv.status.success(),
            "{} failed ({}); moto[server] could not be installed, so the KMS tests cannot run",
            script.display(),
            venv.status
        );
        let moto_bin = String::from_utf8(venv.stdout)
            .expect("moto-venv.sh prints a path")
            .lines()
            .last()
            .expect("moto-venv.sh prints the moto_server path last")
            .to_owned();

        let dir = tempfile::tempdir().expect("temp dir");
        let log_path = dir.path().join("moto.log");
        let port = free_port();
        let log = std::fs::File::create(&log_path).expect("moto log file");
        let child = Command::new(&moto_bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {moto_bin}: {e}"));
        let mut server = Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            log_path,
            _dir: dir,
        };
        server.wait_listening();
        server
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + MOTO_START_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "moto_server exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {} within {MOTO_START_TIMEOUT:?}:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// moto's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A KMS client for moto with static test credentials (no AWS chain involved).
    pub fn client(&self) -> aws_sdk_kms::Client {
        use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(self.endpoint())
            .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
            .http_client(spendguard_evidence::kms::https_client())
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }

    /// Drops every key and alias moto holds (moto's `/moto-api/reset`): afterwards KMS answers
    /// NotFoundException for them, as it does once a deleted key's waiting period has passed.
    pub fn reset(&self) {
        let mut stream = TcpStream::connect(self.addr).expect("connect to moto");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        write!(
            stream,
            "POST /moto-api/reset HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .expect("send reset");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read reset response");
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "moto reset failed: {response}"
        );
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Creates a KMS key with the given spec for signing; returns its key id.
pub async fn create_signing_key(
    client: &aws_sdk_kms::Client,
    spec: aws_sdk_kms::types::KeySpec,
) -> String {
    let output = client
        .create_key()
        .key_spec(spec)
        .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
        .description("spendguard evidence test")
        .send()
        .await
        .expect("CreateKey");
    output
        .key_metadata()
        .expect("CreateKey returns metadata")
        .key_id()
        .to_owned()
}

/// The key's DER SubjectPublicKeyInfo, fetched independently of the signer.
pub async fn public_key_spki(client: &aws_sdk_kms::Client, key_id: &str) -> Vec<u8> {
    client
        .get_public_key()
        .key_id(key_id)
        .send()
        .await
        .expect("GetPublicKey")
        .public_key()
        .expect("public key")
        .as_ref()
        .to_vec()
}

/// A realistic canonical audit event (the exact bytes the ledger signs).
pub fn audit_event(sequence: u64, note: &str) -> Vec<u8> {
    use spendguard_core::audit::{EventDraft, ProducerStamp};
    let draft = EventDraft {
        tenant_id: "tenant-a".into(),
        event_type: "reservation.reserved",
        data: serde_json::json!({
            "reservation_id": "5b3c0f1e-8a41-4a5e-9d1e-2f9a1c3b7d10",
            "budget_id": "team-search",
            "amount_nano_usd": "1250000",
            "note": note,
        }),
    };
    let stamp = ProducerStamp {
        producer_instance_id: "ledger-0".into(),
        producer_sequence: sequence,
        occurred_at: chrono::DateTime::from_timestamp_millis(1_767_225_600_000).expect("time"),
    };
    draft.stamp(&stamp).expect("canonical event").bytes
}
