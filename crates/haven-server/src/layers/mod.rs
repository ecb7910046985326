//! The HTTP-level checks in front of `/mcp`, run by [`Guard::admit`] in this order before the
//! handler reads the message, so that the handlers only read and dispatch:
//!
//! 0. [`admission`] shedding: while the node's work waits too long for its CPU, a share of
//!    requests is refused first of all (503 with `Retry-After`),
//! 1. [`rate::check_ip`]: the client address's request rate (429 with `Retry-After`), before
//!    authentication,
//! 2. [`host_origin`]: the headers that must be single and readable ([`single`]: no `Host`, two
//!    of a header Haven reads, or a value that is not visible ASCII, 400), then DNS-rebinding
//!    protection (403),
//! 3. [`authn`]: the bearer credential becomes the request's principal (401 with a challenge
//!    naming the protected resource metadata, 403 for a missing scope),
//! 4. [`content`]: `Content-Type` (415) and `Accept` (406),
//! 5. [`rate::check_principal`]: the principal's request rate (429 with `Retry-After`), after
//!    authentication (the per-tool rate is checked by the handler, [`rate::check_tool`]),
//! 6. [`admission`]: places per node and per session (503 or 429 with `Retry-After`), held
//!    until the response's body ends,
//! 7. [`body_limit`]: the body limit in force for this request (413), read at every request
//!    because it is a runtime setting.
//!
//! Each refusal is a JSON-RPC error body without an id: no message has been read yet. The
//! checks are one function rather than one tower layer each: a stack of `axum` middleware
//! clones the services below it and boxes a future per layer on every request, which cost a
//! node on the stateless era's path more than all the checks together (BENCHMARKS.md).

pub mod admission;
pub mod authn;
pub mod body_limit;
pub mod content;
pub mod host_origin;
pub mod rate;
pub mod single;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use haven_auth::Principal;
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

/// What the checks of `/mcp` need, shared with whoever changes the limits at runtime.
#[derive(Debug)]
pub(crate) struct Guard {
    /// Places per node and per session, and shedding.
    pub admission: Arc<admission::Admission>,
    /// Request rates per address, per principal and per tool.
    pub rate: Arc<crate::rate::RateLimiter>,
    /// Host names allowed in `Host` and `Origin`.
    pub hosts: host_origin::AllowedHosts,
    /// Authentication (`None`: off, every caller is anonymous).
    pub authentication: Option<Arc<authn::Authentication>>,
    /// The body limit and read deadline.
    pub body: body_limit::BodyLimit,
}

/// A request that passed every check.
pub(crate) struct Admitted {
    /// Method, URI and headers.
    pub parts: http::request::Parts,
    /// What the request's `Accept` allows: a legacy request is answered in a form it reads.
    pub accepts: content::Accepts,
    /// The caller.
    pub principal: Principal,
    /// The whole body, within the limit.
    pub body: Bytes,
    /// The request's place, to be held by its answer ([`admission::Place::hold`]).
    pub place: admission::Place,
}

impl Guard {
    /// Runs the checks on `req`, in the order of this module's list: the request admitted,
    /// or the answer refusing it.
    pub async fn admit(&self, mut req: Request) -> Result<Admitted, Response> {
        self.admission.shed().map_err(IntoResponse::into_response)?;
        if let Some(refused) = rate::check_ip(&self.rate, &req) {
            return Err(refused);
        }
        if let Err(refusal) = host_origin::check(&self.hosts, req.headers()) {
            tracing::debug!(%refusal, "request refused");
            return Err(refusal.into_response());
        }
        let principal = authn::principal(self.authentication.as_deref(), &mut req).await?;
        let accepts =
            content::check(req.method(), req.headers()).map_err(IntoResponse::into_response)?;
        if let Some(refused) = rate::check_principal(&self.rate, &principal) {
            return Err(refused);
        }
        let session = req
            .headers()
            .get(&crate::names::SESSION_ID)
            .and_then(|v| v.to_str().ok());
        let place = self
            .admission
            .admit(session)
            .await
            .map_err(IntoResponse::into_response)?;
        let (parts, body) = req.into_parts();
        let body = body_limit::take(&self.body, &parts.headers, body)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Admitted {
            parts,
            accepts,
            principal,
            body,
            place,
        })
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Requests for the checks, and what their answers say.

