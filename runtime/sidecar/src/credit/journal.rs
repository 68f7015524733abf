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
//!          | 2 | call_id (UTF-8)                                             done
//!          | 3 | call_id (UTF-8)                                             lost
//! ```
//!
//! Entries are keyed by the call id (the fail-open record's) and the credit it was admitted
//! from: a draw sent again under an idempotency key of its own (`<call id>/again/<uuid>`) is
//! admitted again under the same entry key, so a restart draws the key that was sent; a client's
//! retry of the call id on a restarted sidecar (another credit) is an entry of its own. *Lost* is written before a refused draw's fail-open record is
//! queued: a restart queues that record again (the ledger answers a record it holds as a replay)
//! instead of drawing the call a second time.
//!
//! Entries are written, not flushed: the page cache survives the process, which is what a kill -9
//! or an OOM kill takes. A lost or torn entry leaves that call as it was without the journal
//! (docs/design/credits.md). The file is rewritten as a snapshot of its live entries (the draws
//! in flight, and lost draws whose fail-open record could not be queued) once the frames since
//! the last rewrite reach 4,096 and four times the live entries, so it stays small.

use crate::frames::{self, open_append, push_frame};
use prost::Message as _;
use spendguard_proto::ledger::v1 as pb;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The journal's file name inside the spool directory (whose lock the fail-open spool holds).
pub const JOURNAL_FILE: &str = "credit-draws.journal";

/// Frames appended since the last rewrite before the file is rewritten, at least.
const COMPACT_MIN_FRAMES: usize = 4_096;

const ADMITTED: u8 = 1;
const DONE: u8 = 2;
const LOST: u8 = 3;

/// Why the journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("credit draw journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl JournalError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "CREDIT_JOURNAL_IO",
        }
    }
}

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
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    /// Length of the file after the last good write.
    len: u64,
    /// The live entries by key ([`PendingDraw::key`]): what a rewrite keeps.
    live: HashMap<String, Live>,
    frames_since_rewrite: usize,
}

#[derive(Debug)]
struct Live {
    /// The admitted payload.
    payload: Vec<u8>,
    lost: bool,
}

impl DrawJournal {
    /// Opens (creating it if absent) the journal in `dir` and returns what a previous process
    /// left in it. Those entries stay in the journal until [`Self::done`].
    ///
    /// # Errors
    /// [`JournalError::Io`] when the file cannot be read or written.
    pub fn open(dir: &Path) -> Result<(Self, LeftOver), JournalError> {
        let path = dir.join(JOURNAL_FILE);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let frames = frames::read(&bytes, Entry::parse);
        if frames.damaged > 0 {
            tracing::error!(path = %path.display(), frames_skipped = frames.damaged,
                            "credit draw journal damaged: the calls in those frames are not drawn after this restart");
        }
        let mut live: HashMap<String, Live> = HashMap::new();
        for entry in frames.entries {
            match entry {
                Entry::Admitted { key, payload } => {
                    live.insert(
                        key,
                        Live {
                            payload,
                            lost: false,
                        },
                    );
                }
                Entry::Lost { key } => {
                    if let Some(entry) = live.get_mut(&key) {
                        entry.lost = true;
                    }
                }
                Entry::Done { key } => {
                    live.remove(&key);
                }
            }
        }
        let mut left_over = LeftOver::default();
        for entry in live.values() {
            if let Some(draw) = entry.payload.get(1..).and_then(parse_admitted) {
                if entry.lost {
                    left_over.to_record.push(draw);
                } else {
                    left_over.to_draw.push(draw);
                }
            }
        }
        let journal = Self {
            state: Mutex::new(State {
                file: open_append(&path).map_err(io)?,
                len: 0,
                live,
                frames_since_rewrite: 0,
            }),
            path,
        };
        journal.rewrite(&mut crate::sync::lock(&journal.state))?;
        Ok((journal, left_over))
    }

    /// Writes that `draw` was admitted (before its CONTINUE is answered), or that it is sent
    /// again under a key of its own (its entry is replaced).
    ///
    /// # Errors
    /// [`JournalError::Io`]: the call is then not recoverable after a kill -9 (it is still drawn
    /// in the background as usual).
    pub fn admitted(&self, draw: &PendingDraw) -> Result<(), JournalError> {
        let payload = admitted_payload(draw);
        let mut state = crate::sync::lock(&self.state);
        self.append(&mut state, &payload)?;
        state.live.insert(
            draw.key(),
            Live {
                payload,
                lost: false,
            },
        );
        Ok(())
    }

    /// Writes that the draw of entry `key` was refused for good, before its fail-open record is
    /// queued: a restart queues the record instead of drawing the call.
    ///
    /// # Errors
    /// [`JournalError::Io`]: a restart would draw it again (refused again, most likely).
    pub fn lost(&self, key: &str) -> Result<(), JournalError> {
        let mut state = crate::sync::lock(&self.state);
        if !state.live.contains_key(key) {
            return Ok(());
        }
        self.append(&mut state, &marker(LOST, key))?;
        if let Some(entry) = state.live.get_mut(key) {
            entry.lost = true;
        }
        Ok(())
    }

