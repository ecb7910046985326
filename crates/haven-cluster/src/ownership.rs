//! Fenced ownership of executions (a request's run, a task's run).
//!
//! Each execution has an ownership record (namespace [`OWNERS_NS`]) naming the node and
//! process that runs it and an epoch. Every write that belongs to the execution — its events,
//! its final answer, its task updates and the tool's own changes — commits together with a
//! compare-and-set of that record ([`Execution::commit`]), so it lands only while the writer
//! still owns the execution. Taking over a dead owner's execution ([`Claim`]) is a
//! compare-and-set that requires the record to still name that owner and epoch, and it
//! increments the epoch: at most one node wins, and the loser — or the old owner waking from a
//! pause — finds out at its next write ([`FenceError::Fenced`]), which cancels its handler.
//!
//! The record also counts the execution's writes (so that a write whose acknowledgement was
//! lost is recognised when it is retried, and never applied twice) and its *effects* — writes
//! beyond its own stream — so that whoever settles an interrupted execution can say whether it
//! changed anything.

use std::sync::Arc;
use std::time::Duration;

use haven_state::{
    Batch, Commit, Expect, Op, Outcome, Store, StoreError, StoreResult, StoredRecord,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::takeover::RegionLease;

/// Namespace of ownership records.
pub const OWNERS_NS: &str = "owners";

/// Who runs an execution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Node id.
    pub node: String,
    /// Boot id of the process.
    pub boot: String,
    /// Incremented by every takeover.
    pub epoch: u64,
    /// Writes made under this epoch.
    pub writes: u64,
    /// Writes (in any epoch) that changed state beyond the execution's own stream and records.
    pub effects: u64,
    /// The execution has ended; nothing more may be written under it. (An ended execution's
    /// record is deleted; records of older versions may carry this flag instead.)
    #[serde(default)]
    pub finished: bool,
    /// The id of the last write made under this record (0: none yet): how a write whose
    /// answer was lost is told from another that was stored meanwhile.
    #[serde(default)]
    pub last_write: u64,
    /// Whether another region may take the execution over when this one fails: it was
    /// opened (or taken over) while its node held its region lease, and every write under
    /// it needs that lease (`crate::takeover`). Otherwise only its own region settles it.
    #[serde(default)]
    pub claimable: bool,
}

impl Owner {
    /// A first owner: this node's process, epoch 1.
    pub fn new(node: &str, boot: &str) -> Owner {
        Owner {
            node: node.to_owned(),
            boot: boot.to_owned(),
            epoch: 1,
            writes: 0,
            effects: 0,
            finished: false,
            last_write: 0,
            claimable: false,
        }
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("owner record serializes")
    }

    /// Decodes an ownership record.
    pub fn decode(bytes: &[u8]) -> Option<Owner> {
        serde_json::from_slice(bytes).ok()
    }

    fn same_run(&self, other: &Owner) -> bool {
        self.node == other.node && self.boot == other.boot && self.epoch == other.epoch
    }
}

/// Why an execution's write did not land.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Another owner took the execution over (or it was settled): nothing was written, and
    /// nothing more may be.
    #[error("this node no longer owns {key}: {by}")]
    Fenced {
        /// The ownership key.
        key: String,
        /// Who owns it now, in words.
        by: String,
    },
    /// The store failed; the same batch may be retried.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a landed write reports.
#[derive(Debug, Clone)]
pub enum Landed {
    /// This call wrote it.
    Now(Commit),
    /// An earlier attempt of the same batch (whose answer was lost) had written it.
    Earlier,
}

/// An execution this node owns.
pub struct Execution {
    store: Arc<dyn Store>,
    key: String,
    state: tokio::sync::Mutex<ExecState>,
    /// Cancelled when the execution is found to belong to someone else.
    lost: CancellationToken,
    /// The region lease its writes need, when it is claimable.
    fence: Option<RegionLease>,
}

struct ExecState {
    owner: Owner,
    revision: u64,
    /// Writes whose outcome is unknown (the store failed after it may have taken them), each
    /// with the id it was tried under; a retry of the same batch reuses that id.
    uncertain: Vec<(Batch, u64)>,
    /// Ids of uncertain writes found stored since (their retry reports [`Landed::Earlier`]).
    stored: Vec<u64>,
}

/// How many uncertain writes an execution remembers. A retry is recognised only while its
/// first attempt is remembered: a run that abandons more failed writes than this (a handler
/// that never retries them) before retrying an older one could apply that one twice.
const MAX_UNCERTAIN: usize = 64;

