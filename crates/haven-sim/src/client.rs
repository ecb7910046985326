//! The simulated clients: legacy-era sessions that call tools on random nodes, read their SSE
//! streams, and resume them on another node with `Last-Event-ID` whenever a connection dies or
//! goes silent, as a real client behind a load balancer would. Each records what it saw.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use haven_mcp::engine::{LegacyPost, Reply, SseFrame};
use haven_mcp::rmcp::model::{ErrorData, JsonObject, Tool, ToolAnnotations};
use haven_mcp::{Catalog, CatalogInfo, RequestContext, Round, Step, TaskSupport};
use haven_state::{Batch, Expect, StoreError};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use crate::world::World;

/// Namespace of the ledger the `ledger_append` tool writes.
pub const LEDGER_NS: &str = "sim-ledger";

/// How long a client waits for the next event before it gives up on a connection.
const SILENCE: Duration = Duration::from_secs(20);
/// How long after the active phase a client keeps resuming its unanswered requests.
const SETTLE_FOR: Duration = Duration::from_secs(120);

/// What one request did, as its client saw it.
#[derive(Clone, Debug)]
pub struct RequestLog {
    /// Client number.
    pub client: usize,
    /// JSON-RPC id.
    pub id: u64,
    /// Session it belongs to.
    pub session: String,
    /// Tool called.
    pub tool: String,
    /// Arguments.
    pub arguments: Value,
    /// The SSE stream it got, if it was answered with one.
    pub stream: Option<String>,
    /// Every final answer the client received (exactly one when all is well).
    pub finals: Vec<Value>,
    /// Event indexes received, in order, across all connections (no repeats when all is well).
    pub indexes: Vec<u64>,
    /// Every event received with its message: what the store must hold at that index.
    pub received: Vec<(u64, String)>,
    /// Whether the request was given up (no final within the settling time).
    pub unanswered: bool,
}

/// What one task did, as its (stateless) client saw it.
#[derive(Clone, Debug)]
pub struct TaskLog {
    /// Client number.
    pub client: usize,
    /// Task id.
    pub task: String,
    /// Statuses seen by polling, in order.
    pub statuses: Vec<String>,
    /// Whether the client asked to cancel it.
    pub cancelled: bool,
}

/// Everything one client saw.
#[derive(Clone, Debug, Default)]
pub struct ClientLog {
    /// Its requests.
    pub requests: Vec<RequestLog>,
    /// Its tasks.
    pub tasks: Vec<TaskLog>,
}

pub(crate) struct Client {
    number: usize,
    world: Arc<World>,
    rng: StdRng,
    session: Option<String>,
    next_id: u64,
    log: ClientLog,
}

/// One answer, as a client receives it.
enum Answer {
    Json {
        body: Value,
        session: Option<String>,
    },
    Stream(BoxStream<'static, SseFrame>),
    Refused,
}

fn answer(reply: Reply) -> Answer {
    match reply {
        Reply::Json { body, session, .. } => match serde_json::from_str(&body) {
            Ok(v) => Answer::Json { body: v, session },
            Err(_) => Answer::Refused,
        },
        Reply::Stream(s) => Answer::Stream(s),
        Reply::Accepted | Reply::SessionEnded | Reply::Rejected(_) => Answer::Refused,
    }
}

fn post(session: Option<&str>, body: &Value) -> Option<LegacyPost> {
    let message = haven_mcp::jsonrpc::parse(body.to_string().as_bytes()).ok()?;
    Some(LegacyPost {
        session: session.map(str::to_owned),
        protocol_version: Some("2025-11-25".into()),
        accepts_json: true,
        accepts_sse: true,
        message,
        principal: haven_auth::Principal::anonymous(),
        trace: Default::default(),
    })
}

impl Client {
    pub fn new(number: usize, world: Arc<World>, rng: StdRng) -> Client {
        Client {
            number,
            world,
            rng,
            session: None,
            next_id: 1,
            log: ClientLog::default(),
        }
    }

