//! Benchmarks and the demo driver. Prints figures; asserts nothing about speed.
//!
//! `spendguard-bench ledger`: reserve+commit pairs per second and p50/p99 pair latency against an
//! in-process ledger on a throwaway PostgreSQL cluster with durable settings (fsync and
//! synchronous_commit on), for one hot budget and for 100 budgets, at several client counts, plus a
//! paced run at a fixed offered rate.
//!
//! `spendguard-bench demo`: starts PostgreSQL and the `spendguard ledger` binary, creates a tenant
//! and budgets, spends until the hard cap stops it, and prints balances before and after.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::PgCluster;
use spendguard_testkit::control_plane::{ControlPlane, User};
use spendguard_testkit::ledger::{
    LedgerClient, budget, connect, http_get, reserve_request, tenant_with_lease,
};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Ledger reserve+commit benchmark.
    Ledger {
        /// Seconds per measured scenario.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Client counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
        clients: Vec<usize>,
        /// Offered rate (pairs/s) of the paced scenario.
        #[arg(long, default_value_t = 1_000)]
        paced_rate: u64,
        /// Path of the spendguard binary (the ledger runs as its own process, as in production).
        #[arg(long)]
        spendguard_bin: std::path::PathBuf,
        /// Keep the database up this many seconds after the run (to inspect it with psql).
        #[arg(long, default_value_t = 0)]
        hold_seconds: u64,
        /// Extra PostgreSQL settings, NAME=VALUE (e.g. to compare with synchronous_commit=off).
        #[arg(long = "pg-setting")]
        pg_settings: Vec<String>,
    },
    /// The `make demo` scenario.
    Demo {
        /// Path of the spendguard binary.
        #[arg(long)]
        spendguard_bin: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Mode::Ledger {
            seconds,
            clients,
            paced_rate,
            hold_seconds,
            pg_settings,
            spendguard_bin,
        } => {
            bench_ledger(
                Duration::from_secs(seconds),
                &clients,
                paced_rate,
                &pg_settings,
                hold_seconds,
                &spendguard_bin,
            )
            .await
        }
        Mode::Demo { spendguard_bin } => demo(&spendguard_bin).await,
    }
}

const T: &str = "bench";

async fn pair(
    client: &mut LedgerClient,
    fencing: &pb::FencingToken,
    key: &str,
    budget: &str,
) -> Result<()> {
    let response = client
        .reserve_set(reserve_request(T, key, &[budget], 1_000, fencing))
        .await?
        .into_inner();
    let Some(pb::reserve_set_response::Outcome::Reserved(r)) = response.outcome else {
        bail!("denied: {response:?}")
    };
    client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id,
            actual_nano_usd: 700,
            fencing: Some(fencing.clone()),
        })
        .await?;
    Ok(())
}

