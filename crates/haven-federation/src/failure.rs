//! What a client learns of an upstream's failure (a short message and `data: {upstream,
//! reason}`, plus `status` for HTTP statuses), and what operators learn (the details, through
//! [`haven_control::redact::redact`], in the log and the admin API's upstream status).

use std::error::Error;

use haven_control::redact::{Secrets, redact};
use rmcp::model::{ErrorCode, ErrorData};
use rmcp::service::{ClientInitializeError, ServiceError};
use rmcp::transport::streamable_http_client::StreamableHttpError;
use serde::Serialize;
use serde_json::json;

use crate::{UPSTREAM_BAD_RESPONSE, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE};

/// Why a request to an upstream failed: `data.reason` of the JSON-RPC error a client gets.
/// The codes are stable (documented in the README).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Registered, but this node has not picked it up yet (or it was just removed or changed).
    NotConnected,
    /// Registered but disabled.
    Disabled,
    /// It cannot be reached: connection refused, name not resolved, TLS failure, the process
    /// could not be started or exited, the MCP session could not be (re)opened.
    Unreachable,
    /// The connection ended after the request was sent and before it was answered.
    ConnectionLost,
    /// No answer within the call's timeout (or no connection within it).
    Timeout,
    /// Its circuit breaker refuses calls after consecutive failures.
    CircuitOpen,
    /// It refused Haven's credentials: HTTP 401 or 403 (`status`).
    AuthRejected,
    /// It answered with another HTTP error status (`status`): 429, 5xx, or a 4xx.
    HttpStatus,
    /// It answered, but not with a valid MCP message or result.
    Protocol,
    /// Its registry entry cannot be used on this node (a secret it references is missing, a
    /// header value is invalid, its working directory does not exist).
    Misconfigured,
}

impl Reason {
    /// The code clients see in `data.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotConnected => "not_connected",
            Reason::Disabled => "disabled",
            Reason::Unreachable => "unreachable",
            Reason::ConnectionLost => "connection_lost",
            Reason::Timeout => "timeout",
            Reason::CircuitOpen => "circuit_open",
            Reason::AuthRejected => "auth_rejected",
            Reason::HttpStatus => "http_status",
            Reason::Protocol => "protocol",
            Reason::Misconfigured => "misconfigured",
        }
    }

    /// The JSON-RPC error code of a failure for this reason (and HTTP status).
    fn code(self, status: Option<u16>) -> i32 {
        match self {
            Reason::Timeout => UPSTREAM_TIMEOUT,
            Reason::Protocol => UPSTREAM_BAD_RESPONSE,
            // 429 and 5xx say "not now"; another 4xx is an answer Haven cannot use.
            Reason::HttpStatus if status.is_some_and(|s| s != 429 && s < 500) => {
                UPSTREAM_BAD_RESPONSE
            }
            _ => UPSTREAM_UNAVAILABLE,
        }
    }
}

/// A failure: its reason, an HTTP status if one was answered, and the details for operators
/// (not yet redacted: [`Failure::detail_for`] redacts them).
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub reason: Reason,
    pub status: Option<u16>,
    pub detail: String,
}

impl Failure {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Failure {
        Failure {
            reason,
            status: None,
            detail: detail.into(),
        }
    }

