//! The in-memory fold of a shared change log that every node of a replicated backend keeps:
//! the current record per key, every stream event, and where each key and stream was last
//! written in the log (what conditional writes compare against).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::plan::StateRead;
use crate::record::{Change, LogEntry, LogSubject, StoredRecord, StreamEvent};
use crate::replicated::Removal;
use crate::store::{ScanPage, StoreResult};

/// The folded state of a log, up to the last sequence applied.
#[derive(Default)]
pub(crate) struct Index {
    /// Current (last-writer-wins) record per key, with the sequence of the last log entry on
    /// the key: the revision conditional writes compare against.
    records: BTreeMap<(String, String), StoredRecord>,
    /// Events per (stream, index) with their log sequence.
    events: BTreeMap<(String, u64), (u64, StreamEvent)>,
    /// Per stream: its greatest event index, the sequence of its last log entry, and whether
    /// that entry holds nothing current any more (it stays in the log while it is the
    /// stream's last: appends compare against it; it becomes obsolete with the next one).
    stream_heads: HashMap<String, StreamHead>,
    /// Last applied sequence.
    applied: u64,
    /// Entries of a batch whose last entry has not arrived yet.
    pending: Vec<LogEntry>,
    /// The batch `pending` belongs to (see [`Index::deliver`]).
    pending_batch: u64,
    /// Keys whose winning record is not in the key's last log entry (a merge that lost came
    /// after it): the sequence of the entry that holds the winner.
    winners: HashMap<(String, String), u64>,
    /// Log entries that hold nothing current any more (a superseded version, a forgotten
    /// record or event), as (sequence applied when it stopped being current, its sequence),
    /// in the order they stopped being current: what a log that can remove entries removes
    /// once every reader is past them.
    obsolete: ObsoleteQueue,
    /// Where the next [`Index::forget_old`] step starts.
    record_cursor: Option<(String, String)>,
    event_cursor: Option<(String, u64)>,
    /// Whether the current pass of forgetting finished the records, the events (a finished
    /// part waits for the other, so that a pass ends).
    pass_finished: [bool; 2],
}

/// Longest queue of obsolete entries looked through for entries below the floor behind
/// the first one above it.
const MAX_OBSOLETE_SCAN: usize = 65_536;

/// A log entry that holds nothing current any more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Obsolete {
    /// The sequence applied when it stopped being current.
    pub at: u64,
    /// Its sequence.
    pub seq: u64,
    /// A hash of the key or stream it wrote ([`subject_hash`]): 8 bytes rather than the
    /// names, however long; a removal of several entries of one subject learns the subject
    /// from the log.
    pub subject: u64,
}

/// Obsolete entries in the order they stopped being current, with per subject how many are
/// queued and below which sequence a [`Removal::Below`] already removed them (a queued entry
/// below it is dropped when it is reached, not removed again).
#[derive(Default)]
struct ObsoleteQueue {
    queue: VecDeque<Obsolete>,
    /// Queued entries per subject hash (subjects with none are not kept).
    counts: HashMap<u64, u32>,
    /// Per subject hash with queued entries: the entries below this sequence are gone.
    removed_below: HashMap<u64, u64>,
    /// Every entry below this sequence is gone, on every subject ([`Removal::Prefix`]).
    prefix_below: u64,
    /// The applied sequence when a step last looked for a prefix to remove (it looks
    /// again only after as many more entries as make it worth a look).
    prefix_looked_at: Option<u64>,
}

impl ObsoleteQueue {
    fn push_back(&mut self, o: Obsolete) {
        *self.counts.entry(o.subject).or_default() += 1;
        self.queue.push_back(o);
    }

    fn push_front(&mut self, o: Obsolete) {
        *self.counts.entry(o.subject).or_default() += 1;
        self.queue.push_front(o);
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    /// Queued entries of subject `hash`.
    fn queued(&self, hash: u64) -> u32 {
        self.counts.get(&hash).copied().unwrap_or(0)
    }

    /// Accounts for `o` leaving the queue; false when a removal already took it.
    fn left(&mut self, o: &Obsolete) -> bool {
        let gone = o.seq < self.prefix_below
            || self
                .removed_below
                .get(&o.subject)
                .is_some_and(|&below| o.seq < below);
        match self.counts.get_mut(&o.subject) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.counts.remove(&o.subject);
                self.removed_below.remove(&o.subject);
            }
        }
        !gone
    }

    /// Records that every entry of subject `hash` below `below` is gone.
    fn removed(&mut self, hash: u64, below: u64) {
        if self.counts.contains_key(&hash) {
            let b = self.removed_below.entry(hash).or_default();
            *b = (*b).max(below);
        }
    }
}

