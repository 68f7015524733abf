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
//! # Durability
//! With a spool directory ([`spool`], an emptyDir in Kubernetes) every admission is written and
//! flushed to disk before its call goes through, so a crash or a shutdown during an outage leaves
//! the records for the next start, which sends them. Without one the queue is in memory only,
//! and a crash while the ledger is down loses the records not yet sent. Either way fail-open is
//! only allowed while evidence can be kept: a full queue, or a spool that cannot be written,
//! refuses new fail-open decisions (503 DEPENDENCY_UNAVAILABLE).

pub mod spool;

use crate::error::SidecarError;
use crate::metrics::gauge_value;
use crate::sync::lock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use spendguard_proto::ledger::v1 as pb;
use spool::{Spool, SpoolError, SpooledRecord};
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
    /// Something other than the ledger answered (a status without the ledger's detail, not a
    /// transport failure: an older ledger without the method, a proxy refusing this request):
    /// keep the record, with no attempt counted, go on with the next one (the refusal may be
    /// this record's alone), and back off before the next pass.
    NotTheLedger(String),
    /// The ledger answered with an error that can pass (its producer id being re-claimed after
    /// an outage, a pricing version or budget not registered yet, an internal error): keep the
    /// record, with no attempt limit, and go on with the next one. The queue's bound, not a
    /// count, limits how long: a full queue fails new fail-open calls closed.
    Retry(String),
    /// The ledger refused the record for good (malformed): counts against
    /// [`RECORD_ATTEMPTS_MAX`].
    Refused(String),
    /// The ledger holds this call id with other fields. For a record from a previous run that
    /// is the same call recorded at its actual cost before a settlement frame was lost: done.
    /// Otherwise a refusal.
    Conflict(String),
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
    /// Read from the spool a previous process left: its call went through then.
    from_previous_run: bool,
    /// Read from that spool unsettled, so sent at its worst case: the previous process may have
    /// recorded it at its actual cost already (its settlement's frame was lost).
    settlement_lost: bool,
}

impl Record {
    fn spooled(&self) -> SpooledRecord {
        SpooledRecord {
            request: self.request.clone(),
            worst_case_nano_usd: self.worst_case_nano_usd,
            run_budget: self.run_budget.clone(),
            // Kept unsettled on disk, so every later start knows its settlement was lost.
            settled: self.settled && !self.settlement_lost,
        }
    }
}

/// The records and, when durable, the spool that mirrors them (one lock: the file's order is the
/// queue's order).
#[derive(Debug, Default)]
struct State {
    records: BTreeMap<String, Record>,
    spool: Option<Spool>,
    /// Abandoned at shutdown: nothing more is admitted, and with a spool nothing more is removed
    /// from the file, which keeps the records for the next start.
    closed: bool,
}

impl State {
    /// Removes `call_id` and notes it done in the spool; an emptied queue truncates the spool,
    /// and a spool grown far past the queue is rewritten.
    fn finish(&mut self, call_id: &str) -> bool {
        let removed = self.records.remove(call_id).is_some();
        if !removed {
            return false;
        }
        let Some(spool) = self.spool.as_mut().filter(|_| !self.closed) else {
            return true;
        };
        let written = if self.records.is_empty() {
            spool.rewrite(&[])
        } else if spool.wants_rewrite(self.records.len()) {
            spool.rewrite(&spooled(&self.records))
        } else {
            spool.done(call_id)
        };
        if let Err(e) = written {
            // The record may be sent again after a restart; the ledger answers it as a replay.
            tracing::warn!(call_id, code = e.code(), error = %e, "fail-open spool not updated");
        }
        true
    }
}

/// The queue as its spool snapshot, in the queue's order.
fn spooled(records: &BTreeMap<String, Record>) -> Vec<SpooledRecord> {
    records.values().map(Record::spooled).collect()
}

