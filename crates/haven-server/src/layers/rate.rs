//! Rate limits on `/mcp` (the buckets are in [`crate::rate`]):
//!
//! - [`check_ip`], before any other check but shedding and before authentication: the
//!   request rate of one client address (the connection's peer; `X-Forwarded-For` is not
//!   trusted),
//! - [`check_principal`], after authentication: the request rate of the request's
//!   [`Principal`] (the anonymous principal when authentication is off),
//! - per tool: `tools/call` requests of one principal for one tool, checked by the `/mcp`
//!   POST handler once the message is parsed ([`check_tool`]), in both eras from the message
//!   body (the stateless era's `Mcp-Name` must equal it, which the engine checks).
//!
//! A refused request is answered 429 with `Retry-After` (whole seconds, rounded up) and a
//! JSON-RPC error, before it reaches the engine: nothing is changed. An open SSE stream (GET)
//! counts as one request when it opens.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use haven_auth::Principal;
use haven_mcp::engine::{Reason, Rejection};
use haven_mcp::jsonrpc::Incoming;
use haven_mcp::rmcp::model::{ErrorCode, ErrorData};

use crate::rate::{Limited, RateLimiter};
use crate::response::{Era, respond};

/// The JSON-RPC error code of a rate limit's refusal (as for the other refusals of the
/// transport).
const CODE: i32 = -32000;

/// A refusal of the whole exchange (no message read yet), in `era`.
fn refuse(era: Era, limited: &Limited) -> Response {
    if let Some(m) = haven_telemetry::get() {
        let kind = match limited.scope {
            crate::rate::Scope::Address => "address",
            crate::rate::Scope::Principal => "principal",
            crate::rate::Scope::Tool => "tool",
        };
        m.rate_limited
            .get_or_create(&haven_telemetry::KindLabel { kind: kind.into() })
            .inc();
    }
    let rejection = Rejection::exchange(
        Reason::RateLimited {
            retry_after_secs: limited.retry_after_secs(),
        },
        CODE,
        limited.message(),
    );
    respond(era, rejection.into())
}

/// The name rate limits use for a caller: the principal's id, anonymous when none.
pub fn principal_id(principal: Option<&Principal>) -> String {
    principal
        .map(Principal::id)
        .unwrap_or_else(|| Principal::anonymous().id())
}

/// The rate limit of the address `req` came from (none for a request without a peer
/// address, i.e. not from the network): the answer refusing it when it is over.
pub(crate) fn check_ip(rate: &RateLimiter, req: &Request) -> Option<Response> {
    let ConnectInfo(peer) = req.extensions().get::<ConnectInfo<SocketAddr>>()?;
    let limited = rate.check_ip(peer.ip()).err()?;
    tracing::debug!(peer = %peer, "request refused: the client address's rate limit");
    Some(refuse(Era::Legacy, &limited))
}

/// The rate limit of `principal`: the answer refusing its request when it is over.
pub(crate) fn check_principal(rate: &RateLimiter, principal: &Principal) -> Option<Response> {
    if !rate.principal_limited() {
        return None;
    }
    let id = principal.id();
    let limited = rate.check_principal(&id).err()?;
    tracing::debug!(principal = %id, "request refused: the principal's rate limit");
    Some(refuse(Era::Legacy, &limited))
}

/// The per-tool limit for a parsed message: `None` when it may go on, or the refusal (with
/// the request's id) to answer in `era`.
pub fn check_tool(
    rate: &RateLimiter,
    principal: Option<&Principal>,
    message: &Incoming,
    era: Era,
) -> Option<Response> {
    let Incoming::Request(req) = message else {
        return None;
    };
    if req.method != "tools/call" {
        return None;
    }
    // A call without a readable name is refused by the engine; it runs nothing.
    let tool = req.params.as_ref()?.get("name")?.as_str()?;
    if !rate.tool_limited(tool) {
        return None;
    }
    let principal = principal_id(principal);
    let limited = rate.check_tool(&principal, tool).err()?;
    tracing::debug!(principal = %principal, tool, "tool call refused: its rate limit");
    let rejection = Rejection::new(
        Reason::RateLimited {
            retry_after_secs: limited.retry_after_secs(),
        },
        Some(&req.id),
        ErrorData::new(ErrorCode(CODE), limited.message(), None),
    );
    Some(respond(era, rejection.into()))
}
