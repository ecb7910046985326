//! Regions on in-memory logs under tokio's paused clock: each region its own log and nodes,
//! each applying the other's log with a replicator; links cut and healed by the links' own
//! switches (the real-process version, with nats-servers joined by leafnodes through a
//! cuttable proxy, is `crates/haven/tests/regions.rs`).

use std::sync::Arc;
use std::time::Duration;

use haven_cluster::regions::{HealthConfig, LOCAL_NS, Regions, replicates, state_digest};
use haven_cluster::takeover::{LEASE_TERM, Stage, Takeover, takeovers_of};
use haven_cluster::{Claim, Execution, Membership, MembershipConfig, Owner};
use haven_state::{
    Batch, Change, HybridClock, LinkFaults, MemLog, Origin, SharedLog, Store, VirtualClock,
};

const START: u64 = 1_800_000_000_000;

struct Region {
    name: &'static str,
    log: Arc<MemLog>,
    store: Arc<dyn Store>,
    membership: Arc<Membership>,
}

async fn region(name: &'static str, node: &str) -> Region {
    let log = MemLog::new();
    let clock = Arc::new(VirtualClock::new(START));
    let (store, _) = log
        .join(Origin::new(name, node), Arc::new(HybridClock::new(clock)))
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let membership = Membership::new(
        store.clone(),
        MembershipConfig {
            node_id: node.into(),
            boot_id: format!("{node}-boot"),
            version: "test".into(),
            interval: Duration::from_secs(1),
            ttl: Duration::from_secs(5),
            max_skew: Duration::from_millis(500),
        },
    );
    Region {
        name,
        log,
        store,
        membership,
    }
}

/// `to` applies `from`'s log; returns the switches of the link it reads through.
fn replicate(from: &Region, to: &Region, node: &str) -> (Regions, Arc<LinkFaults>) {
    let (link, faults) = from.log.link();
    let log: Arc<dyn SharedLog> = Arc::new(link);
    let regions = Regions::start(to.store.clone(), node, vec![(from.name.to_owned(), log)]);
    (regions, faults)
}

async fn put(store: &dyn Store, key: &str, value: &str) {
    store
        .commit(Batch::new().put("notes", key, value.as_bytes().to_vec()))
        .await
        .unwrap();
}

async fn value(store: &dyn Store, key: &str) -> Option<String> {
    store
        .get("notes", key)
        .await
        .unwrap()
        .map(|r| String::from_utf8_lossy(r.value()).into_owned())
}

