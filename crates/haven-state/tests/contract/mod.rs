//! The store contract: one suite that every backend must pass (in-memory, redb, JetStream).
//!
//! - [`check_history`]: a model-based property check. A history of batches (puts and deletes
//!   with preconditions, appends, merges of records and events written elsewhere, and the
//!   passing of time so that records expire) is committed to the store and, independently, to
//!   a small reference model written here from the contract's words. After every batch the
//!   outcome (conflict or not, revisions, indexes, unchanged merges) and the change-log entries
//!   must match the model; at the end every read (get, get_raw, scan, read_events, read_log,
//!   last_seq) must too.
//! - [`basics`]: the cases each backend tested on its own before, kept as examples.
//!
//! A backend's test file builds fresh stores with a [`ManualClock`] and calls these.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use haven_state::{
    Batch, Change, Expect, Hlc, LogEntry, ManualClock, Op, Origin, Outcome, Record, Store,
    StoreError, StreamEvent, Version, watch,
};
use proptest::prelude::*;

/// Wall-clock time every store of the suite starts at.
pub const START_MILLIS: u64 = 1_800_000_000_000;

/// One step of a history.
#[derive(Clone, Debug)]
pub enum Step {
    /// Commit a batch.
    Commit(Vec<OpSpec>),
    /// Let wall-clock time pass.
    Advance(u64),
    /// A whole reclamation pass with nothing held back by readers: tombstones and events
    /// older than `retention` and records expired longer ago than `grace` are forgotten,
    /// and the log keeps only entries that hold something current (and its last).
    Reclaim { retention: u64, grace: u64 },
}

/// An operation with its precondition given relative to the state, so that histories hit
/// both holding and failing preconditions.
#[derive(Clone, Debug)]
pub enum OpSpec {
    Put {
        ns: usize,
        key: usize,
        value: Vec<u8>,
        expect: ExpectSpec,
        ttl: Option<u64>,
    },
    Delete {
        ns: usize,
        key: usize,
        expect: ExpectSpec,
    },
    Append {
        stream: usize,
        data: Vec<u8>,
    },
    Merge {
        ns: usize,
        key: usize,
        offset_millis: i64,
        logical: u16,
        node: usize,
        value: Option<Vec<u8>>,
    },
    MergeEvent {
        stream: usize,
        index: u64,
        offset_millis: i64,
        node: usize,
        data: Vec<u8>,
    },
}

/// A precondition relative to the state at the time of the batch.
#[derive(Clone, Copy, Debug)]
pub enum ExpectSpec {
    Any,
    Absent,
    /// The key's current live revision (or 1 when it has none: fails).
    Current,
    /// A revision that is not the current one.
    Stale,
}

const NAMESPACES: [&str; 2] = ["alpha", "beta"];
const KEYS: [&str; 3] = ["k0", "k1", "k/2"];
const STREAMS: [&str; 2] = ["s0", "sse/x/y"];
const NODES: [&str; 3] = ["elsewhere-1", "elsewhere-2", "elsewhere-3"];

fn expect_spec() -> impl Strategy<Value = ExpectSpec> {
    prop_oneof![
        3 => Just(ExpectSpec::Any),
        2 => Just(ExpectSpec::Absent),
        2 => Just(ExpectSpec::Current),
        1 => Just(ExpectSpec::Stale),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..6)
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        4 => (0..2usize, 0..3usize, bytes(), expect_spec(), prop::option::of(1..3_000u64))
            .prop_map(|(ns, key, value, expect, ttl)| OpSpec::Put { ns, key, value, expect, ttl }),
        2 => (0..2usize, 0..3usize, expect_spec())
            .prop_map(|(ns, key, expect)| OpSpec::Delete { ns, key, expect }),
        3 => (0..2usize, bytes()).prop_map(|(stream, data)| OpSpec::Append { stream, data }),
        2 => (0..2usize, 0..3usize, -5_000..5_000i64, 0..3u16, 0..3usize, prop::option::of(bytes()))
            .prop_map(|(ns, key, offset_millis, logical, node, value)| OpSpec::Merge {
                ns, key, offset_millis, logical, node, value
            }),
        1 => (0..2usize, 1..5u64, -5_000..5_000i64, 0..3usize, bytes())
            .prop_map(|(stream, index, offset_millis, node, data)| OpSpec::MergeEvent {
                stream, index, offset_millis, node, data
            }),
    ]
}

