//! The node's heartbeat loop: every interval it writes its heartbeat and, when that worked,
//! settles the work of processes that are gone (`recovery`). Liveness itself — who is dead,
//! judged without trusting wall clocks — is `haven_cluster::Membership`. Where the store
//! offers presence, a second loop probes nodes whose heartbeat went silent every quarter
//! interval, and wakes the first to settle at once when it finds one gone.

use std::sync::{Arc, Weak};
use std::time::Duration;

pub use haven_cluster::membership::{Member, NodeInfo};

use super::Inner;
use crate::hub::Topic;

/// Heartbeats, and takes over the work of dead nodes, until the engine is dropped or killed.
pub(crate) fn start(inner: &Arc<Inner>) {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let interval = inner.config.heartbeat_interval;
    let wake = Arc::new(tokio::sync::Notify::new());
    if inner.membership.has_presence() {
        let weak = weak.clone();
        let wake = wake.clone();
        inner.spawn(async move {
            let mut tick = tokio::time::interval(interval / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let membership = inner.membership.clone();
                drop(inner);
                if membership.probe_silent().await {
                    wake.notify_one();
                }
            }
        });
    }
    inner.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            let woken = tokio::select! {
                _ = tick.tick() => false,
                () = wake.notified() => true,
            };
            let Some(inner) = weak.upgrade() else { return };
            if woken {
                // A node was found gone between heartbeats: settle its work now.
                if let Err(e) = super::recovery::recover(&inner).await {
                    tracing::warn!(error = %e, "taking over the work of dead nodes failed");
                }
                continue;
            }
            match inner.membership.beat().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("heartbeats are stored again");
                        failing = false;
                    }
                    if let Err(e) = super::recovery::recover(&inner).await {
                        tracing::warn!(error = %e, "taking over the work of dead nodes failed");
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "storing the heartbeat failed");
                        failing = true;
                    }
                }
            }
            drop(inner);
            tokio::time::sleep(Duration::ZERO).await;
        }
    });
}

/// Feeds heartbeats to the membership as they arrive (closer clock-offset estimates than the
/// periodic reads).
pub(crate) fn watch_heartbeats(inner: &Arc<Inner>) {
    let nodes = Topic::Namespace(haven_cluster::NODES_NS.into());
    inner.on_change(nodes, |inner, entry| async move {
        if let Some(entry) = entry {
            inner.membership.observe_change(&entry.change, entry.seq);
        }
    });
}