    /// A failure classified from an error (and its sources), with `context` before the text
    /// of its most specific error (rmcp's wrappers only add Rust type names) and the HTTP
    /// status when the text does not say it.
    pub fn from_error(context: &str, e: &(dyn Error + 'static)) -> Failure {
        let (reason, status, specific) = classify_chain(e);
        let mut detail = format!("{context}: {}", readable(&chain_text(specific)));
        if let Some(s) = status
            && !detail.contains(&format!("HTTP {s}"))
        {
            detail.push_str(&format!(" (HTTP {s})"));
        }
        Failure {
            reason,
            status,
            detail,
        }
    }

    /// The details as operators see them (log, admin API): redacted.
    pub fn detail_for(&self, secrets: &Secrets) -> String {
        redact(&self.detail, secrets)
    }

    /// What a client gets: a short message that holds nothing the upstream said and no
    /// configuration (no URL, header, secret, or error text of a library), and
    /// `data: {upstream, reason}` (plus `status` when an HTTP status was answered).
    pub fn to_client(&self, upstream: &str, what: &str) -> ErrorData {
        let message = match (self.reason, self.status) {
            (Reason::NotConnected, _) => {
                format!(
                    "upstream '{upstream}' is not connected on this node yet; try again shortly"
                )
            }
            (Reason::Disabled, _) => format!("upstream '{upstream}' is disabled"),
            (Reason::Unreachable, _) => format!("upstream '{upstream}' cannot be reached"),
            (Reason::ConnectionLost, _) => {
                format!("upstream '{upstream}' closed the connection before it answered {what}")
            }
            (Reason::Timeout, _) => format!("upstream '{upstream}' did not answer {what} in time"),
            (Reason::CircuitOpen, _) => format!("upstream '{upstream}' is failing"),
            (Reason::AuthRejected, Some(s)) => {
                format!("upstream '{upstream}' refused Haven's credentials (HTTP {s})")
            }
            (Reason::AuthRejected, None) => {
                format!("upstream '{upstream}' refused Haven's credentials")
            }
            (Reason::HttpStatus, Some(s)) => {
                format!("upstream '{upstream}' answered {what} with HTTP status {s}")
            }
            (Reason::HttpStatus, None) => {
                format!("upstream '{upstream}' answered {what} with an HTTP error")
            }
            (Reason::Protocol, _) => {
                format!("upstream '{upstream}' answered {what} with an invalid response")
            }
            (Reason::Misconfigured, _) => {
                format!("upstream '{upstream}' is misconfigured on this node")
            }
        };
        client_error(upstream, self.reason, self.status, message)
    }
}

/// A client's JSON-RPC error for `reason` with `message` (which must hold nothing but what
/// Haven itself decides: names, methods, numbers).
pub(crate) fn client_error(
    upstream: &str,
    reason: Reason,
    status: Option<u16>,
    message: String,
) -> ErrorData {
    let mut data = json!({ "upstream": upstream, "reason": reason.as_str() });
    if let Some(s) = status {
        data["status"] = json!(s);
    }
    ErrorData::new(ErrorCode(reason.code(status)), message, Some(data))
}

/// An error text as people read it: rmcp's Rust type names (`[rmcp::transport::…<…>]`) left
/// out, and the wrappers that only say which layer passed the error on ("Send message error",
/// "Transport … error:", "Client error:") dropped, so that the cause chain remains, e.g.
/// "error sending request for url (…): connection refused".
pub(crate) fn readable(text: &str) -> String {
    // Bracketed Rust paths, brackets nested or not.
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in rest[open..].char_indices() {
            match c {
                '[' => depth += 1,
                ']' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(open + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        let inside = &rest[open + 1..end];
        out.push_str(&rest[..open]);
        // A Rust path has `::` and no space; anything else in brackets is kept.
        let type_name = inside.contains("::") && !inside.contains(' ');
        if !type_name {
            out.push_str(&rest[open..=end]);
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    let mut text = out.split_whitespace().collect::<Vec<_>>().join(" ");
    for wrapper in [
        "Send message error ",
        "Transport error: ",
        "Transport error ",
        "Client error: ",
    ] {
        while let Some(at) = text.find(wrapper) {
            text.replace_range(at..at + wrapper.len(), "");
        }
    }
    text
}

/// The error's text with its sources' (each once: a source whose text its parent already
/// shows is left out).
pub(crate) fn chain_text(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

/// The reason (and HTTP status) of an error from rmcp's client, from the most specific error
/// in its chain, and that error.
fn classify_chain<'a>(
    e: &'a (dyn Error + 'static),
) -> (Reason, Option<u16>, &'a (dyn Error + 'static)) {
    let (reason, status) = classify_in(e);
    let mut specific = e;
    let mut source: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<StreamableHttpError<reqwest::Error>>() || err.is::<reqwest::Error>() {
            specific = err;
            break;
        }
        source = err.source();
    }
    (reason, status, specific)
}

fn classify_in(e: &(dyn Error + 'static)) -> (Reason, Option<u16>) {
    // rmcp's transport worker ends a connection with its error only as text (the context of
    // `WorkerQuitReason::Fatal`): read what it says when no typed error does.
    let typed = classify_typed(e);
    if typed.0 == Reason::Unreachable
        && typed.1.is_none()
        && let Some(said) = classify_text(&chain_text(e))
    {
        return said;
    }
    typed
}

/// What rmcp's text of an HTTP failure says: the status of "HTTP 401 …", of an
/// `HttpStatusError { status: 503, … }`, or an `AuthRequired`/`InsufficientScope`.
fn classify_text(text: &str) -> Option<(Reason, Option<u16>)> {
    let status = text
        .match_indices("HTTP ")
        .find_map(|(i, _)| status_of(&text[i..]))
        .or_else(|| {
            let at = text.find("HttpStatusError { status: ")?;
            let rest = &text[at + "HttpStatusError { status: ".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        });
    match status {
        Some(s @ (401 | 403)) => Some((Reason::AuthRejected, Some(s))),
        Some(s) => Some((Reason::HttpStatus, Some(s))),
        None if text.contains("AuthRequired") => Some((Reason::AuthRejected, Some(401))),
        None if text.contains("InsufficientScope") => Some((Reason::AuthRejected, Some(403))),
        None => None,
    }
}

fn classify_typed(e: &(dyn Error + 'static)) -> (Reason, Option<u16>) {
    let mut fallback = (Reason::Unreachable, None);
    let mut source: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            return classify_http(http);
        }
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            return classify_reqwest(r);
        }
        if let Some(init) = err.downcast_ref::<ClientInitializeError>() {
            match init {
                ClientInitializeError::ConnectionClosed(_) => {
                    fallback = (Reason::Unreachable, None);
                }
                ClientInitializeError::TransportError { .. } => {}
                // Anything else is a handshake the upstream answered wrongly.
                _ => fallback = (Reason::Protocol, None),
            }
        }
        if let Some(svc) = err.downcast_ref::<ServiceError>() {
            match svc {
                ServiceError::McpError(_) | ServiceError::UnexpectedResponse => {
                    fallback = (Reason::Protocol, None);
                }
                ServiceError::TransportClosed => fallback = (Reason::ConnectionLost, None),
                ServiceError::Timeout { .. } => fallback = (Reason::Timeout, None),
                _ => {}
            }
        }
        if err.downcast_ref::<serde_json::Error>().is_some() {
            return (Reason::Protocol, None);
        }
        source = err.source();
    }
    fallback
}

fn classify_http(e: &StreamableHttpError<reqwest::Error>) -> (Reason, Option<u16>) {
    // hyper's failures on a forwarded call's POST, read as reqwest's are below.
    if let Some(f) = crate::http::PostFailure::of(e) {
        return match f {
            _ if f.is_timeout() => (Reason::Timeout, None),
            crate::http::PostFailure::Body(_) => (Reason::ConnectionLost, None),
            crate::http::PostFailure::Send(_) => (Reason::Unreachable, None),
        };
    }
    match e {
        StreamableHttpError::Client(r) => classify_reqwest(r),
        StreamableHttpError::HttpStatus(s) => (Reason::HttpStatus, Some(s.status)),
        StreamableHttpError::AuthRequired(_) => (Reason::AuthRejected, Some(401)),
        StreamableHttpError::InsufficientScope(_) => (Reason::AuthRejected, Some(403)),
        StreamableHttpError::UnexpectedServerResponse(text) => match status_of(text) {
            Some(s @ (401 | 403)) => (Reason::AuthRejected, Some(s)),
            Some(s) => (Reason::HttpStatus, Some(s)),
            None => (Reason::Protocol, None),
        },
        StreamableHttpError::Io(_)
        | StreamableHttpError::SessionExpired
        | StreamableHttpError::ReinitializationFailed(_)
        | StreamableHttpError::SessionRecoveryTimeout
        | StreamableHttpError::ControlRequestTimeout => (Reason::Unreachable, None),
        StreamableHttpError::TransportChannelClosed
        | StreamableHttpError::UnexpectedEndOfStream => (Reason::ConnectionLost, None),
        StreamableHttpError::ReservedHeaderConflict(_) => (Reason::Misconfigured, None),
        _ => (Reason::Protocol, None),
    }
}

fn classify_reqwest(e: &reqwest::Error) -> (Reason, Option<u16>) {
    if let Some(s) = e.status() {
        let s = s.as_u16();
        return match s {
            401 | 403 => (Reason::AuthRejected, Some(s)),
            _ => (Reason::HttpStatus, Some(s)),
        };
    }
    if e.is_timeout() {
        return (Reason::Timeout, None);
    }
    if e.is_decode() {
        return (Reason::Protocol, None);
    }
    if e.is_body() {
        return (Reason::ConnectionLost, None);
    }
    (Reason::Unreachable, None)
}

/// The status of rmcp's "HTTP 401 Unauthorized: …" description of an unusable answer.
fn status_of(text: &str) -> Option<u16> {
    let rest = text.strip_prefix("HTTP ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (digits.len() == 3).then(|| digits.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_type_names_and_wrappers_are_left_out_of_the_text() {
        let said = "Send message error Transport [rmcp::transport::worker::WorkerTransport<rmcp::transport::streamable_http_client::StreamableHttpClientWorker<reqwest::async_impl::client::Client>>] error: Client error: error sending request for url (https://mcp.example.com/mcp), when send initialize request";
        assert_eq!(
            readable(said),
            "error sending request for url (https://mcp.example.com/mcp), when send initialize request"
        );
        // The cause chain stays; brackets that are not type names stay.
        assert_eq!(
            readable(
                "error sending request for url (http://h/mcp): client error (Connect): tcp connect error: Connection refused (os error 111)"
            ),
            "error sending request for url (http://h/mcp): client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
        assert_eq!(readable("bad header [x-api-key]"), "bad header [x-api-key]");
        assert_eq!(readable("unclosed [rmcp::a<b"), "unclosed [rmcp::a<b");
    }

    #[test]
    fn rmcps_worker_text_is_classified() {
        let quit = r#"Transport fatal Transport channel closed, when UnexpectedServerResponse("HTTP 401 Unauthorized: body")"#;
        assert_eq!(classify_text(quit), Some((Reason::AuthRejected, Some(401))));
        assert_eq!(
            classify_text("when HttpStatus(HttpStatusError { status: 503, retry_after: None })"),
            Some((Reason::HttpStatus, Some(503)))
        );
        assert_eq!(
            classify_text("when AuthRequired(AuthRequiredError { .. })"),
            Some((Reason::AuthRejected, Some(401)))
        );
        assert_eq!(classify_text("connection refused"), None);
    }

    #[test]
    fn statuses_are_read_from_rmcps_descriptions() {
        assert_eq!(status_of("HTTP 401 Unauthorized: {\"a\":1}"), Some(401));
        assert_eq!(status_of("HTTP 418: x"), Some(418));
        assert_eq!(status_of("could not parse JSON response"), None);
        assert_eq!(status_of("HTTP 40"), None);
    }

    #[test]
    fn client_errors_carry_no_details() {
        let f = Failure {
            reason: Reason::AuthRejected,
            status: Some(401),
            detail:
                "HTTP 401 Unauthorized: authorization: Bearer s3cr3t-value at https://h/mcp?key=q"
                    .into(),
        };
        let e = f.to_client("web", "tools/call");
        let text = serde_json::to_string(&e).unwrap();
        assert!(
            !text.contains("s3cr3t") && !text.contains("key=q"),
            "{text}"
        );
        assert_eq!(
            e.data,
            Some(json!({"upstream": "web", "reason": "auth_rejected", "status": 401}))
        );
        assert_eq!(e.code.0, UPSTREAM_UNAVAILABLE);
        let mut secrets = Secrets::new();
        secrets.add("s3cr3t-value");
        let d = f.detail_for(&secrets);
        assert!(
            d.contains("HTTP 401") && !d.contains("s3cr3t") && !d.contains("key=q"),
            "{d}"
        );
    }

    #[test]
    fn codes_follow_the_reason() {
        assert_eq!(Reason::Timeout.code(None), UPSTREAM_TIMEOUT);
        assert_eq!(Reason::Protocol.code(None), UPSTREAM_BAD_RESPONSE);
        assert_eq!(Reason::HttpStatus.code(Some(404)), UPSTREAM_BAD_RESPONSE);
        assert_eq!(Reason::HttpStatus.code(Some(429)), UPSTREAM_UNAVAILABLE);
        assert_eq!(Reason::HttpStatus.code(Some(502)), UPSTREAM_UNAVAILABLE);
        assert_eq!(Reason::CircuitOpen.code(None), UPSTREAM_UNAVAILABLE);
    }
}
