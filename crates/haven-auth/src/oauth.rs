//! The OAuth 2.1 resource server: validation of JWT access tokens against the issuer's JWKS.
//!
//! A token is accepted when all of these hold:
//! - its header names an algorithm on the allow-list (never `none`, never an HMAC one: an
//!   asymmetric issuer's public key must not be usable as an HMAC secret);
//! - its `kid` names a key of the issuer's JWKS (the set is fetched at first use, kept, and
//!   fetched again when a token names an unknown `kid`, at most once per `jwks_min_refresh`;
//!   a token without `kid` is tried against the one key of its algorithm's family, if there is
//!   exactly one), and that key's type matches the algorithm;
//! - the signature verifies;
//! - `iss` equals the configured issuer, `aud` contains this server's canonical resource URL
//!   (RFC 8707: a token minted for another resource is refused), `exp` is in the future and
//!   `nbf` (when present) in the past, both with a small leeway, on an injectable clock.
//!
//! The claims become a [`Principal`]: `sub`, `client_id` (or `azp`), the scopes of `scope`
//! (space-separated) or `scp`, and the groups of the configured group claims.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::Value;

use crate::principal::{Principal, PrincipalKind};

/// The clock tokens are judged by: seconds since the Unix epoch.
pub type Now = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock as a [`Now`].
pub fn system_now() -> Now {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// How tokens are validated.
#[derive(Clone, Debug)]
pub struct OAuthSettings {
    /// The authorization server's issuer identifier (`iss` must equal it).
    pub issuer: String,
    /// This server's canonical resource URL (e.g. `https://mcp.example.com/mcp`): every
    /// token's audience must contain it.
    pub resource: String,
    /// Where the issuer's keys are. `None`: discovered from the issuer's metadata (RFC 8414
    /// `/.well-known/oauth-authorization-server`, then OpenID `/.well-known/openid-configuration`).
    pub jwks_uri: Option<String>,
    /// Algorithms accepted. Only asymmetric ones are allowed.
    pub algorithms: Vec<Algorithm>,
    /// Leeway on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Claims whose values are the principal's groups or roles (each a string or an array of
    /// strings).
    pub group_claims: Vec<String>,
    /// Shortest time between two fetches of the JWKS caused by unknown `kid`s.
    pub jwks_min_refresh: Duration,
    /// How long a fetched JWKS is used before it is fetched again.
    pub jwks_max_age: Duration,
    /// PEM file of extra CA certificates to trust for the issuer's HTTPS endpoints (besides the
    /// system's roots).
    pub ca_file: Option<std::path::PathBuf>,
}

impl OAuthSettings {
    /// Settings with the defaults for everything but the issuer and the resource.
    pub fn new(issuer: impl Into<String>, resource: impl Into<String>) -> OAuthSettings {
        OAuthSettings {
            issuer: issuer.into(),
            resource: resource.into(),
            jwks_uri: None,
            algorithms: default_algorithms(),
            leeway_secs: 30,
            group_claims: vec!["groups".into(), "roles".into()],
            jwks_min_refresh: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(3600),
            ca_file: None,
        }
    }
}

/// The algorithms accepted unless configured otherwise.
pub fn default_algorithms() -> Vec<Algorithm> {
    vec![
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ]
}

/// Parses an algorithm name of the allow-list; HMAC algorithms and `none` are refused.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg: Algorithm = name
        .trim()
        .parse()
        .map_err(|_| format!("unknown JWT algorithm {name:?}"))?;
    if alg.family() == AlgorithmFamily::Hmac {
        return Err(format!(
            "{name}: shared-secret (HMAC) algorithms are not accepted; an OAuth issuer signs with \
             an asymmetric key"
        ));
    }
    Ok(alg)
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The token is malformed, not signed by the issuer, expired, for another audience…: the
    /// client must get a new token. The text says which check failed (never the token).
    #[error("{0}")]
    Invalid(String),
    /// The issuer's keys could not be fetched and none is cached: nothing can be verified now.
    #[error("the issuer's keys are unavailable: {0}")]
    KeysUnavailable(String),
}

