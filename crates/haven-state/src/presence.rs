//! Presence of a node process on the store's connection: a process *announces* itself (from
//! then on it answers probes naming its region, node and boot id for as long as its connection
//! lives), and another process *probes* it. What a probe can tell is narrow and one-sided:
//! [`Probe::Absent`] means that, as the store's servers see it right now, no connection
//! anywhere answers for that process — which is what a process killed outright looks like
//! once its kernel has closed its connection. A process that is paused, slow or cut off
//! answers late or not at all, which is [`Probe::Unknown`], never `Absent`.
//!
//! Only the JetStream backend has presence ([`crate::nats_store::NatsPresence`]): a
//! subscription on a core NATS subject, and NATS's "no responders" answer to a request that
//! no subscription in the NATS cluster would receive. The embedded store has none.

use std::time::Duration;

use async_trait::async_trait;

use crate::store::StoreResult;

/// What one probe of a process found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The process answered: it is there.
    Present,
    /// No connection answers for the process (the servers said so at once), and this
    /// process's own connection was up and unchanged for a while around the probe.
    Absent,
    /// Nothing certain: no answer in time (a paused or slow process), or this process's own
    /// connection was down or changed recently.
    Unknown,
}

/// A node process's presence on the store's connection.
#[async_trait]
pub trait Presence: Send + Sync + std::fmt::Debug + 'static {
    /// Answers probes of process `boot` of node `node` of `region` from now on, for as long
    /// as this process runs (across reconnections).
    async fn announce(&self, region: &str, node: &str, boot: &str) -> StoreResult<()>;

    /// Probes process `boot` of node `node` of `region`, waiting at most `timeout` for an
    /// answer.
    async fn probe(&self, region: &str, node: &str, boot: &str, timeout: Duration) -> Probe;
}