    use axum::body::Body;
    use axum::extract::Request;
    use axum::response::Response;
    use http::StatusCode;
    use http_body_util::BodyExt;

    /// Status and body text of `r`.
    pub async fn read_response(r: Response) -> (StatusCode, String) {
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

#[cfg(test)]
mod tests {
    use super::test_util::{read_response, request};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn guard(hosts: &[&str], body_bytes: usize) -> Guard {
        let names: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        Guard {
            admission: admission::Admission::new(Arc::default()),
            rate: Arc::default(),
            hosts: host_origin::AllowedHosts::new(&names),
            authentication: None,
            body: body_limit::BodyLimit {
                bytes: Arc::new(AtomicUsize::new(body_bytes)),
                limits: Arc::default(),
            },
        }
    }

    const JSON: (&str, &str) = ("content-type", "application/json");
    const HOST: (&str, &str) = ("host", "localhost:8080");

    async fn refused(g: &Guard, req: Request) -> (StatusCode, serde_json::Value) {
        let Err(r) = g.admit(req).await else {
            panic!("admitted")
        };
        let (status, body) = read_response(r).await;
        (
            status,
            serde_json::from_str(&body).expect("a JSON-RPC error"),
        )
    }

    #[tokio::test]
    async fn an_admitted_request_carries_what_the_checks_found() {
        let g = guard(&["localhost"], 100);
        let a = g
            .admit(request(
                "POST",
                &[HOST, JSON, ("accept", "text/event-stream")],
                "{}",
            ))
            .await
            .unwrap_or_else(|_| panic!("refused"));
        assert_eq!(
            a.accepts,
            content::Accepts {
                json: false,
                sse: true
            }
        );
        assert!(a.principal.is_anonymous());
        assert_eq!(&a.body[..], b"{}");
        assert_eq!(a.parts.method, http::Method::POST);
        // The place is taken until the answer's body is gone.
        assert_eq!(g.admission.load().0, 1);
        let answer = a.place.hold(Response::new(Body::from("answer")));
        assert_eq!(g.admission.load().0, 1);
        assert_eq!(read_response(answer).await.1, "answer");
        assert_eq!(g.admission.load().0, 0);
    }

    #[tokio::test]
    async fn each_check_refuses_with_its_status_in_order() {
        let g = guard(&["localhost"], 10);
        // Host first: a bad host is refused whatever else is wrong with the request.
        let (s, v) = refused(
            &g,
            request(
                "POST",
                &[("host", "evil.example.com"), ("content-type", "text/plain")],
                "x".repeat(100),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(
            v["error"]["message"],
            "Forbidden: Host evil.example.com is not allowed"
        );
        assert_eq!(v["error"]["code"], -32000);
        let (s, _) = refused(&g, request("POST", &[HOST, HOST, JSON], "{}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        // Then media types, before the body is read.
        let (s, v) = refused(
            &g,
            request(
                "POST",
                &[HOST, ("content-type", "text/plain")],
                "x".repeat(100),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(v["error"]["code"], -32600);
        let (s, _) = refused(
            &g,
            request("POST", &[HOST, JSON, ("accept", "text/html")], "{}"),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_ACCEPTABLE);
        let (s, _) = refused(
            &g,
            request("GET", &[HOST, ("accept", "application/json")], ""),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_ACCEPTABLE);
        // Then the body limit in force; a refused request holds no place.
        let (s, v) = refused(&g, request("POST", &[HOST, JSON], "x".repeat(11))).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            v["error"]["message"],
            "Payload Too Large: the request body exceeds 10 bytes"
        );
        assert_eq!(g.admission.load().0, 0);
        g.body.bytes.store(200, Ordering::Relaxed);
        assert!(
            g.admit(request("POST", &[HOST, JSON], "x".repeat(100)))
                .await
                .is_ok()
        );
    }
}
