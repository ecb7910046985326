//! The conformance catalog, called directly: exact fixture payloads (including the ones the
//! suite is lenient about), multi-round behaviour and state handling, and task promotion.

#![allow(deprecated)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use haven_catalogs::ConformanceCatalog;
use haven_mcp::catalog::{Caller, Catalog, Ctx, InputRequest, Round, Step, TaskSupport};
use haven_mcp::context::{ANNOUNCE_NS, Era, Item, RequestContext, TaskHook};
use haven_state::Store;
use rmcp::model::{
    CallToolResult, ClientCapabilities, CompleteRequestParams, ErrorData, JsonObject, LoggingLevel,
    NumberOrString, ProgressToken,
};
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_util::sync::CancellationToken;

const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";
const WAV: &str = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=";

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    catalog: ConformanceCatalog,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    Env {
        store: haven_testkit::redb_store(dir.path()),
        _dir: dir,
        catalog: ConformanceCatalog::new(),
    }
}

/// A fresh environment and a call in `era` with the default capabilities.
fn env_with(era: Era) -> (Env, Call) {
    let e = env();
    let c = e.ctx(era);
    (e, c)
}

fn legacy() -> Era {
    Era::Legacy {
        session: "session-1".into(),
        protocol_version: "2025-11-25".into(),
    }
}

fn stateless() -> Era {
    Era::Stateless {
        protocol_version: "2026-07-28".into(),
    }
}

fn caps(v: Value) -> ClientCapabilities {
    serde_json::from_value(v).unwrap()
}

/// The harness' default capabilities (both eras).
fn all_caps() -> Value {
    json!({ "sampling": {}, "elicitation": {}, "roots": { "listChanged": true } })
}

struct Call {
    ctx: Ctx,
    rx: UnboundedReceiver<Item>,
    cancel: CancellationToken,
}

impl Env {
    fn call_ctx(
        &self,
        era: Era,
        capabilities: Value,
        log_level: Option<LoggingLevel>,
        token: Option<ProgressToken>,
    ) -> Call {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let caller = Caller {
            client_info: None,
            capabilities: caps(capabilities),
            log_level,
            principal: None,
        };
        let ctx = RequestContext::new(
            self.store.clone(),
            era,
            caller,
            token,
            Some(tx),
            cancel.clone(),
        );
        Call { ctx, rx, cancel }
    }

    fn ctx(&self, era: Era) -> Call {
        self.call_ctx(era, all_caps(), None, None)
    }

    async fn call(
        &self,
        ctx: &Ctx,
        name: &str,
        args: Value,
        round: Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let args: JsonObject = serde_json::from_value(args).unwrap();
        self.catalog.call_tool(ctx, name, args, round).await
    }

    /// Calls a tool that must finish at once and returns its result as JSON.
    async fn done(&self, ctx: &Ctx, name: &str, args: Value, round: Round) -> Value {
        match self.call(ctx, name, args, round).await {
            Ok(Step::Done(r)) => serde_json::to_value(r).unwrap(),
            other => panic!("{name}: expected a final result, got {other:?}"),
        }
    }

    /// Calls a tool that must ask for input and returns its requests (as JSON) and state.
    async fn need(
        &self,
        ctx: &Ctx,
        name: &str,
        args: Value,
        round: Round,
    ) -> (BTreeMap<String, Value>, Option<Value>) {
        match self.call(ctx, name, args, round).await {
            Ok(Step::NeedInput { requests, state }) => (requests_json(&requests), state),
            other => panic!("{name}: expected an input request, got {other:?}"),
        }
    }

    /// [`Env::done`] in the first round.
    async fn done_first(&self, ctx: &Ctx, name: &str, args: Value) -> Value {
        self.done(ctx, name, args, first()).await
    }

    /// [`Env::need`] in the first round.
    async fn need_first(
        &self,
        ctx: &Ctx,
        name: &str,
        args: Value,
    ) -> (BTreeMap<String, Value>, Option<Value>) {
        self.need(ctx, name, args, first()).await
    }

    /// [`Env::error`] in the first round.
    async fn error_first(&self, ctx: &Ctx, name: &str, args: Value) -> ErrorData {
        self.error(ctx, name, args, first()).await
    }

    /// Calls a tool without arguments in the first round; it must ask for input. Returns the
    /// key and the JSON of its first request (by key order).
    async fn only_request(&self, ctx: &Ctx, name: &str) -> (String, Value) {
        let (requests, _) = self.need_first(ctx, name, json!({})).await;
        let (key, request) = requests.into_iter().next().expect("an input request");
        (key, request)
    }

    /// Calls a tool without arguments a second time (round 1, no state) with `answer` as its
    /// input responses; it must finish at once. Returns its result as JSON.
    async fn answered(&self, ctx: &Ctx, name: &str, answer: Value) -> Value {
        self.done(ctx, name, json!({}), round(answer, None, 1))
            .await
    }

    /// A stateless call with `capabilities` whose task hook accepts to make it a task or not:
    /// the hook, the context with the hook, and the call.
    fn task_call(&self, accept: bool, capabilities: Value) -> (Arc<FakeHook>, Ctx, Call) {
        let hook = FakeHook::new(accept);
        let c = self.call_ctx(stateless(), capabilities, None, None);
        let ctx = c.ctx.clone().with_task_hook(hook.clone());
        (hook, ctx, c)
    }

    /// Whether `key` (such as `list/tools`) was announced.
    async fn announced(&self, key: &str) -> bool {
        self.store.get(ANNOUNCE_NS, key).await.unwrap().is_some()
    }

    async fn error(&self, ctx: &Ctx, name: &str, args: Value, round: Round) -> ErrorData {
        match self.call(ctx, name, args, round).await {
            Err(e) => e,
            Ok(other) => panic!("{name}: expected an error, got {other:?}"),
        }
    }
}

fn requests_json(requests: &BTreeMap<String, InputRequest>) -> BTreeMap<String, Value> {
    requests
        .iter()
        .map(|(k, r)| (k.clone(), r.to_json()))
        .collect()
}

fn round(responses: Value, state: Option<Value>, number: u32) -> Round {
    let input_responses = match responses {
        Value::Object(m) => m.into_iter().collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("responses must be an object, got {other}"),
    };
    Round {
        input_responses,
        state,
        number,
    }
}

/// Under tokio's paused clock: `call` is still running after `at_least` of (virtual) time,
/// then finishes; its output.
async fn not_before<T>(at_least: Duration, call: impl Future<Output = T>, what: &str) -> T {
    tokio::pin!(call);
    assert!(
        tokio::time::timeout(at_least, &mut call).await.is_err(),
        "finished before {at_least:?}: {what}"
    );
    call.await
}

fn first() -> Round {
    Round::default()
}

fn text_of(result: &Value) -> &str {
    result["content"][0]["text"]
        .as_str()
        .expect("first content item is text")
}

fn accept(content: Value) -> Value {
    json!({ "action": "accept", "content": content })
}

/// A tool result of one text block.
fn text_result(text: &str) -> Value {
    json!({ "content": [{ "type": "text", "text": text }] })
}

fn sampling_answer(text: &str) -> Value {
    json!({
        "role": "assistant",
        "content": { "type": "text", "text": text },
        "model": "test-model",
        "stopReason": "endTurn"
    })
}

fn roots_answer() -> Value {
    json!({ "roots": [{ "uri": "file:///test/root", "name": "Test Root" }] })
}

/// Everything the handler put in its outbox so far, as JSON notifications.
fn drain(rx: &mut UnboundedReceiver<Item>) -> Vec<Item> {
    let mut items = Vec::new();
    while let Ok(i) = rx.try_recv() {
        items.push(i);
    }
    items
}

