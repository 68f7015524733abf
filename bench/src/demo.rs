//! `spendguard-bench demo` (the `make demo` scenario): PostgreSQL, the control plane, the ledger,
//! the operator (with its approvals webhook), the mock provider and a sidecar on the bundle the
//! operator compiled; then a small agent on the real `openai` client runs until the hard cap
//! stops it. Past the budget's soft cap each call waits for a human: an approver decides it with
//! `kubectl spendguard approve`, and the agent's retry resumes the call (S16).

use crate::processes::{Child, LedgerProcess, spawn_mock, spawn_sidecar};
use anyhow::{Context, Result, bail};
use spendguard_testkit::PgCluster;
use spendguard_testkit::control_plane::{ControlPlane, User, approvals_webhook_configuration};
use std::path::Path;
use std::time::Duration;

fn kubectl(plane: &ControlPlane, args: &[&str], stdin: Option<&str>) -> Result<String> {
    match plane.run_kubectl(User::Admin, args, stdin) {
        (true, text) => Ok(text),
        (false, text) => bail!("kubectl {args:?} failed: {text}"),
    }
}

const DEMO_RESOURCES: &str = "apiVersion: spendguard.io/v1alpha1
kind: Budget
metadata: {name: demo-agent, namespace: default}
spec: {tenant: demo, limit: \"0.20\", softCap: \"0.10\", window: CalendarMonthUTC}
---
apiVersion: spendguard.io/v1alpha1
kind: ContractBundle
metadata: {name: demo-agent, namespace: default}
spec:
  tenant: demo
  pricingVersion: pricing-2026-11-01
  budgets: [demo-agent]
  allowModels: [gpt-5]
  maxOutputTokens: 4096
  failPolicy: Closed
";

/// Waits until the operator has reconciled the demo budget (Ready=True and `field` = `value`).
async fn wait_budget(plane: &ControlPlane, field: &str, value: &str) -> Result<()> {
    for _ in 0..150 {
        let path =
            format!("jsonpath={{.status.conditions[?(@.type==\"Ready\")].status}}/{{{field}}}");
        let got = kubectl(
            plane,
            &["get", "budget", "demo-agent", "-n", "default", "-o", &path],
            None,
        )?;
        if got == format!("True/{value}") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the operator did not reconcile budget demo-agent")
}

/// Copies the compiled bundle ConfigMap into `dir`, as the kubelet would mount it.
async fn mount_bundle(plane: &ControlPlane, dir: &Path) -> Result<()> {
    for _ in 0..150 {
        let (found, json) = plane.run_kubectl(
            User::Admin,
            &[
                "get",
                "configmap",
                "spendguard-bundle-demo-agent",
                "-n",
                "default",
                "-o",
                "json",
            ],
            None,
        );
        if found {
            let map: serde_json::Value = serde_json::from_str(&json)?;
            std::fs::create_dir_all(dir)?;
            for key in ["bundle.json", "bundle.sha256", "tenant", "budgets"] {
                let value = map["data"][key].as_str().context("bundle ConfigMap key")?;
                std::fs::write(dir.join(key), value)?;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the operator did not compile ContractBundle demo-agent")
}

/// Runs `kubectl spendguard ARGS` as the approver.
fn approver_kubectl(plane: &ControlPlane, args: &[&str]) -> Result<String> {
    match plane.run_plugin(User::Approver, args) {
        (true, text) => Ok(text),
        (false, text) => bail!("kubectl spendguard {args:?} failed: {text}"),
    }
}

/// The demo approver denies the approval request with this number (1-based) and approves the
/// others.
const DENIED_REQUEST: usize = 3;

/// Plays the human approver while `agent` runs: every ApprovalRequest the operator mirrors
/// Pending is decided with `kubectl spendguard approve` (or `deny`, the
/// [`DENIED_REQUEST`]th), as its approver would.
async fn approve_while_running(
    plane: &ControlPlane,
    agent: &mut tokio::process::Child,
) -> Result<std::process::ExitStatus> {
    let mut decided = std::collections::BTreeSet::new();
    loop {
        if let Some(status) = agent.try_wait()? {
            return Ok(status);
        }
        let pending = kubectl(
            plane,
            &[
                "get",
                "approvalrequests",
                "-n",
                "default",
                "-o",
                "jsonpath={range .items[?(@.status.phase==\"Pending\")]}{.metadata.name}{\"\\n\"}{end}",
            ],
            None,
        )?;
        for name in pending.lines().filter(|n| !n.is_empty()) {
            if !decided.insert(name.to_owned()) {
                continue;
            }
            println!("  $ kubectl spendguard list -n default   # as the approver");
            for line in approver_kubectl(plane, &["list", "-n", "default"])?.lines() {
                println!("  {line}");
            }
            let (verb, reason) = if decided.len() == DENIED_REQUEST {
                ("deny", "not worth it at this point")
            } else {
                ("approve", "research within plan")
            };
            println!("  $ kubectl spendguard {verb} {name} -n default --reason \"{reason}\"");
            let out = approver_kubectl(plane, &[verb, name, "-n", "default", "--reason", reason])?;
            for line in out.lines() {
                println!("  {line}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn venv_python(root: &Path) -> Result<String> {
    let out = std::process::Command::new("bash")
        .arg(root.join("sdk/python/scripts/venv.sh"))
        .output()?;
    if !out.status.success() {
        bail!("sdk venv: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

pub(crate) async fn demo(spendguard_bin: &Path) -> Result<()> {
    let root = spendguard_testkit::paths::repo_root();
    let python = venv_python(root)?;
    let cluster = PgCluster::start(&[])?;
    let url = cluster.create_database().await?;
    let plane = ControlPlane::start()?;
    println!(
        "PostgreSQL on 127.0.0.1:{}; kube-apiserver at {}",
        cluster.port(),
        plane.url()
    );
    let LedgerProcess {
        child: ledger,
        port,
        control_port,
        ..
    } = LedgerProcess::spawn(spendguard_bin, &url, "demo-ledger").await?;
    let ledger = Child(ledger);
    println!(
        "`spendguard migrate` as the database owner; `spendguard ledger` as {} (a member of spendguard_runtime: no TRUNCATE, no DDL) on 127.0.0.1:{port} (data path), 127.0.0.1:{control_port} (control)",
        spendguard_testkit::postgres::RUNTIME_LOGIN
    );

    plane.install_crds(&root.join("crds/generated/spendguard.io.yaml"));
    // Approvers may approve in `default` (the example Role); the approvals webhook stamps who did.
    let webhook_port = spendguard_testkit::free_port();
    kubectl(
        &plane,
        &["apply", "-f", "-"],
        Some(&std::fs::read_to_string(
            root.join("config/examples/approver-rbac.yaml"),
        )?),
    )?;
    kubectl(
        &plane,
        &["apply", "-f", "-"],
        Some(&approvals_webhook_configuration(webhook_port)),
    )?;
    let operator = Child(
        tokio::process::Command::new(spendguard_bin)
            .arg("operator")
            .env("KUBECONFIG", plane.kubeconfig(User::Admin))
            .env(
                "SPENDGUARD_OPERATOR_LEDGER_ADDR",
                format!("http://127.0.0.1:{control_port}"),
            )
            .env(
                "SPENDGUARD_ADMIN_ADDR",
                format!("127.0.0.1:{}", spendguard_testkit::free_port()),
            )
            // Its approvals webhook, on this machine; the operator acts as `admin` here.
            .env("SPENDGUARD_WEBHOOK_ENABLED", "true")
            .env(
                "SPENDGUARD_WEBHOOK_ADDR",
                format!("127.0.0.1:{webhook_port}"),
            )
            .env("SPENDGUARD_WEBHOOK_EXTRA_SANS", "127.0.0.1")
            .env("SPENDGUARD_MUTATING_WEBHOOK_CONFIGURATION", "")
            .env("SPENDGUARD_VALIDATING_WEBHOOK_CONFIGURATION", "")
            .env("SPENDGUARD_WEBHOOK_OPERATOR_USERNAME", User::Admin.name())
            .env(
                "SPENDGUARD_SIDECAR_IMAGE",
                "ghcr.io/spendguard/spendguard:demo",
            )
            .env(
                "SPENDGUARD_SIDECAR_LEDGER_URL",
                format!("http://127.0.0.1:{port}"),
            )
            .env("SPENDGUARD_APPROVALS_NAMESPACE", "default")
            .env("SPENDGUARD_APPROVALS_POLL_INTERVAL_MS", "300")
            .env("SPENDGUARD_LOG", "error")
            .kill_on_drop(true)
            .spawn()
            .context("starting spendguard operator")?,
    );
    for _ in 0..150 {
        let bundle = kubectl(
            &plane,
            &[
                "get",
                "mutatingwebhookconfiguration/spendguard-approvals",
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ],
            None,
        )?;
        if !bundle.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("`spendguard operator` reconciling SpendGuard resources\n");
    println!("$ kubectl apply -f config/examples/pricing-version.yaml");
    kubectl(
        &plane,
        &[
            "apply",
            "-f",
            &root
                .join("config/examples/pricing-version.yaml")
                .display()
                .to_string(),
        ],
        None,
    )?;
    println!("$ kubectl apply -f - <<EOF\n{DEMO_RESOURCES}EOF");
    kubectl(&plane, &["apply", "-f", "-"], Some(DEMO_RESOURCES))?;
    wait_budget(&plane, ".status.remaining", "0.2").await?;
    println!(
        "\n$ kubectl get budgets\n{}",
        kubectl(&plane, &["get", "budgets", "-n", "default"], None)?
    );

    let bundle_dir = tempfile::tempdir()?;
    mount_bundle(&plane, bundle_dir.path()).await?;
    let sha = std::fs::read_to_string(bundle_dir.path().join("bundle.sha256"))?;
    println!("compiled bundle {} mounted for the sidecar", &sha[..12]);
    // Each reply reports 3000 output tokens of gpt-5 ($10 per million): $0.03 per call.
    let (mock, mock_port) = spawn_mock(spendguard_bin, 3_000, 0).await?;
    let (sidecar, sidecar_port, _) = spawn_sidecar(
        spendguard_bin,
        port,
        bundle_dir.path(),
        mock_port,
        "agent-pod",
        &[],
    )
    .await?;
    println!(
        "`spendguard sidecar` on 127.0.0.1:{sidecar_port} (fencing lease held), upstream: mock provider\n"
    );
    println!("$ python sdk/python/examples/agent.py");
    let mut agent = tokio::process::Command::new(&python)
        .arg(root.join("sdk/python/examples/agent.py"))
        .env("SPENDGUARD_URL", format!("http://127.0.0.1:{sidecar_port}"))
        .kill_on_drop(true)
        .spawn()?;
    let status = approve_while_running(&plane, &mut agent).await?;
    if !status.success() {
        bail!("the demo agent failed");
    }
    // Ask the operator to refresh now rather than at its next periodic reconcile.
    kubectl(
        &plane,
        &[
            "annotate",
            "--overwrite",
            "budget",
            "demo-agent",
            "-n",
            "default",
            "demo/refresh=1",
        ],
        None,
    )?;
    for _ in 0..50 {
        let remaining = kubectl(
            &plane,
            &[
                "get",
                "budget",
                "demo-agent",
                "-n",
                "default",
                "-o",
                "jsonpath={.status.remaining}",
            ],
            None,
        )?;
        if remaining != "0.2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "\n$ kubectl get budgets\n{}",
        kubectl(&plane, &["get", "budgets", "-n", "default"], None)?
    );
    let pool = sqlx::PgPool::connect(&url).await?;
    // The sidecar publishes the STOP's evidence right after answering it.
    let mut stopped: Option<Vec<u8>> = None;
    for _ in 0..50 {
        stopped = sqlx::query_scalar(
            "SELECT canonical_event FROM audit_outbox
              WHERE event_type = 'decision.stopped' ORDER BY producer_sequence LIMIT 1",
        )
        .fetch_optional(&pool)
        .await?;
        if stopped.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop_event = stopped.context("the STOP's evidence never reached the ledger")?;
    let stop_event: serde_json::Value = serde_json::from_slice(&stop_event)?;
    println!(
        "STOP evidence: decision.stopped {} (call {}, {}, worst case {} nano-USD)",
        stop_event["data"]["record_id"].as_str().unwrap_or("?"),
        stop_event["data"]["call_id"].as_str().unwrap_or("?"),
        stop_event["data"]["reason"].as_str().unwrap_or("?"),
        stop_event["data"]["worst_case_nano_usd"]
            .as_str()
            .unwrap_or("?"),
    );
    // The approvers' decisions are evidence too, with the identity the webhook stamped.
    let decisions: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT event_type, e #>> '{data,approval_id}', coalesce(e #>> '{data,approver}', '')
           FROM (SELECT event_type, producer_sequence,
                        convert_from(canonical_event, 'UTF8')::jsonb AS e FROM audit_outbox
                  WHERE event_type IN ('approval.approved', 'approval.denied')) x
          ORDER BY producer_sequence",
    )
    .fetch_all(&pool)
    .await?;
    for (event, approval, by) in &decisions {
        println!("approval evidence: {event} {approval} (by {by})");
    }
    let (events, signed): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(signature) FROM audit_outbox")
            .fetch_one(&pool)
            .await?;
    println!(
        "audit outbox: {events} canonical events ({signed} signed with the ledger's Ed25519 key), each written in the transaction of its decision or money movement"
    );
    sidecar.stop().await?;
    mock.stop().await?;
    operator.stop().await?;
    ledger.stop().await?;
    audit_trail(spendguard_bin, &url, events).await
}

/// Canonical ingest, export and offline verification of the demo tenant's evidence.
async fn audit_trail(spendguard_bin: &Path, url: &str, events: i64) -> Result<()> {
    // The forwarder's checkpoint key (production profile requires one) and its public half.
    let key_dir = tempfile::tempdir()?;
    let checkpoint_key = key_dir.path().join("checkpoint.pem");
    let checkpoint_pub = key_dir.path().join("checkpoint.pub.pem");
    let openssl = |args: &[&str]| -> Result<()> {
        let status = std::process::Command::new("openssl")
            .args(args)
            .status()
            .context("running openssl")?;
        anyhow::ensure!(status.success(), "openssl {args:?} failed");
        Ok(())
    };
    let (key_arg, pub_arg) = (
        checkpoint_key.display().to_string(),
        checkpoint_pub.display().to_string(),
    );
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", &key_arg])?;
    openssl(&["pkey", "-in", &key_arg, "-pubout", "-out", &pub_arg])?;
    let forwarder = Child(
        tokio::process::Command::new(spendguard_bin)
            .args(["worker", "outbox-forwarder"])
            .env(
                "SPENDGUARD_LEDGER_DATABASE_URL",
                spendguard_testkit::postgres::runtime_url(url),
            )
            .env("SPENDGUARD_LEADER_ELECTION_MODE", "disabled")
            .env("SPENDGUARD_CHECKPOINT_KEY_FILE", &checkpoint_key)
            .env(
                "SPENDGUARD_ADMIN_ADDR",
                format!("127.0.0.1:{}", spendguard_testkit::free_port()),
            )
            .env("SPENDGUARD_LOG", "error")
            .kill_on_drop(true)
            .spawn()
            .context("starting spendguard worker outbox-forwarder")?,
    );
    let pool = sqlx::PgPool::connect(url).await?;
    for _ in 0..100 {
        let (chained, quarantined): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM audit_chain), (SELECT count(*) FROM audit_quarantine)",
        )
        .fetch_one(&pool)
        .await?;
        if chained + quarantined >= events {
            println!(
                "\n`spendguard worker outbox-forwarder`: {chained} events verified and hash-chained per tenant, {quarantined} quarantined"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    forwarder.stop().await?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("demo-audit");
    let run = |args: Vec<String>| {
        let mut command = std::process::Command::new(spendguard_bin);
        command.args(&args).env(
            "SPENDGUARD_LEDGER_DATABASE_URL",
            spendguard_testkit::postgres::runtime_url(url),
        );
        command
    };
    println!("$ spendguard audit export --tenant demo --out demo-audit");
    let export = run(vec![
        "audit".into(),
        "export".into(),
        "--tenant".into(),
        "demo".into(),
        "--out".into(),
        out.display().to_string(),
    ])
    .output()?;
    print!("{}", String::from_utf8_lossy(&export.stdout));
    if !export.status.success() {
        bail!("export failed: {}", String::from_utf8_lossy(&export.stderr));
    }
    println!(
        "$ spendguard audit verify demo-audit --checkpoint-key checkpoint.pub.pem   # offline: no database"
    );
    let verify = run(vec![
        "audit".into(),
        "verify".into(),
        out.display().to_string(),
        "--checkpoint-key".into(),
        pub_arg.clone(),
    ])
    .output()?;
    print!("{}", String::from_utf8_lossy(&verify.stdout));
    if !verify.status.success() {
        bail!("verify failed: {}", String::from_utf8_lossy(&verify.stderr));
    }
    Ok(())
}