/// How many entries that a removal already took one step drops from the queue per entry it
/// takes (a bound on one step's work after a prefix removal).
const GONE_PER_TAKEN: usize = 64;

/// Fewest queued obsolete entries at which a reclamation step looks for a prefix of the log
/// that holds nothing current (a scan of the whole index): a history far behind its
/// trimming, not the few entries of a steady pass.
pub(crate) const PREFIX_MIN_QUEUED: usize = 65_536;

/// Fewest obsolete entries of one subject that are removed by one [`Removal::Below`] (which
/// costs a read of one of them, to learn the subject, and one request) rather than one by
/// one.
const MIN_BELOW: usize = 3;

/// The hash of a key's subject that [`Obsolete`] keeps.
pub(crate) fn key_hash(namespace: &str, key: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    0u8.hash(&mut h);
    namespace.hash(&mut h);
    key.hash(&mut h);
    h.finish()
}

/// The hash of a stream's subject that [`Obsolete`] keeps.
pub(crate) fn stream_hash(stream: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    1u8.hash(&mut h);
    stream.hash(&mut h);
    h.finish()
}

/// The hash of `subject` that [`Obsolete`] keeps.
pub(crate) fn subject_hash(subject: &LogSubject) -> u64 {
    match subject {
        LogSubject::Key(namespace, key) => key_hash(namespace, key),
        LogSubject::Stream(stream) => stream_hash(stream),
    }
}

/// Most events of one stream looked through to find the first one still current (a longer
/// stream's old entries are removed one by one).
const MAX_STREAM_SCAN: usize = 4096;

/// Where a stream stands in the log.
#[derive(Clone, Copy, Debug, Default)]
struct StreamHead {
    /// Its greatest event index.
    index: u64,
    /// The sequence of its last log entry.
    seq: u64,
    /// Whether that entry holds nothing current (a forgotten or lost event).
    seq_obsolete: bool,
}

/// What [`Index::forget_old`] forgets: what reads as absent or is no longer resumable.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForgetRules {
    pub now_millis: u64,
    pub expired_grace_millis: u64,
    pub tombstone_retention_millis: u64,
    pub event_retention_millis: u64,
    pub step: usize,
}

impl ForgetRules {
    /// Whether `record` reads as absent and has for long enough to be forgotten.
    pub(crate) fn dead(&self, record: &crate::record::Record) -> bool {
        let expired = record
            .expires_at_millis
            .is_some_and(|at| at.saturating_add(self.expired_grace_millis) < self.now_millis);
        let old_tombstone = record.is_tombstone()
            && record
                .version
                .hlc
                .millis()
                .saturating_add(self.tombstone_retention_millis)
                < self.now_millis;
        expired || old_tombstone
    }
}

/// What one [`Index::forget_old`] step forgot.
#[derive(Debug, Default)]
pub(crate) struct Forgotten {
    pub records: u64,
    pub events: u64,
    /// Whether the step finished a pass over the whole index.
    pub done: bool,
}