fn notifications(items: &[Item], method: &str) -> Vec<Value> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Notify(s) => Some(serde_json::from_str::<Value>(s).unwrap()),
            _ => None,
        })
        .filter(|n| n["method"] == method)
        .map(|n| n["params"].clone())
        .collect()
}

/// An elicitation request of a form with one required field `field` of JSON type `kind`.
fn form_request(message: &str, field: &str, kind: &str) -> Value {
    json!({
        "method": "elicitation/create",
        "params": {
            "message": message,
            "requestedSchema": {
                "type": "object",
                "properties": { field: { "type": kind } },
                "required": [field]
            }
        }
    })
}

/// An elicitation request in form mode with `properties` and nothing required.
fn form_mode_request(message: &str, properties: Value) -> Value {
    json!({
        "method": "elicitation/create",
        "params": {
            "mode": "form",
            "message": message,
            "requestedSchema": { "type": "object", "properties": properties, "required": [] }
        }
    })
}

/// The input requests of a round that asks one thing, under `key`.
fn one_request(key: &str, request: Value) -> BTreeMap<String, Value> {
    BTreeMap::from([(key.to_owned(), request)])
}

/// A sampling request of one user message `text`.
fn sampling_request(text: &str, max_tokens: u32) -> Value {
    json!({
        "method": "sampling/createMessage",
        "params": {
            "messages": [{ "role": "user", "content": { "type": "text", "text": text } }],
            "maxTokens": max_tokens
        }
    })
}

fn roots_request() -> Value {
    json!({ "method": "roots/list", "params": {} })
}

fn name_request() -> Value {
    form_request("What is your name?", "name", "string")
}

fn confirm_ok_request() -> Value {
    form_request("Please confirm", "ok", "boolean")
}

/// A task hook that records promotions; `accept` says whether the request can become a task.
struct FakeHook {
    accept: bool,
    promoted: AtomicUsize,
    task: AtomicBool,
}

impl FakeHook {
    fn new(accept: bool) -> Arc<FakeHook> {
        Arc::new(FakeHook {
            accept,
            promoted: AtomicUsize::new(0),
            task: AtomicBool::new(false),
        })
    }

    fn promotions(&self) -> usize {
        self.promoted.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl TaskHook for FakeHook {
    async fn promote(&self) -> Result<bool, ErrorData> {
        self.promoted.fetch_add(1, Ordering::SeqCst);
        if self.accept {
            self.task.store(true, Ordering::SeqCst);
        }
        Ok(self.accept)
    }

    fn is_task(&self) -> bool {
        self.task.load(Ordering::SeqCst)
    }
}

fn tasks_caps() -> Value {
    json!({
        "sampling": {},
        "elicitation": {},
        "extensions": { "io.modelcontextprotocol/tasks": {} }
    })
}

// ---------------------------------------------------------------------------------------------
// Identity and listings
// ---------------------------------------------------------------------------------------------

const TOOL_NAMES: &[&str] = &[
    "test_simple_text",
    "test_image_content",
    "test_audio_content",
    "test_embedded_resource",
    "test_multiple_content_types",
    "test_tool_with_logging",
    "test_error_handling",
    "test_tool_with_progress",
    "test_sampling",
    "test_elicitation",
    "test_elicitation_sep1034_defaults",
    "test_elicitation_sep1330_enums",
    "json_schema_2020_12_tool",
    "test_reconnection",
    "test_missing_capability",
    "test_streaming_elicitation",
    "test_logging_tool",
    "test_trigger_tool_change",
    "test_trigger_prompt_change",
    "test_input_required_result_elicitation",
    "test_input_required_result_sampling",
    "test_input_required_result_list_roots",
    "test_input_required_result_request_state",
    "test_input_required_result_multiple_inputs",
    "test_input_required_result_multi_round",
    "test_input_required_result_tampered_state",
    "test_input_required_result_capabilities",
    "test_custom_header_tool",
    "greet",
    "slow_compute",
    "failing_job",
    "protocol_error_job",
    "confirm_delete",
    "multi_input",
    "test_tool_with_task",
];

#[test]
fn info_declares_list_changed_subscribe_completions_and_logging() {
    let e = env();
    let info = e.catalog.info();
    assert_eq!(info.server_info.name, "haven");
    assert!(!info.server_info.version.is_empty());
    assert_eq!(
        serde_json::to_value(&info.capabilities).unwrap(),
        json!({
            "tools": { "listChanged": true },
            "prompts": { "listChanged": true },
            "resources": { "subscribe": true, "listChanged": true },
            "completions": {},
            "logging": {}
        })
    );
}

#[tokio::test]
async fn tools_are_complete_ordered_and_described() {
    let (e, c) = env_with(stateless());
    let tools = e.catalog.tools(&c.ctx).await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(names, TOOL_NAMES);
    assert_eq!(names[0], "test_simple_text");
    // Deterministic order across calls.
    let again = e.catalog.tools(&c.ctx).await.unwrap();
    assert_eq!(tools, again);
    for t in &tools {
        let name = t.name.as_ref();
        assert!(
            !name.is_empty()
                && name.len() <= 128
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch)),
            "{name}: bad name"
        );
        assert!(
            t.description
                .as_deref()
                .is_some_and(|d| !d.trim().is_empty()),
            "{name}"
        );
        assert_eq!(t.input_schema.get("type"), Some(&json!("object")), "{name}");
        let has_header = t
            .input_schema
            .get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| p.values().any(|v| v.get("x-mcp-header").is_some()));
        assert_eq!(
            has_header,
            name == "test_custom_header_tool",
            "{name}: x-mcp-header"
        );
    }
}

#[tokio::test]
async fn special_tool_schemas_are_verbatim() {
    let (e, c) = env_with(legacy());
    let tools = e.catalog.tools(&c.ctx).await.unwrap();
    let get = |n: &str| {
        let t = tools.iter().find(|t| t.name == n).unwrap();
        serde_json::to_value(t).unwrap()
    };
    assert_eq!(
        get("json_schema_2020_12_tool"),
        json!({
            "name": "json_schema_2020_12_tool",
            "description": "Tool with JSON Schema 2020-12 features",
            "inputSchema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "$defs": { "address": {
                    "$anchor": "addressDef",
                    "type": "object",
                    "properties": { "street": { "type": "string" }, "city": { "type": "string" } }
                } },
                "properties": {
                    "name": { "type": "string" },
                    "address": { "$ref": "#/$defs/address" },
                    "contactMethod": { "type": "string", "enum": ["phone", "email"] },
                    "phone": { "type": "string" },
                    "email": { "type": "string" }
                },
                "allOf": [{ "anyOf": [{ "required": ["phone"] }, { "required": ["email"] }] }],
                "if": {
                    "properties": { "contactMethod": { "const": "phone" } },
                    "required": ["contactMethod"]
                },
                "then": { "required": ["phone"] },
                "else": { "required": ["email"] },
                "additionalProperties": false
            }
        })
    );
    assert_eq!(
        get("test_custom_header_tool"),
        json!({
            "name": "test_custom_header_tool",
            "description": "Echoes a greeting mirrored into Mcp-Param-Greeting",
            "inputSchema": {
                "type": "object",
                "properties": { "greeting": { "type": "string", "x-mcp-header": "Greeting" } },
                "required": ["greeting"]
            }
        })
    );
    assert_eq!(
        get("test_reconnection")["inputSchema"],
        json!({ "type": "object", "properties": {} })
    );
    assert_eq!(
        get("test_sampling")["inputSchema"]["required"],
        json!(["prompt"])
    );
    assert_eq!(
        get("test_elicitation")["inputSchema"]["required"],
        json!(["message"])
    );
}

