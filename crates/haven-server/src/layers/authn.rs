//! Authentication of `/mcp` (the OAuth 2.1 resource server, MCP `basic/authorization`): the
//! request's bearer credential becomes a [`Principal`], which the handler passes to the
//! engine. Without a credential, or with one that is not valid, the
//! answer is `401` with `WWW-Authenticate: Bearer resource_metadata="…", scope="…"` (RFC 9728
//! §5.1) so that a client can find the authorization server; a valid token without a required
//! scope gets `403` with `error="insufficient_scope"`; when the issuer's keys cannot be
//! fetched, `503` with `Retry-After`. With authentication off every request is the anonymous
//! principal. The credential goes no further than this check: it is not handed on, the
//! engine never sees it, and upstream servers get their own configured credentials only.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use haven_auth::{AuthError, Authenticator, Principal};
use http::{HeaderValue, StatusCode, header};

/// Authentication of a listener.
pub struct Authentication {
    /// Checks credentials.
    pub authenticator: Arc<Authenticator>,
    /// This server's canonical resource URL (e.g. `https://mcp.example.com/mcp`).
    pub resource: String,
    /// Where refused credentials are recorded (`auth.failure`); requests that present none
    /// are not (every client's first request is one).
    pub audit: Option<haven_audit::Audit>,
}

impl std::fmt::Debug for Authentication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authentication")
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

impl Authentication {
    /// The URL of the protected resource metadata (RFC 9728 §3.1: the well-known path
    /// inserted between the host and the resource's path).
    pub fn metadata_url(&self) -> String {
        metadata_url(&self.resource)
    }

    /// The path of the metadata document on this server.
    pub fn metadata_path(&self) -> String {
        let path = url_path(&self.resource);
        format!("/.well-known/oauth-protected-resource{path}")
    }
}

fn url_path(resource: &str) -> &str {
    let after_scheme = resource.split_once("://").map_or(resource, |(_, r)| r);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.trim_end_matches('/')
}

/// The metadata URL of `resource` (RFC 9728 §3.1).
pub fn metadata_url(resource: &str) -> String {
    let (scheme, rest) = resource.split_once("://").unwrap_or(("https", resource));
    let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    format!(
        "{scheme}://{host}/.well-known/oauth-protected-resource{}",
        url_path(resource)
    )
}

/// The principal of `req`: its bearer credential checked by `auth`, or the answer refusing
/// it. `None` means authentication is off: every caller is anonymous, unless this process
/// already named the caller in the request's extensions (requests from the network cannot set
/// extensions).
pub(crate) async fn principal(
    auth: Option<&Authentication>,
    req: &mut Request,
) -> Result<Principal, Response> {
    match auth {
        None => Ok(req
            .extensions_mut()
            .remove::<Principal>()
            .unwrap_or_else(Principal::anonymous)),
        Some(a) => {
            // The single-header check already refused two Authorization headers or an
            // unreadable one.
            let value = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            a.authenticator
                .authenticate(value)
                .await
                .map_err(|e| refuse(a, &e))
        }
    }
}

fn refuse(a: &Authentication, e: &AuthError) -> Response {
    let (status, code) = match e {
        AuthError::Missing | AuthError::Invalid(_) => (StatusCode::UNAUTHORIZED, -32000),
        AuthError::InsufficientScope { .. } => (StatusCode::FORBIDDEN, -32000),
        AuthError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, -32000),
    };
    match e {
        AuthError::Missing => tracing::debug!("request without credentials refused"),
        _ => {
            tracing::info!(reason = %e, "request refused by authentication");
            if let Some(audit) = &a.audit {
                use haven_audit::{Actor, Event, Outcome, Target, actions};
                let outcome = match e {
                    AuthError::Unavailable(_) => {
                        Outcome::Error("the issuer's keys are unavailable")
                    }
                    AuthError::InsufficientScope { .. } => Outcome::Error("insufficient scope"),
                    _ => Outcome::Denied,
                };
                if let Some(m) = haven_telemetry::get() {
                    m.auth_failures.inc();
                }
                audit.record(Event::new(
                    Actor::Unauthenticated,
                    actions::AUTH_FAILURE,
                    Target::kind("mcp"),
                    outcome,
                ));
            }
        }
    }
    let mut r = super::refusal(status, code, &e.to_string());
    if let Ok(v) = HeaderValue::from_str(&a.authenticator.challenge(e, &a.metadata_url())) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    if matches!(e, AuthError::Unavailable(_)) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_urls_insert_the_well_known_path() {
        assert_eq!(
            metadata_url("https://mcp.example.com/mcp"),
            "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(
            metadata_url("http://127.0.0.1:8080/"),
            "http://127.0.0.1:8080/.well-known/oauth-protected-resource"
        );
        let a = Authentication {
            authenticator: Arc::new(Authenticator::new(None, None, vec![], vec![])),
            resource: "https://h.example/team/mcp".into(),
            audit: None,
        };
        assert_eq!(
            a.metadata_path(),
            "/.well-known/oauth-protected-resource/team/mcp"
        );
    }
}
