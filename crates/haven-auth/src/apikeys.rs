//! API keys: the second way in for machine clients, next to OAuth access tokens.
//!
//! A key as a client presents it is `hvn_<id>_<secret>`: `<id>` is 12 characters of `a-z0-9`,
//! public (it names the key in listings, logs and audit records, and the caller as
//! `key:<id>`), and `<secret>` is 32 random bytes in unpadded base64url (43 characters). The
//! secret is shown once, when the key is created, and never stored or logged: the store holds
//! the key's record (name, scopes, groups, who created it and when, its expiry, its
//! revocation) and a SHA-256 hash of the secret. SHA-256 is right here, and a slow password
//! hash would add nothing: the secret is 256 random bits, not a password a person chose, so
//! no dictionary can shorten a search of the hash. A presented secret is compared with the
//! stored hash in constant time.
//!
//! Records live in namespace [`KEYS_NS`], keyed by the key's id, like every other control-plane
//! record: cluster mode shares them through the region's JetStream log, region links
//! replicate them to the other regions, backups hold them.
//!
//! **Revocation.** [`ApiKeys::verify`] reads the key's record from the store on every call;
//! nothing is cached. A revocation is a new version of the record, so it takes effect on a
//! node as soon as the node's store has it: at once on the node that wrote it; on the other
//! nodes of a cluster once their index has applied the JetStream entry (the same moment they
//! see any other write; a node that does not know an id at all catches up with the log before
//! answering "unknown"); in other regions after the region link's replication lag. On the
//! embedded store (redb) and on a cluster node, a read is a lookup in the node's local index,
//! so verifying costs no network round trip.
//!
//! **Times** are seconds since the Unix epoch. Creation is stamped by the store's clock;
//! [`ApiKeys::verify`] takes the time to check expiry against from its caller (tests pass a
//! controlled one). A key is expired from its `expires_at` second on.

use std::sync::Arc;

use base64::Engine as _;
use haven_state::{Batch, Expect, Store, StoreError};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::principal::{Principal, PrincipalKind};

/// Namespace of API key records.
pub const KEYS_NS: &str = "auth-keys";
/// What every API key starts with.
pub const KEY_PREFIX: &str = "hvn_";
/// Length of a key's id.
pub const ID_LEN: usize = 12;
/// Random bytes in a key's secret.
pub const SECRET_BYTES: usize = 32;
/// Length of a key's secret as presented (unpadded base64url of [`SECRET_BYTES`]).
pub const SECRET_LEN: usize = 43;
/// Longest key name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest scope or group.
pub const MAX_SCOPE_LEN: usize = 128;
/// Most scopes, and most groups, a key may have.
pub const MAX_SCOPES: usize = 64;
/// Longest `created_by` / `revoked_by`.
const MAX_ACTOR_LEN: usize = 256;
/// Domain separation of the stored hash.
const HASH_CONTEXT: &[u8] = b"haven api key v1\0";

/// Errors of API key operations. None of them carries a presented secret; the HTTP layer
/// answers every verification failure the same way, and these tell logs and audit why.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The credential does not have the shape `hvn_<id>_<secret>`.
    #[error(
        "malformed API key: expected hvn_<12 characters of a-z0-9>_<43 characters of base64url>"
    )]
    Malformed,
    /// No key has this id.
    #[error("unknown API key {0}")]
    Unknown(String),
    /// The key was revoked.
    #[error("API key {0} was revoked")]
    Revoked(String),
    /// The key expired.
    #[error("API key {0} has expired")]
    Expired(String),
    /// The id is known but the secret is not the key's.
    #[error("wrong secret for API key {0}")]
    WrongSecret(String),
    /// Bad input to create a key; nothing was changed.
    #[error("invalid API key request: {0}")]
    Invalid(String),
    /// No key of that id to revoke (or show); nothing was changed.
    #[error("no API key with id '{0}' (see `haven auth keys list`)")]
    NotFound(String),
    /// The key was revoked before; nothing was changed.
    #[error("API key {id} was already revoked (at {at}, by {by})")]
    AlreadyRevoked {
        /// The key.
        id: String,
        /// When, RFC 3339.
        at: String,
        /// By whom.
        by: String,
    },
    /// A stored record could not be read.
    #[error("API key record '{0}' is unreadable: {1}")]
    Corrupt(String, String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiKeyError {
    /// Whether this is a refusal of a presented credential (as opposed to bad input to an
    /// admin operation or a store failure).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ApiKeyError::Malformed
                | ApiKeyError::Unknown(_)
                | ApiKeyError::Revoked(_)
                | ApiKeyError::Expired(_)
                | ApiKeyError::WrongSecret(_)
        )
    }
}

