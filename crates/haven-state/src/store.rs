//! The `Store` trait: what Haven needs from a durable, replicated state backend.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

use crate::clock::{Hlc, HybridClock};
use crate::record::{LogEntry, Origin, Record, StoredRecord, StreamEvent};

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write found a different revision than it expected. Nothing was written.
    #[error("conflict on {namespace}/{key}: expected {expected}, found {found}")]
    Conflict {
        /// Namespace of the key.
        namespace: String,
        /// The key.
        key: String,
        /// What the write expected.
        expected: String,
        /// What the store holds.
        found: String,
    },
    /// The storage medium is full. Nothing was written; earlier acknowledged writes are intact.
    #[error("storage is full, the write was refused: {0}")]
    Full(String),
    /// The backend cannot take writes or serve reads right now (I/O error, lost quorum).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The request itself is invalid (empty namespace, oversized value, …).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// Stored bytes could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The store was shut down.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Whether the error is transient: the same write may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Full(_) | StoreError::Unavailable(_) | StoreError::Closed
        )
    }
}

/// Result alias of the state layer.
pub type StoreResult<T> = Result<T, StoreError>;

/// Precondition of a write on the current state of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No precondition.
    Any,
    /// The key has no live record (never written, deleted or expired).
    Absent,
    /// The key's live record has exactly this revision.
    Revision(u64),
}

/// One operation of a [`Batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write a value, stamped with a new local version.
    Put {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// Value bytes.
        value: Vec<u8>,
        /// Precondition.
        expect: Expect,
        /// Time-to-live in milliseconds, after which the record reads as absent.
        ttl_millis: Option<u64>,
    },
    /// Write a tombstone, stamped with a new local version.
    Delete {
        /// Namespace.
        namespace: String,
        /// Key.
        key: String,
        /// Precondition.
        expect: Expect,
    },
    /// Append an event to a stream at the next index.
    Append {
        /// Stream name.
        stream: String,
        /// Payload.
        data: Vec<u8>,
    },
    /// Merge a record written elsewhere (replication, restore): it becomes current only if its
    /// version is greater than the current one. Keeps its own version.
    Merge(Record),
    /// Merge a stream event written elsewhere; a no-op if the store already holds it.
    MergeEvent(StreamEvent),
}

impl Op {
    /// The key a local write (`Put` or `Delete`) names and its precondition; `None` for the
    /// other operations, which have none.
    pub fn precondition(&self) -> Option<(&str, &str, Expect)> {
        match self {
            Op::Put {
                namespace,
                key,
                expect,
                ..
            }
            | Op::Delete {
                namespace,
                key,
                expect,
            } => Some((namespace, key, *expect)),
            _ => None,
        }
    }
}

/// Operations committed atomically: all preconditions hold and all operations are durable, or
/// none is applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The operations, applied in order. Preconditions are checked against the state before the
    /// batch.
    pub ops: Vec<Op>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Adds a put without precondition.
    pub fn put(self, namespace: &str, key: &str, value: Vec<u8>) -> Batch {
        self.put_if(namespace, key, value, Expect::Any)
    }

    /// Adds a conditional put.
    pub fn put_if(mut self, namespace: &str, key: &str, value: Vec<u8>, expect: Expect) -> Batch {
        self.ops.push(Op::Put {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            value,
            expect,
            ttl_millis: None,
        });
        self
    }

    /// Adds a put with a time-to-live.
    pub fn put_ttl(mut self, namespace: &str, key: &str, value: Vec<u8>, ttl_millis: u64) -> Batch {
        self.ops.push(Op::Put {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            value,
            expect: Expect::Any,
            ttl_millis: Some(ttl_millis),
        });
        self
    }

    /// Adds a delete without precondition.
    pub fn delete(self, namespace: &str, key: &str) -> Batch {
        self.delete_if(namespace, key, Expect::Any)
    }

    /// Adds a conditional delete.
    pub fn delete_if(mut self, namespace: &str, key: &str, expect: Expect) -> Batch {
        self.ops.push(Op::Delete {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            expect,
        });
        self
    }

    /// Adds an append to `stream`.
    pub fn append(mut self, stream: &str, data: Vec<u8>) -> Batch {
        self.ops.push(Op::Append {
            stream: stream.to_owned(),
            data,
        });
        self
    }

    /// Whether the batch has no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What a committed batch produced, one entry per operation, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A put or delete (or a merged record that won): the new revision.
    Written {
        /// Revision of the key after the write.
        revision: u64,
    },
    /// An append: the event's index in its stream and its log sequence.
    Appended {
        /// Index of the event in its stream.
        index: u64,
        /// Its change-log sequence.
        seq: u64,
        /// Its version's timestamp: with the index, it names the event in every copy of the
        /// log (a replica, a backup, a region restored from it), and tells it from another
        /// event written at the same index in a history restored to an earlier point.
        hlc: Hlc,
    },
    /// A merge that changed nothing (the store already held this or a newer version).
    Unchanged,
}

