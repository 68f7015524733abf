//! Latency statistics and the shared report line.

use std::time::Duration;

#[allow(clippy::cast_possible_truncation)] // An index into a vector of at most millions.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Prints p50/p99 of single RPCs (one side of each pair).
pub(crate) fn report_calls(name: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    println!(
        "{name:<34} calls={:<7} p50={:>7.2}ms p99={:>7.2}ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

pub(crate) fn report(name: &str, clients: usize, elapsed: Duration, mut latencies: Vec<Duration>) {
    latencies.sort();
    let pairs = latencies.len();
    println!(
        "{name:<22} clients={clients:<3} pairs={pairs:<7} pairs/s={:<8.0} p50={:>7.2}ms p99={:>7.2}ms",
        pairs as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}
