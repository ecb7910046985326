//! The write-ahead log of the embedded store: every committed change, appended to a segment
//! file and synced before the commit is acknowledged. redb then holds the folded views with
//! cheap non-durable commits, made durable by periodic checkpoints; after a crash the
//! entries past the last checkpoint are replayed from here. One fsync of a few appended bytes
//! per group commit replaces the fsync of a dozen rewritten B-tree pages.
//!
//! Segment files are named `wal-<first seq, 20 digits>.log`. Each record is
//! `[u32 length][u32 CRC-32][postcard(LogEntry)]`, little endian. A record cut short by a
//! crash (short, or with a wrong checksum) ends the log: everything before it was synced,
//! nothing after it was acknowledged.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::record::LogEntry;
use crate::store::StoreError;

/// Largest record the log accepts when reading (a longer length field is a torn write).
const MAX_RECORD: u32 = 64 * 1024 * 1024;

/// An open write-ahead log.
#[derive(Debug)]
pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    /// Bytes in the current segment.
    len: u64,
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
/// cut short, or with a wrong checksum). A record whose checksum holds but whose entry does
/// not decode is corruption, not a torn write: an error.
pub(crate) fn decode_segment(bytes: &[u8], out: &mut Vec<LogEntry>) -> Result<(), String> {
    let mut at = 0usize;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let end = at + 8 + len as usize;
        if len > MAX_RECORD || end > bytes.len() {
            break;
        }
        let payload = &bytes[at + 8..end];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let entry: LogEntry = postcard::from_bytes(payload).map_err(|e| e.to_string())?;
        out.push(entry);
        at = end;
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
            decode_segment(&bytes, &mut out)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
        }
        Ok(out)
    }

    /// Starts a new segment for entries from `first_seq` on and removes every older segment
    /// (their entries must be durable in the views already).
    pub(crate) fn start(dir: &Path, first_seq: u64) -> Result<Wal, StoreError> {
        crate::files::private_dir(dir).map_err(|e| io_err("creating", dir, e))?;
        let path = dir.join(segment_name(first_seq));
        let file = crate::files::private_options()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err("creating", &path, e))?;
        sync_dir(dir)?;
        for (_, old) in segments(dir)? {
            if old != path {
                std::fs::remove_file(&old).map_err(|e| io_err("removing", &old, e))?;
            }
        }
        Ok(Wal {
            dir: dir.to_owned(),
            file,
            path,
            len: 0,
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
            let payload = postcard::to_stdvec(e.as_ref()).expect("log entries serialize");
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.cut_back();
            return Err(io_err("appending to", &self.path, e));
        }
        self.len += buf.len() as u64;
        Ok(buf.len() as u64)
    }

    /// Removes the last `bytes` appended (a group whose views could not be committed).
    pub(crate) fn undo(&mut self, bytes: u64) {
        self.len = self.len.saturating_sub(bytes);
        self.cut_back();
    }

    fn cut_back(&mut self) {
        use std::io::{Seek, SeekFrom};
        let r = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = r {
            tracing::error!(error = %e, path = %self.path.display(), "cutting back the write-ahead log failed");
        }
    }

    /// Bytes in the current segment.
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
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]).unwrap();
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
        wal.append(&[entry(2)]).unwrap();
        assert_eq!(Wal::read_all(dir.path()).unwrap().len(), 2);
        let _next = Wal::start(dir.path(), 3).unwrap();
        assert!(Wal::read_all(dir.path()).unwrap().is_empty());
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }
}
