//! Fail-open evidence (S22): every call let through without a reservation, because the ledger
//! was unreachable under an explicit fail-open contract, is queued here and recorded in the
//! ledger (`RecordFailOpen`) once it answers again, with the call's actual cost.
//!
//! ```text
//! decide: ledger unavailable + fail_policy open ─► admit(record) ─┬─ queue full ─► 503 (fail closed)
//!                                                                 └─ CONTINUE fail_open
//! settle: commit(usage) / release ─► settle(call, actual)
//! drain task: settled records (or unsettled past the deadline, at their worst case)
//!             ─► RecordFailOpen ─┬─ ok / replayed ─► removed (recorded)
//!                                ├─ ledger unavailable ─► kept, retried with backoff
//!                                └─ refused ─► retried up to RECORD_ATTEMPTS_MAX, then dropped (ERROR)
//! ```
//!
//! # Caveats
//! The queue is in memory. A crash of the sidecar while the ledger is down loses the records not
//! yet sent: those calls went through, and their spend and evidence are missing from the
//! ledger. A durable spool on an emptyDir is the follow-up (docs/design/fail-open-evidence.md).
//! Fail-open is only allowed while evidence can be kept: a full queue refuses new fail-open
//! decisions (503 DEPENDENCY_UNAVAILABLE).

use crate::error::SidecarError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use spendguard_proto::ledger::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Default bound of the queue: at the default reservation TTL a sidecar rarely decides more than
/// a few thousand calls in one ledger outage; 10_000 records of about 1 KiB each is 10 MiB.
pub const FAIL_OPEN_QUEUE_RECORDS_DEFAULT: usize = 10_000;

/// Records sent per drain pass: bounds one pass to a few seconds at the RPC timeout.
pub const DRAIN_BATCH_RECORDS_MAX: usize = 64;

/// Attempts for a record the ledger refuses (not for an unavailable ledger, which is retried
/// until it answers): a refusal is a bug or a misconfiguration, so retrying forever would only
/// block the queue; five attempts ride out a transient refusal such as a budget being re-created.
pub const RECORD_ATTEMPTS_MAX: u32 = 5;

/// Longest wait between drain passes while the ledger stays unavailable.
pub const DRAIN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// First wait after a pass that left records behind.
pub const DRAIN_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Why a record was not recorded by a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendFailure {
    /// The ledger did not answer (or was overloaded): keep the record and retry.
    Unavailable(String),
    /// The ledger answered with an error that can pass (its producer id being re-claimed after
    /// an outage, a pricing version or budget not registered yet, an internal error): keep the
    /// record, with no attempt limit, and go on with the next one. The queue's bound, not a
    /// count, limits how long: a full queue fails new fail-open calls closed.
    Retry(String),
    /// The ledger refused the record for good (malformed, or the call id names other fields):
    /// counts against [`RECORD_ATTEMPTS_MAX`].
    Refused(String),
}

/// One queued fail-open call.
#[derive(Debug, Clone)]
struct Record {
    /// The request, `actual_nano_usd` filled in at settlement.
    request: pb::RecordFailOpenRequest,
    /// The call's worst case: recorded if the call is never settled.
    worst_case_nano_usd: i64,
    /// A per-run budget (id, limit) that must exist before the record can name it.
    run_budget: Option<(String, i64)>,
    settled: bool,
    queued_at: Instant,
    attempts: u32,
}

/// A record ready to send.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The request to send.
    pub request: pb::RecordFailOpenRequest,
    /// A per-run budget (id, limit) to upsert first.
    pub run_budget: Option<(String, i64)>,
}

/// Counters of the queue (`spendguard_sidecar_fail_open_*`).
#[derive(Debug, Clone, Default)]
struct QueueMetrics {
    queued: Counter,
    recorded: Counter,
    dropped: Counter,
    refused: Counter,
    pending: Gauge,
}

/// The bounded in-memory queue of fail-open records, keyed by call id.
#[derive(Debug)]
pub struct FailOpenQueue {
    records: Mutex<BTreeMap<String, Record>>,
    capacity: usize,
    settle_deadline: Duration,
    wake: Notify,
    metrics: QueueMetrics,
}

