//! Membership from the store, with liveness that does not trust wall clocks.
//!
//! Every node rewrites its heartbeat record (namespace [`NODES_NS`]) every interval. Another
//! node is judged by whether its record *changed* within the time-to-live, measured on the
//! judge's own monotonic clock from the moment the judge saw the change — never by comparing
//! the timestamp inside the record with the judge's wall clock. A node does not judge anyone
//! while its own heartbeats fail, nor before it has watched the others for a full time-to-live
//! since its own store connection last came back: when the store itself was unavailable,
//! everyone's silence says nothing.
//!
//! A process killed outright is found sooner where the store offers presence
//! ([`haven_state::Presence`], the JetStream backend): once a node's heartbeat has been silent
//! for a little more than an interval, this node probes the node's process on the store's
//! connection, and judges it dead when two probes at least an interval apart both found no
//! connection answering for it ([`Probe::Absent`]) while its heartbeat stayed silent
//! throughout (and for at least two intervals). A paused or slow process keeps its
//! connection, so its probes go unanswered ([`Probe::Unknown`]) and only the time-to-live
//! can make it dead. Nodes that do not say in their heartbeat that they answer probes are
//! never probed.
//!
//! The wall-clock times inside heartbeats are used for one thing: estimating each node's clock
//! offset, reported in status and logged when it exceeds the allowed skew. A heartbeat's time
//! is compared only with bounds on when it was written, never with an arrival time alone (a
//! record can be old when it is first read: a node that died before this one started, a
//! change feed catching up): it was written before this node saw it, and — when its revision
//! is newer than one of this node's own heartbeat commits — after that commit was sent. So
//! each such heartbeat bounds the offset on both sides: (beat − local time on arrival) ≤
//! offset ≤ (beat − local time when that own commit was sent). A heartbeat not newer than
//! any of this node's recent commits gives no sample. The offset reported is the smallest one
//! that the recent samples allow (the best lower bound, the median upper bound: a writer that
//! took its beat's time and then waited on the store makes one upper bound too low), so a
//! stale heartbeat never reads as skew; and a node whose heartbeat is silent for longer than
//! the time-to-live has no offset reported, only its silence.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use haven_state::{Batch, Change, Commit, Presence, Probe, Store, StoreError};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Namespace of heartbeat records.
pub const NODES_NS: &str = "nodes";

/// The key of the heartbeat record of `node` of `region`.
pub fn heartbeat_key(region: &str, node: &str) -> String {
    format!("{region}/{node}")
}

/// How many recent offset samples a node's estimate keeps.
const OFFSET_SAMPLES: usize = 16;

/// How many of this node's own recent heartbeat commits are kept to bound when others'
/// heartbeats were written.
const OWN_COMMITS: usize = 64;

/// A node's heartbeat record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub node: String,
    /// Boot id of the process.
    pub boot: String,
    /// Region (the store's origin).
    pub region: String,
    /// Haven version.
    pub version: String,
    /// When the process started, Unix milliseconds (its own clock).
    pub started_millis: u64,
    /// When this heartbeat was written, Unix milliseconds (its own clock).
    pub beat_millis: u64,
    /// Whether the node is draining (stops taking new work).
    #[serde(default)]
    pub draining: bool,
    /// The time-to-live the node announces, in milliseconds.
    #[serde(default)]
    pub ttl_millis: u64,
    /// The node left cleanly: its work may be taken over at once.
    #[serde(default)]
    pub left: bool,
    /// Its recent requests (availability, throughput, latency), for every node's status
    /// page; absent where no metrics registry is installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<haven_telemetry::recent::RecentSummary>,
    /// The process answers presence probes on the store's connection
    /// ([`haven_state::Presence`]), so that others may find it gone before the time-to-live.
    #[serde(default)]
    pub presence: bool,
}