/// An API key as listed: everything but its secret and the secret's hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Public id, the `<id>` of `hvn_<id>_<secret>`.
    pub id: String,
    /// Name given at creation, for operators.
    pub name: String,
    /// Scopes granted to callers with this key.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Groups or roles of callers with this key (what authorization rules match).
    #[serde(default)]
    pub groups: Vec<String>,
    /// When it was created.
    pub created_at: u64,
    /// Who created it (the admin principal, e.g. `admin-token`).
    pub created_by: String,
    /// When it stops working; `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// Who revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// Whether a key works at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// It works.
    Active,
    /// Its expiry has passed.
    Expired,
    /// It was revoked.
    Revoked,
}

impl ApiKey {
    /// The key's state at `now`.
    pub fn state(&self, now: u64) -> KeyState {
        if self.revoked_at.is_some() {
            KeyState::Revoked
        } else if self.expires_at.is_some_and(|e| now >= e) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    /// The caller a request with this key comes from.
    pub fn principal(&self) -> Principal {
        Principal {
            kind: PrincipalKind::ApiKey,
            issuer: None,
            subject: self.id.clone(),
            client_id: None,
            groups: self.groups.clone(),
            scopes: self.scopes.clone(),
            expires_at: self.expires_at,
        }
    }
}

/// What the store holds: the key and the hash of its secret.
#[derive(Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    key: ApiKey,
    /// Hex SHA-256 of [`HASH_CONTEXT`], the id, a NUL and the secret.
    secret_sha256: String,
}

/// A key as presented, `hvn_<id>_<secret>`, returned once by [`ApiKeys::create`]. Its `Debug`
/// shows only the id, so that logging it by mistake does not leak the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey(String);

impl PresentedKey {
    /// The whole key, secret included: give it to the client, once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = parse(&self.0).map(|(id, _)| id).unwrap_or("?");
        write!(f, "PresentedKey({KEY_PREFIX}{id}_…)")
    }
}

/// Whether a bearer credential is meant as an API key (it starts with `hvn_`), so that the
/// HTTP layer routes it here rather than to JWT validation. Says nothing about its validity.
pub fn looks_like_api_key(s: &str) -> bool {
    s.starts_with(KEY_PREFIX)
}

fn is_id(s: &str) -> bool {
    s.len() == ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Splits `hvn_<id>_<secret>` into id and secret, checking both shapes.
fn parse(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let secret_ok = secret.len() == SECRET_LEN
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (is_id(id) && secret_ok).then_some((id, secret))
}

fn hash(id: &str, secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HASH_CONTEXT);
    h.update(id.as_bytes());
    h.update([0u8]);
    h.update(secret.as_bytes());
    h.finalize().into()
}

fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| {
            // 252 = 7 * 36: values above are drawn again, so every character is equally likely.
            loop {
                let b = (rng.next_u32() & 0xff) as u8;
                if b < 252 {
                    return ALPHABET[usize::from(b % 36)] as char;
                }
            }
        })
        .collect()
}

