//! The request-state keyring on the secrets service: key material is a secret, the `keys`
//! records hold metadata only (earlier plaintext records are migrated), rotation keeps old
//! values opening until the old key is retired, and a change made elsewhere is picked up.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use haven_catalogs::DefaultCatalog;
use haven_mcp::engine::{Engine, EngineConfig};
use haven_mcp::keyring::{
    KEYS_NS, KekSource, Keyring, KeyringError, REQUEST_STATE_PREFIX, Secrets, secret_name,
};
use haven_mcp::rmcp::model::{RequestStateCodec, SealOptions};
use haven_state::{Batch, Store};

/// A store in `dir` (for the trait object the services take).
fn open_store(dir: &std::path::Path) -> Arc<dyn Store> {
    haven_testkit::redb_store(dir)
}

fn seal(ring: &Keyring, payload: &str) -> String {
    ring.codec().unwrap().seal_with(
        payload.as_bytes(),
        &SealOptions::new().associated_data(b"m"),
    )
}

fn opens(ring: &Keyring, sealed: &str) -> bool {
    ring.codec().unwrap().open_with(sealed, b"m").is_ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that no `keys` record holds any live key's material (raw or base64).
async fn assert_no_material_in_key_records(store: &Arc<dyn Store>, ring: &Keyring) {
    let page = store
        .scan(KEYS_NS, REQUEST_STATE_PREFIX, None, 100)
        .await
        .unwrap();
    assert!(!page.records.is_empty());
    for r in &page.records {
        let v: serde_json::Value = serde_json::from_slice(r.value()).unwrap();
        assert!(v.get("secret").is_none(), "{v}");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["created_millis", "kid", "retired"], "{v}");
    }
    for kid in ring.live_kids() {
        let material = ring
            .secrets()
            .get(&secret_name(&kid))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(material.len(), 32);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&material[..]);
        for r in &page.records {
            assert!(!contains(r.value(), &material), "raw material of {kid}");
            assert!(
                !contains(r.value(), b64.as_bytes()),
                "base64 material of {kid}"
            );
        }
    }
}

#[tokio::test]
async fn rotate_keeps_old_values_opening_until_retired() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let secrets = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let ring = Keyring::load(store.clone(), secrets.clone()).await.unwrap();
    let first = ring.active_kid();
    assert_eq!(ring.live_kids(), std::slice::from_ref(&first));
    assert!(secrets.get(&secret_name(&first)).await.unwrap().is_some());
    assert_no_material_in_key_records(&store, &ring).await;

    let old = seal(&ring, "before rotation");
    let second = ring.rotate().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(ring.active_kid(), second);
    assert!(
        opens(&ring, &old),
        "a value sealed before rotate opens after it"
    );
    let new = seal(&ring, "after rotation");
    assert!(opens(&ring, &new));
    assert_no_material_in_key_records(&store, &ring).await;

    ring.retire(&first).await.unwrap();
    assert!(!opens(&ring, &old), "a retired key no longer verifies");
    assert!(opens(&ring, &new));
    assert_eq!(ring.live_kids(), std::slice::from_ref(&second));
    // Its material is gone from the secrets service; the record stays, marked retired.
    assert!(secrets.get(&secret_name(&first)).await.unwrap().is_none());
    let list = ring.list().await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(list[0].retired && list[0].kid == first && !list[1].retired);
    // Retiring again is a no-op; the only live key cannot be retired; unknown keys are named.
    ring.retire(&first).await.unwrap();
    let e = ring.retire(&second).await.unwrap_err();
    assert!(matches!(e, KeyringError::LastLiveKey(_)), "{e}");
    assert!(e.to_string().contains("rotate first"), "{e}");
    assert!(opens(&ring, &new));
    let e = ring.retire("k-nope").await.unwrap_err();
    assert!(matches!(e, KeyringError::NotFound(_)), "{e}");

    // A second load (another process) finds the same keys.
    let again = Keyring::load(store.clone(), secrets).await.unwrap();
    assert_eq!(again.active_kid(), second);
    assert!(opens(&again, &new) && !opens(&again, &old));
}

#[tokio::test]
async fn plaintext_key_records_are_migrated_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let material = [7u8; 32];
    let b64 = base64::engine::general_purpose::STANDARD.encode(material);
    let old_record = serde_json::json!({
        "kid": "kold", "secret": b64, "created_millis": 1000u64, "retired": false
    });
    let retired_record = serde_json::json!({
        "kid": "kgone", "secret": base64::engine::general_purpose::STANDARD.encode([9u8; 32]),
        "created_millis": 500u64, "retired": true
    });
    store
        .commit(
            Batch::new()
                .put(
                    KEYS_NS,
                    "request-state/kold",
                    serde_json::to_vec(&old_record).unwrap(),
                )
                .put(
                    KEYS_NS,
                    "request-state/kgone",
                    serde_json::to_vec(&retired_record).unwrap(),
                ),
        )
        .await
        .unwrap();
    // A value sealed by a node of the earlier version.
    let legacy = RequestStateCodec::new_with_keyring("kold", [("kold", material.to_vec())])
        .unwrap()
        .seal_with(b"legacy", &SealOptions::new().associated_data(b"m"));

    let secrets = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let ring = Keyring::load(store.clone(), secrets.clone()).await.unwrap();
    assert_eq!(ring.active_kid(), "kold", "a migrated key keeps signing");
    assert!(opens(&ring, &legacy));
    assert_eq!(
        &secrets.get(&secret_name("kold")).await.unwrap().unwrap()[..],
        &material
    );
    // The retired key's material is dropped, not moved.
    assert!(secrets.get(&secret_name("kgone")).await.unwrap().is_none());
    assert_no_material_in_key_records(&store, &ring).await;
    let gone = store
        .get(KEYS_NS, "request-state/kgone")
        .await
        .unwrap()
        .unwrap();
    assert!(!contains(gone.value(), b"secret"));
}

#[tokio::test]
async fn keys_unreadable_here_are_skipped_and_a_usable_one_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let a = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let ring_a = Keyring::load(store.clone(), a).await.unwrap();
    // A node whose key-encryption keys differ cannot read node A's key: it leaves it out and
    // signs with one of its own.
    let b = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let ring_b = Keyring::load(store.clone(), b).await.unwrap();
    assert_ne!(ring_b.active_kid(), ring_a.active_kid());
    assert_eq!(ring_b.live_kids(), [ring_b.active_kid()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_reloads_keys_changed_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let secrets = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let engine = Engine::start(
        store.clone(),
        Arc::new(DefaultCatalog::new()),
        EngineConfig::default(),
        secrets.clone(),
    )
    .await
    .unwrap();
    let before = engine.keyring().active_kid();
    assert_eq!(
        engine.secrets().primary_kid(),
        secrets.primary_kid(),
        "the engine exposes its secrets service"
    );
    // Another "node" on the same store rotates.
    let other = Keyring::load(store.clone(), secrets).await.unwrap();
    let new = other.rotate().await.unwrap();
    assert_ne!(before, new);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.keyring().active_kid() != new {
        assert!(
            tokio::time::Instant::now() < deadline,
            "engine did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(engine.keyring().live_kids(), [before, new]);
}
