//! The embedded backend against its contract: conditional writes, streams, the change log,
//! watches, durability across reopen, merge of foreign records, and a full disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use haven_state::{
    Batch, Change, Expect, Hlc, HybridClock, Op, Origin, Outcome, Record, RedbStore, Store,
    StoreError, Version, watch,
};

fn open(dir: &std::path::Path) -> Arc<RedbStore> {
    Arc::new(
        RedbStore::open(
            dir,
            Origin::new("r1", "n1"),
            Arc::new(HybridClock::default()),
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn put_get_delete_and_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let c = s
        .commit(Batch::new().put_if("notes", "a", b"1".to_vec(), Expect::Absent))
        .await
        .unwrap();
    let Outcome::Written { revision } = c.outcomes[0] else {
        panic!()
    };
    assert_eq!(s.get("notes", "a").await.unwrap().unwrap().value(), b"1");

    // A second create fails and changes nothing.
    let err = s
        .commit(Batch::new().put_if("notes", "a", b"2".to_vec(), Expect::Absent))
        .await;
    assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
    assert_eq!(s.get("notes", "a").await.unwrap().unwrap().value(), b"1");

    // Compare-and-set on the right revision succeeds; on a stale one it fails.
    s.commit(Batch::new().put_if("notes", "a", b"3".to_vec(), Expect::Revision(revision)))
        .await
        .unwrap();
    let stale = s
        .commit(Batch::new().put_if("notes", "a", b"4".to_vec(), Expect::Revision(revision)))
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })));

    // A failed precondition leaves the whole batch unapplied.
    let mixed = Batch::new().put("notes", "b", b"x".to_vec()).put_if(
        "notes",
        "a",
        b"5".to_vec(),
        Expect::Absent,
    );
    assert!(s.commit(mixed).await.is_err());
    assert!(s.get("notes", "b").await.unwrap().is_none());

    s.commit(Batch::new().delete("notes", "a")).await.unwrap();
    assert!(s.get("notes", "a").await.unwrap().is_none());
    assert!(
        s.get_raw("notes", "a")
            .await
            .unwrap()
            .unwrap()
            .record
            .is_tombstone()
    );
    // After a delete the key counts as absent again.
    s.commit(Batch::new().put_if("notes", "a", b"6".to_vec(), Expect::Absent))
        .await
        .unwrap();
}

#[tokio::test]
async fn scan_pages_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut b = Batch::new();
    for i in 0..25 {
        b = b.put("ns", &format!("p/{i:02}"), vec![i]);
    }
    b = b.put("ns", "q/1", vec![1]).put("other", "p/x", vec![1]);
    s.commit(b).await.unwrap();
    let mut keys = vec![];
    let mut after = None;
    loop {
        let page = s.scan("ns", "p/", after.as_deref(), 10).await.unwrap();
        keys.extend(page.records.iter().map(|r| r.record.key.clone()));
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    assert_eq!(keys.len(), 25);
    assert_eq!(keys[0], "p/00");
    assert_eq!(keys[24], "p/24");
}

#[tokio::test]
async fn streams_log_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut w = watch(s.clone(), 1);
    let c = s
        .commit(
            Batch::new()
                .append("st", b"e1".to_vec())
                .append("st", b"e2".to_vec()),
        )
        .await
        .unwrap();
    assert!(matches!(c.outcomes[1], Outcome::Appended { index: 2, .. }));
    s.commit(
        Batch::new()
            .append("st", b"e3".to_vec())
            .put("k", "v", vec![]),
    )
    .await
    .unwrap();
    let ev = s.read_events("st", 1, 10).await.unwrap();
    assert_eq!(ev.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(ev[1].data, b"e3");
    let log = s.read_log(1, 100).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for expect in 1..=4 {
        let e = w.next().await.unwrap().unwrap();
        assert_eq!(e.seq, expect);
    }
    // A watch that starts later catches up from the log, then follows live writes.
    let mut late = watch(s.clone(), 3);
    assert_eq!(late.next().await.unwrap().unwrap().seq, 3);
    assert_eq!(late.next().await.unwrap().unwrap().seq, 4);
    s.commit(Batch::new().put("k", "w", vec![])).await.unwrap();
    assert_eq!(late.next().await.unwrap().unwrap().seq, 5);
}

