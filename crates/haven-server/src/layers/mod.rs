//! The HTTP-level checks in front of `/mcp`, one tower layer (axum middleware) per concern,
//! applied before any handler runs, so that the handlers only read and dispatch:
//!
//! 0. [`admission::shed`]: while the node's work waits too long for its CPU, a share of
//!    requests is refused first of all (503 with `Retry-After`),
//! 1. [`rate::per_ip`]: the client address's request rate (429 with `Retry-After`), before
//!    authentication,
//! 2. [`host_origin`]: the headers that must be single and readable ([`single`]: no `Host`, two
//!    of a header Haven reads, or a value that is not visible ASCII, 400), then DNS-rebinding
//!    protection (403),
//! 3. [`authn`]: the bearer credential becomes the request's principal (401 with a challenge
//!    naming the protected resource metadata, 403 for a missing scope),
//! 4. [`content`]: `Content-Type` (415) and `Accept` (406),
//! 5. [`rate::per_principal`]: the principal's request rate (429 with `Retry-After`), after
//!    authentication (the per-tool rate is checked by the handler, [`rate::check_tool`]),
//! 6. [`admission`]: places per node and per session (503 or 429 with `Retry-After`),
//! 7. [`body_limit`]: the body limit in force for this request (413), read at every request
//!    because it is a runtime setting.
//!
//! Each refusal is a JSON-RPC error body without an id: no message has been read yet.

pub mod admission;
pub mod authn;
pub mod body_limit;
pub mod content;
pub mod host_origin;
pub mod rate;
pub mod single;

use axum::body::Body;
use axum::response::Response;
use haven_mcp::jsonrpc;
use haven_mcp::rmcp::model::{ErrorCode, ErrorData};
use http::{HeaderValue, StatusCode, header};

/// A refusal of the exchange: `status`, and a JSON-RPC error with `code` and `message`.
pub(crate) fn refusal(status: StatusCode, code: i32, message: &str) -> Response {
    let error = ErrorData::new(ErrorCode(code), message.to_owned(), None);
    let mut r = Response::new(Body::from(jsonrpc::error_response(None, &error)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Runs one layer in front of a handler that answers 200 with what it saw.

    use axum::Router;
    use axum::body::Body;
    use axum::extract::Request;
    use axum::response::Response;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// Status and body text of `req` sent through `router`.
    pub async fn send(router: Router, req: Request) -> (StatusCode, String) {
        let r: Response = router.oneshot(req).await.expect("infallible");
        let status = r.status();
        let body = r.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A request with `headers` and `body`.
    pub fn request(method: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request {
        let mut b = http::Request::builder().method(method).uri("/mcp");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(body.into()).expect("valid request")
    }
}
