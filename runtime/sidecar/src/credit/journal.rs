//! The draw journal: every call admitted inside a credit is written to a file of the pod's spool
//! directory before its CONTINUE, and marked done once its draw landed (or its fail-open record
//! was queued instead). A sidecar restarted in the pod after a kill -9 draws what its predecessor
//! admitted and never drew, before it releases the predecessor's credits, so those calls keep
//! their reservation and evidence (docs/design/credits.md, failure modes).
//!
//! ```text
//! file    := frame*                                                  (crate::frames)
//! payload := 1 | worst_case: i64 | draw_len: u32 | ReserveSetRequest | RecordFailOpenRequest
//!                                                                            admitted
//!          | 2 | key (UTF-8)                                                 done
//!          | 3 | key (UTF-8)                                                 lost
//! ```
//!
//! Entries are keyed by the call id (the fail-open record's) and the credit it was admitted
//! from (`<call id>@<credit>`): a draw sent again under an idempotency key of its own
//! (`<call id>/again/<uuid>`) is admitted again under the same entry key, so a restart draws the
//! key that was sent; a client's retry of the call id on a restarted sidecar (another credit) is
//! an entry of its own. *Lost* is written before a refused draw's fail-open record is queued: a
//! restart queues that record again (the ledger answers a record it holds as a replay) instead of
//! drawing the call a second time.
//!
//! It is a keyed journal (`crate::journal`: written, not flushed; rewritten to its live entries
//! now and then): *admitted* is a put, *lost* a flag. A lost or torn entry leaves that call as it
//! was without the journal (docs/design/credits.md).

use crate::journal::{Journal, JournalError};
use prost::Message as _;
use spendguard_proto::ledger::v1 as pb;
use std::path::Path;

/// The journal's file name inside the spool directory (whose lock the fail-open spool holds).
pub const JOURNAL_FILE: &str = "credit-draws.journal";

/// A call admitted inside a credit whose draw has not landed yet.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDraw {
    /// The call's ReserveSet drawing from its credit (its idempotency key is the call id).
    pub draw: pb::ReserveSetRequest,
    /// What records the call if the draw is refused for good: its fail-open record.
    pub if_lost: pb::RecordFailOpenRequest,
    /// The call's worst case (the fail-open record's spend if it never settles).
    pub worst_case_nano_usd: i64,
}

impl PendingDraw {
    /// The call's id (its draw's idempotency key may be another: a key of its own).
    pub fn call_id(&self) -> &str {
        &self.if_lost.call_id
    }

    /// The journal's key of this admission: the call id and the credit it was admitted from (a
    /// UUID, so the last `@` splits them).
    pub fn key(&self) -> String {
        format!("{}@{}", self.call_id(), self.draw.draw_from_reservation_id)
    }
}

/// What a previous process left in the journal.
#[derive(Debug, Default, PartialEq)]
pub struct LeftOver {
    /// Admitted, not drawn: draw them.
    pub to_draw: Vec<PendingDraw>,
    /// Refused for good, their fail-open record maybe not queued: queue it.
    pub to_record: Vec<PendingDraw>,
}

/// The open journal.
#[derive(Debug)]
pub struct DrawJournal {
    journal: Journal,
}

impl DrawJournal {
    /// Opens (creating it if absent) the journal in `dir` and returns what a previous process
    /// left in it. Those entries stay in the journal until [`Self::done`].
    ///
    /// # Errors
    /// [`JournalError::Io`] when the file cannot be read or written.
    pub fn open(dir: &Path) -> Result<(Self, LeftOver), JournalError> {
        let (journal, left) = Journal::open(dir, JOURNAL_FILE, |body| {
            parse_admitted(body).map(|draw| draw.key())
        })?;
        let mut left_over = LeftOver::default();
        for entry in left.into_values() {
            if let Some(draw) = parse_admitted(&entry.body) {
                if entry.flagged {
                    left_over.to_record.push(draw);
                } else {
                    left_over.to_draw.push(draw);
                }
            }
        }
        Ok((Self { journal }, left_over))
    }

    /// Writes that `draw` was admitted (before its CONTINUE is answered), or that it is sent
    /// again under a key of its own (its entry is replaced).
    ///
    /// # Errors
    /// [`JournalError::Io`]: the call is then not recoverable after a kill -9 (it is still drawn
    /// in the background as usual).
    pub fn admitted(&self, draw: &PendingDraw) -> Result<(), JournalError> {
        self.journal.put(&draw.key(), &admitted_body(draw))
    }

