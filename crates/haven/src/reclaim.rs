//! The storage reclaimer of one node: every `storage.reclaim_interval_ms` it runs a pass of
//! the store's reclamation (`Store::reclaim`), in bounded steps that the store interleaves
//! with commits. The change-log floor is what every reader has read: what every backup
//! target has shipped (so point-in-time restore keeps every entry it needs) and, in a
//! region with peers, what every other region has applied of this region's log (its echo).
//!
//! On a log the region's nodes share (JetStream), every node forgets in memory what no
//! reader needs, and one node removes the log's obsolete entries: the one that ships the
//! backups (only it knows how far they are), or, without backups, the holder of the
//! region's reclamation lease.

use std::sync::Arc;
use std::time::Duration;

use haven_cluster::regions::{LOCAL_NS, REGIONS_NS};
use haven_cluster::takeover::{Echo, echo_key};
use haven_cluster::{Holding, Lease};
use haven_state::{Reclaim, Reclaimed, Store, StoreError};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

/// Items of each kind examined in one step: one short write transaction.
const STEP: usize = 512;
/// Records expired longer ago than this are removed.
const EXPIRED_GRACE: Duration = Duration::from_secs(60);

/// What the reclaimer has done, for `/admin/v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReclaimStatus {
    /// `waiting` (before the first pass), `ok`, `failing`, or `unsupported` (the backend keeps
    /// its whole history).
    pub state: String,
    /// Complete passes.
    pub passes: u64,
    /// When the last pass completed, Unix milliseconds.
    pub last_pass_millis: Option<u64>,
    /// The change-log floor of the last pass (entries below it no longer current were
    /// removed).
    pub log_floor: Option<u64>,
    /// Removed since the node started (change-log entries: by this node).
    pub removed: Reclaimed,
    /// Whether this node removes the change log's obsolete entries (on a shared log one
    /// node of the region does).
    pub trims_log: bool,
    /// Why the change-log floor is where it is: what holds it back.
    pub floor_reason: Option<String>,
    /// Why the last pass failed, while failing.
    pub last_error: Option<String>,
}

/// The record of the region's reclamation lease (namespace [`LOCAL_NS`]), followed by
/// `/<region>`.
const LEASE_RECORD: &str = "reclaim-lease";

/// The change-log floor: entries below it are read by every reader. `None`: not known here.
async fn log_floor(
    store: &dyn Store,
    backup: &[haven_backup::ShipperHandle],
    peer_regions: &[String],
) -> (u64, Option<String>) {
    let mut floor = u64::MAX;
    let mut reason = None;
    for b in backup {
        let s = b.status().await;
        let at = s.shipped_seq.saturating_add(1);
        if at < floor {
            floor = at;
            reason = Some(format!(
                "backup to {} shipped up to {}",
                s.target, s.shipped_seq
            ));
        }
    }
    let me = store.origin().region.to_string();
    for peer in peer_regions {
        let seq = match store.get(REGIONS_NS, &echo_key(peer, &me)).await {
            Ok(Some(r)) => serde_json::from_slice::<Echo>(r.value()).map_or(0, |e| e.seq),
            _ => 0,
        };
        if seq + 1 < floor {
            floor = seq + 1;
            reason = Some(format!(
                "region {peer} applied this region's log up to {seq}"
            ));
        }
    }
    (floor, reason)
}

/// Starts the reclaimer; it runs until the process ends. `peer_regions`: the other regions
/// that apply this region's log.
pub fn start(
    store: Arc<dyn Store>,
    backup: Vec<haven_backup::ShipperHandle>,
    peer_regions: Vec<String>,
    in_force: Arc<RwLock<Arc<haven_control::config::Snapshot>>>,
    status: Arc<Mutex<ReclaimStatus>>,
) {
    status.lock().state = "waiting".into();
    tokio::spawn(async move {
        let mut lease = None;
        loop {
            let settings = in_force.read().storage.clone();
            let interval = Duration::from_millis(settings.reclaim_interval_ms);
            tokio::time::sleep(interval).await;
            let (floor, floor_reason) = log_floor(&*store, &backup, &peer_regions).await;
            let trim_log = if !store.shared() {
                true
            } else if !backup.is_empty() {
                // Only the shipping node knows how far the backups are.
                let mut ships = true;
                for b in &backup {
                    ships &= b.status().await.state != "standby";
                }
                ships
            } else {
                let lease = lease.get_or_insert_with(|| {
                    Lease::new(
                        store.clone(),
                        LOCAL_NS,
                        &format!("{LEASE_RECORD}/{}", store.origin().region),
                        &store.origin().to_string(),
                        (3 * interval).max(Duration::from_secs(30)),
                    )
                });
                matches!(lease.hold().await, Ok(Holding::Held { .. }))
            };
            {
                let mut s = status.lock();
                s.trims_log = trim_log;
                s.floor_reason = floor_reason;
            }
            let policy = Reclaim {
                log_floor: floor,
                now_millis: store.clock().wall_millis(),
                expired_grace_millis: EXPIRED_GRACE.as_millis() as u64,
                tombstone_retention_millis: settings.tombstone_retention_ms,
                event_retention_millis: settings.event_retention_ms,
                step: STEP,
                trim_log,
            };
            match pass(&*store, &policy, &status).await {
                Ok(()) => {
                    let last = store.last_seq().await.unwrap_or_default();
                    let mut s = status.lock();
                    s.state = "ok".into();
                    s.passes += 1;
                    s.last_pass_millis = Some(policy.now_millis);
                    s.log_floor = Some(floor.min(last));
                    s.last_error = None;
                }
                Err(StoreError::Invalid(why)) => {
                    tracing::info!(%why, "storage is not reclaimed");
                    let mut s = status.lock();
                    s.state = "unsupported".into();
                    s.last_error = Some(why);
                    return;
                }
                Err(e) => {
                    let mut s = status.lock();
                    if s.state != "failing" {
                        tracing::warn!(error = %e, "reclaiming storage failed; retrying at the next interval");
                    }
                    s.state = "failing".into();
                    s.last_error = Some(e.to_string());
                }
            }
        }
    });
}

/// One pass: steps until the store says it is complete, yielding between steps.
async fn pass(
    store: &dyn Store,
    policy: &Reclaim,
    status: &Mutex<ReclaimStatus>,
) -> Result<(), StoreError> {
    loop {
        let step = store.reclaim(policy).await?;
        {
            let mut s = status.lock();
            s.removed.log_entries += step.log_entries;
            s.removed.records += step.records;
            s.removed.events += step.events;
        }
        if step.done {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
}
