//! Keyed journals in the sidecar's spool directory: what a process must not forget across a
//! kill -9 is written here before it acts, and marked done once the ledger has it. A restarted
//! process reads back the entries that were never marked done. Users: the credit draw journal
//! (`credit/journal.rs`) and the STOP evidence journal (`stop_evidence.rs`).
//!
//! ```text
//! file    := frame*                                                  (crate::frames)
//! payload := 1 | body            put: the entry of the key its body names (replaces an older one)
//!          | 2 | key (UTF-8)     done: the entry is forgotten
//!          | 3 | key (UTF-8)     flag: the entry is marked (what that means is the user's)
//! ```
//!
//! Entries are written, not flushed: the page cache survives the process, which is what a kill -9
//! or an OOM kill takes; losing power on the node may lose the last entries. A failed append is
//! cut back off the file. The file is rewritten as a snapshot of its live entries once the frames
//! since the last rewrite reach 4,096 and four times the live entries, so it stays within about
//! five times its live entries (puts that replace an entry count too).

use crate::frames::{self, open_append, push_frame};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Frames appended since the last rewrite before the file is rewritten, at least.
pub(crate) const COMPACT_MIN_FRAMES: usize = 4_096;

const PUT: u8 = 1;
const DONE: u8 = 2;
const FLAG: u8 = 3;

/// Why a journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the file failed.
    #[error("journal {path}: {source}")]
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
            Self::Io { .. } => "JOURNAL_IO",
        }
    }
}

/// An entry a previous process put and never marked done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeftEntry {
    /// What was put.
    pub body: Vec<u8>,
    /// Whether it was flagged after.
    pub flagged: bool,
}

/// An open journal.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    /// Length of the file after the last good write.
    len: u64,
    /// The live entries by key: what a rewrite keeps.
    live: HashMap<String, LeftEntry>,
    frames_since_rewrite: usize,
}

impl Journal {
    /// Opens (creating it if absent) the journal `name` in `dir` and returns the entries a
    /// previous process left in it, by key. `key_of` names the key of a body (`None`: damage,
    /// the frame is skipped). Those entries stay in the journal until [`Self::done`].
    ///
    /// # Errors
    /// [`JournalError::Io`] when the file cannot be read or written.
    pub(crate) fn open(
        dir: &Path,
        name: &str,
        key_of: impl Fn(&[u8]) -> Option<String>,
    ) -> Result<(Self, HashMap<String, LeftEntry>), JournalError> {
        let path = dir.join(name);
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
        let frames = frames::read(&bytes, |payload| Frame::parse(payload, &key_of));
        if frames.damaged > 0 {
            tracing::error!(path = %path.display(), frames_skipped = frames.damaged,
                            "journal damaged: the entries in those frames are not taken up after this restart");
        }
        let mut live: HashMap<String, LeftEntry> = HashMap::new();
        for frame in frames.entries {
            match frame {
                Frame::Put { key, body } => {
                    live.insert(
                        key,
                        LeftEntry {
                            body,
                            flagged: false,
                        },
                    );
                }
                Frame::Flag { key } => {
                    if let Some(entry) = live.get_mut(&key) {
                        entry.flagged = true;
                    }
                }
                Frame::Done { key } => {
                    live.remove(&key);
                }
            }
        }
        let left = live.clone();
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
        Ok((journal, left))
    }

    /// Writes the entry `key` holding `body` (replacing the one the key held, unflagged).
    ///
    /// # Errors
    /// [`JournalError::Io`]: the entry would not survive a kill -9.
    pub(crate) fn put(&self, key: &str, body: &[u8]) -> Result<(), JournalError> {
        let mut payload = Vec::with_capacity(body.len() + 1);
        payload.push(PUT);
        payload.extend_from_slice(body);
        let mut state = crate::sync::lock(&self.state);
        self.append(&mut state, &payload)?;
        state.live.insert(
            key.to_owned(),
            LeftEntry {
                body: body.to_vec(),
                flagged: false,
            },
        );
        self.compact(&mut state);
        Ok(())
    }

    /// Flags the entry `key` (nothing when it is not live).
    ///
    /// # Errors
    /// [`JournalError::Io`]: a restart finds the entry unflagged.
    pub(crate) fn flag(&self, key: &str) -> Result<(), JournalError> {
        let mut state = crate::sync::lock(&self.state);
        if !state.live.contains_key(key) {
            return Ok(());
        }
        self.append(&mut state, &marker(FLAG, key))?;
        if let Some(entry) = state.live.get_mut(key) {
            entry.flagged = true;
        }
        self.compact(&mut state);
        Ok(())
    }

    /// Forgets the entry `key` (nothing when it is not live), and rewrites the file now and
    /// then.
    ///
    /// # Errors
    /// [`JournalError::Io`]: the done frame was not written, and a restart takes the entry up
    /// again.
    pub(crate) fn done(&self, key: &str) -> Result<(), JournalError> {
        let mut state = crate::sync::lock(&self.state);
        if !state.live.contains_key(key) {
            return Ok(());
        }
        self.append(&mut state, &marker(DONE, key))?;
        state.live.remove(key);
        self.compact(&mut state);
        Ok(())
    }

