//! Membership from the store: every node rewrites its heartbeat record (namespace `nodes`)
//! every second and reads everyone else's. A node whose heartbeat is older than its
//! time-to-live, or whose record
//! names another boot, is dead; the node that notices takes over its in-flight work
//! (`recovery`). There is no membership protocol of Haven's own: the store is the authority.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Weak;
use std::time::Duration;

use haven_state::Batch;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::Inner;

/// Namespace of heartbeat records.
pub const NODES_NS: &str = "nodes";

/// A node's heartbeat record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub node: String,
    /// Boot id of the process.
    pub boot: String,
    /// Region (the store's origin).
    pub region: String,
    /// Haven version.
    pub version: String,
    /// When the process started, Unix milliseconds.
    pub started_millis: u64,
    /// When this heartbeat was written, Unix milliseconds.
    pub beat_millis: u64,
    /// Whether the node is draining (stops taking new work).
    #[serde(default)]
    pub draining: bool,
    /// The heartbeat is valid until `beat_millis + ttl_millis`.
    #[serde(default)]
    pub ttl_millis: u64,
}

/// A node as seen from here.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    /// Its heartbeat.
    pub info: NodeInfo,
    /// When its heartbeat expires, Unix milliseconds.
    pub expires_millis: u64,
    /// Whether it is alive now.
    pub alive: bool,
}

/// The membership view of one node.
#[derive(Default)]
pub(crate) struct Membership {
    members: RwLock<HashMap<String, (NodeInfo, u64)>>,
    /// When this node last stored its own heartbeat (0: never).
    own_beat: RwLock<u64>,
    draining: RwLock<bool>,
    /// Set when the node left: no more heartbeats.
    left: RwLock<bool>,
}

impl Membership {
    /// Whether node `node` with boot `boot` is known to be gone, judged at `now`.
    pub(crate) fn is_dead(&self, inner: &Inner, node: &str, boot: &str, now: u64) -> bool {
        if node == inner.config.node_id {
            return boot != inner.config.boot_id;
        }
        // Judge others only while our own heartbeat is fresh: if we cannot write to the store
        // either, their silence says nothing.
        let own = *self.own_beat.read();
        if own == 0 || now.saturating_sub(own) > inner.config.heartbeat_ttl.as_millis() as u64 {
            return false;
        }
        match self.members.read().get(node) {
            Some((info, expires)) => info.boot != boot || *expires <= now,
            None => true,
        }
    }

    /// Every node with a heartbeat record, alive or not.
    pub(crate) fn members(&self, now: u64) -> Vec<Member> {
        let mut out: Vec<Member> = self
            .members
            .read()
            .values()
            .map(|(info, expires)| Member {
                info: info.clone(),
                expires_millis: *expires,
                alive: *expires > now,
            })
            .collect();
        out.sort_by(|a, b| a.info.node.cmp(&b.info.node));
        out
    }

    pub(crate) fn set_draining(&self) {
        *self.draining.write() = true;
    }
}

/// Writes this node's heartbeat and refreshes the view of the others.
pub(crate) async fn beat(inner: &Inner) -> Result<(), haven_state::StoreError> {
    if *inner.membership.left.read() {
        return Ok(());
    }
    let now = inner.store.clock().wall_millis();
    let info = NodeInfo {
        node: inner.config.node_id.clone(),
        boot: inner.config.boot_id.clone(),
        region: inner.store.origin().region.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_millis: inner.started_millis,
        beat_millis: now,
        draining: *inner.membership.draining.read(),
        ttl_millis: inner.config.heartbeat_ttl.as_millis() as u64,
    };
    // No store time-to-live: a dead node's last heartbeat stays readable (status shows it as
    // dead, with its last beat) until the node leaves cleanly or is started again.
    inner
        .store
        .commit(Batch::new().put(
            NODES_NS,
            &inner.config.node_id,
            serde_json::to_vec(&info).expect("serializable"),
        ))
        .await?;
    *inner.membership.own_beat.write() = now;
    refresh(inner).await
}

/// Reloads every heartbeat record.
pub(crate) async fn refresh(inner: &Inner) -> Result<(), haven_state::StoreError> {
    let mut seen = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = inner
            .store
            .scan(NODES_NS, "", after.as_deref(), 512)
            .await?;
        for r in &page.records {
            if let Ok(info) = serde_json::from_slice::<NodeInfo>(r.value()) {
                let expires = info.beat_millis.saturating_add(info.ttl_millis);
                seen.insert(info.node.clone(), (info, expires));
            }
        }
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    *inner.membership.members.write() = seen;
    Ok(())
}

/// Removes this node's heartbeat (a clean exit: others take over at once).
pub(crate) async fn leave(inner: &Inner) {
    *inner.membership.left.write() = true;
    let _ = inner
        .store
        .commit(Batch::new().delete(NODES_NS, &inner.config.node_id))
        .await;
}

/// Heartbeats, and takes over the work of dead nodes, until the engine is dropped.
pub(crate) fn start(inner: &Arc<Inner>) {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let interval = inner.config.heartbeat_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            match beat(&inner).await {
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