/// A record ready to send.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The request to send.
    pub request: pb::RecordFailOpenRequest,
    /// A per-run budget (id, limit) to upsert first.
    pub run_budget: Option<(String, i64)>,
    /// Read unsettled from a previous process's spool: the ledger may already hold it with its
    /// actual cost (the settlement's frame was lost), so a conflict means recorded, not refused.
    pub settlement_lost: bool,
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

/// The bounded queue of fail-open records, keyed by call id; durable with a spool.
#[derive(Debug)]
pub struct FailOpenQueue {
    state: Mutex<State>,
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
            state: Mutex::new(State::default()),
            capacity,
            settle_deadline,
            wake: Notify::new(),
            metrics: QueueMetrics::default(),
        }
    }

    /// A queue kept durable in the spool in `dir`, holding the records a previous process left
    /// there. Their calls can no longer settle in this process, so unsettled ones are sent at
    /// their worst case.
    ///
    /// # Errors
    /// [`SpoolError`] when the spool cannot be read or written.
    pub fn with_spool(
        capacity: usize,
        settle_deadline: Duration,
        dir: &std::path::Path,
    ) -> Result<Self, SpoolError> {
        let (spool, replayed) = Spool::open(dir)?;
        let mut records = BTreeMap::new();
        for spooled in replayed {
            let mut request = spooled.request;
            if !spooled.settled {
                request.actual_nano_usd = spooled.worst_case_nano_usd;
            }
            let settlement_lost = !spooled.settled;
            records.insert(
                request.call_id.clone(),
                Record {
                    request,
                    worst_case_nano_usd: spooled.worst_case_nano_usd,
                    run_budget: spooled.run_budget,
                    settled: true,
                    queued_at: Instant::now(),
                    attempts: 0,
                    from_previous_run: true,
                    settlement_lost,
                },
            );
        }
        if !records.is_empty() {
            tracing::warn!(
                records = records.len(),
                "fail-open records left by a previous run were read from the spool; they are sent once the ledger answers"
            );
        }
        let queue = Self::new(capacity, settle_deadline);
        queue.metrics.pending.set(gauge_value(records.len()));
        *lock(&queue.state) = State {
            records,
            spool: Some(spool),
            closed: false,
        };
        Ok(queue)
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
            "Fail-open decisions refused (503) because their evidence could not be kept: the queue or the spool was full, or the spool could not be written",
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
        let mut state = lock(&self.state);
        if state.closed {
            return Err(SidecarError::DependencyUnavailable(
                "ledger unavailable and the sidecar is shutting down; failing closed".into(),
            ));
        }
        match state.records.get(&request.call_id) {
            Some(previous) if previous.from_previous_run => {
                // That call went through under this id before a restart; its record (and cost)
                // stand, and a second call under the same id would go unrecorded.
                return Err(SidecarError::DependencyUnavailable(format!(
                    "ledger unavailable and call id {} already went through fail-open before \
                     a restart; its record waits for the ledger; failing closed",
                    request.call_id
                )));
            }
            Some(_) => return Ok(()), // A concurrent decide of the same call id: one record.
            None => {}
        }
        if state.records.len() >= self.capacity {
            self.metrics.refused.inc();
            return Err(SidecarError::DependencyUnavailable(format!(
                "ledger unavailable and the fail-open evidence queue is full ({} records); \
                 failing closed",
                self.capacity
            )));
        }
        let record = Record {
            request,
            worst_case_nano_usd,
            run_budget,
            settled: false,
            queued_at: Instant::now(),
            attempts: 0,
            from_previous_run: false,
            settlement_lost: false,
        };
        let State { records, spool, .. } = &mut *state;
        if let Some(spool) = spool.as_mut() {
            // Flushed before the call goes through, under the lock so the file stays in the
            // queue's order (the decider calls this on the blocking pool).
            let mut written = spool.admitted(&record.spooled());
            if matches!(written, Err(SpoolError::Broken)) {
                // A failed write could not be cut back: rebuild the file from the queue first.
                written = spool
                    .rewrite(&spooled(records))
                    .and_then(|()| spool.admitted(&record.spooled()));
            }
            written.map_err(|e| {
                self.metrics.refused.inc();
                SidecarError::DependencyUnavailable(format!(
                    "ledger unavailable and the fail-open evidence could not be kept ({}: {e}); \
                     failing closed",
                    e.code()
                ))
            })?;
        }
        state.records.insert(record.request.call_id.clone(), record);
        self.metrics.queued.inc();
        self.metrics.pending.set(gauge_value(state.records.len()));
        Ok(())
    }

    /// Withdraws a record admitted for a decision that was not kept (a concurrent decide of the
    /// same call won): nothing went through under it.
    pub fn withdraw(&self, call_id: &str) {
        let mut state = lock(&self.state);
        if state.records.get(call_id).is_some_and(|r| !r.settled) {
            state.finish(call_id);
        }
        self.metrics.pending.set(gauge_value(state.records.len()));
    }

    /// Attaches the call's actual cost (0 for a call that failed or was released). The first
    /// settlement wins; later ones are ignored (the decider answers them as replays).
    pub fn settle(&self, call_id: &str, actual_nano_usd: i64) {
        debug_assert!(actual_nano_usd >= 0);
        let mut state = lock(&self.state);
        let State { records, spool, .. } = &mut *state;
        if let Some(record) = records.get_mut(call_id)
            && !record.settled
        {
            record.request.actual_nano_usd = actual_nano_usd;
            record.settled = true;
            if let Some(Err(e)) = spool.as_mut().map(|s| s.settled(call_id, actual_nano_usd)) {
                // After a restart this record would be sent at its worst case instead.
                tracing::warn!(call_id, code = e.code(), error = %e, "fail-open spool not updated");
            }
        }
        drop(state);
        self.wake.notify_one();
    }

    /// The worst case a queued call was admitted with.
    pub fn worst_case(&self, call_id: &str) -> Option<i64> {
        lock(&self.state)
            .records
            .get(call_id)
            .map(|r| r.worst_case_nano_usd)
    }

    /// Up to [`DRAIN_BATCH_RECORDS_MAX`] records ready to send: settled ones, and unsettled ones
    /// past the settle deadline (or all, when `force`), which are sent at their worst case.
    pub fn ready(&self, force: bool) -> Vec<Ready> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let mut ready = Vec::new();
        for (call_id, record) in &mut state.records {
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
                    settlement_lost: record.settlement_lost,
                });
            }
        }
        ready
    }

    /// The ledger recorded `call_id` (or replayed it): the record leaves the queue.
    pub fn recorded(&self, call_id: &str) {
        let mut state = lock(&self.state);
        if state.finish(call_id) {
            self.metrics.recorded.inc();
        }
        self.metrics.pending.set(gauge_value(state.records.len()));
    }

    /// The ledger refused `call_id`; returns true when the record was dropped (attempts
    /// exhausted). The caller logs the drop.
    pub fn refused(&self, call_id: &str) -> bool {
        let mut state = lock(&self.state);
        let Some(record) = state.records.get_mut(call_id) else {
            return false;
        };
        record.attempts = record.attempts.saturating_add(1);
        if record.attempts < RECORD_ATTEMPTS_MAX {
            return false;
        }
        state.finish(call_id);
        self.metrics.dropped.inc();
        self.metrics.pending.set(gauge_value(state.records.len()));
        true
    }

    /// Stops holding the records still queued (shutdown past its deadline) and returns them,
    /// for the caller to log: with a spool they stay on disk for the next start, without one
    /// they are lost (counted as dropped). The spool is closed, so its directory is free for
    /// the next holder at once.
    pub fn abandon(&self) -> Abandoned {
        let mut state = lock(&self.state);
        let records: Vec<_> = std::mem::take(&mut state.records)
            .into_values()
            .map(|r| r.request)
            .collect();
        let kept = state.spool.take().is_some();
        // Nothing more is admitted: nobody would send it (and with a spool, finishing it could
        // truncate the kept records off the file).
        state.closed = true;
        if !kept {
            self.metrics.dropped.inc_by(records.len() as u64);
        }
        self.metrics.pending.set(0);
        Abandoned { records, kept }
    }

    /// Whether the queue is kept in a spool on disk.
    pub fn is_durable(&self) -> bool {
        lock(&self.state).spool.is_some()
    }

    /// Records queued (settled or not).
    pub fn len(&self) -> usize {
        lock(&self.state).records.len()
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

/// What [`FailOpenQueue::abandon`] let go of.
#[derive(Debug)]
pub struct Abandoned {
    /// The records.
    pub records: Vec<pb::RecordFailOpenRequest>,
    /// Whether they stay in the spool for the next start (else they are lost).
    pub kept: bool,
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
    fn a_spooled_queue_gives_a_new_process_the_records_a_crash_left() {
        // Goal: with a spool, a crash during an outage loses no evidence: the next process sends
        // every record not yet recorded, settled ones at their actual cost and unsettled ones at
        // their worst case, and nothing recorded is sent again. Method: queue A admits three,
        // settles two and records one, then is dropped (a crash writes nothing more); queue B
        // opens the same directory.
        let dir = tempfile::tempdir().unwrap();
        let a = FailOpenQueue::with_spool(8, Duration::from_secs(60), dir.path()).unwrap();
        assert!(a.is_durable());
        a.admit(request("x"), 500, None).unwrap();
        a.admit(request("y"), 700, Some(("run-1".into(), 9_000)))
            .unwrap();
        a.admit(request("z"), 900, None).unwrap();
        a.settle("x", 100);
        a.settle("y", 200);
        a.recorded("x");
        drop(a);

        let b = FailOpenQueue::with_spool(8, Duration::from_secs(60), dir.path()).unwrap();
        assert_eq!(b.len(), 2);
        // The same call id again in the new process: it already went through once, and its
        // record keeps its cost, so a second call under it would go unrecorded.
        let again = b.admit(request("z"), 900, None).unwrap_err();
        assert_eq!(again.code(), "DEPENDENCY_UNAVAILABLE");
        let ready = b.ready(false);
        let sent: Vec<_> = ready
            .iter()
            .map(|r| (r.request.call_id.as_str(), r.request.actual_nano_usd))
            .collect();
        assert_eq!(sent, vec![("y", 200), ("z", 900)]);
        // Only the one that never settled may already sit in the ledger at another amount.
        let lost: Vec<_> = ready.iter().map(|r| r.settlement_lost).collect();
        assert_eq!(lost, vec![false, true]);
        assert_eq!(ready[0].run_budget, Some(("run-1".into(), 9_000)));
        b.recorded("y");
        b.recorded("z");
        drop(b);
        let c = FailOpenQueue::with_spool(8, Duration::from_secs(60), dir.path()).unwrap();
        assert!(c.is_empty(), "recorded records are not sent again");
    }

    #[test]
    fn an_abandoned_spooled_queue_keeps_its_records_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let a = FailOpenQueue::with_spool(8, Duration::from_secs(60), dir.path()).unwrap();
        a.admit(request("x"), 500, None).unwrap();
        let abandoned = a.abandon();
        assert!(abandoned.kept);
        assert_eq!(abandoned.records.len(), 1);
        assert!(a.is_empty());
        // Nothing more enters a queue given up at shutdown: a record admitted now and then
        // recorded would empty the queue and truncate the kept ones off the file.
        assert!(a.admit(request("late"), 1, None).is_err());
        let b = FailOpenQueue::with_spool(8, Duration::from_secs(60), dir.path()).unwrap();
        assert_eq!(b.len(), 1);

        let memory = FailOpenQueue::new(8, Duration::from_secs(60));
        memory.admit(request("x"), 500, None).unwrap();
        assert!(!memory.abandon().kept);
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
