//! The invariants a history must keep, on the change log (what the region stored) and on what
//! the clients saw.
//!
//! [`Checker`] judges the log one atomic batch at a time, in log order: the same code runs
//! while a history runs (fed every batch as the log takes it, so the first broken invariant
//! fails the history at that sequence) and at the end (a fresh checker fed the whole log,
//! which must agree with the one that watched). What can be judged at each step is judged
//! there: fencing (no write of an execution under a lost ownership, nothing after it ended),
//! takeover (epochs start at 1 and go up by exactly one, one owner per epoch), at most one
//! final event per request stream and nothing after it, dense indexes, no task finished twice,
//! and a write acknowledged to a client present in the log when the client sees the answer.
//! What only the end can tell stays at the end ([`check`]): every request stream has its
//! final event, every client got exactly one answer and no event twice, every task ended as
//! its client saw it, and every node converged on the log.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use std::sync::Arc;

use haven_cluster::{OWNERS_NS, Owner};
use haven_state::{Change, LogEntry, MemLog, Store};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

use crate::client::{ClientLog, LEDGER_NS, RequestLog};
use crate::world::{Report, World};

/// Flag byte of a stored stream event that ends its stream (see `haven_mcp::stream`).
pub const FINAL: u8 = 1;

/// The first broken invariant: where in the log, the entry, and what broke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Sequence of the entry that broke it (for a check made between entries, the last
    /// sequence the log held then).
    pub seq: u64,
    /// The entry, briefly (empty for a check made between entries).
    pub entry: String,
    /// What broke.
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {}: {}", self.seq, self.what)?;
        if !self.entry.is_empty() {
            write!(f, "\n  entry: {}", self.entry)?;
        }
        Ok(())
    }
}

/// An entry in one line: sequence, key or stream and index, origin, and what it holds (the
/// owner for an ownership record, whether it ends its stream for an event).
pub fn describe(e: &LogEntry) -> String {
    match &e.change {
        Change::Record(r) => {
            let what = match r.value.as_deref() {
                None => "deleted".to_owned(),
                Some(v) if r.namespace == OWNERS_NS => match Owner::decode(v) {
                    Some(o) => format!("{o:?}"),
                    None => format!("{} bytes", v.len()),
                },
                Some(v) => format!("{} bytes", v.len()),
            };
            format!(
                "{} {}/{} from {} {what}",
                e.seq, r.namespace, r.key, r.version.origin.node
            )
        }
        Change::Event(ev) => format!(
            "{} {}#{} from {} {}",
            e.seq,
            ev.stream,
            ev.index,
            ev.version.origin.node,
            if is_final(&ev.data) { "final" } else { "event" }
        ),
    }
}

fn is_final(data: &[u8]) -> bool {
    data.first().is_some_and(|f| f & FINAL != 0)
}

/// One execution as the log has it so far.
#[derive(Default)]
struct Execution {
    /// Its current owner (the last one written, kept after the record's deletion).
    owner: Option<Owner>,
    /// The record was deleted: the execution is over.
    ended: bool,
    /// The process of each epoch, from 1 on.
    epochs: Vec<(String, String)>,
}

/// One stream as the log has it so far.
#[derive(Default)]
struct StreamState {
    /// Events stored (indexes 1..=events).
    events: u64,
    /// Index of its final event.
    final_at: Option<u64>,
}

/// The invariants of the change log, judged one batch at a time in log order.
pub struct Checker {
    last_seq: u64,
    executions: HashMap<String, Execution>,
    streams: BTreeMap<String, StreamState>,
    /// Streams that belong to a request (an ownership record exists for them).
    owned: HashSet<String>,
    /// Every key: the sequence of its last write and whether that write holds a value.
    records: BTreeMap<(String, String), (u64, bool)>,
    /// Tasks that ended: the sequence and the terminal status.
    tasks_ended: HashMap<String, (u64, String)>,
    digest: DefaultHasher,
}