/// A node as seen from here.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    /// Its last heartbeat.
    pub info: NodeInfo,
    /// Whether it is alive now, as judged here.
    pub alive: bool,
    /// Milliseconds since its heartbeat last changed, on this node's monotonic clock.
    pub silent_millis: u64,
    /// Estimated offset of its clock from this node's, in milliseconds (positive: ahead): the
    /// smallest that its recent fresh heartbeats allow. `None` for this node, for a node whose
    /// heartbeat has been silent for longer than the time-to-live, and before one of its
    /// heartbeats was known to be fresh (stored after one of this node's own).
    pub clock_offset_millis: Option<i64>,
    /// Whether that offset exceeds the allowed skew.
    pub clock_skewed: bool,
    /// Whether it is dead because its store connection was found gone (presence probes)
    /// before its heartbeat's time-to-live ran out.
    pub connection_gone: bool,
}

/// Settings of a node's membership.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// This node's id.
    pub node_id: String,
    /// This process's boot id.
    pub boot_id: String,
    /// Haven version, shown to others.
    pub version: String,
    /// How often the heartbeat is written.
    pub interval: Duration,
    /// How long a heartbeat may stay unchanged before its node is dead.
    pub ttl: Duration,
    /// Largest clock offset between nodes that is not reported as skew.
    pub max_skew: Duration,
}

#[derive(Clone, Debug)]
struct Observed {
    info: NodeInfo,
    revision: u64,
    /// When this node saw the record change last.
    changed_at: Instant,
    /// Recent bounds on its clock's offset, one per heartbeat known to be fresh.
    offsets: VecDeque<OffsetSample>,
}

/// What one heartbeat says of its writer's clock offset from this node's (milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OffsetSample {
    /// Beat time − local wall time when it was seen (it was written before): the offset is at
    /// least this.
    low: i64,
    /// Beat time − local wall time when this node sent a heartbeat that the store put before
    /// it (it was written after): the offset is at most this, less the time the writer took
    /// between reading its clock and the store taking the write.
    high: i64,
}

impl Observed {
    /// The smallest offset the recent samples allow (zero when they allow zero).
    fn offset(&self) -> Option<i64> {
        let low = self.offsets.iter().map(|s| s.low).max()?;
        let mut highs: Vec<i64> = self.offsets.iter().map(|s| s.high).collect();
        highs.sort_unstable();
        // The median, not the least: one writer that waited on the store makes its bound too
        // low, and only a clock really behind makes most of them so.
        let high = highs[highs.len() / 2].max(low);
        Some(if low > 0 {
            low
        } else if high < 0 {
            high
        } else {
            0
        })
    }
}

#[derive(Debug)]
struct State {
    members: HashMap<String, Observed>,
    /// When a node's record was first found missing (it never beat, or was deleted).
    missing_since: HashMap<String, Instant>,
    /// When this node's heartbeats last started succeeding after failing (or at start);
    /// `None` while its last heartbeat failed.
    own_ok_since: Option<Instant>,
    /// When this node's heartbeat last succeeded.
    own_last_ok: Option<Instant>,
    /// This node's recent heartbeat commits: (log sequence, local wall time when sent).
    own_commits: VecDeque<(u64, u64)>,
    draining: bool,
    left: bool,
    /// Nodes currently reported as skewed (so that each change is logged once).
    skewed: HashMap<String, bool>,
    /// Silent nodes being probed (presence), by node.
    suspects: HashMap<String, Suspect>,
}

/// A node whose heartbeat has gone silent, as its presence probes found it.
#[derive(Debug)]
struct Suspect {
    /// The process probed and the heartbeat revision it was silent at: a change of either
    /// ends the suspicion.
    boot: String,
    revision: u64,
    /// When the first of the uninterrupted run of probes that found it absent was sent.
    absent_since: Option<Instant>,
    /// Found gone: two probes at least [`Membership::probe_gap`] apart found it absent, its
    /// heartbeat silent throughout.
    gone: bool,
    /// Whether a probe that found it present (or could not tell) was logged already.
    logged_kept: bool,
}

/// The membership view of one node.
pub struct Membership {
    store: Arc<dyn Store>,
    config: MembershipConfig,
    started_millis: u64,
    state: RwLock<State>,
    /// The region lease this node's heartbeats renew (multi-region nodes).
    lease: std::sync::OnceLock<crate::takeover::RegionLease>,
    /// Presence on the store's connection (the JetStream backend), once announced.
    presence: std::sync::OnceLock<Arc<dyn Presence>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("node", &self.config.node_id)
            .finish()
    }
}

