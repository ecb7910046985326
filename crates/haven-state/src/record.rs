//! Records, stream events and change-log entries: the data model every backend stores and every
//! reader of the change log (replication, backup, restore) understands.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::Hlc;

/// Where a write was made: the region and node whose clock stamped it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// Region name, e.g. `eu-west`.
    pub region: Arc<str>,
    /// Node id within the region.
    pub node: Arc<str>,
}

impl Origin {
    /// An origin for `region` and `node`.
    pub fn new(region: impl Into<Arc<str>>, node: impl Into<Arc<str>>) -> Origin {
        Origin {
            region: region.into(),
            node: node.into(),
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.region, self.node)
    }
}

/// The version of a record: its timestamp, ties broken by origin. Greater wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// When the write was made.
    pub hlc: Hlc,
    /// Who made it.
    pub origin: Origin,
}

/// One key's value (or tombstone) at one version: a last-writer-wins register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Namespace, e.g. `sessions`, `tasks`, `notes`.
    pub namespace: String,
    /// Key within the namespace.
    pub key: String,
    /// Version that decides which copy wins a merge.
    pub version: Version,
    /// The value; `None` is a tombstone (the key was deleted).
    pub value: Option<Vec<u8>>,
    /// Wall-clock millisecond after which the record reads as absent (time-to-live).
    pub expires_at_millis: Option<u64>,
}

impl Record {
    /// Whether this record is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Whether the record reads as present at wall-clock `now_millis`.
    pub fn is_live(&self, now_millis: u64) -> bool {
        self.value.is_some() && self.expires_at_millis.is_none_or(|at| now_millis < at)
    }

    /// Total order used by [`merge`]: version first; identical versions (which a correct system
    /// never produces for different content) are ordered by content so that merge stays a
    /// deterministic function of its inputs.
    fn merge_order(&self, other: &Record) -> Ordering {
        self.version
            .cmp(&other.version)
            .then_with(|| self.value.cmp(&other.value))
            .then_with(|| self.expires_at_millis.cmp(&other.expires_at_millis))
    }

    /// Whether `self` would replace `current` in a merge.
    pub fn supersedes(&self, current: &Record) -> bool {
        self.merge_order(current) == Ordering::Greater
    }
}

/// Merges two copies of the same key: the last writer wins. Commutative, associative and
/// idempotent (see the property tests).
pub fn merge(a: Record, b: Record) -> Record {
    debug_assert_eq!((&a.namespace, &a.key), (&b.namespace, &b.key));
    if b.merge_order(&a) == Ordering::Greater {
        b
    } else {
        a
    }
}

/// One event of an append-only stream (for example one SSE event of an MCP response stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEvent {
    /// Stream the event belongs to.
    pub stream: String,
    /// Position in the stream, starting at 1, dense.
    pub index: u64,
    /// Version of the write that appended it.
    pub version: Version,
    /// The event's payload.
    pub data: Vec<u8>,
}

impl StreamEvent {
    /// Whether `self` would replace `current` (same stream and index) in a merge: greater
    /// version wins, ties broken by content so that merging stays deterministic.
    pub fn supersedes(&self, current: &StreamEvent) -> bool {
        (&self.version, &self.data) > (&current.version, &current.data)
    }
}

/// A change recorded in the change log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A record became the current value of its key.
    Record(Record),
    /// An event was appended to a stream.
    Event(StreamEvent),
}

/// What a change writes to: a key or a stream. A log keeps each one's entries together (one
/// subject per key or stream on JetStream): conditional writes compare against its last
/// entry, and reclamation can remove its old entries at once.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogSubject {
    /// The key `(namespace, key)`.
    Key(String, String),
    /// The stream of that name.
    Stream(String),
}

impl Change {
    /// The key or stream this change writes.
    pub fn subject(&self) -> LogSubject {
        match self {
            Change::Record(r) => LogSubject::Key(r.namespace.clone(), r.key.clone()),
            Change::Event(e) => LogSubject::Stream(e.stream.clone()),
        }
    }

    /// The version of the write behind this change.
    pub fn version(&self) -> &Version {
        match self {
            Change::Record(r) => &r.version,
            Change::Event(e) => &e.version,
        }
    }

    /// The change's encoding (postcard): the form the embedded store keeps it in, and the
    /// one a copy of the log (a backup) takes it in (see [`EncodedEntry`]).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing to a Vec cannot fail")
    }

    /// The change [`encode`](Self::encode) wrote.
    pub fn decode(bytes: &[u8]) -> Result<Change, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A change-log entry with its change encoded ([`Change::encode`]), for copies of the log
/// that need not decode it. Its postcard encoding is that of the [`LogEntry`] it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedEntry {
    /// Position in the change log.
    pub seq: u64,
    /// The change, encoded.
    pub change: Vec<u8>,
}

impl EncodedEntry {
    /// Appends the postcard encoding of the [`LogEntry`] this stands for to `out`: its
    /// sequence (a varint), then the change as encoded.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        *out = postcard::to_extend(&self.seq, std::mem::take(out))
            .expect("serializing to a Vec cannot fail");
        out.extend_from_slice(&self.change);
    }

    /// The change, decoded.
    pub fn decode(&self) -> Result<LogEntry, postcard::Error> {
        Ok(LogEntry {
            seq: self.seq,
            change: Change::decode(&self.change)?,
        })
    }
}

/// An entry of the change log: a change and its sequence number in this store's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the change log, starting at 1, dense.
    pub seq: u64,
    /// What changed.
    pub change: Change,
}

/// A record as stored, with the revision (change-log sequence) that made it current here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The record.
    pub record: Record,
    /// Sequence number of the log entry that wrote it; what conditional writes compare against.
    pub revision: u64,
}

impl StoredRecord {
    /// The value bytes; empty for a tombstone (callers normally only see live records).
    pub fn value(&self) -> &[u8] {
        self.record.value.as_deref().unwrap_or_default()
    }
}

/// The folded view of a set of changes: the winning record per key and the union of stream
/// events. What every replica converges to, whatever order it receives the changes in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Winning record per (namespace, key), tombstones included.
    pub records: BTreeMap<(String, String), Record>,
    /// Events per (stream, index).
    pub events: BTreeMap<(String, u64), StreamEvent>,
}

impl View {
    /// Folds one change into the view; returns whether the view changed.
    pub fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::Record(r) => {
                let k = (r.namespace.clone(), r.key.clone());
                match self.records.get(&k) {
                    Some(cur) if !r.supersedes(cur) => false,
                    _ => {
                        self.records.insert(k, r.clone());
                        true
                    }
                }
            }
            Change::Event(e) => {
                let k = (e.stream.clone(), e.index);
                match self.events.get(&k) {
                    Some(cur) if !e.supersedes(cur) => false,
                    _ => {
                        self.events.insert(k, e.clone());
                        true
                    }
                }
            }
        }
    }

    /// Merges another view into this one.
    pub fn merge(&mut self, other: &View) {
        for r in other.records.values() {
            self.apply(&Change::Record(r.clone()));
        }
        for e in other.events.values() {
            self.apply(&Change::Event(e.clone()));
        }
    }
}
