//! Headers that must be single and readable. Haven decides what a request means from a few
//! headers: `Host` and `Origin` (DNS-rebinding protection), `Authorization`, and the MCP ones
//! (`Mcp-Session-Id`, `Mcp-Protocol-Version`, `Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`,
//! `Last-Event-ID`). When one of them comes twice, Haven would read the first while a proxy or
//! a framework in front of it may read the other; when a value is not visible ASCII it could
//! not be compared at all. Such a request is refused with 400 before anything reads it, as is a
//! request without `Host` (RFC 9112 §3.2: a server responds 400 to an HTTP/1.1 request that
//! lacks it; hyper passes such requests on, so Haven checks itself).

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, StatusCode, header};

/// Why a request's headers are refused (always 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request has no `Host` header.
    #[error("Bad Request: a request must carry a Host header")]
    NoHost,
    /// A header that must be single comes more than once.
    #[error("Bad Request: a request carries at most one {name} header, this one has {count}")]
    Duplicate {
        /// The header, as spelled in the specifications (e.g. `Mcp-Session-Id`).
        name: String,
        /// How many the request carries.
        count: usize,
    },
    /// A header's value holds bytes that are not visible ASCII (or is not UTF-8 at all).
    #[error(
        "Bad Request: the {name} header's value is not visible ASCII (an MCP header's value outside ASCII is sent as =?base64?...?=)"
    )]
    NotAscii {
        /// The header.
        name: String,
    },
}

impl Refusal {
    /// The HTTP status of the refusal: 400.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

/// The MCP headers that must be single (besides `Mcp-Param-*`), with their usual spelling.
const MCP_SINGLE: [(&str, &str); 4] = [
    ("mcp-session-id", "Mcp-Session-Id"),
    ("mcp-protocol-version", "Mcp-Protocol-Version"),
    ("mcp-method", "Mcp-Method"),
    ("mcp-name", "Mcp-Name"),
];

/// Checks that the headers named `name` (spelled `shown`) are at most one, and readable.
fn one(headers: &HeaderMap, name: &HeaderName, shown: impl Fn() -> String) -> Result<(), Refusal> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    let more = values.count();
    if more > 0 {
        return Err(Refusal::Duplicate {
            name: shown(),
            count: more + 1,
        });
    }
    if first.to_str().is_err() {
        return Err(Refusal::NotAscii { name: shown() });
    }
    Ok(())
}

/// The usual spelling of a header Haven reads (e.g. `Mcp-Session-Id`); `None` for any other.
fn spelling(name: &HeaderName) -> Option<Cow<'static, str>> {
    let fixed = |s: &'static str| Some(Cow::Borrowed(s));
    if *name == header::HOST {
        return fixed("Host");
    }
    if *name == header::ORIGIN {
        return fixed("Origin");
    }
    if *name == header::AUTHORIZATION {
        return fixed("Authorization");
    }
    if *name == crate::names::LAST_EVENT_ID {
        return fixed("Last-Event-ID");
    }
    let rest = name.as_str().strip_prefix("mcp-")?;
    if let Some(param) = rest.strip_prefix("param-") {
        return Some(Cow::Owned(format!("Mcp-Param-{param}")));
    }
    MCP_SINGLE
        .iter()
        .find(|(n, _)| *n == name.as_str())
        .and_then(|(_, shown)| fixed(shown))
}

/// Checks a request's headers: `Host` present, and each header Haven reads single and visible
/// ASCII.
pub fn check(headers: &HeaderMap) -> Result<(), Refusal> {
    if !headers.contains_key(header::HOST) {
        return Err(Refusal::NoHost);
    }
    // The usual request has no name twice (as many names as values): then only the values
    // are left to check, in one pass and without looking any name up.
    if headers.keys_len() == headers.len() {
        for (name, value) in headers {
            if value.to_str().is_err()
                && let Some(shown) = spelling(name)
            {
                return Err(Refusal::NotAscii {
                    name: shown.into_owned(),
                });
            }
        }
        return Ok(());
    }
    // Some name comes more than once: each distinct name Haven reads is checked on its own.
    for name in headers.keys() {
        if let Some(shown) = spelling(name) {
            one(headers, name, || shown.clone().into_owned())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_request_needs_a_host() {
        assert_eq!(check(&headers(&[])), Err(Refusal::NoHost));
        assert_eq!(
            check(&headers(&[("origin", b"http://localhost")])),
            Err(Refusal::NoHost)
        );
        assert_eq!(check(&headers(&[("host", b"localhost")])), Ok(()));
    }

    #[test]
    fn every_header_haven_reads_must_be_single() {
        for (name, shown) in [
            ("host", "Host"),
            ("origin", "Origin"),
            ("authorization", "Authorization"),
            ("mcp-session-id", "Mcp-Session-Id"),
            ("mcp-protocol-version", "Mcp-Protocol-Version"),
            ("mcp-method", "Mcp-Method"),
            ("mcp-name", "Mcp-Name"),
            ("mcp-param-region", "Mcp-Param-region"),
            ("last-event-id", "Last-Event-ID"),
        ] {
            let h = headers(&[("host", b"localhost"), (name, b"a"), (name, b"b")]);
            let count = if name == "host" { 3 } else { 2 };
            assert_eq!(
                check(&h),
                Err(Refusal::Duplicate {
                    name: shown.into(),
                    count
                }),
                "{name}"
            );
        }
        // Two different parameters, and headers Haven does not read, may come as they like.
        let h = headers(&[
            ("host", b"localhost"),
            ("mcp-param-a", b"1"),
            ("mcp-param-b", b"2"),
            ("accept", b"application/json"),
            ("accept", b"text/event-stream"),
            ("x-custom", b"\xff"),
        ]);
        assert_eq!(check(&h), Ok(()));
    }

    #[test]
    fn values_must_be_visible_ascii() {
        for name in [
            "host",
            "origin",
            "authorization",
            "mcp-session-id",
            "mcp-method",
            "mcp-name",
            "mcp-param-q",
            "mcp-protocol-version",
            "last-event-id",
        ] {
            for bad in [&b"caf\xc3\xa9"[..], b"\xff\xfe"] {
                let h = if name == "host" {
                    headers(&[("host", bad)])
                } else {
                    headers(&[("host", b"localhost"), (name, bad)])
                };
                assert!(
                    matches!(check(&h), Err(Refusal::NotAscii { .. })),
                    "{name} {bad:?}"
                );
                // The same when another header (one Haven does not read) comes twice.
                let mut h = h;
                h.append("accept", HeaderValue::from_static("text/event-stream"));
                h.append("accept", HeaderValue::from_static("application/json"));
                assert!(
                    matches!(check(&h), Err(Refusal::NotAscii { .. })),
                    "{name} {bad:?}, with a header twice"
                );
            }
        }
        let h = headers(&[("host", b"localhost"), ("mcp-name", b"\xff")]);
        assert_eq!(
            check(&h).unwrap_err().to_string(),
            "Bad Request: the Mcp-Name header's value is not visible ASCII (an MCP header's value outside ASCII is sent as =?base64?...?=)"
        );
    }
}
