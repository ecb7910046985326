//! Keys shared by every node, kept in the store: today the HMAC keys that protect the
//! `requestState` of input-required results. The newest live key signs; every live key
//! verifies, so a key can be rotated while requests are in flight and retired afterwards.

use std::sync::Arc;

use base64::Engine as _;
use haven_state::{Batch, Store, StoreError};
use parking_lot::RwLock;
use rand::RngCore;
use rmcp::model::RequestStateCodec;
use serde::{Deserialize, Serialize};

/// Namespace of key records.
pub const KEYS_NS: &str = "keys";
/// Key prefix of request-state HMAC keys.
pub const REQUEST_STATE_PREFIX: &str = "request-state/";

/// A stored key. Until the secrets service encrypts it, the key material is stored as is.
#[derive(Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Key id, carried in every value the key seals.
    pub kid: String,
    /// Key material, base64.
    pub secret: String,
    /// Creation time, Unix milliseconds.
    pub created_millis: u64,
    /// Retired keys neither sign nor verify.
    #[serde(default)]
    pub retired: bool,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("kid", &self.kid)
            .field("secret", &"<redacted>")
            .field("created_millis", &self.created_millis)
            .field("retired", &self.retired)
            .finish()
    }
}

/// The request-state keyring: a codec rebuilt whenever the stored keys change.
#[derive(Clone)]
pub struct Keyring {
    store: Arc<dyn Store>,
    codec: Arc<RwLock<Option<Arc<RequestStateCodec>>>>,
    active: Arc<RwLock<String>>,
}

impl Keyring {
    /// Loads the keyring, creating a first key if the store holds none.
    pub async fn load(store: Arc<dyn Store>) -> Result<Keyring, StoreError> {
        let ring = Keyring {
            store,
            codec: Arc::new(RwLock::new(None)),
            active: Arc::new(RwLock::new(String::new())),
        };
        if ring.live_keys().await?.is_empty() {
            ring.rotate().await?;
        }
        ring.reload().await?;
        Ok(ring)
    }

    async fn live_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut keys = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .scan(KEYS_NS, REQUEST_STATE_PREFIX, after.as_deref(), 256)
                .await?;
            for r in &page.records {
                let k: KeyRecord = serde_json::from_slice(r.value()).map_err(|e| {
                    StoreError::Corrupt(format!("key record {}: {e}", r.record.key))
                })?;
                if !k.retired {
                    keys.push(k);
                }
            }
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        keys.sort_by(|a, b| (a.created_millis, &a.kid).cmp(&(b.created_millis, &b.kid)));
        Ok(keys)
    }

    /// Rebuilds the codec from the stored keys (called on start and when keys change).
    pub async fn reload(&self) -> Result<(), StoreError> {
        let keys = self.live_keys().await?;
        let Some(newest) = keys.last() else {
            *self.codec.write() = None;
            return Ok(());
        };
        let active = newest.kid.clone();
        let mut material = Vec::new();
        for k in &keys {
            let secret = base64::engine::general_purpose::STANDARD
                .decode(&k.secret)
                .map_err(|e| StoreError::Corrupt(format!("key {}: {e}", k.kid)))?;
            material.push((k.kid.clone(), secret));
        }
        let codec = RequestStateCodec::new_with_keyring(active.clone(), material)
            .map_err(|e| StoreError::Corrupt(format!("keyring: {e}")))?;
        *self.codec.write() = Some(Arc::new(codec));
        *self.active.write() = active;
        Ok(())
    }

    /// Adds a new signing key; older keys keep verifying until retired.
    pub async fn rotate(&self) -> Result<String, StoreError> {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let created_millis = self.store.clock().wall_millis();
        let kid = format!("k{created_millis:x}{:04x}", rand::random::<u16>());
        let rec = KeyRecord {
            kid: kid.clone(),
            secret: base64::engine::general_purpose::STANDARD.encode(secret),
            created_millis,
            retired: false,
        };
        let value = serde_json::to_vec(&rec).expect("key record serializes");
        self.store
            .commit(Batch::new().put_if(
                KEYS_NS,
                &format!("{REQUEST_STATE_PREFIX}{kid}"),
                value,
                haven_state::Expect::Absent,
            ))
            .await?;
        self.reload().await?;
        Ok(kid)
    }

    /// The codec that seals and opens request state.
    pub fn codec(&self) -> Option<Arc<RequestStateCodec>> {
        self.codec.read().clone()
    }

    /// Id of the key that signs new values.
    pub fn active_kid(&self) -> String {
        self.active.read().clone()
    }
}
