//! Cluster benchmarks, on loopback with real processes (nats-server and HAProxy from
//! scripts/install-tools):
//!
//! - `failover`: three nats-servers, three Haven nodes on them, HAProxy in front. Each round
//!   kills one node with SIGKILL and measures, as a client sees it, the time from the kill to
//!   the first successful `tools/call` through HAProxy; then restarts the node.
//! - `throughput`: `mcp-load` against the 3-node region through HAProxy and against one node
//!   on the embedded store, in alternating rounds of the same run; medians and the ratio.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Haven cluster benchmarks: node failover time and region throughput")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long, global = true)]
    haven_bin: Option<PathBuf>,
    /// Tools folder with venv/bin/nats-server [default: .tools of the repository]
    #[arg(long, global = true)]
    tools: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Node failover time through HAProxy.
    Failover {
        /// Kills (one node each, round robin).
        #[arg(long, default_value_t = 9)]
        rounds: usize,
    },
    /// Throughput of the region against one embedded node.
    Throughput {
        /// Rounds; each loads both setups once, in alternating order.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Measured seconds per run.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Concurrent connections of the load generator.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Call notes_put (a durable write) instead of echo.
        #[arg(long)]
        notes_put: bool,
    },
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn wait_status(port: u16, path: &str, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(port, path).await != Some(200) {
        if Instant::now() > deadline {
            bail!("{what} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

struct Region {
    _nats: haven_testkit::NatsCluster,
    nodes: Vec<Option<Proc>>,
    ports: Vec<u16>,
    store: String,
    haven: PathBuf,
    dir: tempfile::TempDir,
    _proxy: Option<haven_testkit::Proxy>,
    proxy_port: u16,
}

impl Region {
    /// Three nats-servers (`haven-testkit`), three Haven nodes on them, HAProxy in front.
    async fn start(haven: &Path, tools: &Path) -> anyhow::Result<Region> {
        let dir = tempfile::tempdir()?;
        let nats = haven_testkit::NatsCluster::start_in(tools).await;
        let store = nats.store_url();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut region = Region {
            _nats: nats,
            nodes: vec![None, None, None],
            ports,
            store,
            haven: haven.to_owned(),
            dir,
            _proxy: None,
            proxy_port: 0,
        };
        for i in 0..3 {
            region.start_node(i).await?;
        }
        let proxy = haven_testkit::Proxy::start(&region.ports).await;
        region.proxy_port = proxy.port;
        region._proxy = Some(proxy);
        Ok(region)
    }

    async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let child = Command::new(&self.haven)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.ports[i]),
                "--data",
            ])
            .arg(self.dir.path().join(format!("node{i}")))
            .args([
                "--store",
                &self.store,
                "--region",
                "bench",
                "--node-id",
                &format!("node{i}"),
            ])
            .env("HAVEN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haven")?;
        self.nodes[i] = Some(Proc(child));
        wait_status(self.ports[i], "/readyz", "haven").await
    }
}

const CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/clientInfo":{"name":"bench","version":"1"}}}}"#;

/// One stateless echo call through a fresh connection; true on a 200 with a result.
async fn call_once(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: echo\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{CALL}",
        CALL.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.1 200") && text.contains("\"result\"")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

