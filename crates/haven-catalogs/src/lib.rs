//! Haven's built-in catalogs, written on the protocol engine's [`haven_mcp::Catalog`] trait
//! like any other catalog (the engine knows none of them):
//!
//! - [`default`]: what `haven serve` offers out of the box (echo, time_now, notes, sleep, note
//!   resources, a prompt);
//! - [`conformance`]: the official MCP conformance suite's fixtures, exactly.

// rmcp marks logging (and other legacy-era features) deprecated by SEP-2577; the catalogs
// serve the legacy era on purpose, so they use them.
#![allow(deprecated)]

pub mod conformance;
pub mod default;

pub use conformance::ConformanceCatalog;
pub use default::{DefaultCatalog, NoteLimits};
