//! Regions: each region keeps its own change log, and every other region's log is applied to
//! it under the merge rules, so that any region serves what was written anywhere.
//!
//! A [`Replicator`] applies one other region's log (the *source*) to this region's store. One
//! node of the region does it at a time (a [`Lease`] per source). It follows the source's log
//! from the sequence after its cursor, waits for each atomic batch of the source to be
//! complete, keeps the changes the source region wrote itself (its own records and events;
//! what the source merely applied from a third region comes from that region directly), and
//! commits them here as one batch of [`Op::Merge`]/[`Op::MergeEvent`] together with the new
//! cursor. So a source's batch is as atomic here as it was there, the cursor moves exactly
//! with what it covers, and a crash between the two is impossible; merges are idempotent
//! anyway, so a batch applied twice would change nothing.
//!
//! Records of namespace [`LOCAL_NS`] (cursors, the appliers' leases, the backup lease) belong
//! to their region's own log and are never applied elsewhere: cursors change with every
//! applied batch, and carrying them back and forth would never end.
//!
//! Lag in seconds is measured from the nodes' heartbeat records, which every node writes each
//! second with its own clock and which replicate like everything else: a source region's lag
//! is this node's clock minus the newest heartbeat of that region held here
//! ([`Regions::status`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use haven_state::{
    Batch, Change, Expect, LogEntry, Op, SharedLog, Store, StoreError, Version,
    replicated::Delivery,
};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::lease::{Holding, Lease};
use crate::membership::{NODES_NS, NodeInfo};
use crate::takeover::{
    Driver, Echo, RegionLease, Takeover, TakeoverHandler, read_echo, takeovers_of,
};

/// The takeovers held here and this node's lease (`Regions::takeovers`).
#[derive(Clone, Debug, Serialize)]
pub struct TakeoverStatus {
    /// How long this node's region lease holds from now (`None`: it does not, or fewer than
    /// three regions).
    pub lease_remaining_seconds: Option<f64>,
    /// Whether claimable work may be written now (`None`: fewer than three regions).
    pub lease_holds: Option<bool>,
    /// Every takeover record held here.
    pub takeovers: Vec<TakeoverView>,
    /// This region's echo of each other region (how far it applied it; frozen for a
    /// takeover).
    pub echoes: BTreeMap<String, Echo>,
}

/// One takeover record.
#[derive(Clone, Debug, Serialize)]
pub struct TakeoverView {
    /// The region whose work is taken.
    pub source: String,
    /// The region taking it.
    pub claimer: String,
    /// Where it stands.
    #[serde(flatten)]
    pub takeover: Takeover,
}

/// Namespace of records that stay in their region's log and are never applied elsewhere:
/// replication cursors and leases, the backup lease and generation.
pub const LOCAL_NS: &str = "local";

/// Most operations one applied batch holds (JetStream's atomic batch limit); a source batch
/// that fills it commits its cursor on its own, right after.
const MAX_OPS: usize = haven_state::nats_store::MAX_BATCH_OPS;

/// How long a quiet replicator waits for the source to say how far its log is.
const STALL_CHECK: Duration = Duration::from_secs(2);

/// How long a replicator's lease lives without renewal.
const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often, at most, a replicator tells the other regions how far it has applied.
const ECHO_EVERY: Duration = Duration::from_millis(100);

/// Whether a change of the source region's log is the source's own and travels to others.
pub fn replicates(change: &Change, source: &str) -> bool {
    match change {
        Change::Record(r) => &*r.version.origin.region == source && r.namespace != LOCAL_NS,
        Change::Event(e) => &*e.version.origin.region == source,
    }
}

/// The cursor record of `source` in this region's store: the last sequence of the source's
/// log applied here.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Last sequence of the source's log covered (applied or skipped as not the source's own).
    pub seq: u64,
    /// When it was written, Unix milliseconds (this region's clock).
    pub at_millis: u64,
}

/// The key of the cursor of `source` (namespace [`LOCAL_NS`]).
pub fn cursor_key(source: &str) -> String {
    format!("cursor/{source}")
}

fn lease_key(source: &str) -> String {
    format!("lease/{source}")
}

/// Reads the cursor of `source` with its revision.
pub async fn read_cursor(
    store: &dyn Store,
    source: &str,
) -> Result<(Cursor, Option<u64>), StoreError> {
    Ok(match store.get(LOCAL_NS, &cursor_key(source)).await? {
        Some(r) => (
            serde_json::from_slice(r.value()).unwrap_or_default(),
            Some(r.revision),
        ),
        None => (Cursor::default(), None),
    })
}

/// What this node's replicator of one source is doing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicatorState {
    /// `replicating` (this node holds the lease), `standby` (another node does), `starting`,
    /// or `unreachable` (the source's log could not be read).
    pub state: String,
    /// The last error, while it lasts.
    pub error: Option<String>,
    /// Source batches applied by this node.
    pub batches: u64,
    /// Records and events applied by this node.
    pub changes: u64,
    /// The last source sequence this node applied or found to hold nothing to apply (it
    /// may be ahead of the stored cursor by batches that held nothing).
    pub covered: u64,
    /// Whether this region holds the source's log up to `target` (as applied by this node,
    /// or by the node holding the lease, by the stored cursor).
    pub caught_up: bool,
    /// The source's last sequence, as the source first answered after this node started:
    /// everything the source wrote before is applied here once `caught_up`.
    pub target: Option<u64>,
}

/// Applies one source region's log to this region's store (see the module docs).
pub struct Replicator {
    local: Arc<dyn Store>,
    source: String,
    remote: Arc<dyn SharedLog>,
    holder: String,
    state: Arc<RwLock<ReplicatorState>>,
    /// When this node last wrote its region's echo of the source.
    echoed: parking_lot::Mutex<Option<tokio::time::Instant>>,
}

