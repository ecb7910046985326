//! The stateless 2026-07-28 era: per-request `_meta`, header validation (`MCP-Protocol-Version`,
//! `Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`), `server/discover`, `subscriptions/listen`, and
//! answers as one JSON body or an SSE stream whose closing cancels the request.

use std::sync::Arc;

use base64::Engine as _;
use rmcp::model::{
    CacheScope, ClientCapabilities, DiscoverResult, ErrorCode, ErrorData, RequestId,
    SubscriptionFilter,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::dispatch::{self, Call};
use super::legacy::keep_alive;
use super::tasks::TASKS_EXTENSION;
use super::{
    Answer, Inner, LEGACY_VERSIONS, Reason, Rejection, Reply, STATELESS_VERSIONS, SseFrame,
    is_legacy_version,
};
use crate::catalog::Caller;
use crate::context::{ANNOUNCE_NS, Announcement, Era, Item};
use crate::hub::Topic;
use crate::jsonrpc::{self, Incoming, IncomingRequest, RequestMeta};

const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
const META_SUBSCRIPTION: &str = "io.modelcontextprotocol/subscriptionId";

/// Methods of the stateless era.
const METHODS: &[&str] = &[
    "server/discover",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "subscriptions/listen",
    "tasks/get",
    "tasks/update",
    "tasks/cancel",
];

/// The routing headers of a stateless request.
#[derive(Clone, Debug, Default)]
pub struct StatelessHeaders {
    /// `MCP-Protocol-Version`.
    pub protocol_version: Option<String>,
    /// `Mcp-Method`.
    pub method: Option<String>,
    /// `Mcp-Name`.
    pub name: Option<String>,
    /// `Mcp-Param-*` headers: lowercase suffix after `mcp-param-`, and value.
    pub params: Vec<(String, String)>,
}

/// A stateless-era POST, as the transport read it.
#[derive(Debug)]
pub struct StatelessPost {
    /// Routing headers.
    pub headers: StatelessHeaders,
    /// The message.
    pub message: Incoming,
    /// Whether the request came over HTTP, whose routing headers must then match the body.
    /// Over stdio there are no headers to check.
    pub from_http: bool,
    /// Who sent it.
    pub principal: haven_auth::Principal,
    /// Its W3C trace context headers.
    pub trace: super::TraceHeaders,
}

/// Whether a request belongs to the stateless era: its `MCP-Protocol-Version` names a
/// non-legacy version, or (without the header) it is `server/discover` or carries a
/// protocol version in `_meta`.
pub fn is_stateless(protocol_version: Option<&str>, message: &Incoming) -> bool {
    match protocol_version {
        Some(v) => !is_legacy_version(v),
        None => match message {
            Incoming::Request(r) => {
                r.method == "server/discover"
                    || r.meta()
                        .ok()
                        .flatten()
                        .is_some_and(|m| m.protocol_version.is_some())
            }
            _ => false,
        },
    }
}

/// Every protocol version this server speaks, newest first.
pub fn supported_versions() -> Vec<String> {
    STATELESS_VERSIONS
        .iter()
        .chain(LEGACY_VERSIONS.iter().rev())
        .map(|s| (*s).to_owned())
        .collect()
}

fn reject(
    reason: Reason,
    id: &RequestId,
    code: ErrorCode,
    message: String,
    data: Option<Value>,
) -> Reply {
    Rejection::new(reason, Some(id), ErrorData::new(code, message, data)).into()
}

/// Decodes a header value: trims optional whitespace and decodes a `=?base64?…?=` sentinel
/// strictly (standard alphabet, padding required). `None` if the sentinel is malformed.
pub fn decode_header_value(raw: &str) -> Option<String> {
    let v = raw.trim_matches(|c| c == ' ' || c == '\t');
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => {
            if b64.len() % 4 != 0 {
                return None;
            }
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(v.to_owned()),
    }
}

fn value_as_header_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) async fn post(inner: &Arc<Inner>, p: StatelessPost) -> Reply {
    let mut req = match p.message {
        Incoming::Request(r) => r,
        Incoming::Notification { .. } => return Reply::Accepted,
        Incoming::Response { .. } | Incoming::Error { .. } => {
            return Rejection::exchange(
                Reason::Malformed,
                -32600,
                "Invalid Request: stateless requests send no server-to-client requests to answer",
            )
            .into();
        }
    };
    let h = &p.headers;
    let id = req.id.clone();
    let (version, capabilities, meta) = match required_meta(&mut req, &id) {
        Ok(m) => m,
        Err(r) => return r,
    };
    if let Err(r) = check_routing(&req, h, p.from_http, &version, &id) {
        return r;
    }
    let owner = crate::session::owner_of(&p.principal);
    let from_http = p.from_http;
    let (traceparent, tracestate) = p.trace.parent(
        meta.traceparent
            .filter(|t| haven_telemetry::trace_id_of(t).is_some()),
    );
    let call = Call {
        id,
        method: req.method,
        params: req.params.unwrap_or_default(),
        era: Era::Stateless {
            protocol_version: version,
        },
        caller: Arc::new(Caller {
            client_info: meta.client_info,
            capabilities,
            log_level: meta.log_level,
            principal: owner,
        }),
        principal: Some(Arc::new(p.principal)),
        progress_token: meta.progress_token,
        traceparent,
        tracestate,
        trace: None,
    };
    // 7. `Mcp-Param-*` headers must mirror the arguments they stand for.
    if call.method == "tools/call"
        && from_http
        && let Some(r) = Box::pin(param_header_rejection(inner, &call, h)).await
    {
        return r;
    }
    match call.method.as_str() {
        "server/discover" => discover(inner, &call),
        "subscriptions/listen" => listen(inner, &call),
        _ => Box::pin(run(inner, call)).await,
    }
}

