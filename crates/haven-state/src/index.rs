//! The in-memory fold of a shared change log that every node of a replicated backend keeps:
//! the current record per key, every stream event, and where each key and stream was last
//! written in the log (what conditional writes compare against).

use std::collections::{BTreeMap, HashMap};

use crate::plan::StateRead;
use crate::record::{Change, LogEntry, StoredRecord, StreamEvent};
use crate::store::{ScanPage, StoreResult};

/// The folded state of a log, up to the last sequence applied.
#[derive(Default)]
pub(crate) struct Index {
    /// Current (last-writer-wins) record per key, with the sequence of the last log entry on
    /// the key: the revision conditional writes compare against.
    records: BTreeMap<(String, String), StoredRecord>,
    /// Events per (stream, index) with their log sequence.
    events: BTreeMap<(String, u64), (u64, StreamEvent)>,
    /// Per stream: its greatest event index and the sequence of its last log entry.
    stream_heads: HashMap<String, (u64, u64)>,
    /// Last applied sequence.
    applied: u64,
    /// Entries of a batch whose last entry has not arrived yet.
    pending: Vec<LogEntry>,
}

impl Index {
    /// Last applied sequence.
    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// Takes one delivered log entry; a batch is applied only once its last entry (`complete`)
    /// arrives, so that readers never see part of one. Returns the entries applied now.
    pub(crate) fn deliver(&mut self, entry: LogEntry, complete: bool) -> Vec<LogEntry> {
        if entry.seq <= self.applied {
            return Vec::new();
        }
        if !complete {
            self.pending.push(entry);
            return Vec::new();
        }
        let mut ready = std::mem::take(&mut self.pending);
        ready.push(entry);
        for e in &ready {
            self.apply(e);
        }
        ready
    }

    /// Forgets the entries of a batch that is not complete yet: the log is about to be
    /// delivered again from the sequence after the last applied one, so they come again.
    pub(crate) fn restart(&mut self) {
        self.pending.clear();
    }

    /// Marks `seq` as applied without a change (a log entry that holds no Haven change).
    pub(crate) fn skip(&mut self, seq: u64) {
        if self.pending.is_empty() {
            self.applied = self.applied.max(seq);
        }
    }

    fn apply(&mut self, entry: &LogEntry) {
        match &entry.change {
            Change::Record(r) => {
                let k = (r.namespace.clone(), r.key.clone());
                match self.records.get_mut(&k) {
                    Some(cur) => {
                        if r.supersedes(&cur.record) {
                            cur.record = r.clone();
                        }
                        cur.revision = entry.seq;
                    }
                    None => {
                        self.records.insert(
                            k,
                            StoredRecord {
                                record: r.clone(),
                                revision: entry.seq,
                            },
                        );
                    }
                }
            }
            Change::Event(e) => {
                let k = (e.stream.clone(), e.index);
                let replace = match self.events.get(&k) {
                    Some((_, cur)) => e.supersedes(cur),
                    None => true,
                };
                if replace {
                    self.events.insert(k, (entry.seq, e.clone()));
                }
                let head = self.stream_heads.entry(e.stream.clone()).or_insert((0, 0));
                head.0 = head.0.max(e.index);
                head.1 = entry.seq;
            }
        }
        self.applied = self.applied.max(entry.seq);
    }

    /// The record of a key, tombstones and expired records included.
    pub(crate) fn get(&self, namespace: &str, key: &str) -> Option<&StoredRecord> {
        self.records.get(&(namespace.to_owned(), key.to_owned()))
    }

    /// Live records of `namespace` with keys starting with `prefix`, after `after`.
    pub(crate) fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        now: u64,
    ) -> ScanPage {
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut page = ScanPage::default();
        for ((ns, key), r) in self
            .records
            .range((namespace.to_owned(), start.to_owned())..)
        {
            if ns != namespace || !key.starts_with(prefix) {
                break;
            }
            if after == Some(key.as_str()) {
                continue;
            }
            if page.records.len() == limit {
                page.next_after = page.records.last().map(|r| r.record.key.clone());
                break;
            }
            if r.record.is_live(now) {
                page.records.push(r.clone());
            }
        }
        page
    }

    /// Events of `stream` after index `after`, at most `limit`.
    pub(crate) fn events(&self, stream: &str, after: u64, limit: usize) -> Vec<StreamEvent> {
        let Some(from) = after.checked_add(1) else {
            return Vec::new();
        };
        self.events
            .range((stream.to_owned(), from)..=(stream.to_owned(), u64::MAX))
            .take(limit)
            .map(|(_, (_, e))| e.clone())
            .collect()
    }
}

impl StateRead for Index {
    fn record(&self, namespace: &str, key: &str) -> StoreResult<Option<StoredRecord>> {
        Ok(self.get(namespace, key).cloned())
    }

    fn stream_head(&self, stream: &str) -> StoreResult<(u64, u64)> {
        Ok(self.stream_heads.get(stream).copied().unwrap_or((0, 0)))
    }

    fn event(&self, stream: &str, index: u64) -> StoreResult<Option<StreamEvent>> {
        Ok(self
            .events
            .get(&(stream.to_owned(), index))
            .map(|(_, e)| e.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::record::{Origin, Record, Version};

    fn put(seq: u64, key: &str) -> LogEntry {
        LogEntry {
            seq,
            change: Change::Record(Record {
                namespace: "n".into(),
                key: key.into(),
                version: Version {
                    hlc: Hlc(seq),
                    origin: Origin::new("r", "a"),
                },
                value: Some(vec![1]),
                expires_at_millis: None,
            }),
        }
    }

    #[test]
    fn a_batch_delivered_again_after_a_restart_is_applied_once() {
        let mut index = Index::default();
        assert!(index.deliver(put(1, "a"), false).is_empty());
        // The delivery broke mid-batch and starts again after the last applied sequence.
        index.restart();
        assert!(index.deliver(put(1, "a"), false).is_empty());
        let applied = index.deliver(put(2, "b"), true);
        assert_eq!(
            applied.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(index.applied(), 2);
    }
}
