//! Haven's continuous backup, a reader of the change log (like Litestream for SQLite):
//!
//! - [`shipper`] ships new change-log entries to object storage as sealed segments at a
//!   fixed interval, and a full snapshot at a longer one;
//! - [`restore`] builds a data directory holding exactly the state as of a sequence or a time;
//! - [`verify`] checks every object against its manifest and every chain for continuity;
//! - [`retention`] decides what to keep, archive and delete.
//!
//! Objects are compressed with zstd and encrypted with AES-256-GCM ([`crypto`]); the manifest
//! ([`manifest`]) records each object's range, size and SHA-256. This crate depends only on
//! the state layer.

pub mod catalog;
pub mod crypto;
pub mod error;
pub mod format;
pub mod manifest;
pub mod restore;
pub mod retention;
pub mod shipper;
pub mod target;
pub mod verify;

/// Hooks for Haven's fuzz targets (`fuzz/`): private pieces exposed as they are, only when the
/// `fuzzing` feature is on (never in Haven's own build).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Encrypts already compressed bytes as a sealed object (what `crypto::seal` does after
    /// compressing), so that `crypto::open` can be fed arbitrary zstd frames.
    pub fn seal_compressed(
        key: &crate::BackupKey,
        deployment: &str,
        object: &str,
        compressed: &[u8],
    ) -> crate::Result<Vec<u8>> {
        crate::crypto::seal_compressed(key, deployment, object, compressed)
    }

    /// An empty in-memory target.
    pub fn memory_target() -> crate::Target {
        crate::Target::in_memory()
    }
}

pub use catalog::{Catalog, Point};
pub use crypto::BackupKey;
pub use error::{BackupError, Result};
pub use restore::{RestoreOptions, RestoreReport, restore};
pub use retention::RetentionPolicy;
pub use shipper::{BackupConfig, BackupFailures, BackupStatus, ShipReport, Shipper, ShipperHandle};
pub use target::Target;
pub use verify::VerifyReport;

/// Formats Unix milliseconds as an RFC 3339 UTC time.
pub fn fmt_millis(millis: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| millis.to_string())
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn parse_time(text: &str) -> Result<u64> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            BackupError::Config(format!(
                "invalid time {text:?} ({e}); use RFC 3339, e.g. 2026-11-27T10:00:00Z"
            ))
        })?;
    let millis = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(millis).map_err(|_| BackupError::Config(format!("time {text:?} is before 1970")))
}