/// The acknowledgement of a durable commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Sequence of the last change-log entry after the commit.
    pub last_seq: u64,
    /// One outcome per operation.
    pub outcomes: Vec<Outcome>,
}

/// A page of a scan.
#[derive(Clone, Debug, Default)]
pub struct ScanPage {
    /// Live records, ordered by key.
    pub records: Vec<StoredRecord>,
    /// Key to pass as `after` for the next page, if there may be more.
    pub next_after: Option<String>,
}

/// Durable, conditional, watchable state. Every write is acknowledged only once durable.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Who this store stamps local writes as.
    fn origin(&self) -> &Origin;

    /// The clock that stamps local writes.
    fn clock(&self) -> &Arc<HybridClock>;

    /// The live record of `namespace`/`key`, if any.
    async fn get(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        let now = self.clock().wall_millis();
        Ok(self
            .get_raw(namespace, key)
            .await?
            .filter(|r| r.record.is_live(now)))
    }

    /// The record of `namespace`/`key` including tombstones and expired records.
    async fn get_raw(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>>;

    /// Live records of `namespace` whose key starts with `prefix`, after key `after`, at most
    /// `limit` of them.
    async fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ScanPage>;

    /// Every live record of `namespace` whose key starts with `prefix`, in key order (all
    /// pages of [`Store::scan`]).
    async fn scan_all(&self, namespace: &str, prefix: &str) -> StoreResult<Vec<StoredRecord>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.scan(namespace, prefix, after.as_deref(), 512).await?;
            out.extend(page.records);
            match page.next_after {
                Some(a) => after = Some(a),
                None => return Ok(out),
            }
        }
    }

    /// Applies `batch` atomically and durably.
    async fn commit(&self, batch: Batch) -> StoreResult<Commit>;

    /// Events of `stream` with index greater than `after`, at most `limit`.
    async fn read_events(
        &self,
        stream: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<StreamEvent>>;

    /// Change-log entries with sequence at least `from_seq`, at most `limit`.
    async fn read_log(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<LogEntry>>;

    /// The entries [`read_log`](Self::read_log) returns, each with its change encoded
    /// ([`Change::encode`](crate::Change::encode)): for copies of the log (backups), which
    /// need not decode it. The default encodes what `read_log` returns; a store that keeps
    /// changes so encoded hands them over as they are kept.
    async fn read_log_encoded(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> StoreResult<Vec<crate::EncodedEntry>> {
        Ok(self
            .read_log(from_seq, limit)
            .await?
            .into_iter()
            .map(|e| crate::EncodedEntry {
                seq: e.seq,
                change: e.change.encode(),
            })
            .collect())
    }

    /// Sequence of the last entry of the change log (0 when empty).
    async fn last_seq(&self) -> StoreResult<u64>;

    /// Live feed of committed change-log entries, in order. Receivers that fall behind get
    /// `Lagged` and catch up with [`Store::read_log`]; [`watch`] does that for them.
    fn subscribe(&self) -> broadcast::Receiver<Arc<LogEntry>>;

    /// Checks that the store can take a durable write right now.
    async fn check_writable(&self) -> StoreResult<()>;

    /// Brings this node's view up to every write acknowledged before the call, on any node:
    /// reads that do not wait by themselves ([`Store::read_events`], a [`Store::get_raw`] of a
    /// key this node holds) then see them. A store that one process alone writes always sees
    /// them.
    async fn sync(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Whether several nodes share this store (a cluster): then node-local files cannot hold
    /// state that belongs to the region.
    fn shared(&self) -> bool {
        false
    }

    /// What the backend is and how healthy it is, for status pages (JSON).
    async fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "backend": "embedded" })
    }

    /// The current state as change-log entries, read at one consistent point: the entry that
    /// made each key's record current (tombstones and expired records included) and every
    /// stream event, in sequence order, with the log's last sequence at that point. Replaying
    /// these entries into an empty store rebuilds the same views; backups snapshot with it.
    ///
    /// The default implementation folds the whole change log.
    async fn state_entries(&self) -> StoreResult<(u64, Vec<LogEntry>)> {
        let mut fold = LogFold::default();
        let mut next = 1;
        loop {
            let entries = self.read_log(next, 4096).await?;
            let Some(last) = entries.last() else { break };
            next = last.seq + 1;
            for e in entries {
                fold.apply(e);
            }
        }
        Ok((next - 1, fold.into_entries()))
    }

    /// One bounded step of reclamation (see [`Reclaim`]): removes what no reader needs any
    /// more, examining at most `reclaim.step` items of each kind. Call it again while
    /// [`Reclaimed::done`] is false. A backend that does not reclaim yet answers
    /// [`StoreError::Invalid`] and keeps everything.
    async fn reclaim(&self, reclaim: &Reclaim) -> StoreResult<Reclaimed> {
        let _ = reclaim;
        Err(StoreError::Invalid(
            "this backend does not reclaim storage yet; it keeps its whole history".into(),
        ))
    }
}

