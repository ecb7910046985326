//! Helpers for tests that run the real `haven` binary on loopback.

#![allow(dead_code, unused_imports)]

pub mod auth;
pub mod cluster;
pub mod prometheus;
pub mod upstreams;

/// Key-encryption key every test node on a shared (NATS) store gets through
/// HAVEN_SECRETS_KEYS: nodes of one region must share their secrets keys.
pub const TEST_SECRETS_KEYS: &str = "test QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

/// The `haven` binary the tests start: this build's, or the one `HAVEN_TEST_BINARY` names
/// (to run the same tests against another build, e.g. to show that a test fails on an
/// earlier version).
pub fn haven_bin() -> std::path::PathBuf {
    std::env::var_os("HAVEN_TEST_BINARY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_haven").into())
}

/// A running `haven serve`, killed when dropped.
pub struct Haven {
    pub child: Child,
    pub port: u16,
    pub data: PathBuf,
    pub log: PathBuf,
}

impl Drop for Haven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use haven_testkit::free_port;

/// Writes a key file readable only by its owner (0600), as Haven requires of key files.
pub fn write_key_file(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::write(path, content).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// Where a node lives across restarts: a data directory (in a temporary directory that goes
/// away with this) and a port.
pub struct Home {
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        Home {
            data: dir.path().join("data"),
            _dir: dir,
            port: free_port(),
        }
    }

    /// Starts (again) the node that lives here, as [`Haven::start`].
    pub async fn start(&self, catalog: &str, extra: &[&str]) -> Haven {
        Haven::start(&self.data, self.port, catalog, extra).await
    }
}

