//! Small synchronisation helpers shared by the sidecar's in-memory tables and queues.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also after a panic in another holder: the tables and queues it guards hold
/// plain data that a panic cannot leave half-updated in a way worse than failing every later
/// request, so the sidecar keeps serving.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Shards of a [`Sharded`] table.
const SHARDS: usize = 16;

/// A table keyed by call id, split into shards with a lock each. Growing a hash table rehashes
/// and moves every entry while its lock is held, and on busy cores the holder can be preempted
/// meanwhile: with one table, every decision of the sidecar waited (stalls of 15–40 ms at 1,000
/// calls/s, docs/benchmarks.md). Split, a growth moves a sixteenth of the calls and holds up
/// only the calls of its shard.
pub(crate) struct Sharded<V> {
    shards: Box<[Mutex<HashMap<String, V>>]>,
}

impl<V> Sharded<V> {
    /// A table with room for `capacity` entries before any shard grows.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_capacity(capacity.div_ceil(SHARDS))))
                .collect(),
        }
    }

    /// The shard that holds `key`, locked.
    pub(crate) fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, V>> {
        lock(&self.shards[shard_of(key)])
    }

    /// Keeps the entries for which `keep` is true, one shard at a time.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        for shard in &self.shards {
            lock(shard).retain(|_, value| keep(value));
        }
    }

    /// How many entries `matches` is true for.
    pub(crate) fn count(&self, matches: impl Fn(&V) -> bool) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).values().filter(|v| matches(v)).count())
            .sum()
    }
}

/// FNV-1a of the key, finished with MurmurHash3's 64-bit mix so that every bit of every byte
/// reaches the shard (FNV-1a's low bits depend only on the bytes' low bits, so `'1'`, `'A'` and
/// `'a'` would share a shard; its high bits barely depend on the last bytes). Cheap, and stable
/// within the process. Each shard's own table keeps the standard library's keyed hash, so a
/// caller choosing call ids can at worst crowd one shard.
fn shard_of(key: &str) -> usize {
    let mut hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    // The remainder is below SHARDS, so it fits.
    usize::try_from(hash % SHARDS as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_lives_in_one_shard_and_keys_spread_over_all_of_them() {
        let table: Sharded<u32> = Sharded::with_capacity(64);
        for i in 0..1_000_u32 {
            table
                .shard(&format!("call-{i}"))
                .insert(format!("call-{i}"), i);
        }
        assert_eq!(table.shard("call-7").get("call-7"), Some(&7));
        assert_eq!(table.count(|_| true), 1_000);
        let used = table.shards.iter().filter(|s| !lock(s).is_empty()).count();
        assert_eq!(used, SHARDS);
        // Keys that differ only in a byte's high bits need not share a shard.
        let shards: std::collections::HashSet<usize> =
            ["call-1", "call-A", "call-a", "call-Q", "call-q"]
                .iter()
                .map(|k| shard_of(k))
                .collect();
        assert!(shards.len() > 1, "{shards:?}");
        table.retain(|v| v % 2 == 0);
        assert_eq!(table.count(|_| true), 500);
        assert_eq!(table.count(|v| v % 2 == 1), 0);
        assert_eq!(table.shard("call-7").get("call-7"), None);
    }
}