impl Replicator {
    /// A replicator of `source` (whose log is `remote`) into `local`, for node `holder`.
    pub fn new(
        local: Arc<dyn Store>,
        source: &str,
        remote: Arc<dyn SharedLog>,
        holder: &str,
    ) -> Replicator {
        Replicator {
            local,
            source: source.to_owned(),
            remote,
            holder: holder.to_owned(),
            state: Arc::new(RwLock::new(ReplicatorState {
                state: "starting".into(),
                ..Default::default()
            })),
            echoed: parking_lot::Mutex::new(None),
        }
    }

    /// Tells every region how far this one has applied the source (at most every
    /// [`ECHO_EVERY`], or at once with `now`); the source's nodes renew their region lease
    /// from it (`crate::takeover`).
    async fn echo(&self, seq: u64, now: bool) {
        let due = self
            .echoed
            .lock()
            .is_none_or(|at| at.elapsed() >= ECHO_EVERY);
        if !(due || now) {
            return;
        }
        *self.echoed.lock() = Some(tokio::time::Instant::now());
        if let Err(e) = crate::takeover::write_echo(&*self.local, &self.source, seq).await {
            tracing::debug!(source = %self.source, error = %e, "writing the echo failed");
        }
    }

    /// What it is doing, for status.
    pub fn state(&self) -> Arc<RwLock<ReplicatorState>> {
        self.state.clone()
    }

    fn set(&self, state: &str, error: Option<String>) {
        let mut s = self.state.write();
        if s.state != state {
            tracing::info!(source = %self.source, state, "replication from a region");
        }
        s.state = state.to_owned();
        s.error = error;
    }

