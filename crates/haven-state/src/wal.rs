//! The write-ahead log of the embedded store: every committed change, appended to a segment
//! file and synced before the commit is acknowledged. redb then holds the folded views with
//! cheap non-durable commits, made durable by periodic checkpoints; after a crash the
//! entries past the last checkpoint are replayed from here. One fsync of a few appended bytes
//! per group commit replaces the fsync of a dozen rewritten B-tree pages.
//!
//! Segment files are named `wal-<first seq, 20 digits>.log`. Each record is
//! `[u32 length][u32 CRC-32][postcard(LogEntry)]`, little endian. A record cut short by a
//! crash (short, or with a wrong checksum), a zero length, or an entry whose sequence does
//! not follow on from the one before it ends the segment: everything before it was synced,
//! nothing after it was acknowledged.
//!
//! Appends overwrite bytes the file already has: zeros written ahead of the log's end, or
//! the records of an earlier segment. A checkpoint recycles the segment it ends (renamed to
//! the next one's name and overwritten from its start) instead of creating a file. So an
//! append's sync writes the records' blocks only, never the file's size or block map; on
//! ext4 that is one device write per group commit instead of two. The earlier segment's
//! records left behind the new ones have smaller sequences, so they never follow on; a
//! group that is taken back is overwritten with zeros, so its records cannot either. A
//! recycled segment with no records of its own yet reads as the earlier segment's records,
//! which the views already hold (the checkpoint made them durable), so a restart skips them.
//! That is also why the name's sequence is not required of the first record: when a
//! checkpoint fails after the rename, the log goes on in the renamed file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::record::LogEntry;
use crate::store::StoreError;

/// Largest record the log accepts when reading (a longer length field is a torn write).
const MAX_RECORD: u32 = 64 * 1024 * 1024;

/// Zeros written ahead of the log's end when an append reaches it (with the append, under its
/// sync). A recycled segment keeps its size, so a steady load extends nothing.
const ZERO_AHEAD: u64 = 1024 * 1024;

/// An open write-ahead log.
#[derive(Debug)]
pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    /// Bytes of records in the current segment.
    len: u64,
    /// Bytes the file has (zeros or an earlier segment's records): appends below this
    /// change no file metadata.
    written: u64,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    let text = format!("{what} {}: {e}", path.display());
    if e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull {
        StoreError::Full(text)
    } else {
        StoreError::Unavailable(text)
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("wal-{first_seq:020}.log")
}

fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| io_err("reading", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("reading", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(seq) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        if let Ok(seq) = seq.parse::<u64>() {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing", dir, e))
}

/// Decodes the records of one segment's bytes into `out`, stopping at a torn tail (a record
/// cut short, or with a wrong checksum) or at a zero length (zeros written ahead). With
/// `follow_on`, it also stops at the first entry whose sequence does not follow on from the
/// one before it (an earlier segment's records behind a recycled segment's own). A record
/// whose checksum holds but whose entry does not decode is corruption, not a torn write: an
/// error.
pub(crate) fn decode_segment(
    bytes: &[u8],
    follow_on: bool,
    out: &mut Vec<LogEntry>,
) -> Result<(), String> {
    let mut at = 0usize;
    let mut next: Option<u64> = None;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let end = at + 8 + len as usize;
        if len == 0 || len > MAX_RECORD || end > bytes.len() {
            break;
        }
        let payload = &bytes[at + 8..end];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let entry: LogEntry = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
        if follow_on {
            if next.is_some_and(|seq| entry.seq != seq) {
                break;
            }
            next = entry.seq.checked_add(1);
        }
        out.push(entry);
        at = end;
    }
    Ok(())
}

/// Writes `len` zeros at `offset`.
fn write_zeros(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let chunk = vec![0u8; len.min(ZERO_AHEAD) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl Wal {
    /// Reads every entry of the log in `dir`, in order, stopping at a torn tail.
    pub(crate) fn read_all(dir: &Path) -> Result<Vec<LogEntry>, StoreError> {
        let mut out = Vec::new();
        for (_, path) in segments(dir)? {
            let mut bytes = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(|e| io_err("reading", &path, e))?;
            decode_segment(&bytes, true, &mut out)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
        }
        Ok(out)
    }

    /// Starts a new segment for entries from `first_seq` on: the newest older segment is
    /// renamed to it and overwritten from its start, every other one is removed (their
    /// entries must be durable in the views already). The rename is synced before anything
    /// is appended, so that a crash never leaves new records under an old name.
    pub(crate) fn start(dir: &Path, first_seq: u64) -> Result<Wal, StoreError> {
        crate::files::private_dir(dir).map_err(|e| io_err("creating", dir, e))?;
        let path = dir.join(segment_name(first_seq));
        let old = segments(dir)?;
        if !old.iter().any(|(_, p)| *p == path)
            && let Some((_, recycled)) = old.last()
        {
            std::fs::rename(recycled, &path).map_err(|e| io_err("renaming", recycled, e))?;
        }
        let file = crate::files::private_options()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("creating", &path, e))?;
        let written = file
            .metadata()
            .map_err(|e| io_err("reading", &path, e))?
            .len();
        sync_dir(dir)?;
        for (_, other) in segments(dir)? {
            if other != path {
                std::fs::remove_file(&other).map_err(|e| io_err("removing", &other, e))?;
            }
        }
        Ok(Wal {
            dir: dir.to_owned(),
            file,
            path,
            len: 0,
            written,
        })
    }

    /// Appends `entries` and syncs them to disk; returns the bytes written. On failure the
    /// segment is cut back to where it was, so that nothing of a failed group survives.
    pub(crate) fn append(
        &mut self,
        entries: &[std::sync::Arc<LogEntry>],
    ) -> Result<u64, StoreError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::with_capacity(entries.len() * 128);
        for e in entries {
            // Each entry: its length, its CRC, then its bytes, encoded in place.
            let start = buf.len();
            buf.extend_from_slice(&[0; 8]);
            buf = postcard::to_extend(e.as_ref(), buf).expect("log entries serialize");
            let payload = &buf[start + 8..];
            let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
            buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
            buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        }
        let end = self.len + buf.len() as u64;
        if end > self.written {
            // Zeros ahead of the end, so that the next appends overwrite written blocks. Not
            // needed for this append: on a nearly full disk the records alone may still fit.
            let ahead = end.max(self.written + ZERO_AHEAD);
            if write_zeros(&self.file, self.written, ahead - self.written).is_ok() {
                self.written = ahead;
            }
        }
        let written = self
            .file
            .write_all_at(&buf, self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.cut_back(buf.len() as u64);
            return Err(io_err("appending to", &self.path, e));
        }
        self.written = self.written.max(end);
        self.len = end;
        Ok(buf.len() as u64)
    }

    /// Removes the last `bytes` appended (a group whose views could not be committed).
    pub(crate) fn undo(&mut self, bytes: u64) {
        self.len = self.len.saturating_sub(bytes);
        self.cut_back(bytes);
    }

    /// Overwrites the `bytes` after the log's end with zeros: the records of a group taken
    /// back must not be read, even where the next group's records end exactly before one.
    fn cut_back(&mut self, bytes: u64) {
        // Only what the file has: zeros past its end would grow it (on a full disk, too).
        let r = self
            .file
            .metadata()
            .and_then(|m| {
                let end = (self.len + bytes).min(m.len());
                write_zeros(&self.file, self.len, end.saturating_sub(self.len))
            })
            .and_then(|()| self.file.sync_data());
        if let Err(e) = r {
            tracing::error!(error = %e, path = %self.path.display(), "cutting back the write-ahead log failed");
        }
    }

    /// Bytes of records in the current segment.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The log's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Hlc;
    use crate::record::{Change, Origin, StreamEvent, Version};

    fn entry(seq: u64) -> Arc<LogEntry> {
        Arc::new(LogEntry {
            seq,
            change: Change::Event(StreamEvent {
                stream: "s".into(),
                index: seq,
                version: Version {
                    hlc: Hlc::new(seq, 0),
                    origin: Origin::new("r", "n"),
                },
                data: vec![seq as u8; 10],
            }),
        })
    }

    #[test]
    fn reads_back_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1).unwrap();
        wal.append(&[entry(1), entry(2)]).unwrap();
        wal.append(&[entry(3)]).unwrap();
        // A crash in the middle of the next append leaves part of a record.
        let path = dir.path().join(segment_name(1));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9], wal.len())
            .unwrap();
        let read = Wal::read_all(dir.path()).unwrap();
        assert_eq!(
            read.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // A flipped bit is caught by the checksum.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[12] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Wal::read_all(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn undo_removes_the_last_group_and_start_drops_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1).unwrap();
        wal.append(&[entry(1)]).unwrap();
        let n = wal.append(&[entry(2), entry(3)]).unwrap();
        wal.undo(n);
        // The next group reuses sequence 2 with a record as long as the one taken back: what
        // follows it must not be the taken-back record 3 (it was overwritten with zeros).
        wal.append(&[entry(2)]).unwrap();
        assert_eq!(seqs(dir.path()), vec![1, 2]);
        let mut next = Wal::start(dir.path(), 3).unwrap();
        next.append(&[entry(3)]).unwrap();
        assert_eq!(seqs(dir.path()), vec![3]);
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn the_log_goes_on_in_a_segment_renamed_by_a_failed_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1).unwrap();
        wal.append(&[entry(1), entry(2)]).unwrap();
        // A checkpoint renamed the segment, then failed: the open log appends on in it.
        std::fs::rename(
            dir.path().join(segment_name(1)),
            dir.path().join(segment_name(3)),
        )
        .unwrap();
        wal.append(&[entry(3)]).unwrap();
        assert_eq!(seqs(dir.path()), vec![1, 2, 3]);
    }

    fn seqs(dir: &Path) -> Vec<u64> {
        Wal::read_all(dir).unwrap().iter().map(|e| e.seq).collect()
    }

    #[test]
    fn appends_overwrite_zeros_written_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1).unwrap();
        wal.append(&[entry(1)]).unwrap();
        let path = dir.path().join(segment_name(1));
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size >= ZERO_AHEAD, "zeros are written ahead: {size}");
        wal.append(&[entry(2), entry(3)]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        assert_eq!(seqs(dir.path()), vec![1, 2, 3]);
        // A group larger than what is left extends the file and still reads back whole.
        let big: Vec<_> = (4..4 + 50_000).map(entry).collect();
        wal.append(&big).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > size);
        assert_eq!(seqs(dir.path()).len(), 3 + 50_000);
    }

    #[test]
    fn a_recycled_segment_reads_its_own_records_not_the_older_ones_behind_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::start(dir.path(), 1).unwrap();
        wal.append(&[entry(1), entry(2), entry(3)]).unwrap();
        let old = dir.path().join(segment_name(1));
        let size = std::fs::metadata(&old).unwrap().len();
        // The checkpoint's new segment is the old file, renamed; its records are still there.
        let mut wal = Wal::start(dir.path(), 4).unwrap();
        assert!(!old.exists());
        let path = dir.path().join(segment_name(4));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        // Until something is appended it reads as the earlier segment (already durable in
        // the views, so a restart skips it).
        assert_eq!(seqs(dir.path()), vec![1, 2, 3]);
        // One record overwrites the first of them; the two behind it do not follow on.
        wal.append(&[entry(4)]).unwrap();
        assert_eq!(seqs(dir.path()), vec![4]);
        wal.append(&[entry(5), entry(6), entry(7)]).unwrap();
        assert_eq!(seqs(dir.path()), vec![4, 5, 6, 7]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        // Starting again at the same sequence (nothing appended) keeps the file.
        let _same = Wal::start(dir.path(), 8).unwrap();
        let _again = Wal::start(dir.path(), 8).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        assert_eq!(seqs(dir.path()), vec![4, 5, 6, 7]);
    }
}
