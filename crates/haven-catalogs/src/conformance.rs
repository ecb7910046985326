//! The `conformance` catalog: exactly the fixtures of the official MCP conformance suite.
//!
//! It serves the scenarios of both protocol eras from one set of handlers: the legacy
//! (2025-11-25) server scenarios, the 2026-07-28 scenarios (stateless, input-required results,
//! caching) and the not-scored ones (JSON Schema 2020-12, SSE polling, custom headers and the
//! tasks extension). Handlers that need client input answer [`Step::NeedInput`]; the engine turns
//! that into real server-to-client requests for legacy sessions and into input-required results
//! for stateless clients, so the same code serves `test_sampling` and
//! `test_input_required_result_sampling`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rmcp::model::{
    CallToolResult, CompleteRequestParams, CompleteResult, CompletionInfo, ContentBlock, ErrorCode,
    ErrorData, GetPromptResult, Implementation, JsonObject, LoggingLevel, NumberOrString, Prompt,
    PromptArgument, PromptMessage, PromptsCapability, ReadResourceResult, Reference, Resource,
    ResourceContents, ResourceTemplate, ResourcesCapability, Role, ServerCapabilities, Tool,
    ToolsCapability,
};
use serde_json::{Value, json};

use haven_mcp::catalog::{Catalog, CatalogInfo, Ctx, InputRequest, Round, Step, TaskSupport};
use haven_mcp::context::Announcement;
use haven_mcp::jsonrpc::{internal, invalid_params};

/// The reference fixture's 1×1 PNG, base64.
pub const PNG_BASE64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==";

/// The reference fixture's minimal WAV, base64.
pub const WAV_BASE64: &str = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=";

const STATIC_TEXT_URI: &str = "test://static-text";
const STATIC_BINARY_URI: &str = "test://static-binary";
const WATCHED_URI: &str = "test://watched-resource";
const TEMPLATE_PREFIX: &str = "test://template/";
const TEMPLATE_SUFFIX: &str = "/data";

/// The catalog of conformance-suite fixtures.
#[derive(Clone, Debug)]
pub struct ConformanceCatalog {
    tools: Vec<Tool>,
}

impl Default for ConformanceCatalog {
    fn default() -> Self {
        ConformanceCatalog::new()
    }
}

impl ConformanceCatalog {
    /// The catalog with every fixture of both protocol eras.
    pub fn new() -> ConformanceCatalog {
        ConformanceCatalog { tools: tool_list() }
    }
}

fn no_args() -> Value {
    json!({ "type": "object", "properties": {} })
}

