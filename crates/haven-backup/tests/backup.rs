//! Backup against a real local object store and the real embedded store, on a simulated
//! clock: shipping, point-in-time restore, verification of damaged backups, resumption,
//! refusals and retention.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use haven_backup::catalog::Catalog;
use haven_backup::restore::{RestoreOptions, restore};
use haven_backup::verify::{Problem, verify};
use haven_backup::{BackupConfig, BackupError, BackupKey, Point, Shipper, ShipperHandle, Target};
use haven_state::{Batch, HybridClock, LogFold, ManualClock, Origin, RedbStore, Store, View};

const T0: u64 = 1_800_000_000_000;

struct Node {
    store: Arc<RedbStore>,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

fn node(clock: Arc<ManualClock>) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(
        dir.path(),
        Origin::new("r1", "n1"),
        Arc::new(HybridClock::new(clock.clone())),
    )
    .unwrap();
    Node {
        store: Arc::new(store),
        clock,
        dir,
    }
}

/// A node on a simulated clock, an empty local backup location (`url`, there as long as
/// `backup` lives) and a new backup key.
struct Setup {
    clock: Arc<ManualClock>,
    n: Node,
    backup: tempfile::TempDir,
    url: String,
    key: BackupKey,
}

fn setup() -> Setup {
    let clock = Arc::new(ManualClock::new(T0));
    let n = node(clock.clone());
    let backup = tempfile::tempdir().unwrap();
    let url = backup.path().to_str().unwrap().to_owned();
    Setup {
        clock,
        n,
        backup,
        url,
        key: BackupKey::generate(),
    }
}

fn config(url: &str, key: &BackupKey) -> BackupConfig {
    let mut c = BackupConfig::new(url, key.clone());
    // Rounds are driven by ship_now; the background schedule stays out of the way.
    c.interval = Duration::from_secs(3600);
    c.verify_interval = Duration::from_secs(365 * 24 * 3600);
    c.prune_interval = Duration::from_secs(365 * 24 * 3600);
    c
}

async fn start(n: &Node, cfg: BackupConfig) -> ShipperHandle {
    let store: Arc<dyn Store> = n.store.clone();
    Shipper::start(store, cfg, n.dir.path(), n.clock.clone())
        .await
        .unwrap()
}

async fn view_of(store: &dyn Store) -> View {
    let mut fold = LogFold::default();
    for e in store.read_log(1, usize::MAX).await.unwrap() {
        fold.apply(e);
    }
    fold.view()
}

async fn restored_view(dir: &Path) -> (View, u64) {
    let s = RedbStore::open(
        dir,
        Origin::new("r1", "x"),
        Arc::new(HybridClock::default()),
    )
    .unwrap();
    let v = view_of(&s).await;
    let last = s.last_seq().await.unwrap();
    (v, last)
}

/// One round of writes: puts, overwrites, a delete and stream appends, one batch per
/// simulated second.
async fn write_round(n: &Node, round: u32) {
    for i in 0..5u32 {
        n.clock.advance(1000);
        let mut b = Batch::new()
            .put(
                "notes",
                &format!("k{}", (round * 5 + i) % 7),
                format!("r{round}i{i}").into_bytes(),
            )
            .append(&format!("s{}", i % 2), format!("e{round}.{i}").into_bytes());
        if i == 3 {
            b = b.delete("notes", &format!("k{}", round % 7));
        }
        n.store.commit(b).await.unwrap();
    }
}

struct Recorded {
    seq: u64,
    millis: u64,
    view: View,
}

async fn record(n: &Node) -> Recorded {
    Recorded {
        seq: n.store.last_seq().await.unwrap(),
        millis: n.clock.now_millis(),
        view: view_of(n.store.as_ref()).await,
    }
}

use haven_state::PhysicalClock;

async fn do_restore(
    target: &Target,
    key: &BackupKey,
    point: Point,
) -> (tempfile::TempDir, haven_backup::RestoreReport) {
    let out = tempfile::tempdir().unwrap();
    let opts = RestoreOptions {
        point,
        ..options(out.path().join("data"))
    };
    let report = quiet_restore(target, key, &opts).await.unwrap();
    (out, report)
}

/// Options that restore the latest point of the newest generation into `to`, refusing a
/// directory that is not empty.
fn options(to: PathBuf) -> RestoreOptions {
    RestoreOptions {
        to,
        point: Point::Latest,
        generation: None,
        overwrite: false,
    }
}

