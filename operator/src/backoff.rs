//! Per-object retry backoff for failed reconciles: 1 s, 2 s, 4 s … capped at 5 min, reset by
//! the next success. A ledger outage then costs each object a handful of calls per minute
//! instead of one every few seconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First retry delay.
const DELAY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay: a fixed failure is noticed within this long.
const DELAY_MAX: Duration = Duration::from_secs(300);
/// Bound on tracked objects. Past it the table restarts, so some objects retry sooner than
/// their backoff says; nothing is lost (deleted objects that failed are never removed otherwise).
const OBJECTS_MAX: usize = 10_000;

/// Consecutive failures per object key (`kind/namespace/name`).
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure of `key` and returns how long to wait before retrying it.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= OBJECTS_MAX && !failures.contains_key(key) {
            failures.clear();
        }
        let count = failures.entry(key.to_owned()).or_insert(0);
        *count = count.saturating_add(1);
        let exponent = count.saturating_sub(1).min(16);
        DELAY_MIN.saturating_mul(1 << exponent).min(DELAY_MAX)
    }

    /// Forgets `key`'s failures after a success.
    pub fn succeeded(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: delays double per failure up to the cap and restart after a success.
    #[test]
    fn doubles_caps_and_resets() {
        let backoff = Backoff::default();
        let delays: Vec<u64> = (0..11)
            .map(|_| backoff.failed("Budget/a/b").as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff.failed("Budget/a/other").as_secs(), 1, "per object");
        backoff.succeeded("Budget/a/b");
        assert_eq!(backoff.failed("Budget/a/b").as_secs(), 1);
    }

    // Goal: the table stays bounded. Method: fail more distinct objects than the bound.
    #[test]
    fn tracks_a_bounded_number_of_objects() {
        let backoff = Backoff::default();
        for i in 0..=OBJECTS_MAX {
            backoff.failed(&format!("Budget/ns/{i}"));
        }
        assert!(backoff.failures.lock().unwrap().len() <= OBJECTS_MAX);
    }
}
