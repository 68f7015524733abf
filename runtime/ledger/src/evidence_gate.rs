//! The durability policy for evidence that has not reached the canonical chain (S22: "canonical
//! ingest unavailable follows configured durability policy and never silently drops audit
//! evidence").
//!
//! Evidence is never dropped: every event is in the outbox, in the transaction of its mutation,
//! before the RPC answers. What is configurable is whether new spend may go on while the
//! forwarder (canonical ingest) is down or behind:
//! - unbounded (`SPENDGUARD_LEDGER_MAX_EVIDENCE_LAG_SECONDS=0`, the default): decisions go on;
//!   the chain lags and catches up (`spendguard_ledger_evidence_oldest_unforwarded_age_seconds`
//!   shows by how much);
//! - bounded (N > 0): once the oldest unforwarded event is older than N seconds, ReserveSet and
//!   CreateApproval are refused with `EVIDENCE_BACKLOG` (fail closed) until it is forwarded.
//!   Commits, releases, sweeps, leases and evidence records (fail-open, STOP) go on: they end
//!   exposure or record what already happened. So do retries of a reservation or approval that
//!   exists already: they are answered as the replays they are (or as conflicts), and write
//!   nothing.
//!
//! The age is read from the database every second (its clock, the events' `occurred_at`), so a
//! backlog is seen, and cleared, within a second. A bounded gate that cannot read the age fails
//! closed: once its reads have failed for longer than the bound, it refuses as if the backlog
//! were that old (the writes may still succeed while that query fails, and the backlog grows
//! unseen).

use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use tracing::warn;

/// How often the oldest unforwarded event's age is read.
pub const EVIDENCE_LAG_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Nothing waits (or the age is not known yet).
const NOTHING_WAITING: i64 = -1;

/// The age reads are not failing.
const READING: i64 = -1;

/// Admits or refuses new spend by the age of the oldest unforwarded audit event.
#[derive(Debug)]
pub struct EvidenceGate {
    limit_ms: Option<i64>,
    oldest_age_ms: AtomicI64,
    /// Since when the age reads fail (ms after `started`), or [`READING`].
    failing_since_ms: AtomicI64,
    started: Instant,
}

impl EvidenceGate {
    /// A gate refusing new spend past `max_lag_seconds` (0: never).
    pub fn new(max_lag_seconds: u64) -> Self {
        let limit_ms = (max_lag_seconds > 0)
            .then(|| i64::try_from(max_lag_seconds.saturating_mul(1_000)).unwrap_or(i64::MAX));
        Self {
            limit_ms,
            oldest_age_ms: AtomicI64::new(NOTHING_WAITING),
            failing_since_ms: AtomicI64::new(READING),
            started: Instant::now(),
        }
    }

    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// Whether new spend may be reserved now.
    ///
    /// # Errors
    /// [`Error::EvidenceBacklog`] when the oldest unforwarded event is older than the bound.
    pub fn admit(&self) -> Result<(), Error> {
        let Some(limit_ms) = self.limit_ms else {
            return Ok(());
        };
        let mut age_ms = self.oldest_age_ms.load(Ordering::Relaxed);
        let failing_since = self.failing_since_ms.load(Ordering::Relaxed);
        if failing_since != READING {
            // Unknown for that long: at least that old, as far as this gate can tell.
            let unread_for = self.elapsed_ms().saturating_sub(failing_since);
            age_ms = age_ms.max(0).saturating_add(unread_for);
        }
        if age_ms > limit_ms {
            Err(Error::EvidenceBacklog { age_ms, limit_ms })
        } else {
            Ok(())
        }
    }

    /// Records the age of the oldest unforwarded event (`None`: nothing waits).
    pub fn observe(&self, oldest_age_ms: Option<i64>) {
        self.oldest_age_ms
            .store(oldest_age_ms.unwrap_or(NOTHING_WAITING), Ordering::Relaxed);
        self.failing_since_ms.store(READING, Ordering::Relaxed);
    }

    /// Records that the age could not be read (the first failure of a run starts the clock).
    pub fn read_failed(&self) {
        let now = self.elapsed_ms();
        let _ = self.failing_since_ms.compare_exchange(
            READING,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Reads the oldest unforwarded event's age every second into `gate` and the gauge. A failed
/// read keeps the last value, and a bounded gate closes once the reads have failed for longer
/// than its bound ([`EvidenceGate::read_failed`]).
pub async fn watch(store: Store, gate: Arc<EvidenceGate>, metrics: Metrics) {
    loop {
        match store.oldest_unforwarded_age_ms().await {
            Ok(age_ms) => {
                gate.observe(age_ms);
                metrics
                    .evidence_oldest_unforwarded_age_seconds
                    .set(age_ms.map_or(0, |ms| ms / 1_000));
            }
            Err(e) => {
                gate.read_failed();
                warn!(error = %e, "reading the age of unforwarded audit events failed");
            }
        }
        tokio::time::sleep(EVIDENCE_LAG_REFRESH_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbounded_admits_any_backlog() {
        let gate = EvidenceGate::new(0);
        gate.observe(Some(i64::MAX));
        assert!(gate.admit().is_ok());
    }

    #[test]
    fn bounded_refuses_past_the_bound_and_admits_again_once_forwarded() {
        let gate = EvidenceGate::new(5);
        assert!(gate.admit().is_ok(), "nothing observed yet");
        gate.observe(Some(5_000));
        assert!(gate.admit().is_ok(), "at the bound");
        gate.observe(Some(5_001));
        assert!(matches!(
            gate.admit(),
            Err(Error::EvidenceBacklog {
                age_ms: 5_001,
                limit_ms: 5_000
            })
        ));
        gate.observe(None);
        assert!(gate.admit().is_ok());
    }

    #[test]
    fn a_bounded_gate_closes_once_its_reads_have_failed_past_the_bound() {
        let gate = EvidenceGate::new(1);
        gate.observe(None);
        gate.read_failed();
        assert!(gate.admit().is_ok(), "a failure just now: within the bound");
        std::thread::sleep(Duration::from_millis(1_100));
        gate.read_failed(); // a later failure does not restart the clock
        assert!(
            matches!(
                gate.admit(),
                Err(Error::EvidenceBacklog {
                    limit_ms: 1_000,
                    ..
                })
            ),
            "unread for longer than the bound"
        );
        gate.observe(None);
        assert!(gate.admit().is_ok(), "read again: open");
        let unbounded = EvidenceGate::new(0);
        unbounded.read_failed();
        assert!(unbounded.admit().is_ok());
    }
}
