//! The ledger's own signing key as the key registry (`signing_keys`) holds it.
//!
//! A key that is revoked, or outside its validity window, must sign nothing: canonical ingest
//! quarantines what it signed (`KEY_REVOKED`, `KEY_OUTSIDE_WINDOW`), so the money those batches
//! moved would have evidence that can never be chained. So every batch checks the standing before
//! it signs, and a batch the key may not sign fails (`SIGNING_UNAVAILABLE`: no effect without
//! evidence) until the ledger runs with a new key.
//!
//! The standing is read from the registry at start (a ledger whose key is already revoked does
//! not start) and every second after that ([`watch`]), so a revocation or a closed window
//! through any replica's control listener takes effect here within about a second.

use crate::store::Store;
use chrono::{DateTime, Utc};
use spendguard_evidence::KeyRecord;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{error, warn};

/// How often the registry row is read again.
pub const KEY_STANDING_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A key's validity in the registry (the part of its row that can change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyWindow {
    /// Start of validity.
    pub valid_from: DateTime<Utc>,
    /// End of validity (exclusive); `None` is open-ended.
    pub valid_until: Option<DateTime<Utc>>,
    /// Revocation: nothing signed from then on is valid.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The standing of the key this ledger signs with: its registry record, judged by the same
/// rule verification applies ([`KeyRecord::refusal_at`]).
#[derive(Debug)]
pub struct KeyStanding {
    /// The record's key id, which never changes (read on every batch that writes keys).
    key_id: String,
    record: RwLock<KeyRecord>,
}

impl KeyStanding {
    /// The standing of `record` (its window as the registry holds it).
    pub fn new(record: KeyRecord) -> Self {
        Self {
            key_id: record.key_id.clone(),
            record: RwLock::new(record),
        }
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Records the registry's current window.
    pub fn set(&self, window: KeyWindow) {
        if let Ok(mut record) = self.record.write() {
            record.valid_from = window.valid_from;
            record.valid_until = window.valid_until;
            record.revoked_at = window.revoked_at;
        }
    }

    /// Whether the key may sign at `at`.
    ///
    /// # Errors
    /// Why not: revoked, or outside its window (the message names the key and the instant).
    pub fn check(&self, at: DateTime<Utc>) -> Result<(), String> {
        let record = self
            .record
            .read()
            .map_err(|_| "key standing poisoned".to_owned())?;
        match record.refusal_at(at) {
            None => Ok(()),
            Some(why) => Err(format!(
                "{why}: the ledger signs nothing more with it; run it with a new key"
            )),
        }
    }
}

/// Reads the key's registry row every [`KEY_STANDING_REFRESH_INTERVAL`] into `standing`. A failed
/// read keeps the last row (the database being away fails every write anyway).
pub async fn watch(store: Store, standing: Arc<KeyStanding>) {
    let key_id = standing.key_id();
    loop {
        tokio::time::sleep(KEY_STANDING_REFRESH_INTERVAL).await;
        match store.signing_key_window(key_id).await {
            Ok(Some(window)) => {
                standing.set(window);
                if let Err(why) = standing.check(Utc::now()) {
                    error!(why, "writes fail until the ledger runs with a new key");
                }
            }
            Ok(None) => warn!(key_id, "the ledger's signing key is not in the registry"),
            Err(e) => warn!(error = %e, "reading the signing key's registry row failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default()
    }

    #[test]
    fn a_key_signs_only_inside_its_window_and_before_its_revocation() {
        use spendguard_evidence::Signer as _;
        let spendguard_evidence::Signing::Enabled(signer) =
            spendguard_testkit::signing::signing_with_seed([1; 32], "p")
        else {
            panic!("a signer");
        };
        let record = signer.key_record(at(0), None).unwrap();
        let key_id = record.key_id.clone();
        let standing = KeyStanding::new(record);
        assert!(standing.check(at(0)).is_ok());
        assert!(standing.check(at(-1)).is_err(), "before its start");
        standing.set(KeyWindow {
            valid_from: at(0),
            valid_until: Some(at(100)),
            revoked_at: None,
        });
        assert!(standing.check(at(99)).is_ok());
        let closed = standing.check(at(100)).unwrap_err();
        assert!(
            closed.contains(&format!("key {key_id} is valid")),
            "{closed}"
        );
        standing.set(KeyWindow {
            valid_from: at(0),
            valid_until: None,
            revoked_at: Some(at(50)),
        });
        assert!(standing.check(at(49)).is_ok());
        let revoked = standing.check(at(50)).unwrap_err();
        assert!(
            revoked.contains(&format!("key {key_id} was revoked at")),
            "{revoked}"
        );
    }
}