/// A key of the JWKS, ready to verify.
struct Key {
    id: Option<String>,
    family: AlgorithmFamily,
    /// The key's `alg`, when the JWKS pins one.
    alg: Option<Algorithm>,
    decoding: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
    /// When the keys were fetched (seconds, on the validator's clock).
    fetched: Option<u64>,
    /// The last fetch attempt (successful or not), which rate-limits refreshes.
    attempted: Option<u64>,
    /// Why the last fetch failed, while no fetch has succeeded since.
    last_error: Option<String>,
}

/// Statistics of the key cache, for the admin API and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JwksStats {
    /// Fetches of the JWKS made.
    pub fetches: u64,
    /// Fetches that failed.
    pub failures: u64,
    /// Keys held now.
    pub keys: usize,
}

/// Validates access tokens for one issuer and one resource.
pub struct TokenValidator {
    settings: OAuthSettings,
    http: reqwest::Client,
    now: Now,
    keys: tokio::sync::RwLock<KeySet>,
    /// Serialises fetches so that a burst of unknown `kid`s causes one.
    fetching: tokio::sync::Mutex<()>,
    jwks_uri: tokio::sync::OnceCell<String>,
    stats: parking_lot::Mutex<JwksStats>,
    /// Tokens whose signature, issuer and audience were verified, by SHA-256 of the token:
    /// their claims. A token presented again is not verified again (a signature check costs
    /// hundreds of microseconds; a lookup, one hash): its `exp`/`nbf` are still judged at
    /// every use. Emptied whenever the issuer's keys are fetched again, so a key the issuer
    /// withdrew stops accepting at the next refresh; bounded by [`VERIFIED_CACHE_MAX`].
    verified: parking_lot::Mutex<std::collections::HashMap<[u8; 32], Verified>>,
}

/// A verified token: its principal and its times.
struct Verified {
    principal: Principal,
    exp: u64,
    nbf: Option<u64>,
}

/// Most tokens kept verified at once; when full, the cache is emptied and refills.
pub const VERIFIED_CACHE_MAX: usize = 4096;

fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).into()
}

