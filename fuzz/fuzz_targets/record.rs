//! Record and log decoding: postcard `Change` and `LogEntry` (what the redb tables, the
//! write-ahead log, backups and the JetStream follower decode), the write-ahead log's segment
//! reader (stops at a torn tail, never panics), the JetStream subject names, and the fold of
//! decoded changes (any order gives the same view).
//!
//! The first byte picks the decoder; the rest is its input.
#![no_main]

use haven_state::nats_store::describe_subject;
use haven_state::{Change, LogEntry, View};
use libfuzzer_sys::fuzz_target;

/// Decodes `bytes` as a `T`; whatever decodes re-encodes to something that decodes equal.
fn round_trip<T>(bytes: &[u8]) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let value: T = postcard::from_bytes(bytes).ok()?;
    let again = postcard::to_stdvec(&value).expect("a decoded value encodes");
    let back: T = postcard::from_bytes(&again).expect("an encoded value decodes");
    assert_eq!(value, back, "postcard round trip changed the value");
    Some(value)
}

/// A write-ahead-log record around `payload`, as the log writes it.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// CRC-32 (IEEE), as the log uses (bitwise: the harness stays independent of the log's code).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn segment(data: &[u8], framed: bool) {
    if !framed {
        // Raw bytes: whatever they hold, reading stops or fails cleanly.
        if let Err(e) = haven_state::fuzzing::wal_segment(data) {
            assert!(!e.is_empty());
        }
        return;
    }
    // Chunks `[n][n bytes]` become well-framed records (right length and checksum), so that
    // the entry decoder behind the checksum is reached; what is left is a torn tail.
    let mut bytes = Vec::new();
    let mut expected: Vec<Option<LogEntry>> = Vec::new();
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n);
        if n == 0 || n > tail.len() {
            break;
        }
        let (payload, tail) = tail.split_at(n);
        bytes.extend_from_slice(&frame(payload));
        expected.push(postcard::from_bytes(payload).ok());
        rest = tail;
    }
    bytes.extend_from_slice(rest);
    match haven_state::fuzzing::wal_segment(&bytes) {
        Ok(entries) => {
            // Every framed record decoded, in order, before whatever the tail held.
            assert!(entries.len() >= expected.len(), "a good record was dropped");
            for (got, want) in entries.iter().zip(&expected) {
                assert_eq!(Some(got), want.as_ref(), "a record decoded differently");
            }
        }
        Err(e) => {
            assert!(!e.is_empty());
            assert!(
                expected.iter().any(Option::is_none) || !rest.is_empty(),
                "an error although every record was good: {e}"
            );
        }
    }
}

fn fold(data: &[u8]) {
    let mut changes = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && changes.len() < 64 {
        match postcard::take_from_bytes::<Change>(rest) {
            Ok((c, tail)) if tail.len() < rest.len() => {
                changes.push(c);
                rest = tail;
            }
            _ => break,
        }
    }
    let mut forward = View::default();
    for c in &changes {
        forward.apply(c);
    }
    let mut backward = View::default();
    for c in changes.iter().rev() {
        backward.apply(c);
        backward.apply(c);
    }
    assert_eq!(
        forward, backward,
        "folding in another order gave another view"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 6 {
        0 => {
            if let Some(change) = round_trip::<Change>(rest) {
                let mut view = View::default();
                view.apply(&change);
                let _ = change.version();
            }
        }
        1 => {
            let _ = round_trip::<LogEntry>(rest);
        }
        2 => segment(rest, true),
        3 => segment(rest, false),
        4 => {
            let text = String::from_utf8_lossy(rest);
            if let Some(d) = describe_subject(&text) {
                assert!(d.starts_with("record ") || d.starts_with("stream "), "{d}");
            }
            // Names this backend writes are always described back as they were.
            let (ns, key) = text.split_once('\n').unwrap_or((&text, ""));
            let subject = format!("hv.r.k._{}._{}", hex(ns), hex(key));
            assert_eq!(
                describe_subject(&subject).as_deref(),
                Some(format!("record {ns}/{key}").as_str())
            );
        }
        _ => fold(rest),
    }
});
