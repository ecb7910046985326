//! A test upstream for this crate's tests (feature `test-upstream`): an rmcp server served over
//! Streamable HTTP on 127.0.0.1 ([`HttpUpstream`]) or over stdio (the
//! `haven-federation-test-upstream` binary, [`serve_stdio`]).
//!
//! Tools: `add` {a, b} → the sum as text; `slow` {ms} → sleeps (progress at the start, stops
//! early when cancelled and counts the cancellation); `flaky` → every other call a result with
//! `isError: true`; `toggle` → adds or removes the tool `extra` and sends
//! `notifications/tools/list_changed`; `touch` {uri} → sends `notifications/resources/updated`;
//! `getenv` {name}; `pid`; `roots` → asks the client for its roots mid-call and answers
//! how many it got; and two tools whose served names are invalid (a 130-character name
//! and `bad name!`). Resource `test://static/hello`, template `test://items/{id}`, prompt
//! `greet` {name} with completion of `name`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CompleteRequestParams, CompleteResult,
    CompletionInfo, ContentBlock, ErrorData, GetPromptRequestParams, GetPromptResponse,
    GetPromptResult, Implementation, JsonObject, ListPromptsResult, ListResourceTemplatesResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    Prompt, PromptArgument, PromptMessage, ReadResourceRequestParams, ReadResourceResponse,
    ReadResourceResult, Reference, Resource, ResourceContents, ResourceTemplate, Role,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, ServiceExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the test upstream observed, shared with the test.
#[derive(Debug, Default)]
pub struct Probe {
    /// `slow` calls that ended because they were cancelled.
    pub cancelled: AtomicU64,
    /// `slow` calls that started.
    pub slow_started: AtomicU64,
    /// Tool calls received.
    pub calls: AtomicU64,
    /// The request id of every tool call received, in order.
    pub call_ids: parking_lot::Mutex<Vec<String>>,
    /// Whether the tool `extra` is listed.
    pub extra: AtomicBool,
    flaky: AtomicU64,
}

/// The test upstream's handler.
#[derive(Clone)]
pub struct TestUpstream {
    /// Put into answers so a test can tell upstreams apart.
    pub label: String,
    /// Shared observations.
    pub probe: Arc<Probe>,
}

/// The 130-character tool name (its served name is too long).
pub fn long_tool_name() -> String {
    "l".repeat(130)
}

fn tool(name: &str, description: &str, schema: Value) -> Tool {
    let Value::Object(schema) = schema else {
        unreachable!()
    };
    Tool::new(name.to_owned(), description.to_owned(), Arc::new(schema))
}

fn text(t: impl Into<String>) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(t.into())])
}

fn arg<'a>(args: &'a Option<JsonObject>, key: &str) -> Option<&'a Value> {
    args.as_ref().and_then(|a| a.get(key))
}

impl TestUpstream {
    /// A handler labelled `label`.
    pub fn new(label: &str) -> TestUpstream {
        TestUpstream {
            label: label.to_owned(),
            probe: Arc::new(Probe::default()),
        }
    }

    fn tools(&self) -> Vec<Tool> {
        let num = json!({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]});
        let object = || json!({"type": "object"});
        let one = |name: &str, kind: &str| json!({"type": "object", "properties": {name: {"type": kind}}});
        let mut tools = vec![
            tool("add", "Adds a and b", num),
            tool("slow", "Sleeps ms milliseconds", one("ms", "integer")),
            tool("flaky", "Every other call fails with isError", object()),
            tool("toggle", "Adds or removes the tool extra", object()),
            tool(
                "touch",
                "Sends resources/updated for uri",
                one("uri", "string"),
            ),
            tool("getenv", "An environment variable", one("name", "string")),
            tool("pid", "The process id", object()),
            tool("roots", "Asks the client for its roots", object()),
            tool(&long_tool_name(), "Too long when served", object()),
            tool("bad name!", "Invalid when served", object()),
        ];
        if self.probe.extra.load(Ordering::SeqCst) {
            tools.push(tool("extra", "Appears after toggle", object()));
        }
        tools
    }
}