    pub async fn run(mut self, active_until: tokio::time::Instant) -> ClientLog {
        // Every other client uses the stateless era and its tasks extension.
        if self.number % 2 == 1 {
            while tokio::time::Instant::now() < active_until {
                self.one_task(active_until).await;
                let pause = self.rng.random_range(0..1_500);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            return self.log;
        }
        while tokio::time::Instant::now() < active_until {
            if self.session.is_none() && !self.initialize().await {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            self.one_request(active_until).await;
            let pause = self.rng.random_range(0..1_500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        self.log
    }

    async fn initialize(&mut self) -> bool {
        let Some((_, engine)) = self.world.pick(&mut self.rng) else {
            return false;
        };
        let body = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": format!("sim-client-{}", self.number), "version": "1"}
        }});
        let Some(p) = post(None, &body) else {
            return false;
        };
        match tokio::time::timeout(SILENCE, engine.legacy_post(p)).await {
            Ok(reply) => match answer(reply) {
                Answer::Json {
                    session: Some(s), ..
                } => {
                    self.session = Some(s);
                    true
                }
                _ => false,
            },
            Err(_) => false,
        }
    }

    /// One stateless request to any node; `None` when no node answered in time.
    async fn stateless(&mut self, method: &str, mut params: Value) -> Option<Value> {
        let (_, engine) = self.world.pick(&mut self.rng)?;
        let id = self.next_id;
        self.next_id += 1;
        params["_meta"] = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {
                "extensions": { "io.modelcontextprotocol/tasks": {} }
            },
            "io.modelcontextprotocol/clientInfo": {"name": format!("sim-client-{}", self.number), "version": "1"}
        });
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let message = haven_mcp::jsonrpc::parse(body.to_string().as_bytes()).ok()?;
        let post = haven_mcp::engine::StatelessPost {
            headers: haven_mcp::engine::StatelessHeaders {
                protocol_version: Some("2026-07-28".into()),
                method: Some(method.into()),
                name: None,
                params: Vec::new(),
            },
            message,
            from_http: false,
            principal: haven_auth::Principal::anonymous(),
            trace: Default::default(),
        };
        match tokio::time::timeout(SILENCE, engine.stateless_post(post)).await {
            Ok(Reply::Json { body, .. }) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// Starts a task (a long `sleep`), polls it to its end on random nodes, sometimes
    /// cancels it.
    async fn one_task(&mut self, active_until: tokio::time::Instant) {
        let seconds = self.rng.random_range(2..9);
        let Some(created) = self
            .stateless(
                "tools/call",
                json!({"name": "sleep", "arguments": {"seconds": seconds}}),
            )
            .await
        else {
            return;
        };
        let Some(task) = created
            .pointer("/result/taskId")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return;
        };
        let mut log = TaskLog {
            client: self.number,
            task: task.clone(),
            statuses: Vec::new(),
            cancelled: false,
        };
        let cancel_at = self.rng.random_bool(0.25).then(|| {
            tokio::time::Instant::now() + Duration::from_millis(self.rng.random_range(0..6_000))
        });
        let give_up = active_until + SETTLE_FOR;
        loop {
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(300..1_500))).await;
            if cancel_at.is_some_and(|t| tokio::time::Instant::now() >= t) && !log.cancelled {
                log.cancelled = true;
                let _ = self
                    .stateless("tasks/cancel", json!({"taskId": task}))
                    .await;
            }
            if let Some(v) = self.stateless("tasks/get", json!({"taskId": task})).await
                && let Some(status) = v.pointer("/result/status").and_then(Value::as_str)
            {
                if log.statuses.last().map(String::as_str) != Some(status) {
                    log.statuses.push(status.to_owned());
                }
                if matches!(status, "completed" | "failed" | "cancelled") {
                    break;
                }
            }
            if tokio::time::Instant::now() >= give_up {
                break;
            }
        }
        self.log.tasks.push(log);
    }

    fn next_call(&mut self) -> (String, Value) {
        let id = self.next_id;
        match self.rng.random_range(0..10) {
            0..=3 => (
                "sleep".into(),
                json!({"seconds": self.rng.random_range(1..6)}),
            ),
            4..=5 => (
                "notes_put".into(),
                json!({"name": format!("c{}-r{id}", self.number), "text": format!("value {id}")}),
            ),
            6..=7 => (
                "ledger_append".into(),
                json!({"entry": format!("c{}-r{id}", self.number)}),
            ),
            8 => ("time_now".into(), json!({})),
            _ => ("echo".into(), json!({"text": format!("hello {id}")})),
        }
    }

    async fn one_request(&mut self, active_until: tokio::time::Instant) {
        let session = self.session.clone().unwrap_or_default();
        let id = self.next_id;
        self.next_id += 1;
        let (tool, arguments) = self.next_call();
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": tool, "arguments": arguments, "_meta": {"progressToken": format!("p{id}")}
        }});
        let mut log = RequestLog {
            client: self.number,
            id,
            session: session.clone(),
            tool,
            arguments,
            stream: None,
            finals: Vec::new(),
            indexes: Vec::new(),
            received: Vec::new(),
            unanswered: false,
        };
        let Some((_, engine)) = self.world.pick(&mut self.rng) else {
            return;
        };
        let Some(p) = post(Some(&session), &body) else {
            return;
        };
        let reply = match tokio::time::timeout(SILENCE, engine.legacy_post(p)).await {
            Ok(r) => answer(r),
            // The node went silent before answering: nothing was promised to the client.
            Err(_) => return,
        };
        match reply {
            Answer::Json { body, .. } => log.finals.push(body),
            Answer::Refused => {
                if self.rng.random_bool(0.5) {
                    self.session = None;
                }
                return;
            }
            Answer::Stream(frames) => {
                self.follow(&mut log, frames, active_until + SETTLE_FOR)
                    .await;
            }
        }
        // What the answer acknowledges must be in the log from now on.
        self.world.watch.answer(&log);
        self.log.requests.push(log);
    }

    /// Reads a stream to its final event, resuming elsewhere whenever it breaks.
    async fn follow(
        &mut self,
        log: &mut RequestLog,
        mut frames: BoxStream<'static, SseFrame>,
        give_up_at: tokio::time::Instant,
    ) {
        let mut last_id: Option<String> = None;
        loop {
            loop {
                let next = tokio::time::timeout(SILENCE, frames.next()).await;
                let frame = match next {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(_) => break,
                };
                let SseFrame::Event { id, data, .. } = frame else {
                    continue;
                };
                let Some(id) = id else { continue };
                if let Some(e) = haven_mcp::stream::parse_event_id(&id) {
                    log.stream.get_or_insert_with(|| e.stream.to_owned());
                    if e.index > 0 {
                        log.indexes.push(e.index);
                        if !data.is_empty() {
                            log.received.push((e.index, data.clone()));
                        }
                    }
                }
                last_id = Some(id);
                if data.is_empty() {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&data) else {
                    continue;
                };
                if v.get("id").and_then(Value::as_u64) == Some(log.id)
                    && (v.get("result").is_some() || v.get("error").is_some())
                {
                    log.finals.push(v);
                    // A real client closes the stream once it has its answer; keep reading a
                    // moment to see that nothing follows.
                    if let Ok(Some(SseFrame::Event { data, .. })) =
                        tokio::time::timeout(Duration::from_millis(100), frames.next()).await
                        && !data.is_empty()
                    {
                        log.finals.push(json!({"unexpected_after_final": data}));
                    }
                    return;
                }
            }
            // This connection is over (a fresh one replaces it below, if any).
            frames = futures::stream::empty().boxed();
            if tokio::time::Instant::now() >= give_up_at {
                log.unanswered = true;
                return;
            }
            let Some(last) = last_id.clone() else {
                log.unanswered = true;
                return;
            };
            tokio::time::sleep(Duration::from_millis(self.rng.random_range(100..1_500))).await;
            let Some((_, engine)) = self.world.pick(&mut self.rng) else {
                continue;
            };
            let reply = tokio::time::timeout(
                SILENCE,
                engine.legacy_get(
                    Some(&log.session),
                    Some("2025-11-25"),
                    Some(&last),
                    &haven_auth::Principal::anonymous(),
                ),
            )
            .await;
            if let Ok(Reply::Stream(s)) = reply {
                frames = s;
            }
        }
    }
}

