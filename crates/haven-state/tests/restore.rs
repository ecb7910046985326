//! Snapshots of the state as change-log entries, and rebuilding a data directory from them
//! (what a restore from backup does).

use std::sync::Arc;

use haven_state::{Batch, LogFold, RedbStore, Restorer, Store, StoreError};

use haven_testkit::redb_store as open;

/// A store in a new directory, filled by [`fill`].
async fn filled() -> (tempfile::TempDir, Arc<RedbStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    fill(&s).await;
    (dir, s)
}

async fn fill(s: &RedbStore) {
    for i in 0..50u32 {
        let key = format!("k{}", i % 7);
        let mut b = Batch::new()
            .put("notes", &key, format!("v{i}").into_bytes())
            .append(&format!("stream-{}", i % 3), vec![i as u8]);
        if i % 11 == 0 {
            b = b.delete("notes", "k3");
        }
        s.commit(b).await.unwrap();
    }
}

async fn folded(s: &dyn Store) -> LogFold {
    let mut fold = LogFold::default();
    for e in s.read_log(1, usize::MAX).await.unwrap() {
        fold.apply(e);
    }
    fold
}

#[tokio::test]
async fn state_entries_match_the_folded_log() {
    let (_dir, s) = filled().await;
    let (last, entries) = s.state_entries().await.unwrap();
    assert_eq!(last, s.last_seq().await.unwrap());
    let fold = folded(s.as_ref()).await;
    assert_eq!(entries, fold.into_entries());
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test]
async fn a_restored_directory_has_the_same_state_and_continues_the_log() {
    let (_src_dir, s) = filled().await;
    let (last, entries) = s.state_entries().await.unwrap();
    let view = folded(s.as_ref()).await.view();

    let dst = tempfile::tempdir().unwrap();
    let target = dst.path().join("restored");
    let mut r = Restorer::create(&target).unwrap();
    for chunk in entries.chunks(10) {
        r.write(chunk).unwrap();
    }
    assert_eq!(r.written(), entries.len() as u64);
    assert_eq!(r.finish(last).unwrap(), last);

    let restored = open(&target);
    assert_eq!(restored.last_seq().await.unwrap(), last);
    assert_eq!(folded(restored.as_ref()).await.view(), view);
    for i in 0..7 {
        let key = format!("k{i}");
        let a = s.get("notes", &key).await.unwrap();
        let b = restored.get("notes", &key).await.unwrap();
        assert_eq!(
            a.map(|r| (r.revision, r.record)),
            b.map(|r| (r.revision, r.record))
        );
    }
    assert_eq!(
        s.read_events("stream-1", 0, 100).await.unwrap(),
        restored.read_events("stream-1", 0, 100).await.unwrap()
    );
    // New writes continue after the restored sequence, stamped after every restored version.
    let c = restored
        .commit(Batch::new().put("notes", "new", b"x".to_vec()))
        .await
        .unwrap();
    assert_eq!(c.last_seq, last + 1);
    let newest = restored.get("notes", "new").await.unwrap().unwrap();
    assert!(
        entries
            .iter()
            .all(|e| e.change.version() < &newest.record.version)
    );
}

#[tokio::test]
async fn restore_refuses_an_existing_store_and_out_of_order_entries() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    fill(&s).await;
    drop(s);
    let err = Restorer::create(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    let (_src, s) = filled().await;
    let entries = s.read_log(1, 10).await.unwrap();
    let dst = tempfile::tempdir().unwrap();
    let mut r = Restorer::create(&dst.path().join("x")).unwrap();
    r.write(&entries[5..]).unwrap();
    let err = r.write(&entries[..5]).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}