/// Lets the replicators run for `secs` seconds of paused time.
async fn run_for(secs: u64, regions: &[&Region]) {
    for _ in 0..secs {
        for r in regions {
            let _ = r.membership.beat().await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn every_write_reaches_the_other_region_and_both_converge() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let (ra, _) = replicate(&b, &a, "a1");
    let (rb, _) = replicate(&a, &b, "b1");

    put(&*a.store, "from-a", "1").await;
    put(&*b.store, "from-b", "2").await;
    a.store
        .commit(
            Batch::new()
                .append("sse/s/1", b"e1".to_vec())
                .append("sse/s/1", b"e2".to_vec()),
        )
        .await
        .unwrap();
    // The same key on both sides: the later version wins in both regions.
    put(&*a.store, "both", "a").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    put(&*b.store, "both", "b").await;
    run_for(3, &[&a, &b]).await;

    for r in [&a, &b] {
        assert_eq!(
            value(&*r.store, "from-a").await.as_deref(),
            Some("1"),
            "{}",
            r.name
        );
        assert_eq!(
            value(&*r.store, "from-b").await.as_deref(),
            Some("2"),
            "{}",
            r.name
        );
        assert_eq!(
            value(&*r.store, "both").await.as_deref(),
            Some("b"),
            "{}",
            r.name
        );
    }
    let events = b.store.read_events("sse/s/1", 0, 10).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        vec![b"e1".to_vec(), b"e2".to_vec()]
    );
    assert_eq!(
        state_digest(&*a.store).await.unwrap(),
        state_digest(&*b.store).await.unwrap()
    );

    // Status: the link replicates, nothing is behind, the lag comes from heartbeats.
    let st = rb.status().await;
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].name, "A");
    assert_eq!(st[0].link, "replicating");
    assert_eq!(st[0].behind_entries, Some(0));
    assert_eq!(st[0].nodes, 1);
    assert!(st[0].lag_seconds.is_some_and(|l| l <= 1.0), "{st:?}");
    assert!(ra.status().await[0].changes_applied >= 2);

    // A region's own bookkeeping never travels: no cursor or lease of B is in A's log.
    for e in a.log.entries() {
        if let Change::Record(r) = &e.change {
            assert!(
                !(r.namespace == LOCAL_NS && &*r.version.origin.region == "B"),
                "{r:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_applied_whole_in_the_other_region() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let (_rb, _) = replicate(&a, &b, "b1");
    for i in 0..20 {
        let mut batch = Batch::new();
        for k in 0..5 {
            batch = batch.put("notes", &format!("n{i}-{k}"), vec![k]);
        }
        a.store.commit(batch).await.unwrap();
    }
    run_for(3, &[&a, &b]).await;
    // Every batch of B's log that holds A's notes holds whole batches of A.
    let mut seen = 0;
    for batch in b.log.batches() {
        let notes: Vec<String> = batch
            .iter()
            .filter_map(|e| match &e.change {
                Change::Record(r) if r.namespace == "notes" => Some(r.key.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            notes.len() % 5,
            0,
            "a partial batch of A applied in B: {notes:?}"
        );
        seen += notes.len();
    }
    assert_eq!(seen, 100);
}

#[tokio::test(start_paused = true)]
async fn a_partition_heals_into_one_state_and_nothing_is_lost() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let (_ra, b_to_a) = replicate(&b, &a, "a1");
    let (_rb, a_to_b) = replicate(&a, &b, "b1");
    put(&*a.store, "before", "x").await;
    run_for(2, &[&a, &b]).await;
    assert_eq!(value(&*b.store, "before").await.as_deref(), Some("x"));

    // Cut both directions for 40 s; both sides keep taking writes, some to the same keys.
    a_to_b.set_down(true);
    b_to_a.set_down(true);
    for i in 0..40 {
        put(&*a.store, &format!("a-{i}"), "a").await;
        put(&*b.store, &format!("b-{i}"), "b").await;
        put(&*a.store, &format!("same-{}", i % 5), &format!("a{i}")).await;
        put(&*b.store, &format!("same-{}", i % 5), &format!("b{i}")).await;
        if i == 20 {
            a.store
                .commit(Batch::new().delete("notes", "before"))
                .await
                .unwrap();
        }
        run_for(1, &[&a, &b]).await;
    }
    assert_eq!(value(&*b.store, "a-0").await, None, "the link was cut");
    assert_ne!(
        state_digest(&*a.store).await.unwrap(),
        state_digest(&*b.store).await.unwrap()
    );

    a_to_b.set_down(false);
    b_to_a.set_down(false);
    // Idle links notice the cut at their next delivery; give them a write to deliver.
    put(&*a.store, "after", "a").await;
    put(&*b.store, "after-b", "b").await;
    run_for(5, &[&a, &b]).await;
    assert_eq!(
        state_digest(&*a.store).await.unwrap(),
        state_digest(&*b.store).await.unwrap()
    );
    for r in [&a, &b] {
        for i in 0..40 {
            assert_eq!(
                value(&*r.store, &format!("a-{i}")).await.as_deref(),
                Some("a")
            );
            assert_eq!(
                value(&*r.store, &format!("b-{i}")).await.as_deref(),
                Some("b")
            );
        }
        // Per same key, the greater (HLC, origin) of the split wins everywhere: B wrote each
        // after A at the same clock reading, and then B (later counter or origin) wins.
        for k in 0..5 {
            assert_eq!(
                value(&*r.store, &format!("same-{k}")).await,
                Some(format!("b{}", 35 + k)),
                "{}",
                r.name
            );
        }
        assert_eq!(
            value(&*r.store, "before").await,
            None,
            "the delete wins in {}",
            r.name
        );
    }
}

#[tokio::test(start_paused = true)]
async fn another_regions_nodes_and_executions_are_never_judged_here() {
    let a = region("A", "n1").await;
    let b = region("B", "n1").await; // the same node id in both regions
    let (_rb, _) = replicate(&a, &b, "n1");
    let owner = Owner::new("n1", "n1-boot-a");
    let _exec = Execution::open(a.store.clone(), "s/x/1", owner, Batch::new())
        .await
        .unwrap();
    run_for(12, &[&a, &b]).await;
    assert!(
        b.store.get("owners", "s/x/1").await.unwrap().is_some(),
        "replicated"
    );
    // B's membership sees only B's node; A's execution is not B's to claim.
    let members = b.membership.members();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].info.region, "B");
    assert!(
        b.membership.is_dead("n1", "n1-boot-a"),
        "another boot of B's own n1"
    );
    assert!(Claim::read(&*b.store, "s/x/1").await.unwrap().is_none());
    assert!(Claim::read(&*a.store, "s/x/1").await.unwrap().is_some());
    // Every replicated change is one that A wrote itself.
    for e in b.log.entries() {
        if let Change::Record(r) = &e.change
            && &*r.version.origin.region == "A"
        {
            assert!(replicates(&e.change, "A"));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn one_node_of_a_region_replicates_at_a_time() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let clock = Arc::new(VirtualClock::new(START));
    let (b2, b2_faults) = b
        .log
        .join(Origin::new("B", "b2"), Arc::new(HybridClock::new(clock)))
        .await
        .unwrap();
    let b2: Arc<dyn Store> = Arc::new(b2);
    let (r1, _) = replicate(&a, &b, "b1");
    let (l2, _) = a.log.link();
    let r2 = Regions::start(b2.clone(), "b2", vec![("A".into(), Arc::new(l2))]);
    for i in 0..10 {
        put(&*a.store, &format!("k{i}"), "v").await;
        run_for(1, &[&a, &b]).await;
    }
    let s1 = r1.status().await;
    let s2 = r2.status().await;
    let states = [s1[0].link.as_str(), s2[0].link.as_str()];
    assert!(
        states.contains(&"replicating") && states.contains(&"standby"),
        "{states:?}"
    );
    // Every note applied exactly once in B's log.
    let applied = b
        .log
        .entries()
        .iter()
        .filter(|e| matches!(&e.change, Change::Record(r) if r.namespace == "notes"))
        .count();
    assert_eq!(applied, 10);
    // The holder's node dies: the other takes over after the lease's time-to-live.
    let holder_is_b2 = s2[0].link == "replicating";
    if holder_is_b2 {
        b2_faults.kill();
        drop(r2);
    } else {
        drop(r1);
    }
    put(&*a.store, "later", "v").await;
    run_for(12, &[&a]).await;
    assert_eq!(
        value(if holder_is_b2 { &*b.store } else { &*b2 }, "later")
            .await
            .as_deref(),
        Some("v")
    );
}

/// The switches of the link `(from, to)`: region `to` reads `from` through it.
type Links = Vec<((usize, usize), Arc<LinkFaults>)>;

/// A region's running replicators and the switches of the links they read through (by the
/// index of the region read).
type Running = Vec<Option<(Regions, Vec<(usize, Arc<LinkFaults>)>)>>;

/// Every region applies every other's log; returns each region's `Regions` and the links.
fn mesh(all: &[&Region]) -> (Vec<Regions>, Links) {
    mesh_with(all, 3)
}

/// [`mesh`], judging a region failed after `threshold` checks of 1 s.
fn mesh_with(all: &[&Region], threshold: u32) -> (Vec<Regions>, Links) {
    let mut out = Vec::new();
    let mut links = Vec::new();
    for (t, to) in all.iter().enumerate() {
        let mut peers: Vec<(String, Arc<dyn SharedLog>)> = Vec::new();
        for (f, from) in all.iter().enumerate() {
            if f == t {
                continue;
            }
            let (link, faults) = from.log.link();
            peers.push((from.name.to_owned(), Arc::new(link)));
            links.push(((f, t), faults));
        }
        let node = format!("{}-node", to.name);
        out.push(Regions::start_with(
            to.store.clone(),
            &node,
            peers,
            HealthConfig {
                interval: Duration::from_secs(1),
                threshold,
            },
        ));
    }
    (out, links)
}

/// Cuts (or heals) every link to and from region `i`.
fn isolate(links: &Links, i: usize, cut: bool) {
    for ((f, t), faults) in links {
        if *f == i || *t == i {
            faults.set_down(cut);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_majority_of_regions_moves_the_active_role_away_from_a_silent_region() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let c = region("C", "c1").await;
    let (rs, links) = mesh(&[&a, &b, &c]);
    let roles = rs[0].promote(false).await.unwrap();
    assert_eq!((roles.epoch, roles.active.as_deref()), (1, Some("A")));
    run_for(5, &[&a, &b, &c]).await;
    assert_eq!(rs[2].roles().await.unwrap().active.as_deref(), Some("A"));

    // A goes silent to both others: after 3 checks of 1 s, B and C agree, and B (first by
    // name) becomes active. A, alone, changes nothing.
    isolate(&links, 0, true);
    run_for(8, &[&a, &b, &c]).await;
    for r in [&rs[1], &rs[2]] {
        let roles = r.roles().await.unwrap();
        assert_eq!(roles.active.as_deref(), Some("B"), "{roles:?}");
        assert_eq!(roles.epoch, 2);
        assert!(roles.reason.contains("automatic failover"), "{roles:?}");
    }
    assert_eq!(rs[0].roles().await.unwrap().active.as_deref(), Some("A"));
    // A, cut off from both others, knows it is no longer heard by a majority (so it is not
    // preferred by load balancers even though its own roles record still names it).
    assert!(!rs[0].hears_majority());
    assert!(rs[1].hears_majority() && rs[2].hears_majority());

    // A returns: it learns the newer roles and is a standby; a planned switchover (demote
    // B, then promote A once caught up) makes it active again.
    isolate(&links, 0, false);
    put(&*a.store, "wake", "1").await;
    put(&*b.store, "wake-b", "1").await;
    put(&*c.store, "wake-c", "1").await;
    run_for(5, &[&a, &b, &c]).await;
    assert_eq!(rs[0].roles().await.unwrap().active.as_deref(), Some("B"));
    rs[1].demote().await.unwrap();
    run_for(3, &[&a, &b, &c]).await;
    let roles = rs[0].promote(false).await.unwrap();
    assert_eq!((roles.epoch, roles.active.as_deref()), (4, Some("A")));
    run_for(3, &[&a, &b, &c]).await;
    for r in &rs {
        assert_eq!(r.roles().await.unwrap(), roles);
    }
}

#[tokio::test(start_paused = true)]
async fn one_side_of_a_split_never_fails_over_alone() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let (rs, links) = mesh(&[&a, &b]);
    rs[0].promote(false).await.unwrap();
    run_for(3, &[&a, &b]).await;
    isolate(&links, 0, true);
    run_for(30, &[&a, &b]).await;
    assert!(rs[1].silent_for("A").unwrap() >= Duration::from_secs(3));
    assert_eq!(rs[1].roles().await.unwrap().active.as_deref(), Some("A"));
    // An operator may still promote B, but only by forcing it while A may be alive.
    let refused = rs[1].promote(false).await.unwrap_err().to_string();
    assert!(
        refused.contains("--force") && refused.contains("A"),
        "{refused}"
    );
    let forced = rs[1].promote(true).await.unwrap();
    assert_eq!(forced.active.as_deref(), Some("B"));
}

/// Three regions whose nodes renew their region leases and claim, for a takeover, every
/// claimable execution of the failed region held here (what the engine's
/// `take_over_region` does, minus running the work again). A region is judged failed after
/// one check of 1 s: sooner than its lease runs out, so that the claimer's wait is what
/// keeps the claims after it.
fn leased_mesh(all: &[&Region]) -> (Vec<Regions>, Links, Claims) {
    let (rs, links) = mesh_with(all, 1);
    let claims: Claims = Default::default();
    for (r, region) in rs.iter().zip(all) {
        let claims = claims.clone();
        let lease = r.lease().expect("three regions lease");
        region.membership.set_region_lease(lease.clone());
        let store = region.store.clone();
        let node = format!("{}-claimer", region.name);
        r.set_takeover_handler(Arc::new(move |source: String| {
            let (store, lease, node) = (store.clone(), lease.clone(), node.clone());
            claims
                .lock()
                .push((node.clone(), tokio::time::Instant::now()));
            Box::pin(async move {
                let mut claimed = 0;
                for rec in store
                    .scan_all("owners", "")
                    .await
                    .map_err(|e| e.to_string())?
                {
                    let owner = Owner::decode(rec.value()).unwrap();
                    if *rec.record.version.origin.region != *source || !owner.claimable {
                        continue;
                    }
                    let claim = Claim {
                        key: rec.record.key.clone(),
                        dead: owner,
                        revision: rec.revision,
                    };
                    claim
                        .take(store.clone(), &node, "boot", Batch::new(), Some(&lease))
                        .await
                        .map_err(|e| e.to_string())?;
                    claimed += 1;
                }
                Ok(claimed)
            })
        }));
    }
    (rs, links, claims)
}

/// When each region's takeover handler ran: (claiming node, instant).
type Claims = Arc<parking_lot::Mutex<Vec<(String, tokio::time::Instant)>>>;

/// The takeover of `source` held in `store` that was not aborted, with its claimer: `B` or
/// `C`, whichever applied the most of the source's log (then the first by name).
async fn live_takeover(store: &dyn Store, source: &str) -> Option<(String, Takeover)> {
    takeovers_of(store, source)
        .await
        .unwrap()
        .into_iter()
        .map(|(claimer, (t, _))| (claimer, t))
        .find(|(_, t)| t.stage != Stage::Aborted)
}

/// The takeover record of `source` by `claimer` held in `store`.
async fn takeover(store: &dyn Store, source: &str, claimer: &str) -> Option<Takeover> {
    takeovers_of(store, source)
        .await
        .unwrap()
        .remove(claimer)
        .map(|(t, _)| t)
}

#[tokio::test(start_paused = true)]
async fn a_failed_regions_claimable_work_is_taken_over_only_after_its_lease_ran_out() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let c = region("C", "c1").await;
    let (rs, links, claims) = leased_mesh(&[&a, &b, &c]);
    let all = [&a, &b, &c];
    run_for(5, &all).await;
    let lease_a = rs[0].lease().unwrap();
    assert!(lease_a.holds(), "{lease_a:?}");

    // A opens an execution while it holds its lease (claimable), and it replicates.
    let (exec, _) = Execution::open_leased(
        a.store.clone(),
        "s/x/1",
        Owner::new("a1", "a1-boot"),
        Batch::new(),
        Some(&lease_a),
    )
    .await
    .unwrap();
    assert!(exec.owner().await.claimable);
    let (ending, _) = Execution::open_leased(
        a.store.clone(),
        "s/x/0",
        Owner::new("a1", "a1-boot"),
        Batch::new(),
        Some(&lease_a),
    )
    .await
    .unwrap();
    run_for(2, &all).await;
    assert!(b.store.get("owners", "s/x/1").await.unwrap().is_some());

    // A is cut off from both others. Its lease lapses; a write of the execution waits.
    isolate(&links, 0, true);
    // A last write made just after the cut, while A's lease still holds, lands in A's log
    // but never reaches the others: it does not return (its answer is not shown to anyone)
    // until a majority holds it, and B's takeover supersedes it.
    assert!(lease_a.holds());
    let last = {
        let ending = ending.clone();
        tokio::spawn(async move {
            ending
                .finish(Batch::new().append("sse/x0", b"final".to_vec()))
                .await
        })
    };
    let writer = {
        let exec = exec.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            exec.commit(Batch::new().append("sse/x", b"late".to_vec()), false)
                .await
        })
    };
    // Work A opens without its lease is not claimable, and writes without waiting.
    let mut unclaimable = None;
    let mut decided_at = None;
    // The latest instant A's lease ever held until after the cut, and when C's echo of A
    // was first seen frozen (to the second).
    let mut until = tokio::time::Instant::now();
    let mut froze = [None, None];
    for second in 0..30 {
        if let Some(r) = lease_a.remaining() {
            until = until.max(tokio::time::Instant::now() + r);
        }
        run_for(1, &all).await;
        for (k, r) in [&rs[1], &rs[2]].into_iter().enumerate() {
            if froze[k].is_none() && r.takeovers().await.unwrap().echoes["A"].frozen.is_some() {
                froze[k] = Some(tokio::time::Instant::now());
            }
        }
        if unclaimable.is_none() && !lease_a.holds() {
            let (e, _) = Execution::open_leased(
                a.store.clone(),
                "s/x/2",
                Owner::new("a1", "a1-boot"),
                Batch::new(),
                Some(&lease_a),
            )
            .await
            .unwrap();
            assert!(!e.owner().await.claimable);
            e.commit(Batch::new().append("sse/x2", b"on".to_vec()), false)
                .await
                .unwrap();
            unclaimable = Some(e);
        }
        if let Some((name, t)) = live_takeover(&*b.store, "A").await
            && t.stage != Stage::Intent
        {
            decided_at = Some((second, name));
            break;
        }
    }
    let (decided_at, claimer) = decided_at.expect("B or C decided the takeover");
    let by = if claimer == "B" { &b } else { &c };
    let claimer_node = format!("{claimer}-claimer");
    assert!(!writer.is_finished(), "A's write waits for its lease");
    assert!(
        !last.is_finished(),
        "A's last write waits for a majority to hold it"
    );
    run_for(3, &all).await;
    // Only B claimed, once, and only after A's lease had run out (A stopped starting
    // claimable writes HOLD_MARGIN before that).
    let claimed = claims.lock().clone();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].0, claimer_node);
    assert!(
        claimed[0].1 >= until,
        "B claimed {:?} before A's lease ran out",
        until - claimed[0].1
    );
    // Whatever A's lease was: any echo of C that renewed it was written before C froze, so
    // B claims a full lease term after that.
    // A majority (both) froze; the claimer claims a full lease term after it saw that.
    let froze = froze[0]
        .max(froze[1])
        .filter(|_| froze.iter().all(Option::is_some))
        .expect("B and C froze their echoes of A");
    assert!(
        claimed[0].1 + Duration::from_secs(1) >= froze + LEASE_TERM,
        "{claimer} claimed {:?} after the majority froze",
        claimed[0].1 + Duration::from_secs(1) - froze
    );
    let t = takeover(&*by.store, "A", &claimer).await.unwrap();
    assert_eq!((t.stage, t.claimed), (Stage::Done, 2), "{t:?}");
    assert!(t.done_seq > 0);
    let owner = Owner::decode(
        by.store
            .get("owners", "s/x/1")
            .await
            .unwrap()
            .unwrap()
            .value(),
    )
    .unwrap();
    assert_eq!(
        (owner.node.as_str(), owner.epoch),
        (claimer_node.as_str(), 2)
    );
    // C froze its echo of A for B, and both stay frozen while A cannot have applied it.
    for r in [&rs[1], &rs[2]] {
        let status = r.takeovers().await.unwrap();
        assert!(status.echoes["A"].frozen.is_some(), "{status:?}");
    }
    println!("{claimer} decided {decided_at} s after the cut");

    // A returns: it applies B's claim, so its waiting write finds the execution taken and
    // changes nothing; the freezes are released once A has applied B's log up to the
    // claims, and A's lease holds again.
    isolate(&links, 0, false);
    run_for(8, &all).await;
    let late = writer.await.unwrap();
    assert!(late.is_err(), "{late:?}");
    let last = last.await.unwrap();
    assert!(
        matches!(last, Err(haven_cluster::FenceError::Fenced { .. })),
        "{last:?}"
    );
    let owner = Owner::decode(
        a.store
            .get("owners", "s/x/0")
            .await
            .unwrap()
            .unwrap()
            .value(),
    )
    .unwrap();
    assert_eq!(
        owner.epoch, 2,
        "B's claim supersedes A's last write everywhere"
    );
    assert!(
        a.store
            .read_events("sse/x", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    for r in [&rs[1], &rs[2]] {
        let status = r.takeovers().await.unwrap();
        assert_eq!(status.echoes["A"].frozen, None, "{status:?}");
    }
    assert!(lease_a.holds(), "{lease_a:?}");
    // The unclaimable execution is still A's, and goes on.
    let e = unclaimable.unwrap();
    e.commit(Batch::new().append("sse/x2", b"after".to_vec()), false)
        .await
        .unwrap();
    run_for(3, &all).await;
    let (da, _) = state_digest(&*a.store).await.unwrap();
    for r in [&b, &c] {
        assert_eq!(state_digest(&*r.store).await.unwrap().0, da);
    }

    // A fails again with new claimable work: a second round takes it over.
    let (_again, _) = Execution::open_leased(
        a.store.clone(),
        "s/x/3",
        Owner::new("a1", "a1-boot"),
        Batch::new(),
        Some(&lease_a),
    )
    .await
    .unwrap();
    run_for(2, &all).await;
    isolate(&links, 0, true);
    let mut second = None;
    for _ in 0..30 {
        run_for(1, &all).await;
        // By either region: the same one in a later round, or the other.
        second = takeovers_of(&*b.store, "A")
            .await
            .unwrap()
            .into_iter()
            .map(|(name, (t, _))| (name, t))
            .find(|(name, x)| x.sealed && (*name != claimer || x.round > t.round));
        if second.is_some() {
            break;
        }
    }
    if second.is_none() {
        for (n, r) in [("B", &rs[1]), ("C", &rs[2])] {
            eprintln!("{n}: {:?}", r.takeovers().await.unwrap());
        }
    }
    let (second_by, second) = second.expect("a second takeover");
    assert_eq!(second.claimed, 1, "{second:?}");
    if second_by == claimer {
        assert!(second.done_seq > t.done_seq);
    }
    let owner = Owner::decode(
        b.store
            .get("owners", "s/x/3")
            .await
            .unwrap()
            .unwrap()
            .value(),
    )
    .unwrap();
    assert_eq!(owner.epoch, 2);
    isolate(&links, 0, false);
    run_for(8, &all).await;
    assert!(lease_a.holds(), "{lease_a:?}");
    assert_eq!(claims.lock().len(), 2);
}

/// A region cut off in two steps: first its log stops reaching B, while C still applies it
/// and echoes; A ends an execution then (its last write is confirmed by C's echo alone, so
/// its answer may have been shown), and only then is A cut off from both. B, first by name,
/// lacks that last write: if B took over, it would run the ended execution again. C, which
/// applied the most of A's log, takes over instead, and the ended execution stays ended.
#[tokio::test(start_paused = true)]
async fn the_region_holding_most_of_a_silent_regions_log_takes_it_over() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let c = region("C", "c1").await;
    let (rs, links, claims) = leased_mesh(&[&a, &b, &c]);
    let all = [&a, &b, &c];
    run_for(5, &all).await;
    let lease_a = rs[0].lease().unwrap();
    assert!(lease_a.holds(), "{lease_a:?}");
    let mut open = Vec::new();
    for key in ["s/y/ends", "s/y/runs"] {
        let (e, _) = Execution::open_leased(
            a.store.clone(),
            key,
            Owner::new("a1", "a1-boot"),
            Batch::new(),
            Some(&lease_a),
        )
        .await
        .unwrap();
        open.push(e);
    }
    run_for(2, &all).await;
    assert!(b.store.get("owners", "s/y/ends").await.unwrap().is_some());

    // A's log stops reaching B (A still hears B, and C hears A).
    for ((f, t), faults) in &links {
        if (*f, *t) == (0, 1) {
            faults.set_down(true);
        }
    }
    let ending = open[0].clone();
    let last = tokio::spawn(async move {
        ending
            .finish(Batch::new().append("sse/y", b"final".to_vec()))
            .await
    });
    run_for(2, &all).await;
    assert!(last.is_finished(), "C's echo alone confirms A's last write");
    last.await.unwrap().unwrap();
    assert!(c.store.get("owners", "s/y/ends").await.unwrap().is_none());
    assert!(b.store.get("owners", "s/y/ends").await.unwrap().is_some());

    // Now A is cut off from both.
    isolate(&links, 0, true);
    let mut done = None;
    for _ in 0..40 {
        run_for(1, &all).await;
        if let Some(t) = takeover(&*c.store, "A", "C").await
            && t.sealed
        {
            done = Some(t);
            break;
        }
    }
    let done = done.expect("C took A's work over");
    assert_eq!((done.stage, done.claimed), (Stage::Done, 1), "{done:?}");
    // B never decided (it may have intended, and given way).
    if let Some(t) = takeover(&*b.store, "A", "B").await {
        assert_eq!(t.stage, Stage::Aborted, "{t:?}");
    }
    let claimed = claims.lock().clone();
    assert!(
        claimed.iter().all(|(node, _)| node == "C-claimer"),
        "{claimed:?}"
    );
    // The ended execution was not claimed: its answer stands.
    assert!(c.store.get("owners", "s/y/ends").await.unwrap().is_none());
    let owner = Owner::decode(
        c.store
            .get("owners", "s/y/runs")
            .await
            .unwrap()
            .unwrap()
            .value(),
    )
    .unwrap();
    assert_eq!((owner.node.as_str(), owner.epoch), ("C-claimer", 2));

    // Healed: A applies C's claim, every region converges, and the ended execution is still
    // ended everywhere.
    isolate(&links, 0, false);
    run_for(10, &all).await;
    let (da, _) = state_digest(&*a.store).await.unwrap();
    for r in [&b, &c] {
        assert_eq!(state_digest(&*r.store).await.unwrap().0, da);
        assert!(r.store.get("owners", "s/y/ends").await.unwrap().is_none());
    }
    assert!(lease_a.holds(), "{lease_a:?}");
}

