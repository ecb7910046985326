//! The distributed backend: the change log is a replicated NATS JetStream stream (one per
//! region), and every node keeps a local index of it.
//!
//! - **Log.** Stream `HAVEN_<REGION>` on subjects `hv.<region>.>`; stream sequence = log
//!   sequence. A record write is a message on `hv.<region>.k.<ns>.<key>`, an event on
//!   `hv.<region>.e.<stream>` (tokens are `_` + hex, so any string is a valid token). The
//!   payload is the postcard-encoded [`Change`], version included.
//! - **Commit.** Every batch is one JetStream atomic batch (server >= 2.12): all its messages
//!   are stored on consecutive sequences or none is. Preconditions are per-subject
//!   `Nats-Expected-Last-Subject-Sequence` headers, checked by the stream leader under its lock,
//!   so two nodes never both win a compare-and-set. A commit is acknowledged after the stream
//!   replicated it to a quorum (and synced it, with `sync_interval: always`).
//! - **Index.** Each node follows the stream with an ordered consumer and folds it into an
//!   in-memory index (current record per key, last write per key, events per stream), applying
//!   a batch only once its commit message arrived. Reads are served from it. A commit returns
//!   after the index has applied it, so a node reads its own writes; a read that finds no
//!   record first catches up with the stream, so a session created on another node is found.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::RwLock;
use tokio::sync::{broadcast, watch};

use crate::clock::HybridClock;
use crate::record::{Change, LogEntry, Origin, Record, StoredRecord, StreamEvent, Version};
use crate::store::{Batch, Commit, Expect, Op, Outcome, ScanPage, Store, StoreError, StoreResult};

/// Most operations one commit may hold (JetStream's atomic batch limit).
pub const MAX_BATCH_OPS: usize = 1000;
/// How long a commit waits for the stream's answer.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a commit whose preconditions were checked against a stale index is retried.
const CONFLICT_RETRIES: usize = 5;

/// Settings of the JetStream backend.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URLs, e.g. `nats://127.0.0.1:4222`.
    pub servers: Vec<String>,
    /// Region name: one stream per region.
    pub region: String,
    /// Stream replicas (3 in production: a write survives the loss of any one server).
    pub replicas: usize,
}

fn token(s: &str) -> String {
    let mut t = String::with_capacity(1 + 2 * s.len());
    t.push('_');
    t.push_str(&hex::encode(s.as_bytes()));
    t
}

fn untoken(t: &str) -> Option<String> {
    let bytes = hex::decode(t.strip_prefix('_')?).ok()?;
    String::from_utf8(bytes).ok()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("NATS: {e}"))
}

/// The in-memory index of the stream.
#[derive(Default)]
struct Index {
    /// Current (last-writer-wins) record per key, with the sequence of the last message on
    /// the key's subject (what conditional writes compare against).
    records: BTreeMap<(String, String), StoredRecord>,
    /// Events per (stream, index): their log sequence and content.
    events: BTreeMap<(String, u64), (u64, StreamEvent)>,
    /// Last event index and the sequence of the last message per event stream.
    stream_heads: HashMap<String, (u64, u64)>,
    /// Last applied sequence.
    applied: u64,
    /// Messages of a batch whose commit has not arrived yet.
    pending: Vec<LogEntry>,
}

impl Index {
    fn apply(&mut self, entry: &LogEntry) {
        match &entry.change {
            Change::Record(r) => {
                let k = (r.namespace.clone(), r.key.clone());
                match self.records.get_mut(&k) {
                    Some(cur) => {
                        if r.supersedes(&cur.record) {
                            cur.record = r.clone();
                        }
                        cur.revision = entry.seq;
                    }
                    None => {
                        self.records.insert(
                            k,
                            StoredRecord {
                                record: r.clone(),
                                revision: entry.seq,
                            },
                        );
                    }
                }
            }
            Change::Event(e) => {
                let k = (e.stream.clone(), e.index);
                let replace = match self.events.get(&k) {
                    Some((_, cur)) => e.supersedes(cur),
                    None => true,
                };
                if replace {
                    self.events.insert(k, (entry.seq, e.clone()));
                }
                let head = self.stream_heads.entry(e.stream.clone()).or_insert((0, 0));
                head.0 = head.0.max(e.index);
                head.1 = entry.seq;
            }
        }
        self.applied = self.applied.max(entry.seq);
    }
}