/// Histories of up to `len` steps.
pub fn history(len: usize) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            6 => prop::collection::vec(op_spec(), 1..5).prop_map(Step::Commit),
            1 => (1..4_000u64).prop_map(Step::Advance),
            1 => (0..3_000u64, 0..2_000u64)
                .prop_map(|(retention, grace)| Step::Reclaim { retention, grace }),
        ],
        1..len,
    )
}

/// The reference model: the contract, written plainly.
#[derive(Default, Debug)]
struct Model {
    /// (ns, key) -> (record, revision = sequence of the last entry on the key).
    records: BTreeMap<(String, String), (Record, u64)>,
    /// (stream, index) -> event.
    events: BTreeMap<(String, u64), StreamEvent>,
    /// The change log, every entry ever appended.
    log: Vec<LogEntry>,
    /// Entries that held nothing current at a reclamation pass: gone from the log since.
    gone: BTreeSet<u64>,
    /// Whether a reclamation pass ran.
    reclaimed: bool,
    /// The store's hybrid clock, simulated: the greatest timestamp it returned or observed.
    clock_last: u64,
}

fn record_wins(incoming: &Record, current: &Record) -> bool {
    (
        &incoming.version,
        &incoming.value,
        &incoming.expires_at_millis,
    ) > (&current.version, &current.value, &current.expires_at_millis)
}

impl Model {
    fn live_revision(&self, ns: &str, key: &str, now: u64) -> Option<u64> {
        self.records
            .get(&(ns.to_owned(), key.to_owned()))
            .filter(|(r, _)| r.value.is_some() && r.expires_at_millis.is_none_or(|at| now < at))
            .map(|(_, rev)| *rev)
    }

    fn head(&self, stream: &str) -> u64 {
        self.events
            .range((stream.to_owned(), 0)..=(stream.to_owned(), u64::MAX))
            .next_back()
            .map_or(0, |((_, i), _)| *i)
    }

    fn to_op(&self, spec: &OpSpec, now: u64) -> Op {
        let expect = |ns: usize, key: usize, e: ExpectSpec| match e {
            ExpectSpec::Any => Expect::Any,
            ExpectSpec::Absent => Expect::Absent,
            ExpectSpec::Current => Expect::Revision(
                self.live_revision(NAMESPACES[ns], KEYS[key], now)
                    .unwrap_or(1),
            ),
            ExpectSpec::Stale => Expect::Revision(
                self.live_revision(NAMESPACES[ns], KEYS[key], now)
                    .map_or(1, |r| r + 1000),
            ),
        };
        let version = |offset: i64, logical: u16, node: usize| Version {
            hlc: Hlc::new(now.saturating_add_signed(offset), logical),
            origin: Origin::new("elsewhere", NODES[node]),
        };
        match spec {
            OpSpec::Put {
                ns,
                key,
                value,
                expect: e,
                ttl,
            } => Op::Put {
                namespace: NAMESPACES[*ns].into(),
                key: KEYS[*key].into(),
                value: value.clone(),
                expect: expect(*ns, *key, *e),
                ttl_millis: *ttl,
            },
            OpSpec::Delete { ns, key, expect: e } => Op::Delete {
                namespace: NAMESPACES[*ns].into(),
                key: KEYS[*key].into(),
                expect: expect(*ns, *key, *e),
            },
            OpSpec::Append { stream, data } => Op::Append {
                stream: STREAMS[*stream].into(),
                data: data.clone(),
            },
            OpSpec::Merge {
                ns,
                key,
                offset_millis,
                logical,
                node,
                value,
            } => Op::Merge(Record {
                namespace: NAMESPACES[*ns].into(),
                key: KEYS[*key].into(),
                version: version(*offset_millis, *logical, *node),
                value: value.clone(),
                expires_at_millis: None,
            }),
            OpSpec::MergeEvent {
                stream,
                index,
                offset_millis,
                node,
                data,
            } => Op::MergeEvent(StreamEvent {
                stream: STREAMS[*stream].into(),
                index: *index,
                version: version(*offset_millis, 0, *node),
                data: data.clone(),
            }),
        }
    }