/// How often a claimable execution's last write looks whether a majority holds it.
const CONFIRM_POLL: Duration = Duration::from_millis(50);

/// How often a claimable execution without its region lease looks again.
const LEASE_POLL: Duration = Duration::from_millis(250);

impl ExecState {
    fn new(owner: Owner, revision: u64) -> ExecState {
        ExecState {
            owner,
            revision,
            uncertain: Vec::new(),
            stored: Vec::new(),
        }
    }

    /// The id `batch` was last tried under, if its outcome is unknown.
    fn uncertain_id(&self, batch: &Batch) -> Option<u64> {
        self.uncertain
            .iter()
            .find(|(b, _)| b == batch)
            .map(|(_, id)| *id)
    }

    fn forget(&mut self, id: u64) {
        self.uncertain.retain(|(_, i)| *i != id);
        self.stored.retain(|i| *i != id);
    }

    fn remember_uncertain(&mut self, batch: &Batch, id: u64) {
        if self.uncertain_id(batch).is_none() {
            if self.uncertain.len() == MAX_UNCERTAIN {
                let (_, oldest) = self.uncertain.remove(0);
                self.stored.retain(|i| *i != oldest);
            }
            self.uncertain.push((batch.clone(), id));
        }
    }
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution").field("key", &self.key).finish()
    }
}

/// The current ownership record of `key`, read after catching up with the store.
pub async fn current(store: &dyn Store, key: &str) -> StoreResult<Option<(Owner, u64)>> {
    Ok(current_record(store, key)
        .await?
        .and_then(|r| Owner::decode(r.value()).map(|o| (o, r.revision))))
}

async fn current_record(store: &dyn Store, key: &str) -> StoreResult<Option<StoredRecord>> {
    // A scan catches up with the log first; a plain get may answer from a stale index.
    let records = store.scan_all(OWNERS_NS, key).await?;
    Ok(records.into_iter().find(|r| r.record.key == key))
}

/// Where execution `key` stands, by its ownership record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// It never had an ownership record (it completed at once).
    Never,
    /// A run owns it now.
    Running,
    /// Ended by the run of this origin (the tombstone's writer).
    By(haven_state::Origin),
}

/// Where execution `key` stands. A final answer of a run another region may take over is the
/// execution's answer only if that run's node wrote the tombstone (in the same batch): a
/// later claim, or the tombstone a claimer's run left, means a stopped run wrote it.
pub async fn end_of(store: &dyn Store, key: &str) -> StoreResult<End> {
    // A scan catches up with the log first; a plain get may answer from a stale index.
    store.scan_all(OWNERS_NS, key).await?;
    Ok(match store.get_raw(OWNERS_NS, key).await? {
        None => End::Never,
        Some(r) if r.record.is_tombstone() => End::By(r.record.version.origin.clone()),
        Some(_) => End::Running,
    })
}

/// Whether an ownership record belongs to the region of `store`: the region whose node wrote
/// it last (its owner, or the node that took it over). Only that region's nodes take over or
/// settle it; another region's execution (replicated here) is its own region's to settle.
pub fn of_this_region(store: &dyn Store, record: &StoredRecord) -> bool {
    record.record.version.origin.region == store.origin().region
}

impl Execution {
    /// Starts an execution: commits `batch` together with a new ownership record for `key`
    /// (which must not exist). Returns the execution and the batch's own outcomes.
    pub async fn open(
        store: Arc<dyn Store>,
        key: &str,
        owner: Owner,
        batch: Batch,
    ) -> StoreResult<(Arc<Execution>, Commit)> {
        Execution::open_leased(store, key, owner, batch, None).await
    }

    /// Like [`Execution::open`], for a node of a region with a region lease: the execution
    /// is claimable by other regions when the lease holds now, and then each of its writes
    /// needs the lease.
    pub async fn open_leased(
        store: Arc<dyn Store>,
        key: &str,
        mut owner: Owner,
        batch: Batch,
        lease: Option<&RegionLease>,
    ) -> StoreResult<(Arc<Execution>, Commit)> {
        owner.claimable = lease.is_some_and(RegionLease::holds);
        let n = batch.ops.len();
        let full = batch.put_if(OWNERS_NS, key, owner.encode(), Expect::Absent);
        let commit = store.commit(full).await?;
        Execution::started(store, key.to_owned(), owner, commit, n, lease)
    }

