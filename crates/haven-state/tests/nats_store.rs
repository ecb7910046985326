//! The JetStream backend against the same contract as the embedded one, on a real
//! three-server NATS cluster on loopback (nats-server from scripts/install-tools).
//!
//! These tests run in the test command's `nats` stage (`scripts/on-nats`, with
//! `--include-ignored`), beside the rest of the JetStream suites; each starts its own cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use haven_state::{
    Batch, Change, Expect, HybridClock, LogFold, NatsConfig, NatsStore, Origin, Outcome, Record,
    Store, StoreError, Version, watch,
};

use haven_testkit::NatsCluster;

mod contract;

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