impl Default for Checker {
    fn default() -> Self {
        Checker::new()
    }
}

impl Checker {
    /// A checker of an empty log.
    pub fn new() -> Checker {
        Checker {
            last_seq: 0,
            executions: HashMap::new(),
            streams: BTreeMap::new(),
            owned: HashSet::new(),
            records: BTreeMap::new(),
            tasks_ended: HashMap::new(),
            digest: DefaultHasher::new(),
        }
    }

    /// The sequence of the last entry judged.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// How many executions were taken over (reached epoch 2 or more).
    pub fn takeovers(&self) -> usize {
        self.executions
            .values()
            .filter(|x| x.epochs.len() > 1)
            .count()
    }

    /// A digest of the log judged so far: keys, streams and values in log order (secret
    /// material, which is random by design, left out). The same seed gives the same digest.
    pub fn digest(&self) -> u64 {
        self.digest.finish()
    }

    /// Judges the next atomic batch of the log (its entries in order, the first one right
    /// after the last judged). After a violation the checker's state is unspecified.
    pub fn batch(&mut self, batch: &[LogEntry]) -> Result<(), Violation> {
        let fail = |e: &LogEntry, what: String| Violation {
            seq: e.seq,
            entry: describe(e),
            what,
        };
        for e in batch {
            if e.seq != self.last_seq + 1 {
                return Err(fail(
                    e,
                    format!(
                        "the log skipped or repeated a sequence: {} follows {}",
                        e.seq, self.last_seq
                    ),
                ));
            }
            self.last_seq = e.seq;
            self.hash(e);
        }
        // Ownership records first: an event is fenced by the record written with it.
        let mut owners_written = HashSet::new();
        for e in batch {
            if let Change::Record(r) = &e.change {
                if r.namespace == OWNERS_NS {
                    owners_written.insert(r.key.as_str());
                    self.owner(&r.key, r.value.as_deref())
                        .map_err(|what| fail(e, what))?;
                }
                self.records.insert(
                    (r.namespace.clone(), r.key.clone()),
                    (e.seq, r.value.is_some()),
                );
                if r.namespace == "tasks" {
                    self.task(e.seq, &r.key, r.value.as_deref())
                        .map_err(|what| fail(e, what))?;
                }
            }
        }
        for e in batch {
            let Change::Event(ev) = &e.change else {
                continue;
            };
            if ev.stream.starts_with("sse/") {
                self.event(&ev.stream, ev.index, is_final(&ev.data), &owners_written)
                    .map_err(|what| fail(e, what))?;
            } else {
                // Other streams are only counted, for convergence.
                let s = self.streams.entry(ev.stream.clone()).or_default();
                s.events = s.events.max(ev.index);
            }
        }
        Ok(())
    }

    fn hash(&mut self, e: &LogEntry) {
        let h = &mut self.digest;
        e.seq.hash(h);
        match &e.change {
            Change::Record(r) => {
                r.namespace.hash(h);
                r.key.hash(h);
                if r.namespace != "secrets" && r.namespace != "keys" {
                    r.value.hash(h);
                }
            }
            Change::Event(ev) => {
                ev.stream.hash(h);
                ev.index.hash(h);
                ev.data.hash(h);
            }
        }
    }

