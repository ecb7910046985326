//! Haven's tamper-evident audit log.
//!
//! Every node writes its own **chain** of records (`<region>/<node>`): each record carries its
//! sequence number and the SHA-256 of the previous record's stored bytes, so a changed,
//! removed or reordered record breaks the chain at a place [`verify`] names. A node has a total
//! order of its own writes without asking anybody, which is why the chain is per node: nodes
//! and regions write at the same time without coordination. Every
//! [`AuditConfig::checkpoint_every`] records or [`AuditConfig::checkpoint_interval`] (whichever
//! comes first) the node signs a **checkpoint** of its chain's head with its Ed25519 key
//! ([`key`]), whose public key is published in the store.
//!
//! Records live in the store (namespace [`AUDIT_NS`]): replicated in a cluster and between
//! regions, and backed up like everything else. Recording never waits for the store: events
//! go into a bounded queue that a background writer commits in batches; when the queue is
//! full an event is dropped and counted, and the count is written as an `audit.dropped`
//! record with the next batch (and logged), so a drop is never silent. Control-plane changes,
//! which are rare, use [`Audit::record_wait`], which waits for room and for the commit.
//!
//! Retention ([`Audit::prune_now`], run in the background) removes whole days of old records
//! from the start of each chain and records what it removed in an `audit.prune` record, which
//! [`verify`] accepts as the explanation of a chain that starts after seq 1.
//!
//! Keys in [`AUDIT_NS`]: `r/<chain>/<seq:020>` records, `c/<chain>/<seq:020>` checkpoints,
//! `h/<chain>` heads, `k/<kid>` public keys.

pub mod key;
pub mod record;
pub mod verify;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use haven_state::{Batch, Store, StoreError};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

pub use record::{
    Actor, Checkpoint, DAY_MILLIS, Entry, Event, Head, Outcome, Pruned, PublicKey, Target, actions,
    day_of,
};
pub use verify::{Problem, ProblemKind, VerifyReport, verify};

/// Namespace of the audit log.
pub const AUDIT_NS: &str = "audit";

/// 64 zeros: the link of a chain's first record.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Key of record `seq` of `chain`.
pub fn record_key(chain: &str, seq: u64) -> String {
    format!("r/{chain}/{seq:020}")
}

/// Key of the checkpoint at `seq` of `chain`.
pub fn checkpoint_key(chain: &str, seq: u64) -> String {
    format!("c/{chain}/{seq:020}")
}

/// Key of the head of `chain`.
pub fn head_key(chain: &str) -> String {
    format!("h/{chain}")
}

/// Key of public key `kid`.
pub fn public_key_key(kid: &str) -> String {
    format!("k/{kid}")
}

/// The chain and sequence of a record or checkpoint key (`r/…` or `c/…`).
pub fn split_key(key: &str) -> Option<(&str, u64)> {
    let rest = key.get(2..)?;
    let (chain, seq) = rest.rsplit_once('/')?;
    Some((chain, seq.parse().ok()?))
}

/// SHA-256 of `bytes`, hex.
pub fn hash_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// How the log is written.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Events the queue holds; beyond it events are dropped (and counted).
    pub queue: usize,
    /// Most records one commit holds.
    pub batch: usize,
    /// A checkpoint after this many records…
    pub checkpoint_every: u64,
    /// …or this long after the first record not yet checkpointed, whichever comes first.
    pub checkpoint_interval: Duration,
    /// How often retention runs.
    pub prune_interval: Duration,
    /// `audit.retention_days` until the setting is applied.
    pub retention_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            queue: 8192,
            batch: 256,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            prune_interval: Duration::from_secs(3600),
            retention_days: 90,
        }
    }
}

/// Why the log could not start or a record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The store failed.
    #[error("audit log: {0}")]
    Store(#[from] StoreError),
    /// The writer has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
    /// The store did not take the record in time (it stays queued).
    #[error("the audit record was not committed within {0:?} (it stays queued)")]
    Timeout(Duration),
    /// A stored value could not be read.
    #[error("audit log: corrupt {0}")]
    Corrupt(String),
}

pub(crate) enum Msg {
    Event(Event, u64, u64, Vec<Pruned>, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
    Checkpoint(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) chain: String,
    pub(crate) node: String,
    pub(crate) region: String,
    /// Dropped and not yet recorded (the writer records and resets it).
    pub(crate) dropped: AtomicU64,
    /// Dropped since start.
    pub(crate) dropped_total: AtomicU64,
    pub(crate) written: AtomicU64,
    tool_calls: AtomicBool,
    retention_days: AtomicU64,
    pub(crate) checkpoint_interval_ms: AtomicU64,
    prune_lock: tokio::sync::Mutex<()>,
}

/// The audit log of one node. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("chain", &self.shared.chain)
            .finish()
    }
}

/// What a retention pass removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Records removed.
    pub records: u64,
    /// Checkpoints removed.
    pub checkpoints: u64,
    /// The chain prefixes removed in this pass.
    pub pruned: Vec<Pruned>,
}

