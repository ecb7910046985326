//! Method handlers shared by both eras: one request in, items and exactly one final response
//! out.

use std::sync::Arc;

use base64::Engine as _;
use rmcp::model::{
    CacheScope, CompleteRequestParams, ErrorCode, ErrorData, GetPromptRequestParams,
    InputResponses, JsonObject, ListPromptsResult, ListResourceTemplatesResult,
    ListResourcesResult, ListToolsResult, ProgressToken, ReadResourceRequestParams, RequestId,
    ResultType, ServerResult,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::mrtr::{self, Driven};
use super::tasks;
use super::{Inner, store_error};
use crate::catalog::{Caller, Round, Step, TaskSupport, check_arguments};
use crate::context::{Era, Final, Item, Outbox, RequestContext};
use crate::jsonrpc::{self, invalid_params, method_not_found};
use crate::session;
use haven_auth::Kind;

/// One request, ready to run.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    /// JSON-RPC id.
    pub id: RequestId,
    /// Method.
    pub method: String,
    /// Parameters (empty object when absent).
    pub params: JsonObject,
    /// Era and session.
    pub era: Era,
    /// Who calls (shared with the request's context, not copied into it).
    pub caller: Arc<Caller>,
    /// `_meta.progressToken`, if the client wants progress notifications.
    pub progress_token: Option<ProgressToken>,
    /// The principal the request came from, as authentication established it (groups,
    /// client, scopes: what authorization rules select by). `None` only for a call this node
    /// runs again after a takeover: the rules admitted it when it first arrived.
    pub principal: Option<Arc<haven_auth::Principal>>,
    /// `_meta.traceparent` (W3C trace context, SEP-414), when the client sent a valid one:
    /// the parent of the request's span, and the exemplar of its duration.
    pub traceparent: Option<String>,
    /// The `tracestate` that goes with `traceparent` (from the HTTP header only).
    pub tracestate: Option<String>,
    /// The `traceparent` of the request's own server span, when sampled: stored with the
    /// work (in-flight record, task) so that a node or region that continues it links back.
    pub trace: Option<String>,
}

impl Call {
    /// The request's progress token, if any.
    pub fn progress_token(&self) -> Option<ProgressToken> {
        self.progress_token.clone()
    }

    /// Whether the client asked for the 2025-11-25 experimental task form.
    pub fn task_param(&self) -> Option<&Value> {
        self.params.get("task")
    }
}

/// The rules that apply to `call`'s principal now; `None` when everything is allowed (no
/// policy, no rules, or a call re-run after a takeover).
fn rules_for(
    inner: &Inner,
    call: &Call,
) -> Option<(Arc<haven_auth::RuleSet>, Arc<haven_auth::Principal>)> {
    let policy = inner.config.policy.as_ref()?;
    let principal = call.principal.clone()?;
    let set = policy.current();
    (!set.is_open()).then_some((set, principal))
}

/// Whether `call`'s principal may use the item `name` of `kind`. A refusal is recorded in the
/// audit log (`call.denied`); the caller answers as if the item did not exist.
pub(crate) fn allowed(inner: &Inner, call: &Call, kind: haven_auth::Kind, name: &str) -> bool {
    let Some((set, principal)) = rules_for(inner, call) else {
        return true;
    };
    if set.allows(&principal, kind, name) {
        return true;
    }
    tracing::debug!(principal = %principal.id(), kind = kind.as_str(), name, method = %call.method, "refused by the authorization rules");
    if let Some(m) = haven_telemetry::get() {
        m.calls_denied.inc();
    }
    if let Some(audit) = inner.config.audit.as_ref() {
        use haven_audit::{Actor, Event, Outcome as Audited, Target, actions};
        audit.record(Event::new(
            Actor::Principal(principal.id()),
            actions::CALL_DENIED,
            Target::named(kind.as_str(), name),
            Audited::Denied,
        ));
    }
    false
}

/// `items` without those `call`'s principal may not use (`name` gives an item's name).
pub(crate) fn visible<T>(
    inner: &Inner,
    call: &Call,
    kind: haven_auth::Kind,
    items: Vec<T>,
    name: impl Fn(&T) -> &str,
) -> Vec<T> {
    let Some((set, principal)) = rules_for(inner, call) else {
        return items;
    };
    let grant = set.grant(&principal);
    items
        .into_iter()
        .filter(|t| grant.allows(kind, name(t)))
        .collect()
}

