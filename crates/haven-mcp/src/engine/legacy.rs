//! The legacy era over Streamable HTTP: `initialize` and sessions, POST answered with JSON or a
//! resumable SSE stream, the standalone GET stream, resumption with `Last-Event-ID`, DELETE.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use haven_cluster::ownership::{self, End};
use rmcp::model::{InitializeRequestParams, InitializeResult};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::dispatch::{Call, may_stream};
use super::mrtr::{id_json, store_reply};
use super::{
    Inner, LATEST_LEGACY, LEGACY_VERSIONS, LegacyResponses, Reason, Rejection, Reply, SseFrame,
    is_legacy_version,
};
use crate::catalog::Caller;
use crate::context::{ANNOUNCE_NS, Announcement, Era, Item};
use crate::hub::{Topic, Woke};
use crate::jsonrpc::{self, Incoming, IncomingRequest};
use crate::session::{self, LoadedSession, SESSIONS_NS, SessionRecord};
use crate::stream::{self, InflightRecord, StoredEvent};

/// Namespace of cancellation requests (`notifications/cancelled`), read by whichever node runs
/// the request.
pub const CANCELS_NS: &str = "cancels";
/// `method` of the in-flight record of a standalone GET stream.
pub const STANDALONE: &str = "standalone";
/// How often a resumed stream re-reads its events without a change (in case one was missed).
const RECHECK: Duration = Duration::from_secs(2);
/// How often a resumed stream's final answer looks whether a majority of regions holds it.
const CONFIRM_POLL: Duration = Duration::from_millis(50);

/// A legacy-era POST, as the transport read it.
#[derive(Debug)]
pub struct LegacyPost {
    /// `Mcp-Session-Id` header.
    pub session: Option<String>,
    /// `MCP-Protocol-Version` header.
    pub protocol_version: Option<String>,
    /// Whether `Accept` allows `application/json`.
    pub accepts_json: bool,
    /// Whether `Accept` allows `text/event-stream`.
    pub accepts_sse: bool,
    /// The message.
    pub message: Incoming,
    /// Who sent it.
    pub principal: haven_auth::Principal,
    /// Its W3C trace context headers.
    pub trace: super::TraceHeaders,
}

fn session_not_found() -> Reply {
    Rejection::exchange(
        Reason::SessionNotFound,
        -32001,
        "Session not found: it ended or never existed; send initialize to start a new one",
    )
    .into()
}

fn unavailable(e: haven_state::StoreError) -> Reply {
    tracing::warn!(error = %e, "store unavailable");
    Rejection::store(
        None,
        "The server's storage is unavailable; retry shortly",
        &e,
    )
    .into()
}

/// The handler ended without its final response.
fn no_response(call: &Call) -> Reply {
    Rejection::new(
        Reason::NoResponse,
        Some(&call.id),
        jsonrpc::internal("the request ended without a response"),
    )
    .into()
}

/// Checks the session headers of a non-initialize request.
async fn open_session(
    inner: &Inner,
    session: Option<&str>,
    protocol_version: Option<&str>,
    principal: &haven_auth::Principal,
) -> Result<LoadedSession, Reply> {
    let Some(sid) = session else {
        return Err(Rejection::exchange(
            Reason::SessionRequired,
            -32000,
            "Bad Request: the Mcp-Session-Id header is required; send initialize first",
        )
        .into());
    };
    if let Some(v) = protocol_version
        && !is_legacy_version(v)
    {
        return Err(Rejection::exchange(
            Reason::UnsupportedVersion,
            -32000,
            format!(
                "Bad Request: unsupported MCP-Protocol-Version {v}; supported: {}",
                LEGACY_VERSIONS.join(", ")
            ),
        )
        .into());
    }
    match inner.sessions.load(&*inner.store, sid).await {
        // Another principal's session is answered exactly like one that does not exist.
        Ok(Some(s)) if s.record.belongs_to(principal) => Ok(s),
        Ok(None) => {
            let again = super::look_again(inner, "The session", || async {
                inner.sessions.load(&*inner.store, sid).await
            })
            .await;
            match again {
                Ok(Some(s)) if s.record.belongs_to(principal) => Ok(s),
                Ok(_) => Err(session_not_found()),
                Err((message, e)) => Err(Rejection::store(None, message, &e).into()),
            }
        }
        Ok(Some(_)) => Err(session_not_found()),
        Err(e) => Err(unavailable(e)),
    }
}

pub(super) async fn post(inner: &Arc<Inner>, p: LegacyPost) -> Reply {
    if let Incoming::Request(req) = &p.message
        && req.method == "initialize"
    {
        return Box::pin(initialize(inner, req, &p.principal)).await;
    }
    let loaded = match open_session(
        inner,
        p.session.as_deref(),
        p.protocol_version.as_deref(),
        &p.principal,
    )
    .await
    {
        Ok(s) => s,
        Err(r) => return r,
    };
    let sid = loaded.record.id.clone();
    match p.message {
        Incoming::Request(req) => {
            let principal = Arc::new(p.principal);
            Box::pin(request(
                inner,
                loaded,
                req,
                principal,
                p.trace,
                (p.accepts_json, p.accepts_sse),
            ))
            .await
        }
        Incoming::Notification { method, params } => {
            if method == "notifications/cancelled"
                && let Some(id) = params.as_ref().and_then(|p| p.get("requestId"))
            {
                cancel_request(inner, &sid, id).await;
            }
            Reply::Accepted
        }
        Incoming::Response { id, result } => {
            match store_reply(inner, &sid, &id, serde_json::json!({ "result": result })).await {
                Ok(()) => Reply::Accepted,
                Err(e) => unavailable(e),
            }
        }
        Incoming::Error { id, error } => {
            if let Some(id) = id
                && let Err(e) =
                    store_reply(inner, &sid, &id, serde_json::json!({ "error": error })).await
            {
                return unavailable(e);
            }
            Reply::Accepted
        }
    }
}

async fn cancel_request(inner: &Arc<Inner>, session: &str, id: &Value) {
    let key = match id {
        Value::String(s) => format!("{session}/{s}"),
        Value::Number(n) => format!("{session}/{n}"),
        _ => return,
    };
    if let Some(token) = inner.running.lock().get(&key) {
        token.cancel();
    }
    let r = inner
        .store
        .commit(haven_state::Batch::new().put_ttl(CANCELS_NS, &key, Vec::new(), 3_600_000))
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "recording a cancellation failed");
    }
}

