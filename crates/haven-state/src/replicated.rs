//! A store on a change log that several nodes share ([`SharedLog`]): the JetStream backend
//! and the in-memory one are this store on two logs.
//!
//! Every node follows the log in order into its own [`Index`] and serves reads from it. A
//! commit plans its batch against the index ([`crate::plan`]), and the log appends the
//! planned changes as one atomic batch, refusing it when a key or stream the plan relied on
//! was written meanwhile (the plan's `expected` sequences). A refused batch makes the node
//! catch up and plan again, so only a real conflict reaches the caller. A commit returns once
//! the node's index has applied it (a node reads its own writes); a read of a missing key and
//! every scan first catch up with the log's end (what another node acknowledged is seen).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use parking_lot::RwLock;
use tokio::sync::{broadcast, watch};

use crate::clock::HybridClock;
use crate::group::GroupCommit;
use crate::index::{ForgetRules, Index, Obsolete};
use crate::plan::{self, StateRead};
use crate::record::{Change, LogEntry, LogSubject, Origin, StoredRecord, StreamEvent};
use crate::store::{Batch, Commit, Reclaim, Reclaimed, ScanPage, Store, StoreError, StoreResult};

pub use crate::plan::PlannedWrite as LogWrite;

/// How long a commit or a catch-up waits for the log or the local index.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a commit planned against a stale index is planned again.
const CONFLICT_RETRIES: usize = 5;

/// Why a log refused or may not have taken an append.
#[derive(Debug, Clone)]
pub enum AppendError {
    /// An expectation did not hold: the key or stream was written meanwhile.
    Conflict(String),
    /// The log cannot take the batch now (no leader, no connection, limits).
    Unavailable(String),
    /// The log is full.
    Full(String),
    /// The outcome is unknown (the answer was lost): the batch may or may not be stored.
    Unknown(String),
}

/// One entry of the log as a follower receives it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its sequence in the log.
    pub seq: u64,
    /// The change, or `None` for an entry that holds no Haven change (skipped).
    pub change: Option<Change>,
    /// Whether this entry ends its batch (the batch is applied then, all at once).
    pub complete: bool,
    /// The batch the entry belongs to (0: none). A batch whose last entry the log removed is
    /// applied when an entry of another batch arrives.
    pub batch: u64,
    /// The trace context its writer committed it in (see [`crate::trace`]), on a commit's
    /// last entry (a batch may carry several commits), when the log keeps one.
    pub traceparent: Option<String>,
}

/// Entries of a shared log that reclamation removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// The entry at this sequence.
    Entry(u64),
    /// Every entry on `subject` with a sequence below `below`: one request removes all of a
    /// key's superseded versions, however many there are.
    Below {
        /// The key or stream.
        subject: LogSubject,
        /// The first sequence kept.
        below: u64,
    },
    /// Every entry with a sequence below `below`, on every subject: one request removes a
    /// history whose every entry below that point holds nothing current.
    Prefix {
        /// The first sequence kept.
        below: u64,
    },
}

/// The followed entries of a log, in order; an error ends the stream (the follower starts
/// again from where it was).
pub type DeliveryStream = BoxStream<'static, Result<Delivery, String>>;

