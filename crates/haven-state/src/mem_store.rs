//! The in-memory backend: a [`ReplicatedStore`] on a change log held in memory ([`MemLog`]).
//!
//! One node alone uses it as a store that keeps nothing across restarts (tests, fuzzing).
//! Several nodes of one process share one `MemLog`, each through its own [`MemLink`], which is
//! how the simulator runs a region in one process: the log behaves like the region's
//! JetStream stream (atomic batches, per-key expectations checked by the log, every node
//! following it in order into its own index), and each link can be made to fail the way a
//! node's connection does ([`LinkFaults`]: down, paused, killed, lost acknowledgements, late
//! deliveries).
//!
//! A test can watch the log as it grows: [`MemLog::observe`] hands every appended batch to a
//! callback, in log order, at the moment the log takes it (the simulator checks its
//! invariants there, step by step).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::clock::HybridClock;
use crate::record::{Change, LogEntry, LogSubject, Origin};
use crate::replicated::{
    AppendError, Delivery, DeliveryStream, LogWrite, Removal, ReplicatedStore, SharedLog,
};
use crate::store::{StoreError, StoreResult};

/// Most writes one batch may hold (as on JetStream).
const MAX_BATCH: usize = 1000;

fn subject(change: &Change) -> LogSubject {
    change.subject()
}

/// An entry as the log keeps it.
#[derive(Clone)]
struct Stored {
    entry: LogEntry,
    /// Whether it ends its batch.
    complete: bool,
    /// Its batch: the sequence of the batch's first entry.
    batch: u64,
}

#[derive(Default)]
struct LogState {
    /// Entries by sequence (removed ones are missing).
    entries: BTreeMap<u64, Stored>,
    /// The last sequence ever given (removing entries does not lower it).
    last_seq: u64,
    /// Sequence of the last entry per key or stream (a subject all of whose entries were
    /// removed has none, as on JetStream).
    last: HashMap<LogSubject, u64>,
}

/// What [`MemLog::observe`] calls with each appended batch.
pub type BatchObserver = Box<dyn Fn(&[LogEntry]) + Send + Sync>;

/// A change log in memory, shared by the nodes of one process.
pub struct MemLog {
    state: Mutex<LogState>,
    /// Called with every appended batch, in order, while the log is locked.
    observers: Mutex<Vec<BatchObserver>>,
    /// The last sequence, for followers to wait on.
    tail: watch::Sender<u64>,
}

impl std::fmt::Debug for MemLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemLog")
            .field("last_seq", &*self.tail.borrow())
            .finish()
    }
}

impl MemLog {
    /// An empty log.
    pub fn new() -> Arc<MemLog> {
        Arc::new(MemLog {
            state: Mutex::new(LogState::default()),
            observers: Mutex::new(Vec::new()),
            tail: watch::channel(0).0,
        })
    }

    /// The sequence of the last entry.
    pub fn last_seq(&self) -> u64 {
        *self.tail.borrow()
    }

    /// Every entry of the log, in order (for checks of a whole history).
    pub fn entries(&self) -> Vec<LogEntry> {
        self.state
            .lock()
            .entries
            .values()
            .map(|s| s.entry.clone())
            .collect()
    }

    /// How many entries the log holds (fewer than its last sequence once some are removed).
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Whether the log holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry of the log grouped by the atomic batch that appended it.
    pub fn batches(&self) -> Vec<Vec<LogEntry>> {
        let state = self.state.lock();
        let mut out: Vec<Vec<LogEntry>> = Vec::new();
        let mut current_batch = None;
        for s in state.entries.values() {
            if current_batch != Some(s.batch) {
                out.push(Vec::new());
                current_batch = Some(s.batch);
            }
            out.last_mut().expect("pushed").push(s.entry.clone());
        }
        out
    }

    /// Calls `observer` with every batch appended from now on, once each, in log order, as the
    /// log takes it (before any node's follower can see it, and before the append is
    /// acknowledged). It runs while the log is locked: it must be quick and must not use the
    /// log (no append or read of this `MemLog` from inside it).
    pub fn observe(&self, observer: impl Fn(&[LogEntry]) + Send + Sync + 'static) {
        self.observers.lock().push(Box::new(observer));
    }

