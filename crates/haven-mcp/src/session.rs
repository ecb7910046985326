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
    /// Resource URIs the client subscribed to.
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Creation time, Unix milliseconds.
    pub created_millis: u64,
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

/// Ends a session: a tombstone, so that it answers 404 from every node from now on.
pub async fn end(store: &dyn Store, id: &str) -> Result<bool, StoreError> {
    if load(store, id).await?.is_none() {
        return Ok(false);
    }
    store.commit(Batch::new().delete(SESSIONS_NS, id)).await?;
    Ok(true)
}
