//! How the real binary answers over HTTP: bad input gets the spec's answer (never a panic or a
//! 500), DNS-rebinding protection, session lifecycle, pagination, and both eras on one endpoint.

mod common;

use common::{Haven, LEGACY, Legacy, free_port, stateless};
use futures::StreamExt;
use serde_json::{Value, json};

async fn start(extra: &[&str]) -> (tempfile::TempDir, Haven) {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "conformance", extra).await;
    (dir, h)
}

async fn post(url: &str, headers: &[(&str, &str)], body: impl Into<reqwest::Body>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

const JSON: (&str, &str) = ("content-type", "application/json");
const ACCEPT: (&str, &str) = ("accept", "application/json, text/event-stream");

// Long by design: a table of bad requests and the error each must get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_specified_errors() {
    let (_dir, h) = start(&["--max-body-bytes", "2048"]).await;
    let url = h.url();

    let (s, v) = post(&url, &[JSON, ACCEPT], "{not json").await;
    assert_eq!((s, v["error"]["code"].as_i64()), (400, Some(-32700)), "{v}");

    let (s, v) = post(&url, &[JSON, ACCEPT], r#"{"id":1,"method":"initialize"}"#).await;
    assert_eq!((s, v["error"]["code"].as_i64()), (400, Some(-32600)), "{v}");
    assert_eq!(v["id"], 1);

    let (s, v) = post(
        &url,
        &[JSON, ACCEPT],
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_i64()), (400, Some(-32600)), "{v}");

    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(5000)
    );
    let (s, v) = post(&url, &[JSON, ACCEPT], big).await;
    assert_eq!(s, 413, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("2048"));

    let (s, v) = post(
        &url,
        &[("content-type", "text/plain"), ACCEPT],
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    )
    .await;
    assert_eq!(s, 415, "{v}");

    let (s, _) = post(
        &url,
        &[JSON, ("accept", "text/html")],
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    )
    .await;
    assert_eq!(s, 406);

    // Legacy: unknown method, invalid params, unknown session, bad protocol version.
    let c = Legacy::connect(&url).await;
    let v = c.request(1, "no/such/method", json!({})).await;
    assert_eq!(v["error"]["code"], -32601, "{v}");
    let v = c.request(2, "tools/call", json!({"arguments":{}})).await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let v = c
        .request(3, "tools/call", json!({"name":"no_such_tool"}))
        .await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let v = c.call_tool(4, "test_sampling", json!({"prompt":7})).await;
    assert_eq!(v["error"]["code"], -32602, "wrong argument type: {v}");
    let v = c
        .request(5, "tools/list", json!({"cursor":"garbage"}))
        .await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let (s, v) = post(
        &url,
        &[
            JSON,
            ACCEPT,
            ("mcp-session-id", "nope"),
            ("mcp-protocol-version", LEGACY),
        ],
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let (s, _) = post(
        &url,
        &[
            JSON,
            ACCEPT,
            ("mcp-session-id", &c.session),
            ("mcp-protocol-version", "1999-01-01"),
        ],
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = post(
        &url,
        &[JSON, ACCEPT],
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    )
    .await;
    assert_eq!(s, 400, "a legacy request without a session");

    // Stateless: unknown method is HTTP 404 with -32601; missing _meta is 400 with -32602.
    let http = reqwest::Client::new();
    let r = stateless(&http, &url, 9, "no/such/method", json!({}), json!({})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32601);
    let (s, v) = post(
        &url,
        &[
            JSON,
            ACCEPT,
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/list"),
        ],
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{}}"#,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_i64(), v["id"].as_i64()),
        (400, Some(-32602), Some(3)),
        "{v}"
    );

    // The server is still healthy after all that.
    let ok = reqwest::get(format!("http://127.0.0.1:{}/healthz", h.port))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let log = std::fs::read_to_string(&h.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_rebinding_protection() {
    let (_dir, h) = start(&[]).await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    for foreign in [
        ("host", "evil.example.com"),
        ("origin", "http://evil.example.com"),
    ] {
        let (s, _) = post(&h.url(), &[JSON, ACCEPT, foreign], body).await;
        assert_eq!(s, 403, "{foreign:?}");
    }
    let (s, _) = post(
        &h.url(),
        &[
            JSON,
            ACCEPT,
            ("origin", &format!("http://localhost:{}", h.port)),
        ],
        body,
    )
    .await;
    assert_ne!(s, 403);
    drop(h);
    // A configured host name is accepted.
    let (_dir, h) = start(&["--allowed-hosts", "mcp.internal,localhost"]).await;
    let init = json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":LEGACY,"capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let (s, _) = post(
        &h.url(),
        &[JSON, ACCEPT, ("host", "mcp.internal:443")],
        init.to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = post(
        &h.url(),
        &[JSON, ACCEPT, ("host", "127.0.0.1")],
        init.to_string(),
    )
    .await;
    assert_eq!(s, 403, "127.0.0.1 is not in the configured list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lifecycle_and_methods() {
    let (_dir, h) = start(&[]).await;
    let c = Legacy::connect(&h.url()).await;
    assert_eq!(c.request(1, "ping", json!({})).await["result"], json!({}));
    assert_eq!(
        c.request(2, "logging/setLevel", json!({"level":"warning"}))
            .await["result"],
        json!({})
    );
    // GET without a session, and GET in the stateless era, are refused.
    let r = reqwest::Client::new()
        .get(h.url())
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = reqwest::Client::new()
        .get(h.url())
        .header("accept", "text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // HEAD is answered as GET is (without a body) and leaves the session as it was.
    let r = reqwest::Client::new()
        .head(h.url())
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &c.session)
        .header("mcp-protocol-version", LEGACY)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 405);
    assert_eq!(c.request(3, "ping", json!({})).await["result"], json!({}));
    // DELETE ends the session everywhere.
    let r = c.delete().await;
    assert_eq!(r.status(), 200);
    let r = c
        .post_raw(json!({"jsonrpc":"2.0","id":4,"method":"ping"}))
        .await;
    assert_eq!(r.status(), 404);
    let r = reqwest::Client::new()
        .delete(h.url())
        .header("mcp-session-id", &c.session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_walks_every_item_once() {
    let (_dir, h) = start(&["--page-size", "7"]).await;
    let c = Legacy::connect(&h.url()).await;
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for i in 0..100 {
        let params = match &cursor {
            Some(c) => json!({"cursor": c}),
            None => json!({}),
        };
        let v = c.request(10 + i, "tools/list", params).await;
        let tools = v["result"]["tools"].as_array().unwrap();
        assert!(tools.len() <= 7);
        names.extend(tools.iter().map(|t| t["name"].as_str().unwrap().to_owned()));
        match v["result"]["nextCursor"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => break,
        }
    }
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), names.len());
    assert!(names.len() > 14, "{names:?}");
    assert_eq!(names[0], "test_simple_text");
    // The stateless era pages the same way and carries cache hints.
    let http = reqwest::Client::new();
    let r: Value = stateless(&http, &h.url(), 1, "tools/list", json!({}), json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["result"]["tools"].as_array().unwrap().len(), 7);
    assert!(r["result"]["nextCursor"].is_string());
    assert!(r["result"]["ttlMs"].is_u64());
    assert_eq!(r["result"]["resultType"], "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_to_client_requests_cross_a_real_round_trip() {
    // Legacy sampling: the request goes out on the POST stream, the answer comes back in a
    // separate POST and reaches the waiting tool through the store.
    let (_dir, h) = start(&[]).await;
    let c = Legacy::connect(&h.url()).await;
    let r = c.post_raw(json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"test_sampling","arguments":{"prompt":"hello"}}})).await;
    let mut sse = common::SseReader::new(r);
    let mut answered = false;
    while let Some(e) = sse.next().await {
        let v = e.json();
        if v["method"] == "sampling/createMessage" {
            assert_eq!(v["params"]["messages"][0]["content"]["text"], "hello");
            let reply = json!({"jsonrpc":"2.0","id":v["id"],"result":{"role":"assistant","content":{"type":"text","text":"from the client"},"model":"m"}});
            assert_eq!(c.post_raw(reply).await.status(), 202);
            answered = true;
        } else if v["id"] == 5 {
            assert!(answered);
            assert!(
                v["result"]["content"][0]["text"]
                    .as_str()
                    .unwrap()
                    .contains("from the client"),
                "{v}"
            );
            return;
        }
    }
    panic!("no final response");
}

/// Thousands of requests answered as live streams leave the change hub as it was: each
/// request's topics (its cancellation, its stream) go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_requests_leave_no_topic_in_the_change_hub() {
    let (_dir, h) = start(&[]).await;
    let topics = || async {
        h.status().await["hub_topics"]
            .as_u64()
            .expect("hub_topics in the status")
    };
    let c = Legacy::connect(&h.url()).await;
    let baseline = topics().await;
    let n = 2000;
    let mut running = futures::stream::iter(0..n)
        .map(|i| {
            let c = &c;
            async move {
                c.call_tool(10 + i, "test_tool_with_progress", json!({}))
                    .await
            }
        })
        .buffer_unordered(16);
    let mut answered = 0;
    while let Some(v) = running.next().await {
        assert!(v["result"].is_object(), "{v}");
        answered += 1;
    }
    assert_eq!(answered, n);
    // The last requests' topics go as their streams end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut now = topics().await;
    while now > baseline && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        now = topics().await;
    }
    assert_eq!(now, baseline, "topics left after {n} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_answers_readyz_503_until_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Haven::start(
        &dir.path().join("data"),
        free_port(),
        "default",
        &["--drain-timeout", "60s"],
    )
    .await;
    let client = reqwest::Client::new();
    // A stateless call that runs 4 s, with progress: its first progress notification says
    // that it runs.
    let r = client
        .post(h.url())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "sleep")
        .body(
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
            "name":"sleep","arguments":{"seconds":4},
            "_meta":{
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "haven-test", "version": "1"},
                "progressToken": "drain"
            }}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut sse = common::SseReader::new(r);
    loop {
        let e = sse.next().await.expect("the call's stream ended early");
        if !e.data.is_empty() && e.json()["method"] == "notifications/progress" {
            break;
        }
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &h.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let call = tokio::spawn(async move {
        let mut last = None;
        while let Some(e) = sse.next().await {
            if !e.data.is_empty() {
                last = Some(e.json());
            }
        }
        let _ = done_tx.send(true);
        last
    });
    // While the call runs, every /readyz is answered 503 "draining" (not refused). Each
    // check on a new connection, as a load balancer's health check does: a keep-alive
    // connection opened just before the drain began is closed after its answer, and a
    // client that reused it would see that close, not the node's readiness.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let readyz = format!("http://127.0.0.1:{}/readyz", h.port);
    let mut draining_answers = 0;
    while !*done.borrow() {
        match client.get(&readyz).send().await {
            Ok(r) => {
                assert_eq!(r.status(), 503);
                assert!(r.headers().contains_key("retry-after"));
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["status"], "draining", "{v}");
                draining_answers += 1;
            }
            // A connection accepted just before the drain reached the listener is closed
            // with the others before its request was read (in cluster mode the drain first
            // tells the region, which widens that window): the next check opens another.
            Err(_) if draining_answers == 0 => {}
            // The listener closes only after the call's answer went out; the answer may
            // still be on its way to this client (on a loaded machine, for seconds). That it
            // arrives is checked below: a listener closed while the call still ran would end
            // its stream without it.
            Err(_) => break,
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let last = call.await.unwrap();
    assert!(
        draining_answers > 0,
        "no /readyz answered while draining; the call's last event: {last:?}"
    );
    let last = last.expect("the call was answered");
    assert!(last["result"].is_object(), "{last}");
    // Then the node stops.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(s) = h.child.try_wait().unwrap() {
            assert!(s.success(), "{s}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node did not stop"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
