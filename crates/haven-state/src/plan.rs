//! What a batch means, in one place for every backend: its preconditions, the versions its
//! local writes get, the indexes its appends get, and which merged records and events win.
//!
//! A backend hands [`plan`] a read view of its state as it is before the batch ([`StateRead`]);
//! the plan is the list of changes to append to the change log, in order, with what each
//! expects of its key or stream (for backends whose log checks preconditions itself, such as
//! JetStream), and the outcome each operation reports once the changes have sequences.

use std::collections::{HashMap, HashSet};

use crate::clock::{Hlc, HybridClock};
use crate::record::{Change, Origin, Record, StoredRecord, StreamEvent, Version};
use crate::store::{Batch, Expect, Op, Outcome, StoreError, StoreResult};

/// Largest value a single operation may carry.
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;
/// Longest namespace plus key (or stream name).
pub const MAX_KEY_BYTES: usize = 4096;

/// The state a batch is planned against.
pub(crate) trait StateRead {
    /// The record of a key with its revision, tombstones and expired records included.
    fn record(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>>;
    /// The index of the last event of `stream` (0 when it has none) and the sequence of the
    /// last change-log entry on that stream (0 when none).
    fn stream_head(&self, stream: &str) -> StoreResult<(u64, u64)>;
    /// The event of `stream` at `index`.
    fn event(&self, stream: &str, index: u64) -> StoreResult<Option<StreamEvent>>;
}

/// One change the batch appends to the log.
#[derive(Clone, Debug)]
pub struct PlannedWrite {
    /// The change itself.
    pub change: Change,
    /// For the first write of the batch to a key or stream whose state the plan relied on:
    /// the sequence of the last log entry on that key or stream (0: none). A log that checks
    /// preconditions itself refuses the batch if that has changed meanwhile.
    pub expected: Option<u64>,
    /// On a commit's last write: the trace context it was committed in (see
    /// [`crate::trace`]), kept beside the write where the log can hold it.
    pub traceparent: Option<String>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Written,
    /// An event: its index and its version's timestamp.
    Appended(u64, Hlc),
}

/// The changes a batch appends and the outcome of each of its operations.
#[derive(Clone, Debug, Default)]
pub(crate) struct Plan {
    /// Changes in log order.
    pub writes: Vec<PlannedWrite>,
    /// Per operation: `None` when it changes nothing, else (position in `writes`, kind).
    outcomes: Vec<Option<(usize, Kind)>>,
    /// The greatest timestamp among merged changes (0 when none).
    pub merged_hlc: u64,
}

impl Plan {
    /// Whether the batch appends nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The outcomes once the writes got the sequences `first_seq..`.
    pub fn outcomes(&self, first_seq: u64) -> Vec<Outcome> {
        self.outcomes
            .iter()
            .map(|o| match o {
                None => Outcome::Unchanged,
                Some((pos, Kind::Written)) => Outcome::Written {
                    revision: first_seq + *pos as u64,
                },
                Some((pos, Kind::Appended(index, hlc))) => Outcome::Appended {
                    index: *index,
                    seq: first_seq + *pos as u64,
                    hlc: *hlc,
                },
            })
            .collect()
    }

