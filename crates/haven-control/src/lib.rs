//! Haven's control plane, kept as records in the store like everything else:
//!
//! - [`registry`]: the upstream MCP servers Haven federates (one last-writer-wins record per
//!   upstream, tombstoned on removal);
//! - [`config`]: runtime settings every node watches and applies without a restart;
//! - [`redact`]: the one redaction of what Haven says about upstreams to operators (known
//!   secret values, URL credentials and query strings, credentials after `Bearer`/`Basic`);
//!
//! Secret values (and the `${secret:NAME}` references registry entries make to them) are the
//! `haven-secrets` crate's.
//!
//! This crate sits on the state layer: it depends on `haven-state` and `haven-secrets` only.

pub mod config;
pub mod redact;
pub mod registry;
