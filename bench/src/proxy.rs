//! `spendguard-bench proxy`: the latency the sidecar adds over calling the mock upstream
//! directly, at fixed offered rates, and the maximum sustained calls/s through it.
//!
//! Every component is its own process (PostgreSQL with durable settings, `spendguard ledger`,
//! `spendguard-mock-provider`, `spendguard sidecar`); this process only generates load. Each call
//! is a non-streaming OpenAI chat completion: through the sidecar it is decided (one ReserveSet),
//! forwarded, and settled (one Commit, in the background).

use crate::cpu;
use crate::processes::{LedgerProcess, spawn_mock, spawn_sidecar};
use crate::quiesce::quiesce;
use crate::stats::percentile;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use spendguard_core::contract::{Bundle, Contract};
use spendguard_testkit::PgCluster;
use std::time::Duration;
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Summarise the quarterly report in three bullet points."}]}"#;

async fn call(client: &HttpClient, url: &str) -> Result<()> {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))?;
    let response = client.request(request).await?;
    let status = response.status();
    let _ = response.into_body().collect().await?;
    if status != 200 {
        bail!("status {status}");
    }
    Ok(())
}

/// Offers `rate` calls/s for `duration`; latency is measured from each call's scheduled start.
/// Latencies come back in schedule order.
async fn paced(
    client: &HttpClient,
    url: &str,
    rate: u64,
    duration: Duration,
) -> Result<Vec<Duration>> {
    let count = usize::try_from(rate * duration.as_secs())?;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for n in 0..count {
        let scheduled = started + interval.mul_f64(n as f64);
        tokio::time::sleep_until(scheduled).await;
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            call(&client, &url).await?;
            anyhow::Ok(scheduled.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok(latencies)
}

/// The sidecar's credit counters so far, from its `/metrics`.
#[derive(Default)]
struct CreditCounts {
    /// Calls admitted inside a credit.
    admitted: f64,
    /// Decisions, whatever their outcome.
    decisions: f64,
    /// Credits opened.
    opened: f64,
    /// Lease checks sent (concurrent calls share one).
    lease_checks: f64,
}

async fn credit_counts(admin_port: u16) -> Result<CreditCounts> {
    let (_, metrics) = spendguard_testkit::ledger::http_get(admin_port, "/metrics").await?;
    let mut counts = CreditCounts::default();
    for line in metrics.lines() {
        let value = || {
            line.rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if line.starts_with("spendguard_sidecar_credit_admitted_total ") {
            counts.admitted += value();
        } else if line.starts_with("spendguard_sidecar_decisions_total{") {
            counts.decisions += value();
        } else if line.starts_with("spendguard_sidecar_credits_opened_total ") {
            counts.opened += value();
        } else if line.starts_with("spendguard_sidecar_lease_checks_total ") {
            counts.lease_checks += value();
        }
    }
    Ok(counts)
}

/// Calls slower than the upstream's own latency plus this are reported by when they were
/// scheduled.
const SLOW: Duration = Duration::from_millis(5);

/// Runs of consecutive calls of at least `threshold` (by schedule), so a tail from one stall tells
/// itself apart from a tail spread over the phase: `(first call's scheduled offset, calls,
/// slowest)`.
fn slow_runs(
    latencies: &[Duration],
    interval: Duration,
    threshold: Duration,
) -> Vec<(Duration, usize, Duration)> {
    let mut runs: Vec<(Duration, usize, Duration)> = Vec::new();
    let mut previous_slow = false;
    for (n, &latency) in latencies.iter().enumerate() {
        let slow = latency >= threshold;
        if slow
            && previous_slow
            && let Some(run) = runs.last_mut()
        {
            run.1 += 1;
            run.2 = run.2.max(latency);
        } else if slow {
            runs.push((interval.mul_f64(n as f64), 1, latency));
        }
        previous_slow = slow;
    }
    runs.sort_by_key(|run| std::cmp::Reverse(run.1));
    runs
}

/// Prints how many calls took `SLOW` or more beyond the `upstream`'s own latency, and the
/// longest runs of them.
fn report_slow(latencies: &[Duration], rate: u64, upstream: Duration) {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let runs = slow_runs(latencies, interval, upstream + SLOW);
    let slow: usize = runs.iter().map(|r| r.1).sum();
    let longest: Vec<String> = runs
        .iter()
        .take(3)
        .map(|(at, calls, worst)| {
            format!(
                "{calls} from {:.2}s (worst {:.1} ms)",
                at.as_secs_f64(),
                ms(*worst)
            )
        })
        .collect();
    println!(
        "  slow (>= {} ms): {slow} calls in {} runs; longest: {}",
        (upstream + SLOW).as_millis(),
        runs.len(),
        if longest.is_empty() {
            "none".to_owned()
        } else {
            longest.join(", ")
        }
    );
}

/// `clients` closed loops for `duration`: completed calls per second.
async fn sustained(
    client: &HttpClient,
    url: &str,
    clients: usize,
    duration: Duration,
) -> Result<f64> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                call(&client, &url).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) async fn bench_proxy(
    spendguard_bin: &std::path::Path,
    rates: &[u64],
    duration: Duration,
    clients: usize,
    credit_nano_usd: i64,
    (extra, upstream_latency_ms): (&[String], u64),
) -> Result<()> {
    let mut settings = vec![("max_connections", "200"), ("shared_buffers", "256MB")];
    settings.extend(crate::ledger::pg_settings(extra)?);
    let cluster = PgCluster::start(&settings)?;
    let url = cluster.create_database().await?;
    let mut ledger = LedgerProcess::spawn(spendguard_bin, &url, "bench-ledger").await?;
    spendguard_testkit::ledger::tenant(&mut ledger.client, "bench").await?;
    spendguard_testkit::ledger::budget(
        &mut ledger.client,
        "bench",
        "bench/llm",
        1_000_000_000_000_000,
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let contract: Contract =
        serde_json::from_value(json!({"version": "bench", "max_output_tokens": 4096}))?;
    let pricing: spendguard_core::pricing::PricingSnapshot = serde_json::from_value(
        json!({"version": "bench", "entries": [
        {"provider": "openai", "model": "gpt-4o-mini",
         "price": {"input": 150_000_000, "cached_input": 75_000_000, "cache_write": 150_000_000, "output": 600_000_000}}]}),
    )?;
    let snapshot = spendguard_core::pricing::Pricing::new(pricing.clone())?;
    spendguard_testkit::ledger::register_pricing(
        &mut ledger.client,
        "bench",
        spendguard_sidecar::bundle::pricing_ref(&snapshot),
    )
    .await?;
    let (bytes, sha) = Bundle::canonical(&contract, &pricing)?;
    spendguard_sidecar::bundle::write(dir.path(), &bytes, &sha, "bench", &["bench/llm"])?;
    let (mock, mock_port) = spawn_mock(spendguard_bin, 16, upstream_latency_ms).await?;
    let (sidecar, sidecar_port, sidecar_admin) = spawn_sidecar(
        spendguard_bin,
        ledger.port,
        dir.path(),
        mock_port,
        "bench-pod",
        &[("SPENDGUARD_CREDIT_NANO_USD", credit_nano_usd.to_string())],
    )
    .await?;
    let processes = [
        ("ledger", ledger.child.id().context("the ledger exited")?),
        ("sidecar", sidecar.0.id().context("the sidecar exited")?),
        ("mock", mock.0.id().context("the mock exited")?),
    ];
    let direct = format!("http://127.0.0.1:{mock_port}/v1/chat/completions");
    let guarded = format!("http://127.0.0.1:{sidecar_port}/v1/chat/completions");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    // Warm connection pools on both paths.
    paced(&client, &direct, 200, Duration::from_secs(1)).await?;
    paced(&client, &guarded, 200, Duration::from_secs(1)).await?;

    println!(
        "proxy benchmark: non-streaming chat calls, {}s per rate, the upstream answering after {upstream_latency_ms} ms; PostgreSQL 15 local (fsync=on synchronous_commit=on); every component its own process; {}",
        duration.as_secs(),
        if credit_nano_usd > 0 {
            format!(
                "credits of up to {credit_nano_usd} nano-USD, sized on the sidecar's demand unless SPENDGUARD_CREDIT_AHEAD_MS=0 (calls admitted inside them, drawn in the background)"
            )
        } else {
            "no credits (every call reserves before it is forwarded)".to_owned()
        }
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "rate", "direct p50", "direct p99", "guard p50", "guard p99", "added p50", "added p99"
    );
    for &rate in rates {
        quiesce(&url).await?;
        let d = paced(&client, &direct, rate, duration).await?;
        quiesce(&url).await?;
        let writer_before = crate::ledger::writer_totals(ledger.admin_port).await?;
        let credits_before = credit_counts(sidecar_admin).await?;
        let cpu_before = cpu::sample(&processes)?;
        let g = paced(&client, &guarded, rate, duration).await?;
        let cpu_after = cpu::sample(&processes)?;
        let credits_after = credit_counts(sidecar_admin).await?;
        let writer_after = crate::ledger::writer_totals(ledger.admin_port).await?;
        let g_in_order = g.clone();
        let (mut d, mut g) = (d, g);
        d.sort();
        g.sort();
        let (d50, d99) = (percentile(&d, 0.50), percentile(&d, 0.99));
        let (g50, g99) = (percentile(&g, 0.50), percentile(&g, 0.99));
        println!(
            "{:<12} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>10.2}ms {:>10.2}ms",
            format!("{rate}/s"),
            ms(d50),
            ms(d99),
            ms(g50),
            ms(g99),
            ms(g50) - ms(d50),
            ms(g99) - ms(d99),
        );
        cpu::report(&cpu_before, &cpu_after, g.len(), "call");
        report_slow(
            &g_in_order,
            rate,
            Duration::from_millis(upstream_latency_ms),
        );
        if credit_nano_usd > 0 {
            println!(
                "  sidecar: {:.0} of {:.0} decisions admitted inside a credit (the rest reserved one by one); {:.0} credits opened; {:.0} lease checks",
                credits_after.admitted - credits_before.admitted,
                credits_after.decisions - credits_before.decisions,
                credits_after.opened - credits_before.opened,
                credits_after.lease_checks - credits_before.lease_checks
            );
        }
        let batches = writer_after.0 - writer_before.0;
        println!(
            "  ledger: {batches:.0} batches, {:.1} commands per batch",
            (writer_after.1 - writer_before.1) / batches.max(1.0)
        );
    }
    if upstream_latency_ms == 0 {
        quiesce(&url).await?;
        let max_direct = sustained(&client, &direct, clients, duration).await?;
        quiesce(&url).await?;
        let max_guarded = sustained(&client, &guarded, clients, duration).await?;
        println!(
            "max sustained ({clients} closed-loop clients): direct {max_direct:.0} calls/s, through the sidecar {max_guarded:.0} calls/s"
        );
    } else {
        // Closed loops behind a slow upstream measure only clients / latency.
        println!("max sustained: not measured behind a slow upstream");
    }
    crate::ledger::report_writer(ledger.admin_port, None).await?;
    sidecar.stop().await?;
    mock.stop().await?;
    ledger.child.start_kill()?;
    ledger.child.wait().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_runs_group_consecutive_slow_calls_longest_first() {
        let ms = Duration::from_millis;
        let latencies = [
            ms(1),
            ms(6),
            ms(9),
            ms(2),
            ms(5),
            ms(1),
            ms(7),
            ms(8),
            ms(30),
            ms(1),
        ];
        let runs = slow_runs(&latencies, ms(1), ms(5));
        assert_eq!(
            runs,
            vec![(ms(6), 3, ms(30)), (ms(1), 2, ms(9)), (ms(4), 1, ms(5))]
        );
        assert!(slow_runs(&[ms(1), ms(4)], ms(1), ms(5)).is_empty());
        // Behind an upstream of 2 s, slow is 2 s plus the threshold.
        let behind = [ms(2_004), ms(2_006), ms(2_001)];
        assert_eq!(
            slow_runs(&behind, ms(1), ms(2_005)),
            vec![(ms(1), 1, ms(2_006))]
        );
    }
}
