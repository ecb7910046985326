//! Haven's control plane, kept as records in the store like everything else:
//!
//! - [`registry`]: the upstream MCP servers Haven federates (one last-writer-wins record per
//!   upstream, tombstoned on removal);
//! - [`config`]: runtime settings every node watches and applies without a restart;
//! - [`secrets`]: secret values under envelope encryption (a data key per secret, wrapped by a
//!   key-encryption key that never enters the store).
//!
//! This crate sits on the state layer: it depends on `haven-state` only.

pub mod config;
pub mod registry;
pub mod secrets;
