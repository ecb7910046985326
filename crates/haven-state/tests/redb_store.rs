//! What only the embedded backend promises: durability across reopen and a full disk that
//! refuses writes without losing acknowledged ones. The contract every backend keeps is in
//! tests/store_contract.rs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use haven_state::{Batch, HybridClock, Origin, PhysicalClock, RedbStore, Store, StoreError};

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
    // Dropping the store closes it: it opens again at once.
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

/// Runs reclamation steps until a pass is complete; what they removed in all.
async fn reclaim_all(s: &dyn Store, r: &haven_state::Reclaim) -> haven_state::Reclaimed {
    let mut all = haven_state::Reclaimed::default();
    for _ in 0..1000 {
        let step = s.reclaim(r).await.unwrap();
        all.log_entries += step.log_entries;
        all.records += step.records;
        all.events += step.events;
        if step.done {
            all.done = true;
            return all;
        }
    }
    panic!("reclamation never completed a pass");
}

fn policy(now_millis: u64) -> haven_state::Reclaim {
    haven_state::Reclaim {
        log_floor: u64::MAX,
        now_millis,
        expired_grace_millis: 60_000,
        tombstone_retention_millis: 3_600_000,
        event_retention_millis: 3_600_000,
        // Small steps, so that passes span many steps.
        step: 7,
        trim_log: true,
    }
}

/// Reclamation removes the history nobody needs and nothing of the state: the log keeps one
/// entry per current record and event, the state (and its digest, `state_entries`) is
/// unchanged, the store reopens at the same position and goes on from it, and a key written
/// again after the pass has its superseded entry removed at once.
#[tokio::test]
async fn reclamation_keeps_the_state_and_drops_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let wall = Arc::new(haven_state::ManualClock::new(1_700_000_000_000));
    let open_at = |wall: &Arc<haven_state::ManualClock>| {
        RedbStore::open(
            dir.path(),
            Origin::new("r1", "n1"),
            Arc::new(HybridClock::new(wall.clone())),
        )
        .unwrap()
    };
    let s = open_at(&wall);
    for i in 0..30u32 {
        s.commit(Batch::new().put("notes", "big", vec![i as u8; 10_000]))
            .await
            .unwrap();
        s.commit(Batch::new().put("notes", &format!("k{}", i % 5), vec![i as u8]))
            .await
            .unwrap();
        s.commit(Batch::new().append("stream", vec![i as u8]))
            .await
            .unwrap();
    }
    s.commit(Batch::new().delete("notes", "k0")).await.unwrap();
    s.commit(Batch::new().put_ttl("sessions", "s1", vec![1], 1000))
        .await
        .unwrap();
    let last = s.last_seq().await.unwrap();
    let (_, before) = s.state_entries().await.unwrap();

    let done = reclaim_all(&s, &policy(wall.now_millis())).await;
    // 30 writes of `big`, 6 of each of k0..k4 and the delete of k0: all but the last of each
    // key.
    assert_eq!(done.log_entries, 29 + 6 + 4 * 5);
    assert_eq!((done.records, done.events), (0, 0));
    let (at, after) = s.state_entries().await.unwrap();
    assert_eq!((at, &after), (last, &before));
    let log = s.read_log(1, 10_000).await.unwrap();
    assert_eq!(log.len(), before.len(), "one log entry per current item");
    assert_eq!(s.read_events("stream", 0, 100).await.unwrap().len(), 30);
    assert_eq!(
        s.get("notes", "big").await.unwrap().unwrap().record.value,
        Some(vec![29; 10_000])
    );
    // Written again after the pass: the superseded entry goes at once.
    s.commit(Batch::new().put("notes", "big", vec![30; 10_000]))
        .await
        .unwrap();
    assert_eq!(s.read_log(1, 10_000).await.unwrap().len(), before.len());
    drop(s);
    let s = open_at(&wall);
    assert_eq!(s.last_seq().await.unwrap(), last + 1);
    let c = s
        .commit(Batch::new().append("stream", vec![]))
        .await
        .unwrap();
    assert_eq!(c.last_seq, last + 2);
    assert!(
        matches!(
            c.outcomes[0],
            haven_state::Outcome::Appended { index: 31, .. }
        ),
        "{:?}",
        c.outcomes
    );
}