struct Shared {
    index: RwLock<Index>,
    applied: watch::Sender<u64>,
    feed: broadcast::Sender<Arc<LogEntry>>,
    clock: Arc<HybridClock>,
    /// Set when the follower cannot read the stream (shown by `check_writable`).
    follower_error: RwLock<Option<String>>,
    /// Asks the follower to recreate its consumer (it seems stuck, e.g. after its server died).
    kick: tokio::sync::Notify,
}

/// Store on a NATS JetStream stream.
pub struct NatsStore {
    origin: Origin,
    clock: Arc<HybridClock>,
    client: async_nats::Client,
    js: jetstream::Context,
    stream_name: String,
    prefix: String,
    shared: Arc<Shared>,
    follower: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("origin", &self.origin)
            .field("stream", &self.stream_name)
            .finish()
    }
}

impl Drop for NatsStore {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// Stream name of `region`.
pub fn stream_name(region: &str) -> String {
    let mut name = String::from("HAVEN_");
    for c in region.chars() {
        name.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
    }
    name
}

impl NatsStore {
    /// Connects, creates the region's stream if missing, and builds the index from it.
    pub async fn open(
        config: &NatsConfig,
        origin: Origin,
        clock: Arc<HybridClock>,
    ) -> StoreResult<NatsStore> {
        if config.servers.is_empty() {
            return Err(StoreError::Invalid("no NATS server given".into()));
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(COMMIT_TIMEOUT))
            .retry_on_initial_connect()
            .connect(config.servers.clone())
            .await
            .map_err(unavailable)?;
        let js = jetstream::new(client.clone());
        let stream_name = stream_name(&config.region);
        let prefix = format!("hv.{}", token(&config.region));
        let stream_config = stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}.>")],
            num_replicas: config.replicas,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            deny_delete: true,
            deny_purge: true,
            allow_direct: true,
            allow_atomic_publish: true,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match js.get_or_create_stream(stream_config.clone()).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "waiting for JetStream");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(unavailable(format!("creating stream {stream_name}: {e}"))),
            }
        }
        let (applied, _) = watch::channel(0);
        let (feed, _) = broadcast::channel(8192);
        let shared = Arc::new(Shared {
            index: RwLock::new(Index::default()),
            applied,
            feed,
            clock: clock.clone(),
            follower_error: RwLock::new(None),
            kick: tokio::sync::Notify::new(),
        });
        let follower = tokio::spawn(follow(
            js.clone(),
            stream_name.clone(),
            prefix.clone(),
            shared.clone(),
        ));
        let store = NatsStore {
            origin,
            clock,
            client,
            js,
            stream_name,
            prefix,
            shared,
            follower,
        };
        // Serve nothing until the index holds the whole stream as of now.
        store.catch_up(Duration::from_secs(60)).await?;
        Ok(store)
    }

    fn record_subject(&self, ns: &str, key: &str) -> String {
        format!("{}.k.{}.{}", self.prefix, token(ns), token(key))
    }

    fn event_subject(&self, stream: &str) -> String {
        format!("{}.e.{}", self.prefix, token(stream))
    }

    /// The stream's last sequence, from its leader.
    async fn stream_last_seq(&self) -> StoreResult<u64> {
        // `get_stream` is one STREAM.INFO round trip; its answer is the cached info.
        let s = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(unavailable)?;
        Ok(s.cached_info().state.last_sequence)
    }

    /// Waits until the index has applied sequence `seq`.
    async fn wait_applied(&self, seq: u64, timeout: Duration) -> StoreResult<()> {
        let mut rx = self.shared.applied.subscribe();
        // A follower that has not moved for a second may be stuck on a consumer whose server
        // died: have it start over from where it is, then go on waiting.
        let first = timeout.min(Duration::from_secs(1));
        if let Ok(r) = tokio::time::timeout(first, rx.wait_for(|a| *a >= seq)).await {
            return r.map(|_| ()).map_err(|_| StoreError::Closed);
        }
        self.shared.kick.notify_one();
        let wait = rx.wait_for(|a| *a >= seq);
        match tokio::time::timeout(timeout.saturating_sub(first), wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the local index did not reach sequence {seq} within {timeout:?}{}",
                self.shared
                    .follower_error
                    .read()
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ))),
        }
    }

    /// Brings the index up to the stream's current end.
    async fn catch_up(&self, timeout: Duration) -> StoreResult<()> {
        let last = self.stream_last_seq().await?;
        self.wait_applied(last, timeout).await
    }

    /// Builds the messages of `batch` against the current index. Returns the messages
    /// (subject, headers, payload) and a template of outcomes, or a conflict.
    fn plan(&self, batch: &Batch) -> StoreResult<Planned> {
        let index = self.shared.index.read();
        let now = self.clock.wall_millis();
        let mut planned = Planned::default();
        let mut first_write: HashMap<String, ()> = HashMap::new();
        let mut next_index: HashMap<String, u64> = HashMap::new();
        let conflict =
            |ns: &str, key: &str, expected: String, found: String| StoreError::Conflict {
                namespace: ns.to_owned(),
                key: key.to_owned(),
                expected,
                found,
            };
        for op in &batch.ops {
            match op {
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
                } => {
                    let cur = index.records.get(&(namespace.clone(), key.clone()));
                    let live = cur.filter(|c| c.record.is_live(now));
                    match expect {
                        Expect::Any => {}
                        Expect::Absent => {
                            if let Some(l) = live {
                                return Err(conflict(
                                    namespace,
                                    key,
                                    "absent".into(),
                                    format!("revision {}", l.revision),
                                ));
                            }
                        }
                        Expect::Revision(r) => {
                            if live.map(|l| l.revision) != Some(*r) {
                                return Err(conflict(
                                    namespace,
                                    key,
                                    format!("revision {r}"),
                                    live.map_or("absent".into(), |l| {
                                        format!("revision {}", l.revision)
                                    }),
                                ));
                            }
                        }
                    }
                    let subject = self.record_subject(namespace, key);
                    let expected = match expect {
                        Expect::Any => None,
                        _ => Some(cur.map_or(0, |c| c.revision)),
                    };
                    let (value, expires) = match op {
                        Op::Put {
                            value, ttl_millis, ..
                        } => (Some(value.clone()), ttl_millis.map(|t| now + t)),
                        _ => (None, None),
                    };
                    let record = Record {
                        namespace: namespace.clone(),
                        key: key.clone(),
                        version: Version {
                            hlc: self.clock.now(),
                            origin: self.origin.clone(),
                        },
                        value,
                        expires_at_millis: expires,
                    };
                    let expected = if first_write.insert(subject.clone(), ()).is_none() {
                        expected
                    } else {
                        None
                    };
                    planned.push(subject, expected, Change::Record(record), Kind::Written);
                }
                Op::Append { stream, data } => {
                    let subject = self.event_subject(stream);
                    let (last_index, last_seq) =
                        index.stream_heads.get(stream).copied().unwrap_or((0, 0));
                    let next = next_index.entry(stream.clone()).or_insert(last_index);
                    *next += 1;
                    let expected = if first_write.insert(subject.clone(), ()).is_none() {
                        Some(last_seq)
                    } else {
                        None
                    };
                    let event = StreamEvent {
                        stream: stream.clone(),
                        index: *next,
                        version: Version {
                            hlc: self.clock.now(),
                            origin: self.origin.clone(),
                        },
                        data: data.clone(),
                    };
                    let idx = *next;
                    planned.push(subject, expected, Change::Event(event), Kind::Appended(idx));
                }
                Op::Merge(r) => {
                    let cur = index.records.get(&(r.namespace.clone(), r.key.clone()));
                    if cur.is_some_and(|c| !r.supersedes(&c.record)) {
                        planned.unchanged();
                        continue;
                    }
                    self.clock.observe(r.version.hlc);
                    let subject = self.record_subject(&r.namespace, &r.key);
                    let expected = if first_write.insert(subject.clone(), ()).is_none() {
                        Some(cur.map_or(0, |c| c.revision))
                    } else {
                        None
                    };
                    planned.push(subject, expected, Change::Record(r.clone()), Kind::Written);
                }
                Op::MergeEvent(e) => {
                    let cur = index.events.get(&(e.stream.clone(), e.index));
                    if cur.is_some_and(|(_, c)| !e.supersedes(c)) {
                        planned.unchanged();
                        continue;
                    }
                    self.clock.observe(e.version.hlc);
                    let subject = self.event_subject(&e.stream);
                    let last_seq = index.stream_heads.get(&e.stream).map_or(0, |h| h.1);
                    let expected = if first_write.insert(subject.clone(), ()).is_none() {
                        Some(last_seq)
                    } else {
                        None
                    };
                    planned.push(
                        subject,
                        expected,
                        Change::Event(e.clone()),
                        Kind::Appended(e.index),
                    );
                }
            }
        }
        Ok(planned)
    }

    /// Publishes `planned` as one atomic batch; returns the sequence of its last message.
    async fn publish(&self, planned: &Planned) -> Result<u64, PublishFailure> {
        let n = planned.messages.len();
        let batch_id = hex::encode(rand::random::<[u8; 12]>());
        let txn = &planned.txn;
        for (i, m) in planned.messages.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            headers.insert("Nats-Msg-Id", format!("{txn}/{i}").as_str());
            if let Some(e) = m.expected {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    e.to_string().as_str(),
                );
            }
            let payload = bytes::Bytes::from(
                postcard::to_stdvec(&m.change).expect("serializing to a Vec cannot fail"),
            );
            if i + 1 < n {
                self.client
                    .publish_with_headers(m.subject.clone(), headers, payload)
                    .await
                    .map_err(|e| PublishFailure::Unavailable(e.to_string()))?;
                continue;
            }
            headers.insert("Nats-Batch-Commit", "1");
            let reply = self
                .client
                .request_with_headers(m.subject.clone(), headers, payload)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        PublishFailure::Unavailable("no stream leader (no responders)".into())
                    }
                    async_nats::RequestErrorKind::TimedOut => {
                        PublishFailure::Unknown("the commit timed out".into())
                    }
                    _ => PublishFailure::Unavailable(e.to_string()),
                })?;
            return parse_ack(&reply.payload);
        }
        unreachable!("a planned batch has at least one message")
    }
}