impl Membership {
    /// The membership of this node on `store`.
    pub fn new(store: Arc<dyn Store>, config: MembershipConfig) -> Arc<Membership> {
        let started_millis = store.clock().wall_millis();
        Arc::new(Membership {
            store,
            config,
            started_millis,
            state: RwLock::new(State {
                members: HashMap::new(),
                missing_since: HashMap::new(),
                own_ok_since: None,
                own_last_ok: None,
                own_commits: VecDeque::new(),
                draining: false,
                left: false,
                skewed: HashMap::new(),
                suspects: HashMap::new(),
            }),
            lease: std::sync::OnceLock::new(),
            presence: std::sync::OnceLock::new(),
        })
    }

    /// Makes this node's heartbeats the beats of `lease` (each landed beat is noted with
    /// its sequence and when it was sent).
    pub fn set_region_lease(&self, lease: crate::takeover::RegionLease) {
        let _ = self.lease.set(lease);
    }

    /// Announces this process on `presence` (it answers probes from now on), says so in its
    /// heartbeats, and probes silent nodes with it ([`Membership::probe_silent`]). Call it
    /// before the first heartbeat.
    pub async fn set_presence(&self, presence: Arc<dyn Presence>) -> Result<(), StoreError> {
        presence
            .announce(self.region(), &self.config.node_id, &self.config.boot_id)
            .await?;
        let _ = self.presence.set(presence);
        Ok(())
    }

    /// Whether this node probes silent nodes (its store offers presence).
    pub fn has_presence(&self) -> bool {
        self.presence.get().is_some()
    }

    /// How long a heartbeat must be silent before its node is probed: a little more than an
    /// interval, so that a beat that is merely late is usually not probed (a probe of a live
    /// process is harmless, only wasted).
    fn probe_after(&self) -> Duration {
        self.config.interval + self.config.interval / 4
    }

    /// How far apart two probes that find a node absent must be (and how long its heartbeat
    /// must have been silent, at least two intervals, before it is found gone): a node whose
    /// own NATS server died is absent until its client reconnects to another one, usually
    /// within milliseconds, and beats again.
    fn probe_gap(&self) -> Duration {
        self.config.interval
    }

    /// How long a probe waits for an answer.
    fn probe_timeout(&self) -> Duration {
        (self.config.interval / 2).min(Duration::from_millis(500))
    }

    /// Probes every node whose heartbeat is silent (see the module's notes); returns whether
    /// a node was found gone by it (its work may be taken over now). Nothing when the store
    /// offers no presence, or while this node may not judge others.
    pub async fn probe_silent(&self) -> bool {
        let Some(presence) = self.presence.get() else {
            return false;
        };
        let now = Instant::now();
        let probe_after = self.probe_after();
        let candidates: Vec<(String, String, u64)> = {
            let mut state = self.state.write();
            let judging = self.may_judge(&state, now).is_some();
            let silent: Vec<(String, String, u64)> = state
                .members
                .values()
                .filter(|o| {
                    judging
                        && o.info.node != self.config.node_id
                        && o.info.presence
                        && !o.info.left
                        && now.duration_since(o.changed_at) >= probe_after
                })
                .map(|o| (o.info.node.clone(), o.info.boot.clone(), o.revision))
                .collect();
            // A node that beat again (or restarted, or is gone from the records) is no
            // longer a suspect.
            state.suspects.retain(|node, s| {
                silent
                    .iter()
                    .any(|(n, b, r)| n == node && *b == s.boot && *r == s.revision)
            });
            silent
                .into_iter()
                .filter(|(node, _, _)| !state.suspects.get(node).is_some_and(|s| s.gone))
                .collect()
        };
        if candidates.is_empty() {
            return false;
        }
        let timeout = self.probe_timeout();
        let region = self.region().to_owned();
        let probes = candidates.iter().map(|(node, boot, _)| {
            let presence = presence.clone();
            let region = region.clone();
            async move {
                let sent = Instant::now();
                (sent, presence.probe(&region, node, boot, timeout).await)
            }
        });
        let results = futures::future::join_all(probes).await;
        let mut found = false;
        let now = Instant::now();
        let mut state = self.state.write();
        for ((node, boot, revision), (sent, probe)) in candidates.into_iter().zip(results) {
            // Only while the heartbeat is still the one that was silent.
            let Some(silent_since) = state
                .members
                .get(&node)
                .filter(|o| o.info.boot == boot && o.revision == revision)
                .map(|o| o.changed_at)
            else {
                state.suspects.remove(&node);
                continue;
            };
            let s = state.suspects.entry(node.clone()).or_insert(Suspect {
                boot: boot.clone(),
                revision,
                absent_since: None,
                gone: false,
                logged_kept: false,
            });
            match probe {
                Probe::Absent => {
                    let first = *s.absent_since.get_or_insert(sent);
                    if sent.duration_since(first) >= self.probe_gap()
                        && now.duration_since(silent_since) >= 2 * self.config.interval
                    {
                        s.gone = true;
                        found = true;
                        tracing::warn!(
                            node = %node,
                            boot = %boot,
                            silent_ms = now.duration_since(silent_since).as_millis() as u64,
                            "the store connection of a silent node is gone: it is dead, its work is taken over"
                        );
                    }
                }
                Probe::Present | Probe::Unknown => {
                    s.absent_since = None;
                    if !s.logged_kept {
                        s.logged_kept = true;
                        tracing::info!(
                            node = %node,
                            boot = %boot,
                            answered = probe == Probe::Present,
                            silent_ms = now.duration_since(silent_since).as_millis() as u64,
                            "a silent node's store connection is still open: its work stays with it until its heartbeat's time-to-live runs out"
                        );
                    }
                }
            }
        }
        found
    }