    /// What `batch` should do: a conflict, or the changes it appends (with the clock after
    /// it) and, per operation, the position of its change (or `None`: unchanged).
    // Long by design: the model of the store contract: a flat match of the operations.
    #[allow(clippy::type_complexity)]
    fn predict(
        &self,
        batch: &Batch,
        now: u64,
        origin: &Origin,
    ) -> Result<(Vec<Change>, Vec<Option<usize>>, u64), ()> {
        for op in &batch.ops {
            let Some((ns, key, expect)) = op.precondition() else {
                continue;
            };
            let live = self.live_revision(ns, key, now);
            let holds = match expect {
                Expect::Any => true,
                Expect::Absent => live.is_none(),
                Expect::Revision(r) => live == Some(r),
            };
            if !holds {
                return Err(());
            }
        }
        // A local write is stamped after everything the store returned or observed.
        let mut clock = self.clock_last;
        let stamp = |clock: &mut u64| {
            let wall = Hlc::new(now, 0).0;
            *clock = if wall > *clock { wall } else { *clock + 1 };
            Version {
                hlc: Hlc(*clock),
                origin: origin.clone(),
            }
        };
        let mut changes = Vec::new();
        let mut positions = Vec::new();
        let mut records: HashMap<(String, String), Record> = HashMap::new();
        let mut events: HashMap<(String, u64), StreamEvent> = HashMap::new();
        let mut heads: HashMap<String, u64> = HashMap::new();
        for op in &batch.ops {
            let change = match op {
                Op::Put {
                    namespace,
                    key,
                    value,
                    ttl_millis,
                    ..
                } => Change::Record(Record {
                    namespace: namespace.clone(),
                    key: key.clone(),
                    version: stamp(&mut clock),
                    value: Some(value.clone()),
                    expires_at_millis: ttl_millis.map(|t| now + t),
                }),
                Op::Delete { namespace, key, .. } => Change::Record(Record {
                    namespace: namespace.clone(),
                    key: key.clone(),
                    version: stamp(&mut clock),
                    value: None,
                    expires_at_millis: None,
                }),
                Op::Append { stream, data } => {
                    let head = heads
                        .entry(stream.clone())
                        .or_insert_with(|| self.head(stream));
                    *head += 1;
                    Change::Event(StreamEvent {
                        stream: stream.clone(),
                        index: *head,
                        version: stamp(&mut clock),
                        data: data.clone(),
                    })
                }
                Op::Merge(r) => {
                    clock = clock.max(r.version.hlc.0);
                    let k = (r.namespace.clone(), r.key.clone());
                    let current = records
                        .get(&k)
                        .cloned()
                        .or_else(|| self.records.get(&k).map(|(r, _)| r.clone()));
                    if current.is_some_and(|c| !record_wins(r, &c)) {
                        positions.push(None);
                        continue;
                    }
                    Change::Record(r.clone())
                }
                Op::MergeEvent(e) => {
                    clock = clock.max(e.version.hlc.0);
                    let k = (e.stream.clone(), e.index);
                    let current = events
                        .get(&k)
                        .cloned()
                        .or_else(|| self.events.get(&k).cloned());
                    if current.is_some_and(|c| (&e.version, &e.data) <= (&c.version, &c.data)) {
                        positions.push(None);
                        continue;
                    }
                    let head = heads
                        .entry(e.stream.clone())
                        .or_insert_with(|| self.head(&e.stream));
                    *head = (*head).max(e.index);
                    Change::Event(e.clone())
                }
            };
            match &change {
                Change::Record(r) => {
                    records.insert((r.namespace.clone(), r.key.clone()), r.clone());
                }
                Change::Event(e) => {
                    events.insert((e.stream.clone(), e.index), e.clone());
                }
            }
            positions.push(Some(changes.len()));
            changes.push(change);
        }
        Ok((changes, positions, clock))
    }

