//! The JetStream backend against the same contract as the embedded one, on a real
//! three-server NATS cluster on loopback (nats-server from scripts/install-tools).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use haven_state::{
    Batch, Change, Expect, HybridClock, LogFold, NatsConfig, NatsStore, Origin, Outcome, Record,
    Store, StoreError, Version, watch,
};

use haven_testkit::NatsCluster;

/// A store of node `node` connected to server `i` of the cluster.
async fn store(cluster: &NatsCluster, i: usize, node: &str) -> NatsStore {
    let config = NatsConfig {
        servers: vec![cluster.url(i)],
        region: "test-region".into(),
        replicas: 3,
    };
    NatsStore::open(
        &config,
        Origin::new("test-region", node),
        Arc::new(HybridClock::default()),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_backend_keeps_the_store_contract() {
    let cluster = NatsCluster::start().await;
    let s = store(&cluster, 0, "n1").await;

    // Conditional writes.
    let c = s
        .commit(Batch::new().put_if("notes", "a", b"1".to_vec(), Expect::Absent))
        .await
        .unwrap();
    let Outcome::Written { revision } = c.outcomes[0] else {
        panic!("{c:?}")
    };
    assert_eq!(s.get("notes", "a").await.unwrap().unwrap().value(), b"1");
    let err = s
        .commit(Batch::new().put_if("notes", "a", b"2".to_vec(), Expect::Absent))
        .await;
    assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
    s.commit(Batch::new().put_if("notes", "a", b"3".to_vec(), Expect::Revision(revision)))
        .await
        .unwrap();
    let stale = s
        .commit(Batch::new().put_if("notes", "a", b"4".to_vec(), Expect::Revision(revision)))
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    assert_eq!(s.get("notes", "a").await.unwrap().unwrap().value(), b"3");

    // A failed precondition leaves the whole batch unapplied.
    let before = s.last_seq().await.unwrap();
    let mixed = Batch::new().put("notes", "b", b"x".to_vec()).put_if(
        "notes",
        "a",
        b"5".to_vec(),
        Expect::Absent,
    );
    assert!(s.commit(mixed).await.is_err());
    assert!(s.get("notes", "b").await.unwrap().is_none());
    assert_eq!(s.last_seq().await.unwrap(), before);

    // Deletes, tombstones, scans.
    s.commit(
        Batch::new()
            .put("notes", "b", b"b".to_vec())
            .put("notes", "c", b"c".to_vec())
            .put("other", "z", b"z".to_vec()),
    )
    .await
    .unwrap();
    s.commit(Batch::new().delete("notes", "c")).await.unwrap();
    assert!(s.get("notes", "c").await.unwrap().is_none());
    assert!(
        s.get_raw("notes", "c")
            .await
            .unwrap()
            .unwrap()
            .record
            .is_tombstone()
    );
    let page = s.scan("notes", "", None, 10).await.unwrap();
    let keys: Vec<_> = page.records.iter().map(|r| r.record.key.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    let page = s.scan("notes", "", None, 1).await.unwrap();
    assert_eq!(page.records.len(), 1);
    let next = s
        .scan("notes", "", page.next_after.as_deref(), 1)
        .await
        .unwrap();
    assert_eq!(next.records[0].record.key, "b");

    // Streams: dense indices, several appends in one batch.
    let c = s
        .commit(
            Batch::new()
                .append("st", b"e1".to_vec())
                .append("st", b"e2".to_vec()),
        )
        .await
        .unwrap();
    assert!(
        matches!(c.outcomes[1], Outcome::Appended { index: 2, .. }),
        "{c:?}"
    );
    s.commit(Batch::new().append("st", b"e3".to_vec()))
        .await
        .unwrap();
    let events = s.read_events("st", 1, 10).await.unwrap();
    let data: Vec<_> = events.iter().map(|e| e.data.clone()).collect();
    assert_eq!(data, [b"e2".to_vec(), b"e3".to_vec()]);

    // The log reads back in order, dense, and folds to the same records.
    let last = s.last_seq().await.unwrap();
    let log = s.read_log(1, usize::MAX).await.unwrap();
    assert_eq!(log.len() as u64, last);
    assert!(log.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let mut fold = LogFold::default();
    for e in log.clone() {
        fold.apply(e);
    }
    let (snap_last, entries) = s.state_entries().await.unwrap();
    assert_eq!(snap_last, last);
    assert_eq!(entries.len(), fold.len());

    // A watch from the start sees everything, then live entries.
    let mut w = watch(Arc::new(store(&cluster, 1, "n1-watch").await), 1);
    for e in &log {
        assert_eq!(w.next().await.unwrap().unwrap().seq, e.seq);
    }
    s.commit(Batch::new().put("notes", "live", b"1".to_vec()))
        .await
        .unwrap();
    let live = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(live.seq, last + 1);

    // Merge of a foreign record: newer wins, older is unchanged.
    let cur = s.get("notes", "a").await.unwrap().unwrap().record;
    let older = Record {
        value: Some(b"old".to_vec()),
        version: Version {
            hlc: haven_state::Hlc(cur.version.hlc.0 - 1),
            origin: Origin::new("elsewhere", "x"),
        },
        ..cur.clone()
    };
    let c = s
        .commit(Batch {
            ops: vec![haven_state::Op::Merge(older)],
        })
        .await
        .unwrap();
    assert_eq!(c.outcomes[0], Outcome::Unchanged);
    let newer = Record {
        value: Some(b"new".to_vec()),
        version: Version {
            hlc: haven_state::Hlc(cur.version.hlc.0 + 1_000_000),
            origin: Origin::new("elsewhere", "x"),
        },
        ..cur
    };
    s.commit(Batch {
        ops: vec![haven_state::Op::Merge(newer)],
    })
    .await
    .unwrap();
    assert_eq!(s.get("notes", "a").await.unwrap().unwrap().value(), b"new");

    // A new store (another process, another server) rebuilds the same state from the stream.
    let again = store(&cluster, 2, "n2").await;
    assert_eq!(
        again.get("notes", "a").await.unwrap().unwrap().value(),
        b"new"
    );
    assert_eq!(again.read_events("st", 0, 10).await.unwrap().len(), 3);
    assert!(matches!(
        again.read_log(last, 1).await.unwrap()[0].change,
        Change::Record(_) | Change::Event(_)
    ));
    s.check_writable().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_across_nodes_loses_no_update() {
    let cluster = NatsCluster::start().await;
    let a = Arc::new(store(&cluster, 0, "a").await);
    let b = Arc::new(store(&cluster, 1, "b").await);
    a.commit(Batch::new().put("counters", "c", b"0".to_vec()))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for store in [a.clone(), b.clone(), a.clone(), b.clone()] {
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < 25 {
                let cur = store.get("counters", "c").await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(cur.value()).unwrap().parse().unwrap();
                let r = store
                    .commit(Batch::new().put_if(
                        "counters",
                        "c",
                        (n + 1).to_string().into_bytes(),
                        Expect::Revision(cur.revision),
                    ))
                    .await;
                match r {
                    Ok(_) => done += 1,
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let final_a = a.get("counters", "c").await.unwrap().unwrap();
    assert_eq!(
        final_a.value(),
        b"100",
        "every successful compare-and-set counted once"
    );
    // Both nodes converge on the same record.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fb = b.get("counters", "c").await.unwrap().unwrap();
        if fb.revision == final_a.revision {
            assert_eq!(fb.record, final_a.record);
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