    /// A write of an ownership record: nothing after the execution ended or finished; the
    /// first owner at epoch 1; a change of epoch only up by one (a takeover replaces the record
    /// that named the previous owner); one process per epoch.
    fn owner(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        let x = self.executions.entry(key.to_owned()).or_default();
        if x.ended {
            return Err(format!("execution {key} was written after it ended"));
        }
        if let Some((s, st)) = haven_mcp::stream::parse_owner_key(key) {
            self.owned.insert(haven_mcp::stream::stream_key(s, st));
        }
        let Some(owner) = value.and_then(Owner::decode) else {
            // The record's deletion ends the execution.
            x.ended = true;
            return Ok(());
        };
        let who = (owner.node.clone(), owner.boot.clone());
        match &x.owner {
            None if owner.epoch != 1 => {
                return Err(format!(
                    "execution {key} starts at epoch {} (not 1)",
                    owner.epoch
                ));
            }
            None => {}
            Some(prev) => {
                if prev.finished {
                    return Err(format!(
                        "execution {key} was written after it finished ({owner:?})"
                    ));
                }
                if owner.epoch < prev.epoch {
                    return Err(format!(
                        "execution {key} went back from epoch {} to {} (a write under a lost ownership)",
                        prev.epoch, owner.epoch
                    ));
                }
                if owner.epoch > prev.epoch + 1 {
                    return Err(format!(
                        "execution {key} jumped from epoch {} to {} (a takeover goes up by one)",
                        prev.epoch, owner.epoch
                    ));
                }
            }
        }
        match x.epochs.get(owner.epoch as usize - 1) {
            Some(w) if *w != who => {
                return Err(format!(
                    "execution {key} has two owners at epoch {}: {w:?} and {who:?}",
                    owner.epoch
                ));
            }
            Some(_) => {}
            None => x.epochs.push(who),
        }
        x.owner = Some(owner);
        Ok(())
    }

    /// An event of a request stream: fenced by its ownership record while the execution
    /// exists, indexes dense, at most one final event and nothing after it.
    fn event(
        &mut self,
        stream: &str,
        index: u64,
        last: bool,
        owners_written: &HashSet<&str>,
    ) -> Result<(), String> {
        if let Some((session, st)) = stream
            .strip_prefix("sse/")
            .and_then(|rest| rest.split_once('/'))
        {
            let key = haven_mcp::stream::owner_key(session, st);
            if self.executions.contains_key(&key) && !owners_written.contains(key.as_str()) {
                return Err(format!(
                    "an event of {stream} was written without its ownership record (unfenced)"
                ));
            }
        }
        let s = self.streams.entry(stream.to_owned()).or_default();
        if index != s.events + 1 {
            return Err(format!(
                "{stream}: event {} holds index {index} (indexes must be dense)",
                s.events + 1
            ));
        }
        s.events = index;
        match s.final_at {
            Some(first) if last => Err(format!(
                "{stream}: a second final answer at {index} (the first at {first})"
            )),
            Some(first) => Err(format!(
                "{stream}: event {index} after the final answer at {first}"
            )),
            None => {
                if last {
                    s.final_at = Some(index);
                }
                Ok(())
            }
        }
    }

