//! The protocol engine: takes classified JSON-RPC messages from a transport, runs them against
//! the catalog, and answers with a protocol outcome ([`Reply`]: accepted, one JSON body with its
//! classification, an SSE stream, or a [`Rejection`]); it never chooses an HTTP status. Sessions, stream events, tasks and replies to server-to-client requests all go
//! through the store, so any node can pick up where another left off.

mod dispatch;
mod legacy;
pub mod membership;
mod mrtr;
mod recovery;
mod stateless;
pub mod tasks;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use haven_state::Store;
use parking_lot::{Mutex, RwLock};
use rmcp::model::{ErrorData, RequestId, Tool};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, CatalogInfo};
use crate::context::{ANNOUNCE_NS, Announcement, Final};
use crate::hub::{Hub, Topic};
use crate::keyring::{Keyring, KeyringError, Secrets};
pub use crate::outcome::{Answer, Reason, Rejection};

pub use legacy::LegacyPost;

/// The W3C trace context HTTP headers of a request (`traceparent`, `tracestate`), as the
/// transport read them: the parent of the request's span when `params._meta.traceparent`
/// names none.
#[derive(Clone, Debug, Default)]
pub struct TraceHeaders {
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `tracestate`.
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The parent of a request's span and its `tracestate`: `_meta.traceparent` (already
    /// checked) when there is one, else these headers' valid `traceparent`.
    pub(crate) fn parent(self, meta: Option<String>) -> (Option<String>, Option<String>) {
        match meta {
            Some(m) => (Some(m), None),
            None => match self.traceparent {
                Some(t) if haven_telemetry::trace_id_of(&t).is_some() => (Some(t), self.tracestate),
                _ => (None, None),
            },
        }
    }
}
pub use stateless::{
    StatelessHeaders, StatelessPost, decode_header_value, is_stateless, supported_versions,
};

/// Legacy protocol versions served with sessions, oldest first.
pub const LEGACY_VERSIONS: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25"];
/// The newest legacy version, answered when a client asks for one Haven does not know.
pub const LATEST_LEGACY: &str = "2025-11-25";
/// Stateless protocol versions.
pub const STATELESS_VERSIONS: &[&str] = &["2026-07-28"];

/// A protocol version value from its text.
pub(crate) fn protocol_version(v: &str) -> rmcp::model::ProtocolVersion {
    serde_json::from_value(serde_json::Value::String(v.to_owned()))
        .expect("any string is a version")
}

/// Whether `v` is a legacy (session) protocol version.
pub fn is_legacy_version(v: &str) -> bool {
    LEGACY_VERSIONS.contains(&v) || v == "2024-11-05"
}

