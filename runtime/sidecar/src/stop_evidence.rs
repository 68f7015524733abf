//! STOP evidence (S22: "each decision outcome must be auditable or explicitly marked as not
//! published").
//!
//! A STOP moves no money, so it is answered at once and published after the fact: the decider
//! queues one record per fresh STOP, and a background task sends what has queued to the ledger's
//! `RecordStops` (at most `STOP_RECORDS_MAX` a request; records queued while one is in flight go
//! in the next, so a burst batches itself). The ledger writes one immutable row and one signed
//! audit event per record.
//!
//! The queue is bounded, so a denial storm cannot grow the sidecar's memory or write the ledger
//! as fast as calls are refused. Past the bound a STOP is not queued but counted, per reason, with
//! the times of the first and last; the next request carries each count as a summary record
//! (`decision.stops_unpublished`): those STOPs are explicitly marked as not published one by one.
//! What no record can cover: the queue's content when the process dies (SIGKILL, OOM); SIGTERM
//! sends it first (within the evidence drain deadline) and logs what is left at ERROR.

use crate::metrics::gauge_value;
use crate::sync::lock;
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
    /// Summaries made from `overflow` that the ledger has not taken yet, by reason: sent again
    /// with the same id, and never more than one per reason (so retries cannot grow the queue).
    summaries: BTreeMap<String, pb::StopRecord>,
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

    /// Queues the record of a STOP that was just answered. Past the bound, counts it under its
    /// reason instead and returns false: no record will carry its id.
    pub fn push(&self, record: pb::StopRecord) -> bool {
        let mut inner = lock(&self.inner);
        let queued = inner.queue.len() < self.capacity;
        if queued {
            inner.queue.push_back(record);
            self.metrics.queued.set(gauge_value(inner.queue.len()));
        } else {
            self.metrics.unpublished.inc();
            count(&mut inner.overflow, record);
        }
        drop(inner);
        self.wake.notify_one();
        queued
    }

    /// Counts, under its reason, a call's record the ledger refused for good, so that the STOP is
    /// still published, as part of a count.
    pub fn unpublish(&self, record: pb::StopRecord) {
        self.metrics.unpublished.inc();
        count(&mut lock(&self.inner).overflow, record);
    }

    /// Takes up to `max` records to send: the summaries of STOPs counted past the bound first
    /// (one per reason; a new one only once the ledger took the previous), then the oldest
    /// queued. Records not confirmed through the returned guard go back when it is dropped, so a
    /// send cancelled at any point loses nothing.
    pub fn take(&self, max: usize) -> InFlight<'_> {
        let mut inner = lock(&self.inner);
        let Inner {
            queue,
            overflow,
            summaries,
        } = &mut *inner;
        let ready: Vec<String> = overflow
            .keys()
            .filter(|reason| !summaries.contains_key(*reason))
            .cloned()
            .collect();
        for reason in ready {
            if let Some(counted) = overflow.remove(&reason) {
                let record = summary(reason.clone(), counted, self.capacity);
                summaries.insert(reason, record);
            }
        }
        let mut records: VecDeque<pb::StopRecord> = summaries.values().take(max).cloned().collect();
        for record in &records {
            summaries.remove(&record.reason);
        }
        while records.len() < max {
            let Some(record) = queue.pop_front() else {
                break;
            };
            records.push_back(record);
        }
        self.metrics.queued.set(gauge_value(queue.len()));
        InFlight {
            evidence: self,
            records,
        }
    }

    /// Puts back, in front and in order, records the ledger did not take (the queue may briefly
    /// hold more than the bound: these were admitted already). Summaries go back to their reason.
    fn put_back(&self, records: impl DoubleEndedIterator<Item = pb::StopRecord>) {
        let mut inner = lock(&self.inner);
        for record in records.rev() {
            if record.call_id.is_empty() {
                inner.summaries.insert(record.reason.clone(), record);
            } else {
                inner.queue.push_front(record);
            }
        }
        self.metrics.queued.set(gauge_value(inner.queue.len()));
    }

    /// Counts records the ledger refused for good.
    pub fn dropped(&self, count: usize) {
        self.metrics.dropped.inc_by(count as u64);
    }

    /// Whether nothing waits: no record, no count.
    pub fn is_empty(&self) -> bool {
        let inner = lock(&self.inner);
        inner.queue.is_empty() && inner.overflow.is_empty() && inner.summaries.is_empty()
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
        let mut overflow: BTreeMap<String, u64> = std::mem::take(&mut inner.overflow)
            .into_iter()
            .map(|(reason, o)| (reason, o.count))
            .collect();
        for (reason, summary) in std::mem::take(&mut inner.summaries) {
            let counted = overflow.entry(reason).or_default();
            *counted = counted.saturating_add(summary.count);
        }
        Abandoned { records, overflow }
    }
}

/// A batch taken for sending. Records are confirmed one by one or all at once; whatever is not
/// confirmed when the guard is dropped (a failed send, or one cancelled by a deadline or an
/// abort) goes back to the queue.
pub struct InFlight<'a> {
    evidence: &'a StopEvidence,
    records: VecDeque<pb::StopRecord>,
}

impl InFlight<'_> {
    /// The records not confirmed yet, oldest first.
    pub fn records(&self) -> impl Iterator<Item = &pb::StopRecord> {
        self.records.iter()
    }

    /// A copy of the oldest record not confirmed yet.
    pub fn first(&self) -> Option<pb::StopRecord> {
        self.records.front().cloned()
    }

    /// How many are not confirmed yet.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether every record is confirmed.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The ledger wrote (or had written) every record.
    pub fn published(&mut self) {
        let count = self.records.len();
        self.records.clear();
        self.evidence.metrics.published.inc_by(count as u64);
    }

    /// The ledger wrote the oldest record.
    pub fn published_first(&mut self) {
        if self.records.pop_front().is_some() {
            self.evidence.metrics.published.inc();
        }
    }

    /// The ledger refused the oldest record for good: returned, so the caller can count it.
    pub fn refused_first(&mut self) -> Option<pb::StopRecord> {
        self.records.pop_front()
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.records.is_empty() {
            self.evidence
                .put_back(std::mem::take(&mut self.records).into_iter());
        }
    }
}