impl Audit {
    /// Starts the log of the node the store writes as (`store.origin()`): publishes the
    /// checkpoint public key of `key`, reads the chain's head and starts the writer and the
    /// retention task.
    pub async fn start(
        store: Arc<dyn Store>,
        key: SigningKey,
        config: AuditConfig,
    ) -> Result<Audit, AuditError> {
        let origin = store.origin().clone();
        let chain = format!("{}/{}", origin.region, origin.node);
        let public = key.verifying_key();
        let kid = key::kid_of(&public);
        let pk_key = public_key_key(&kid);
        if store.get(AUDIT_NS, &pk_key).await?.is_none() {
            let pk = PublicKey {
                kid: kid.clone(),
                public_key: hex::encode(public.as_bytes()),
                chain: chain.clone(),
                created_millis: store.clock().wall_millis(),
            };
            store
                .commit(Batch::new().put(
                    AUDIT_NS,
                    &pk_key,
                    serde_json::to_vec(&pk).expect("a key serializes"),
                ))
                .await?;
        }
        let shared = Arc::new(Shared {
            store: store.clone(),
            chain: chain.clone(),
            node: origin.node.to_string(),
            region: origin.region.to_string(),
            dropped: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            written: AtomicU64::new(0),
            tool_calls: AtomicBool::new(false),
            retention_days: AtomicU64::new(config.retention_days.max(1)),
            checkpoint_interval_ms: AtomicU64::new(
                (config.checkpoint_interval.as_millis() as u64).max(10),
            ),
            prune_lock: tokio::sync::Mutex::new(()),
        });
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let w = writer::Writer::open(shared.clone(), key, kid, &config).await?;
        tokio::spawn(w.run(rx));
        // The retention task holds the log weakly: it ends with the last handle.
        let (weak_shared, weak_tx) = (Arc::downgrade(&shared), tx.downgrade());
        let audit = Audit { shared, tx };
        let every = config.prune_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (Some(shared), Some(tx)) = (weak_shared.upgrade(), weak_tx.upgrade()) else {
                    break;
                };
                if tx.is_closed() {
                    break;
                }
                let pruner = Audit { shared, tx };
                if let Err(e) = pruner.prune_now().await {
                    tracing::warn!(error = %e, "audit retention pass failed; it runs again later");
                }
            }
        });
        Ok(audit)
    }

    /// This node's chain, `<region>/<node>`.
    pub fn chain(&self) -> &str {
        &self.shared.chain
    }

    /// Whether tool calls are recorded (`audit.tool_calls`).
    pub fn tool_calls(&self) -> bool {
        self.shared.tool_calls.load(Ordering::Relaxed)
    }

    /// Turns the recording of tool calls on or off.
    pub fn set_tool_calls(&self, on: bool) {
        self.shared.tool_calls.store(on, Ordering::Relaxed);
    }

    /// Days of records kept (`audit.retention_days`).
    pub fn set_retention_days(&self, days: u64) {
        self.shared
            .retention_days
            .store(days.max(1), Ordering::Relaxed);
    }

    /// Longest time between a record and the checkpoint that covers it
    /// (`audit.checkpoint_interval_ms`).
    pub fn set_checkpoint_interval(&self, every: Duration) {
        self.shared
            .checkpoint_interval_ms
            .store((every.as_millis() as u64).max(10), Ordering::Relaxed);
    }

    /// Events dropped (the queue was full, or the store refused them), since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped_total.load(Ordering::Relaxed)
    }

    /// Records committed by this node since start.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    fn stamp(&self) -> (u64, u64) {
        let clock = self.shared.store.clock();
        (clock.wall_millis(), clock.now().0)
    }

    /// Records `event` without waiting: queued for the background writer. When the queue is
    /// full the event is dropped and counted; the count is recorded (`audit.dropped`).
    pub fn record(&self, event: Event) {
        let (at, hlc) = self.stamp();
        if self
            .tx
            .try_send(Msg::Event(event, at, hlc, Vec::new(), None))
            .is_err()
        {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            let n = self.shared.dropped_total.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "the audit queue is full: events are dropped (the count is recorded)"
                );
            }
        }
    }

    /// Records `event` and waits until it is committed (waiting for room in the queue rather
    /// than dropping it), at most `timeout`: for control-plane changes.
    pub async fn record_wait(&self, event: Event, timeout: Duration) -> Result<(), AuditError> {
        let (at, hlc) = self.stamp();
        self.send_wait(Msg::Event(event, at, hlc, Vec::new(), None), timeout)
            .await
    }

    async fn send_wait(&self, msg: Msg, timeout: Duration) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        let msg = match msg {
            Msg::Event(e, at, hlc, p, _) => Msg::Event(e, at, hlc, p, Some(done)),
            Msg::Flush(_) => Msg::Flush(done),
            Msg::Checkpoint(_) => Msg::Checkpoint(done),
            Msg::Close(_) => Msg::Close(done),
        };
        let work = async {
            self.tx.send(msg).await.map_err(|_| AuditError::Stopped)?;
            wait.await.map_err(|_| AuditError::Stopped)
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| AuditError::Timeout(timeout))?
    }

    /// Waits until every event queued before is committed.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (tx, _) = oneshot::channel();
        self.send_wait(Msg::Flush(tx), Duration::from_secs(60))
            .await
    }

    /// Writes what is queued and signs a checkpoint of the chain's head now.
    pub async fn checkpoint_now(&self) -> Result<(), AuditError> {
        let (tx, _) = oneshot::channel();
        self.send_wait(Msg::Checkpoint(tx), Duration::from_secs(60))
            .await
    }

    /// Writes what is queued, signs a last checkpoint and stops the writer (a node that
    /// stops calls it; records made after it are dropped and counted).
    pub async fn close(&self) -> Result<(), AuditError> {
        let (tx, _) = oneshot::channel();
        self.send_wait(Msg::Close(tx), Duration::from_secs(60))
            .await
    }

    /// One retention pass: removes, from the start of every chain, the records (and
    /// checkpoints) of days older than `audit.retention_days` before today, after recording
    /// what it removes in an `audit.prune` record of this node's chain. That record also
    /// carries forward the prefixes explained by the prune records it removes, so a chain's
    /// start stays explained.
    pub async fn prune_now(&self) -> Result<PruneReport, AuditError> {
        let _one = self.shared.prune_lock.lock().await;
        let store = &self.shared.store;
        let days = self.shared.retention_days.load(Ordering::Relaxed).max(1);
        let today = day_of(store.clock().wall_millis());
        let Some(cutoff) = today.checked_sub(days) else {
            return Ok(PruneReport::default());
        };
        let heads = store.scan_all(AUDIT_NS, "h/").await?;
        let mut new: Vec<Pruned> = Vec::new();
        let mut carried: std::collections::BTreeMap<String, Pruned> = Default::default();
        let mut doomed: Vec<(String, u64)> = Vec::new();
        for h in heads {
            let Ok(head) = serde_json::from_slice::<Head>(h.value()) else {
                continue;
            };
            let mut last: Option<(u64, String)> = None;
            let mut after: Option<String> = None;
            'pages: loop {
                let page = store
                    .scan(
                        AUDIT_NS,
                        &format!("r/{}/", head.chain),
                        after.as_deref(),
                        256,
                    )
                    .await?;
                for r in &page.records {
                    let Ok(e) = serde_json::from_slice::<Entry>(r.value()) else {
                        // Unreadable: stop here; verify reports it.
                        break 'pages;
                    };
                    if day_of(e.at_millis) >= cutoff {
                        break 'pages;
                    }
                    if head.chain == self.shared.chain {
                        for p in e.pruned {
                            let keep = carried.get(&p.chain).is_none_or(|c| c.through < p.through);
                            if keep {
                                carried.insert(p.chain.clone(), p);
                            }
                        }
                    }
                    last = Some((e.seq, hash_hex(r.value())));
                }
                match page.next_after {
                    Some(a) => after = Some(a),
                    None => break,
                }
            }
            if let Some((through, last_hash)) = last {
                doomed.push((head.chain.clone(), through));
                new.push(Pruned {
                    chain: head.chain,
                    through,
                    last_hash,
                });
            }
        }
        if new.is_empty() {
            return Ok(PruneReport::default());
        }
        // Everything explained so far, newest per chain, so that removing old prune records
        // never leaves a chain's start unexplained.
        for p in &new {
            carried.insert(p.chain.clone(), p.clone());
        }
        let all: Vec<Pruned> = carried.into_values().collect();
        let (at, hlc) = self.stamp();
        let event = Event::new(
            Actor::System,
            actions::AUDIT_PRUNE,
            Target::named("retention_days", &days.to_string()),
            Outcome::Ok,
        );
        self.send_wait(
            Msg::Event(event, at, hlc, all, None),
            Duration::from_secs(60),
        )
        .await?;
        let mut report = PruneReport {
            pruned: new,
            ..PruneReport::default()
        };
        for (chain, through) in doomed {
            for (prefix, count) in [("r", &mut report.records), ("c", &mut report.checkpoints)] {
                loop {
                    let page = store
                        .scan(AUDIT_NS, &format!("{prefix}/{chain}/"), None, 256)
                        .await?;
                    let keys: Vec<String> = page
                        .records
                        .iter()
                        .map(|r| r.record.key.clone())
                        .filter(|k| split_key(k).is_some_and(|(_, s)| s <= through))
                        .collect();
                    if keys.is_empty() {
                        break;
                    }
                    let mut batch = Batch::new();
                    for k in &keys {
                        batch = batch.delete(AUDIT_NS, k);
                    }
                    store.commit(batch).await?;
                    *count += keys.len() as u64;
                }
            }
        }
        tracing::info!(
            records = report.records,
            checkpoints = report.checkpoints,
            "audit retention removed old records"
        );
        Ok(report)
    }
}