/// How legacy requests are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyResponses {
    /// A request that finishes quickly and sends nothing before its result is answered with
    /// one JSON body; anything else gets a resumable SSE stream.
    Adaptive,
    /// Every request that may stream (tools/call, prompts/get, resources/read, tasks/result)
    /// gets a resumable SSE stream, each event stored before it is sent.
    Sse,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's id.
    pub node_id: String,
    /// A random id of this process, so that records of a dead process can be told apart.
    pub boot_id: String,
    /// Items per page of list results.
    pub page_size: usize,
    /// How long an idle legacy session lives.
    pub session_ttl: Duration,
    /// Legacy response mode.
    pub legacy_responses: LegacyResponses,
    /// How long an adaptive legacy request may run before its response becomes a stream.
    pub stream_after: Duration,
    /// How long a handler waits for the client to answer a server-to-client request.
    pub client_reply_timeout: Duration,
    /// Default and maximum task time-to-live.
    pub task_ttl: Duration,
    /// Suggested task poll interval.
    pub task_poll_interval: Duration,
    /// `retry:` hint sent on SSE streams, in milliseconds.
    pub sse_retry_millis: u64,
    /// Interval of SSE keep-alive comments on idle streams.
    pub keep_alive: Duration,
    /// Cache hint (`ttlMs`) on list and read results of the stateless era.
    pub list_ttl_millis: u64,
    /// Lifetime of a sealed `requestState`.
    pub request_state_ttl: Duration,
    /// How often this node writes its heartbeat and looks for dead nodes' work.
    pub heartbeat_interval: Duration,
    /// How long a node's heartbeat may stay unchanged (on this node's clock) before the node
    /// is dead.
    pub heartbeat_ttl: Duration,
    /// Largest clock offset between nodes that is not reported as skew.
    pub max_clock_skew: Duration,
    /// Presence on the store's connection (the JetStream backend): this process answers
    /// probes on it, and probes nodes whose heartbeat went silent, so that a killed node's
    /// work is taken over before the time-to-live runs out (`haven_cluster::Membership`).
    /// `None`: liveness by the time-to-live only.
    pub presence: Option<Arc<dyn haven_state::Presence>>,
    /// `retry:` hint sent when a draining node ends a legacy stream, in milliseconds.
    pub drain_retry_millis: u64,
    /// Whether this node may settle work left by processes that are gone, asked before each
    /// recovery (`None`: always). A multi-region node waits until it has applied every other
    /// region's log once, so that a takeover another region made meanwhile is seen first.
    pub recovery_gate: Option<RecoveryGate>,
    /// Catches this node up with every other region's log as it ends now (bounded), and
    /// names the regions it could not catch up with that were heard recently (`None`: one
    /// region). A session or task not found here may have just been made in another region
    /// (a load balancer moved its client between regions): it is looked up again once caught
    /// up. If it is still not found, a region that is not the active one (clients reach it
    /// while the active region is not preferred) answers 503, retry: it may lack the active
    /// region's latest writes even before it notices that it cannot hear it. The active
    /// region (or, with no active region, any region) answers "not found", unless it could
    /// not catch up with a region heard recently, which may have served clients while this
    /// one was not preferred: then 503 too.
    pub region_sync: Option<RegionSync>,
    /// This node's region lease (three regions or more): executions opened while it holds
    /// may be taken over by another region, and write only while it holds
    /// (`haven_cluster::takeover`).
    pub region_lease: Option<haven_cluster::RegionLease>,
    /// Limits on what a client controls, changed at runtime by the `limits.*` settings.
    pub limits: Arc<crate::limits::ClientLimits>,
    /// The audit log: tool calls are recorded in it while `audit.tool_calls` is on.
    pub audit: Option<haven_audit::Audit>,
    /// The authorization rules (`haven auth rules`): lists are filtered through them and a
    /// call outside them is answered as if its tool, resource or prompt did not exist. `None`
    /// allows everything.
    pub policy: Option<haven_auth::Policy>,
}

/// See [`EngineConfig::region_sync`].
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct RegionSync(
    pub Arc<dyn Fn() -> futures::future::BoxFuture<'static, Vec<String>> + Send + Sync>,
);

impl std::fmt::Debug for RegionSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegionSync")
    }
}

/// See [`EngineConfig::recovery_gate`].
#[derive(Clone)]
pub struct RecoveryGate(pub Arc<dyn Fn() -> bool + Send + Sync>);

impl std::fmt::Debug for RecoveryGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryGate")
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            node_id: "node-1".into(),
            boot_id: format!("{:016x}", haven_state::ids::random_u64()),
            page_size: 100,
            session_ttl: Duration::from_secs(24 * 3600),
            legacy_responses: LegacyResponses::Adaptive,
            stream_after: Duration::from_millis(25),
            client_reply_timeout: Duration::from_secs(300),
            task_ttl: Duration::from_secs(3600),
            task_poll_interval: Duration::from_millis(500),
            sse_retry_millis: 1000,
            keep_alive: Duration::from_secs(15),
            list_ttl_millis: 5000,
            request_state_ttl: Duration::from_secs(3600),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_ttl: Duration::from_secs(5),
            max_clock_skew: Duration::from_millis(500),
            presence: None,
            drain_retry_millis: 250,
            recovery_gate: None,
            region_sync: None,
            region_lease: None,
            limits: Arc::default(),
            audit: None,
            policy: None,
        }
    }
}

/// One frame of an SSE response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SseFrame {
    /// An event: optional id and retry hint, and the data (one JSON-RPC message, or empty for
    /// a priming event).
    Event {
        /// Event id (legacy resumable streams only).
        id: Option<String>,
        /// Reconnection delay hint in milliseconds.
        retry: Option<u64>,
        /// The message.
        data: String,
    },
    /// A comment, to keep idle connections open.
    Comment(String),
}