impl ServerHandler for TestUpstream {
    fn get_info(&self) -> ServerConfig {
        let caps = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_prompts()
            .enable_resources()
            .enable_completions()
            .build();
        ServerConfig::new(caps).with_server_info(Implementation::new(
            format!("test-upstream-{}", self.label),
            "0.0.0",
        ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        self.probe.calls.fetch_add(1, Ordering::SeqCst);
        self.probe.call_ids.lock().push(context.id.to_string());
        let args = &request.arguments;
        let result = match &*request.name {
            "add" => {
                let (Some(a), Some(b)) = (
                    arg(args, "a").and_then(Value::as_f64),
                    arg(args, "b").and_then(Value::as_f64),
                ) else {
                    return Err(ErrorData::invalid_params("a and b must be numbers", None));
                };
                text(format!("{}", a + b))
            }
            "slow" => {
                let ms = arg(args, "ms").and_then(Value::as_u64).unwrap_or(1000);
                self.probe.slow_started.fetch_add(1, Ordering::SeqCst);
                if let Some(token) = context.meta.get_progress_token() {
                    let mut p = ProgressNotificationParam::new(token, 0.0);
                    p.total = Some(1.0);
                    p.message = Some(format!("{} sleeping", self.label));
                    let _ = context.peer.notify_progress(p).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => text(format!("slept {ms} ms")),
                    _ = context.ct.cancelled() => {
                        self.probe.cancelled.fetch_add(1, Ordering::SeqCst);
                        text("cancelled")
                    }
                }
            }
            "flaky" => {
                let n = self.probe.flaky.fetch_add(1, Ordering::SeqCst);
                if n.is_multiple_of(2) {
                    CallToolResult::error(vec![ContentBlock::text("flaky failure")])
                } else {
                    text("flaky success")
                }
            }
            "toggle" => {
                let was = self.probe.extra.fetch_xor(true, Ordering::SeqCst);
                let _ = context.peer.notify_tool_list_changed().await;
                text(format!("extra is {}", if was { "gone" } else { "there" }))
            }
            "touch" => {
                let uri = arg(args, "uri")
                    .and_then(Value::as_str)
                    .unwrap_or("test://static/hello")
                    .to_owned();
                let _ = context
                    .peer
                    .notify_resource_updated(rmcp::model::ResourceUpdatedNotificationParam::new(
                        uri,
                    ))
                    .await;
                text("touched")
            }
            "getenv" => {
                let name = arg(args, "name").and_then(Value::as_str).unwrap_or("");
                text(std::env::var(name).unwrap_or_default())
            }
            "pid" => text(std::process::id().to_string()),
            "roots" => match context.peer.list_roots().await {
                Ok(r) => text(format!("roots: {}", r.roots.len())),
                Err(e) => text(format!("roots failed: {e}")),
            },
            "extra" if self.probe.extra.load(Ordering::SeqCst) => text("extra"),
            other => {
                return Err(ErrorData::invalid_params(
                    format!("Unknown tool: {other}"),
                    None,
                ));
            }
        };
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new("test://static/hello", "hello").with_mime_type("text/plain"),
        ]))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new("test://items/{id}", "item"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let uri = request.uri;
        let body = if uri == "test://static/hello" {
            format!("hello from {}", self.label)
        } else if let Some(id) = uri.strip_prefix("test://items/") {
            format!("item {id}")
        } else {
            return Err(ErrorData::resource_not_found(
                format!("Resource not found: {uri}"),
                None,
            ));
        };
        Ok(ReadResourceResult::new(vec![ResourceContents::text(body, uri)]).into())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        Ok(ListPromptsResult::with_all_items(vec![Prompt::new(
            "greet",
            Some("Greets someone"),
            Some(vec![PromptArgument::new("name").with_required(true)]),
        )]))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        if request.name != "greet" {
            return Err(ErrorData::invalid_params(
                format!("Unknown prompt: {}", request.name),
                None,
            ));
        }
        let name = arg(&request.arguments, "name")
            .and_then(Value::as_str)
            .unwrap_or("nobody");
        Ok(GetPromptResult::new(vec![PromptMessage::new_text(
            Role::User,
            format!("Hello, {name}! ({})", self.label),
        )])
        .into())
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        let values = match &request.r#ref {
            Reference::Prompt(p) if p.name == "greet" && request.argument.name == "name" => {
                ["Alice", "Bob", "Carol"]
                    .into_iter()
                    .filter(|v| v.starts_with(&request.argument.value))
                    .map(str::to_owned)
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(CompleteResult::new(
            CompletionInfo::with_all_values(values)
                .map_err(|e| ErrorData::internal_error(e, None))?,
        ))
    }
}

/// An axum router served on a local port until [`Served::stop`]: the test upstream's, or a
/// test's own hand-written upstream.
pub struct Served {
    /// The MCP endpoint (`/mcp`).
    pub url: String,
    /// Where it listens.
    pub addr: SocketAddr,
    ct: CancellationToken,
    task: JoinHandle<()>,
}

impl Served {
    /// Serves `router` on `addr` (e.g. `127.0.0.1:0`); `ct` ends it (graceful shutdown).
    pub async fn start(
        router: axum::Router,
        addr: SocketAddr,
        ct: CancellationToken,
    ) -> std::io::Result<Served> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn({
            let ct = ct.clone();
            async move {
                let _ = axum::serve(listener, router)
                    .with_graceful_shutdown(async move { ct.cancelled_owned().await })
                    .await;
            }
        });
        Ok(Served {
            url: format!("http://{addr}/mcp"),
            addr,
            ct,
            task,
        })
    }

