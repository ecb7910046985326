//! The request body limit. The limit is a runtime setting (`limits.max_body_bytes`, applied by
//! the binary while serving), so it is read from the shared value at the start of every request
//! rather than fixed when the router is built. A declared `Content-Length` over the limit is
//! refused before anything is read; otherwise the body is read up to the limit and handed on
//! whole, so a handler never sees more than the limit allowed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

/// The largest body accepted, in bytes, and the deadline for reading it, shared with
/// whoever changes them at runtime.
#[derive(Clone, Debug)]
pub struct BodyLimit {
    /// The limit, as `HttpConfig::max_body_bytes` holds it.
    pub bytes: Arc<AtomicUsize>,
    /// The connection limits, whose body read deadline applies.
    pub limits: Arc<crate::conn::ConnLimits>,
}

impl BodyLimit {
    /// The limit in force now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Why a body is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The body (declared or read) is larger than the limit in force.
    #[error("Payload Too Large: the request body exceeds {0} bytes")]
    TooLarge(usize),
    /// The body could not be read (the connection failed mid-body).
    #[error("Parse error: the request body could not be read")]
    Unreadable,
    /// The body did not arrive within the read deadline.
    #[error("Request Timeout: the request body did not arrive within {0} ms")]
    TooSlow(u64),
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Unreadable => StatusCode::BAD_REQUEST,
            Refusal::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn code(&self) -> i32 {
        match self {
            Refusal::TooLarge(_) => -32600,
            Refusal::Unreadable => -32700,
            Refusal::TooSlow(_) => -32600,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        super::refusal(self.status(), self.code(), &self.to_string())
    }
}

/// Reads `body` whole if it stays within `limit` bytes.
pub async fn read(limit: usize, headers: &HeaderMap, body: Body) -> Result<Bytes, Refusal> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        && len > limit
    {
        return Err(Refusal::TooLarge(limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Refusal::TooLarge(limit))
        }
        Err(_) => Err(Refusal::Unreadable),
    }
}

/// The body of a request with `headers`, read whole within the limit in force and the body
/// read deadline, or why not.
pub async fn take(limit: &BodyLimit, headers: &HeaderMap, body: Body) -> Result<Bytes, Refusal> {
    let deadline = limit.limits.body_read_timeout();
    tokio::time::timeout(deadline, read(limit.bytes(), headers, body))
        .await
        .unwrap_or(Err(Refusal::TooSlow(deadline.as_millis() as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::test_util::{read_response, request};
    use axum::extract::Request;

    /// Status and body text of the answer to `req`: its body's length when taken, else the
    /// refusal.
    async fn send(limit: &BodyLimit, req: Request) -> (StatusCode, String) {
        let (parts, body) = req.into_parts();
        match take(limit, &parts.headers, body).await {
            Ok(b) => (StatusCode::OK, b.len().to_string()),
            Err(r) => read_response(r.into_response()).await,
        }
    }

    #[tokio::test]
    async fn the_limit_in_force_applies_to_the_next_request() {
        let limit = BodyLimit {
            bytes: Arc::new(AtomicUsize::new(10)),
            limits: Arc::default(),
        };
        let (s, body) = send(&limit, request("POST", &[], "x".repeat(11))).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], -32600);
        assert_eq!(
            v["error"]["message"],
            "Payload Too Large: the request body exceeds 10 bytes"
        );
        let (s, body) = send(&limit, request("POST", &[], "x".repeat(10))).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "10"));
        // The setting changes while serving: the next request follows it.
        limit.bytes.store(20, Ordering::Relaxed);
        let (s, body) = send(&limit, request("POST", &[], "x".repeat(11))).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "11"));
        limit.bytes.store(5, Ordering::Relaxed);
        let (s, _) = send(&limit, request("POST", &[], "x".repeat(11))).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn declared_and_streamed_lengths_both_count() {
        let limit = BodyLimit {
            bytes: Arc::new(AtomicUsize::new(10)),
            limits: Arc::default(),
        };
        // Declared too large: refused without reading.
        let (s, _) = send(
            &limit,
            request("POST", &[("content-length", "1000")], Body::empty()),
        )
        .await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        // No length declared (chunked): refused once the limit is passed.
        let chunks = futures::stream::iter(
            (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"xxxx"))),
        );
        let (s, _) = send(&limit, request("POST", &[], Body::from_stream(chunks))).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_body_that_fails_mid_way_is_a_parse_error() {
        let limit = BodyLimit {
            bytes: Arc::new(AtomicUsize::new(100)),
            limits: Arc::default(),
        };
        let chunks = futures::stream::iter([
            Ok(Bytes::from_static(b"{\"jsonrpc\"")),
            Err(std::io::Error::other("connection reset")),
        ]);
        let (s, body) = send(&limit, request("POST", &[], Body::from_stream(chunks))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], -32700);
    }
}