    /// Writes that the draw of entry `key` was refused for good, before its fail-open record is
    /// queued: a restart queues the record instead of drawing the call.
    ///
    /// # Errors
    /// [`JournalError::Io`]: a restart would draw it again (refused again, most likely).
    pub fn lost(&self, key: &str) -> Result<(), JournalError> {
        self.journal.flag(key)
    }

    /// Writes that the call is recorded (its draw landed, or its fail-open record was queued).
    ///
    /// # Errors
    /// [`JournalError::Io`]: the done frame was not written, and a restart takes the call up
    /// again (a draw the ledger answers as a replay, or a fail-open record it holds already).
    pub fn done(&self, key: &str) -> Result<(), JournalError> {
        self.journal.done(key)
    }

    /// Draws admitted and not done.
    pub fn len(&self) -> usize {
        self.journal.len()
    }

    /// Whether every admitted draw is done.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn admitted_body(draw: &PendingDraw) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&draw.worst_case_nano_usd.to_le_bytes());
    // A request is about 1 KiB: far below u32::MAX.
    let len = u32::try_from(draw.draw.encoded_len()).unwrap_or(u32::MAX);
    body.extend_from_slice(&len.to_le_bytes());
    draw.draw.encode(&mut body).unwrap_or_default();
    draw.if_lost.encode(&mut body).unwrap_or_default();
    body
}

/// The body of an admitted entry.
fn parse_admitted(body: &[u8]) -> Option<PendingDraw> {
    let worst_case_nano_usd = i64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let end = 12usize.checked_add(usize::try_from(len).ok()?)?;
    let draw = pb::ReserveSetRequest::decode(body.get(12..end)?).ok()?;
    let if_lost = pb::RecordFailOpenRequest::decode(body.get(end..)?).ok()?;
    (!if_lost.call_id.is_empty()).then_some(PendingDraw {
        draw,
        if_lost,
        worst_case_nano_usd,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pending(call_id: &str, worst_case: i64) -> PendingDraw {
        PendingDraw {
            draw: pb::ReserveSetRequest {
                tenant_id: "t".into(),
                idempotency_key: call_id.into(),
                amount_nano_usd: worst_case,
                draw_from_reservation_id: "credit-1".into(),
                ..Default::default()
            },
            if_lost: pb::RecordFailOpenRequest {
                tenant_id: "t".into(),
                call_id: call_id.into(),
                ..Default::default()
            },
            worst_case_nano_usd: worst_case,
        }
    }

    /// What `open` returned, in key order (entries are kept by key, in no order).
    fn sorted(mut left: LeftOver) -> LeftOver {
        left.to_draw.sort_by_key(PendingDraw::key);
        left.to_record.sort_by_key(PendingDraw::key);
        left
    }

    #[test]
    fn a_reopened_journal_holds_the_draws_admitted_and_not_done() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, left) = DrawJournal::open(dir.path()).unwrap();
        assert_eq!(left, LeftOver::default());
        for (id, cost) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
            journal.admitted(&pending(id, cost)).unwrap();
        }
        journal.done(&pending("b", 2).key()).unwrap();
        journal.done("unknown@credit-1").unwrap();
        journal.lost(&pending("d", 4).key()).unwrap();
        // "c" is sent again under a key of its own: that key is what a restart draws.
        let mut again = pending("c", 3);
        again.draw.idempotency_key = "c/again/1".into();
        journal.admitted(&again).unwrap();
        // "a" retried by its client and admitted from another credit: an entry of its own.
        let mut retried = pending("a", 1);
        retried.draw.draw_from_reservation_id = "credit-2".into();
        journal.admitted(&retried).unwrap();
        assert_eq!(journal.len(), 4);
        drop(journal); // as a kill -9 would: nothing more is written

        let (journal, left) = DrawJournal::open(dir.path()).unwrap();
        assert_eq!(
            sorted(left),
            LeftOver {
                to_draw: vec![pending("a", 1), retried.clone(), again.clone()],
                to_record: vec![pending("d", 4)],
            }
        );
        // They stay until done, across another restart (and its rewrite).
        journal.done(&pending("a", 1).key()).unwrap();
        drop(journal);
        let (_, left) = DrawJournal::open(dir.path()).unwrap();
        assert_eq!(
            sorted(left),
            LeftOver {
                to_draw: vec![retried, again],
                to_record: vec![pending("d", 4)],
            }
        );
    }
}