/// A change log shared by the nodes of a region.
#[async_trait]
pub trait SharedLog: Send + Sync + 'static {
    /// Appends `writes` as one atomic batch (stored on consecutive sequences, or not at all),
    /// provided that every write's `expected` sequence, when set, is the sequence of the last
    /// entry on its key or stream. Returns the sequence of the batch's last entry.
    async fn append(&self, writes: &[LogWrite]) -> Result<u64, AppendError>;
    /// The sequence of the log's last entry, from the log's authority.
    async fn last_seq(&self) -> StoreResult<u64>;
    /// Delivers the log's entries from sequence `from` on, in order, and then new ones as they
    /// are appended.
    async fn follow(&self, from: u64) -> Result<DeliveryStream, String>;
    /// Entries with sequence at least `from`, at most `limit`.
    async fn read_log(&self, from: u64, limit: usize) -> StoreResult<Vec<LogEntry>>;
    /// Whether the log can take a write now.
    async fn check_writable(&self) -> StoreResult<()>;
    /// What the log is and how healthy it is (JSON, for status pages).
    async fn describe(&self) -> serde_json::Value;
    /// Most writes one batch may hold.
    fn max_batch(&self) -> usize;
    /// Whether several nodes share this log.
    fn shared(&self) -> bool {
        true
    }
    /// Removes what `removals` name, each of which holds nothing current (an entry already
    /// gone is not an error); returns how many entries it removed. A log that cannot remove
    /// entries answers [`StoreError::Invalid`].
    async fn remove(&self, removals: &[Removal]) -> StoreResult<u64> {
        let _ = removals;
        Err(StoreError::Invalid(
            "this change log cannot remove entries".into(),
        ))
    }
    /// The log's last entry on the key or stream that `change` writes, if it has one.
    async fn last_entry_of(&self, change: &Change) -> StoreResult<Option<LogEntry>> {
        let _ = change;
        Err(StoreError::Invalid(
            "this change log cannot look up a key's last entry".into(),
        ))
    }
}

struct Follower {
    index: RwLock<Index>,
    applied: watch::Sender<u64>,
    feed: broadcast::Sender<Arc<LogEntry>>,
    clock: Arc<HybridClock>,
    /// Set while the follower cannot read the log (shown by `check_writable`).
    error: RwLock<Option<String>>,
    /// Asks the follower to start over (its delivery seems stuck).
    kick: tokio::sync::Notify,
}

impl Follower {
    /// Why the follower cannot read the log, as ` (…)` for an error message; empty when it can.
    fn error_suffix(&self) -> String {
        self.error
            .read()
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    }
}

/// A store whose change log is a [`SharedLog`] and whose reads come from a local index.
pub struct ReplicatedStore<L: SharedLog> {
    origin: Origin,
    clock: Arc<HybridClock>,
    log: Arc<L>,
    group: GroupCommit<L>,
    follower: Arc<Follower>,
    task: tokio::task::JoinHandle<()>,
}

impl<L: SharedLog> std::fmt::Debug for ReplicatedStore<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedStore")
            .field("origin", &self.origin)
            .field("applied", &self.follower.index.read().applied())
            .finish()
    }
}

