//! What only the embedded backend promises: durability across reopen and a full disk that
//! refuses writes without losing acknowledged ones. The contract every backend keeps is in
//! tests/store_contract.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use haven_state::{Batch, HybridClock, Origin, RedbStore, Store, StoreError};

use haven_testkit::redb_store as open;

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
        let inner = haven_state::redb_store::open_file_backend(&path)?;
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
