//! Keys shared by every node: today the HMAC keys that protect the `requestState` of
//! input-required results. The newest live key signs; every live key verifies, so a key can be
//! rotated while requests are in flight and retired afterwards.
//!
//! Key material is a secret of the secrets service (envelope-encrypted, name
//! `system/request-state/<kid>`, see [`haven_secrets`]); namespace [`KEYS_NS`] keeps
//! only each key's metadata ([`KeyRecord`]), whose changes every node watches to reload. Records
//! of the earlier format, which held the material in plain text, are migrated when read: the
//! material becomes a secret and the record is rewritten without it.

use std::sync::Arc;

use base64::Engine as _;
use haven_state::{Batch, Expect, Store, StoreError, StoredRecord};
use parking_lot::RwLock;
use rand::RngCore;
use rmcp::model::RequestStateCodec;
use serde::{Deserialize, Serialize};

pub use haven_secrets::{KekSource, Secrets, SecretsError, Zeroizing};

/// Namespace of key records.
pub const KEYS_NS: &str = "keys";
/// Key prefix of request-state HMAC keys.
pub const REQUEST_STATE_PREFIX: &str = "request-state/";
/// Name prefix of the secrets holding request-state key material.
pub const SECRET_PREFIX: &str = "system/request-state/";

const KEY_LEN: usize = 32;
const CAS_ATTEMPTS: usize = 16;

/// Errors of keyring operations. Messages say what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// No key of that id.
    #[error("there is no request-state key '{0}'")]
    NotFound(String),
    /// Retiring the key would leave no live key to sign with.
    #[error(
        "request-state key '{0}' is the only live key; rotate first, so that a new key signs before this one is retired"
    )]
    LastLiveKey(String),
    /// The key signs new values now; retiring it would fall back to an older key.
    #[error(
        "request-state key '{0}' is the one that signs now; rotate first (`haven secrets rotate-key`), then retire it"
    )]
    SigningKey(String),
    /// A key record could not be read.
    #[error("request-state key record '{key}' is unreadable: {detail}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// The secrets service failed (keys missing, tampering).
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A stored key's metadata; the material is the secret [`secret_name`]`(kid)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Key id, carried in every value the key seals.
    pub kid: String,
    /// Creation time, Unix milliseconds.
    pub created_millis: u64,
    /// Retired keys neither sign nor verify.
    #[serde(default)]
    pub retired: bool,
}

/// A `keys` record as read: the current form, or the earlier one with plaintext material.
#[derive(Deserialize)]
struct StoredKey {
    kid: String,
    #[serde(default)]
    secret: Option<String>,
    created_millis: u64,
    #[serde(default)]
    retired: bool,
}

impl StoredKey {
    fn metadata(&self) -> KeyRecord {
        KeyRecord {
            kid: self.kid.clone(),
            created_millis: self.created_millis,
            retired: self.retired,
        }
    }
}

/// Name of the secret holding the material of request-state key `kid`.
pub fn secret_name(kid: &str) -> String {
    format!("{SECRET_PREFIX}{kid}")
}

/// What the keyring has loaded.
#[derive(Default)]
struct Loaded {
    codec: Option<Arc<RequestStateCodec>>,
    active: String,
    /// Live keys whose material this node could read, oldest first.
    live: Vec<String>,
}

