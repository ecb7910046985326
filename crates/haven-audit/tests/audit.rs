//! The audit log on a real store (redb): chains, checkpoints, verification after tampering,
//! retention on a controlled clock. Tampering goes through the store's own write API (a put
//! or delete on the `audit` namespace), as someone with write access to the store would.

use std::sync::Arc;
use std::time::Duration;

use haven_audit::{
    AUDIT_NS, Actor, Audit, AuditConfig, DAY_MILLIS, Entry, Event, Outcome, ProblemKind, Target,
    actions, checkpoint_key, record_key, verify,
};
use haven_state::{Batch, HybridClock, ManualClock, Origin, RedbStore, Store};

const T0: u64 = 1_780_000_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    audit: Audit,
}

fn config() -> AuditConfig {
    AuditConfig {
        checkpoint_every: 4,
        checkpoint_interval: Duration::from_secs(3600),
        prune_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    }
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(
            dir.path(),
            Origin::new("eu", "n1"),
            Arc::new(HybridClock::new(clock.clone())),
        )
        .unwrap(),
    );
    let key = haven_audit::key::load_or_create(dir.path()).unwrap();
    let audit = Audit::start(store.clone(), key, config()).await.unwrap();
    Fixture {
        _dir: dir,
        store,
        clock,
        audit,
    }
}

fn event(i: usize) -> Event {
    Event::new(
        Actor::AdminToken,
        actions::CONFIG_SET,
        Target::named("setting", &format!("s{i}")),
        Outcome::Ok,
    )
}

/// Writes `n` records, one commit each (a checkpoint every 4).
async fn write(f: &Fixture, n: usize) {
    for i in 0..n {
        f.audit.record(event(i));
        f.audit.flush().await.unwrap();
    }
}

async fn get(store: &Arc<dyn Store>, key: &str) -> Vec<u8> {
    store
        .get(AUDIT_NS, key)
        .await
        .unwrap()
        .unwrap()
        .value()
        .to_vec()
}

async fn put(store: &Arc<dyn Store>, key: &str, value: Vec<u8>) {
    store
        .commit(Batch::new().put(AUDIT_NS, key, value))
        .await
        .unwrap();
}

const CHAIN: &str = "eu/n1";

#[tokio::test]
async fn an_untouched_log_verifies_with_checkpoints() {
    let f = fixture().await;
    write(&f, 10).await;
    f.audit.checkpoint_now().await.unwrap();
    let r = verify(&*f.store, &[]).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.chains.len(), 1);
    let c = &r.chains[0];
    assert_eq!((c.first_seq, c.last_seq), (Some(1), Some(10)));
    assert!(c.checkpoints >= 2, "{c:?}");
    assert_eq!(c.checkpointed_through, Some(10));
    assert_eq!(r.keys_from, "store");
    // The entries say who, what, on what, how.
    let e: Entry = serde_json::from_slice(&get(&f.store, &record_key(CHAIN, 3)).await).unwrap();
    assert_eq!(
        (
            e.principal.as_str(),
            e.action.as_str(),
            e.target.as_str(),
            e.outcome.as_str()
        ),
        ("admin-token", "config.set", "setting:s2", "ok")
    );
    assert_eq!((e.node.as_str(), e.region.as_str()), ("n1", "eu"));
    assert_eq!(e.at_millis, T0);
}

