//! Membership, ownership and leases on the in-memory log, under tokio's paused clock: time
//! moves only when every task waits, so the histories below are exact, not timed.

use std::sync::Arc;
use std::time::Duration;

use haven_cluster::{
    Claim, ClaimError, Execution, FenceError, Holding, Landed, Lease, Membership, MembershipConfig,
    Owner,
};
use haven_state::{
    Batch, HybridClock, LinkFaults, MemLog, Origin, PhysicalClock, Store, VirtualClock,
};

const START: u64 = 1_800_000_000_000;

struct Node {
    store: Arc<dyn Store>,
    faults: Arc<LinkFaults>,
    clock: Arc<VirtualClock>,
    membership: Arc<Membership>,
}

async fn node(log: &Arc<MemLog>, name: &str) -> Node {
    node_from(log, name, START).await
}

/// A node whose clock reads `base` now (a node that joins later reads the others' time).
async fn node_from(log: &Arc<MemLog>, name: &str, base: u64) -> Node {
    let clock = Arc::new(VirtualClock::new(base));
    let (store, faults) = log
        .join(
            Origin::new("r", name),
            Arc::new(HybridClock::new(clock.clone())),
        )
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let membership = Membership::new(
        store.clone(),
        MembershipConfig {
            node_id: name.into(),
            boot_id: format!("{name}-boot"),
            version: "test".into(),
            interval: Duration::from_secs(1),
            ttl: Duration::from_secs(5),
            max_skew: Duration::from_millis(500),
        },
    );
    Node {
        store,
        faults,
        clock,
        membership,
    }
}

/// One heartbeat round of every node whose link works (errors are the point of some tests).
async fn round(nodes: &[&Node]) {
    for n in nodes {
        let _ = n.membership.beat().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Three nodes on one log.
async fn three_nodes() -> (Node, Node, Node) {
    let log = MemLog::new();
    let (a, b, c) = (
        node(&log, "a").await,
        node(&log, "b").await,
        node(&log, "c").await,
    );
    (a, b, c)
}

/// Two nodes on one log after six heartbeat rounds together.
async fn two_nodes_that_know_each_other() -> (Node, Node) {
    let log = MemLog::new();
    let (a, b) = (node(&log, "a").await, node(&log, "b").await);
    for _ in 0..6 {
        round(&[&a, &b]).await;
    }
    (a, b)
}

fn dead(judge: &Node, other: &str) -> bool {
    judge.membership.is_dead(other, &format!("{other}-boot"))
}

#[tokio::test(start_paused = true)]
async fn skewed_clocks_neither_kill_nor_hide_nodes_and_are_reported() {
    let (a, b, c) = three_nodes().await;
    b.clock.set_offset(8_000);
    c.clock.set_offset(-8_000);
    for _ in 0..20 {
        round(&[&a, &b, &c]).await;
        for (judge, others) in [(&a, ["b", "c"]), (&b, ["a", "c"]), (&c, ["a", "b"])] {
            for o in others {
                assert!(!dead(judge, o), "{o} judged dead by {:?}", judge.membership);
            }
        }
    }
    let members = a.membership.members();
    let b_seen = members.iter().find(|m| m.info.node == "b").unwrap();
    let c_seen = members.iter().find(|m| m.info.node == "c").unwrap();
    assert!(b_seen.alive && c_seen.alive);
    assert!(b_seen.clock_skewed && c_seen.clock_skewed);
    let off = b_seen.clock_offset_millis.unwrap();
    assert!(
        (7_000..=8_000).contains(&off),
        "offset of b seen from a: {off}"
    );
    assert!(a.membership.max_clock_offset().unwrap() >= 7_000);
}

/// What the nodes of a test log (`tracing` output, this thread only).
#[derive(Clone, Default)]
struct Logged(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logged {
    /// Captures what this thread logs until the guard is dropped.
    fn capture() -> (Logged, tracing::subscriber::DefaultGuard) {
        let logged = Logged::default();
        let writer = logged.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logged, tracing::subscriber::set_default(subscriber))
    }

    fn skew_warnings(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock())
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("allowed skew"))
            .map(str::to_owned)
            .collect()
    }
}