/// Whether the prompt or resource a completion is for may be used by `call`'s principal.
fn completion_allowed(inner: &Inner, call: &Call, params: &CompleteRequestParams) -> bool {
    use rmcp::model::Reference;
    match &params.r#ref {
        Reference::Prompt(p) => allowed(inner, call, Kind::Prompt, &p.name),
        Reference::Resource(r) => allowed(inner, call, Kind::Resource, &r.uri),
        // A kind of reference no rule can name: only when nothing is restricted.
        _ => rules_for(inner, call).is_none(),
    }
}

/// Methods whose handler may send items before the final response (and so may need a stream).
pub(crate) fn may_stream(method: &str) -> bool {
    matches!(
        method,
        "tools/call" | "prompts/get" | "resources/read" | "tasks/result"
    )
}

/// Runs `call` to completion, sending its items and then its final response to `out`. With a
/// `fence`, the handler writes through it (a request that another node may take over).
pub(crate) async fn run(
    inner: Arc<Inner>,
    call: Call,
    out: Outbox,
    cancel: CancellationToken,
    fence: Option<Arc<haven_cluster::FencedStore>>,
    span: Option<tracing::Span>,
) {
    let mut ctx = RequestContext::new(
        inner.store.clone(),
        call.era.clone(),
        call.caller.clone(),
        call.progress_token(),
        Some(out.clone()),
        cancel.clone(),
    );
    if let Some(f) = fence {
        ctx = ctx.with_fence(f);
    }
    let started = std::time::Instant::now();
    let span = span.unwrap_or_else(|| request_span(&inner, &call));
    // The first call after a start may run before the tool index is built: its span is named
    // after the method alone, and gets the tool's name once the call has built the index.
    let unnamed_tool = (!span.is_none() && call.method == "tools/call")
        .then(|| call.params.get("name").and_then(Value::as_str))
        .flatten()
        .filter(|t| !inner.knows_tool(t));
    let outcome = {
        use tracing::Instrument as _;
        async {
            tracing::debug!(method = %call.method, id = %call.id, "request");
            dispatch(&inner, &call, ctx, &out, &cancel).await
        }
        .instrument(span.clone())
        .await
    };
    if let Some(t) = unnamed_tool.filter(|t| inner.knows_tool(t)) {
        haven_telemetry::trace::rename(&span, format!("tools/call {t}"), "gen_ai.tool.name", t);
    }
    if let Outcome::Error(e) = &outcome {
        span.record("rpc.response.status_code", e.code.0.to_string());
        span.record("error.type", e.code.0.to_string());
    }
    record_operation(&inner, &call, &outcome, started.elapsed());
    // The answer is classified here, where it is known, so that no transport parses it.
    let final_response = match outcome {
        Outcome::Sent => return,
        Outcome::Result(v) => Final::result(jsonrpc::response(&call.id, &v)),
        Outcome::Raw(json) => Final::result(jsonrpc::response_raw(&call.id, &json)),
        Outcome::Error(e) => Final::error(&call.id, &e),
    };
    let _ = out.send(Item::Final(final_response));
}

/// The methods a request's duration is recorded under by name; any other is `_other` (so that
/// made-up method names cannot grow the label set).
const KNOWN_METHODS: &[&str] = &[
    "ping",
    "logging/setLevel",
    "resources/subscribe",
    "resources/unsubscribe",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "tasks/get",
    "tasks/cancel",
    "tasks/update",
    "tasks/list",
    "tasks/result",
];