fn new_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Checks a scope: an OAuth scope token (RFC 6749 §3.3: visible ASCII except `"` and `\`),
/// at most [`MAX_SCOPE_LEN`] characters.
pub fn validate_scope(scope: &str) -> Result<(), ApiKeyError> {
    let ok = !scope.is_empty()
        && scope.len() <= MAX_SCOPE_LEN
        && scope
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(ApiKeyError::Invalid(format!(
            "scope {scope:?} must be 1 to {MAX_SCOPE_LEN} visible ASCII characters without spaces, '\"' or '\\' (an OAuth scope token, e.g. mcp:tools)"
        )))
    }
}

/// Checks a group or role name: 1 to [`MAX_SCOPE_LEN`] visible ASCII characters.
pub fn validate_group(group: &str) -> Result<(), ApiKeyError> {
    let ok = !group.is_empty()
        && group.len() <= MAX_SCOPE_LEN
        && group.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiKeyError::Invalid(format!(
            "group {group:?} must be 1 to {MAX_SCOPE_LEN} visible ASCII characters without spaces"
        )))
    }
}

fn validate_name(name: &str) -> Result<(), ApiKeyError> {
    let ok = !name.trim().is_empty()
        && name.chars().count() <= MAX_NAME_LEN
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(ApiKeyError::Invalid(format!(
            "name {name:?} must be 1 to {MAX_NAME_LEN} characters, not blank, without control characters"
        )))
    }
}

fn validate_actor(who: &str, what: &str) -> Result<(), ApiKeyError> {
    if who.is_empty() || who.len() > MAX_ACTOR_LEN || who.chars().any(char::is_control) {
        return Err(ApiKeyError::Invalid(format!(
            "{what} must be 1 to {MAX_ACTOR_LEN} characters without control characters"
        )));
    }
    Ok(())
}

/// Sorted, without duplicates.
fn normalized(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// A time as RFC 3339 (UTC).
pub fn fmt_time(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// An expiry as given on the command line or to the admin API: a duration from `now`
/// (`30d`, `12h`, `90m`, `3600s`, `2w`, or several, `1d12h`) or an RFC 3339 time
/// (`2027-01-31T00:00:00Z`). Refused when it is not after `now`. Seconds since the Unix epoch.
pub fn parse_expiry(text: &str, now: u64) -> Result<u64, ApiKeyError> {
    let text = text.trim();
    let at = if text.contains('T') || text.contains(':') {
        let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map_err(|e| {
                ApiKeyError::Invalid(format!(
                    "expiry {text:?} is not an RFC 3339 time ({e}); write e.g. 2027-01-31T00:00:00Z, or a duration such as 30d"
                ))
            })?;
        u64::try_from(t.unix_timestamp())
            .map_err(|_| ApiKeyError::Invalid(format!("expiry {text:?} is before 1970")))?
    } else {
        now.saturating_add(parse_duration(text)?)
    };
    if at <= now {
        return Err(ApiKeyError::Invalid(format!(
            "expiry {text:?} ({}) is not in the future (now is {})",
            fmt_time(at),
            fmt_time(now)
        )));
    }
    Ok(at)
}

/// `30d`, `12h`, `1d12h`, ... in seconds.
fn parse_duration(text: &str) -> Result<u64, ApiKeyError> {
    let bad = || {
        ApiKeyError::Invalid(format!(
            "expiry {text:?} is neither a duration (a number and a unit of s, m, h, d or w, e.g. 30d or 1d12h) nor an RFC 3339 time (e.g. 2027-01-31T00:00:00Z)"
        ))
    };
    if text.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// API key operations on a store.
#[derive(Clone)]
pub struct ApiKeys {
    store: Arc<dyn Store>,
}

impl ApiKeys {
    /// The API keys kept in `store`.
    pub fn new(store: Arc<dyn Store>) -> ApiKeys {
        ApiKeys { store }
    }

    /// Now by the store's clock, in seconds.
    pub fn now(&self) -> u64 {
        self.store.clock().wall_millis() / 1000
    }

    /// Creates a key. Returns its record and the key as the client must present it: the only
    /// time the secret exists outside the client. `expires_at` (seconds since the Unix epoch)
    /// must be in the future by the store's clock. Bad input changes nothing.
    pub async fn create(
        &self,
        name: &str,
        scopes: Vec<String>,
        groups: Vec<String>,
        expires_at: Option<u64>,
        created_by: &str,
    ) -> Result<(ApiKey, PresentedKey), ApiKeyError> {
        validate_name(name)?;
        validate_actor(created_by, "created_by")?;
        let scopes = normalized(scopes);
        let groups = normalized(groups);
        if scopes.len() > MAX_SCOPES || groups.len() > MAX_SCOPES {
            return Err(ApiKeyError::Invalid(format!(
                "a key has at most {MAX_SCOPES} scopes and {MAX_SCOPES} groups"
            )));
        }
        scopes.iter().try_for_each(|s| validate_scope(s))?;
        groups.iter().try_for_each(|g| validate_group(g))?;
        let now = self.now();
        if let Some(e) = expires_at
            && e <= now
        {
            return Err(ApiKeyError::Invalid(format!(
                "expiry {} is not in the future (now is {})",
                fmt_time(e),
                fmt_time(now)
            )));
        }
        // A fresh id is taken only if no key has it (an id collision, 36^12 ids, is drawn again).
        for _ in 0..4 {
            let id = new_id();
            let secret = new_secret();
            let key = ApiKey {
                id: id.clone(),
                name: name.to_owned(),
                scopes: scopes.clone(),
                groups: groups.clone(),
                created_at: now,
                created_by: created_by.to_owned(),
                expires_at,
                revoked_at: None,
                revoked_by: None,
            };
            let stored = Stored {
                key: key.clone(),
                secret_sha256: hex::encode(hash(&id, &secret)),
            };
            let value = serde_json::to_vec(&stored).expect("an API key record serializes");
            match self
                .store
                .commit(Batch::new().put_if(KEYS_NS, &id, value, Expect::Absent))
                .await
            {
                Ok(_) => {
                    tracing::info!(key = %id, name, created_by, "API key created");
                    let presented = PresentedKey(format!("{KEY_PREFIX}{id}_{secret}"));
                    return Ok((key, presented));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiKeyError::Store(StoreError::Unavailable(
            "could not draw an unused API key id".into(),
        )))
    }

    /// Every key (revoked and expired ones too), by id; never a secret or its hash.
    pub async fn list(&self) -> Result<Vec<ApiKey>, ApiKeyError> {
        let records = self.store.scan_all(KEYS_NS, "").await?;
        records
            .iter()
            .map(|r| decode(&r.record.key, r.value()).map(|s| s.key))
            .collect()
    }

    /// One key.
    pub async fn get(&self, id: &str) -> Result<Option<ApiKey>, ApiKeyError> {
        if !is_id(id) {
            return Ok(None);
        }
        Ok(self.load(id).await?.map(|(s, _)| s.key))
    }

    async fn load(&self, id: &str) -> Result<Option<(Stored, u64)>, ApiKeyError> {
        match self.store.get(KEYS_NS, id).await? {
            Some(r) => Ok(Some((decode(id, r.value())?, r.revision))),
            None => Ok(None),
        }
    }

    /// Revokes a key: from now on it is refused (see the module's note on when other nodes
    /// and regions see it). The record stays, marked revoked, for listings and audit. An
    /// unknown id or an already revoked key is an error and changes nothing.
    pub async fn revoke(&self, id: &str, by: &str) -> Result<ApiKey, ApiKeyError> {
        validate_actor(by, "revoked_by")?;
        if !is_id(id) {
            return Err(ApiKeyError::NotFound(id.to_owned()));
        }
        loop {
            let Some((mut stored, revision)) = self.load(id).await? else {
                return Err(ApiKeyError::NotFound(id.to_owned()));
            };
            if let Some(at) = stored.key.revoked_at {
                return Err(ApiKeyError::AlreadyRevoked {
                    id: id.to_owned(),
                    at: fmt_time(at),
                    by: stored.key.revoked_by.clone().unwrap_or_default(),
                });
            }
            stored.key.revoked_at = Some(self.now());
            stored.key.revoked_by = Some(by.to_owned());
            let value = serde_json::to_vec(&stored).expect("an API key record serializes");
            match self
                .store
                .commit(Batch::new().put_if(KEYS_NS, id, value, Expect::Revision(revision)))
                .await
            {
                Ok(_) => {
                    tracing::info!(key = %id, revoked_by = by, "API key revoked");
                    return Ok(stored.key);
                }
                // Written meanwhile (revoked elsewhere, say): read it again.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks a presented key (the bearer credential, `hvn_<id>_<secret>`) at `now` (seconds
    /// since the Unix epoch) and returns its caller. The secret is checked before anything
    /// else is said about the key (revoked, expired), and compared in constant time.
    pub async fn verify(&self, presented: &str, now: u64) -> Result<Principal, ApiKeyError> {
        let (id, secret) = parse(presented).ok_or(ApiKeyError::Malformed)?;
        let Some((stored, _)) = self.load(id).await? else {
            return Err(ApiKeyError::Unknown(id.to_owned()));
        };
        let expected = hex::decode(&stored.secret_sha256)
            .map_err(|e| ApiKeyError::Corrupt(id.to_owned(), format!("secret hash: {e}")))?;
        let given = hash(id, secret);
        if !bool::from(given.as_slice().ct_eq(expected.as_slice())) {
            return Err(ApiKeyError::WrongSecret(id.to_owned()));
        }
        match stored.key.state(now) {
            KeyState::Active => Ok(stored.key.principal()),
            KeyState::Revoked => Err(ApiKeyError::Revoked(id.to_owned())),
            KeyState::Expired => Err(ApiKeyError::Expired(id.to_owned())),
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Result<Stored, ApiKeyError> {
    serde_json::from_slice(value).map_err(|e| ApiKeyError::Corrupt(key.to_owned(), e.to_string()))
}

#[async_trait::async_trait]
impl crate::authenticator::KeyVerifier for ApiKeys {
    fn recognises(&self, credential: &str) -> bool {
        looks_like_api_key(credential)
    }

    async fn verify_key(&self, credential: &str) -> Result<Principal, crate::AuthError> {
        self.verify(credential, self.now())
            .await
            .map_err(|e| match e {
                ApiKeyError::Store(s) if s.is_retryable() => {
                    crate::AuthError::Unavailable(format!("API keys cannot be read now: {s}"))
                }
                // Refusals (and unreadable records) name the key id, never the secret.
                e => crate::AuthError::Invalid(e.to_string()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_state::{HybridClock, ManualClock, MemLog, MemStore, Origin, RedbStore};

    /// 2026-12-01T00:00:00Z.
    const T0: u64 = 1_796_083_200;

    fn clock() -> (Arc<ManualClock>, Arc<HybridClock>) {
        let manual = Arc::new(ManualClock::new(T0 * 1000));
        (manual.clone(), Arc::new(HybridClock::new(manual)))
    }

    async fn mem() -> (Arc<ManualClock>, Arc<dyn Store>) {
        let (manual, clock) = clock();
        let s = MemStore::open_alone(Origin::new("r", "n1"), clock)
            .await
            .unwrap();
        (manual, Arc::new(s))
    }

    fn redb(dir: &std::path::Path) -> (Arc<ManualClock>, Arc<dyn Store>) {
        let (manual, clock) = clock();
        let s = RedbStore::open(dir, Origin::new("r", "n1"), clock).unwrap();
        (manual, Arc::new(s))
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Every value the store holds and every value its change log recorded, as bytes.
    async fn raw_bytes(store: &Arc<dyn Store>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let (_, entries) = store.state_entries().await.unwrap();
        let log = store.read_log(1, 1_000_000).await.unwrap();
        for e in entries.iter().chain(&log) {
            if let haven_state::Change::Record(r) = &e.change {
                out.push(r.key.clone().into_bytes());
                out.extend(r.value.clone());
            }
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// The whole life of a key on one store: create, verify, list, expiry, revoke.
    async fn lifecycle(store: Arc<dyn Store>, manual: Arc<ManualClock>) {
        let keys = ApiKeys::new(store.clone());
        let (key, presented) = keys
            .create(
                "ci deploy",
                strings(&["mcp:tools", "mcp:read", "mcp:tools"]),
                strings(&["deployers"]),
                Some(T0 + 3600),
                "admin-token",
            )
            .await
            .unwrap();
        let text = presented.expose().to_owned();
        assert!(looks_like_api_key(&text));
        assert!(text.starts_with(&format!("hvn_{}_", key.id)), "{text}");
        assert_eq!(text.len(), 4 + ID_LEN + 1 + SECRET_LEN);
        let secret = &text[4 + ID_LEN + 1..];
        assert!(!format!("{presented:?}").contains(secret));
        assert_eq!(key.scopes, strings(&["mcp:read", "mcp:tools"]));
        assert_eq!(key.created_at, T0);
        assert_eq!(key.created_by, "admin-token");
        assert_eq!(key.state(T0), KeyState::Active);

        // The key verifies, as its principal.
        let p = keys.verify(&text, T0 + 10).await.unwrap();
        assert_eq!(p.kind, PrincipalKind::ApiKey);
        assert_eq!(p.id(), format!("key:{}", key.id));
        assert_eq!(p.subject, key.id);
        assert!(p.has_scope("mcp:tools"));
        assert_eq!(p.groups, strings(&["deployers"]));
        assert_eq!(p.expires_at, Some(T0 + 3600));

        // The store holds the hash, never the secret.
        for bytes in raw_bytes(&store).await {
            assert!(!contains(&bytes, secret.as_bytes()), "the secret is stored");
            assert!(!contains(&bytes, text.as_bytes()));
        }

        // Listed without secret or hash.
        let list = keys.list().await.unwrap();
        assert_eq!(list.iter().find(|k| k.id == key.id), Some(&key));
        let listed = serde_json::to_string(&list).unwrap();
        assert!(
            !listed.contains(secret) && !listed.contains("sha256"),
            "{listed}"
        );

        // The right id with another secret.
        let other = format!("hvn_{}_{}", key.id, new_secret());
        assert!(matches!(
            keys.verify(&other, T0).await,
            Err(ApiKeyError::WrongSecret(id)) if id == key.id
        ));
        // One character of the secret changed.
        let mut altered = text.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(matches!(
            keys.verify(&altered, T0).await,
            Err(ApiKeyError::WrongSecret(_))
        ));
        // An unknown id.
        let unknown = format!("hvn_{}_{}", new_id(), secret);
        assert!(matches!(
            keys.verify(&unknown, T0).await,
            Err(ApiKeyError::Unknown(_))
        ));

        // Expiry against the given clock: valid to the last second before expires_at.
        keys.verify(&text, T0 + 3599).await.unwrap();
        let e = keys.verify(&text, T0 + 3600).await.unwrap_err();
        assert!(
            matches!(&e, ApiKeyError::Expired(id) if *id == key.id),
            "{e}"
        );
        assert!(!e.to_string().contains(secret));

        // Revocation takes effect on the next verification.
        manual.advance(60_000);
        let revoked = keys.revoke(&key.id, "admin-token").await.unwrap();
        assert_eq!(revoked.revoked_at, Some(T0 + 60));
        assert_eq!(revoked.revoked_by.as_deref(), Some("admin-token"));
        assert_eq!(revoked.state(T0 + 61), KeyState::Revoked);
        let e = keys.verify(&text, T0 + 61).await.unwrap_err();
        assert!(matches!(&e, ApiKeyError::Revoked(_)), "{e}");
        assert!(e.is_refusal());
        // Still listed, as revoked.
        let list = keys.list().await.unwrap();
        assert_eq!(list.iter().find(|k| k.id == key.id), Some(&revoked));
        // A second revocation and an unknown id are errors and change nothing.
        let before = store.last_seq().await.unwrap();
        assert!(matches!(
            keys.revoke(&key.id, "someone").await,
            Err(ApiKeyError::AlreadyRevoked { .. })
        ));
        assert!(matches!(
            keys.revoke("nosuchkey000", "admin-token").await,
            Err(ApiKeyError::NotFound(_))
        ));
        assert!(matches!(
            keys.revoke("../x", "admin-token").await,
            Err(ApiKeyError::NotFound(_))
        ));
        assert_eq!(store.last_seq().await.unwrap(), before);
        let list = keys.list().await.unwrap();
        assert_eq!(list.iter().find(|k| k.id == key.id), Some(&revoked));
    }

    #[tokio::test]
    async fn lifecycle_on_the_memory_store() {
        let (manual, store) = mem().await;
        lifecycle(store, manual).await;
    }

    #[tokio::test]
    async fn lifecycle_on_redb_and_the_secret_is_in_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let (manual, store) = redb(dir.path());
        let keys = ApiKeys::new(store.clone());
        let (_, presented) = keys
            .create("probe", vec![], vec![], None, "admin-token")
            .await
            .unwrap();
        lifecycle(store.clone(), manual).await;
        // The key survives a restart and still verifies.
        drop(keys);
        drop(store);
        let (_, store) = redb(dir.path());
        let keys = ApiKeys::new(store);
        keys.verify(presented.expose(), T0 + 10_000_000)
            .await
            .unwrap();
        // No file of the data directory (database, write-ahead log) holds the secret.
        let secret = &presented.expose()[4 + ID_LEN + 1..];
        let mut stack = vec![dir.path().to_owned()];
        let mut files = 0;
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files += 1;
                    let bytes = std::fs::read(&p).unwrap();
                    assert!(!contains(&bytes, secret.as_bytes()), "{}", p.display());
                }
            }
        }
        assert!(files > 0);
    }

    #[tokio::test]
    async fn malformed_keys_are_refused_without_echo() {
        let (_, store) = mem().await;
        let keys = ApiKeys::new(store);
        let (key, presented) = keys
            .create("k", vec![], vec![], None, "admin-token")
            .await
            .unwrap();
        let good = presented.expose();
        let secret = &good[4 + ID_LEN + 1..];
        let cases = [
            String::new(),
            "hvn_".into(),
            "hvn__".into(),
            format!("hvn_{}", key.id),
            format!("hvn_{}_", key.id),
            format!("HVN_{}_{secret}", key.id),
            format!("hvn_{}_{}", key.id, &secret[1..]),
            format!("hvn_{}_{secret}x", key.id),
            format!("hvn_{}_{}=", key.id, &secret[1..]),
            format!("hvn_{}_{}", key.id.to_uppercase(), secret),
            format!("hvn_{}a_{secret}", key.id),
            format!("hvn_{}_{}", &key.id[1..], secret),
            format!("hvn_{}_{}+", key.id, &secret[1..]),
            format!("hvn_{}_{}é", key.id, &secret[2..]),
            format!(" {good}"),
            format!("{good} "),
            format!("Bearer {good}"),
        ];
        for c in &cases {
            let e = keys.verify(c, T0).await.unwrap_err();
            assert!(matches!(e, ApiKeyError::Malformed), "{c:?}: {e}");
            assert!(!e.to_string().contains(secret));
        }
        assert!(!looks_like_api_key("eyJhbGciOiJSUzI1NiJ9.e30.sig"));
        assert!(looks_like_api_key("hvn_whatever"));
        keys.verify(good, T0).await.unwrap();
    }

    #[tokio::test]
    async fn bad_input_is_refused_and_changes_nothing() {
        let (_, store) = mem().await;
        let keys = ApiKeys::new(store.clone());
        let before = store.last_seq().await.unwrap();
        let long = "s".repeat(MAX_SCOPE_LEN + 1);
        type Request<'a> = (&'a str, Vec<String>, Vec<String>, Option<u64>);
        let bad: Vec<Request> = vec![
            ("", vec![], vec![], None),
            ("   ", vec![], vec![], None),
            ("a\nb", vec![], vec![], None),
            ("k", strings(&["mcp tools"]), vec![], None),
            ("k", strings(&[""]), vec![], None),
            ("k", strings(&["a\"b"]), vec![], None),
            ("k", strings(&["a\\b"]), vec![], None),
            ("k", strings(&["é"]), vec![], None),
            ("k", vec![long.clone()], vec![], None),
            ("k", vec![], strings(&["ops team"]), None),
            ("k", vec![], vec![long], None),
            (
                "k",
                (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect(),
                vec![],
                None,
            ),
            // Expiry in the past, and now.
            ("k", vec![], vec![], Some(T0 - 1)),
            ("k", vec![], vec![], Some(T0)),
        ];
        for (name, scopes, groups, exp) in bad {
            let e = keys
                .create(name, scopes.clone(), groups.clone(), exp, "admin-token")
                .await
                .unwrap_err();
            assert!(
                matches!(e, ApiKeyError::Invalid(_)),
                "{name:?} {scopes:?}: {e}"
            );
        }
        assert!(matches!(
            keys.create("k", vec![], vec![], None, "").await,
            Err(ApiKeyError::Invalid(_))
        ));
        assert_eq!(store.last_seq().await.unwrap(), before);
        assert!(keys.list().await.unwrap().is_empty());
    }

    #[test]
    fn expiry_text() {
        assert_eq!(parse_expiry("30d", T0).unwrap(), T0 + 30 * 86_400);
        assert_eq!(parse_expiry("1d12h", T0).unwrap(), T0 + 36 * 3600);
        assert_eq!(parse_expiry("90m", T0).unwrap(), T0 + 5400);
        assert_eq!(parse_expiry("2w", T0).unwrap(), T0 + 14 * 86_400);
        assert_eq!(parse_expiry("3600s", T0).unwrap(), T0 + 3600);
        assert_eq!(
            parse_expiry("2027-01-01T00:00:00Z", T0).unwrap(),
            T0 + 31 * 86_400
        );
        assert_eq!(
            parse_expiry("2027-01-01T02:00:00+02:00", T0).unwrap(),
            T0 + 31 * 86_400
        );
        for bad in [
            "",
            "0d",
            "30",
            "d",
            "30x",
            "-1d",
            "1.5d",
            "2026-11-30T00:00:00Z",
            "2026-13-01",
            "tomorrow",
            "99999999999999999999d",
        ] {
            let e = parse_expiry(bad, T0).unwrap_err();
            assert!(matches!(e, ApiKeyError::Invalid(_)), "{bad:?}");
        }
        assert_eq!(fmt_time(T0), "2026-12-01T00:00:00Z");
    }

    /// Two nodes of a cluster share one log: a key made on one verifies on the other, and a
    /// revocation on one is refused on the other once that node has applied it.
    #[tokio::test]
    async fn revocation_reaches_the_other_node() {
        let log = MemLog::new();
        let (_, c1) = clock();
        let (_, c2) = clock();
        let (a, _) = log.join(Origin::new("r", "a"), c1).await.unwrap();
        let (b, _) = log.join(Origin::new("r", "b"), c2).await.unwrap();
        let a: Arc<dyn Store> = Arc::new(a);
        let b: Arc<dyn Store> = Arc::new(b);
        let on_a = ApiKeys::new(a.clone());
        let on_b = ApiKeys::new(b.clone());
        let (key, presented) = on_a
            .create("k", vec![], vec![], None, "admin-token")
            .await
            .unwrap();
        // b does not know the id yet: it catches up with the log before answering.
        on_b.verify(presented.expose(), T0).await.unwrap();
        // b's feed announces an entry once b's index has applied it.
        let mut feed = b.subscribe();
        on_a.revoke(&key.id, "admin-token").await.unwrap();
        let target = a.last_seq().await.unwrap();
        while feed.recv().await.unwrap().seq < target {}
        assert!(matches!(
            on_b.verify(presented.expose(), T0).await,
            Err(ApiKeyError::Revoked(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever a client sends as a bearer credential, verification refuses it with one of
        /// the refusals (never a panic, a store error or a principal), and the refusal does
        /// not repeat what was sent.
        #[test]
        fn any_credential_is_refused_cleanly(
            tail in "[a-z0-9_A-Z+/=é -]{0,70}",
            raw in ".{0,80}",
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (_, store) = mem().await;
                let keys = ApiKeys::new(store);
                keys.create("k", vec![], vec![], None, "admin-token").await.unwrap();
                for c in [format!("hvn_{tail}"), raw.clone()] {
                    let e = keys.verify(&c, T0).await.unwrap_err();
                    assert!(e.is_refusal(), "{c:?}: {e}");
                    // Past where an id would end: what a secret would be.
                    if let Some(rest) = c.get(17..).filter(|r| r.len() >= 8) {
                        assert!(!e.to_string().contains(rest), "{c:?}: {e}");
                    }
                }
            });
        }

        /// Any expiry text is a time in the future or an `Invalid` error.
        #[test]
        fn any_expiry_text_is_parsed_or_refused(text in ".{0,40}", digits in "[0-9]{1,25}[smhdw]") {
            for t in [text, digits] {
                match parse_expiry(&t, T0) {
                    Ok(at) => assert!(at > T0),
                    Err(e) => assert!(matches!(e, ApiKeyError::Invalid(_))),
                }
            }
        }
    }
}