    /// A reclamation pass at `now` (see [`Step::Reclaim`]).
    fn reclaim(&mut self, now: u64, retention: u64, grace: u64) {
        let last = self.log.len() as u64;
        // A record whose entry is the log's last stays (the log keeps that entry).
        self.records.retain(|_, (r, rev)| {
            let expired = r.expires_at_millis.is_some_and(|at| at + grace < now);
            let old_tombstone = r.value.is_none() && r.version.hlc.millis() + retention < now;
            !(expired || old_tombstone) || *rev == last
        });
        // An event whose entry is the log's last stays (the log keeps that entry).
        let at_last = match self.log.last().map(|e| &e.change) {
            Some(Change::Event(e)) => Some(e.clone()),
            _ => None,
        };
        self.events.retain(|_, e| {
            e.version.hlc.millis() + retention >= now || at_last.as_ref() == Some(e)
        });
        // What holds nothing current now must be gone after the pass (but the log's last
        // entry and each stream's last; see `check_log`); later passes may take more.
        self.reclaimed = true;
        let (required, allowed) = self.kept();
        for e in &self.log {
            if !required.contains(&e.seq) && !allowed.contains(&e.seq) {
                self.gone.insert(e.seq);
            }
        }
    }

    /// The entries that hold something current (a record's last entry — in this one-node
    /// contract a record's winner is always in it — each event's entry, and the log's last),
    /// and those a log may keep besides (each stream's last: a log whose appends compare
    /// against it keeps it while it is the last).
    fn kept(&self) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let mut required: BTreeSet<u64> = self.records.values().map(|(_, rev)| *rev).collect();
        let mut stream_last: HashMap<&str, u64> = HashMap::new();
        for e in &self.log {
            if let Change::Event(ev) = &e.change {
                stream_last.insert(&ev.stream, e.seq);
                if self.events.get(&(ev.stream.clone(), ev.index)) == Some(ev) {
                    required.insert(e.seq);
                }
            }
        }
        required.extend(self.log.last().map(|e| e.seq));
        (required, stream_last.values().copied().collect())
    }

    /// Checks the store's log against the model: every entry the store holds is the model's
    /// entry at that sequence, it holds every entry that holds something current, and none
    /// that a reclamation pass had to remove.
    fn check_log(&self, got: &[LogEntry]) {
        let (required, _) = self.kept();
        let mut held = BTreeSet::new();
        for e in got {
            let want = self.log.get(e.seq as usize - 1);
            assert_eq!(
                Some(e),
                want,
                "the store's log entry {} is the model's",
                e.seq
            );
            assert!(
                !self.gone.contains(&e.seq),
                "entry {} held nothing current at a reclamation pass and was kept: {e:?}",
                e.seq
            );
            held.insert(e.seq);
        }
        let missing: Vec<&u64> = required.difference(&held).collect();
        assert!(
            missing.is_empty(),
            "entries holding current items were removed: {missing:?}"
        );
        if !self.reclaimed {
            assert_eq!(
                got.len(),
                self.log.len(),
                "nothing is removed without reclamation"
            );
        }
    }

    /// Checks the store's entries against what was expected and folds them in.
    fn apply(&mut self, entries: &[LogEntry], expected: &[Change], clock: u64) {
        let got: Vec<&Change> = entries.iter().map(|e| &e.change).collect();
        let want: Vec<&Change> = expected.iter().collect();
        assert_eq!(got, want, "the change log");
        for e in entries {
            assert_eq!(e.seq, self.log.len() as u64 + 1, "log sequences are dense");
            match &e.change {
                Change::Record(r) => {
                    let k = (r.namespace.clone(), r.key.clone());
                    let keep = match self.records.get(&k) {
                        Some((cur, _)) if !record_wins(r, cur) => cur.clone(),
                        _ => r.clone(),
                    };
                    self.records.insert(k, (keep, e.seq));
                }
                Change::Event(ev) => {
                    self.events
                        .insert((ev.stream.clone(), ev.index), ev.clone());
                }
            }
            self.log.push(e.clone());
        }
        self.clock_last = clock;
    }
}