    /// The execution that `commit` (a batch of `n` operations and then the ownership record
    /// of `key`) started, and the batch's own outcomes.
    fn started(
        store: Arc<dyn Store>,
        key: String,
        owner: Owner,
        mut commit: Commit,
        n: usize,
        lease: Option<&RegionLease>,
    ) -> StoreResult<(Arc<Execution>, Commit)> {
        let revision = revision_of(&commit, n)?;
        commit.outcomes.truncate(n);
        let fence = lease.filter(|_| owner.claimable).cloned();
        let execution = Execution {
            store,
            key,
            state: tokio::sync::Mutex::new(ExecState::new(owner, revision)),
            lost: CancellationToken::new(),
            fence,
        };
        Ok((Arc::new(execution), commit))
    }

    /// Whether another region may take this execution over (it was opened while this
    /// region's lease held): its last write is then confirmed by a majority of regions.
    pub fn claimable(&self) -> bool {
        self.fence.is_some()
    }

    /// The ownership key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The store the execution writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Cancelled when this node finds it no longer owns the execution.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// The owner as this node last wrote it.
    pub async fn owner(&self) -> Owner {
        self.state.lock().await.owner.clone()
    }

    /// Commits `batch` if and only if this node still owns the execution. `effect` says
    /// whether the batch changes state beyond the execution's own records (a tool's writes).
    ///
    /// After a [`FenceError::Store`] error the caller may retry the same batch: if the failed
    /// attempt was stored after all, the retry reports [`Landed::Earlier`] instead of writing
    /// it twice.
    pub async fn commit(&self, batch: Batch, effect: bool) -> Result<Landed, FenceError> {
        self.write(batch, effect, false).await
    }

    /// Commits the execution's last write: `batch`, with the ownership record deleted (its
    /// tombstone names this node, which is how a retried last write whose answer was lost is
    /// recognised).
    ///
    /// A claimable execution's last write returns only once a majority of regions holds it
    /// (by their echoes): until then another region that takes this one's work over might
    /// not have it, so the caller must not show it to a client yet. It reports
    /// [`FenceError::Fenced`] if another region took the execution over meanwhile (its
    /// history then supersedes this write).
    pub async fn finish(&self, batch: Batch) -> Result<Landed, FenceError> {
        let landed = self.write(batch, false, true).await?;
        if let Some(lease) = &self.fence {
            let seq = match &landed {
                Landed::Now(c) => c.last_seq,
                Landed::Earlier => self.store.last_seq().await?,
            };
            self.await_confirmed(lease, seq).await?;
        }
        Ok(landed)
    }

    /// Waits until a majority of regions holds this region's log up to `seq`, or the
    /// execution's ownership record shows another owner.
    async fn await_confirmed(&self, lease: &RegionLease, seq: u64) -> Result<(), FenceError> {
        let mut logged = false;
        let owner = self.state.lock().await.owner.clone();
        loop {
            let confirmed = lease.confirmed(&*self.store, seq).await;
            // Checked also once confirmed: after a takeover the other regions echo this
            // one again only once it has applied the claims, so a claim is seen here by then.
            if let Ok(Some((cur, _))) = current(&*self.store, &self.key).await
                && !cur.same_run(&owner)
            {
                self.lost.cancel();
                return Err(self.fenced(&cur));
            }
            if confirmed {
                // The record must still be this node's own end: a takeover's run that
                // already ended leaves its own tombstone, a later version than this one's.
                if self.ended_by_this_node().await? {
                    return Ok(());
                }
                self.lost.cancel();
                return Err(FenceError::Fenced {
                    key: self.key.clone(),
                    by: "another region took the execution over and ended it".into(),
                });
            }
            if !logged {
                tracing::info!(execution = %self.key, seq, "the execution's last write waits until a majority of regions holds it");
                logged = true;
            }
            tokio::time::sleep(CONFIRM_POLL).await;
        }
    }