async fn initialize(
    inner: &Arc<Inner>,
    req: &IncomingRequest,
    principal: &haven_auth::Principal,
) -> Reply {
    let params: InitializeRequestParams =
        match jsonrpc::typed_params(&req.method, req.params.as_ref()) {
            Ok(p) => p,
            Err(e) => return Rejection::new(Reason::InvalidParams, Some(&req.id), e).into(),
        };
    let requested = params.protocol_version.as_str();
    let version = if LEGACY_VERSIONS.contains(&requested) {
        requested
    } else {
        LATEST_LEGACY
    };
    let now = inner.store.clock().wall_millis();
    let record = SessionRecord {
        id: session::new_session_id(),
        protocol_version: version.to_owned(),
        client_info: Some(params.client_info.clone()),
        client_capabilities: params.capabilities.clone(),
        log_level: None,
        subscriptions: Vec::new(),
        created_millis: now,
        owner: session::owner_of(principal),
    };
    let size = serde_json::to_vec(&record).map_or(0, |v| v.len());
    let max = inner.config.limits.max_session_bytes();
    if size > max {
        return Rejection::new(
            Reason::InvalidParams,
            Some(&req.id),
            rmcp::model::ErrorData::invalid_params(
                format!(
                    "Invalid params: {} (the client info and capabilities are too large)",
                    session::too_large(size, max)
                ),
                None,
            ),
        )
        .into();
    }
    let ttl = inner.config.session_ttl.as_millis() as u64;
    let most = inner.config.limits.max_sessions_per_node();
    if !inner
        .session_count
        .admit(&record.id, now, now.saturating_add(ttl), most)
    {
        // The node is full: another node (or this one later) can take the session.
        return Rejection::new(
            Reason::StoreUnavailable,
            Some(&req.id),
            crate::outcome::store_failure(
                format!(
                    "This node holds {most} live sessions, as many as it may (setting limits.max_sessions_per_node); retry later or on another node"
                ),
                &haven_state::StoreError::Unavailable("node full".into()),
            ),
        )
        .into();
    }
    if let Err(e) = session::create(&*inner.store, &record, ttl).await {
        inner.session_count.end(&record.id);
        return Rejection::new(
            Reason::StoreUnavailable,
            Some(&req.id),
            super::store_error(e),
        )
        .into();
    }
    let mut capabilities = inner.info.capabilities.clone();
    // The tasks extension belongs to the stateless era; legacy sessions get the experimental
    // `tasks` capability below instead.
    capabilities.extensions = None;
    let mut result = InitializeResult::new(capabilities)
        .with_protocol_version(super::protocol_version(version))
        .with_server_info(inner.info.server_info.clone());
    result.instructions = inner.info.instructions.clone();
    let mut v = serde_json::to_value(&result).expect("initialize result serializes");
    if version >= "2025-11-25" {
        v["capabilities"]["tasks"] = serde_json::json!({
            "list": {}, "cancel": {}, "requests": { "tools": { "call": {} } }
        });
    }
    Reply::Json {
        body: jsonrpc::response(&req.id, &v),
        answer: super::Answer::Result,
        session: Some(record.id),
    }
}

pub(super) fn caller_of(s: &SessionRecord) -> Caller {
    Caller {
        client_info: s.client_info.clone(),
        capabilities: s.client_capabilities.clone(),
        log_level: s.log_level,
        principal: s.owner.clone(),
    }
}

async fn request(
    inner: &Arc<Inner>,
    loaded: LoadedSession,
    mut req: IncomingRequest,
    principal: Arc<haven_auth::Principal>,
    trace: super::TraceHeaders,
    (accepts_json, accepts_sse): (bool, bool),
) -> Reply {
    let s = &loaded.record;
    let meta = req.take_meta().ok().flatten();
    let (traceparent, tracestate) = trace.parent(
        meta.as_ref()
            .and_then(|m| m.traceparent.clone())
            .filter(|t| haven_telemetry::trace_id_of(t).is_some()),
    );
    let progress_token = meta.and_then(|m| m.progress_token);
    let mut call = Call {
        traceparent,
        tracestate,
        trace: None,
        progress_token,
        id: req.id,
        method: req.method,
        params: req.params.unwrap_or_default(),
        era: Era::Legacy {
            session: s.id.clone(),
            protocol_version: s.protocol_version.clone(),
        },
        caller: Arc::new(caller_of(s)),
        principal: Some(principal),
    };
    let fence = haven_cluster::FencedStore::unattached(inner.store.clone());
    let running = inner.spawn_handler(call.clone(), Some(fence.clone()));
    call.trace = running.trace.clone();
    refresh_session(inner, &loaded);
    deliver(
        inner,
        &call,
        running.rx,
        running.cancel,
        fence,
        accepts_json,
        accepts_sse,
    )
    .await
}

/// Extends a session's life when more than half of it has passed.
fn refresh_session(inner: &Arc<Inner>, loaded: &LoadedSession) {
    let ttl = inner.config.session_ttl.as_millis() as u64;
    let now = inner.store.clock().wall_millis();
    if now.saturating_sub(loaded.record.created_millis) < ttl / 2 {
        return;
    }
    let inner = inner.clone();
    let id = loaded.record.id.clone();
    tokio::spawn(async move {
        let max = inner.config.limits.max_session_bytes();
        let _ = session::update(&*inner.store, &id, ttl, max, |s| s.created_millis = now).await;
        inner.session_count.renew(&id, now.saturating_add(ttl));
        if let Err(e) = session::renew_subscriptions(&*inner.store, &id, ttl).await {
            tracing::debug!(error = %e, "renewing a session's subscriptions failed");
        }
        inner.sessions.invalidate(&id);
    });
}

