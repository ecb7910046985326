//! Group commit on a shared log: concurrent commits of one node share atomic batches.
//!
//! A commit planned against the index hands its writes to the node's [`GroupCommit`] and waits
//! for their sequences. Up to [`APPENDS_IN_FLIGHT`] appends run at once (pipelined); each
//! takes every waiting commit it can into one batch, in arrival order, as many as the log's
//! batch limit allows: a key or stream that one commit's write checks (a precondition,
//! planned without the others) is written by no other commit of the batch. Every commit's
//! preconditions stay in its writes (`expected`), checked by the log as before, so the batch
//! is stored whole or not at all. A refused batch does not say whose
//! precondition failed: every commit in it plans again and goes [alone](Entry::alone), so a
//! conflict fails only the commit that has one. While appends are in flight, new commits
//! queue, and the next append takes them together: under load the batches grow by
//! themselves, and a lone commit waits for nothing.
//!
//! Each append runs in a task of its own, so a caller that stops waiting (its request was
//! cancelled) never takes the other commits of its batch down with it; its own writes may
//! still be stored, as when a caller stops waiting for any append's acknowledgement.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::record::LogSubject;
use crate::replicated::{AppendError, LogWrite, SharedLog};

/// How many appends of one node may be in flight at once, unless
/// [`APPENDS_IN_FLIGHT_ENV`] says otherwise.
pub const APPENDS_IN_FLIGHT: usize = 4;

/// The environment variable that sets how many appends of a node may be in flight at once
/// (a tuning knob for benchmarks): 0 turns group commit off (every commit appends alone, at
/// once, as before group commit).
pub const APPENDS_IN_FLIGHT_ENV: &str = "HAVEN_STORE_APPENDS_IN_FLIGHT";

/// [`APPENDS_IN_FLIGHT`], or what [`APPENDS_IN_FLIGHT_ENV`] sets.
fn appends_in_flight() -> usize {
    std::env::var(APPENDS_IN_FLIGHT_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(APPENDS_IN_FLIGHT)
}

/// One commit's writes, waiting for an append.
struct Entry {
    writes: Vec<LogWrite>,
    /// Append in a batch of its own (after its shared batch was refused).
    alone: bool,
    /// Where its first write's sequence goes, or why it was not stored.
    reply: oneshot::Sender<Result<u64, AppendError>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Entry>,
    in_flight: usize,
}

/// The node's commits waiting for the log, and the appends that carry them.
pub(crate) struct GroupCommit<L: SharedLog> {
    log: Arc<L>,
    queue: Arc<Mutex<Queue>>,
    /// Appends in flight at most; 0: no grouping.
    in_flight: usize,
}

impl<L: SharedLog> GroupCommit<L> {
    pub(crate) fn new(log: Arc<L>) -> GroupCommit<L> {
        GroupCommit {
            log,
            queue: Arc::default(),
            in_flight: appends_in_flight(),
        }
    }

    /// Appends `writes` (one commit's, in order, on consecutive sequences), alone or with
    /// other commits' in one batch; the sequence of its first write.
    pub(crate) async fn append(
        &self,
        writes: Vec<LogWrite>,
        alone: bool,
    ) -> Result<u64, AppendError> {
        if self.in_flight == 0 {
            let last = self.log.append(&writes).await?;
            return Ok(last + 1 - writes.len() as u64);
        }
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.waiting.push_back(Entry {
                writes,
                alone,
                reply,
            });
            let start = q.in_flight < self.in_flight;
            if start {
                q.in_flight += 1;
            }
            start
        };
        if start {
            tokio::spawn(appender(self.log.clone(), self.queue.clone()));
        }
        answer.await.unwrap_or_else(|_| {
            Err(AppendError::Unknown(
                "the append carrying the write ended without an answer".into(),
            ))
        })
    }
}

/// Appends what waits, one batch after another, until nothing waits.
async fn appender<L: SharedLog>(log: Arc<L>, queue: Arc<Mutex<Queue>>) {
    let max = log.max_batch();
    loop {
        let group = {
            let mut q = queue.lock();
            let group = take_group(&mut q.waiting, max);
            if group.is_empty() {
                // Under the lock: a commit queued from now on starts an appender of its own.
                q.in_flight -= 1;
                return;
            }
            group
        };
        let result = if group.len() == 1 {
            log.append(&group[0].writes).await
        } else {
            let writes: Vec<LogWrite> = group.iter().flat_map(|e| e.writes.clone()).collect();
            log.append(&writes).await
        };
        let total: usize = group.iter().map(|e| e.writes.len()).sum();
        let mut next = result.as_ref().map(|last| last + 1 - total as u64);
        for e in group {
            let answer = match &mut next {
                Ok(first) => {
                    let mine = *first;
                    *first += e.writes.len() as u64;
                    Ok(mine)
                }
                Err(err) => Err(err.clone()),
            };
            let _ = e.reply.send(answer);
        }
    }
}

