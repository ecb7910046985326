//! Legacy-era sessions, kept as records in the store so that any node (or the same node after a
//! restart) can continue them.

use std::sync::Arc;

use haven_state::{Batch, Expect, Store, StoreError};
use rmcp::model::{ClientCapabilities, Implementation, LoggingLevel};
use serde::{Deserialize, Serialize};

/// Namespace of session records.
pub const SESSIONS_NS: &str = "sessions";

/// A legacy MCP session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The `MCP-Session-Id`.
    pub id: String,
    /// Negotiated protocol version.
    pub protocol_version: String,
    /// Client identity from `initialize`.
    pub client_info: Option<Implementation>,
    /// Client capabilities from `initialize`.
    pub client_capabilities: ClientCapabilities,
    /// Minimum level of log notifications the client asked for (`logging/setLevel`).
    #[serde(default)]
    pub log_level: Option<LoggingLevel>,
    /// Resource URIs the client subscribed to, as sessions made by an older Haven kept them
    /// (read, never written: subscriptions are records of their own, [`SUBSCRIPTIONS_NS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<String>,
    /// Creation time, Unix milliseconds.
    pub created_millis: u64,
    /// The principal that created the session ([`haven_auth::Principal::id`]); `None` for a
    /// session created without authentication. Only the same principal can use the session,
    /// its streams and its requests: to anyone else it does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl SessionRecord {
    /// Whether `principal` may use this session.
    pub fn belongs_to(&self, principal: &haven_auth::Principal) -> bool {
        self.owner == owner_of(principal)
    }
}

/// The owner recorded for what `principal` creates: `None` when authentication is off.
pub fn owner_of(principal: &haven_auth::Principal) -> Option<String> {
    (!principal.is_anonymous()).then(|| principal.id())
}

/// A session as read from the store, with the revision to update it against.
#[derive(Clone, Debug)]
pub struct LoadedSession {
    /// The session.
    pub record: Arc<SessionRecord>,
    /// Store revision, for compare-and-set updates.
    pub revision: u64,
    /// When the record expires (Unix milliseconds), if it does.
    pub expires_at_millis: Option<u64>,
}

/// Most sessions kept in a node's session cache.
const CACHE_CAPACITY: usize = 100_000;

/// Sessions recently used on this node. Every request of a legacy session needs its record;
/// the cache saves the store read and the decoding. Entries are dropped when the store
/// reports a change of the session (from any node) and when this node changes it.
#[derive(Default)]
pub struct SessionCache {
    entries: parking_lot::Mutex<std::collections::HashMap<String, LoadedSession>>,
}

impl SessionCache {
    /// The live session `id`, from the cache or the store.
    pub async fn load(
        &self,
        store: &dyn Store,
        id: &str,
    ) -> Result<Option<LoadedSession>, StoreError> {
        let now = store.clock().wall_millis();
        if let Some(s) = self.entries.lock().get(id)
            && s.expires_at_millis.is_none_or(|at| now < at)
        {
            return Ok(Some(s.clone()));
        }
        let loaded = load(store, id).await?;
        if let Some(s) = &loaded {
            let mut entries = self.entries.lock();
            if entries.len() >= CACHE_CAPACITY {
                // Crude but bounded: start over rather than track recency.
                entries.clear();
            }
            entries.insert(id.to_owned(), s.clone());
        }
        Ok(loaded)
    }

    /// Forgets a session (it changed).
    pub fn invalidate(&self, id: &str) {
        self.entries.lock().remove(id);
    }

    /// Forgets every session.
    pub fn clear(&self) {
        self.entries.lock().clear();
    }

