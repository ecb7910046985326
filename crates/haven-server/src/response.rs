//! The one place where the engine's protocol outcomes become HTTP: [`status`] maps every
//! [`Reply`] to its status, [`respond`] builds the response with the headers that go with it
//! (`Retry-After` on 503 and on a rate limit's 429, `Allow` on 405, `Mcp-Session-Id` on a new
//! session) and frames SSE.
//!
//! The engine classifies its answers where it builds them ([`Answer`], [`Reason`]); nothing
//! here reads a JSON body to find out what it says.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use haven_mcp::engine::{Answer, Reason, Reply, SseFrame};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

/// The protocol era a reply belongs to: some answers have era-specific statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Era {
    /// Sessions (2025-11-25 and earlier): a JSON-RPC error is a normal answer (200).
    Legacy,
    /// 2026-07-28: protocol-level errors carry their own statuses.
    Stateless,
}

/// The HTTP status of an engine reply in `era`.
pub fn status(era: Era, reply: &Reply) -> StatusCode {
    match reply {
        Reply::Accepted => StatusCode::ACCEPTED,
        Reply::Stream(_) | Reply::SessionEnded => StatusCode::OK,
        Reply::Json { answer, .. } => answer_status(era, *answer),
        Reply::Rejected(r) => match r.reason {
            Reason::Malformed
            | Reason::InvalidParams
            | Reason::HeaderMismatch
            | Reason::UnsupportedVersion
            | Reason::SessionRequired
            | Reason::BadLastEventId => StatusCode::BAD_REQUEST,
            Reason::SessionNotFound | Reason::MethodNotFound => StatusCode::NOT_FOUND,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Reason::NoResponse => StatusCode::INTERNAL_SERVER_ERROR,
            Reason::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        },
    }
}

/// The status of a final answer sent as one JSON body.
fn answer_status(era: Era, answer: Answer) -> StatusCode {
    match (era, answer) {
        (_, Answer::Result) => StatusCode::OK,
        // An outage is not the request's fault: say so, and when to come back, in both eras.
        (
            _,
            Answer::Error {
                store_unavailable: true,
                ..
            },
        ) => StatusCode::SERVICE_UNAVAILABLE,
        // The stateless era's HTTP binding gives protocol errors their own statuses.
        (Era::Stateless, Answer::Error { code, .. }) => match code {
            -32601 => StatusCode::NOT_FOUND,
            -32020 | -32021 | -32022 | -32700 | -32600 => StatusCode::BAD_REQUEST,
            _ => StatusCode::OK,
        },
        (Era::Legacy, Answer::Error { .. }) => StatusCode::OK,
    }
}

/// The HTTP response for an engine reply in `era`.
pub fn respond(era: Era, reply: Reply) -> Response {
    respond_in(era, reply, HeaderMap::new())
}

/// Like [`respond`], its headers written into `headers` (cleared first). `/mcp` passes the
/// request's own header map: the connection keeps a response's map for the next request's
/// headers, so a map already sized for a request is not grown again on every request.
pub fn respond_in(era: Era, reply: Reply, mut headers: HeaderMap) -> Response {
    headers.clear();
    let status = status(era, &reply);
    let retry_after = match &reply {
        Reply::Rejected(r) => match r.reason {
            Reason::RateLimited { retry_after_secs } => Some(retry_after_secs.max(1)),
            _ => None,
        },
        _ => None,
    };
    let h = &mut headers;
    let body = match reply {
        Reply::Accepted | Reply::SessionEnded => Body::empty(),
        Reply::Json { body, session, .. } => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(s) = session.and_then(|s| HeaderValue::from_str(&s).ok()) {
                h.insert(crate::names::SESSION_ID.clone(), s);
            }
            Body::from(body)
        }
        Reply::Rejected(rejection) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Body::from(rejection.body())
        }
        Reply::Stream(frames) => sse(frames, h),
    };
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // The store is unavailable (no quorum, full, I/O error): say when to retry.
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let Some(secs) = retry_after {
        // A rate limit: when the next request of the same kind will be let through.
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
    }
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

/// Counts an SSE stream as open (`haven_sse_streams_open`) from its response until its body is
/// dropped (finished, or its client gone).
struct OpenStream;

impl OpenStream {
    fn new() -> OpenStream {
        if let Some(m) = haven_telemetry::get() {
            m.sse_streams_open.inc();
        }
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(m) = haven_telemetry::get() {
            m.sse_streams_open.dec();
        }
    }
}

/// An SSE body, its headers added to `h`.
fn sse(frames: futures::stream::BoxStream<'static, SseFrame>, h: &mut HeaderMap) -> Body {
    let open = OpenStream::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Body::from_stream(frames.map(move |f| {
        let _ = &open;
        Ok::<_, std::convert::Infallible>(encode_frame(&f))
    }))
}