    /// A write of a task's record: none after its first terminal one.
    fn task(&mut self, seq: u64, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        let status = value
            .and_then(|v| serde_json::from_slice::<Value>(v).ok())
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default();
        if let Some((at, first)) = self.tasks_ended.get(key) {
            return Err(format!(
                "task {key}: written again ({status}) after it ended {first} at seq {at}"
            ));
        }
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            self.tasks_ended.insert(key.to_owned(), (seq, status));
        }
        Ok(())
    }

    /// Whether the log holds a value for `namespace`/`key` now.
    pub fn holds(&self, namespace: &str, key: &str) -> bool {
        self.records
            .get(&(namespace.to_owned(), key.to_owned()))
            .is_some_and(|(_, present)| *present)
    }

    /// Judges a request's answer against the log as it is now: a write acknowledged to the
    /// client (a successful answer, or "interrupted after changing state") is present, and
    /// one denied ("interrupted before changing anything") is absent. Writes of the
    /// simulated tools are never removed, so this holds from the moment the client sees the
    /// answer to the end of the history.
    pub(crate) fn answer(&self, r: &RequestLog) -> Result<(), String> {
        let Some(fin) = r.finals.first() else {
            return Ok(());
        };
        let who = format!("client {} request {} ({})", r.client, r.id, r.tool);
        let (ns, key) = match r.tool.as_str() {
            "notes_put" => ("notes", r.arguments["name"].as_str().unwrap_or_default()),
            "ledger_append" => (LEDGER_NS, r.arguments["entry"].as_str().unwrap_or_default()),
            _ => return Ok(()),
        };
        let stored = self.holds(ns, key);
        let ok = fin.get("result").is_some_and(|res| res["isError"] != true);
        let changed = fin
            .pointer("/error/data/changedState")
            .and_then(Value::as_bool);
        if ok && !stored {
            return Err(format!(
                "{who}: acknowledged, but {ns}/{key} is not in the store"
            ));
        }
        if changed == Some(false) && stored {
            return Err(format!(
                "{who}: answered as interrupted before changing anything, but {ns}/{key} was written"
            ));
        }
        if changed == Some(true) && !stored {
            return Err(format!(
                "{who}: answered as interrupted after changing state, but {ns}/{key} is absent"
            ));
        }
        Ok(())
    }

    /// The process that owned `key` at `epoch`, as the log has it.
    pub fn owner_at(&self, key: &str, epoch: u64) -> Option<&(String, String)> {
        let x = self.executions.get(key)?;
        x.epochs.get((epoch as usize).checked_sub(1)?)
    }

    /// Executions whose ownership record is live (written and not deleted).
    pub fn live_executions(&self) -> impl Iterator<Item = &str> {
        self.executions
            .iter()
            .filter(|(_, x)| !x.ended && x.owner.is_some())
            .map(|(k, _)| k.as_str())
    }

    /// The end of the history: every request stream has its final answer.
    fn finals(&self) -> Result<(), String> {
        for (stream, s) in &self.streams {
            // A standalone stream has no final answer; a request's stream must have one.
            if s.final_at.is_none() && self.owned.contains(stream) {
                return Err(format!("{stream}: no final answer was stored"));
            }
        }
        Ok(())
    }
}

/// Checks the whole history at its end; the report on success, the first broken invariant
/// otherwise. `online` is the checker that watched the log while the history ran.
pub(crate) async fn check(
    world: &World,
    online: &Watch,
    logs: &[ClientLog],
) -> Result<Report, String> {
    let batches = world.log.batches();
    if let Some(path) = std::env::var_os("HAVEN_SIM_DUMP") {
        // The history as text, to compare two runs of a seed.
        let text: String = batches
            .iter()
            .flatten()
            .map(|e| describe(e) + "\n")
            .collect();
        let _ = std::fs::write(path, text);
    }
    // The same checks again over the whole log: one implementation, and a proof that the
    // checker that watched saw every batch.
    let mut whole = Checker::new();
    for b in &batches {
        whole.batch(b).map_err(|v| v.to_string())?;
    }
    let (seen, seen_digest) = online.seen();
    if (whole.last_seq(), whole.digest()) != (seen, seen_digest) {
        return Err(format!(
            "the checker that watched the history saw {seen} entries (digest {seen_digest:x}), the log holds {} (digest {:x})",
            whole.last_seq(),
            whole.digest()
        ));
    }
    whole.finals()?;
    clients(logs)?;
    stored_as_sent(&batches, logs)?;
    for r in logs.iter().flat_map(|l| &l.requests) {
        whole.answer(r)?;
    }
    tasks(&whole, logs)?;
    convergence(world, &whole).await?;
    let requests: usize = logs.iter().map(|l| l.requests.len()).sum();
    let answered = logs
        .iter()
        .flat_map(|l| &l.requests)
        .filter(|r| r.finals.len() == 1)
        .count();
    Ok(Report {
        requests,
        answered,
        tasks: logs.iter().map(|l| l.tasks.len()).sum(),
        takeovers: whole.takeovers(),
        log_entries: whole.last_seq(),
        digest: whole.digest(),
        ..Report::default()
    })
}