fn seen(judge: &Node, other: &str) -> haven_cluster::Member {
    judge
        .membership
        .members()
        .into_iter()
        .find(|m| m.info.node == other)
        .unwrap_or_else(|| panic!("{other} is not a member for {:?}", judge.membership))
}

#[tokio::test(start_paused = true)]
async fn a_silent_nodes_aging_heartbeat_is_never_clock_skew() {
    let (logged, _guard) = Logged::capture();
    let log = MemLog::new();
    let (a, b, c) = (
        node(&log, "a").await,
        node(&log, "b").await,
        node(&log, "c").await,
    );
    // Every clock is the same one. c beats three times and goes silent (its process died).
    for _ in 0..3 {
        round(&[&a, &b, &c]).await;
    }
    let no_skew = |judge: &Node, at: &str| {
        let m = seen(judge, "c");
        assert!(
            !m.clock_skewed && m.clock_offset_millis.is_none_or(|o| o.abs() <= 500),
            "{at}: c seen as skewed: {m:?}"
        );
        m
    };
    // Three seconds later d starts: the first heartbeat of c it reads is three seconds old,
    // and a change feed catching up hands it c's older ones as if they had just arrived.
    for _ in 0..3 {
        round(&[&a, &b]).await;
    }
    let d = node_from(&log, "d", a.clock.now_millis()).await;
    let replay = |d: &Node| {
        let store = d.store.clone();
        let membership = d.membership.clone();
        async move {
            for entry in store.read_log(1, 10_000).await.unwrap() {
                membership.observe_change(&entry.change, entry.seq);
            }
        }
    };
    replay(&d).await;
    no_skew(&d, "d before its first heartbeat");
    for i in 0..10 {
        round(&[&a, &b, &d]).await;
        replay(&d).await;
        for judge in [&a, &b, &d] {
            let m = no_skew(judge, &format!("round {i}"));
            if m.silent_millis > 5_000 {
                // Past the time-to-live it is reported silent (and dead), with no offset.
                assert!(m.clock_offset_millis.is_none() && !m.alive, "{m:?}");
            }
        }
        // d never saw one of c's heartbeats fresh: it has no estimate of c's clock at all.
        assert_eq!(seen(&d, "c").clock_offset_millis, None);
        // The live nodes' clocks are estimated, and not skewed (a reads d's first heartbeat
        // in the second round).
        if i > 0 {
            let ad = seen(&a, "d");
            assert!(!ad.clock_skewed, "{ad:?}");
        }
    }
    assert_eq!(seen(&a, "d").clock_offset_millis, Some(0));
    assert!(a.membership.max_clock_offset().unwrap() <= 500);
    assert!(
        logged.skew_warnings().is_empty(),
        "{:?}",
        logged.skew_warnings()
    );
}