/// The store remembers which entries it superseded and removes them below the floor
/// without reading the log; what it remembered is lost with the process, so an entry
/// superseded before a restart and still above the floor then is found by reading the log.
#[tokio::test]
async fn superseded_entries_remembered_or_not_are_all_removed_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wall = Arc::new(haven_state::ManualClock::new(1_700_000_000_000));
    let open_at = |wall: &Arc<haven_state::ManualClock>| {
        RedbStore::open(
            dir.path(),
            Origin::new("r1", "n1"),
            Arc::new(HybridClock::new(wall.clone())),
        )
        .unwrap()
    };
    let s = open_at(&wall);
    for i in 0..40u32 {
        s.commit(Batch::new().put("notes", "hot", vec![i as u8; 100]))
            .await
            .unwrap();
    }
    // Readers are at 21: entries 1..=20 go, 21..=39 are superseded but stay.
    let mut p = policy(wall.now_millis());
    p.log_floor = 21;
    let done = reclaim_all(&s, &p).await;
    assert_eq!(done.log_entries, 20);
    assert_eq!(s.read_log(1, 100).await.unwrap().len(), 20);
    drop(s);
    let s = open_at(&wall);
    for i in 40..50u32 {
        s.commit(Batch::new().put("notes", "hot", vec![i as u8; 100]))
            .await
            .unwrap();
    }
    // Readers are past everything: the 19 entries superseded before the restart (found by
    // reading the log) and the 10 after it (remembered) go; one entry is left.
    p.log_floor = u64::MAX;
    let done = reclaim_all(&s, &p).await;
    assert_eq!(done.log_entries, 19 + 10);
    let log = s.read_log(1, 100).await.unwrap();
    assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), [50]);
    assert_eq!(
        s.get("notes", "hot").await.unwrap().unwrap().record.value,
        Some(vec![49; 100])
    );
}

/// Past their retention: expired records, tombstones and old stream events are removed (a
/// stream whose events are all old goes; an append starts it again). Entries at or above
/// the log floor (not shipped yet) stay in the log.
#[tokio::test]
async fn reclamation_removes_what_expired_and_keeps_the_log_above_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let wall = Arc::new(haven_state::ManualClock::new(1_700_000_000_000));
    let s = RedbStore::open(
        dir.path(),
        Origin::new("r1", "n1"),
        Arc::new(HybridClock::new(wall.clone())),
    )
    .unwrap();
    for i in 0..10u8 {
        s.commit(Batch::new().append("old", vec![i])).await.unwrap();
    }
    s.commit(Batch::new().put("notes", "gone", vec![1]))
        .await
        .unwrap();
    s.commit(Batch::new().delete("notes", "gone"))
        .await
        .unwrap();
    s.commit(Batch::new().put_ttl("sessions", "s1", vec![1], 1000))
        .await
        .unwrap();
    s.commit(Batch::new().put("notes", "kept", vec![1]))
        .await
        .unwrap();
    let floor = s.last_seq().await.unwrap() + 1;
    // Later writes, not shipped yet: above the floor.
    s.commit(Batch::new().put("notes", "kept", vec![2]))
        .await
        .unwrap();
    s.commit(Batch::new().put("notes", "kept", vec![3]))
        .await
        .unwrap();
    wall.advance(2 * 3_600_000);
    let mut p = policy(wall.now_millis());
    p.log_floor = floor;
    let done = reclaim_all(&s, &p).await;
    assert_eq!((done.records, done.events), (2, 10), "{done:?}");
    assert!(s.get_raw("notes", "gone").await.unwrap().is_none());
    assert!(s.get_raw("sessions", "s1").await.unwrap().is_none());
    // The stream's events were all old: it is gone, and an append starts it again.
    assert!(s.read_events("old", 0, 100).await.unwrap().is_empty());
    let c = s.commit(Batch::new().append("old", vec![])).await.unwrap();
    assert!(
        matches!(
            c.outcomes[0],
            haven_state::Outcome::Appended { index: 1, .. }
        ),
        "{:?}",
        c.outcomes
    );
    // Above the floor every entry is still there, superseded or not.
    let above: Vec<u64> = s
        .read_log(floor, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(above, [floor, floor + 1, floor + 2]);
    // Below it: nothing ("kept"'s first version is superseded, the rest was forgotten).
    let below = s.read_log(1, 100).await.unwrap();
    assert_eq!(
        below.iter().filter(|e| e.seq < floor).count(),
        0,
        "{below:?}"
    );
}