    /// Drops the sessions expired at `now`. Sessions left to expire are never invalidated:
    /// the engine calls this in the background (not on a request's path) so that the cache
    /// does not hold them until it is full.
    pub fn drop_expired(&self, now: u64) {
        self.entries
            .lock()
            .retain(|_, s| s.expires_at_millis.is_none_or(|at| now < at));
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The legacy sessions this node created that have neither ended nor expired, as far as this
/// node knows: what `limits.max_sessions_per_node` bounds. A session is counted until its
/// time-to-live from its creation or its last renewal on this node runs out, or it is ended
/// here (one ended or renewed through another node is counted until its time-to-live here
/// runs out: the count errs toward expiring, never toward holding a place for ever).
#[derive(Default)]
pub struct SessionCount {
    inner: parking_lot::Mutex<CountInner>,
}

#[derive(Default)]
struct CountInner {
    by_expiry: std::collections::BTreeSet<(u64, String)>,
    expiry_of: std::collections::HashMap<String, u64>,
}

impl CountInner {
    fn drop_expired(&mut self, now: u64) {
        while let Some((at, _)) = self.by_expiry.first() {
            if *at > now {
                break;
            }
            let (_, id) = self.by_expiry.pop_first().expect("checked");
            self.expiry_of.remove(&id);
        }
    }
}

impl SessionCount {
    /// Sessions counted at `now`.
    pub fn live(&self, now: u64) -> usize {
        let mut c = self.inner.lock();
        c.drop_expired(now);
        c.expiry_of.len()
    }

    /// Counts a session that expires at `expires_at` unless `max` are counted at `now`;
    /// returns whether it did.
    pub fn admit(&self, id: &str, now: u64, expires_at: u64, max: usize) -> bool {
        let mut c = self.inner.lock();
        c.drop_expired(now);
        if c.expiry_of.len() >= max {
            return false;
        }
        c.by_expiry.insert((expires_at, id.to_owned()));
        c.expiry_of.insert(id.to_owned(), expires_at);
        true
    }

    /// A session counted here now expires at `expires_at` (renewed); one not counted stays so.
    pub fn renew(&self, id: &str, expires_at: u64) {
        let mut c = self.inner.lock();
        if let Some(old) = c.expiry_of.get_mut(id) {
            let before = std::mem::replace(old, expires_at);
            c.by_expiry.remove(&(before, id.to_owned()));
            c.by_expiry.insert((expires_at, id.to_owned()));
        }
    }

    /// A session ended.
    pub fn end(&self, id: &str) {
        let mut c = self.inner.lock();
        if let Some(at) = c.expiry_of.remove(id) {
            c.by_expiry.remove(&(at, id.to_owned()));
        }
    }
}

/// Creates a random session id: 128 bits, hex (visible ASCII as the spec requires).
pub fn new_session_id() -> String {
    format!("{:032x}", haven_state::ids::random_u128())
}

/// Stores a new session durably.
pub async fn create(
    store: &dyn Store,
    record: &SessionRecord,
    ttl_millis: u64,
) -> Result<(), StoreError> {
    let value = serde_json::to_vec(record).expect("session serializes");
    store
        .commit(Batch::new().put_ttl(SESSIONS_NS, &record.id, value, ttl_millis))
        .await
        .map(|_| ())
}

/// Loads a live session.
pub async fn load(store: &dyn Store, id: &str) -> Result<Option<LoadedSession>, StoreError> {
    if id.is_empty() || id.len() > 128 {
        return Ok(None);
    }
    let Some(r) = store.get(SESSIONS_NS, id).await? else {
        return Ok(None);
    };
    let record: SessionRecord = serde_json::from_slice(r.value())
        .map_err(|e| StoreError::Corrupt(format!("session {id}: {e}")))?;
    Ok(Some(LoadedSession {
        record: Arc::new(record),
        revision: r.revision,
        expires_at_millis: r.record.expires_at_millis,
    }))
}

/// The error when a session record would take `len` bytes, more than `max`.
pub fn too_large(len: usize, max: usize) -> String {
    format!(
        "the session would take {len} bytes; at most {max} are allowed (setting limits.max_session_bytes)"
    )
}

/// Applies `change` to a session with compare-and-set, retrying on concurrent updates.
/// Returns `None` when the session no longer exists. A record that would take more than
/// `max_bytes` is not written: [`StoreError::Invalid`] (see [`too_large`]).
pub async fn update(
    store: &dyn Store,
    id: &str,
    ttl_millis: u64,
    max_bytes: usize,
    change: impl Fn(&mut SessionRecord),
) -> Result<Option<SessionRecord>, StoreError> {
    for _ in 0..16 {
        let Some(cur) = load(store, id).await? else {
            return Ok(None);
        };
        let mut rec = (*cur.record).clone();
        change(&mut rec);
        let value = serde_json::to_vec(&rec).expect("session serializes");
        if value.len() > max_bytes {
            return Err(StoreError::Invalid(too_large(value.len(), max_bytes)));
        }
        let mut batch = Batch::new().put_if(SESSIONS_NS, id, value, Expect::Revision(cur.revision));
        if let haven_state::Op::Put { ttl_millis: t, .. } = &mut batch.ops[0] {
            *t = Some(ttl_millis);
        }
        match store.commit(batch).await {
            Ok(_) => return Ok(Some(rec)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Unavailable(format!(
        "session {id} is updated too often concurrently"
    )))
}

/// Ends a session: a tombstone, so that it answers 404 from every node from now on, and its
/// subscriptions go with it.
pub async fn end(store: &dyn Store, id: &str) -> Result<bool, StoreError> {
    if load(store, id).await?.is_none() {
        return Ok(false);
    }
    let mut batch = Batch::new().delete(SESSIONS_NS, id);
    for r in store.scan_all(SUBSCRIPTIONS_NS, &format!("{id}/")).await? {
        batch = batch.delete(SUBSCRIPTIONS_NS, &r.record.key);
    }
    store.commit(batch).await?;
    Ok(true)
}

/// Namespace of legacy sessions' resource subscriptions: a record each (`<session>/<hash of
/// the URI>`, the URI as its value, the session's time-to-live), so that a subscription
/// never makes the session's record, which every change of the session rewrites, larger.
pub const SUBSCRIPTIONS_NS: &str = "subscriptions";

fn subscription_key(session: &str, uri: &str) -> String {
    use sha2::Digest;
    format!(
        "{session}/{}",
        hex::encode(&sha2::Sha256::digest(uri.as_bytes())[..16])
    )
}

/// Whether session `session` (its record as loaded) is subscribed to `uri`.
pub async fn is_subscribed(
    store: &dyn Store,
    session: &SessionRecord,
    uri: &str,
) -> Result<bool, StoreError> {
    if session.subscriptions.iter().any(|s| s == uri) {
        return Ok(true);
    }
    Ok(store
        .get(SUBSCRIPTIONS_NS, &subscription_key(&session.id, uri))
        .await?
        .is_some_and(|r| r.value() == uri.as_bytes()))
}

/// The URIs session `session` is subscribed to, at most `limit`.
pub async fn subscriptions(
    store: &dyn Store,
    session: &SessionRecord,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut out = session.subscriptions.clone();
    let page = store
        .scan(SUBSCRIPTIONS_NS, &format!("{}/", session.id), None, limit)
        .await?;
    for r in page.records {
        let uri = String::from_utf8_lossy(r.value()).into_owned();
        if !out.contains(&uri) {
            out.push(uri);
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// Subscribes session `session` to `uri` (again: its record's life starts over). Over
/// `max` subscriptions: [`StoreError::Invalid`] with `over`'s message, nothing changed.
pub async fn subscribe(
    store: &dyn Store,
    session: &SessionRecord,
    uri: &str,
    ttl_millis: u64,
    max: usize,
    over: impl Fn() -> String,
) -> Result<(), StoreError> {
    let key = subscription_key(&session.id, uri);
    let held = store.get(SUBSCRIPTIONS_NS, &key).await?.is_some()
        || session.subscriptions.iter().any(|s| s == uri);
    if !held && subscriptions(store, session, max + 1).await?.len() >= max {
        return Err(StoreError::Invalid(over()));
    }
    store
        .commit(Batch::new().put_ttl(SUBSCRIPTIONS_NS, &key, uri.as_bytes().to_vec(), ttl_millis))
        .await
        .map(|_| ())
}

/// Unsubscribes session `session` from `uri` (also from a subscription an older Haven kept in
/// the session's record).
pub async fn unsubscribe(
    store: &dyn Store,
    session: &SessionRecord,
    uri: &str,
    ttl_millis: u64,
    max_bytes: usize,
) -> Result<(), StoreError> {
    store
        .commit(Batch::new().delete(SUBSCRIPTIONS_NS, &subscription_key(&session.id, uri)))
        .await?;
    if session.subscriptions.iter().any(|s| s == uri) {
        update(store, &session.id, ttl_millis, max_bytes, |s| {
            s.subscriptions.retain(|u| u != uri)
        })
        .await?;
    }
    Ok(())
}

/// Starts the life of a session's subscriptions over (with the session's, when it is
/// extended).
pub async fn renew_subscriptions(
    store: &dyn Store,
    id: &str,
    ttl_millis: u64,
) -> Result<(), StoreError> {
    let held = store.scan_all(SUBSCRIPTIONS_NS, &format!("{id}/")).await?;
    if held.is_empty() {
        return Ok(());
    }
    let mut batch = Batch::new();
    for r in held {
        batch = batch.put_ttl(
            SUBSCRIPTIONS_NS,
            &r.record.key,
            r.value().to_vec(),
            ttl_millis,
        );
    }
    store.commit(batch).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_state::{HybridClock, ManualClock, MemStore, Origin};

    fn record(id: String) -> SessionRecord {
        SessionRecord {
            id,
            protocol_version: "2025-11-25".into(),
            client_info: None,
            client_capabilities: ClientCapabilities::default(),
            log_level: None,
            subscriptions: Vec::new(),
            created_millis: 0,
            owner: None,
        }
    }

    /// Sessions left to expire leave the cache at a sweep, not only when it is full.
    #[tokio::test]
    async fn expired_sessions_leave_the_cache() {
        let wall = Arc::new(ManualClock::new(1_800_000_000_000));
        let store = MemStore::open_alone(
            Origin::new("r", "n"),
            Arc::new(HybridClock::new(wall.clone())),
        )
        .await
        .unwrap();
        let cache = SessionCache::default();
        for round in 0..2 {
            for i in 0..100 {
                let id = format!("{round}-{i}");
                create(&store, &record(id.clone()), 1_000).await.unwrap();
                assert!(cache.load(&store, &id).await.unwrap().is_some());
            }
            wall.advance(2_000);
        }
        assert_eq!(cache.len(), 200);
        // The first round's sessions expired, then the second's.
        cache.drop_expired(1_800_000_000_000 + 2_500);
        assert_eq!(cache.len(), 100);
        cache.drop_expired(1_800_000_000_000 + 4_500);
        assert!(cache.is_empty());
    }

    /// The per-node session count lets sessions go when they expire or end, and a renewal
    /// keeps one counted.
    #[test]
    fn the_session_count_follows_expiry_renewal_and_end() {
        let c = SessionCount::default();
        assert!(c.admit("a", 0, 100, 2));
        assert!(c.admit("b", 0, 200, 2));
        assert!(!c.admit("c", 50, 300, 2), "full");
        c.renew("a", 400);
        assert!(!c.admit("c", 150, 300, 2), "a was renewed");
        assert!(c.admit("c", 250, 300, 2), "b expired");
        c.end("a");
        assert_eq!(c.live(260), 1);
        assert_eq!(c.live(300), 0);
    }
}
