//! The ledger's Prometheus metrics. Labels are RPC names and error codes only: tenant, budget and
//! reservation ids belong in spans, never in labels.

use crate::store::BatchTimings;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Labels of per-RPC metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// RPC name.
    pub rpc: &'static str,
}

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// RPC name.
    pub rpc: &'static str,
    /// Stable error code.
    pub code: &'static str,
}

/// Labels of the batch phase histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// load | plan | write | commit.
    pub phase: &'static str,
}

/// Which path a batch took (see cache.rs).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum BatchPath {
    /// Planned on the writer's cache and written by one guarded statement.
    Cached,
    /// Planned on the cache, refused by its guard (or failed), then run on the load path.
    CachedStale,
    /// Loaded and locked rows in a transaction.
    Loaded,
}

/// Labels of the batch path counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// cached | cached_stale | loaded.
    pub path: &'static str,
}

/// Labels of the written-commands counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UrgencyLabels {
    /// now | deferrable (the request said nobody waits on its answer).
    pub urgency: &'static str,
}

/// Ledger metrics.
#[derive(Clone)]
pub struct Metrics {
    batch_path: Family<PathLabels, Counter>,
    commands: Family<UrgencyLabels, Counter>,
    rpc_duration: Family<RpcLabels, Histogram>,
    rpc_errors: Family<ErrorLabels, Counter>,
    batch_commands: Histogram,
    batch_duration: Histogram,
    batch_phase: Family<PhaseLabels, Histogram>,
    /// Open reservations, refreshed periodically.
    pub open_reservations: Gauge,
    /// Audit events not yet forwarded into the canonical chain.
    pub evidence_unforwarded: Gauge,
    /// Age of the oldest of them, in seconds (0 when none).
    pub evidence_oldest_unforwarded_age_seconds: Gauge,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3.3 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 16,
    ))
}

impl Metrics {
    /// Registers every metric under the `spendguard_ledger` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            rpc_duration: Family::new_with_constructor(latency_histogram),
            rpc_errors: Family::default(),
            batch_path: Family::default(),
            commands: Family::default(),
            batch_commands: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 10),
            ),
            batch_duration: latency_histogram(),
            batch_phase: Family::new_with_constructor(latency_histogram),
            open_reservations: Gauge::default(),
            evidence_unforwarded: Gauge::default(),
            evidence_oldest_unforwarded_age_seconds: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("spendguard_ledger");
        registry.register(
            "rpc_duration_seconds",
            "Latency of ledger RPCs",
            metrics.rpc_duration.clone(),
        );
        registry.register(
            "rpc_errors",
            "Failed ledger RPCs by stable error code",
            metrics.rpc_errors.clone(),
        );
        registry.register(
            "batches",
            "Group-commit batches by path: cached, cached_stale (refused by the guard, then loaded), loaded",
            metrics.batch_path.clone(),
        );
        registry.register(
            "commands",
            "Commands handed to the writer, by urgency: now, or deferrable (held up to the defer window for a shared transaction)",
            metrics.commands.clone(),
        );
        registry.register(
            "batch_commands",
            "Commands per group-commit transaction",
            metrics.batch_commands.clone(),
        );
        registry.register(
            "batch_duration_seconds",
            "Duration of group-commit transactions",
            metrics.batch_duration.clone(),
        );
        registry.register(
            "batch_phase_seconds",
            "Time of each phase of a group-commit transaction",
            metrics.batch_phase.clone(),
        );
        registry.register(
            "open_reservations",
            "Reservations not yet committed, released or expired",
            metrics.open_reservations.clone(),
        );
        registry.register(
            "evidence_unforwarded",
            "Audit events in the outbox not yet forwarded into the canonical chain (a lag, not a loss)",
            metrics.evidence_unforwarded.clone(),
        );
        registry.register(
            "evidence_oldest_unforwarded_age_seconds",
            "Age of the oldest audit event not yet forwarded into the canonical chain (0 when none)",
            metrics.evidence_oldest_unforwarded_age_seconds.clone(),
        );
        metrics
    }

    /// Records one RPC.
    pub fn observe_rpc(
        &self,
        rpc: &'static str,
        elapsed: Duration,
        error_code: Option<&'static str>,
    ) {
        self.rpc_duration
            .get_or_create(&RpcLabels { rpc })
            .observe(elapsed.as_secs_f64());
        if let Some(code) = error_code {
            self.rpc_errors
                .get_or_create(&ErrorLabels { rpc, code })
                .inc();
        }
    }

    /// Counts `n` commands of one urgency handed to a batch.
    pub fn observe_commands(&self, urgency: &'static str, n: usize) {
        self.commands
            .get_or_create(&UrgencyLabels { urgency })
            .inc_by(n as u64);
    }

    /// Counts a batch's path. A high `cached_stale` rate means another writer (a second
    /// replica, an operator) keeps changing the rows this writer caches.
    pub fn observe_path(&self, path: BatchPath) {
        let path = match path {
            BatchPath::Cached => "cached",
            BatchPath::CachedStale => "cached_stale",
            BatchPath::Loaded => "loaded",
        };
        self.batch_path.get_or_create(&PathLabels { path }).inc();
    }

    /// Records one batch.
    pub fn observe_batch(&self, commands: usize, elapsed: Duration, timings: Option<BatchTimings>) {
        self.batch_commands.observe(commands as f64);
        self.batch_duration.observe(elapsed.as_secs_f64());
        if let Some(t) = timings {
            for (phase, d) in [
                ("load", t.load),
                ("plan", t.plan),
                ("write", t.write),
                ("commit", t.commit),
            ] {
                self.batch_phase
                    .get_or_create(&PhaseLabels { phase })
                    .observe(d.as_secs_f64());
            }
        }
    }
}
