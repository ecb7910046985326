//! Taking over a failed region's in-flight work without an operator, so that the failed
//! region — if it was only cut off, not dead — can never finish or re-run what was taken.
//!
//! Three parts, none of which compares clocks:
//!
//! 1. **A region lease renewed by echoes** ([`RegionLease`]). Every region writes, for each
//!    other region whose log it applies, how far it has applied it (an [`Echo`], record
//!    `regions/echo/<region>/<source>`). A node remembers when it sent each of its own
//!    heartbeats (its monotonic clock) and at which sequence of its region's log each
//!    landed. An echo from another region covering that sequence proves that the beat had
//!    been sent by then, so the node holds its lease until the send time of its newest beat
//!    echoed by a majority of regions (itself included) plus [`LEASE_TERM`]. Work that
//!    another region may take over (a *claimable* execution) is written only while the
//!    lease holds with [`HOLD_MARGIN`] to spare.
//! 2. **Freezes before a decision.** When a majority of regions finds a region silent, the
//!    one of them that applied the most of its log (then the first by name; the *claimer*)
//!    writes an intent ([`Takeover`], record
//!    `regions/takeover/<source>/<claimer>`); every region that also finds the source silent
//!    *freezes* its echo of the source (compare-and-set on its echo record, which its
//!    replicator also updates by compare-and-set, so no echo is written after the freeze).
//!    Once a majority has frozen for this intent, the claimer waits [`LEASE_TERM`] (plus
//!    drift) on its own clock: every lease the source could still renew needs an echo from
//!    a majority, which includes a frozen region, and every such echo was written before the
//!    claimer saw that freeze. Then it decides, and claims the source's claimable executions
//!    it holds under epoch + 1 (`Engine::take_over_region`).
//! 3. **Return.** A region unfreezes the source when the intent is aborted (the source was
//!    heard again before a decision), or when the source has applied the claimer's log up
//!    to the end of the claims (the source's own echo of the claimer shows it), so that
//!    every run of claimed work there finds its ownership record moved before its lease can
//!    come back.
//!
//! Executions a region opens while it holds no lease (cut off from the majority) are not
//! claimable: only their region settles them, so an isolated region keeps serving.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use haven_state::{Batch, Expect, Store, StoreError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::lease::{Holding, Lease};
use crate::regions::{LOCAL_NS, REGIONS_NS, read_verdict};

/// How long an echoed heartbeat keeps a node's region lease.
pub const LEASE_TERM: Duration = Duration::from_secs(6);

/// How much of its lease a node must have left to start a write of claimable work: the
/// longest a write may take to land.
pub const HOLD_MARGIN: Duration = Duration::from_secs(2);

/// What a claimer waits after a majority froze, beyond [`LEASE_TERM`]: monotonic clocks of
/// different machines may run at slightly different rates (10 %), plus half a second.
pub fn decision_wait() -> Duration {
    LEASE_TERM + LEASE_TERM / 10 + Duration::from_millis(500)
}

/// How long an intent waits for a majority of regions to freeze for it before its claimer
/// gives it up (regions that froze for a concurrent intent never switch).
pub const INTENT_TIMEOUT: Duration = Duration::from_secs(15);

/// How far ahead of the claimer's clock a region's clock may be for an automatic takeover.
const MAX_AHEAD_MILLIS: i64 = 1_000;

/// How many of its own recent heartbeats a node remembers (a minute at one a second).
const BEATS: usize = 64;

/// A node's lease on writing work that another region may take over (see the module docs).
#[derive(Clone)]
pub struct RegionLease {
    inner: Arc<LeaseInner>,
}