/// Step 1 of a stateless request's checks: `_meta` must carry the protocol version and the
/// client capabilities. Returns them, and the rest of `_meta`.
fn required_meta(
    req: &mut IncomingRequest,
    id: &RequestId,
) -> Result<(String, ClientCapabilities, RequestMeta), Reply> {
    let mut meta = match req.take_meta() {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Err(reject(Reason::InvalidParams, id, ErrorCode::INVALID_PARAMS, "Invalid params: _meta is required (with io.modelcontextprotocol/protocolVersion and io.modelcontextprotocol/clientCapabilities)".into(), None));
        }
        Err(e) => {
            return Err(reject(
                Reason::InvalidParams,
                id,
                ErrorCode::INVALID_PARAMS,
                format!("Invalid params: _meta: {e}"),
                None,
            ));
        }
    };
    let Some(version) = meta.protocol_version.take() else {
        return Err(reject(
            Reason::InvalidParams,
            id,
            ErrorCode::INVALID_PARAMS,
            format!("Invalid params: _meta[\"{META_VERSION}\"] (string) is required"),
            None,
        ));
    };
    let Some(capabilities) = meta.client_capabilities.take() else {
        return Err(reject(
            Reason::InvalidParams,
            id,
            ErrorCode::INVALID_PARAMS,
            format!("Invalid params: _meta[\"{META_CAPABILITIES}\"] (object) is required"),
            None,
        ));
    };
    Ok((version, capabilities, meta))
}

/// Steps 2 to 6 of a stateless request's checks, in the order the spec's error codes require:
/// the headers must agree with the body (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`;
/// over HTTP only), the version must be one Haven speaks statelessly and the method must exist
/// in this era.
fn check_routing(
    req: &IncomingRequest,
    h: &StatelessHeaders,
    from_http: bool,
    version: &str,
    id: &RequestId,
) -> Result<(), Reply> {
    // 2. The header must agree with `_meta`.
    if from_http && h.protocol_version.as_deref() != Some(version) {
        return Err(reject(
            Reason::HeaderMismatch,
            id,
            ErrorCode::HEADER_MISMATCH,
            format!(
                "Header mismatch: MCP-Protocol-Version header {:?} does not match _meta protocolVersion {version:?}",
                h.protocol_version.as_deref().unwrap_or("(absent)")
            ),
            None,
        ));
    }
    // 3. The version must be one Haven speaks statelessly.
    if !STATELESS_VERSIONS.contains(&version) {
        let e = ErrorData::unsupported_protocol_version(
            super::protocol_version(version),
            &supported_versions()
                .iter()
                .map(|v| super::protocol_version(v))
                .collect::<Vec<_>>(),
        );
        return Err(Rejection::new(Reason::UnsupportedVersion, Some(id), e).into());
    }
    // 4. `Mcp-Method` must name the body's method exactly.
    match h
        .method
        .as_deref()
        .map(|m| m.trim_matches(|c| c == ' ' || c == '\t'))
    {
        Some(m) if m == req.method => {}
        _ if !from_http => {}
        other => {
            return Err(reject(
                Reason::HeaderMismatch,
                id,
                ErrorCode::HEADER_MISMATCH,
                format!(
                    "Header mismatch: Mcp-Method header {:?} does not match method {:?}",
                    other.unwrap_or("(absent)"),
                    req.method
                ),
                None,
            ));
        }
    }
    // 5. The method must exist in this era.
    if !METHODS.contains(&req.method.as_str()) {
        return Err(Rejection::new(
            Reason::MethodNotFound,
            Some(id),
            jsonrpc::method_not_found(&req.method),
        )
        .into());
    }
    // 6. `Mcp-Name` must name the target.
    let target_field = match req.method.as_str() {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        "tasks/get" | "tasks/update" | "tasks/cancel" => Some("taskId"),
        _ => None,
    };
    if let (Some(field), true) = (target_field, from_http) {
        let target = req
            .params
            .as_ref()
            .and_then(|p| p.get(field))
            .and_then(Value::as_str);
        let header = h.name.as_deref().and_then(decode_header_value);
        if header.is_none() || header.as_deref() != target {
            return Err(reject(
                Reason::HeaderMismatch,
                id,
                ErrorCode::HEADER_MISMATCH,
                format!(
                    "Header mismatch: Mcp-Name header {:?} does not match params.{field} {:?}",
                    h.name.as_deref().unwrap_or("(absent)"),
                    target.unwrap_or("(absent)")
                ),
                None,
            ));
        }
    }
    Ok(())
}