/// Every event a client received is what the store holds at that index of the stream: a
/// node sends an event only once it is stored, and nothing replaces it.
fn stored_as_sent(batches: &[Vec<LogEntry>], logs: &[ClientLog]) -> Result<(), String> {
    let mut stored: HashMap<(&str, u64), &[u8]> = HashMap::new();
    for e in batches.iter().flatten() {
        if let Change::Event(ev) = &e.change {
            stored.insert((ev.stream.as_str(), ev.index), &ev.data);
        }
    }
    for r in logs.iter().flat_map(|l| &l.requests) {
        let Some(stream) = &r.stream else { continue };
        let key = haven_mcp::stream::stream_key(&r.session, stream);
        for (index, message) in &r.received {
            let held = stored
                .get(&(key.as_str(), *index))
                .and_then(|d| d.split_first())
                .map(|(_, body)| String::from_utf8_lossy(body));
            if held.as_deref() != Some(message.as_str()) {
                return Err(format!(
                    "client {} request {} ({}): event {index} of stream {stream} was received as {message} but the store holds {held:?}",
                    r.client, r.id, r.tool
                ));
            }
        }
    }
    Ok(())
}

/// What clients saw: every request answered exactly once, no event delivered twice.
fn clients(logs: &[ClientLog]) -> Result<(), String> {
    for r in logs.iter().flat_map(|l| &l.requests) {
        let who = format!("client {} request {} ({})", r.client, r.id, r.tool);
        if r.unanswered {
            return Err(format!(
                "{who}: no final answer after the faults ended (stream {:?}, events {:?})",
                r.stream, r.indexes
            ));
        }
        if r.finals.len() != 1 {
            return Err(format!(
                "{who}: {} final answers: {:?}",
                r.finals.len(),
                r.finals
            ));
        }
        let mut seen = HashSet::new();
        for i in &r.indexes {
            if !seen.insert(*i) {
                return Err(format!(
                    "{who}: event {i} delivered twice ({:?})",
                    r.indexes
                ));
            }
        }
    }
    Ok(())
}

/// Tasks as their clients saw them: each ended once, with no terminal status followed by
/// another, as the store holds it.
fn tasks(log: &Checker, logs: &[ClientLog]) -> Result<(), String> {
    for t in logs.iter().flat_map(|l| &l.tasks) {
        let who = format!("client {} task {}", t.client, t.task);
        let terminal: Vec<&String> = t
            .statuses
            .iter()
            .filter(|s| matches!(s.as_str(), "completed" | "failed" | "cancelled"))
            .collect();
        match terminal.as_slice() {
            [last] if t.statuses.last() == Some(*last) => {}
            [] => {
                return Err(format!(
                    "{who}: never ended after the faults ended (statuses {:?})",
                    t.statuses
                ));
            }
            _ => return Err(format!("{who}: ended more than once: {:?}", t.statuses)),
        }
        match log.tasks_ended.get(&t.task) {
            Some((_, s)) if s == terminal[0] => {}
            other => {
                return Err(format!(
                    "{who}: the client saw {} but the store holds {other:?}",
                    terminal[0]
                ));
            }
        }
    }
    Ok(())
}

/// Every running node's view holds every key and stream as the log says.
async fn convergence(world: &World, log: &Checker) -> Result<(), String> {
    let stores: Vec<(String, std::sync::Arc<dyn Store>)> = world
        .nodes
        .lock()
        .iter()
        .filter_map(|n| {
            n.running
                .as_ref()
                .map(|r| (n.name.clone(), r.store.clone() as std::sync::Arc<dyn Store>))
        })
        .collect();
    for (name, store) in &stores {
        for ((ns, key), (seq, _)) in &log.records {
            let got = store
                .get_raw(ns, key)
                .await
                .map_err(|e| format!("node {name}: reading {ns}/{key}: {e}"))?;
            if got.as_ref().map(|r| r.revision) != Some(*seq) {
                return Err(format!(
                    "node {name} does not converge on {ns}/{key}: revision {:?}, the log says {seq}",
                    got.map(|r| r.revision)
                ));
            }
        }
        for (stream, s) in &log.streams {
            let got = store
                .read_events(stream, 0, usize::MAX)
                .await
                .map_err(|e| format!("node {name}: reading {stream}: {e}"))?;
            if got.len() as u64 != s.events {
                return Err(format!(
                    "node {name} holds {} events of {stream}, the log {}",
                    got.len(),
                    s.events
                ));
            }
        }
    }
    Ok(())
}