    /// Runs until the task is aborted: holds the lease when it may and applies the source.
    pub async fn run(self) {
        let mut lease = Lease::new(
            self.local.clone(),
            LOCAL_NS,
            &lease_key(&self.source),
            &self.holder,
            LEASE_TTL,
        );
        loop {
            match lease.hold().await {
                Ok(Holding::Held { .. }) => {
                    if let Err(e) = self.apply(&mut lease).await {
                        let e = explain(&self.source, e);
                        // Once per outage at warning level; the retries every second below it.
                        if self.state.read().state == "unreachable" {
                            tracing::debug!(source = %self.source, error = %e, "replication from a region still stopped");
                        } else {
                            tracing::warn!(source = %self.source, error = %e, "replication from a region stopped; retrying every second");
                        }
                        self.set("unreachable", Some(e));
                    }
                }
                Ok(Holding::Standby { .. }) => {
                    self.set("standby", None);
                    if let Ok((cursor, _)) = read_cursor(&*self.local, &self.source).await {
                        self.note_progress(cursor.seq).await;
                    }
                }
                Err(e) => self.set("unreachable", Some(format!("this region's store: {e}"))),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Applies the source from the cursor on, while this node holds the lease; returns why it
    /// stopped.
    async fn apply(&self, lease: &mut Lease) -> Result<(), String> {
        let (cursor, revision) = read_cursor(&*self.local, &self.source)
            .await
            .map_err(|e| format!("reading the cursor: {e}"))?;
        let mut deliveries = self
            .remote
            .follow(cursor.seq + 1)
            .await
            .map_err(|e| format!("following the source: {e}"))?;
        self.set("replicating", None);
        let mut renew = tokio::time::interval(LEASE_TTL / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        let mut at = Position {
            saved: cursor.seq,
            covered: cursor.seq,
            revision,
        };
        // Entries of a source batch that is not complete yet.
        let mut pending = Pending::default();
        // Whether anything arrived since the last lease renewal.
        let mut delivered = false;
        loop {
            let first = tokio::select! {
                d = deliveries.next() => d,
                _ = renew.tick() => {
                    match lease.hold().await {
                        Ok(Holding::Held { .. }) => {}
                        Ok(Holding::Standby { .. }) => return Ok(()),
                        Err(e) => return Err(format!("renewing the lease: {e}")),
                    }
                    self.note_progress(at.covered).await;
                    self.echo(at.covered, true).await;
                    if !std::mem::take(&mut delivered) {
                        // Quiet: idle, or a delivery that stalled (a cut link leaves the
                        // consumer waiting): ask the source how far it is.
                        match tokio::time::timeout(STALL_CHECK, self.remote.last_seq()).await {
                            Ok(Ok(last)) if last > at.covered => {
                                return Err(format!(
                                    "the delivery stalled at {} of {last}",
                                    at.covered
                                ));
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return Err(format!("the source is unreachable: {e}")),
                            Err(_) => return Err("the source is unreachable: no answer".into()),
                        }
                    }
                    // Batches that held nothing to apply moved the cursor only here.
                    if at.covered > at.saved {
                        let covered = at.covered;
                        self.commit(Vec::new(), &mut at, covered, 0).await?;
                    }
                    continue;
                }
            };
            delivered = true;
            // This delivery and every one ready now, so that a burst is applied in few
            // commits (never splitting a source batch).
            let mut group = Group::default();
            let mut next = first;
            loop {
                let d = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(format!("reading the source: {e}")),
                    None => return Err("the source's delivery ended".into()),
                };
                if let Some((seq, batch, trace)) = take(&mut pending, d) {
                    let own: Vec<Op> = batch
                        .iter()
                        .filter(|e| replicates(&e.change, &self.source))
                        .map(|e| match &e.change {
                            Change::Record(r) => Op::Merge(r.clone()),
                            Change::Event(ev) => Op::MergeEvent(ev.clone()),
                        })
                        .collect();
                    if group.ops.len() + own.len() >= MAX_OPS {
                        self.flush(&mut group, &mut at).await?;
                    }
                    if own.len() >= MAX_OPS {
                        // A batch as large as a commit may be: its changes alone, then the
                        // cursor (applying it again after a crash in between changes
                        // nothing).
                        let n = own.len() as u64;
                        use tracing::Instrument as _;
                        let span = apply_span(&self.source, n, &trace);
                        self.local
                            .commit(Batch { ops: own })
                            .instrument(span)
                            .await
                            .map_err(|e| format!("applying a batch: {e}"))?;
                        self.commit(Vec::new(), &mut at, seq, n).await?;
                    } else {
                        if !own.is_empty() {
                            let room = MAX_LINKS.saturating_sub(group.traces.len());
                            group.traces.extend(trace.into_iter().take(room));
                        }
                        group.ops.extend(own);
                        group.last = Some(seq);
                        group.batches += 1;
                    }
                }
                if group.ops.len() >= MAX_OPS / 2 && pending.entries.is_empty() {
                    break;
                }
                match deliveries.next().now_or_never() {
                    Some(d) => next = d,
                    None => break,
                }
            }
            self.flush(&mut group, &mut at).await?;
        }
    }

    /// Applies what `group` gathered, with the cursor; a group with nothing to apply only
    /// moves the covered position (saved at the next lease renewal).
    async fn flush(&self, group: &mut Group, at: &mut Position) -> Result<(), String> {
        let Some(last) = group.last.take() else {
            return Ok(());
        };
        let ops = std::mem::take(&mut group.ops);
        if ops.is_empty() {
            at.covered = last;
            self.state.write().covered = last;
        } else {
            let n = ops.len() as u64;
            use tracing::Instrument as _;
            let span = apply_span(&self.source, n, &group.traces);
            self.commit(ops, at, last, n).instrument(span).await?;
        }
        group.traces.clear();
        let mut s = self.state.write();
        s.batches += std::mem::take(&mut group.batches);
        Ok(())
    }

    /// Notes that this region holds the source's log up to `applied`: the first time the
    /// source answers, its last sequence becomes the target; reaching it is catching up.
    async fn note_progress(&self, applied: u64) {
        if self.state.read().caught_up {
            return;
        }
        let target = self.state.read().target;
        let target = match target {
            Some(t) => t,
            None => match tokio::time::timeout(STALL_CHECK, self.remote.last_seq()).await {
                Ok(Ok(last)) => {
                    self.state.write().target = Some(last);
                    last
                }
                _ => return,
            },
        };
        if applied >= target {
            tracing::info!(source = %self.source, target, "caught up with the region's log");
            self.state.write().caught_up = true;
        }
    }

    /// Commits `ops` (`n` changes) with the cursor at `seq`.
    async fn commit(
        &self,
        ops: Vec<Op>,
        at: &mut Position,
        seq: u64,
        n: u64,
    ) -> Result<(), String> {
        let cursor = Cursor {
            seq,
            at_millis: self.local.clock().wall_millis(),
        };
        let expect = at.revision.map_or(Expect::Absent, Expect::Revision);
        let batch = Batch { ops }.put_if(
            LOCAL_NS,
            &cursor_key(&self.source),
            serde_json::to_vec(&cursor).expect("a cursor serializes"),
            expect,
        );
        let commit = self
            .local
            .commit(batch)
            .await
            .map_err(|e| format!("applying a batch: {e}"))?;
        // The cursor is the batch's last write.
        at.revision = Some(commit.last_seq);
        at.saved = seq;
        at.covered = seq;
        {
            let mut s = self.state.write();
            s.changes += n;
            s.covered = seq;
        }
        self.echo(seq, false).await;
        Ok(())
    }
}

/// Where a replicator is in its source's log.
struct Position {
    /// The stored cursor.
    saved: u64,
    /// The last source sequence applied or found to hold nothing to apply.
    covered: u64,
    /// The stored cursor's revision.
    revision: Option<u64>,
}

/// Complete source batches gathered for one commit.
#[derive(Default)]
struct Group {
    ops: Vec<Op>,
    last: Option<u64>,
    batches: u64,
    /// The trace contexts of its source batches' writers (at most [`MAX_LINKS`]).
    traces: Vec<String>,
}

/// The most links a `region.apply` span has (one per source batch written in a sampled trace).
const MAX_LINKS: usize = 32;

/// The span of applying source batches here, linked to the traces that wrote them.
fn apply_span(source: &str, changes: u64, traces: &[String]) -> tracing::Span {
    let span = tracing::info_span!(
        "region.apply",
        otel.name = "region.apply",
        otel.kind = "consumer",
        haven.source_region = %source,
        haven.changes = changes,
    );
    for t in traces {
        haven_telemetry::trace::add_link(&span, Some(t));
    }
    span
}

/// An error of reading region `source`'s log, with what it most likely means when NATS says
/// only that a resource does not exist (in either of the words it uses for a missing stream).
fn explain(source: &str, e: String) -> String {
    if e.contains("does not exist") || e.contains("stream not found") {
        format!(
            "{e}: region {source}'s stream (HAVEN_{}) was not found in JetStream domain {source:?}; check that the region is named right (in --peer-regions), that its servers run JetStream in domain {source:?}, and that the regions are joined by leafnodes (directly, or through a hub for three or more)",
            source
                .to_ascii_uppercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
    } else {
        e
    }
}

/// The entries of a source batch received so far, and the trace contexts of the commits
/// among them (a batch may carry several commits of a node, each with its own).
#[derive(Default)]
struct Pending {
    entries: Vec<LogEntry>,
    traces: Vec<String>,
}

/// Takes one delivery; once a batch's last entry arrived, returns its last sequence, its
/// entries and its commits' trace contexts.
fn take(pending: &mut Pending, d: Delivery) -> Option<(u64, Vec<LogEntry>, Vec<String>)> {
    if let Some(change) = d.change {
        pending.entries.push(LogEntry { seq: d.seq, change });
    }
    if let Some(t) = d.traceparent {
        pending.traces.push(t);
    }
    d.complete.then(|| {
        let p = std::mem::take(pending);
        (d.seq, p.entries, p.traces)
    })
}

/// A digest of the state that every region converges to: every record (tombstones included)
/// and every stream event, except this region's own bookkeeping ([`LOCAL_NS`]), the
/// heartbeats and the echoes (how far each region has applied each other's log), which change
/// every second while the regions live: two regions never hold the same copies of them at the
/// same instant, however converged the rest. Two regions that applied the same writes have the
/// same digest, whatever order they applied them in.
pub async fn state_digest(store: &dyn Store) -> Result<(String, u64), StoreError> {
    let d = state_digest_parts(store).await?;
    Ok((d.sha256, d.items))
}

/// The part of the state that stream events make up in [`StateDigest::parts`] and
/// [`state_items`]; records are listed under their namespace.
pub const EVENTS_PART: &str = "(events)";

/// [`state_digest`] of the whole state and of each of its parts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StateDigest {
    /// SHA-256 of the whole converging state.
    pub sha256: String,
    /// How many records and events it holds.
    pub items: u64,
    /// The same per part: each record namespace, and the stream events ([`EVENTS_PART`]).
    /// Two regions whose digests differ differ in the parts whose digests differ.
    pub parts: BTreeMap<String, PartDigest>,
}

/// The digest of one part of the state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartDigest {
    /// SHA-256 of the part.
    pub sha256: String,
    /// How many items it holds.
    pub items: u64,
}

/// [`state_digest`], with the digest of each part of the state.
pub async fn state_digest_parts(store: &dyn Store) -> Result<StateDigest, StoreError> {
    let items = converging_items(store).await?;
    Ok(StateDigest {
        sha256: digest_of(items.values().flatten()),
        items: items.values().map(|p| p.len() as u64).sum(),
        parts: items
            .iter()
            .map(|(part, items)| {
                let d = PartDigest {
                    sha256: digest_of(items.iter()),
                    items: items.len() as u64,
                };
                (part.clone(), d)
            })
            .collect(),
    })
}

/// One item of the converging state, as [`state_items`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateItem {
    /// The record's key, or the event's `stream#index`.
    pub key: String,
    /// The version that won.
    pub version: Version,
    /// Whether the record is a tombstone.
    pub tombstone: bool,
    /// SHA-256 of the item's whole content (value, expiry, version).
    pub sha256: String,
}

/// Every item of one part of the converging state (a namespace, or [`EVENTS_PART`]), in key
/// order, with its version and a digest of its content: what tells two regions' differences
/// apart key by key.
pub async fn state_items(store: &dyn Store, part: &str) -> Result<Vec<StateItem>, StoreError> {
    let (_, entries) = store.state_entries().await?;
    let mut items = BTreeMap::new();
    for e in entries {
        let (key, version, tombstone) = match &e.change {
            Change::Record(r) if r.namespace == part && !excluded(&r.namespace, &r.key) => {
                (r.key.clone(), r.version.clone(), r.is_tombstone())
            }
            Change::Event(ev) if part == EVENTS_PART => (
                format!("{}#{}", ev.stream, ev.index),
                ev.version.clone(),
                false,
            ),
            _ => continue,
        };
        let sha256 = hex::encode(sha2::Sha256::digest(encoded(&e.change)));
        items.insert(
            key.clone(),
            StateItem {
                key,
                version,
                tombstone,
                sha256,
            },
        );
    }
    Ok(items.into_values().collect())
}

/// The records that are not part of the converging state.
fn excluded(namespace: &str, key: &str) -> bool {
    namespace == LOCAL_NS
        || namespace == NODES_NS
        || (namespace == REGIONS_NS && key.starts_with(crate::takeover::ECHO_PREFIX))
}

/// The converging state's items by part: (sort key, encoded change) pairs in order.
async fn converging_items(
    store: &dyn Store,
) -> Result<BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>, StoreError> {
    let (_, entries) = store.state_entries().await?;
    let mut parts: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>> = BTreeMap::new();
    for e in entries {
        let (part, key) = match &e.change {
            Change::Record(r) if excluded(&r.namespace, &r.key) => continue,
            Change::Record(r) => (r.namespace.clone(), encoded(&(0u8, &r.namespace, &r.key))),
            Change::Event(ev) => (
                EVENTS_PART.to_owned(),
                encoded(&(1u8, &ev.stream, ev.index)),
            ),
        };
        parts
            .entry(part)
            .or_default()
            .insert(key, encoded(&e.change));
    }
    Ok(parts)
}

/// SHA-256 over (key, value) pairs in order, each length-prefixed.
fn digest_of<'a>(items: impl Iterator<Item = (&'a Vec<u8>, &'a Vec<u8>)>) -> String {
    let mut hash = sha2::Sha256::new();
    for (k, v) in items {
        hash.update((k.len() as u64).to_le_bytes());
        hash.update(k);
        hash.update((v.len() as u64).to_le_bytes());
        hash.update(v);
    }
    hex::encode(hash.finalize())
}

fn encoded<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializes")
}

