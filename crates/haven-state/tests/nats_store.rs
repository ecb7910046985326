//! The JetStream backend against the same contract as the embedded one, on a real
//! three-server NATS cluster on loopback (nats-server from scripts/install-tools).
//!
//! These tests run in the test command's `nats` stage (`scripts/on-nats`, with
//! `--include-ignored`), beside the rest of the JetStream suites; each starts its own cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use haven_state::{
    Batch, Change, Expect, HybridClock, LogFold, NatsConfig, NatsStore, Origin, Outcome,
    PhysicalClock, Record, Store, StoreError, Version, watch,
};

use haven_testkit::NatsCluster;

mod contract;

/// A store of node `node` connected to server `i` of the cluster.
async fn store(cluster: &NatsCluster, i: usize, node: &str) -> NatsStore {
    let config = NatsConfig {
        servers: vec![cluster.url(i)],
        region: "test-region".into(),
        replicas: 3,
        tls: Default::default(),
    };
    NatsStore::open(
        &config,
        Origin::new("test-region", node),
        Arc::new(HybridClock::default()),
    )
    .await
    .unwrap()
}

#[test]
#[ignore = "JetStream: runs in the nats stage (scripts/on-nats)"]
fn the_jetstream_backend_keeps_the_contract_in_random_histories() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt.block_on(NatsCluster::start());
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 24,
        ..Default::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&contract::history(16), |steps| {
            let case = case.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            rt.block_on(async {
                let (wall, clock) = contract::clock();
                let config = NatsConfig {
                    servers: vec![cluster.url(case % 3)],
                    region: format!("contract-{case}"),
                    replicas: 3,
                    tls: Default::default(),
                };
                let s = NatsStore::open(&config, Origin::new("r", "n1"), clock)
                    .await
                    .unwrap();
                contract::check_history(&s, &wall, &steps).await;
            });
            Ok(())
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "JetStream: runs in the nats stage (scripts/on-nats)"]
async fn the_jetstream_backend_keeps_the_store_contract() {
    let cluster = NatsCluster::start().await;
    let s = Arc::new(store(&cluster, 0, "n1").await);
    contract::basics(s.clone()).await;
    s.commit(Batch::new().put("notes", "a", b"3".to_vec()))
        .await
        .unwrap();

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

    // No message carries a `Nats-Msg-Id`: every id would sit in each server's duplicate
    // table for the stream's whole duplicate window, so the servers' memory would grow with
    // the write rate (BENCHMARKS.md, "No message ids on commits").
    let stream = region_stream(&cluster, "test-region").await;
    for e in &log {
        let m = stream.get_raw_message(e.seq).await.unwrap();
        assert!(
            m.headers.get("Nats-Msg-Id").is_none(),
            "entry {} carries a message id: {:?}",
            e.seq,
            m.headers
        );
    }

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
    assert_eq!(
        again.read_events("st", 0, 10).await.unwrap(),
        s.read_events("st", 0, 10).await.unwrap()
    );
    assert!(matches!(
        again.read_log(last, 1).await.unwrap()[0].change,
        Change::Record(_) | Change::Event(_)
    ));
    s.check_writable().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "JetStream: runs in the nats stage (scripts/on-nats)"]
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
    // A scan catches up with the stream first (a plain get reads the node's index, which may
    // trail the other node's last writes).
    let final_a = a.scan_all("counters", "c").await.unwrap().remove(0);
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

/// Nodes of a new region that start together, each on its own server, write as soon as
/// their stores are open: the start-up wait lasts until the new stream answers publishes
/// through each node's own connection, not only until its info names a leader (a server may
/// learn of the stream's subjects later, and answer "no responders" meanwhile). The wait's
/// probe stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "JetStream: runs in the nats stage (scripts/on-nats)"]
async fn a_new_regions_nodes_write_as_soon_as_their_stores_are_open() {
    let cluster = NatsCluster::start().await;
    for round in 0..6 {
        let region = format!("fresh-{round}");
        let opened = futures::future::join_all((0..3).map(|i| {
            let region = region.clone();
            let cluster = &cluster;
            async move {
                let config = NatsConfig {
                    servers: vec![cluster.url(i)],
                    region: region.clone(),
                    replicas: 3,
                    tls: Default::default(),
                };
                let s = NatsStore::open(
                    &config,
                    Origin::new(region.as_str(), format!("n{i}")),
                    Arc::new(HybridClock::default()),
                )
                .await
                .unwrap();
                s.commit(Batch::new().put("first", &format!("n{i}"), b"x".to_vec()))
                    .await
                    .unwrap_or_else(|e| panic!("round {round}, node {i}: first write: {e}"));
                s
            }
        }))
        .await;
        assert_eq!(
            stream_messages(&cluster, &region).await,
            3,
            "round {round}: the three writes, and nothing else"
        );
        drop(opened);
    }
}