/// The default catalog plus `ledger_append`, a tool that is not idempotent and changes state
/// half-way through (so that an interrupted call may or may not have changed it).
pub(crate) struct SimCatalog {
    base: haven_catalogs::DefaultCatalog,
}

impl Default for SimCatalog {
    fn default() -> Self {
        SimCatalog {
            base: haven_catalogs::DefaultCatalog::new(),
        }
    }
}

#[async_trait::async_trait]
impl Catalog for SimCatalog {
    fn info(&self) -> CatalogInfo {
        self.base.info()
    }

    async fn tools(&self, ctx: &RequestContext) -> Result<Vec<Tool>, ErrorData> {
        let mut tools = self.base.tools(ctx).await?;
        let schema = json!({
            "type": "object",
            "properties": { "entry": { "type": "string" } },
            "required": ["entry"]
        });
        tools.push(
            Tool::new(
                "ledger_append",
                "Appends an entry to the ledger, once (not idempotent).",
                Arc::new(schema.as_object().cloned().unwrap_or_default()),
            )
            .with_annotations(ToolAnnotations::new().read_only(false).idempotent(false)),
        );
        Ok(tools)
    }

    fn task_support(&self, tool: &str) -> TaskSupport {
        self.base.task_support(tool)
    }

    fn tracks_effects(&self, _tool: &str) -> bool {
        true
    }

    async fn call_tool(
        &self,
        ctx: &RequestContext,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<haven_mcp::rmcp::model::CallToolResult>, ErrorData> {
        if name != "ledger_append" {
            return self.base.call_tool(ctx, name, arguments, round).await;
        }
        let entry = arguments
            .get("entry")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        ctx.progress(0.0, Some(2.0), None);
        if !ctx.sleep(Duration::from_millis(700)).await {
            return Err(ErrorData::new(
                haven_mcp::rmcp::model::ErrorCode(-32800),
                "Request cancelled",
                None,
            ));
        }
        let written = ctx
            .store()
            .commit(Batch::new().put_if(LEDGER_NS, &entry, b"1".to_vec(), Expect::Absent))
            .await;
        match written {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => {
                return Err(ErrorData::new(
                    haven_mcp::rmcp::model::ErrorCode::INTERNAL_ERROR,
                    format!(
                        "ledger entry {entry} could not be appended (exists, or this node lost the request)"
                    ),
                    None,
                ));
            }
            Err(e) => {
                return Err(ErrorData::new(
                    haven_mcp::rmcp::model::ErrorCode::INTERNAL_ERROR,
                    format!(
                        "ledger entry {entry}: the write failed and may or may not be stored: {e}"
                    ),
                    None,
                ));
            }
        }
        ctx.progress(1.0, Some(2.0), None);
        ctx.sleep(Duration::from_millis(700)).await;
        Ok(Step::Done(haven_mcp::rmcp::model::CallToolResult::success(
            vec![haven_mcp::rmcp::model::ContentBlock::text(format!(
                "appended {entry}"
            ))],
        )))
    }
}