#[test]
fn task_support_follows_the_tasks_fixtures() {
    let e = env();
    let expect = [
        ("greet", TaskSupport::Forbidden),
        ("slow_compute", TaskSupport::Optional),
        ("failing_job", TaskSupport::Required),
        ("protocol_error_job", TaskSupport::Required),
        ("confirm_delete", TaskSupport::Optional),
        ("multi_input", TaskSupport::Optional),
        ("test_tool_with_task", TaskSupport::Required),
        ("test_simple_text", TaskSupport::Forbidden),
        ("test_sampling", TaskSupport::Forbidden),
    ];
    for (tool, support) in expect {
        assert_eq!(e.catalog.task_support(tool), support, "{tool}");
    }
}

// ---------------------------------------------------------------------------------------------
// Plain content tools
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn content_tools_return_the_reference_payloads() {
    let e = env();
    for era in [legacy(), stateless()] {
        let c = e.ctx(era);
        let cases = [
            (
                "test_simple_text",
                text_result("This is a simple text response for testing."),
            ),
            (
                "test_image_content",
                json!({ "content": [{ "type": "image", "data": PNG, "mimeType": "image/png" }] }),
            ),
            (
                "test_audio_content",
                json!({ "content": [{ "type": "audio", "data": WAV, "mimeType": "audio/wav" }] }),
            ),
            (
                "test_embedded_resource",
                json!({ "content": [{ "type": "resource", "resource": {
                    "uri": "test://embedded-resource",
                    "mimeType": "text/plain",
                    "text": "This is an embedded resource content."
                } }] }),
            ),
            (
                "test_multiple_content_types",
                json!({ "content": [
                    { "type": "text", "text": "Multiple content types test:" },
                    { "type": "image", "data": PNG, "mimeType": "image/png" },
                    { "type": "resource", "resource": {
                        "uri": "test://mixed-content-resource",
                        "mimeType": "application/json",
                        "text": "{\"test\":\"data\",\"value\":123}"
                    } }
                ] }),
            ),
            (
                "test_error_handling",
                json!({ "isError": true, "content": [{ "type": "text", "text": "This tool intentionally returns an error for testing" }] }),
            ),
        ];
        for (name, expected) in cases {
            assert_eq!(
                e.done_first(&c.ctx, name, json!({})).await,
                expected,
                "{name}"
            );
        }
    }
}

#[tokio::test]
async fn simple_text_works_as_the_first_tool_with_empty_arguments_and_echo_tools_echo() {
    let (e, c) = env_with(stateless());
    let r = e.done_first(&c.ctx, "test_simple_text", json!({})).await;
    assert_eq!(text_of(&r), "This is a simple text response for testing.");
    let r = e
        .done_first(
            &c.ctx,
            "test_custom_header_tool",
            json!({ "greeting": "Hello" }),
        )
        .await;
    assert_eq!(r, text_result("Hello"));
    let err = e
        .error_first(&c.ctx, "test_custom_header_tool", json!({}))
        .await;
    assert_eq!(err.code.0, -32602);
    let r = e
        .done_first(&c.ctx, "greet", json!({ "name": "sep-2243" }))
        .await;
    assert_eq!(r, text_result("Hello, sep-2243!"));
    let r = e
        .done_first(&c.ctx, "json_schema_2020_12_tool", json!({ "name": "x" }))
        .await;
    assert_eq!(
        text_of(&r),
        "JSON Schema 2020-12 tool called with: {\"name\":\"x\"}"
    );
}

#[tokio::test]
async fn unknown_tool_is_a_protocol_error_not_a_tool_error() {
    let (e, c) = env_with(legacy());
    let err = e.error_first(&c.ctx, "no_such_tool", json!({})).await;
    assert_eq!(err.code.0, -32602);
    assert!(err.message.contains("no_such_tool"));
}

// ---------------------------------------------------------------------------------------------
// Logging, progress, streams, announcements
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn logging_tool_sends_three_info_messages_before_its_result() {
    let e = env();
    let mut c = e.call_ctx(legacy(), all_caps(), Some(LoggingLevel::Debug), None);
    let r = e
        .done_first(&c.ctx, "test_tool_with_logging", json!({}))
        .await;
    assert_eq!(r, text_result("Tool with logging executed successfully"));
    let items = drain(&mut c.rx);
    assert_eq!(
        notifications(&items, "notifications/message"),
        vec![
            json!({ "level": "info", "data": "Tool execution started" }),
            json!({ "level": "info", "data": "Tool processing data" }),
            json!({ "level": "info", "data": "Tool execution completed" }),
        ]
    );
    // A legacy session with no level set still hears info messages.
    let mut c = e.call_ctx(legacy(), all_caps(), None, None);
    e.done_first(&c.ctx, "test_tool_with_logging", json!({}))
        .await;
    assert_eq!(
        notifications(&drain(&mut c.rx), "notifications/message").len(),
        3
    );
    // A session at "error" hears none.
    let mut c = e.call_ctx(legacy(), all_caps(), Some(LoggingLevel::Error), None);
    e.done_first(&c.ctx, "test_tool_with_logging", json!({}))
        .await;
    assert!(notifications(&drain(&mut c.rx), "notifications/message").is_empty());
}

#[tokio::test]
async fn stateless_logging_tool_logs_only_when_a_level_is_named() {
    let e = env();
    let mut c = e.call_ctx(stateless(), json!({}), None, None);
    let r = e.done_first(&c.ctx, "test_logging_tool", json!({})).await;
    assert_eq!(r, text_result("logged"));
    assert!(drain(&mut c.rx).is_empty(), "no logLevel, no log frames");

    let mut c = e.call_ctx(stateless(), json!({}), Some(LoggingLevel::Info), None);
    let r = e.done_first(&c.ctx, "test_logging_tool", json!({})).await;
    assert_eq!(text_of(&r), "logged");
    let logs = notifications(&drain(&mut c.rx), "notifications/message");
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0]["level"], "info");
}

#[tokio::test]
async fn progress_tool_reports_0_50_100_of_100_with_the_token_then_echoes_it() {
    let e = env();
    for era in [legacy(), stateless()] {
        let token = ProgressToken(NumberOrString::String("progress-test-1".into()));
        let mut c = e.call_ctx(era, all_caps(), None, Some(token));
        let r = e
            .done_first(&c.ctx, "test_tool_with_progress", json!({}))
            .await;
        assert_eq!(r, text_result("progress-test-1"));
        let progress = notifications(&drain(&mut c.rx), "notifications/progress");
        assert_eq!(
            progress,
            vec![
                json!({ "progressToken": "progress-test-1", "progress": 0.0, "total": 100.0, "message": "Completed step 0 of 100" }),
                json!({ "progressToken": "progress-test-1", "progress": 50.0, "total": 100.0, "message": "Completed step 50 of 100" }),
                json!({ "progressToken": "progress-test-1", "progress": 100.0, "total": 100.0, "message": "Completed step 100 of 100" }),
            ]
        );
        let values: Vec<f64> = progress
            .iter()
            .map(|p| p["progress"].as_f64().unwrap())
            .collect();
        assert_eq!(values, [0.0, 50.0, 100.0]);
    }
    // An integer token is echoed as an integer in notifications and as decimal text.
    let mut c = e.call_ctx(
        legacy(),
        all_caps(),
        None,
        Some(ProgressToken(NumberOrString::Number(7))),
    );
    let r = e
        .done_first(&c.ctx, "test_tool_with_progress", json!({}))
        .await;
    assert_eq!(text_of(&r), "7");
    let progress = notifications(&drain(&mut c.rx), "notifications/progress");
    assert!(progress.iter().all(|p| p["progressToken"] == json!(7)));
    // No token: no notifications, still a result.
    let mut c = e.ctx(legacy());
    let r = e
        .done_first(&c.ctx, "test_tool_with_progress", json!({}))
        .await;
    assert!(!text_of(&r).is_empty());
    assert!(drain(&mut c.rx).is_empty());
}

