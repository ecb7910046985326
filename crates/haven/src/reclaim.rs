//! The storage reclaimer of one node: every `storage.reclaim_interval_ms` it runs a pass of
//! the store's reclamation (`Store::reclaim`), in bounded steps that the store interleaves
//! with commits. The change-log floor is what every backup target has shipped (the whole
//! log when no backup is configured), so point-in-time restore keeps every entry it needs.

use std::sync::Arc;
use std::time::Duration;

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
    /// Removed since the node started.
    pub removed: Reclaimed,
    /// Why the last pass failed, while failing.
    pub last_error: Option<String>,
}

/// Starts the reclaimer; it runs until the process ends.
pub fn start(
    store: Arc<dyn Store>,
    backup: Vec<haven_backup::ShipperHandle>,
    in_force: Arc<RwLock<Arc<haven_control::config::Snapshot>>>,
    status: Arc<Mutex<ReclaimStatus>>,
) {
    status.lock().state = "waiting".into();
    tokio::spawn(async move {
        loop {
            let settings = in_force.read().storage.clone();
            tokio::time::sleep(Duration::from_millis(settings.reclaim_interval_ms)).await;
            let mut floor = u64::MAX;
            for b in &backup {
                floor = floor.min(b.status().await.shipped_seq.saturating_add(1));
            }
            let policy = Reclaim {
                log_floor: floor,
                now_millis: store.clock().wall_millis(),
                expired_grace_millis: EXPIRED_GRACE.as_millis() as u64,
                tombstone_retention_millis: settings.tombstone_retention_ms,
                event_retention_millis: settings.event_retention_ms,
                step: STEP,
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