impl Haven {
    /// Sets a runtime setting through the admin API, then waits (bounded) until the node has
    /// applied it: settings reach the engine through the store's change feed.
    pub async fn set_setting(&self, key: &str, value: Value) {
        let token = std::fs::read_to_string(self.data.join("admin.token")).unwrap();
        let token = token.trim().to_owned();
        let http = reqwest::Client::new();
        let port = self.port;
        let r = http
            .put(format!("http://127.0.0.1:{port}/admin/v1/config/{key}"))
            .bearer_auth(&token)
            .json(&json!({ "value": value }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        let applied = haven_testkit::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(10),
            || async {
                let v: Value = http
                    .get(format!("http://127.0.0.1:{port}/admin/v1/config"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v["in_force"]["values"][key] == value
            },
        )
        .await;
        assert!(applied, "{key} was not applied within 30 s");
    }

    /// `/admin/v1/status` of this node (its admin token read from the data directory).
    pub async fn status(&self) -> Value {
        self.admin_get("/admin/v1/status").await
    }

    /// GET of the admin API's `path` (e.g. `/admin/v1/status`), as JSON.
    pub async fn admin_get(&self, path: &str) -> Value {
        let token = std::fs::read_to_string(self.data.join("admin.token")).unwrap();
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .bearer_auth(token.trim())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Starts `haven serve` on `port` with `data`, waits until it is ready.
    pub async fn start(data: &Path, port: u16, catalog: &str, extra: &[&str]) -> Haven {
        Haven::start_env(data, port, catalog, extra, &[]).await
    }

    /// Like [`Haven::start`], with extra environment variables for the process.
    pub async fn start_env(
        data: &Path,
        port: u16,
        catalog: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Haven {
        let log = data.with_extension(format!("{port}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        // With HAVEN_TEST_NATS set (scripts/nats-cluster), the same tests run on the
        // JetStream backend: one region per data directory, so tests do not share state.
        let mut store_args: Vec<String> = Vec::new();
        if let Ok(nats) = std::env::var("HAVEN_TEST_NATS")
            && !extra.contains(&"--store")
        {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            data.hash(&mut h);
            store_args = vec![
                "--store".into(),
                nats,
                "--region".into(),
                format!("t{:016x}", h.finish()),
            ];
        }
        let shared_store = !store_args.is_empty()
            || extra
                .windows(2)
                .any(|w| w[0] == "--store" && w[1].starts_with("nats://"));
        let mut command = Command::new(haven_bin());
        if shared_store && !extra.contains(&"--secrets-key-file") {
            command.env("HAVEN_SECRETS_KEYS", TEST_SECRETS_KEYS);
        }
        let child = command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data)
            .args(["--catalog", catalog])
            .args(extra)
            .args(&store_args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HAVEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("starting haven");
        let h = Haven {
            child,
            port,
            data: data.to_owned(),
            log,
        };
        h.wait_ready().await;
        h
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    async fn wait_ready(&self) {
        // A bound against a hang: on a loaded machine a node of a JetStream region that is
        // electing leaders has taken over 30 s to become ready.
        let deadline = Instant::now() + Duration::from_secs(90);
        let client = reqwest::Client::new();
        while Instant::now() < deadline {
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{}/readyz", self.port))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "haven did not become ready; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGSTOP: the process stops running (its connections stay open) until [`Haven::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Haven::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// SIGTERM, then waits (bounded) for the process to exit; returns whether it did.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

/// Runs `command` (to its end) and asserts that it succeeded; its output.
pub fn run_ok(command: &mut Command) -> std::process::Output {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One parsed SSE event, and the reader of a response's events (shared with the benches).
pub use haven_testkit::{SseEvent as Event, SseReader};

/// A legacy-era client on one session.
pub struct Legacy {
    pub client: reqwest::Client,
    pub url: String,
    pub session: String,
}

pub const LEGACY: &str = "2025-11-25";

impl Legacy {
    /// Like [`Legacy::connect`], for a node that may be down: `None` when any step fails.
    pub async fn try_connect(url: &str) -> Option<Legacy> {
        let client = reqwest::Client::new();
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":LEGACY,"capabilities":{"sampling":{},"elicitation":{}},"clientInfo":{"name":"haven-test","version":"1"}}}).to_string())
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        let session = r.headers().get("mcp-session-id")?.to_str().ok()?.to_owned();
        let l = Legacy {
            client,
            url: url.to_owned(),
            session,
        };
        let r = l
            .try_post_raw(json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
            .await
            .ok()?;
        (r.status() == 202).then_some(l)
    }

    pub async fn connect(url: &str) -> Legacy {
        Legacy::try_connect(url)
            .await
            .unwrap_or_else(|| panic!("initialize on {url} failed"))
    }

    pub fn with_url(&self, url: &str) -> Legacy {
        Legacy {
            client: reqwest::Client::new(),
            url: url.to_owned(),
            session: self.session.clone(),
        }
    }

    pub async fn post_raw(&self, body: Value) -> reqwest::Response {
        self.try_post_raw(body).await.unwrap()
    }

    /// Like [`Legacy::post_raw`], with the transport's error instead of a panic.
    pub async fn try_post_raw(&self, body: Value) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", LEGACY)
            .body(body.to_string())
            .send()
            .await
    }

    /// A request; returns the final JSON-RPC response (from JSON or SSE).
    pub async fn request(&self, id: i64, method: &str, params: Value) -> Value {
        let r = self
            .post_raw(json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}))
            .await;
        final_response(r, id).await
    }

    /// Opens the session's standalone GET stream.
    /// Calls the tool `name` with `arguments` (a tools/call request); the answer.
    pub async fn call_tool(&self, id: i64, name: &str, arguments: Value) -> Value {
        let params = json!({ "name": name, "arguments": arguments });
        self.request(id, "tools/call", params).await
    }

    pub async fn open_standalone(&self) -> reqwest::Response {
        self.client
            .get(&self.url)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", LEGACY)
            .send()
            .await
            .unwrap()
    }

    /// DELETE of the session.
    pub async fn delete(&self) -> reqwest::Response {
        self.client
            .delete(&self.url)
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", LEGACY)
            .send()
            .await
            .unwrap()
    }

    pub async fn resume(&self, last_event_id: &str) -> reqwest::Response {
        self.client
            .get(&self.url)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", LEGACY)
            .header("last-event-id", last_event_id)
            .send()
            .await
            .unwrap()
    }
}

/// Like [`final_response`], `None` when the answer breaks off or is no JSON-RPC response.
pub async fn try_final(r: reqwest::Response, id: i64) -> Option<Value> {
    let is_sse = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_sse {
        return r.json().await.ok();
    }
    let mut sse = SseReader::new(r);
    while let Some(e) = sse.next().await {
        let Ok(v) = serde_json::from_str::<Value>(&e.data) else {
            continue;
        };
        if v.get("id") == Some(&json!(id))
            && (v.get("result").is_some() || v.get("error").is_some())
        {
            return Some(v);
        }
    }
    None
}

/// The final response of a request answered with JSON or SSE.
pub async fn final_response(r: reqwest::Response, id: i64) -> Value {
    let is_sse = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
    if !is_sse {
        return r.json().await.unwrap();
    }
    let mut sse = SseReader::new(r);
    while let Some(e) = sse.next().await {
        let v = e.json();
        if v.get("id") == Some(&json!(id))
            && (v.get("result").is_some() || v.get("error").is_some())
        {
            return v;
        }
    }
    panic!("stream ended without the response to {id}");
}

/// A stateless (2026-07-28) request.
pub async fn stateless(
    client: &reqwest::Client,
    url: &str,
    id: i64,
    method: &str,
    params: Value,
    caps: Value,
) -> reqwest::Response {
    try_stateless(client, url, id, method, params, caps)
        .await
        .unwrap()
}

/// A stateless request whose `_meta` also holds `extra` (e.g. a `traceparent`); its JSON
/// answer.
pub async fn stateless_with_meta(
    client: &reqwest::Client,
    url: &str,
    id: i64,
    method: &str,
    params: Value,
    extra: Value,
) -> Value {
    let mut meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "haven-test", "version": "1"}
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        meta[k] = v;
    }
    let mut params = params;
    params["_meta"] = meta;
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = params.get("name").and_then(Value::as_str) {
        req = req.header("mcp-name", n);
    }
    req.body(json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Like [`stateless`], with the transport's error instead of a panic.
pub async fn try_stateless(
    client: &reqwest::Client,
    url: &str,
    id: i64,
    method: &str,
    mut params: Value,
    caps: Value,
) -> reqwest::Result<reqwest::Response> {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": caps,
        "io.modelcontextprotocol/clientInfo": {"name": "haven-test", "version": "1"}
    });
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method);
    if let Some(n) = params
        .get("name")
        .or(params.get("uri"))
        .or(params.get("taskId"))
        .and_then(Value::as_str)
    {
        req = req.header("mcp-name", n);
    }
    req.body(json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string())
        .send()
        .await
}
