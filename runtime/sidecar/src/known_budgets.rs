//! The run budgets this process knows exist in the ledger, so a run's later calls skip their
//! UpsertBudget. Bounded: a pod serving many runs would otherwise keep every run id it ever saw.

use std::collections::HashSet;
use std::sync::Mutex;

/// How many run budgets are remembered before the set starts over. Forgetting costs one more
/// UpsertBudget per run (it repeats the definition, which the ledger accepts unchanged).
pub(crate) const KNOWN_BUDGETS_MAX: usize = 65_536;

/// A bounded set of budget ids known to exist.
#[derive(Debug)]
pub(crate) struct KnownBudgets {
    max: usize,
    known: Mutex<HashSet<String>>,
}

impl Default for KnownBudgets {
    fn default() -> Self {
        Self::with_max(KNOWN_BUDGETS_MAX)
    }
}

impl KnownBudgets {
    /// A set that remembers at most `max` ids.
    pub(crate) fn with_max(max: usize) -> Self {
        Self {
            max,
            known: Mutex::new(HashSet::new()),
        }
    }

    /// Whether `budget_id` is known to exist.
    pub(crate) fn contains(&self, budget_id: &str) -> bool {
        crate::sync::lock(&self.known).contains(budget_id)
    }

    /// Remembers that `budget_id` exists; when the set is full it starts over (no order to keep:
    /// an entry is only a saved round trip).
    pub(crate) fn insert(&self, budget_id: &str) {
        let mut known = crate::sync::lock(&self.known);
        if known.len() >= self.max && !known.contains(budget_id) {
            known.clear();
        }
        known.insert(budget_id.to_owned());
    }

    /// How many ids are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        crate::sync::lock(&self.known).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_never_holds_more_than_its_bound() {
        let known = KnownBudgets::with_max(3);
        for n in 0..10 {
            known.insert(&format!("runs/{n}"));
            assert!(known.len() <= 3, "{n}: {}", known.len());
            assert!(known.contains(&format!("runs/{n}")), "the latest is known");
        }
        assert!(!known.contains("runs/0"), "forgotten once full");
        // Re-inserting a known id does not start over.
        let before = known.len();
        known.insert("runs/9");
        assert_eq!(known.len(), before);
    }
}
