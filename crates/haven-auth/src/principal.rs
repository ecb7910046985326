//! The caller of a request, as authentication established it.

use serde::{Deserialize, Serialize};

/// How a principal proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrincipalKind {
    /// Authentication is off: whoever reached the listener (loopback by default) or the
    /// process on the other end of stdio.
    Anonymous,
    /// A validated OAuth 2.1 access token (a JWT).
    Token,
    /// An API key created with `haven auth keys create`.
    ApiKey,
}

/// A caller. Two requests come from the same principal exactly when their [`id`]s are equal.
///
/// [`id`]: Principal::id
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// How it authenticated.
    pub kind: PrincipalKind,
    /// The token's issuer (`iss`), for tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The token's subject (`sub`), or the API key's id.
    pub subject: String,
    /// The OAuth client the token was issued to (`client_id` or `azp`), when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Groups and roles named by the token's claims, or given to the API key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Scopes granted (`scope` / `scp`, or the API key's scopes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// When the credential stops being valid, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl Principal {
    /// The caller when authentication is off.
    pub fn anonymous() -> Principal {
        Principal {
            kind: PrincipalKind::Anonymous,
            issuer: None,
            subject: String::new(),
            client_id: None,
            groups: Vec::new(),
            scopes: Vec::new(),
            expires_at: None,
        }
    }

    /// A stable name for this caller, unique across ways in: `anonymous`,
    /// `token:<issuer>#<subject>` or `key:<key id>`. Records that belong to a caller (sessions,
    /// tasks, sealed request state) and audit records name it by this.
    pub fn id(&self) -> String {
        match self.kind {
            PrincipalKind::Anonymous => "anonymous".to_owned(),
            PrincipalKind::Token => format!(
                "token:{}#{}",
                self.issuer.as_deref().unwrap_or(""),
                self.subject
            ),
            PrincipalKind::ApiKey => format!("key:{}", self.subject),
        }
    }

    /// Whether the caller was granted `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Whether authentication was off for this caller.
    pub fn is_anonymous(&self) -> bool {
        self.kind == PrincipalKind::Anonymous
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_by_way_in_and_issuer() {
        let mut a = Principal::anonymous();
        assert_eq!(a.id(), "anonymous");
        a.kind = PrincipalKind::Token;
        a.issuer = Some("https://idp.example".into());
        a.subject = "alice".into();
        assert_eq!(a.id(), "token:https://idp.example#alice");
        let mut b = a.clone();
        b.issuer = Some("https://other.example".into());
        assert_ne!(a.id(), b.id());
        b.kind = PrincipalKind::ApiKey;
        b.subject = "k1".into();
        assert_eq!(b.id(), "key:k1");
        assert!(!b.has_scope("mcp:tools"));
    }
}