/// A restore that reports no progress.
async fn quiet_restore(
    target: &Target,
    key: &BackupKey,
    opts: &RestoreOptions,
) -> Result<haven_backup::RestoreReport, BackupError> {
    restore(target, key, opts, &|_, _, _| {}).await
}

// Long by design: rounds of writes and shipping, then a restore at every recorded point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_at_several_points_equals_the_recorded_state() {
    let Setup {
        clock,
        n,
        backup: _backup,
        url,
        key,
    } = setup();
    let shipper = start(&n, config(&url, &key)).await;
    shipper.ship_now(false).await.unwrap();

    let mut points = Vec::new();
    for round in 0..6 {
        write_round(&n, round).await;
        // A snapshot mid-way, so restores start from different snapshots.
        let r = shipper.ship_now(round == 2).await.unwrap();
        assert_eq!(r.shipped_seq, n.store.last_seq().await.unwrap());
        points.push(record(&n).await);
        // Writes after a recorded point happen at a later time.
        clock.advance(500);
    }
    let status = shipper.status().await;
    assert_eq!(status.lag_entries, 0);
    assert_eq!(status.state, "ok");

    let target = Target::open(&url).unwrap();
    for p in &points {
        let (dir, report) = do_restore(&target, &key, Point::Seq(p.seq)).await;
        assert!(report.complete, "{report:?}");
        assert_eq!(report.restored_seq, p.seq);
        let (v, last) = restored_view(&dir.path().join("data")).await;
        assert_eq!(v, p.view, "state at sequence {}", p.seq);
        assert_eq!(last, p.seq);

        let (dir, report) = do_restore(&target, &key, Point::Time(p.millis + 250)).await;
        assert_eq!(report.restored_seq, p.seq, "{report:?}");
        let (v, _) = restored_view(&dir.path().join("data")).await;
        assert_eq!(v, p.view, "state at time {}", p.millis);
    }
    // A point inside a round: only the writes up to it.
    let mid = points[3].millis - 2000;
    let (dir, report) = do_restore(&target, &key, Point::Time(mid)).await;
    let (v, _) = restored_view(&dir.path().join("data")).await;
    let expected = {
        let mut fold = LogFold::default();
        for e in n.store.read_log(1, usize::MAX).await.unwrap() {
            if e.change.version().hlc.millis() <= mid {
                fold.apply(e);
            }
        }
        fold.view()
    };
    assert_eq!(v, expected);
    assert!(report.restored_seq < points[3].seq && report.restored_seq > points[2].seq);

    // Refusals: a non-empty directory without --overwrite, a sequence beyond the backup.
    let out = tempfile::tempdir().unwrap();
    std::fs::write(out.path().join("keep.txt"), b"x").unwrap();
    let mut opts = options(out.path().to_owned());
    let e = quiet_restore(&target, &key, &opts).await.unwrap_err();
    assert!(matches!(e, BackupError::Refused(_)), "{e}");
    assert!(out.path().join("keep.txt").exists(), "nothing changed");
    // --overwrite replaces only a Haven data directory that no process has open.
    opts.overwrite = true;
    let e = quiet_restore(&target, &key, &opts).await.unwrap_err();
    assert!(e.to_string().contains("not a Haven data directory"), "{e}");
    assert!(out.path().join("keep.txt").exists(), "nothing changed");
    let (data_dir, _) = do_restore(&target, &key, Point::Seq(points[0].seq)).await;
    opts.to = data_dir.path().join("data");
    {
        let open = RedbStore::open(
            &opts.to,
            Origin::new("r1", "x"),
            Arc::new(HybridClock::default()),
        )
        .unwrap();
        let e = quiet_restore(&target, &key, &opts).await.unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(open);
    }
    let r = quiet_restore(&target, &key, &opts).await.unwrap();
    assert_eq!(r.restored_seq, points.last().unwrap().seq);
    opts.point = Point::Seq(points.last().unwrap().seq + 100);
    opts.to = out.path().join("other");
    let e = quiet_restore(&target, &key, &opts).await.unwrap_err();
    assert!(e.to_string().contains("beyond the newest"), "{e}");
    // A restored directory serves new writes after its restored sequence.
    let (v_dir, _) = do_restore(&target, &key, Point::Seq(points[1].seq)).await;
    let s = RedbStore::open(
        &v_dir.path().join("data"),
        Origin::new("r1", "n2"),
        Arc::new(HybridClock::default()),
    )
    .unwrap();
    let c = s
        .commit(Batch::new().put("notes", "after", b"1".to_vec()))
        .await
        .unwrap();
    assert_eq!(c.last_seq, points[1].seq + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_objects_are_named_and_restore_stops_at_the_last_verified_point() {
    let Setup {
        n,
        backup,
        url,
        key,
        ..
    } = setup();
    let shipper = start(&n, config(&url, &key)).await;
    shipper.ship_now(false).await.unwrap();
    let mut points = Vec::new();
    for round in 0..5 {
        write_round(&n, round).await;
        shipper.ship_now(false).await.unwrap();
        points.push(record(&n).await);
    }
    let target = Target::open(&url).unwrap();
    let report = verify(&target, &key, T0, &|_, _| {}).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.objects, 6, "one snapshot and five segments");
    // The shipper's own verification of an intact backup counts no failure.
    assert!(shipper.verify_now().await.unwrap().ok);
    assert_eq!(shipper.status().await.failures.verification, 0);

    let catalog = Catalog::load(&target).await.unwrap();
    let segs = catalog.generations[0].segments.clone();
    assert_eq!(segs.len(), 5);
    let path = |o: &str| backup.path().join(o);
    // Alter one byte of segment 2, delete segment 3, truncate segment 4.
    let mut bytes = std::fs::read(path(&segs[1].object)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(path(&segs[1].object), &bytes).unwrap();
    std::fs::remove_file(path(&segs[2].object)).unwrap();
    let bytes = std::fs::read(path(&segs[3].object)).unwrap();
    std::fs::write(path(&segs[3].object), &bytes[..bytes.len() - 10]).unwrap();

    let report = verify(&target, &key, T0, &|_, _| {}).await.unwrap();
    assert!(!report.ok);
    let named =
        |pred: &dyn Fn(&Problem) -> bool| report.problems.iter().filter(|p| pred(p)).count();
    assert_eq!(
        named(&|p| matches!(p, Problem::Altered { object, .. } if *object == segs[1].object)),
        1,
        "{:?}",
        report.problems
    );
    assert_eq!(
        named(&|p| matches!(p, Problem::Missing { object } if *object == segs[2].object)),
        1
    );
    assert_eq!(
        named(&|p| matches!(p, Problem::Truncated { object, .. } if *object == segs[3].object)),
        1
    );
    assert_eq!(report.problems.len(), 3);
    assert!(!report.gaps.is_empty());
    // The shipper's verification now finds the damage: a failure counted (what
    // haven_backup_failures_total{kind="verification"} shows), and none of shipping.
    assert!(!shipper.verify_now().await.unwrap().ok);
    let failures = shipper.status().await.failures;
    assert_eq!(
        (failures.verification, failures.segment, failures.snapshot),
        (1, 0, 0)
    );

    // Restore of the latest point stops after segment 1 and says what is lost.
    let (dir, r) = do_restore(&target, &key, Point::Latest).await;
    assert!(!r.complete);
    assert_eq!(r.restored_seq, points[0].seq);
    let lost = r.lost.clone().unwrap();
    assert_eq!(lost.from_seq, segs[1].first_seq);
    assert_eq!(lost.from_millis, Some(segs[1].first_millis));
    let (v, _) = restored_view(&dir.path().join("data")).await;
    assert_eq!(v, points[0].view);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_another_deployment_is_refused() {
    let Setup {
        clock,
        n,
        backup: _backup,
        url,
        key,
    } = setup();
    let shipper = start(&n, config(&url, &key)).await;
    write_round(&n, 0).await;
    shipper.ship_now(false).await.unwrap();
    let target = Target::open(&url).unwrap();

    let wrong = BackupKey::generate();
    let out = tempfile::tempdir().unwrap();
    let opts = options(out.path().join("d"));
    let e = quiet_restore(&target, &wrong, &opts).await.unwrap_err();
    assert!(matches!(e, BackupError::WrongKey { .. }), "{e}");
    assert!(e.to_string().contains("wrong backup key"));
    let e = verify(&target, &wrong, T0, &|_, _| {}).await.unwrap_err();
    assert!(matches!(e, BackupError::WrongKey { .. }), "{e}");

    // Another deployment's node pointed at this backup is refused at start, by name; so is
    // this deployment's node with another key.
    let other = node(clock.clone());
    let as_dyn: Arc<dyn Store> = other.store.clone();
    let e = Shipper::start(as_dyn, config(&url, &key), other.dir.path(), clock.clone())
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, BackupError::OtherDeployment { .. }), "{e}");
    assert!(e.to_string().contains("belongs to deployment"), "{e}");
    let as_dyn: Arc<dyn Store> = n.store.clone();
    let e = Shipper::start(as_dyn, config(&url, &wrong), n.dir.path(), clock.clone())
        .await
        .err()
        .expect("refused");
    assert!(matches!(e, BackupError::WrongKey { .. }), "{e}");
    // And the other node's own writes are unaffected.
    other
        .store
        .commit(Batch::new().put("notes", "x", b"1".to_vec()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_shipper_resumes_without_gap_or_duplicate() {
    let Setup {
        n,
        backup,
        url,
        key,
        ..
    } = setup();
    let shipper = start(&n, config(&url, &key)).await;
    shipper.ship_now(false).await.unwrap();
    write_round(&n, 0).await;
    shipper.ship_now(false).await.unwrap();
    drop(shipper);
    // An upload interrupted before its manifest entry leaves an unreferenced object.
    let gen_dir = std::fs::read_dir(backup.path().join("generations"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(
        gen_dir
            .join("segments")
            .join("00000000000000000099-00000000000000000120.hseg"),
        b"partial",
    )
    .unwrap();
    write_round(&n, 1).await;
    write_round(&n, 2).await;

    let shipper = start(&n, config(&url, &key)).await;
    let r = shipper.ship_now(false).await.unwrap();
    assert_eq!(r.shipped_seq, n.store.last_seq().await.unwrap());
    let target = Target::open(&url).unwrap();
    let catalog = Catalog::load(&target).await.unwrap();
    assert_eq!(catalog.generations.len(), 1, "same generation");
    let g = &catalog.generations[0];
    let mut next = g.snapshots[0].last_seq + 1;
    for s in &g.segments {
        assert_eq!(s.first_seq, next, "no gap, no overlap");
        next = s.last_seq + 1;
    }
    assert_eq!(next - 1, n.store.last_seq().await.unwrap());
    assert_eq!(catalog.unreferenced.len(), 1);
    let report = verify(&target, &key, T0, &|_, _| {}).await.unwrap();
    assert!(
        report.ok,
        "an unreferenced leftover is not damage: {report:?}"
    );
    assert_eq!(report.unreferenced, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_a_simulated_clock_prunes_and_keeps_every_needed_point() {
    let Setup {
        clock,
        n,
        backup: _backup,
        url,
        key,
    } = setup();
    let mut cfg = config(&url, &key);
    cfg.snapshot_interval = Duration::from_secs(6 * 3600);
    cfg.retention.pitr_window_millis = 12 * 3600 * 1000;
    cfg.retention.hourly = 0;
    cfg.retention.daily = 2;
    let shipper = start(&n, cfg).await;
    shipper.ship_now(false).await.unwrap();
    // Three simulated days, a round of writes and a shipment every hour.
    for round in 0..72 {
        write_round(&n, round).await;
        clock.advance(3600 * 1000 - 5000);
        shipper.ship_now(false).await.unwrap();
    }
    let target = Target::open(&url).unwrap();
    let before = Catalog::load(&target).await.unwrap();
    let r = shipper.prune_now().await.unwrap();
    assert!(r.deleted > 0, "{r:?}");
    // A second pass (served from the shipper's manifest cache) finds nothing more to do.
    let again = shipper.prune_now().await.unwrap();
    assert_eq!(again.deleted, 0, "{again:?}");
    let mut cache = haven_backup::catalog::ManifestCache::default();
    let first = Catalog::load_cached(&target, &mut cache).await.unwrap();
    let cached = Catalog::load_cached(&target, &mut cache).await.unwrap();
    assert_eq!(
        format!("{:?}", first.generations),
        format!("{:?}", cached.generations)
    );
    let after = Catalog::load(&target).await.unwrap();
    let g = &after.generations[0];
    assert!(g.segments.len() < before.generations[0].segments.len());
    // Every remaining object is intact, and the whole window is restorable.
    let report = verify(&target, &key, clock.now_millis(), &|_, _| {})
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    let now = clock.now_millis();
    let (_, latest) = do_restore(&target, &key, Point::Latest).await;
    assert_eq!(latest.restored_seq, n.store.last_seq().await.unwrap());
    let (_, early) = do_restore(&target, &key, Point::Time(now - 11 * 3600 * 1000)).await;
    assert!(early.complete);
    // Older points survive only as the daily snapshots.
    let oldest = g.snapshots.first().unwrap().last_millis;
    assert!(now - oldest > 12 * 3600 * 1000);
    assert!(g.snapshots.len() <= 2 + 3, "{}", g.snapshots.len());
}

/// Segments of a generation, checked to follow each other from its first snapshot to `last`.
fn assert_chain(catalog: &Catalog, last: u64) {
    let g = catalog.generations.last().unwrap();
    let mut next = g.snapshots[0].last_seq + 1;
    for s in &g.segments {
        assert_eq!(s.first_seq, next, "no gap, no overlap");
        next = s.last_seq + 1;
    }
    assert_eq!(next - 1, last);
    assert!(g.gaps().is_empty());
    assert_eq!(g.resume_seq(), last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_under_load_leave_no_hole_in_the_segment_chain() {
    let Setup {
        n,
        backup: _backup,
        url,
        key,
        ..
    } = setup();
    let shipper = start(&n, config(&url, &key)).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let store = n.store.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                store
                    .commit(Batch::new().put(
                        "notes",
                        &format!("k{}", i % 50),
                        i.to_string().into_bytes(),
                    ))
                    .await
                    .unwrap();
            }
        })
    };
    for round in 0..8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        // At least one change since the last round, so every forced snapshot is taken.
        n.store
            .commit(Batch::new().put("notes", "round", vec![round]))
            .await
            .unwrap();
        shipper.ship_now(round % 2 == 0).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    shipper.ship_now(false).await.unwrap();
    let target = Target::open(&url).unwrap();
    let catalog = Catalog::load(&target).await.unwrap();
    assert!(catalog.generations[0].snapshots.len() >= 4);
    let last = n.store.last_seq().await.unwrap();
    assert_chain(&catalog, last);
    // Every sequence restores exactly (a few samples).
    for seq in [last / 3, last / 2, last - 1, last] {
        let (_, r) = do_restore(&target, &key, Point::Seq(seq)).await;
        assert!(r.complete, "{r:?}");
        assert_eq!(r.restored_seq, seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_drill_shipping_to_the_same_backup_does_not_hide_production() {
    let Setup {
        clock,
        n: prod,
        backup: _backup,
        url,
        key,
    } = setup();
    let shipper = start(&prod, config(&url, &key)).await;
    write_round(&prod, 0).await;
    shipper.ship_now(false).await.unwrap();
    let target = Target::open(&url).unwrap();

    // A drill: restore, then run the restored data with backup to the same place.
    let drill_dir = tempfile::tempdir().unwrap();
    let opts = options(drill_dir.path().join("d"));
    quiet_restore(&target, &key, &opts).await.unwrap();
    clock.advance(1000);
    let drill_store = Arc::new(
        RedbStore::open(
            &opts.to,
            Origin::new("r1", "drill"),
            Arc::new(HybridClock::new(clock.clone())),
        )
        .unwrap(),
    );
    let as_dyn: Arc<dyn Store> = drill_store.clone();
    let drill = Shipper::start(as_dyn, config(&url, &key), &opts.to, clock.clone())
        .await
        .unwrap();
    clock.advance(1000);
    drill_store
        .commit(Batch::new().put("notes", "drill", b"x".to_vec()))
        .await
        .unwrap();
    drill.ship_now(false).await.unwrap();
    let during_drill = clock.now_millis();

    // Production goes on.
    clock.advance(1000);
    write_round(&prod, 1).await;
    shipper.ship_now(false).await.unwrap();
    let catalog = Catalog::load(&target).await.unwrap();
    assert_eq!(catalog.generations.len(), 2);

    // Latest is production's newest state, not the drill's.
    let (dir, r) = do_restore(&target, &key, Point::Latest).await;
    assert_eq!(r.restored_seq, prod.store.last_seq().await.unwrap());
    let (v, _) = restored_view(&dir.path().join("data")).await;
    assert_eq!(v, view_of(prod.store.as_ref()).await);
    // A time during the drill restores production's history at that time.
    let (dir, _) = do_restore(&target, &key, Point::Time(during_drill)).await;
    let (v, _) = restored_view(&dir.path().join("data")).await;
    assert!(
        !v.records
            .contains_key(&("notes".to_owned(), "drill".to_owned()))
    );
    // The drill's own history is still there, by generation.
    let drill_gen = catalog
        .generations
        .iter()
        .find(|g| g.info.as_ref().is_some_and(|i| i.origin.ends_with("drill")))
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = RestoreOptions {
        generation: Some(drill_gen.id.clone()),
        ..options(out.path().join("d"))
    };
    quiet_restore(&target, &key, &opts).await.unwrap();
    let (v, _) = restored_view(&opts.to).await;
    assert!(
        v.records
            .contains_key(&("notes".to_owned(), "drill".to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_target_is_noticed_and_an_unreadable_manifest_keeps_its_object() {
    let Setup {
        clock,
        n,
        backup,
        url,
        key,
    } = setup();
    let shipper = start(&n, config(&url, &key)).await;
    let target = Target::open(&url).unwrap();
    // The shipper's first round may snapshot everything written so far (then no segment
    // exists yet): write and ship until a segment is there.
    let mut round = 0;
    let seg = loop {
        write_round(&n, round).await;
        shipper.ship_now(false).await.unwrap();
        let catalog = Catalog::load(&target).await.unwrap();
        if let Some(s) = catalog.generations[0].segments.first() {
            break s.clone();
        }
        round += 1;
        assert!(round < 10, "no segment was shipped after {round} rounds");
    };

    // An unreadable manifest record: verify names it, retention keeps its object.
    std::fs::write(backup.path().join(seg.manifest_key()), b"{not json").unwrap();
    let report = verify(&target, &key, T0, &|_, _| {}).await.unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| matches!(p, Problem::BadManifest { .. })),
        "{report:?}"
    );
    clock.advance(10 * 24 * 3600 * 1000);
    shipper.prune_now().await.unwrap();
    assert!(
        backup.path().join(&seg.object).exists(),
        "the object of an unreadable record is kept"
    );

    // The target is emptied: the next round starts a new generation there.
    for entry in std::fs::read_dir(backup.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(p).unwrap();
        } else {
            std::fs::remove_file(p).unwrap();
        }
    }
    write_round(&n, 1).await;
    shipper.ship_now(false).await.unwrap();
    let catalog = Catalog::load(&target).await.unwrap();
    assert!(catalog.deployment.is_some());
    assert_chain(&catalog, n.store.last_seq().await.unwrap());
    let (dir, _) = do_restore(&target, &key, Point::Latest).await;
    let (v, _) = restored_view(&dir.path().join("data")).await;
    assert_eq!(v, view_of(n.store.as_ref()).await);
}

/// A forced snapshot when nothing was committed since the newest snapshot takes none (it
/// would replace that object under its own name) and says why, naming that snapshot; after a
/// change it takes one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_snapshot_with_nothing_new_says_why() {
    let Setup {
        clock,
        n,
        backup: _backup,
        url,
        key,
    } = setup();
    let shipper = start(&n, config(&url, &key)).await;
    write_round(&n, 0).await;
    let r = shipper.ship_now(true).await.unwrap();
    let seq = n.store.last_seq().await.unwrap();
    assert_eq!(r.snapshot_seq, Some(seq), "{r:?}");
    // The shipper's own loop may have taken the generation's first snapshot of this state
    // just before (it runs beside the test): then this one says so instead of taking it.
    assert!(r.snapshot != r.snapshot_skipped.is_some(), "{r:?}");
    clock.advance(1000);
    let r = shipper.ship_now(true).await.unwrap();
    assert!(!r.snapshot, "{r:?}");
    assert_eq!(r.snapshot_seq, Some(seq));
    let why = r.snapshot_skipped.expect("the reason");
    assert!(
        why.contains(&format!(
            "nothing was committed since the snapshot of sequence {seq}"
        )) && why.contains("already holds the current state"),
        "{why}"
    );
    // Not asked for: nothing said.
    let r = shipper.ship_now(false).await.unwrap();
    assert!(r.snapshot_skipped.is_none(), "{r:?}");
    write_round(&n, 1).await;
    let r = shipper.ship_now(true).await.unwrap();
    assert!(r.snapshot && r.snapshot_skipped.is_none(), "{r:?}");
    assert_eq!(r.snapshot_seq, Some(n.store.last_seq().await.unwrap()));
    let catalog = Catalog::load(&Target::open(&url).unwrap()).await.unwrap();
    let snaps = &catalog.latest().unwrap().snapshots;
    assert_eq!(
        snaps.iter().filter(|s| s.last_seq == seq).count(),
        1,
        "one snapshot of that state"
    );
}