/// Answers a running legacy request: JSON when it finishes quickly without sending anything
/// first, otherwise a resumable SSE stream.
async fn deliver(
    inner: &Arc<Inner>,
    call: &Call,
    mut rx: mpsc::UnboundedReceiver<Item>,
    cancel: CancellationToken,
    fence: Arc<haven_cluster::FencedStore>,
    accepts_json: bool,
    accepts_sse: bool,
) -> Reply {
    let streamable = may_stream(&call.method);
    if !accepts_sse {
        // The client cannot take a stream: wait for the result; requests to the client cannot
        // be delivered, so the handler is cancelled if it tries.
        while let Some(item) = rx.recv().await {
            match item {
                Item::Final(f) => return f.into(),
                Item::Request(_) => cancel.cancel(),
                _ => {}
            }
        }
        return no_response(call);
    }
    // A stream is needed when the client takes nothing else, or when Haven is told to store
    // every streamable answer; a JSON answer is possible only for a quick result.
    let json_allowed =
        accepts_json && !(streamable && inner.config.legacy_responses == LegacyResponses::Sse);
    let mut first = Vec::new();
    // Wait briefly for the first item: a handler that finishes at once is answered in one go
    // (as JSON, or as a stream whose one event is stored in a single commit).
    let next = if streamable {
        tokio::time::timeout(inner.config.stream_after, rx.recv())
            .await
            .ok()
    } else {
        Some(rx.recv().await)
    };
    match next {
        Some(Some(Item::Final(f))) if json_allowed => return f.into(),
        Some(Some(item)) => first.push(item),
        Some(None) => return no_response(call),
        None => {}
    }
    open_stream(inner, call, rx, first, cancel, fence).await
}

/// The frames of `events`, stored from index `first_index` on; `hlcs`: the timestamps their
/// commit gave them (empty when the answer of the commit that stored them was lost).
fn frames_for(
    stream_id: &str,
    first_index: u64,
    hlcs: &[(u64, haven_state::Hlc)],
    events: &[(String, bool)],
) -> Vec<SseFrame> {
    events
        .iter()
        .enumerate()
        .map(|(i, (data, _))| {
            let index = first_index + i as u64;
            let hlc = hlcs.iter().find(|(at, _)| *at == index).map(|(_, h)| *h);
            SseFrame::Event {
                id: Some(stream::event_id(stream_id, index, hlc)),
                retry: None,
                data: data.clone(),
            }
        })
        .collect()
}

/// Converts items to stored events; returns the events, whether the final item is among them,
/// and whether the handler asked to close the live connection (and after how many events).
fn to_events(items: Vec<Item>) -> (Vec<(String, bool)>, bool, Option<usize>) {
    let mut events = Vec::new();
    let mut finished = false;
    let mut close_at = None;
    for item in items {
        match item {
            Item::Notify(m) | Item::Request(m) => events.push((m, false)),
            Item::Final(f) => {
                events.push((f.message, true));
                finished = true;
            }
            Item::Close => close_at = close_at.or(Some(events.len())),
        }
    }
    (events, finished, close_at)
}

/// Opens a durable stream for a running request and pumps its items into the store and, while
/// the client is connected, to the client. The stream's writes are fenced by its execution
/// (ownership record), which the handler's own writes join from now on.
// Long by design: the stream's opening under its execution (fencing), kept whole: the order of its
// steps is the fencing rule.
async fn open_stream(
    inner: &Arc<Inner>,
    call: &Call,
    mut rx: mpsc::UnboundedReceiver<Item>,
    mut first: Vec<Item>,
    cancel: CancellationToken,
    fence: Arc<haven_cluster::FencedStore>,
) -> Reply {
    while let Ok(item) = rx.try_recv() {
        let last = matches!(item, Item::Final(_));
        first.push(item);
        if last {
            break;
        }
    }
    let session = call.era.session().unwrap_or_default().to_owned();
    let stream_id = stream::new_stream_id();
    let inflight = InflightRecord {
        session: session.clone(),
        stream: stream_id.clone(),
        request_id: id_json(&call.id),
        method: call.method.clone(),
        params: Some(Value::Object(call.params.clone())),
        node: inner.config.node_id.clone(),
        boot: inner.config.boot_id.clone(),
        started_millis: inner.store.clock().wall_millis(),
        progress_token: call
            .progress_token
            .as_ref()
            .and_then(|t| serde_json::to_value(t).ok()),
        traceparent: call.trace.clone(),
    };
    let (events, finished, close_at) = to_events(first);
    let key = stream::owner_key(&session, &stream_id);
    inner.executions.begin(&key);
    let store = inner.store.clone();
    let batch = stream::open_batch(&inflight, &events);
    let owner = haven_cluster::Owner::new(&inner.config.node_id, &inner.config.boot_id);
    let lease = inner.config.region_lease.clone();
    let opened = if finished {
        // Complete at once: nothing runs on, so nothing needs an owner.
        store
            .commit(batch)
            .await
            .map(|c| (None, stream::appended(&c)))
    } else {
        fence
            .attach(|effects| async move {
                let owner = haven_cluster::Owner { effects, ..owner };
                haven_cluster::Execution::open_leased(store, &key, owner, batch, lease.as_ref())
                    .await
                    .map(|(execution, c)| {
                        (execution.clone(), (Some(execution), stream::appended(&c)))
                    })
            })
            .await
    };
    let (execution, hlcs) = match opened {
        Ok(e) => e,
        Err(e) => {
            inner
                .executions
                .end(&stream::owner_key(&session, &stream_id));
            cancel.cancel();
            return Rejection::new(
                Reason::StoreUnavailable,
                Some(&call.id),
                super::store_error(e),
            )
            .into();
        }
    };
    let (live_tx, live_rx) = mpsc::unbounded_channel::<SseFrame>();
    let _ = live_tx.send(SseFrame::Event {
        id: Some(stream::event_id(&stream_id, 0, None)),
        retry: Some(inner.config.sse_retry_millis),
        data: String::new(),
    });
    let visible = close_at.unwrap_or(events.len());
    for f in frames_for(&stream_id, 1, &hlcs, &events[..visible]) {
        let _ = live_tx.send(f);
    }
    let live = if finished || close_at.is_some() {
        None
    } else {
        Some(live_tx)
    };
    if finished {
        inner
            .executions
            .end(&stream::owner_key(&session, &stream_id));
    } else if let Some(execution) = execution {
        let p = Pump {
            session,
            stream: stream_id,
            execution,
            next_index: events.len() as u64 + 1,
            progress: None,
        };
        start_pump(inner, p, &call.id, rx, live, cancel);
    }
    Reply::Stream(keep_alive_until_drain(inner, live_rx))
}