#[tokio::test]
async fn a_changed_byte_is_named() {
    let f = fixture().await;
    write(&f, 10).await;
    let key = record_key(CHAIN, 5);
    let mut v = get(&f.store, &key).await;
    // One byte of the target's name: `s4` becomes `s5`.
    let at = v.windows(2).position(|w| w == b"s4").unwrap();
    v[at + 1] = b'5';
    put(&f.store, &key, v).await;
    let r = verify(&*f.store, &[]).await.unwrap();
    assert!(!r.ok);
    let p = &r.problems[0];
    assert_eq!(
        (p.chain.as_str(), p.seq, p.kind),
        (CHAIN, 5, ProblemKind::Altered),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_changed_last_record_is_named_by_the_head() {
    let f = fixture().await;
    write(&f, 3).await;
    let key = record_key(CHAIN, 3);
    let mut v = get(&f.store, &key).await;
    let at = v.windows(2).position(|w| w == b"s2").unwrap();
    v[at + 1] = b'9';
    put(&f.store, &key, v).await;
    let r = verify(&*f.store, &[]).await.unwrap();
    let p = &r.problems[0];
    assert_eq!((p.seq, p.kind), (3, ProblemKind::Altered), "{r:?}");
}

#[tokio::test]
async fn a_removed_record_is_named() {
    let f = fixture().await;
    write(&f, 10).await;
    f.store
        .commit(Batch::new().delete(AUDIT_NS, &record_key(CHAIN, 6)))
        .await
        .unwrap();
    let r = verify(&*f.store, &[]).await.unwrap();
    let p = &r.problems[0];
    assert_eq!((p.seq, p.kind), (6, ProblemKind::Removed), "{r:?}");
    assert!(p.detail.contains("eu/n1/6..6"), "{}", p.detail);
}

#[tokio::test]
async fn swapped_records_are_named() {
    let f = fixture().await;
    write(&f, 10).await;
    let (a, b) = (record_key(CHAIN, 3), record_key(CHAIN, 4));
    let (va, vb) = (get(&f.store, &a).await, get(&f.store, &b).await);
    f.store
        .commit(Batch::new().put(AUDIT_NS, &a, vb).put(AUDIT_NS, &b, va))
        .await
        .unwrap();
    let r = verify(&*f.store, &[]).await.unwrap();
    let p = &r.problems[0];
    assert_eq!((p.seq, p.kind), (3, ProblemKind::Reordered), "{r:?}");
}

#[tokio::test]
async fn an_altered_checkpoint_signature_is_named() {
    let f = fixture().await;
    write(&f, 8).await;
    let key = checkpoint_key(CHAIN, 4);
    let mut cp: haven_audit::Checkpoint =
        serde_json::from_slice(&get(&f.store, &key).await).unwrap();
    let mut sig = cp.signature.into_bytes();
    sig[10] = if sig[10] == b'0' { b'1' } else { b'0' };
    cp.signature = String::from_utf8(sig).unwrap();
    put(&f.store, &key, serde_json::to_vec(&cp).unwrap()).await;
    let r = verify(&*f.store, &[]).await.unwrap();
    assert_eq!(r.problems.len(), 1, "{r:?}");
    let p = &r.problems[0];
    assert_eq!((p.seq, p.kind), (4, ProblemKind::BadCheckpoint), "{r:?}");
    assert!(p.detail.contains("signature"), "{}", p.detail);
}

#[tokio::test]
async fn a_rewritten_chain_is_caught_by_its_checkpoint() {
    // Someone rewrites record 2 and re-links every record after it: the links agree again,
    // the checkpoint at 4 (signed with a key they do not have) does not.
    let f = fixture().await;
    write(&f, 6).await;
    let mut prev = haven_audit::hash_hex(&get(&f.store, &record_key(CHAIN, 1)).await);
    for seq in 2..=6 {
        let key = record_key(CHAIN, seq);
        let mut e: Entry = serde_json::from_slice(&get(&f.store, &key).await).unwrap();
        if seq == 2 {
            e.principal = "someone-else".into();
        }
        e.prev = prev;
        let bytes = serde_json::to_vec(&e).unwrap();
        prev = haven_audit::hash_hex(&bytes);
        put(&f.store, &key, bytes).await;
    }
    let r = verify(&*f.store, &[]).await.unwrap();
    let p = &r.problems[0];
    assert_eq!((p.seq, p.kind), (4, ProblemKind::Altered), "{r:?}");
    assert!(p.detail.contains("checkpoint"), "{}", p.detail);
}

#[tokio::test]
async fn trusted_keys_given_replace_the_published_ones() {
    let f = fixture().await;
    write(&f, 4).await;
    let pk = f.store.scan_all(AUDIT_NS, "k/").await.unwrap();
    let pk: haven_audit::PublicKey = serde_json::from_slice(pk[0].value()).unwrap();
    let r = verify(&*f.store, std::slice::from_ref(&pk.public_key))
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.keys_from, "given");
    let other = ed25519_dalek_key();
    let r = verify(&*f.store, &[other]).await.unwrap();
    assert_eq!(r.problems[0].kind, ProblemKind::BadCheckpoint, "{r:?}");
    assert!(r.problems[0].detail.contains("trusted"), "{r:?}");
}

fn ed25519_dalek_key() -> String {
    let dir = tempfile::tempdir().unwrap();
    let k = haven_audit::key::load_or_create(dir.path()).unwrap();
    hex_of(k.verifying_key().as_bytes())
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn retention_prunes_whole_old_days_records_it_and_still_verifies() {
    let f = fixture().await;
    f.audit.set_retention_days(2);
    // Day 0: 5 records; day 1: 3; day 3: 2.
    write(&f, 5).await;
    f.clock.advance(DAY_MILLIS);
    write(&f, 3).await;
    f.clock.advance(2 * DAY_MILLIS);
    write(&f, 2).await;
    f.audit.checkpoint_now().await.unwrap();
    // Today is day 3; two days kept before it: day 0 goes.
    let report = f.audit.prune_now().await.unwrap();
    assert_eq!(report.records, 5, "{report:?}");
    assert_eq!(report.pruned[0].through, 5);
    let r = verify(&*f.store, &[]).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.chains[0].first_seq, Some(6));
    assert_eq!(r.chains[0].pruned_through, Some(5));
    // The prune is recorded.
    let all = f.store.scan_all(AUDIT_NS, "r/").await.unwrap();
    let prunes: Vec<Entry> = all
        .iter()
        .filter_map(|r| serde_json::from_slice::<Entry>(r.value()).ok())
        .filter(|e| e.action == "audit.prune")
        .collect();
    assert_eq!(prunes.len(), 1);
    assert_eq!(prunes[0].principal, "system");
    // Nothing more to prune on the same day.
    assert_eq!(f.audit.prune_now().await.unwrap().records, 0);

    // Much later, everything old goes, the first prune record with it: its explanation is
    // carried forward and the chain still verifies.
    f.clock.advance(10 * DAY_MILLIS);
    write(&f, 1).await;
    let report = f.audit.prune_now().await.unwrap();
    assert!(report.records >= 6, "{report:?}");
    let r = verify(&*f.store, &[]).await.unwrap();
    assert!(r.ok, "{r:?}");

    // A gap no prune explains is flagged: remove the chain's first remaining record.
    let first = r.chains[0].first_seq.unwrap();
    f.store
        .commit(Batch::new().delete(AUDIT_NS, &record_key(CHAIN, first)))
        .await
        .unwrap();
    let r = verify(&*f.store, &[]).await.unwrap();
    assert_eq!(r.problems[0].kind, ProblemKind::Removed, "{r:?}");
    assert_eq!(r.problems[0].seq, first, "{r:?}");
}

#[tokio::test]
async fn a_restarted_node_continues_its_chain() {
    let f = fixture().await;
    write(&f, 3).await;
    f.audit.close().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = haven_audit::key::load_or_create(dir.path()).unwrap();
    let audit = Audit::start(f.store.clone(), key, config()).await.unwrap();
    for i in 0..3 {
        audit
            .record_wait(event(i), Duration::from_secs(10))
            .await
            .unwrap();
    }
    let r = verify(&*f.store, &[]).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.chains[0].last_seq, Some(6));
    // Two keys signed for the chain (a new key file, as after a lost data directory).
    assert_eq!(r.keys.len(), 2);
}

