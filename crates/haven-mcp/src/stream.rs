//! Resumable SSE streams of the legacy era: every event is appended to the store before it is
//! sent, so a client can resume with `Last-Event-ID` on any node, after any crash. A stream whose
//! request is still running has an in-flight record (what the request is) and an ownership
//! record (`haven_cluster::ownership`, key [`owner_key`]: who runs it, at which epoch); every
//! write to the stream is fenced by the latter.

use haven_state::{Batch, Expect, Hlc, Store, StoreError};
use serde::{Deserialize, Serialize};

/// Namespace of in-flight request records.
pub const INFLIGHT_NS: &str = "inflight";

/// Namespace of reader records: a client that resumed a request's stream (on any node) keeps
/// one alive while it reads, so that the node running the request knows its answer is still
/// awaited (`limits.abandoned_call_ms`).
pub const READERS_NS: &str = "readers";

/// Gives a stream's in-flight record `ttl_millis` to live from now (a standalone GET stream's:
/// the session's lifetime while a client reads it, a short window once the client left). A
/// record that is gone or changed meanwhile is left as it is.
pub async fn set_inflight_ttl(
    store: &dyn Store,
    session: &str,
    stream: &str,
    ttl_millis: u64,
) -> Result<(), StoreError> {
    let key = inflight_key(session, stream);
    let Some(r) = store.get(INFLIGHT_NS, &key).await? else {
        return Ok(());
    };
    let mut batch = Batch::new().put_if(
        INFLIGHT_NS,
        &key,
        r.value().to_vec(),
        Expect::Revision(r.revision),
    );
    if let haven_state::Op::Put { ttl_millis: t, .. } = &mut batch.ops[0] {
        *t = Some(ttl_millis);
    }
    match store.commit(batch).await {
        Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Notes that a client reads the stream now, for `ttl_millis`.
pub async fn note_reader(
    store: &dyn Store,
    session: &str,
    stream: &str,
    node: &str,
    ttl_millis: u64,
) -> Result<(), StoreError> {
    let batch = Batch::new().put_ttl(
        READERS_NS,
        &owner_key(session, stream),
        node.as_bytes().to_vec(),
        ttl_millis,
    );
    store.commit(batch).await.map(|_| ())
}

/// Whether a client read the stream within the reader records' time-to-live.
pub async fn has_reader(
    store: &dyn Store,
    session: &str,
    stream: &str,
) -> Result<bool, StoreError> {
    Ok(store
        .get(READERS_NS, &owner_key(session, stream))
        .await?
        .is_some())
}

/// Flag bit of a stored event: the stream ends after it.
const FINAL: u8 = 1;
/// Flag byte bit: written by an execution that another region may take over (see
/// `haven_cluster::Execution::claimable`); such a final event is shown only once a majority of
/// regions holds it.
const CLAIMABLE: u8 = 2;

/// Store stream name of an SSE stream of a session.
pub fn stream_key(session: &str, stream: &str) -> String {
    format!("sse/{session}/{stream}")
}

/// Key of the ownership record of a request's stream.
pub fn owner_key(session: &str, stream: &str) -> String {
    format!("s/{session}/{stream}")
}

/// The session and stream of an ownership key made by [`owner_key`].
pub fn parse_owner_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix("s/")?.split_once('/')
}

/// Key of the in-flight record of a stream.
pub fn inflight_key(session: &str, stream: &str) -> String {
    format!("{session}/{stream}")
}

/// A new random stream id (lowercase hex, so event ids stay visible ASCII).
pub fn new_stream_id() -> String {
    format!("{:016x}", haven_state::ids::random_u64())
}

/// The SSE event id of event `index` of `stream`, written at `hlc` (its version's timestamp).
/// Index 0 is the priming event, which has no timestamp; an event whose timestamp is not
/// known to the sender (its write's answer was lost) is named by its index alone.
///
/// The timestamp tells the events of one history from those of another: after a restore to
/// an earlier point, or a takeover by a region that had not received every event, the stream
/// goes on at indices a client may already have seen, with other events.
pub fn event_id(stream: &str, index: u64, hlc: Option<Hlc>) -> String {
    match hlc {
        Some(h) if index > 0 => format!("{stream}-{index}.{:x}", h.0),
        _ => format!("{stream}-{index}"),
    }
}

/// An SSE event id, parsed: see [`event_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventId<'a> {
    /// The stream id.
    pub stream: &'a str,
    /// The event's index (0: the priming event).
    pub index: u64,
    /// The timestamp of the write that appended the event, when the id names it.
    pub hlc: Option<Hlc>,
}

