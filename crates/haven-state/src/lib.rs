//! Haven's state layer. Everything durable is a record or a stream event, written through a
//! [`Store`], recorded in a change log, and merged with last-writer-wins semantics ordered by
//! hybrid-logical-clock version. This crate knows nothing about MCP.

pub mod clock;
pub mod ids;
mod index;
pub mod mem_store;
pub mod nats_store;
mod plan;
pub mod record;
pub mod redb_store;
pub mod replicated;
pub mod store;
mod wal;

/// Hooks for Haven's fuzz targets (`fuzz/`): private decoders exposed as they are, only when
/// the `fuzzing` feature is on (never in Haven's own build).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes one write-ahead-log segment as a restart reads it (stops at a torn tail).
    pub fn wal_segment(bytes: &[u8]) -> Result<Vec<crate::LogEntry>, String> {
        let mut out = Vec::new();
        crate::wal::decode_segment(bytes, &mut out).map(|()| out)
    }
}

pub use clock::{Hlc, HybridClock, ManualClock, PhysicalClock, SystemClock, VirtualClock};
pub use mem_store::{BatchObserver, LinkFaults, MemLog, MemStore};
pub use nats_store::{NatsConfig, NatsStore};
pub use plan::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use record::{
    Change, LogEntry, Origin, Record, StoredRecord, StreamEvent, Version, View, merge,
};
pub use redb_store::{RedbStore, Restorer, data_dir_in_use};
pub use replicated::{ReplicatedStore, SharedLog};
pub use store::{
    Batch, Commit, Expect, LogFold, Op, Outcome, ScanPage, Store, StoreError, StoreResult, watch,
};
