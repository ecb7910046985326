//! The step-by-step checker on crafted logs: it must report a broken invariant at the entry
//! that breaks it, and accept the same history without that entry. (The simulated histories
//! of `tests/sim.rs` run it on every batch as the log takes it.)

use haven_cluster::{OWNERS_NS, Owner};
use haven_sim::check::{Checker, FINAL, Violation};
use haven_state::{Change, Hlc, LogEntry, Origin, Record, StreamEvent, Version};

const SESSION: &str = "sess";
const STREAM: &str = "st1";

/// Builds a log one batch at a time, numbering entries as the log does.
#[derive(Default)]
struct Log {
    next: u64,
}

fn version(node: &str) -> Version {
    Version {
        hlc: Hlc::new(1_800_000_000_000, 0),
        origin: Origin::new("sim", node),
    }
}

impl Log {
    fn entry(&mut self, change: Change) -> LogEntry {
        self.next += 1;
        LogEntry {
            seq: self.next,
            change,
        }
    }

    fn record(&mut self, ns: &str, key: &str, value: Option<Vec<u8>>, node: &str) -> LogEntry {
        self.entry(Change::Record(Record {
            namespace: ns.into(),
            key: key.into(),
            version: version(node),
            value,
            expires_at_millis: None,
        }))
    }

    /// The request's ownership record naming `node` at `epoch` (`None`: its deletion).
    fn owner(&mut self, owner: Option<(&str, u64)>) -> LogEntry {
        let key = haven_mcp::stream::owner_key(SESSION, STREAM);
        let value = owner.map(|(node, epoch)| {
            serde_json::to_vec(&Owner {
                epoch,
                ..Owner::new(node, &format!("boot-{node}"))
            })
            .unwrap()
        });
        let node = owner.map_or("n1", |(n, _)| n);
        self.record(OWNERS_NS, &key, value, node)
    }

    /// Event `index` of the request's stream, written by `node`.
    fn event(&mut self, index: u64, last: bool, node: &str) -> LogEntry {
        let flags = if last { FINAL } else { 0 };
        self.entry(Change::Event(StreamEvent {
            stream: haven_mcp::stream::stream_key(SESSION, STREAM),
            index,
            version: version(node),
            data: vec![flags, b'{', b'}'],
        }))
    }
}

/// Feeds `batches` in order; the first violation, with the number of batches accepted before.
fn judge(batches: &[Vec<LogEntry>]) -> Result<Checker, (usize, Violation)> {
    let mut checker = Checker::new();
    for (i, b) in batches.iter().enumerate() {
        checker.batch(b).map_err(|v| (i, v))?;
    }
    Ok(checker)
}

/// A request opened on n1 (epoch 1) with its first event, then taken over by n2 (epoch 2)
/// with its next event.
fn opened_and_taken_over(log: &mut Log) -> Vec<Vec<LogEntry>> {
    vec![
        vec![log.owner(Some(("n1", 1))), log.event(1, false, "n1")],
        vec![log.owner(Some(("n2", 2))), log.event(2, false, "n2")],
    ]
}

#[test]
fn a_clean_history_is_accepted() {
    let mut log = Log::default();
    let mut batches = opened_and_taken_over(&mut log);
    batches.push(vec![log.owner(None), log.event(3, true, "n2")]);
    let checker = judge(&batches).unwrap_or_else(|(_, v)| panic!("{v}"));
    assert_eq!(checker.last_seq(), 6);
    assert_eq!(checker.takeovers(), 1);
}

#[test]
fn a_write_under_the_old_epoch_after_a_takeover_fails_at_its_sequence() {
    let mut log = Log::default();
    let mut batches = opened_and_taken_over(&mut log);
    // The old owner wakes up and writes as if it still held epoch 1 (seq 5 and 6).
    batches.push(vec![log.owner(Some(("n1", 1))), log.event(3, false, "n1")]);
    batches.push(vec![log.owner(None), log.event(4, true, "n2")]);
    let (accepted, v) = judge(&batches).err().expect("the stale write is caught");
    assert_eq!(accepted, 2, "{v}");
    assert_eq!(v.seq, 5, "{v}");
    assert!(v.what.contains("went back from epoch 2 to 1"), "{v}");
    assert!(v.entry.starts_with("5 owners/s/sess/st1 from n1"), "{v}");
    assert!(v.to_string().starts_with("seq 5: "), "{v}");
}