/// Another region as this node knows it.
struct Peer {
    name: String,
    log: Arc<dyn SharedLog>,
    state: Arc<RwLock<ReplicatorState>>,
    task: tokio::task::JoinHandle<()>,
}

/// This node's side of multi-region replication: a [`Replicator`] per other region, the
/// status of every link, the regions' roles, and the health checks that move the active role
/// away from a region that a majority of regions finds silent.
pub struct Regions {
    local: Arc<dyn Store>,
    name: String,
    peers: Vec<Peer>,
    health: Arc<Health>,
    checker: tokio::task::JoinHandle<()>,
    lease: RegionLease,
    handler: Arc<std::sync::OnceLock<TakeoverHandler>>,
}

impl Drop for Regions {
    fn drop(&mut self) {
        for p in &self.peers {
            p.task.abort();
        }
        self.checker.abort();
    }
}

/// Namespace of the regions' shared records: the roles (key [`ROLES_KEY`]) and each
/// region's verdict on the others (`verdict/<region>`). They travel to every region.
pub const REGIONS_NS: &str = "regions";
/// Key of the roles record.
pub const ROLES_KEY: &str = "roles";

/// Which region is active (the one global load balancers prefer); every other region with
/// nodes is a standby (it serves too). Changed by a planned switchover (`promote`,
/// `demote`) or by automatic failover; every change increments the epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    /// Incremented by every change.
    pub epoch: u64,
    /// The active region (`None`: no region is preferred).
    pub active: Option<String>,
    /// The region whose node made the change.
    pub changed_by: String,
    /// Why.
    pub reason: String,
    /// When, Unix milliseconds (the changing node's clock).
    pub at_millis: u64,
}