/// The server span of a request, named as the OpenTelemetry MCP conventions say (`{method}
/// {target}`), its parent the client's `_meta.traceparent` (or the HTTP `traceparent`); none
/// when neither the log nor a trace exporter takes it.
pub(crate) fn request_span(inner: &Inner, call: &Call) -> tracing::Span {
    use haven_telemetry::trace::REQUEST_SPAN_TARGET;
    if !tracing::span_enabled!(target: REQUEST_SPAN_TARGET, tracing::Level::DEBUG) {
        return tracing::Span::none();
    }
    let target = call
        .params
        .get("name")
        .or_else(|| call.params.get("uri"))
        .and_then(Value::as_str)
        .filter(|n| inner.knows_tool(n) || call.method != "tools/call");
    let name = match target {
        Some(t) if call.method != "resources/read" => format!("{} {t}", call.method),
        _ => call.method.clone(),
    };
    let (session, version) = match &call.era {
        crate::context::Era::Legacy {
            session,
            protocol_version,
        } => (session.as_str(), protocol_version.as_str()),
        crate::context::Era::Stateless { protocol_version } => ("", protocol_version.as_str()),
    };
    let tool = target.filter(|_| call.method == "tools/call");
    let session = (!session.is_empty()).then_some(session);
    // Every value is known here: recording one later costs a visit of every layer.
    let span = tracing::debug_span!(
        target: REQUEST_SPAN_TARGET,
        "mcp.server",
        otel.name = name.as_str(),
        otel.kind = "server",
        mcp.method.name = call.method.as_str(),
        gen_ai.tool.name = tool,
        mcp.protocol.version = version,
        mcp.session.id = session,
        jsonrpc.request.id = %call.id,
        rpc.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    haven_telemetry::trace::set_parent(
        &span,
        call.traceparent.as_deref(),
        call.tracestate.as_deref(),
    );
    span
}

/// Records a request's duration (`mcp_server_operation_duration_seconds`), with the trace
/// named by `params._meta.traceparent` as exemplar.
fn record_operation(inner: &Inner, call: &Call, outcome: &Outcome, took: std::time::Duration) {
    use haven_telemetry::{Era as E, OperationLabels, Outcome as O};
    use std::borrow::Cow;
    let Some(m) = haven_telemetry::get() else {
        return;
    };
    let method = KNOWN_METHODS
        .iter()
        .find(|k| **k == call.method)
        .copied()
        .unwrap_or("_other");
    let tool = if method == "tools/call" {
        call.params
            .get("name")
            .and_then(Value::as_str)
            .and_then(|n| inner.tool_label(n))
            .unwrap_or(Cow::Borrowed("_other"))
    } else {
        Cow::Borrowed("")
    };
    let (era, version) = match &call.era {
        crate::context::Era::Legacy {
            protocol_version, ..
        } => (E::legacy, protocol_version.as_str()),
        crate::context::Era::Stateless { protocol_version } => {
            (E::stateless, protocol_version.as_str())
        }
    };
    let version = super::LEGACY_VERSIONS
        .iter()
        .chain(super::STATELESS_VERSIONS)
        .find(|v| **v == version)
        .map_or_else(|| Cow::Owned(version.to_owned()), |v| Cow::Borrowed(*v));
    let (outcome, code) = match outcome {
        Outcome::Error(e) => (O::error, Cow::Owned(e.code.0.to_string())),
        _ => (O::ok, Cow::Borrowed("")),
    };
    m.operation(
        &OperationLabels {
            mcp_method_name: Cow::Borrowed(method),
            gen_ai_tool_name: tool,
            mcp_protocol_version: version,
            era,
            outcome,
            rpc_response_status_code: code,
        },
        took,
        call.traceparent
            .as_deref()
            .and_then(haven_telemetry::trace_id_of),
    );
}

/// The principal a request is recorded under in the audit log: the authenticated principal,
/// or `anonymous` when authentication is off.
fn caller_principal(call: &Call) -> String {
    call.caller
        .principal
        .clone()
        .unwrap_or_else(|| "anonymous".to_owned())
}

/// Records a `tools/call` in the audit log when `audit.tool_calls` is on: who, which tool,
/// how it ended (never its arguments or result). Does not wait: the audit writer commits it.
fn audit_tool_call(inner: &Inner, call: &Call, outcome: &Outcome, principal: &str) {
    use haven_audit::{Actor, Event, Outcome as Audited, Target, actions};
    let Some(audit) = inner.config.audit.as_ref().filter(|a| a.tool_calls()) else {
        return;
    };
    let name = call
        .params
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let result = match outcome {
        Outcome::Error(e) => Audited::Error(match e.code {
            ErrorCode::INVALID_PARAMS => "invalid params",
            ErrorCode::METHOD_NOT_FOUND => "method not found",
            ErrorCode::INVALID_REQUEST => "invalid request",
            ErrorCode::INTERNAL_ERROR => "internal error",
            _ => "the call failed",
        }),
        _ => Audited::Ok,
    };
    audit.record(Event::new(
        Actor::Principal(principal.to_owned()),
        actions::TOOLS_CALL,
        Target::named("tool", name),
        result,
    ));
}

/// What a dispatched request produced.
pub(crate) enum Outcome {
    /// A result to send.
    Result(Value),
    /// A result already serialized to JSON.
    Raw(String),
    /// An error to send.
    Error(ErrorData),
    /// The final response was already sent (the request became a task).
    Sent,
}

impl From<Result<Value, ErrorData>> for Outcome {
    fn from(r: Result<Value, ErrorData>) -> Outcome {
        match r {
            Ok(v) => Outcome::Result(v),
            Err(e) => Outcome::Error(e),
        }
    }
}

async fn dispatch(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: RequestContext,
    out: &Outbox,
    cancel: &CancellationToken,
) -> Outcome {
    let p = Some(&call.params);
    let stateless = call.era.is_stateless();
    let r: Result<Value, ErrorData> = match call.method.as_str() {
        "ping" if !stateless => Ok(serde_json::json!({})),
        "logging/setLevel" if !stateless => Box::pin(set_level(inner, call)).await,
        "resources/subscribe" if !stateless => Box::pin(subscribe(inner, call, true)).await,
        "resources/unsubscribe" if !stateless => Box::pin(subscribe(inner, call, false)).await,
        "tools/list" => Box::pin(list_tools(inner, call, &ctx)).await,
        "tools/call" => {
            let outcome = Box::pin(tools_call(inner, call, ctx, out, cancel)).await;
            audit_tool_call(inner, call, &outcome, &caller_principal(call));
            return outcome;
        }
        "resources/list" => list_page(
            inner,
            call,
            inner
                .catalog
                .resources(&ctx)
                .await
                .map(|l| visible(inner, call, Kind::Resource, l, |r| r.uri.as_str())),
            |page, next_cursor| {
                ServerResult::ListResourcesResult(ListResourcesResult {
                    next_cursor,
                    ..ListResourcesResult::with_all_items(page)
                })
            },
        ),
        "resources/templates/list" => list_page(
            inner,
            call,
            inner
                .catalog
                .resource_templates(&ctx)
                .await
                .map(|l| visible(inner, call, Kind::Resource, l, |t| t.uri_template.as_str())),
            |page, next_cursor| {
                ServerResult::ListResourceTemplatesResult(ListResourceTemplatesResult {
                    next_cursor,
                    ..ListResourceTemplatesResult::with_all_items(page)
                })
            },
        ),
        "resources/read" => Box::pin(resources_read(inner, call, ctx, out, cancel)).await,
        "prompts/list" => list_page(
            inner,
            call,
            inner
                .catalog
                .prompts(&ctx)
                .await
                .map(|l| visible(inner, call, Kind::Prompt, l, |p| p.name.as_str())),
            |page, next_cursor| {
                ServerResult::ListPromptsResult(ListPromptsResult {
                    next_cursor,
                    ..ListPromptsResult::with_all_items(page)
                })
            },
        ),
        "prompts/get" => Box::pin(prompts_get(inner, call, ctx, out, cancel)).await,
        "completion/complete" => {
            match jsonrpc::typed_params::<CompleteRequestParams>(&call.method, p) {
                // A completion for a prompt or resource the caller may not use completes
                // nothing, as for one that does not exist.
                Ok(params) if !completion_allowed(inner, call, &params) => Ok(finish(
                    inner,
                    &call.era,
                    ServerResult::CompleteResult(Default::default()),
                )),
                Ok(params) => inner
                    .catalog
                    .complete(&ctx, params)
                    .await
                    .map(|r| finish(inner, &call.era, ServerResult::CompleteResult(r))),
                Err(e) => Err(e),
            }
        }
        "tasks/get" => Box::pin(tasks::get(inner, call)).await,
        "tasks/cancel" => Box::pin(tasks::cancel(inner, call)).await,
        "tasks/update" if stateless => Box::pin(tasks::update_request(inner, call)).await,
        "tasks/list" if !stateless => Box::pin(tasks::list(inner, call)).await,
        "tasks/result" if !stateless => Box::pin(tasks::result(inner, call, out, cancel)).await,
        other => Err(method_not_found(other)),
    };
    r.into()
}

/// Like [`finish`], straight to JSON text.
pub(crate) fn finish_raw(inner: &Inner, era: &Era, mut result: ServerResult) -> String {
    shape(inner, era, &mut result);
    serde_json::to_string(&result).expect("results serialize")
}

/// Serializes a result in the shape the era expects: stateless results carry `resultType` and
/// cache hints; legacy results carry neither.
pub(crate) fn finish(inner: &Inner, era: &Era, mut result: ServerResult) -> Value {
    shape(inner, era, &mut result);
    serde_json::to_value(&result).expect("results serialize")
}

/// Adds or strips the era-specific fields of a result.
fn shape(inner: &Inner, era: &Era, result: &mut ServerResult) {
    if era.is_stateless() {
        let ttl = inner.config.list_ttl_millis;
        match result {
            ServerResult::ListToolsResult(r) => hint(&mut r.ttl_ms, &mut r.cache_scope, ttl),
            ServerResult::ListPromptsResult(r) => hint(&mut r.ttl_ms, &mut r.cache_scope, ttl),
            ServerResult::ListResourcesResult(r) => hint(&mut r.ttl_ms, &mut r.cache_scope, ttl),
            ServerResult::ListResourceTemplatesResult(r) => {
                hint(&mut r.ttl_ms, &mut r.cache_scope, ttl)
            }
            // Resource contents may change at any time: not cacheable by default.
            ServerResult::ReadResourceResult(r) => {
                r.result_type.get_or_insert(ResultType::COMPLETE);
                hint(&mut r.ttl_ms, &mut r.cache_scope, 0)
            }
            ServerResult::CallToolResult(r) => {
                r.result_type.get_or_insert(ResultType::COMPLETE);
            }
            ServerResult::GetPromptResult(r) => {
                r.result_type.get_or_insert(ResultType::COMPLETE);
            }
            ServerResult::CompleteResult(r) => {
                r.result_type.get_or_insert(ResultType::COMPLETE);
            }
            _ => {}
        }
    } else {
        result.strip_result_type_for_legacy_peer();
        result.strip_non_object_output_for_legacy_peer();
    }
}

fn hint(ttl: &mut Option<u64>, scope: &mut Option<CacheScope>, default_ttl: u64) {
    ttl.get_or_insert(default_ttl);
    scope.get_or_insert(CacheScope::Public);
}

const CURSOR_PREFIX: &str = "haven-offset:";

/// The page of a list that the request's cursor asks for, as the era's result: `all` is the
/// whole list (or the error that came instead), `result` wraps a page and the next cursor in
/// the list's result type.
fn list_page<T>(
    inner: &Inner,
    call: &Call,
    all: Result<Vec<T>, ErrorData>,
    result: impl FnOnce(Vec<T>, Option<String>) -> ServerResult,
) -> Result<Value, ErrorData> {
    let (page, next) = paginate(inner, Some(&call.params), all?)?;
    Ok(finish(inner, &call.era, result(page, next)))
}

/// One page of `all` per the request's `cursor`, and the cursor of the next page.
pub(crate) fn paginate<T>(
    inner: &Inner,
    params: Option<&JsonObject>,
    all: Vec<T>,
) -> Result<(Vec<T>, Option<String>), ErrorData> {
    let offset = match params.and_then(|p| p.get("cursor")) {
        None | Some(Value::Null) => 0,
        Some(Value::String(c)) => {
            decode_cursor(c).ok_or_else(|| invalid_params(format!("Invalid cursor: {c}")))?
        }
        Some(_) => return Err(invalid_params("Invalid cursor: must be a string")),
    };
    if offset > all.len() {
        return Err(invalid_params("Invalid cursor: past the end of the list"));
    }
    let end = (offset + inner.config.page_size).min(all.len());
    let next = (end < all.len()).then(|| encode_cursor(end));
    let page = all.into_iter().skip(offset).take(end - offset).collect();
    Ok((page, next))
}

fn encode_cursor(offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{offset}"))
}

fn decode_cursor(c: &str) -> Option<usize> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    String::from_utf8(raw)
        .ok()?
        .strip_prefix(CURSOR_PREFIX)?
        .parse()
        .ok()
}