/// Checks `Mcp-Param-*` headers against the tool's `x-mcp-header` arguments.
async fn param_header_rejection(
    inner: &Arc<Inner>,
    call: &Call,
    h: &StatelessHeaders,
) -> Option<Reply> {
    let name = call
        .params
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (tools, index) = inner.tools_for(call).await.ok()?;
    let tool = index.get(name).map(|i| &tools[*i])?;
    let props = tool
        .input_schema
        .get("properties")
        .and_then(Value::as_object)?;
    let args = call.params.get("arguments").and_then(Value::as_object);
    for (prop, schema) in props {
        let Some(header_name) = schema.get("x-mcp-header").and_then(Value::as_str) else {
            continue;
        };
        let wanted = header_name.to_ascii_lowercase();
        let header = h
            .params
            .iter()
            .find(|(k, _)| *k == wanted)
            .map(|(_, v)| v.as_str());
        let body = args.and_then(|a| a.get(prop)).filter(|v| !v.is_null());
        let ok = match (body, header) {
            (None, None) => true,
            (Some(_), None) | (None, Some(_)) => false,
            (Some(b), Some(hv)) => match (decode_header_value(hv), value_as_header_text(b)) {
                (Some(decoded), Some(expected)) => match (b, decoded.parse::<f64>()) {
                    (Value::Number(n), Ok(x)) => n.as_f64() == Some(x),
                    _ => decoded == expected,
                },
                _ => false,
            },
        };
        if !ok {
            return Some(reject(
                Reason::HeaderMismatch,
                &call.id,
                ErrorCode::HEADER_MISMATCH,
                format!(
                    "Header mismatch: Mcp-Param-{header_name} does not match argument {prop:?}"
                ),
                None,
            ));
        }
    }
    None
}

fn discover(inner: &Arc<Inner>, call: &Call) -> Reply {
    let mut capabilities = inner.info.capabilities.clone();
    capabilities
        .extensions
        .get_or_insert_with(Default::default)
        .insert(TASKS_EXTENSION.to_owned(), Default::default());
    let mut result = DiscoverResult::new(
        supported_versions()
            .iter()
            .map(|v| super::protocol_version(v))
            .collect(),
        capabilities,
    );
    result.instructions = inner.info.instructions.clone();
    result.ttl_ms = inner.config.list_ttl_millis;
    result.cache_scope = CacheScope::Public;
    let mut v = serde_json::to_value(&result).expect("discover result serializes");
    v["_meta"]["io.modelcontextprotocol/serverInfo"] =
        serde_json::to_value(&inner.info.server_info).expect("serializes");
    Reply::Json {
        body: jsonrpc::response(&call.id, &v),
        answer: Answer::Result,
        session: None,
    }
}

/// The handler ended without its final response.
fn no_response(id: &RequestId) -> Reply {
    Rejection::new(
        Reason::NoResponse,
        Some(id),
        jsonrpc::internal("the request ended without a response"),
    )
    .into()
}

/// Cancels a request when its response is dropped before the final message went out.
struct CancelOnDrop(Option<CancellationToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

/// Whether a request may turn into a task, and so must outlive its HTTP exchange.
fn may_become_task(inner: &Inner, call: &Call) -> bool {
    call.method == "tools/call"
        && call.caller.capabilities.supports_tasks()
        && call
            .params
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| {
                inner.catalog.task_support(n) != crate::catalog::TaskSupport::Forbidden
            })
}

