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
//! as fast as calls are refused. Past the bound a STOP is not queued but counted in its reason's
//! summary record (`decision.stops_unpublished`), whose id is chosen at its first STOP: those
//! STOPs are explicitly marked as not published one by one. The next request carries each
//! summary; STOPs counted while it is in flight start a summary of their own.
//!
//! With a spool directory, every record queued and every summary's count is journaled
//! (`stop-records.journal`, a keyed journal of `crate::journal`) before the STOP is answered, and
//! marked done once the ledger has it: a sidecar restarted after a kill -9 or an OOM kill, or
//! after a shutdown whose drain deadline passed, publishes what its predecessor left. Without one,
//! what is queued when the process dies is lost; SIGTERM sends it first (within the evidence
//! drain deadline) and logs what is left at ERROR.

use crate::journal::{Journal, JournalError};
use crate::metrics::gauge_value;
use crate::sync::lock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message as _;
use spendguard_core::plan::STOP_RECORDS_MAX;
use spendguard_proto::ledger::v1 as pb;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use tokio::sync::Notify;
use uuid::Uuid;

/// Default bound of the queue (records).
pub const STOP_EVIDENCE_QUEUE_DEFAULT: usize = 4_096;

/// Most bytes of records one request carries. The ledger refuses a message over its limit (64 KiB
/// by default) before reading it: 256 records of long model names and details would pass that.
/// Half the default leaves room for the envelope; a ledger configured lower still answers
/// `REQUEST_TOO_LARGE`, and the batch is then sent one record at a time.
pub const STOP_BATCH_BYTES_MAX: usize = 32 * 1024;

/// The journal's file name inside the spool directory (whose lock the fail-open spool holds).
pub const STOP_JOURNAL_FILE: &str = "stop-records.journal";

#[derive(Debug, Default)]
struct Inner {
    /// Records a previous process left under another envelope (another bundle, pricing or
    /// scope): sent as they were decided, a request per group, before anything else.
    foreign: VecDeque<pb::RecordStopsRequest>,
    queue: VecDeque<pb::StopRecord>,
    /// Per reason, the summary counting the STOPs that found the queue full, not taken for
    /// sending yet.
    overflow: BTreeMap<String, pb::StopRecord>,
    /// Summaries taken from `overflow` that the ledger has not taken yet, by reason: sent again
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
    journal: Option<Journal>,
    /// What this process's RecordStops requests say besides their records (tenant, scope,
    /// pricing, bundle): journaled with each record, so a restart sends it as it was decided.
    envelope: pb::RecordStopsRequest,
}

/// What [`StopEvidence::abandon`] let go of at shutdown.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Abandoned {
    /// Queued records never sent.
    pub records: usize,
    /// STOPs counted past the bound and never summarised to the ledger, by reason.
    pub overflow: BTreeMap<String, u64>,
    /// Whether they stay in the journal, for the next start to publish.
    pub journaled: bool,
}

impl Abandoned {
    /// Whether nothing was left.
    pub fn is_empty(&self) -> bool {
        self.records == 0 && self.overflow.is_empty()
    }
}

