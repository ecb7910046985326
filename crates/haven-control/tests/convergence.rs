//! Convergence of the control plane's records: the same set of concurrent updates (made by three
//! nodes with their own clocks, some of them removals) applied to two stores in different orders
//! leaves both stores equal, record by record and as the registry and configuration services
//! read them. The merge rule is last-writer-wins by (HLC, origin) with tombstones for every
//! record kind here (ARCHITECTURE.md, "Merge rules").

use std::collections::BTreeSet;
use std::sync::Arc;

use haven_control::config::{CONFIG_NS, ConfigService};
use haven_control::registry::{REGISTRY_NS, Registry};
use haven_state::{Batch, Hlc, HybridClock, Op, Origin, Record, RedbStore, Store, Version};
use proptest::prelude::*;

const KINDS: &[&str] = &[REGISTRY_NS, CONFIG_NS, "secrets", "keys"];

#[derive(Clone, Debug)]
struct Update {
    node: usize,
    kind: usize,
    key: usize,
    millis: u64,
    logical: u16,
    delete: bool,
    variant: u8,
}

fn key_of(kind: &str, key: usize) -> String {
    match kind {
        k if k == CONFIG_NS => ["upstream.timeout_ms", "log.level", "catalog"][key].to_owned(),
        k if k == REGISTRY_NS => ["alpha", "beta", "gamma"][key].to_owned(),
        "secrets" => ["api/token", "db-password", "system/request-state/k1"][key].to_owned(),
        _ => ["request-state/k1", "request-state/k2", "request-state/k3"][key].to_owned(),
    }
}

fn value_of(kind: &str, key: &str, variant: u8, node: usize) -> Vec<u8> {
    let v = match kind {
        k if k == CONFIG_NS => {
            let value = match key {
                "upstream.timeout_ms" => serde_json::json!(1000 + variant as u64),
                "log.level" => serde_json::json!(["info", "debug", "warn"][variant as usize % 3]),
                _ => serde_json::json!(["default", "none", "conformance"][variant as usize % 3]),
            };
            serde_json::json!({ "value": value, "set_millis": variant, "set_by": format!("r/n{node}") })
        }
        k if k == REGISTRY_NS => serde_json::json!({
            "name": key,
            "transport": "http",
            "url": format!("http://127.0.0.1:{}/mcp", 3000 + variant as u16),
        }),
        _ => serde_json::json!({ "opaque": format!("{key}-{variant}-{node}") }),
    };
    serde_json::to_vec(&v).unwrap()
}

fn record(u: &Update) -> Record {
    let ns = KINDS[u.kind];
    let key = key_of(ns, u.key);
    Record {
        namespace: ns.to_owned(),
        value: (!u.delete).then(|| value_of(ns, &key, u.variant, u.node)),
        key,
        version: Version {
            hlc: Hlc::new(u.millis, u.logical),
            origin: Origin::new("r", format!("n{}", u.node)),
        },
        expires_at_millis: None,
    }
}

fn update() -> impl Strategy<Value = Update> {
    (
        0..3usize,
        0..KINDS.len(),
        0..3usize,
        1..40u64,
        0..3u16,
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(
            |(node, kind, key, millis, logical, delete, variant)| Update {
                node,
                kind,
                key,
                millis,
                logical,
                delete: delete && variant % 3 == 0,
                variant,
            },
        )
}

/// Updates with distinct versions per key (one node never stamps two writes alike), plus two
/// permutations of them.
fn scenario() -> impl Strategy<Value = (Vec<Record>, Vec<usize>, Vec<usize>, usize)> {
    proptest::collection::vec(update(), 1..40)
        .prop_map(|updates| {
            let mut seen = BTreeSet::new();
            updates
                .iter()
                .filter(|u| seen.insert((u.kind, u.key, u.millis, u.logical, u.node)))
                .map(record)
                .collect::<Vec<_>>()
        })
        .prop_flat_map(|records| {
            let n = records.len();
            let order: Vec<usize> = (0..n).collect();
            (
                Just(records),
                Just(order.clone()).prop_shuffle(),
                Just(order).prop_shuffle(),
                1..5usize,
            )
        })
}

fn open(dir: &std::path::Path, node: &str) -> Arc<dyn Store> {
    Arc::new(
        RedbStore::open(
            dir,
            Origin::new("r", node),
            Arc::new(HybridClock::default()),
        )
        .unwrap(),
    )
}

async fn apply(store: &dyn Store, records: &[Record], order: &[usize], batch: usize) {
    for chunk in order.chunks(batch) {
        let ops = chunk
            .iter()
            .map(|&i| Op::Merge(records[i].clone()))
            .collect();
        store.commit(Batch { ops }).await.unwrap();
    }
}

async fn state(store: &dyn Store) -> Vec<Option<Record>> {
    let mut out = Vec::new();
    for ns in KINDS {
        for k in 0..3 {
            let r = store.get_raw(ns, &key_of(ns, k)).await.unwrap();
            out.push(r.map(|r| r.record));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_same_updates_in_any_order_leave_equal_stores((records, first, second, batch) in scenario()) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let (a, b) = (open(da.path(), "a"), open(db.path(), "b"));
            // One store takes the updates one by one, the other in batches of another order.
            apply(&*a, &records, &first, 1).await;
            apply(&*b, &records, &second, batch).await;
            // Re-delivery (a replica hearing an update twice) changes nothing.
            apply(&*b, &records, &first, 3).await;
            assert_eq!(state(&*a).await, state(&*b).await);

            // The services read the same from both.
            let (ra, rb) = (Registry::new(a.clone()), Registry::new(b.clone()));
            assert_eq!(ra.list().await.unwrap(), rb.list().await.unwrap());
            let (ca, cb) = (
                ConfigService::start(a.clone()).await.unwrap(),
                ConfigService::start(b.clone()).await.unwrap(),
            );
            assert_eq!(ca.list().await.unwrap(), cb.list().await.unwrap());
            assert_eq!(ca.current().entries, cb.current().entries);
        });
    }
}
