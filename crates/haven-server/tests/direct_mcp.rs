//! `/mcp` answered without the router (`haven_server::app`, what `haven serve` runs) answers
//! exactly as the router's `/mcp` route does: the same requests, sent over real connections
//! to one listener serving the app and one serving the router alone, get the same status,
//! the same headers Haven sets and the same body. Other paths go through the router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use haven_catalogs::DefaultCatalog;
use haven_mcp::engine::{Engine, EngineConfig};
use haven_mcp::keyring::{KekSource, Secrets};
use haven_server::{App, HttpConfig, app, router, serve};
use haven_state::{HybridClock, Origin, RedbStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Served {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    async fn start(app: App) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, app, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Served {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the server stops")
            .unwrap();
    }
}

async fn engine(dir: &std::path::Path) -> Engine {
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(
            dir,
            Origin::new("r1", "n1"),
            Arc::new(HybridClock::default()),
        )
        .unwrap(),
    );
    let secrets = Secrets::open(store.clone(), KekSource::generated()).unwrap();
    let config = EngineConfig {
        node_id: "n1".into(),
        ..EngineConfig::default()
    };
    Engine::start(store, Arc::new(DefaultCatalog::new()), config, secrets)
        .await
        .unwrap()
}

/// What an answer says, less what may differ between two nodes (dates, session ids).
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) and reads the whole answer.
async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> Answer {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    head.push_str(body);
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut raw))
        .await
        .expect("the answer ends")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .filter(|(k, _)| k != "date" && k != "mcp-session-id")
        .collect();
    headers.sort();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

const JSON: &str = "content-type: application/json";
const ACCEPT: &str = "accept: application/json, text/event-stream";
const STATELESS: &str = "mcp-protocol-version: 2026-07-28";

fn stateless_call(name: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"{name}","arguments":{{"text":"hi"}},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
    )
}

#[tokio::test]
async fn mcp_without_the_router_answers_as_the_route_does() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let direct = Served::start(app(engine(d1.path()).await, HttpConfig::default())).await;
    let routed = Served::start(router(engine(d2.path()).await, HttpConfig::default()).into()).await;

    let echo = stateless_call("echo");
    let unknown = stateless_call("no_such_tool");
    let legacy_init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let mcp_echo = ["mcp-method: tools/call", "mcp-name: echo"];
    let cases: Vec<(&str, &str, Vec<&str>, &str)> = vec![
        // A stateless call, and one the engine refuses.
        (
            "POST",
            "/mcp",
            vec![JSON, ACCEPT, STATELESS, mcp_echo[0], mcp_echo[1]],
            &echo,
        ),
        (
            "POST",
            "/mcp",
            vec![
                JSON,
                ACCEPT,
                STATELESS,
                "mcp-method: tools/call",
                "mcp-name: no_such_tool",
            ],
            &unknown,
        ),
        // A legacy session opened (its id differs between the nodes and is left out).
        ("POST", "/mcp", vec![JSON, ACCEPT], legacy_init),
        // The checks: media type (415), accept (406), malformed JSON (400), a header twice.
        (
            "POST",
            "/mcp",
            vec!["content-type: text/plain", ACCEPT, STATELESS],
            &echo,
        ),
        (
            "POST",
            "/mcp",
            vec![JSON, "accept: image/png", STATELESS],
            &echo,
        ),
        ("POST", "/mcp", vec![JSON, ACCEPT], "{not json"),
        (
            "POST",
            "/mcp",
            vec![JSON, ACCEPT, STATELESS, STATELESS],
            &echo,
        ),
        // GET, HEAD and DELETE without a session; any other method is 405 whatever its headers.
        ("GET", "/mcp", vec!["accept: text/event-stream"], ""),
        ("HEAD", "/mcp", vec!["accept: text/event-stream"], ""),
        ("DELETE", "/mcp", vec![], ""),
        ("PUT", "/mcp", vec!["content-type: text/plain"], "x"),
        ("PATCH", "/mcp", vec![], ""),
        // Other paths go through the router.
        ("GET", "/healthz", vec![], ""),
        ("GET", "/readyz", vec![], ""),
        ("GET", "/mcp/", vec![], ""),
        ("GET", "/nowhere", vec![], ""),
    ];
    for (method, path, headers, body) in &cases {
        let a = send(direct.addr, method, path, headers, body).await;
        let b = send(routed.addr, method, path, headers, body).await;
        assert_eq!(a, b, "{method} {path} {headers:?}");
        if *path == "/mcp" {
            assert!(
                a.headers.contains(&("x-haven-node".into(), "n1".into())),
                "{method} {path}: {a:?}"
            );
        }
    }
    // The call itself was answered.
    let a = send(
        direct.addr,
        "POST",
        "/mcp",
        &[JSON, ACCEPT, STATELESS, mcp_echo[0], mcp_echo[1]],
        &echo,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains(r#""text":"hi""#), "{a:?}");
    direct.stop().await;
    routed.stop().await;
}