    /// Entries put and not done.
    pub(crate) fn len(&self) -> usize {
        crate::sync::lock(&self.state).live.len()
    }

    /// Rewrites the file once the frames since the last rewrite reach 4,096 and four times the
    /// live entries: after any append, since puts that replace an entry (a STOP summary's count
    /// during an outage) grow the file while nothing is done.
    fn compact(&self, state: &mut State) {
        if state.frames_since_rewrite >= COMPACT_MIN_FRAMES.max(state.live.len() * 4)
            && let Err(e) = self.rewrite(state)
        {
            // The last frame stands; the next rewrite is tried after as many frames again.
            state.frames_since_rewrite = 0;
            tracing::warn!(code = e.code(), error = %e, "could not rewrite a journal; it keeps growing until a rewrite succeeds");
        }
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
        let mut payload = Vec::new();
        for (key, entry) in &state.live {
            payload.clear();
            payload.push(PUT);
            payload.extend_from_slice(&entry.body);
            push_frame(&mut bytes, &payload);
            if entry.flagged {
                push_frame(&mut bytes, &marker(FLAG, key));
            }
        }
        let temporary = self.path.with_extension("new");
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

enum Frame {
    Put { key: String, body: Vec<u8> },
    Flag { key: String },
    Done { key: String },
}

impl Frame {
    fn parse(payload: &[u8], key_of: &impl Fn(&[u8]) -> Option<String>) -> Option<Self> {
        let (&kind, rest) = payload.split_first()?;
        let key = || std::str::from_utf8(rest).ok().map(str::to_owned);
        match kind {
            PUT => Some(Self::Put {
                key: key_of(rest)?,
                body: rest.to_vec(),
            }),
            FLAG => Some(Self::Flag { key: key()? }),
            DONE => Some(Self::Done { key: key()? }),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NAME: &str = "test.journal";

    /// Bodies are "key=value".
    fn key_of(body: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(body).ok()?;
        Some(text.split_once('=')?.0.to_owned())
    }

    fn left(entries: &[(&str, &str, bool)]) -> HashMap<String, LeftEntry> {
        entries
            .iter()
            .map(|(key, body, flagged)| {
                (
                    (*key).to_owned(),
                    LeftEntry {
                        body: body.as_bytes().to_vec(),
                        flagged: *flagged,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_reopened_journal_holds_what_was_put_and_not_done() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, found) = Journal::open(dir.path(), NAME, key_of).unwrap();
        assert!(found.is_empty());
        journal.put("a", b"a=1").unwrap();
        journal.put("b", b"b=1").unwrap();
        journal.put("c", b"c=1").unwrap();
        journal.put("a", b"a=2").unwrap(); // replaces
        journal.flag("b").unwrap();
        journal.done("c").unwrap();
        journal.done("unknown").unwrap();
        journal.flag("unknown").unwrap();
        assert_eq!(journal.len(), 2);
        drop(journal); // as a kill -9 would: nothing more is written

        let (journal, found) = Journal::open(dir.path(), NAME, key_of).unwrap();
        assert_eq!(found, left(&[("a", "a=2", false), ("b", "b=1", true)]));
        // They stay until done, across another restart (and its rewrite).
        journal.done("a").unwrap();
        drop(journal);
        let (_, found) = Journal::open(dir.path(), NAME, key_of).unwrap();
        assert_eq!(found, left(&[("b", "b=1", true)]));
    }

    #[test]
    fn puts_replacing_one_entry_do_not_grow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), NAME, key_of).unwrap();
        for count in 0..3 * COMPACT_MIN_FRAMES {
            journal
                .put("summary", format!("summary={count}").as_bytes())
                .unwrap();
        }
        let size = std::fs::metadata(dir.path().join(NAME)).unwrap().len();
        assert!(
            size < 100_000,
            "rewritten while nothing was done: {size} bytes"
        );
        drop(journal);
        let (_, found) = Journal::open(dir.path(), NAME, key_of).unwrap();
        let last = format!("summary={}", 3 * COMPACT_MIN_FRAMES - 1);
        assert_eq!(found, left(&[("summary", &last, false)]));
    }

    #[test]
    fn the_file_is_rewritten_to_its_live_entries_and_a_torn_entry_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), NAME, key_of).unwrap();
        for i in 0..COMPACT_MIN_FRAMES {
            let key = format!("call-{i}");
            journal.put(&key, format!("{key}=1").as_bytes()).unwrap();
            journal.done(&key).unwrap();
        }
        journal.put("kept", b"kept=7").unwrap();
        let path = dir.path().join(NAME);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            size < 4_096,
            "rewritten once 4,096 frames were appended: {size} bytes"
        );
        // A write cut short by the kill.
        let mut torn = Vec::new();
        push_frame(&mut torn, b"\x01torn=9");
        torn.truncate(torn.len() - 3);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        drop(journal);
        let (_, found) = Journal::open(dir.path(), NAME, key_of).unwrap();
        assert_eq!(found, left(&[("kept", "kept=7", false)]));
    }
}