impl TokenValidator {
    /// A validator. Nothing is fetched until the first token arrives (or [`prefetch`]).
    ///
    /// [`prefetch`]: TokenValidator::prefetch
    pub fn new(settings: OAuthSettings, now: Now) -> Result<TokenValidator, String> {
        if settings.algorithms.is_empty() {
            return Err("no JWT algorithm is allowed".into());
        }
        if let Some(a) = settings
            .algorithms
            .iter()
            .find(|a| a.family() == AlgorithmFamily::Hmac)
        {
            return Err(format!("{a:?}: HMAC algorithms are not accepted"));
        }
        url::Url::parse(&settings.issuer)
            .map_err(|e| format!("the issuer {:?} is not a URL: {e}", settings.issuer))?;
        let resource = url::Url::parse(&settings.resource)
            .map_err(|e| format!("the resource {:?} is not a URL: {e}", settings.resource))?;
        if resource.fragment().is_some() {
            return Err(format!(
                "the resource {:?} must not have a fragment (RFC 8707)",
                settings.resource
            ));
        }
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("reading the CA file {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!("the CA file {} holds no PEM certificate: {e}", ca.display())
            })?;
            for c in certs {
                http = http.add_root_certificate(c);
            }
        }
        let http = http
            .build()
            .map_err(|e| format!("building the HTTP client for the issuer: {e}"))?;
        Ok(TokenValidator {
            settings,
            http,
            now,
            keys: tokio::sync::RwLock::new(KeySet::default()),
            fetching: tokio::sync::Mutex::new(()),
            jwks_uri: tokio::sync::OnceCell::new(),
            stats: parking_lot::Mutex::new(JwksStats::default()),
            verified: parking_lot::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &OAuthSettings {
        &self.settings
    }

    /// Statistics of the key cache.
    pub fn stats(&self) -> JwksStats {
        *self.stats.lock()
    }

    /// Fetches the issuer's keys now (e.g. at start, to fail early on a wrong issuer).
    pub async fn prefetch(&self) -> Result<(), TokenError> {
        self.refresh(true).await
    }

    /// Validates `token` and returns its principal.
    pub async fn validate(&self, token: &str) -> Result<Principal, TokenError> {
        let digest = token_digest(token);
        // Whether the keys are older than `jwks_max_age`: then nothing verified under them is
        // trusted from the cache, and they are fetched again below.
        let stale = {
            let set = self.keys.read().await;
            let now = (self.now)();
            set.fetched
                .is_none_or(|t| now.saturating_sub(t) >= self.settings.jwks_max_age.as_secs())
        };
        if !stale {
            let cached = self
                .verified
                .lock()
                .get(&digest)
                .map(|v| (v.principal.clone(), v.exp, v.nbf));
            if let Some((principal, exp, nbf)) = cached {
                self.check_times(exp, nbf)?;
                return Ok(principal);
            }
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("malformed token header: {e}")))?;
        if !self.settings.algorithms.contains(&header.alg) {
            return Err(TokenError::Invalid(format!(
                "the token's algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let family = header.alg.family();
        // Keys stale by age are fetched again before use; a failure keeps the stale ones.
        if stale {
            let _ = self.refresh(false).await;
        }
        let claims = match self.verify_with_cached(token, &header, family).await {
            Lookup::Verified(c) => c,
            Lookup::Failed(e) => return Err(e),
            Lookup::NoKey => {
                // An unknown kid may mean the issuer rotated its keys: fetch once (rate
                // limited), then look again.
                let _ = self.refresh(false).await;
                match self.verify_with_cached(token, &header, family).await {
                    Lookup::Verified(c) => c,
                    Lookup::Failed(e) => return Err(e),
                    Lookup::NoKey => {
                        let set = self.keys.read().await;
                        if set.keys.is_empty() {
                            return Err(TokenError::KeysUnavailable(
                                set.last_error
                                    .clone()
                                    .unwrap_or_else(|| "no key has been fetched yet".into()),
                            ));
                        }
                        return Err(TokenError::Invalid(match &header.kid {
                            Some(kid) => format!("no key of the issuer has the id {kid:?}"),
                            None => "the token names no key id and the issuer has not exactly \
                                     one key of its type"
                                .into(),
                        }));
                    }
                }
            }
        };
        self.check_claims(&claims)?;
        let principal = self.principal(&claims);
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let nbf = claims.get("nbf").and_then(Value::as_u64);
        let mut verified = self.verified.lock();
        if verified.len() >= VERIFIED_CACHE_MAX {
            verified.clear();
        }
        verified.insert(
            digest,
            Verified {
                principal: principal.clone(),
                exp,
                nbf,
            },
        );
        Ok(principal)
    }

    async fn verify_with_cached(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
        family: AlgorithmFamily,
    ) -> Lookup {
        let set = self.keys.read().await;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => set
                .keys
                .iter()
                .filter(|k| k.id.as_deref() == Some(kid.as_str()))
                .collect(),
            None => {
                let same: Vec<&Key> = set.keys.iter().filter(|k| k.family == family).collect();
                if same.len() == 1 { same } else { Vec::new() }
            }
        };
        let Some(key) = candidates.first() else {
            return Lookup::NoKey;
        };
        if key.family != family || key.alg.is_some_and(|a| a != header.alg) {
            return Lookup::Failed(TokenError::Invalid(format!(
                "the key {:?} is not for the algorithm {:?}",
                key.id.as_deref().unwrap_or(""),
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        // Times are checked below, on the injectable clock; issuer and audience here.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims = ["exp", "iss", "aud", "sub"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        validation.set_issuer(&[self.settings.issuer.as_str()]);
        validation.set_audience(&[self.settings.resource.as_str()]);
        match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &key.decoding,
            &validation,
        ) {
            Ok(data) => Lookup::Verified(data.claims),
            Err(e) => Lookup::Failed(TokenError::Invalid(describe(&e))),
        }
    }

    /// `exp` and `nbf` against now, with the leeway.
    fn check_times(&self, exp: u64, nbf: Option<u64>) -> Result<(), TokenError> {
        let now = (self.now)();
        let leeway = self.settings.leeway_secs;
        if exp.saturating_add(leeway) <= now {
            return Err(TokenError::Invalid("the token has expired".into()));
        }
        if let Some(nbf) = nbf
            && nbf > now.saturating_add(leeway)
        {
            return Err(TokenError::Invalid(
                "the token is not valid yet (nbf)".into(),
            ));
        }
        Ok(())
    }

    fn check_claims(&self, claims: &serde_json::Map<String, Value>) -> Result<(), TokenError> {
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| TokenError::Invalid("the token has no numeric exp claim".into()))?;
        let nbf = match claims.get("nbf") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| TokenError::Invalid("the token's nbf is not a number".into()))?,
            ),
        };
        self.check_times(exp, nbf)?;
        // `iss` and `aud` were checked by the decoder; insist they are present.
        if claims.get("iss").and_then(Value::as_str) != Some(self.settings.issuer.as_str()) {
            return Err(TokenError::Invalid(
                "the token's issuer is not accepted".into(),
            ));
        }
        match claims.get("sub").and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Ok(()),
            _ => Err(TokenError::Invalid("the token has no sub claim".into())),
        }
    }

    fn principal(&self, claims: &serde_json::Map<String, Value>) -> Principal {
        let strings = |v: &Value| -> Vec<String> {
            match v {
                Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let scopes = claims
            .get("scope")
            .or_else(|| claims.get("scp"))
            .map(strings)
            .unwrap_or_default();
        let mut groups = Vec::new();
        for c in &self.settings.group_claims {
            if let Some(v) = claims.get(c) {
                for g in strings(v) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
        Principal {
            kind: PrincipalKind::Token,
            issuer: Some(self.settings.issuer.clone()),
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            client_id: claims
                .get("client_id")
                .or_else(|| claims.get("azp"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            groups,
            scopes,
            expires_at: claims.get("exp").and_then(Value::as_u64),
        }
    }

    /// Fetches the JWKS unless one was attempted within `jwks_min_refresh` (or `force`).
    async fn refresh(&self, force: bool) -> Result<(), TokenError> {
        let _one = self.fetching.lock().await;
        {
            let set = self.keys.read().await;
            let now = (self.now)();
            if !force
                && set.attempted.is_some_and(|t| {
                    now.saturating_sub(t) < self.settings.jwks_min_refresh.as_secs()
                })
            {
                return Ok(());
            }
        }
        let result = self.fetch().await;
        let mut set = self.keys.write().await;
        let now = (self.now)();
        set.attempted = Some(now);
        let mut stats = self.stats.lock();
        stats.fetches += 1;
        match result {
            Ok(keys) => {
                self.verified.lock().clear();
                set.keys = keys;
                set.fetched = Some(now);
                set.last_error = None;
                stats.keys = set.keys.len();
                Ok(())
            }
            Err(e) => {
                stats.failures += 1;
                set.last_error = Some(e.clone());
                tracing::warn!(issuer = %self.settings.issuer, error = %e, "fetching the issuer's keys failed");
                Err(TokenError::KeysUnavailable(e))
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let uri = self
            .jwks_uri
            .get_or_try_init(|| async {
                match &self.settings.jwks_uri {
                    Some(u) => Ok(u.clone()),
                    None => self.discover().await,
                }
            })
            .await?;
        let set: JwkSet = self.get_json(uri).await?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if let Some(k) = usable(jwk) {
                keys.push(k);
            }
        }
        if keys.is_empty() {
            return Err(format!("{uri} holds no usable public key"));
        }
        Ok(keys)
    }

    /// Finds `jwks_uri` in the issuer's metadata.
    async fn discover(&self) -> Result<String, String> {
        let mut last = String::new();
        for url in metadata_urls(&self.settings.issuer)? {
            match self.get_json::<HashMap<String, Value>>(&url).await {
                Ok(meta) => {
                    if meta.get("issuer").and_then(Value::as_str)
                        != Some(self.settings.issuer.as_str())
                    {
                        return Err(format!(
                            "the metadata at {url} names another issuer than {}",
                            self.settings.issuer
                        ));
                    }
                    return meta
                        .get("jwks_uri")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| format!("the metadata at {url} has no jwks_uri"));
                }
                Err(e) => last = e,
            }
        }
        Err(format!("no authorization server metadata found: {last}"))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let r = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        if !r.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", r.status().as_u16()));
        }
        let bytes = r
            .bytes()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        if bytes.len() > 1024 * 1024 {
            return Err(format!("GET {url}: the answer is larger than 1 MiB"));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("GET {url}: not the expected JSON: {e}"))
    }
}

enum Lookup {
    Verified(serde_json::Map<String, Value>),
    Failed(TokenError),
    NoKey,
}

/// A JWK usable for verification: public, asymmetric, for signatures.
fn usable(jwk: &Jwk) -> Option<Key> {
    use jsonwebtoken::jwk::PublicKeyUse;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        // Symmetric keys in a JWKS are never accepted.
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => Some(a.to_string().parse::<Algorithm>().ok()?),
        None => None,
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key {
        id: jwk.common.key_id.clone(),
        family,
        alg,
        decoding,
    })
}

/// The metadata URLs of an issuer: RFC 8414 (well-known inserted before the path), then
/// OpenID Connect discovery (appended), then RFC 8414 appended (some servers do that).
fn metadata_urls(issuer: &str) -> Result<Vec<String>, String> {
    let u = url::Url::parse(issuer).map_err(|e| format!("the issuer is not a URL: {e}"))?;
    let origin = u.origin().ascii_serialization();
    let path = u.path().trim_end_matches('/');
    let mut out = vec![format!(
        "{origin}/.well-known/oauth-authorization-server{path}"
    )];
    out.push(format!("{origin}{path}/.well-known/openid-configuration"));
    if !path.is_empty() {
        out.push(format!("{origin}/.well-known/openid-configuration{path}"));
    }
    Ok(out)
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::InvalidIssuer => "the token's issuer is not accepted".into(),
        K::InvalidAudience => {
            "the token is not for this resource (its audience does not name it)".into()
        }
        K::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            "the token's algorithm does not match its key".into()
        }
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed token".into(),
        _ => "the token could not be verified".into(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_urls_follow_rfc8414_and_oidc() {
        assert_eq!(
            metadata_urls("https://idp.example").unwrap(),
            vec![
                "https://idp.example/.well-known/oauth-authorization-server",
                "https://idp.example/.well-known/openid-configuration",
            ]
        );
        assert_eq!(
            metadata_urls("https://idp.example/tenant1/").unwrap(),
            vec![
                "https://idp.example/.well-known/oauth-authorization-server/tenant1",
                "https://idp.example/tenant1/.well-known/openid-configuration",
                "https://idp.example/.well-known/openid-configuration/tenant1",
            ]
        );
    }

    #[test]
    fn hmac_and_none_are_never_allowed() {
        assert!(parse_algorithm("HS256").is_err());
        assert!(parse_algorithm("none").is_err());
        assert_eq!(parse_algorithm("ES256").unwrap(), Algorithm::ES256);
        let mut s = OAuthSettings::new("https://idp.example", "https://haven.example/mcp");
        s.algorithms = vec![Algorithm::HS256];
        assert!(TokenValidator::new(s, system_now()).is_err());
    }
}