async fn list_tools(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: &RequestContext,
) -> Result<Value, ErrorData> {
    let (tools, _) = inner.tool_index(ctx).await?;
    let tools = visible(inner, call, Kind::Tool, tools.as_ref().clone(), |t| &t.name);
    let (page, next) = paginate(inner, Some(&call.params), tools)?;
    let names: Vec<String> = page.iter().map(|t| t.name.to_string()).collect();
    let mut v = finish(
        inner,
        &call.era,
        ServerResult::ListToolsResult(ListToolsResult {
            next_cursor: next,
            ..ListToolsResult::with_all_items(page)
        }),
    );
    // The 2025-11-25 experimental tasks declare task support per tool (`execution`), a field
    // rmcp's Tool does not model.
    if legacy_tasks(&call.era)
        && let Some(list) = v.get_mut("tools").and_then(Value::as_array_mut)
    {
        for (tool, name) in list.iter_mut().zip(names) {
            let support = inner.catalog.task_support(&name);
            if support != TaskSupport::Forbidden {
                tool["execution"] = serde_json::json!({ "taskSupport": support.as_str() });
            }
        }
    }
    Ok(v)
}

/// Whether the era uses the 2025-11-25 experimental task form.
pub(crate) fn legacy_tasks(era: &Era) -> bool {
    matches!(era, Era::Legacy { protocol_version, .. } if protocol_version.as_str() >= "2025-11-25")
}