/// What a region's nodes conclude about the others from their health checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Regions whose heartbeats have not changed for the failure threshold × the check
    /// interval, on the judging node's own clock.
    pub silent: Vec<String>,
}

/// Health-check settings of regions.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// How often another region's health is checked (the design's default: 10 s).
    pub interval: Duration,
    /// Failed checks in a row after which a region is judged failed.
    pub threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(10),
            threshold: 3,
        }
    }
}

/// When each other region's newest heartbeat last changed, on this node's monotonic clock.
#[derive(Default)]
struct Health {
    config: parking_lot::Mutex<HealthConfig>,
    seen: parking_lot::Mutex<BTreeMap<String, (u64, tokio::time::Instant)>>,
    /// Recent samples of each region's clock offset (its heartbeat's time minus this node's
    /// clock when the heartbeat arrived), milliseconds.
    offsets: parking_lot::Mutex<BTreeMap<String, std::collections::VecDeque<i64>>>,
}

/// The role of `region` under `roles`.
pub fn role_of(roles: &Roles, region: &str) -> &'static str {
    if roles.active.as_deref() == Some(region) {
        "active"
    } else {
        "standby"
    }
}

/// Reads the roles record with its revision.
pub async fn read_roles(store: &dyn Store) -> Result<(Roles, Option<u64>), StoreError> {
    Ok(match store.get(REGIONS_NS, ROLES_KEY).await? {
        Some(r) => (
            serde_json::from_slice(r.value()).unwrap_or_default(),
            Some(r.revision),
        ),
        None => (Roles::default(), None),
    })
}

/// The verdict of `region`, as held here.
pub async fn read_verdict(store: &dyn Store, region: &str) -> Result<Verdict, StoreError> {
    Ok(store
        .get(REGIONS_NS, &format!("verdict/{region}"))
        .await?
        .and_then(|r| serde_json::from_slice(r.value()).ok())
        .unwrap_or_default())
}

/// Why a role change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The change could lose writes or split the preference; `--force` overrides.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One other region, as [`Regions::status`] shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    /// The region's name.
    pub name: String,
    /// Its role: `active` or `standby`.
    pub role: String,
    /// Seconds since its newest heartbeat changed here, on this node's clock (what the
    /// health checks judge).
    pub silent_seconds: Option<f64>,
    /// This node's replicator of it: `replicating`, `standby` (another node of this region
    /// replicates it), `starting` or `unreachable`.
    pub link: String,
    /// The link's last error, while it lasts.
    pub error: Option<String>,
    /// The last sequence of its log applied here (the stored cursor).
    pub applied_seq: u64,
    /// When the cursor was last written, Unix milliseconds (this region's clock).
    pub cursor_at_millis: Option<u64>,
    /// The last sequence of its log, asked of it now (`None`: it did not answer in 2 s).
    pub source_last_seq: Option<u64>,
    /// Entries of its log not applied here yet (of every kind: some hold nothing to apply).
    pub behind_entries: Option<u64>,
    /// The newest heartbeat of its nodes held here, Unix milliseconds (its clock).
    pub last_heartbeat_millis: Option<u64>,
    /// Replication lag in seconds: this node's clock minus that heartbeat (clock skew
    /// between the regions adds to it).
    pub lag_seconds: Option<f64>,
    /// Its nodes heard lately: those that have not left and whose heartbeat is at most 5 s
    /// older than the region's newest one (by that region's clock); 0 while the region is
    /// silent for the failure threshold.
    pub nodes: usize,
    /// Whether the health checks judge it failed now (silent for the failure threshold).
    pub silent: bool,
    /// Batches and changes of it applied by this node.
    pub batches_applied: u64,
    /// See `batches_applied`.
    pub changes_applied: u64,
}

impl Regions {
    /// Starts replicating every region of `peers` (name and log) into `local`, as node
    /// `node`, with the default health checks.
    pub fn start(
        local: Arc<dyn Store>,
        node: &str,
        peers: Vec<(String, Arc<dyn SharedLog>)>,
    ) -> Regions {
        Regions::start_with(local, node, peers, HealthConfig::default())
    }