/// The engine's answer, for the transport to put on the wire. It says what happened in
/// protocol terms; which HTTP status that is, is the transport's business.
pub enum Reply {
    /// The message was taken; there is nothing to answer (a notification or a client reply).
    Accepted,
    /// One JSON-RPC response; `session` is set on a new session's response.
    Json {
        /// JSON text.
        body: String,
        /// What the response says (result, or which error).
        answer: Answer,
        /// Session id to hand back.
        session: Option<String>,
    },
    /// An SSE stream; once it started, even a failure arrives as its final event.
    Stream(BoxStream<'static, SseFrame>),
    /// The session was ended; nothing to answer.
    SessionEnded,
    /// The request was refused, or could not be answered normally.
    Rejected(Rejection),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Accepted => write!(f, "Accepted"),
            Reply::Json { answer, body, .. } => write!(f, "Json({answer:?}, {body})"),
            Reply::Stream(_) => write!(f, "Stream"),
            Reply::SessionEnded => write!(f, "SessionEnded"),
            Reply::Rejected(r) => write!(f, "Rejected({r:?})"),
        }
    }
}

impl From<Rejection> for Reply {
    fn from(r: Rejection) -> Reply {
        Reply::Rejected(r)
    }
}

impl From<Final> for Reply {
    fn from(f: Final) -> Reply {
        Reply::Json {
            body: f.message,
            answer: f.answer,
            session: None,
        }
    }
}

/// Refuses requests that only the legacy era has (opening or resuming a stream, ending a
/// session) when they name another era's protocol version.
fn legacy_only(protocol_version: Option<&str>) -> Option<Reply> {
    protocol_version
        .is_some_and(|v| !is_legacy_version(v))
        .then(|| Rejection::method_not_allowed().into())
}

/// The catalog's tools and their positions by name.
type ToolIndex = (Arc<Vec<Tool>>, Arc<HashMap<String, usize>>);

/// Tools of the catalog, cached until the catalog announces a change.
#[derive(Default)]
struct ToolCache {
    tools: Option<ToolIndex>,
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    catalog: Arc<dyn Catalog>,
    info: CatalogInfo,
    hub: Hub,
    keyring: Keyring,
    config: EngineConfig,
    /// Cancellation tokens of requests running on this node, by `session/request-id`.
    running: Mutex<HashMap<String, CancellationToken>>,
    tools: RwLock<ToolCache>,
    /// Recently used legacy sessions.
    sessions: crate::session::SessionCache,
    /// Legacy sessions created here and still live (`limits.max_sessions_per_node`).
    pub(crate) session_count: crate::session::SessionCount,
    /// Other nodes, from their heartbeat records.
    membership: Arc<haven_cluster::Membership>,
    /// Ownership keys of the executions this process runs (an execution of this process
    /// that is not here was left without a final answer, and is settled).
    executions: Runs,
    /// Cancelled when the node starts draining.
    shutdown: CancellationToken,
    /// Cancelled when the engine is killed: every task it spawned stops at its next await.
    killed: CancellationToken,
}

