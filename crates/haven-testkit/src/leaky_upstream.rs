//! A real, badly behaved upstream MCP server over Streamable HTTP on loopback (axum): it
//! completes the MCP handshake and lists its tools, resources and prompts, then refuses calls
//! with HTTP error bodies that echo the request's `Authorization` header(s) and the full request
//! URI (query string included), the way some servers' error pages do. Tests use it to show that
//! nothing of this reaches Haven's clients and that operators see it redacted.
//!
//! Routes: `POST /mcp` (the server described below), `POST /deny` (401 with the echo for every
//! request, the handshake included), `GET` 405 and `DELETE` 200 on both.
//!
//! On `/mcp`, `tools/call` of:
//! - `ok`: a result with the text `fine`;
//! - `leaky`: 401 `text/plain` with the echo, no challenge;
//! - `leaky_challenge`: 401 with `WWW-Authenticate: Bearer realm="leaky"` and the echo;
//! - `leaky_500`: 500 `text/plain` with the echo;
//! - `leaky_json`: 500 `application/json` holding a JSON-RPC error whose message and data echo;
//!
//! `resources/read` gets 401 with the echo, `prompts/get` 403 with the echo.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The running server; [`LeakyUpstream::stop`] stops it (dropping it aborts it).
pub struct LeakyUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl LeakyUpstream {
    /// Starts it on a free loopback port.
    pub async fn start() -> LeakyUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new()
            .route(
                "/mcp",
                axum::routing::post(mcp)
                    .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
                    .delete(|| async { StatusCode::OK }),
            )
            .route(
                "/deny",
                axum::routing::post(deny)
                    .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
                    .delete(|| async { StatusCode::OK }),
            )
            .with_state(seen.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        LeakyUpstream {
            addr,
            seen,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// `http://ADDR` followed by `path_and_query` (e.g. `/mcp?api_key=…`).
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// The `Authorization` header values of every request so far, one list per request.
    pub fn authorizations(&self) -> Vec<Vec<String>> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops the server and waits for it (its connections are closed: Haven's client holds
    /// none open between requests, and an open one is cut when the task is aborted).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(std::time::Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for LeakyUpstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

type Seen = State<Arc<Mutex<Vec<Vec<String>>>>>;

fn record(seen: &Seen, headers: &HeaderMap) -> Vec<String> {
    let values: Vec<String> = headers
        .get_all("authorization")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    seen.0.lock().unwrap().push(values.clone());
    values
}

/// The echo a careless error page makes of the request.
fn echo(authorization: &[String], uri: &Uri) -> String {
    format!(
        "unauthorized: you sent authorization: {} to {uri} (request uri with query)",
        authorization.join(" | ")
    )
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "text/plain")], body).into_response()
}

async fn deny(seen: Seen, uri: Uri, headers: HeaderMap) -> Response {
    let auth = record(&seen, &headers);
    text(StatusCode::UNAUTHORIZED, echo(&auth, &uri))
}

async fn mcp(seen: Seen, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let auth = record(&seen, &headers);
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(id) = msg.get("id").cloned() else {
        return StatusCode::ACCEPTED.into_response();
    };
    let answer = |v: Value| {
        (
            StatusCode::OK,
            [
                ("content-type", "application/json"),
                ("mcp-session-id", "leaky-1"),
            ],
            v.to_string(),
        )
            .into_response()
    };
    let result = |r: Value| answer(json!({"jsonrpc": "2.0", "id": id, "result": r}));
    let params = &msg["params"];
    let leak = echo(&auth, &uri);
    match msg["method"].as_str().unwrap_or("") {
        "initialize" => result(json!({
            "protocolVersion": params["protocolVersion"],
            "capabilities": {"tools": {}, "resources": {}, "prompts": {}},
            "serverInfo": {"name": "leaky", "version": "0.0.0"},
        })),
        "tools/list" => {
            let tool = |name: &str| json!({"name": name, "description": "Fails leakily", "inputSchema": {"type": "object"}});
            result(json!({"tools": [
                tool("ok"), tool("leaky"), tool("leaky_challenge"), tool("leaky_500"),
                tool("leaky_json"),
            ]}))
        }
        "resources/list" => result(json!({"resources": [
            {"uri": "leak://doc", "name": "doc", "mimeType": "text/plain"},
        ]})),
        "resources/templates/list" => result(json!({"resourceTemplates": []})),
        "prompts/list" => result(json!({"prompts": [{"name": "leaky_prompt"}]})),
        "resources/read" => text(StatusCode::UNAUTHORIZED, leak),
        "prompts/get" => text(StatusCode::FORBIDDEN, leak),
        "tools/call" => match params["name"].as_str().unwrap_or("") {
            "ok" => result(json!({"content": [{"type": "text", "text": "fine"}]})),
            "leaky_challenge" => (
                StatusCode::UNAUTHORIZED,
                [
                    ("content-type", "text/plain"),
                    ("www-authenticate", "Bearer realm=\"leaky\""),
                ],
                leak,
            )
                .into_response(),
            "leaky_500" => text(StatusCode::INTERNAL_SERVER_ERROR, leak),
            "leaky_json" => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "application/json")],
                json!({"jsonrpc": "2.0", "id": id, "error": {
                    "code": -32000, "message": leak, "data": {"echo": leak},
                }})
                .to_string(),
            )
                .into_response(),
            _ => text(StatusCode::UNAUTHORIZED, leak),
        },
        _ => answer(json!({
            "jsonrpc": "2.0", "id": id,
            "error": {"code": -32601, "message": "Method not found"},
        })),
    }
}
