//! The per-node pool of upstream connections: one supervisor task per enabled upstream, the
//! registry watcher, the call path (deadline, cancellation, circuit breaker, one retry of an
//! undelivered request) and the operator status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_control::config::UpstreamSettings;
use haven_control::redact::{Secrets, redact};
use haven_control::registry::{REGISTRY_NS, Transport, UpstreamSpec};
use haven_mcp::RequestContext;
use haven_state::{Change, Store, StoreError};
use parking_lot::Mutex;
use rmcp::model::{ClientRequest, ErrorCode, ErrorData, ServerResult};
use rmcp::service::{Peer, PeerRequestOptions, RoleClient, ServiceError};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Admit, Breaker};
use crate::connect::{self, Handler, ProgressMap};
use crate::direct::{Direct, Outcome, connection_lost};
use crate::failure::{Failure, Reason, client_error};
use crate::lists::{self, LISTS_NS, UpstreamLists};
use crate::{REQUEST_CANCELLED, SecretResolver};

/// First wait before reconnecting a dead upstream; doubles up to `restart_max_backoff_ms`.
const INITIAL_BACKOFF_MS: u64 = 250;
/// How long closing a connection may take (a stdio child gets stdin closed, then SIGTERM, then
/// SIGKILL, each after 3 s).
/// How often the unchanged failure of an upstream that keeps failing to connect is logged
/// again (its first failure, a change of reason and its recovery are logged at once).
const STILL_FAILING_LOG_EVERY: Duration = Duration::from_secs(300);
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long a `notifications/cancelled` may take to send.
const CANCEL_SEND_WAIT: Duration = Duration::from_secs(5);

/// What an upstream is doing, for operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamState {
    /// Connected; calls go through.
    Connected,
    /// Connecting (or fetching its lists after connecting).
    Connecting,
    /// Waiting before the next connection attempt after a failure.
    Backoff,
    /// Connected, but the circuit breaker refuses calls (or lets one trial through).
    BreakerOpen,
    /// Registered but disabled: not connected, not served.
    Disabled,
    /// Registered and enabled, but this node was started with its upstreams held: not
    /// connected or started here (its calls fail with `not_connected`).
    Held,
}

/// One upstream's status (serializable; holds no secret values).
#[derive(Clone, Debug, Serialize)]
pub struct UpstreamStatus {
    /// Registered name.
    pub name: String,
    /// `http` or `stdio`.
    pub transport: &'static str,
    /// What it is doing.
    pub state: UpstreamState,
    /// The last connection, listing or call error, if any since the last success: the
    /// details, with known secret values, URL credentials and query strings redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The reason code of the last error (what a client was told, see [`Reason`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_reason: Option<Reason>,
    /// Something about the entry an operator should fix (e.g. URL credentials and an
    /// `Authorization` header together: which one is sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<&'static str>,
    /// Served tools (from this node's last fetch).
    pub tools: usize,
    /// Served prompts.
    pub prompts: usize,
    /// Served resources.
    pub resources: usize,
    /// Served resource templates.
    pub resource_templates: usize,
    /// Calls answered by the upstream (including tool results with `isError`).
    pub calls_ok: u64,
    /// Calls that ended in an error (timeouts, refusals, upstream JSON-RPC errors, …).
    pub calls_failed: u64,
    /// Connection attempts (for a stdio upstream: process starts) after the first one: every
    /// retry after a failed start, a closed connection or a reconnection counts.
    pub restarts: u64,
    /// Consecutive failures counted by the circuit breaker.
    pub consecutive_failures: u32,
    /// Process id of a stdio upstream's child while connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Milliseconds until the next connection attempt (state `backoff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// The last lines a stdio upstream wrote to its stderr on this node, oldest first (at most
    /// 20 lines and 4 KiB, over its restarts; redacted).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stderr: Vec<String>,
}

/// The pool of upstream connections of this node. Cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    pub(crate) inner: Arc<Pool>,
}

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    secrets: Arc<dyn SecretResolver>,
    settings: watch::Receiver<UpstreamSettings>,
    tls: crate::connect::UpstreamTls,
    /// Registered upstreams are not started on this node.
    held: bool,
}

impl Shared {
    fn settings(&self) -> UpstreamSettings {
        self.settings.borrow().clone()
    }
}

pub(crate) struct Pool {
    pub(crate) shared: Arc<Shared>,
    entries: Mutex<BTreeMap<String, Arc<Entry>>>,
    shutdown: CancellationToken,
    /// The registry watcher and closing tasks, awaited by [`Upstreams::shutdown`].
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Decoded list records by upstream, with the revision they were decoded from.
    pub(crate) lists_cache: Mutex<HashMap<String, (u64, Arc<UpstreamLists>)>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Disabled,
    Held,
    Connecting,
    Connected,
    Backoff { until: Instant },
    Stopped,
}

struct Conn {
    peer: Peer<RoleClient>,
    ct: CancellationToken,
    done: CancellationToken,
    pid: Option<u32>,
    generation: u64,
    /// Progress routes of this connection's requests in flight.
    progress: ProgressMap,
    /// Forwarded calls sent without rmcp's service (HTTP upstreams).
    direct: Option<Direct>,
}

impl Conn {
    async fn close(&self) {
        self.ct.cancel();
        if tokio::time::timeout(CLOSE_WAIT, self.done.cancelled())
            .await
            .is_err()
        {
            tracing::warn!("an upstream connection did not close within {CLOSE_WAIT:?}");
        }
    }
}

struct EntryState {
    phase: Phase,
    conn: Option<Arc<Conn>>,
    generation: u64,
    reconnect_for: Option<u64>,
    last_error: Option<Failure>,
    counts: (usize, usize, usize, usize),
    calls_ok: u64,
    calls_failed: u64,
    restarts: u64,
    connected_once: bool,
    /// Since the last connection (or the start), connecting has failed: for logging state
    /// changes rather than every attempt.
    failing: Option<Failing>,
    backoff_ms: u64,
    breaker: Breaker,
}