struct LeaseInner {
    /// This region.
    region: String,
    /// The other regions.
    peers: Vec<String>,
    /// Echoes from other regions needed besides this region's own: a majority of all
    /// regions, minus this one.
    needed: usize,
    /// This node's recent heartbeats: (sequence in this region's log, when it was sent).
    beats: Mutex<VecDeque<(u64, Instant)>>,
    /// Until when the lease holds, as last computed.
    until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RegionLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionLease")
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl RegionLease {
    /// The lease of a node of region `region`, among `peers` (the other regions).
    pub fn new(region: &str, peers: Vec<String>) -> RegionLease {
        RegionLease {
            inner: Arc::new(LeaseInner {
                region: region.to_owned(),
                needed: peers.len().div_ceil(2),
                peers,
                beats: Mutex::new(VecDeque::with_capacity(BEATS)),
                until: Mutex::new(None),
            }),
        }
    }

    /// Notes that this node's heartbeat sent at `sent` landed at sequence `seq` of this
    /// region's log.
    pub fn note_beat(&self, seq: u64, sent: Instant) {
        let mut beats = self.inner.beats.lock();
        if beats.len() == BEATS {
            beats.pop_front();
        }
        beats.push_back((seq, sent));
    }

    /// Renews the lease from the echoes of this region's log held here: for each other
    /// region, the last sequence of this region's log it has applied (0: none known).
    pub fn refresh(&self, echoes: &[u64]) {
        let until = self.until_from(echoes);
        *self.inner.until.lock() = until;
    }

    fn until_from(&self, echoes: &[u64]) -> Option<Instant> {
        if self.inner.needed == 0 {
            return None;
        }
        let beats = self.inner.beats.lock();
        // For each region, the send time of this node's newest beat it has applied.
        let mut sent: Vec<Instant> = echoes
            .iter()
            .filter_map(|&echo| {
                beats
                    .iter()
                    .rev()
                    .find(|(seq, _)| *seq <= echo)
                    .map(|(_, at)| *at)
            })
            .collect();
        sent.sort_unstable_by(|a, b| b.cmp(a));
        sent.get(self.inner.needed - 1).map(|at| *at + LEASE_TERM)
    }

    /// How long the lease holds from now (`None`: it does not).
    pub fn remaining(&self) -> Option<Duration> {
        let until = (*self.inner.until.lock())?;
        until.checked_duration_since(Instant::now())
    }

    /// Whether a write of claimable work may start now: the lease holds for at least
    /// [`HOLD_MARGIN`] more.
    pub fn holds(&self) -> bool {
        self.remaining().is_some_and(|r| r >= HOLD_MARGIN)
    }

    /// Whether a majority of regions (this one included) holds this region's log up to
    /// `seq`, by their echoes held in `store`: a write up to there can no longer be missed
    /// by a region that takes this one's work over.
    pub async fn confirmed(&self, store: &dyn Store, seq: u64) -> bool {
        let mut echoed = 0;
        for p in &self.inner.peers {
            if read_echo(store, p, &self.inner.region).await.seq >= seq {
                echoed += 1;
            }
        }
        echoed >= self.inner.needed
    }
}

/// How far a region has applied another region's log, as it tells every region (record
/// `regions/echo/<region>/<source>`), and whether it has frozen it for a takeover.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The last sequence of the source's log applied here (the cursor).
    pub seq: u64,
    /// While set, `seq` no longer moves: this region supports a takeover of the source.
    #[serde(default)]
    pub frozen: Option<Freeze>,
}

/// A freeze of an echo for one takeover intent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    /// The region taking over.
    pub claimer: String,
    /// Its round.
    pub round: u64,
}

/// The key of `region`'s echo of `source`.
pub fn echo_key(region: &str, source: &str) -> String {
    format!("{ECHO_PREFIX}{region}/{source}")
}

/// The prefix of every echo's key (namespace [`REGIONS_NS`]).
pub const ECHO_PREFIX: &str = "echo/";

/// The key of `claimer`'s takeover record of `source`.
pub fn takeover_key(source: &str, claimer: &str) -> String {
    format!("takeover/{source}/{claimer}")
}

/// Where a takeover stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The claimer asks the regions to freeze the source.
    Intent,
    /// Decided: the claimer is claiming the source's claimable executions.
    Decided,
    /// The claims are written (`done_seq` says up to where in the claimer's log, once
    /// known).
    Done,
    /// Given up before a decision (the source was heard again, or no majority froze).
    Aborted,
}

