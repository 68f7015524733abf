//! Framed, append-only files in the sidecar's spool directory (an emptyDir in Kubernetes, so they
//! survive a restart of the sidecar container): the fail-open spool and the credit draw journal.
//!
//! ```text
//! file  := frame*
//! frame := len: u32 LE | crc32(payload): u32 LE | payload (len bytes)
//! ```
//!
//! Reading takes frames up to the end. A frame that fails its checksum or whose payload cannot be
//! parsed is skipped, and reading resynchronises on the next offset where a good frame starts (a
//! damaged length cannot be trusted). A frame cut short (a write interrupted by a crash) with
//! nothing good after it ends the file: a torn tail.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;

/// Largest frame accepted when reading: a record is about 1 KiB, so anything larger is damage.
const FRAME_MAX_BYTES: u32 = 1 << 20;

/// Appends one frame holding `payload` to `out`.
pub(crate) fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    // Payloads are built by this crate and bounded far below u32::MAX (a record is about 1 KiB).
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What reading a file found.
pub(crate) struct Frames<T> {
    /// The parsed payloads of the good frames, in file order.
    pub entries: Vec<T>,
    /// Bytes read up to the last frame taken or skipped.
    pub read: usize,
    /// Frames skipped for a failed checksum or a payload `parse` refused.
    pub damaged: usize,
    /// Whether reading ended in a frame cut short (a header or payload past the end).
    pub torn_tail: bool,
}

/// Reads every frame of `bytes`, parsing each payload with `parse` (`None`: damage).
pub(crate) fn read<T>(bytes: &[u8], parse: impl Fn(&[u8]) -> Option<T>) -> Frames<T> {
    let mut entries = Vec::new();
    let mut at = 0;
    let mut damaged = 0;
    let torn_tail = loop {
        let frame = frame_at(bytes, at);
        let parsed = match frame {
            Frame::End => break false,
            Frame::Good { payload, next } => parse(payload).map(|entry| (entry, next)),
            Frame::Damaged | Frame::Torn => None,
        };
        let Some((entry, next)) = parsed else {
            match resync(bytes, at + 1, &parse) {
                Some(good) => {
                    damaged += 1;
                    at = good;
                    continue;
                }
                None => break matches!(frame, Frame::Torn),
            }
        };
        at = next;
        entries.push(entry);
    };
    Frames {
        entries,
        read: at,
        damaged,
        torn_tail,
    }
}

/// The first offset from `from` where a frame with a good checksum and a parsable payload starts.
fn resync<T>(bytes: &[u8], from: usize, parse: &impl Fn(&[u8]) -> Option<T>) -> Option<usize> {
    (from..bytes.len()).find(|&at| {
        matches!(frame_at(bytes, at), Frame::Good { payload, .. } if parse(payload).is_some())
    })
}

#[derive(Clone, Copy)]
enum Frame<'a> {
    End,
    Good {
        payload: &'a [u8],
        next: usize,
    },
    /// A failed checksum, or a length no frame can have.
    Damaged,
    /// A header or payload past the end.
    Torn,
}

fn frame_at(bytes: &[u8], at: usize) -> Frame<'_> {
    if at >= bytes.len() {
        return Frame::End;
    }
    let Some(header) = bytes.get(at..at.saturating_add(8)) else {
        return Frame::Torn;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > FRAME_MAX_BYTES {
        return Frame::Damaged;
    }
    let start = at + 8;
    let next = start + len as usize;
    let Some(payload) = bytes.get(start..next) else {
        return Frame::Torn;
    };
    if crc32fast::hash(payload) == crc {
        Frame::Good { payload, next }
    } else {
        Frame::Damaged
    }
}

/// Creates `path` (mode 0600, replacing it) holding `bytes`, flushed to disk when `flush`; the
/// handle appends.
pub(crate) fn write_new(path: &Path, bytes: &[u8], flush: bool) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = private_append().create_new(true).open(path)?;
    file.write_all(bytes)?;
    if flush {
        file.sync_data()?;
    }
    Ok(file)
}

/// Flushes a directory's entries (a rename or a new name) to disk.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Opens `path` for appending, creating it (mode 0600) if absent.
pub(crate) fn open_append(path: &Path) -> std::io::Result<File> {
    private_append().create(true).open(path)
}

/// Options for a spool file: appended to, readable by its owner only.
fn private_append() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(payload: &[u8]) -> Option<u8> {
        (payload.len() == 1).then(|| payload[0])
    }

    #[test]
    fn good_frames_are_read_damage_is_skipped_and_a_cut_tail_ends_the_file() {
        let mut bytes = Vec::new();
        push_frame(&mut bytes, &[1]);
        let damaged_at = bytes.len();
        push_frame(&mut bytes, &[2]);
        push_frame(&mut bytes, &[3, 3]); // refused by `parse`: damage too
        push_frame(&mut bytes, &[4]);
        bytes[damaged_at + 8] ^= 0xff; // the payload of frame 2 no longer matches its checksum
        let whole = bytes.len();
        push_frame(&mut bytes, &[5]);
        bytes.truncate(bytes.len() - 1);

        let frames = read(&bytes, parse);
        assert_eq!(frames.entries, vec![1, 4]);
        assert_eq!(
            frames.damaged, 1,
            "one skipped span, resynchronised on frame 4"
        );
        assert!(frames.torn_tail);
        assert_eq!(frames.read, whole);

        let clean = read(&bytes[..whole], parse);
        assert!(!clean.torn_tail);
        assert_eq!(clean.read, whole);
    }
}