#[derive(Debug)]
enum PublishFailure {
    /// A precondition did not hold on the stream (10071, 10164).
    Conflict(String),
    /// The stream could not take the batch (no leader, limits, batch dropped).
    Unavailable(String),
    /// The stream is full.
    Full(String),
    /// The outcome is unknown (timeout after sending the commit).
    Unknown(String),
}

fn parse_ack(payload: &[u8]) -> Result<u64, PublishFailure> {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| PublishFailure::Unavailable(format!("unreadable stream reply: {e}")))?;
    if let Some(err) = v.get("error") {
        let code = err.get("err_code").and_then(|c| c.as_u64()).unwrap_or(0);
        let text = err
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("")
            .to_owned();
        return Err(match code {
            10071 | 10164 => PublishFailure::Conflict(text),
            10047 | 10077 | 10028 => PublishFailure::Full(text),
            _ => PublishFailure::Unavailable(format!("{text} (code {code})")),
        });
    }
    v.get("seq")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| PublishFailure::Unavailable(format!("stream reply without sequence: {v}")))
}

#[derive(Clone, Copy)]
enum Kind {
    Written,
    Appended(u64),
}

struct PlannedMessage {
    subject: String,
    expected: Option<u64>,
    change: Change,
}

struct Planned {
    txn: String,
    messages: Vec<PlannedMessage>,
    /// Per operation: `None` for an unchanged merge, else (message position, kind).
    outcomes: Vec<Option<(usize, Kind)>>,
}