/// The request-state keyring: a codec rebuilt whenever the stored keys change. Cheap to clone.
#[derive(Clone)]
pub struct Keyring {
    store: Arc<dyn Store>,
    secrets: Secrets,
    loaded: Arc<RwLock<Loaded>>,
    /// Serializes reloads, so that an older read never replaces a newer one.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self.loaded.read();
        f.debug_struct("Keyring")
            .field("active", &l.active)
            .field("live", &l.live)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Loads the keyring (migrating records of the earlier plaintext format), creating a first
    /// key if no live key is usable.
    pub async fn load(store: Arc<dyn Store>, secrets: Secrets) -> Result<Keyring, KeyringError> {
        let ring = Keyring {
            store,
            secrets,
            loaded: Arc::new(RwLock::new(Loaded::default())),
            reload_lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        ring.reload().await?;
        if ring.loaded.read().codec.is_none() {
            ring.rotate().await?;
        }
        Ok(ring)
    }

    /// The secrets service holding the key material.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Every request-state key record, with its revision.
    async fn records(&self) -> Result<Vec<(StoredRecord, StoredKey)>, KeyringError> {
        let records = self.store.scan_all(KEYS_NS, REQUEST_STATE_PREFIX).await?;
        records
            .into_iter()
            .map(|r| {
                let k: StoredKey =
                    serde_json::from_slice(r.value()).map_err(|e| KeyringError::Corrupt {
                        key: r.record.key.clone(),
                        detail: e.to_string(),
                    })?;
                Ok((r, k))
            })
            .collect()
    }

    /// Moves the plaintext material of an earlier-format record into a secret (unless the key
    /// is retired: then it is dropped) and rewrites the record without it.
    async fn migrate(&self, r: &StoredRecord, k: &StoredKey) -> Result<(), KeyringError> {
        let Some(secret) = &k.secret else {
            return Ok(());
        };
        if !k.retired {
            let material = decode_material(&r.record.key, secret)?;
            self.secrets.set(&secret_name(&k.kid), &material).await?;
        }
        let value = serde_json::to_vec(&k.metadata()).expect("key record serializes");
        match self
            .store
            .commit(Batch::new().put_if(
                KEYS_NS,
                &r.record.key,
                value,
                Expect::Revision(r.revision),
            ))
            .await
        {
            // A conflict: the record changed meanwhile (another node migrated it); the change
            // triggers another reload.
            Ok(_) | Err(StoreError::Conflict { .. }) => {
                tracing::info!(kid = %k.kid, "moved a request-state key into the secrets service");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Rebuilds the codec from the stored keys (called on start and when keys change). A live
    /// key whose material this node cannot read (wrapped under a key-encryption key it lacks,
    /// or missing) is left out with an error in the log.
    pub async fn reload(&self) -> Result<(), KeyringError> {
        let _serial = self.reload_lock.lock().await;
        let mut live: Vec<(u64, String, Zeroizing<Vec<u8>>)> = Vec::new();
        for (r, k) in self.records().await? {
            if k.secret.is_some() {
                self.migrate(&r, &k).await?;
            }
            if k.retired {
                continue;
            }
            let material = if let Some(secret) = &k.secret {
                decode_material(&r.record.key, secret)?
            } else {
                match self.secrets.get(&secret_name(&k.kid)).await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        tracing::error!(kid = %k.kid, "request-state key has no material in the secrets service; it is not used");
                        continue;
                    }
                    Err(SecretsError::Store(e)) => return Err(e.into()),
                    Err(e) => {
                        tracing::error!(kid = %k.kid, error = %e, "request-state key is unreadable on this node; it is not used");
                        continue;
                    }
                }
            };
            if material.len() != KEY_LEN {
                tracing::error!(kid = %k.kid, "request-state key material has the wrong length; it is not used");
                continue;
            }
            live.push((k.created_millis, k.kid, material));
        }
        live.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let Some((_, active, _)) = live.last() else {
            *self.loaded.write() = Loaded::default();
            return Ok(());
        };
        let active = active.clone();
        let kids: Vec<String> = live.iter().map(|(_, kid, _)| kid.clone()).collect();
        let codec = RequestStateCodec::new_with_keyring(
            active.clone(),
            live.iter().map(|(_, kid, m)| (kid.clone(), m.to_vec())),
        )
        .map_err(|e| KeyringError::Corrupt {
            key: REQUEST_STATE_PREFIX.into(),
            detail: e.to_string(),
        })?;
        *self.loaded.write() = Loaded {
            codec: Some(Arc::new(codec)),
            active,
            live: kids,
        };
        Ok(())
    }

    /// Adds a new signing key; older keys keep verifying until retired.
    pub async fn rotate(&self) -> Result<String, KeyringError> {
        let mut material = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(&mut material[..]);
        let created_millis = self.store.clock().wall_millis();
        let kid = format!(
            "k{created_millis:x}{:04x}",
            haven_state::ids::random_u64() as u16
        );
        // The material first: a node that sees the record finds it.
        self.secrets.set(&secret_name(&kid), &material[..]).await?;
        let rec = KeyRecord {
            kid: kid.clone(),
            created_millis,
            retired: false,
        };
        let value = serde_json::to_vec(&rec).expect("key record serializes");
        if let Err(e) = self
            .store
            .commit(Batch::new().put_if(
                KEYS_NS,
                &format!("{REQUEST_STATE_PREFIX}{kid}"),
                value,
                Expect::Absent,
            ))
            .await
        {
            let _ = self.secrets.delete(&secret_name(&kid)).await;
            return Err(e.into());
        }
        self.reload().await?;
        tracing::info!(%kid, "new request-state signing key");
        Ok(kid)
    }

    /// Retires key `kid`: it no longer signs or verifies, and its material is deleted. Refuses
    /// to retire the last live key this node can use (rotate first).
    pub async fn retire(&self, kid: &str) -> Result<(), KeyringError> {
        let key = format!("{REQUEST_STATE_PREFIX}{kid}");
        self.reload().await?;
        let mut attempts = 0;
        loop {
            let Some(r) = self.store.get(KEYS_NS, &key).await? else {
                return Err(KeyringError::NotFound(kid.to_owned()));
            };
            let k: StoredKey =
                serde_json::from_slice(r.value()).map_err(|e| KeyringError::Corrupt {
                    key: key.clone(),
                    detail: e.to_string(),
                })?;
            if k.retired {
                break;
            }
            if !self.live_kids().iter().any(|live| live != kid) {
                return Err(KeyringError::LastLiveKey(kid.to_owned()));
            }
            if self.active_kid() == kid {
                return Err(KeyringError::SigningKey(kid.to_owned()));
            }
            let rec = KeyRecord {
                retired: true,
                ..k.metadata()
            };
            let value = serde_json::to_vec(&rec).expect("key record serializes");
            match self
                .store
                .commit(Batch::new().put_if(KEYS_NS, &key, value, Expect::Revision(r.revision)))
                .await
            {
                Ok(_) => break,
                Err(StoreError::Conflict { .. }) if attempts < CAS_ATTEMPTS => attempts += 1,
                Err(e) => return Err(e.into()),
            }
        }
        self.secrets.delete(&secret_name(kid)).await?;
        self.reload().await?;
        tracing::info!(%kid, "retired a request-state key");
        Ok(())
    }

    /// Every request-state key's metadata (retired ones included), oldest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, KeyringError> {
        let mut out: Vec<KeyRecord> = self
            .records()
            .await?
            .iter()
            .map(|(_, k)| k.metadata())
            .collect();
        out.sort_by(|a, b| (a.created_millis, &a.kid).cmp(&(b.created_millis, &b.kid)));
        Ok(out)
    }

    /// The codec that seals and opens request state.
    pub fn codec(&self) -> Option<Arc<RequestStateCodec>> {
        self.loaded.read().codec.clone()
    }

    /// Id of the key that signs new values.
    pub fn active_kid(&self) -> String {
        self.loaded.read().active.clone()
    }

    /// Ids of the live keys this node uses (they verify; the newest signs), oldest first.
    pub fn live_kids(&self) -> Vec<String> {
        self.loaded.read().live.clone()
    }
}

fn decode_material(key: &str, secret: &str) -> Result<Zeroizing<Vec<u8>>, KeyringError> {
    base64::engine::general_purpose::STANDARD
        .decode(secret)
        .map(Zeroizing::new)
        .map_err(|_| KeyringError::Corrupt {
            key: key.to_owned(),
            detail: "the key material is not base64".into(),
        })
}