/// The checker that watches a history as it runs (every batch as the log takes it), the
/// checks made between steps of the fault schedule, and the first violation either found.
pub(crate) struct Watch {
    checker: Mutex<Checker>,
    failed: watch::Sender<Option<String>>,
}

impl Watch {
    /// Watches `log` (empty) from now on.
    pub fn attach(log: &MemLog) -> Arc<Watch> {
        let w = Arc::new(Watch {
            checker: Mutex::new(Checker::new()),
            failed: watch::channel(None).0,
        });
        let me = w.clone();
        log.observe(move |batch| {
            if me.failed.borrow().is_some() {
                return;
            }
            let result = me.checker.lock().batch(batch);
            if let Err(v) = result {
                me.fail(v);
            }
        });
        w
    }

    /// Keeps `v` if it is the first violation.
    fn fail(&self, v: Violation) {
        self.failed.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            *f = Some(v.to_string());
            true
        });
    }

    /// The first violation found so far.
    pub fn failed(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// A client got the answer of `r`: what it acknowledges must be in the log now.
    pub fn answer(&self, r: &RequestLog) {
        let checker = self.checker.lock();
        if let Err(what) = checker.answer(r) {
            let seq = checker.last_seq();
            drop(checker);
            self.fail(Violation {
                seq,
                entry: String::new(),
                what: format!("when the client got its answer: {what}"),
            });
        }
    }

    /// The last sequence judged and the digest so far.
    fn seen(&self) -> (u64, u64) {
        let c = self.checker.lock();
        (c.last_seq(), c.digest())
    }

    /// Checks what must hold at any moment, between two steps of the fault schedule (`step`
    /// names the fault applied or repaired): the watching checker has judged the whole log;
    /// no running node has applied past the log's end; and every running node's view of a
    /// live execution names the process the log gives that execution at that epoch (no two
    /// ownership records, anywhere, claim one execution at one epoch for two processes).
    pub fn step(&self, world: &World, step: &str) {
        if self.failed().is_some() {
            return;
        }
        let found = self.between_steps(world);
        if let Err((seq, what)) = found {
            self.fail(Violation {
                seq,
                entry: String::new(),
                what: format!("after {step}: {what}"),
            });
        }
    }

    fn between_steps(&self, world: &World) -> Result<(), (u64, String)> {
        let nodes = world.nodes.lock();
        let checker = self.checker.lock();
        let last = world.log.last_seq();
        if checker.last_seq() != last {
            return Err((
                last,
                format!(
                    "the checker judged the log up to {} but it ends at {last}",
                    checker.last_seq()
                ),
            ));
        }
        for node in nodes.iter() {
            let Some(running) = node.running.as_ref() else {
                continue;
            };
            let applied = running.store.applied_seq();
            if applied > last {
                return Err((
                    last,
                    format!(
                        "node {} applied up to {applied}, past the log's end",
                        node.name
                    ),
                ));
            }
            for key in checker.live_executions() {
                let Some(rec) = running.store.local_record(OWNERS_NS, key) else {
                    continue;
                };
                let Some(o) = rec.record.value.as_deref().and_then(Owner::decode) else {
                    continue;
                };
                let logged = checker.owner_at(key, o.epoch);
                if logged != Some(&(o.node.clone(), o.boot.clone())) {
                    return Err((
                        last,
                        format!(
                            "node {} sees execution {key} owned by {} ({}) at epoch {}, the log by {logged:?}",
                            node.name, o.node, o.boot, o.epoch
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