impl Default for Planned {
    fn default() -> Self {
        Planned {
            txn: hex::encode(rand::random::<[u8; 12]>()),
            messages: Vec::new(),
            outcomes: Vec::new(),
        }
    }
}

impl Planned {
    fn push(&mut self, subject: String, expected: Option<u64>, change: Change, kind: Kind) {
        self.outcomes.push(Some((self.messages.len(), kind)));
        self.messages.push(PlannedMessage {
            subject,
            expected,
            change,
        });
    }

    fn unchanged(&mut self) {
        self.outcomes.push(None);
    }
}

/// Follows the stream into the index, from the start, for as long as the store lives.
async fn follow(js: jetstream::Context, stream_name: String, prefix: String, shared: Arc<Shared>) {
    loop {
        let start = shared.index.read().applied + 1;
        match follow_from(&js, &stream_name, &prefix, &shared, start).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "following the change-log stream failed; retrying");
                *shared.follower_error.write() = Some(e);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn follow_from(
    js: &jetstream::Context,
    stream_name: &str,
    prefix: &str,
    shared: &Shared,
    start: u64,
) -> Result<(), String> {
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{prefix}.>"),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    *shared.follower_error.write() = None;
    loop {
        let next = tokio::select! {
            m = messages.next() => m,
            () = shared.kick.notified() => return Err("the consumer seemed stuck; starting it again".into()),
        };
        let Some(msg) = next else { break };
        let msg = msg.map_err(|e| e.to_string())?;
        let seq = msg.info().map_err(|e| e.to_string())?.stream_sequence;
        let change: Change = match postcard::from_bytes(&msg.payload) {
            Ok(c) => c,
            Err(e) => {
                // Not Haven's data; skip it rather than stall every reader.
                tracing::error!(seq, error = %e, "undecodable message in the change-log stream");
                continue;
            }
        };
        let headers = msg.headers.as_ref();
        let in_batch = headers.is_some_and(|h| h.get("Nats-Batch-Id").is_some());
        let commits = headers.and_then(|h| h.get("Nats-Batch-Commit")).is_some();
        let entry = LogEntry { seq, change };
        let ready: Vec<LogEntry> = {
            let mut index = shared.index.write();
            if seq <= index.applied {
                continue;
            }
            if in_batch && !commits {
                index.pending.push(entry);
                continue;
            }
            let mut ready = std::mem::take(&mut index.pending);
            ready.push(entry);
            for e in &ready {
                index.apply(e);
            }
            ready
        };
        for e in ready {
            shared.clock.observe(e.change.version().hlc);
            let seq = e.seq;
            let _ = shared.feed.send(Arc::new(e));
            shared.applied.send_replace(seq);
        }
    }
    Err("the change-log consumer ended".into())
}

#[async_trait]
impl Store for NatsStore {
    fn origin(&self) -> &Origin {
        &self.origin
    }

    fn clock(&self) -> &Arc<HybridClock> {
        &self.clock
    }

    async fn get(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        let now = self.clock.wall_millis();
        Ok(self
            .get_raw(namespace, key)
            .await?
            .filter(|r| r.record.is_live(now)))
    }

    async fn get_raw(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        let k = (namespace.to_owned(), key.to_owned());
        if let Some(r) = self.shared.index.read().records.get(&k) {
            return Ok(Some(r.clone()));
        }
        // Not here (yet): it may have just been written through another node.
        self.catch_up(COMMIT_TIMEOUT).await?;
        Ok(self.shared.index.read().records.get(&k).cloned())
    }

    async fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ScanPage> {
        // A listing sees every write acknowledged before it, on any node.
        self.catch_up(COMMIT_TIMEOUT).await?;
        let now = self.clock.wall_millis();
        let index = self.shared.index.read();
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut page = ScanPage::default();
        for ((ns, key), r) in index
            .records
            .range((namespace.to_owned(), start.to_owned())..)
        {
            if ns != namespace || !key.starts_with(prefix) {
                break;
            }
            if after == Some(key.as_str()) {
                continue;
            }
            if page.records.len() == limit {
                page.next_after = page.records.last().map(|r| r.record.key.clone());
                break;
            }
            if r.record.is_live(now) {
                page.records.push(r.clone());
            }
        }
        Ok(page)
    }

    async fn commit(&self, batch: Batch) -> StoreResult<Commit> {
        crate::redb_store::validate(&batch)?;
        if batch.ops.len() > MAX_BATCH_OPS {
            return Err(StoreError::Invalid(format!(
                "a batch holds at most {MAX_BATCH_OPS} operations"
            )));
        }
        let mut attempt = 0;
        loop {
            let planned = self.plan(&batch)?;
            if planned.messages.is_empty() {
                let last = self.stream_last_seq().await?;
                return Ok(Commit {
                    last_seq: last,
                    outcomes: planned
                        .outcomes
                        .iter()
                        .map(|_| Outcome::Unchanged)
                        .collect(),
                });
            }
            match self.publish(&planned).await {
                Ok(last) => {
                    let n = planned.messages.len() as u64;
                    let first = last + 1 - n;
                    self.wait_applied(last, COMMIT_TIMEOUT).await?;
                    let outcomes = planned
                        .outcomes
                        .iter()
                        .map(|o| match o {
                            None => Outcome::Unchanged,
                            Some((pos, Kind::Written)) => Outcome::Written {
                                revision: first + *pos as u64,
                            },
                            Some((pos, Kind::Appended(index))) => Outcome::Appended {
                                index: *index,
                                seq: first + *pos as u64,
                            },
                        })
                        .collect();
                    return Ok(Commit {
                        last_seq: last,
                        outcomes,
                    });
                }
                Err(PublishFailure::Conflict(text)) => {
                    // The index was behind the stream, or another node won. Catch up and
                    // check the preconditions again: a real conflict fails in `plan`.
                    attempt += 1;
                    if attempt > CONFLICT_RETRIES {
                        return Err(StoreError::Conflict {
                            namespace: String::new(),
                            key: String::new(),
                            expected: "no concurrent write".into(),
                            found: text,
                        });
                    }
                    self.catch_up(COMMIT_TIMEOUT).await?;
                    tokio::time::sleep(Duration::from_millis(2 * attempt as u64)).await;
                }
                Err(PublishFailure::Full(text)) => return Err(StoreError::Full(text)),
                Err(PublishFailure::Unavailable(text)) => {
                    return Err(StoreError::Unavailable(text));
                }
                Err(PublishFailure::Unknown(text)) => {
                    return Err(StoreError::Unavailable(format!(
                        "{text}; the write may or may not have been stored"
                    )));
                }
            }
        }
    }

    async fn read_events(
        &self,
        stream: &str,
        after: u64,
        limit: usize,
    ) -> StoreResult<Vec<StreamEvent>> {
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let index = self.shared.index.read();
        Ok(index
            .events
            .range((stream.to_owned(), from)..=(stream.to_owned(), u64::MAX))
            .take(limit)
            .map(|(_, (_, e))| e.clone())
            .collect())
    }

    async fn read_log(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<LogEntry>> {
        let mut out = Vec::new();
        let mut next = from_seq.max(1);
        while out.len() < limit {
            let want = (limit - out.len()).min(1000);
            let got = direct_batch(&self.client, &self.stream_name, next, want).await?;
            let Some(last) = got.last() else { break };
            next = last.seq + 1;
            let done = got.len() < want;
            out.extend(got);
            if done {
                break;
            }
        }
        Ok(out)
    }

    async fn last_seq(&self) -> StoreResult<u64> {
        self.stream_last_seq().await
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<LogEntry>> {
        self.shared.feed.subscribe()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn describe(&self) -> serde_json::Value {
        let server = self.client.server_info();
        let mut out = serde_json::json!({
            "backend": "nats",
            "stream": self.stream_name,
            "connection": format!("{:?}", self.client.connection_state()),
            "connected_server": { "name": server.server_name, "host": server.host, "port": server.port, "version": server.version },
            "known_servers": server.connect_urls,
            "applied_seq": self.shared.index.read().applied,
        });
        match self.js.get_stream(&self.stream_name).await {
            Ok(s) => {
                let info = s.cached_info();
                out["last_seq"] = info.state.last_sequence.into();
                out["replicas"] = info.config.num_replicas.into();
                if let Some(c) = &info.cluster {
                    out["leader"] = serde_json::json!(c.leader);
                    out["peers"] = c
                        .replicas
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "name": p.name, "current": p.current,
                                "offline": p.offline, "lag": p.lag,
                                "active_ms": p.active.as_millis() as u64,
                            })
                        })
                        .collect();
                }
            }
            Err(e) => out["error"] = e.to_string().into(),
        }
        out
    }

    async fn check_writable(&self) -> StoreResult<()> {
        if let Some(e) = self.shared.follower_error.read().clone() {
            return Err(StoreError::Unavailable(format!(
                "cannot follow the change log: {e}"
            )));
        }
        // The leader answers stream info only while the stream has a quorum.
        let s = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(unavailable)?;
        let info = s.cached_info();
        if info.cluster.as_ref().is_some_and(|c| c.leader.is_none()) {
            return Err(StoreError::Unavailable(
                "the change-log stream has no leader".into(),
            ));
        }
        Ok(())
    }
}