// Long by design: a flat list of the suite's fixture tools, exactly as the suite expects them.
fn tool_list() -> Vec<Tool> {
    use haven_mcp::catalog::tool;
    vec![
        // Must stay first: http-header-validation calls tools[0] with `arguments: {}`.
        tool(
            "test_simple_text",
            "Tests simple text content response",
            no_args(),
        ),
        tool(
            "test_image_content",
            "Tests image content response",
            no_args(),
        ),
        tool(
            "test_audio_content",
            "Tests audio content response",
            no_args(),
        ),
        tool(
            "test_embedded_resource",
            "Tests embedded resource content response",
            no_args(),
        ),
        tool(
            "test_multiple_content_types",
            "Tests response with multiple content types (text, image, resource)",
            no_args(),
        ),
        tool(
            "test_tool_with_logging",
            "Tests tool that emits log messages during execution",
            no_args(),
        ),
        tool(
            "test_error_handling",
            "Tests error response handling",
            no_args(),
        ),
        tool(
            "test_tool_with_progress",
            "Tests tool that reports progress notifications",
            no_args(),
        ),
        tool(
            "test_sampling",
            "Tests server-initiated sampling (LLM completion request)",
            json!({
                "type": "object",
                "properties": {
                    "prompt": { "type": "string", "description": "The prompt to send to the LLM" }
                },
                "required": ["prompt"]
            }),
        ),
        tool(
            "test_elicitation",
            "Tests server-initiated elicitation (user input request)",
            json!({
                "type": "object",
                "properties": {
                    "message": { "type": "string", "description": "The message to show the user" }
                },
                "required": ["message"]
            }),
        ),
        tool(
            "test_elicitation_sep1034_defaults",
            "Tests elicitation with default values for all primitive types (SEP-1034)",
            no_args(),
        ),
        tool(
            "test_elicitation_sep1330_enums",
            "Tests elicitation with enum schema improvements (SEP-1330)",
            no_args(),
        ),
        tool(
            "json_schema_2020_12_tool",
            "Tool with JSON Schema 2020-12 features",
            json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "$defs": {
                    "address": {
                        "$anchor": "addressDef",
                        "type": "object",
                        "properties": {
                            "street": { "type": "string" },
                            "city": { "type": "string" }
                        }
                    }
                },
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
            }),
        ),
        tool(
            "test_reconnection",
            "Tests SSE stream disconnection and client reconnection: closes the response stream \
             before the result and delivers the result on resumption",
            no_args(),
        ),
        tool(
            "test_missing_capability",
            "Requires the client's sampling capability; without it the call fails with -32021",
            no_args(),
        ),
        tool(
            "test_streaming_elicitation",
            "Asks the client for confirmation through an input-required result (never a request \
             on the response stream)",
            no_args(),
        ),
        tool(
            "test_logging_tool",
            "Logs a message (only delivered when the request names a log level) and returns \
             'logged'",
            no_args(),
        ),
        tool(
            "test_trigger_tool_change",
            "Announces that the tool list changed",
            no_args(),
        ),
        tool(
            "test_trigger_prompt_change",
            "Announces that the prompt list changed",
            no_args(),
        ),
        tool(
            "test_input_required_result_elicitation",
            "Multi-round tool: asks the user's name through elicitation, then greets them",
            no_args(),
        ),
        tool(
            "test_input_required_result_sampling",
            "Multi-round tool: asks the client's LLM a question through sampling",
            no_args(),
        ),
        tool(
            "test_input_required_result_list_roots",
            "Multi-round tool: asks the client for its roots",
            no_args(),
        ),
        tool(
            "test_input_required_result_request_state",
            "Multi-round tool that carries its progress in requestState",
            no_args(),
        ),
        tool(
            "test_input_required_result_multiple_inputs",
            "Multi-round tool that asks for elicitation, sampling and roots at once",
            no_args(),
        ),
        tool(
            "test_input_required_result_multi_round",
            "Three-round tool: asks a name, then a favourite colour, carrying the name in \
             requestState",
            no_args(),
        ),
        tool(
            "test_input_required_result_tampered_state",
            "Multi-round tool whose requestState is integrity-protected; a tampered state is \
             rejected",
            no_args(),
        ),
        tool(
            "test_input_required_result_capabilities",
            "Multi-round tool that only asks for input the client declared it supports",
            no_args(),
        ),
        tool(
            "test_custom_header_tool",
            "Echoes a greeting mirrored into Mcp-Param-Greeting",
            json!({
                "type": "object",
                "properties": { "greeting": { "type": "string", "x-mcp-header": "Greeting" } },
                "required": ["greeting"]
            }),
        ),
        tool(
            "greet",
            "Greets someone synchronously (never runs as a task)",
            json!({
                "type": "object",
                "properties": { "name": { "type": "string", "description": "Who to greet" } },
                "required": ["name"]
            }),
        ),
        tool(
            "slow_compute",
            "Sleeps the given number of seconds (as a task when the client supports tasks), then \
             returns",
            json!({
                "type": "object",
                "properties": {
                    "seconds": { "type": "integer", "minimum": 0, "description": "How long to work" },
                    "label": { "type": "string", "description": "A label echoed in the result" }
                },
                "required": ["seconds"]
            }),
        ),
        tool(
            "failing_job",
            "Task-only job that completes with a tool error after about a second",
            no_args(),
        ),
        tool(
            "protocol_error_job",
            "Task-only job that fails with a JSON-RPC internal error",
            no_args(),
        ),
        tool(
            "confirm_delete",
            "Asks for confirmation (as a task when possible) before pretending to delete a file",
            json!({
                "type": "object",
                "properties": {
                    "filename": { "type": "string", "description": "The file to delete" }
                },
                "required": ["filename"]
            }),
        ),
        tool(
            "multi_input",
            "Asks for two inputs at once (as a task when possible)",
            no_args(),
        ),
        tool(
            "test_tool_with_task",
            "Asks the user's name synchronously, then greets them from a task",
            no_args(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// A successful tool result (no `isError`, no `resultType`: the engine adds what the era needs).
fn ok(content: Vec<ContentBlock>) -> CallToolResult {
    let mut r = CallToolResult::success(content);
    r.is_error = None;
    r.result_type = None;
    r
}

fn ok_text(text: impl Into<String>) -> CallToolResult {
    ok(vec![ContentBlock::text(text)])
}

fn tool_error(text: impl Into<String>) -> CallToolResult {
    let mut r = CallToolResult::error(vec![ContentBlock::text(text)]);
    r.is_error = Some(true);
    r.result_type = None;
    r
}

fn done(r: CallToolResult) -> Result<Step<CallToolResult>, ErrorData> {
    Ok(Step::Done(r))
}

fn text_resource(uri: &str, mime: &str, text: &str) -> ResourceContents {
    ResourceContents::text(text, uri).with_mime_type(mime)
}

fn blob_resource(uri: &str, mime: &str, blob: &str) -> ResourceContents {
    ResourceContents::blob(blob, uri).with_mime_type(mime)
}

fn one(key: &str, request: InputRequest) -> BTreeMap<String, InputRequest> {
    BTreeMap::from([(key.to_owned(), request)])
}

fn need(
    requests: BTreeMap<String, InputRequest>,
    state: Option<Value>,
) -> Result<Step<CallToolResult>, ErrorData> {
    Ok(Step::NeedInput { requests, state })
}

/// A string argument; numbers and booleans are rendered as JSON.
fn arg_str(args: &JsonObject, key: &str) -> Option<String> {
    match args.get(key)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn required_arg(args: &JsonObject, key: &str) -> Result<String, ErrorData> {
    arg_str(args, key).ok_or_else(|| invalid_params(format!("Missing required argument: {key}")))
}

/// An `elicitation/create` request in form mode with the given schema.
fn elicit(message: &str, schema: Value) -> InputRequest {
    InputRequest::new(
        "elicitation/create",
        json!({ "message": message, "requestedSchema": schema }),
    )
}

/// An elicitation asking for one required property of `ty`.
fn elicit_one(message: &str, property: &str, ty: &str) -> InputRequest {
    elicit(
        message,
        json!({
            "type": "object",
            "properties": { property: { "type": ty } },
            "required": [property]
        }),
    )
}

/// A `sampling/createMessage` request with a single user text message.
fn sample(text: &str, max_tokens: u32) -> InputRequest {
    InputRequest::new(
        "sampling/createMessage",
        json!({
            "messages": [{ "role": "user", "content": { "type": "text", "text": text } }],
            "maxTokens": max_tokens
        }),
    )
}

fn list_roots() -> InputRequest {
    InputRequest::new("roots/list", json!({}))
}

/// A client's answer to an elicitation: its action and content.
struct Elicited {
    action: String,
    content: Option<JsonObject>,
}

impl Elicited {
    /// The answer under `key`, if there is one. A present but malformed answer is -32602.
    fn from(round: &Round, key: &str) -> Result<Option<Elicited>, ErrorData> {
        let Some(obj) = answer_object(round, key)? else {
            return Ok(None);
        };
        let Some(action) = obj.get("action").and_then(Value::as_str) else {
            return Err(invalid_params(format!(
                "Invalid inputResponses: {key} must be an elicitation result with an action"
            )));
        };
        let content = match obj.get("content") {
            None | Some(Value::Null) => None,
            Some(Value::Object(c)) => Some(c.clone()),
            Some(_) => {
                return Err(invalid_params(format!(
                    "Invalid inputResponses: {key}.content must be an object"
                )));
            }
        };
        Ok(Some(Elicited {
            action: action.to_owned(),
            content,
        }))
    }

    fn accepted(&self) -> bool {
        self.action == "accept"
    }

    /// A string field of the accepted content.
    fn field(&self, name: &str) -> Option<String> {
        if !self.accepted() {
            return None;
        }
        match self.content.as_ref()?.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    fn content_json(&self) -> String {
        match &self.content {
            Some(c) => Value::Object(c.clone()).to_string(),
            None => "null".to_owned(),
        }
    }

    /// `action=<action>, content=<json>`.
    fn summary(&self) -> String {
        format!("action={}, content={}", self.action, self.content_json())
    }
}

/// The client's answer under `key` (an object), if there is one. A present but malformed
/// answer is -32602.
fn answer_object<'a>(round: &'a Round, key: &str) -> Result<Option<&'a JsonObject>, ErrorData> {
    let Some(v) = round.input_responses.get(key) else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    match v.as_object() {
        Some(obj) => Ok(Some(obj)),
        None => Err(invalid_params(format!(
            "Invalid inputResponses: {key} must be an object"
        ))),
    }
}

/// The text of a client's answer to a sampling request under `key`.
fn sampled(round: &Round, key: &str) -> Result<Option<String>, ErrorData> {
    let Some(obj) = answer_object(round, key)? else {
        return Ok(None);
    };
    let text = |c: &Value| c.get("text").and_then(Value::as_str).map(str::to_owned);
    let found = match obj.get("content") {
        Some(Value::Array(items)) => items.iter().find_map(text),
        Some(c @ Value::Object(_)) => text(c),
        _ => None,
    };
    found.map(Some).ok_or_else(|| {
        invalid_params(format!(
            "Invalid inputResponses: {key} must be a sampling result with text content"
        ))
    })
}

/// The root URIs of a client's answer to `roots/list` under `key`.
fn rooted(round: &Round, key: &str) -> Result<Option<Vec<String>>, ErrorData> {
    let Some(v) = round.input_responses.get(key) else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    let Some(roots) = v.get("roots").and_then(Value::as_array) else {
        return Err(invalid_params(format!(
            "Invalid inputResponses: {key} must be a roots/list result"
        )));
    };
    Ok(Some(
        roots
            .iter()
            .filter_map(|r| r.get("uri").and_then(Value::as_str).map(str::to_owned))
            .collect(),
    ))
}

fn missing_sampling() -> ErrorData {
    ErrorData::new(
        ErrorCode::MISSING_REQUIRED_CLIENT_CAPABILITY,
        "Missing required client capability: sampling",
        Some(json!({ "requiredCapabilities": { "sampling": {} } })),
    )
}

fn cancelled(what: &str) -> ErrorData {
    ErrorData::new(ErrorCode(-32800), format!("{what} was cancelled"), None)
}

fn token_text(ctx: &Ctx) -> Option<String> {
    ctx.progress_token().map(|t| match &t.0 {
        NumberOrString::Number(n) => n.to_string(),
        NumberOrString::String(s) => s.to_string(),
    })
}

fn user_name_request() -> InputRequest {
    elicit_one("What is your name?", "name", "string")
}

fn confirm_ok_request() -> InputRequest {
    elicit_one("Please confirm", "ok", "boolean")
}

/// A marker `state` for tools whose only cross-round data is which step they are on.
fn step_state(tool: &str, step: u32) -> Value {
    json!({ "tool": tool, "step": step })
}

fn state_step(state: &Option<Value>, tool: &str) -> Option<u64> {
    let s = state.as_ref()?;
    if s.get("tool").and_then(Value::as_str) != Some(tool) {
        return None;
    }
    s.get("step").and_then(Value::as_u64)
}

// ---------------------------------------------------------------------------------------------
// Tool handlers
// ---------------------------------------------------------------------------------------------

impl ConformanceCatalog {
    async fn with_logging(&self, ctx: &Ctx) -> Result<Step<CallToolResult>, ErrorData> {
        let steps = [
            "Tool execution started",
            "Tool processing data",
            "Tool execution completed",
        ];
        for (i, msg) in steps.iter().enumerate() {
            if i > 0 && !ctx.sleep(Duration::from_millis(50)).await {
                return Err(cancelled("test_tool_with_logging"));
            }
            ctx.log(LoggingLevel::Info, None, json!(msg));
        }
        done(ok_text("Tool with logging executed successfully"))
    }

    async fn with_progress(&self, ctx: &Ctx) -> Result<Step<CallToolResult>, ErrorData> {
        for (i, p) in [0u32, 50, 100].into_iter().enumerate() {
            if i > 0 && !ctx.sleep(Duration::from_millis(50)).await {
                return Err(cancelled("test_tool_with_progress"));
            }
            ctx.progress(
                f64::from(p),
                Some(100.0),
                Some(format!("Completed step {p} of 100")),
            );
        }
        done(ok_text(
            token_text(ctx).unwrap_or_else(|| "Progress test completed".to_owned()),
        ))
    }

    async fn sampling(
        &self,
        ctx: &Ctx,
        args: &JsonObject,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(text) = sampled(round, "llm_response")? {
            return done(ok_text(format!("LLM response: {text}")));
        }
        if !ctx.client_supports("sampling") {
            return Err(missing_sampling());
        }
        let prompt = arg_str(args, "prompt").unwrap_or_else(|| "Test prompt for sampling".into());
        need(one("llm_response", sample(&prompt, 100)), None)
    }

    async fn elicitation(
        &self,
        args: &JsonObject,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(e) = Elicited::from(round, "user_info")? {
            return done(ok_text(format!("User response: {}", e.summary())));
        }
        let message =
            arg_str(args, "message").unwrap_or_else(|| "Please provide your information".into());
        let request = elicit(
            &message,
            json!({
                "type": "object",
                "properties": {
                    "username": { "type": "string", "description": "User's response" },
                    "email": { "type": "string", "description": "User's email address" }
                },
                "required": ["username", "email"]
            }),
        );
        need(one("user_info", request), None)
    }

    async fn sep1034(&self, round: &Round) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(e) = Elicited::from(round, "defaults")? {
            return done(ok_text(format!("Elicitation completed: {}", e.summary())));
        }
        need(one("defaults", sep1034_request()), None)
    }

    async fn sep1330(&self, round: &Round) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(e) = Elicited::from(round, "enums")? {
            return done(ok_text(format!("Elicitation completed: {}", e.summary())));
        }
        need(one("enums", sep1330_request()), None)
    }

    async fn reconnection(&self, ctx: &Ctx) -> Result<Step<CallToolResult>, ErrorData> {
        ctx.close_stream();
        if !ctx.sleep(Duration::from_millis(200)).await {
            return Err(cancelled("test_reconnection"));
        }
        done(ok_text("Reconnection test completed successfully"))
    }

    async fn missing_capability(
        &self,
        ctx: &Ctx,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        if !ctx.client_supports("sampling") {
            return Err(missing_sampling());
        }
        if let Some(text) = sampled(round, "sample")? {
            return done(ok_text(format!(
                "Sampling capability present; the model said: {text}"
            )));
        }
        need(one("sample", sample("Say hello", 50)), None)
    }

    async fn streaming_elicitation(
        &self,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(e) = Elicited::from(round, "confirm")? {
            return done(ok_text(format!(
                "Streaming elicitation completed: {}",
                e.summary()
            )));
        }
        let request = elicit(
            "Proceed?",
            json!({
                "type": "object",
                "properties": { "ok": { "type": "boolean" } },
                "required": ["ok"]
            }),
        );
        need(one("confirm", request), None)
    }

    async fn announce(
        &self,
        ctx: &Ctx,
        what: Announcement,
        text: &str,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        ctx.announce(what)
            .await
            .map_err(|e| haven_mcp::outcome::store_failure(format!("Cannot announce: {e}"), &e))?;
        done(ok_text(text))
    }

    async fn irr_elicitation(&self, round: &Round) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(e) = Elicited::from(round, "user_name")? {
            let text = match e.field("name") {
                Some(name) => format!("Hello, {name}!"),
                None => format!("No name given ({})", e.summary()),
            };
            return done(ok_text(text));
        }
        need(one("user_name", user_name_request()), None)
    }

    async fn irr_sampling(&self, round: &Round) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(text) = sampled(round, "capital_question")? {
            return done(ok_text(format!("Sampling result: {text}")));
        }
        need(
            one(
                "capital_question",
                sample("What is the capital of France?", 100),
            ),
            None,
        )
    }

    async fn irr_list_roots(&self, round: &Round) -> Result<Step<CallToolResult>, ErrorData> {
        if let Some(roots) = rooted(round, "client_roots")? {
            return done(ok_text(format!(
                "Found {} root(s): {}",
                roots.len(),
                roots.join(", ")
            )));
        }
        need(one("client_roots", list_roots()), None)
    }

    /// A one-question tool that only completes when its own `state` comes back.
    async fn irr_confirm_with_state(
        &self,
        tool: &str,
        round: &Round,
        done_text: &str,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let answer = Elicited::from(round, "confirm")?;
        if answer.is_some() && state_step(&round.state, tool) == Some(1) {
            return done(ok_text(done_text));
        }
        need(
            one("confirm", confirm_ok_request()),
            Some(step_state(tool, 1)),
        )
    }

    async fn irr_multiple_inputs(&self, round: &Round) -> Result<Step<CallToolResult>, ErrorData> {
        const TOOL: &str = "test_input_required_result_multiple_inputs";
        // Answers from earlier rounds travel in the state, so a partial answer is never lost.
        let mut answers: JsonObject = round
            .state
            .as_ref()
            .filter(|s| s.get("tool").and_then(Value::as_str) == Some(TOOL))
            .and_then(|s| s.get("answers"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for key in ["user_name", "greeting", "client_roots"] {
            if let Some(v) = round.input_responses.get(key).filter(|v| !v.is_null()) {
                answers.insert(key.to_owned(), v.clone());
            }
        }
        let merged = Round {
            input_responses: answers.clone().into_iter().collect(),
            ..Round::default()
        };
        let name = Elicited::from(&merged, "user_name")?;
        let greeting = sampled(&merged, "greeting")?;
        let roots = rooted(&merged, "client_roots")?;
        if let (Some(name), Some(greeting), Some(roots)) = (&name, &greeting, &roots) {
            let who = name
                .field("name")
                .unwrap_or_else(|| format!("({})", name.action));
            return done(ok_text(format!(
                "Name: {who}; Greeting: {greeting}; Roots: {}",
                roots.len()
            )));
        }
        let mut requests = BTreeMap::new();
        if name.is_none() {
            requests.insert("user_name".to_owned(), user_name_request());
        }
        if greeting.is_none() {
            requests.insert("greeting".to_owned(), sample("Generate a greeting", 50));
        }
        if roots.is_none() {
            requests.insert("client_roots".to_owned(), list_roots());
        }
        need(requests, Some(json!({ "tool": TOOL, "answers": answers })))
    }

    async fn irr_multi_round(&self, round: &Round) -> Result<Step<CallToolResult>, ErrorData> {
        const TOOL: &str = "test_input_required_result_multi_round";
        let state_name = round
            .state
            .as_ref()
            .filter(|_| state_step(&round.state, TOOL) == Some(2))
            .and_then(|s| s.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let (Some(name), Some(color)) = (&state_name, Elicited::from(round, "step2")?) {
            let color = color.field("color").unwrap_or_else(|| "nothing".to_owned());
            return done(ok_text(format!(
                "Multi-round complete for {name} who likes {color}"
            )));
        }
        if let Some(step1) = Elicited::from(round, "step1")? {
            let name = step1
                .field("name")
                .unwrap_or_else(|| "anonymous".to_owned());
            let request = elicit_one("Step 2: What is your favorite color?", "color", "string");
            return need(
                one("step2", request),
                Some(json!({ "tool": TOOL, "step": 2, "name": name })),
            );
        }
        let request = elicit_one("Step 1: What is your name?", "name", "string");
        need(one("step1", request), Some(step_state(TOOL, 1)))
    }

    async fn irr_capabilities(
        &self,
        ctx: &Ctx,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let mut requests = BTreeMap::new();
        if ctx.client_supports("sampling") {
            requests.insert("sample".to_owned(), sample("Summarise", 50));
        }
        if ctx.client_supports("elicitation") {
            requests.insert("confirm".to_owned(), confirm_ok_request());
        }
        if ctx.client_supports("roots") {
            requests.insert("client_roots".to_owned(), list_roots());
        }
        if requests.is_empty() {
            return done(tool_error(
                "The client declared none of sampling, elicitation or roots; nothing to ask",
            ));
        }
        let answered = requests
            .keys()
            .all(|k| round.input_responses.get(k).is_some_and(|v| !v.is_null()));
        if answered {
            let keys: Vec<&str> = requests.keys().map(String::as_str).collect();
            return done(ok_text(format!(
                "Received input for declared capabilities: {}",
                keys.join(", ")
            )));
        }
        need(requests, None)
    }

    async fn slow_compute(
        &self,
        ctx: &Ctx,
        args: &JsonObject,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let seconds = args
            .get("seconds")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(3600);
        let label = arg_str(args, "label").unwrap_or_else(|| "slow_compute".to_owned());
        let text = format!("Computed {label} in {seconds} second(s)");
        if seconds == 0 {
            return done(ok_text(text));
        }
        ctx.become_task().await?;
        if !ctx.sleep(Duration::from_secs(seconds)).await {
            return Err(cancelled("slow_compute"));
        }
        done(ok_text(text))
    }

    async fn failing_job(&self, ctx: &Ctx) -> Result<Step<CallToolResult>, ErrorData> {
        ctx.become_task().await?;
        if !ctx.sleep(Duration::from_secs(1)).await {
            return Err(cancelled("failing_job"));
        }
        done(tool_error("failing_job failed on purpose"))
    }

    async fn protocol_error_job(&self, ctx: &Ctx) -> Result<Step<CallToolResult>, ErrorData> {
        ctx.become_task().await?;
        Err(internal(
            "protocol_error_job failed on purpose with a protocol error",
        ))
    }

    async fn confirm_delete(
        &self,
        ctx: &Ctx,
        args: &JsonObject,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let filename = arg_str(args, "filename").unwrap_or_else(|| "unnamed".to_owned());
        if let Some(e) = Elicited::from(round, "confirm")? {
            let confirmed = e.accepted()
                && e.content.as_ref().and_then(|c| c.get("confirm")) == Some(&Value::Bool(true));
            let text = if confirmed {
                format!("Deleted {filename}")
            } else {
                format!("Kept {filename} ({})", e.summary())
            };
            return done(ok_text(text));
        }
        if !ctx.is_task() {
            ctx.become_task().await?;
        }
        let request = elicit_one(&format!("Delete {filename}?"), "confirm", "boolean");
        need(one("confirm", request), None)
    }

    async fn multi_input(
        &self,
        ctx: &Ctx,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let name = Elicited::from(round, "name")?;
        let confirm = Elicited::from(round, "confirm")?;
        if let (Some(name), Some(confirm)) = (&name, &confirm) {
            let who = name.field("name").unwrap_or_else(|| "anonymous".to_owned());
            let ok = confirm
                .field("confirm")
                .unwrap_or_else(|| "false".to_owned());
            return done(ok_text(format!(
                "multi_input complete: name={who}, confirm={ok}"
            )));
        }
        if !ctx.is_task() {
            ctx.become_task().await?;
        }
        let mut requests = BTreeMap::new();
        if name.is_none() {
            requests.insert("name".to_owned(), user_name_request());
        }
        if confirm.is_none() {
            requests.insert(
                "confirm".to_owned(),
                elicit_one("Do you confirm?", "confirm", "boolean"),
            );
        }
        need(requests, None)
    }

    async fn tool_with_task(
        &self,
        ctx: &Ctx,
        round: &Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let Some(answer) = Elicited::from(round, "user_name")? else {
            // The synchronous input-required round comes first; the task only after it.
            return need(one("user_name", user_name_request()), None);
        };
        let name = answer
            .field("name")
            .unwrap_or_else(|| "anonymous".to_owned());
        if !ctx.is_task() {
            ctx.become_task().await?;
        }
        done(ok_text(format!("Hello, {name}! (from a task)")))
    }
}

fn sep1034_request() -> InputRequest {
    InputRequest::new(
        "elicitation/create",
        json!({
            "mode": "form",
            "message": "Please review and update the form fields with defaults",
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "name": { "type": "string", "description": "User name", "default": "John Doe" },
                    "age": { "type": "integer", "description": "User age", "default": 30 },
                    "score": { "type": "number", "description": "User score", "default": 95.5 },
                    "status": {
                        "type": "string",
                        "description": "User status",
                        "enum": ["active", "inactive", "pending"],
                        "default": "active"
                    },
                    "verified": {
                        "type": "boolean",
                        "description": "Verification status",
                        "default": true
                    }
                },
                "required": []
            }
        }),
    )
}