/// An upstream that fails to connect, as its log lines know it.
struct Failing {
    /// Failed attempts so far.
    attempts: u64,
    /// The reason last logged.
    reason: Reason,
    /// When a line about it was last logged.
    logged: Instant,
}

struct Entry {
    spec: UpstreamSpec,
    /// The upstream's known secret values (from its entry, and every value expanded for one
    /// of its connections), removed from everything said about it.
    secrets: Arc<Mutex<Secrets>>,
    /// The last lines of a stdio upstream's stderr, over its restarts.
    stderr: Arc<Mutex<connect::StderrTail>>,
    st: Mutex<EntryState>,
    /// Bumped on every phase or connection change.
    changed: watch::Sender<()>,
    stop: CancellationToken,
    reconnect: Notify,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Entry {
    fn new(spec: UpstreamSpec, held: bool) -> Arc<Entry> {
        let phase = if spec.disabled {
            Phase::Disabled
        } else if held {
            Phase::Held
        } else {
            Phase::Connecting
        };
        let secrets = Arc::new(Mutex::new(connect::literal_secrets(&spec)));
        Arc::new(Entry {
            spec,
            secrets,
            stderr: Arc::default(),
            st: Mutex::new(EntryState {
                phase,
                conn: None,
                generation: 0,
                reconnect_for: None,
                last_error: None,
                counts: (0, 0, 0, 0),
                calls_ok: 0,
                calls_failed: 0,
                restarts: 0,
                connected_once: false,
                failing: None,
                backoff_ms: INITIAL_BACKOFF_MS,
                breaker: Breaker::default(),
            }),
            changed: watch::channel(()).0,
            stop: CancellationToken::new(),
            reconnect: Notify::new(),
            supervisor: Mutex::new(None),
        })
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn is_http(&self) -> bool {
        matches!(self.spec.transport, Transport::Http { .. })
    }

    /// `text` as operators may see it: [`redact`]ed with this upstream's known secrets.
    fn redact(&self, text: &str) -> String {
        redact(text, &self.secrets.lock())
    }

    /// Records `failure` as the last error and logs it (redacted), with `what` happened.
    fn record_failure(&self, what: &str, failure: Failure) {
        let detail = failure.detail_for(&self.secrets.lock());
        tracing::warn!(upstream = self.name(), reason = failure.reason.as_str(), error = %detail, "{what}");
        self.update(|st| st.last_error = Some(failure));
    }

    /// Records a failed connection attempt as the last error, and logs it when it changes the
    /// upstream's state (the first failure, or a new reason); the same failure again is logged
    /// at most every [`STILL_FAILING_LOG_EVERY`], with the number of attempts.
    fn connect_failed(&self, failure: Failure) {
        let now = Instant::now();
        let log = {
            let mut st = self.st.lock();
            let log = match &mut st.failing {
                None => {
                    st.failing = Some(Failing {
                        attempts: 1,
                        reason: failure.reason,
                        logged: now,
                    });
                    Some(None)
                }
                Some(f) => {
                    f.attempts += 1;
                    if f.reason != failure.reason
                        || now.duration_since(f.logged) >= STILL_FAILING_LOG_EVERY
                    {
                        f.reason = failure.reason;
                        f.logged = now;
                        Some(Some(f.attempts))
                    } else {
                        None
                    }
                }
            };
            st.last_error = Some(failure.clone());
            log
        };
        self.changed.send_replace(());
        let Some(attempts) = log else { return };
        let detail = failure.detail_for(&self.secrets.lock());
        let reason = failure.reason.as_str();
        match attempts {
            None => tracing::warn!(
                upstream = self.name(),
                reason,
                error = %detail,
                "connecting to upstream failed; retrying with backoff (the same failure is logged again every {} s)",
                STILL_FAILING_LOG_EVERY.as_secs()
            ),
            Some(n) => tracing::warn!(
                upstream = self.name(),
                reason,
                error = %detail,
                attempts = n,
                "upstream still failing after {n} attempts"
            ),
        }
    }

    fn update(&self, f: impl FnOnce(&mut EntryState)) {
        f(&mut self.st.lock());
        self.changed.send_replace(());
    }

    /// Asks the supervisor to replace connection `generation` (if it is still the current one).
    fn request_reconnect(&self, generation: u64) {
        self.st.lock().reconnect_for = Some(generation);
        self.reconnect.notify_one();
    }

    /// Stops the supervisor and closes the connection; returns when both are done.
    async fn stop(&self) {
        self.stop.cancel();
        let handle = self.supervisor.lock().take();
        if let Some(h) = handle {
            let _ = h.await;
        }
        let conn = self.st.lock().conn.take();
        if let Some(c) = conn {
            c.close().await;
        }
        self.update(|st| st.phase = Phase::Stopped);
    }

    fn status(&self) -> UpstreamStatus {
        let st = self.st.lock();
        let now = Instant::now();
        let (state, retry_in_ms) = match st.phase {
            Phase::Disabled | Phase::Stopped => (UpstreamState::Disabled, None),
            Phase::Held => (UpstreamState::Held, None),
            Phase::Connecting => (UpstreamState::Connecting, None),
            Phase::Connected if st.breaker.is_open() => (UpstreamState::BreakerOpen, None),
            Phase::Connected => (UpstreamState::Connected, None),
            Phase::Backoff { until } => (
                UpstreamState::Backoff,
                Some(until.saturating_duration_since(now).as_millis() as u64),
            ),
        };
        UpstreamStatus {
            name: self.spec.name.clone(),
            transport: match self.spec.transport {
                Transport::Http { .. } => "http",
                Transport::Stdio { .. } => "stdio",
            },
            state,
            last_error: st
                .last_error
                .as_ref()
                .map(|f| f.detail_for(&self.secrets.lock())),
            last_error_reason: st.last_error.as_ref().map(|f| f.reason),
            warning: self.spec.credentials_conflict(),
            tools: st.counts.0,
            prompts: st.counts.1,
            resources: st.counts.2,
            resource_templates: st.counts.3,
            calls_ok: st.calls_ok,
            calls_failed: st.calls_failed,
            restarts: st.restarts,
            consecutive_failures: st.breaker.failures(),
            pid: st.conn.as_ref().and_then(|c| c.pid),
            retry_in_ms,
            stderr: self
                .stderr
                .lock()
                .lines()
                .iter()
                .map(|l| self.redact(l))
                .collect(),
        }
    }
}

/// How one attempt of a request ended.
enum Sent {
    Answered(Box<ServerResult>),
    UpstreamError(ErrorData),
    NotDelivered(Failure),
    Failed(Failure),
    Timeout,
    Cancelled,
}

/// Why no connection could be had for a request.
enum NoConn {
    /// Not connected now: the phase says why, with the last connection failure (if any) and
    /// the milliseconds until the next attempt.
    Unavailable(Reason, Option<Failure>, Option<u128>),
    /// Still connecting at the call's deadline.
    Timeout,
    Cancelled,
}

/// An upstream's JSON-RPC error, forwarded to the client (it is the upstream's answer) with
/// [`redact`] applied to its message and every string of its data.
fn forwarded(mut e: ErrorData, secrets: &Secrets) -> ErrorData {
    fn walk(v: &mut Value, secrets: &Secrets) {
        match v {
            Value::String(s) => *s = redact(s, secrets),
            Value::Array(a) => a.iter_mut().for_each(|v| walk(v, secrets)),
            Value::Object(o) => o.values_mut().for_each(|v| walk(v, secrets)),
            _ => {}
        }
    }
    e.message = redact(&e.message, secrets).into();
    if let Some(d) = &mut e.data {
        walk(d, secrets);
    }
    e
}

fn cancelled_error() -> ErrorData {
    ErrorData::new(ErrorCode(REQUEST_CANCELLED), "Request cancelled", None)
}

/// Removes a request's progress route when the request ends.
struct ProgressRoute {
    map: ProgressMap,
    token: rmcp::model::ProgressToken,
}

impl Drop for ProgressRoute {
    fn drop(&mut self) {
        self.map.lock().remove(&self.token);
    }
}

impl Upstreams {
    /// Starts the pool: connects every enabled registered upstream in the background and
    /// follows registry changes. `settings` is read on every call and connection attempt.
    /// Must be called within a Tokio runtime.
    pub fn start(
        store: Arc<dyn Store>,
        secrets: Arc<dyn SecretResolver>,
        settings: watch::Receiver<UpstreamSettings>,
    ) -> Upstreams {
        Self::start_with_tls(store, secrets, settings, crate::UpstreamTls::default())
    }

    /// [`Upstreams::start`], with `tls` deciding which certificates https:// upstreams are
    /// verified against.
    pub fn start_with_tls(
        store: Arc<dyn Store>,
        secrets: Arc<dyn SecretResolver>,
        settings: watch::Receiver<UpstreamSettings>,
        tls: crate::UpstreamTls,
    ) -> Upstreams {
        Self::start_with_options(store, secrets, settings, tls, false)
    }

    /// [`Upstreams::start_with_tls`]; with `held`, no registered upstream is connected or
    /// started (the registry is still followed and shown, each enabled upstream as
    /// [`UpstreamState::Held`]), e.g. on a node restored from backup for a drill.
    pub fn start_with_options(
        store: Arc<dyn Store>,
        secrets: Arc<dyn SecretResolver>,
        settings: watch::Receiver<UpstreamSettings>,
        tls: crate::UpstreamTls,
        held: bool,
    ) -> Upstreams {
        let pool = Arc::new(Pool {
            shared: Arc::new(Shared {
                store,
                secrets,
                settings,
                tls,
                held,
            }),
            entries: Mutex::new(BTreeMap::new()),
            shutdown: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            lists_cache: Mutex::new(HashMap::new()),
        });
        let feed = pool.shared.store.subscribe();
        let watcher = tokio::spawn(watch_registry(pool.clone(), feed));
        pool.tasks.lock().push(watcher);
        Upstreams { inner: pool }
    }

    /// A catalog serving `base` and every enabled upstream.
    pub fn catalog(&self, base: Arc<dyn haven_mcp::Catalog>) -> crate::FederatedCatalog {
        crate::FederatedCatalog::new(self.clone(), base)
    }

    /// Every registered upstream this node knows of, by name.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        let entries: Vec<Arc<Entry>> = self.inner.entries.lock().values().cloned().collect();
        entries.iter().map(|e| e.status()).collect()
    }

    /// Re-reads the whole registry and applies it (the pool does this on start and when its
    /// change feed lagged; registry changes are otherwise applied as they are committed).
    pub async fn reconcile(&self) -> Result<(), StoreError> {
        reconcile_all(&self.inner).await
    }

    /// Stops watching the registry and closes every connection (child processes are closed,
    /// killed if they do not exit, and reaped). List records stay: other nodes keep serving
    /// them, and this node refreshes them when it starts again.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.inner.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        let entries: Vec<Arc<Entry>> = std::mem::take(&mut *self.inner.entries.lock())
            .into_values()
            .collect();
        futures::future::join_all(entries.iter().map(|e| e.stop())).await;
        // Closing tasks started while the watcher ran.
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.inner.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Whether `name` is an upstream of this node (enabled or not).
    pub(crate) fn knows(&self, name: &str) -> bool {
        self.inner.entries.lock().contains_key(name)
    }

    /// Sends `request` to upstream `name` on behalf of the client of `ctx`, with the call's
    /// deadline, cancellation, circuit breaker and one retry of an undelivered request.
    /// `extract` turns the answer into the expected result; `None` is an invalid answer.
    ///
    /// The call's future is boxed here. It holds the HTTP client's state and is several KiB;
    /// awaited inline, it would make the future of every call of `FederatedCatalog` as large,
    /// and that future is moved into a box of its own (the `Catalog` trait's) on every call,
    /// those for Haven's own tools included (BENCHMARKS.md, "A large future moved on every
    /// tool call").
    pub(crate) fn request<'a, T: Send + 'a>(
        &'a self,
        name: &'a str,
        method: &'a str,
        request: ClientRequest,
        ctx: &'a RequestContext,
        extract: impl Fn(ServerResult) -> Option<T> + Send + 'a,
    ) -> futures::future::BoxFuture<'a, Result<T, ErrorData>> {
        Box::pin(self.forward(name, method, request, ctx, extract))
    }

