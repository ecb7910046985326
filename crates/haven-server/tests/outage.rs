//! A store outage over HTTP, in both protocol eras: a request whose answer is one JSON body and
//! that failed because the store refused its write gets HTTP 503 with `Retry-After: 1` and the
//! JSON-RPC error (marked retryable) as its body, never 200. Reads still work meanwhile, and
//! writes go through again once the store is back.
//!
//! The store is the real `RedbStore` behind a switch that makes `commit` fail the way an
//! unreachable or quorum-less backend does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use haven_catalogs::DefaultCatalog;
use haven_mcp::engine::{Engine, EngineConfig};
use haven_mcp::keyring::{KekSource, Secrets};
use haven_server::{HttpConfig, router};
use haven_state::{Batch, Commit, HybridClock, Origin, RedbStore, Store, StoreError, StoreResult};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The real store, with a switch that makes every write fail as unavailable.
struct FaultyStore {
    inner: RedbStore,
    refuse_writes: AtomicBool,
}

impl FaultyStore {
    fn refused(&self) -> Option<StoreError> {
        self.refuse_writes
            .load(Ordering::SeqCst)
            .then(|| StoreError::Unavailable("injected: the store lost its quorum".into()))
    }
}

haven_state::wrap_store!(FaultyStore, inner, {
    async fn commit(&self, batch: Batch) -> StoreResult<Commit> {
        match self.refused() {
            Some(e) => Err(e),
            None => self.inner.commit(batch).await,
        }
    }

    async fn check_writable(&self) -> StoreResult<()> {
        match self.refused() {
            Some(e) => Err(e),
            None => self.inner.check_writable().await,
        }
    }
});

struct Node {
    _dir: tempfile::TempDir,
    store: Arc<FaultyStore>,
    router: Router,
}

async fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(
        dir.path(),
        Origin::new("r1", "n1"),
        Arc::new(HybridClock::default()),
    )
    .unwrap();
    let store = Arc::new(FaultyStore {
        inner: redb,
        refuse_writes: AtomicBool::new(false),
    });
    let dyn_store: Arc<dyn Store> = store.clone();
    let secrets = Secrets::open(dyn_store.clone(), KekSource::generated()).unwrap();
    let config = EngineConfig {
        // A legacy call that finishes at once is answered with JSON however slow this machine
        // is: the answer arrives long before the stream would be opened.
        stream_after: Duration::from_secs(600),
        ..EngineConfig::default()
    };
    let engine = Engine::start(dyn_store, Arc::new(DefaultCatalog::new()), config, secrets)
        .await
        .unwrap();
    Node {
        _dir: dir,
        store,
        router: router(engine, HttpConfig::default()),
    }
}

/// Status, `Retry-After`, `Content-Type` and JSON body of a POST to `/mcp`.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    content_type: Option<String>,
    session: Option<String>,
    body: Value,
}

async fn post(node: &Node, headers: &[(&str, &str)], body: Value) -> Answer {
    let mut req = http::Request::builder()
        .method("POST")
        .uri("/mcp")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Body::from(body.to_string())).unwrap();
    let r = node.router.clone().oneshot(req).await.unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, retry_after, content_type, session) = (
        r.status().as_u16(),
        header("retry-after"),
        header("content-type"),
        header("mcp-session-id"),
    );
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        retry_after,
        content_type,
        session,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn stateless_call(node: &Node, id: i64, tool: &str, arguments: Value) -> Answer {
    let params = json!({
        "name": tool,
        "arguments": arguments,
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}
        }
    });
    post(
        node,
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", tool),
        ],
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":params}),
    )
    .await
}

async fn legacy_session(node: &Node) -> String {
    let a = post(
        node,
        &[],
        json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},
            "clientInfo":{"name":"outage-test","version":"1"}}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.session.expect("a session id")
}

async fn legacy_call(node: &Node, session: &str, id: i64, tool: &str, arguments: Value) -> Answer {
    post(
        node,
        &[
            ("mcp-session-id", session),
            ("mcp-protocol-version", "2025-11-25"),
        ],
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
               "params":{"name":tool,"arguments":arguments}}),
    )
    .await
}

/// The answer is an outage: 503, told when to retry, with the marked JSON-RPC error of `id`.
fn assert_outage(a: &Answer, id: i64) {
    assert_eq!(a.status, 503, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert_eq!(a.content_type.as_deref(), Some("application/json"));
    assert_eq!(a.body["jsonrpc"], "2.0");
    assert_eq!(a.body["id"], id, "{}", a.body);
    assert_eq!(a.body["error"]["code"], -32603, "{}", a.body);
    assert_eq!(
        a.body["error"]["data"],
        json!({"retryable": true, "reason": "store-unavailable"}),
        "{}",
        a.body
    );
    assert!(a.body.get("result").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_write_during_an_outage_gets_503_with_retry_after() {
    let node = start().await;
    let put = |name: &str| json!({"name": name, "text": "kept"});
    let a = stateless_call(&node, 1, "notes_put", put("before")).await;
    assert_eq!(
        (a.status, a.retry_after.as_deref()),
        (200, None),
        "{}",
        a.body
    );
    assert_eq!(a.body["result"]["content"][0]["text"], "Saved note before");

    node.store.refuse_writes.store(true, Ordering::SeqCst);
    let a = stateless_call(&node, 2, "notes_put", put("during")).await;
    assert_outage(&a, 2);
    // Reads do not need a write: still answered.
    let a = stateless_call(&node, 3, "notes_get", json!({"name": "before"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["result"]["content"][0]["text"], "kept");

    node.store.refuse_writes.store(false, Ordering::SeqCst);
    let a = stateless_call(&node, 4, "notes_put", put("after")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = stateless_call(&node, 5, "notes_get", json!({"name": "during"})).await;
    assert_eq!(
        a.body["result"]["content"][0]["text"], "No note named during",
        "nothing of the refused write was applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_write_answered_with_json_during_an_outage_gets_503_with_retry_after() {
    let node = start().await;
    let session = legacy_session(&node).await;
    let put = |name: &str| json!({"name": name, "text": "kept"});
    let a = legacy_call(&node, &session, 1, "notes_put", put("before")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.content_type.as_deref(), Some("application/json"));

    node.store.refuse_writes.store(true, Ordering::SeqCst);
    let a = legacy_call(&node, &session, 2, "notes_put", put("during")).await;
    assert_outage(&a, 2);
    // A JSON-RPC error that is not an outage is still a normal legacy answer.
    let a = legacy_call(&node, &session, 3, "no_such_tool", json!({})).await;
    assert_eq!(
        (a.status, a.retry_after.as_deref()),
        (200, None),
        "{}",
        a.body
    );
    assert!(a.body.get("error").is_some(), "{}", a.body);

    node.store.refuse_writes.store(false, Ordering::SeqCst);
    let a = legacy_call(&node, &session, 4, "notes_put", put("after")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["result"]["content"][0]["text"], "Saved note after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cannot_start_during_an_outage() {
    let node = start().await;
    node.store.refuse_writes.store(true, Ordering::SeqCst);
    let a = post(
        &node,
        &[],
        json!({"jsonrpc":"2.0","id":9,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},
            "clientInfo":{"name":"outage-test","version":"1"}}}),
    )
    .await;
    assert_outage(&a, 9);
    assert!(a.session.is_none());
}
