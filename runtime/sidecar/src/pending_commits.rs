//! Commits the ledger could not take yet, kept in the spool so that a sidecar killed (or
//! stopped) while the ledger is away does not lose the usage of the calls it was still settling.
//!
//! ```text
//! proxied call answered ─► Commit(actual) ─ledger away─► put {call, reservation, actual, since}
//!                            │ (retried in memory)            │
//!                            └─ committed / refused ─► done   └─ next start: Commit again, by
//!                                                                reservation id, until booked
//! ```
//!
//! Only commits nobody waits on are kept (the proxy's background settlements): a decision-API
//! caller got the error and owns its retry. A commit that lands writes a done frame only when
//! it had been put, so the settlement path touches the disk only while the ledger is away, or
//! for a call admitted inside a credit whose draw has not landed when the call is answered (its
//! commit is put before it waits for the draw, under the reservation id the draw will have; the
//! next start sends it after drawing the call again). A retried commit is idempotent at the ledger (same reservation, same actual), so a commit that
//! landed just before a kill and is sent again by the next process replays.
//!
//! Entries older than [`PENDING_MAX`] are dropped (with a warning naming the call) rather than
//! retried forever; that is the same bound the running process keeps.

use crate::journal::{Journal, JournalError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use tracing::{error, warn};

/// The spool file.
pub(crate) const PENDING_COMMITS_FILE: &str = "pending-commits.journal";

/// How long a commit is offered to the ledger at most, across restarts: the ledger books a commit
/// that arrives after the reservation's TTL, so this is far longer than any TTL.
pub const PENDING_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// One commit the ledger has not taken yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCommit {
    /// The call whose usage this is (the journal's key).
    pub call_id: String,
    /// The reservation (or credit draw) the usage is committed to.
    pub reservation_id: String,
    /// The priced usage.
    pub actual_nano_usd: i64,
    /// When the commit was first kept (its first attempt failed, or it waited for its credit
    /// draw; Unix ms, wall clock): the start of [`PENDING_MAX`].
    pub since_unix_ms: i64,
}

impl PendingCommit {
    /// How much of [`PENDING_MAX`] is left at `now_unix_ms` (the bound runs from the first
    /// failure, possibly in a previous process).
    pub fn time_left(&self, now_unix_ms: i64) -> Duration {
        let elapsed = u64::try_from(now_unix_ms.saturating_sub(self.since_unix_ms)).unwrap_or(0);
        PENDING_MAX.saturating_sub(Duration::from_millis(elapsed))
    }
}

/// Pending commits by call: in memory always (the retry loop sends them by reservation id, so a
/// call the call table has forgotten still settles), and in the spool's journal when there is one.
#[derive(Debug, Default)]
pub struct PendingCommits {
    journal: Option<Journal>,
    /// Pending commits by call id (a settlement of a call never held touches no file).
    held: Mutex<HashMap<String, PendingCommit>>,
}

impl PendingCommits {
    /// Without a spool: pending commits live only in the running process.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens the journal in the spool `dir` and returns the commits a previous process left,
    /// oldest first, without those past [`PENDING_MAX`] at `now_unix_ms` (dropped here).
    ///
    /// # Errors
    /// [`JournalError::Io`] when the file cannot be read or written.
    pub fn open(dir: &Path, now_unix_ms: i64) -> Result<(Self, Vec<PendingCommit>), JournalError> {
        let (journal, left) = Journal::open(dir, PENDING_COMMITS_FILE, |body| {
            serde_json::from_slice::<PendingCommit>(body)
                .ok()
                .map(|p| p.call_id)
        })?;
        let pending = Self {
            journal: Some(journal),
            held: Mutex::new(HashMap::new()),
        };
        let mut kept = Vec::new();
        for entry in left.into_values() {
            let Ok(commit) = serde_json::from_slice::<PendingCommit>(&entry.body) else {
                continue;
            };
            crate::sync::lock(&pending.held).insert(commit.call_id.clone(), commit.clone());
            if commit.time_left(now_unix_ms).is_zero() {
                warn!(
                    call_id = commit.call_id,
                    reservation_id = commit.reservation_id,
                    actual_nano_usd = commit.actual_nano_usd,
                    "a commit left by a previous process is past its 24 h bound; its usage is not recorded"
                );
                pending.settled(&commit.call_id);
            } else {
                kept.push(commit);
            }
        }
        kept.sort_by_key(|c| c.since_unix_ms);
        Ok((pending, kept))
    }