    /// This node's settings.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// When this process started, Unix milliseconds.
    pub fn started_millis(&self) -> u64 {
        self.started_millis
    }

    fn own_info(&self) -> NodeInfo {
        let state = self.state.read();
        NodeInfo {
            node: self.config.node_id.clone(),
            boot: self.config.boot_id.clone(),
            region: self.store.origin().region.to_string(),
            version: self.config.version.clone(),
            started_millis: self.started_millis,
            beat_millis: self.store.clock().wall_millis(),
            draining: state.draining,
            ttl_millis: self.config.ttl.as_millis() as u64,
            left: state.left,
            presence: self.presence.get().is_some(),
            stats: haven_telemetry::get()
                .map(|m| m.recent.summary(self.store.clock().wall_millis() / 1000)),
        }
    }

    /// Writes this node's heartbeat, then reads everyone's.
    pub async fn beat(&self) -> Result<(), StoreError> {
        if self.state.read().left {
            return Ok(());
        }
        let info = self.own_info();
        let sent = Instant::now();
        let sent_wall = self.store.clock().wall_millis();
        let written = self.write_heartbeat(&info).await;
        let now = Instant::now();
        match written {
            Ok(commit) => {
                if let Some(lease) = self.lease.get() {
                    lease.note_beat(commit.last_seq, sent);
                }
                let mut state = self.state.write();
                state.own_commits.push_back((commit.last_seq, sent_wall));
                if state.own_commits.len() > OWN_COMMITS {
                    state.own_commits.pop_front();
                }
                if state.own_ok_since.is_none() {
                    // First beat, or the first after a failed one: the others' records may
                    // look old only because the store was out of reach; watch them afresh.
                    state.own_ok_since = Some(now);
                }
                state.own_last_ok = Some(now);
            }
            Err(e) => {
                self.state.write().own_ok_since = None;
                return Err(e);
            }
        }
        self.refresh().await
    }

