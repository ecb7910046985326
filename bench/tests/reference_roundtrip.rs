//! Functional checks of the harness client against the rmcp reference server (no timing).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_bench::Era;
use haven_bench::client::{ClientOptions, McpConnection, ResponseKind, Target};

/// A reference server process, killed when dropped.
struct Reference {
    child: Child,
    url: String,
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(mode: &str, response: &str) -> Reference {
    let port = haven_testkit::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_rmcp-reference"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--mode", mode, "--response", response, "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rmcp-reference");
    let reference = Reference {
        child,
        url: format!("http://127.0.0.1:{port}/mcp"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "reference server never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reference
}

async fn connect(url: &str, era: Era) -> anyhow::Result<McpConnection> {
    let target = Arc::new(Target::resolve(url).await?);
    let options = Arc::new(ClientOptions {
        era,
        text: "hello \"bench\"".into(),
        allow_sessionless: false,
        notes_put: false,
        echo_tool: "echo".into(),
        headers: Vec::new(),
    });
    McpConnection::connect(target, options).await
}

#[tokio::test]
async fn stateful_reference_serves_both_eras() {
    let server = start("stateful", "json").await;

    let mut modern = connect(&server.url, Era::Modern).await.unwrap();
    for _ in 0..3 {
        assert_eq!(modern.call_echo().await.unwrap(), ResponseKind::Json);
    }
    assert!(modern.session_id().is_none());
    modern.close().await;

    let mut legacy = connect(&server.url, Era::Legacy).await.unwrap();
    assert!(legacy.session_id().is_some());
    for _ in 0..3 {
        // rmcp answers legacy session requests with SSE whatever json_response says.
        assert_eq!(legacy.call_echo().await.unwrap(), ResponseKind::Sse);
    }
    legacy.close().await;
}

#[tokio::test]
async fn stateless_reference_answers_sse_without_json_response() {
    let server = start("stateless", "sse").await;
    let mut modern = connect(&server.url, Era::Modern).await.unwrap();
    assert_eq!(modern.call_echo().await.unwrap(), ResponseKind::Sse);
    modern.close().await;

    // Without sessions rmcp issues no Mcp-Session-Id, which the legacy client refuses.
    let err = connect(&server.url, Era::Legacy)
        .await
        .err()
        .expect("no session");
    assert!(format!("{err:#}").contains("Mcp-Session-Id"), "{err:#}");
}