#[tokio::test(start_paused = true)]
async fn a_clock_two_seconds_off_is_reported_and_logged() {
    let (logged, _guard) = Logged::capture();
    let (a, b, c) = three_nodes().await;
    b.clock.set_offset(2_000);
    c.clock.set_offset(-2_000);
    for _ in 0..8 {
        round(&[&a, &b, &c]).await;
    }
    let (b_seen, c_seen) = (seen(&a, "b"), seen(&a, "c"));
    assert!(b_seen.alive && b_seen.clock_skewed, "{b_seen:?}");
    assert!(c_seen.alive && c_seen.clock_skewed, "{c_seen:?}");
    // Read by a heartbeat round a second after it was written, b's beat says only that b is
    // at least 1 s ahead; c's, written after a's own, that c is at least 2 s behind.
    let b_off = b_seen.clock_offset_millis.unwrap();
    let c_off = c_seen.clock_offset_millis.unwrap();
    assert!((1_000..=2_000).contains(&b_off), "{b_off}");
    assert!((-2_000..=-1_000).contains(&c_off), "{c_off}");
    assert!(a.membership.max_clock_offset().unwrap() >= 1_000);
    let warnings = logged.skew_warnings();
    for node in ["node=b", "node=c"] {
        assert_eq!(
            warnings.iter().filter(|w| w.contains(node)).count(),
            // a warns once of each, and so does the third node.
            2,
            "{warnings:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_paused_node_is_dead_after_the_ttl_and_alive_when_it_beats_again() {
    let (a, b) = two_nodes_that_know_each_other().await;
    b.faults.set_paused(true);
    for i in 0..6 {
        round(&[&a]).await;
        assert_eq!(dead(&a, "b"), i >= 4, "round {i}");
    }
    b.faults.set_paused(false);
    round(&[&a, &b]).await;
    round(&[&a, &b]).await;
    assert!(!dead(&a, "b"));
}

#[tokio::test(start_paused = true)]
async fn after_a_store_outage_nobody_is_judged_before_a_full_ttl_of_watching() {
    let (a, b) = two_nodes_that_know_each_other().await;
    // The store is unreachable for everyone for 10 s (a leader election, an outage).
    a.faults.set_down(true);
    b.faults.set_down(true);
    for i in 0..10 {
        round(&[&a, &b]).await;
        assert!(
            !dead(&a, "b"),
            "a judged b dead during the outage, round {i}"
        );
        assert!(
            !dead(&b, "a"),
            "b judged a dead during the outage, round {i}"
        );
    }
    // It comes back for `a` first; `b` is slower to reconnect by 3 s.
    a.faults.set_down(false);
    for _ in 0..3 {
        round(&[&a, &b]).await;
        assert!(!dead(&a, "b"), "judged before watching a full ttl");
    }
    b.faults.set_down(false);
    for i in 0..10 {
        round(&[&a, &b]).await;
        assert!(!dead(&a, "b"), "a judged b dead, round {i}");
        assert!(!dead(&b, "a"), "b judged a dead, round {i}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_that_left_is_dead_at_once_and_a_missing_one_after_the_ttl() {
    let (a, b) = two_nodes_that_know_each_other().await;
    b.membership.leave().await;
    round(&[&a]).await;
    assert!(dead(&a, "b"));
    // A node that never wrote a heartbeat (its in-flight records exist, its first beat failed).
    assert!(!dead(&a, "ghost"));
    for _ in 0..6 {
        round(&[&a]).await;
    }
    assert!(a.membership.is_dead("ghost", "g"));
}

#[tokio::test(start_paused = true)]
async fn a_takeover_fences_the_old_owner_and_only_one_claim_wins() {
    let (a, b, c) = three_nodes().await;
    let (exec, _) = Execution::open(
        a.store.clone(),
        "s/x/1",
        Owner::new("a", "a-boot"),
        Batch::new().append("st", b"first".to_vec()),
    )
    .await
    .unwrap();
    exec.commit(Batch::new().append("st", b"second".to_vec()), false)
        .await
        .unwrap();
    // b and c both find a dead and claim at the same time: one wins.
    let claim_b = Claim::read(&*b.store, "s/x/1").await.unwrap().unwrap();
    let claim_c = Claim::read(&*c.store, "s/x/1").await.unwrap().unwrap();
    let (rb, rc) = tokio::join!(
        claim_b.take(b.store.clone(), "b", "b-boot", Batch::new(), None),
        claim_c.settle(
            &*c.store,
            Batch::new().append("st", b"settled".to_vec()),
            None
        ),
    );
    let winners = usize::from(rb.is_ok()) + usize::from(rc.is_ok());
    assert_eq!(winners, 1, "{rb:?} {rc:?}");
    assert!(matches!(
        rb.as_ref().err().or(rc.as_ref().err()),
        Some(ClaimError::Lost(_))
    ));
    // The old owner wakes and writes: refused, and its execution says it is lost.
    let r = exec
        .commit(Batch::new().append("st", b"zombie".to_vec()), false)
        .await;
    assert!(matches!(r, Err(FenceError::Fenced { .. })), "{r:?}");
    assert!(exec.lost().is_cancelled());
    let events = a.store.read_events("st", 0, 10).await.unwrap();
    assert!(events.iter().all(|e| e.data != b"zombie"));
    // A second claim of the settled (or re-owned) execution by c cannot take it from b.
    if let Ok((exec_b, _)) = rb {
        exec_b
            .finish(Batch::new().append("st", b"final".to_vec()))
            .await
            .unwrap();
        assert!(Claim::read(&*c.store, "s/x/1").await.unwrap().is_none());
    }
}

/// Node `a` alone on a new log, running an execution of `key` opened with no writes.
async fn lone_execution(key: &str) -> (Node, Arc<Execution>) {
    let a = node(&MemLog::new(), "a").await;
    let (exec, _) = Execution::open(
        a.store.clone(),
        key,
        Owner::new("a", "a-boot"),
        Batch::new(),
    )
    .await
    .unwrap();
    (a, exec)
}

#[tokio::test(start_paused = true)]
async fn a_write_whose_answer_was_lost_is_not_applied_twice() {
    let (a, exec) = lone_execution("s/x/2").await;
    let batch = Batch::new().append("st2", b"progress".to_vec());
    a.faults.lose_acks(1);
    let first = exec.commit(batch.clone(), false).await;
    assert!(matches!(first, Err(FenceError::Store(_))), "{first:?}");
    let retry = exec.commit(batch.clone(), false).await.unwrap();
    assert!(matches!(retry, Landed::Earlier), "{retry:?}");
    assert_eq!(a.store.read_events("st2", 0, 10).await.unwrap().len(), 1);
    // And the execution goes on normally.
    exec.commit(batch, false).await.unwrap();
    assert_eq!(a.store.read_events("st2", 0, 10).await.unwrap().len(), 2);
}

/// A write whose answer was lost (it was stored) followed by a write that failed outright (it
/// was not): the retry of the second is stored, never taken for the first. The ownership
/// record moved because of the first write, not the second.
#[tokio::test(start_paused = true)]
async fn a_failed_write_is_not_taken_for_an_earlier_one_whose_answer_was_lost() {
    for finish in [false, true] {
        let (a, exec) = lone_execution("s/x/3").await;
        // A handler's write: stored, its answer lost.
        a.faults.lose_acks(1);
        let handler = Batch::new().put("notes", "n1", b"v".to_vec());
        let r = exec.commit(handler.clone(), true).await;
        assert!(matches!(r, Err(FenceError::Store(_))), "{r:?}");
        // The stream's next write finds the store unavailable: nothing is stored.
        a.faults.set_down(true);
        let next = Batch::new().append("st3", b"final".to_vec());
        let write = |b: Batch| async {
            if finish {
                exec.finish(b).await
            } else {
                exec.commit(b, false).await
            }
        };
        let r = write(next.clone()).await;
        assert!(matches!(r, Err(FenceError::Store(_))), "{r:?}");
        a.faults.set_down(false);
        // Its retry stores it.
        let r = write(next).await.unwrap();
        assert!(matches!(r, Landed::Now(_)), "finish {finish}: {r:?}");
        let events = a.store.read_events("st3", 0, 10).await.unwrap();
        assert_eq!(events.len(), 1, "finish {finish}");
        assert_eq!(
            Claim::read(&*a.store, "s/x/3").await.unwrap().is_none(),
            finish
        );
        // The handler's retry of its own write is recognised as stored, not applied again.
        if !finish {
            let r = exec.commit(handler, true).await.unwrap();
            assert!(matches!(r, Landed::Earlier), "{r:?}");
            assert_eq!(exec.owner().await.writes, 2);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_passes_only_after_its_holder_stops_renewing_for_the_ttl() {
    let log = MemLog::new();
    let (a, b) = (node(&log, "a").await, node(&log, "b").await);
    // b's clock is far ahead: it must not matter.
    b.clock.set_offset(60_000);
    let ttl = Duration::from_secs(10);
    let mut la = Lease::new(a.store.clone(), "system", "lease", "a", ttl);
    let mut lb = Lease::new(b.store.clone(), "system", "lease", "b", ttl);
    assert_eq!(la.hold().await.unwrap(), Holding::Held { taken: true });
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(
            la.hold().await.unwrap(),
            Holding::Held { taken: false }
        ));
        assert!(matches!(lb.hold().await.unwrap(), Holding::Standby { .. }));
    }
    // a stops renewing; b takes over after watching the record unchanged for the ttl.
    let mut taken_after = None;
    for s in 1..=15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if lb.hold().await.unwrap() == (Holding::Held { taken: true }) {
            taken_after = Some(s);
            break;
        }
    }
    assert!(matches!(taken_after, Some(10..=12)), "{taken_after:?}");
    assert!(matches!(la.hold().await.unwrap(), Holding::Standby { .. }));
}