impl Index {
    /// Last applied sequence.
    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// Takes one delivered log entry of batch `batch` (0: an entry of no batch); a batch is
    /// applied only once its last entry (`complete`) arrives, so that readers never see part
    /// of one. A batch whose last entry was removed from the log (it held nothing current) is
    /// applied when an entry of another batch arrives: a batch occupies consecutive
    /// sequences, so nothing of it can come after that. Returns the entries applied now.
    pub(crate) fn deliver(&mut self, entry: LogEntry, complete: bool, batch: u64) -> Vec<LogEntry> {
        if entry.seq <= self.applied {
            return Vec::new();
        }
        let mut ready = Vec::new();
        if !self.pending.is_empty() && (batch == 0 || batch != self.pending_batch) {
            ready = std::mem::take(&mut self.pending);
        }
        if !complete {
            self.pending.push(entry);
            self.pending_batch = batch;
            for e in &ready {
                self.apply(e);
            }
            return ready;
        }
        ready.append(&mut self.pending);
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
                        let previous = cur.revision;
                        if r.supersedes(&cur.record) {
                            cur.record = r.clone();
                            // The previous last entry, and the winner's entry if it was
                            // another, hold nothing current now.
                            retire(&mut self.obsolete, entry.seq, previous, &k);
                            if let Some(w) = self.winners.remove(&k) {
                                retire(&mut self.obsolete, entry.seq, w, &k);
                            }
                        } else {
                            match self.winners.entry(k) {
                                // The previous last entry lost too; the winner stays where
                                // it is.
                                std::collections::hash_map::Entry::Occupied(o) => {
                                    retire(&mut self.obsolete, entry.seq, previous, o.key());
                                }
                                // The winner stays in the previous entry; this entry is the
                                // key's last (what conditional writes compare against) but
                                // lost.
                                std::collections::hash_map::Entry::Vacant(v) => {
                                    v.insert(previous);
                                }
                            }
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
                if replace && let Some((old, _)) = self.events.insert(k, (entry.seq, e.clone())) {
                    self.obsolete.push_back(Obsolete {
                        at: entry.seq,
                        seq: old,
                        subject: stream_hash(&e.stream),
                    });
                }
                let head = self.stream_heads.entry(e.stream.clone()).or_default();
                if head.seq_obsolete {
                    // The stream's previous last entry can go now that it is not the last.
                    self.obsolete.push_back(Obsolete {
                        at: entry.seq,
                        seq: head.seq,
                        subject: stream_hash(&e.stream),
                    });
                }
                head.index = head.index.max(e.index);
                head.seq = entry.seq;
                // An entry that lost to the event in place holds nothing current, but it is
                // the stream's last entry now.
                head.seq_obsolete = !replace;
            }
        }
        self.applied = self.applied.max(entry.seq);
    }

    /// One step of forgetting (see [`ForgetRules`]): records that read as absent long enough
    /// (expired past their grace, old tombstones) and stream events past their retention (a
    /// stream with none left is forgotten), but never what the log's last entry holds. At
    /// most `rules.step` records and as many events are examined; their log entries become
    /// obsolete.
    pub(crate) fn forget_old(&mut self, rules: &ForgetRules) -> Forgotten {
        let at = self.applied;
        let mut out = Forgotten::default();

        let mut doomed = Vec::new();
        let mut next = None;
        if !self.pass_finished[0] {
            let range = match &self.record_cursor {
                Some(k) => self.records.range(k.clone()..),
                None => self.records.range::<(String, String), _>(..),
            };
            for (i, (k, r)) in range.enumerate() {
                if i == rules.step {
                    next = Some(k.clone());
                    break;
                }
                // Not while its entry is the log's last: the log keeps that one, and the
                // key's next conditional write compares against it.
                if rules.dead(&r.record) && r.revision != self.applied {
                    doomed.push(k.clone());
                }
            }
        }
        for k in doomed {
            if let Some(r) = self.records.remove(&k) {
                retire(&mut self.obsolete, at, r.revision, &k);
                out.records += 1;
            }
            if let Some(w) = self.winners.remove(&k) {
                retire(&mut self.obsolete, at, w, &k);
            }
        }
        let records_done = next.is_none();
        self.record_cursor = next;

        let mut doomed = Vec::new();
        let mut next = None;
        if !self.pass_finished[1] {
            let range = match &self.event_cursor {
                Some(k) => self.events.range(k.clone()..),
                None => self.events.range::<(String, u64), _>(..),
            };
            for (i, (k, (seq, e))) in range.enumerate() {
                if i == rules.step {
                    next = Some(k.clone());
                    break;
                }
                let old = e
                    .version
                    .hlc
                    .millis()
                    .saturating_add(rules.event_retention_millis)
                    < rules.now_millis;
                // Not while its entry is the log's last: the log keeps that one.
                if old && *seq != self.applied {
                    doomed.push((k.clone(), *seq));
                }
            }
        }
        let mut streams = Vec::new();
        for (k, seq) in doomed {
            self.events.remove(&k);
            match self.stream_heads.get_mut(&k.0) {
                // The stream's last entry stays while it is the last (see `StreamHead`).
                Some(head) if head.seq == seq => head.seq_obsolete = true,
                _ => self.obsolete.push_back(Obsolete {
                    at,
                    seq,
                    subject: stream_hash(&k.0),
                }),
            }
            out.events += 1;
            if streams.last() != Some(&k.0) {
                streams.push(k.0);
            }
        }
        // A stream with no event left is forgotten: its last entry goes too, and its next
        // append, if any, starts it again.
        // A stream goes on after its greatest event left (as the embedded store, which finds
        // a stream's position in its events).
        for stream in streams {
            let greatest = self
                .events
                .range((stream.clone(), 0)..=(stream.clone(), u64::MAX))
                .next_back()
                .map(|((_, index), _)| *index);
            match greatest {
                Some(index) => {
                    if let Some(head) = self.stream_heads.get_mut(&stream) {
                        head.index = index;
                    }
                }
                None => {
                    if let Some(head) = self.stream_heads.remove(&stream)
                        && head.seq_obsolete
                    {
                        self.obsolete.push_back(Obsolete {
                            at,
                            seq: head.seq,
                            subject: stream_hash(&stream),
                        });
                    }
                }
            }
        }
        let events_done = next.is_none();
        self.event_cursor = next;
        self.pass_finished[0] |= records_done;
        self.pass_finished[1] |= events_done;
        out.done = self.pass_finished.iter().all(|f| *f);
        if out.done {
            self.pass_finished = [false; 2];
        }
        out
    }

    /// Takes from the queue obsolete entries below `floor` (every reader has read them), at
    /// most `limit`, oldest first.
    pub(crate) fn take_obsolete(&mut self, floor: u64, limit: usize) -> Vec<Obsolete> {
        let mut out = Vec::new();
        let q = &mut self.obsolete;
        // Entries a removal already took leave without taking room, up to a bound per step
        // (after a prefix removal, millions may be gone at once).
        let mut gone_budget = limit.saturating_mul(GONE_PER_TAKEN);
        // The queue is in the order entries became obsolete: those that did so below the
        // floor are below it themselves.
        while out.len() < limit && gone_budget > 0 {
            match q.queue.front() {
                Some(o) if o.at < floor => {
                    let o = q.queue.pop_front().expect("a front entry");
                    if q.left(&o) {
                        out.push(o);
                    } else {
                        gone_budget -= 1;
                    }
                }
                _ => break,
            }
        }
        // Behind them, entries that became obsolete later may still be below the floor; the
        // rest of the queue is what the floor's readers have not reached (short, unless a
        // reader stopped), looked through only while it is short.
        if out.len() < limit && q.len() <= MAX_OBSOLETE_SCAN {
            let mut room = limit - out.len();
            let mut behind = Vec::new();
            let removed_below = &q.removed_below;
            let prefix_below = q.prefix_below;
            q.queue.retain(|o| {
                if o.seq >= floor {
                    return true;
                }
                // What a removal already took leaves without taking room.
                let gone = o.seq < prefix_below
                    || removed_below.get(&o.subject).is_some_and(|&b| o.seq < b);
                if gone || room > 0 {
                    room -= usize::from(!gone);
                    behind.push(o.clone());
                    false
                } else {
                    true
                }
            });
            for o in behind {
                if q.left(&o) {
                    out.push(o);
                }
            }
        }
        out
    }

    /// Subjects of `taken` with enough entries to be removed together, each as its hash and
    /// the sequence of one of its entries (reading it tells the subject).
    pub(crate) fn subjects_to_learn(&self, taken: &[Obsolete]) -> Vec<(u64, u64)> {
        let mut by_subject: HashMap<u64, (usize, u64)> = HashMap::new();
        for o in taken {
            let e = by_subject.entry(o.subject).or_insert((0, o.seq));
            e.0 += 1;
        }
        by_subject
            .into_iter()
            .filter(|(h, (n, _))| *n + self.obsolete.queued(*h) as usize >= MIN_BELOW)
            .map(|(h, (_, seq))| (h, seq))
            .collect()
    }

    /// How a log removes `taken` (entries taken from the queue below `floor`): a subject in
    /// `subjects` (by hash, see [`Index::subjects_to_learn`]) with several of them loses
    /// every entry below the first one it still needs in one [`Removal::Below`] (every entry
    /// on it below that point holds nothing current: this index made each obsolete as it
    /// applied the next), the rest go one by one.
    pub(crate) fn removals(
        &self,
        taken: &[Obsolete],
        floor: u64,
        subjects: &HashMap<u64, LogSubject>,
    ) -> Vec<Removal> {
        // Only what this index has applied: later entries on a subject are not known here.
        let floor = floor.min(self.applied.saturating_add(1));
        let mut by_subject: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for o in taken {
            by_subject.entry(o.subject).or_default().push(o.seq);
        }
        let mut out = Vec::new();
        for (hash, seqs) in by_subject {
            let below = subjects.get(&hash).map(|subject| {
                let kept_from = self.first_needed(subject).min(floor);
                (subject, kept_from)
            });
            // Worth one request when it takes several entries: of this step, or queued
            // further on (dropped when reached).
            let worth = |kept_from: u64| {
                let now = seqs.iter().filter(|&&s| s < kept_from).count();
                now > 0 && now + self.obsolete.queued(hash) as usize >= MIN_BELOW
            };
            match below {
                Some((subject, kept_from)) if worth(kept_from) => {
                    out.push(Removal::Below {
                        subject: subject.clone(),
                        below: kept_from,
                    });
                    out.extend(
                        seqs.iter()
                            .filter(|&&s| s >= kept_from)
                            .map(|&s| Removal::Entry(s)),
                    );
                }
                _ => out.extend(seqs.iter().map(|&s| Removal::Entry(s))),
            }
        }
        out
    }

    /// The lowest sequence on `subject` whose entry this index still needs (its current
    /// record or events, the entry that conditional writes compare against); `u64::MAX`
    /// when it needs none, 0 when it cannot tell cheaply.
    fn first_needed(&self, subject: &LogSubject) -> u64 {
        match subject {
            LogSubject::Key(namespace, key) => {
                let k = (namespace.clone(), key.clone());
                let last = self.records.get(&k).map_or(u64::MAX, |r| r.revision);
                let winner = self.winners.get(&k).copied().unwrap_or(u64::MAX);
                last.min(winner)
            }
            LogSubject::Stream(stream) => {
                let mut first = self.stream_heads.get(stream).map_or(u64::MAX, |h| h.seq);
                for (i, (_, (seq, _))) in self
                    .events
                    .range((stream.clone(), 0)..=(stream.clone(), u64::MAX))
                    .enumerate()
                {
                    if i == MAX_STREAM_SCAN {
                        return 0;
                    }
                    first = first.min(*seq);
                }
                first
            }
        }
    }

    /// The lowest sequence whose entry this index still needs: the entry of every current
    /// record (tombstones included), of every merge winner, of every event and of every
    /// stream's last entry; nothing it has not applied. Every entry below it holds nothing
    /// current, so a reader that skips them all misses nothing.
    pub(crate) fn low_water(&self) -> u64 {
        let records = self.records.values().map(|r| r.revision);
        let winners = self.winners.values().copied();
        let events = self.events.values().map(|(seq, _)| *seq);
        let heads = self.stream_heads.values().map(|h| h.seq);
        records
            .chain(winners)
            .chain(events)
            .chain(heads)
            .fold(self.applied.saturating_add(1), u64::min)
    }

    /// Whether the queue's oldest entry is below `floor` (a step left some for the next).
    pub(crate) fn obsolete_waiting(&self, floor: u64) -> bool {
        self.obsolete.queue.front().is_some_and(|o| o.at < floor)
    }

    /// Whether to look for a prefix to remove now: the queue is long, and the log has grown
    /// by as much since the last look (which it records).
    pub(crate) fn prefix_worth_a_look(&mut self) -> bool {
        let q = &mut self.obsolete;
        let due = q.len() >= PREFIX_MIN_QUEUED
            && q.prefix_looked_at
                .is_none_or(|at| self.applied >= at.saturating_add(PREFIX_MIN_QUEUED as u64));
        if due {
            q.prefix_looked_at = Some(self.applied);
        }
        due
    }

    /// Lets the next step look for a prefix again (the last removal of one failed).
    pub(crate) fn forget_prefix_look(&mut self) {
        self.obsolete.prefix_looked_at = None;
    }

    /// Below which sequence a [`Removal::Prefix`] removed every entry.
    pub(crate) fn prefix_below(&self) -> u64 {
        self.obsolete.prefix_below
    }

    /// Records that a [`Removal::Prefix`] removed every entry below `below`: queued ones
    /// are dropped when they are reached.
    pub(crate) fn removed_prefix(&mut self, below: u64) {
        self.obsolete.prefix_below = self.obsolete.prefix_below.max(below);
    }

    /// Records that a [`Removal::Below`] removed every entry of subject `hash` below
    /// `below`: queued ones are dropped when they are reached.
    pub(crate) fn removed_below(&mut self, hash: u64, below: u64) {
        self.obsolete.removed(hash, below);
    }

    /// Puts back obsolete entries that could not be removed (they are tried again first).
    pub(crate) fn requeue_obsolete(&mut self, taken: Vec<Obsolete>) {
        for mut o in taken.into_iter().rev() {
            o.at = o.seq;
            self.obsolete.push_front(o);
        }
    }

    /// Obsolete entries waiting to be removed.
    pub(crate) fn obsolete_len(&self) -> usize {
        self.obsolete.len()
    }

    /// Makes the index agree with the log about where a stream ends, after an append the
    /// log refused although the index had caught up: `last` is the log's last entry on the
    /// stream as (sequence, event index), none when the log removed every entry of it (its
    /// events were all past their retention). Returns whether the index changed.
    pub(crate) fn reconcile_stream(&mut self, stream: &str, last: Option<(u64, u64)>) -> bool {
        let held = self.stream_heads.get(stream).map(|h| h.seq);
        if held == last.map(|(seq, _)| seq) {
            return false;
        }
        match last {
            None => {
                let keys: Vec<(String, u64)> = self
                    .events
                    .range((stream.to_owned(), 0)..=(stream.to_owned(), u64::MAX))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    self.events.remove(&k);
                }
                self.stream_heads.remove(stream);
            }
            Some((seq, index)) => {
                let holds_event = self
                    .events
                    .get(&(stream.to_owned(), index))
                    .is_some_and(|(s, _)| *s == seq);
                let head = self.stream_heads.entry(stream.to_owned()).or_default();
                head.index = head.index.max(index);
                head.seq = seq;
                head.seq_obsolete = !holds_event;
            }
        }
        true
    }

    /// Makes the index agree with the log about a key that reads as absent in both: `last` is
    /// the log's last entry on the key (none: the log removed every entry of it). A
    /// forgotten record, or one whose entries the log removed, must not make conditional
    /// writes compare against a sequence the log no longer has. A key live on either side
    /// is left alone (then the log and the index disagree for another reason: a real
    /// conflict, or an index behind).
    pub(crate) fn reconcile_absent(
        &mut self,
        namespace: &str,
        key: &str,
        last: Option<(u64, crate::record::Record)>,
        now: u64,
    ) -> bool {
        let k = (namespace.to_owned(), key.to_owned());
        if self.records.get(&k).is_some_and(|c| c.record.is_live(now))
            || last.as_ref().is_some_and(|(_, r)| r.is_live(now))
        {
            return false;
        }
        let held = self.records.get(&k).map(|c| c.revision);
        if held == last.as_ref().map(|(seq, _)| *seq) {
            return false;
        }
        self.winners.remove(&k);
        match last {
            None => {
                self.records.remove(&k);
            }
            Some((revision, record)) => {
                self.records.insert(k, StoredRecord { record, revision });
            }
        }
        true
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
        Ok(self
            .stream_heads
            .get(stream)
            .map_or((0, 0), |h| (h.index, h.seq)))
    }

    fn event(&self, stream: &str, index: u64) -> StoreResult<Option<StreamEvent>> {
        Ok(self
            .events
            .get(&(stream.to_owned(), index))
            .map(|(_, e)| e.clone()))
    }
}