    /// A new node on this log: its store (stamping writes as `origin` with `clock`) and the
    /// switches that make its connection fail.
    pub async fn join(
        self: &Arc<Self>,
        origin: Origin,
        clock: Arc<HybridClock>,
    ) -> StoreResult<(MemStore, Arc<LinkFaults>)> {
        let faults = Arc::new(LinkFaults::default());
        let link = MemLink {
            log: self.clone(),
            faults: faults.clone(),
            shared: true,
        };
        let store = ReplicatedStore::start(link, origin, clock, Duration::from_secs(60)).await?;
        Ok((store, faults))
    }

    /// A connection to this log without a node of its own (what another region reads it
    /// through), with the switches that make it fail.
    pub fn link(self: &Arc<Self>) -> (MemLink, Arc<LinkFaults>) {
        let faults = Arc::new(LinkFaults::default());
        let link = MemLink {
            log: self.clone(),
            faults: faults.clone(),
            shared: true,
        };
        (link, faults)
    }

    fn append(&self, writes: &[LogWrite]) -> Result<u64, AppendError> {
        let mut state = self.state.lock();
        for w in writes {
            if let Some(expected) = w.expected {
                let found = state.last.get(&subject(&w.change)).copied().unwrap_or(0);
                if found != expected {
                    return Err(AppendError::Conflict(format!(
                        "wrong last sequence for {:?}: expected {expected}, found {found}",
                        subject(&w.change)
                    )));
                }
            }
        }
        let n = writes.len();
        let first = state.last_seq + 1;
        for (i, w) in writes.iter().enumerate() {
            let seq = first + i as u64;
            state.last.insert(subject(&w.change), seq);
            state.entries.insert(
                seq,
                Stored {
                    entry: LogEntry {
                        seq,
                        change: w.change.clone(),
                    },
                    complete: i + 1 == n,
                    batch: first,
                },
            );
        }
        state.last_seq = first + n as u64 - 1;
        let last = state.last_seq;
        {
            // Under the log's lock, so that observers see batches in log order.
            let observers = self.observers.lock();
            if !observers.is_empty() {
                let batch: Vec<LogEntry> = state
                    .entries
                    .range(first..)
                    .map(|(_, s)| s.entry.clone())
                    .collect();
                for observe in observers.iter() {
                    observe(&batch);
                }
            }
        }
        drop(state);
        self.tail.send_replace(last);
        Ok(last)
    }

    fn entries_from(&self, from: u64, limit: usize) -> Vec<Stored> {
        let state = self.state.lock();
        state
            .entries
            .range(from.max(1)..)
            .take(limit)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Removes what `removals` name (as JetStream removes or purges messages: a sequence is
    /// not given again, and a subject whose every entry is gone has no last entry).
    fn remove(&self, removals: &[Removal]) -> u64 {
        let mut state = self.state.lock();
        let mut seqs = Vec::new();
        for r in removals {
            match r {
                Removal::Entry(seq) => seqs.push(*seq),
                Removal::Prefix { below } => {
                    seqs.extend(state.entries.range(..*below).map(|(k, _)| *k));
                }
                Removal::Below { subject, below } => seqs.extend(
                    state
                        .entries
                        .range(..*below)
                        .filter(|(_, s)| self::subject(&s.entry.change) == *subject)
                        .map(|(k, _)| *k),
                ),
            }
        }
        let mut removed = 0;
        for seq in &seqs {
            let Some(gone) = state.entries.remove(seq) else {
                continue;
            };
            removed += 1;
            let subject = subject(&gone.entry.change);
            if state.last.get(&subject) == Some(seq) {
                let before = state
                    .entries
                    .range(..*seq)
                    .rev()
                    .find(|(_, s)| self::subject(&s.entry.change) == subject)
                    .map(|(k, _)| *k);
                match before {
                    Some(k) => state.last.insert(subject, k),
                    None => state.last.remove(&subject),
                };
            }
        }
        removed
    }

    fn last_entry_of(&self, change: &Change) -> Option<LogEntry> {
        let state = self.state.lock();
        let seq = state.last.get(&subject(change))?;
        state.entries.get(seq).map(|s| s.entry.clone())
    }
}

/// Switches that make one node's connection to a [`MemLog`] fail, for fault injection.
#[derive(Debug)]
pub struct LinkFaults {
    /// Every operation fails at once as unavailable.
    down: AtomicBool,
    /// Every operation waits until the link is resumed (a paused process).
    paused: watch::Sender<bool>,
    /// The node is gone: every operation fails as closed, for good.
    killed: AtomicBool,
    /// This many next appends are stored but answered as of unknown outcome.
    lost_acks: AtomicU32,
    /// Entries reach the node's follower this late (milliseconds).
    delivery_delay_ms: AtomicU64,
    /// While not 0: the state of a generator that makes each append, in turn, go through,
    /// fail before it is stored, or be stored with its acknowledgement lost (a connection
    /// to a log whose leader is changing).
    flaky: AtomicU64,
    /// While not `u32::MAX`: this many more removal requests succeed, then every one fails
    /// (a removal that times out on a long log).
    removals_left: AtomicU32,
}

impl Default for LinkFaults {
    fn default() -> Self {
        LinkFaults {
            down: AtomicBool::new(false),
            paused: watch::channel(false).0,
            killed: AtomicBool::new(false),
            lost_acks: AtomicU32::new(0),
            delivery_delay_ms: AtomicU64::new(0),
            flaky: AtomicU64::new(0),
            removals_left: AtomicU32::new(u32::MAX),
        }
    }
}

impl LinkFaults {
    /// Cuts (true) or restores (false) the link.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Whether the link is cut.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Stops (true) or resumes (false) every operation of the node, as SIGSTOP/SIGCONT would.
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// Ends the link for good (the process died).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.paused.send_replace(false);
    }

    /// The next `n` appends are stored but their acknowledgement is lost.
    pub fn lose_acks(&self, n: u32) {
        self.lost_acks.store(n, Ordering::SeqCst);
    }

    /// Makes every append, chosen by a generator seeded with `seed`, go through, fail before
    /// it is stored, or be stored with its acknowledgement lost; `None` ends it.
    pub fn set_flaky(&self, seed: Option<u64>) {
        // xorshift needs a state other than 0.
        self.flaky
            .store(seed.map_or(0, |s| s | 1), Ordering::SeqCst);
    }

    /// What the flaky link does to the next append: 0 passes, 1 fails, 2 loses the answer.
    fn flaky_draw(&self) -> u64 {
        let step = |mut x: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        match self
            .flaky
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| {
                (x != 0).then(|| step(x))
            }) {
            Ok(x) => step(x) % 3,
            Err(_) => 0,
        }
    }