    async fn forward<T>(
        &self,
        name: &str,
        method: &str,
        mut request: ClientRequest,
        ctx: &RequestContext,
        extract: impl Fn(ServerResult) -> Option<T>,
    ) -> Result<T, ErrorData> {
        let entry = self.inner.entries.lock().get(name).cloned();
        let Some(entry) = entry else {
            return Err(Failure::new(Reason::NotConnected, "").to_client(name, method));
        };
        if entry.spec.disabled {
            return Err(Failure::new(Reason::Disabled, "").to_client(name, method));
        }
        let settings = self.inner.shared.settings();
        let timeout = entry.spec.timeout(settings.timeout_ms);
        let deadline = tokio::time::Instant::now() + timeout;
        let admit = admit(&entry, name, &settings)?;
        let started = std::time::Instant::now();
        // A client span for the call; its context goes to the upstream as
        // `_meta.traceparent`, so the upstream's span is its child. Like the request's span,
        // at `debug` for the log and always taken by a trace exporter.
        let span = tracing::debug_span!(
            target: haven_telemetry::trace::REQUEST_SPAN_TARGET,
            "mcp.client",
            otel.name = %format!("{method} {name}"),
            otel.kind = "client",
            mcp.method.name = method,
            haven.upstream = name,
        );
        if let Some(tp) = span.in_scope(haven_telemetry::trace::current_traceparent) {
            use rmcp::model::GetMeta as _;
            (request.get_meta_mut().0)
                .0
                .insert("traceparent".into(), serde_json::Value::String(tp));
        }
        let outcome = {
            use tracing::Instrument as _;
            deliver(&entry, name, &request, deadline, ctx)
                .instrument(span)
                .await
        };
        let call = CallAccount {
            entry: &entry,
            name,
            method,
            admit,
            settings,
            timeout_ms: timeout.as_millis() as u64,
        };
        let answer = call.settle(outcome, extract);
        if let Some(m) = haven_telemetry::get() {
            let outcome = if answer.is_ok() {
                haven_telemetry::Outcome::ok
            } else {
                haven_telemetry::Outcome::error
            };
            m.upstream_calls
                .get_or_create(&haven_telemetry::UpstreamCallLabels {
                    upstream: name.to_owned(),
                    outcome,
                })
                .observe(started.elapsed().as_secs_f64());
        }
        answer
    }
}