/// Queues the entry at `seq` of key `k` as obsolete since `at`.
fn retire(obsolete: &mut ObsoleteQueue, at: u64, seq: u64, k: &(String, String)) {
    obsolete.push_back(Obsolete {
        at,
        seq,
        subject: key_hash(&k.0, &k.1),
    });
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

    fn seqs(taken: Vec<Obsolete>) -> Vec<u64> {
        taken.into_iter().map(|o| o.seq).collect()
    }

    fn older(mut e: LogEntry, hlc: u64) -> LogEntry {
        if let Change::Record(r) = &mut e.change {
            r.version.hlc = Hlc(hlc);
        }
        e
    }

    fn key(k: &str) -> LogSubject {
        LogSubject::Key("n".into(), k.into())
    }

    fn learned(keys: &[&str]) -> HashMap<u64, LogSubject> {
        keys.iter()
            .map(|k| (subject_hash(&key(k)), key(k)))
            .collect()
    }

    #[test]
    fn a_keys_superseded_versions_go_in_one_removal_below_what_it_still_needs() {
        let mut index = Index::default();
        for seq in 1..=5 {
            index.deliver(put(seq, "hot"), true, 0);
        }
        index.deliver(put(6, "cold"), true, 0);
        index.deliver(put(7, "cold"), true, 0);
        let taken = index.take_obsolete(8, 100);
        assert_eq!(seqs(taken.clone()), vec![1, 2, 3, 4, 6]);
        // One entry of `hot` is read to learn its subject; `cold` has one entry to remove.
        let to_learn = index.subjects_to_learn(&taken);
        assert_eq!(to_learn, vec![(subject_hash(&key("hot")), 1)]);
        let mut removals = index.removals(&taken, 8, &learned(&["hot"]));
        removals.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(
            removals,
            vec![
                Removal::Below {
                    subject: key("hot"),
                    below: 5
                },
                Removal::Entry(6),
            ]
        );
        // The floor bounds the removal: entries at or above it stay for their readers.
        let mut index = Index::default();
        for seq in 1..=5 {
            index.deliver(put(seq, "hot"), true, 0);
        }
        let taken = index.take_obsolete(4, 100);
        assert_eq!(
            index.removals(&taken, 4, &learned(&["hot"])),
            vec![Removal::Below {
                subject: key("hot"),
                below: 4
            }]
        );
        assert_eq!(seqs(index.take_obsolete(6, 100)), vec![4]);
    }

    #[test]
    fn a_history_of_sweeps_is_removed_a_key_at_a_time_and_what_a_removal_took_is_skipped() {
        // Three keys written four times over, one after the other: the queue holds each
        // key's versions far apart.
        let mut index = Index::default();
        let mut seq = 0;
        for _ in 0..4 {
            for k in ["a", "b", "c"] {
                seq += 1;
                index.deliver(put(seq, k), true, 0);
            }
        }
        assert_eq!(index.obsolete_len(), 9);
        // A step of two: `a` and `b` have three entries each (two of them queued further
        // on): each is learned and removed below its last entry.
        let taken = index.take_obsolete(u64::MAX, 2);
        assert_eq!(seqs(taken.clone()), vec![1, 2]);
        let mut to_learn: Vec<u64> = index
            .subjects_to_learn(&taken)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        to_learn.sort();
        assert_eq!(to_learn, vec![1, 2]);
        let mut removals = index.removals(&taken, u64::MAX, &learned(&["a", "b"]));
        removals.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(
            removals,
            vec![
                Removal::Below {
                    subject: key("a"),
                    below: 10
                },
                Removal::Below {
                    subject: key("b"),
                    below: 11
                },
            ]
        );
        for r in &removals {
            if let Removal::Below { subject, below } = r {
                index.removed_below(subject_hash(subject), *below);
            }
        }
        // What those removals took is skipped; only `c`'s entries are left to remove.
        let taken = index.take_obsolete(u64::MAX, 100);
        assert_eq!(seqs(taken), vec![3, 6, 9]);
        assert_eq!(index.obsolete_len(), 0);
    }

    #[test]
    fn a_removal_below_never_reaches_the_entry_that_holds_the_winner() {
        let mut index = Index::default();
        index.deliver(put(1, "k"), true, 0);
        index.deliver(put(2, "k"), true, 0);
        // Merges that lost (older versions from another region) come after the winner.
        index.deliver(older(put(3, "k"), 1), true, 0);
        index.deliver(older(put(4, "k"), 1), true, 0);
        index.deliver(older(put(5, "k"), 1), true, 0);
        // 1 was superseded; 3 and 4 lost; 2 holds the winner, 5 is the key's last entry.
        let taken = index.take_obsolete(6, 100);
        assert_eq!(seqs(taken.clone()), vec![1, 3, 4]);
        let mut removals = index.removals(&taken, 6, &learned(&["k"]));
        removals.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(
            removals,
            vec![Removal::Entry(1), Removal::Entry(3), Removal::Entry(4)]
        );
        assert_eq!(index.get("n", "k").unwrap().revision, 5);
    }

    #[test]
    fn a_batch_delivered_again_after_a_restart_is_applied_once() {
        let mut index = Index::default();
        assert!(index.deliver(put(1, "a"), false, 7).is_empty());
        // The delivery broke mid-batch and starts again after the last applied sequence.
        index.restart();
        assert!(index.deliver(put(1, "a"), false, 7).is_empty());
        let applied = index.deliver(put(2, "b"), true, 7);
        assert_eq!(
            applied.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(index.applied(), 2);
    }

    #[test]
    fn a_batch_whose_last_entry_was_removed_is_applied_when_the_next_batch_begins() {
        let mut index = Index::default();
        // Batch 7 was entries 1..=3; entry 3 (its last) was removed from the log.
        assert!(index.deliver(put(1, "a"), false, 7).is_empty());
        assert!(index.deliver(put(2, "b"), false, 7).is_empty());
        let applied = index.deliver(put(4, "c"), false, 9);
        assert_eq!(
            applied.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let applied = index.deliver(put(5, "d"), true, 9);
        assert_eq!(
            applied.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        // An entry of no batch ends a pending one too.
        assert!(index.deliver(put(6, "e"), false, 11).is_empty());
        let applied = index.deliver(put(8, "f"), true, 0);
        assert_eq!(
            applied.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![6, 8]
        );
        assert_eq!(index.applied(), 8);
    }

    #[test]
    fn superseded_and_forgotten_entries_become_obsolete_in_order() {
        let mut index = Index::default();
        index.deliver(put(1, "a"), true, 0);
        index.deliver(put(2, "a"), true, 0);
        index.deliver(put(3, "b"), true, 0);
        index.deliver(put(4, "a"), true, 0);
        assert_eq!(seqs(index.take_obsolete(2, 10)), vec![1]);
        assert_eq!(seqs(index.take_obsolete(5, 10)), vec![2]);
        // A tombstone past its retention is forgotten; its entry becomes obsolete.
        let mut tomb = put(5, "b");
        if let Change::Record(r) = &mut tomb.change {
            r.value = None;
        }
        index.deliver(tomb, true, 0);
        // (A record whose entry is the log's last is not forgotten: the log keeps it.)
        index.deliver(put(6, "c"), true, 0);
        let rules = ForgetRules {
            now_millis: 1000,
            expired_grace_millis: 0,
            tombstone_retention_millis: 100,
            event_retention_millis: 100,
            step: 1,
        };
        let mut passes = 0;
        while !index.forget_old(&rules).done {
            passes += 1;
        }
        assert!(passes >= 1, "a step examines one record at a time");
        assert!(index.get("n", "b").is_none());
        assert!(index.get("n", "a").is_some());
        assert_eq!(seqs(index.take_obsolete(6, 10)), vec![3, 5]);
        // The log removed the key's entries: the index agrees that nothing is there.
        assert!(!index.reconcile_absent("n", "b", None, 1000));
        assert!(
            !index.reconcile_absent("n", "a", None, 1000),
            "a live record stays"
        );
    }
}
