//! Benchmarks and the demo driver. Prints figures; asserts nothing about speed.
//!
//! `spendguard-bench ledger`: reserve+commit pairs per second and p50/p99 pair latency against an
//! in-process ledger on a throwaway PostgreSQL cluster with durable settings (fsync and
//! synchronous_commit on), for one hot budget and for 100 budgets, at several client counts, plus a
//! paced run at a fixed offered rate.
//!
//! `spendguard-bench proxy`: the latency the sidecar adds over the upstream, and its maximum rate.
//!
//! `spendguard-bench demo`: starts PostgreSQL and the `spendguard ledger` binary, creates a tenant
//! and budgets, spends until the hard cap stops it, and prints balances before and after.

mod cpu;
mod demo;
mod ledger;
mod processes;
mod proxy;
mod quiesce;
mod stats;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::time::Duration;

/// The load generator shares the two cores with what it measures, so it should cost as little
/// as possible: the same allocator as the `spendguard` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// gRPC connections the clients are spread over, round robin. Each stands for one
        /// sidecar (a fleet has one per pod); 1 puts every client on one HTTP/2 connection.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Path of the spendguard binary (the ledger runs as its own process, as in production).
        #[arg(long)]
        spendguard_bin: std::path::PathBuf,
        /// Keep the database up this many seconds after the run (to inspect it with psql).
        #[arg(long, default_value_t = 0)]
        hold_seconds: u64,
        /// Extra PostgreSQL settings, NAME=VALUE (e.g. to compare with synchronous_commit=off).
        #[arg(long = "pg-setting")]
        pg_settings: Vec<String>,
        /// Pause between TTL sweeps during the run, as `spendguard worker ttl-sweeper` does in
        /// production (its default); 0 runs no sweeper.
        #[arg(long, default_value_t = 1_000)]
        sweep_interval_ms: u64,
        /// Reservations left open on a budget of their own through every phase, as a fleet's
        /// calls in flight are (each holds one until its call ends).
        #[arg(long, default_value_t = 0)]
        open_reservations: usize,
        /// Write each paced pair (start offset, ReserveSet, Commit and pair latency, in
        /// microseconds) to this CSV file, to see when the slow ones happened.
        #[arg(long)]
        paced_trace: Option<std::path::PathBuf>,
    },
    /// Latency the sidecar adds over calling the upstream directly, and its maximum rate.
    Proxy {
        /// Seconds per measured rate.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Offered rates (calls/s).
        #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
        rates: Vec<u64>,
        /// Closed-loop clients of the maximum-rate run.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// The sidecar's largest credit (SPENDGUARD_CREDIT_NANO_USD; sized on its demand unless
        /// SPENDGUARD_CREDIT_AHEAD_MS=0 is in the environment); 0 reserves every call before
        /// forwarding it.
        #[arg(long, default_value_t = 0)]
        credit_nano_usd: i64,
        /// Extra PostgreSQL settings, NAME=VALUE.
        #[arg(long = "pg-setting")]
        pg_settings: Vec<String>,
        /// How long the mock upstream takes to answer: calls stay in flight (each holding its
        /// reservation) that long, as a real model's do.
        #[arg(long, default_value_t = 0)]
        upstream_latency_ms: u64,
        /// Path of the spendguard binary (`spendguard-mock-provider` must sit next to it).
        #[arg(long)]
        spendguard_bin: std::path::PathBuf,
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
            connections,
            hold_seconds,
            pg_settings,
            spendguard_bin,
            sweep_interval_ms,
            paced_trace,
            open_reservations,
        } => {
            ledger::bench_ledger(
                Duration::from_secs(seconds),
                &clients,
                (paced_rate, connections),
                &pg_settings,
                (hold_seconds, Duration::from_millis(sweep_interval_ms)),
                &spendguard_bin,
                (open_reservations, paced_trace.as_deref()),
            )
            .await
        }
        Mode::Proxy {
            seconds,
            rates,
            clients,
            credit_nano_usd,
            pg_settings,
            upstream_latency_ms,
            spendguard_bin,
        } => {
            proxy::bench_proxy(
                &spendguard_bin,
                &rates,
                Duration::from_secs(seconds),
                clients,
                credit_nano_usd,
                (&pg_settings, upstream_latency_ms),
            )
            .await
        }
        Mode::Demo { spendguard_bin } => demo::demo(&spendguard_bin).await,
    }
}