#[tokio::test]
async fn acknowledged_writes_survive_reopen_and_clock_never_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let last_hlc;
    {
        let s = open(dir.path());
        for i in 0..100u32 {
            s.commit(
                Batch::new()
                    .put("n", &i.to_string(), i.to_le_bytes().to_vec())
                    .append("s", vec![]),
            )
            .await
            .unwrap();
        }
        last_hlc = s.get("n", "99").await.unwrap().unwrap().record.version.hlc;
    }
    // The writer thread owns the file until the store is dropped; give it a moment.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let s = RedbStore::open(
        dir.path(),
        Origin::new("r1", "n1"),
        Arc::new(HybridClock::default()),
    )
    .unwrap();
    assert_eq!(s.last_seq().await.unwrap(), 200);
    assert_eq!(s.read_events("s", 0, 1000).await.unwrap().len(), 100);
    assert!(s.clock().now() > last_hlc);
}

#[tokio::test]
async fn merge_keeps_the_greater_version() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = |ms: u64, v: &[u8]| Record {
        namespace: "registry".into(),
        key: "up".into(),
        version: Version {
            hlc: Hlc::new(ms, 0),
            origin: Origin::new("r2", "x"),
        },
        value: Some(v.to_vec()),
        expires_at_millis: None,
    };
    s.commit(Batch {
        ops: vec![Op::Merge(rec(10, b"new"))],
    })
    .await
    .unwrap();
    let c = s
        .commit(Batch {
            ops: vec![Op::Merge(rec(5, b"old"))],
        })
        .await
        .unwrap();
    assert_eq!(c.outcomes, vec![Outcome::Unchanged]);
    assert_eq!(
        s.get("registry", "up").await.unwrap().unwrap().value(),
        b"new"
    );
    // The clock moved past the remote version, so a local write now wins.
    s.commit(Batch::new().put("registry", "up", b"local".to_vec()))
        .await
        .unwrap();
    let cur = s.get("registry", "up").await.unwrap().unwrap();
    assert_eq!(cur.value(), b"local");
    assert!(cur.record.version.hlc > Hlc::new(10, 0));
    // Only applied merges reach the log.
    let log = s.read_log(1, 10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert!(matches!(&log[0].change, Change::Record(r) if r.value.as_deref() == Some(&b"new"[..])));
}

/// A file backend that refuses to grow past a quota, like a full disk.
#[derive(Debug)]
struct QuotaBackend {
    inner: redb::backends::FileBackend,
    quota: Arc<AtomicU64>,
}

impl redb::StorageBackend for QuotaBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        if len > self.quota.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device",
            ));
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        if offset + data.len() as u64 > self.quota.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device",
            ));
        }
        self.inner.write(offset, data)
    }
}

#[tokio::test]
async fn full_disk_refuses_writes_and_keeps_acknowledged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let quota = Arc::new(AtomicU64::new(u64::MAX));
    let q = quota.clone();
    let factory: haven_state::redb_store::BackendFactory = Box::new(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let inner = redb::backends::FileBackend::new(f).map_err(std::io::Error::other)?;
        Ok(Box::new(QuotaBackend {
            inner,
            quota: q.clone(),
        }) as Box<dyn redb::StorageBackend>)
    });
    let s = RedbStore::open_with(
        factory,
        Origin::new("r", "n"),
        Arc::new(HybridClock::default()),
    )
    .unwrap();
    let mut acked = 0u32;
    for i in 0..50u32 {
        s.commit(Batch::new().put("n", &i.to_string(), vec![7; 1000]))
            .await
            .unwrap();
        acked += 1;
    }
    // The disk fills up: writes are refused with a clear error, and nothing is half-written.
    let size = std::fs::metadata(dir.path().join("state.redb"))
        .unwrap()
        .len();
    quota.store(size, Ordering::SeqCst);
    let mut refused = 0;
    for i in 0..200u32 {
        match s
            .commit(Batch::new().put("big", &i.to_string(), vec![1; 64 * 1024]))
            .await
        {
            Ok(_) => acked += 1,
            Err(StoreError::Full(msg)) => {
                assert!(msg.contains("No space left"), "{msg}");
                refused += 1;
            }
            Err(StoreError::Unavailable(_)) => refused += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(refused > 0, "quota never hit");
    // Space comes back: writes succeed again and every acknowledged write is readable.
    quota.store(u64::MAX, Ordering::SeqCst);
    let mut ok = false;
    for _ in 0..50 {
        if s.commit(Batch::new().put("after", "x", vec![1]))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "store did not recover after space was freed");
    for i in 0..50u32 {
        assert!(s.get("n", &i.to_string()).await.unwrap().is_some());
    }
    let big = s.scan("big", "", None, 1000).await.unwrap().records.len() as u32;
    assert_eq!(50 + big, acked);
}
