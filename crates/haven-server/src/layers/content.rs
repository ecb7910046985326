//! Media types of `/mcp`. A POST carries one JSON-RPC message as `application/json` (else 415)
//! and must accept an answer as JSON or as an SSE stream (else 406); a GET opens an SSE stream,
//! so it must accept `text/event-stream` (else 406). What the client accepts is handed to the
//! handler as an [`Accepts`] extension: a legacy request is answered in a form it can read.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, header};

/// What a request's `Accept` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepts {
    /// `application/json`.
    pub json: bool,
    /// `text/event-stream`.
    pub sse: bool,
}

/// Why a request's media types are refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A POST body that is not `application/json` (the header's value, empty when absent).
    #[error("Unsupported Media Type: Content-Type must be application/json, got {0:?}")]
    ContentType(String),
    /// A POST whose `Accept` allows neither JSON nor SSE.
    #[error("Not Acceptable: Accept must allow application/json and text/event-stream")]
    PostAccept,
    /// A GET whose `Accept` does not allow SSE.
    #[error("Not Acceptable: GET /mcp needs Accept: text/event-stream")]
    GetAccept,
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::ContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::PostAccept | Refusal::GetAccept => StatusCode::NOT_ACCEPTABLE,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        super::refusal(self.status(), -32600, &self.to_string())
    }
}

/// What an `Accept` header allows; no (readable) header allows anything.
pub fn accepts(headers: &HeaderMap) -> Accepts {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Accepts {
            json: true,
            sse: true,
        };
    };
    // What MCP clients send (the specification asks for both): no parsing.
    if accept == "application/json, text/event-stream" {
        return Accepts {
            json: true,
            sse: true,
        };
    }
    let mut json = false;
    let mut sse = false;
    // On bytes: a readable value is visible ASCII, and this runs on every request.
    for part in accept.as_bytes().split(|b| *b == b',') {
        let media = media_type(part);
        let is = |m: &str| media.eq_ignore_ascii_case(m.as_bytes());
        if is("*/*") {
            return Accepts {
                json: true,
                sse: true,
            };
        } else if is("application/json") || is("application/*") {
            json = true;
        } else if is("text/event-stream") || is("text/*") {
            sse = true;
        }
    }
    Accepts { json, sse }
}

/// The media type of one element of a media-type list: up to its parameters, trimmed.
fn media_type(part: &[u8]) -> &[u8] {
    let end = part.iter().position(|b| *b == b';').unwrap_or(part.len());
    part[..end].trim_ascii()
}

/// Checks a request's media types for its method; returns what it accepts.
pub fn check(method: &Method, headers: &HeaderMap) -> Result<Accepts, Refusal> {
    let accepts = accepts(headers);
    if *method == Method::POST {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !media_type(content_type.as_bytes()).eq_ignore_ascii_case(b"application/json") {
            return Err(Refusal::ContentType(content_type.to_owned()));
        }
        if !accepts.json && !accepts.sse {
            return Err(Refusal::PostAccept);
        }
    } else if *method == Method::GET && !accepts.sse {
        return Err(Refusal::GetAccept);
    }
    Ok(accepts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn accept_values() {
        let a = |v: &str| accepts(&headers(&[("accept", v)]));
        let both = Accepts {
            json: true,
            sse: true,
        };
        assert_eq!(accepts(&HeaderMap::new()), both);
        assert_eq!(a("*/*"), both);
        assert_eq!(a("application/json, text/event-stream"), both);
        assert_eq!(
            a("application/json;q=0.9"),
            Accepts {
                json: true,
                sse: false
            }
        );
        assert_eq!(
            a("TEXT/*"),
            Accepts {
                json: false,
                sse: true
            }
        );
        assert_eq!(
            a("text/html"),
            Accepts {
                json: false,
                sse: false
            }
        );
    }

    #[test]
    fn posts_need_json_and_an_acceptable_answer() {
        let post = |h: &[(&str, &str)]| check(&Method::POST, &headers(h));
        assert!(post(&[JSON]).is_ok());
        assert!(post(&[("content-type", "Application/JSON; charset=utf-8")]).is_ok());
        assert_eq!(
            post(&[("content-type", "text/plain")]),
            Err(Refusal::ContentType("text/plain".into()))
        );
        assert_eq!(post(&[]), Err(Refusal::ContentType(String::new())));
        assert_eq!(
            post(&[JSON, ("accept", "text/html")]),
            Err(Refusal::PostAccept)
        );
        assert_eq!(
            post(&[JSON, ("accept", "application/json")]),
            Ok(Accepts {
                json: true,
                sse: false
            })
        );
    }

    #[test]
    fn gets_need_sse_and_deletes_need_nothing() {
        assert_eq!(
            check(&Method::GET, &headers(&[("accept", "application/json")])),
            Err(Refusal::GetAccept)
        );
        assert!(check(&Method::GET, &headers(&[("accept", "text/event-stream")])).is_ok());
        assert!(check(&Method::DELETE, &headers(&[("accept", "text/html")])).is_ok());
    }
}