/// A running request's stream, as its pump writes it.
pub(crate) struct Pump {
    /// Session of the request.
    pub session: String,
    /// The stream.
    pub stream: String,
    /// The execution that fences every write to the stream.
    pub execution: Arc<haven_cluster::Execution>,
    /// Index the next event gets (only the owner appends, so it is known in advance).
    pub next_index: u64,
    /// Where the stream's progress stands, for a run that follows an interrupted one: the
    /// progress notifications that would not go past it are not stored.
    pub progress: Option<ProgressFloor>,
}

/// The last progress value a stream delivered for a request's progress token.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ProgressFloor {
    /// The request's progress token, as the client sent it.
    pub token: Value,
    /// The largest progress value delivered for it.
    pub last: f64,
}

impl ProgressFloor {
    /// Where the progress of `token` stands in `events`, if any was delivered for it.
    pub fn of(token: &Value, events: &[StoredEvent]) -> Option<ProgressFloor> {
        events
            .iter()
            .filter_map(|e| progress_value(&e.message, token))
            .reduce(f64::max)
            .map(|last| ProgressFloor {
                token: token.clone(),
                last,
            })
    }

    /// Whether `item` may be delivered after the stream's progress so far; a progress
    /// notification that goes past it raises it.
    ///
    /// A run that follows an interrupted one repeats the same work, so its progress counts
    /// the same steps from the start again (towards the same `total`). Its notifications
    /// that would not go past what the client was already told are dropped rather than
    /// shifted up by it: the values stay increasing, as MCP requires of one token, and keep
    /// their meaning against `total` (a shifted value could pass it).
    fn admits(&mut self, item: &Item) -> bool {
        let Item::Notify(m) = item else { return true };
        match progress_value(m, &self.token) {
            Some(v) if v <= self.last || v.is_nan() => false,
            Some(v) => {
                self.last = v;
                true
            }
            None => true,
        }
    }
}

/// The progress value of `message` if it is a progress notification for `token`.
fn progress_value(message: &str, token: &Value) -> Option<f64> {
    let v: Value = serde_json::from_str(message).ok()?;
    if v.get("method")?.as_str()? != "notifications/progress" {
        return None;
    }
    let params = v.get("params")?;
    (params.get("progressToken")? == token)
        .then(|| params.get("progress")?.as_f64())
        .flatten()
}

/// Starts the pump of a running request's stream (see [`pump`]); a cancellation of the
/// request stored by any node cancels its handler.
pub(crate) fn start_pump(
    inner: &Arc<Inner>,
    p: Pump,
    request_id: &rmcp::model::RequestId,
    rx: mpsc::UnboundedReceiver<Item>,
    live: Option<mpsc::UnboundedSender<SseFrame>>,
    cancel: CancellationToken,
) {
    let cancels = Topic::key(CANCELS_NS, &Inner::running_key(&p.session, request_id));
    let cancel_rx = inner.hub.subscribe(cancels);
    inner.spawn(pump(inner.clone(), p, rx, live, cancel, cancel_rx));
}

/// Stores a running request's items in its stream, in order, and sends them to the client
/// while it is connected. A write is retried until it is stored or the node loses the
/// execution; the final answer is never dropped (one the store refuses as invalid is
/// replaced by an error saying so).
async fn pump(
    inner: Arc<Inner>,
    mut p: Pump,
    mut rx: mpsc::UnboundedReceiver<Item>,
    mut live: Option<mpsc::UnboundedSender<SseFrame>>,
    cancel: CancellationToken,
    mut cancel_rx: crate::hub::Subscription,
) {
    let key = p.execution.key().to_owned();
    // Since when nobody receives the stream (its client went, or it runs where no client
    // was): once that lasts `limits.abandoned_call_ms` and no client resumed the stream on
    // any node, the request is cancelled, so that abandoned work does not run on.
    let mut orphaned = live.is_none().then(tokio::time::Instant::now);
    loop {
        let window = inner.config.limits.abandoned_after();
        let item = tokio::select! {
            item = rx.recv() => item,
            Ok(_) = cancel_rx.recv() => { cancel.cancel(); continue; }
            () = p.execution.lost().cancelled() => None,
            () = async {
                match &live {
                    Some(t) => t.closed().await,
                    None => std::future::pending().await,
                }
            } => {
                live = None;
                orphaned = Some(tokio::time::Instant::now());
                continue;
            }
            () = async {
                match orphaned {
                    Some(at) => tokio::time::sleep_until(at + window).await,
                    None => std::future::pending().await,
                }
            } => {
                match stream::has_reader(&*inner.store, &p.session, &p.stream).await {
                    Ok(false) if !cancel.is_cancelled() => {
                        tracing::info!(session = %p.session, stream = %p.stream, after_ms = window.as_millis() as u64, "cancelling a request nobody awaits: its client left and nobody resumed its stream");
                        cancel.cancel();
                        orphaned = None;
                    }
                    // A reader (or a store that cannot say): look again after another window.
                    _ => orphaned = Some(tokio::time::Instant::now()),
                }
                continue;
            }
        };
        let items = match item {
            Some(item) => {
                let mut items = vec![item];
                while !matches!(items.last(), Some(Item::Final(_))) {
                    match rx.try_recv() {
                        Ok(i) => items.push(i),
                        Err(_) => break,
                    }
                }
                items
            }
            // The handler ended without a final response (it panicked): end the stream with
            // an error rather than silence.
            None if !p.execution.lost().is_cancelled() => {
                let e = jsonrpc::internal("the request failed on the server");
                vec![Item::Final(crate::context::Final {
                    message: jsonrpc::error_response(None, &e),
                    answer: crate::outcome::Answer::of_error(&e),
                })]
            }
            None => Vec::new(),
        };
        let items = match &mut p.progress {
            Some(floor) => items.into_iter().filter(|i| floor.admits(i)).collect(),
            None => items,
        };
        let (events, finished, close_at) = to_events(items);
        if !events.is_empty() {
            let Some(hlcs) = store_events(&p, &events, finished).await else {
                // Another node owns the stream now: it answers; this handler stops.
                cancel.cancel();
                break;
            };
            let first_index = p.next_index;
            p.next_index += events.len() as u64;
            if let Some(tx) = &live {
                let visible = close_at.unwrap_or(events.len());
                for f in frames_for(&p.stream, first_index, &hlcs, &events[..visible]) {
                    if tx.send(f).is_err() {
                        break;
                    }
                }
            }
        }
        if (close_at.is_some() || live.as_ref().is_some_and(|t| t.is_closed()))
            && live.take().is_some()
        {
            orphaned = Some(tokio::time::Instant::now());
        }
        if finished || p.execution.lost().is_cancelled() {
            break;
        }
    }
    inner.executions.end(&key);
}