/// Encodes one SSE frame.
pub fn encode_frame(frame: &SseFrame) -> Bytes {
    match frame {
        SseFrame::Event { id, retry, data } => {
            let mut s = String::with_capacity(data.len() + 48);
            if let Some(id) = id {
                s.push_str("id: ");
                s.push_str(id);
                s.push('\n');
            }
            if let Some(r) = retry {
                s.push_str(&format!("retry: {r}\n"));
            }
            if id.is_none() && data.is_empty() {
                // Only a reconnection hint (a draining node asks the client to come back
                // elsewhere): no data line, so no event is dispatched.
                s.push('\n');
                return Bytes::from(s);
            }
            s.push_str("event: message\n");
            for line in data.split('\n') {
                s.push_str("data: ");
                s.push_str(line);
                s.push('\n');
            }
            s.push('\n');
            Bytes::from(s)
        }
        SseFrame::Comment(c) => Bytes::from(format!(": {c}\n\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_mcp::engine::Rejection;
    use haven_mcp::jsonrpc;
    use haven_mcp::rmcp::model::{ErrorCode, ErrorData, RequestId};

    fn answer(code: i32, store_unavailable: bool) -> Reply {
        Reply::Json {
            body: "{}".into(),
            answer: Answer::Error {
                code,
                store_unavailable,
            },
            session: None,
        }
    }

    fn rejected(reason: Reason) -> Reply {
        Reply::Rejected(Rejection::exchange(reason, -32000, "no"))
    }

    #[test]
    fn answers_in_the_stateless_era() {
        let s = |r: Reply| status(Era::Stateless, &r).as_u16();
        assert_eq!(
            s(Reply::Json {
                body: "{}".into(),
                answer: Answer::Result,
                session: None
            }),
            200
        );
        assert_eq!(s(answer(-32601, false)), 404);
        for code in [-32020, -32021, -32022, -32700, -32600] {
            assert_eq!(s(answer(code, false)), 400, "{code}");
        }
        for code in [-32602, -32603, -32002, -32050, -32800] {
            assert_eq!(s(answer(code, false)), 200, "{code}");
        }
        assert_eq!(s(answer(-32603, true)), 503);
    }

    #[test]
    fn answers_in_the_legacy_era() {
        let s = |r: Reply| status(Era::Legacy, &r).as_u16();
        for code in [-32601, -32600, -32602, -32603] {
            assert_eq!(s(answer(code, false)), 200, "{code}");
        }
        assert_eq!(s(answer(-32603, true)), 503);
    }

    #[test]
    fn rejections_in_either_era() {
        for era in [Era::Legacy, Era::Stateless] {
            let s = |r: Reason| status(era, &rejected(r)).as_u16();
            for r in [
                Reason::Malformed,
                Reason::InvalidParams,
                Reason::HeaderMismatch,
                Reason::UnsupportedVersion,
                Reason::SessionRequired,
                Reason::BadLastEventId,
            ] {
                assert_eq!(s(r), 400, "{r:?}");
            }
            assert_eq!(s(Reason::SessionNotFound), 404);
            assert_eq!(s(Reason::MethodNotFound), 404);
            assert_eq!(s(Reason::MethodNotAllowed), 405);
            assert_eq!(s(Reason::StoreUnavailable), 503);
            assert_eq!(s(Reason::NoResponse), 500);
            assert_eq!(
                s(Reason::RateLimited {
                    retry_after_secs: 3
                }),
                429
            );
            assert_eq!(status(era, &Reply::Accepted), StatusCode::ACCEPTED);
            assert_eq!(status(era, &Reply::SessionEnded), StatusCode::OK);
        }
    }

    #[test]
    fn outages_say_when_to_retry_and_405_says_what_is_allowed() {
        let error = ErrorData::new(ErrorCode::INTERNAL_ERROR, "down", None);
        let r = respond(
            Era::Stateless,
            Reply::Rejected(Rejection::new(
                Reason::StoreUnavailable,
                Some(&RequestId::Number(1)),
                error,
            )),
        );
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = respond(Era::Legacy, answer(-32603, true));
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = respond(Era::Legacy, answer(-32603, false));
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
        let r = respond(
            Era::Legacy,
            Reply::Rejected(Rejection::method_not_allowed()),
        );
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()[header::ALLOW], "GET, POST, DELETE");
        let r = respond(
            Era::Legacy,
            Reply::Json {
                body: jsonrpc::response(&RequestId::Number(0), &serde_json::json!({})),
                answer: Answer::Result,
                session: Some("s-1".into()),
            },
        );
        assert_eq!(r.headers()["mcp-session-id"], "s-1");
        let r = respond(Era::Legacy, Reply::SessionEnded);
        assert_eq!(r.status(), 200);
        assert!(r.headers().get(header::CONTENT_TYPE).is_none());
    }

    #[test]
    fn rate_limits_say_when_to_retry_in_whole_seconds() {
        for era in [Era::Legacy, Era::Stateless] {
            let r = respond(
                era,
                Reply::Rejected(Rejection::new(
                    Reason::RateLimited {
                        retry_after_secs: 3,
                    },
                    Some(&RequestId::Number(4)),
                    ErrorData::new(ErrorCode(-32000), "Too Many Requests", None),
                )),
            );
            assert_eq!(r.status(), 429);
            assert_eq!(r.headers()[header::RETRY_AFTER], "3");
            let r = respond(
                era,
                Reply::Rejected(Rejection::exchange(
                    Reason::RateLimited {
                        retry_after_secs: 0,
                    },
                    -32000,
                    "Too Many Requests",
                )),
            );
            assert_eq!(r.headers()[header::RETRY_AFTER], "1", "never 0");
        }
    }

    #[test]
    fn priming_frames_have_a_data_line() {
        let f = encode_frame(&SseFrame::Event {
            id: Some("s-0".into()),
            retry: Some(1000),
            data: String::new(),
        });
        assert_eq!(&f[..], b"id: s-0\nretry: 1000\nevent: message\ndata: \n\n");
    }
}