#[allow(clippy::cast_possible_truncation)] // An index into a vector of at most millions.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(name: &str, clients: usize, elapsed: Duration, mut latencies: Vec<Duration>) {
    latencies.sort();
    let pairs = latencies.len();
    println!(
        "{name:<22} clients={clients:<3} pairs={pairs:<7} pairs/s={:<8.0} p50={:>7.2}ms p99={:>7.2}ms",
        pairs as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

async fn bench_ledger(
    duration: Duration,
    client_counts: &[usize],
    paced_rate: u64,
    extra: &[String],
    hold_seconds: u64,
    spendguard_bin: &std::path::Path,
) -> Result<()> {
    // Durable settings: PostgreSQL defaults (fsync on, synchronous_commit on) unless overridden.
    let mut settings = vec![
        ("max_connections", "200"),
        ("shared_buffers", "256MB"),
        ("shared_preload_libraries", "pg_stat_statements"),
    ];
    for setting in extra {
        let (name, value) = setting
            .split_once('=')
            .context("--pg-setting takes NAME=VALUE")?;
        settings.push((name, value));
    }
    let cluster = PgCluster::start(&settings)?;
    let url = cluster.create_database().await?;
    let mut process = LedgerProcess::spawn(spendguard_bin, &url, "bench-ledger").await?;
    let base = process.client.clone();
    let fencing = tenant_with_lease(&mut process.client, T).await?;
    budget(&mut process.client, T, "hot", 1_000_000_000_000_000).await?;
    for i in 0..100 {
        budget(
            &mut process.client,
            T,
            &format!("b{i}"),
            1_000_000_000_000_000,
        )
        .await?;
    }
    println!(
        "ledger benchmark: {}s per scenario, PostgreSQL 15 local (defaults: fsync=on synchronous_commit=on), extra settings {extra:?}",
        duration.as_secs()
    );
    for (name, spread) in [("hot budget", false), ("100 budgets", true)] {
        for &clients in client_counts {
            let deadline = Instant::now() + duration;
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let mut client = base.clone();
                let fencing = fencing.clone();
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let budget = if spread {
                            format!("b{}", (c as u64 + n) % 100)
                        } else {
                            "hot".to_owned()
                        };
                        let key = format!("{}-{clients}-{c}-{n}", name.replace(' ', "_"));
                        let t = Instant::now();
                        pair(&mut client, &fencing, &key, &budget).await?;
                        latencies.push(t.elapsed());
                        n += 1;
                    }
                    anyhow::Ok(latencies)
                }));
            }
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await??);
            }
            report(name, clients, started.elapsed(), all);
        }
    }
    // Paced: a fixed offered rate on the hot budget, latency measured from each pair's start.
    let interval = Duration::from_secs_f64(1.0 / paced_rate as f64);
    let count = usize::try_from(paced_rate * duration.as_secs())?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..count {
        ticker.tick().await;
        let mut client = base.clone();
        let fencing = fencing.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            pair(&mut client, &fencing, &format!("paced-{n}"), "hot").await?;
            anyhow::Ok(t.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await??);
    }
    report(
        &format!("paced {paced_rate}/s hot"),
        0,
        started.elapsed(),
        latencies,
    );
    let (_, metrics) = http_get(process.admin_port, "/metrics").await?;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let batches = value("spendguard_ledger_batch_commands_count ");
    println!(
        "\nwriter: {batches:.0} batches, {:.1} commands/batch, {:.2} ms/batch",
        value("spendguard_ledger_batch_commands_sum ") / batches.max(1.0),
        value("spendguard_ledger_batch_duration_seconds_sum ") * 1e3 / batches.max(1.0)
    );
    for phase in ["load", "plan", "write", "commit"] {
        let sum = value(&format!(
            "spendguard_ledger_batch_phase_seconds_sum{{phase=\"{phase}\"}} "
        ));
        println!("  {phase:<7} {:.3} ms/batch", sum * 1e3 / batches.max(1.0));
    }
    report_statements(&url).await?;
    process.child.start_kill()?;
    process.child.wait().await?;
    if hold_seconds > 0 {
        println!("holding {url} for {hold_seconds}s");
        tokio::time::sleep(Duration::from_secs(hold_seconds)).await;
    }
    Ok(())
}

/// The statements that took the most database time, so a slow run says where it went.
async fn report_statements(url: &str) -> Result<()> {
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&pool)
        .await?;
    let rows: Vec<(i64, f64, f64, String)> = sqlx::query_as(
        "SELECT calls, total_exec_time, mean_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
           FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12",
    )
    .fetch_all(&pool)
    .await?;
    println!("\ntop statements by database time:");
    for (calls, total, mean, query) in rows {
        println!("{calls:>9} calls {total:>9.0} ms total {mean:>7.3} ms mean  {query}");
    }
    Ok(())
}

/// `spendguard ledger` running as its own process, as in production.
struct LedgerProcess {
    child: tokio::process::Child,
    client: LedgerClient,
    port: u16,
    admin_port: u16,
}

