//! Operator metrics, served on the admin port under the `spendguard_operator_` prefix.
//!
//! Labels are the CRD kind, the outcome and the error's stable reason: bounded sets, never an
//! object's name (that belongs in the reconcile span).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// CRD kind, e.g. `Budget`.
    pub kind: &'static str,
}

/// `kind` and `result` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// CRD kind.
    pub kind: &'static str,
    /// `success` or `error`.
    pub result: &'static str,
}

/// `kind` and `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// CRD kind.
    pub kind: &'static str,
    /// The error's stable reason, e.g. `LedgerUnavailable`.
    pub reason: &'static str,
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    reconciliations: Family<ResultLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabel, Histogram>,
    leader: Gauge,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s: a reconcile is one or two API calls and a ledger round trip.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// Registers every metric under `spendguard_operator_`.
    pub fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("spendguard_operator");
        let metrics = Self {
            reconciliations: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            leader: Gauge::default(),
        };
        registry.register(
            "reconciliations",
            "Reconciliations by kind and result",
            metrics.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by kind and stable reason",
            metrics.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took",
            metrics.duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the controllers",
            metrics.leader.clone(),
        );
        metrics
    }

    /// Records one reconciliation; `error_reason` is `None` on success.
    pub fn reconciled(&self, kind: &'static str, seconds: f64, error_reason: Option<&'static str>) {
        let result = if error_reason.is_some() {
            "error"
        } else {
            "success"
        };
        self.reconciliations
            .get_or_create(&ResultLabels { kind, result })
            .inc();
        if let Some(reason) = error_reason {
            self.errors
                .get_or_create(&ErrorLabels { kind, reason })
                .inc();
        }
        self.duration
            .get_or_create(&KindLabel { kind })
            .observe(seconds);
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the exported names and labels are the ones dashboards use. Method: record, encode.
    #[test]
    fn records_results_errors_durations_and_leadership() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.reconciled("Budget", 0.002, None);
        metrics.reconciled("Budget", 0.003, Some("LedgerUnavailable"));
        metrics.set_leader(true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "spendguard_operator_reconciliations_total{kind=\"Budget\",result=\"success\"} 1",
            "spendguard_operator_reconciliations_total{kind=\"Budget\",result=\"error\"} 1",
            "spendguard_operator_reconcile_errors_total{kind=\"Budget\",reason=\"LedgerUnavailable\"} 1",
            "spendguard_operator_reconcile_duration_seconds_count{kind=\"Budget\"} 2",
            "spendguard_operator_leader 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
