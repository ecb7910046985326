//! Rate limits through the real router and engine (default catalog, real store), under a
//! clock the test moves by hand: per client address (the connection's peer, set here as the
//! accept loop sets it), per principal (placed in the request's extensions as an
//! authentication layer does) and per tool in both eras. A refused request is answered 429
//! with `Retry-After` and a JSON-RPC error, and changes nothing; health endpoints are exempt;
//! a legacy SSE stream counts when it opens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use haven_auth::{Principal, PrincipalKind};
use haven_catalogs::DefaultCatalog;
use haven_mcp::engine::{Engine, EngineConfig};
use haven_mcp::keyring::{KekSource, Secrets};
use haven_server::rate::{ManualClock, Quota, RateLimiter, RateLimits};
use haven_server::{HttpConfig, router};
use haven_state::{HybridClock, Origin, RedbStore, Store};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Node {
    _dir: tempfile::TempDir,
    router: Router,
    limits: Arc<RateLimits>,
    clock: Arc<ManualClock>,
    rate: Arc<RateLimiter>,
}

async fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(
            dir.path(),
            Origin::new("r1", "n1"),
            Arc::new(HybridClock::default()),
        )
        .unwrap(),
    );
    let secrets = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let config = EngineConfig {
        // A legacy call that finishes at once is answered with JSON.
        stream_after: Duration::from_secs(600),
        ..EngineConfig::default()
    };
    let engine = Engine::start(store, Arc::new(DefaultCatalog::new()), config, secrets)
        .await
        .unwrap();
    let limits = Arc::new(RateLimits::default());
    let clock = Arc::new(ManualClock::default());
    let rate = Arc::new(RateLimiter::new(limits.clone(), clock.clone()));
    let http = HttpConfig {
        rate: rate.clone(),
        ..HttpConfig::default()
    };
    Node {
        _dir: dir,
        router: router(engine, http),
        limits,
        clock,
        rate,
    }
}

fn principal(subject: &str) -> Principal {
    Principal {
        kind: PrincipalKind::Token,
        issuer: Some("https://idp.test".into()),
        subject: subject.into(),
        ..Principal::anonymous()
    }
}

/// Who sends a request: a client address and a principal (none: anonymous).
#[derive(Clone, Copy)]
struct From<'a> {
    ip: &'a str,
    principal: Option<&'a str>,
}

const ALICE: From = From {
    ip: "127.0.0.1",
    principal: Some("alice"),
};
const BOB: From = From {
    ip: "127.0.0.1",
    principal: Some("bob"),
};

struct Answer {
    status: u16,
    retry_after: Option<String>,
    session: Option<String>,
    body: Value,
}

async fn send(node: &Node, from: From<'_>, mut req: http::Request<Body>) -> Answer {
    let peer: SocketAddr = format!("{}:40000", from.ip).parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    if let Some(p) = from.principal {
        req.extensions_mut().insert(principal(p));
    }
    let r = node.router.clone().oneshot(req).await.unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (status, retry_after, session) = (
        r.status().as_u16(),
        header("retry-after"),
        header("mcp-session-id"),
    );
    let body = if header("content-type").as_deref() == Some("text/event-stream") {
        Value::Null
    } else {
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Answer {
        status,
        retry_after,
        session,
        body,
    }
}

async fn post(node: &Node, from: From<'_>, headers: &[(&str, &str)], body: Value) -> Answer {
    let mut req = http::Request::builder()
        .method("POST")
        .uri("/mcp")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(node, from, req.body(Body::from(body.to_string())).unwrap()).await
}

async fn get(node: &Node, from: From<'_>, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "localhost")
        .header("accept", "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(node, from, req.body(Body::empty()).unwrap()).await
}

fn meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}
    })
}

async fn stateless_call(node: &Node, from: From<'_>, id: i64, tool: &str, args: Value) -> Answer {
    let params = json!({"name": tool, "arguments": args, "_meta": meta()});
    post(
        node,
        from,
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", tool),
        ],
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":params}),
    )
    .await
}

/// A cheap stateless request (tools/list).
async fn ping(node: &Node, from: From<'_>) -> Answer {
    post(
        node,
        from,
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/list"),
        ],
        json!({"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta": meta()}}),
    )
    .await
}