async fn set_level(inner: &Arc<Inner>, call: &Call) -> Result<Value, ErrorData> {
    let params: rmcp::model::SetLevelRequestParams =
        jsonrpc::typed_params(&call.method, Some(&call.params))?;
    let session = call.era.session().unwrap_or_default();
    session::update(
        &*inner.store,
        session,
        inner.config.session_ttl.as_millis() as u64,
        inner.config.limits.max_session_bytes(),
        |s| s.log_level = Some(params.level),
    )
    .await
    .map_err(session_update_error)?;
    inner.sessions.invalidate(session);
    Ok(serde_json::json!({}))
}

/// A failed session update: over the session size limit (invalid params, nothing changed)
/// or a storage failure.
fn session_update_error(e: haven_state::StoreError) -> ErrorData {
    match e {
        haven_state::StoreError::Invalid(why) => invalid_params(format!("Invalid params: {why}")),
        e => store_error(e),
    }
}

async fn subscribe(inner: &Arc<Inner>, call: &Call, on: bool) -> Result<Value, ErrorData> {
    let uri = call
        .params
        .get("uri")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_params("Invalid params: uri (string) is required"))?
        .to_owned();
    let session = call.era.session().unwrap_or_default();
    let limits = &inner.config.limits;
    let ttl = inner.config.session_ttl.as_millis() as u64;
    let Some(loaded) = session::load(&*inner.store, session)
        .await
        .map_err(store_error)?
    else {
        return Err(invalid_params("Invalid params: the session has ended"));
    };
    if on && !allowed(inner, call, Kind::Resource, &uri) {
        return Err(crate::catalog::resource_not_found(&uri));
    }
    if on {
        limits
            .check_uri(&uri)
            .map_err(|e| invalid_params(format!("Invalid params: {e}")))?;
        let max = limits.max_subscriptions();
        session::subscribe(&*inner.store, &loaded.record, &uri, ttl, max, || {
            limits.check_count(max + 1).unwrap_err()
        })
        .await
        .map_err(session_update_error)?;
    } else {
        session::unsubscribe(
            &*inner.store,
            &loaded.record,
            &uri,
            ttl,
            limits.max_session_bytes(),
        )
        .await
        .map_err(session_update_error)?;
    }
    inner.sessions.invalidate(session);
    Ok(serde_json::json!({}))
}