    async fn write(&self, batch: Batch, effect: bool, finish: bool) -> Result<Landed, FenceError> {
        let mut state = self.state.lock().await;
        if self.lost.is_cancelled() {
            return Err(self.fenced(&state.owner));
        }
        // A retry of a write whose answer was lost goes under the id it was first tried with.
        let known = state.uncertain_id(&batch);
        if let Some(id) = known
            && state.stored.contains(&id)
        {
            tracing::info!(execution = %self.key, "a write whose answer was lost had been stored");
            state.forget(id);
            return Ok(Landed::Earlier);
        }
        let id = known.unwrap_or_else(|| haven_state::ids::random_u64().max(1));
        if let Some(lease) = &self.fence {
            self.await_lease(lease, &state).await?;
        }
        for _ in 0..8 {
            let mut next = state.owner.clone();
            next.writes += 1;
            next.effects += u64::from(effect);
            next.last_write = id;
            let n = batch.ops.len();
            let mut full = batch.clone();
            full.ops.push(if finish {
                Op::Delete {
                    namespace: OWNERS_NS.into(),
                    key: self.key.clone(),
                    expect: Expect::Revision(state.revision),
                }
            } else {
                Op::Put {
                    namespace: OWNERS_NS.into(),
                    key: self.key.clone(),
                    value: next.encode(),
                    expect: Expect::Revision(state.revision),
                    ttl_millis: None,
                }
            });
            match self.store.commit(full).await {
                Ok(mut commit) => {
                    state.revision = revision_of(&commit, n)?;
                    state.owner = next;
                    state.forget(id);
                    commit.outcomes.truncate(n);
                    return Ok(Landed::Now(commit));
                }
                Err(StoreError::Conflict { namespace, key, .. })
                    if !(namespace.is_empty() || namespace == OWNERS_NS && key == self.key) =>
                {
                    // The batch's own precondition failed: nothing was written.
                    return Err(FenceError::Store(StoreError::Conflict {
                        namespace,
                        key,
                        expected: "a precondition of the batch".into(),
                        found: "another value".into(),
                    }));
                }
                Err(StoreError::Conflict { .. }) => {
                    if let Some(landed) = self.resolve(&mut state, id, known, finish).await? {
                        return Ok(landed);
                    }
                }
                Err(e) => {
                    if e.is_retryable() {
                        state.remember_uncertain(&batch, id);
                    }
                    return Err(FenceError::Store(e));
                }
            }
        }
        Err(FenceError::Store(StoreError::Unavailable(format!(
            "the ownership record {} changed under every attempt",
            self.key
        ))))
    }

    /// After the ownership record was not where this node left it: `Some` when the write
    /// (tried under `id`; `known` when an earlier attempt's answer was lost) had landed,
    /// `None` when the record is still this run's (another write whose answer was lost was
    /// stored) and the write should be tried again on it, an error when the execution is lost.
    async fn resolve(
        &self,
        state: &mut ExecState,
        id: u64,
        known: Option<u64>,
        finish: bool,
    ) -> Result<Option<Landed>, FenceError> {
        match current(&*self.store, &self.key).await? {
            Some((cur, rev)) if cur.same_run(&state.owner) => {
                // Only a write that keeps the record can be the one the record names.
                let this_one = !finish && cur.last_write == id;
                let landed = cur.last_write;
                state.revision = rev;
                state.owner = cur;
                if this_one {
                    tracing::info!(execution = %self.key, revision = rev, "a write whose answer was lost had been stored");
                    state.forget(id);
                    return Ok(Some(Landed::Earlier));
                }
                if state.uncertain.iter().any(|(_, i)| *i == landed) {
                    state.stored.push(landed);
                }
                Ok(None)
            }
            Some((cur, _)) => {
                self.lost.cancel();
                Err(self.fenced(&cur))
            }
            None => {
                // Ended. By this node's own last write, whose answer was lost?
                if finish && known.is_some() && self.ended_by_this_node().await? {
                    tracing::info!(execution = %self.key, "the last write, whose answer was lost, had been stored");
                    state.forget(id);
                    return Ok(Some(Landed::Earlier));
                }
                self.lost.cancel();
                Err(FenceError::Fenced {
                    key: self.key.clone(),
                    by: "the execution was ended elsewhere (settled)".into(),
                })
            }
        }
    }

