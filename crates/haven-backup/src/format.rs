//! The plaintext inside a sealed backup object: a run of change-log entries. A segment holds
//! every entry of its range, in order; a snapshot holds the entries still current at its
//! sequence (one per key and per stream event), in order.

use haven_state::{EncodedEntry, LogEntry};
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

/// Encodes a segment from entries whose changes are encoded already: the same bytes as
/// [`encode`] of the decoded entries, without decoding them.
pub fn encode_segment(first_seq: u64, last_seq: u64, entries: &[EncodedEntry]) -> Vec<u8> {
    let size: usize = entries.iter().map(|e| e.change.len() + 10).sum();
    // The payload's fields in order, the entries' count last (a tuple encodes as a struct
    // does, and a sequence's length as a usize).
    let mut out = postcard::to_extend(
        &(
            FORMAT,
            ObjectKind::Segment,
            first_seq,
            last_seq,
            entries.len(),
        ),
        Vec::with_capacity(size + 32),
    )
    .expect("serializing to a Vec cannot fail");
    for e in entries {
        e.encode_into(&mut out);
    }
    out
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

#[cfg(test)]
mod tests {
    use haven_state::{Change, Hlc, Origin, Record, StreamEvent, Version};

    use super::*;

    fn version(millis: u64) -> Version {
        Version {
            hlc: Hlc::new(millis, 3),
            origin: Origin::new("r1", "n1"),
        }
    }

    #[test]
    fn a_segment_of_encoded_entries_is_the_segment_of_the_decoded_ones() {
        let mut entries = Vec::new();
        // Sequences whose varints take one to several bytes.
        for (i, seq) in [1u64, 127, 128, 300, 16_384, 1 << 40, u64::MAX]
            .into_iter()
            .enumerate()
        {
            let change = if i % 2 == 0 {
                Change::Record(Record {
                    namespace: "notes".into(),
                    key: format!("k{i}"),
                    value: Some(vec![i as u8; i * 50]),
                    version: version(1_700_000_000_000 + i as u64),
                    expires_at_millis: None,
                })
            } else {
                Change::Event(StreamEvent {
                    stream: "s".into(),
                    index: i as u64,
                    version: version(1_700_000_000_000 + i as u64),
                    data: vec![7; i * 30],
                })
            };
            entries.push(LogEntry { seq, change });
        }
        let encoded: Vec<EncodedEntry> = entries
            .iter()
            .map(|e| EncodedEntry {
                seq: e.seq,
                change: e.change.encode(),
            })
            .collect();
        assert_eq!(
            encode_segment(1, u64::MAX, &encoded),
            encode(ObjectKind::Segment, 1, u64::MAX, &entries)
        );
        for e in &encoded {
            assert_eq!(
                &e.decode().unwrap(),
                entries.iter().find(|d| d.seq == e.seq).unwrap()
            );
        }
        assert_eq!(
            encode_segment(5, 4, &[]),
            encode(ObjectKind::Segment, 5, 4, &[])
        );
    }
}