/// Two intents at once (regions that ranked each other differently for a moment), each
/// region frozen for its own: neither gathers a majority. They are given up — after
/// `INTENT_TIMEOUT`, or at once by a claimer that does not find A silent yet or is behind
/// the other — and then one intent gathers the majority and takes A's work over. (With the
/// timeout removed, most runs of this test never take A's work over.)
#[tokio::test(start_paused = true)]
async fn split_intents_are_given_up_and_one_takes_over() {
    use haven_cluster::regions::REGIONS_NS;
    use haven_cluster::takeover::{Echo, Freeze, echo_key, takeover_key};
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let c = region("C", "c1").await;
    let (rs, links, claims) = leased_mesh(&[&a, &b, &c]);
    let all = [&a, &b, &c];
    run_for(5, &all).await;
    let lease_a = rs[0].lease().unwrap();
    let (_exec, _) = Execution::open_leased(
        a.store.clone(),
        "s/z/1",
        Owner::new("a1", "a1-boot"),
        Batch::new(),
        Some(&lease_a),
    )
    .await
    .unwrap();
    run_for(2, &all).await;
    isolate(&links, 0, true);
    // B and C each intend and freeze for themselves, as if neither had seen the other's
    // intent yet; both frozen at the same point of A's log, so neither is behind the other.
    let mut at = u64::MAX;
    for r in [&b, &c] {
        let (cursor, _) = haven_cluster::regions::read_cursor(&*r.store, "A")
            .await
            .unwrap();
        at = at.min(cursor.seq);
    }
    for (r, name) in [(&b, "B"), (&c, "C")] {
        let at_millis = r.store.clock().wall_millis();
        let intent = Takeover {
            round: 1,
            stage: Stage::Intent,
            claimed: 1,
            done_seq: 0,
            sealed: false,
            reason: "a split intent (test)".into(),
            at_millis,
        };
        let echo = Echo {
            seq: at,
            frozen: Some(Freeze {
                claimer: name.into(),
                round: 1,
            }),
        };
        r.store
            .commit(
                Batch::new()
                    .put(
                        REGIONS_NS,
                        &takeover_key("A", name),
                        serde_json::to_vec(&intent).unwrap(),
                    )
                    .put(
                        REGIONS_NS,
                        &echo_key(name, "A"),
                        serde_json::to_vec(&echo).unwrap(),
                    ),
            )
            .await
            .unwrap();
    }
    let mut done = None;
    for second in 0..90 {
        run_for(1, &all).await;
        let ts = takeovers_of(&*b.store, "A").await.unwrap();
        if let Some((claimer, (t, _))) = ts.into_iter().find(|(_, (t, _))| t.sealed) {
            done = Some((second, claimer, t));
            break;
        }
    }
    let (second, claimer, t) = done.expect("one intent gathered a majority and took A's work over");
    assert_eq!((t.stage, t.claimed), (Stage::Done, 1), "{t:?}");
    let claimed = claims.lock().clone();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    println!("{claimer} took over {second} s after the split intents");
}

