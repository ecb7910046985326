//! What a request came to, in protocol terms: the classification of a final JSON-RPC answer
//! ([`Answer`]), the reasons the engine refuses a request before running it ([`Rejection`]),
//! and the one mark that says "the store is unavailable, retry later" on a JSON-RPC error.
//!
//! The engine never picks an HTTP status. It says *what happened*; the transport decides how
//! that looks on its wire (`haven-server` maps these to statuses and headers in one place,
//! stdio writes the bodies as they are). Carrying the classification next to the JSON text
//! means no transport ever parses an answer to find out what it was.

use rmcp::model::{ErrorCode, ErrorData, RequestId};
use serde_json::Value;

use crate::jsonrpc::{self, Malformed};

/// `data.reason` of a JSON-RPC error caused by an unavailable store.
pub const STORE_UNAVAILABLE: &str = "store-unavailable";

/// The JSON-RPC error for a failed store operation, with `message` for the client.
///
/// When the store is unavailable (unreachable, lost quorum, full, closed: the write may succeed
/// later) the error carries `data: {"retryable": true, "reason": "store-unavailable"}`. That
/// mark is how an outage is told apart from a failed request everywhere else (see
/// [`is_store_unavailable`]); every place that turns a `StoreError` into a JSON-RPC error goes
/// through here, so the mark cannot be forgotten in one of them.
pub fn store_failure(message: impl Into<String>, e: &haven_state::StoreError) -> ErrorData {
    let data = e
        .is_retryable()
        .then(|| serde_json::json!({ "retryable": true, "reason": STORE_UNAVAILABLE }));
    ErrorData::new(ErrorCode::INTERNAL_ERROR, message.into(), data)
}

/// Whether `error` carries the store-unavailable mark of [`store_failure`].
pub fn is_store_unavailable(error: &ErrorData) -> bool {
    error.data.as_ref().is_some_and(|d| {
        d.get("retryable") == Some(&Value::Bool(true))
            && d.get("reason").and_then(Value::as_str) == Some(STORE_UNAVAILABLE)
    })
}

/// What a final JSON-RPC response says, known where it is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A result (including input-required results and created tasks).
    Result,
    /// A JSON-RPC error.
    Error {
        /// The error's code.
        code: i32,
        /// Whether the request failed because the store is unavailable (retry later).
        store_unavailable: bool,
    },
}

impl Answer {
    /// The classification of an error answer.
    pub fn of_error(error: &ErrorData) -> Answer {
        Answer::Error {
            code: error.code.0,
            store_unavailable: is_store_unavailable(error),
        }
    }
}

/// Why the engine refused a request (or could not answer it) without a normal final answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The message is not JSON or not a valid JSON-RPC message (-32700, -32600).
    Malformed,
    /// The request's parameters are invalid before it could run (-32602).
    InvalidParams,
    /// A routing header disagrees with the request body (-32020).
    HeaderMismatch,
    /// The protocol version is not one this server speaks in the request's era.
    UnsupportedVersion,
    /// A legacy request came without its session id.
    SessionRequired,
    /// The session ended or never existed.
    SessionNotFound,
    /// `Last-Event-ID` is not an event id of this server, or names no stream of the session.
    BadLastEventId,
    /// The method does not exist in the request's era (-32601).
    MethodNotFound,
    /// The request kind does not exist in this era: opening or resuming a stream and ending a
    /// session belong to the legacy era.
    MethodNotAllowed,
    /// The store could not serve what the request needs; nothing was applied.
    StoreUnavailable,
    /// The request's handler ended without a final response.
    NoResponse,
    /// A rate limit refused the request before it ran (the transport's own limits: per client
    /// address, per principal, per tool); nothing was applied. Retry after that many seconds.
    RateLimited {
        /// Seconds until the limit lets a request of the same kind through (at least 1).
        retry_after_secs: u64,
    },
}

