//! The invariants a history must keep, checked on the change log (what the region stored) and
//! on what the clients saw.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use haven_cluster::{OWNERS_NS, Owner};
use haven_state::{Change, LogEntry, Store};
use serde_json::Value;

use crate::client::{ClientLog, LEDGER_NS};
use crate::world::{Report, World};

/// Flag byte of a stored stream event that ends its stream (see `haven_mcp::stream`).
const FINAL: u8 = 1;

/// Checks every invariant; the report on success, the first broken invariant otherwise.
pub(crate) async fn check(world: &World, logs: &[ClientLog]) -> Result<Report, String> {
    let batches = world.log.batches();
    let entries: Vec<LogEntry> = batches.iter().flatten().cloned().collect();
    if let Some(path) = std::env::var_os("HAVEN_SIM_DUMP") {
        // The history as text, to compare two runs of a seed.
        let text: String = entries
            .iter()
            .map(|e| match &e.change {
                Change::Record(r) => format!(
                    "{} {}/{} {:?} {}\n",
                    e.seq,
                    r.namespace,
                    r.key,
                    r.version.origin,
                    r.value.as_ref().map_or(0, Vec::len)
                ),
                Change::Event(ev) => format!(
                    "{} {}#{} {:?}\n",
                    e.seq, ev.stream, ev.index, ev.version.origin
                ),
            })
            .collect();
        let _ = std::fs::write(path, text);
    }
    let takeovers = ownership(&batches)?;
    streams(&batches)?;
    clients(logs)?;
    effects(&entries, logs)?;
    tasks(&entries, logs)?;
    convergence(world, &entries).await?;
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
        takeovers,
        log_entries: entries.len() as u64,
        digest: digest(&entries),
        ..Report::default()
    })
}

/// Owners: along the log, each execution's epochs never go back; each epoch has one owner;
/// nothing is written after the execution finished; every write of a request's stream goes
/// with a write of its ownership record (it was fenced). Returns how many executions were
/// taken over.
fn ownership(batches: &[Vec<LogEntry>]) -> Result<usize, String> {
    let mut current: HashMap<String, Owner> = HashMap::new();
    let mut epoch_owner: HashMap<(String, u64), (String, String)> = HashMap::new();
    let mut taken_over = HashSet::new();
    let mut ended: HashSet<String> = HashSet::new();
    for batch in batches {
        let mut owners_written = HashSet::new();
        for e in batch {
            let Change::Record(r) = &e.change else {
                continue;
            };
            if r.namespace != OWNERS_NS {
                continue;
            }
            owners_written.insert(r.key.clone());
            if ended.contains(&r.key) {
                return Err(format!(
                    "seq {}: execution {} was written after it ended",
                    e.seq, r.key
                ));
            }
            let Some(owner) = r.value.as_deref().and_then(Owner::decode) else {
                // The record's deletion ends the execution.
                ended.insert(r.key.clone());
                continue;
            };
            if let Some(prev) = current.get(&r.key) {
                if owner.epoch < prev.epoch {
                    return Err(format!(
                        "seq {}: execution {} went back from epoch {} to {}",
                        e.seq, r.key, prev.epoch, owner.epoch
                    ));
                }
                if prev.finished {
                    return Err(format!(
                        "seq {}: execution {} was written after it finished ({owner:?})",
                        e.seq, r.key
                    ));
                }
            }
            let who = (owner.node.clone(), owner.boot.clone());
            match epoch_owner.get(&(r.key.clone(), owner.epoch)) {
                Some(w) if *w != who => {
                    return Err(format!(
                        "seq {}: execution {} has two owners at epoch {}: {w:?} and {who:?}",
                        e.seq, r.key, owner.epoch
                    ));
                }
                _ => {
                    epoch_owner.insert((r.key.clone(), owner.epoch), who);
                }
            }
            if owner.epoch > 1 {
                taken_over.insert(r.key.clone());
            }
            current.insert(r.key.clone(), owner);
        }
        for e in batch {
            let Change::Event(ev) = &e.change else {
                continue;
            };
            let Some(rest) = ev.stream.strip_prefix("sse/") else {
                continue;
            };
            let Some((session, stream)) = rest.split_once('/') else {
                continue;
            };
            let key = haven_mcp::stream::owner_key(session, stream);
            if current.contains_key(&key) && !owners_written.contains(&key) {
                return Err(format!(
                    "seq {}: an event of {} was written without its ownership record (unfenced)",
                    e.seq, ev.stream
                ));
            }
        }
    }
    Ok(taken_over.len())
}