/// A store of node `node` on server `i`, in region `region`, whose wall clock is `wall`.
async fn store_at(
    cluster: &NatsCluster,
    i: usize,
    region: &str,
    node: &str,
    wall: &Arc<haven_state::ManualClock>,
) -> NatsStore {
    let config = NatsConfig {
        servers: vec![cluster.url(i)],
        region: region.into(),
        replicas: 3,
        tls: Default::default(),
    };
    NatsStore::open(
        &config,
        Origin::new(region, node),
        Arc::new(HybridClock::new(wall.clone())),
    )
    .await
    .unwrap()
}

/// The region's stream, on a connection of its own to server 0.
async fn region_stream(
    cluster: &NatsCluster,
    region: &str,
) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(cluster.url(0)).await.unwrap();
    async_nats::jetstream::new(client)
        .get_stream(haven_state::nats_store::stream_name(region))
        .await
        .unwrap()
}

/// Messages the region's stream holds.
async fn stream_messages(cluster: &NatsCluster, region: &str) -> u64 {
    let mut stream = region_stream(cluster, region).await;
    stream.info().await.unwrap().state.messages
}

/// One whole reclamation pass on `s` with nothing held back by readers.
async fn reclaim_pass(s: &NatsStore, now_millis: u64, trim_log: bool) -> haven_state::Reclaimed {
    let policy = haven_state::Reclaim {
        log_floor: u64::MAX,
        now_millis,
        expired_grace_millis: 60_000,
        tombstone_retention_millis: 7 * 24 * 3_600_000,
        event_retention_millis: 24 * 3_600_000,
        step: 16,
        trim_log,
    };
    let mut total = haven_state::Reclaimed::default();
    for _ in 0..10_000 {
        let r = s.reclaim(&policy).await.unwrap();
        total.log_entries += r.log_entries;
        total.records += r.records;
        total.events += r.events;
        if r.done {
            total.done = true;
            return total;
        }
    }
    panic!("a reclamation pass never completed");
}

/// Reclamation on JetStream: the trimming node removes the stream's obsolete messages (a
/// record's superseded versions, also when they ended their batch), every node keeps the
/// same state, a node that starts afterwards builds the same state from what is left, and
/// once a tombstone is past its retention and removed, a node that still remembered it
/// writes the key with a condition that compares against what the stream has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "JetStream: runs in the nats stage (scripts/on-nats)"]
async fn reclamation_removes_obsolete_messages_and_every_node_keeps_the_state() {
    let cluster = NatsCluster::start().await;
    let region = "reclaim";
    let wall = Arc::new(haven_state::ManualClock::new(contract::START_MILLIS));
    let a = store_at(&cluster, 0, region, "a", &wall).await;
    let b = store_at(&cluster, 1, region, "b", &wall).await;
    // 40 batches: a key of its own (stays current) and `big` (superseded by the next
    // batch) last, so that the removed entries end their batches.
    for i in 0..40u32 {
        a.commit(
            Batch::new()
                .put("notes", &format!("k{i:02}"), vec![i as u8])
                .put("notes", "big", vec![i as u8; 2000]),
        )
        .await
        .unwrap();
    }
    a.commit(Batch::new().put("notes", "gone", b"x".to_vec()))
        .await
        .unwrap();
    a.commit(Batch::new().delete("notes", "gone"))
        .await
        .unwrap();
    let before = a.state_entries().await.unwrap();
    let messages = stream_messages(&cluster, region).await;
    assert_eq!(messages, 80 + 2);

    // `b` does not trim: it only forgets in memory (nothing is old yet).
    let r = reclaim_pass(&b, wall.now_millis(), false).await;
    assert_eq!((r.log_entries, r.records, r.events), (0, 0, 0));
    assert_eq!(stream_messages(&cluster, region).await, messages);
    // `a` trims: 39 superseded versions of `big` and the put of `gone`.
    let r = reclaim_pass(&a, wall.now_millis(), true).await;
    assert_eq!(r.log_entries, 40, "{r:?}");
    assert_eq!(stream_messages(&cluster, region).await, messages - 40);
    assert_eq!(a.state_entries().await.unwrap(), before);
    assert_eq!(b.state_entries().await.unwrap(), before);
    // A node that starts now reads what is left and builds the same state.
    let c = store_at(&cluster, 2, region, "c", &wall).await;
    assert_eq!(c.state_entries().await.unwrap(), before);
    assert_eq!(
        c.get("notes", "big").await.unwrap().unwrap().value(),
        vec![39u8; 2000]
    );
    assert_eq!(c.get("notes", "k00").await.unwrap().unwrap().value(), [0]);
    assert!(c.get("notes", "gone").await.unwrap().is_none());

    // A week later the tombstone of `gone` is past its retention: `a` forgets it and removes
    // its message (another write made it no longer the stream's last).
    wall.advance(8 * 24 * 3_600_000);
    a.commit(Batch::new().put("notes", "later", b"1".to_vec()))
        .await
        .unwrap();
    let r = reclaim_pass(&a, wall.now_millis(), true).await;
    assert_eq!(r.records, 1, "{r:?}");
    assert!(a.local_record("notes", "gone").is_none());
    // `b` has not forgotten it yet; its create-if-absent compares against the stream, where
    // nothing of `gone` is left, and succeeds.
    assert!(b.local_record("notes", "gone").is_some());
    b.commit(Batch::new().put_if("notes", "gone", b"again".to_vec(), Expect::Absent))
        .await
        .unwrap();
    // `c` remembered the tombstone too; now the key is live, and its create-if-absent is a
    // real conflict.
    let err = c
        .commit(Batch::new().put_if("notes", "gone", b"c".to_vec(), Expect::Absent))
        .await;
    assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
    let d = store_at(&cluster, 0, region, "d", &wall).await;
    assert_eq!(
        d.get("notes", "gone").await.unwrap().unwrap().value(),
        b"again"
    );
    assert_eq!(
        d.state_entries().await.unwrap(),
        a.state_entries().await.unwrap()
    );
    // Events, and two days later they are past their retention: `b` forgets the whole
    // stream (it does not trim: the stream keeps their messages).
    for i in 0..20u8 {
        b.commit(Batch::new().append("events", vec![i]))
            .await
            .unwrap();
    }
    a.commit(Batch::new().put("notes", "later", b"2".to_vec()))
        .await
        .unwrap();
    wall.advance(2 * 24 * 3_600_000);
    let r = reclaim_pass(&b, wall.now_millis(), false).await;
    assert_eq!(r.events, 20, "{r:?}");
    assert!(b.read_events("events", 0, 100).await.unwrap().is_empty());
    // An append there compares against the stream's last message, which `b` forgot: it
    // learns where the stream ends from the stream, and goes on after it.
    let c2 = b
        .commit(Batch::new().append("events", vec![99]))
        .await
        .unwrap();
    assert!(
        matches!(c2.outcomes[0], Outcome::Appended { index: 21, .. }),
        "{:?}",
        c2.outcomes
    );
    // `a` trims the 20 old events' messages and the first version of `later`.
    let before = stream_messages(&cluster, region).await;
    let r = reclaim_pass(&a, wall.now_millis(), true).await;
    assert_eq!((r.events, r.log_entries), (20, 21), "{r:?}");
    assert_eq!(stream_messages(&cluster, region).await, before - 21);
    let e = store_at(&cluster, 1, region, "e", &wall).await;
    let events = e.read_events("events", 0, 100).await.unwrap();
    assert_eq!(events.iter().map(|e| e.index).collect::<Vec<_>>(), [21]);
    assert_eq!(
        e.state_entries().await.unwrap(),
        b.state_entries().await.unwrap()
    );
}