async fn run(inner: &Arc<Inner>, call: Call) -> Reply {
    if may_become_task(inner, &call) {
        return Box::pin(run_spawned(inner, call)).await;
    }
    // The handler runs inside this request: no task spawn, and dropping the response (the
    // client closing it) drops the handler, which is the era's cancellation.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = call.id.clone();
    let mut handler: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(dispatch::run(
            inner.clone(),
            call,
            tx,
            CancellationToken::new(),
            None,
            None,
        ));
    let (first, running) = tokio::select! {
        biased;
        item = rx.recv() => (item, true),
        () = &mut handler => (rx.try_recv().ok(), false),
    };
    let first = match first {
        Some(Item::Final(f)) => return f.into(),
        Some(item) => item,
        None => return no_response(&id),
    };
    let state = (Some(first), rx, running.then_some(handler));
    let frames = futures::stream::unfold(state, |(pending, mut rx, mut handler)| async move {
        let item = match pending {
            Some(i) => i,
            None => loop {
                let next = match handler.as_mut() {
                    Some(h) => tokio::select! {
                        biased;
                        item = rx.recv() => item,
                        () = h => { handler = None; continue; }
                    },
                    None => rx.try_recv().ok(),
                };
                match next? {
                    Item::Close => continue,
                    i => break i,
                }
            },
        };
        let last = matches!(item, Item::Final(_));
        let data = match item {
            Item::Final(f) => f.message,
            Item::Notify(m) | Item::Request(m) => m,
            Item::Close => String::new(),
        };
        if last {
            rx.close();
            handler = None;
        }
        Some((
            SseFrame::Event {
                id: None,
                retry: None,
                data,
            },
            (None, rx, handler),
        ))
    });
    without_empty_events(frames)
}

/// A stream of SSE frames as a reply, without events that carry nothing (a handler's request
/// to close the stream has no meaning in this era).
fn without_empty_events(frames: impl futures::Stream<Item = SseFrame> + Send + 'static) -> Reply {
    use futures::StreamExt;
    Reply::Stream(
        frames
            .filter(|f| {
                futures::future::ready(
                    !matches!(f, SseFrame::Event { data, .. } if data.is_empty()),
                )
            })
            .boxed(),
    )
}

/// Runs a request that may become a task in its own tokio task, so that it can outlive the
/// HTTP exchange; closing the response before the final message cancels it.
async fn run_spawned(inner: &Arc<Inner>, call: Call) -> Reply {
    let id = call.id.clone();
    // It may become a task, whose writes are fenced by the task's execution from then on.
    let fence = haven_cluster::FencedStore::unattached(inner.store.clone());
    let running = inner.spawn_handler(call, Some(fence));
    let mut rx = running.rx;
    let mut guard = CancelOnDrop(Some(running.cancel));
    let first = match rx.recv().await {
        Some(Item::Final(f)) => {
            guard.0 = None;
            return f.into();
        }
        Some(item) => item,
        None => {
            guard.0 = None;
            return no_response(&id);
        }
    };
    // Anything before the result makes the answer a stream. Closing it cancels the request.
    let state = (Some(first), rx, guard);
    let frames = futures::stream::unfold(state, |(pending, mut rx, mut guard)| async move {
        let item = match pending {
            Some(i) => i,
            None => loop {
                match rx.recv().await? {
                    Item::Close => continue,
                    i => break i,
                }
            },
        };
        let data = match item {
            Item::Final(f) => {
                guard.0 = None;
                let frame = SseFrame::Event {
                    id: None,
                    retry: None,
                    data: f.message,
                };
                rx.close();
                return Some((frame, (None, rx, guard)));
            }
            Item::Notify(m) | Item::Request(m) => m,
            Item::Close => String::new(),
        };
        Some((
            SseFrame::Event {
                id: None,
                retry: None,
                data,
            },
            (None, rx, guard),
        ))
    });
    without_empty_events(frames)
}

