//! The durable side of the fail-open queue: an append-only file of framed entries in a directory
//! of its own (an emptyDir in Kubernetes, so it survives a restart of the sidecar container).
//!
//! ```text
//! file   := frame*                                       (crate::frames)
//! payload:= 1 | worst_case: i64 | settled: u8 | run_budget? | RecordFailOpenRequest (protobuf)
//!                                                                                   admitted
//!         | 2 | actual: i64 | call_id (UTF-8)                                     settled
//!         | 3 | call_id (UTF-8)                                                   done
//! run_budget? := 0 | 1 | id_len: u32 | id (UTF-8) | limit: i64
//! ```
//!
//! An admission is flushed (fdatasync) before the call it records is let through; settlements and
//! completions are only written, because losing them is safe: on replay an unsettled record is
//! sent at its worst case (conservative), and a record sent twice is answered by the ledger as a
//! replay (RecordFailOpen is idempotent by call id).
//!
//! Opening replays the file into the records it describes and rewrites it as a snapshot. A frame
//! cut short by a crash, with nothing good after it, ends the replay there. A frame that fails its
//! checksum or cannot be read is skipped, and the replay resynchronises on the next offset where a
//! good frame starts (a damaged length cannot be trusted; losing one frame is no worse than losing
//! its record). The file is then first copied to `.damaged-<unix ms>` for an operator.
//!
//! A write that fails is cut back off the file, so that no torn frame sits before later ones;
//! if even that fails, the spool refuses admissions until it has been rewritten. The file is
//! bounded ([`SPOOL_BYTES_MAX`], below the emptyDir's size limit, whose overflow would evict
//! the pod): past it, admissions are refused and fail-open decisions fail closed.

use crate::frames::{self, open_append, push_frame, sync_dir, write_new};
use prost::Message as _;
use spendguard_proto::ledger::v1 as pb;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

/// The spool's file name inside its directory.
pub const SPOOL_FILE: &str = "fail-open.spool";

/// The lock file of a spool's directory (the spool file itself is replaced by every rewrite, so
/// a lock on it would not hold). A second process on the same directory would interleave its
/// frames with ours, replay our records as its own and rewrite the file under us.
pub const LOCK_FILE: &str = "fail-open.lock";

/// Frames appended since the last rewrite before the file is rewritten as a snapshot, at least.
const COMPACT_MIN_FRAMES: usize = 4_096;

/// Largest spool file that takes new admissions: the injected emptyDir is 64 MiB, and it must
/// also hold a rewrite's second copy and one copy of a damaged file.
pub const SPOOL_BYTES_MAX: u64 = 16 << 20;

const ADMITTED: u8 = 1;
const SETTLED: u8 = 2;
const DONE: u8 = 3;

/// Why the spool could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading, writing or flushing the spool failed.
    #[error("fail-open spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The spool holds [`SPOOL_BYTES_MAX`] already.
    #[error("fail-open spool is full ({limit_bytes} bytes)")]
    Full {
        /// The bound.
        limit_bytes: u64,
    },
    /// A failed write could not be cut back off the file: nothing is appended until the spool
    /// has been rewritten from the queue.
    #[error("fail-open spool needs a rewrite after a failed write")]
    Broken,
    /// Another live process holds the spool's directory (two sidecars given one directory).
    #[error("fail-open spool directory {} is held by another process (its lock {})", dir.display(), lock.display())]
    InUse {
        /// The directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
}

impl SpoolError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Io { .. } => "FAIL_OPEN_SPOOL_IO",
            Self::Full { .. } => "FAIL_OPEN_SPOOL_FULL",
            Self::Broken => "FAIL_OPEN_SPOOL_BROKEN",
            Self::InUse { .. } => "FAIL_OPEN_SPOOL_IN_USE",
        }
    }
}

/// One fail-open record as the spool keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledRecord {
    /// The request, `actual_nano_usd` as last settled.
    pub request: pb::RecordFailOpenRequest,
    /// The call's worst case.
    pub worst_case_nano_usd: i64,
    /// A per-run budget (id, limit) to upsert before the record.
    pub run_budget: Option<(String, i64)>,
    /// Whether `request.actual_nano_usd` is final.
    pub settled: bool,
}

