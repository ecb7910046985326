//! The plaintext inside a sealed backup object: a run of change-log entries. A segment holds
//! every entry of its range, in order; a snapshot holds the entries still current at its
//! sequence (one per key and per stream event), in order.

use haven_state::LogEntry;
use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};
use crate::manifest::{FORMAT, ManifestEntry, ObjectKind};

/// Largest decompressed object accepted (a bound against damaged or hostile objects).
pub const MAX_PLAIN_BYTES: usize = 4 << 30;

#[derive(Serialize, Deserialize)]
struct Payload {
    format: u32,
    kind: ObjectKind,
    first_seq: u64,
    last_seq: u64,
    entries: Vec<LogEntry>,
}

/// Encodes the entries of an object.
pub fn encode(kind: ObjectKind, first_seq: u64, last_seq: u64, entries: &[LogEntry]) -> Vec<u8> {
    #[derive(Serialize)]
    struct PayloadRef<'a> {
        format: u32,
        kind: ObjectKind,
        first_seq: u64,
        last_seq: u64,
        entries: &'a [LogEntry],
    }
    postcard::to_stdvec(&PayloadRef {
        format: FORMAT,
        kind,
        first_seq,
        last_seq,
        entries,
    })
    .expect("serializing to a Vec cannot fail")
}

/// Decodes an object's entries and checks them against its manifest entry: same kind and
/// range, sequences increasing inside the range, and for a segment every sequence present.
pub fn decode(entry: &ManifestEntry, plain: &[u8]) -> Result<Vec<LogEntry>> {
    let damaged = |reason: String| BackupError::Damaged {
        object: entry.object.clone(),
        reason,
    };
    let p: Payload =
        postcard::from_bytes(plain).map_err(|e| damaged(format!("cannot decode: {e}")))?;
    if p.format != FORMAT {
        return Err(damaged(format!(
            "format {} is not supported (this Haven reads format {FORMAT})",
            p.format
        )));
    }
    if p.kind != entry.kind || p.first_seq != entry.first_seq || p.last_seq != entry.last_seq {
        return Err(damaged(format!(
            "holds {:?} {}..={}, the manifest says {:?} {}..={}",
            p.kind, p.first_seq, p.last_seq, entry.kind, entry.first_seq, entry.last_seq
        )));
    }
    if p.entries.len() as u64 != entry.items {
        return Err(damaged(format!(
            "holds {} entries, the manifest says {}",
            p.entries.len(),
            entry.items
        )));
    }
    let mut prev = match entry.kind {
        ObjectKind::Segment => entry.first_seq.saturating_sub(1),
        ObjectKind::Snapshot => 0,
    };
    for e in &p.entries {
        let ok = match entry.kind {
            ObjectKind::Segment => prev.checked_add(1) == Some(e.seq),
            ObjectKind::Snapshot => e.seq > prev && e.seq <= entry.last_seq,
        };
        if !ok {
            return Err(damaged(format!(
                "entry {} out of place after {prev}",
                e.seq
            )));
        }
        prev = e.seq;
    }
    if entry.kind == ObjectKind::Segment && prev != entry.last_seq {
        return Err(damaged(format!(
            "ends at sequence {prev}, the manifest says {}",
            entry.last_seq
        )));
    }
    Ok(p.entries)
}