impl<L: SharedLog> Drop for ReplicatedStore<L> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<L: SharedLog> ReplicatedStore<L> {
    /// Starts following `log` and waits until the index holds the whole log as of now, so
    /// that nothing is served from a partial view. The wait lasts as long as the index keeps
    /// advancing (a long log takes as long as reading it takes); it fails when the index has
    /// not moved for `stall`.
    pub async fn start(
        log: L,
        origin: Origin,
        clock: Arc<HybridClock>,
        stall: Duration,
    ) -> StoreResult<ReplicatedStore<L>> {
        let log = Arc::new(log);
        let (applied, _) = watch::channel(0);
        let (feed, _) = broadcast::channel(8192);
        let follower = Arc::new(Follower {
            index: RwLock::new(Index::default()),
            applied,
            feed,
            clock: clock.clone(),
            error: RwLock::new(None),
            kick: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(follow(log.clone(), follower.clone()));
        let store = ReplicatedStore {
            origin,
            clock,
            group: GroupCommit::new(log.clone()),
            log,
            follower,
            task,
        };
        store.catch_up_while_advancing(stall).await?;
        Ok(store)
    }

    /// Waits until the index reaches the log's end as of now, for as long as it advances:
    /// fails when it has not moved for `stall`. Says how far it is every 10 s.
    async fn catch_up_while_advancing(&self, stall: Duration) -> StoreResult<()> {
        let last = self.log.last_seq().await?;
        let mut rx = self.follower.applied.subscribe();
        let started = std::time::Instant::now();
        let (mut seen, mut moved, mut said) = (self.applied_seq(), started, started);
        let mut kicked = false;
        loop {
            let wait = rx.wait_for(|a| *a >= last);
            match tokio::time::timeout(Duration::from_secs(1), wait).await {
                Ok(Ok(_)) => break,
                Ok(Err(_)) => return Err(StoreError::Closed),
                Err(_) => {}
            }
            let now = self.applied_seq();
            if now != seen {
                (seen, moved, kicked) = (now, std::time::Instant::now(), false);
            } else if !kicked {
                // Not a step for a second: the delivery may be stuck on a server that
                // died; have it start over from where it is, once per stop.
                self.follower.kick.notify_one();
                kicked = true;
            }
            if moved.elapsed() >= stall {
                return Err(StoreError::Unavailable(format!(
                    "the local index stopped at entry {now} of {last} and did not advance for {stall:?}{}",
                    self.follower.error_suffix()
                )));
            }
            if said.elapsed() >= Duration::from_secs(10) {
                said = std::time::Instant::now();
                tracing::info!(
                    applied = now,
                    of = last,
                    seconds = started.elapsed().as_secs(),
                    "reading the change log into the index"
                );
            }
        }
        if started.elapsed() >= Duration::from_secs(10) {
            tracing::info!(
                entries = last,
                seconds = started.elapsed().as_secs(),
                "the index holds the whole change log"
            );
        }
        Ok(())
    }

    /// The log under the store.
    pub fn log(&self) -> &Arc<L> {
        &self.log
    }

    /// The record of `namespace`/`key` as this node's index holds it now, without catching up
    /// with the log or waiting for anything (it may be behind the log; for checks of a
    /// replica's view at one moment).
    pub fn local_record(&self, namespace: &str, key: &str) -> Option<StoredRecord> {
        self.follower.index.read().get(namespace, key).cloned()
    }

    /// The last sequence this node's index has applied.
    pub fn applied_seq(&self) -> u64 {
        self.follower.index.read().applied()
    }

    /// Waits until the index has applied sequence `seq`.
    async fn wait_applied(&self, seq: u64, timeout: Duration) -> StoreResult<()> {
        let mut rx = self.follower.applied.subscribe();
        // A follower that has not moved for a second may be stuck on a delivery whose server
        // died: have it start over from where it is, then go on waiting.
        let first = timeout.min(Duration::from_secs(1));
        if let Ok(r) = tokio::time::timeout(first, rx.wait_for(|a| *a >= seq)).await {
            return r.map(|_| ()).map_err(|_| StoreError::Closed);
        }
        self.follower.kick.notify_one();
        let wait = rx.wait_for(|a| *a >= seq);
        match tokio::time::timeout(timeout.saturating_sub(first), wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the local index did not reach sequence {seq} within {timeout:?}{}",
                self.follower.error_suffix()
            ))),
        }
    }

    /// Checks that the log, as this node follows it, holds `writes` at the sequences the
    /// append acknowledged (from `first` on): a record's key was written there or later, an
    /// event is there with this write's version. An acknowledgement for sequences that the
    /// followed log then fills with other entries (a log that lost an acknowledged append
    /// across a leader change) must not be reported as a commit: the caller would tell a
    /// client something the store does not hold. The batch is reported as not applied
    /// (retryable); its preconditions still hold, so a retry writes it again.
    fn check_kept(&self, writes: &[LogWrite], first: u64) -> StoreResult<()> {
        let index = self.follower.index.read();
        for (i, w) in writes.iter().enumerate() {
            let seq = first + i as u64;
            let kept = match &w.change {
                Change::Record(r) => index
                    .get(&r.namespace, &r.key)
                    .is_some_and(|cur| cur.revision >= seq),
                Change::Event(e) => index
                    .event(&e.stream, e.index)
                    .ok()
                    .flatten()
                    .is_some_and(|cur| cur.version == e.version || cur.supersedes(e)),
            };
            if !kept {
                tracing::error!(
                    seq,
                    "the change log acknowledged a write that it does not hold at that sequence; the write is reported as not applied"
                );
                return Err(StoreError::Unavailable(format!(
                    "the change log did not keep the write acknowledged at sequence {seq}"
                )));
            }
        }
        Ok(())
    }

    /// After a refused append: for each conditional write to a key that reads as absent here,
    /// asks the log for the key's last entry and makes the index agree with it. The index
    /// forgets records that read as absent long enough, and the log removes their entries
    /// once every reader is past them, each on its own schedule: a write must compare
    /// against what the log has, not against what this node forgot or still remembers.
    async fn reconcile_absent(&self, writes: &[LogWrite]) -> StoreResult<()> {
        let now = self.clock.wall_millis();
        for w in writes {
            if w.expected.is_none() {
                continue;
            }
            if let Change::Record(r) = &w.change {
                let live_here = self
                    .follower
                    .index
                    .read()
                    .get(&r.namespace, &r.key)
                    .is_some_and(|c| c.record.is_live(now));
                if live_here {
                    continue;
                }
            }
            let last = match self.log.last_entry_of(&w.change).await {
                Ok(last) => last,
                Err(StoreError::Invalid(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut index = self.follower.index.write();
            let changed = match (&w.change, last) {
                (Change::Record(r), last) => {
                    let last = last.and_then(|e| match e.change {
                        Change::Record(rec) => Some((e.seq, rec)),
                        Change::Event(_) => None,
                    });
                    index.reconcile_absent(&r.namespace, &r.key, last, now)
                }
                (Change::Event(ev), last) => {
                    let last = last.and_then(|e| match e.change {
                        Change::Event(le) => Some((e.seq, le.index)),
                        Change::Record(_) => None,
                    });
                    index.reconcile_stream(&ev.stream, last)
                }
            };
            if changed {
                tracing::debug!(seq = ?w.expected, "the index now agrees with the change log about a forgotten key or stream");
            }
        }
        Ok(())
    }

    /// Obsolete log entries this node knows of that are not removed yet.
    pub fn obsolete_entries(&self) -> usize {
        self.follower.index.read().obsolete_len()
    }

    /// Brings the index up to the log's current end.
    async fn catch_up(&self, timeout: Duration) -> StoreResult<()> {
        let last = self.log.last_seq().await?;
        self.wait_applied(last, timeout).await
    }
}

/// Removals sent to the log at once in a reclamation step (each chunk recorded as done before
/// the next is sent).
pub(crate) const REMOVAL_CHUNK: usize = 64;

/// Follows the log into the index for as long as the store lives.
async fn follow<L: SharedLog>(log: Arc<L>, follower: Arc<Follower>) {
    loop {
        let start = follower.index.read().applied() + 1;
        if let Err(e) = follow_from(&*log, &follower, start).await {
            tracing::warn!(error = %e, "following the change log failed; retrying");
            *follower.error.write() = Some(e);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn follow_from<L: SharedLog>(log: &L, follower: &Follower, start: u64) -> Result<(), String> {
    let mut deliveries = log.follow(start).await?;
    // Entries of an incomplete batch that the last delivery left are delivered again.
    follower.index.write().restart();
    *follower.error.write() = None;
    loop {
        let next = tokio::select! {
            d = deliveries.next() => d,
            () = follower.kick.notified() => return Err("the delivery seemed stuck; starting it again".into()),
        };
        let Some(delivery) = next else {
            return Err("the change-log delivery ended".into());
        };
        let Delivery {
            seq,
            change,
            complete,
            batch,
            ..
        } = delivery?;
        let ready = {
            let mut index = follower.index.write();
            match change {
                Some(change) => index.deliver(LogEntry { seq, change }, complete, batch),
                None => {
                    // Not Haven's data; count it as applied rather than stall every reader.
                    tracing::error!(seq, "undecodable entry in the change log");
                    index.skip(seq);
                    let applied = index.applied();
                    drop(index);
                    follower.applied.send_replace(applied);
                    continue;
                }
            }
        };
        for e in ready {
            follower.clock.observe(e.change.version().hlc);
            let seq = e.seq;
            let _ = follower.feed.send(Arc::new(e));
            follower.applied.send_replace(seq);
        }
    }
}

#[async_trait]
impl<L: SharedLog> Store for ReplicatedStore<L> {
    fn origin(&self) -> &Origin {
        &self.origin
    }

    fn clock(&self) -> &Arc<HybridClock> {
        &self.clock
    }

    async fn get_raw(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        if let Some(r) = self.follower.index.read().get(namespace, key) {
            return Ok(Some(r.clone()));
        }
        // Not here (yet): it may have just been written through another node.
        self.catch_up(COMMIT_TIMEOUT).await?;
        Ok(self.follower.index.read().get(namespace, key).cloned())
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
        Ok(self
            .follower
            .index
            .read()
            .scan(namespace, prefix, after, limit, now))
    }

    async fn commit(&self, batch: Batch) -> StoreResult<Commit> {
        plan::validate(&batch)?;
        let max = self.log.max_batch();
        if batch.ops.len() > max {
            return Err(StoreError::Invalid(format!(
                "a batch holds at most {max} operations"
            )));
        }
        let traceparent = crate::trace::current_traceparent();
        let mut attempt = 0;
        loop {
            let mut planned = {
                let index = self.follower.index.read();
                plan::plan(
                    &*index,
                    &batch,
                    &self.clock,
                    &self.origin,
                    self.clock.wall_millis(),
                )?
            };
            if planned.is_empty() {
                let last = self.log.last_seq().await?;
                return Ok(Commit {
                    last_seq: last,
                    outcomes: planned.outcomes(last + 1),
                });
            }
            if let Some(w) = planned.writes.last_mut() {
                w.traceparent = traceparent.clone();
            }
            // Shared with other commits of this node until a batch was refused; alone after.
            let appended = self.group.append(planned.writes.clone(), attempt > 0).await;
            match appended {
                Ok(first) => {
                    let last = first + planned.writes.len() as u64 - 1;
                    self.wait_applied(last, COMMIT_TIMEOUT).await?;
                    self.check_kept(&planned.writes, first)?;
                    return Ok(Commit {
                        last_seq: last,
                        outcomes: planned.outcomes(first),
                    });
                }
                Err(AppendError::Conflict(text)) => {
                    // The index was behind the log, or another node won. Catch up and check
                    // the preconditions again: a real conflict fails in `plan`.
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
                    self.reconcile_absent(&planned.writes).await?;
                    tokio::time::sleep(Duration::from_millis(2 * attempt as u64)).await;
                }
                Err(AppendError::Full(text)) => return Err(StoreError::Full(text)),
                Err(AppendError::Unavailable(text)) => return Err(StoreError::Unavailable(text)),
                Err(AppendError::Unknown(text)) => {
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
        Ok(self.follower.index.read().events(stream, after, limit))
    }

    async fn read_log(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<LogEntry>> {
        self.log.read_log(from_seq, limit).await
    }

    async fn last_seq(&self) -> StoreResult<u64> {
        self.log.last_seq().await
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<LogEntry>> {
        self.follower.feed.subscribe()
    }

    fn shared(&self) -> bool {
        self.log.shared()
    }

    async fn sync(&self) -> StoreResult<()> {
        self.catch_up(COMMIT_TIMEOUT).await
    }

    async fn describe(&self) -> serde_json::Value {
        let mut out = self.log.describe().await;
        let index = self.follower.index.read();
        out["applied_seq"] = index.applied().into();
        // Entries no reader needs that wait for the readers' floor (or for removal).
        out["obsolete_entries"] = index.obsolete_len().into();
        out
    }

    async fn reclaim(&self, r: &Reclaim) -> StoreResult<Reclaimed> {
        // Everything in the log so far is in the index: what it made obsolete is queued.
        self.catch_up(COMMIT_TIMEOUT).await?;
        let rules = ForgetRules {
            now_millis: r.now_millis,
            expired_grace_millis: r.expired_grace_millis,
            tombstone_retention_millis: r.tombstone_retention_millis,
            event_retention_millis: r.event_retention_millis,
            step: r.step,
        };
        let forgotten = self.follower.index.write().forget_old(&rules);
        // Never the log's last entry: it tells a follower where the log ends.
        let floor = r.log_floor.min(self.log.last_seq().await?);
        // A history far behind its trimming: when nothing below some point of the log is
        // current any more, one request removes all of it.
        let mut removed = 0;
        if r.trim_log {
            let look = self.follower.index.write().prefix_worth_a_look();
            let below = look
                .then(|| {
                    let index = self.follower.index.read();
                    Some(index.low_water().min(floor)).filter(|&b| b > index.prefix_below())
                })
                .flatten();
            if let Some(below) = below {
                match self.log.remove(&[Removal::Prefix { below }]).await {
                    Ok(n) => {
                        removed += n;
                        self.follower.index.write().removed_prefix(below);
                        tracing::info!(
                            below,
                            removed = n,
                            "removed the change log's prefix that holds nothing current"
                        );
                    }
                    Err(StoreError::Invalid(_)) => {}
                    Err(e) => {
                        self.follower.index.write().forget_prefix_look();
                        return Err(e);
                    }
                }
            }
        }
        let (taken, to_learn) = {
            let mut index = self.follower.index.write();
            let taken = index.take_obsolete(floor, r.step);
            let to_learn = if r.trim_log {
                index.subjects_to_learn(&taken)
            } else {
                Vec::new()
            };
            (taken, to_learn)
        };
        let removals = if r.trim_log && !taken.is_empty() {
            // The subjects with several entries to remove, read from one entry of each.
            let learned: Vec<Option<(u64, LogSubject)>> = futures::stream::iter(to_learn)
                .map(|(hash, seq)| async move {
                    let entry = self.log.read_log(seq, 1).await.ok()?.into_iter().next()?;
                    let subject = entry.change.subject();
                    (entry.seq == seq && crate::index::subject_hash(&subject) == hash)
                        .then_some((hash, subject))
                })
                .buffer_unordered(16)
                .collect()
                .await;
            let subjects = learned.into_iter().flatten().collect();
            self.follower
                .index
                .read()
                .removals(&taken, floor, &subjects)
        } else {
            Vec::new()
        };
        // In chunks, each recorded as it succeeds: one removal that fails (a request that
        // times out on a long log) puts back what it and the chunks after it would have
        // removed, not the whole step.
        let mut chunks = removals.chunks(REMOVAL_CHUNK);
        while let Some(chunk) = chunks.next() {
            match self.log.remove(chunk).await {
                Ok(n) => {
                    removed += n;
                    let mut index = self.follower.index.write();
                    for r in chunk {
                        if let Removal::Below { subject, below } = r {
                            index.removed_below(crate::index::subject_hash(subject), *below);
                        }
                    }
                }
                Err(StoreError::Invalid(why)) => {
                    // The log keeps its entries (see its description); the index still
                    // forgets, so memory stays bounded.
                    tracing::debug!(%why, "obsolete change-log entries are kept");
                    break;
                }
                Err(e) => {
                    // The entries of every subject or sequence not removed go back.
                    let mut left_seqs = std::collections::HashSet::new();
                    let mut left_subjects = std::collections::HashSet::new();
                    for r in chunk.iter().chain(chunks.flatten()) {
                        match r {
                            Removal::Entry(seq) => {
                                left_seqs.insert(*seq);
                            }
                            Removal::Below { subject, .. } => {
                                left_subjects.insert(crate::index::subject_hash(subject));
                            }
                            Removal::Prefix { .. } => {}
                        }
                    }
                    let back: Vec<Obsolete> = taken
                        .into_iter()
                        .filter(|o| {
                            left_seqs.contains(&o.seq) || left_subjects.contains(&o.subject)
                        })
                        .collect();
                    tracing::debug!(
                        removed,
                        put_back = back.len(),
                        "a change-log removal failed; what it did not remove is tried again"
                    );
                    self.follower.index.write().requeue_obsolete(back);
                    return Err(e);
                }
            }
        }
        Ok(Reclaimed {
            log_entries: removed,
            records: forgotten.records,
            events: forgotten.events,
            done: forgotten.done
                && taken.len() < r.step
                && !self.follower.index.read().obsolete_waiting(floor),
        })
    }

    async fn check_writable(&self) -> StoreResult<()> {
        if let Some(e) = self.follower.error.read().clone() {
            return Err(StoreError::Unavailable(format!(
                "cannot follow the change log: {e}"
            )));
        }
        self.log.check_writable().await
    }
}