    /// Lets `n` more removal requests through, then fails every later one as unavailable;
    /// `None` lets every one through again.
    pub fn fail_removals_after(&self, n: Option<u32>) {
        self.removals_left
            .store(n.unwrap_or(u32::MAX), Ordering::SeqCst);
    }

    /// Delivers log entries to this node's follower `delay` late.
    pub fn set_delivery_delay(&self, delay: Duration) {
        self.delivery_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Waits while paused; then fails if the link is down or killed.
    async fn pass(&self) -> Result<(), StoreError> {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
        if self.killed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "the in-memory log link is down".into(),
            ));
        }
        Ok(())
    }
}

/// One node's connection to a [`MemLog`].
pub struct MemLink {
    log: Arc<MemLog>,
    faults: Arc<LinkFaults>,
    shared: bool,
}

/// The in-memory backend.
pub type MemStore = ReplicatedStore<MemLink>;

impl ReplicatedStore<MemLink> {
    /// A store of its own, on a new empty log (nothing is kept across restarts).
    pub async fn open_alone(origin: Origin, clock: Arc<HybridClock>) -> StoreResult<MemStore> {
        let link = MemLink {
            log: MemLog::new(),
            faults: Arc::new(LinkFaults::default()),
            shared: false,
        };
        ReplicatedStore::start(link, origin, clock, Duration::from_secs(5)).await
    }
}

#[async_trait]
impl SharedLog for MemLink {
    async fn append(&self, writes: &[LogWrite]) -> Result<u64, AppendError> {
        self.faults.pass().await.map_err(|e| match e {
            StoreError::Closed => AppendError::Unavailable("the node is gone".into()),
            e => AppendError::Unavailable(e.to_string()),
        })?;
        let draw = self.faults.flaky_draw();
        if draw == 1 {
            return Err(AppendError::Unavailable(
                "the flaky link dropped the append".into(),
            ));
        }
        let last = self.log.append(writes)?;
        if draw == 2 {
            return Err(AppendError::Unknown(
                "the flaky link lost the acknowledgement".into(),
            ));
        }
        let lost = self
            .faults
            .lost_acks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if lost.is_ok() {
            return Err(AppendError::Unknown("the acknowledgement was lost".into()));
        }
        Ok(last)
    }

    async fn last_seq(&self) -> StoreResult<u64> {
        self.faults.pass().await?;
        Ok(self.log.last_seq())
    }