/// Runs `steps` against `store` (fresh, empty, driven by `wall`) and the model.
pub async fn check_history(store: &dyn Store, wall: &ManualClock, steps: &[Step]) {
    let mut model = Model::default();
    for step in steps {
        let batch = match step {
            Step::Advance(ms) => {
                wall.advance(*ms);
                continue;
            }
            Step::Reclaim { retention, grace } => {
                let now = wall_now(wall);
                let policy = haven_state::Reclaim {
                    log_floor: u64::MAX,
                    now_millis: now,
                    expired_grace_millis: *grace,
                    tombstone_retention_millis: *retention,
                    event_retention_millis: *retention,
                    step: 3,
                    trim_log: true,
                };
                let mut steps = 0;
                while !store.reclaim(&policy).await.unwrap().done {
                    steps += 1;
                    assert!(steps < 10_000, "a reclamation pass never completed");
                }
                model.reclaim(now, *retention, *grace);
                compare_reads(store, &model, now).await;
                continue;
            }
            Step::Commit(ops) => {
                let now = wall_now(wall);
                Batch {
                    ops: ops.iter().map(|o| model.to_op(o, now)).collect(),
                }
            }
        };
        let now = wall_now(wall);
        let predicted = model.predict(&batch, now, store.origin());
        let result = store.commit(batch.clone()).await;
        match (predicted, result) {
            (Err(()), Err(StoreError::Conflict { .. })) => {}
            (Err(()), other) => panic!("expected a conflict for {batch:?}, got {other:?}"),
            (Ok(_), Err(e)) => panic!("{batch:?} failed: {e}"),
            (Ok((expected, positions, clock)), Ok(commit)) => {
                let first = model.log.len() as u64 + 1;
                let entries = store.read_log(first, 1000).await.unwrap();
                model.apply(&entries, &expected, clock);
                assert_eq!(commit.last_seq, model.log.len() as u64);
                assert_eq!(commit.outcomes.len(), positions.len());
                for (outcome, pos) in commit.outcomes.iter().zip(&positions) {
                    let want = match pos {
                        None => Outcome::Unchanged,
                        Some(p) => match &entries[*p].change {
                            Change::Record(_) => Outcome::Written {
                                revision: entries[*p].seq,
                            },
                            Change::Event(e) => Outcome::Appended {
                                index: e.index,
                                seq: entries[*p].seq,
                                hlc: e.version.hlc,
                            },
                        },
                    };
                    assert_eq!(outcome, &want, "outcome of {batch:?}");
                }
            }
        }
    }
    compare_reads(store, &model, wall_now(wall)).await;
}

fn wall_now(wall: &ManualClock) -> u64 {
    use haven_state::PhysicalClock;
    wall.now_millis()
}

async fn compare_reads(store: &dyn Store, model: &Model, now: u64) {
    assert_eq!(store.last_seq().await.unwrap(), model.log.len() as u64);
    let log = store.read_log(1, 10_000).await.unwrap();
    model.check_log(&log);
    // The same entries with their changes encoded, whole and from the middle.
    let encoded = store.read_log_encoded(1, 10_000).await.unwrap();
    let decoded: Vec<_> = encoded.iter().map(|e| e.decode().unwrap()).collect();
    assert_eq!(decoded, log);
    let from = log.last().map_or(1, |e| e.seq / 2 + 1);
    let part: Vec<_> = store.read_log_encoded(from, 3).await.unwrap();
    assert_eq!(
        part,
        encoded
            .iter()
            .filter(|e| e.seq >= from)
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
    );
    for ns in NAMESPACES {
        for key in KEYS {
            let want = model.records.get(&(ns.to_owned(), key.to_owned()));
            let raw = store.get_raw(ns, key).await.unwrap();
            assert_eq!(
                raw.as_ref().map(|r| (&r.record, r.revision)),
                want.map(|(r, rev)| (r, *rev)),
                "get_raw {ns}/{key}"
            );
            let live = store.get(ns, key).await.unwrap();
            assert_eq!(
                live.map(|r| r.revision),
                model.live_revision(ns, key, now),
                "get {ns}/{key}"
            );
        }
        let scanned: Vec<String> = store
            .scan_all(ns, "k")
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.record.key)
            .collect();
        let want: Vec<String> = KEYS
            .iter()
            .filter(|k| model.live_revision(ns, k, now).is_some())
            .map(|k| k.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(scanned, want, "scan {ns}");
    }
    for stream in STREAMS {
        let got = store.read_events(stream, 0, 1000).await.unwrap();
        let want: Vec<StreamEvent> = model
            .events
            .range((stream.to_owned(), 0)..=(stream.to_owned(), u64::MAX))
            .map(|(_, e)| e.clone())
            .collect();
        assert_eq!(got, want, "events of {stream}");
    }
}