    /// Stops serving: connections close, the port is free again (the server is aborted if it
    /// has not ended 5 s after being told to).
    pub async fn stop(self) {
        self.ct.cancel();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}

/// The test upstream over Streamable HTTP on a local port.
pub struct HttpUpstream {
    /// The MCP endpoint.
    pub url: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Shared observations.
    pub probe: Arc<Probe>,
    served: Served,
}

impl HttpUpstream {
    /// Serves a new test upstream labelled `label` on `addr` (e.g. `127.0.0.1:0`).
    pub async fn start(label: &str, addr: SocketAddr) -> std::io::Result<HttpUpstream> {
        Self::start_with(TestUpstream::new(label), addr).await
    }

    /// Serves `handler` on `addr`.
    pub async fn start_with(
        handler: TestUpstream,
        addr: SocketAddr,
    ) -> std::io::Result<HttpUpstream> {
        let probe = handler.probe.clone();
        let ct = CancellationToken::new();
        let config = StreamableHttpServerConfig::default()
            .with_sse_keep_alive(Some(Duration::from_millis(500)))
            .with_cancellation_token(ct.child_token());
        let service: StreamableHttpService<TestUpstream, LocalSessionManager> =
            StreamableHttpService::new(
                move || Ok(handler.clone()),
                Arc::new(LocalSessionManager::default()),
                config,
            );
        let router = axum::Router::new().nest_service("/mcp", service);
        let served = Served::start(router, addr, ct).await?;
        Ok(HttpUpstream {
            url: served.url.clone(),
            addr: served.addr,
            probe,
            served,
        })
    }

    /// Stops serving: sessions end, connections close, the port is free again.
    pub async fn stop(self) {
        self.served.stop().await;
    }
}

/// Serves the test upstream over stdin/stdout until stdin closes.
pub async fn serve_stdio(label: &str) -> Result<(), Box<dyn std::error::Error>> {
    let service = TestUpstream::new(label)
        .serve(rmcp::transport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