    async fn follow(&self, from: u64) -> Result<DeliveryStream, String> {
        self.faults.pass().await.map_err(|e| e.to_string())?;
        let log = self.log.clone();
        let faults = self.faults.clone();
        let tail = log.tail.subscribe();
        let stream = futures::stream::unfold(
            (log, faults, tail, from.max(1), VecDeque::<Stored>::new()),
            |(log, faults, mut tail, mut next, mut buffer)| async move {
                loop {
                    if let Err(e) = faults.pass().await {
                        return Some((Err(e.to_string()), (log, faults, tail, next, buffer)));
                    }
                    if let Some(s) = buffer.pop_front() {
                        next = s.entry.seq + 1;
                        let delivery = Delivery {
                            seq: s.entry.seq,
                            change: Some(s.entry.change),
                            complete: s.complete,
                            batch: s.batch,
                            traceparent: None,
                        };
                        return Some((Ok(delivery), (log, faults, tail, next, buffer)));
                    }
                    buffer = log.entries_from(next, 256).into();
                    if buffer.is_empty() {
                        if tail.changed().await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    let delay = faults.delivery_delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                }
            },
        );
        Ok(stream.boxed())
    }

    async fn read_log(&self, from: u64, limit: usize) -> StoreResult<Vec<LogEntry>> {
        self.faults.pass().await?;
        Ok(self
            .log
            .entries_from(from, limit)
            .into_iter()
            .map(|s| s.entry)
            .collect())
    }

    async fn remove(&self, removals: &[Removal]) -> StoreResult<u64> {
        self.faults.pass().await?;
        let left = &self.faults.removals_left;
        if left.load(Ordering::SeqCst) != u32::MAX
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            return Err(StoreError::Unavailable("the removal timed out".into()));
        }
        Ok(self.log.remove(removals))
    }

    async fn last_entry_of(&self, change: &Change) -> StoreResult<Option<LogEntry>> {
        self.faults.pass().await?;
        Ok(self.log.last_entry_of(change))
    }

    async fn check_writable(&self) -> StoreResult<()> {
        self.faults.pass().await
    }

