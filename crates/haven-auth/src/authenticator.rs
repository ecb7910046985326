//! One way to turn a request's `Authorization` header into a [`Principal`]: an OAuth access
//! token (validated by [`TokenValidator`]) or an API key, then the scopes every request needs.
//! The HTTP layer maps the outcome to `401`/`403` challenges; this module knows no HTTP.

use std::sync::Arc;

use crate::oauth::{TokenError, TokenValidator};
use crate::principal::Principal;

/// Why a request was not authenticated.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No credential was presented (401 with a challenge, no error code).
    #[error("authentication is required: present an access token (Authorization: Bearer …)")]
    Missing,
    /// The credential is not valid (401 `invalid_token`). The text says why, never the
    /// credential.
    #[error("{0}")]
    Invalid(String),
    /// Valid, but without a scope this server requires (403 `insufficient_scope`).
    #[error("the token lacks the scope(s) {}", .required.join(" "))]
    InsufficientScope {
        /// Every scope required.
        required: Vec<String>,
    },
    /// Credentials cannot be checked now (the issuer's keys are unreachable): 503.
    #[error("{0}")]
    Unavailable(String),
}

/// Checks the API keys presented as bearer credentials. Implemented by the API-key store.
#[async_trait::async_trait]
pub trait KeyVerifier: Send + Sync {
    /// Whether `credential` has the form of an API key (so that it is not tried as a JWT).
    fn recognises(&self, credential: &str) -> bool;
    /// The key's principal, or why it is refused.
    async fn verify_key(&self, credential: &str) -> Result<Principal, AuthError>;
}

/// Authentication of `/mcp` requests.
pub struct Authenticator {
    oauth: Option<Arc<TokenValidator>>,
    keys: Option<Arc<dyn KeyVerifier>>,
    required_scopes: Vec<String>,
    scopes_supported: Vec<String>,
}

impl Authenticator {
    /// An authenticator accepting tokens of `oauth` (if any) and API keys of `keys` (if any);
    /// every request needs all of `required_scopes`.
    pub fn new(
        oauth: Option<Arc<TokenValidator>>,
        keys: Option<Arc<dyn KeyVerifier>>,
        required_scopes: Vec<String>,
        scopes_supported: Vec<String>,
    ) -> Authenticator {
        let mut supported = scopes_supported;
        for s in &required_scopes {
            if !supported.contains(s) {
                supported.push(s.clone());
            }
        }
        Authenticator {
            oauth,
            keys,
            required_scopes,
            scopes_supported: supported,
        }
    }

    /// The token validator, when tokens are accepted.
    pub fn oauth(&self) -> Option<&Arc<TokenValidator>> {
        self.oauth.as_ref()
    }

    /// The scopes every request needs.
    pub fn required_scopes(&self) -> &[String] {
        &self.required_scopes
    }

    /// Authenticates the value of an `Authorization` header (`None`: there was none) and
    /// checks the scopes every request needs.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let principal = self.identify(authorization).await?;
        let missing: Vec<&String> = self
            .required_scopes
            .iter()
            .filter(|s| !principal.has_scope(s))
            .collect();
        if !missing.is_empty() {
            return Err(AuthError::InsufficientScope {
                required: self.required_scopes.clone(),
            });
        }
        Ok(principal)
    }

    /// Who an `Authorization` header value names, without the scope check of
    /// [`authenticate`](Self::authenticate) (the admin API checks roles instead).
    pub async fn identify(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let Some(value) = authorization else {
            return Err(AuthError::Missing);
        };
        let credential = bearer(value).ok_or_else(|| {
            AuthError::Invalid("the Authorization header must use the Bearer scheme".into())
        })?;
        let principal = match &self.keys {
            Some(k) if k.recognises(credential) => k.verify_key(credential).await?,
            _ => match &self.oauth {
                Some(v) => v.validate(credential).await.map_err(|e| match e {
                    TokenError::Invalid(m) => AuthError::Invalid(m),
                    TokenError::KeysUnavailable(_) => AuthError::Unavailable(e.to_string()),
                })?,
                None => {
                    return Err(AuthError::Invalid(
                        "the credential is not an API key, and no token issuer is configured"
                            .into(),
                    ));
                }
            },
        };
        Ok(principal)
    }

    /// The RFC 9728 protected resource metadata of `resource`.
    pub fn resource_metadata(&self, resource: &str) -> serde_json::Value {
        let mut m = serde_json::json!({
            "resource": resource,
            "bearer_methods_supported": ["header"],
            "resource_name": "Haven",
        });
        if let Some(v) = &self.oauth {
            m["authorization_servers"] = serde_json::json!([v.settings().issuer]);
        }
        if !self.scopes_supported.is_empty() {
            m["scopes_supported"] = serde_json::json!(self.scopes_supported);
        }
        m
    }

    /// The `WWW-Authenticate` value for a refusal (RFC 6750 §3, RFC 9728 §5.1).
    pub fn challenge(&self, error: &AuthError, metadata_url: &str) -> String {
        let mut parts = vec![format!("resource_metadata=\"{}\"", quote(metadata_url))];
        let scope = match error {
            AuthError::InsufficientScope { required } => required.join(" "),
            _ => self.required_scopes.join(" "),
        };
        if !scope.is_empty() {
            parts.push(format!("scope=\"{}\"", quote(&scope)));
        }
        match error {
            AuthError::Missing | AuthError::Unavailable(_) => {}
            AuthError::Invalid(m) => {
                parts.push("error=\"invalid_token\"".into());
                parts.push(format!("error_description=\"{}\"", quote(m)));
            }
            AuthError::InsufficientScope { .. } => {
                parts.push("error=\"insufficient_scope\"".into());
            }
        }
        format!("Bearer {}", parts.join(", "))
    }
}

/// The credential of a `Bearer` Authorization value (the scheme is case-insensitive).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let t = rest.trim();
    (!t.is_empty()).then_some(t)
}

/// A value fit for a quoted-string: no quotes, backslashes or control characters, ASCII only.
fn quote(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() || !c.is_ascii() {
                '\''
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bEaReR  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn challenges_name_metadata_scope_and_error() {
        let a = Authenticator::new(None, None, vec!["mcp".into()], vec![]);
        assert_eq!(
            a.challenge(
                &AuthError::Missing,
                "https://h/.well-known/oauth-protected-resource/mcp"
            ),
            "Bearer resource_metadata=\"https://h/.well-known/oauth-protected-resource/mcp\", scope=\"mcp\""
        );
        let c = a.challenge(&AuthError::Invalid("the \"token\" expired".into()), "u");
        assert!(c.contains("error=\"invalid_token\""), "{c}");
        assert!(
            c.contains("error_description=\"the 'token' expired\""),
            "{c}"
        );
        let c = a.challenge(
            &AuthError::InsufficientScope {
                required: vec!["mcp".into(), "admin".into()],
            },
            "u",
        );
        assert!(c.contains("scope=\"mcp admin\""), "{c}");
        assert!(c.contains("error=\"insufficient_scope\""), "{c}");
    }
}
