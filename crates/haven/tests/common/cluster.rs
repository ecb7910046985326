//! A region on loopback: three nats-server processes in one JetStream cluster, Haven nodes on
//! it, and HAProxy in front (the processes come from `haven-testkit`). Every process is
//! stopped when its handle is dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use haven_testkit::{NatsCluster, Proxy, http_status, tools_dir};
use serde_json::Value;

use super::{Haven, free_port};

/// Region tests run one at a time: each starts seven processes, and the machine may have two
/// cores.
pub static ONE_REGION_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a Haven node of region `r1` on the cluster.
pub async fn haven_node(
    nats: &NatsCluster,
    data: &Path,
    port: u16,
    node: &str,
    extra: &[&str],
) -> Haven {
    haven_node_env(nats, data, port, node, extra, &[]).await
}

/// Like [`haven_node`], with extra environment variables for the process.
pub async fn haven_node_env(
    nats: &NatsCluster,
    data: &Path,
    port: u16,
    node: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> Haven {
    let store = nats.store_url();
    let mut args = vec![
        "--store",
        store.as_str(),
        "--region",
        "r1",
        "--node-id",
        node,
    ];
    args.extend_from_slice(extra);
    Haven::start_env(data, port, "default", &args, env).await
}

/// `haven status` asking node `n` (its admin token from its data directory).
pub fn haven_status(n: &Haven) -> std::process::Output {
    std::process::Command::new(super::haven_bin())
        .args([
            "status",
            "--node",
            &format!("http://127.0.0.1:{}", n.port),
            "--data",
        ])
        .arg(&n.data)
        .output()
        .unwrap()
}

/// Three nats-servers, three Haven nodes (`node0`..`node2`) on them, HAProxy in front.
/// Fields are dropped in order: the proxy, the nodes, then NATS and the data directories.
pub struct Region {
    pub proxy: Proxy,
    pub nodes: Vec<Option<Haven>>,
    pub nats: NatsCluster,
    pub ports: Vec<u16>,
    pub dirs: tempfile::TempDir,
    pub extra: Vec<String>,
    /// Extra environment of each node's process (kept for restarts).
    pub env: Vec<Vec<(String, String)>>,
}

impl Region {
    pub async fn start() -> Region {
        Region::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Region {
        Region::start_custom(extra, vec![Vec::new(); 3]).await
    }

    /// A region whose node `i` runs with the environment `env[i]` added.
    pub async fn start_custom(extra: &[&str], env: Vec<Vec<(String, String)>>) -> Region {
        assert_eq!(env.len(), 3);
        let nats = NatsCluster::start().await;
        let dirs = tempfile::tempdir().unwrap();
        let ports = haven_testkit::free_ports(3);
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let data = dirs.path().join(format!("node{i}"));
            nodes.push(Some(
                haven_node_env(&nats, &data, *p, &format!("node{i}"), extra, &env[i]).await,
            ));
        }
        let proxy = Proxy::start(&ports).await;
        Region {
            proxy,
            nodes,
            nats,
            ports,
            dirs,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env,
        }
    }

    pub async fn restart_node(&mut self, i: usize) {
        let data = self.dirs.path().join(format!("node{i}"));
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.nodes[i] = Some(
            haven_node_env(
                &self.nats,
                &data,
                self.ports[i],
                &format!("node{i}"),
                &extra,
                &self.env[i],
            )
            .await,
        );
    }

    pub fn index_of_node(&self, name: &str) -> usize {
        name.trim_start_matches("node").parse().unwrap()
    }

    /// The MCP endpoint of node `i` itself (not through the proxy).
    pub fn node_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/mcp", self.ports[i])
    }

    /// `kill -9` of node `i`; its handle is gone.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut n) = self.nodes[i].take() {
            n.kill9();
        }
    }

    /// The log file of node `i` (every process that ran as node `i` appends to it).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dirs
            .path()
            .join(format!("node{i}"))
            .with_extension(format!("{}.log", self.ports[i]))
    }

    /// The log lines of node `i`, without terminal colour codes.
    pub fn log_lines(&self, i: usize) -> Vec<String> {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        text.lines().map(strip_ansi).collect()
    }

    /// How many log lines of each node contain every one of `needles`.
    pub fn count_logged(&self, needles: &[&str]) -> Vec<usize> {
        (0..self.ports.len())
            .map(|i| {
                self.log_lines(i)
                    .iter()
                    .filter(|l| needles.iter().all(|n| l.contains(n)))
                    .count()
            })
            .collect()
    }

    /// `/admin/v1/status` of node `i`.
    pub async fn node_status(&self, i: usize) -> Option<Value> {
        let n = self.nodes[i].as_ref()?;
        let token = std::fs::read_to_string(n.data.join("admin.token")).ok()?;
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/admin/v1/status", n.port))
            .bearer_auth(token.trim())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        r.json::<Value>().await.ok()
    }

    /// `/admin/v1/status` of the first node that answers.
    pub async fn status(&self) -> Value {
        for i in 0..self.nodes.len() {
            if let Some(v) = self.node_status(i).await {
                return v;
            }
        }
        panic!("no node answered /admin/v1/status");
    }

    /// The index of the nats-server that leads the region's stream, as the nodes report it
    /// (waits, bounded, while the stream has no leader).
    pub async fn stream_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.status().await;
            if let Some(i) = st["store"]["leader"]
                .as_str()
                .and_then(|l| self.nats.index_of(l))
            {
                return i;
            }
            assert!(Instant::now() < deadline, "the stream has no leader: {st}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `/readyz` of every running node answers `status`.
    pub async fn wait_readyz(&self, status: u16, within: Duration) {
        let deadline = Instant::now() + within;
        for n in self.nodes.iter().flatten() {
            loop {
                let got = http_status(n.port, "/readyz").await;
                if got == Some(status) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "/readyz of the node on port {} answers {got:?}, not {status}",
                    n.port
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

impl Drop for Region {
    /// A failed test keeps the region's data directories and logs, and says where.
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(fresh) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.dirs, fresh).keep();
            eprintln!("the region's data and logs are kept in {}", kept.display());
        }
    }
}

/// A log line without ANSI escape sequences (the text log format colours field names).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