/// The parameters of `tools/call`. They are read in place rather than through rmcp's
/// `CallToolRequestParams`: this is the hot path, and the typed form would copy the whole
/// request (and parse `_meta`).
struct ToolCallParams<'a> {
    name: &'a str,
    arguments: &'a JsonObject,
    input_responses: Option<InputResponses>,
    request_state: Option<&'a str>,
}

impl<'a> ToolCallParams<'a> {
    fn read(params: &'a JsonObject) -> Result<ToolCallParams<'a>, ErrorData> {
        let name = match params.get("name") {
            Some(Value::String(n)) => n.as_str(),
            _ => {
                return Err(invalid_params(
                    "Invalid params for tools/call: name (string) is required",
                ));
            }
        };
        static NONE: std::sync::LazyLock<JsonObject> = std::sync::LazyLock::new(JsonObject::new);
        let arguments = match params.get("arguments") {
            None | Some(Value::Null) => &*NONE,
            Some(Value::Object(a)) => a,
            Some(_) => {
                return Err(invalid_params(
                    "Invalid params for tools/call: arguments must be an object",
                ));
            }
        };
        let input_responses = match params.get("inputResponses") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            Some(_) => {
                return Err(invalid_params(
                    "Invalid params for tools/call: inputResponses must be an object",
                ));
            }
        };
        let request_state = match params.get("requestState") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => {
                return Err(invalid_params(
                    "Invalid params for tools/call: requestState must be a string",
                ));
            }
        };
        Ok(ToolCallParams {
            name,
            arguments,
            input_responses,
            request_state,
        })
    }
}

