//! The HTTP/JSON-RPC entry: the real axum router of `haven_server::http::router` on an engine
//! over a real store (redb on tmpfs), driven in-process with `tower::ServiceExt::oneshot` (no
//! sockets). Every request gets an answer within a bound, never a 5xx; a JSON answer is
//! complete JSON; an SSE answer is read for a bounded number of frames and time (a long call
//! may keep its stream open) and then dropped, as a client that goes away would.
//!
//! The input is an HTTP request written as text, as in `fuzz/corpus/http/`:
//!
//! ```text
//! POST /mcp
//! content-type: application/json
//! mcp-protocol-version: 2025-11-25
//! mcp-session-id: $SESSION
//!
//! {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{...}}
//! ```
//!
//! Placeholders make well-formed values reachable: `$SESSION` is a live legacy session,
//! `$EVENT` an event id of one of its streams, `$STATE` a `requestState` sealed with the
//! node's real key for the method and name of the body, `$WRONGSTATE` one sealed for another
//! tool, `$EXPIRED` one that has expired.
//!
//! Two nodes serve: one with the default catalog, one with the conformance catalog (which
//! has the tools that ask the client for input, `Mcp-Param-*` headers and tasks); the line
//! `x-fuzz-catalog: conformance` in the head picks the second (it is not sent).
//!
//! One liberty: a tool's `seconds` argument is cut to 50 ms, or every input that finds
//! `sleep` would leave a handler running for up to a day (a legacy call goes on after its
//! client leaves). Its argument checks still see every value the fuzzer makes, up to that cut.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use haven_catalogs::{ConformanceCatalog, DefaultCatalog};
use haven_fuzz::{redb_store, runtime};
use haven_mcp::catalog::Catalog;
use haven_mcp::engine::{Engine, EngineConfig};
use haven_mcp::rmcp::model::SealOptions;
use haven_secrets::{KekSource, Secrets};
use haven_server::http::{HttpConfig, router};
use http::{HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tower::ServiceExt;

/// Body limit of the fuzzed node (small, so that 413 is reachable with short inputs).
const BODY_LIMIT: usize = 3000;
/// How long a request may take to get its status line and headers.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long a JSON answer may take to arrive in full.
const BODY_WITHIN: Duration = Duration::from_secs(5);
/// SSE frames read before the stream is dropped, and the idle time that ends the reading.
const SSE_FRAMES: usize = 32;
const SSE_IDLE: Duration = Duration::from_millis(20);
const LEGACY: &str = "2025-11-25";

struct Node {
    engine: Engine,
    router: Router,
    /// A live legacy session and an event id of one of its streams.
    session: Mutex<(String, String)>,
}

fn start(name: &str, catalog: Arc<dyn Catalog>) -> Node {
    runtime().block_on(async {
        let store = redb_store(name);
        let secrets = Secrets::open(store.clone(), KekSource::generated()).expect("secrets");
        let config = EngineConfig {
            client_reply_timeout: Duration::from_secs(2),
            ..EngineConfig::default()
        };
        let engine = Engine::start(store, catalog, config, secrets)
            .await
            .expect("engine");
        let http = HttpConfig::default();
        http.max_body_bytes
            .store(BODY_LIMIT, std::sync::atomic::Ordering::Relaxed);
        let router = router(engine.clone(), http);
        let session = new_session(&router).await;
        Node {
            engine,
            router,
            session: Mutex::new(session),
        }
    })
}

/// The node with the default catalog, and the one with the conformance catalog.
fn nodes() -> &'static [Node; 2] {
    static NODES: OnceLock<[Node; 2]> = OnceLock::new();
    NODES.get_or_init(|| {
        [
            start("http-default", Arc::new(DefaultCatalog::new())),
            start("http-conformance", Arc::new(ConformanceCatalog::new())),
        ]
    })
}

fn post(body: &Value, session: Option<&str>) -> Request<Body> {
    let mut r = Request::post("/mcp")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", LEGACY);
    if let Some(s) = session {
        r = r.header("mcp-session-id", s);
    }
    r.body(Body::from(body.to_string())).expect("a request")
}

/// Initializes a legacy session and makes one of its calls stream, for an event id.
async fn new_session(router: &Router) -> (String, String) {
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
        "protocolVersion":LEGACY,"capabilities":{},"clientInfo":{"name":"fuzz","version":"1"}}});
    let r = router
        .clone()
        .oneshot(post(&init, None))
        .await
        .expect("infallible");
    assert_eq!(r.status(), 200, "initialize");
    let session = r.headers()["mcp-session-id"]
        .to_str()
        .expect("session id")
        .to_owned();
    let done = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
    let r = router
        .clone()
        .oneshot(post(&done, Some(&session)))
        .await
        .expect("infallible");
    assert_eq!(r.status(), 202, "notifications/initialized");
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"sleep",
        "arguments":{"seconds":0.05},"_meta":{"progressToken":"p"}}});
    let r = router
        .clone()
        .oneshot(post(&call, Some(&session)))
        .await
        .expect("infallible");
    let body = r.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&body);
    let event = text
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .map_or_else(|| "0-0".to_owned(), str::to_owned);
    (session, event)
}

