//! `spendguard-bench ledger`: reserve+commit pairs per second and p50/p99 pair latency against the
//! `spendguard ledger` process on a throwaway PostgreSQL cluster with durable settings (fsync and
//! synchronous_commit on), for one hot budget and for 100 budgets, at several client counts, plus a
//! paced run at a fixed offered rate.

use crate::cpu;
use crate::processes::LedgerProcess;
use crate::quiesce::quiesce;
use crate::stats::{report, report_calls};
use anyhow::{Context, Result, bail};
use spendguard_proto::ledger::v1 as pb;
use spendguard_testkit::PgCluster;
use spendguard_testkit::ledger::{
    LedgerClient, budget, connect, http_get, reserve_request, tenant_with_lease,
};
use std::time::Duration;
use tokio::time::Instant;

const T: &str = "bench";

/// One reserve+commit pair; returns how long each RPC took.
async fn pair(
    client: &mut LedgerClient,
    fencing: &pb::FencingToken,
    key: &str,
    budget: &str,
) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let response = client
        .reserve_set(reserve_request(T, key, &[budget], 1_000, fencing))
        .await?
        .into_inner();
    let reserved = started.elapsed();
    let Some(pb::reserve_set_response::Outcome::Reserved(r)) = response.outcome else {
        bail!("denied: {response:?}")
    };
    let committing = Instant::now();
    client
        .commit(pb::CommitRequest {
            tenant_id: T.into(),
            reservation_id: r.reservation_id,
            actual_nano_usd: 700,
            fencing: Some(fencing.clone()),
            // A pair's latency includes its Commit: this client waits on it.
            deferrable: false,
        })
        .await?;
    Ok((reserved, committing.elapsed()))
}