impl LedgerProcess {
    async fn spawn(spendguard_bin: &std::path::Path, url: &str, instance_id: &str) -> Result<Self> {
        let port = spendguard_testkit::free_port();
        let admin_port = spendguard_testkit::free_port();
        let child = tokio::process::Command::new(spendguard_bin)
            .arg("ledger")
            .env("SPENDGUARD_LEDGER_DATABASE_URL", url)
            .env("SPENDGUARD_LEDGER_INSTANCE_ID", instance_id)
            .env("SPENDGUARD_LEDGER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("SPENDGUARD_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("SPENDGUARD_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .context("starting spendguard ledger")?;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        for _ in 0..100 {
            if let Ok(client) = connect(addr).await {
                return Ok(Self {
                    child,
                    client,
                    port,
                    admin_port,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("ledger did not come up")
    }
}

fn kubectl(plane: &ControlPlane, args: &[&str], stdin: Option<&str>) -> Result<String> {
    match plane.run_kubectl(User::Admin, args, stdin) {
        (true, text) => Ok(text),
        (false, text) => bail!("kubectl {args:?} failed: {text}"),
    }
}

const DEMO_BUDGET: &str = "apiVersion: spendguard.io/v1alpha1
kind: Budget
metadata: {name: run-42, namespace: default}
spec: {tenant: demo, limit: \"2.00\", window: CalendarMonthUTC}
";

/// Waits until the operator has reconciled the demo budget (Ready=True and `field` = `value`).
async fn wait_budget(plane: &ControlPlane, field: &str, value: &str) -> Result<()> {
    for _ in 0..150 {
        let path =
            format!("jsonpath={{.status.conditions[?(@.type==\"Ready\")].status}}/{{{field}}}");
        let got = kubectl(
            plane,
            &["get", "budget", "run-42", "-n", "default", "-o", &path],
            None,
        )?;
        if got == format!("True/{value}") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the operator did not reconcile budget run-42")
}

async fn demo(spendguard_bin: &std::path::Path) -> Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let cluster = PgCluster::start(&[])?;
    let url = cluster.create_database().await?;
    let plane = ControlPlane::start()?;
    println!(
        "PostgreSQL on 127.0.0.1:{}; kube-apiserver at {}",
        cluster.port(),
        plane.url()
    );
    let LedgerProcess {
        child: mut ledger,
        mut client,
        port,
        ..
    } = LedgerProcess::spawn(spendguard_bin, &url, "demo-ledger").await?;
    println!("`spendguard ledger` on 127.0.0.1:{port}\n");

    println!("$ kubectl apply -f crds/generated/spendguard.io.yaml");
    plane.install_crds(&std::path::Path::new(root).join("crds/generated/spendguard.io.yaml"));
    let mut operator = tokio::process::Command::new(spendguard_bin)
        .arg("operator")
        .env("KUBECONFIG", plane.kubeconfig(User::Admin))
        .env(
            "SPENDGUARD_OPERATOR_LEDGER_ADDR",
            format!("http://127.0.0.1:{port}"),
        )
        .env(
            "SPENDGUARD_ADMIN_ADDR",
            format!("127.0.0.1:{}", spendguard_testkit::free_port()),
        )
        .env("SPENDGUARD_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .context("starting spendguard operator")?;
    println!("`spendguard operator` watching Budgets");
    println!("$ kubectl apply -f - <<EOF\n{DEMO_BUDGET}EOF");
    kubectl(&plane, &["apply", "-f", "-"], Some(DEMO_BUDGET))?;
    wait_budget(&plane, ".status.remaining", "2").await?;
    println!(
        "\n$ kubectl get budgets\n{}",
        kubectl(&plane, &["get", "budgets", "-n", "default"], None)?
    );

    // The agent's sidecar holds a fencing lease; each call reserves its worst case ($0.45) on the
    // budget the operator created, then commits its real cost ($0.30).
    let lease = client
        .acquire_fencing_lease(pb::AcquireFencingLeaseRequest {
            scope_id: "demo/agent-pod".into(),
            tenant_id: "demo".into(),
            workload_instance_id: "agent-pod".into(),
            ttl_ms: 30_000,
            expected_epoch: 0,
            force: false,
        })
        .await?
        .into_inner();
    let fencing = pb::FencingToken {
        scope_id: "demo/agent-pod".into(),
        epoch: lease.epoch,
    };
    println!("fencing lease acquired: epoch {}", lease.epoch);
    for call in 1.. {
        let request = reserve_request(
            "demo",
            &format!("call-{call}"),
            &["default/run-42"],
            450_000_000,
            &fencing,
        );
        match client.reserve_set(request).await?.into_inner().outcome {
            Some(pb::reserve_set_response::Outcome::Reserved(r)) => {
                client
                    .commit(pb::CommitRequest {
                        tenant_id: "demo".into(),
                        reservation_id: r.reservation_id,
                        actual_nano_usd: 300_000_000,
                        fencing: Some(fencing.clone()),
                    })
                    .await?;
                println!("call {call}: CONTINUE  reserved $0.45, committed $0.30");
            }
            Some(pb::reserve_set_response::Outcome::Denied(d)) => {
                println!(
                    "call {call}: STOP      BUDGET_EXHAUSTED on {} (remaining ${:.2})",
                    d.budget_id,
                    d.remaining_nano_usd as f64 / 1e9
                );
                break;
            }
            None => bail!("no outcome"),
        }
    }
    // Ask the operator to refresh now rather than at its next periodic reconcile.
    kubectl(
        &plane,
        &[
            "annotate",
            "--overwrite",
            "budget",
            "run-42",
            "-n",
            "default",
            "demo/refresh=1",
        ],
        None,
    )?;
    wait_budget(&plane, ".status.remaining", "0.2").await?;
    println!(
        "\n$ kubectl get budgets\n{}",
        kubectl(&plane, &["get", "budgets", "-n", "default"], None)?
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_outbox")
        .fetch_one(&sqlx::PgPool::connect(&url).await?)
        .await?;
    println!(
        "audit outbox: {events} canonical events, each written in the transaction that moved the money"
    );
    operator.start_kill()?;
    operator.wait().await?;
    ledger.start_kill()?;
    ledger.wait().await?;
    Ok(())
}