/// What a reclamation step may remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reclaim {
    /// Change-log entries below this sequence are needed by no reader any more (backups
    /// shipped them): those no longer current (a record's superseded version, an event
    /// removed) are removed. The backend never removes its last entry.
    pub log_floor: u64,
    /// Wall-clock now, Unix milliseconds.
    pub now_millis: u64,
    /// Records expired longer ago than this are removed (they already read as absent).
    pub expired_grace_millis: u64,
    /// Tombstones older than this (by their timestamp) are removed.
    pub tombstone_retention_millis: u64,
    /// Stream events older than this (by their timestamp) are removed, except each stream's
    /// last, which keeps the stream's position.
    pub event_retention_millis: u64,
    /// Most items of each kind examined in one step.
    pub step: usize,
    /// Whether this node removes change-log entries. One node of a region does for a log
    /// the region's nodes share (the others only forget in memory what no reader needs); a
    /// store of one node always does.
    pub trim_log: bool,
}

/// What a reclamation step removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reclaimed {
    /// Change-log entries removed.
    pub log_entries: u64,
    /// Expired records and old tombstones removed.
    pub records: u64,
    /// Stream events removed.
    pub events: u64,
    /// Whether this pass over the store is complete (the next step starts a new one).
    pub done: bool,
}

/// Puts `entry` in its place unless the entry there supersedes it; returns whether it did.
fn fold_into<K>(
    place: std::collections::hash_map::Entry<'_, K, LogEntry>,
    entry: LogEntry,
) -> bool {
    use std::collections::hash_map::Entry;
    match place {
        Entry::Occupied(mut o) => {
            let wins = supersedes(&entry.change, &o.get().change);
            if wins {
                o.insert(entry);
            }
            wins
        }
        Entry::Vacant(v) => {
            v.insert(entry);
            true
        }
    }
}

