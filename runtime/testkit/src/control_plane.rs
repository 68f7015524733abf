//! A real Kubernetes control plane for tests: etcd and kube-apiserver built from Go modules by
//! `e2e/build-control-plane.sh`, started on free loopback ports in a temporary directory, with
//! RBAC on and a static token file holding several users. Stopped (and removed) when dropped;
//! a watchdog cleans up if the test process dies first.
//!
//! No controller-manager, scheduler or kubelet run: pods stay Pending, which is enough to assert
//! admission, RBAC, CRDs, status subresources and leases.

use crate::process::{cleanup_after_exit, run};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kubernetes version the harness expects (keep in step with e2e/build-control-plane.sh).
pub const K8S_VERSION: &str = "1.36.3";

/// A test identity in the token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// `system:masters`.
    Admin,
    /// Will be allowed to approve ApprovalRequests.
    Approver,
    /// Read-only once bound to `view`.
    Viewer,
    /// No permissions at all.
    Outsider,
}

impl User {
    /// Every user.
    pub const ALL: [User; 4] = [User::Admin, User::Approver, User::Viewer, User::Outsider];

    /// User name as the apiserver sees it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Approver => "approver",
            Self::Viewer => "viewer",
            Self::Outsider => "outsider",
        }
    }

    fn groups(self) -> &'static str {
        match self {
            Self::Admin => "system:masters",
            Self::Approver => "spendguard:approvers",
            Self::Viewer => "spendguard:viewers",
            Self::Outsider => "",
        }
    }

    /// Bearer token (fixed per run; the apiserver only listens on loopback).
    pub fn token(self) -> String {
        format!("spendguard-test-token-{}", self.name())
    }
}

/// A running etcd + kube-apiserver.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    bin: PathBuf,
    etcd: Child,
    apiserver: Child,
    port: u16,
}

/// Where the binaries are: `SPENDGUARD_CONTROL_PLANE_BIN`, else the build script's cache.
pub fn binaries_dir() -> PathBuf {
    std::env::var_os("SPENDGUARD_CONTROL_PLANE_BIN").map_or_else(
        || {
            let home =
                std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(format!(".cache/spendguard/control-plane/k8s-{K8S_VERSION}"))
        },
        PathBuf::from,
    )
}

/// The approvals webhook configuration as the chart writes it (templates/webhook.yaml), except
/// that clientConfig is a URL (the webhook server runs on this machine) and caBundle is left for
/// the operator to fill.
pub fn approvals_webhook_configuration(port: u16) -> String {
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: spendguard-approvals}}
webhooks:
  - name: approve.spendguard.io
    clientConfig: {{url: "https://127.0.0.1:{port}/approve"}}
    rules:
      - apiGroups: ["spendguard.io"]
        apiVersions: ["v1alpha1"]
        operations: ["UPDATE"]
        resources: ["approvalrequests/status"]
        scope: Namespaced
    failurePolicy: Fail
    matchPolicy: Equivalent
    sideEffects: None
    admissionReviewVersions: ["v1"]
    timeoutSeconds: 10
    reinvocationPolicy: IfNeeded