impl FailOpenQueue {
    /// A queue of at most `capacity` records. A record whose call is not settled within
    /// `settle_deadline` is recorded at its worst case (the call's settlement was lost).
    pub fn new(capacity: usize, settle_deadline: Duration) -> Self {
        assert!(
            capacity > 0,
            "a fail-open queue must hold at least one record"
        );
        Self {
            records: Mutex::new(BTreeMap::new()),
            capacity,
            settle_deadline,
            wake: Notify::new(),
            metrics: QueueMetrics::default(),
        }
    }

    /// Registers the queue's metrics under the `spendguard_sidecar` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("spendguard_sidecar");
        registry.register(
            "fail_open_queued",
            "Fail-open decisions queued for recording in the ledger",
            self.metrics.queued.clone(),
        );
        registry.register(
            "fail_open_recorded",
            "Fail-open records the ledger recorded (decision.fail_open written)",
            self.metrics.recorded.clone(),
        );
        registry.register(
            "fail_open_dropped",
            "Fail-open records given up on: evidence and spend missing from the ledger",
            self.metrics.dropped.clone(),
        );
        registry.register(
            "fail_open_refused",
            "Fail-open decisions refused (503) because the evidence queue was full",
            self.metrics.refused.clone(),
        );
        registry.register(
            "fail_open_pending",
            "Fail-open records waiting to be recorded in the ledger",
            self.metrics.pending.clone(),
        );
    }

    /// Queues the record of a fail-open decision, before the call is let through.
    ///
    /// # Errors
    /// [`SidecarError::DependencyUnavailable`] when the queue is full: the decision must fail
    /// closed, since its evidence could not be kept.
    pub fn admit(
        &self,
        request: pb::RecordFailOpenRequest,
        worst_case_nano_usd: i64,
        run_budget: Option<(String, i64)>,
    ) -> Result<(), SidecarError> {
        debug_assert!(worst_case_nano_usd >= 0);
        let mut records = lock(&self.records);
        if records.contains_key(&request.call_id) {
            return Ok(()); // A concurrent decide of the same call id: one record.
        }
        if records.len() >= self.capacity {
            self.metrics.refused.inc();
            return Err(SidecarError::DependencyUnavailable(format!(
                "ledger unavailable and the fail-open evidence queue is full ({} records); \
                 failing closed",
                self.capacity
            )));
        }
        records.insert(
            request.call_id.clone(),
            Record {
                request,
                worst_case_nano_usd,
                run_budget,
                settled: false,
                queued_at: Instant::now(),
                attempts: 0,
            },
        );
        self.metrics.queued.inc();
        self.metrics.pending.set(gauge_value(records.len()));
        Ok(())
    }

    /// Withdraws a record admitted for a decision that was not kept (a concurrent decide of the
    /// same call won): nothing went through under it.
    pub fn withdraw(&self, call_id: &str) {
        let mut records = lock(&self.records);
        if records.get(call_id).is_some_and(|r| !r.settled) {
            records.remove(call_id);
        }
        self.metrics.pending.set(gauge_value(records.len()));
    }

    /// Attaches the call's actual cost (0 for a call that failed or was released). The first
    /// settlement wins; later ones are ignored (the decider answers them as replays).
    pub fn settle(&self, call_id: &str, actual_nano_usd: i64) {
        debug_assert!(actual_nano_usd >= 0);
        let mut records = lock(&self.records);
        if let Some(record) = records.get_mut(call_id)
            && !record.settled
        {
            record.request.actual_nano_usd = actual_nano_usd;
            record.settled = true;
        }
        drop(records);
        self.wake.notify_one();
    }

    /// The worst case a queued call was admitted with.
    pub fn worst_case(&self, call_id: &str) -> Option<i64> {
        lock(&self.records)
            .get(call_id)
            .map(|r| r.worst_case_nano_usd)
    }

    /// Up to [`DRAIN_BATCH_RECORDS_MAX`] records ready to send: settled ones, and unsettled ones
    /// past the settle deadline (or all, when `force`), which are sent at their worst case.
    pub fn ready(&self, force: bool) -> Vec<Ready> {
        let now = Instant::now();
        let mut records = lock(&self.records);
        let mut ready = Vec::new();
        for (call_id, record) in records.iter_mut() {
            if ready.len() >= DRAIN_BATCH_RECORDS_MAX {
                break;
            }
            if !record.settled && (force || now - record.queued_at >= self.settle_deadline) {
                tracing::warn!(call_id = %call_id, worst_case_nano_usd = record.worst_case_nano_usd,
                               "fail-open call never settled; recording its worst case");
                record.request.actual_nano_usd = record.worst_case_nano_usd;
                record.settled = true;
            }
            if record.settled {
                ready.push(Ready {
                    request: record.request.clone(),
                    run_budget: record.run_budget.clone(),
                });
            }
        }
        ready
    }

    /// The ledger recorded `call_id` (or replayed it): the record leaves the queue.
    pub fn recorded(&self, call_id: &str) {
        let mut records = lock(&self.records);
        if records.remove(call_id).is_some() {
            self.metrics.recorded.inc();
        }
        self.metrics.pending.set(gauge_value(records.len()));
    }

    /// The ledger refused `call_id`; returns true when the record was dropped (attempts
    /// exhausted). The caller logs the drop.
    pub fn refused(&self, call_id: &str) -> bool {
        let mut records = lock(&self.records);
        let Some(record) = records.get_mut(call_id) else {
            return false;
        };
        record.attempts = record.attempts.saturating_add(1);
        if record.attempts < RECORD_ATTEMPTS_MAX {
            return false;
        }
        records.remove(call_id);
        self.metrics.dropped.inc();
        self.metrics.pending.set(gauge_value(records.len()));
        true
    }

    /// Gives up on every record still queued (shutdown past its deadline): returns them, for
    /// the caller to log loudly.
    pub fn abandon(&self) -> Vec<pb::RecordFailOpenRequest> {
        let mut records = lock(&self.records);
        let abandoned: Vec<_> = std::mem::take(&mut *records)
            .into_values()
            .map(|r| r.request)
            .collect();
        self.metrics.dropped.inc_by(abandoned.len() as u64);
        self.metrics.pending.set(0);
        abandoned
    }

    /// Records queued (settled or not).
    pub fn len(&self) -> usize {
        lock(&self.records).len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when a settlement may have made a record ready.
    pub async fn notified(&self) {
        self.wake.notified().await;
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

/// The next backoff after a pass that left records behind: doubling, capped.
pub fn next_backoff(current: Duration) -> Duration {
    current
        .saturating_mul(2)
        .clamp(DRAIN_BACKOFF_MIN, DRAIN_BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(call_id: &str) -> pb::RecordFailOpenRequest {
        pb::RecordFailOpenRequest {
            tenant_id: "t".into(),
            call_id: call_id.into(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_refuses_and_settled_records_become_ready() {
        // Goal: the bound holds, only settled records are sent before the deadline, and an
        // unsettled one is sent at its worst case after it. Method: a queue of two, paused time.
        let queue = FailOpenQueue::new(2, Duration::from_secs(60));
        queue.admit(request("a"), 500, None).unwrap();
        queue.admit(request("b"), 700, None).unwrap();
        let full = queue.admit(request("c"), 1, None).unwrap_err();
        assert_eq!(full.code(), "DEPENDENCY_UNAVAILABLE");
        assert!(queue.ready(false).is_empty(), "nothing settled yet");
        queue.settle("a", 123);
        queue.settle("a", 999); // The first settlement wins.
        let ready = queue.ready(false);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].request.actual_nano_usd, 123);
        queue.recorded("a");
        assert_eq!(queue.len(), 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        let ready = queue.ready(false);
        assert_eq!(ready.len(), 1);
        assert_eq!(
            ready[0].request.actual_nano_usd, 700,
            "worst case when never settled"
        );
        queue.admit(request("c"), 1, None).unwrap();
    }

    #[test]
    fn refused_records_are_dropped_after_the_attempt_limit() {
        let queue = FailOpenQueue::new(4, Duration::from_secs(60));
        queue.admit(request("a"), 5, None).unwrap();
        for _ in 1..RECORD_ATTEMPTS_MAX {
            assert!(!queue.refused("a"));
        }
        assert!(queue.refused("a"));
        assert!(queue.is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(next_backoff(Duration::ZERO), DRAIN_BACKOFF_MIN);
        assert_eq!(
            next_backoff(DRAIN_BACKOFF_MIN),
            DRAIN_BACKOFF_MIN.saturating_mul(2)
        );
        assert_eq!(next_backoff(DRAIN_BACKOFF_MAX), DRAIN_BACKOFF_MAX);
    }
}