/// Lets a call to `entry` through its circuit breaker, or refuses it (counted as failed).
fn admit(entry: &Entry, name: &str, settings: &UpstreamSettings) -> Result<Admit, ErrorData> {
    let admitted = entry.st.lock().breaker.admit(Instant::now());
    admitted.map_err(|left| {
        entry.update(|st| st.calls_failed += 1);
        let message = if left.is_zero() {
            format!(
                "upstream '{name}' is failing (circuit breaker half-open, a trial call is running); try again shortly"
            )
        } else {
            format!(
                "upstream '{name}' is failing (circuit breaker open after {} consecutive failures); calls are refused for another {} ms",
                settings.breaker_failures,
                left.as_millis()
            )
        };
        client_error(name, Reason::CircuitOpen, None, message)
    })
}

/// Sends `request` on the upstream's connection (waiting for one until `deadline`); a request
/// that provably never reached an HTTP upstream is sent once more on a new connection.
async fn deliver(
    entry: &Entry,
    name: &str,
    request: &ClientRequest,
    deadline: tokio::time::Instant,
    ctx: &RequestContext,
) -> Result<Sent, NoConn> {
    let mut min_generation = 0;
    let mut retried = false;
    loop {
        let conn = wait_conn(entry, deadline, min_generation, ctx.cancelled()).await?;
        match send_once(&conn, request, deadline, ctx).await {
            Sent::NotDelivered(why) if entry.is_http() && !retried => {
                let why = why.detail_for(&entry.secrets.lock());
                tracing::debug!(upstream = name, %why, "request not delivered; reconnecting and retrying once");
                retried = true;
                entry.request_reconnect(conn.generation);
                min_generation = conn.generation + 1;
            }
            sent => return Ok(sent),
        }
    }
}

/// A call to an upstream that went through its circuit breaker, accounted for when it ends.
struct CallAccount<'a> {
    entry: &'a Entry,
    name: &'a str,
    method: &'a str,
    admit: Admit,
    settings: UpstreamSettings,
    timeout_ms: u64,
}