async fn failover(haven: &Path, tools: &Path, rounds: usize) -> anyhow::Result<()> {
    let mut region = Region::start(haven, tools).await?;
    let mut times = Vec::new();
    for round in 0..rounds {
        let i = round % 3;
        for _ in 0..20 {
            if !call_once(region.proxy_port).await {
                bail!("the region does not answer before the kill");
            }
        }
        let killed = Instant::now();
        region.nodes[i] = None; // SIGKILL and reap
        // As a client: call until a call succeeds (every call is a new connection, so HAProxy
        // picks a node for each).
        let mut first = None;
        let mut failures = 0;
        while first.is_none() {
            if call_once(region.proxy_port).await {
                first = Some(killed.elapsed());
            } else {
                failures += 1;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no successful call within 60 s of the kill");
            }
        }
        // A few more calls: the next one may reach a node that HAProxy has not marked down.
        let mut worst = first.unwrap();
        for _ in 0..10 {
            let t = Instant::now();
            while !call_once(region.proxy_port).await {
                failures += 1;
            }
            worst = worst.max(killed.elapsed().min(t.elapsed() + first.unwrap()));
        }
        let ms = first.unwrap().as_secs_f64() * 1000.0;
        println!(
            "round {round}: killed node{i}; first successful call after {ms:.1} ms ({failures} failed calls)"
        );
        times.push(ms);
        region.start_node(i).await?;
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "\nnode failover as a client sees it (kill -9 to the first successful call through HAProxy): median {:.1} ms, min {:.1} ms, max {:.1} ms over {rounds} kills",
        median(times),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    Ok(())
}

fn load(
    load_bin: &Path,
    url: &str,
    duration: f64,
    connections: usize,
    notes_put: bool,
) -> anyhow::Result<f64> {
    let mut cmd = Command::new(load_bin);
    cmd.args([
        "--url",
        url,
        "--era",
        "2026",
        "--connections",
        &connections.to_string(),
        "--duration",
        &duration.to_string(),
        "--warmup",
        "1",
    ]);
    if notes_put {
        cmd.arg("--notes-put");
    }
    let out = cmd.output().context("running mcp-load")?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("mcp-load: {line} {}", String::from_utf8_lossy(&out.stderr)))?;
    if v["errors"].as_u64() != Some(0) {
        bail!("load errors: {v}");
    }
    Ok(v["rps"].as_f64().unwrap_or(0.0))
}

async fn throughput(
    haven: &Path,
    tools: &Path,
    rounds: usize,
    duration: f64,
    connections: usize,
    notes_put: bool,
) -> anyhow::Result<()> {
    let load_bin = haven.parent().context("binary directory")?.join("mcp-load");
    let region = Region::start(haven, tools).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let _single = Proc(
        Command::new(haven)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(dir.path().join("single"))
            .env("HAVEN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_status(port, "/readyz", "haven").await?;
    let region_url = format!("http://127.0.0.1:{}/mcp", region.proxy_port);
    let single_url = format!("http://127.0.0.1:{port}/mcp");
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (r, s) = if round % 2 == 0 {
            let r = load(&load_bin, &region_url, duration, connections, notes_put)?;
            let s = load(&load_bin, &single_url, duration, connections, notes_put)?;
            (r, s)
        } else {
            let s = load(&load_bin, &single_url, duration, connections, notes_put)?;
            let r = load(&load_bin, &region_url, duration, connections, notes_put)?;
            (r, s)
        };
        println!("round {round}: region {r:.0} calls/s, one embedded node {s:.0} calls/s");
        a.push(r);
        b.push(s);
        ratios.push(r / s);
    }
    let tool = if notes_put { "notes_put" } else { "echo" };
    println!("\n| setup | median calls/s ({tool}) |\n|---|---|");
    println!(
        "| 3 nodes on a 3-server NATS cluster, through HAProxy | {:.0} |",
        median(a)
    );
    println!(
        "| 1 node on the embedded store, direct | {:.0} |",
        median(b)
    );
    println!(
        "\nratio region/embedded: median {:.3} over {rounds} rounds",
        median(ratios)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let me = std::env::current_exe()?;
    let haven = cli
        .haven_bin
        .unwrap_or_else(|| me.parent().unwrap().join("haven"));
    let tools = cli
        .tools
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Failover { rounds } => rt.block_on(failover(&haven, &tools, rounds)),
        Cmd::Throughput {
            rounds,
            duration,
            connections,
            notes_put,
        } => rt.block_on(throughput(
            &haven,
            &tools,
            rounds,
            duration,
            connections,
            notes_put,
        )),
    }
}