#[tokio::test(start_paused = true)]
async fn a_region_heard_again_before_the_decision_keeps_its_work() {
    let a = region("A", "a1").await;
    let b = region("B", "b1").await;
    let c = region("C", "c1").await;
    let (rs, links, claims) = leased_mesh(&[&a, &b, &c]);
    let all = [&a, &b, &c];
    run_for(5, &all).await;
    let lease_a = rs[0].lease().unwrap();
    let (exec, _) = Execution::open_leased(
        a.store.clone(),
        "s/y/1",
        Owner::new("a1", "a1-boot"),
        Batch::new(),
        Some(&lease_a),
    )
    .await
    .unwrap();
    run_for(2, &all).await;
    // Cut long enough to be judged silent and frozen, not long enough for a decision.
    isolate(&links, 0, true);
    let mut froze = false;
    for _ in 0..8 {
        run_for(1, &all).await;
        let mut both = true;
        for r in [&rs[1], &rs[2]] {
            both &= r.takeovers().await.unwrap().echoes["A"].frozen.is_some();
        }
        if live_takeover(&*b.store, "A")
            .await
            .is_some_and(|(_, t)| t.stage == Stage::Intent)
            && both
        {
            froze = true;
            break;
        }
    }
    assert!(froze, "B or C intended and both froze");
    isolate(&links, 0, false);
    // Until every intent is aborted and no echo frozen (a region judged silent after 1 s
    // may be judged so again for a moment while its log catches up: such an intent is
    // aborted as soon as it is heard).
    let mut settled = false;
    for _ in 0..15 {
        run_for(1, &all).await;
        let ts = takeovers_of(&*b.store, "A").await.unwrap();
        let mut unfrozen = true;
        for r in [&rs[1], &rs[2]] {
            unfrozen &= r.takeovers().await.unwrap().echoes["A"].frozen.is_none();
        }
        if unfrozen && lease_a.holds() && ts.values().all(|(t, _)| t.stage == Stage::Aborted) {
            settled = true;
            break;
        }
    }
    assert!(
        settled,
        "the intents were not all aborted after A was heard again"
    );
    let all_aborted = takeovers_of(&*b.store, "A").await.unwrap();
    assert!(
        !all_aborted.is_empty() && all_aborted.values().all(|(t, _)| t.stage == Stage::Aborted),
        "{all_aborted:?}"
    );
    assert!(claims.lock().is_empty());
    for r in [&rs[1], &rs[2]] {
        assert_eq!(r.takeovers().await.unwrap().echoes["A"].frozen, None);
    }
    // A's execution was never claimed, and writes again.
    assert!(lease_a.holds());
    exec.commit(Batch::new().append("sse/y", b"on".to_vec()), false)
        .await
        .unwrap();
    assert_eq!(exec.owner().await.epoch, 1);
}

