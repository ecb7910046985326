//! Presence on the JetStream backend's NATS connection, on a real three-server NATS cluster on
//! loopback (nats-server from scripts/install-tools): what a probe of another process finds
//! when that process answers, when it holds its connection but does not answer (as a paused
//! process does), and when its connection is gone (as a killed process's is).
//!
//! Runs in the test command's `nats` stage (`scripts/on-nats`, with `--include-ignored`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use haven_state::{HybridClock, NatsConfig, NatsStore, Origin, Presence, Probe};
use haven_testkit::NatsCluster;

const REGION: &str = "presence-region";
const TIMEOUT: Duration = Duration::from_millis(500);

async fn store(cluster: &NatsCluster, i: usize, node: &str) -> NatsStore {
    let config = NatsConfig {
        servers: vec![cluster.url(i)],
        region: REGION.into(),
        replicas: 3,
        tls: Default::default(),
    };
    NatsStore::open(
        &config,
        Origin::new(REGION, node),
        Arc::new(HybridClock::default()),
    )
    .await
    .unwrap()
}

/// The subject a process answers presence probes on (as `nats_store` names it).
fn subject(node: &str, boot: &str) -> String {
    let t = |s: &str| format!("_{}", hex::encode(s.as_bytes()));
    format!("hvp.{}.{}.{}", t(REGION), t(node), t(boot))
}

/// Probes until the answer is not `Unknown` because the probing connection is still new
/// (bounded): what the first probes of a fresh connection say.
async fn settled_probe(p: &dyn Presence, node: &str, boot: &str) -> Probe {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = p.probe(REGION, node, boot, TIMEOUT).await;
        if found != Probe::Unknown || tokio::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "JetStream: runs in the nats stage (scripts/on-nats)"]
async fn a_probe_finds_an_answering_process_present_a_silent_one_unknown_and_a_closed_one_absent() {
    let cluster = NatsCluster::start().await;
    // The prober on server 0, the announced process on server 1: interest crosses routes.
    let a = store(&cluster, 0, "a").await;
    let b = store(&cluster, 1, "b").await;
    let prober = a.log().presence();
    b.log()
        .presence()
        .announce(REGION, "b", "b1")
        .await
        .unwrap();

    // A fresh connection cannot tell yet (a server it just joined may not know every
    // subscription of the cluster): no `Absent` from it, even for a process never announced.
    assert_eq!(
        prober.probe(REGION, "nobody", "x", TIMEOUT).await,
        Probe::Unknown
    );

    assert_eq!(settled_probe(&*prober, "b", "b1").await, Probe::Present);
    // Another boot of the same node, never announced: no connection answers for it.
    assert_eq!(settled_probe(&*prober, "b", "b0").await, Probe::Absent);

    // A process that holds its connection and subscription but does not answer (a paused
    // one): the probe goes unanswered, which is never `Absent`.
    // It is on the prober's own server: once its flush returns, that server has its
    // subscription (one on another server would reach the prober's server over the routes a
    // moment later, and until then the probe would find no responder).
    let silent = async_nats::connect(cluster.url(0)).await.unwrap();
    let mut sub = silent.subscribe(subject("c", "c1")).await.unwrap();
    silent.flush().await.unwrap();
    assert_eq!(
        prober.probe(REGION, "c", "c1", TIMEOUT).await,
        Probe::Unknown
    );
    // The probe did reach it.
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert!(
        matches!(got, Ok(Some(_))),
        "the probe was delivered: {got:?}"
    );

    // Its subscription and connection go (as a killed process's do when its kernel closes
    // the socket): absent, once the servers have dropped the subscription.
    drop(sub);
    drop(silent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = prober.probe(REGION, "c", "c1", TIMEOUT).await;
        if found == Probe::Absent {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed connection's process is still found {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The announced process still answers.
    assert_eq!(
        prober.probe(REGION, "b", "b1", TIMEOUT).await,
        Probe::Present
    );
}