    async fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "backend": "memory", "last_seq": self.log.last_seq() })
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn shared(&self) -> bool {
        self.shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{Batch, Outcome, Store};

    #[tokio::test]
    async fn observers_see_every_batch_once_in_log_order() {
        let log = MemLog::new();
        let seen: Arc<Mutex<Vec<Vec<u64>>>> = Arc::default();
        let to = seen.clone();
        log.observe(move |batch| to.lock().push(batch.iter().map(|e| e.seq).collect()));
        let mut stores = Vec::new();
        for node in ["a", "b"] {
            let clock = Arc::new(HybridClock::new(Arc::new(ManualClock::new(1_000))));
            let (store, _) = log.join(Origin::new("r", node), clock).await.unwrap();
            stores.push(store);
        }
        for i in 0..5u8 {
            let store = &stores[usize::from(i) % 2];
            store
                .commit(
                    Batch::new()
                        .put("ns", &format!("k{i}"), vec![i])
                        .append("s", vec![i]),
                )
                .await
                .unwrap();
        }
        let expected: Vec<Vec<u64>> = log
            .batches()
            .iter()
            .map(|b| b.iter().map(|e| e.seq).collect())
            .collect();
        assert_eq!(*seen.lock(), expected);
        assert_eq!(expected.concat(), (1..=log.last_seq()).collect::<Vec<_>>());
        assert_eq!(log.last_seq(), 10);
    }

    /// Concurrent commits of one node share atomic batches (group commit), each gets its own
    /// sequences, and a batch the log refuses for one commit's stale precondition fails only
    /// that commit: the others are stored (alone, after the refusal).
    #[tokio::test(start_paused = true)]
    async fn concurrent_commits_share_batches_and_a_conflict_fails_only_its_own() {
        let log = MemLog::new();
        let join = |node: &'static str| {
            let log = log.clone();
            async move {
                let clock = Arc::new(HybridClock::new(Arc::new(ManualClock::new(1_000))));
                log.join(Origin::new("r", node), clock).await.unwrap()
            }
        };
        let (a, a_link) = join("a").await;
        let (b, _) = join("b").await;
        let a = Arc::new(a);
        // 20 commits at once, then 20 with one whose precondition is stale: node a does not
        // see b's write of "x" for a while, and plans "x absent".
        for round in 0..2 {
            if round == 1 {
                a_link.set_delivery_delay(Duration::from_millis(500));
                b.commit(Batch::new().put("ns", "x", vec![1]))
                    .await
                    .unwrap();
            }
            let before = log.batches().len();
            let mut commits = tokio::task::JoinSet::new();
            for i in 0..20u8 {
                let a = a.clone();
                commits.spawn(async move {
                    let key = format!("k{round}-{i}");
                    let c = a.commit(Batch::new().put("ns", &key, vec![i])).await;
                    (key, c)
                });
            }
            if round == 1 {
                let a = a.clone();
                commits.spawn(async move {
                    let x = Batch::new().put_if("ns", "x", vec![2], crate::store::Expect::Absent);
                    ("x".to_owned(), a.commit(x).await)
                });
            }
            let mut revisions = std::collections::BTreeSet::new();
            while let Some(done) = commits.join_next().await {
                let (key, c) = done.unwrap();
                if key == "x" {
                    assert!(
                        matches!(c, Err(StoreError::Conflict { .. })),
                        "the stale precondition fails its own commit: {c:?}"
                    );
                    continue;
                }
                let c = c.unwrap_or_else(|e| panic!("{key} failed beside the stale commit: {e}"));
                let Outcome::Written { revision } = c.outcomes[0] else {
                    panic!("{key}: {:?}", c.outcomes);
                };
                assert!(revisions.insert(revision), "each commit its own sequence");
                let stored = a.get_raw("ns", &key).await.unwrap().unwrap();
                assert_eq!(stored.revision, revision, "{key}");
                assert_eq!(stored.record.value, Some(vec![key_byte(&key)]));
            }
            assert_eq!(revisions.len(), 20);
            let batches = log.batches().len() - before;
            if round == 0 {
                assert!(batches < 5, "20 commits at once shared batches ({batches})");
            }
        }
        let x = a.get("ns", "x").await.unwrap().unwrap();
        assert_eq!(x.record.value, Some(vec![1]), "b's write stands");
    }

    fn key_byte(key: &str) -> u8 {
        key.rsplit('-').next().unwrap().parse().unwrap()
    }

    /// A node joining a long log waits for its index as long as the index advances, however
    /// long that takes, and gives up only when it stops advancing for the stall limit.
    #[tokio::test(start_paused = true)]
    async fn start_up_waits_while_the_index_advances_and_not_when_it_stops() {
        let log = MemLog::new();
        let clock = || Arc::new(HybridClock::new(Arc::new(ManualClock::new(1_000))));
        let (writer, _) = log.join(Origin::new("r", "w"), clock()).await.unwrap();
        for k in 0..3_000u32 {
            writer
                .commit(Batch::new().put("ns", &format!("k{k}"), vec![1]))
                .await
                .unwrap();
        }
        // 12 deliveries of 256 entries, each 400 ms late: about 5 s in all, more than three
        // times the stall limit, but never a second without a step.
        let (link, faults) = log.link();
        faults.set_delivery_delay(Duration::from_millis(400));
        let started = tokio::time::Instant::now();
        let node = ReplicatedStore::start(
            link,
            Origin::new("r", "a"),
            clock(),
            Duration::from_millis(1_500),
        )
        .await
        .expect("a node whose index keeps advancing starts");
        assert!(started.elapsed() > Duration::from_millis(1_500));
        assert_eq!(node.applied_seq(), 3_000);
        // A link that stops delivering (a paused connection) after the first entries.
        let (link, faults) = log.link();
        faults.set_delivery_delay(Duration::from_millis(400));
        let pause = faults.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            pause.set_paused(true);
        });
        let err = ReplicatedStore::start(
            link,
            Origin::new("r", "b"),
            clock(),
            Duration::from_millis(1_500),
        )
        .await
        .expect_err("an index that stops advancing fails the start-up");
        assert!(
            err.to_string().contains("did not advance"),
            "the error says why: {err}"
        );
        faults.set_paused(false);
    }

    /// A history far behind its trimming (every key written many times, nothing old still
    /// current) loses its whole prefix in one removal; a key written once at the start and
    /// never again keeps the prefix where it is, and the entries go by subject instead.
    /// Reads never change.
    #[tokio::test]
    async fn a_history_with_nothing_old_current_loses_its_prefix_in_one_removal() {
        for keep_an_old_key in [false, true] {
            let log = MemLog::new();
            let clock = Arc::new(HybridClock::new(Arc::new(ManualClock::new(1_000))));
            let (store, _) = log.join(Origin::new("r", "a"), clock).await.unwrap();
            if keep_an_old_key {
                store
                    .commit(Batch::new().put("ns", "old", vec![7]))
                    .await
                    .unwrap();
            }
            // 80 000 entries, 70 000 of them superseded: past the queue length at which a
            // step looks for a prefix.
            let keys = 10_000u32;
            let versions = 8u8;
            for v in 0..versions {
                for chunk in 0..keys / 1_000 {
                    let mut batch = Batch::new();
                    for k in chunk * 1_000..(chunk + 1) * 1_000 {
                        batch = batch.put("ns", &format!("k{k}"), vec![v]);
                    }
                    store.commit(batch).await.unwrap();
                }
            }
            let written = log.len();
            let policy = crate::store::Reclaim {
                log_floor: u64::MAX,
                now_millis: 1_000,
                expired_grace_millis: 0,
                tombstone_retention_millis: u64::MAX,
                event_retention_millis: u64::MAX,
                step: 512,
                trim_log: true,
            };
            let first = store.reclaim(&policy).await.unwrap();
            let live = keys as usize + usize::from(keep_an_old_key);
            if keep_an_old_key {
                assert!(
                    (first.log_entries as usize) < written - live,
                    "the old key holds the prefix: entries go by subject, a step at a time"
                );
                // The rest goes as in any pass (other tests); what matters here is that
                // nothing current went.
                let old = store.get("ns", "old").await.unwrap().unwrap();
                assert_eq!(old.value(), &[7u8]);
                for k in 0..keys {
                    let got = store.get("ns", &format!("k{k}")).await.unwrap().unwrap();
                    assert_eq!(got.value(), &[versions - 1]);
                }
                continue;
            } else {
                assert_eq!(
                    first.log_entries as usize,
                    written - live,
                    "one step removed the whole superseded history"
                );
                assert_eq!(log.len(), live);
            }
            let mut steps = 0;
            while !store.reclaim(&policy).await.unwrap().done {
                steps += 1;
                assert!(steps < 10_000, "the pass ends");
            }
            assert_eq!(log.len(), live, "only current entries are left");
            assert_eq!(store.obsolete_entries(), 0);
            for k in 0..keys {
                let got = store.get("ns", &format!("k{k}")).await.unwrap().unwrap();
                assert_eq!(got.value(), &[versions - 1]);
            }
            // A node joining now reads the live state only.
            let (late, _) = log
                .join(
                    Origin::new("r", "b"),
                    Arc::new(HybridClock::new(Arc::new(ManualClock::new(1_000)))),
                )
                .await
                .unwrap();
            let got = late.get("ns", "k0").await.unwrap().unwrap();
            assert_eq!(got.value(), &[versions - 1]);
        }
    }

    /// A reclamation step whose removal fails part-way keeps what its earlier chunks removed
    /// and puts back only the rest, which the next step removes; reads never change.
    #[tokio::test]
    async fn a_removal_that_fails_part_way_puts_back_only_what_it_did_not_remove() {
        let log = MemLog::new();
        let clock = Arc::new(HybridClock::new(Arc::new(ManualClock::new(1_000))));
        let (store, faults) = log.join(Origin::new("r", "a"), clock).await.unwrap();
        // 300 keys written twice: 300 obsolete first versions, one removal each.
        for round in 0..2u8 {
            for k in 0..300u32 {
                store
                    .commit(Batch::new().put("ns", &format!("k{k}"), vec![round]))
                    .await
                    .unwrap();
            }
        }
        assert_eq!(log.len(), 600);
        let policy = crate::store::Reclaim {
            log_floor: u64::MAX,
            now_millis: 1_000,
            expired_grace_millis: 0,
            tombstone_retention_millis: u64::MAX,
            event_retention_millis: u64::MAX,
            step: 1_000,
            trim_log: true,
        };
        // The first two chunks go through, the third fails.
        faults.fail_removals_after(Some(2));
        assert!(store.reclaim(&policy).await.is_err());
        let kept = 600 - 2 * crate::replicated::REMOVAL_CHUNK;
        assert_eq!(
            log.len(),
            kept,
            "the chunks before the failure stay removed"
        );
        assert_eq!(
            store.obsolete_entries(),
            kept - 300,
            "the rest is queued again"
        );
        faults.fail_removals_after(None);
        let done = store.reclaim(&policy).await.unwrap();
        assert_eq!(done.log_entries as usize, kept - 300);
        assert_eq!(log.len(), 300);
        assert_eq!(store.obsolete_entries(), 0);
        for k in 0..300u32 {
            let got = store.get("ns", &format!("k{k}")).await.unwrap().unwrap();
            assert_eq!(got.value(), &[1u8]);
        }
    }
}
