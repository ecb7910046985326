//! Federation of upstream MCP servers: Haven connects to every enabled upstream of the registry
//! (`haven_control::registry`) and serves their tools, prompts, resources and resource templates
//! next to its own, under the registry's naming rule (`<upstream>__<tool>`,
//! `<upstream>+<uri>`).
//!
//! # Parts
//!
//! - [`Upstreams`]: the per-node pool. [`Upstreams::start`] watches the registry (the store's
//!   change feed, namespace `registry`) and keeps one supervisor task per enabled upstream. A
//!   supervisor connects (stdio: a child process through rmcp's `TokioChildProcess`; HTTP: rmcp's
//!   Streamable HTTP transport, whose forwarded calls Haven's own client in `http.rs` sends),
//!   fetches the upstream's lists, and reconnects with exponential backoff (250 ms doubling up
//!   to `upstream.restart_max_backoff_ms`, back to 250 ms after a successful call) when the
//!   connection dies. A removed or disabled upstream is closed (the
//!   rmcp service cancelled, a child process closed, then killed, and reaped); a changed entry
//!   reconnects.
//! - [`FederatedCatalog`]: a [`haven_mcp::Catalog`] that wraps Haven's own catalog and adds
//!   what the upstreams serve. Lists come from the store, never from the network: each
//!   upstream's last fetched lists are one record in namespace [`LISTS_NS`] (see
//!   [`UpstreamLists`]), so every node serves the same lists. A node that fetches lists that
//!   differ from the record rewrites it (compare-and-set) and announces the change, so that the
//!   clients of every node re-list. Calls route by prefix to the upstream with the original
//!   name or URI restored.
//!
//! # Robustness
//!
//! Every call has a deadline (the entry's `timeout_ms` or `upstream.timeout_ms`); when it
//! passes, or the client cancels, the upstream request is cancelled with
//! `notifications/cancelled` and the client gets a JSON-RPC error ([`UPSTREAM_TIMEOUT`],
//! [`UPSTREAM_UNAVAILABLE`], [`UPSTREAM_BAD_RESPONSE`]). Each upstream has a circuit breaker:
//! after `upstream.breaker_failures` consecutive failures (timeouts, transport errors, invalid
//! answers; a JSON-RPC error or a tool result with `isError: true` is an answer, not a failure)
//! calls are refused at once for `upstream.breaker_cooldown_ms`, then one trial call is let
//! through (half-open); its success closes the breaker, its failure opens it again. A Streamable
//! HTTP session that expired (HTTP 404) is re-opened by rmcp's client and the request resent
//! once; a request that provably never reached the upstream (connection refused, session gone)
//! is retried once on a fresh connection. No lock is held across an await, so one hanging
//! upstream never delays another or the list calls.
//!
//! # What an upstream may not do
//!
//! Haven answers server-to-client requests from upstreams itself, without relaying them to its
//! own clients: `sampling/createMessage` and `elicitation/create` get a JSON-RPC error
//! (method not found), `roots/list` gets an empty list of roots. Haven's client declares none of
//! these capabilities, so a well-behaved upstream does not ask. Progress notifications of a
//! call are forwarded to the calling client; `notifications/resources/updated` becomes an
//! announcement of the served URI; log messages go to Haven's log at debug level.
//!
//! # Secrets
//!
//! Header values (HTTP) and environment values (stdio) may reference secrets
//! (`${secret:NAME}`); they are expanded through a [`SecretResolver`] each time a connection is
//! opened and never appear in status or errors.

// rmcp marks the legacy-era features (roots, sampling, logging) deprecated by SEP-2577; Haven
// talks to legacy upstreams on purpose.
#![allow(deprecated)]

mod breaker;
mod catalog;
mod connect;
mod direct;
mod failure;
mod http;
mod lists;
mod pool;
#[cfg(feature = "test-upstream")]
pub mod testing;

use async_trait::async_trait;

pub use catalog::FederatedCatalog;
pub use connect::UpstreamTls;
pub use failure::Reason;
pub use lists::{LISTS_NS, UpstreamLists, valid_served_name};
pub use pool::{UpstreamState, UpstreamStatus, Upstreams};

/// JSON-RPC error code: the upstream did not answer within the call's timeout.
pub const UPSTREAM_TIMEOUT: i32 = -32050;
/// JSON-RPC error code: the upstream cannot be reached now (not connected, restarting,
/// circuit breaker open, connection lost during the call).
pub const UPSTREAM_UNAVAILABLE: i32 = -32051;
/// JSON-RPC error code: the upstream answered with something that is not a valid result.
pub const UPSTREAM_BAD_RESPONSE: i32 = -32052;
/// JSON-RPC error code of a request cancelled by its client.
pub const REQUEST_CANCELLED: i32 = -32800;

/// Expands secret references (`${secret:NAME}`) in header and environment values. The error is
/// a message for operators and must not contain secret values.
#[async_trait]
pub trait SecretResolver: Send + Sync + 'static {
    /// `template` with every secret reference replaced by the secret's value.
    async fn expand(&self, template: &str) -> Result<String, String>;
}

/// Haven's secrets service expands references with the secrets stored (encrypted) in the store.
#[async_trait]
impl SecretResolver for haven_secrets::Secrets {
    async fn expand(&self, template: &str) -> Result<String, String> {
        haven_secrets::Secrets::expand(self, template)
            .await
            .map(|v| v.as_str().to_owned())
            .map_err(|e| e.to_string())
    }
}

/// A resolver without secrets: values without references pass unchanged, a reference is an
/// error. For tests and nodes without a secrets service.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSecrets;

#[async_trait]
impl SecretResolver for NoSecrets {
    async fn expand(&self, template: &str) -> Result<String, String> {
        let pieces =
            haven_control::registry::parse_template(template).map_err(|e| e.to_string())?;
        let mut out = String::new();
        for p in pieces {
            match p {
                haven_control::registry::Piece::Text(t) => out.push_str(t),
                haven_control::registry::Piece::Secret(name) => {
                    return Err(format!("secret '{name}' is not available on this node"));
                }
            }
        }
        Ok(out)
    }
}