    /// Writes that the call is recorded (its draw landed, or its fail-open record was queued),
    /// and rewrites the file now and then.
    ///
    /// # Errors
    /// [`JournalError::Io`]: the done frame was not written, and a restart takes the call up
    /// again (a draw the ledger answers as a replay, or a fail-open record it holds already).
    pub fn done(&self, key: &str) -> Result<(), JournalError> {
        let mut state = crate::sync::lock(&self.state);
        if !state.live.contains_key(key) {
            return Ok(());
        }
        self.append(&mut state, &marker(DONE, key))?;
        state.live.remove(key);
        if state.frames_since_rewrite >= COMPACT_MIN_FRAMES.max(state.live.len() * 4)
            && let Err(e) = self.rewrite(&mut state)
        {
            // The done frame stands; the next rewrite is tried after as many frames again.
            state.frames_since_rewrite = 0;
            tracing::warn!(code = e.code(), error = %e, "could not rewrite the credit draw journal; it keeps growing until a rewrite succeeds");
        }
        Ok(())
    }

    /// Draws admitted and not done.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.state).live.len()
    }

    /// Whether every admitted draw is done.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&self, state: &mut State, payload: &[u8]) -> Result<(), JournalError> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        push_frame(&mut frame, payload);
        if let Err(source) = state.file.write_all(&frame) {
            // Cut a partial frame back off, so it does not sit before later ones as damage.
            let _ = state.file.set_len(state.len);
            return Err(JournalError::Io {
                path: self.path.clone(),
                source,
            });
        }
        state.len += frame.len() as u64;
        state.frames_since_rewrite += 1;
        Ok(())
    }

    /// Replaces the file with the live entries (written to a temporary file, renamed over it).
    fn rewrite(&self, state: &mut State) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut bytes = Vec::new();
        for (key, entry) in &state.live {
            push_frame(&mut bytes, &entry.payload);
            if entry.lost {
                push_frame(&mut bytes, &marker(LOST, key));
            }
        }
        let temporary = self.path.with_extension("journal.new");
        let file = frames::write_new(&temporary, &bytes, false)
            .and_then(|file| std::fs::rename(&temporary, &self.path).map(|()| file))
            .map_err(|e| {
                let _ = std::fs::remove_file(&temporary);
                io(e)
            })?;
        state.file = file;
        state.len = bytes.len() as u64;
        state.frames_since_rewrite = 0;
        Ok(())
    }
}

fn marker(kind: u8, key: &str) -> Vec<u8> {
    let mut payload = vec![kind];
    payload.extend_from_slice(key.as_bytes());
    payload
}

fn admitted_payload(draw: &PendingDraw) -> Vec<u8> {
    let mut payload = vec![ADMITTED];
    payload.extend_from_slice(&draw.worst_case_nano_usd.to_le_bytes());
    // A request is about 1 KiB: far below u32::MAX.
    let len = u32::try_from(draw.draw.encoded_len()).unwrap_or(u32::MAX);
    payload.extend_from_slice(&len.to_le_bytes());
    draw.draw.encode(&mut payload).unwrap_or_default();
    draw.if_lost.encode(&mut payload).unwrap_or_default();
    payload
}

/// The body of an admitted payload (after its kind).
fn parse_admitted(rest: &[u8]) -> Option<PendingDraw> {
    let worst_case_nano_usd = i64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?);
    let end = 12usize.checked_add(usize::try_from(len).ok()?)?;
    let draw = pb::ReserveSetRequest::decode(rest.get(12..end)?).ok()?;
    let if_lost = pb::RecordFailOpenRequest::decode(rest.get(end..)?).ok()?;
    (!if_lost.call_id.is_empty()).then_some(PendingDraw {
        draw,
        if_lost,
        worst_case_nano_usd,
    })
}

enum Entry {
    Admitted { key: String, payload: Vec<u8> },
    Lost { key: String },
    Done { key: String },
}

impl Entry {
    fn parse(payload: &[u8]) -> Option<Self> {
        let (&kind, rest) = payload.split_first()?;
        match kind {
            ADMITTED => Some(Self::Admitted {
                key: parse_admitted(rest)?.key(),
                payload: payload.to_vec(),
            }),
            LOST => Some(Self::Lost {
                key: std::str::from_utf8(rest).ok()?.to_owned(),
            }),
            DONE => Some(Self::Done {
                key: std::str::from_utf8(rest).ok()?.to_owned(),
            }),
            _ => None,
        }
    }
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

    #[test]
    fn the_file_is_rewritten_to_its_live_entries_and_a_torn_entry_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = DrawJournal::open(dir.path()).unwrap();
        for i in 0..COMPACT_MIN_FRAMES {
            let id = format!("call-{i}");
            journal.admitted(&pending(&id, 1)).unwrap();
            journal.done(&pending(&id, 1).key()).unwrap();
        }
        journal.admitted(&pending("kept", 7)).unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            size < 4_096,
            "rewritten once 4,096 frames were appended: {size} bytes"
        );
        // A write cut short by the kill.
        let mut torn = Vec::new();
        push_frame(&mut torn, &admitted_payload(&pending("torn", 9)));
        torn.truncate(torn.len() - 3);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        drop(journal);
        let (_, left) = DrawJournal::open(dir.path()).unwrap();
        assert_eq!(left.to_draw, vec![pending("kept", 7)]);
    }
}