impl CallAccount<'_> {
    /// Accounts for how the call went (breaker, counters, backoff, last error) and turns it
    /// into the call's result.
    fn settle<T>(
        &self,
        outcome: Result<Sent, NoConn>,
        extract: impl Fn(ServerResult) -> Option<T>,
    ) -> Result<T, ErrorData> {
        let (name, method, timeout_ms) = (self.name, self.method, self.timeout_ms);
        let now = Instant::now();
        let timed_out = || {
            client_error(
                name,
                Reason::Timeout,
                None,
                format!("upstream '{name}' did not answer {method} within {timeout_ms} ms"),
            )
        };
        match outcome {
            Ok(Sent::Answered(result)) => match extract(*result) {
                Some(v) => {
                    self.entry.update(|st| {
                        st.calls_ok += 1;
                        st.breaker.success();
                        st.backoff_ms = INITIAL_BACKOFF_MS;
                        st.last_error = None;
                    });
                    Ok(v)
                }
                None => {
                    let why = format!("answered {method} with an invalid result");
                    Err(self.failed(now, Failure::new(Reason::Protocol, why)))
                }
            },
            Ok(Sent::UpstreamError(e)) => {
                self.entry.update(|st| {
                    st.calls_failed += 1;
                    st.breaker.success();
                    st.backoff_ms = INITIAL_BACKOFF_MS;
                });
                Err(forwarded(e, &self.entry.secrets.lock()))
            }
            Ok(Sent::NotDelivered(f)) | Ok(Sent::Failed(f)) => Err(self.failed(now, f)),
            Ok(Sent::Timeout) => {
                let why = format!("did not answer {method} within {timeout_ms} ms");
                self.failed(now, Failure::new(Reason::Timeout, why));
                Err(timed_out())
            }
            Ok(Sent::Cancelled) | Err(NoConn::Cancelled) => {
                self.entry.update(|st| st.breaker.release(self.admit));
                Err(cancelled_error())
            }
            Err(NoConn::Unavailable(reason, last, next_in)) => {
                self.not_sent();
                // The last connection failure says why (its reason and HTTP status; never its
                // details).
                let (reason, status) = match (&last, reason) {
                    (Some(f), Reason::Unreachable) => (f.reason, f.status),
                    _ => (reason, None),
                };
                let mut e = Failure {
                    reason,
                    status,
                    detail: String::new(),
                }
                .to_client(name, method);
                if let Some(ms) = next_in {
                    e.message =
                        format!("{}; the next connection attempt is in {ms} ms", e.message).into();
                }
                Err(e)
            }
            Err(NoConn::Timeout) => {
                self.not_sent();
                let mut e = timed_out();
                e.message = format!("{} (still connecting)", e.message).into();
                Err(e)
            }
        }
    }

    /// A call the upstream failed (at `now`): counted, kept as its last error (redacted),
    /// logged and reported to the circuit breaker; the client's error holds no details.
    fn failed(&self, now: Instant, failure: Failure) -> ErrorData {
        let cooldown = Duration::from_millis(self.settings.breaker_cooldown_ms);
        let threshold = self.settings.breaker_failures;
        let client = failure.to_client(self.name, self.method);
        let detail = failure.detail_for(&self.entry.secrets.lock());
        tracing::warn!(upstream = self.name, method = self.method, reason = failure.reason.as_str(), error = %detail, "upstream call failed");
        self.entry.update(|st| {
            st.calls_failed += 1;
            st.last_error = Some(failure);
            if st.breaker.failure(self.admit, now, threshold, cooldown) {
                tracing::warn!(upstream = self.name, "circuit breaker opened");
            }
        });
        client
    }

    /// A call that found no connection to send on: counted, and its breaker admission released
    /// (the upstream is not to blame for it).
    fn not_sent(&self) {
        self.entry.update(|st| {
            st.calls_failed += 1;
            st.breaker.release(self.admit);
        });
    }
}

/// Waits (until `deadline`) for a connection of at least `min_generation`. A connection in
/// backoff, a disabled or removed upstream fail at once.
async fn wait_conn(
    entry: &Entry,
    deadline: tokio::time::Instant,
    min_generation: u64,
    cancel: &CancellationToken,
) -> Result<Arc<Conn>, NoConn> {
    let mut rx = entry.changed.subscribe();
    loop {
        {
            let st = entry.st.lock();
            match st.phase {
                Phase::Connected => {
                    if let Some(c) = &st.conn
                        && c.generation >= min_generation
                    {
                        return Ok(c.clone());
                    }
                }
                Phase::Backoff { until } => {
                    let left = until.saturating_duration_since(Instant::now()).as_millis();
                    return Err(NoConn::Unavailable(
                        Reason::Unreachable,
                        st.last_error.clone(),
                        Some(left),
                    ));
                }
                Phase::Disabled => return Err(NoConn::Unavailable(Reason::Disabled, None, None)),
                Phase::Stopped | Phase::Held => {
                    return Err(NoConn::Unavailable(Reason::NotConnected, None, None));
                }
                Phase::Connecting => {}
            }
        }
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() {
                    return Err(NoConn::Unavailable(Reason::NotConnected, None, None));
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Err(NoConn::Timeout),
            _ = cancel.cancelled() => return Err(NoConn::Cancelled),
        }
    }
}

/// Sends `cancelled` for request `id` without waiting for it.
fn cancel_upstream(peer: &Peer<RoleClient>, id: rmcp::model::RequestId, reason: &str) {
    let peer = peer.clone();
    let param = rmcp::model::CancelledNotificationParam::new(Some(id), Some(reason.to_owned()));
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CANCEL_SEND_WAIT, peer.notify_cancelled(param)).await;
    });
}

async fn send_once(
    conn: &Conn,
    request: &ClientRequest,
    deadline: tokio::time::Instant,
    ctx: &RequestContext,
) -> Sent {
    if conn.done.is_cancelled() {
        return Sent::NotDelivered(Failure::new(
            Reason::Unreachable,
            "the connection is closed",
        ));
    }
    if let Some(direct) = &conn.direct
        && let Some(session) = direct.http.session()
    {
        return send_direct(conn, direct, &session, request, deadline, ctx).await;
    }
    let handle = match conn
        .peer
        .send_cancellable_request(request.clone(), PeerRequestOptions::no_options())
        .await
    {
        Ok(h) => h,
        Err(e) => {
            return Sent::NotDelivered(Failure::from_error("the connection is closed", &e));
        }
    };
    let id = handle.id.clone();
    let _route = {
        conn.progress
            .lock()
            .insert(handle.progress_token.clone(), ctx.clone());
        ProgressRoute {
            map: conn.progress.clone(),
            token: handle.progress_token.clone(),
        }
    };
    let answer = std::pin::pin!(async {
        match handle.rx.await {
            Ok(Ok(result)) => Sent::Answered(Box::new(result)),
            Ok(Err(e)) => classify(e),
            Err(_) => Sent::Failed(connection_lost()),
        }
    });
    await_answer(conn, id, deadline, ctx, answer).await
}