#[tokio::test(start_paused = true)]
async fn reconnection_closes_the_stream_before_answering() {
    let (e, mut c) = env_with(legacy());
    let call = e.done_first(&c.ctx, "test_reconnection", json!({}));
    let r = not_before(
        Duration::from_millis(100),
        call,
        "the result comes after a pause",
    )
    .await;
    assert_eq!(r, text_result("Reconnection test completed successfully"));
    assert_eq!(drain(&mut c.rx), vec![Item::Close]);
}

#[tokio::test]
async fn trigger_tools_record_announcements() {
    let (e, c) = env_with(stateless());
    let r = e
        .done_first(&c.ctx, "test_trigger_tool_change", json!({}))
        .await;
    assert!(!text_of(&r).is_empty());
    assert!(e.announced("list/tools").await);
    assert!(!e.announced("list/prompts").await);
    let r = e
        .done_first(&c.ctx, "test_trigger_prompt_change", json!({}))
        .await;
    assert!(!text_of(&r).is_empty());
    assert!(e.announced("list/prompts").await);
}

// ---------------------------------------------------------------------------------------------
// Legacy sampling and elicitation (the engine turns NeedInput into real requests)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn test_sampling_asks_the_client_llm_and_reports_its_answer() {
    let (e, c) = env_with(legacy());
    let args = json!({ "prompt": "Test prompt for sampling" });
    let (requests, _) = e.need_first(&c.ctx, "test_sampling", args.clone()).await;
    assert_eq!(requests.len(), 1);
    let (key, request) = requests.iter().next().unwrap();
    assert_eq!(*request, sampling_request("Test prompt for sampling", 100));
    let answer = json!({ key: sampling_answer("This is a test response from the client") });
    let r = e
        .done(&c.ctx, "test_sampling", args, round(answer, None, 1))
        .await;
    assert_eq!(
        r,
        text_result("LLM response: This is a test response from the client")
    );
    // Without the sampling capability the tool refuses with -32021 instead of asking.
    let c = e.call_ctx(legacy(), json!({ "elicitation": {} }), None, None);
    let err = e
        .error_first(&c.ctx, "test_sampling", json!({ "prompt": "x" }))
        .await;
    assert_eq!(err.code.0, -32021);
}

#[tokio::test]
async fn test_elicitation_asks_for_username_and_email() {
    let (e, c) = env_with(legacy());
    let args = json!({ "message": "Please provide your information" });
    let (requests, _) = e.need_first(&c.ctx, "test_elicitation", args.clone()).await;
    let (key, request) = requests.iter().next().unwrap();
    assert_eq!(
        *request,
        json!({
            "method": "elicitation/create",
            "params": {
                "message": "Please provide your information",
                "requestedSchema": {
                    "type": "object",
                    "properties": {
                        "username": { "type": "string", "description": "User's response" },
                        "email": { "type": "string", "description": "User's email address" }
                    },
                    "required": ["username", "email"]
                }
            }
        })
    );
    let answer =
        json!({ key: accept(json!({ "username": "testuser", "email": "test@example.com" })) });
    let r = e
        .done(
            &c.ctx,
            "test_elicitation",
            args.clone(),
            round(answer, None, 1),
        )
        .await;
    assert_eq!(
        text_of(&r),
        r#"User response: action=accept, content={"email":"test@example.com","username":"testuser"}"#
    );
    let answer = json!({ key: { "action": "decline" } });
    let r = e
        .done(&c.ctx, "test_elicitation", args, round(answer, None, 1))
        .await;
    assert_eq!(text_of(&r), "User response: action=decline, content=null");
}

#[tokio::test]
async fn sep1034_request_carries_every_default_exactly() {
    let (e, c) = env_with(legacy());
    let (key, request) = e
        .only_request(&c.ctx, "test_elicitation_sep1034_defaults")
        .await;
    assert_eq!(
        request,
        form_mode_request(
            "Please review and update the form fields with defaults",
            json!({
                "name": { "type": "string", "description": "User name", "default": "John Doe" },
                "age": { "type": "integer", "description": "User age", "default": 30 },
                "score": { "type": "number", "description": "User score", "default": 95.5 },
                "status": {
                    "type": "string",
                    "description": "User status",
                    "enum": ["active", "inactive", "pending"],
                    "default": "active"
                },
                "verified": { "type": "boolean", "description": "Verification status", "default": true }
            }),
        )
    );
    // The integer default stays an integer on the wire.
    let age = &request["params"]["requestedSchema"]["properties"]["age"]["default"];
    assert!(age.is_u64());
    let content = json!({ "name": "Jane Smith", "age": 25, "score": 88, "status": "inactive", "verified": false });
    let r = e
        .answered(
            &c.ctx,
            "test_elicitation_sep1034_defaults",
            json!({ key: accept(content) }),
        )
        .await;
    assert_eq!(
        text_of(&r),
        r#"Elicitation completed: action=accept, content={"age":25,"name":"Jane Smith","score":88,"status":"inactive","verified":false}"#
    );
}

#[tokio::test]
async fn sep1330_request_has_each_enum_shape_exactly() {
    let (e, c) = env_with(legacy());
    let (key, request) = e
        .only_request(&c.ctx, "test_elicitation_sep1330_enums")
        .await;
    assert_eq!(
        request,
        form_mode_request(
            "Please select options from the enum fields",
            json!({
                "untitledSingle": {
                    "type": "string",
                    "description": "Select one option",
                    "enum": ["option1", "option2", "option3"]
                },
                "titledSingle": {
                    "type": "string",
                    "description": "Select one option with titles",
                    "oneOf": [
                        { "const": "value1", "title": "First Option" },
                        { "const": "value2", "title": "Second Option" },
                        { "const": "value3", "title": "Third Option" }
                    ]
                },
                "legacyEnum": {
                    "type": "string",
                    "description": "Select one option (legacy)",
                    "enum": ["opt1", "opt2", "opt3"],
                    "enumNames": ["Option One", "Option Two", "Option Three"]
                },
                "untitledMulti": {
                    "type": "array",
                    "description": "Select multiple options",
                    "minItems": 1,
                    "maxItems": 3,
                    "items": { "type": "string", "enum": ["option1", "option2", "option3"] }
                },
                "titledMulti": {
                    "type": "array",
                    "description": "Select multiple options with titles",
                    "minItems": 1,
                    "maxItems": 3,
                    "items": { "anyOf": [
                        { "const": "value1", "title": "First Choice" },
                        { "const": "value2", "title": "Second Choice" },
                        { "const": "value3", "title": "Third Choice" }
                    ] }
                }
            }),
        )
    );
    let props = &request["params"]["requestedSchema"]["properties"];
    // The shapes the SDK's Zod union must not misparse.
    assert!(props["titledSingle"].get("enum").is_none());
    assert!(props["untitledSingle"].get("oneOf").is_none());
    assert!(props["titledMulti"]["items"].get("enum").is_none());
    assert!(props["titledMulti"]["items"].get("type").is_none());
    let content = json!({
        "untitledSingle": "option1", "titledSingle": "value1", "legacyEnum": "opt1",
        "untitledMulti": ["option1", "option2"], "titledMulti": ["value1", "value2"]
    });
    let r = e
        .answered(
            &c.ctx,
            "test_elicitation_sep1330_enums",
            json!({ key: accept(content) }),
        )
        .await;
    assert!(text_of(&r).starts_with("Elicitation completed: action=accept, content={"));
}