/// Whether a legacy `tools/call` asks to run as a (2025-11-25 experimental) task: with the
/// requested time-to-live if so; an error when the tool cannot run the way it was asked.
fn client_task(
    call: &Call,
    support: TaskSupport,
    name: &str,
) -> Result<Option<Option<u64>>, ErrorData> {
    match (call.task_param(), support) {
        (Some(_), TaskSupport::Forbidden) => Err(ErrorData::new(
            ErrorCode::METHOD_NOT_FOUND,
            format!("Tool {name} does not support task-augmented calls"),
            None,
        )),
        (None, TaskSupport::Required) => Err(ErrorData::new(
            ErrorCode::METHOD_NOT_FOUND,
            format!("Tool {name} must be called as a task (add params.task)"),
            None,
        )),
        (Some(task), _) => Ok(Some(task.get("ttl").and_then(Value::as_u64))),
        (None, _) => Ok(None),
    }
}

async fn tools_call(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: RequestContext,
    out: &Outbox,
    cancel: &CancellationToken,
) -> Outcome {
    let ToolCallParams {
        name,
        arguments,
        input_responses,
        request_state,
    } = match ToolCallParams::read(&call.params) {
        Ok(p) => p,
        Err(e) => return Outcome::Error(e),
    };
    let (tools, index) = match inner.tool_index(&ctx).await {
        Ok(t) => t,
        Err(e) => return Outcome::Error(e),
    };
    let Some(tool) = index
        .get(name)
        .map(|i| &tools[*i])
        .filter(|_| allowed(inner, call, Kind::Tool, name))
    else {
        return Outcome::Error(crate::catalog::unknown_tool(name));
    };
    if let Err(e) = check_arguments(tool, arguments) {
        return Outcome::Error(e);
    }
    let support = inner.catalog.task_support(name);
    let idempotent = tool
        .annotations
        .as_ref()
        .and_then(|a| a.idempotent_hint)
        .unwrap_or(false);

    // The 2025-11-25 experimental form: the client asks for a task.
    if legacy_tasks(&call.era) {
        match client_task(call, support, name) {
            Err(e) => return Outcome::Error(e),
            Ok(Some(requested_ttl)) => {
                return Box::pin(tasks::start_client_task(
                    inner,
                    call,
                    ctx,
                    out,
                    name.to_owned(),
                    arguments.clone(),
                    requested_ttl,
                    idempotent,
                ))
                .await;
            }
            Ok(None) => {}
        }
    }
    let client_tasks = call.era.is_stateless() && ctx.client_supports("tasks");
    if call.era.is_stateless() && support == TaskSupport::Required && !client_tasks {
        return Outcome::Error(tasks::tasks_capability_required());
    }

    let round = match mrtr::first_round(inner, call, name, input_responses, request_state) {
        Ok(r) => r,
        Err(e) => return Outcome::Error(e),
    };
    let hook = if client_tasks && support != TaskSupport::Forbidden {
        tasks::Promoter::new(tasks::PromoteTarget {
            inner: inner.clone(),
            call: call.clone(),
            out: out.clone(),
            tool: name.to_owned(),
            arguments: arguments.clone(),
            idempotent,
            fence: ctx.fence().cloned(),
        })
    } else {
        tasks::Promoter::disabled()
    };
    let ctx = ctx.with_task_hook(hook.clone());
    let catalog = inner.catalog.clone();
    let step_fn = |ctx: RequestContext, round: Round| {
        let catalog = catalog.clone();
        let arguments = arguments.clone();
        async move { catalog.call_tool(&ctx, name, arguments, round).await }
    };
    let driven = Box::pin(mrtr::drive(
        inner, call, &ctx, out, cancel, name, round, &hook, step_fn,
    ))
    .await;
    match driven {
        Driven::Done(result) => Outcome::Raw(finish_raw(
            inner,
            &call.era,
            ServerResult::CallToolResult(result),
        )),
        Driven::InputRequired(v) => Outcome::Result(v),
        Driven::Error(e) => Outcome::Error(e),
        Driven::Promoted(step) => {
            Box::pin(tasks::run_task(inner, &hook, ctx, step)).await;
            Outcome::Sent
        }
    }
}

