//! moto's server mode (the PyPI package `moto[server]`, pinned in `moto/moto-requirements.txt`,
//! installed into a cached venv by `moto/moto-venv.sh`): the stand-in for the AWS APIs that
//! cannot run here, KMS (runtime/evidence) and S3 (runtime/workers). Each test starts its own
//! server on a free loopback port; it is killed on drop.
//!
//! Clients are built by the tests themselves (this crate does not depend on any AWS SDK): point
//! them at [`MotoServer::endpoint`] with region [`REGION`] and any static credentials.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
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
    /// # Panics
    /// With moto's own output when it cannot start: a test that needs moto fails loudly rather
    /// than skipping.
    pub fn start() -> Self {
        let script = crate::paths::repo_root().join("runtime/testkit/moto/moto-venv.sh");
        let venv = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            venv.status.success(),
            "{} failed ({}); moto[server] could not be installed, so the moto tests cannot run",
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
        let port = crate::free_port();
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

    /// Creates an `ECC_NIST_P256` `SIGN_VERIFY` key (KMS `CreateKey`, over its JSON protocol)
    /// and returns its id: a key a `spendguard ledger` process can sign with in KMS mode.
    ///
    /// # Panics
    /// When moto does not create it.
    pub fn create_p256_signing_key(&self) -> String {
        let response = self.post(
            "/",
            &format!(
                "Content-Type: application/x-amz-json-1.1\r\nX-Amz-Target: TrentService.CreateKey\r\n\
                 Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/kms/aws4_request, SignedHeaders=host, Signature=0\r\n"
            ),
            r#"{"KeySpec":"ECC_NIST_P256","KeyUsage":"SIGN_VERIFY","Description":"spendguard test"}"#,
        );
        let json = response
            .find('{')
            .zip(response.rfind('}'))
            .and_then(|(start, end)| {
                serde_json::from_str::<serde_json::Value>(&response[start..=end]).ok()
            })
            .unwrap_or_else(|| panic!("moto CreateKey answered no JSON: {response}"));
        json["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap_or_else(|| panic!("no KeyId in {json}"))
            .to_owned()
    }

    /// Drops everything moto holds (moto's `/moto-api/reset`): keys, aliases, buckets, objects.
    ///
    /// # Panics
    /// When moto does not answer 200.
    pub fn reset(&self) {
        self.post("/moto-api/reset", "", "");
    }

    /// POSTs `body` to `path` with `headers` (each ending in CRLF): the whole response, which
    /// must be a 200.
    fn post(&self, path: &str, headers: &str, body: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("connect to moto");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .expect("send to moto");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read moto's response");
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "moto {path} failed: {response}"
        );
        response
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
