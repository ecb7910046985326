//! Inputs found by fuzzing (`fuzz/`, target `backup`), kept as tests: manifest records and
//! objects come from a target nobody vouches for, and must never make Haven panic.

use haven_backup::catalog::{Generation, Point};
use haven_backup::format;
use haven_backup::manifest::{ManifestEntry, ObjectKind, segment_key, snapshot_key};
use haven_state::{Change, Hlc, LogEntry, Origin, Record, Version};

fn entry(kind: ObjectKind, first: u64, last: u64, items: u64, bridge: bool) -> ManifestEntry {
    ManifestEntry {
        kind,
        generation: "g1".into(),
        object: match kind {
            ObjectKind::Segment => segment_key("g1", first, last),
            ObjectKind::Snapshot => snapshot_key("g1", last),
        },
        first_seq: first,
        last_seq: last,
        first_millis: 1,
        last_millis: 2,
        items,
        size: 0,
        sha256: String::new(),
        created_millis: 0,
        storage_class: None,
        bridge,
    }
}

/// Manifest records whose ranges end at the last sequence there is (`u64::MAX`): the chain
/// after such a snapshot or segment ended in an overflow (a panic in debug builds, a
/// wrapped-around chain in release builds). Minimised from the `backup` target's input
/// `\x07\x01\xfe\x00\xfe\x00\x01\x01\x01\x00\x00\xfe\x01\xfe\x00\x01\x02\x03\x00\x07`.
#[test]
fn a_chain_that_reaches_the_last_sequence_ends_there() {
    let g = Generation {
        id: "g1".into(),
        info: None,
        snapshots: vec![entry(ObjectKind::Snapshot, 0, u64::MAX, 1, true)],
        segments: vec![entry(ObjectKind::Segment, u64::MAX - 1, u64::MAX, 2, false)],
    };
    let snap = &g.snapshots[0];
    assert_eq!(g.chain_after(snap), (Vec::new(), None));
    assert_eq!(g.resume_seq(), u64::MAX);
    assert!(g.gaps().is_empty());
    assert_eq!(g.restorable().map(|r| r.last_seq), Some(u64::MAX));
    for point in [Point::Latest, Point::Seq(u64::MAX), Point::Time(2)] {
        let plan = g.plan(point, &[]).expect("a plan");
        assert!(plan.segments.is_empty());
    }

    // A segment that reaches u64::MAX after an ordinary snapshot ends the chain.
    let g = Generation {
        id: "g1".into(),
        info: None,
        snapshots: vec![entry(ObjectKind::Snapshot, 0, 5, 5, true)],
        segments: vec![
            entry(ObjectKind::Segment, 6, u64::MAX, 9, false),
            entry(ObjectKind::Segment, 9, 12, 4, false),
        ],
    };
    let (chain, gap) = g.chain_after(&g.snapshots[0]);
    assert_eq!(chain.len(), 1);
    assert_eq!(gap, None);
    assert_eq!(g.resume_seq(), u64::MAX);
    assert!(g.gaps().is_empty());
}

/// A gap bridged by a snapshot at `u64::MAX` (the bridge test added one to its sequence).
#[test]
fn a_bridging_snapshot_at_the_last_sequence_is_compared_without_overflow() {
    let g = Generation {
        id: "g1".into(),
        info: None,
        snapshots: vec![
            entry(ObjectKind::Snapshot, 0, 5, 5, true),
            entry(ObjectKind::Snapshot, 0, u64::MAX, 1, true),
        ],
        segments: vec![entry(ObjectKind::Segment, 9, 12, 4, false)],
    };
    assert!(g.gaps().is_empty());
    let _ = g.restorable();
    let _ = g.plan(Point::Latest, &[]);
}

fn log_entry(seq: u64) -> LogEntry {
    LogEntry {
        seq,
        change: Change::Record(Record {
            namespace: "notes".into(),
            key: "k".into(),
            version: Version {
                hlc: Hlc(seq),
                origin: Origin::new("r", "n"),
            },
            value: Some(b"v".to_vec()),
            expires_at_millis: None,
        }),
    }
}

/// A segment object whose entries reach `u64::MAX` and go on: the check of the next
/// sequence overflowed. Now it is a damaged object like any other.
#[test]
fn a_segment_past_the_last_sequence_is_damaged_not_a_panic() {
    let entries = vec![log_entry(u64::MAX), log_entry(0)];
    let plain = format::encode(ObjectKind::Segment, u64::MAX, u64::MAX, &entries);
    let manifest = entry(ObjectKind::Segment, u64::MAX, u64::MAX, 2, false);
    let err = format::decode(&manifest, &plain).unwrap_err();
    assert!(err.to_string().contains("out of place"), "{err}");
    // The one entry that fits is a good object.
    let plain = format::encode(ObjectKind::Segment, u64::MAX, u64::MAX, &entries[..1]);
    let manifest = entry(ObjectKind::Segment, u64::MAX, u64::MAX, 1, false);
    assert_eq!(format::decode(&manifest, &plain).unwrap(), entries[..1]);
}