/// Parses an SSE event id made by [`event_id`].
pub fn parse_event_id(id: &str) -> Option<EventId<'_>> {
    let (stream, position) = id.rsplit_once('-')?;
    if stream.is_empty() || !stream.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let (index, hlc) = match position.split_once('.') {
        Some((index, hlc)) => {
            if hlc.is_empty() || !hlc.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            (index, Some(Hlc(u64::from_str_radix(hlc, 16).ok()?)))
        }
        None => (position, None),
    };
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(EventId {
        stream,
        index: index.parse().ok()?,
        hlc,
    })
}

/// Who runs an in-flight request, and what it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InflightRecord {
    /// Session of the request.
    pub session: String,
    /// Stream the request's events go to.
    pub stream: String,
    /// JSON-RPC id of the request.
    pub request_id: serde_json::Value,
    /// Method of the request.
    pub method: String,
    /// The full request parameters, so that another node can run it again when allowed.
    pub params: Option<serde_json::Value>,
    /// Node id that runs it.
    pub node: String,
    /// Boot id of the process that runs it: a different boot id means that process is gone.
    pub boot: String,
    /// When it started, Unix milliseconds.
    pub started_millis: u64,
    /// The request's progress token (`_meta.progressToken`), so that a re-run reports
    /// progress the client can match.
    #[serde(default)]
    pub progress_token: Option<serde_json::Value>,
    /// The `traceparent` of the request's server span when it was sampled: a node that
    /// takes the request over links its span to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// One stored event of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Index in the stream (1-based).
    pub index: u64,
    /// The JSON-RPC message.
    pub message: String,
    /// Whether the stream ends after this event.
    pub last: bool,
    /// Whether an execution that another region may take over wrote it.
    pub claimable: bool,
    /// The version of the write that appended it (its origin says which region wrote it).
    pub version: haven_state::Version,
}

fn encode(message: &str, last: bool, claimable: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(message.len() + 1);
    v.push(if last { FINAL } else { 0 } | if claimable { CLAIMABLE } else { 0 });
    v.extend_from_slice(message.as_bytes());
    v
}

/// Adds the operations that append `events` to a batch.
pub fn append_ops(batch: Batch, session: &str, stream: &str, events: &[(String, bool)]) -> Batch {
    claimable_ops(batch, session, stream, events, false)
}

/// Like [`append_ops`]; `claimable`: the events are written by an execution that another
/// region may take over.
fn claimable_ops(
    mut batch: Batch,
    session: &str,
    stream: &str,
    events: &[(String, bool)],
    claimable: bool,
) -> Batch {
    let key = stream_key(session, stream);
    for (message, last) in events {
        batch = batch.append(&key, encode(message, *last, claimable));
    }
    batch
}

/// The batch that opens a stream for a running request: its in-flight record (unless the
/// first events already end it) and the first events.
pub fn open_batch(inflight: &InflightRecord, events: &[(String, bool)]) -> Batch {
    let finished = events.iter().any(|(_, last)| *last);
    let mut batch = Batch::new();
    if !finished {
        batch = batch.put_if(
            INFLIGHT_NS,
            &inflight_key(&inflight.session, &inflight.stream),
            serde_json::to_vec(inflight).expect("in-flight record serializes"),
            Expect::Absent,
        );
    }
    append_ops(batch, &inflight.session, &inflight.stream, events)
}

/// The batch that appends `events` to a stream; when one of them is the last, the in-flight
/// record goes in the same commit.
pub fn append_batch(session: &str, stream: &str, events: &[(String, bool)]) -> Batch {
    execution_batch(session, stream, events, false)
}

