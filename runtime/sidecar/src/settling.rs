//! The settlements this sidecar has started and not finished, in start order, so a decision
//! about to refuse for lack of budget can first wait for the settlements that were already on
//! their way: an agent calling one LLM after another must not be refused because the previous
//! call's reservation was still held while its commit was in flight (the proxy settles in the
//! background, after the answer went back).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Settlements in flight.
#[derive(Debug, Default)]
pub struct Settling {
    inner: Mutex<InFlight>,
    finished: Notify,
}

#[derive(Debug, Default)]
struct InFlight {
    next: u64,
    started: BTreeSet<u64>,
}

/// One settlement in flight; finished when dropped.
#[derive(Debug)]
pub struct SettlingGuard {
    settling: Arc<Settling>,
    seq: u64,
}

impl Settling {
    /// Marks a settlement started (call before the answer goes back to the client, so the
    /// client's next call sees it).
    pub fn start(self: &Arc<Self>) -> SettlingGuard {
        let mut inner = crate::sync::lock(&self.inner);
        let seq = inner.next;
        inner.next = inner.next.wrapping_add(1);
        inner.started.insert(seq);
        SettlingGuard {
            settling: self.clone(),
            seq,
        }
    }

    /// Waits until every settlement started before this call has finished, or `timeout`
    /// passed. Settlements started meanwhile are not waited for, so a busy sidecar's refusals
    /// wait for a few commits, not for a quiet moment. Returns whether there was any to wait for.
    pub async fn wait_for_earlier(&self, timeout: Duration) -> bool {
        let before = crate::sync::lock(&self.inner).next;
        let earlier_pending = || {
            crate::sync::lock(&self.inner)
                .started
                .first()
                .is_some_and(|oldest| *oldest < before)
        };
        if !earlier_pending() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if !earlier_pending() {
                return true;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return true;
            }
        }
    }
}

impl Drop for SettlingGuard {
    fn drop(&mut self) {
        crate::sync::lock(&self.settling.inner)
            .started
            .remove(&self.seq);
        self.settling.finished.notify_waiters();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_waits_for_the_settlements_started_before_it_only() {
        let settling = Arc::new(Settling::default());
        assert!(
            !settling.wait_for_earlier(Duration::from_secs(5)).await,
            "nothing in flight: no wait"
        );
        let earlier = settling.start();
        let waiter = {
            let settling = settling.clone();
            tokio::spawn(async move { settling.wait_for_earlier(Duration::from_secs(5)).await })
        };
        tokio::task::yield_now().await;
        // A settlement started after the wait began is not waited for.
        let _later = settling.start();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "still waiting for the earlier one");
        drop(earlier);
        let waited = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("ends once the earlier settlement finished, with a later one in flight")
            .unwrap();
        assert!(waited);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded() {
        let settling = Arc::new(Settling::default());
        let _stuck = settling.start();
        let started = tokio::time::Instant::now();
        assert!(settling.wait_for_earlier(Duration::from_millis(300)).await);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