/// Takes the next batch from `waiting`: the first commit, and then, unless either goes alone,
/// every later one that [`Taken::admits`] and that fits within `max` writes. What is left
/// keeps its order.
fn take_group(waiting: &mut VecDeque<Entry>, max: usize) -> Vec<Entry> {
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    if first.alone {
        return vec![first];
    }
    let mut size = first.writes.len();
    let mut taken = Taken::default();
    taken.add(&first);
    let mut group = vec![first];
    let mut left = VecDeque::with_capacity(waiting.len());
    while let Some(e) = waiting.pop_front() {
        if !e.alone && size + e.writes.len() <= max && taken.admits(&e) {
            size += e.writes.len();
            taken.add(&e);
            group.push(e);
        } else {
            left.push_back(e);
        }
    }
    *waiting = left;
    group
}

/// The keys and streams a batch being formed writes.
#[derive(Default)]
struct Taken {
    /// Every one written.
    written: HashSet<LogSubject>,
    /// Those a write checks (`expected`): no other commit of the batch may write them.
    checked: HashSet<LogSubject>,
}

impl Taken {
    /// Whether `e` may join: it checks nothing the batch writes, and writes nothing the batch
    /// checks. Unchecked writes of several commits to one key may share a batch (the record
    /// with the greater version wins, whatever their order), as they may share the log.
    fn admits(&self, e: &Entry) -> bool {
        e.writes.iter().all(|w| {
            let s = w.change.subject();
            if w.expected.is_some() {
                !self.written.contains(&s)
            } else {
                !self.checked.contains(&s)
            }
        })
    }

    fn add(&mut self, e: &Entry) {
        for w in &e.writes {
            let s = w.change.subject();
            if w.expected.is_some() {
                self.checked.insert(s.clone());
            }
            self.written.insert(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::record::{Change, Origin, Record, Version};

    /// A write of `key`; `!key` checks it (a precondition).
    fn write(key: &str) -> LogWrite {
        let (key, expected) = match key.strip_prefix('!') {
            Some(k) => (k, Some(7)),
            None => (key, None),
        };
        LogWrite {
            change: Change::Record(Record {
                namespace: "ns".into(),
                key: key.into(),
                value: Some(vec![1]),
                version: Version {
                    hlc: Hlc::default(),
                    origin: Origin::new("r", "n"),
                },
                expires_at_millis: None,
            }),
            expected,
            traceparent: None,
        }
    }

    fn entry(keys: &[&str], alone: bool) -> Entry {
        Entry {
            writes: keys.iter().map(|k| write(k)).collect(),
            alone,
            reply: oneshot::channel().0,
        }
    }

    fn keys(group: &[Entry]) -> Vec<Vec<String>> {
        group
            .iter()
            .map(|e| {
                e.writes
                    .iter()
                    .map(|w| match &w.change {
                        Change::Record(r) => r.key.clone(),
                        Change::Event(e) => e.stream.clone(),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_key_one_commit_checks_is_written_by_no_other_commit_of_its_batch() {
        let mut q: VecDeque<Entry> = [
            entry(&["!a", "b"], false),
            entry(&["c"], false),
            entry(&["a"], false),
            entry(&["!b", "d"], false),
            entry(&["b", "e"], false),
            entry(&["!c"], false),
        ]
        .into();
        // "a" is checked by the first: the third waits. "b" is written unchecked by the first
        // and the fifth (both may share a batch), but checked by the fourth: it waits. "c" is
        // written by the second: the sixth waits.
        let g = take_group(&mut q, 100);
        assert_eq!(keys(&g), [vec!["a", "b"], vec!["c"], vec!["b", "e"]]);
        let g = take_group(&mut q, 100);
        assert_eq!(keys(&g), [vec!["a"], vec!["b", "d"], vec!["c"]]);
        assert!(take_group(&mut q, 100).is_empty());
    }

    #[test]
    fn a_commit_that_goes_alone_is_a_batch_of_its_own_and_the_limit_holds() {
        let mut q: VecDeque<Entry> = [
            entry(&["a"], false),
            entry(&["b"], true),
            entry(&["c", "d"], false),
            entry(&["e"], false),
            entry(&["f"], false),
        ]
        .into();
        // At most 2 writes a batch: "c d" does not fit after "a", "e" does, "f" not.
        let g = take_group(&mut q, 2);
        assert_eq!(keys(&g), [vec!["a"], vec!["e"]]);
        let g = take_group(&mut q, 2);
        assert_eq!(keys(&g), [vec!["b"]]);
        let g = take_group(&mut q, 2);
        assert_eq!(keys(&g), [vec!["c", "d"]]);
        let g = take_group(&mut q, 2);
        assert_eq!(keys(&g), [vec!["f"]]);
    }
}