/// A claimer's takeover of a region's in-flight work (record
/// `regions/takeover/<source>/<claimer>`, written only by the claimer's region).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    /// Incremented by each new intent of this claimer on this source.
    pub round: u64,
    /// Where it stands.
    pub stage: Stage,
    /// Executions claimed (once done).
    #[serde(default)]
    pub claimed: usize,
    /// The sequence of the claimer's log that covers every claim of this and earlier rounds
    /// (0: none yet). Kept by a new round, so that a region still frozen for an earlier
    /// round can tell when the source has applied it.
    #[serde(default)]
    pub done_seq: u64,
    /// Whether `done_seq` covers this round's claims (set with it once the round is done).
    #[serde(default)]
    pub sealed: bool,
    /// Why it is where it is, in words.
    pub reason: String,
    /// When it changed last, Unix milliseconds (the claimer's clock).
    pub at_millis: u64,
}

/// What claims a failed region's claimable executions held here (the engine's
/// `take_over_region`): given the region, the number of executions claimed.
pub type TakeoverHandler =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<usize, String>> + Send + Sync>;

/// Reads a JSON record of namespace [`REGIONS_NS`] with its revision.
async fn read<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(T, u64)>, StoreError> {
    Ok(store.get(REGIONS_NS, key).await?.and_then(|r| {
        serde_json::from_slice(r.value())
            .ok()
            .map(|v| (v, r.revision))
    }))
}

/// Writes a JSON record of namespace [`REGIONS_NS`] if it is still at `revision`; returns
/// the sequence of the write.
async fn write<T: Serialize>(
    store: &dyn Store,
    key: &str,
    value: &T,
    revision: Option<u64>,
) -> Result<u64, StoreError> {
    let expect = revision.map_or(Expect::Absent, Expect::Revision);
    let value = serde_json::to_vec(value).expect("a region record serializes");
    Ok(store
        .commit(Batch::new().put_if(REGIONS_NS, key, value, expect))
        .await?
        .last_seq)
}

/// The echo of `source` that `region` wrote, as held here.
pub async fn read_echo(store: &dyn Store, region: &str, source: &str) -> Echo {
    read::<Echo>(store, &echo_key(region, source))
        .await
        .ok()
        .flatten()
        .map(|(e, _)| e)
        .unwrap_or_default()
}

