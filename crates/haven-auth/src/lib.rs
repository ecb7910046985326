//! Who is calling. A request that reaches the protocol engine carries a [`Principal`]: the
//! subject of a validated OAuth access token, the owner of an API key, or the local operator
//! when authentication is off (loopback and stdio, today's default). Authorization rules,
//! the binding of sessions, streams and tasks to their creator, rate limits and the audit
//! log all name callers by [`Principal::id`].

pub mod apikeys;
pub mod authenticator;
pub mod oauth;
pub mod principal;
pub mod roles;
pub mod rules;

pub use apikeys::{ApiKey, ApiKeyError, ApiKeys, KeyState, PresentedKey, looks_like_api_key};
pub use authenticator::{AuthError, Authenticator, KeyVerifier};
pub use oauth::{OAuthSettings, TokenError, TokenValidator};
pub use principal::{Principal, PrincipalKind};
pub use roles::AdminRole;
pub use rules::{Effect, Grant, Kind, Policy, Rule, RuleError, RuleSet, Rules, Selector};