fn sep1330_request() -> InputRequest {
    InputRequest::new(
        "elicitation/create",
        json!({
            "mode": "form",
            "message": "Please select options from the enum fields",
            "requestedSchema": {
                "type": "object",
                "properties": {
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
                        "items": {
                            "anyOf": [
                                { "const": "value1", "title": "First Choice" },
                                { "const": "value2", "title": "Second Choice" },
                                { "const": "value3", "title": "Third Choice" }
                            ]
                        }
                    }
                },
                "required": []
            }
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Resources, prompts, completion
// ---------------------------------------------------------------------------------------------

fn resource_list() -> Vec<Resource> {
    vec![
        // First, and readable: the caching scenario reads resources[0].
        Resource::new(STATIC_TEXT_URI, "static-text")
            .with_title("Static Text Resource")
            .with_description("A static text resource for testing")
            .with_mime_type("text/plain"),
        Resource::new(STATIC_BINARY_URI, "static-binary")
            .with_title("Static Binary Resource")
            .with_description("A static binary resource (image) for testing")
            .with_mime_type("image/png"),
        Resource::new(WATCHED_URI, "watched-resource")
            .with_title("Watched Resource")
            .with_description("A resource that auto-updates every 3 seconds")
            .with_mime_type("text/plain"),
    ]
}

/// The `{id}` of a `test://template/{id}/data` URI.
fn template_id(uri: &str) -> Option<&str> {
    let id = uri
        .strip_prefix(TEMPLATE_PREFIX)?
        .strip_suffix(TEMPLATE_SUFFIX)?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

fn template_text(id: &str) -> String {
    let quoted = |s: &str| Value::String(s.to_owned()).to_string();
    format!(
        "{{\"id\":{},\"templateTest\":true,\"data\":{}}}",
        quoted(id),
        quoted(&format!("Data for ID: {id}"))
    )
}

fn prompt_list() -> Vec<Prompt> {
    let arg = |name: &str, description: &str| {
        PromptArgument::new(name)
            .with_description(description)
            .with_required(true)
    };
    vec![
        Prompt::new(
            "test_simple_prompt",
            Some("A simple prompt without arguments"),
            None,
        )
        .with_title("Simple Test Prompt"),
        Prompt::new(
            "test_prompt_with_arguments",
            Some("A prompt with required arguments"),
            Some(vec![
                arg("arg1", "First test argument"),
                arg("arg2", "Second test argument"),
            ]),
        )
        .with_title("Prompt With Arguments"),
        Prompt::new(
            "test_prompt_with_embedded_resource",
            Some("A prompt that includes an embedded resource"),
            Some(vec![arg("resourceUri", "URI of the resource to embed")]),
        )
        .with_title("Prompt With Embedded Resource"),
        Prompt::new(
            "test_prompt_with_image",
            Some("A prompt that includes image content"),
            None,
        )
        .with_title("Prompt With Image"),
        Prompt::new(
            "test_input_required_result_prompt",
            Some("A multi-round prompt that asks the user for context through elicitation"),
            None,
        )
        .with_title("Input-Required Prompt"),
    ]
}

fn prompt_result(messages: Vec<PromptMessage>) -> GetPromptResult {
    let mut r = GetPromptResult::new(messages);
    r.result_type = None;
    r
}

/// Candidate completions; the values matching the typed prefix are returned.
fn completion_candidates(
    reference: &Reference,
    argument: &str,
) -> Result<&'static [&'static str], ErrorData> {
    match reference {
        Reference::Prompt(p) => match (p.name.as_str(), argument) {
            ("test_prompt_with_arguments", "arg1") => Ok(&[
                "test",
                "testing",
                "testValue1",
                "value1",
                "paris",
                "park",
                "party",
            ]),
            ("test_prompt_with_arguments", "arg2") => {
                Ok(&["test", "testing", "testValue2", "value2"])
            }
            ("test_prompt_with_embedded_resource", "resourceUri") => {
                Ok(&[STATIC_TEXT_URI, STATIC_BINARY_URI, WATCHED_URI])
            }
            (name, _) if prompt_list().iter().any(|p| p.name == name) => Ok(&[]),
            (name, _) => Err(invalid_params(format!("Unknown prompt: {name}"))),
        },
        Reference::Resource(r) if r.uri == "test://template/{id}/data" && argument == "id" => {
            Ok(&["1", "2", "3", "123"])
        }
        _ => Ok(&[]),
    }
}

// ---------------------------------------------------------------------------------------------
// The Catalog implementation
// ---------------------------------------------------------------------------------------------

#[async_trait]
impl Catalog for ConformanceCatalog {
    fn info(&self) -> CatalogInfo {
        let mut tools = ToolsCapability::default();
        tools.list_changed = Some(true);
        let mut prompts = PromptsCapability::default();
        prompts.list_changed = Some(true);
        let mut resources = ResourcesCapability::default();
        resources.subscribe = Some(true);
        resources.list_changed = Some(true);
        let mut capabilities = ServerCapabilities::default();
        capabilities.tools = Some(tools);
        capabilities.prompts = Some(prompts);
        capabilities.resources = Some(resources);
        capabilities.completions = Some(JsonObject::new());
        capabilities.logging = Some(JsonObject::new());
        CatalogInfo {
            server_info: Implementation::new("haven", env!("CARGO_PKG_VERSION"))
                .with_title("Haven (conformance fixtures)"),
            capabilities,
            instructions: Some(
                "Serves the fixtures of the official MCP conformance suite.".to_owned(),
            ),
        }
    }

    async fn tools(&self, _ctx: &Ctx) -> Result<Vec<Tool>, ErrorData> {
        Ok(self.tools.clone())
    }

    fn tracks_effects(&self, _tool: &str) -> bool {
        true
    }

    fn task_support(&self, tool: &str) -> TaskSupport {
        match tool {
            "slow_compute" | "confirm_delete" | "multi_input" => TaskSupport::Optional,
            "failing_job" | "protocol_error_job" | "test_tool_with_task" => TaskSupport::Required,
            _ => TaskSupport::Forbidden,
        }
    }

    async fn call_tool(
        &self,
        ctx: &Ctx,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<CallToolResult>, ErrorData> {
        let args = &arguments;
        let round = &round;
        match name {
            "test_simple_text" => done(ok_text("This is a simple text response for testing.")),
            "test_image_content" => done(ok(vec![ContentBlock::image(PNG_BASE64, "image/png")])),
            "test_audio_content" => done(ok(vec![ContentBlock::audio(WAV_BASE64, "audio/wav")])),
            "test_embedded_resource" => done(ok(vec![ContentBlock::resource(text_resource(
                "test://embedded-resource",
                "text/plain",
                "This is an embedded resource content.",
            ))])),
            "test_multiple_content_types" => done(ok(vec![
                ContentBlock::text("Multiple content types test:"),
                ContentBlock::image(PNG_BASE64, "image/png"),
                ContentBlock::resource(text_resource(
                    "test://mixed-content-resource",
                    "application/json",
                    r#"{"test":"data","value":123}"#,
                )),
            ])),
            "test_tool_with_logging" => self.with_logging(ctx).await,
            "test_error_handling" => done(tool_error(
                "This tool intentionally returns an error for testing",
            )),
            "test_tool_with_progress" => self.with_progress(ctx).await,
            "test_sampling" => self.sampling(ctx, args, round).await,
            "test_elicitation" => self.elicitation(args, round).await,
            "test_elicitation_sep1034_defaults" => self.sep1034(round).await,
            "test_elicitation_sep1330_enums" => self.sep1330(round).await,
            "json_schema_2020_12_tool" => done(ok_text(format!(
                "JSON Schema 2020-12 tool called with: {}",
                Value::Object(arguments.clone())
            ))),
            "test_reconnection" => self.reconnection(ctx).await,
            "test_missing_capability" => self.missing_capability(ctx, round).await,
            "test_streaming_elicitation" => self.streaming_elicitation(round).await,
            "test_logging_tool" => {
                ctx.log(
                    LoggingLevel::Info,
                    None,
                    json!("test_logging_tool was called"),
                );
                done(ok_text("logged"))
            }
            "test_trigger_tool_change" => {
                self.announce(
                    ctx,
                    Announcement::ToolsChanged,
                    "Tool list change announced",
                )
                .await
            }
            "test_trigger_prompt_change" => {
                self.announce(
                    ctx,
                    Announcement::PromptsChanged,
                    "Prompt list change announced",
                )
                .await
            }
            "test_input_required_result_elicitation" => self.irr_elicitation(round).await,
            "test_input_required_result_sampling" => self.irr_sampling(round).await,
            "test_input_required_result_list_roots" => self.irr_list_roots(round).await,
            "test_input_required_result_request_state" => {
                self.irr_confirm_with_state(name, round, "state-ok: requestState validated")
                    .await
            }
            "test_input_required_result_multiple_inputs" => self.irr_multiple_inputs(round).await,
            "test_input_required_result_multi_round" => self.irr_multi_round(round).await,
            "test_input_required_result_tampered_state" => {
                self.irr_confirm_with_state(name, round, "Confirmed: requestState intact")
                    .await
            }
            "test_input_required_result_capabilities" => self.irr_capabilities(ctx, round).await,
            "test_custom_header_tool" => done(ok_text(required_arg(args, "greeting")?)),
            "greet" => {
                let who = arg_str(args, "name").unwrap_or_else(|| "World".to_owned());
                done(ok_text(format!("Hello, {who}!")))
            }
            "slow_compute" => self.slow_compute(ctx, args).await,
            "failing_job" => self.failing_job(ctx).await,
            "protocol_error_job" => self.protocol_error_job(ctx).await,
            "confirm_delete" => self.confirm_delete(ctx, args, round).await,
            "multi_input" => self.multi_input(ctx, round).await,
            "test_tool_with_task" => self.tool_with_task(ctx, round).await,
            other => Err(haven_mcp::catalog::unknown_tool(other)),
        }
    }

    async fn resources(&self, _ctx: &Ctx) -> Result<Vec<Resource>, ErrorData> {
        Ok(resource_list())
    }

    async fn resource_templates(&self, _ctx: &Ctx) -> Result<Vec<ResourceTemplate>, ErrorData> {
        Ok(vec![
            ResourceTemplate::new("test://template/{id}/data", "template")
                .with_title("Resource Template")
                .with_description("A resource template with parameter substitution")
                .with_mime_type("application/json"),
        ])
    }

    async fn read_resource(
        &self,
        _ctx: &Ctx,
        uri: &str,
        _round: Round,
    ) -> Result<Step<ReadResourceResult>, ErrorData> {
        let contents = match uri {
            STATIC_TEXT_URI => text_resource(
                uri,
                "text/plain",
                "This is the content of the static text resource.",
            ),
            STATIC_BINARY_URI => blob_resource(uri, "image/png", PNG_BASE64),
            WATCHED_URI => text_resource(uri, "text/plain", "Watched resource content"),
            _ => match template_id(uri) {
                Some(id) => text_resource(uri, "application/json", &template_text(id)),
                None => return Err(haven_mcp::catalog::resource_not_found(uri)),
            },
        };
        let mut result = ReadResourceResult::new(vec![contents]);
        result.result_type = None;
        Ok(Step::Done(result))
    }

    async fn prompts(&self, _ctx: &Ctx) -> Result<Vec<Prompt>, ErrorData> {
        Ok(prompt_list())
    }

    async fn get_prompt(
        &self,
        _ctx: &Ctx,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<GetPromptResult>, ErrorData> {
        let user_text = |t: String| PromptMessage::new_text(Role::User, t);
        let messages = match name {
            "test_simple_prompt" => vec![user_text("This is a simple prompt for testing.".into())],
            "test_prompt_with_arguments" => {
                let arg1 = required_arg(&arguments, "arg1")?;
                let arg2 = required_arg(&arguments, "arg2")?;
                vec![user_text(format!(
                    "Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
                ))]
            }
            "test_prompt_with_embedded_resource" => {
                let uri = required_arg(&arguments, "resourceUri")?;
                vec![
                    PromptMessage::new(
                        Role::User,
                        ContentBlock::resource(text_resource(
                            &uri,
                            "text/plain",
                            "Embedded resource content for testing.",
                        )),
                    ),
                    user_text("Please process the embedded resource above.".into()),
                ]
            }
            "test_prompt_with_image" => vec![
                PromptMessage::new(Role::User, ContentBlock::image(PNG_BASE64, "image/png")),
                user_text("Please analyze the image above.".into()),
            ],
            "test_input_required_result_prompt" => {
                let Some(answer) = Elicited::from(&round, "user_context")? else {
                    let request =
                        elicit_one("What context should the prompt use?", "context", "string");
                    return Ok(Step::NeedInput {
                        requests: one("user_context", request),
                        state: None,
                    });
                };
                let context = answer.field("context").unwrap_or_else(|| "none".to_owned());
                vec![user_text(format!("Prompt with context: {context}"))]
            }
            other => return Err(invalid_params(format!("Unknown prompt: {other}"))),
        };
        Ok(Step::Done(prompt_result(messages)))
    }

    async fn complete(
        &self,
        _ctx: &Ctx,
        params: CompleteRequestParams,
    ) -> Result<CompleteResult, ErrorData> {
        let candidates = completion_candidates(&params.r#ref, &params.argument.name)?;
        let typed = params.argument.value.to_lowercase();
        let values: Vec<String> = candidates
            .iter()
            .filter(|c| c.to_lowercase().starts_with(&typed))
            .take(CompletionInfo::MAX_VALUES)
            .map(|c| (*c).to_owned())
            .collect();
        let info = CompletionInfo::with_all_values(values).map_err(internal)?;
        let mut result = CompleteResult::new(info);
        result.result_type = None;
        Ok(result)
    }
}