#[tokio::test]
async fn a_full_queue_drops_and_records_the_drop() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(
            dir.path(),
            Origin::new("eu", "n1"),
            Arc::new(HybridClock::default()),
        )
        .unwrap(),
    );
    let key = haven_audit::key::load_or_create(dir.path()).unwrap();
    let audit = Audit::start(
        store.clone(),
        key,
        AuditConfig {
            queue: 2,
            ..config()
        },
    )
    .await
    .unwrap();
    // No await between the records: the writer cannot take any before the queue is full.
    for i in 0..50 {
        audit.record(event(i));
    }
    assert!(audit.dropped() >= 48, "{}", audit.dropped());
    audit.flush().await.unwrap();
    audit.flush().await.unwrap();
    let all = store.scan_all(AUDIT_NS, "r/").await.unwrap();
    let dropped: Vec<Entry> = all
        .iter()
        .filter_map(|r| serde_json::from_slice::<Entry>(r.value()).ok())
        .filter(|e| e.action == "audit.dropped")
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0].target, "events:48");
    assert_eq!(audit.dropped(), 48);
    assert!(verify(&*store, &[]).await.unwrap().ok);
}

/// Copies every change of `from`'s log after `after` into `to` as merges, as replication
/// between nodes and regions does; returns the last sequence copied.
async fn replicate(from: &Arc<dyn Store>, to: &Arc<dyn Store>, after: u64) -> u64 {
    let entries = from.read_log(after + 1, 100_000).await.unwrap();
    let last = entries.last().map(|e| e.seq).unwrap_or(after);
    let ops: Vec<haven_state::Op> = entries
        .into_iter()
        .map(|e| match e.change {
            haven_state::Change::Record(r) => haven_state::Op::Merge(r),
            haven_state::Change::Event(ev) => haven_state::Op::MergeEvent(ev),
        })
        .collect();
    if !ops.is_empty() {
        to.commit(Batch { ops }).await.unwrap();
    }
    last
}