/// Whether `new` replaces `current` at the same place: a later version of a record or an
/// event replaces an earlier one; a change of the other kind is always replaced.
fn supersedes(new: &crate::record::Change, current: &crate::record::Change) -> bool {
    use crate::record::Change;
    match (new, current) {
        (Change::Record(new), Change::Record(current)) => new.supersedes(current),
        (Change::Event(new), Change::Event(current)) => new.supersedes(current),
        (Change::Record(_), Change::Event(_)) | (Change::Event(_), Change::Record(_)) => true,
    }
}

/// The current state folded from change-log entries, keeping for every key and event the
/// entry (with its sequence) that made it current.
#[derive(Clone, Debug, Default)]
pub struct LogFold {
    records: std::collections::HashMap<(String, String), LogEntry>,
    events: std::collections::HashMap<(String, u64), LogEntry>,
    last_seq: u64,
}

impl LogFold {
    /// Folds one entry in; returns whether it became current.
    pub fn apply(&mut self, entry: LogEntry) -> bool {
        self.last_seq = self.last_seq.max(entry.seq);
        match &entry.change {
            crate::record::Change::Record(r) => {
                let key = (r.namespace.clone(), r.key.clone());
                fold_into(self.records.entry(key), entry)
            }
            crate::record::Change::Event(e) => {
                let key = (e.stream.clone(), e.index);
                fold_into(self.events.entry(key), entry)
            }
        }
    }

    /// Greatest sequence folded so far.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Number of current records plus events.
    pub fn len(&self) -> usize {
        self.records.len() + self.events.len()
    }

    /// Whether nothing was folded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current entries in sequence order.
    pub fn into_entries(self) -> Vec<LogEntry> {
        let mut out: Vec<LogEntry> = self
            .records
            .into_values()
            .chain(self.events.into_values())
            .collect();
        out.sort_unstable_by_key(|e| e.seq);
        out
    }

    /// The folded state as a [`crate::record::View`] (without sequences).
    pub fn view(&self) -> crate::record::View {
        let mut view = crate::record::View::default();
        for e in self.records.values().chain(self.events.values()) {
            view.apply(&e.change);
        }
        view
    }
}

/// A watch of the change log from `from_seq` on: first the stored entries, then live ones, in
/// order, without gaps or repeats, whatever the broadcast does.
pub fn watch(
    store: Arc<dyn Store>,
    from_seq: u64,
) -> BoxStream<'static, StoreResult<Arc<LogEntry>>> {
    use futures::StreamExt;
    let stream = async_stream_watch(store, from_seq);
    stream.boxed()
}

fn async_stream_watch(
    store: Arc<dyn Store>,
    from_seq: u64,
) -> impl futures::Stream<Item = StoreResult<Arc<LogEntry>>> {
    struct State {
        store: Arc<dyn Store>,
        rx: broadcast::Receiver<Arc<LogEntry>>,
        next: u64,
        buffer: std::collections::VecDeque<Arc<LogEntry>>,
        catching_up: bool,
    }
    let rx = store.subscribe();
    let state = State {
        store,
        rx,
        next: from_seq.max(1),
        buffer: Default::default(),
        catching_up: true,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.buffer.pop_front() {
                st.next = e.seq + 1;
                return Some((Ok(e), st));
            }
            if st.catching_up {
                match st.store.read_log(st.next, 512).await {
                    Ok(entries) if entries.is_empty() => st.catching_up = false,
                    Ok(entries) => st.buffer.extend(entries.into_iter().map(Arc::new)),
                    Err(e) => return Some((Err(e), st)),
                }
                continue;
            }
            match st.rx.recv().await {
                Ok(e) if e.seq < st.next => continue,
                Ok(e) if e.seq == st.next => {
                    st.next = e.seq + 1;
                    return Some((Ok(e), st));
                }
                // A gap (the entry arrived before we subscribed, or ordering across batches):
                // read the log to fill it.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => st.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