fn replace(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let from = from.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            out.extend_from_slice(to.as_bytes());
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// A `requestState` sealed by the node's own key, bound to `method` and `name`.
fn sealed(engine: &Engine, method: &str, name: &str, ttl: Duration, round: u32) -> String {
    let codec = engine.keyring().codec().expect("a request-state key");
    let binding = format!("{method}\u{0}{name}").into_bytes();
    codec
        .seal_json_with(
            &json!({"r": round, "s": {"step": round}}),
            &SealOptions::new().associated_data(&binding).ttl(ttl),
        )
        .expect("sealing")
}

/// The body with its placeholders filled in and a long `sleep` cut short.
fn prepare_body(engine: &Engine, session: &(String, String), body: &[u8]) -> Vec<u8> {
    let mut body = replace(body, "$SESSION", &session.0);
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let method = parsed
        .as_ref()
        .and_then(|v| v["method"].as_str())
        .unwrap_or("tools/call")
        .to_owned();
    let name = parsed
        .as_ref()
        .and_then(|v| v["params"]["name"].as_str().or(v["params"]["uri"].as_str()))
        .unwrap_or("echo")
        .to_owned();
    let round = u32::try_from(body.len() % 5).unwrap_or(0);
    if body.windows(6).any(|w| w == b"$STATE") || body.windows(11).any(|w| w == b"$WRONGSTATE") {
        let good = sealed(engine, &method, &name, Duration::from_secs(600), round);
        let wrong = sealed(engine, &method, "another", Duration::from_secs(600), round);
        body = replace(&body, "$WRONGSTATE", &wrong);
        body = replace(&body, "$STATE", &good);
    }
    if body.windows(8).any(|w| w == b"$EXPIRED") {
        let old = sealed(engine, &method, &name, Duration::ZERO, round);
        body = replace(&body, "$EXPIRED", &old);
    }
    if let Some(mut v) = serde_json::from_slice::<Value>(&body).ok()
        && v["method"] == "tools/call"
        && v["params"]["arguments"]["seconds"]
            .as_f64()
            .is_some_and(|s| s > 0.05)
    {
        v["params"]["arguments"]["seconds"] = json!(0.05);
        body = v.to_string().into_bytes();
    }
    body
}

/// The request the input describes, or `None` when it is not one an HTTP server would pass
/// on (a bad method or path: hyper refuses those before any router sees them).
fn request(data: &[u8]) -> Option<(&'static Node, Request<Body>, bool)> {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let conformance = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("x-fuzz-catalog: conformance"));
    let node = &nodes()[usize::from(conformance)];
    let session = node.session.lock().clone();
    let mut lines = head.split('\n');
    let first = lines.next().unwrap_or("");
    let (method, path) = first.split_once(' ').unwrap_or((first, "/mcp"));
    let method = Method::from_bytes(method.trim().as_bytes()).ok()?;
    let mut builder = Request::builder().method(method.clone()).uri(path.trim());
    let mut uses_session = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("x-fuzz-catalog") {
            continue;
        }
        let value = value.strip_prefix(' ').unwrap_or(value);
        uses_session |= value.contains("$SESSION");
        let value = value
            .replace("$SESSION", &session.0)
            .replace("$EVENT", &session.1);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(&value),
        ) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    // A client over HTTP/1.1 always sends Host (a request without one is refused with 400
    // before any handler); an input without it gets one, so that it reaches the handlers.
    if !head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("host"))
    }) {
        builder = builder.header("host", "localhost");
    }
    let body = prepare_body(&node.engine, &session, body);
    let req = builder.body(Body::from(body)).ok()?;
    Some((node, req, uses_session && method == Method::DELETE))
}

async fn check(response: Response<Body>) {
    let status = response.status();
    assert!(
        !status.is_server_error(),
        "HTTP {status} for a client's request"
    );
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = response.into_body();
    if content_type.starts_with("text/event-stream") {
        // A stream: read what comes promptly, then go away.
        for _ in 0..SSE_FRAMES {
            match tokio::time::timeout(SSE_IDLE, body.frame()).await {
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("an SSE stream failed: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        return;
    }
    let bytes = tokio::time::timeout(BODY_WITHIN, body.collect())
        .await
        .unwrap_or_else(|_| panic!("HTTP {status}: the body did not end within {BODY_WITHIN:?}"))
        .expect("a body")
        .to_bytes();
    if content_type.starts_with("application/json") {
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("HTTP {status}: a JSON answer that is not JSON ({e}): {bytes:?}")
        });
        if status.is_client_error() {
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(
                !message.is_empty(),
                "HTTP {status} without an error message: {v}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((node, req, ends_session)) = request(data) else {
        return;
    };
    runtime().block_on(async {
        let response = tokio::time::timeout(ANSWER_WITHIN, node.router.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("no answer within {ANSWER_WITHIN:?}"))
            .expect("the router is infallible");
        let ok = response.status().is_success();
        check(response).await;
        if ends_session && ok {
            // The live session was just deleted: make another for the next inputs.
            let fresh = new_session(&node.router).await;
            *node.session.lock() = fresh;
        }
    });
});