/// Stores events of a stream under its execution, retrying while the store fails. Returns
/// the index and timestamp of each event stored (none known when an earlier attempt whose
/// answer was lost had stored them), or `None` when the node no longer owns the stream
/// (nothing was stored).
async fn store_events(
    p: &Pump,
    events: &[(String, bool)],
    finished: bool,
) -> Option<Vec<(u64, haven_state::Hlc)>> {
    let mut delay = std::time::Duration::from_millis(20);
    let mut events = events.to_vec();
    let mut warned = false;
    loop {
        let claimable = p.execution.claimable();
        let batch = stream::execution_batch(&p.session, &p.stream, &events, claimable);
        let r = if finished {
            p.execution.finish(batch).await
        } else {
            p.execution.commit(batch, false).await
        };
        match r {
            Ok(landed) => {
                if warned {
                    let how = match &landed {
                        haven_cluster::Landed::Now(c) => {
                            format!("stored at sequence {}", c.last_seq)
                        }
                        haven_cluster::Landed::Earlier => {
                            "an earlier attempt had stored them".into()
                        }
                    };
                    tracing::info!(session = %p.session, stream = %p.stream, how, "stream events stored after retries");
                }
                return Some(match landed {
                    haven_cluster::Landed::Now(c) => stream::appended(&c),
                    haven_cluster::Landed::Earlier => Vec::new(),
                });
            }
            Err(haven_cluster::FenceError::Fenced { key, by }) => {
                tracing::warn!(execution = %key, owner = %by, "this node lost a request it was running; its handler stops and its events are not stored");
                return None;
            }
            Err(haven_cluster::FenceError::Store(e)) if e.is_retryable() => {
                if !warned {
                    tracing::warn!(error = %e, session = %p.session, stream = %p.stream, "storing stream events failed; retrying until stored");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
            Err(haven_cluster::FenceError::Store(e)) => {
                // The store refuses these events as they are (too large): keep the final
                // answer's place with an error that says why; drop other events.
                tracing::error!(error = %e, session = %p.session, stream = %p.stream, "the store refused stream events");
                if !finished {
                    return Some(Vec::new());
                }
                let id = events
                    .last()
                    .and_then(|(m, _)| serde_json::from_str::<Value>(m).ok())
                    .and_then(|v| v.get("id").cloned())
                    .and_then(|id| serde_json::from_value(id).ok());
                let msg = jsonrpc::error_response(
                    id.as_ref(),
                    &jsonrpc::internal(format!("the result could not be stored: {e}")),
                );
                events = vec![(msg, true)];
            }
        }
    }
}

/// Adds keep-alive comments to an SSE frame stream while it is idle; ends with the frames.
/// Like [`keep_alive`], and when the node starts draining the stream ends with a reconnection
/// hint: the client comes back with `Last-Event-ID`, through the load balancer, to another
/// node (the request itself keeps running here, or is taken over, and its events are stored).
pub(crate) fn keep_alive_until_drain(
    inner: &Inner,
    rx: mpsc::UnboundedReceiver<SseFrame>,
) -> futures::stream::BoxStream<'static, SseFrame> {
    let every = inner.config.keep_alive;
    let stop = inner.shutdown.clone();
    let retry = inner.config.drain_retry_millis;
    futures::stream::unfold((rx, stop, false), move |(mut rx, stop, done)| async move {
        if done {
            return None;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => Some((
                SseFrame::Event { id: None, retry: Some(retry), data: String::new() },
                (rx, stop, true),
            )),
            r = tokio::time::timeout(every, rx.recv()) => match r {
                Ok(Some(f)) => Some((f, (rx, stop, false))),
                Ok(None) => None,
                Err(_) => Some((SseFrame::Comment("keep-alive".into()), (rx, stop, false))),
            },
        }
    })
    .boxed()
}

pub(crate) fn keep_alive(
    rx: mpsc::UnboundedReceiver<SseFrame>,
    every: Duration,
) -> futures::stream::BoxStream<'static, SseFrame> {
    futures::stream::unfold(rx, move |mut rx| async move {
        match tokio::time::timeout(every, rx.recv()).await {
            Ok(Some(f)) => Some((f, rx)),
            Ok(None) => None,
            Err(_) => Some((SseFrame::Comment("keep-alive".into()), rx)),
        }
    })
    .boxed()
}

pub(super) async fn get(
    inner: &Arc<Inner>,
    session: Option<&str>,
    protocol_version: Option<&str>,
    last_event_id: Option<&str>,
    principal: &haven_auth::Principal,
) -> Reply {
    let loaded = match open_session(inner, session, protocol_version, principal).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match last_event_id {
        Some(id) => resume(inner, loaded, id).await,
        None => standalone(inner, loaded, None).await,
    }
}

