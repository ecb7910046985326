//! Real upstream MCP servers for federation tests, on 127.0.0.1 only, stopped when dropped:
//! `@modelcontextprotocol/server-everything` (Node; bound to loopback by `loopback.cjs`) and a
//! Python FastMCP server (tests/upstreams/fastmcp_upstream.py), plus the admin API and CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::cluster::tools_dir;
use super::{Haven, free_port};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Node binary of the tools folder.
pub fn node() -> PathBuf {
    tools_dir().join("node22/node_modules/.bin/node")
}

/// Entry point of server-everything.
pub fn everything_js() -> PathBuf {
    tools_dir()
        .join("everything/node_modules/@modelcontextprotocol/server-everything/dist/index.js")
}

/// The preload that binds Node servers to loopback.
pub fn loopback_cjs() -> PathBuf {
    repo().join("tests/upstreams/loopback.cjs")
}

/// The FastMCP test server script.
pub fn fastmcp_py() -> PathBuf {
    repo().join("tests/upstreams/fastmcp_upstream.py")
}

/// The venv's Python.
pub fn python() -> PathBuf {
    tools_dir().join("venv/bin/python")
}

/// Fails with a clear message when the tools are missing.
pub fn require_tools() {
    for p in [node(), everything_js(), python()] {
        assert!(
            p.exists(),
            "{} is missing: run scripts/install-tools (or scripts/test)",
            p.display()
        );
    }
}

/// The command line of server-everything over stdio, for `haven registry add NAME -- ...`.
pub fn everything_stdio_command() -> Vec<String> {
    vec![
        node().display().to_string(),
        "--require".into(),
        loopback_cjs().display().to_string(),
        everything_js().display().to_string(),
        "stdio".into(),
    ]
}

/// A test upstream process, killed when dropped.
pub struct Upstream {
    pub child: Child,
    pub port: u16,
}

impl Upstream {
    /// The MCP endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    /// server-everything over Streamable HTTP on a free loopback port (or `port`).
    pub async fn everything_http(port: Option<u16>) -> Upstream {
        let port = port.unwrap_or_else(free_port);
        let mut command = Command::new(node());
        command
            .arg("--require")
            .arg(loopback_cjs())
            .arg(everything_js())
            .arg("streamableHttp")
            .env("PORT", port.to_string());
        Upstream::serve(command, port, "server-everything").await
    }

    /// The FastMCP test server over Streamable HTTP on a free loopback port.
    pub async fn fastmcp_http() -> Upstream {
        let port = free_port();
        let mut command = Command::new(python());
        command.arg(fastmcp_py()).args(["http", &port.to_string()]);
        Upstream::serve(command, port, "the FastMCP server").await
    }

    /// Starts `command` (no stdio) and waits until it listens on `port`.
    async fn serve(mut command: Command, port: u16, what: &str) -> Upstream {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let u = Upstream { child, port };
        u.wait_listening().await;
        u
    }

    async fn wait_listening(&self) {
        let listening = haven_testkit::wait_listening(self.port, Duration::from_secs(60)).await;
        assert!(
            listening,
            "upstream on port {} did not start listening",
            self.port
        );
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Calls the node's admin API; returns status and JSON body.
pub async fn admin(
    h: &Haven,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let token = std::fs::read_to_string(h.data.join("admin.token")).unwrap();
    let mut req = reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:{}{path}", h.port))
        .bearer_auth(token.trim());
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Runs `haven ARGS... --node URL --data DIR` (with `stdin` piped in, if any).
pub fn cli(h: &Haven, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut c = Command::new(super::haven_bin());
    // Options go before a trailing `-- COMMAND...`.
    let (head, tail) = match args.iter().position(|a| *a == "--") {
        Some(i) => (&args[..i], &args[i..]),
        None => (args, &[][..]),
    };
    c.args(head)
        .args(["--node", &format!("http://127.0.0.1:{}", h.port), "--data"])
        .arg(&h.data)
        .args(tail)
        .env_remove("HAVEN_ADMIN_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("running the haven CLI");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// `cli` that must succeed; returns stdout.
pub fn cli_ok(h: &Haven, args: &[&str], stdin: Option<&str>) -> String {
    let out = cli(h, args, stdin);
    assert!(
        out.status.success(),
        "haven {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Pids of the direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The fields after the command name (which may contain spaces) start after ")".
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let state = fields.first().copied().unwrap_or("");
        if fields.get(1).and_then(|f| f.parse::<u32>().ok()) == Some(pid) && state != "Z" {
            out.push(p);
        }
    }
    out
}

/// The command line of a process.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}