/// Adds one STOP to the per-reason counts.
fn count(overflow: &mut BTreeMap<String, Overflow>, record: pb::StopRecord) {
    let at = record.first_decided_at_unix_ms;
    overflow
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

    fn calls(batch: &InFlight<'_>) -> Vec<(String, String, u64)> {
        batch
            .records()
            .map(|r| (r.call_id.clone(), r.reason.clone(), r.count))
            .collect()
    }

    #[test]
    fn past_the_bound_stops_are_counted_per_reason_and_sent_first_as_summaries() {
        let evidence = StopEvidence::new(2);
        assert!(evidence.push(stop("a", "MODEL_DENIED", 10)));
        assert!(evidence.push(stop("b", "MODEL_DENIED", 11)));
        assert!(!evidence.push(stop("c", "MODEL_DENIED", 14)));
        assert!(!evidence.push(stop("d", "BUDGET_EXHAUSTED", 13)));
        assert!(!evidence.push(stop("e", "MODEL_DENIED", 12)));
        assert_eq!(evidence.len(), 2);
        let mut batch = evidence.take(10);
        let expected = [
            ("", "BUDGET_EXHAUSTED", 1),
            ("", "MODEL_DENIED", 2),
            ("a", "MODEL_DENIED", 1),
            ("b", "MODEL_DENIED", 1),
        ]
        .map(|(c, r, n)| (c.to_owned(), r.to_owned(), n));
        assert_eq!(calls(&batch), expected);
        let model_denied = batch.records().nth(1).unwrap();
        assert_eq!(
            (
                model_denied.first_decided_at_unix_ms,
                model_denied.last_decided_at_unix_ms
            ),
            (12, 14)
        );
        assert!(model_denied.detail.contains("2 STOP decisions"));
        batch.published();
        drop(batch);
        assert!(evidence.is_empty());
    }

    #[test]
    fn records_not_confirmed_go_back_first_with_the_same_ids() {
        let evidence = StopEvidence::new(10);
        for (i, call) in ["a", "b", "c"].into_iter().enumerate() {
            evidence.push(stop(call, "MODEL_DENIED", i as i64 + 1));
        }
        let first: Vec<pb::StopRecord> = evidence.take(2).records().cloned().collect();
        // Dropped unconfirmed: a failed or cancelled send.
        evidence.push(stop("d", "MODEL_DENIED", 9));
        let mut again = evidence.take(2);
        assert_eq!(again.records().cloned().collect::<Vec<_>>(), first);
        again.published_first();
        drop(again);
        let rest: Vec<String> = evidence
            .take(10)
            .records()
            .map(|r| r.call_id.clone())
            .collect();
        assert_eq!(rest, ["b", "c", "d"]);
    }

    #[test]
    fn failed_sends_neither_multiply_summaries_nor_grow_the_queue() {
        let evidence = StopEvidence::new(1);
        evidence.push(stop("a", "MODEL_DENIED", 1));
        evidence.push(stop("b", "MODEL_DENIED", 2));
        evidence.push(stop("c", "MODEL_DENIED", 3));
        let first = evidence.take(10);
        let summary_id = first.records().next().unwrap().record_id.clone();
        assert_eq!(first.len(), 2);
        drop(first);
        for attempt in 0..5 {
            evidence.push(stop(
                &format!("late-{attempt}"),
                "MODEL_DENIED",
                10 + attempt,
            ));
            let retry = evidence.take(10);
            let summaries: Vec<&pb::StopRecord> =
                retry.records().filter(|r| r.call_id.is_empty()).collect();
            assert_eq!(summaries.len(), 1, "one summary per reason in flight");
            assert_eq!(summaries[0].record_id, summary_id, "sent again, same id");
            assert_eq!(summaries[0].count, 2);
            assert_eq!(retry.len(), 2, "the queue stays at its bound");
        }
        let mut accepted = evidence.take(10);
        accepted.published();
        drop(accepted);
        let next = evidence.take(10);
        let summary = next.records().next().unwrap();
        assert_ne!(summary.record_id, summary_id);
        assert_eq!(summary.count, 5, "the STOPs counted meanwhile");
    }

    #[test]
    fn a_refused_call_record_is_published_as_a_count() {
        let evidence = StopEvidence::new(10);
        evidence.push(stop("a", "MODEL_DENIED", 1));
        let mut batch = evidence.take(10);
        let refused = batch.refused_first().unwrap();
        drop(batch);
        evidence.unpublish(refused);
        let next = evidence.take(10);
        assert_eq!(
            calls(&next),
            [(String::new(), "MODEL_DENIED".to_owned(), 1)]
        );
    }

    #[test]
    fn abandon_reports_records_counts_and_pending_summaries() {
        let evidence = StopEvidence::new(1);
        evidence.push(stop("a", "MODEL_DENIED", 1));
        evidence.push(stop("b", "PRICING_STALE", 2));
        drop(evidence.take(10));
        evidence.push(stop("c", "PRICING_STALE", 3));
        let left = evidence.abandon();
        assert_eq!(left.records, 1);
        assert_eq!(left.overflow.get("PRICING_STALE"), Some(&2));
        assert!(evidence.is_empty());
    }
}
