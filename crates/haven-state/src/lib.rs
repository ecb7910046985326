//! Haven's state layer. Everything durable is a record or a stream event, written through a
//! [`Store`], recorded in a change log, and merged with last-writer-wins semantics ordered by
//! hybrid-logical-clock version. This crate knows nothing about MCP.

pub mod clock;
pub mod files;
mod group;
pub mod ids;
mod index;
pub mod mem_store;
pub mod nats_store;
mod plan;
pub mod presence;
pub mod record;
pub mod redb_store;
pub mod replicated;
pub mod store;
pub mod tls;
pub mod trace;
mod wal;

/// Hooks for Haven's fuzz targets (`fuzz/`): private decoders exposed as they are, only when
/// the `fuzzing` feature is on (never in Haven's own build).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes one write-ahead-log segment as a restart reads it (stops at a torn tail).
    pub fn wal_segment(bytes: &[u8]) -> Result<Vec<crate::LogEntry>, String> {
        let mut out = Vec::new();
        crate::wal::decode_segment(bytes, false, &mut out).map(|()| out)
    }
}

/// What [`wrap_store!`] expands to needs, reachable from any crate.
#[doc(hidden)]
pub mod __private {
    pub use async_trait::async_trait;
    pub use serde_json::Value;
    pub use tokio::sync::broadcast::Receiver;
}

/// Implements [`Store`] for a wrapper of another store: every method is forwarded to the
/// field `$inner` except `commit` and `check_writable`, which the wrapper writes itself (in
/// the braces, as in an `#[async_trait]` impl) — the two that decide whether a write may go.
///
/// ```ignore
/// haven_state::wrap_store!(FaultyStore, inner, {
///     async fn commit(&self, batch: Batch) -> StoreResult<Commit> { ... }
///     async fn check_writable(&self) -> StoreResult<()> { ... }
/// });
/// ```
#[macro_export]
macro_rules! wrap_store {
    ($ty:ty, $inner:ident, { $($writes:tt)* }) => {
        #[$crate::__private::async_trait]
        impl $crate::Store for $ty {
            $($writes)*

            // One line a method: each forwards to the inner store.
            fn origin(&self) -> &$crate::Origin { self.$inner.origin() }
            fn clock(&self) -> &::std::sync::Arc<$crate::HybridClock> { self.$inner.clock() }
            async fn get(&self, ns: &str, key: &str) -> $crate::StoreResult<Option<$crate::StoredRecord>> { self.$inner.get(ns, key).await }
            async fn get_raw(&self, ns: &str, key: &str) -> $crate::StoreResult<Option<$crate::StoredRecord>> { self.$inner.get_raw(ns, key).await }
            async fn scan(&self, ns: &str, prefix: &str, after: Option<&str>, limit: usize) -> $crate::StoreResult<$crate::ScanPage> { self.$inner.scan(ns, prefix, after, limit).await }
            async fn read_events(&self, stream: &str, after: u64, limit: usize) -> $crate::StoreResult<Vec<$crate::StreamEvent>> { self.$inner.read_events(stream, after, limit).await }
            async fn read_log(&self, from_seq: u64, limit: usize) -> $crate::StoreResult<Vec<$crate::LogEntry>> { self.$inner.read_log(from_seq, limit).await }
            async fn read_log_encoded(&self, from_seq: u64, limit: usize) -> $crate::StoreResult<Vec<$crate::EncodedEntry>> { self.$inner.read_log_encoded(from_seq, limit).await }
            async fn last_seq(&self) -> $crate::StoreResult<u64> { self.$inner.last_seq().await }
            fn subscribe(&self) -> $crate::__private::Receiver<::std::sync::Arc<$crate::LogEntry>> { self.$inner.subscribe() }
            fn shared(&self) -> bool { self.$inner.shared() }
            async fn sync(&self) -> $crate::StoreResult<()> { self.$inner.sync().await }
            async fn describe(&self) -> $crate::__private::Value { self.$inner.describe().await }
            async fn state_entries(&self) -> $crate::StoreResult<(u64, Vec<$crate::LogEntry>)> { self.$inner.state_entries().await }
            async fn reclaim(&self, r: &$crate::Reclaim) -> $crate::StoreResult<$crate::Reclaimed> { self.$inner.reclaim(r).await }
        }
    };
}

pub use clock::{Hlc, HybridClock, ManualClock, PhysicalClock, SystemClock, VirtualClock};
pub use mem_store::{BatchObserver, LinkFaults, MemLog, MemStore};
pub use nats_store::{NatsConfig, NatsPresence, NatsStore, NatsTls};
pub use plan::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use presence::{Presence, Probe};
pub use record::{
    Change, EncodedEntry, LogEntry, LogSubject, Origin, Record, StoredRecord, StreamEvent, Version,
    View, merge,
};
pub use redb_store::{RedbStore, Restorer, data_dir_in_use};
pub use replicated::{Removal, ReplicatedStore, SharedLog};
pub use store::{
    Batch, Commit, Expect, LogFold, Op, Outcome, Reclaim, Reclaimed, ScanPage, Store, StoreError,
    StoreResult, watch,
};