/// Waits for `answer` to request `id`, unless the connection ends, the deadline passes or
/// the client cancels first (the upstream is then sent `notifications/cancelled`). `answer`
/// is pinned by the caller: taken by value, it would be stored twice in this future (as the
/// argument, and in the `select!`).
async fn await_answer(
    conn: &Conn,
    id: rmcp::model::RequestId,
    deadline: tokio::time::Instant,
    ctx: &RequestContext,
    answer: std::pin::Pin<&mut impl Future<Output = Sent>>,
) -> Sent {
    tokio::select! {
        biased;
        sent = answer => sent,
        // The connection ended (a stdio child died, the transport closed): a request still
        // waiting will never be answered on it, so it fails now rather than at its deadline.
        _ = conn.done.cancelled() => Sent::Failed(connection_lost()),
        _ = tokio::time::sleep_until(deadline) => {
            cancel_upstream(&conn.peer, id, "timeout");
            Sent::Timeout
        }
        _ = ctx.cancelled().cancelled() => {
            cancel_upstream(&conn.peer, id, "cancelled by the client");
            Sent::Cancelled
        }
    }
}

/// [`send_once`] for an HTTP upstream whose session rmcp's worker has opened: the call is
/// posted from this task (`direct.rs`), with the same deadline, cancellation and progress
/// routing.
async fn send_direct(
    conn: &Conn,
    direct: &Direct,
    session: &Arc<crate::http::SessionContext>,
    request: &ClientRequest,
    deadline: tokio::time::Instant,
    ctx: &RequestContext,
) -> Sent {
    let (id, token) = crate::direct::new_id();
    let _route = {
        conn.progress.lock().insert(token.clone(), ctx.clone());
        ProgressRoute {
            map: conn.progress.clone(),
            token: token.clone(),
        }
    };
    // Encoded before the first wait, so that nothing of the request is kept in this call's
    // future while it waits.
    let encoded = match crate::http::encode_call(request, &id, token) {
        Ok(e) => e,
        Err(e) => return Sent::Failed(Failure::from_error("the request failed", &e)),
    };
    let answer = std::pin::pin!(async {
        match direct.call(session, &id, encoded).await {
            Outcome::Answered(result) => Sent::Answered(result),
            Outcome::UpstreamError(e) => Sent::UpstreamError(e),
            Outcome::NotDelivered(f) => Sent::NotDelivered(f),
            Outcome::Failed(f) => Sent::Failed(f),
        }
    });
    await_answer(conn, id.clone(), deadline, ctx, answer).await
}

fn classify(e: ServiceError) -> Sent {
    if connect::not_delivered(&e) {
        return Sent::NotDelivered(Failure::from_error("the request was not delivered", &e));
    }
    match e {
        ServiceError::McpError(err) => Sent::UpstreamError(err),
        ServiceError::UnexpectedResponse => Sent::Failed(Failure::new(
            Reason::Protocol,
            "answered with an unexpected result",
        )),
        ServiceError::TransportClosed => Sent::Failed(connection_lost()),
        ServiceError::Timeout { .. } => Sent::Timeout,
        other => Sent::Failed(Failure::from_error("the request failed", &other)),
    }
}

/// Fetches every list of the upstream (all pages) and publishes them.
async fn refresh_lists(
    shared: &Shared,
    entry: &Entry,
    peer: &Peer<RoleClient>,
) -> Result<(), Failure> {
    let name = entry.name();
    let caps = peer
        .peer_info()
        .map(|i| i.capabilities.clone())
        .unwrap_or_default();
    let mut lists = UpstreamLists::default();
    if caps.tools.is_some() {
        lists.tools = peer
            .list_all_tools()
            .await
            .map_err(|e| Failure::from_error("tools/list failed", &e))?;
    }
    if caps.prompts.is_some() {
        lists.prompts = peer
            .list_all_prompts()
            .await
            .map_err(|e| Failure::from_error("prompts/list failed", &e))?;
    }
    if caps.resources.is_some() {
        lists.resources = peer
            .list_all_resources()
            .await
            .map_err(|e| Failure::from_error("resources/list failed", &e))?;
        // Templates are optional even for servers with resources.
        lists.templates = match peer.list_all_resource_templates().await {
            Ok(t) => t,
            Err(ServiceError::McpError(e)) if e.code == ErrorCode::METHOD_NOT_FOUND => Vec::new(),
            Err(e) => return Err(Failure::from_error("resources/templates/list failed", &e)),
        };
    }
    let invalid = lists.invalid_names(name);
    if !invalid.is_empty() {
        tracing::warn!(
            upstream = name,
            names = ?invalid,
            "skipping tools/prompts whose served name would be invalid (longer than 128 characters or characters outside A-Z a-z 0-9 _ . -)"
        );
    }
    let counts = lists.served_counts(name);
    if entry.stop.is_cancelled() {
        return Ok(());
    }
    let changes = lists::publish(&*shared.store, name, lists)
        .await
        .map_err(|e| Failure::from_error("could not store the upstream's lists", &e))?;
    if !changes.is_empty() {
        tracing::info!(upstream = name, ?changes, "upstream lists changed");
    }
    entry.update(|st| st.counts = counts);
    Ok(())
}

