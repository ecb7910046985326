//! Catalogs: the tools, resources and prompts a node serves. A catalog is written once, in the
//! multi-round-trip style of the 2026-07-28 protocol (a handler may answer "I need input" and is
//! called again with the client's answers); the engine drives those rounds with real
//! server-to-client requests for legacy sessions and with input-required results for stateless
//! clients.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use haven_state::Store;
use rmcp::model::{
    CallToolResult, ClientCapabilities, CompleteRequestParams, CompleteResult, ErrorData,
    GetPromptResult, Implementation, JsonObject, LoggingLevel, Prompt, ReadResourceResult,
    Resource, ResourceTemplate, ServerCapabilities, Tool,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::context::RequestContext;

/// A server-to-client request a handler needs answered before it can finish: `sampling/createMessage`,
/// `elicitation/create` or `roots/list`. Kept as raw JSON so that schemas reach the client
/// exactly as the handler wrote them.
#[derive(Clone, Debug, PartialEq)]
pub struct InputRequest {
    /// Method of the request.
    pub method: String,
    /// Its parameters.
    pub params: Option<Value>,
}

impl InputRequest {
    /// A request for `method` with `params`.
    pub fn new(method: &str, params: Value) -> InputRequest {
        InputRequest {
            method: method.to_owned(),
            params: Some(params),
        }
    }

    /// The client capability the request needs.
    pub fn required_capability(&self) -> Option<&'static str> {
        match self.method.as_str() {
            "sampling/createMessage" => Some("sampling"),
            "elicitation/create" => Some("elicitation"),
            "roots/list" => Some("roots"),
            _ => None,
        }
    }

    /// The request as the `inputRequests` entry of an input-required result.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({ "method": self.method });
        if let Some(p) = &self.params {
            v["params"] = p.clone();
        }
        v
    }
}

/// What a handler knows from earlier rounds of the same request.
#[derive(Clone, Debug, Default)]
pub struct Round {
    /// Answers to the input requests of the previous round, by key.
    pub input_responses: BTreeMap<String, Value>,
    /// The state the handler returned with its previous input request (already verified).
    pub state: Option<Value>,
    /// Number of the round, starting at 0.
    pub number: u32,
}

/// A handler's answer: done, or waiting for client input.
#[derive(Clone, Debug)]
pub enum Step<T> {
    /// The final result.
    Done(T),
    /// Client input is needed; the handler is called again with the answers and `state`.
    NeedInput {
        /// Requests by key.
        requests: BTreeMap<String, InputRequest>,
        /// State to hand back on the next round.
        state: Option<Value>,
    },
}

/// What a catalog says about itself.
#[derive(Clone, Debug)]
pub struct CatalogInfo {
    /// Server name and version reported to clients.
    pub server_info: Implementation,
    /// Capabilities the catalog offers.
    pub capabilities: ServerCapabilities,
    /// Instructions for clients, if any.
    pub instructions: Option<String>,
}

/// Whether a tool runs as a task (the tasks extension, or the 2025-11-25 experimental tasks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TaskSupport {
    /// Always answered directly; a task request is ignored.
    #[default]
    Forbidden,
    /// Runs as a task when the client supports tasks, directly otherwise.
    Optional,
    /// Only runs as a task; clients without task support get -32021.
    Required,
}

impl TaskSupport {
    /// The value of `execution.taskSupport` in a 2025-11-25 tool listing.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskSupport::Forbidden => "forbidden",
            TaskSupport::Optional => "optional",
            TaskSupport::Required => "required",
        }
    }
}

/// The per-request facilities a handler may use.
pub type Ctx = RequestContext;