async fn resume(inner: &Arc<Inner>, loaded: LoadedSession, last_event_id: &str) -> Reply {
    if let Some(m) = haven_telemetry::get() {
        m.sse_resumptions.inc();
    }
    let sid = loaded.record.id.clone();
    let Some(seen) = stream::parse_event_id(last_event_id) else {
        return Rejection::exchange(
            Reason::BadLastEventId,
            -32000,
            format!(
                "Bad Request: Last-Event-ID {last_event_id:?} is not an event id of this server"
            ),
        )
        .into();
    };
    let stream_id = seen.stream.to_owned();
    let inflight = match stream::inflight(&*inner.store, &sid, &stream_id).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let any = match stream::read(&*inner.store, &sid, &stream_id, 0, 1).await {
        Ok(e) => e,
        Err(e) => return unavailable(e),
    };
    if inflight.is_none() && any.is_empty() {
        return Rejection::exchange(
            Reason::BadLastEventId,
            -32000,
            format!("Bad Request: Last-Event-ID {last_event_id:?} names no stream of this session"),
        )
        .into();
    }
    if inflight.as_ref().is_some_and(|r| r.method == STANDALONE) {
        return standalone(inner, loaded, Some((stream_id, seen.index))).await;
    }
    let after = match resume_point(inner, &sid, &stream_id, seen).await {
        Ok(a) => a,
        Err(e) => return unavailable(e),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    // The reader record is kept only while the stream is followed: both end together, and
    // with them every sender of the client's stream, which ends it.
    let reading = keep_reading(inner.clone(), sid.clone(), stream_id.clone(), tx.clone());
    let following = follow(inner.clone(), sid, stream_id, after, tx);
    inner.spawn(async move {
        tokio::select! {
            () = following => {}
            () = reading => {}
        }
    });
    Reply::Stream(keep_alive_until_drain(inner, rx))
}

/// Where a resumption follows a request stream from, for a client whose last event is `seen`.
///
/// When the stored event at `seen`'s index is the client's (the same timestamp; an id without
/// one is trusted by its index), the stream goes on after it. Otherwise the client saw a
/// history this state does not hold: the state was restored to an earlier point (a
/// point-in-time restore, a region built from backups) or a region took the request over
/// without the events the client saw, and the request ran on since, at the same indices with
/// other events. The stream then goes on after the last stored event written no later than
/// the client's: the part both histories share (a stream's events are stamped in order, and
/// the other history's were written after the client's). Never after the stream's final
/// event: it is the client's only answer.
async fn resume_point(
    inner: &Arc<Inner>,
    session: &str,
    stream_id: &str,
    seen: stream::EventId<'_>,
) -> Result<u64, haven_state::StoreError> {
    const PAGE: usize = 256;
    let store = &*inner.store;
    let after = seen.index;
    if after == 0 {
        return Ok(0);
    }
    let mut at = stream::read(store, session, stream_id, after - 1, 1).await?;
    if seen.hlc.is_some() && at.first().is_none_or(|e| e.index != after) {
        // Not here: this node may not have applied it yet (it was just written through
        // another node), or this state does not hold it.
        store.sync().await?;
        at = stream::read(store, session, stream_id, after - 1, 1).await?;
    }
    let stored = at.first().filter(|e| e.index == after);
    let shared = match (stored, seen.hlc) {
        (Some(e), Some(h)) if e.version.hlc == h => return Ok(after),
        (Some(_), None) => return Ok(after),
        // An id without a timestamp, beyond the stored events: nothing tells how far the
        // histories agree.
        (None, None) => after,
        (_, Some(h)) => {
            let mut shared = 0;
            let mut from = 0;
            'pages: loop {
                let page = stream::read(store, session, stream_id, from, PAGE).await?;
                let n = page.len();
                for e in page {
                    if e.index >= after || e.version.hlc > h {
                        break 'pages;
                    }
                    shared = e.index;
                    from = e.index;
                }
                if n < PAGE {
                    break;
                }
            }
            shared
        }
    };
    let last = stream::last_event(store, session, stream_id).await?;
    let point = match last {
        Some(e) if e.last && e.index <= shared => e.index - 1,
        _ => shared,
    };
    if point != after {
        tracing::warn!(
            session,
            stream = stream_id,
            after,
            resumed_after = point,
            "a client resumed with an event this state does not hold (the state was restored, or another region took the request over, since): the stream goes on after the events both histories share"
        );
    }
    Ok(point)
}

/// While a client reads a resumed stream, keeps its reader record alive, so that the request
/// is not taken for abandoned (see [`pump`]).
async fn keep_reading(
    inner: Arc<Inner>,
    session: String,
    stream_id: String,
    tx: mpsc::UnboundedSender<SseFrame>,
) {
    loop {
        let window = inner.config.limits.abandoned_after();
        let node = &inner.config.node_id;
        let ttl = window.as_millis() as u64;
        if let Err(e) = stream::note_reader(&*inner.store, &session, &stream_id, node, ttl).await {
            tracing::debug!(error = %e, "noting a stream's reader failed");
        }
        tokio::select! {
            () = tokio::time::sleep(window / 3) => {}
            () = tx.closed() => return,
        }
    }
}

/// Replays a request stream after `after` and follows it until its final event, taking over
/// requests whose node died. It ends when the client goes or the session ends.
async fn follow(
    inner: Arc<Inner>,
    session: String,
    stream_id: String,
    after: u64,
    tx: mpsc::UnboundedSender<SseFrame>,
) {
    let topics = [
        Topic::Stream(stream::stream_key(&session, &stream_id)),
        Topic::key(SESSIONS_NS, &session),
    ];
    let (inner, session, stream_id, tx) = (&inner, &session, &stream_id, &tx);
    let check = move |after, woke| async move {
        if woke == Woke::Changed(1)
            && matches!(session::load(&*inner.store, session).await, Ok(None))
        {
            return ControlFlow::Break(());
        }
        replay(inner, session, stream_id, after, tx).await
    };
    // Whichever way it ends (final event, client gone, session ended) there is nothing to add.
    let _ = inner
        .hub
        .wait_until(&topics, RECHECK, tx.closed(), after, check)
        .await;
}