/// Streams of requests: exactly one final event, nothing after it, indexes dense.
fn streams(batches: &[Vec<LogEntry>]) -> Result<(), String> {
    let mut events: BTreeMap<String, Vec<(u64, bool)>> = BTreeMap::new();
    let mut owned: HashSet<String> = HashSet::new();
    for e in batches.iter().flatten() {
        match &e.change {
            Change::Event(ev) if ev.stream.starts_with("sse/") => {
                let last = ev.data.first().is_some_and(|f| f & FINAL != 0);
                events
                    .entry(ev.stream.clone())
                    .or_default()
                    .push((ev.index, last));
            }
            Change::Record(r) if r.namespace == OWNERS_NS => {
                if let Some((s, st)) = haven_mcp::stream::parse_owner_key(&r.key) {
                    owned.insert(haven_mcp::stream::stream_key(s, st));
                }
            }
            _ => {}
        }
    }
    for (stream, evs) in &events {
        for (i, (index, _)) in evs.iter().enumerate() {
            if *index != i as u64 + 1 {
                return Err(format!(
                    "{stream}: event {} holds index {index} (indexes must be dense)",
                    i + 1
                ));
            }
        }
        let finals: Vec<u64> = evs.iter().filter(|(_, l)| *l).map(|(i, _)| *i).collect();
        match finals.as_slice() {
            [only] if *only == evs.len() as u64 => {}
            // A standalone stream has no final answer; a request's stream must have one.
            [] if !owned.contains(stream) => {}
            [] => return Err(format!("{stream}: no final answer was stored")),
            [only] => {
                return Err(format!(
                    "{stream}: events after the final answer (final at {only} of {})",
                    evs.len()
                ));
            }
            many => {
                return Err(format!(
                    "{stream}: {} final answers at {many:?}",
                    many.len()
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

/// Writes acknowledged to clients are in the store; an interrupted request's "changed
/// state" is the truth.
fn effects(entries: &[LogEntry], logs: &[ClientLog]) -> Result<(), String> {
    let mut present: HashMap<(String, String), Option<Vec<u8>>> = HashMap::new();
    for e in entries {
        if let Change::Record(r) = &e.change {
            let k = (r.namespace.clone(), r.key.clone());
            // The log is in commit order and local writes of one region win by order here.
            present.insert(k, r.value.clone());
        }
    }
    for r in logs.iter().flat_map(|l| &l.requests) {
        let Some(fin) = r.finals.first() else {
            continue;
        };
        let who = format!("client {} request {} ({})", r.client, r.id, r.tool);
        let (ns, key) = match r.tool.as_str() {
            "notes_put" => ("notes", r.arguments["name"].as_str().unwrap_or_default()),
            "ledger_append" => (LEDGER_NS, r.arguments["entry"].as_str().unwrap_or_default()),
            _ => continue,
        };
        let stored = present
            .get(&(ns.to_owned(), key.to_owned()))
            .is_some_and(|v| v.is_some());
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
    }
    Ok(())
}

/// Tasks: each ends exactly once (no write of its record after its first terminal one), and
/// its client saw it end, with no terminal status followed by another.
fn tasks(entries: &[LogEntry], logs: &[ClientLog]) -> Result<(), String> {
    let mut ended: HashMap<String, (u64, String)> = HashMap::new();
    for e in entries {
        let Change::Record(r) = &e.change else {
            continue;
        };
        if r.namespace != "tasks" {
            continue;
        }
        let status = r
            .value
            .as_deref()
            .and_then(|v| serde_json::from_slice::<Value>(v).ok())
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default();
        if let Some((seq, first)) = ended.get(&r.key) {
            return Err(format!(
                "task {}: written again at seq {} ({status}) after it ended {first} at seq {seq}",
                r.key, e.seq
            ));
        }
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            ended.insert(r.key.clone(), (e.seq, status));
        }
    }
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
        match ended.get(&t.task) {
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
async fn convergence(world: &World, entries: &[LogEntry]) -> Result<(), String> {
    let mut last_record: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut streams: BTreeMap<String, u64> = BTreeMap::new();
    for e in entries {
        match &e.change {
            Change::Record(r) => {
                last_record.insert((r.namespace.clone(), r.key.clone()), e.seq);
            }
            Change::Event(ev) => {
                let n = streams.entry(ev.stream.clone()).or_default();
                *n = (*n).max(ev.index);
            }
        }
    }
    let stores: Vec<(String, std::sync::Arc<dyn Store>)> = world
        .nodes
        .lock()
        .iter()
        .filter_map(|n| {
            n.running
                .as_ref()
                .map(|r| (n.name.clone(), r.store.clone()))
        })
        .collect();
    for (name, store) in &stores {
        for ((ns, key), seq) in &last_record {
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
        for (stream, n) in &streams {
            let got = store
                .read_events(stream, 0, usize::MAX)
                .await
                .map_err(|e| format!("node {name}: reading {stream}: {e}"))?;
            if got.len() as u64 != *n {
                return Err(format!(
                    "node {name} holds {} events of {stream}, the log {n}",
                    got.len()
                ));
            }
        }
    }
    Ok(())
}

/// A digest of the history: keys, streams and values in log order (secret material, which
/// is random by design, left out).
fn digest(entries: &[LogEntry]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for e in entries {
        e.seq.hash(&mut h);
        match &e.change {
            Change::Record(r) => {
                r.namespace.hash(&mut h);
                r.key.hash(&mut h);
                if r.namespace != "secrets" && r.namespace != "keys" {
                    r.value.hash(&mut h);
                }
            }
            Change::Event(ev) => {
                ev.stream.hash(&mut h);
                ev.index.hash(&mut h);
                ev.data.hash(&mut h);
            }
        }
    }
    h.finish()
}