/// A set of tools, resources and prompts.
#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// Identity and capabilities.
    fn info(&self) -> CatalogInfo;

    /// Tools, in a stable order.
    async fn tools(&self, ctx: &Ctx) -> Result<Vec<Tool>, ErrorData>;

    /// Whether `tool` runs as a task.
    fn task_support(&self, _tool: &str) -> TaskSupport {
        TaskSupport::Forbidden
    }

    /// Whether every change `tool` makes goes through the request's store (so that Haven knows
    /// whether an interrupted call changed anything). False for tools with effects elsewhere,
    /// such as an upstream server's.
    fn tracks_effects(&self, _tool: &str) -> bool {
        false
    }

    /// Calls a tool.
    async fn call_tool(
        &self,
        ctx: &Ctx,
        name: &str,
        arguments: JsonObject,
        round: Round,
    ) -> Result<Step<CallToolResult>, ErrorData>;

    /// Direct resources, in a stable order.
    async fn resources(&self, _ctx: &Ctx) -> Result<Vec<Resource>, ErrorData> {
        Ok(Vec::new())
    }

    /// Resource templates, in a stable order.
    async fn resource_templates(&self, _ctx: &Ctx) -> Result<Vec<ResourceTemplate>, ErrorData> {
        Ok(Vec::new())
    }

    /// Reads a resource; an unknown URI is a resource-not-found error.
    async fn read_resource(
        &self,
        _ctx: &Ctx,
        uri: &str,
        _round: Round,
    ) -> Result<Step<ReadResourceResult>, ErrorData> {
        Err(resource_not_found(uri))
    }

    /// Prompts, in a stable order.
    async fn prompts(&self, _ctx: &Ctx) -> Result<Vec<Prompt>, ErrorData> {
        Ok(Vec::new())
    }

    /// Renders a prompt.
    async fn get_prompt(
        &self,
        _ctx: &Ctx,
        name: &str,
        _arguments: JsonObject,
        _round: Round,
    ) -> Result<Step<GetPromptResult>, ErrorData> {
        Err(crate::jsonrpc::invalid_params(format!(
            "Unknown prompt: {name}"
        )))
    }

    /// Completes an argument value.
    async fn complete(
        &self,
        _ctx: &Ctx,
        _params: CompleteRequestParams,
    ) -> Result<CompleteResult, ErrorData> {
        Ok(CompleteResult::default())
    }
}

/// The resource-not-found error (the engine maps its code to the protocol era's).
pub fn resource_not_found(uri: &str) -> ErrorData {
    ErrorData::resource_not_found(
        format!("Resource not found: {uri}"),
        Some(serde_json::json!({ "uri": uri })),
    )
}

/// The unknown-tool error.
pub fn unknown_tool(name: &str) -> ErrorData {
    crate::jsonrpc::invalid_params(format!("Unknown tool: {name}"))
}

/// Arguments of a tool, checked against the parts of its input schema every caller relies on:
/// required properties and primitive types. Deeper JSON Schema validation is the tool's job.
pub fn check_arguments(tool: &Tool, args: &JsonObject) -> Result<(), ErrorData> {
    let schema = &tool.input_schema;
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !args.contains_key(r) {
                return Err(crate::jsonrpc::invalid_params(format!(
                    "Invalid arguments for tool {}: missing required argument '{r}'",
                    tool.name
                )));
            }
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in args {
            let Some(ty) = props
                .get(k)
                .and_then(|p| p.get("type"))
                .and_then(Value::as_str)
            else {
                continue;
            };
            let ok = match ty {
                "string" => v.is_string(),
                "number" => v.is_number(),
                "integer" => v.is_i64() || v.is_u64(),
                "boolean" => v.is_boolean(),
                "object" => v.is_object(),
                "array" => v.is_array(),
                "null" => v.is_null(),
                _ => true,
            };
            if !ok {
                return Err(crate::jsonrpc::invalid_params(format!(
                    "Invalid arguments for tool {}: '{k}' must be of type {ty}",
                    tool.name
                )));
            }
        }
    }
    Ok(())
}

/// A tool with a JSON input schema, a description and optional annotations.
pub fn tool(name: &'static str, description: &'static str, input_schema: Value) -> Tool {
    let schema = match input_schema {
        Value::Object(o) => o,
        _ => JsonObject::new(),
    };
    Tool::new(name, description, Arc::new(schema))
}

/// Facts the engine tells a handler about who is calling.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Caller {
    /// Client identity, if sent.
    pub client_info: Option<Implementation>,
    /// Declared client capabilities.
    pub capabilities: ClientCapabilities,
    /// Minimum log level the client wants.
    pub log_level: Option<LoggingLevel>,
    /// The authenticated principal ([`haven_auth::Principal::id`]); `None` when
    /// authentication is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
}

/// Shared handle every handler gets to the node's store.
pub fn store_of(ctx: &Ctx) -> &Arc<dyn Store> {
    ctx.store()
}

/// Resolves when the request is cancelled.
pub async fn cancelled(token: &CancellationToken) {
    token.cancelled().await
}