async fn legacy_session(node: &Node, from: From<'_>) -> String {
    let a = post(
        node,
        from,
        &[],
        json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},
            "clientInfo":{"name":"rate-test","version":"1"}}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.session.expect("a session id")
}

async fn legacy_call(
    node: &Node,
    from: From<'_>,
    session: &str,
    id: i64,
    tool: &str,
    args: Value,
) -> Answer {
    post(
        node,
        from,
        &[
            ("mcp-session-id", session),
            ("mcp-protocol-version", "2025-11-25"),
        ],
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call",
               "params":{"name":tool,"arguments":args}}),
    )
    .await
}

/// A rate limit's refusal: 429, `Retry-After`, a JSON-RPC error naming `setting`, with `id`.
fn assert_limited(a: &Answer, retry_after: &str, setting: &str, id: Value) {
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some(retry_after), "{}", a.body);
    assert_eq!(a.body["jsonrpc"], "2.0");
    assert_eq!(a.body["error"]["code"], -32000, "{}", a.body);
    assert_eq!(a.body.get("id").cloned().unwrap_or(Value::Null), id);
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Too Many Requests") && message.contains(setting),
        "{message}"
    );
    assert!(a.body.get("result").is_none());
}

/// Whether the note `name` exists, asked by a principal with no limit in the way.
async fn note_exists(node: &Node, name: &str) -> bool {
    let reader = From {
        ip: "127.0.0.9",
        principal: Some("reader"),
    };
    let a = stateless_call(node, reader, 99, "notes_get", json!({"name": name})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body["result"].is_object(), "{}", a.body);
    a.body["result"]["isError"] != json!(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_refused_while_others_and_health_are_served() {
    let node = start().await;
    // Off by default: a flood passes and no bucket is kept.
    for _ in 0..50 {
        assert_eq!(ping(&node, ALICE).await.status, 200);
    }
    assert_eq!(node.rate.keys_held(), (0, 0, 0));
    node.limits.per_ip_rps.store(2, Ordering::Relaxed);
    node.limits.per_ip_burst.store(3, Ordering::Relaxed);
    let flooder = From {
        ip: "127.0.0.1",
        principal: None,
    };
    let other = From {
        ip: "127.0.0.2",
        principal: None,
    };
    // The burst goes through, then the address is refused, whoever the principal is.
    let session = legacy_session(&node, flooder).await;
    // A legacy SSE stream counts when it opens.
    let stream = get(
        &node,
        flooder,
        "/mcp",
        &[
            ("mcp-session-id", &session),
            ("mcp-protocol-version", "2025-11-25"),
        ],
    )
    .await;
    assert_eq!(stream.status, 200);
    assert_eq!(ping(&node, flooder).await.status, 200);
    let refused = ping(&node, flooder).await;
    assert_limited(&refused, "1", "limits.rate.per_ip_rps", Value::Null);
    assert_limited(
        &ping(&node, ALICE).await,
        "1",
        "limits.rate.per_ip_rps",
        Value::Null,
    );
    // A refused tools/call changes nothing.
    let put = stateless_call(
        &node,
        flooder,
        5,
        "notes_put",
        json!({"name":"n","text":"t"}),
    )
    .await;
    assert_eq!(put.status, 429);
    // Another address is served; health endpoints are exempt.
    assert_eq!(ping(&node, other).await.status, 200);
    assert_eq!(get(&node, flooder, "/healthz", &[]).await.status, 200);
    assert_eq!(get(&node, flooder, "/readyz", &[]).await.status, 200);
    assert!(!note_exists(&node, "n").await);
    // Half a second later one request passes again (2 per second).
    node.clock.advance(Duration::from_millis(500));
    assert_eq!(ping(&node, flooder).await.status, 200);
    assert_eq!(ping(&node, flooder).await.status, 429);
    // A live change: off again, the address is served at once.
    node.limits.per_ip_rps.store(0, Ordering::Relaxed);
    assert_eq!(ping(&node, flooder).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_principal_has_its_own_rate() {
    let node = start().await;
    node.limits.per_principal_rps.store(1, Ordering::Relaxed);
    node.limits.per_principal_burst.store(2, Ordering::Relaxed);
    for _ in 0..2 {
        assert_eq!(ping(&node, ALICE).await.status, 200);
    }
    assert_limited(
        &ping(&node, ALICE).await,
        "1",
        "limits.rate.per_principal_rps",
        Value::Null,
    );
    // Another principal from the same address, and the anonymous one, are served.
    assert_eq!(ping(&node, BOB).await.status, 200);
    let anonymous = From {
        ip: "127.0.0.1",
        principal: None,
    };
    assert_eq!(ping(&node, anonymous).await.status, 200);
    // Alice's refused call left nothing behind.
    let put = stateless_call(&node, ALICE, 3, "notes_put", json!({"name":"a","text":"t"})).await;
    assert_eq!(put.status, 429);
    assert!(!note_exists(&node, "a").await);
    node.clock.advance(Duration::from_secs(1));
    let put = stateless_call(&node, ALICE, 4, "notes_put", json!({"name":"a","text":"t"})).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert!(note_exists(&node, "a").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_rate_holds_per_principal_in_both_eras_and_a_refused_call_changes_nothing() {
    let node = start().await;
    node.limits.set_tool_overrides(
        [(
            "notes_put".to_owned(),
            Quota {
                count: 1,
                period: Duration::from_secs(60),
                burst: 1,
            },
        )]
        .into(),
    );
    let put = |name: &str| json!({"name": name, "text": "kept"});
    // Stateless era: the first call runs, the second is refused with its id.
    let a = stateless_call(&node, ALICE, 1, "notes_put", put("one")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = stateless_call(&node, ALICE, 2, "notes_put", put("two")).await;
    assert_limited(&a, "60", "'notes_put'", json!(2));
    assert!(!note_exists(&node, "two").await);
    // Legacy era: the same principal's bucket for the same tool.
    let session = legacy_session(&node, ALICE).await;
    let a = legacy_call(&node, ALICE, &session, 3, "notes_put", put("three")).await;
    assert_limited(&a, "60", "'notes_put'", json!(3));
    assert!(!note_exists(&node, "three").await);
    // Other tools of the same principal, and the same tool of another principal, run.
    let a = legacy_call(
        &node,
        ALICE,
        &session,
        4,
        "notes_get",
        json!({"name":"one"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.get("result").is_some(), "{}", a.body);
    let a = stateless_call(&node, BOB, 5, "notes_put", put("bob")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // A default rate for every tool, live.
    node.limits.per_tool_rps.store(1, Ordering::Relaxed);
    node.limits.per_tool_burst.store(1, Ordering::Relaxed);
    let a = legacy_call(
        &node,
        ALICE,
        &session,
        6,
        "notes_get",
        json!({"name":"one"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = legacy_call(
        &node,
        ALICE,
        &session,
        7,
        "notes_get",
        json!({"name":"one"}),
    )
    .await;
    assert_limited(&a, "1", "limits.rate.per_tool_rps", json!(7));
    // A minute later alice's notes_put runs again, in the legacy era.
    node.clock.advance(Duration::from_secs(60));
    let a = legacy_call(&node, ALICE, &session, 8, "notes_put", put("four")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.get("result").is_some(), "{}", a.body);
    assert!(note_exists(&node, "four").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_addresses_and_principals_keeps_memory_bounded() {
    let node = start().await;
    node.limits.per_ip_rps.store(1, Ordering::Relaxed);
    node.limits.per_ip_burst.store(1, Ordering::Relaxed);
    node.limits.per_principal_rps.store(1, Ordering::Relaxed);
    node.limits.per_principal_burst.store(1, Ordering::Relaxed);
    node.limits.max_keys.store(20, Ordering::Relaxed);
    let mut served = 0;
    for i in 0..200u32 {
        let ip = format!("10.0.{}.{}", i / 250, i % 250);
        let who = format!("p{i}");
        let from = From {
            ip: &ip,
            principal: Some(&who),
        };
        if ping(&node, from).await.status == 200 {
            served += 1;
        }
        let (ips, principals, _) = node.rate.keys_held();
        assert!(ips <= 20 && principals <= 20, "{ips} {principals}");
    }
    // Twenty addresses had their own bucket; the other 180 shared one (burst 1).
    assert_eq!(served, 21);
    // Once idle, the buckets go.
    node.clock.advance(Duration::from_secs(30));
    let from = From {
        ip: "10.9.9.9",
        principal: Some("late"),
    };
    assert_eq!(ping(&node, from).await.status, 200);
    assert_eq!(node.rate.keys_held(), (1, 1, 0));
}