/// A clock for a suite store, and its wall clock.
pub fn clock() -> (Arc<ManualClock>, Arc<haven_state::HybridClock>) {
    let wall = Arc::new(ManualClock::new(START_MILLIS));
    let clock = Arc::new(haven_state::HybridClock::new(wall.clone()));
    (wall, clock)
}

/// The fixed cases: conditional writes, atomicity, tombstones, scans with pages, streams, the
/// change log and `watch`.
// Long by design: the basic operations of the contract, one after the other on one store.
pub async fn basics(s: Arc<dyn Store>) {
    // Conditional writes.
    let c = s
        .commit(Batch::new().put_if("notes", "a", b"1".to_vec(), Expect::Absent))
        .await
        .unwrap();
    let Outcome::Written { revision } = c.outcomes[0] else {
        panic!("{c:?}")
    };
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

    // Tombstones and scans with pages.
    s.commit(Batch::new().delete("notes", "a")).await.unwrap();
    assert!(s.get("notes", "a").await.unwrap().is_none());
    assert!(
        s.get_raw("notes", "a")
            .await
            .unwrap()
            .unwrap()
            .record
            .is_tombstone()
    );
    let mut batch = Batch::new();
    for i in 0..25 {
        batch = batch.put("pages", &format!("p/{i:02}"), vec![]);
    }
    s.commit(batch.put("pages", "q", vec![])).await.unwrap();
    let first = s.scan("pages", "p/", None, 10).await.unwrap();
    assert_eq!(first.records.len(), 10);
    let second = s
        .scan("pages", "p/", first.next_after.as_deref(), 10)
        .await
        .unwrap();
    assert_eq!(second.records[0].record.key, "p/10");
    assert_eq!(s.scan_all("pages", "p/").await.unwrap().len(), 25);

    // Streams, the log and watch.
    let base = s.last_seq().await.unwrap();
    let mut w = watch(s.clone(), base + 1);
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
    s.commit(
        Batch::new()
            .append("st", b"e3".to_vec())
            .put("k", "v", vec![]),
    )
    .await
    .unwrap();
    let ev = s.read_events("st", 1, 10).await.unwrap();
    assert_eq!(ev.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3]);
    for expect in base + 1..=base + 4 {
        let e = w.next().await.unwrap().unwrap();
        assert_eq!(e.seq, expect);
    }
    let mut late = watch(s.clone(), base + 3);
    assert_eq!(late.next().await.unwrap().unwrap().seq, base + 3);
    assert_eq!(late.next().await.unwrap().unwrap().seq, base + 4);
    s.commit(Batch::new().put("k", "w", vec![])).await.unwrap();
    assert_eq!(late.next().await.unwrap().unwrap().seq, base + 5);

    // Bad input changes nothing.
    let before = s.last_seq().await.unwrap();
    assert!(matches!(
        s.commit(Batch::new().put("", "k", vec![])).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.commit(Batch::new().put("n", &"k".repeat(5000), vec![]))
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.last_seq().await.unwrap(), before);
}