/// Refreshes the lists whenever the upstream says one changed, until the connection ends.
async fn refresh_worker(
    shared: Arc<Shared>,
    entry: Arc<Entry>,
    conn: Arc<Conn>,
    wake: Arc<Notify>,
) {
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = conn.done.cancelled() => return,
            _ = entry.stop.cancelled() => return,
        }
        let limit = Duration::from_millis(shared.settings().timeout_ms);
        match tokio::time::timeout(limit, refresh_lists(&shared, &entry, &conn.peer)).await {
            Ok(Ok(())) => {}
            Ok(Err(f)) => entry.record_failure("refreshing upstream lists failed", f),
            Err(_) => {
                let e = format!("listing did not finish within {} ms", limit.as_millis());
                let f = Failure::new(Reason::Timeout, e);
                entry.record_failure("refreshing upstream lists failed", f);
            }
        }
    }
}

/// Keeps one upstream connected until the entry is stopped.
async fn supervise(shared: Arc<Shared>, entry: Arc<Entry>) {
    let name = entry.name().to_owned();
    let mut wait_first = false;
    let mut attempted = false;
    loop {
        if wait_first && !back_off(&shared, &entry, &name).await {
            break;
        }
        wait_first = true;
        if attempted {
            entry.update(|st| st.restarts += 1);
        }
        attempted = true;
        let (conn, wake) = match connect_once(&shared, &entry, &name).await {
            Attempt::Connected(conn, wake) => (conn, wake),
            Attempt::Failed => continue,
            Attempt::Stopped => break,
        };
        let worker = tokio::spawn(refresh_worker(
            shared.clone(),
            entry.clone(),
            conn.clone(),
            wake,
        ));
        let end = until_end(&entry, &conn).await;
        entry.update(|st| {
            st.conn = None;
            st.phase = Phase::Connecting;
            if matches!(end, End::Closed) {
                st.last_error = Some(Failure::new(
                    Reason::Unreachable,
                    "the connection to the upstream closed",
                ));
                // Logged below; reconnection attempts that fail for the same reason are the
                // same state.
                st.failing = Some(Failing {
                    attempts: 0,
                    reason: Reason::Unreachable,
                    logged: Instant::now(),
                });
            }
        });
        worker.abort();
        conn.close().await;
        match end {
            End::Stop => break,
            End::Closed => {
                tracing::warn!(upstream = %name, "upstream connection closed; reconnecting");
            }
            End::Reconnect => {
                tracing::info!(upstream = %name, "reconnecting to upstream");
                wait_first = false;
            }
        }
    }
    entry.update(|st| st.phase = Phase::Stopped);
}

/// Waits out the upstream's backoff before a reconnection (and doubles it, up to the
/// `upstream.restart_max_backoff_ms` setting, for the next one); false when the upstream is
/// stopped meanwhile.
async fn back_off(shared: &Shared, entry: &Entry, name: &str) -> bool {
    let max = shared.settings().restart_max_backoff_ms.max(1);
    let mut wait = 0;
    entry.update(|st| {
        wait = st.backoff_ms.min(max);
        st.backoff_ms = (wait.saturating_mul(2)).min(max);
        st.phase = Phase::Backoff {
            until: Instant::now() + Duration::from_millis(wait),
        };
    });
    tracing::debug!(upstream = %name, wait_ms = wait, "reconnecting after backoff");
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(wait)) => true,
        _ = entry.stop.cancelled() => false,
    }
}

/// How a connection attempt went.
enum Attempt {
    /// Connected and listed (or the listing failed, which is recorded): the connection and the
    /// notifier that asks its refresh worker to list again.
    Connected(Arc<Conn>, Arc<Notify>),
    /// The handshake failed (recorded as the upstream's last error).
    Failed,
    /// The upstream was stopped meanwhile.
    Stopped,
}

/// One connection attempt: the MCP handshake, then the first listing before calls are let
/// through, each bounded by the `upstream.connect_timeout_ms` setting (for a stdio upstream
/// that has not connected once yet, by `upstream.first_start_timeout_ms` if larger: its first
/// start may fetch packages).
async fn connect_once(shared: &Arc<Shared>, entry: &Arc<Entry>, name: &str) -> Attempt {
    let mut first_start = false;
    entry.update(|st| {
        st.phase = Phase::Connecting;
        first_start = !st.connected_once;
    });
    let settings = shared.settings();
    let limit_ms = if first_start && !entry.is_http() {
        settings
            .connect_timeout_ms
            .max(settings.first_start_timeout_ms)
    } else {
        settings.connect_timeout_ms
    };
    let connect_limit = Duration::from_millis(limit_ms);
    let wake = Arc::new(Notify::new());
    let progress: ProgressMap = Arc::new(Mutex::new(HashMap::new()));
    let handler = Handler {
        upstream: name.to_owned(),
        store: shared.store.clone(),
        refresh: wake.clone(),
        progress: progress.clone(),
        secrets: entry.secrets.clone(),
        stderr: entry.stderr.clone(),
    };
    let direct_handler = handler.clone();
    let attempt = tokio::select! {
        r = tokio::time::timeout(
            connect_limit,
            connect::open(&entry.spec, handler, &*shared.secrets, &settings, &shared.tls),
        ) => r,
        _ = entry.stop.cancelled() => return Attempt::Stopped,
    };
    let opened = match attempt {
        Ok(Ok(o)) => o,
        Ok(Err(f)) => {
            entry.connect_failed(f);
            return Attempt::Failed;
        }
        Err(_) => {
            let setting = if first_start && !entry.is_http() {
                "upstream.first_start_timeout_ms"
            } else {
                "upstream.connect_timeout_ms"
            };
            let e = format!(
                "did not complete the MCP handshake within {} ms (the {setting} setting)",
                connect_limit.as_millis()
            );
            let f = Failure::new(Reason::Timeout, e);
            entry.connect_failed(f);
            return Attempt::Failed;
        }
    };
    let generation = {
        let mut st = entry.st.lock();
        st.generation += 1;
        st.generation
    };
    let conn = Arc::new(Conn {
        peer: opened.peer,
        ct: opened.ct,
        done: opened.done,
        pid: opened.pid,
        generation,
        progress,
        direct: opened.http.map(|http| Direct {
            http,
            handler: direct_handler,
        }),
    });
    // The first listing, before calls are let through (bounded like the handshake).
    let listed = tokio::select! {
        r = tokio::time::timeout(connect_limit, refresh_lists(shared, entry, &conn.peer)) => r,
        _ = entry.stop.cancelled() => {
            conn.close().await;
            return Attempt::Stopped;
        }
    };
    let list_error = match listed {
        Ok(Ok(())) => None,
        Ok(Err(f)) => Some(f),
        Err(_) => Some(Failure::new(
            Reason::Timeout,
            format!(
                "listing did not finish within {} ms",
                connect_limit.as_millis()
            ),
        )),
    };
    if let Some(f) = &list_error {
        let detail = entry.redact(&f.detail);
        tracing::warn!(upstream = %name, reason = f.reason.as_str(), error = %detail, "listing the upstream failed");
    }
    let mut failed_attempts = 0;
    entry.update(|st| {
        st.conn = Some(conn.clone());
        st.phase = Phase::Connected;
        st.last_error = list_error;
        st.connected_once = true;
        failed_attempts = st.failing.take().map_or(0, |f| f.attempts);
    });
    if failed_attempts > 0 {
        tracing::info!(upstream = %name, pid = ?conn.pid, failed_attempts, "upstream connected");
    } else {
        tracing::info!(upstream = %name, pid = ?conn.pid, "upstream connected");
    }
    Attempt::Connected(conn, wake)
}