/// A history far behind its trimming (every key written eight times, nothing old still
/// current): one step removes the stream's whole superseded prefix with one purge, the
/// other node keeps the same state, and a node that starts afterwards reads only the live
/// state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "JetStream: runs in the nats stage (scripts/on-nats)"]
async fn a_deep_history_loses_its_superseded_prefix_in_one_purge() {
    let cluster = NatsCluster::start().await;
    let region = "prefix";
    let wall = Arc::new(haven_state::ManualClock::new(contract::START_MILLIS));
    let a = store_at(&cluster, 0, region, "a", &wall).await;
    let b = store_at(&cluster, 1, region, "b", &wall).await;
    let keys = 10_000u32;
    for v in 0..8u8 {
        for chunk in 0..keys / 1_000 {
            let mut batch = Batch::new();
            for k in chunk * 1_000..(chunk + 1) * 1_000 {
                batch = batch.put("notes", &format!("k{k:05}"), vec![v]);
            }
            a.commit(batch).await.unwrap();
        }
    }
    assert_eq!(stream_messages(&cluster, region).await, 80_000);
    let policy = haven_state::Reclaim {
        log_floor: u64::MAX,
        now_millis: wall.now_millis(),
        expired_grace_millis: 60_000,
        tombstone_retention_millis: 7 * 24 * 3_600_000,
        event_retention_millis: 24 * 3_600_000,
        step: 512,
        trim_log: true,
    };
    let first = a.reclaim(&policy).await.unwrap();
    assert_eq!(first.log_entries, 70_000, "{first:?}");
    assert_eq!(stream_messages(&cluster, region).await, 10_000);
    let r = reclaim_pass(&a, wall.now_millis(), true).await;
    assert_eq!(r.log_entries, 0, "nothing was left to remove: {r:?}");
    let c = store_at(&cluster, 2, region, "c", &wall).await;
    let got = c.get("notes", "k09999").await.unwrap().unwrap();
    assert_eq!(got.value(), &[7u8]);
    assert_eq!(
        c.state_entries().await.unwrap(),
        b.state_entries().await.unwrap()
    );
    assert_eq!(
        a.state_entries().await.unwrap(),
        b.state_entries().await.unwrap()
    );
}
