//! STOP evidence (S22: "each decision outcome must be auditable or explicitly marked as not
//! published").
//!
//! A STOP moves no money, so it is answered at once and published after the fact: the decider
//! queues one record per fresh STOP, and a background task sends what has queued to the ledger's
//! `RecordStops` (at most [`STOP_BATCH_MAX`] a request; records queued while one is in flight go
//! in the next, so a burst batches itself). The ledger writes one immutable row and one signed
//! audit event per record.
//!
//! The queue is bounded, so a denial storm cannot grow the sidecar's memory or write the ledger
//! as fast as calls are refused. Past the bound a STOP is not queued but counted, per reason, with
//! the times of the first and last; the next request carries each count as a summary record
//! (`decision.stops_unpublished`): those STOPs are explicitly marked as not published one by one.
//! What no record can cover: the queue's content when the process dies (SIGKILL, OOM); SIGTERM
//! sends it first (within the evidence drain deadline) and logs what is left at ERROR.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use spendguard_proto::ledger::v1 as pb;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::Notify;
use uuid::Uuid;

/// Default bound of the queue (records).
pub const STOP_EVIDENCE_QUEUE_DEFAULT: usize = 4_096;

/// Most records one `RecordStops` carries (the ledger's limit).
pub const STOP_BATCH_MAX: usize = 256;

/// STOPs not queued because the queue was full, for one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Overflow {
    count: u64,
    first_unix_ms: i64,
    last_unix_ms: i64,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<pb::StopRecord>,
    overflow: BTreeMap<String, Overflow>,
}

#[derive(Clone, Default)]
struct StopMetrics {
    queued: Gauge,
    published: Counter,
    unpublished: Counter,
    dropped: Counter,
}

/// The queue of STOP records waiting for the ledger.
pub struct StopEvidence {
    inner: Mutex<Inner>,
    capacity: usize,
    wake: Notify,
    metrics: StopMetrics,
}

/// What [`StopEvidence::abandon`] let go of at shutdown.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Abandoned {
    /// Queued records never sent.
    pub records: usize,
    /// STOPs counted past the bound and never summarised to the ledger, by reason.
    pub overflow: BTreeMap<String, u64>,
}

impl Abandoned {
    /// Whether nothing was left.
    pub fn is_empty(&self) -> bool {
        self.records == 0 && self.overflow.is_empty()
    }
}

impl StopEvidence {
    /// A queue holding at most `capacity` records (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            wake: Notify::new(),
            metrics: StopMetrics::default(),
        }
    }

    /// Registers the queue's metrics under the `spendguard_sidecar` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("spendguard_sidecar");
        registry.register(
            "stop_evidence_queued",
            "STOP records waiting to be published to the ledger",
            self.metrics.queued.clone(),
        );
        registry.register(
            "stop_evidence_published",
            "STOP records the ledger wrote (decision.stopped or decision.stops_unpublished)",
            self.metrics.published.clone(),
        );
        registry.register(
            "stop_evidence_unpublished",
            "STOPs not published one by one because the queue was full (the ledger receives their count per reason)",
            self.metrics.unpublished.clone(),
        );
        registry.register(
            "stop_evidence_dropped",
            "STOP records the ledger refused for good (malformed or conflicting): logged at ERROR, not in the audit chain",
            self.metrics.dropped.clone(),
        );
    }

    /// Queues the record of a STOP that was just answered; past the bound, counts it under its
    /// reason instead.
    pub fn push(&self, record: pb::StopRecord) {
        let mut inner = lock(&self.inner);
        if inner.queue.len() < self.capacity {
            inner.queue.push_back(record);
            self.metrics.queued.set(gauge_value(inner.queue.len()));
        } else {
            self.metrics.unpublished.inc();
            let at = record.first_decided_at_unix_ms;
            inner
                .overflow
                .entry(record.reason)
                .and_modify(|o| {
                    o.count = o.count.saturating_add(1);
                    o.first_unix_ms = o.first_unix_ms.min(at);
                    o.last_unix_ms = o.last_unix_ms.max(at);
                })
                .or_insert(Overflow {
                    count: 1,
                    first_unix_ms: at,
                    last_unix_ms: at,
                });
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Takes up to `max` records to send: first a summary record for each reason counted past
    /// the bound (they leave the counts: from here on they are records like any other), then the
    /// oldest queued.
    pub fn take(&self, max: usize) -> Vec<pb::StopRecord> {
        let mut inner = lock(&self.inner);
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some((reason, overflow)) = inner.overflow.pop_first() else {
                break;
            };
            batch.push(summary(reason, overflow, self.capacity));
        }
        while batch.len() < max {
            let Some(record) = inner.queue.pop_front() else {
                break;
            };
            batch.push(record);
        }
        self.metrics.queued.set(gauge_value(inner.queue.len()));
        batch
    }

    /// Puts back, in front and in order, a batch the ledger could not take yet (it may briefly
    /// hold more than the bound: these were admitted already).
    pub fn put_back(&self, batch: Vec<pb::StopRecord>) {
        let mut inner = lock(&self.inner);
        for record in batch.into_iter().rev() {
            inner.queue.push_front(record);
        }
        self.metrics.queued.set(gauge_value(inner.queue.len()));
    }

    /// Counts records the ledger wrote or had written.
    pub fn published(&self, count: usize) {
        self.metrics.published.inc_by(count as u64);
    }

    /// Counts records the ledger refused for good.
    pub fn dropped(&self, count: usize) {
        self.metrics.dropped.inc_by(count as u64);
    }

    /// Whether nothing waits: no record, no count.
    pub fn is_empty(&self) -> bool {
        let inner = lock(&self.inner);
        inner.queue.is_empty() && inner.overflow.is_empty()
    }

    /// Records queued.
    pub fn len(&self) -> usize {
        lock(&self.inner).queue.len()
    }

    /// Resolves when a record was queued.
    pub async fn notified(&self) {
        self.wake.notified().await;
    }

    /// Empties the queue at shutdown, returning what was never sent.
    pub fn abandon(&self) -> Abandoned {
        let mut inner = lock(&self.inner);
        let records = inner.queue.len();
        inner.queue.clear();
        self.metrics.queued.set(0);
        let overflow = std::mem::take(&mut inner.overflow)
            .into_iter()
            .map(|(reason, o)| (reason, o.count))
            .collect();
        Abandoned { records, overflow }
    }
}