/// A request's handler, running in its own task.
pub(crate) struct Running {
    /// Its items, in order; the last is the final answer.
    pub rx: tokio::sync::mpsc::UnboundedReceiver<crate::context::Item>,
    /// Cancels it.
    pub cancel: CancellationToken,
    /// The `traceparent` of its server span when sampled: stored with work another node may
    /// continue (see [`dispatch::Call::trace`]).
    pub trace: Option<String>,
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The request-state keyring could not be loaded.
    #[error("loading the request-state keyring: {0}")]
    Keyring(#[from] KeyringError),
    /// The store failed (during recovery).
    #[error(transparent)]
    Store(#[from] haven_state::StoreError),
}

/// The protocol engine of one node. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts an engine on `store` serving `catalog`: loads the keyring (its key material is
    /// kept in `secrets`), starts the change hub, and recovers what a previous process of this
    /// node left in flight.
    pub async fn start(
        store: Arc<dyn Store>,
        catalog: Arc<dyn Catalog>,
        config: EngineConfig,
        secrets: Secrets,
    ) -> Result<Engine, StartError> {
        let hub = Hub::new();
        hub.start(store.clone());
        let keyring = Keyring::load(store.clone(), secrets).await?;
        let info = catalog.info();
        let membership = haven_cluster::Membership::new(
            store.clone(),
            haven_cluster::MembershipConfig {
                node_id: config.node_id.clone(),
                boot_id: config.boot_id.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                interval: config.heartbeat_interval,
                ttl: config.heartbeat_ttl,
                max_skew: config.max_clock_skew,
            },
        );
        if let Some(lease) = &config.region_lease {
            membership.set_region_lease(lease.clone());
        }
        if let Some(presence) = &config.presence {
            // Before the first heartbeat, which says that this process answers probes.
            membership
                .set_presence(presence.clone())
                .await
                .map_err(StartError::from)?;
        }
        let inner = Arc::new(Inner {
            store,
            catalog,
            info,
            hub,
            keyring,
            config,
            running: Mutex::new(HashMap::new()),
            tools: RwLock::new(ToolCache::default()),
            sessions: crate::session::SessionCache::default(),
            session_count: crate::session::SessionCount::default(),
            membership,
            executions: Runs::default(),
            shutdown: CancellationToken::new(),
            killed: CancellationToken::new(),
        });
        let engine = Engine { inner };
        engine.watch_announcements();
        engine.watch_sessions();
        engine.sweep_sessions();
        engine.watch_keys();
        // Heartbeat once and read the others' before judging anyone dead.
        // In a cluster (a shared store), heartbeat once and read the others' before judging
        // anyone dead; an embedded store has one node and needs no heartbeats.
        let shared = engine.inner.store.shared();
        if shared {
            membership::watch_heartbeats(&engine.inner);
            if let Err(e) = engine.inner.membership.beat().await {
                tracing::warn!(error = %e, "storing the first heartbeat failed; retrying in the background");
            }
        }
        recovery::recover(&engine.inner).await?;
        if shared {
            membership::start(&engine.inner);
        }
        Ok(engine)
    }

    /// The store the engine writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Takes over the running work of region `region` (another region, declared lost by an
    /// operator: every process of it stopped): each of its executions held here is settled
    /// by this node as if its owner were a dead node of this region (an idempotent tool call
    /// runs again, any other request ends with the "interrupted" error, tasks are adopted),
    /// under epoch + 1. Returns how many executions were taken.
    ///
    /// `claimable_only`: only the executions another region may take over (opened while
    /// their node held its region lease), and no standalone streams — what an automatic
    /// takeover claims once that region's lease has run out (`haven_cluster::takeover`).
    pub async fn take_over_region(
        &self,
        region: &str,
        claimable_only: bool,
    ) -> Result<usize, haven_state::StoreError> {
        recovery::take_over_region(&self.inner, region, claimable_only).await
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The request-state keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    /// The secrets service (envelope-encrypted values in the store).
    pub fn secrets(&self) -> &Secrets {
        self.inner.keyring.secrets()
    }

    /// The nodes of this region, from their heartbeat records, as this node judges them.
    pub fn members(&self) -> Vec<membership::Member> {
        if !self.inner.store.shared() {
            // One node: itself.
            return vec![self.inner.membership.me()];
        }
        self.inner.membership.members()
    }

    /// The largest clock offset to another live node (milliseconds), and whether it exceeds
    /// the allowed skew.
    pub fn clock_skew(&self) -> Option<(u64, bool)> {
        let max = self.inner.config.max_clock_skew.as_millis() as u64;
        self.inner
            .membership
            .max_clock_offset()
            .map(|o| (o, o > max))
    }

    /// Stops every task of this engine at its next await, as the death of the process would
    /// (simulations kill nodes with it; its store must refuse writes from then on too).
    pub fn kill(&self) {
        self.inner.killed.cancel();
        self.inner.shutdown.cancel();
    }

    /// Starts draining: `/readyz` fails, the heartbeat says so, and open legacy streams end
    /// with a reconnection hint. Running requests go on.
    pub async fn begin_drain(&self) {
        self.inner.membership.set_draining();
        self.inner.shutdown.cancel();
        if self.inner.store.shared() {
            let _ = self.inner.membership.beat().await;
        }
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Requests running on this node.
    pub fn running_requests(&self) -> usize {
        self.inner.running.lock().len()
    }

    /// Executions (request streams and tasks this node runs under an ownership record)
    /// running on this node.
    pub fn running_executions(&self) -> usize {
        self.inner.executions.0.lock().len()
    }

    /// Topics of the change hub somebody waits on now (requests, streams, sessions).
    pub fn hub_topics(&self) -> usize {
        self.inner.hub.topics()
    }

    /// Legacy sessions this node created that are still live, as far as it knows
    /// (`limits.max_sessions_per_node`).
    pub fn live_sessions(&self) -> usize {
        self.inner
            .session_count
            .live(self.inner.store.clock().wall_millis())
    }

    /// Sessions held in this node's session cache (expired ones are dropped as it fills).
    pub fn cached_sessions(&self) -> usize {
        self.inner.sessions.len()
    }

    /// Ends draining: the in-flight records of this process's standalone GET streams are
    /// deleted (a clean stop leaves nothing to settle), and the last heartbeat says the node
    /// left, so that other nodes take over what is left unfinished at once instead of after
    /// the heartbeat's time-to-live.
    pub async fn leave(&self) {
        if let Err(e) = recovery::release_standalone_streams(&self.inner).await {
            tracing::warn!(error = %e, "could not release this node's standalone streams");
        }
        if self.inner.store.shared() {
            self.inner.membership.leave().await;
        }
    }

    /// Handles a POST of the legacy era.
    pub async fn legacy_post(&self, post: LegacyPost) -> Reply {
        legacy::post(&self.inner, post).await
    }

    /// Handles a GET of the legacy era (standalone stream or resumption); another era's
    /// protocol version is refused (the stateless era has no streams to open).
    pub async fn legacy_get(
        &self,
        session: Option<&str>,
        protocol_version: Option<&str>,
        last_event_id: Option<&str>,
        principal: &haven_auth::Principal,
    ) -> Reply {
        if let Some(refused) = legacy_only(protocol_version) {
            return refused;
        }
        legacy::get(
            &self.inner,
            session,
            protocol_version,
            last_event_id,
            principal,
        )
        .await
    }

    /// Handles a DELETE of the legacy era (ends the session); another era's protocol version is
    /// refused (the stateless era has no sessions).
    pub async fn legacy_delete(
        &self,
        session: Option<&str>,
        protocol_version: Option<&str>,
        principal: &haven_auth::Principal,
    ) -> Reply {
        if let Some(refused) = legacy_only(protocol_version) {
            return refused;
        }
        legacy::delete(&self.inner, session, principal).await
    }

    /// Handles a POST of the stateless era.
    pub async fn stateless_post(&self, post: StatelessPost) -> Reply {
        stateless::post(&self.inner, post).await
    }

    /// Drops the cached tools when the tool list changes (on any node), and when the hub
    /// missed changes that may have said so. Other announcements leave the cache alone.
    fn watch_announcements(&self) {
        let tools = Topic::key(ANNOUNCE_NS, &Announcement::ToolsChanged.key());
        self.inner.on_change(tools, |inner, _| async move {
            inner.tools.write().tools = None;
        });
    }

    fn watch_sessions(&self) {
        let sessions = Topic::Namespace(crate::session::SESSIONS_NS.into());
        self.inner.on_change(sessions, |inner, entry| async move {
            match entry.as_deref().map(|e| &e.change) {
                Some(haven_state::Change::Record(r)) => {
                    inner.sessions.invalidate(&r.key);
                    // Ended or renewed through any node: the count here follows.
                    match r.expires_at_millis {
                        _ if r.is_tombstone() => inner.session_count.end(&r.key),
                        Some(at) => inner.session_count.renew(&r.key, at),
                        None => {}
                    }
                }
                Some(haven_state::Change::Event(_)) => {}
                // Changes were missed: forget everything rather than serve stale state.
                None => inner.sessions.clear(),
            }
        });
    }

    /// Every 10 s, drops the expired sessions from the session cache (in the background, so
    /// that no request's path scans the cache).
    fn sweep_sessions(&self) {
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let now = inner.store.clock().wall_millis();
                inner.sessions.drop_expired(now);
                inner.session_count.live(now);
            }
        });
    }