// ---------------------------------------------------------------------------------------------
// 2026-07-28 stateless fixtures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_capability_is_32021_with_required_sampling_data() {
    let e = env();
    let c = e.call_ctx(stateless(), json!({}), None, None);
    let err = e
        .error_first(&c.ctx, "test_missing_capability", json!({}))
        .await;
    assert_eq!(err.code.0, -32021);
    assert_eq!(
        err.data,
        Some(json!({ "requiredCapabilities": { "sampling": {} } }))
    );
    assert!(!err.message.is_empty());

    let c = e.call_ctx(stateless(), json!({ "sampling": {} }), None, None);
    let (requests, _) = e
        .need_first(&c.ctx, "test_missing_capability", json!({}))
        .await;
    assert_eq!(requests.len(), 1);
    let (key, request) = requests.iter().next().unwrap();
    assert_eq!(request["method"], "sampling/createMessage");
    assert!(request["params"]["maxTokens"].is_u64());
    let answer = json!({ key: sampling_answer("hi") });
    let r = e.answered(&c.ctx, "test_missing_capability", answer).await;
    assert!(text_of(&r).contains("hi"));
}

#[tokio::test]
async fn streaming_elicitation_answers_with_an_input_request_not_a_stream_request() {
    let e = env();
    let mut c = e.call_ctx(stateless(), json!({ "elicitation": {} }), None, None);
    let (requests, _) = e
        .need_first(&c.ctx, "test_streaming_elicitation", json!({}))
        .await;
    assert_eq!(
        requests,
        one_request("confirm", form_request("Proceed?", "ok", "boolean"))
    );
    assert!(
        drain(&mut c.rx).is_empty(),
        "nothing goes on the stream itself"
    );
    let answer = json!({ "confirm": accept(json!({ "ok": true })) });
    let r = e
        .answered(&c.ctx, "test_streaming_elicitation", answer)
        .await;
    assert!(!text_of(&r).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Input-required results (MRTR)
// ---------------------------------------------------------------------------------------------

const IRR_ELICIT: &str = "test_input_required_result_elicitation";

#[tokio::test]
async fn irr_elicitation_asks_for_user_name_then_greets() {
    let (e, c) = env_with(stateless());
    let (requests, state) = e.need_first(&c.ctx, IRR_ELICIT, json!({})).await;
    assert_eq!(requests, one_request("user_name", name_request()));
    assert_eq!(state, None);
    // Completes with a valid answer even though no state comes back (ignore-extra-params).
    let answer = json!({
        "user_name": accept(json!({ "name": "Alice" })),
        "unknown_extra_key": accept(json!({ "foo": "bar" })),
        "another_unexpected": accept(json!({ "baz": 123 }))
    });
    let r = e.answered(&c.ctx, IRR_ELICIT, answer).await;
    assert_eq!(r, text_result("Hello, Alice!"));
}

#[tokio::test]
async fn irr_elicitation_rerequests_on_missing_key_and_rejects_malformed_input() {
    let (e, c) = env_with(stateless());
    // missing-input-response: a wrong key gets the same request again.
    let answer = json!({ "wrong_key": accept(json!({ "data": "wrong" })) });
    let (requests, _) = e
        .need(&c.ctx, IRR_ELICIT, json!({}), round(answer, None, 1))
        .await;
    assert_eq!(requests, one_request("user_name", name_request()));
    // validate-input: a non-object answer is -32602.
    let err = e
        .error(
            &c.ctx,
            IRR_ELICIT,
            json!({}),
            round(json!({ "user_name": 12345 }), None, 1),
        )
        .await;
    assert_eq!(err.code.0, -32602);
    assert_eq!(
        err.message,
        "Invalid inputResponses: user_name must be an object"
    );
    // An object that is not an elicitation result is also -32602.
    let err = e
        .error(
            &c.ctx,
            IRR_ELICIT,
            json!({}),
            round(json!({ "user_name": {} }), None, 1),
        )
        .await;
    assert_eq!(err.code.0, -32602);
    // A null answer counts as absent (inputResponses: null) and is asked again.
    let (requests, _) = e
        .need(
            &c.ctx,
            IRR_ELICIT,
            json!({}),
            round(json!({ "user_name": null }), None, 1),
        )
        .await;
    assert!(requests.contains_key("user_name"));
    // A declined elicitation still completes.
    let answer = json!({ "user_name": { "action": "decline" } });
    let r = e.answered(&c.ctx, IRR_ELICIT, answer).await;
    assert!(!text_of(&r).is_empty());
}

#[tokio::test]
async fn irr_sampling_and_list_roots_use_the_reference_requests() {
    let (e, c) = env_with(stateless());
    let (requests, _) = e
        .need_first(&c.ctx, "test_input_required_result_sampling", json!({}))
        .await;
    assert_eq!(
        requests,
        one_request(
            "capital_question",
            sampling_request("What is the capital of France?", 100)
        )
    );
    let answer = json!({ "capital_question": sampling_answer("The capital of France is Paris.") });
    let r = e
        .answered(&c.ctx, "test_input_required_result_sampling", answer)
        .await;
    assert_eq!(
        text_of(&r),
        "Sampling result: The capital of France is Paris."
    );
    // Content given as an array of blocks (SEP-1577) is understood too.
    let answer = json!({ "capital_question": { "role": "assistant", "model": "m", "content": [{ "type": "text", "text": "Paris" }] } });
    let r = e
        .answered(&c.ctx, "test_input_required_result_sampling", answer)
        .await;
    assert_eq!(text_of(&r), "Sampling result: Paris");
    let err = e
        .error(
            &c.ctx,
            "test_input_required_result_sampling",
            json!({}),
            round(json!({ "capital_question": "x" }), None, 1),
        )
        .await;
    assert_eq!(err.code.0, -32602);

    let (requests, _) = e
        .need_first(&c.ctx, "test_input_required_result_list_roots", json!({}))
        .await;
    assert_eq!(requests, one_request("client_roots", roots_request()));
    let answer = json!({ "client_roots": roots_answer() });
    let r = e
        .answered(&c.ctx, "test_input_required_result_list_roots", answer)
        .await;
    assert_eq!(text_of(&r), "Found 1 root(s): file:///test/root");
}

#[tokio::test]
async fn irr_request_state_and_tampered_state_need_their_state_back() {
    let (e, c) = env_with(stateless());
    for (tool, text) in [
        (
            "test_input_required_result_request_state",
            "state-ok: requestState validated",
        ),
        (
            "test_input_required_result_tampered_state",
            "Confirmed: requestState intact",
        ),
    ] {
        let (requests, state) = e.need_first(&c.ctx, tool, json!({})).await;
        assert_eq!(requests, one_request("confirm", confirm_ok_request()));
        let state = state.expect("a state, so that a requestState is emitted");
        let answer = json!({ "confirm": accept(json!({ "ok": true })) });
        let r = e
            .done(
                &c.ctx,
                tool,
                json!({}),
                round(answer.clone(), Some(state.clone()), 1),
            )
            .await;
        assert_eq!(r, text_result(text), "{tool}");
        // Without its state (or with another tool's) the answer is not trusted: ask again.
        let (requests, again) = e
            .need(&c.ctx, tool, json!({}), round(answer.clone(), None, 1))
            .await;
        assert!(requests.contains_key("confirm"));
        assert!(again.is_some());
        let foreign = json!({ "tool": "something_else", "step": 1 });
        let (requests, _) = e
            .need(&c.ctx, tool, json!({}), round(answer, Some(foreign), 1))
            .await;
        assert!(requests.contains_key("confirm"));
    }
}

#[tokio::test]
async fn irr_multiple_inputs_asks_three_kinds_at_once_and_keeps_partial_answers() {
    let (e, c) = env_with(stateless());
    let tool = "test_input_required_result_multiple_inputs";
    let (requests, state) = e.need_first(&c.ctx, tool, json!({})).await;
    assert_eq!(
        requests,
        BTreeMap::from([
            ("user_name".to_owned(), name_request()),
            (
                "greeting".to_owned(),
                sampling_request("Generate a greeting", 50)
            ),
            ("client_roots".to_owned(), roots_request()),
        ])
    );
    assert!(state.is_some());
    let all = json!({
        "user_name": accept(json!({ "name": "Alice" })),
        "greeting": sampling_answer("Hello there!"),
        "client_roots": roots_answer()
    });
    let r = e
        .done(&c.ctx, tool, json!({}), round(all, state.clone(), 1))
        .await;
    assert_eq!(text_of(&r), "Name: Alice; Greeting: Hello there!; Roots: 1");

    // Partial answers: only the missing ones are asked again, the rest travels in the state.
    let partial = json!({ "user_name": accept(json!({ "name": "Bob" })) });
    let (requests, state2) = e
        .need(&c.ctx, tool, json!({}), round(partial, state, 1))
        .await;
    assert_eq!(
        requests.keys().collect::<Vec<_>>(),
        ["client_roots", "greeting"]
    );
    let rest = json!({ "greeting": sampling_answer("Hi!"), "client_roots": roots_answer() });
    let r = e
        .done(&c.ctx, tool, json!({}), round(rest, state2, 2))
        .await;
    assert_eq!(text_of(&r), "Name: Bob; Greeting: Hi!; Roots: 1");
}

#[tokio::test]
async fn irr_multi_round_carries_the_name_in_its_state() {
    let (e, c) = env_with(stateless());
    let tool = "test_input_required_result_multi_round";
    let (requests, s1) = e.need_first(&c.ctx, tool, json!({})).await;
    assert_eq!(
        requests,
        one_request(
            "step1",
            form_request("Step 1: What is your name?", "name", "string")
        )
    );
    let s1 = s1.expect("round 1 state");
    let r2 = round(
        json!({ "step1": accept(json!({ "name": "Alice" })) }),
        Some(s1.clone()),
        1,
    );
    let (requests, s2) = e.need(&c.ctx, tool, json!({}), r2).await;
    assert_eq!(
        requests,
        one_request(
            "step2",
            form_request("Step 2: What is your favorite color?", "color", "string")
        )
    );
    let s2 = s2.expect("round 2 state");
    assert_ne!(s1, s2, "the state changes between rounds");
    assert!(
        s2.to_string().contains("Alice"),
        "the name travels in the state"
    );
    // Round 3 only sends step2; the name comes from the state.
    let r3 = round(
        json!({ "step2": accept(json!({ "color": "blue" })) }),
        Some(s2.clone()),
        2,
    );
    let r = e.done(&c.ctx, tool, json!({}), r3).await;
    assert_eq!(text_of(&r), "Multi-round complete for Alice who likes blue");
    // A legacy engine that accumulates answers (step1 and step2 together) also completes.
    let both = json!({
        "step1": accept(json!({ "name": "Alice" })),
        "step2": accept(json!({ "color": "green" }))
    });
    let r = e
        .done(&c.ctx, tool, json!({}), round(both, Some(s2), 2))
        .await;
    assert_eq!(
        text_of(&r),
        "Multi-round complete for Alice who likes green"
    );
    // step2 without the round-2 state cannot know the name: start over.
    let lost = round(
        json!({ "step2": accept(json!({ "color": "blue" })) }),
        None,
        2,
    );
    let (requests, _) = e.need(&c.ctx, tool, json!({}), lost).await;
    assert!(requests.contains_key("step1"));
}

#[tokio::test]
async fn irr_capabilities_only_asks_for_declared_capabilities() {
    let e = env();
    let tool = "test_input_required_result_capabilities";
    let c = e.call_ctx(stateless(), json!({ "sampling": {} }), None, None);
    let (requests, _) = e.need_first(&c.ctx, tool, json!({})).await;
    assert_eq!(
        requests,
        one_request("sample", sampling_request("Summarise", 50))
    );
    let r = e
        .answered(&c.ctx, tool, json!({ "sample": sampling_answer("ok") }))
        .await;
    assert!(!text_of(&r).is_empty());

    let c = e.call_ctx(
        stateless(),
        json!({ "elicitation": {}, "roots": {} }),
        None,
        None,
    );
    let (requests, _) = e.need_first(&c.ctx, tool, json!({})).await;
    assert_eq!(
        requests.keys().collect::<Vec<_>>(),
        ["client_roots", "confirm"]
    );
    assert!(
        requests
            .values()
            .all(|r| r["method"] != "sampling/createMessage")
    );

    let c = e.call_ctx(stateless(), all_caps(), None, None);
    let (requests, _) = e.need_first(&c.ctx, tool, json!({})).await;
    assert_eq!(requests.len(), 3);

    // Nothing declared: nothing can be asked; the tool says so as a tool error.
    let c = e.call_ctx(stateless(), json!({}), None, None);
    let r = e.done_first(&c.ctx, tool, json!({})).await;
    assert_eq!(r["isError"], true);
}

#[tokio::test]
async fn the_same_mrtr_tools_work_for_legacy_sessions() {
    let (e, c) = env_with(legacy());
    let (requests, _) = e.need_first(&c.ctx, IRR_ELICIT, json!({})).await;
    assert!(requests.contains_key("user_name"));
    let answer = json!({ "user_name": accept(json!({ "name": "Zoë" })) });
    let r = e.answered(&c.ctx, IRR_ELICIT, answer).await;
    assert_eq!(text_of(&r), "Hello, Zoë!");
}

// ---------------------------------------------------------------------------------------------
// Tasks extension tools
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn slow_compute_with_zero_seconds_answers_directly() {
    let e = env();
    let (hook, ctx, _c) = e.task_call(true, tasks_caps());
    let r = e
        .done_first(
            &ctx,
            "slow_compute",
            json!({ "seconds": 0, "label": "instant" }),
        )
        .await;
    assert_eq!(text_of(&r), "Computed instant in 0 second(s)");
    assert_eq!(hook.promotions(), 0);
}

#[tokio::test(start_paused = true)]
async fn slow_compute_becomes_a_task_and_stops_when_cancelled() {
    let e = env();
    let (hook, ctx, c) = e.task_call(true, tasks_caps());
    let call = e.error_first(
        &ctx,
        "slow_compute",
        json!({ "seconds": 60, "label": "cancel" }),
    );
    tokio::pin!(call);
    // Still sleeping (as a task) after a while, it ends as soon as it is cancelled.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut call)
            .await
            .is_err(),
        "slow_compute ended before it was cancelled"
    );
    c.cancel.cancel();
    let err = tokio::time::timeout(Duration::from_millis(1), call)
        .await
        .expect("slow_compute did not stop when cancelled");
    assert_eq!(hook.promotions(), 1);
    assert!(err.message.contains("cancelled"));
}

#[tokio::test(start_paused = true)]
async fn slow_compute_without_task_support_runs_synchronously() {
    let e = env();
    let (hook, ctx, _c) = e.task_call(false, json!({}));
    let call = e.done_first(
        &ctx,
        "slow_compute",
        json!({ "seconds": 1, "label": "sync" }),
    );
    let r = not_before(Duration::from_millis(900), call, "it sleeps its second").await;
    assert_eq!(text_of(&r), "Computed sync in 1 second(s)");
    assert_eq!(hook.promotions(), 1);
}

#[tokio::test]
async fn failing_and_protocol_error_jobs_become_tasks_then_fail_their_way() {
    let e = env();
    let (hook, ctx, _c) = e.task_call(true, tasks_caps());
    let r = e.done_first(&ctx, "failing_job", json!({})).await;
    assert_eq!(r["isError"], true);
    assert!(!text_of(&r).is_empty());
    assert_eq!(hook.promotions(), 1);

    let (hook, ctx, _c) = e.task_call(true, tasks_caps());
    let err = e.error_first(&ctx, "protocol_error_job", json!({})).await;
    assert_eq!(err.code.0, -32603);
    assert!(!err.message.is_empty());
    assert_eq!(hook.promotions(), 1);
}

#[tokio::test]
async fn confirm_delete_becomes_a_task_asks_then_completes() {
    let e = env();
    let (hook, ctx, _c) = e.task_call(true, tasks_caps());
    let args = json!({ "filename": "mrtr-resume.txt" });
    let (requests, _) = e.need_first(&ctx, "confirm_delete", args.clone()).await;
    assert_eq!(hook.promotions(), 1);
    assert_eq!(
        requests,
        one_request(
            "confirm",
            form_request("Delete mrtr-resume.txt?", "confirm", "boolean")
        )
    );
    let answer = json!({ "confirm": accept(json!({ "confirm": true })) });
    let r = e
        .done(&ctx, "confirm_delete", args.clone(), round(answer, None, 1))
        .await;
    assert_eq!(text_of(&r), "Deleted mrtr-resume.txt");
    assert_eq!(
        hook.promotions(),
        1,
        "no second promotion once it is a task"
    );

    // Without task support it is an ordinary multi-round tool.
    let hook = FakeHook::new(false);
    let c = e.call_ctx(legacy(), all_caps(), None, None);
    let ctx = c.ctx.with_task_hook(hook.clone());
    let (requests, _) = e.need_first(&ctx, "confirm_delete", args.clone()).await;
    assert!(requests.contains_key("confirm"));
    let answer = json!({ "confirm": accept(json!({ "confirm": false })) });
    let r = e
        .done(&ctx, "confirm_delete", args, round(answer, None, 1))
        .await;
    assert!(text_of(&r).starts_with("Kept mrtr-resume.txt"));
}

#[tokio::test]
async fn multi_input_asks_two_things_and_completes_when_both_are_answered() {
    let e = env();
    let (hook, ctx, _c) = e.task_call(true, tasks_caps());
    let (requests, _) = e.need_first(&ctx, "multi_input", json!({})).await;
    assert_eq!(requests.keys().collect::<Vec<_>>(), ["confirm", "name"]);
    assert!(
        requests
            .values()
            .all(|r| r["method"] == "elicitation/create")
    );
    assert_eq!(hook.promotions(), 1);
    let both = json!({
        "confirm": accept(json!({ "name": "partial-1", "confirm": true })),
        "name": accept(json!({ "name": "partial-2", "confirm": true }))
    });
    let r = e.answered(&ctx, "multi_input", both).await;
    assert_eq!(
        text_of(&r),
        "multi_input complete: name=partial-2, confirm=true"
    );
    let partial = json!({ "name": accept(json!({ "name": "x" })) });
    let (requests, _) = e
        .need(&ctx, "multi_input", json!({}), round(partial, None, 1))
        .await;
    assert_eq!(requests.keys().collect::<Vec<_>>(), ["confirm"]);
}

#[tokio::test]
async fn tool_with_task_asks_synchronously_first_then_becomes_a_task() {
    let e = env();
    let hook = FakeHook::new(true);
    let c = e.call_ctx(
        stateless(),
        json!({ "elicitation": {}, "extensions": { "io.modelcontextprotocol/tasks": {} } }),
        None,
        None,
    );
    let ctx = c.ctx.with_task_hook(hook.clone());
    let (requests, _) = e.need_first(&ctx, "test_tool_with_task", json!({})).await;
    assert_eq!(requests, one_request("user_name", name_request()));
    assert_eq!(hook.promotions(), 0, "no task before the synchronous round");
    let answer = json!({ "user_name": accept(json!({ "name": "Alice" })) });
    let r = e.answered(&ctx, "test_tool_with_task", answer).await;
    assert_eq!(hook.promotions(), 1);
    assert!(text_of(&r).contains("Alice"));
}

#[tokio::test]
async fn greet_never_becomes_a_task() {
    let e = env();
    let (hook, ctx, _c) = e.task_call(true, tasks_caps());
    let r = e
        .done_first(&ctx, "greet", json!({ "name": "World" }))
        .await;
    assert_eq!(text_of(&r), "Hello, World!");
    assert_eq!(hook.promotions(), 0);
}

// ---------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------

async fn read(e: &Env, ctx: &Ctx, uri: &str) -> Result<Value, ErrorData> {
    match e.catalog.read_resource(ctx, uri, Round::default()).await? {
        Step::Done(r) => Ok(serde_json::to_value(r).unwrap()),
        Step::NeedInput { .. } => panic!("{uri}: resources never ask for input"),
    }
}

#[tokio::test]
async fn resources_and_templates_are_listed_exactly() {
    let (e, c) = env_with(stateless());
    let resources = serde_json::to_value(e.catalog.resources(&c.ctx).await.unwrap()).unwrap();
    assert_eq!(
        resources,
        json!([
            {
                "uri": "test://static-text", "name": "static-text", "title": "Static Text Resource",
                "description": "A static text resource for testing", "mimeType": "text/plain"
            },
            {
                "uri": "test://static-binary", "name": "static-binary", "title": "Static Binary Resource",
                "description": "A static binary resource (image) for testing", "mimeType": "image/png"
            },
            {
                "uri": "test://watched-resource", "name": "watched-resource", "title": "Watched Resource",
                "description": "A resource that auto-updates every 3 seconds", "mimeType": "text/plain"
            }
        ])
    );
    let templates =
        serde_json::to_value(e.catalog.resource_templates(&c.ctx).await.unwrap()).unwrap();
    assert_eq!(
        templates,
        json!([{
            "uriTemplate": "test://template/{id}/data", "name": "template", "title": "Resource Template",
            "description": "A resource template with parameter substitution", "mimeType": "application/json"
        }])
    );
    // Every listed resource is readable (the caching scenario reads the first).
    for r in resources.as_array().unwrap() {
        let uri = r["uri"].as_str().unwrap();
        let got = read(&e, &c.ctx, uri).await.unwrap();
        assert_eq!(got["contents"][0]["uri"], uri);
        assert_eq!(got["contents"][0]["mimeType"], r["mimeType"]);
    }
}

#[tokio::test]
async fn resources_read_returns_the_reference_contents() {
    let (e, c) = env_with(legacy());
    assert_eq!(
        read(&e, &c.ctx, "test://static-text").await.unwrap(),
        json!({ "contents": [{
            "uri": "test://static-text", "mimeType": "text/plain",
            "text": "This is the content of the static text resource."
        }] })
    );
    assert_eq!(
        read(&e, &c.ctx, "test://static-binary").await.unwrap(),
        json!({ "contents": [{ "uri": "test://static-binary", "mimeType": "image/png", "blob": PNG }] })
    );
    assert_eq!(
        read(&e, &c.ctx, "test://watched-resource").await.unwrap(),
        json!({ "contents": [{
            "uri": "test://watched-resource", "mimeType": "text/plain", "text": "Watched resource content"
        }] })
    );
}

#[tokio::test]
async fn template_reads_substitute_the_id() {
    let (e, c) = env_with(stateless());
    assert_eq!(
        read(&e, &c.ctx, "test://template/123/data").await.unwrap(),
        json!({ "contents": [{
            "uri": "test://template/123/data", "mimeType": "application/json",
            "text": "{\"id\":\"123\",\"templateTest\":true,\"data\":\"Data for ID: 123\"}"
        }] })
    );
    // The text is valid JSON even for ids that need escaping.
    let got = read(&e, &c.ctx, "test://template/a\"b/data").await.unwrap();
    let text: Value = serde_json::from_str(got["contents"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        text,
        json!({ "id": "a\"b", "templateTest": true, "data": "Data for ID: a\"b" })
    );
    for bad in [
        "test://template//data",
        "test://template/1/2/data",
        "test://template/1",
        "test://template/1/datax",
    ] {
        assert_eq!(
            read(&e, &c.ctx, bad).await.unwrap_err().code.0,
            -32002,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn unknown_resources_are_not_found_with_the_uri() {
    let (e, c) = env_with(stateless());
    let uri = "test://nonexistent-resource-for-conformance-testing";
    let err = read(&e, &c.ctx, uri).await.unwrap_err();
    assert_eq!(
        err.code.0, -32002,
        "the engine maps it to -32602 for 2026-07-28"
    );
    assert_eq!(err.data, Some(json!({ "uri": uri })));
    // Content-only URIs are not resources.
    assert!(read(&e, &c.ctx, "test://embedded-resource").await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------------------------

async fn prompt(
    e: &Env,
    ctx: &Ctx,
    name: &str,
    args: Value,
    r: Round,
) -> Result<Step<Value>, ErrorData> {
    let args: JsonObject = serde_json::from_value(args).unwrap();
    Ok(match e.catalog.get_prompt(ctx, name, args, r).await? {
        Step::Done(p) => Step::Done(serde_json::to_value(p).unwrap()),
        Step::NeedInput { requests, state } => Step::NeedInput { requests, state },
    })
}

async fn prompt_done(e: &Env, ctx: &Ctx, name: &str, args: Value) -> Value {
    match prompt(e, ctx, name, args, Round::default()).await {
        Ok(Step::Done(v)) => v,
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn prompts_are_listed_with_descriptions_and_arguments() {
    let (e, c) = env_with(stateless());
    let prompts = serde_json::to_value(e.catalog.prompts(&c.ctx).await.unwrap()).unwrap();
    assert_eq!(
        prompts,
        json!([
            { "name": "test_simple_prompt", "title": "Simple Test Prompt", "description": "A simple prompt without arguments" },
            {
                "name": "test_prompt_with_arguments", "title": "Prompt With Arguments",
                "description": "A prompt with required arguments",
                "arguments": [
                    { "name": "arg1", "description": "First test argument", "required": true },
                    { "name": "arg2", "description": "Second test argument", "required": true }
                ]
            },
            {
                "name": "test_prompt_with_embedded_resource", "title": "Prompt With Embedded Resource",
                "description": "A prompt that includes an embedded resource",
                "arguments": [{ "name": "resourceUri", "description": "URI of the resource to embed", "required": true }]
            },
            { "name": "test_prompt_with_image", "title": "Prompt With Image", "description": "A prompt that includes image content" },
            {
                "name": "test_input_required_result_prompt", "title": "Input-Required Prompt",
                "description": "A multi-round prompt that asks the user for context through elicitation"
            }
        ])
    );
}

#[tokio::test]
async fn prompts_render_the_reference_messages() {
    let (e, c) = env_with(legacy());
    assert_eq!(
        prompt_done(&e, &c.ctx, "test_simple_prompt", json!({})).await,
        json!({ "messages": [{ "role": "user", "content": { "type": "text", "text": "This is a simple prompt for testing." } }] })
    );
    assert_eq!(
        prompt_done(
            &e,
            &c.ctx,
            "test_prompt_with_arguments",
            json!({ "arg1": "testValue1", "arg2": "testValue2" })
        )
        .await,
        json!({ "messages": [{ "role": "user", "content": {
            "type": "text", "text": "Prompt with arguments: arg1='testValue1', arg2='testValue2'"
        } }] })
    );
    assert_eq!(
        prompt_done(
            &e,
            &c.ctx,
            "test_prompt_with_embedded_resource",
            json!({ "resourceUri": "test://example-resource" })
        )
        .await,
        json!({ "messages": [
            { "role": "user", "content": { "type": "resource", "resource": {
                "uri": "test://example-resource", "mimeType": "text/plain",
                "text": "Embedded resource content for testing."
            } } },
            { "role": "user", "content": { "type": "text", "text": "Please process the embedded resource above." } }
        ] })
    );
    assert_eq!(
        prompt_done(&e, &c.ctx, "test_prompt_with_image", json!({})).await,
        json!({ "messages": [
            { "role": "user", "content": { "type": "image", "data": PNG, "mimeType": "image/png" } },
            { "role": "user", "content": { "type": "text", "text": "Please analyze the image above." } }
        ] })
    );
}

#[tokio::test]
async fn prompt_errors_are_invalid_params() {
    let (e, c) = env_with(legacy());
    for (name, args) in [
        ("test_prompt_with_arguments", json!({ "arg1": "only one" })),
        ("test_prompt_with_embedded_resource", json!({})),
        ("no_such_prompt", json!({})),
    ] {
        let err = prompt(&e, &c.ctx, name, args, Round::default())
            .await
            .unwrap_err();
        assert_eq!(err.code.0, -32602, "{name}");
    }
}

#[tokio::test]
async fn input_required_prompt_asks_for_context_then_renders_it() {
    let (e, c) = env_with(stateless());
    let name = "test_input_required_result_prompt";
    match prompt(&e, &c.ctx, name, json!({}), Round::default())
        .await
        .unwrap()
    {
        Step::NeedInput { requests, state } => {
            assert_eq!(state, None);
            assert_eq!(
                requests_json(&requests),
                one_request(
                    "user_context",
                    form_request("What context should the prompt use?", "context", "string")
                )
            );
        }
        other => panic!("expected input request, got {other:?}"),
    }
    let answer = json!({ "user_context": accept(json!({ "context": "test context" })) });
    match prompt(&e, &c.ctx, name, json!({}), round(answer, None, 1))
        .await
        .unwrap()
    {
        Step::Done(v) => assert_eq!(
            v,
            json!({ "messages": [{ "role": "user", "content": { "type": "text", "text": "Prompt with context: test context" } }] })
        ),
        other => panic!("expected a prompt, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Completion
// ---------------------------------------------------------------------------------------------

fn complete_params(reference: Value, arg: &str, value: &str) -> CompleteRequestParams {
    serde_json::from_value(json!({ "ref": reference, "argument": { "name": arg, "value": value } }))
        .unwrap()
}

#[tokio::test]
async fn completion_filters_candidates_by_prefix() {
    let (e, c) = env_with(stateless());
    let prompt_ref = json!({ "type": "ref/prompt", "name": "test_prompt_with_arguments" });
    let r = e
        .catalog
        .complete(&c.ctx, complete_params(prompt_ref.clone(), "arg1", "test"))
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&r).unwrap(),
        json!({ "completion": { "values": ["test", "testing", "testValue1"], "total": 3, "hasMore": false } })
    );
    let r = e
        .catalog
        .complete(&c.ctx, complete_params(prompt_ref.clone(), "arg1", "pa"))
        .await
        .unwrap();
    assert_eq!(r.completion.values, ["paris", "park", "party"]);
    let r = e
        .catalog
        .complete(&c.ctx, complete_params(prompt_ref.clone(), "arg1", ""))
        .await
        .unwrap();
    assert!(!r.completion.values.is_empty() && r.completion.values.len() <= 100);
    let r = e
        .catalog
        .complete(&c.ctx, complete_params(prompt_ref.clone(), "arg1", "zzz"))
        .await
        .unwrap();
    assert!(r.completion.values.is_empty());
    let r = e
        .catalog
        .complete(&c.ctx, complete_params(prompt_ref, "unknown_arg", ""))
        .await
        .unwrap();
    assert!(r.completion.values.is_empty());

    let template = json!({ "type": "ref/resource", "uri": "test://template/{id}/data" });
    let r = e
        .catalog
        .complete(&c.ctx, complete_params(template, "id", "1"))
        .await
        .unwrap();
    assert_eq!(r.completion.values, ["1", "123"]);

    let unknown = json!({ "type": "ref/prompt", "name": "no_such_prompt" });
    let err = e
        .catalog
        .complete(&c.ctx, complete_params(unknown, "arg1", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code.0, -32602);
}
