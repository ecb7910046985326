//! What a handler may do while it runs: report progress, log, learn who calls, watch for
//! cancellation, and announce list changes.

use std::sync::Arc;

use haven_state::{Batch, Store, StoreError};
use rmcp::model::{ClientCapabilities, LoggingLevel, ProgressToken};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::Caller;
use crate::jsonrpc;

/// Namespace of announcement records (list changes, resource updates).
pub const ANNOUNCE_NS: &str = "announce";

/// Which protocol era a request belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Era {
    /// A legacy (initialize + session) request.
    Legacy {
        /// Session id.
        session: String,
        /// Negotiated protocol version.
        protocol_version: String,
    },
    /// A stateless 2026-07-28 request.
    Stateless {
        /// Protocol version from `_meta`.
        protocol_version: String,
    },
}

impl Era {
    /// Whether the request is stateless (2026-07-28 or later).
    pub fn is_stateless(&self) -> bool {
        matches!(self, Era::Stateless { .. })
    }

    /// The session id of a legacy request.
    pub fn session(&self) -> Option<&str> {
        match self {
            Era::Legacy { session, .. } => Some(session),
            Era::Stateless { .. } => None,
        }
    }
}

/// A change every interested client should hear about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announcement {
    /// The tool list changed.
    ToolsChanged,
    /// The prompt list changed.
    PromptsChanged,
    /// The resource list changed.
    ResourcesChanged,
    /// The content of a resource changed.
    ResourceUpdated(String),
}

impl Announcement {
    /// Key of the announcement record.
    pub fn key(&self) -> String {
        match self {
            Announcement::ToolsChanged => "list/tools".into(),
            Announcement::PromptsChanged => "list/prompts".into(),
            Announcement::ResourcesChanged => "list/resources".into(),
            Announcement::ResourceUpdated(uri) => format!("resource/{uri}"),
        }
    }

    /// Parses an announcement record key.
    pub fn from_key(key: &str) -> Option<Announcement> {
        match key {
            "list/tools" => Some(Announcement::ToolsChanged),
            "list/prompts" => Some(Announcement::PromptsChanged),
            "list/resources" => Some(Announcement::ResourcesChanged),
            k => k
                .strip_prefix("resource/")
                .map(|u| Announcement::ResourceUpdated(u.to_owned())),
        }
    }
}

/// One item a running request produces, in order; the last is always `Final`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A notification related to the request (progress, log message).
    Notify(String),
    /// A server-to-client request related to the request.
    Request(String),
    /// The handler asks the transport to end the live connection now; the stream stays
    /// resumable and later items are still stored.
    Close,
    /// The JSON-RPC response that ends the request.
    Final(Final),
}

/// The JSON-RPC response that ends a request, and what it says: classified where it is built,
/// so that no transport has to parse it to choose how to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Final {
    /// The response, serialized.
    pub message: String,
    /// Result or error, and which error.
    pub answer: crate::outcome::Answer,
}

impl Final {
    /// A final result.
    pub fn result(message: String) -> Final {
        Final {
            message,
            answer: crate::outcome::Answer::Result,
        }
    }

    /// A final error response for `id`.
    pub fn error(id: &rmcp::model::RequestId, error: &rmcp::model::ErrorData) -> Final {
        Final {
            message: crate::jsonrpc::error_response(Some(id), error),
            answer: crate::outcome::Answer::of_error(error),
        }
    }
}

/// The channel a request's items go to.
pub type Outbox = mpsc::UnboundedSender<Item>;

/// How the engine turns a running request into a task when its handler asks for it.
#[async_trait::async_trait]
pub trait TaskHook: Send + Sync {
    /// Makes the request a task: the task is stored durably and the client is answered with
    /// it, while the handler keeps running. Returns whether the handler now runs as a task
    /// (false when the request cannot become one, e.g. the client does not support tasks).
    async fn promote(&self) -> Result<bool, rmcp::model::ErrorData>;

    /// Whether the handler already runs as a task.
    fn is_task(&self) -> bool;
}

/// Per-request facilities handed to catalog handlers. Cheap to clone (one shared allocation).
#[derive(Clone)]
pub struct RequestContext(Arc<Facilities>);

#[derive(Clone)]
struct Facilities {
    store: Arc<dyn Store>,
    /// The fenced view behind `store`, when the request may be taken over by another node.
    fence: Option<Arc<haven_cluster::FencedStore>>,
    era: Era,
    caller: Arc<Caller>,
    progress_token: Option<ProgressToken>,
    out: Option<Outbox>,
    cancel: CancellationToken,
    task: Option<Arc<dyn TaskHook>>,
}

impl std::fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestContext")
            .field("era", &self.0.era)
            .finish()
    }
}