/// A refusal: its reason, and the JSON-RPC error (with the request id, when known) that says so.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{reason:?}: {}", error.message)]
pub struct Rejection {
    /// Why.
    pub reason: Reason,
    /// The id of the request refused, when it could be read.
    pub id: Option<RequestId>,
    /// The error to answer with.
    pub error: ErrorData,
}

impl Rejection {
    /// A refusal of the request `id` with `error`.
    pub fn new(reason: Reason, id: Option<&RequestId>, error: ErrorData) -> Rejection {
        Rejection {
            reason,
            id: id.cloned(),
            error,
        }
    }

    /// A refusal that concerns the exchange rather than one identified request.
    pub fn exchange(reason: Reason, code: i32, message: impl Into<String>) -> Rejection {
        Rejection::new(
            reason,
            None,
            ErrorData::new(ErrorCode(code), message.into(), None),
        )
    }

    /// A store failure while serving the request `id` (marked retryable when it is one).
    pub fn store(
        id: Option<&RequestId>,
        message: impl Into<String>,
        e: &haven_state::StoreError,
    ) -> Rejection {
        Rejection::new(Reason::StoreUnavailable, id, store_failure(message, e))
    }

    /// The request kind does not exist here (anything but POST, GET and DELETE on the
    /// endpoint, or GET and DELETE in the stateless era).
    pub fn method_not_allowed() -> Rejection {
        Rejection::exchange(
            Reason::MethodNotAllowed,
            -32000,
            "Method Not Allowed: use POST, GET or DELETE on /mcp",
        )
    }

    /// The JSON-RPC error response to send.
    pub fn body(&self) -> String {
        jsonrpc::error_response(self.id.as_ref(), &self.error)
    }
}

impl From<Malformed> for Rejection {
    fn from(m: Malformed) -> Rejection {
        Rejection {
            reason: Reason::Malformed,
            id: m.id,
            error: m.error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_state::StoreError;

    #[test]
    fn only_transient_store_failures_are_marked() {
        for e in [
            StoreError::Unavailable("no quorum".into()),
            StoreError::Full("disk".into()),
            StoreError::Closed,
        ] {
            let err = store_failure("unavailable", &e);
            assert!(is_store_unavailable(&err), "{e}");
            assert_eq!(
                Answer::of_error(&err),
                Answer::Error {
                    code: -32603,
                    store_unavailable: true
                }
            );
        }
        for e in [
            StoreError::Corrupt("bad bytes".into()),
            StoreError::Invalid("empty namespace".into()),
        ] {
            let err = store_failure("failed", &e);
            assert!(!is_store_unavailable(&err), "{e}");
            assert_eq!(err.data, None);
        }
    }

    #[test]
    fn the_mark_needs_both_fields() {
        let data = |v: Value| ErrorData::new(ErrorCode::INTERNAL_ERROR, "x", Some(v));
        assert!(!is_store_unavailable(&data(
            serde_json::json!({ "retryable": true })
        )));
        assert!(!is_store_unavailable(&data(
            serde_json::json!({ "reason": STORE_UNAVAILABLE })
        )));
        assert!(!is_store_unavailable(&data(
            serde_json::json!({ "retryable": "yes", "reason": STORE_UNAVAILABLE })
        )));
        assert!(is_store_unavailable(&data(
            serde_json::json!({ "retryable": true, "reason": STORE_UNAVAILABLE, "more": 1 })
        )));
    }

    #[test]
    fn rejection_bodies_carry_the_id_when_known() {
        let r = Rejection::new(
            Reason::InvalidParams,
            Some(&RequestId::Number(7)),
            jsonrpc::invalid_params("Invalid params: x"),
        );
        let v: Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], -32602);
        let v: Value = serde_json::from_str(&Rejection::method_not_allowed().body()).unwrap();
        assert_eq!(v["error"]["code"], -32000);
        assert!(v.get("id").is_none() || v["id"].is_null());
    }
}