async fn resources_read(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: RequestContext,
    out: &Outbox,
    cancel: &CancellationToken,
) -> Result<Value, ErrorData> {
    let params: ReadResourceRequestParams =
        jsonrpc::typed_params(&call.method, Some(&call.params))?;
    let uri = params.uri.clone();
    if !allowed(inner, call, Kind::Resource, &uri) {
        let mut e = crate::catalog::resource_not_found(&uri);
        if call.era.is_stateless() {
            e.code = ErrorCode::INVALID_PARAMS;
        }
        return Err(e);
    }
    let catalog = inner.catalog.clone();
    let step_fn = |ctx: RequestContext, round: Round| {
        let catalog = catalog.clone();
        let uri = uri.clone();
        async move { catalog.read_resource(&ctx, &uri, round).await }
    };
    let first = (params.input_responses, params.request_state.as_deref());
    let to_result = ServerResult::ReadResourceResult;
    let read = drive_untasked(
        inner, call, &ctx, out, cancel, &uri, first, step_fn, to_result,
    );
    read.await.map_err(|mut e| {
        // SEP-2164: the stateless era reports a missing resource as invalid params.
        if call.era.is_stateless() && e.code == ErrorCode::RESOURCE_NOT_FOUND {
            e.code = ErrorCode::INVALID_PARAMS;
        }
        e
    })
}

async fn prompts_get(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: RequestContext,
    out: &Outbox,
    cancel: &CancellationToken,
) -> Result<Value, ErrorData> {
    let params: GetPromptRequestParams = jsonrpc::typed_params(&call.method, Some(&call.params))?;
    let name = params.name.clone();
    if !allowed(inner, call, Kind::Prompt, &name) {
        return Err(invalid_params(format!("Unknown prompt: {name}")));
    }
    let arguments = params.arguments.clone().unwrap_or_default();
    let catalog = inner.catalog.clone();
    let step_fn = |ctx: RequestContext, round: Round| {
        let catalog = catalog.clone();
        let name = name.clone();
        let arguments = arguments.clone();
        async move { catalog.get_prompt(&ctx, &name, arguments, round).await }
    };
    let first = (params.input_responses, params.request_state.as_deref());
    let to_result = ServerResult::GetPromptResult;
    drive_untasked(
        inner, call, &ctx, out, cancel, &name, first, step_fn, to_result,
    )
    .await
}

/// Runs a handler that cannot become a task (a resource read, a prompt) round after round from
/// the request's first round (`first`: its input responses and request state), and shapes
/// its result for the era.
#[allow(clippy::too_many_arguments)]
async fn drive_untasked<T, F, Fut>(
    inner: &Arc<Inner>,
    call: &Call,
    ctx: &RequestContext,
    out: &Outbox,
    cancel: &CancellationToken,
    target: &str,
    first: (Option<InputResponses>, Option<&str>),
    step_fn: F,
    to_result: fn(T) -> ServerResult,
) -> Result<Value, ErrorData>
where
    F: Fn(RequestContext, Round) -> Fut,
    Fut: std::future::Future<Output = Result<Step<T>, ErrorData>>,
{
    let round = mrtr::first_round(inner, call, target, first.0, first.1)?;
    let hook = tasks::Promoter::disabled();
    match Box::pin(mrtr::drive(
        inner, call, ctx, out, cancel, target, round, &hook, step_fn,
    ))
    .await
    {
        Driven::Done(r) => Ok(finish(inner, &call.era, to_result(r))),
        Driven::InputRequired(v) => Ok(v),
        Driven::Error(e) => Err(e),
        Driven::Promoted(_) => Err(jsonrpc::internal(format!(
            "{} cannot become a task",
            call.method
        ))),
    }
}