/// Why a connection's service ended.
enum End {
    /// The connection closed.
    Closed,
    /// The upstream was stopped.
    Stop,
    /// A call asked for a new connection (its request never reached this one).
    Reconnect,
}

/// Serves `conn` until it closes, the upstream is stopped, or a call asks for a reconnection
/// of this very connection.
async fn until_end(entry: &Entry, conn: &Conn) -> End {
    loop {
        tokio::select! {
            _ = conn.done.cancelled() => return End::Closed,
            _ = entry.stop.cancelled() => return End::Stop,
            _ = entry.reconnect.notified() => {
                if entry.st.lock().reconnect_for.take() == Some(conn.generation) {
                    return End::Reconnect;
                }
            }
        }
    }
}

/// Applies the current registry entry of `name` (`None`: removed).
async fn apply(pool: &Arc<Pool>, name: &str, spec: Option<UpstreamSpec>) {
    let existing = pool.entries.lock().get(name).cloned();
    if let (Some(e), Some(s)) = (&existing, &spec)
        && e.spec == *s
    {
        return;
    }
    // Replace (or remove) the old entry; its connection closes in the background.
    if let Some(old) = existing {
        pool.entries.lock().remove(name);
        // Stop at once (no more list refreshes); the connection closes in the background.
        old.stop.cancel();
        let closing = tokio::spawn(async move { old.stop().await });
        let mut tasks = pool.tasks.lock();
        tasks.retain(|t| !t.is_finished());
        tasks.push(closing);
    }
    let served = spec.as_ref().is_some_and(|s| !s.disabled);
    if let Some(spec) = spec {
        let entry = Entry::new(spec, pool.shared.held);
        if let Some(warning) = entry.spec.credentials_conflict() {
            tracing::warn!(upstream = name, "{warning}");
        }
        if !entry.spec.disabled && pool.shared.held {
            tracing::info!(
                upstream = name,
                "upstream held: not started on this node (--hold-upstreams)"
            );
        } else if !entry.spec.disabled {
            tracing::info!(upstream = name, "starting upstream");
            let task = tokio::spawn(supervise(pool.shared.clone(), entry.clone()));
            *entry.supervisor.lock() = Some(task);
        }
        pool.entries.lock().insert(name.to_owned(), entry);
    }
    if !served {
        tracing::info!(
            upstream = name,
            "upstream removed or disabled; withdrawing its lists"
        );
        pool.lists_cache.lock().remove(name);
        if let Err(e) = lists::remove(&*pool.shared.store, name).await {
            tracing::warn!(upstream = name, error = %e, "could not delete the upstream's list record");
        }
    }
}

async fn reconcile_all(pool: &Arc<Pool>) -> Result<(), StoreError> {
    let store = pool.shared.store.clone();
    let specs: BTreeMap<String, UpstreamSpec> = lists::registered(&*store)
        .await?
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let known: Vec<String> = pool.entries.lock().keys().cloned().collect();
    for name in known {
        if !specs.contains_key(&name) {
            apply(pool, &name, None).await;
        }
    }
    for (name, spec) in &specs {
        apply(pool, name, Some(spec.clone())).await;
    }
    // List records of upstreams that are gone (removed while no node ran, say).
    for name in lists::scan_all(&*store, LISTS_NS).await?.into_keys() {
        if specs.get(&name).is_none_or(|s| s.disabled) {
            lists::remove(&*store, &name).await?;
        }
    }
    Ok(())
}

/// Follows the change feed and applies registry changes as they are committed.
async fn watch_registry(
    pool: Arc<Pool>,
    mut feed: broadcast::Receiver<Arc<haven_state::LogEntry>>,
) {
    let mut need_full = true;
    loop {
        if need_full {
            match reconcile_all(&pool).await {
                Ok(()) => need_full = false,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the upstream registry failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = pool.shutdown.cancelled() => return,
                    }
                }
            }
        }
        let entry = tokio::select! {
            r = feed.recv() => r,
            _ = pool.shutdown.cancelled() => return,
        };
        match entry {
            Ok(e) => {
                let Change::Record(r) = &e.change else {
                    continue;
                };
                if r.namespace != REGISTRY_NS {
                    continue;
                }
                let key = r.key.clone();
                let current = match pool.shared.store.get(REGISTRY_NS, &key).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading a registry entry failed");
                        need_full = true;
                        continue;
                    }
                };
                let spec = current.and_then(|c| lists::decode_spec(&key, c.value()));
                apply(&pool, &key, spec).await;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => need_full = true,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