    /// Like [`Regions::start`], with the given health checks.
    pub fn start_with(
        local: Arc<dyn Store>,
        node: &str,
        peers: Vec<(String, Arc<dyn SharedLog>)>,
        health: HealthConfig,
    ) -> Regions {
        let peers = peers
            .into_iter()
            .map(|(name, log)| {
                let replicator = Replicator::new(local.clone(), &name, log.clone(), node);
                let state = replicator.state();
                let task = tokio::spawn(replicator.run());
                Peer {
                    name,
                    log,
                    state,
                    task,
                }
            })
            .collect::<Vec<Peer>>();
        let name = local.origin().region.to_string();
        let health = Arc::new(Health {
            config: parking_lot::Mutex::new(health),
            seen: Default::default(),
            offsets: Default::default(),
        });
        let lease = RegionLease::new(&name, peers.iter().map(|p| p.name.clone()).collect());
        let handler = Arc::new(std::sync::OnceLock::new());
        let driver = Driver::new(
            local.clone(),
            node,
            peers.iter().map(|p| p.name.clone()).collect(),
            lease.clone(),
            handler.clone(),
        );
        let checker = tokio::spawn(check_health(
            local.clone(),
            name.clone(),
            peers.iter().map(|p| p.name.clone()).collect(),
            health.clone(),
            driver,
        ));
        Regions {
            local,
            name,
            peers,
            health,
            checker,
            lease,
            handler,
        }
    }

    /// This region's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This node's region lease: with three regions or more, work opened while it holds
    /// may be taken over by another region if this one fails, and is written only while it
    /// holds (`crate::takeover`).
    pub fn lease(&self) -> Option<RegionLease> {
        (self.peers.len() >= 2).then(|| self.lease.clone())
    }

    /// Sets what claims a failed region's claimable work held here (the engine's
    /// `take_over_region`). A node without one takes no part in takeovers (it neither
    /// freezes nor claims); it still renews its lease.
    pub fn set_takeover_handler(&self, handler: TakeoverHandler) {
        let _ = self.handler.set(handler);
    }

    /// Every takeover record held here, by source region and claimer, and this region's
    /// echo of each other region.
    pub async fn takeovers(&self) -> Result<TakeoverStatus, StoreError> {
        let mut takeovers = Vec::new();
        let mut echoes = Vec::new();
        for p in self
            .peers
            .iter()
            .map(|p| p.name.clone())
            .chain(std::iter::once(self.name.clone()))
        {
            for (claimer, (t, _)) in takeovers_of(&*self.local, &p).await? {
                takeovers.push(TakeoverView {
                    source: p.clone(),
                    claimer,
                    takeover: t,
                });
            }
        }
        for p in &self.peers {
            echoes.push((
                p.name.clone(),
                read_echo(&*self.local, &self.name, &p.name).await,
            ));
        }
        Ok(TakeoverStatus {
            lease_remaining_seconds: self
                .lease()
                .and_then(|l| l.remaining())
                .map(|d| d.as_secs_f64()),
            lease_holds: self.lease().map(|l| l.holds()),
            takeovers,
            echoes: echoes.into_iter().collect(),
        })
    }

    /// The roles record as held here.
    pub async fn roles(&self) -> Result<Roles, StoreError> {
        Ok(read_roles(&*self.local).await?.0)
    }

    /// Whether this region holds every other region's log up to where it was when this
    /// node started (strictly: a silent region counts as not heard). A node settles work
    /// left by dead processes only then, so that a takeover of this region's work that
    /// another region made while this one was gone is applied here first.
    pub fn heard_all(&self) -> bool {
        self.peers.iter().all(|p| p.state.read().caught_up)
    }