/// Reserves `count` times on budget "held" (a budget of its own, so the phases' budgets keep
/// their room) with the longest TTL, and never commits: the calls a fleet has in flight.
async fn hold_open(
    control: &mut LedgerClient,
    channels: &[LedgerClient],
    fencing: &pb::FencingToken,
    count: usize,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    budget(control, T, "held", 1_000_000_000_000_000).await?;
    let workers = 64.min(count);
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut client = channels[w % channels.len()].clone();
        let fencing = fencing.clone();
        tasks.push(tokio::spawn(async move {
            for n in (w..count).step_by(workers) {
                let mut request =
                    reserve_request(T, &format!("held-{n}"), &["held"], 1_000, &fencing);
                request.ttl_ms = 3_600_000;
                let response = client.reserve_set(request).await?.into_inner();
                let Some(pb::reserve_set_response::Outcome::Reserved(_)) = response.outcome else {
                    bail!("holding a reservation open was denied: {response:?}")
                };
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Writes the paced pairs as CSV: each one's start (from the phase's start, which the header
/// gives as Unix time to line it up with other records) and its latencies, in microseconds.
fn write_trace(
    path: &std::path::Path,
    started: Instant,
    starts: &[Duration],
    (reserves, commits, pairs): (&[Duration], &[Duration], &[Duration]),
) -> Result<()> {
    let us = |d: &Duration| d.as_micros();
    let mut trace = format!(
        "# started at unix_us={}\nstart_us,reserve_us,commit_us,pair_us\n",
        us(&(std::time::SystemTime::now() - started.elapsed())
            .duration_since(std::time::UNIX_EPOCH)?)
    );
    for (((start, reserve), commit), pair) in starts.iter().zip(reserves).zip(commits).zip(pairs) {
        trace += &format!(
            "{},{},{},{}\n",
            us(start),
            us(reserve),
            us(commit),
            us(pair)
        );
    }
    std::fs::write(path, trace).with_context(|| format!("writing {}", path.display()))
}

/// `--pg-setting NAME=VALUE` arguments as settings.
pub(crate) fn pg_settings(extra: &[String]) -> Result<Vec<(&str, &str)>> {
    extra
        .iter()
        .map(|setting| {
            setting
                .split_once('=')
                .context("--pg-setting takes NAME=VALUE")
        })
        .collect()
}

pub(crate) async fn bench_ledger(
    duration: Duration,
    client_counts: &[usize],
    (paced_rate, connections): (u64, usize),
    extra: &[String],
    (hold_seconds, sweep_interval): (u64, Duration),
    spendguard_bin: &std::path::Path,
    (open_reservations, paced_trace): (usize, Option<&std::path::Path>),
) -> Result<()> {
    // Durable settings: PostgreSQL defaults (fsync on, synchronous_commit on) unless overridden.
    let mut settings = vec![
        ("max_connections", "200"),
        ("shared_buffers", "256MB"),
        ("shared_preload_libraries", "pg_stat_statements"),
    ];
    settings.extend(pg_settings(extra)?);
    let cluster = PgCluster::start(&settings)?;
    let url = cluster.create_database().await?;
    let mut process = LedgerProcess::spawn(spendguard_bin, &url, "bench-ledger").await?;
    let ledger_pid = process.child.id().context("the ledger exited")?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", process.port).parse()?;
    let mut channels = Vec::with_capacity(connections.max(1));
    for _ in 0..connections.max(1) {
        channels.push(connect(addr).await?);
    }
    let channel = |i: usize| channels[i % channels.len()].clone();
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
    hold_open(&mut process.client, &channels, &fencing, open_reservations).await?;
    println!(
        "ledger benchmark: {}s per scenario, clients spread over {} gRPC connections, PostgreSQL 15 local (defaults: fsync=on synchronous_commit=on), extra settings {extra:?}, TTL sweep every {sweep_interval:?}, {open_reservations} reservations held open",
        duration.as_secs(),
        channels.len()
    );
    // On a connection of its own, as the sweeper worker has.
    let sweeper = if sweep_interval.is_zero() {
        None
    } else {
        let errors = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let control: std::net::SocketAddr =
            format!("127.0.0.1:{}", process.control_port).parse()?;
        let task = tokio::spawn(sweep_every(
            connect(control).await?,
            sweep_interval,
            errors.clone(),
        ));
        Some((task, errors))
    };
    for (name, spread) in [("hot budget", false), ("100 budgets", true)] {
        for &clients in client_counts {
            quiesce(&url).await?;
            let cpu_before = cpu::sample(&[("ledger", ledger_pid)])?;
            let deadline = Instant::now() + duration;
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let mut client = channel(c);
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
            let cpu_after = cpu::sample(&[("ledger", ledger_pid)])?;
            let pairs = all.len();
            report(name, clients, started.elapsed(), all);
            cpu::report(&cpu_before, &cpu_after, pairs, "pair");
        }
    }
    // Paced: a fixed offered rate on the hot budget, latency measured from each pair's start.
    let interval = Duration::from_secs_f64(1.0 / paced_rate as f64);
    let count = usize::try_from(paced_rate * duration.as_secs())?;
    quiesce(&url).await?;
    let metrics_before = metrics_now(process.admin_port).await?;
    let cpu_before = cpu::sample(&[("ledger", ledger_pid)])?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..count {
        ticker.tick().await;
        let mut client = channel(n);
        let fencing = fencing.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let rpcs = pair(&mut client, &fencing, &format!("paced-{n}"), "hot").await?;
            anyhow::Ok((t - started, t.elapsed(), rpcs))
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    let (mut reserves, mut commits) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let mut starts = Vec::with_capacity(count);
    for task in tasks {
        let (start, total, (reserve, commit)) = task.await??;
        starts.push(start);
        latencies.push(total);
        reserves.push(reserve);
        commits.push(commit);
    }
    if let Some(path) = paced_trace {
        write_trace(path, started, &starts, (&reserves, &commits, &latencies))?;
    }
    let cpu_after = cpu::sample(&[("ledger", ledger_pid)])?;
    report(
        &format!("paced {paced_rate}/s hot"),
        0,
        started.elapsed(),
        latencies,
    );
    report_calls("  of which ReserveSet", reserves);
    report_calls("  of which Commit", commits);
    cpu::report(&cpu_before, &cpu_after, count, "pair");
    report_writer(process.admin_port, Some(&metrics_before)).await?;
    if let Some((task, errors)) = sweeper {
        task.abort();
        report_sweeper(task.await, &errors)?;
    }
    report_writer(process.admin_port, None).await?;
    report_statements(&url).await?;
    process.child.start_kill()?;
    process.child.wait().await?;
    if hold_seconds > 0 {
        println!("holding {url} for {hold_seconds}s");
        tokio::time::sleep(Duration::from_secs(hold_seconds)).await;
    }
    Ok(())
}

/// What the TTL sweeper worker does, until aborted: sweep everything due, pause; a failed sweep
/// is counted and retried at the next interval.
async fn sweep_every(
    mut client: LedgerClient,
    interval: Duration,
    errors: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    loop {
        tokio::time::sleep(interval).await;
        if let Err(e) = spendguard_workers::sweeper::sweep_due(&mut client).await {
            eprintln!("TTL sweep failed: {e}");
            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Fails the run if the sweeper failed or panicked.
fn report_sweeper(
    ended: std::result::Result<(), tokio::task::JoinError>,
    errors: &std::sync::atomic::AtomicU64,
) -> Result<()> {
    if let Err(e) = ended
        && !e.is_cancelled()
    {
        bail!("the TTL sweeper stopped: {e}");
    }
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} TTL sweeps failed");
    }
    println!("TTL sweeper: no errors");
    Ok(())
}

/// The value of the sample line that starts with `name` (a metric name, its labels and a
/// space) in Prometheus text, 0 when absent.
fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The writer's batches and the commands they carried so far, from the ledger's `/metrics`.
pub(crate) async fn writer_totals(admin_port: u16) -> Result<(f64, f64)> {
    let (_, metrics) = http_get(admin_port, "/metrics").await?;
    Ok((
        metric_value(&metrics, "spendguard_ledger_batch_commands_count "),
        metric_value(&metrics, "spendguard_ledger_batch_commands_sum "),
    ))
}

/// The ledger's `/metrics` text now.
pub(crate) async fn metrics_now(admin_port: u16) -> Result<String> {
    Ok(http_get(admin_port, "/metrics").await?.1)
}

/// The writer's batch statistics, from the ledger's `/metrics`: how many commands shared each
/// statement, and where a batch's time went. Over the whole run, or since `since` (an earlier
/// `/metrics` text) for one phase, with the ledger's own mean time per RPC, so the time a
/// client measured splits into the ledger's and the transport's.
pub(crate) async fn report_writer(admin_port: u16, since: Option<&str>) -> Result<()> {
    let metrics = metrics_now(admin_port).await?;
    let value =
        |name: &str| metric_value(&metrics, name) - since.map_or(0.0, |m| metric_value(m, name));
    let batches = value("spendguard_ledger_batch_commands_count ");
    if since.is_some() {
        for rpc in ["ReserveSet", "Commit"] {
            let labels = format!("{{rpc=\"{rpc}\"}} ");
            let calls = value(&format!(
                "spendguard_ledger_rpc_duration_seconds_count{labels}"
            ));
            println!(
                "  in the ledger: {rpc} {:.3} ms/call",
                value(&format!(
                    "spendguard_ledger_rpc_duration_seconds_sum{labels}"
                )) * 1e3
                    / calls.max(1.0)
            );
        }
    }
    println!(
        "{}writer: {batches:.0} batches, {:.1} commands/batch, {:.2} ms/batch",
        if since.is_some() { "  " } else { "\n" },
        value("spendguard_ledger_batch_commands_sum ") / batches.max(1.0),
        value("spendguard_ledger_batch_duration_seconds_sum ") * 1e3 / batches.max(1.0)
    );
    println!(
        "  paths: cached {:.0}, cached then refused and loaded {:.0}, loaded {:.0}",
        value("spendguard_ledger_batches_total{path=\"cached\"} "),
        value("spendguard_ledger_batches_total{path=\"cached_stale\"} "),
        value("spendguard_ledger_batches_total{path=\"loaded\"} "),
    );
    for phase in ["load", "plan", "write", "commit"] {
        let sum = value(&format!(
            "spendguard_ledger_batch_phase_seconds_sum{{phase=\"{phase}\"}} "
        ));
        println!("  {phase:<7} {:.3} ms/batch", sum * 1e3 / batches.max(1.0));
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