/// The open spool file.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Length of the file after the last good write.
    len: u64,
    /// Bound of the file for admissions ([`SPOOL_BYTES_MAX`]).
    bytes_max: u64,
    frames_since_rewrite: usize,
    broken: bool,
    /// Holds the directory's lock ([`LOCK_FILE`]) for as long as the spool is open; the kernel
    /// lets it go when the process dies, however it dies.
    _lock: File,
}

impl Spool {
    /// Opens (creating it if absent) the spool in `dir`, returns the records it holds in the
    /// order they were admitted, and rewrites it as their snapshot.
    ///
    /// # Errors
    /// [`SpoolError::InUse`] when another process has the directory open;
    /// [`SpoolError::Io`] when the directory or file cannot be read or written.
    pub fn open(dir: &Path) -> Result<(Self, Vec<SpooledRecord>), SpoolError> {
        let lock = lock_dir(dir)?;
        let path = dir.join(SPOOL_FILE);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes).map_err(io_at(&path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
        let replayed = replay(&bytes);
        let unread = bytes.len() - replayed.read;
        if replayed.damaged == 0 && replayed.torn_tail {
            tracing::warn!(path = %path.display(), bytes_unread = unread,
                           "fail-open spool ends in a partial frame (a write cut short); ignored");
        } else if replayed.damaged > 0 || unread > 0 {
            let damaged = dir.join(format!(
                "{SPOOL_FILE}.damaged-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ));
            // One copy is kept (the newest), so repeated damage cannot fill the volume.
            remove_damaged_copies(dir).map_err(io_at(dir))?;
            write_new(&damaged, &bytes, true).map_err(io_at(&damaged))?;
            sync_dir(dir).map_err(io_at(dir))?;
            tracing::error!(path = %path.display(), frames_skipped = replayed.damaged,
                            bytes_unread = unread, copy = %damaged.display(),
                            "fail-open spool damaged: the records in the damaged frames are lost");
        }
        let records = replayed.records;
        let file = open_append(&path).map_err(io_at(&path))?;
        let mut spool = Self {
            dir: dir.to_owned(),
            path,
            file,
            len: 0,
            bytes_max: SPOOL_BYTES_MAX,
            frames_since_rewrite: 0,
            broken: false,
            _lock: lock,
        };
        spool.rewrite(&records)?;
        // A new, empty spool's name must be durable too (a non-empty rewrite flushed it already).
        if records.is_empty() {
            sync_dir(dir).map_err(io_at(dir))?;
        }
        Ok((spool, records))
    }

    /// Appends an admission and flushes it to disk: only then may the call go through.
    ///
    /// # Errors
    /// [`SpoolError::Io`]: the call must fail closed.
    pub fn admitted(&mut self, record: &SpooledRecord) -> Result<(), SpoolError> {
        if self.len >= self.bytes_max {
            return Err(SpoolError::Full {
                limit_bytes: self.bytes_max,
            });
        }
        self.append(&admitted_payload(record), true)
    }

    /// Appends a settlement (not flushed: losing it only makes a replay record the worst case).
    ///
    /// # Errors
    /// [`SpoolError::Io`].
    pub fn settled(&mut self, call_id: &str, actual_nano_usd: i64) -> Result<(), SpoolError> {
        let mut payload = vec![SETTLED];
        payload.extend_from_slice(&actual_nano_usd.to_le_bytes());
        payload.extend_from_slice(call_id.as_bytes());
        self.append(&payload, false)
    }

    /// Appends that a record left the queue (not flushed: losing it only makes a replay send the
    /// record again, which the ledger answers as a replay).
    ///
    /// # Errors
    /// [`SpoolError::Io`].
    pub fn done(&mut self, call_id: &str) -> Result<(), SpoolError> {
        let mut payload = vec![DONE];
        payload.extend_from_slice(call_id.as_bytes());
        self.append(&payload, false)
    }

    /// Whether enough has been appended since the last rewrite to rewrite the file for `live`
    /// records.
    pub fn wants_rewrite(&self, live: usize) -> bool {
        self.frames_since_rewrite >= COMPACT_MIN_FRAMES.max(live.saturating_mul(4))
    }

    /// Replaces the file with a snapshot of `records`: written to a temporary file (mode 0600),
    /// flushed, renamed over the spool, and the directory flushed; the spool then appends to the
    /// renamed file. An empty snapshot truncates the file instead. Clears a broken spool.
    ///
    /// # Errors
    /// [`SpoolError::Io`]: before the rename the old file is left as it was; after it, the new
    /// one is in use but its name may not be durable yet.
    pub fn rewrite(&mut self, records: &[SpooledRecord]) -> Result<(), SpoolError> {
        if records.is_empty() {
            self.file.set_len(0).map_err(io_at(&self.path))?;
            self.file.sync_data().map_err(io_at(&self.path))?;
            self.len = 0;
            self.frames_since_rewrite = 0;
            self.broken = false;
            return Ok(());
        }
        let temporary = self.dir.join(format!("{SPOOL_FILE}.new"));
        let mut bytes = Vec::new();
        for record in records {
            push_frame(&mut bytes, &admitted_payload(record));
        }
        let file = write_new(&temporary, &bytes, true)
            .and_then(|file| std::fs::rename(&temporary, &self.path).map(|()| file))
            .map_err(|source| {
                let _ = std::fs::remove_file(&temporary);
                io_at(&self.path)(source)
            })?;
        self.file = file;
        self.len = bytes.len() as u64;
        self.frames_since_rewrite = 0;
        self.broken = false;
        sync_dir(&self.dir).map_err(io_at(&self.dir))
    }

    fn append(&mut self, payload: &[u8], flush: bool) -> Result<(), SpoolError> {
        if self.broken {
            return Err(SpoolError::Broken);
        }
        let mut frame = Vec::with_capacity(payload.len() + 8);
        push_frame(&mut frame, payload);
        let mut written = self.file.write_all(&frame);
        if written.is_ok() && flush {
            written = self.file.sync_data();
            // After a failed flush the page cache may no longer match the disk, and a later
            // flush can report success: the file is rewritten before the next admission.
            self.broken = written.is_err();
        }
        if let Err(source) = written {
            // Cut the frame back off, so nothing torn sits before later frames and an admission
            // whose call fails closed is not replayed.
            if self.file.set_len(self.len).is_err() {
                self.broken = true;
            }
            return Err(io_at(&self.path)(source));
        }
        self.len += frame.len() as u64;
        self.frames_since_rewrite = self.frames_since_rewrite.saturating_add(1);
        Ok(())
    }
}

/// Maps an OS error on `path` to [`SpoolError::Io`].
fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + use<> {
    let path = path.to_owned();
    move |source| SpoolError::Io { path, source }
}

fn remove_damaged_copies(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{SPOOL_FILE}.damaged-"))
        {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Takes the directory's lock without waiting: a spool held by a live process is refused, not
/// waited for.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let lock = dir.join(LOCK_FILE);
    let file = open_append(&lock).map_err(io_at(&lock))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(SpoolError::InUse {
            dir: dir.to_owned(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_at(&lock)(e)),
    }
}

/// An admission frame; a settled record is written settled (an admission followed by its
/// settlement), so a snapshot keeps what replay needs.
fn admitted_payload(record: &SpooledRecord) -> Vec<u8> {
    let mut payload = vec![ADMITTED];
    payload.extend_from_slice(&record.worst_case_nano_usd.to_le_bytes());
    payload.push(u8::from(record.settled));
    match &record.run_budget {
        None => payload.push(0),
        Some((id, limit)) => {
            payload.push(1);
            let len = u32::try_from(id.len()).unwrap_or(u32::MAX);
            payload.extend_from_slice(&len.to_le_bytes());
            payload.extend_from_slice(id.as_bytes());
            payload.extend_from_slice(&limit.to_le_bytes());
        }
    }
    record.request.encode(&mut payload).unwrap_or_default();
    payload
}

/// What a replay read.
struct Replayed {
    /// Live records, in admission order.
    records: Vec<SpooledRecord>,
    /// Bytes read up to the last frame taken or skipped.
    read: usize,
    /// Frames skipped for a failed checksum or an unreadable payload.
    damaged: usize,
    /// Whether the replay ended in a frame cut short.
    torn_tail: bool,
}

/// Reads the frames (`frames::read`) and applies their entries in order.
fn replay(bytes: &[u8]) -> Replayed {
    let frames = frames::read(bytes, Entry::parse);
    let mut records: Vec<SpooledRecord> = Vec::new();
    for entry in frames.entries {
        match entry {
            Entry::Admitted(record) => {
                records.retain(|r| r.request.call_id != record.request.call_id);
                records.push(*record);
            }
            Entry::Settled { call_id, actual } => {
                if let Some(r) = records.iter_mut().find(|r| r.request.call_id == call_id)
                    && !r.settled
                {
                    r.request.actual_nano_usd = actual;
                    r.settled = true;
                }
            }
            Entry::Done { call_id } => records.retain(|r| r.request.call_id != call_id),
        }
    }
    Replayed {
        records,
        read: frames.read,
        damaged: frames.damaged,
        torn_tail: frames.torn_tail,
    }
}

enum Entry {
    Admitted(Box<SpooledRecord>),
    Settled { call_id: String, actual: i64 },
    Done { call_id: String },
}

impl Entry {
    fn parse(payload: &[u8]) -> Option<Self> {
        let (&kind, rest) = payload.split_first()?;
        match kind {
            ADMITTED => {
                let worst_case_nano_usd = i64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
                let settled = *rest.get(8)? == 1;
                let (run_budget, rest) = match *rest.get(9)? {
                    0 => (None, rest.get(10..)?),
                    1 => {
                        let len = u32::from_le_bytes(rest.get(10..14)?.try_into().ok()?);
                        let end = 14usize.checked_add(usize::try_from(len).ok()?)?;
                        let id = std::str::from_utf8(rest.get(14..end)?).ok()?.to_owned();
                        let limit = i64::from_le_bytes(
                            rest.get(end..end.checked_add(8)?)?.try_into().ok()?,
                        );
                        (Some((id, limit)), rest.get(end + 8..)?)
                    }
                    _ => return None,
                };
                let request = pb::RecordFailOpenRequest::decode(rest).ok()?;
                Some(Self::Admitted(Box::new(SpooledRecord {
                    request,
                    worst_case_nano_usd,
                    run_budget,
                    settled,
                })))
            }
            SETTLED => Some(Self::Settled {
                actual: i64::from_le_bytes(rest.get(..8)?.try_into().ok()?),
                call_id: std::str::from_utf8(rest.get(8..)?).ok()?.to_owned(),
            }),
            DONE => Some(Self::Done {
                call_id: std::str::from_utf8(rest).ok()?.to_owned(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn record(call_id: &str, worst_case: i64, run_budget: Option<(&str, i64)>) -> SpooledRecord {
        SpooledRecord {
            request: pb::RecordFailOpenRequest {
                tenant_id: "t".into(),
                call_id: call_id.into(),
                budget_ids: vec!["b".into()],
                decided_at_unix_ms: 1_700_000_000_000,
                ..Default::default()
            },
            worst_case_nano_usd: worst_case,
            run_budget: run_budget.map(|(id, limit)| (id.to_owned(), limit)),
            settled: false,
        }
    }

    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(SPOOL_FILE)).unwrap().len()
    }

    #[test]
    fn a_reopened_spool_holds_what_was_admitted_settled_and_not_done() {
        // Goal: what survives a crash is exactly the admitted records not yet done, with their
        // settlements. Method: admit three, settle two, finish one, drop the spool (a crash
        // writes nothing more), reopen.
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, replayed) = Spool::open(dir.path()).unwrap();
        assert!(replayed.is_empty());
        spool.admitted(&record("a", 500, None)).unwrap();
        spool
            .admitted(&record("b", 700, Some(("run-1", 9_000))))
            .unwrap();
        spool.admitted(&record("c", 900, None)).unwrap();
        spool.settled("a", 123).unwrap();
        spool.settled("b", 456).unwrap();
        spool.settled("b", 999).unwrap(); // The first settlement wins, as in the queue.
        spool.done("a").unwrap();
        drop(spool);

        let (spool, replayed) = Spool::open(dir.path()).unwrap();
        let mut b = record("b", 700, Some(("run-1", 9_000)));
        b.request.actual_nano_usd = 456;
        b.settled = true;
        assert_eq!(replayed, vec![b, record("c", 900, None)]);
        drop(spool);
        // The reopened file is the snapshot: replaying it again gives the same records.
        let (_spool, again) = Spool::open(dir.path()).unwrap();
        assert_eq!(again, replayed);
    }

    #[test]
    fn one_process_at_a_time_holds_a_spool_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.admitted(&record("a", 500, None)).unwrap();
        // A second open of the directory (as a second process would) is refused and changes
        // nothing.
        let err = Spool::open(dir.path()).unwrap_err();
        assert_eq!(err.code(), "FAIL_OPEN_SPOOL_IN_USE", "{err}");
        spool.admitted(&record("b", 700, None)).unwrap();
        drop(spool);
        let (_spool, replayed) = Spool::open(dir.path()).unwrap();
        assert_eq!(
            replayed,
            vec![record("a", 500, None), record("b", 700, None)]
        );
    }

    #[test]
    fn a_frame_cut_short_ends_the_replay_and_damage_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.admitted(&record("a", 1, None)).unwrap();
        drop(spool);
        // A crash in the middle of the next frame's header.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(SPOOL_FILE))
            .unwrap();
        file.write_all(&[42, 0, 0]).unwrap();
        drop(file);
        let (mut spool, replayed) = Spool::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![record("a", 1, None)]);

        // Damage: a whole frame whose checksum does not match, then a good frame.
        spool.admitted(&record("b", 2, None)).unwrap();
        drop(spool);
        let path = dir.path().join(SPOOL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let second_frame = bytes.len() - (8 + admitted_payload(&record("b", 2, None)).len());
        bytes[second_frame + 9] ^= 0xff;
        let mut good = Vec::new();
        push_frame(&mut good, &admitted_payload(&record("c", 3, None)));
        bytes.extend_from_slice(&good);
        std::fs::write(&path, &bytes).unwrap();
        let (_spool, replayed) = Spool::open(dir.path()).unwrap();
        assert_eq!(
            replayed,
            vec![record("a", 1, None), record("c", 3, None)],
            "the damaged frame is skipped, the good one after it kept"
        );
        let damaged: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".damaged-"))
            .collect();
        assert_eq!(
            damaged.len(),
            1,
            "the unreadable spool is kept for an operator"
        );
    }

    #[test]
    fn a_damaged_length_does_not_hide_the_frames_after_it() {
        // Goal: one bad length (pointing past the end of the file) is damage, not a torn tail:
        // the replay finds the good frames after it and the file is copied aside.
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        for (id, cost) in [("a", 1), ("b", 2), ("c", 3)] {
            spool.admitted(&record(id, cost, None)).unwrap();
        }
        drop(spool);
        let path = dir.path().join(SPOOL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let second_frame = 8 + admitted_payload(&record("a", 1, None)).len();
        bytes[second_frame..second_frame + 4].copy_from_slice(&60_000u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let (_spool, replayed) = Spool::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![record("a", 1, None), record("c", 3, None)]);
        let copies = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".damaged-")
            })
            .count();
        assert_eq!(copies, 1);
    }

    #[test]
    fn a_full_spool_refuses_admissions_until_it_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.bytes_max = 1_000;
        let mut admitted = 0;
        let full = loop {
            match spool.admitted(&record(&format!("r{admitted}"), 1, None)) {
                Ok(()) => admitted += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(full.code(), "FAIL_OPEN_SPOOL_FULL");
        assert!(admitted > 0 && file_len(dir.path()) >= 1_000);
        spool.rewrite(&[]).unwrap();
        spool.admitted(&record("again", 1, None)).unwrap();
    }

    #[test]
    fn a_rewrite_keeps_the_file_private_and_appends_to_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.admitted(&record("a", 1, None)).unwrap();
        spool.rewrite(&[record("a", 1, None)]).unwrap();
        spool.admitted(&record("b", 2, None)).unwrap();
        let mode = std::fs::metadata(dir.path().join(SPOOL_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        drop(spool);
        let (_spool, replayed) = Spool::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![record("a", 1, None), record("b", 2, None)]);
    }

    #[test]
    fn an_empty_rewrite_truncates_and_a_large_log_asks_for_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path()).unwrap();
        spool.admitted(&record("a", 1, None)).unwrap();
        assert!(file_len(dir.path()) > 0);
        assert!(!spool.wants_rewrite(1));
        for _ in 0..COMPACT_MIN_FRAMES {
            spool.settled("a", 1).unwrap();
        }
        assert!(spool.wants_rewrite(1));
        assert!(
            !spool.wants_rewrite(COMPACT_MIN_FRAMES),
            "a rewrite is worth it only when the log is several times the live records"
        );
        spool.rewrite(&[]).unwrap();
        assert_eq!(file_len(dir.path()), 0);
        assert!(!spool.wants_rewrite(0));
        spool.admitted(&record("b", 2, None)).unwrap();
        drop(spool);
        let (_spool, replayed) = Spool::open(dir.path()).unwrap();
        assert_eq!(replayed, vec![record("b", 2, None)]);
    }
}
