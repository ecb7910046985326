//! Issue 13 §5 on the real binary: rate limits per client address (a flood from 127.0.0.1 is
//! answered 429 with `Retry-After` while 127.0.0.2 is still served, health endpoints exempt)
//! and per tool, set and changed live through the admin API; request heads over
//! `http.max_header_bytes` or `http.max_headers` are answered 431 and change nothing.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{Haven, free_port};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP client whose connections come from `ip` (any 127.x address is local on Linux).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

/// A stateless-era request.
async fn call(http: &reqwest::Client, h: &Haven, id: i64, method: &str, params: Value) -> Answer {
    let r = common::stateless(http, &h.url(), id, method, params, json!({})).await;
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    Answer {
        status,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

async fn note_exists(http: &reqwest::Client, h: &Haven, name: &str) -> bool {
    let a = call(
        http,
        h,
        90,
        "tools/call",
        json!({"name": "notes_get", "arguments": {"name": name}}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body["result"].is_object(), "{}", a.body);
    a.body["result"]["isError"] != json!(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_gets_429_while_another_address_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let flooder = client_from("127.0.0.1");
    let other = client_from("127.0.0.2");
    // Off by default.
    for i in 0..30 {
        assert_eq!(
            call(&flooder, &h, i, "tools/list", json!({})).await.status,
            200
        );
    }
    h.set_setting("limits.rate.per_ip_burst", json!(5)).await;
    h.set_setting("limits.rate.per_ip_rps", json!(1)).await;
    // A flood: after the burst, refused with Retry-After (bounded: at 1 per second, a
    // thousand requests cannot all pass).
    let mut refused = None;
    for i in 0..1000 {
        let a = call(&flooder, &h, i, "tools/list", json!({})).await;
        if a.status != 200 {
            refused = Some(a);
            break;
        }
    }
    let a = refused.expect("the flood was never refused");
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert_eq!(a.body["error"]["code"], -32000, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.rate.per_ip_rps"),
        "{}",
        a.body
    );
    // A refused tools/call from the flooding address changes nothing.
    let put = call(
        &flooder,
        &h,
        7,
        "tools/call",
        json!({"name": "notes_put", "arguments": {"name": "flood", "text": "x"}}),
    )
    .await;
    assert_eq!(put.status, 429, "{}", put.body);
    // Another address is served, and health endpoints are exempt.
    assert_eq!(
        call(&other, &h, 1, "tools/list", json!({})).await.status,
        200
    );
    assert!(!note_exists(&other, &h, "flood").await);
    for path in ["/healthz", "/readyz"] {
        let r = flooder
            .get(format!("http://127.0.0.1:{}{path}", h.port))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // Turned off live: the flooding address is served again.
    h.set_setting("limits.rate.per_ip_rps", json!(0)).await;
    assert_eq!(
        call(&flooder, &h, 2, "tools/list", json!({})).await.status,
        200
    );

    // A tool's own rate, live: the second notes_put within the minute is refused.
    h.set_setting("limits.rate.tools", json!("notes_put=1/min:1"))
        .await;
    let put = |name: &str| json!({"name": "notes_put", "arguments": {"name": name, "text": "x"}});
    let a = call(&other, &h, 3, "tools/call", put("first")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = call(&other, &h, 4, "tools/call", put("second")).await;
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.body["id"], 4, "{}", a.body);
    let secs: u64 = a.retry_after.unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    assert!(note_exists(&other, &h, "first").await);
    assert!(!note_exists(&other, &h, "second").await);
    // A bad value is refused and changes nothing.
    let token = std::fs::read_to_string(h.data.join("admin.token")).unwrap();
    let r = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/admin/v1/config/limits.rate.tools",
            h.port
        ))
        .bearer_auth(token.trim())
        .json(&json!({ "value": "notes_put=fast" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
}

/// Sends `head` (and no body) on a new connection; returns what came back until the server
/// closed it (empty when it closed without an answer).
async fn raw(h: &Haven, head: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
        .await
        .unwrap();
    // The server may answer and close before it read everything: a failed write is fine.
    let _ = s.write_all(head).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A stateless `notes_put` of `name` with `extra` header lines, as raw HTTP.
fn put_request(port: u16, name: &str, extra: &str) -> Vec<u8> {
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
        "name":"notes_put","arguments":{"name":name,"text":"x"},
        "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                 "io.modelcontextprotocol/clientCapabilities":{}}}})
    .to_string();
    format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n\
         accept: application/json, text/event-stream\r\nmcp-protocol-version: 2026-07-28\r\n\
         mcp-method: tools/call\r\nmcp-name: notes_put\r\nconnection: close\r\n{extra}\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused_with_431_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = Haven::start(&dir.path().join("data"), free_port(), "default", &[]).await;
    let http = reqwest::Client::new();
    let big = format!("x-filler: {}\r\n", "a".repeat(20_000));
    let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    // Within the defaults (64 KiB, 100 headers) both are served.
    let a = raw(&h, &put_request(h.port, "big-ok", &big)).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let a = raw(&h, &put_request(h.port, "many-ok", &many)).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    // Lowered live (for new connections): refused, nothing written.
    h.set_setting("http.max_header_bytes", json!(8192)).await;
    let a = raw(&h, &put_request(h.port, "big", &big)).await;
    assert!(a.is_empty() || a.starts_with("HTTP/1.1 431"), "{a}");
    h.set_setting("http.max_headers", json!(20)).await;
    let a = raw(&h, &put_request(h.port, "many", &many)).await;
    assert!(a.is_empty() || a.starts_with("HTTP/1.1 431"), "{a}");
    assert!(note_exists(&http, &h, "big-ok").await);
    assert!(note_exists(&http, &h, "many-ok").await);
    assert!(!note_exists(&http, &h, "big").await);
    assert!(!note_exists(&http, &h, "many").await);
    // An ordinary request is still served.
    let a = raw(&h, &put_request(h.port, "small", "")).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
}