    fn push(&mut self, change: Change, expected: Option<u64>, kind: Kind) {
        self.outcomes.push(Some((self.writes.len(), kind)));
        self.writes.push(PlannedWrite {
            change,
            expected,
            traceparent: None,
        });
    }
}

/// Checks what a batch may hold, before anything is planned.
pub(crate) fn validate(batch: &Batch) -> StoreResult<()> {
    for op in &batch.ops {
        let (ns, key, len) = match op {
            Op::Put {
                namespace,
                key,
                value,
                ..
            } => (namespace.as_str(), key.as_str(), value.len()),
            Op::Delete { namespace, key, .. } => (namespace.as_str(), key.as_str(), 0),
            Op::Append { stream, data } => (stream.as_str(), "", data.len()),
            Op::Merge(r) => (
                r.namespace.as_str(),
                r.key.as_str(),
                r.value.as_ref().map_or(0, Vec::len),
            ),
            Op::MergeEvent(e) => (e.stream.as_str(), "", e.data.len()),
        };
        if ns.is_empty() {
            return Err(StoreError::Invalid(
                "namespace or stream name is empty".into(),
            ));
        }
        if len > MAX_VALUE_BYTES {
            return Err(StoreError::Invalid(format!(
                "value of {len} bytes exceeds the limit of {MAX_VALUE_BYTES} bytes"
            )));
        }
        if ns.len() + key.len() > MAX_KEY_BYTES {
            return Err(StoreError::Invalid(format!(
                "key longer than {MAX_KEY_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

fn describe(revision: Option<u64>) -> String {
    revision.map_or("no live record".into(), |r| format!("revision {r}"))
}

/// Checks every precondition of `batch` against the state before it.
fn check_preconditions(state: &impl StateRead, batch: &Batch, now: u64) -> StoreResult<()> {
    for op in &batch.ops {
        let Some((ns, key, expect)) = op.precondition() else {
            continue;
        };
        let live = match expect {
            Expect::Any => continue,
            _ => state
                .record(ns, key)?
                .filter(|r| r.record.is_live(now))
                .map(|r| r.revision),
        };
        let holds = match expect {
            Expect::Absent => live.is_none(),
            Expect::Revision(r) => live == Some(r),
            Expect::Any => true,
        };
        if !holds {
            return Err(StoreError::Conflict {
                namespace: ns.to_owned(),
                key: key.to_owned(),
                expected: match expect {
                    Expect::Revision(r) => format!("revision {r}"),
                    _ => "no live record".into(),
                },
                found: describe(live),
            });
        }
    }
    Ok(())
}

/// The keys that a write of `batch` puts a precondition on.
fn conditional_keys(batch: &Batch) -> std::collections::HashSet<(&str, &str)> {
    batch
        .ops
        .iter()
        .filter_map(|op| match op.precondition()? {
            (_, _, Expect::Any) => None,
            (namespace, key, _) => Some((namespace, key)),
        })
        .collect()
}

/// The record a local put or delete (`op`, of `namespace`/`key`) writes, stamped by `clock`
/// as `origin`; a put's time-to-live counts from `now`.
fn local_record(
    op: &Op,
    namespace: &str,
    key: &str,
    clock: &HybridClock,
    origin: &Origin,
    now: u64,
) -> Record {
    let (value, expires_at_millis) = match op {
        Op::Put {
            value, ttl_millis, ..
        } => (
            Some(value.clone()),
            ttl_millis.map(|t| now.saturating_add(t)),
        ),
        _ => (None, None),
    };
    Record {
        namespace: namespace.to_owned(),
        key: key.to_owned(),
        version: Version {
            hlc: clock.now(),
            origin: origin.clone(),
        },
        value,
        expires_at_millis,
    }
}

/// Plans `batch` against `state`: fails with [`StoreError::Conflict`] when a precondition does
/// not hold (nothing of the batch may then be applied), otherwise says what to append.
///
/// Local writes are stamped by `clock` as `origin`; `now` is the wall-clock time that decides
/// whether records have expired and when new ones expire.
pub(crate) fn plan(
    state: &impl StateRead,
    batch: &Batch,
    clock: &HybridClock,
    origin: &Origin,
    now: u64,
) -> StoreResult<Plan> {
    validate(batch)?;
    check_preconditions(state, batch, now)?;
    let mut plan = Plan::default();
    let conditional = conditional_keys(batch);
    // What earlier operations of this batch wrote (positions in `plan.writes`), so that later
    // ones build on it. Keys are borrowed from the batch: planning copies only what it writes.
    let mut records: HashMap<(&str, &str), usize> = HashMap::new();
    let mut heads: HashMap<&str, u64> = HashMap::new();
    let mut events: HashMap<(&str, u64), usize> = HashMap::new();
    // Keys and streams this batch already wrote: only the first write carries `expected`.
    let mut touched: HashSet<(bool, &str, &str)> = HashSet::new();
    let mut first_touch = |is_stream: bool, a, b| touched.insert((is_stream, a, b));
    for op in &batch.ops {
        match op {
            Op::Put { namespace, key, .. } | Op::Delete { namespace, key, .. } => {
                let record = local_record(op, namespace, key, clock, origin, now);
                // The log checks the key's state at the batch's first write to it, if any
                // write of the batch to that key has a precondition.
                let checked = conditional.contains(&(namespace.as_str(), key.as_str()));
                let expected = if first_touch(false, namespace, key) && checked {
                    Some(state.record(namespace, key)?.map_or(0, |r| r.revision))
                } else {
                    None
                };
                records.insert((namespace, key), plan.writes.len());
                plan.push(Change::Record(record), expected, Kind::Written);
            }
            Op::Append { stream, data } => {
                let (last_index, last_seq) = state.stream_head(stream)?;
                let next = heads.entry(stream).or_insert(last_index);
                *next += 1;
                let event = StreamEvent {
                    stream: stream.clone(),
                    index: *next,
                    version: Version {
                        hlc: clock.now(),
                        origin: origin.clone(),
                    },
                    data: data.clone(),
                };
                let expected = first_touch(true, stream, "").then_some(last_seq);
                let (index, hlc) = (*next, event.version.hlc);
                events.insert((stream, index), plan.writes.len());
                plan.push(Change::Event(event), expected, Kind::Appended(index, hlc));
            }
            Op::Merge(r) => {
                clock.observe(r.version.hlc);
                plan.merged_hlc = plan.merged_hlc.max(r.version.hlc.0);
                let k = (r.namespace.as_str(), r.key.as_str());
                let stored = state.record(&r.namespace, &r.key)?;
                let current = match records.get(&k) {
                    Some(&at) => match &plan.writes[at].change {
                        Change::Record(c) => Some(c),
                        Change::Event(_) => None,
                    },
                    None => stored.as_ref().map(|s| &s.record),
                };
                if current.is_some_and(|c| !r.supersedes(c)) {
                    plan.outcomes.push(None);
                    continue;
                }
                let expected = first_touch(false, &r.namespace, &r.key)
                    .then(|| stored.map_or(0, |s| s.revision));
                records.insert(k, plan.writes.len());
                plan.push(Change::Record(r.clone()), expected, Kind::Written);
            }
            Op::MergeEvent(e) => {
                clock.observe(e.version.hlc);
                plan.merged_hlc = plan.merged_hlc.max(e.version.hlc.0);
                let k = (e.stream.as_str(), e.index);
                let superseded = match events.get(&k) {
                    Some(&at) => match &plan.writes[at].change {
                        Change::Event(c) => !e.supersedes(c),
                        Change::Record(_) => false,
                    },
                    None => state
                        .event(&e.stream, e.index)?
                        .is_some_and(|c| !e.supersedes(&c)),
                };
                if superseded {
                    plan.outcomes.push(None);
                    continue;
                }
                let (last_index, last_seq) = state.stream_head(&e.stream)?;
                let head = heads.entry(&e.stream).or_insert(last_index);
                *head = (*head).max(e.index);
                let expected = first_touch(true, &e.stream, "").then_some(last_seq);
                events.insert(k, plan.writes.len());
                plan.push(
                    Change::Event(e.clone()),
                    expected,
                    Kind::Appended(e.index, e.version.hlc),
                );
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[derive(Default)]
    struct Map {
        records: BTreeMap<(String, String), StoredRecord>,
        events: BTreeMap<(String, u64), StreamEvent>,
    }

    impl StateRead for Map {
        fn record(&self, ns: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
            Ok(self.records.get(&(ns.into(), key.into())).cloned())
        }
        fn stream_head(&self, stream: &str) -> StoreResult<(u64, u64)> {
            Ok(self
                .events
                .range((stream.to_owned(), 0)..=(stream.to_owned(), u64::MAX))
                .next_back()
                .map_or((0, 0), |((_, i), _)| (*i, 7)))
        }
        fn event(&self, stream: &str, index: u64) -> StoreResult<Option<StreamEvent>> {
            Ok(self.events.get(&(stream.into(), index)).cloned())
        }
    }

    fn clock() -> HybridClock {
        HybridClock::new(Arc::new(crate::clock::ManualClock::new(1000)))
    }

    #[test]
    fn appends_in_one_batch_get_consecutive_indexes_and_one_expectation() {
        let p = plan(
            &Map::default(),
            &Batch::new().append("s", vec![1]).append("s", vec![2]),
            &clock(),
            &Origin::new("r", "n"),
            1000,
        )
        .unwrap();
        assert_eq!(p.writes[0].expected, Some(0));
        assert_eq!(p.writes[1].expected, None);
        let hlcs: Vec<Hlc> = p
            .writes
            .iter()
            .map(|w| match &w.change {
                Change::Event(e) => e.version.hlc,
                Change::Record(_) => unreachable!("only appends"),
            })
            .collect();
        assert!(hlcs[0] < hlcs[1], "each event has its own timestamp");
        assert_eq!(
            p.outcomes(10),
            vec![
                Outcome::Appended {
                    index: 1,
                    seq: 10,
                    hlc: hlcs[0]
                },
                Outcome::Appended {
                    index: 2,
                    seq: 11,
                    hlc: hlcs[1]
                }
            ]
        );
    }

    #[test]
    fn a_failed_precondition_plans_nothing() {
        let e = plan(
            &Map::default(),
            &Batch::new()
                .put("n", "a", vec![1])
                .put_if("n", "b", vec![1], Expect::Revision(3)),
            &clock(),
            &Origin::new("r", "n"),
            1000,
        );
        assert!(matches!(e, Err(StoreError::Conflict { .. })), "{e:?}");
    }
}
