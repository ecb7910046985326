//! DNS-rebinding protection. A web page on another site can make a browser send requests to a
//! server on the user's machine under a name the attacker controls; the browser then sends that
//! name in `Host` and the page's site in `Origin`. So `Host` and, when present, `Origin` must
//! name an allowed host (`--allowed-hosts`), else 403. Before that, the headers that must be
//! single are checked ([`super::single`]): a request without `Host`, with two `Host` or two
//! `Origin` headers (checking one of them while a proxy or a framework reads the other would
//! defeat the check), or with a value that is not visible ASCII is refused outright (400).
//! The admin API applies the same [`check`].

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

/// Host names (without port) allowed in `Host` and `Origin`.
#[derive(Clone, Debug)]
pub struct AllowedHosts {
    any: bool,
    names: Arc<[String]>,
}

impl AllowedHosts {
    /// The allowed names; `*` among them allows any host.
    pub fn new(names: &[String]) -> AllowedHosts {
        AllowedHosts {
            any: names.iter().any(|n| n == "*"),
            names: names.into(),
        }
    }

    fn allows(&self, host: &str) -> bool {
        let name = host_name(host);
        self.any || self.names.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
}

/// Why a request's `Host` or `Origin` is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `Host` names a host that is not allowed (or cannot be read).
    #[error("Forbidden: Host {0} is not allowed")]
    Host(String),
    /// `Origin` names a host that is not allowed (or is not a URL with a host, like `null`).
    #[error("Forbidden: Origin {0} is not allowed")]
    Origin(String),
    /// A header that must be single and readable is not, or `Host` is missing (400).
    #[error(transparent)]
    Headers(#[from] super::single::Refusal),
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Host(_) | Refusal::Origin(_) => StatusCode::FORBIDDEN,
            Refusal::Headers(r) => r.status(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        super::refusal(self.status(), -32000, &self.to_string())
    }
}

/// Strips the port from a `Host` header value (handles `[::1]:8080`).
pub fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 2]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A header value as text; bytes that are not visible ASCII are shown replaced, and never
/// match an allowed name.
fn text(v: &HeaderValue) -> Result<&str, String> {
    v.to_str()
        .map_err(|_| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Checks the headers that must be single, then `Host` and `Origin` of a request against
/// `allowed`.
pub fn check(allowed: &AllowedHosts, headers: &HeaderMap) -> Result<(), Refusal> {
    super::single::check(headers)?;
    if allowed.any {
        return Ok(());
    }
    if let Some(host) = headers.get(header::HOST) {
        match text(host) {
            Ok(h) if allowed.allows(h) => {}
            Ok(h) => return Err(Refusal::Host(h.to_owned())),
            Err(shown) => return Err(Refusal::Host(shown)),
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = text(origin).map_err(Refusal::Origin)?;
        let host = origin
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
        if !host.is_some_and(|h| allowed.allows(h)) {
            return Err(Refusal::Origin(origin.to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(names: &[&str]) -> AllowedHosts {
        AllowedHosts::new(&names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn host_names() {
        assert_eq!(host_name("localhost:8080"), "localhost");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("example.com"), "example.com");
    }

    #[test]
    fn hosts_and_origins_must_be_allowed() {
        let a = allowed(&["localhost", "127.0.0.1", "[::1]"]);
        assert_eq!(check(&a, &headers(&[("host", "localhost:8080")])), Ok(()));
        assert_eq!(check(&a, &headers(&[("host", "LOCALHOST")])), Ok(()));
        assert_eq!(check(&a, &headers(&[("host", "[::1]:9")])), Ok(()));
        assert!(
            matches!(
                check(&a, &headers(&[])),
                Err(Refusal::Headers(super::super::single::Refusal::NoHost))
            ),
            "no Host"
        );
        assert_eq!(
            check(&a, &headers(&[("host", "evil.example.com")])),
            Err(Refusal::Host("evil.example.com".into()))
        );
        assert_eq!(
            check(
                &a,
                &headers(&[("host", "localhost"), ("origin", "http://localhost:3000")])
            ),
            Ok(())
        );
        for origin in ["http://evil.example.com", "null", "localhost"] {
            assert_eq!(
                check(&a, &headers(&[("host", "localhost"), ("origin", origin)])),
                Err(Refusal::Origin(origin.into())),
                "{origin}"
            );
        }
    }

    #[test]
    fn unreadable_hosts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_bytes(b"local\xffhost").unwrap(),
        );
        assert!(matches!(
            check(&allowed(&["localhost"]), &h),
            Err(Refusal::Headers(
                super::super::single::Refusal::NotAscii { .. }
            ))
        ));
    }

    #[test]
    fn duplicates_are_refused_even_when_any_host_is_allowed() {
        for a in [allowed(&["localhost"]), allowed(&["*"])] {
            assert_eq!(
                check(
                    &a,
                    &headers(&[("host", "localhost"), ("host", "evil.example.com")])
                ),
                Err(Refusal::Headers(super::super::single::Refusal::Duplicate {
                    name: "Host".into(),
                    count: 2
                }))
            );
            assert_eq!(
                check(
                    &a,
                    &headers(&[
                        ("host", "localhost"),
                        ("origin", "http://localhost"),
                        ("origin", "http://evil.example.com"),
                    ])
                ),
                Err(Refusal::Headers(super::super::single::Refusal::Duplicate {
                    name: "Origin".into(),
                    count: 2
                }))
            );
        }
        assert_eq!(
            check(&allowed(&["*"]), &headers(&[("host", "anything.example")])),
            Ok(())
        );
    }
}