/// Sends the events of a request stream after `after`; breaks at the final event, when the
/// client is gone or the stream was cut off, and continues with the last index sent. Whoever
/// owns the request answers; if nobody can (its process is gone), this node settles it now
/// rather than at the next scan.
async fn replay(
    inner: &Arc<Inner>,
    session: &str,
    stream_id: &str,
    mut after: u64,
    tx: &mpsc::UnboundedSender<SseFrame>,
) -> ControlFlow<(), u64> {
    const PAGE: usize = 256;
    loop {
        let events: Vec<StoredEvent> =
            match stream::read(&*inner.store, session, stream_id, after, PAGE).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "reading stream events failed");
                    return ControlFlow::Break(());
                }
            };
        let n = events.len();
        for e in events {
            if e.last && e.claimable {
                match claimable_final(inner, session, stream_id, &e, tx).await {
                    FinalIs::Answer => {}
                    // A stopped run's answer: the run that took the request over answers.
                    FinalIs::Superseded => {
                        after = e.index;
                        continue;
                    }
                    FinalIs::NotYet => return ControlFlow::Continue(after),
                }
            }
            after = e.index;
            let frame = SseFrame::Event {
                id: Some(stream::event_id(stream_id, e.index, Some(e.version.hlc))),
                retry: None,
                data: e.message,
            };
            if tx.send(frame).is_err() || e.last {
                return ControlFlow::Break(());
            }
        }
        if n < PAGE {
            break;
        }
    }
    match stream::inflight(&*inner.store, session, stream_id).await {
        // No final event and no running request: the stream was cut off; say so. Unless a
        // run that took the request over goes on (a stopped run's last batch, merged in after
        // a partition healed, ended the in-flight record).
        Ok(None) => {
            let key = stream::owner_key(session, stream_id);
            if matches!(
                ownership::end_of(&*inner.store, &key).await,
                Ok(End::Running)
            ) {
                return ControlFlow::Continue(after);
            }
            return ControlFlow::Break(());
        }
        Ok(Some(_)) => {
            let key = stream::owner_key(session, stream_id);
            super::recovery::settle_if_orphaned(inner, &key).await;
        }
        Err(_) => {}
    }
    ControlFlow::Continue(after)
}

/// What a final event written by a run that another region may take over is.
enum FinalIs {
    /// The request's answer: send it.
    Answer,
    /// A stopped run's answer (the request was taken over): skip it.
    Superseded,
    /// Not yet known to be the answer: look again later.
    NotYet,
}

/// Whether the claimable final event `e` is the request's answer. It is when the run that
/// wrote it also ended the execution (the ownership record's tombstone has `e`'s origin, as
/// they are written in one batch); a later claim, or the tombstone of a claimer's run, means
/// a stopped run wrote it. And when this region wrote it, only once a majority of regions
/// holds it: a region taking this one's work over might not have it and would answer again.
/// Then this waits, while the client stays, until a majority holds this region's log up to
/// where it was when `e` was read.
async fn claimable_final(
    inner: &Arc<Inner>,
    session: &str,
    stream_id: &str,
    e: &StoredEvent,
    tx: &mpsc::UnboundedSender<SseFrame>,
) -> FinalIs {
    let key = stream::owner_key(session, stream_id);
    let ended_by_writer = || async {
        match ownership::end_of(&*inner.store, &key).await {
            Ok(End::By(o)) if o == e.version.origin => Some(true),
            Ok(End::Never) => Some(true),
            Ok(_) => Some(false),
            Err(_) => None,
        }
    };
    let here = e.version.origin.region == inner.store.origin().region;
    let lease = inner.config.region_lease.as_ref().filter(|_| here);
    let seq = match lease {
        Some(_) => match inner.store.last_seq().await {
            Ok(seq) => seq,
            Err(_) => return FinalIs::NotYet,
        },
        None => 0,
    };
    let mut polls = 0u32;
    loop {
        let confirmed = match lease {
            Some(l) => l.confirmed(&*inner.store, seq).await,
            None => true,
        };
        // Checked again once confirmed: after a takeover the other regions echo this one
        // again only once it has applied the claims.
        if confirmed || polls.is_multiple_of(20) {
            match ended_by_writer().await {
                Some(true) if confirmed => return FinalIs::Answer,
                Some(true) => {}
                Some(false) => return FinalIs::Superseded,
                None => return FinalIs::NotYet,
            }
        }
        if tx.is_closed() {
            return FinalIs::NotYet;
        }
        if polls == 0 {
            tracing::info!(
                session,
                stream = stream_id,
                index = e.index,
                "a resumed stream's final answer waits until a majority of regions holds it"
            );
        }
        polls += 1;
        tokio::time::sleep(CONFIRM_POLL).await;
    }
}

/// The standalone GET stream: notifications not tied to a request (list changes, resource
/// updates), stored like every other stream so that it can be resumed.
async fn standalone(
    inner: &Arc<Inner>,
    loaded: LoadedSession,
    resume: Option<(String, u64)>,
) -> Reply {
    let sid = loaded.record.id.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let (stream_id, after) = match resume {
        Some((s, a)) => (s, Some(a)),
        None => {
            let stream_id = stream::new_stream_id();
            let rec = InflightRecord {
                session: sid.clone(),
                stream: stream_id.clone(),
                request_id: Value::Null,
                method: STANDALONE.into(),
                params: None,
                node: inner.config.node_id.clone(),
                boot: inner.config.boot_id.clone(),
                started_millis: inner.store.clock().wall_millis(),
                progress_token: None,
                traceparent: None,
            };
            if let Err(e) = stream::open(&*inner.store, &rec, &[]).await {
                return unavailable(e);
            }
            let _ = tx.send(SseFrame::Event {
                id: Some(stream::event_id(&stream_id, 0, None)),
                retry: Some(inner.config.sse_retry_millis),
                data: String::new(),
            });
            (stream_id, None)
        }
    };
    inner.spawn(produce_standalone(inner.clone(), sid, stream_id, after, tx));
    Reply::Stream(keep_alive_until_drain(inner, rx))
}

/// The notification of `a` for a session (`subscribed`: to the resource `a` is about, if it
/// is about one).
fn notification_for(a: &Announcement, subscribed: bool) -> Option<String> {
    let method = match a {
        Announcement::ToolsChanged => "notifications/tools/list_changed",
        Announcement::PromptsChanged => "notifications/prompts/list_changed",
        Announcement::ResourcesChanged => "notifications/resources/list_changed",
        Announcement::ResourceUpdated(uri) => {
            if !subscribed {
                return None;
            }
            return Some(jsonrpc::notification(
                "notifications/resources/updated",
                Some(serde_json::json!({ "uri": uri })),
            ));
        }
    };
    Some(jsonrpc::notification(method, None))
}

