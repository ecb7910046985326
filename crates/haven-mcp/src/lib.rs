//! Haven's MCP protocol engine. It serves both protocol eras from one set of catalogs: legacy
//! sessions (2025-06-18, 2025-11-25) whose sessions, streams and tasks live in the store, and
//! the stateless 2026-07-28 protocol. Wire types come from `rmcp::model`. This crate knows
//! nothing about HTTP: it answers with protocol outcomes (`outcome`), and the server crate maps
//! them to HTTP.

// rmcp marks logging (and other legacy-era features) deprecated by SEP-2577; Haven serves the
// legacy era on purpose, so it uses them.
#![allow(deprecated)]

pub mod catalog;
pub mod context;
pub mod engine;
pub mod hub;
pub mod jsonrpc;
pub mod keyring;
pub mod limits;
pub mod outcome;
pub mod session;
pub mod stream;

/// The official SDK whose wire types Haven uses, re-exported so upper layers share its version.
pub use rmcp;

pub use catalog::{Catalog, CatalogInfo, InputRequest, Round, Step, TaskSupport};
pub use context::{Announcement, Era, RequestContext};
pub use engine::{
    Engine, EngineConfig, LegacyPost, LegacyResponses, Reply, SseFrame, StatelessHeaders,
    StatelessPost,
};
pub use outcome::{Answer, Reason, Rejection};