    /// Waits until this node has applied the other regions' logs since it started (or found
    /// them silent for the failure threshold), at most that threshold and 2 s more: until
    /// then the roles record it holds may be stale (a region back from an outage still holds
    /// the roles of before it, e.g. itself active), and a role change decided on it would be
    /// answered wrongly or fight the newer one.
    async fn settled_view(&self) -> Result<(), RoleError> {
        let deadline = tokio::time::Instant::now() + self.failure_limit() + Duration::from_secs(2);
        while !self.caught_up() {
            if tokio::time::Instant::now() >= deadline {
                return Err(RoleError::Refused(format!(
                    "region {} has not yet applied the other regions' logs since this node started, so the roles it holds may be stale; try again once `haven region status` shows it caught up, or use --force",
                    self.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// How long a region may be silent before it is judged failed.
    fn failure_limit(&self) -> Duration {
        let config = self.health.config.lock().clone();
        config.interval * config.threshold
    }

    /// Whether this region may be preferred by load balancers now: every other region's log
    /// has been applied up to (nearly) its end since this node started, or that region has
    /// been silent for the failure threshold (it may be gone). A region that returns from
    /// an outage so serves its old clients' writes made elsewhere before it is preferred.
    pub fn caught_up(&self) -> bool {
        let limit = self.failure_limit();
        self.peers.iter().all(|p| {
            p.state.read().caught_up || self.silent_for(&p.name).is_some_and(|d| d >= limit)
        })
    }

    /// Whether this region hears a majority of all regions (itself included): a region cut
    /// off from the majority is not preferred by load balancers, since the majority may
    /// have moved the active role away from it meanwhile.
    pub fn hears_majority(&self) -> bool {
        let total = self.peers.len() + 1;
        let heard = total - self.unreachable().len();
        heard * 2 > total
    }

    /// Waits (at most `timeout`) until this region has applied every other region's log up
    /// to where it ends now; the regions it could not catch up with (unreachable, or not
    /// within the time). Before this node answers that something does not exist: it may
    /// have just been made in another region.
    pub async fn catch_up_with_peers(&self, timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut behind = Vec::new();
        for p in &self.peers {
            let end = match tokio::time::timeout_at(deadline, p.log.last_seq()).await {
                Ok(Ok(end)) => end,
                _ => {
                    behind.push(p.name.clone());
                    continue;
                }
            };
            loop {
                let state = p.state.read().clone();
                if state.covered >= end {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    behind.push(p.name.clone());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        behind
    }

    /// The other regions this node cannot hear now: its replicator of them cannot read
    /// their log, or their heartbeats have not changed for the failure threshold.
    pub fn unreachable(&self) -> Vec<String> {
        let limit = self.failure_limit();
        self.peers
            .iter()
            .filter(|p| {
                p.state.read().state == "unreachable"
                    || self.silent_for(&p.name).is_some_and(|d| d >= limit)
            })
            .map(|p| p.name.clone())
            .collect()
    }

    /// Seconds since the newest heartbeat of `region` changed, on this node's clock (`None`
    /// before any was seen).
    pub fn silent_for(&self, region: &str) -> Option<Duration> {
        self.health
            .seen
            .lock()
            .get(region)
            .map(|(_, at)| at.elapsed())
    }

    /// Makes this region the active one (a planned switchover). Refused, unless `force`,
    /// while the active region may be alive and this region has not applied all of its log:
    /// the error says how far behind it is.
    pub async fn promote(&self, force: bool) -> Result<Roles, RoleError> {
        if !force {
            self.settled_view().await?;
        }
        let (roles, revision) = read_roles(&*self.local).await?;
        if roles.active.as_deref() == Some(self.name.as_str()) {
            return Ok(roles);
        }
        if let Some(active) = roles.active.as_deref()
            && !force
        {
            let status = self.status().await;
            if let Some(p) = status.iter().find(|p| p.name == active) {
                let silent = self.silent_for(active).unwrap_or_default();
                let caught_up = p.link == "replicating"
                    && p.behind_entries == Some(0)
                    && p.lag_seconds.is_some_and(|l| l < 5.0);
                if !caught_up {
                    return Err(RoleError::Refused(format!(
                        "region {} has not applied all of the active region {active}'s log: link {}, applied {} of {}, lag {}; its last heartbeat arrived {:.1} s ago, so it may be alive: promoting now would make clients prefer a region without those writes (they arrive when the link works again, but are missing meanwhile and lost if {active} is gone). Wait until `haven region status` shows 0 behind, or use --force",
                        self.name,
                        p.link,
                        p.applied_seq,
                        p.source_last_seq.map_or("?".into(), |s| s.to_string()),
                        p.lag_seconds
                            .map_or("unknown".into(), |l| format!("{l:.1} s")),
                        silent.as_secs_f64(),
                    )));
                }
            }
        }
        let next = Roles {
            epoch: roles.epoch + 1,
            active: Some(self.name.clone()),
            changed_by: self.name.clone(),
            reason: if force {
                "promoted by an operator (forced)".into()
            } else {
                "promoted by an operator".into()
            },
            at_millis: self.local.clock().wall_millis(),
        };
        write_roles(&*self.local, &next, revision).await?;
        Ok(next)
    }

    /// Makes this region a standby: no region is active until another is promoted (a
    /// planned switchover starts here, so that clients move before the promotion).
    pub async fn demote(&self) -> Result<Roles, RoleError> {
        self.settled_view().await?;
        let (roles, revision) = read_roles(&*self.local).await?;
        if roles.active.as_deref() != Some(self.name.as_str()) {
            return Err(RoleError::Refused(format!(
                "region {} is not the active region (the active one is {})",
                self.name,
                roles.active.as_deref().unwrap_or("none")
            )));
        }
        let next = Roles {
            epoch: roles.epoch + 1,
            active: None,
            changed_by: self.name.clone(),
            reason: "demoted by an operator".into(),
            at_millis: self.local.clock().wall_millis(),
        };
        write_roles(&*self.local, &next, revision).await?;
        Ok(next)
    }

    /// The names of the other regions.
    pub fn peers(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.name.clone()).collect()
    }

    /// Every other region, with the link to it and its lag.
    pub async fn status(&self) -> Vec<PeerStatus> {
        let now = self.local.clock().wall_millis();
        let roles = self.roles().await.unwrap_or_default();
        let mut out = Vec::with_capacity(self.peers.len());
        for p in &self.peers {
            let state = p.state.read().clone();
            let (cursor, stored) = read_cursor(&*self.local, &p.name).await.unwrap_or_default();
            let source_last_seq = tokio::time::timeout(Duration::from_secs(2), p.log.last_seq())
                .await
                .ok()
                .and_then(Result::ok);
            let beats = self
                .local
                .scan_all(NODES_NS, &format!("{}/", p.name))
                .await
                .unwrap_or_default();
            let infos: Vec<NodeInfo> = beats
                .iter()
                .filter_map(|r| serde_json::from_slice::<NodeInfo>(r.value()).ok())
                .filter(|i| i.region == p.name)
                .collect();
            let last = infos.iter().map(|i| i.beat_millis).max();
            let silent = self
                .silent_for(&p.name)
                .is_some_and(|d| d >= self.failure_limit());
            let nodes = if silent {
                0
            } else {
                infos
                    .iter()
                    .filter(|i| !i.left && last.is_some_and(|l| i.beat_millis + 5_000 >= l))
                    .count()
            };
            // The holder knows how far it got; others go by the stored cursor.
            let covered = cursor.seq.max(state.covered);
            out.push(PeerStatus {
                role: role_of(&roles, &p.name).into(),
                silent_seconds: self.silent_for(&p.name).map(|d| d.as_secs_f64()),
                name: p.name.clone(),
                link: state.state,
                error: state.error,
                applied_seq: cursor.seq,
                cursor_at_millis: stored.map(|_| cursor.at_millis),
                source_last_seq,
                behind_entries: source_last_seq.map(|s| s.saturating_sub(covered)),
                last_heartbeat_millis: last,
                lag_seconds: last.map(|b| now.saturating_sub(b) as f64 / 1000.0),
                nodes,
                silent,
                batches_applied: state.batches,
                changes_applied: state.changes,
            });
        }
        out
    }
}

async fn write_roles(
    store: &dyn Store,
    roles: &Roles,
    revision: Option<u64>,
) -> Result<(), StoreError> {
    let expect = revision.map_or(Expect::Absent, Expect::Revision);
    store
        .commit(Batch::new().put_if(
            REGIONS_NS,
            ROLES_KEY,
            serde_json::to_vec(roles).expect("roles serialize"),
            expect,
        ))
        .await?;
    tracing::info!(epoch = roles.epoch, active = ?roles.active, reason = %roles.reason, "region roles changed");
    Ok(())
}

/// Every check interval: notes which regions are silent (their newest heartbeat unchanged
/// for the threshold on this node's clock), publishes this region's verdict, and when the
/// active region is silent to a majority of all regions (this one included), the first of
/// that majority by name makes itself active. One side of a split never decides alone: two
/// regions need a third (or a witness region) to fail over automatically.
async fn check_health(
    local: Arc<dyn Store>,
    name: String,
    peers: Vec<String>,
    health: Arc<Health>,
    mut driver: Driver,
) {
    let mut published: Option<Verdict> = None;
    let mut last_check = tokio::time::Instant::now();
    // Whether "silent, but not to a majority" was logged (once per episode).
    let mut warned_minority = false;
    loop {
        let config = health.config.lock().clone();
        // Heartbeats are sampled every second (so that silence is measured to a second,
        // whatever the interval); verdicts and failover are decided every interval.
        tokio::time::sleep(config.interval.min(Duration::from_secs(1))).await;
        let limit = config.interval * config.threshold;
        let deciding = last_check.elapsed() >= config.interval;
        let mut silent = Vec::new();
        for p in &peers {
            let beat = local
                .scan_all(NODES_NS, &format!("{p}/"))
                .await
                .ok()
                .and_then(|beats| beats.into_iter().max_by_key(|r| r.revision));
            let newest = beat.as_ref().map_or(0, |r| r.revision);
            let now = tokio::time::Instant::now();
            let mut seen = health.seen.lock();
            let entry = seen.entry(p.clone()).or_insert((newest, now));
            if entry.0 != newest {
                *entry = (newest, now);
                // A new heartbeat: its time minus this node's clock on arrival is the
                // region's clock offset minus the delivery delay; the largest recent sample
                // is the closest.
                if let Some(info) =
                    beat.and_then(|r| serde_json::from_slice::<NodeInfo>(r.value()).ok())
                {
                    let sample = info.beat_millis as i64 - local.clock().wall_millis() as i64;
                    let mut offsets = health.offsets.lock();
                    let samples = offsets.entry(p.clone()).or_default();
                    samples.push_back(sample);
                    if samples.len() > 16 {
                        samples.pop_front();
                    }
                }
            }
            if now.duration_since(entry.1) >= limit {
                silent.push(p.clone());
            }
        }
        let ahead: BTreeMap<String, i64> = health
            .offsets
            .lock()
            .iter()
            .filter_map(|(p, samples)| samples.iter().max().map(|m| (p.clone(), *m)))
            .collect();
        driver.step(&silent, &ahead).await;
        if !deciding {
            continue;
        }
        last_check = tokio::time::Instant::now();
        let verdict = Verdict { silent };
        if published.as_ref() != Some(&verdict) {
            let key = format!("verdict/{name}");
            let value = serde_json::to_vec(&verdict).expect("verdict serializes");
            if local
                .commit(Batch::new().put(REGIONS_NS, &key, value))
                .await
                .is_ok()
            {
                if !verdict.silent.is_empty() {
                    tracing::warn!(silent = ?verdict.silent, "regions silent for the failure threshold");
                }
                published = Some(verdict.clone());
            }
        }
        let Ok((roles, revision)) = read_roles(&*local).await else {
            continue;
        };
        let Some(active) = roles.active.clone() else {
            continue;
        };
        if active == name || !verdict.silent.contains(&active) {
            continue;
        }
        // Who else finds the active region silent (their verdicts, as held here).
        let mut agree = vec![name.clone()];
        for p in peers.iter().filter(|p| **p != active) {
            if read_verdict(&*local, p)
                .await
                .is_ok_and(|v| v.silent.contains(&active))
            {
                agree.push(p.clone());
            }
        }
        let total = peers.len() + 1;
        if agree.len() * 2 <= total {
            if !warned_minority {
                tracing::warn!(%active, agree = ?agree, total, "the active region is silent, but not to a majority of regions: no automatic failover");
                warned_minority = true;
            }
            continue;
        }
        warned_minority = false;
        agree.sort();
        if agree[0] != name {
            continue;
        }
        let next = Roles {
            epoch: roles.epoch + 1,
            active: Some(name.clone()),
            changed_by: name.clone(),
            reason: format!(
                "automatic failover: {active} silent for {} s to {} of {total} regions ({})",
                limit.as_secs(),
                agree.len(),
                agree.join(", ")
            ),
            at_millis: local.clock().wall_millis(),
        };
        let _ = write_roles(&*local, &next, revision).await;
    }
}