    /// Reads every heartbeat record and notes which changed since the last read.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let records = self
            .store
            .scan_all(NODES_NS, &format!("{}/", self.region()))
            .await?;
        let now = Instant::now();
        let wall = self.store.clock().wall_millis();
        let mut seen = Vec::with_capacity(records.len());
        for r in &records {
            if let Ok(info) = serde_json::from_slice::<NodeInfo>(r.value()) {
                seen.push(info.node.clone());
                self.observe(info, r.revision, now, wall);
            }
        }
        let mut state = self.state.write();
        let known: Vec<String> = state.members.keys().cloned().collect();
        for node in known {
            if !seen.contains(&node) {
                state.members.remove(&node);
                state.missing_since.entry(node).or_insert(now);
            }
        }
        drop(state);
        self.report_skew();
        Ok(())
    }

    /// Takes a heartbeat record seen at local time `now` (monotonic) and `wall`.
    pub fn observe(&self, info: NodeInfo, revision: u64, now: Instant, wall: u64) {
        if info.region != self.region() {
            // Another region's node (replicated here): judged by its own region only.
            return;
        }
        let mut state = self.state.write();
        state.missing_since.remove(&info.node);
        // Only a heartbeat that the store put after one of this node's own is known to be
        // fresh; the latest such commit bounds the offset from above.
        let sample = state
            .own_commits
            .iter()
            .rev()
            .find(|(seq, _)| *seq < revision)
            .map(|&(_, sent_wall)| OffsetSample {
                low: info.beat_millis as i64 - wall as i64,
                high: info.beat_millis as i64 - sent_wall as i64,
            });
        match state.members.get_mut(&info.node) {
            Some(o) if o.revision == revision => {}
            Some(o) if o.revision > revision => {}
            Some(o) => {
                if o.info.boot != info.boot {
                    o.offsets.clear();
                }
                o.revision = revision;
                o.changed_at = now;
                o.offsets.extend(sample);
                if o.offsets.len() > OFFSET_SAMPLES {
                    o.offsets.pop_front();
                }
                o.info = info;
            }
            None => {
                let node = info.node.clone();
                state.members.insert(
                    node,
                    Observed {
                        info,
                        revision,
                        changed_at: now,
                        offsets: sample.into_iter().collect(),
                    },
                );
            }
        }
    }

    /// The clock offset of `o` as reported now: none for this node itself, nor for a node
    /// whose heartbeat has been silent for longer than the time-to-live (its silence is what
    /// is reported), nor before one of its heartbeats was seen fresh.
    fn current_offset(&self, o: &Observed, now: Instant) -> Option<i64> {
        if o.info.node == self.config.node_id || now.duration_since(o.changed_at) > self.config.ttl
        {
            return None;
        }
        o.offset()
    }

    /// Takes a change from the store's live feed (heartbeats arrive here as they are
    /// written, which makes the offset estimates close).
    pub fn observe_change(&self, change: &Change, seq: u64) {
        if let Change::Record(r) = change
            && r.namespace == NODES_NS
            && let Some(value) = &r.value
            && let Ok(info) = serde_json::from_slice::<NodeInfo>(value)
        {
            self.observe(info, seq, Instant::now(), self.store.clock().wall_millis());
        }
    }

    /// Whether this node may judge others now: its last heartbeat succeeded (recently), and it
    /// has watched the others for a full time-to-live since its heartbeats started succeeding.
    fn may_judge(&self, state: &State, now: Instant) -> Option<Instant> {
        let ttl = self.config.ttl;
        let last_ok = state.own_last_ok?;
        let since = state.own_ok_since?;
        if now.duration_since(last_ok) > ttl || now.duration_since(since) < ttl {
            return None;
        }
        Some(since)
    }

    /// Whether the process `boot` of node `node` is known to be gone.
    pub fn is_dead(&self, node: &str, boot: &str) -> bool {
        if node == self.config.node_id {
            return boot != self.config.boot_id;
        }
        let now = Instant::now();
        if !self.state.read().members.contains_key(node) {
            // A node without a heartbeat record: count its silence from the first time it
            // is asked about.
            self.state
                .write()
                .missing_since
                .entry(node.to_owned())
                .or_insert(now);
        }
        let state = self.state.read();
        let Some(since) = self.may_judge(&state, now) else {
            return false;
        };
        let ttl = self.config.ttl;
        match state.members.get(node) {
            Some(o) if o.info.boot != boot || o.info.left => true,
            Some(o) => {
                now.duration_since(o.changed_at.max(since)) >= ttl
                    || Self::connection_gone(&state, o)
            }
            None => state
                .missing_since
                .get(node)
                .is_some_and(|t| now.duration_since((*t).max(since)) >= ttl),
        }
    }

    /// Whether the presence probes found the process of `o`'s heartbeat gone (and it has not
    /// beaten since).
    fn connection_gone(state: &State, o: &Observed) -> bool {
        state
            .suspects
            .get(&o.info.node)
            .is_some_and(|s| s.gone && s.boot == o.info.boot && s.revision == o.revision)
    }

    /// Every node with a heartbeat record, with this node's judgement of it.
    pub fn members(&self) -> Vec<Member> {
        let now = Instant::now();
        let max_skew = self.config.max_skew.as_millis() as i64;
        let mut out: Vec<Member> = {
            let state = self.state.read();
            state
                .members
                .values()
                .map(|o| {
                    let offset = self.current_offset(o, now);
                    Member {
                        info: o.info.clone(),
                        alive: false,
                        silent_millis: now.duration_since(o.changed_at).as_millis() as u64,
                        clock_offset_millis: offset,
                        clock_skewed: offset.is_some_and(|x| x.abs() > max_skew),
                        connection_gone: Self::connection_gone(&state, o),
                    }
                })
                .collect()
        };
        for m in &mut out {
            m.alive = !self.is_dead(&m.info.node, &m.info.boot);
        }
        out.sort_by(|a, b| a.info.node.cmp(&b.info.node));
        out
    }

    /// The largest clock offset to another live node, in milliseconds (absolute; see
    /// [`Member::clock_offset_millis`]).
    pub fn max_clock_offset(&self) -> Option<u64> {
        self.members()
            .iter()
            .filter(|m| m.alive)
            .filter_map(|m| m.clock_offset_millis)
            .map(i64::unsigned_abs)
            .max()
    }

    fn report_skew(&self) {
        let max = self.config.max_skew.as_millis() as i64;
        let now = Instant::now();
        let offsets: Vec<(String, Option<i64>)> = {
            let state = self.state.read();
            state
                .members
                .values()
                .filter(|o| o.info.node != self.config.node_id)
                .map(|o| (o.info.node.clone(), self.current_offset(o, now)))
                .collect()
        };
        let mut state = self.state.write();
        for (node, offset) in offsets {
            // No estimate now (a silent node): nothing new is known of its clock.
            let Some(offset) = offset else { continue };
            let skewed = offset.abs() > max;
            let was = state.skewed.insert(node.clone(), skewed).unwrap_or(false);
            match (was, skewed) {
                (false, true) => tracing::warn!(
                    node = %node,
                    offset_ms = offset,
                    max_ms = max,
                    "the clock of another node differs from this node's by more than the allowed skew"
                ),
                (true, false) => {
                    tracing::info!(node = %node, "the clock of another node is within the allowed skew again")
                }
                _ => {}
            }
        }
    }

    /// Marks this node as draining (its next heartbeat says so).
    pub fn set_draining(&self) {
        self.state.write().draining = true;
    }

    /// Whether this node is draining.
    pub fn is_draining(&self) -> bool {
        self.state.read().draining
    }

    /// Leaves: the last heartbeat says so, and others take over this node's work at once.
    pub async fn leave(&self) {
        self.state.write().left = true;
        let _ = self.write_heartbeat(&self.own_info()).await;
    }

    fn region(&self) -> &str {
        &self.store.origin().region
    }

    /// The key of this node's heartbeat record: `<region>/<node>`, so that nodes of
    /// different regions never share one, whatever their ids.
    fn own_key(&self) -> String {
        heartbeat_key(self.region(), &self.config.node_id)
    }

    /// Writes `info` as this node's heartbeat record.
    async fn write_heartbeat(&self, info: &NodeInfo) -> Result<Commit, StoreError> {
        let value = serde_json::to_vec(info).expect("heartbeat serializes");
        let batch = Batch::new().put(NODES_NS, &self.own_key(), value);
        self.store.commit(batch).await
    }

    /// This node itself, as a member (for a store that only one node uses).
    pub fn me(&self) -> Member {
        Member {
            info: self.own_info(),
            alive: true,
            silent_millis: 0,
            clock_offset_millis: None,
            clock_skewed: false,
            connection_gone: false,
        }
    }
}