#[tokio::test]
async fn two_regions_write_at_once_and_each_verifies_both_chains() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut stores: Vec<Arc<dyn Store>> = Vec::new();
    let mut audits = Vec::new();
    for (dir, region) in dirs.iter().zip(["eu", "us"]) {
        let store: Arc<dyn Store> = Arc::new(
            RedbStore::open(
                dir.path(),
                Origin::new(region, "n1"),
                Arc::new(HybridClock::default()),
            )
            .unwrap(),
        );
        let key = haven_audit::key::load_or_create(dir.path()).unwrap();
        audits.push(Audit::start(store.clone(), key, config()).await.unwrap());
        stores.push(store);
    }
    // Both write, interleaved, with no coordination; then each region applies the other's log.
    for i in 0..9 {
        audits[0].record(event(i));
        audits[1].record(event(i));
        if i % 3 == 0 {
            audits[0].flush().await.unwrap();
            audits[1].flush().await.unwrap();
        }
    }
    audits[0].checkpoint_now().await.unwrap();
    audits[1].checkpoint_now().await.unwrap();
    let (a, b) = (stores[0].clone(), stores[1].clone());
    replicate(&a, &b, 0).await;
    replicate(&b, &a, 0).await;
    for store in &stores {
        let r = verify(&**store, &[]).await.unwrap();
        assert!(r.ok, "{r:?}");
        let chains: Vec<&str> = r.chains.iter().map(|c| c.chain.as_str()).collect();
        assert_eq!(chains, ["eu/n1", "us/n1"]);
        assert!(r.chains.iter().all(|c| c.last_seq == Some(9)), "{r:?}");
        assert_eq!(r.keys.len(), 2);
    }
    // A record of region eu removed in region us is named there.
    stores[1]
        .commit(Batch::new().delete(AUDIT_NS, &record_key("eu/n1", 4)))
        .await
        .unwrap();
    let r = verify(&*stores[1], &[]).await.unwrap();
    let p = &r.problems[0];
    assert_eq!(
        (p.chain.as_str(), p.seq, p.kind),
        ("eu/n1", 4, ProblemKind::Removed),
        "{r:?}"
    );
}