    fn watch_keys(&self) {
        let keys = Topic::Namespace(crate::keyring::KEYS_NS.into());
        self.inner.on_change(keys, |inner, _| async move {
            if let Err(e) = inner.keyring.reload().await {
                tracing::error!(error = %e, "reloading the request-state keyring failed");
            }
        });
    }
}

impl Inner {
    /// Spawns a task of this engine: it stops when the engine is killed.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let killed = self.killed.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                () = killed.cancelled() => {}
                () = fut => {}
            }
        });
    }

    /// Calls `on_change` with every change of `topic` that the hub routes (`None` when the hub
    /// missed changes, which may have been of it), for as long as the engine lives. The
    /// subscription is made at once.
    pub(crate) fn on_change<F, Fut>(self: &Arc<Self>, topic: Topic, on_change: F)
    where
        F: Fn(Arc<Inner>, Option<Arc<haven_state::LogEntry>>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let weak = Arc::downgrade(self);
        let mut rx = self.hub.subscribe(topic);
        self.spawn(async move {
            loop {
                let entry = match rx.recv().await {
                    Ok(e) => Some(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                let Some(inner) = weak.upgrade() else { break };
                on_change(inner, entry).await;
            }
        });
    }

    /// Starts a request's handler in its own task. Its items arrive on the returned channel;
    /// it is registered as running (so that cancellation reaches it) until it ends. `fence`
    /// is the store view its writes go through (a request that may be taken over).
    pub(crate) fn spawn_handler(
        self: &Arc<Self>,
        mut call: dispatch::Call,
        fence: Option<Arc<haven_cluster::FencedStore>>,
    ) -> Running {
        // The span is made here, so that the caller knows its context before it runs.
        let span = dispatch::request_span(self, &call);
        call.trace = haven_telemetry::trace::sampled_traceparent_of(&span);
        let trace = call.trace.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let key = call.era.session().map(|s| Inner::running_key(s, &call.id));
        if let Some(k) = &key {
            self.running.lock().insert(k.clone(), cancel.clone());
        }
        let inner = self.clone();
        let token = cancel.clone();
        // A handler runs at most `limits.max_call_ms`: then it is cancelled.
        let limit = self.config.limits.max_call();
        let timer = {
            let token = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                if !token.is_cancelled() {
                    tracing::info!(
                        limit_ms = limit.as_millis() as u64,
                        "cancelling a request that ran for limits.max_call_ms"
                    );
                    token.cancel();
                }
            })
        };
        self.spawn(async move {
            dispatch::run(inner.clone(), call, tx, token, fence, Some(span)).await;
            timer.abort();
            if let Some(k) = key {
                inner.running.lock().remove(&k);
            }
        });
        Running { rx, cancel, trace }
    }

    /// The catalog's tools and an index by name (cached).
    async fn tool_index(
        &self,
        ctx: &crate::context::RequestContext,
    ) -> Result<ToolIndex, ErrorData> {
        if let Some(t) = self.tools.read().tools.clone() {
            return Ok(t);
        }
        let tools = self.catalog.tools(ctx).await?;
        let index: HashMap<String, usize> = tools
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.to_string(), i))
            .collect();
        let entry = (Arc::new(tools), Arc::new(index));
        self.tools.write().tools = Some(entry.clone());
        Ok(entry)
    }

    /// Whether the cached tool index lists `name` (false while the cache is cold).
    pub(crate) fn knows_tool(&self, name: &str) -> bool {
        self.tools
            .read()
            .tools
            .as_ref()
            .is_some_and(|(_, index)| index.contains_key(name))
    }

    /// The name of the tool `name` as the cached index lists it (borrowed when the catalog's
    /// is), for a metric's label; `None` when the index does not list it or is cold.
    pub(crate) fn tool_label(&self, name: &str) -> Option<std::borrow::Cow<'static, str>> {
        let guard = self.tools.read();
        let (tools, index) = guard.tools.as_ref()?;
        index.get(name).map(|i| tools[*i].name.clone())
    }

    /// The tool index, built with a context for `call` when the cache is cold.
    async fn tools_for(&self, call: &dispatch::Call) -> Result<ToolIndex, ErrorData> {
        if let Some(t) = self.tools.read().tools.clone() {
            return Ok(t);
        }
        let ctx = crate::context::RequestContext::new(
            self.store.clone(),
            call.era.clone(),
            call.caller.clone(),
            None,
            None,
            CancellationToken::new(),
        );
        self.tool_index(&ctx).await
    }

    fn running_key(session: &str, id: &RequestId) -> String {
        format!("{session}/{id}")
    }
}

