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
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{error, warn};

/// How often the registry row is read again.
pub const KEY_STANDING_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A key's validity in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyWindow {
    /// Start of validity.
    pub valid_from: DateTime<Utc>,
    /// End of validity (exclusive); `None` is open-ended.
    pub valid_until: Option<DateTime<Utc>>,
    /// Revocation: nothing signed from then on is valid.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyWindow {
    /// Why a signature made at `at` would not verify, if it would not.
    pub fn refusal(&self, at: DateTime<Utc>) -> Option<String> {
        if let Some(revoked_at) = self.revoked_at
            && at >= revoked_at
        {
            return Some(format!("was revoked at {}", revoked_at.to_rfc3339()));
        }
        if at < self.valid_from {
            return Some(format!(
                "is valid only from {}",
                self.valid_from.to_rfc3339()
            ));
        }
        if let Some(valid_until) = self.valid_until
            && at >= valid_until
        {
            return Some(format!("was valid until {}", valid_until.to_rfc3339()));
        }
        None
    }
}

/// The standing of the key this ledger signs with.
#[derive(Debug)]
pub struct KeyStanding {
    key_id: String,
    window: RwLock<KeyWindow>,
}

impl KeyStanding {
    /// The standing of `key_id` as read from the registry.
    pub fn new(key_id: String, window: KeyWindow) -> Self {
        Self {
            key_id,
            window: RwLock::new(window),
        }
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Records the registry's current row.
    pub fn set(&self, window: KeyWindow) {
        if let Ok(mut current) = self.window.write() {
            *current = window;
        }
    }

    /// Whether the key may sign at `at`.
    ///
    /// # Errors
    /// Why not: revoked, or outside its window (the message names the key and the instant).
    pub fn check(&self, at: DateTime<Utc>) -> Result<(), String> {
        let window = self
            .window
            .read()
            .map_or_else(|poisoned| *poisoned.into_inner(), |w| *w);
        match window.refusal(at) {
            None => Ok(()),
            Some(why) => Err(format!(
                "signing key {} {why}: it signs nothing more; run the ledger with a new key",
                self.key_id
            )),
        }
    }
}

/// Reads the key's registry row every [`KEY_STANDING_REFRESH_INTERVAL`] into `standing`. A failed
/// read keeps the last row (the database being away fails every write anyway).
pub async fn watch(store: Store, standing: Arc<KeyStanding>) {
    loop {
        tokio::time::sleep(KEY_STANDING_REFRESH_INTERVAL).await;
        match store.signing_key_window(standing.key_id()).await {
            Ok(Some(window)) => {
                if let Some(why) = window.refusal(Utc::now()) {
                    error!(
                        key_id = standing.key_id(),
                        why,
                        "the ledger's signing key may not sign: writes fail until it runs with a new key"
                    );
                }
                standing.set(window);
            }
            Ok(None) => warn!(
                key_id = standing.key_id(),
                "the ledger's signing key is not in the registry"
            ),
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
        let standing = KeyStanding::new(
            "k1".into(),
            KeyWindow {
                valid_from: at(0),
                valid_until: None,
                revoked_at: None,
            },
        );
        assert!(standing.check(at(0)).is_ok());
        assert!(standing.check(at(-1)).is_err(), "before its start");
        standing.set(KeyWindow {
            valid_from: at(0),
            valid_until: Some(at(100)),
            revoked_at: None,
        });
        assert!(standing.check(at(99)).is_ok());
        let closed = standing.check(at(100)).unwrap_err();
        assert!(closed.contains("k1 was valid until"), "{closed}");
        standing.set(KeyWindow {
            valid_from: at(0),
            valid_until: None,
            revoked_at: Some(at(50)),
        });
        assert!(standing.check(at(49)).is_ok());
        let revoked = standing.check(at(50)).unwrap_err();
        assert!(revoked.contains("k1 was revoked at"), "{revoked}");
    }
}