/// Reads up to `batch` messages from sequence `from` with one batched direct get.
async fn direct_batch(
    client: &async_nats::Client,
    stream: &str,
    from: u64,
    batch: usize,
) -> StoreResult<Vec<LogEntry>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(unavailable)?;
    let body = serde_json::json!({ "seq": from, "batch": batch }).to_string();
    client
        .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body.into())
        .await
        .map_err(unavailable)?;
    let mut out = Vec::with_capacity(batch);
    loop {
        let msg = match tokio::time::timeout(COMMIT_TIMEOUT, sub.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(unavailable("direct get subscription closed")),
            Err(_) => return Err(unavailable("direct get timed out")),
        };
        if let Some(status) = msg.status {
            // 204: end of batch; 404: nothing at or after `from`.
            if status.as_u16() == 204 || status.as_u16() == 404 {
                break;
            }
            return Err(unavailable(format!(
                "direct get answered {status}: {}",
                msg.description.unwrap_or_default()
            )));
        }
        let headers = msg
            .headers
            .as_ref()
            .ok_or_else(|| unavailable("direct get reply without headers"))?;
        let seq: u64 = headers
            .get("Nats-Sequence")
            .and_then(|v| v.as_str().parse().ok())
            .ok_or_else(|| unavailable("direct get reply without Nats-Sequence"))?;
        let change: Change = postcard::from_bytes(&msg.payload)
            .map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
        out.push(LogEntry { seq, change });
        if out.len() == batch {
            break;
        }
    }
    Ok(out)
}

/// Namespace, key or stream name of a subject this backend wrote (for diagnostics).
pub fn describe_subject(subject: &str) -> Option<String> {
    let mut parts = subject.split('.');
    let _hv = parts.next()?;
    let _region = parts.next()?;
    match parts.next()? {
        "k" => Some(format!(
            "record {}/{}",
            untoken(parts.next()?)?,
            untoken(parts.next()?)?
        )),
        "e" => Some(format!("stream {}", untoken(parts.next()?)?)),
        _ => None,
    }
}
