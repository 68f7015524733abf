//! The sidecar's Prometheus metrics. Labels are decisions, reason codes and error codes only:
//! tenants, runs and call ids belong in spans.

use crate::decider::Verdict;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SettlementLabels {
    outcome: &'static str,
}

/// Sidecar metrics.
#[derive(Clone)]
pub struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
    errors: Family<CodeLabels, Counter>,
    settlements: Family<SettlementLabels, Counter>,
    overruns: Counter,
}

impl Metrics {
    /// Registers every metric under the `spendguard_sidecar` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            decisions: Family::default(),
            errors: Family::default(),
            settlements: Family::default(),
            overruns: Counter::default(),
        };
        let registry = registry.sub_registry_with_prefix("spendguard_sidecar");
        registry.register(
            "decisions",
            "Decisions by outcome and reason code",
            metrics.decisions.clone(),
        );
        registry.register(
            "errors",
            "Requests refused without a decision, by stable code",
            metrics.errors.clone(),
        );
        registry.register(
            "settlements",
            "Proxy settlements by outcome (commit, release, failed)",
            metrics.settlements.clone(),
        );
        registry.register(
            "overruns",
            "Proxied calls whose reported usage cost more than the worst case reserved for them (the guard's bound undercounted)",
            metrics.overruns.clone(),
        );
        metrics
    }

    /// Registers the loaded bundle's pricing age gauges (S22), so an alert can fire before
    /// calls start to stop: `time() - spendguard_sidecar_pricing_published_timestamp_seconds`
    /// against `spendguard_sidecar_pricing_max_age_seconds`. Both stay 0 when the snapshot is
    /// undated or the contract sets no limit.
    pub fn register_pricing(registry: &mut Registry, bundle: &spendguard_core::contract::Bundle) {
        let registry = registry.sub_registry_with_prefix("spendguard_sidecar");
        let published: Gauge = Gauge::default();
        published.set(bundle.pricing.published_at().map_or(0, |t| t.timestamp()));
        registry.register(
            "pricing_published_timestamp_seconds",
            "When the loaded pricing snapshot's prices were captured (Unix time; 0: undated)",
            published,
        );
        let max_age: Gauge = Gauge::default();
        max_age.set(
            bundle
                .contract
                .pricing_max_age
                .map_or(0, |limit| i64::from(limit.hours).saturating_mul(3_600)),
        );
        registry.register(
            "pricing_max_age_seconds",
            "Oldest pricing the loaded contract accepts, in seconds (0: no limit)",
            max_age,
        );
    }

    /// Counts a decision.
    pub fn decision(&self, verdict: Verdict, reason: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: verdict.as_str(),
                reason,
            })
            .inc();
    }

    /// Counts a refusal without a decision.
    pub fn proxy_error(&self, code: &'static str) {
        self.errors.get_or_create(&CodeLabels { code }).inc();
    }

    /// Counts a proxied call whose usage cost more than its reserved worst case.
    pub fn overrun(&self) {
        self.overruns.inc();
    }

    /// Counts a settlement.
    pub fn settlement(&self, outcome: &'static str) {
        self.settlements
            .get_or_create(&SettlementLabels { outcome })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    decision: &'static str,
}

fn decision_histogram() -> Histogram {
    // 100 µs .. ~1.6 s: a decision is a ledger round trip, or none.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// How long decisions take, from the decide call to its answer, by outcome (`CONTINUE`, `STOP`,
/// `REQUIRE_APPROVAL`, or `ERROR` for a request answered without a decision): the decision
/// latency SLO (S23) of every entry point, the proxy and both decision APIs.
#[derive(Clone)]
pub struct DecisionLatency {
    seconds: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
}

impl Default for DecisionLatency {
    fn default() -> Self {
        Self {
            seconds: Family::new_with_constructor(decision_histogram),
        }
    }
}

impl DecisionLatency {
    /// Registers `spendguard_sidecar_decision_duration_seconds{decision}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("spendguard_sidecar").register(
            "decision_duration_seconds",
            "Time from a decide request to its answer, by outcome (ERROR: answered without a decision)",
            self.seconds.clone(),
        );
    }

    /// Records one decide.
    pub fn observe(&self, decision: &'static str, elapsed: std::time::Duration) {
        self.seconds
            .get_or_create(&OutcomeLabels { decision })
            .observe(elapsed.as_secs_f64());
    }
}

/// A length as a gauge's value.
pub(crate) fn gauge_value(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}