    /// Waits until this node's region lease holds (a claimable execution writes nothing
    /// without it: another region may be taking it over), or the execution is found lost.
    async fn await_lease(&self, lease: &RegionLease, state: &ExecState) -> Result<(), FenceError> {
        let mut logged = false;
        while !lease.holds() {
            if !logged {
                tracing::warn!(execution = %self.key, "this region's lease has lapsed (it does not hear a majority of regions): the execution's writes wait for it");
                logged = true;
            }
            match current(&*self.store, &self.key).await {
                Ok(Some((cur, _))) if cur.same_run(&state.owner) => {}
                Ok(Some((cur, _))) => {
                    self.lost.cancel();
                    return Err(self.fenced(&cur));
                }
                Ok(None) => {
                    self.lost.cancel();
                    return Err(FenceError::Fenced {
                        key: self.key.clone(),
                        by: "the execution was ended elsewhere (settled)".into(),
                    });
                }
                Err(_) => {}
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
        if logged {
            tracing::info!(execution = %self.key, "this region's lease holds again: the execution's writes go on");
        }
        Ok(())
    }

    /// Whether the record's tombstone was written by this node.
    async fn ended_by_this_node(&self) -> StoreResult<bool> {
        let raw = self.store.get_raw(OWNERS_NS, &self.key).await?;
        Ok(raw.is_some_and(|r| {
            r.record.is_tombstone() && r.record.version.origin == *self.store.origin()
        }))
    }

    fn fenced(&self, by: &Owner) -> FenceError {
        FenceError::Fenced {
            key: self.key.clone(),
            by: format!(
                "node {} (process {}) owns it at epoch {}{}",
                by.node,
                by.boot,
                by.epoch,
                if by.finished { ", finished" } else { "" }
            ),
        }
    }
}

fn revision_of(commit: &Commit, position: usize) -> StoreResult<u64> {
    match commit.outcomes.get(position) {
        Some(Outcome::Written { revision }) => Ok(*revision),
        other => Err(StoreError::Corrupt(format!(
            "the ownership write reported {other:?}"
        ))),
    }
}

/// A takeover of an execution whose owner is gone.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The ownership key.
    pub key: String,
    /// The owner that is gone.
    pub dead: Owner,
    /// The revision of its record.
    pub revision: u64,
}

/// Why a takeover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Someone else changed the record first (another node took over, or the owner wrote).
    #[error("the execution {0} is no longer the dead owner's")]
    Lost(String),
    /// The execution may be taken over by another region, and this node does not hold its
    /// region lease now: it may be being taken over there. Try again later.
    #[error(
        "the execution {0} may be taken over by another region and this region's lease does not hold now"
    )]
    NoLease(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Claim {
    /// The claim on `key` if its record still names an unfinished run of another process.
    /// Another region's execution (replicated here) is never claimed here.
    pub async fn read(store: &dyn Store, key: &str) -> StoreResult<Option<Claim>> {
        let Some(record) = current_record(store, key)
            .await?
            .filter(|r| of_this_region(store, r))
        else {
            return Ok(None);
        };
        Ok(Owner::decode(record.value()).and_then(|dead| {
            (!dead.finished).then(|| Claim {
                key: key.to_owned(),
                dead,
                revision: record.revision,
            })
        }))
    }

    /// Refuses a claim of claimable work while this node's region lease does not hold.
    fn check_lease(&self, lease: Option<&RegionLease>) -> Result<(), ClaimError> {
        match lease {
            Some(l) if self.dead.claimable && !l.holds() => {
                Err(ClaimError::NoLease(self.key.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Takes the execution over for this node (epoch + 1), committing `batch` with it. With
    /// a region lease, the new run is claimable when the lease holds; a claimable
    /// execution is taken only while it holds.
    pub async fn take(
        self,
        store: Arc<dyn Store>,
        node: &str,
        boot: &str,
        batch: Batch,
        lease: Option<&RegionLease>,
    ) -> Result<(Arc<Execution>, Commit), ClaimError> {
        self.check_lease(lease)?;
        let owner = Owner {
            node: node.to_owned(),
            boot: boot.to_owned(),
            epoch: self.dead.epoch + 1,
            writes: 0,
            effects: self.dead.effects,
            finished: false,
            last_write: 0,
            claimable: lease.is_some_and(RegionLease::holds),
        };
        let n = batch.ops.len();
        let full = batch.put_if(
            OWNERS_NS,
            &self.key,
            owner.encode(),
            Expect::Revision(self.revision),
        );
        match store.commit(full).await {
            Ok(commit) => Ok(Execution::started(
                store, self.key, owner, commit, n, lease,
            )?),
            Err(StoreError::Conflict { .. }) => Err(ClaimError::Lost(self.key)),
            Err(e) => Err(e.into()),
        }
    }

    /// Settles the execution without running it again: commits `batch` (its final answer)
    /// with the ownership record deleted, if it still names the dead owner. A claimable
    /// execution is settled only while `lease` holds.
    pub async fn settle(
        self,
        store: &dyn Store,
        batch: Batch,
        lease: Option<&RegionLease>,
    ) -> Result<Commit, ClaimError> {
        self.check_lease(lease)?;
        let n = batch.ops.len();
        let full = batch.delete_if(OWNERS_NS, &self.key, Expect::Revision(self.revision));
        match store.commit(full).await {
            Ok(mut commit) => {
                commit.outcomes.truncate(n);
                Ok(commit)
            }
            Err(StoreError::Conflict { .. }) => Err(ClaimError::Lost(self.key)),
            Err(e) => Err(e.into()),
        }
    }
}

/// A view of the store for a running handler: reads go to the store, and every commit goes
/// through the handler's execution once it has one, so that a handler whose node lost the
/// execution changes nothing. Until an execution is attached (a request answered quickly
/// never gets one), commits go straight to the store, and are counted as effects that the
/// execution inherits when it is opened.
pub struct FencedStore {
    store: Arc<dyn Store>,
    execution: std::sync::OnceLock<Arc<Execution>>,
    /// Held by every direct commit, taken exclusively while the execution is attached.
    gate: tokio::sync::RwLock<u64>,
}

impl FencedStore {
    /// A view with no execution yet.
    pub fn unattached(store: Arc<dyn Store>) -> Arc<FencedStore> {
        Arc::new(FencedStore {
            store,
            execution: std::sync::OnceLock::new(),
            gate: tokio::sync::RwLock::new(0),
        })
    }

    /// The fenced view of `execution`.
    pub fn new(execution: Arc<Execution>) -> Arc<FencedStore> {
        let store = execution.store.clone();
        let cell = std::sync::OnceLock::new();
        let _ = cell.set(execution);
        Arc::new(FencedStore {
            store,
            execution: cell,
            gate: tokio::sync::RwLock::new(0),
        })
    }

    /// Opens the execution with `open` (given the number of direct commits made so far, for
    /// its effect count) and fences every later commit with it. No direct commit is in
    /// flight meanwhile.
    pub async fn attach<T, E, F, Fut>(&self, open: F) -> Result<T, E>
    where
        F: FnOnce(u64) -> Fut,
        Fut: std::future::Future<Output = Result<(Arc<Execution>, T), E>>,
    {
        let effects = self.gate.write().await;
        let (execution, out) = open(*effects).await?;
        let _ = self.execution.set(execution);
        Ok(out)
    }

    /// The attached execution, if any.
    pub fn execution(&self) -> Option<&Arc<Execution>> {
        self.execution.get()
    }
}

impl FencedStore {
    /// Commits `batch` like [`Store::commit`] does (fenced once an execution is attached),
    /// without counting it as an effect: for upkeep of derived records (an index, a marker
    /// that one was built) that changes nothing a retry of the request could repeat, so that
    /// an interrupted request that wrote only such records is not said to have changed state.
    pub async fn commit_upkeep(&self, batch: Batch) -> StoreResult<Commit> {
        self.fenced_commit(batch, false).await
    }

    async fn fenced_commit(&self, batch: Batch, effect: bool) -> StoreResult<Commit> {
        let execution = match self.execution.get() {
            Some(e) => e.clone(),
            None => {
                let mut effects = self.gate.write().await;
                if let Some(e) = self.execution.get() {
                    e.clone()
                } else {
                    let commit = self.store.commit(batch).await?;
                    *effects += u64::from(effect);
                    return Ok(commit);
                }
            }
        };
        match execution.commit(batch, effect).await {
            Ok(Landed::Now(c)) => Ok(c),
            Ok(Landed::Earlier) => Err(StoreError::Unavailable(
                "an earlier attempt of this write was stored; read the state again".into(),
            )),
            Err(FenceError::Store(e)) => Err(e),
            Err(FenceError::Fenced { key, by }) => {
                tracing::warn!(execution = %key, owner = %by, "a write of a handler was refused: this node no longer owns its execution");
                Err(StoreError::Conflict {
                    namespace: OWNERS_NS.into(),
                    key,
                    expected: "this node owns the execution".into(),
                    found: by,
                })
            }
        }
    }
}

haven_state::wrap_store!(FencedStore, store, {
    async fn commit(&self, batch: Batch) -> StoreResult<Commit> {
        self.fenced_commit(batch, true).await
    }

    async fn check_writable(&self) -> StoreResult<()> {
        self.store.check_writable().await
    }
});