#[test]
fn an_unfenced_event_fails_at_its_sequence() {
    let mut log = Log::default();
    let mut batches = opened_and_taken_over(&mut log);
    // An event of the execution without its ownership record (seq 5).
    batches.push(vec![log.event(3, false, "n1")]);
    let (accepted, v) = judge(&batches).err().expect("the unfenced write is caught");
    assert_eq!((accepted, v.seq), (2, 5), "{v}");
    assert!(v.what.contains("unfenced"), "{v}");
}

#[test]
fn two_finals_in_one_stream_fail_at_the_second() {
    let mut log = Log::default();
    let batches = vec![
        vec![log.owner(Some(("n1", 1))), log.event(1, true, "n1")],
        vec![log.owner(Some(("n1", 1))), log.event(2, true, "n1")],
    ];
    let (accepted, v) = judge(&batches).err().expect("the second final is caught");
    assert_eq!((accepted, v.seq), (1, 4), "{v}");
    assert!(
        v.what
            .contains("a second final answer at 2 (the first at 1)"),
        "{v}"
    );
}

#[test]
fn an_event_after_the_final_or_a_gap_fails_at_its_sequence() {
    let mut log = Log::default();
    let after_final = vec![
        vec![log.owner(Some(("n1", 1))), log.event(1, true, "n1")],
        vec![log.owner(Some(("n1", 1))), log.event(2, false, "n1")],
    ];
    let (_, v) = judge(&after_final).err().expect("caught");
    assert_eq!(v.seq, 4, "{v}");
    assert!(v.what.contains("after the final answer"), "{v}");

    let mut log = Log::default();
    let gap = vec![vec![log.owner(Some(("n1", 1))), log.event(2, false, "n1")]];
    let (_, v) = judge(&gap).err().expect("caught");
    assert_eq!(v.seq, 2, "{v}");
    assert!(v.what.contains("dense"), "{v}");
}

#[test]
fn takeovers_go_up_by_one_epoch_with_one_owner_each() {
    // Two processes at one epoch.
    let mut log = Log::default();
    let mut batches = opened_and_taken_over(&mut log);
    batches.push(vec![log.owner(Some(("n3", 2)))]);
    let (_, v) = judge(&batches).err().expect("caught");
    assert_eq!(v.seq, 5, "{v}");
    assert!(v.what.contains("two owners at epoch 2"), "{v}");

    // An epoch skipped.
    let mut log = Log::default();
    let mut batches = opened_and_taken_over(&mut log);
    batches.push(vec![log.owner(Some(("n3", 4)))]);
    let (_, v) = judge(&batches).err().expect("caught");
    assert_eq!(v.seq, 5, "{v}");
    assert!(v.what.contains("jumped from epoch 2 to 4"), "{v}");

    // A first owner that is not at epoch 1.
    let mut log = Log::default();
    let (_, v) = judge(&[vec![log.owner(Some(("n1", 2)))]])
        .err()
        .expect("caught");
    assert_eq!(v.seq, 1, "{v}");

    // A write after the execution ended.
    let mut log = Log::default();
    let mut batches = opened_and_taken_over(&mut log);
    batches.push(vec![log.owner(None), log.event(3, true, "n2")]);
    batches.push(vec![log.owner(Some(("n2", 2)))]);
    let (_, v) = judge(&batches).err().expect("caught");
    assert_eq!(v.seq, 7, "{v}");
    assert!(v.what.contains("after it ended"), "{v}");
}

#[test]
fn a_task_finished_twice_fails_at_the_second_end() {
    let mut log = Log::default();
    let status = |s: &str| Some(format!(r#"{{"status":"{s}"}}"#).into_bytes());
    let batches = vec![
        vec![log.record("tasks", "t1", status("working"), "n1")],
        vec![log.record("tasks", "t1", status("completed"), "n1")],
        vec![log.record("tasks", "t1", status("cancelled"), "n2")],
    ];
    let (accepted, v) = judge(&batches).err().expect("caught");
    assert_eq!((accepted, v.seq), (2, 3), "{v}");
    assert!(v.what.contains("after it ended completed at seq 2"), "{v}");
}

#[test]
fn a_log_that_skips_a_sequence_is_refused() {
    let mut log = Log::default();
    let first = log.owner(Some(("n1", 1)));
    log.next += 1;
    let third = log.event(1, false, "n1");
    let (_, v) = judge(&[vec![first], vec![third]]).err().expect("caught");
    assert_eq!(v.seq, 3, "{v}");
}