/// Like [`append_batch`], for the execution that runs the stream's request; `claimable`:
/// another region may take that execution over.
pub fn execution_batch(
    session: &str,
    stream: &str,
    events: &[(String, bool)],
    claimable: bool,
) -> Batch {
    let mut batch = claimable_ops(Batch::new(), session, stream, events, claimable);
    if events.iter().any(|(_, last)| *last) {
        batch = batch.delete(INFLIGHT_NS, &inflight_key(session, stream));
    }
    batch
}

/// Appends events to a stream nobody owns (the standalone GET stream) durably; returns the
/// index and timestamp of each, in order.
pub async fn append(
    store: &dyn Store,
    session: &str,
    stream: &str,
    events: &[(String, bool)],
) -> Result<Vec<(u64, Hlc)>, StoreError> {
    let commit = store.commit(append_batch(session, stream, events)).await?;
    Ok(appended(&commit))
}

/// Opens a stream nobody owns (the standalone GET stream): its in-flight record.
pub async fn open(
    store: &dyn Store,
    inflight: &InflightRecord,
    events: &[(String, bool)],
) -> Result<(), StoreError> {
    store.commit(open_batch(inflight, events)).await.map(|_| ())
}

/// The index and timestamp of each event a commit appended, in order.
pub fn appended(commit: &haven_state::Commit) -> Vec<(u64, Hlc)> {
    commit
        .outcomes
        .iter()
        .filter_map(|o| match o {
            haven_state::Outcome::Appended { index, hlc, .. } => Some((*index, *hlc)),
            _ => None,
        })
        .collect()
}

/// Stored events of a stream after `after`.
pub async fn read(
    store: &dyn Store,
    session: &str,
    stream: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let events = store
        .read_events(&stream_key(session, stream), after, limit)
        .await?;
    events
        .into_iter()
        .map(|e| {
            let (flags, body) = e
                .data
                .split_first()
                .ok_or_else(|| StoreError::Corrupt(format!("empty event {}", e.index)))?;
            let message = String::from_utf8(body.to_vec())
                .map_err(|_| StoreError::Corrupt(format!("event {} is not UTF-8", e.index)))?;
            Ok(StoredEvent {
                index: e.index,
                message,
                last: flags & FINAL != 0,
                claimable: flags & CLAIMABLE != 0,
                version: e.version,
            })
        })
        .collect()
}

/// The last stored event of a stream (pages through it: for rare paths only).
pub async fn last_event(
    store: &dyn Store,
    session: &str,
    stream: &str,
) -> Result<Option<StoredEvent>, StoreError> {
    const PAGE: usize = 256;
    let mut after = 0;
    let mut last = None;
    loop {
        let mut page = read(store, session, stream, after, PAGE).await?;
        let n = page.len();
        if let Some(e) = page.pop() {
            after = e.index;
            last = Some(e);
        }
        if n < PAGE {
            return Ok(last);
        }
    }
}

/// The in-flight record of a stream, if its request is still running (or was, on a node that
/// died).
pub async fn inflight(
    store: &dyn Store,
    session: &str,
    stream: &str,
) -> Result<Option<InflightRecord>, StoreError> {
    let Some(r) = store
        .get(INFLIGHT_NS, &inflight_key(session, stream))
        .await?
    else {
        return Ok(None);
    };
    serde_json::from_slice(r.value())
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("in-flight record {session}/{stream}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip() {
        let s = new_stream_id();
        let hlc = Hlc::new(1_790_000_000_000, 7);
        for (index, hlc, want) in [
            (42, Some(hlc), Some(hlc)),
            (42, None, None),
            // The priming event has no timestamp.
            (0, Some(hlc), None),
        ] {
            assert_eq!(
                parse_event_id(&event_id(&s, index, hlc)),
                Some(EventId {
                    stream: &s,
                    index,
                    hlc: want
                })
            );
        }
        for bad in [
            "nope", "a/b-1", "-1", "a-", "a-1.", "a-.1f", "a-1.xyz", "a-+1", "a-1.+f",
        ] {
            assert_eq!(parse_event_id(bad), None, "{bad}");
        }
    }
}