/// The summary record of `overflow.count` STOPs with `reason` that were not published one by one.
fn summary(reason: String, overflow: Overflow, capacity: usize) -> pb::StopRecord {
    pb::StopRecord {
        record_id: Uuid::new_v4().to_string(),
        call_id: String::new(),
        detail: format!(
            "{} STOP decisions ({reason}) were not published one by one: the sidecar's evidence queue ({capacity} records) was full",
            overflow.count
        ),
        reason,
        budget_id: String::new(),
        worst_case_nano_usd: 0,
        first_decided_at_unix_ms: overflow.first_unix_ms,
        last_decided_at_unix_ms: overflow.last_unix_ms,
        count: overflow.count,
        fencing_epoch: 0,
        context: None,
    }
}

fn gauge_value(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data intact; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop(call_id: &str, reason: &str, at: i64) -> pb::StopRecord {
        pb::StopRecord {
            record_id: Uuid::new_v4().to_string(),
            call_id: call_id.into(),
            reason: reason.into(),
            first_decided_at_unix_ms: at,
            last_decided_at_unix_ms: at,
            count: 1,
            ..Default::default()
        }
    }

    #[test]
    fn past_the_bound_stops_are_counted_per_reason_and_sent_first_as_summaries() {
        let evidence = StopEvidence::new(2);
        evidence.push(stop("a", "MODEL_DENIED", 10));
        evidence.push(stop("b", "MODEL_DENIED", 11));
        evidence.push(stop("c", "MODEL_DENIED", 14));
        evidence.push(stop("d", "BUDGET_EXHAUSTED", 13));
        evidence.push(stop("e", "MODEL_DENIED", 12));
        assert_eq!(evidence.len(), 2);
        let batch = evidence.take(10);
        let summaries: Vec<_> = batch
            .iter()
            .map(|r| (r.call_id.as_str(), r.reason.as_str(), r.count))
            .collect();
        assert_eq!(
            summaries,
            [
                ("", "BUDGET_EXHAUSTED", 1),
                ("", "MODEL_DENIED", 2),
                ("a", "MODEL_DENIED", 1),
                ("b", "MODEL_DENIED", 1),
            ]
        );
        let model_denied = &batch[1];
        assert_eq!(
            (
                model_denied.first_decided_at_unix_ms,
                model_denied.last_decided_at_unix_ms
            ),
            (12, 14)
        );
        assert!(model_denied.detail.contains("2 STOP decisions"));
        assert!(evidence.is_empty());
    }

    #[test]
    fn a_batch_put_back_is_sent_again_first_with_the_same_ids() {
        let evidence = StopEvidence::new(10);
        for (i, call) in ["a", "b", "c"].into_iter().enumerate() {
            evidence.push(stop(call, "MODEL_DENIED", i as i64 + 1));
        }
        let first = evidence.take(2);
        evidence.push(stop("d", "MODEL_DENIED", 9));
        evidence.put_back(first.clone());
        let again = evidence.take(2);
        assert_eq!(again, first);
        let rest: Vec<_> = evidence.take(10).into_iter().map(|r| r.call_id).collect();
        assert_eq!(rest, ["c", "d"]);
    }

    #[test]
    fn abandon_reports_records_and_counts_left() {
        let evidence = StopEvidence::new(1);
        evidence.push(stop("a", "MODEL_DENIED", 1));
        evidence.push(stop("b", "PRICING_STALE", 2));
        let left = evidence.abandon();
        assert_eq!(left.records, 1);
        assert_eq!(left.overflow.get("PRICING_STALE"), Some(&1));
        assert!(evidence.is_empty());
    }
}