"#
    )
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers 200.
    ///
    /// # Errors
    /// When the binaries are missing (with the command that builds them), or either process
    /// fails to start in time (with its log).
    pub fn start() -> Result<Self> {
        // Free ports are found by binding and releasing them, so a parallel test can take one
        // before etcd or the apiserver binds it: start again on fresh ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once() {
                Ok(plane) => return Ok(plane),
                Err(e) if attempt < 4 && format!("{e:#}").contains("address already in use") => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn start_once() -> Result<Self> {
        let bin = binaries_dir();
        for name in ["etcd", "kube-apiserver", "kubectl"] {
            if !bin.join(name).exists() {
                bail!(
                    "{} not found in {}: run `make control-plane` (or e2e/build-control-plane.sh) first",
                    name,
                    bin.display()
                );
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("spendguard-k8s-")
            .tempdir()?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("pki"))?;
        run(Command::new("openssl")
            .args([
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ])
            .arg(d.join("pki/sa.key")))?;
        run(Command::new("openssl")
            .args(["ec", "-pubout", "-in"])
            .arg(d.join("pki/sa.key"))
            .arg("-out")
            .arg(d.join("pki/sa.pub")))?;
        let tokens: String = User::ALL
            .iter()
            .map(|u| {
                format!(
                    "{},{},{},\"{}\"\n",
                    u.token(),
                    u.name(),
                    u.name(),
                    u.groups()
                )
            })
            .collect();
        std::fs::write(d.join("tokens.csv"), tokens)?;

        let (client_port, peer_port, port) =
            (crate::free_port(), crate::free_port(), crate::free_port());
        let etcd = Command::new(bin.join("etcd"))
            .arg(format!("--data-dir={}", d.join("etcd").display()))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=default=http://127.0.0.1:{peer_port}"
            ))
            .arg("--unsafe-no-fsync=true")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("etcd.log"))?)
            .spawn()
            .context("starting etcd")?;
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
            .arg(format!("--cert-dir={}", d.join("pki").display()))
            .arg(format!("--secure-port={port}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .args([
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
            ])
            .args([
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
            ])
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg(format!(
                "--service-account-issuer=https://127.0.0.1:{port}/"
            ))
            .arg(format!(
                "--service-account-key-file={}",
                d.join("pki/sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("pki/sa.key").display()
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("apiserver.log"))?)
            .spawn()
            .context("starting kube-apiserver")?;
        let mut plane = Self {
            dir,
            bin,
            etcd,
            apiserver,
            port,
        };
        plane.spawn_watchdog()?;
        for user in User::ALL {
            plane.write_kubeconfig(user)?;
        }
        plane.wait_ready(Duration::from_secs(60))?;
        Ok(plane)
    }

    fn spawn_watchdog(&self) -> Result<()> {
        cleanup_after_exit(&format!(
            "kill -9 {a} {e} 2>/dev/null; rm -rf {dir}",
            a = self.apiserver.id(),
            e = self.etcd.id(),
            dir = self.dir.path().display(),
        ))
    }

    fn write_kubeconfig(&self, user: User) -> Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n",
            self.url(),
            name = user.name(),
            token = user.token(),
        );
        std::fs::write(self.kubeconfig(user), config)?;
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            let exited = self.apiserver.try_wait()?.is_some() || self.etcd.try_wait()?.is_some();
            if exited {
                bail!(
                    "kube-apiserver or etcd exited during startup; log:\n{}\n{}",
                    self.log(),
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
                );
            }
            let ok = self
                .kubectl(User::Admin)
                .args(["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "kube-apiserver not ready after {timeout:?}; log:\n{}",
            self.log()
        )
    }

    /// The apiserver URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Path of a kubeconfig for `user`.
    pub fn kubeconfig(&self, user: User) -> PathBuf {
        self.dir.path().join(format!("kubeconfig-{}", user.name()))
    }

    /// A kubectl command (the version built with the apiserver) acting as `user`.
    pub fn kubectl(&self, user: User) -> Command {
        let mut command = Command::new(self.bin.join("kubectl"));
        command.arg("--kubeconfig").arg(self.kubeconfig(user));
        command
    }

    /// Runs `kubectl spendguard ARGS` (the plugin in the repository's `tools/`) as `user`
    /// through kubectl's plugin dispatch, as an approver runs it: the plugin directory and the
    /// built kubectl come first on PATH, the user's kubeconfig is KUBECONFIG. Success and
    /// combined output.
    ///
    /// # Panics
    /// When kubectl cannot be started.
    pub fn run_plugin(&self, user: User, args: &[&str]) -> (bool, String) {
        let tools = crate::paths::repo_root().join("tools");
        let path = format!(
            "{}:{}:{}",
            tools.display(),
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(self.bin.join("kubectl"))
            .arg("spendguard")
            .args(args)
            .env("PATH", path)
            .env("KUBECONFIG", self.kubeconfig(user))
            .output()
            .expect("run kubectl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Runs kubectl as `user` with optional stdin: success and combined output.
    ///
    /// # Panics
    /// When kubectl cannot be started.
    pub fn run_kubectl(&self, user: User, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut command = self.kubectl(user);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start kubectl");
        if let Some(input) = stdin
            && let Some(mut pipe) = child.stdin.take()
        {
            pipe.write_all(input.as_bytes())
                .expect("write kubectl stdin");
        }
        let out = child.wait_with_output().expect("wait for kubectl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Runs kubectl as admin and returns its output.
    ///
    /// # Panics
    /// When kubectl fails (tests fail loudly).
    pub fn admin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, text) = self.run_kubectl(User::Admin, args, stdin);
        assert!(ok, "kubectl {args:?}: {text}");
        text
    }

    /// Applies a CRD file and waits until every CRD is Established.
    ///
    /// # Panics
    /// When applying or waiting fails.
    pub fn install_crds(&self, path: &Path) {
        self.admin(&["apply", "-f", &path.display().to_string()], None);
        // `kubectl wait` fails at once, rather than waiting, on a CRD whose status the
        // apiserver has not written yet (".status.conditions accessor error: <nil>"): try again
        // until the deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let wait = [
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "--all",
            "crd",
        ];
        loop {
            let (ok, text) = self.run_kubectl(User::Admin, &wait, None);
            if ok {
                return;
            }
            assert!(
                text.contains("accessor error") && std::time::Instant::now() < deadline,
                "kubectl {wait:?}: {text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Polls kubectl `args` (as admin) until `want` accepts the output; returns it.
    ///
    /// # Panics
    /// After about 15 s without success.
    pub async fn poll(&self, args: &[&str], want: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..150 {
            let (ok, text) = self.run_kubectl(User::Admin, args, None);
            if ok && want(&text) {
                return text;
            }
            last = text;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("kubectl {args:?} never satisfied the condition; last output: {last}");
    }

    /// Deletes `kind/name` in `namespace` (as admin) and waits until it is gone, e.g. once an
    /// in-process operator ran its finalizer. Not `kubectl --wait`: kubectl runs synchronously
    /// on the test's runtime thread, which the operator task needs to make progress.
    ///
    /// # Panics
    /// As [`ControlPlane::poll`].
    pub async fn delete_and_wait_gone(&self, kind: &str, name: &str, namespace: &str) {
        self.admin(
            &["delete", kind, name, "-n", namespace, "--wait=false"],
            None,
        );
        self.poll(
            &[
                "get",
                kind,
                name,
                "-n",
                namespace,
                "--ignore-not-found",
                "-o",
                "name",
            ],
            str::is_empty,
        )
        .await;
    }

    /// A kube client acting as `user`.
    ///
    /// # Errors
    /// When the kubeconfig cannot be read.
    pub async fn client(&self, user: User) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig(user))?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The tail of the apiserver log, for failure messages.
    pub fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The temporary directory of this control plane.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}