/// Moves this region's echo of `source` to `seq`, unless it is frozen (or already there).
pub async fn write_echo(store: &dyn Store, source: &str, seq: u64) -> Result<(), StoreError> {
    let region = store.origin().region.to_string();
    let key = echo_key(&region, source);
    let (echo, revision) = match read::<Echo>(store, &key).await? {
        Some((e, r)) => (e, Some(r)),
        None => (Echo::default(), None),
    };
    if echo.frozen.is_some() || echo.seq >= seq {
        return Ok(());
    }
    match write(store, &key, &Echo { seq, frozen: None }, revision).await {
        // A freeze (or another node's echo) came first: it stands.
        Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// How many of `source`'s claimable executions this store holds unclaimed (ownership
/// records last written by `source`, claimable and not finished).
pub async fn claimable_of(store: &dyn Store, source: &str) -> Result<usize, StoreError> {
    Ok(store
        .scan_all(crate::OWNERS_NS, "")
        .await?
        .iter()
        .filter(|r| &*r.record.version.origin.region == source)
        .filter_map(|r| crate::Owner::decode(r.value()))
        .filter(|o| o.claimable && !o.finished)
        .count())
}

/// Every takeover record of `source`, by claimer.
pub async fn takeovers_of(
    store: &dyn Store,
    source: &str,
) -> Result<BTreeMap<String, (Takeover, u64)>, StoreError> {
    let prefix = format!("takeover/{source}/");
    let mut out = BTreeMap::new();
    for r in store.scan_all(REGIONS_NS, &prefix).await? {
        if let (Some(claimer), Ok(t)) = (
            r.record.key.strip_prefix(&prefix),
            serde_json::from_slice::<Takeover>(r.value()),
        ) {
            out.insert(claimer.to_owned(), (t, r.revision));
        }
    }
    Ok(out)
}

/// One node's part in automatic takeovers: renews its region lease from the echoes, and,
/// while it holds its region's takeover role, freezes and releases this region's echoes and
/// drives this region's own takeovers (see the module docs).
pub(crate) struct Driver {
    local: Arc<dyn Store>,
    name: String,
    peers: Vec<String>,
    lease: RegionLease,
    handler: Arc<std::sync::OnceLock<TakeoverHandler>>,
    role: Lease,
    /// For each intent of this region on a source that a majority froze: its round and when
    /// this node first saw the majority.
    frozen_at: BTreeMap<String, (u64, Instant)>,
}

impl Driver {
    pub(crate) fn new(
        local: Arc<dyn Store>,
        node: &str,
        peers: Vec<String>,
        lease: RegionLease,
        handler: Arc<std::sync::OnceLock<TakeoverHandler>>,
    ) -> Driver {
        let role = Lease::new(
            local.clone(),
            LOCAL_NS,
            "lease/takeover",
            node,
            Duration::from_secs(5),
        );
        Driver {
            name: local.origin().region.to_string(),
            local,
            peers,
            lease,
            handler,
            role,
            frozen_at: BTreeMap::new(),
        }
    }

    /// One step, about every second; `silent` are the regions this node finds silent now,
    /// `ahead` how far each region's clock was seen ahead of this node's (milliseconds; the
    /// largest recent sample of its heartbeat's time minus this node's on arrival).
    pub(crate) async fn step(&mut self, silent: &[String], ahead: &BTreeMap<String, i64>) {
        let mut echoes = Vec::with_capacity(self.peers.len());
        for p in &self.peers {
            echoes.push(read_echo(&*self.local, p, &self.name).await.seq);
        }
        self.lease.refresh(&echoes);
        // Takeovers need three regions or more, and something to claim with.
        if self.peers.len() < 2 || self.handler.get().is_none() {
            return;
        }
        if !matches!(self.role.hold().await, Ok(Holding::Held { .. })) {
            return;
        }
        for source in self.peers.clone() {
            let silent_here = silent.contains(&source);
            if let Err(e) = self.vote(&source, silent_here).await {
                tracing::debug!(%source, error = %e, "a takeover vote failed; retrying");
            }
            let ahead = ahead.get(&source).copied().unwrap_or(0);
            if let Err(e) = self.claim(&source, silent_here, ahead).await {
                tracing::debug!(%source, error = %e, "a takeover step failed; retrying");
            }
        }
    }

    /// This region as a voter: freezes its echo of `source` for the first intent (by
    /// claimer name) while it finds `source` silent too, and releases it once that intent
    /// was aborted or `source` has applied the claims.
    async fn vote(&self, source: &str, silent_here: bool) -> Result<(), StoreError> {
        let key = echo_key(&self.name, source);
        let (echo, revision) = match read::<Echo>(&*self.local, &key).await? {
            Some((e, r)) => (e, Some(r)),
            None => (Echo::default(), None),
        };
        let takeovers = takeovers_of(&*self.local, source).await?;
        if let Some(f) = &echo.frozen {
            // Released once that round was aborted, or once the source has applied every
            // claim the claimer made up to it (a later round of the claimer means the frozen
            // one ended; its claims are covered by the kept `done_seq`).
            let release = match takeovers.get(&f.claimer) {
                Some((t, _)) if t.round == f.round => match t.stage {
                    Stage::Aborted => true,
                    Stage::Done if t.sealed => {
                        read_echo(&*self.local, source, &f.claimer).await.seq >= t.done_seq
                    }
                    _ => false,
                },
                Some((t, _)) if t.round > f.round => {
                    read_echo(&*self.local, source, &f.claimer).await.seq >= t.done_seq
                }
                _ => false,
            };
            if release {
                write(
                    &*self.local,
                    &key,
                    &Echo {
                        frozen: None,
                        ..echo.clone()
                    },
                    revision,
                )
                .await?;
                tracing::info!(%source, claimer = %f.claimer, round = f.round, "echoing the region again (the takeover ended and it has applied it, or it was aborted)");
            }
            return Ok(());
        }
        if !silent_here {
            return Ok(());
        }
        let Some((claimer, (t, _))) = takeovers
            .iter()
            .find(|(_, (t, _))| t.stage == Stage::Intent)
        else {
            return Ok(());
        };
        // Frozen at how far this region has really applied the source: the echo record is
        // written at most every 100 ms, and may lag the cursor by the source's last batches.
        let (cursor, _) = crate::regions::read_cursor(&*self.local, source).await?;
        let frozen = Echo {
            seq: echo.seq.max(cursor.seq),
            frozen: Some(Freeze {
                claimer: claimer.clone(),
                round: t.round,
            }),
        };
        write(&*self.local, &key, &frozen, revision).await?;
        tracing::warn!(%source, %claimer, round = t.round, "froze this region's echo of a silent region for its takeover");
        Ok(())
    }

    /// Another region (not `source`) that has applied `source`'s log further than this
    /// one: `(region, its seq, this region's cursor)`.
    async fn behind_on(&self, source: &str) -> Result<Option<(String, u64, u64)>, StoreError> {
        let (cursor, _) = crate::regions::read_cursor(&*self.local, source).await?;
        for r in self.peers.iter().filter(|p| *p != source) {
            let theirs = read_echo(&*self.local, r, source).await.seq;
            if theirs > cursor.seq {
                return Ok(Some((r.clone(), theirs, cursor.seq)));
            }
        }
        Ok(None)
    }

    /// This region as the claimer of `source`'s work.
    async fn claim(
        &mut self,
        source: &str,
        silent_here: bool,
        ahead: i64,
    ) -> Result<(), StoreError> {
        let key = takeover_key(source, &self.name);
        let mine = read::<Takeover>(&*self.local, &key).await?;
        let now_millis = self.local.clock().wall_millis();
        let total = self.peers.len() + 1;
        match mine {
            Some((t, rev)) if t.stage == Stage::Intent => {
                if !silent_here {
                    let next = Takeover {
                        stage: Stage::Aborted,
                        reason: "the region was heard again before a decision".into(),
                        at_millis: now_millis,
                        ..t
                    };
                    write(&*self.local, &key, &next, Some(rev)).await?;
                    self.frozen_at.remove(source);
                    tracing::info!(%source, round = next.round, "takeover aborted: the region was heard again");
                    return Ok(());
                }
                // The claimer must hold the source's log as far as every other region that
                // applied it: the source's last writes (a final answer) count as held once a
                // majority echoed them, and a claimer lacking them would run again what the
                // source already answered. While the source is silent this region cannot
                // catch up, so it gives way to the region that applied the most.
                if let Some((ahead_region, theirs, mine)) = self.behind_on(source).await? {
                    let next = Takeover {
                        stage: Stage::Aborted,
                        reason: format!(
                            "{ahead_region} applied more of {source}'s log ({theirs} > {mine}): it takes over instead"
                        ),
                        at_millis: now_millis,
                        ..t
                    };
                    write(&*self.local, &key, &next, Some(rev)).await?;
                    self.frozen_at.remove(source);
                    tracing::warn!(%source, region = %ahead_region, theirs, mine, round = next.round, "takeover aborted: another region applied more of the silent region's log, and takes over instead");
                    return Ok(());
                }
                let mut frozen = 0;
                for r in
                    std::iter::once(&self.name).chain(self.peers.iter().filter(|p| *p != source))
                {
                    let e = read_echo(&*self.local, r, source).await;
                    if e.frozen
                        == Some(Freeze {
                            claimer: self.name.clone(),
                            round: t.round,
                        })
                    {
                        frozen += 1;
                    }
                }
                if frozen * 2 <= total {
                    // Regions that froze for another claimer's intent (written before they
                    // saw this one) never freeze for this one: give it up after a while so
                    // that one intent gathers a majority.
                    if now_millis.saturating_sub(t.at_millis) > INTENT_TIMEOUT.as_millis() as u64 {
                        let next = Takeover {
                            stage: Stage::Aborted,
                            reason: format!(
                                "no majority froze {source} for this intent within {} s",
                                INTENT_TIMEOUT.as_secs()
                            ),
                            at_millis: now_millis,
                            ..t
                        };
                        write(&*self.local, &key, &next, Some(rev)).await?;
                        self.frozen_at.remove(source);
                        tracing::warn!(%source, round = next.round, frozen, total, "takeover intent given up: no majority froze for it");
                    }
                    return Ok(());
                }
                let since = match self.frozen_at.get(source) {
                    Some((round, at)) if *round == t.round => *at,
                    _ => {
                        let now = Instant::now();
                        self.frozen_at.insert(source.to_owned(), (t.round, now));
                        tracing::warn!(%source, round = t.round, frozen, total, wait_ms = decision_wait().as_millis() as u64, "a majority of regions froze a silent region: deciding its takeover once its lease has run out");
                        now
                    }
                };
                if since.elapsed() < decision_wait() || !self.lease.holds() {
                    return Ok(());
                }
                if ahead > MAX_AHEAD_MILLIS {
                    tracing::warn!(%source, ahead_ms = ahead, "not taking over: the region's clock was seen ahead of this one's by more than a second, so its last writes could win over the claims");
                    return Ok(());
                }
                let next = Takeover {
                    stage: Stage::Decided,
                    claimed: claimable_of(&*self.local, source).await?,
                    reason: format!(
                        "{source} silent to {frozen} of {total} regions, which froze it; its lease ran out"
                    ),
                    at_millis: now_millis,
                    ..t
                };
                write(&*self.local, &key, &next, Some(rev)).await?;
                tracing::warn!(%source, round = next.round, "decided to take over the region's in-flight work");
                Ok(())
            }
            Some((t, rev)) if t.stage == Stage::Decided => {
                let handler = self.handler.get().expect("checked").clone();
                handler(source.to_owned())
                    .await
                    .map_err(StoreError::Unavailable)?;
                // Done only once nothing claimable of the source is left here unclaimed
                // (a claim refused for want of this node's lease, or lost to a concurrent
                // change, is tried again at the next step), so that `done_seq`, written
                // after, covers every claim.
                let left = claimable_of(&*self.local, source).await?;
                if left > 0 {
                    tracing::warn!(%source, left, "some of the region's claimable work is not claimed yet; trying again");
                    return Ok(());
                }
                let done = Takeover {
                    stage: Stage::Done,
                    at_millis: now_millis,
                    ..t
                };
                let seq = write(&*self.local, &key, &done, Some(rev)).await?;
                self.finish(source, done, seq).await
            }
            Some((t, rev)) if t.stage == Stage::Done && t.done_seq < rev && !t.sealed => {
                // The claims are written; say up to where (the done record's own revision
                // follows them).
                self.finish(source, t, rev).await
            }
            previous => {
                // A new intent when a majority finds the source silent and this region is
                // the first of them (below), unless its last takeover of the source is done
                // and the source has not been heard since.
                let (round, revision, done_seq) = match &previous {
                    Some((t, rev)) => {
                        // After a completed takeover, a new one only once the source has
                        // come back and applied it (it may then have started new work).
                        if t.stage == Stage::Done
                            && read_echo(&*self.local, source, &self.name).await.seq < t.done_seq
                        {
                            return Ok(());
                        }
                        (t.round + 1, Some(*rev), t.done_seq)
                    }
                    None => (1, None, 0),
                };
                if !silent_here {
                    return Ok(());
                }
                let mut agree = vec![self.name.clone()];
                for p in self.peers.iter().filter(|p| *p != source) {
                    if read_verdict(&*self.local, p)
                        .await
                        .is_ok_and(|v| v.silent.iter().any(|s| s == source))
                    {
                        agree.push(p.clone());
                    }
                }
                // The claimer is the region that applied the most of the source's log (then
                // the first by name): it holds every last write of the source that a majority
                // may have echoed.
                let mut ranked = Vec::with_capacity(agree.len());
                for r in &agree {
                    let seq = read_echo(&*self.local, r, source).await.seq;
                    ranked.push((std::cmp::Reverse(seq), r.clone()));
                }
                ranked.sort();
                if agree.len() * 2 <= total || ranked[0].1 != self.name {
                    return Ok(());
                }
                agree.sort();
                let claimed = claimable_of(&*self.local, source).await?;
                let intent = Takeover {
                    round,
                    stage: Stage::Intent,
                    claimed,
                    done_seq,
                    sealed: false,
                    reason: format!(
                        "{source} silent to {} of {total} regions ({})",
                        agree.len(),
                        agree.join(", ")
                    ),
                    at_millis: now_millis,
                };
                write(&*self.local, &key, &intent, revision).await?;
                tracing::warn!(%source, round, "intends to take over a silent region's in-flight work: asking the regions to freeze it");
                Ok(())
            }
        }
    }

    /// Records where in this region's log the claims end: `seq`, the revision of the done
    /// record, whose write followed every claim.
    async fn finish(&mut self, source: &str, done: Takeover, seq: u64) -> Result<(), StoreError> {
        let key = takeover_key(source, &self.name);
        let claimed = done.claimed;
        let round = done.round;
        let next = Takeover {
            done_seq: seq,
            sealed: true,
            ..done
        };
        write(&*self.local, &key, &next, Some(seq)).await?;
        self.frozen_at.remove(source);
        tracing::warn!(%source, round, claimed, "took over a failed region's in-flight work");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_lease_holds_from_the_send_time_of_the_newest_beat_a_majority_echoed() {
        // Three regions: one echo besides this region's own is a majority.
        let lease = RegionLease::new("A", vec!["B".into(), "C".into()]);
        let t0 = Instant::now();
        lease.note_beat(10, t0);
        tokio::time::advance(Duration::from_secs(1)).await;
        lease.note_beat(20, Instant::now());
        // Nobody echoed anything yet.
        lease.refresh(&[0, 0]);
        assert!(!lease.holds());
        // One region applied up to 15: the beat at 10 (sent at t0) is echoed.
        lease.refresh(&[15, 0]);
        assert_eq!(lease.remaining(), Some(LEASE_TERM - Duration::from_secs(1)));
        assert!(lease.holds());
        // The other applied up to 25: the newest echoed beat is the one at 20.
        lease.refresh(&[15, 25]);
        assert_eq!(lease.remaining(), Some(LEASE_TERM));
        // Time passes without newer echoes: the lease runs out, and stops holding first.
        tokio::time::advance(LEASE_TERM - HOLD_MARGIN + Duration::from_millis(1)).await;
        assert!(lease.remaining().is_some());
        assert!(!lease.holds());
        tokio::time::advance(HOLD_MARGIN).await;
        assert_eq!(lease.remaining(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn five_regions_need_two_echoes_and_two_regions_never_lease() {
        let lease = RegionLease::new("A", ["B", "C", "D", "E"].map(String::from).to_vec());
        lease.note_beat(10, Instant::now());
        lease.refresh(&[10, 0, 0, 0]);
        assert!(!lease.holds());
        lease.refresh(&[10, 0, 12, 0]);
        assert!(lease.holds());
        let two = RegionLease::new("A", vec!["B".into()]);
        two.note_beat(10, Instant::now());
        two.refresh(&[10]);
        assert!(two.holds(), "with two regions one echo is the majority");
        let one = RegionLease::new("A", Vec::new());
        one.refresh(&[]);
        assert!(!one.holds());
    }
}