/// Serves a standalone GET stream. Its in-flight record (which makes it resumable) lives as
/// long as the session may while a client reads it, and `limits.abandoned_call_ms` once the
/// client left, so that streams nobody comes back to leave nothing behind.
async fn produce_standalone(
    inner: Arc<Inner>,
    session: String,
    stream_id: String,
    after: Option<u64>,
    tx: mpsc::UnboundedSender<SseFrame>,
) {
    let store = &*inner.store;
    let ttl = inner.config.session_ttl.as_millis() as u64;
    if let Err(e) = stream::set_inflight_ttl(store, &session, &stream_id, ttl).await {
        tracing::debug!(error = %e, "renewing a standalone stream's record failed");
    }
    if serve_standalone(&inner, &session, &stream_id, after, &tx).await {
        let window = inner.config.limits.abandoned_after().as_millis() as u64;
        if let Err(e) = stream::set_inflight_ttl(store, &session, &stream_id, window).await {
            tracing::debug!(error = %e, "shortening a standalone stream's record failed");
        }
    }
}

/// Sends a standalone stream's notifications until the client leaves (true) or the session
/// ends (false).
async fn serve_standalone(
    inner: &Arc<Inner>,
    session: &str,
    stream_id: &str,
    after: Option<u64>,
    tx: &mpsc::UnboundedSender<SseFrame>,
) -> bool {
    let (session, stream_id) = (session.to_owned(), stream_id.to_owned());
    let mut ann_rx = inner.hub.subscribe(Topic::Namespace(ANNOUNCE_NS.into()));
    let mut ses_rx = inner.hub.subscribe(Topic::key(SESSIONS_NS, &session));
    if let Some(after) = after
        && let Ok(events) = stream::read(&*inner.store, &session, &stream_id, after, 10_000).await
    {
        for e in events {
            let frame = SseFrame::Event {
                id: Some(stream::event_id(&stream_id, e.index, Some(e.version.hlc))),
                retry: None,
                data: e.message,
            };
            if tx.send(frame).is_err() {
                return true;
            }
        }
    }
    loop {
        tokio::select! {
            entry = ann_rx.recv() => {
                let entry = match entry {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return false,
                };
                let haven_state::Change::Record(r) = &entry.change else { continue };
                let Some(a) = Announcement::from_key(&r.key) else { continue };
                let record = match session::load(&*inner.store, &session).await {
                    Ok(Some(s)) => s.record,
                    _ => return false,
                };
                let subscribed = match &a {
                    Announcement::ResourceUpdated(uri) => {
                        session::is_subscribed(&*inner.store, &record, uri).await.unwrap_or(false)
                    }
                    _ => true,
                };
                let Some(msg) = notification_for(&a, subscribed) else { continue };
                let Ok(appended) = stream::append(&*inner.store, &session, &stream_id, &[(msg.clone(), false)]).await else {
                    continue;
                };
                let Some(&(index, hlc)) = appended.last() else { continue };
                let frame = SseFrame::Event { id: Some(stream::event_id(&stream_id, index, Some(hlc))), retry: None, data: msg };
                if tx.send(frame).is_err() {
                    return true;
                }
            }
            _ = ses_rx.recv() => {
                if matches!(session::load(&*inner.store, &session).await, Ok(None)) {
                    let _ = inner.store.commit(haven_state::Batch::new().delete(stream::INFLIGHT_NS, &stream::inflight_key(&session, &stream_id))).await;
                    return false;
                }
            }
            _ = tx.closed() => return true,
        }
    }
}

pub(super) async fn delete(
    inner: &Arc<Inner>,
    session: Option<&str>,
    principal: &haven_auth::Principal,
) -> Reply {
    let Some(sid) = session else {
        return Rejection::exchange(
            Reason::SessionRequired,
            -32000,
            "Bad Request: the Mcp-Session-Id header is required",
        )
        .into();
    };
    // Only the session's principal may end it.
    match inner.sessions.load(&*inner.store, sid).await {
        Ok(Some(s)) if s.record.belongs_to(principal) => {}
        Ok(_) => return session_not_found(),
        Err(e) => return unavailable(e),
    }
    let ended = session::end(&*inner.store, sid).await;
    inner.sessions.invalidate(sid);
    inner.session_count.end(sid);
    match ended {
        Ok(true) => {
            let prefix = format!("{sid}/");
            for (k, token) in inner.running.lock().iter() {
                if k.starts_with(&prefix) {
                    token.cancel();
                }
            }
            Reply::SessionEnded
        }
        Ok(false) => session_not_found(),
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn progress(token: &str, value: f64) -> String {
        jsonrpc::notification(
            "notifications/progress",
            Some(json!({"progressToken": token, "progress": value, "total": 5.0})),
        )
    }

    fn event(index: u64, message: String) -> StoredEvent {
        StoredEvent {
            index,
            message,
            last: false,
            claimable: false,
            version: haven_state::Version {
                hlc: haven_state::Hlc::ZERO,
                origin: haven_state::Origin::new("r", "n"),
            },
        }
    }

    #[test]
    fn a_rerun_delivers_only_progress_past_what_the_stream_holds() {
        let token = json!("p");
        let log = jsonrpc::notification("notifications/message", Some(json!({"level": "info"})));
        let stored = vec![
            event(1, progress("p", 0.0)),
            event(2, progress("p", 1.0)),
            event(3, progress("p", 2.0)),
            event(4, progress("other", 9.0)),
            event(5, log.clone()),
        ];
        let mut floor = ProgressFloor::of(&token, &stored).unwrap();
        assert_eq!(floor.last, 2.0);
        // The re-run counts from 0 again: only what goes past 2 gets through, and other
        // items are untouched.
        let rerun = [0.0, 1.0, 2.0, 3.0, 3.0, 2.5, 4.0, 5.0];
        let admitted: Vec<f64> = rerun
            .iter()
            .map(|v| Item::Notify(progress("p", *v)))
            .filter(|i| floor.admits(i))
            .map(|i| match i {
                Item::Notify(m) => progress_value(&m, &token).unwrap(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(admitted, [3.0, 4.0, 5.0]);
        assert!(floor.admits(&Item::Notify(log)));
        assert!(floor.admits(&Item::Notify(progress("other", 0.0))));
        // A stream without progress for the token needs no floor.
        assert_eq!(ProgressFloor::of(&token, &stored[3..]), None);
    }
}