/// Maps a store failure to the JSON-RPC error a client sees (marked retryable when the store
/// is unavailable, see [`crate::outcome::store_failure`]).
/// The executions this process runs, counted per ownership key: a run that was fenced (its
/// successor may be a run of this same process) and ends late must not make its successor
/// look gone, so every `begin` is matched by exactly one `end` and a key counts as running
/// while any of its runs does.
#[derive(Default)]
pub(crate) struct Runs(Mutex<HashMap<String, usize>>);

impl Runs {
    /// A run of `key` starts here.
    pub(crate) fn begin(&self, key: &str) {
        *self.0.lock().entry(key.to_owned()).or_insert(0) += 1;
    }

    /// A run of `key` that [`Runs::begin`] counted ended.
    pub(crate) fn end(&self, key: &str) {
        let mut runs = self.0.lock();
        if let Some(n) = runs.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                runs.remove(key);
            }
        }
    }

    /// Whether any run of `key` is going on here.
    pub(crate) fn contains(&self, key: &str) -> bool {
        self.0.lock().contains_key(key)
    }
}

/// A session or task that was not found here, looked up again once this node caught up with
/// the other regions (see [`EngineConfig::region_sync`]): `Ok(Some)` when found then,
/// `Ok(None)` when it does not exist (this node's answer stands), `Err` with what to answer
/// instead (retry).
pub(crate) async fn look_again<T, F, Fut>(
    inner: &Inner,
    what: &str,
    load: F,
) -> Result<Option<T>, (String, haven_state::StoreError)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, haven_state::StoreError>>,
{
    let Some(sync) = inner.config.region_sync.as_ref() else {
        return Ok(None);
    };
    let behind = (sync.0)().await;
    match load().await {
        Ok(Some(found)) => return Ok(Some(found)),
        Ok(None) => {}
        Err(e) => return Err((format!("{what} could not be read: {e}"), e)),
    }
    let here = &inner.store.origin().region;
    let active = match haven_cluster::regions::read_roles(&*inner.store).await {
        Ok((roles, _)) => roles.active,
        Err(_) => Some("unknown".to_owned()),
    };
    let Some(active) = active.filter(|a| **a != **here) else {
        if behind.is_empty() {
            return Ok(None);
        }
        let message = format!(
            "{what} is not known in region {here}, which cannot hear region(s) {} now, where it may have been made. Retry later.",
            behind.join(", ")
        );
        let e = haven_state::StoreError::Unavailable(message.clone());
        return Err((message, e));
    };
    let message = format!(
        "{what} is not known in region {here}, which is not the active region ({active}){}: it may have been made there. Retry later.",
        if behind.is_empty() {
            String::new()
        } else {
            format!(
                " and has not caught up with region(s) {}",
                behind.join(", ")
            )
        }
    );
    let e = haven_state::StoreError::Unavailable(message.clone());
    Err((message, e))
}

pub(crate) fn store_error(e: haven_state::StoreError) -> ErrorData {
    let message = match &e {
        haven_state::StoreError::Full(_) => {
            "The server's storage is full; the request was not applied. Retry later.".to_owned()
        }
        haven_state::StoreError::Unavailable(_) | haven_state::StoreError::Closed => {
            "The server's storage is unavailable; the request was not applied. Retry later."
                .to_owned()
        }
        _ => format!("Storage error: {e}"),
    };
    crate::outcome::store_failure(message, &e)
}

#[cfg(test)]
mod tests {
    use super::TraceHeaders;

    #[test]
    fn meta_wins_over_the_trace_headers_and_invalid_headers_are_ignored() {
        let meta = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
        let header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let h = |tp: &str| TraceHeaders {
            traceparent: Some(tp.to_owned()),
            tracestate: Some("v=1".into()),
        };
        assert_eq!(h(&header).parent(Some(meta.clone())), (Some(meta), None));
        assert_eq!(
            h(&header).parent(None),
            (Some(header.clone()), Some("v=1".into()))
        );
        assert_eq!(h("00-garbage").parent(None), (None, None));
        assert_eq!(TraceHeaders::default().parent(None), (None, None));
    }
}
