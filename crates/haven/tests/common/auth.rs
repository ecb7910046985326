//! Helpers of the authentication and authorization tests: a client that sends a bearer
//! credential, a legacy session of such a client, and the CLI against a data directory.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;

use super::{LEGACY, Legacy, haven_bin};

/// A client that sends `Authorization: Bearer <token>` on every request.
pub fn bearer_client(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(h)
        .build()
        .unwrap()
}

/// An `initialize` of the legacy era by `client`.
pub async fn initialize(client: &reqwest::Client, url: &str) -> reqwest::Response {
    client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":LEGACY,"capabilities":{},"clientInfo":{"name":"auth-test","version":"1"}}}).to_string())
        .send()
        .await
        .unwrap()
}

/// A legacy session of the caller `client` authenticates.
pub async fn session(client: &reqwest::Client, url: &str) -> Legacy {
    let r = initialize(client, url).await;
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    Legacy {
        client: client.clone(),
        url: url.to_owned(),
        session,
    }
}

/// `haven ARGS --data DATA` (the node found through `DATA/admin.url`), its output.
pub fn cli(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(haven_bin())
        .args(args)
        .arg("--data")
        .arg(data)
        .env_remove("HAVEN_ADMIN_TOKEN")
        .env_remove("HAVEN_NODE")
        .env_remove("HAVEN_DATA")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Like [`cli`], which must succeed; its standard output.
pub fn cli_ok(data: &Path, args: &[&str]) -> String {
    let out = cli(data, args);
    assert!(
        out.status.success(),
        "haven {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