    /// Keeps `commit`: in memory for this process's retries, and in the spool for the next
    /// process (a failed write is logged: the retries go on, a restart would lose it).
    pub fn hold(&self, commit: &PendingCommit) {
        crate::sync::lock(&self.held).insert(commit.call_id.clone(), commit.clone());
        let Some(journal) = &self.journal else {
            return;
        };
        let written = serde_json::to_vec(commit)
            .map_err(|e| e.to_string())
            .and_then(|body| {
                journal
                    .put(&commit.call_id, &body)
                    .map_err(|e| format!("{}: {e}", e.code()))
            });
        if let Err(error) = written {
            error!(
                call_id = commit.call_id,
                error,
                "a commit the ledger has not taken could not be spooled: a restart before it lands loses the call's usage"
            );
        }
    }

    /// The call's pending commit, once its first attempt failed.
    pub fn get(&self, call_id: &str) -> Option<PendingCommit> {
        crate::sync::lock(&self.held).get(call_id).cloned()
    }

    /// Whether the call has a pending commit.
    pub fn contains(&self, call_id: &str) -> bool {
        crate::sync::lock(&self.held).contains_key(call_id)
    }

    /// How many commits are pending (the next process sends those still pending at exit).
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.held).len()
    }

    /// Whether no commit is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the call's pending commit, if it had one: it landed, or will never land.
    pub fn settled(&self, call_id: &str) {
        if crate::sync::lock(&self.held).remove(call_id).is_none() {
            return;
        }
        if let Some(journal) = &self.journal
            && let Err(e) = journal.done(call_id)
        {
            warn!(call_id, code = e.code(), error = %e,
                  "a landed commit could not be marked done: the next start sends it again (it replays)");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn commit(call: &str, since: i64) -> PendingCommit {
        PendingCommit {
            call_id: call.into(),
            reservation_id: format!("r-{call}"),
            actual_nano_usd: 10_950,
            since_unix_ms: since,
        }
    }

    #[test]
    fn held_commits_survive_a_restart_until_settled_or_past_their_bound() {
        // Goal: what a process holds and never settles is handed to the next one, oldest
        // first; what it settled is not; what is past 24 h is dropped (and forgotten).
        let dir = tempfile::tempdir().unwrap();
        let day = i64::try_from(PENDING_MAX.as_millis()).unwrap();
        let now = 10 * day;
        {
            let (pending, left) = PendingCommits::open(dir.path(), now).unwrap();
            assert!(left.is_empty());
            pending.hold(&commit("b", now - 2_000));
            pending.hold(&commit("a", now - 1_000));
            assert_eq!(pending.get("a"), Some(commit("a", now - 1_000)));
            pending.hold(&commit("settled", now));
            pending.hold(&commit("old", now - day - 1));
            pending.settled("settled");
            pending.settled("never-held");
        }
        let (_, left) = PendingCommits::open(dir.path(), now).unwrap();
        assert_eq!(
            left,
            vec![commit("b", now - 2_000), commit("a", now - 1_000)]
        );
        // Reopened at an instant where "old" would still be within its bound: it was forgotten
        // (a done frame), not merely filtered out again.
        let (_, again) = PendingCommits::open(dir.path(), now - 10).unwrap();
        assert_eq!(
            again.len(),
            2,
            "the old entry was forgotten, the others kept"
        );
    }
}