impl StopEvidence {
    /// A queue holding at most `capacity` records (at least 1), in memory only.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            wake: Notify::new(),
            metrics: StopMetrics::default(),
            journal: None,
            envelope: pb::RecordStopsRequest::default(),
        }
    }

    /// A queue journaled in `spool` (the pod's spool directory, whose lock this process holds),
    /// holding first what a previous process of the pod journaled and did not publish (past the
    /// bound if need be: those STOPs were answered already). `envelope`: what this process's
    /// requests carry besides their records; a record left under another one is sent under its
    /// own.
    ///
    /// # Errors
    /// The journal cannot be read or written.
    pub fn with_journal(
        capacity: usize,
        spool: &Path,
        envelope: pb::RecordStopsRequest,
    ) -> Result<Self, JournalError> {
        let (journal, left) = Journal::open(spool, STOP_JOURNAL_FILE, |body| {
            decode(body).map(|(_, record)| record.record_id)
        })?;
        let mut left: Vec<(pb::RecordStopsRequest, pb::StopRecord)> = left
            .into_values()
            .filter_map(|entry| decode(&entry.body))
            .collect();
        left.sort_by(|(_, a), (_, b)| {
            (a.first_decided_at_unix_ms, &a.record_id)
                .cmp(&(b.first_decided_at_unix_ms, &b.record_id))
        });
        if !left.is_empty() {
            tracing::info!(
                records = left.len(),
                "publishing the STOP records a previous sidecar of this pod left"
            );
        }
        let mut inner = Inner::default();
        for (decided_under, record) in left {
            if decided_under == envelope {
                inner.queue.push_back(record);
                continue;
            }
            // Into its envelope's newest group while that has room, so each envelope's records
            // go out in the order they were decided.
            let size = size_in_request(&record);
            match inner
                .foreign
                .iter_mut()
                .rev()
                .find(|group| same_envelope(group, &decided_under))
                .filter(|group| {
                    group.stops.len() < STOP_RECORDS_MAX
                        && group.encoded_len() + size <= STOP_BATCH_BYTES_MAX
                }) {
                Some(group) => group.stops.push(record),
                None => inner.foreign.push_back(pb::RecordStopsRequest {
                    stops: vec![record],
                    ..decided_under
                }),
            }
        }
        let evidence = Self {
            journal: Some(journal),
            envelope,
            ..Self::new(capacity)
        };
        evidence.metrics.queued.set(gauge_value(inner.queue.len()));
        *lock(&evidence.inner) = inner;
        Ok(evidence)
    }

    /// The oldest group of records a previous process left under another envelope, as the
    /// request that sends it. It stays first until [`Self::foreign_settled`],
    /// [`Self::split_first_foreign`] or [`Self::rotate_foreign`].
    pub fn first_foreign(&self) -> Option<pb::RecordStopsRequest> {
        lock(&self.inner).foreign.front().cloned()
    }

    /// The ledger took (`published`) or refused for good the first foreign group: it is no
    /// longer queued or journaled.
    pub fn foreign_settled(&self, published: bool) {
        let Some(group) = lock(&self.inner).foreign.pop_front() else {
            return;
        };
        let count = group.stops.len() as u64;
        if published {
            self.metrics.published.inc_by(count);
        } else {
            self.metrics.dropped.inc_by(count);
        }
        for record in &group.stops {
            self.journal_done(&record.record_id);
        }
    }

    /// Replaces the first foreign group by one group per record, in order (one record the ledger
    /// refuses then holds back no other).
    pub fn split_first_foreign(&self) {
        let mut inner = lock(&self.inner);
        let Some(mut group) = inner.foreign.pop_front() else {
            return;
        };
        for record in std::mem::take(&mut group.stops).into_iter().rev() {
            inner.foreign.push_front(pb::RecordStopsRequest {
                stops: vec![record],
                ..group.clone()
            });
        }
    }

    /// The ledger did not answer for the first foreign group: it goes behind the others.
    pub fn rotate_foreign(&self) {
        let mut inner = lock(&self.inner);
        if let Some(group) = inner.foreign.pop_front() {
            inner.foreign.push_back(group);
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

    /// Queues the record of a STOP that is about to be answered (journaled first). Past the
    /// bound, counts it in its reason's summary instead and returns false: no record will carry
    /// its id.
    pub fn push(&self, record: pb::StopRecord) -> bool {
        let mut inner = lock(&self.inner);
        let queued = inner.queue.len() < self.capacity;
        if queued {
            self.journal_put(&record);
            inner.queue.push_back(record);
            self.metrics.queued.set(gauge_value(inner.queue.len()));
        } else {
            self.metrics.unpublished.inc();
            let summary = count(&mut inner.overflow, &record, self.capacity);
            self.journal_put(summary);
        }
        drop(inner);
        self.wake.notify_one();
        queued
    }

    /// Counts, in its reason's summary, a call's record the ledger refused for good, so that the
    /// STOP is still published, as part of a count.
    pub fn unpublish(&self, record: pb::StopRecord) {
        self.metrics.unpublished.inc();
        let mut inner = lock(&self.inner);
        let summary = count(&mut inner.overflow, &record, self.capacity);
        // The count first: a kill between the two counts the STOP twice rather than not at all.
        self.journal_put(summary);
        self.journal_done(&record.record_id);
    }

    /// Takes up to `max` records, and no more than [`STOP_BATCH_BYTES_MAX`] of them but at least
    /// one, to send: the summaries of STOPs counted past the bound first (one per reason; a new
    /// one only once the ledger took the previous), then the oldest queued. Records not
    /// confirmed through the returned guard go back when it is dropped, so a send cancelled at
    /// any point loses nothing.
    pub fn take(&self, max: usize) -> InFlight<'_> {
        let mut inner = lock(&self.inner);
        let Inner {
            queue,
            overflow,
            summaries,
            ..
        } = &mut *inner;
        let ready: Vec<String> = overflow
            .keys()
            .filter(|reason| !summaries.contains_key(*reason))
            .cloned()
            .collect();
        for reason in ready {
            if let Some(summary) = overflow.remove(&reason) {
                summaries.insert(reason, summary);
            }
        }
        let mut records: VecDeque<pb::StopRecord> = VecDeque::new();
        let mut bytes = 0;
        let mut fits = |record: &pb::StopRecord, records: &VecDeque<pb::StopRecord>| {
            let size = size_in_request(record);
            let fits =
                records.len() < max && (records.is_empty() || bytes + size <= STOP_BATCH_BYTES_MAX);
            if fits {
                bytes += size;
            }
            fits
        };
        let reasons: Vec<String> = summaries.keys().cloned().collect();
        for reason in reasons {
            if summaries.get(&reason).is_some_and(|s| fits(s, &records))
                && let Some(summary) = summaries.remove(&reason)
            {
                records.push_back(summary);
            }
        }
        while queue.front().is_some_and(|r| fits(r, &records)) {
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
    /// hold more than the bound: these were admitted already). A summary goes back to its reason,
    /// or to the queue when its reason holds another (one a previous process left).
    fn put_back(&self, records: impl DoubleEndedIterator<Item = pb::StopRecord>) {
        let mut inner = lock(&self.inner);
        for record in records.rev() {
            if record.call_id.is_empty() && !inner.summaries.contains_key(&record.reason) {
                inner.summaries.insert(record.reason.clone(), record);
            } else {
                inner.queue.push_front(record);
            }
        }
        self.metrics.queued.set(gauge_value(inner.queue.len()));
    }

    /// A summary the ledger refused for good: counted, and no longer journaled.
    pub fn dropped(&self, record: &pb::StopRecord) {
        self.metrics.dropped.inc();
        self.journal_done(&record.record_id);
    }

    /// Whether nothing waits: no record, no count.
    pub fn is_empty(&self) -> bool {
        let inner = lock(&self.inner);
        inner.queue.is_empty()
            && inner.overflow.is_empty()
            && inner.summaries.is_empty()
            && inner.foreign.is_empty()
    }

    /// Records queued.
    pub fn len(&self) -> usize {
        lock(&self.inner).queue.len()
    }

    /// Resolves when a record was queued.
    pub async fn notified(&self) {
        self.wake.notified().await;
    }

    /// Empties the queue at shutdown, returning what was never sent (it stays journaled).
    pub fn abandon(&self) -> Abandoned {
        let mut inner = lock(&self.inner);
        let foreign: usize = inner.foreign.drain(..).map(|group| group.stops.len()).sum();
        let records = inner.queue.len() + foreign;
        inner.queue.clear();
        self.metrics.queued.set(0);
        let mut overflow: BTreeMap<String, u64> = BTreeMap::new();
        let summaries = std::mem::take(&mut inner.overflow)
            .into_values()
            .chain(std::mem::take(&mut inner.summaries).into_values());
        for summary in summaries {
            let counted = overflow.entry(summary.reason).or_default();
            *counted = counted.saturating_add(summary.count);
        }
        Abandoned {
            records,
            overflow,
            journaled: self.journal.is_some(),
        }
    }

    fn journal_put(&self, record: &pb::StopRecord) {
        let Some(journal) = &self.journal else {
            return;
        };
        let entry = pb::RecordStopsRequest {
            stops: vec![record.clone()],
            ..self.envelope.clone()
        };
        if let Err(e) = journal.put(&record.record_id, &entry.encode_to_vec()) {
            tracing::warn!(code = e.code(), error = %e, reason = %record.reason,
                           "could not journal a STOP record: a kill -9 before it is published loses it");
        }
    }

    fn journal_done(&self, record_id: &str) {
        if let Some(journal) = &self.journal
            && let Err(e) = journal.done(record_id)
        {
            tracing::warn!(code = e.code(), error = %e, %record_id,
                           "could not mark a STOP record published in the journal; a restart sends it again (answered as a replay)");
        }
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
        for record in std::mem::take(&mut self.records) {
            self.evidence.journal_done(&record.record_id);
        }
        self.evidence.metrics.published.inc_by(count as u64);
    }

    /// The ledger wrote the oldest record.
    pub fn published_first(&mut self) {
        if let Some(record) = self.records.pop_front() {
            self.evidence.journal_done(&record.record_id);
            self.evidence.metrics.published.inc();
        }
    }

    /// The ledger refused the oldest record for good: returned, so the caller can count it
    /// ([`StopEvidence::unpublish`]) or drop it ([`StopEvidence::dropped`]).
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

/// A journal entry: the envelope its record was decided under, and the record.
fn decode(body: &[u8]) -> Option<(pb::RecordStopsRequest, pb::StopRecord)> {
    let mut entry = pb::RecordStopsRequest::decode(body).ok()?;
    let record = entry.stops.pop().filter(|r| !r.record_id.is_empty())?;
    entry.stops.is_empty().then_some((entry, record))
}

/// The bytes `record` adds to a RecordStops request: its own, and as a length-delimited field a
/// tag and a length of up to 3 bytes.
fn size_in_request(record: &pb::StopRecord) -> usize {
    record.encoded_len() + 4
}

/// Whether `group` was decided under `envelope` (which holds no records).
fn same_envelope(group: &pb::RecordStopsRequest, envelope: &pb::RecordStopsRequest) -> bool {
    group.tenant_id == envelope.tenant_id
        && group.fencing_scope_id == envelope.fencing_scope_id
        && group.pricing == envelope.pricing
        && group.contract_sha256_hex == envelope.contract_sha256_hex
}

/// Adds one STOP to its reason's summary (a new one, with an id of its own, at the first) and
/// returns the summary.
fn count<'a>(
    overflow: &'a mut BTreeMap<String, pb::StopRecord>,
    record: &pb::StopRecord,
    capacity: usize,
) -> &'a pb::StopRecord {
    let at = record.first_decided_at_unix_ms;
    let summary = overflow
        .entry(record.reason.clone())
        .and_modify(|s| {
            s.count = s.count.saturating_add(1);
            s.first_decided_at_unix_ms = s.first_decided_at_unix_ms.min(at);
            s.last_decided_at_unix_ms = s.last_decided_at_unix_ms.max(at);
        })
        .or_insert_with(|| pb::StopRecord {
            record_id: Uuid::new_v4().to_string(),
            call_id: String::new(),
            detail: String::new(),
            reason: record.reason.clone(),
            budget_id: String::new(),
            worst_case_nano_usd: 0,
            first_decided_at_unix_ms: at,
            last_decided_at_unix_ms: at,
            count: 1,
            fencing_epoch: 0,
            context: None,
        });
    summary.detail = format!(
        "{} STOP decisions ({}) were not published one by one: the sidecar's evidence queue ({capacity} records) was full",
        summary.count, summary.reason
    );
    summary
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

    fn envelope(bundle: &str) -> pb::RecordStopsRequest {
        pb::RecordStopsRequest {
            tenant_id: "t".into(),
            fencing_scope_id: "t/agent".into(),
            contract_sha256_hex: bundle.into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_left_under_another_bundle_are_sent_as_they_were_decided() {
        let dir = tempfile::tempdir().unwrap();
        let evidence = StopEvidence::with_journal(10, dir.path(), envelope("bundle-a")).unwrap();
        evidence.push(stop("a", "MODEL_DENIED", 1));
        evidence.push(stop("b", "MODEL_DENIED", 2));
        drop(evidence);

        // Restarted on a new bundle: its own records go in its queue, the old ones apart.
        let evidence = StopEvidence::with_journal(10, dir.path(), envelope("bundle-b")).unwrap();
        assert_eq!(evidence.len(), 0);
        assert!(!evidence.is_empty());
        let group = evidence.first_foreign().unwrap();
        assert_eq!(group.contract_sha256_hex, "bundle-a");
        let calls: Vec<&str> = group.stops.iter().map(|r| r.call_id.as_str()).collect();
        assert_eq!(calls, ["a", "b"]);
        evidence.rotate_foreign(); // the ledger did not answer
        assert_eq!(evidence.first_foreign(), Some(group));
        evidence.split_first_foreign(); // the ledger refused the request: each alone
        let first = evidence.first_foreign().unwrap();
        assert_eq!(first.stops.len(), 1);
        assert_eq!(first.stops[0].call_id, "a");
        assert_eq!(first.contract_sha256_hex, "bundle-a");
        evidence.foreign_settled(false); // "a" refused for good
        assert_eq!(evidence.first_foreign().unwrap().stops[0].call_id, "b");
        evidence.foreign_settled(true);
        assert!(evidence.is_empty());
        evidence.push(stop("c", "MODEL_DENIED", 3));
        drop(evidence);

        let evidence = StopEvidence::with_journal(10, dir.path(), envelope("bundle-b")).unwrap();
        assert!(
            evidence.first_foreign().is_none(),
            "settled: no longer journaled"
        );
        let batch = evidence.take(10);
        assert_eq!(
            batch
                .records()
                .map(|r| r.call_id.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
    }

    #[test]
    fn a_batch_stays_within_the_byte_bound_and_the_rest_waits_for_the_next() {
        // 256 STOPs of a long model name and detail are over 64 KiB, the ledger's message limit.
        let evidence = StopEvidence::new(1_000);
        for n in 0..STOP_RECORDS_MAX {
            evidence.push(pb::StopRecord {
                detail: "d".repeat(512),
                ..stop(&format!("call-{n}"), "MODEL_DENIED", 1)
            });
        }
        let taken: Vec<pb::StopRecord> = {
            let mut batch = evidence.take(STOP_RECORDS_MAX);
            let taken = batch.records().cloned().collect();
            batch.published();
            taken
        };
        let request = pb::RecordStopsRequest {
            stops: taken.clone(),
            ..envelope("bundle")
        };
        assert!(
            request.encoded_len() <= STOP_BATCH_BYTES_MAX + 100,
            "{}",
            request.encoded_len()
        );
        assert!(
            taken.len() > 1 && taken.len() < STOP_RECORDS_MAX,
            "{}",
            taken.len()
        );
        assert_eq!(taken[0].call_id, "call-0", "oldest first");
        assert_eq!(evidence.len(), STOP_RECORDS_MAX - taken.len());
        let next = evidence.take(STOP_RECORDS_MAX);
        assert_eq!(
            next.first().map(|r| r.call_id),
            Some(format!("call-{}", taken.len())),
            "the rest waits, in order"
        );
        // A record larger than the bound alone is still taken, alone (the ledger judges it).
        let big = StopEvidence::new(10);
        big.push(pb::StopRecord {
            detail: "d".repeat(STOP_BATCH_BYTES_MAX),
            ..stop("big", "MODEL_DENIED", 1)
        });
        big.push(stop("small", "MODEL_DENIED", 2));
        assert_eq!(big.take(10).len(), 1);
    }

    #[test]
    fn records_left_under_another_bundle_are_grouped_within_the_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let evidence = StopEvidence::with_journal(400, dir.path(), envelope("bundle-a")).unwrap();
        // Sizes vary (50 to ~1,000 bytes), so at a group's end a small record could fit where
        // the large one before it did not.
        for n in 0..300 {
            evidence.push(pb::StopRecord {
                detail: "d".repeat(50 + (n * 379) % 950),
                ..stop(
                    &format!("call-{n:03}"),
                    "MODEL_DENIED",
                    i64::try_from(n).unwrap(),
                )
            });
        }
        drop(evidence);
        let evidence = StopEvidence::with_journal(400, dir.path(), envelope("bundle-b")).unwrap();
        let mut sent = Vec::new();
        while let Some(group) = evidence.first_foreign() {
            assert!(
                group.encoded_len() <= STOP_BATCH_BYTES_MAX,
                "{}",
                group.encoded_len()
            );
            sent.extend(group.stops.iter().map(|r| r.call_id.clone()));
            evidence.foreign_settled(true);
        }
        let expected: Vec<String> = (0..300).map(|n| format!("call-{n:03}")).collect();
        assert_eq!(sent, expected, "every record, in order");
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
    fn a_restart_on_the_journal_publishes_what_its_predecessor_did_not() {
        let dir = tempfile::tempdir().unwrap();
        let evidence = StopEvidence::with_journal(2, dir.path(), envelope("bundle-a")).unwrap();
        assert!(evidence.is_empty());
        evidence.push(stop("a", "MODEL_DENIED", 1));
        evidence.push(stop("b", "MODEL_DENIED", 2));
        evidence.push(stop("c", "MODEL_DENIED", 3)); // counted
        evidence.push(stop("d", "MODEL_DENIED", 4)); // counted
        let mut batch = evidence.take(10);
        assert_eq!(batch.len(), 3);
        let published_summary = batch.first().unwrap();
        assert_eq!(published_summary.count, 2);
        batch.published_first(); // the summary; "a" and "b" go back
        drop(batch);
        evidence.push(stop("e", "PRICING_STALE", 5)); // counted in a summary of its own
        drop(evidence); // as a kill -9 would: nothing more is written

        let evidence = StopEvidence::with_journal(2, dir.path(), envelope("bundle-a")).unwrap();
        assert_eq!(
            evidence.len(),
            3,
            "restored past the bound: they were answered already"
        );
        let mut batch = evidence.take(10);
        assert_eq!(
            calls(&batch),
            [
                ("a", "MODEL_DENIED", 1),
                ("b", "MODEL_DENIED", 1),
                ("", "PRICING_STALE", 1)
            ]
            .map(|(c, r, n)| (c.to_owned(), r.to_owned(), n))
        );
        assert!(
            batch
                .records()
                .all(|r| r.record_id != published_summary.record_id),
            "the published summary is not sent again"
        );
        assert!(
            batch
                .records()
                .nth(2)
                .unwrap()
                .detail
                .contains("1 STOP decisions")
        );
        batch.published();
        drop(batch);
        drop(evidence);
        let evidence = StopEvidence::with_journal(2, dir.path(), envelope("bundle-a")).unwrap();
        assert!(evidence.is_empty(), "everything published is done");
    }

    #[test]
    fn a_record_refused_for_good_is_journaled_as_its_count() {
        let dir = tempfile::tempdir().unwrap();
        let evidence = StopEvidence::with_journal(10, dir.path(), envelope("bundle-a")).unwrap();
        evidence.push(stop("a", "MODEL_DENIED", 1));
        let mut batch = evidence.take(10);
        let refused = batch.refused_first().unwrap();
        drop(batch);
        evidence.unpublish(refused.clone());
        drop(evidence);
        let evidence = StopEvidence::with_journal(10, dir.path(), envelope("bundle-a")).unwrap();
        let batch = evidence.take(10);
        let left: Vec<&pb::StopRecord> = batch.records().collect();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].call_id.as_str(), left[0].count), ("", 1));
        assert_ne!(left[0].record_id, refused.record_id);
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