fn listen(inner: &Arc<Inner>, call: &Call) -> Reply {
    let filter: SubscriptionFilter = match call.params.get("notifications") {
        Some(v) => match serde_json::from_value(v.clone()) {
            Ok(f) => f,
            Err(e) => {
                return Rejection::new(
                    Reason::InvalidParams,
                    Some(&call.id),
                    jsonrpc::invalid_params(format!("Invalid params: notifications: {e}")),
                )
                .into();
            }
        },
        None => {
            return Rejection::new(
                Reason::InvalidParams,
                Some(&call.id),
                jsonrpc::invalid_params("Invalid params: notifications is required"),
            )
            .into();
        }
    };
    if let Some(uris) = &filter.resource_subscriptions {
        let limits = &inner.config.limits;
        let checked = limits
            .check_count(uris.len())
            .and_then(|()| uris.iter().try_for_each(|u| limits.check_uri(u)));
        if let Err(e) = checked {
            return Rejection::new(
                Reason::InvalidParams,
                Some(&call.id),
                jsonrpc::invalid_params(format!("Invalid params: notifications: {e}")),
            )
            .into();
        }
    }
    let sub_id = serde_json::to_value(&call.id).expect("ids serialize");
    let meta = serde_json::json!({ META_SUBSCRIPTION: sub_id });
    let (tx, rx) = mpsc::unbounded_channel();
    let ack = jsonrpc::notification(
        "notifications/subscriptions/acknowledged",
        Some(serde_json::json!({ "notifications": filter, "_meta": meta })),
    );
    let _ = tx.send(SseFrame::Event {
        id: None,
        retry: None,
        data: ack,
    });
    let mut ann_rx = inner.hub.subscribe(Topic::Namespace(ANNOUNCE_NS.into()));
    tokio::spawn(async move {
        loop {
            let entry = tokio::select! {
                e = ann_rx.recv() => match e {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
                _ = tx.closed() => return,
            };
            let haven_state::Change::Record(r) = &entry.change else {
                continue;
            };
            let Some(a) = Announcement::from_key(&r.key) else {
                continue;
            };
            let (method, params) = match &a {
                Announcement::ToolsChanged if filter.tools_list_changed == Some(true) => {
                    ("notifications/tools/list_changed", serde_json::json!({}))
                }
                Announcement::PromptsChanged if filter.prompts_list_changed == Some(true) => {
                    ("notifications/prompts/list_changed", serde_json::json!({}))
                }
                Announcement::ResourcesChanged if filter.resources_list_changed == Some(true) => (
                    "notifications/resources/list_changed",
                    serde_json::json!({}),
                ),
                Announcement::ResourceUpdated(uri)
                    if filter
                        .resource_subscriptions
                        .as_ref()
                        .is_some_and(|s| s.contains(uri)) =>
                {
                    (
                        "notifications/resources/updated",
                        serde_json::json!({ "uri": uri }),
                    )
                }
                _ => continue,
            };
            let mut params = params;
            params["_meta"] = meta.clone();
            let msg = jsonrpc::notification(method, Some(params));
            if tx
                .send(SseFrame::Event {
                    id: None,
                    retry: None,
                    data: msg,
                })
                .is_err()
            {
                return;
            }
        }
    });
    Reply::Stream(keep_alive(rx, inner.config.keep_alive))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonrpc::IncomingRequest;

    #[test]
    fn header_values_decode_strictly() {
        assert_eq!(decode_header_value("  plain  ").as_deref(), Some("plain"));
        assert_eq!(
            decode_header_value("=?base64?SGVsbG8=?=").as_deref(),
            Some("Hello")
        );
        assert_eq!(decode_header_value("=?base64?SGVsbG8?="), None);
        assert_eq!(decode_header_value("=?base64?SGVs!!!bG8=?="), None);
        assert_eq!(
            decode_header_value("=?base64?SGVsbG8=").as_deref(),
            Some("=?base64?SGVsbG8=")
        );
    }

    #[test]
    fn era_detection() {
        let req = |m: &str, meta: bool| {
            let meta = meta.then(|| {
                serde_json::value::to_raw_value(&serde_json::json!({ META_VERSION: "2026-07-28" }))
                    .unwrap()
            });
            Incoming::Request(IncomingRequest {
                id: RequestId::Number(1),
                method: m.into(),
                params: Some(serde_json::Map::new()),
                meta: meta.map(jsonrpc::Meta::Raw),
            })
        };
        assert!(is_stateless(Some("2026-07-28"), &req("tools/list", true)));
        assert!(is_stateless(Some("v999.0.0"), &req("tools/list", true)));
        assert!(!is_stateless(Some("2025-11-25"), &req("tools/list", false)));
        assert!(!is_stateless(None, &req("initialize", false)));
        assert!(is_stateless(None, &req("server/discover", false)));
        assert!(is_stateless(None, &req("tools/list", true)));
    }
}