/// One randomized history of three regions: rounds of writes (puts and deletes, to shared
/// and own keys) in random regions, links cut and healed at random (a region's links all at
/// once, or one direction), and a region's replicators killed and started again; then every
/// link heals. Every acknowledged write must be in every region, or superseded there by a
/// later version of its key, and every region must hold the same state.
async fn random_history(seed: u64, rounds: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let all = [
        region("A", "a1").await,
        region("B", "b1").await,
        region("C", "c1").await,
    ];
    let mut cut = std::collections::HashSet::<(usize, usize)>::new();
    // The replicators of region t and the switches of the links they read through.
    let start = |t: usize, cut: &std::collections::HashSet<(usize, usize)>| {
        let mut peers: Vec<(String, Arc<dyn SharedLog>)> = Vec::new();
        let mut faults = Vec::new();
        for (f, from) in all.iter().enumerate() {
            if f != t {
                let (link, sw) = from.log.link();
                sw.set_down(cut.contains(&(f, t)));
                peers.push((from.name.to_owned(), Arc::new(link)));
                faults.push((f, sw));
            }
        }
        let r = Regions::start_with(
            all[t].store.clone(),
            &format!("{}-node", all[t].name),
            peers,
            HealthConfig {
                interval: Duration::from_secs(1),
                threshold: 3,
            },
        );
        (r, faults)
    };
    let mut running: Running = (0..3).map(|t| Some(start(t, &cut))).collect();
    let apply_cuts = |running: &Running, cut: &std::collections::HashSet<(usize, usize)>| {
        for (t, r) in running.iter().enumerate() {
            if let Some((_, faults)) = r {
                for (f, sw) in faults {
                    sw.set_down(cut.contains(&(*f, t)));
                }
            }
        }
    };
    // Acknowledged writes: (key, version) as stored by the region that took it.
    let mut acked: Vec<(String, haven_state::Version)> = Vec::new();
    for round in 0..rounds {
        match rng.random_range(0..10) {
            0 | 1 => {
                // Cut a region off, or one direction of one link.
                let t = rng.random_range(0..3);
                if rng.random_bool(0.5) {
                    for o in 0..3 {
                        if o != t {
                            cut.insert((t, o));
                            cut.insert((o, t));
                        }
                    }
                } else {
                    let f = (t + rng.random_range(1..3)) % 3;
                    cut.insert((f, t));
                }
                apply_cuts(&running, &cut);
            }
            2 | 3 => {
                cut.clear();
                apply_cuts(&running, &cut);
            }
            4 => {
                // Kill a region's replicator node; it starts again a few rounds later.
                let t = rng.random_range(0..3);
                running[t] = None;
            }
            _ => {}
        }
        for (t, r) in running.iter_mut().enumerate() {
            if r.is_none() && rng.random_bool(0.3) {
                *r = Some(start(t, &cut));
            }
        }
        for _ in 0..rng.random_range(1..6) {
            let t = rng.random_range(0..3);
            let key = if rng.random_bool(0.5) {
                format!("shared-{}", rng.random_range(0..8))
            } else {
                format!("{}-{round}", all[t].name)
            };
            let batch = if rng.random_bool(0.15) {
                Batch::new().delete("notes", &key)
            } else {
                Batch::new().put("notes", &key, format!("{t}:{round}").into_bytes())
            };
            all[t].store.commit(batch).await.unwrap();
            let stored = all[t].store.get_raw("notes", &key).await.unwrap().unwrap();
            acked.push((key, stored.record.version.clone()));
        }
        run_for(rng.random_range(1..4), &[&all[0], &all[1], &all[2]]).await;
    }
    // Heal everything and let every region catch up.
    cut.clear();
    for (t, r) in running.iter_mut().enumerate() {
        if r.is_none() {
            *r = Some(start(t, &cut));
        }
    }
    apply_cuts(&running, &cut);
    for r in &all {
        put(&*r.store, "final", r.name).await;
    }
    run_for(8, &[&all[0], &all[1], &all[2]]).await;
    let digests: Vec<_> =
        futures::future::join_all(all.iter().map(|r| state_digest(&*r.store))).await;
    let digests: Vec<_> = digests.into_iter().map(Result::unwrap).collect();
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "seed {seed}: the regions did not converge: {digests:?}"
    );
    for (key, version) in &acked {
        for r in &all {
            let held = r.store.get_raw("notes", key).await.unwrap();
            let held = held.unwrap_or_else(|| panic!("seed {seed}: {key} missing in {}", r.name));
            assert!(
                held.record.version >= *version,
                "seed {seed}: {key} in {} holds {:?}, older than the acknowledged {version:?}",
                r.name,
                held.record.version
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn randomized_kills_and_partitions_across_regions_lose_no_acknowledged_write() {
    // HAVEN_REGION_SEED=N replays one history; HAVEN_REGION_SEEDS=N runs seeds 1..=N (a
    // benchmark run, see BENCHMARKS.md); the test command runs 8.
    let seeds: Vec<u64> = match (
        std::env::var("HAVEN_REGION_SEED"),
        std::env::var("HAVEN_REGION_SEEDS"),
    ) {
        (Ok(s), _) => vec![s.parse().expect("a seed")],
        (_, Ok(n)) => (1..=n.parse().expect("a count")).collect(),
        _ => (1..=8).collect(),
    };
    for seed in seeds {
        random_history(seed, 40).await;
    }
}