fn level_rank(l: LoggingLevel) -> u8 {
    match l {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

impl RequestContext {
    /// A context for one request.
    pub fn new(
        store: Arc<dyn Store>,
        era: Era,
        caller: impl Into<Arc<Caller>>,
        progress_token: Option<ProgressToken>,
        out: Option<Outbox>,
        cancel: CancellationToken,
    ) -> RequestContext {
        RequestContext(Arc::new(Facilities {
            store,
            fence: None,
            era,
            caller: caller.into(),
            progress_token,
            out,
            cancel,
            task: None,
        }))
    }

    /// The same context, its writes going through `fence` (the request's execution, once it
    /// has one).
    pub fn with_fence(mut self, fence: Arc<haven_cluster::FencedStore>) -> RequestContext {
        let f = Arc::make_mut(&mut self.0);
        f.store = fence.clone();
        f.fence = Some(fence);
        self
    }

    /// The fenced view of the store this request writes through, if it has one.
    pub(crate) fn fence(&self) -> Option<&Arc<haven_cluster::FencedStore>> {
        self.0.fence.as_ref()
    }

    /// The same context, able to become a task through `hook`.
    pub fn with_task_hook(mut self, hook: Arc<dyn TaskHook>) -> RequestContext {
        Arc::make_mut(&mut self.0).task = Some(hook);
        self
    }

    /// The same context with its outbox detached (items are dropped from now on).
    pub fn detached(mut self) -> RequestContext {
        Arc::make_mut(&mut self.0).out = None;
        self
    }

    /// Turns this request into a task (tasks extension or client-requested task): the client
    /// gets the task at once and polls it, and the handler keeps running. Returns false, and
    /// changes nothing, when the request cannot become a task; the handler then just goes on
    /// and answers directly. Handlers of long work call this before starting it.
    pub async fn become_task(&self) -> Result<bool, rmcp::model::ErrorData> {
        match &self.0.task {
            Some(hook) => hook.promote().await,
            None => Ok(false),
        }
    }

    /// Whether the handler runs as a task.
    pub fn is_task(&self) -> bool {
        self.0.task.as_ref().is_some_and(|h| h.is_task())
    }

    /// The node's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    /// Commits upkeep of derived records (an index, a marker that one was built): fenced like
    /// any write of the request, but not counted among the changes an interrupted request
    /// reports (see `haven_cluster::FencedStore::commit_upkeep`).
    pub async fn commit_upkeep(&self, batch: Batch) -> Result<haven_state::Commit, StoreError> {
        match &self.0.fence {
            Some(fence) => fence.commit_upkeep(batch).await,
            None => self.0.store.commit(batch).await,
        }
    }

    /// The request's protocol era.
    pub fn era(&self) -> &Era {
        &self.0.era
    }

    /// Who is calling.
    pub fn caller(&self) -> &Caller {
        &self.0.caller
    }

    /// The client's declared capabilities.
    pub fn client_capabilities(&self) -> &ClientCapabilities {
        &self.0.caller.capabilities
    }

    /// Whether the client declared `sampling`, `elicitation` or `roots`.
    pub fn client_supports(&self, capability: &str) -> bool {
        let c = &self.0.caller.capabilities;
        match capability {
            "sampling" => c.sampling.is_some(),
            "elicitation" => c.elicitation.is_some(),
            "roots" => c.roots.is_some(),
            "tasks" => c.supports_tasks(),
            _ => false,
        }
    }

    /// Whether the request asked for progress notifications.
    pub fn wants_progress(&self) -> bool {
        self.0.progress_token.is_some() && self.0.out.is_some()
    }

    /// The request's progress token.
    pub fn progress_token(&self) -> Option<&ProgressToken> {
        self.0.progress_token.as_ref()
    }

    /// Sends a progress notification if the request carries a progress token.
    pub fn progress(&self, progress: f64, total: Option<f64>, message: Option<String>) {
        let (Some(token), Some(out)) = (&self.0.progress_token, &self.0.out) else {
            return;
        };
        let mut params = serde_json::json!({ "progressToken": token, "progress": progress });
        if let Some(t) = total {
            params["total"] = t.into();
        }
        if let Some(m) = message {
            params["message"] = m.into();
        }
        let _ = out.send(Item::Notify(jsonrpc::notification(
            "notifications/progress",
            Some(params),
        )));
    }

    /// Sends a log notification if the client's level lets it through. Stateless clients get
    /// log messages only when their request named a level.
    pub fn log(&self, level: LoggingLevel, logger: Option<&str>, data: Value) {
        let Some(out) = &self.0.out else { return };
        let wanted = match (&self.0.era, self.0.caller.log_level) {
            (Era::Stateless { .. }, None) => return,
            (_, None) => true,
            (_, Some(min)) => level_rank(level) >= level_rank(min),
        };
        if !wanted {
            return;
        }
        let mut params = serde_json::json!({ "level": level, "data": data });
        if let Some(l) = logger {
            params["logger"] = l.into();
        }
        let _ = out.send(Item::Notify(jsonrpc::notification(
            "notifications/message",
            Some(params),
        )));
    }

    /// Asks the transport to end the live response now (the client resumes it later).
    pub fn close_stream(&self) {
        if let Some(out) = &self.0.out {
            let _ = out.send(Item::Close);
        }
    }

    /// Cancellation of this request (client cancellation, stateless disconnect, task cancel).
    pub fn cancelled(&self) -> &CancellationToken {
        &self.0.cancel
    }

    /// Sleeps for `duration` unless the request is cancelled first; returns false if cancelled.
    pub async fn sleep(&self, duration: std::time::Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => true,
            _ = self.0.cancel.cancelled() => false,
        }
    }

    /// Records an announcement durably; every node tells its interested clients.
    pub async fn announce(&self, announcement: Announcement) -> Result<(), StoreError> {
        announce(&*self.0.store, &announcement).await
    }
}

/// Records an announcement durably.
pub async fn announce(store: &dyn Store, announcement: &Announcement) -> Result<(), StoreError> {
    let batch = with_announcements(Batch::new(), store, std::slice::from_ref(announcement));
    store.commit(batch).await.map(|_| ())
}

/// `batch` plus the records of `announcements` (a key per announcement, the time as value),
/// so that the change they announce and the announcements are one commit: no reader sees one
/// without the other, and a tool call's writes go to the store at once.
pub fn with_announcements(
    mut batch: Batch,
    store: &dyn Store,
    announcements: &[Announcement],
) -> Batch {
    let at = store.clock().wall_millis().to_string();
    for a in announcements {
        batch = batch.put(ANNOUNCE_NS, &a.key(), at.clone().into_bytes());
    }
    batch
}
