//! Cluster benchmarks, on loopback with real processes (nats-server and HAProxy from
//! scripts/install-tools):
//!
//! - `failover`: three nats-servers, three Haven nodes on them, HAProxy in front. Each round
//!   kills one node with SIGKILL and measures, as a client sees it, the time from the kill to
//!   the first successful `tools/call` through HAProxy; then restarts the node.
//! - `throughput`: `mcp-load` against the region (3 nodes, or `--nodes`) through HAProxy and
//!   against one node on the embedded store, in alternating rounds of the same run; medians
//!   and the ratio.
//! - `takeover`: each round starts a long idempotent call (`sleep` with a progress token) on one
//!   node and kills that node with SIGKILL; the client resumes through HAProxy. Measures the
//!   time from the kill to the first event of the call's re-run and to its final result.
//! - `faults`: clients keep making calls (long idempotent `sleep` calls and quick `notes_put`
//!   writes, both answered as stored SSE streams) through HAProxy while one fault after another
//!   hits the region at random (seeded): kill -9 and restart of a Haven node, SIGSTOP/SIGCONT
//!   of a Haven node, kill -9 and restart of a nats-server (the stream leader or another). Then
//!   every request's stored stream is read back and its final responses counted: exactly one
//!   each, reported as a histogram.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use haven_bench::{LoadFlags, haven_serve, mcp_load, median, wait_ready};
use haven_testkit::SseReader;
use haven_testkit::{Process, free_port};

#[derive(Parser)]
#[command(
    about = "Haven cluster benchmarks: node failover time, takeover time, region throughput, and one final answer per request under random faults"
)]
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
    /// Time from the kill of the node running an idempotent call to its re-run's result.
    Takeover {
        /// Kills (one node each, round robin).
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Length of the `sleep` call (its re-run takes this long too).
        #[arg(long, default_value_t = 2)]
        seconds: u64,
    },
    /// Random faults under load, then a count of final answers per request.
    Faults {
        /// How many faults.
        #[arg(long, default_value_t = 200)]
        faults: usize,
        /// Seed of the fault schedule and of the clients' choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Clients making long idempotent calls.
        #[arg(long, default_value_t = 4)]
        long_clients: usize,
        /// Clients making quick writes.
        #[arg(long, default_value_t = 2)]
        quick_clients: usize,
        /// Stop injecting faults after this many minutes even if fewer were done.
        #[arg(long, default_value_t = 40)]
        max_minutes: u64,
        /// Keep the region's data directories and logs (always kept when a check fails).
        #[arg(long)]
        keep: bool,
    },
    /// Throughput of the region against one embedded node.
    Throughput {
        /// Rounds; each loads both setups once, in alternating order.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        #[command(flatten)]
        load: LoadFlags,
        /// Call notes_put (a durable write) instead of echo.
        #[arg(long)]
        notes_put: bool,
        /// Haven nodes of the region (1 to 3; the NATS cluster has three servers).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
        nodes: u8,
    },
}

struct Region {
    nats: haven_testkit::NatsCluster,
    nodes: Vec<Option<Process>>,
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
        Region::start_with(haven, tools, 3).await
    }

    /// Three nats-servers, `nodes` Haven nodes on them, HAProxy in front.
    async fn start_with(haven: &Path, tools: &Path, nodes: usize) -> anyhow::Result<Region> {
        let dir = tempfile::tempdir()?;
        // Nodes of one region share their secrets keys: one key file for all three.
        let made = std::process::Command::new(haven)
            .args(["secrets", "new-key", "--key-file"])
            .arg(dir.path().join("secrets.key"))
            .status()
            .context("running haven secrets new-key")?;
        if !made.success() {
            bail!("haven secrets new-key failed: {made}");
        }
        let nats = haven_testkit::NatsCluster::start_in(tools).await;
        let store = nats.store_url();
        let ports = haven_testkit::free_ports(nodes);
        let mut region = Region {
            nats,
            nodes: (0..nodes).map(|_| None).collect(),
            ports,
            store,
            haven: haven.to_owned(),
            dir,
            _proxy: None,
            proxy_port: 0,
        };
        for i in 0..nodes {
            region.start_node(i).await?;
        }
        let proxy = haven_testkit::Proxy::start(&region.ports).await;
        region.proxy_port = proxy.port;
        region._proxy = Some(proxy);
        Ok(region)
    }

    async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let data = self.dir.path().join(format!("node{i}"));
        let child = haven_serve(&self.haven, self.ports[i], &data)
            .args([
                "--store",
                &self.store,
                "--region",
                "bench",
                "--node-id",
                &format!("node{i}"),
                "--secrets-key-file",
            ])
            .arg(self.dir.path().join("secrets.key"))
            .env("HAVEN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log_file(i)?)
            .spawn()
            .context("starting haven")?;
        self.nodes[i] = Some(Process(child));
        wait_ready(self.ports[i], "haven").await.with_context(|| {
            let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            format!(
                "node{i}'s log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    /// Node `i`'s log (every process of node `i` appends to it).
    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}.log"))
    }

    fn log_file(&self, i: usize) -> anyhow::Result<std::fs::File> {
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?)
    }

    /// How many lines of every node's log contain `needle`.
    fn count_logged(&self, needle: &str) -> usize {
        (0..self.ports.len())
            .map(|i| {
                std::fs::read_to_string(self.log_path(i))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/mcp", self.ports[i])
    }

    fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.proxy_port)
    }

    /// `/admin/v1/status` of node `i`.
    async fn status(&self, i: usize) -> Option<serde_json::Value> {
        self.nodes[i].as_ref()?;
        let token =
            std::fs::read_to_string(self.dir.path().join(format!("node{i}/admin.token"))).ok()?;
        reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/admin/v1/status",
                self.ports[i]
            ))
            .bearer_auth(token.trim())
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// The nats-server leading the region's stream, as a running node reports it.
    async fn stream_leader(&self) -> Option<usize> {
        for i in 0..self.ports.len() {
            if let Some(st) = self.status(i).await
                && let Some(l) = st["store"]["leader"].as_str()
            {
                return self.nats.index_of(l);
            }
        }
        None
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) of node `i`.
    fn stop(&self, i: usize, stop: bool) {
        if let Some(p) = &self.nodes[i] {
            let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: a plain kill(2) of a child process this program started and still owns.
            unsafe {
                libc::kill(p.0.id() as libc::pid_t, sig);
            }
        }
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
        median(&times),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    Ok(())
}

fn load(load_bin: &Path, url: &str, flags: &LoadFlags, notes_put: bool) -> anyhow::Result<f64> {
    let mut args = flags.mcp_load_args(url);
    if notes_put {
        args.push("--notes-put".into());
    }
    Ok(mcp_load(load_bin, &args)?.rps)
}

async fn throughput(
    haven: &Path,
    tools: &Path,
    rounds: usize,
    flags: &LoadFlags,
    notes_put: bool,
    nodes: usize,
) -> anyhow::Result<()> {
    let load_bin = haven.parent().context("binary directory")?.join("mcp-load");
    let region = Region::start_with(haven, tools, nodes).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let _single = Process(haven_serve(haven, port, &dir.path().join("single")).spawn()?);
    wait_ready(port, "haven").await?;
    let region_url = format!("http://127.0.0.1:{}/mcp", region.proxy_port);
    let single_url = format!("http://127.0.0.1:{port}/mcp");
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (r, s) = if round % 2 == 0 {
            let r = load(&load_bin, &region_url, flags, notes_put)?;
            let s = load(&load_bin, &single_url, flags, notes_put)?;
            (r, s)
        } else {
            let s = load(&load_bin, &single_url, flags, notes_put)?;
            let r = load(&load_bin, &region_url, flags, notes_put)?;
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
        "| {nodes} node{} on a 3-server NATS cluster, through HAProxy | {:.0} |",
        if nodes == 1 { "" } else { "s" },
        median(&a)
    );
    println!(
        "| 1 node on the embedded store, direct | {:.0} |",
        median(&b)
    );
    println!(
        "\nratio region/embedded: median {:.3} over {rounds} rounds",
        median(&ratios)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A legacy-era MCP client with resumable SSE streams (takeover and faults).
// ---------------------------------------------------------------------------------------------

const LEGACY: &str = "2025-11-25";
const RERUN: &str = "running an interrupted idempotent tool call again";
const SETTLED: &str = "ended the stream of an interrupted request";
const LOST: &str = "this node lost a request it was running";
const REFUSED: &str = "a write of a handler was refused";

fn is_response_to(v: &serde_json::Value, id: i64) -> bool {
    v.get("id") == Some(&serde_json::json!(id))
        && (v.get("result").is_some() || v.get("error").is_some())
}

fn is_response(v: &serde_json::Value) -> bool {
    v.get("method").is_none() && (v.get("result").is_some() || v.get("error").is_some())
}

/// `initialize` + `notifications/initialized`; the session id.
async fn initialize(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(serde_json::json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":LEGACY,"capabilities":{},"clientInfo":{"name":"cluster-bench","version":"1"}}}).to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    if r.status() != 200 {
        bail!("initialize: {}", r.status());
    }
    let session = r
        .headers()
        .get("mcp-session-id")
        .context("no session id")?
        .to_str()?
        .to_owned();
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", LEGACY)
        .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    if r.status() != 202 {
        bail!("notifications/initialized: {}", r.status());
    }
    Ok(session)
}

/// `initialize`, retried until it works or `within` passes.
async fn initialize_retrying(
    client: &reqwest::Client,
    url: &str,
    within: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    loop {
        match initialize(client, url).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// `request`, in the legacy-era session `session`.
fn in_session(request: reqwest::RequestBuilder, session: &str) -> reqwest::RequestBuilder {
    request
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", LEGACY)
}

/// GET with `Last-Event-ID`: the stream after `last_event_id`.
async fn resume(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    last_event_id: &str,
) -> Option<SseReader> {
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        in_session(client.get(url), session)
            .header("accept", "text/event-stream")
            .header("last-event-id", last_event_id)
            .send(),
    )
    .await
    .ok()?
    .ok()?;
    (r.status() == 200).then(|| SseReader::new(r))
}

/// What became of one request, as its client saw it.
#[derive(Default)]
struct Seen {
    /// The stream id, once the priming event arrived.
    stream: Option<String>,
    /// Why it never got a stream (HTTP status or transport error), if so.
    refused: Option<String>,
    /// Every event with data the client received, by index.
    events: Vec<(u64, String)>,
    /// Final responses received (over all connections).
    finals: usize,
    /// Whether the final was an error.
    final_error: bool,
    /// When the first event of a re-run arrived (a progress 0 after the first one).
    rerun_at: Option<Instant>,
    /// When the final response arrived.
    final_at: Option<Instant>,
}

/// Sends a tools/call to `url` and reads its SSE answer until the final response, resuming at
/// `resume_url` whenever the connection ends or stays silent for `idle`; `on_open` runs once
/// the stream's first progress notification (or, without one, its priming event) arrived.
#[allow(clippy::too_many_arguments)]
async fn call_streamed(
    client: &reqwest::Client,
    url: &str,
    resume_url: &str,
    session: &str,
    id: i64,
    params: serde_json::Value,
    accept: &str,
    idle: Duration,
    deadline: Instant,
    on_open: impl FnOnce(),
) -> Seen {
    let mut seen = Seen::default();
    let body = serde_json::json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":params});
    let sent = tokio::time::timeout(
        Duration::from_secs(30),
        in_session(client.post(url), session)
            .header("content-type", "application/json")
            .header("accept", accept)
            .body(body.to_string())
            .send(),
    )
    .await;
    let r = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            seen.refused = Some(format!("transport: {e}"));
            return seen;
        }
        Err(_) => {
            seen.refused = Some("no answer within 30 s".into());
            return seen;
        }
    };
    let is_sse = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if r.status() != 200 || !is_sse {
        seen.refused = Some(format!("HTTP {}", r.status()));
        return seen;
    }
    let mut sse = Some(SseReader::new(r));
    let mut last_id = String::new();
    let mut on_open = Some(on_open);
    let mut progress_zero = 0;
    while Instant::now() < deadline {
        let Some(s) = sse.as_mut() else {
            sse = resume(client, resume_url, session, &last_id).await;
            if sse.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            continue;
        };
        let e = match tokio::time::timeout(idle, s.next()).await {
            Ok(Some(e)) => e,
            _ => {
                sse = None;
                if seen.stream.is_none() {
                    // The connection ended before the stream was known: nothing to resume.
                    seen.refused = Some("connection lost before the priming event".into());
                    return seen;
                }
                continue;
            }
        };
        if let Some(i) = &e.id {
            last_id = i.clone();
            if seen.stream.is_none() {
                seen.stream = i.rsplit_once('-').map(|(s, _)| s.to_owned());
            }
        }
        if e.data.is_empty() {
            if params["_meta"]["progressToken"].is_null()
                && let Some(f) = on_open.take()
            {
                f();
            }
            continue;
        }
        let v = e.json();
        if v["method"] == "notifications/progress" && v["params"]["progress"].as_f64() == Some(0.0)
        {
            progress_zero += 1;
            if progress_zero == 1 {
                if let Some(f) = on_open.take() {
                    f();
                }
            } else if seen.rerun_at.is_none() {
                seen.rerun_at = Some(Instant::now());
            }
        }
        if let Some(i) = e.index() {
            seen.events.push((i, e.data.clone()));
        }
        if is_response_to(&v, id) {
            seen.finals += 1;
            seen.final_error = v.get("error").is_some();
            seen.final_at = Some(Instant::now());
            return seen;
        }
    }
    seen
}

/// A request's stored stream read back from a node: the number of final responses in it, its
/// events by index, and whether it ended (nothing in flight any more).
struct StoredStream {
    finals: usize,
    events: Vec<(u64, String)>,
    ended: bool,
}

/// Reads a stream back from `url`: from `<stream>-0` until it ends, then once more after its
/// last event (anything there, e.g. a second final, counts too).
async fn read_back(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    stream: &str,
    id: i64,
    within: Duration,
) -> StoredStream {
    let deadline = Instant::now() + within;
    let mut events: Vec<(u64, String)> = Vec::new();
    let mut ended = false;
    let mut after_end = false;
    while Instant::now() < deadline {
        let after = events.last().map_or(0, |e| e.0);
        let Some(mut sse) = resume(client, url, session, &format!("{stream}-{after}")).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut closed = false;
        let mut got = 0;
        while let Ok(next) = tokio::time::timeout(Duration::from_secs(10), sse.next()).await {
            match next {
                Some(e) if !e.data.is_empty() => {
                    if let Some(i) = e.index() {
                        events.push((i, e.data));
                        got += 1;
                    }
                }
                Some(_) => {}
                None => {
                    closed = true;
                    break;
                }
            }
        }
        let has_final = events
            .iter()
            .any(|(_, d)| is_response(&serde_json::from_str(d).unwrap_or_default()));
        if closed && has_final {
            if after_end && got == 0 {
                ended = true;
                break;
            }
            // Read once more from the last event: nothing may follow.
            after_end = true;
        }
    }
    let finals = events
        .iter()
        .filter(|(_, d)| is_response_to(&serde_json::from_str(d).unwrap_or_default(), id))
        .count();
    StoredStream {
        finals,
        events,
        ended,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn distribution(label: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        v.len(),
        v.first().copied().unwrap_or(f64::NAN),
        median(&v),
        percentile(&v, 90.0),
        v.last().copied().unwrap_or(f64::NAN),
    );
}

async fn takeover(haven: &Path, tools: &Path, kills: usize, seconds: u64) -> anyhow::Result<()> {
    let mut region = Region::start(haven, tools).await?;
    let client = reqwest::Client::new();
    let proxy = region.proxy_url();
    let (mut to_rerun, mut to_final) = (Vec::new(), Vec::new());
    for round in 0..kills {
        let victim = round % 3;
        let url = region.url(victim);
        let session = initialize_retrying(&client, &url, Duration::from_secs(30)).await?;
        let killed_at = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
        let params = serde_json::json!({"name":"sleep","arguments":{"seconds":seconds},"_meta":{"progressToken":format!("k{round}")}});
        // The node dies as soon as the call runs there (its first progress notification).
        let on_open = {
            let killed_at = killed_at.clone();
            let node = region.nodes[victim].take();
            move || {
                drop(node); // SIGKILL and reap
                *killed_at.lock().unwrap() = Some(Instant::now());
            }
        };
        let seen = call_streamed(
            &client,
            &url,
            &proxy,
            &session,
            1,
            params,
            "application/json, text/event-stream",
            Duration::from_secs(10),
            Instant::now() + Duration::from_secs(120),
            on_open,
        )
        .await;
        let killed = killed_at
            .lock()
            .unwrap()
            .context("the call never started on the node")?;
        if seen.finals != 1 || seen.final_error {
            bail!(
                "round {round}: the call's final: {} (error: {}), refused: {:?}",
                seen.finals,
                seen.final_error,
                seen.refused
            );
        }
        let rerun = seen
            .rerun_at
            .context("no re-run event arrived")?
            .duration_since(killed)
            .as_secs_f64();
        let fin = seen.final_at.unwrap().duration_since(killed).as_secs_f64();
        println!(
            "round {round}: killed node{victim}; re-run's first event after {rerun:.2} s, result after {fin:.2} s"
        );
        to_rerun.push(rerun);
        to_final.push(fin);
        region.start_node(victim).await?;
    }
    let reruns = region.count_logged(RERUN);
    let settled = region.count_logged(SETTLED);
    println!(
        "\ntakeover of an idempotent call after kill -9 of its node ({kills} kills, `sleep` {seconds} s, client resuming through HAProxy; seconds):\n"
    );
    println!(
        "| measured from the kill to | n | min | median | p90 | max |\n|---|---|---|---|---|---|"
    );
    distribution("the re-run's first event at the client", to_rerun);
    distribution("the call's final result at the client", to_final);
    println!("\nnodes logged {reruns} re-runs and {settled} interrupted-error settlements");
    Ok(())
}

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A duration uniformly in [lo, hi) milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// One request of the faults run, as its client saw it.
struct Record {
    kind: &'static str,
    session: String,
    id: i64,
    seen: Seen,
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    kind: &'static str,
    n: usize,
    seed: u64,
    proxy: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<Record> {
    let client = reqwest::Client::new();
    let mut rng = Rng((seed ^ (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
    let mut out = Vec::new();
    let mut session = None;
    let mut id = 0i64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let s = match &session {
            Some(s) => s,
            None => match initialize(&client, &proxy).await {
                Ok(s) => session.insert(s),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        id += 1;
        let (params, accept) = if kind == "long" {
            let seconds = 1 + rng.below(4);
            (
                serde_json::json!({"name":"sleep","arguments":{"seconds":seconds},"_meta":{"progressToken":format!("{kind}{n}-{id}")}}),
                "application/json, text/event-stream",
            )
        } else {
            // A client that takes only SSE: the answer is a stored stream, whose finals can be
            // counted afterwards.
            (
                serde_json::json!({"name":"notes_put","arguments":{"name":format!("{kind}{n}-{id}"),"text":"x"}}),
                "text/event-stream",
            )
        };
        let seen = call_streamed(
            &client,
            &proxy,
            &proxy,
            s,
            id,
            params,
            accept,
            Duration::from_secs(8),
            Instant::now() + Duration::from_secs(240),
            || {},
        )
        .await;
        if seen.refused.as_deref().is_some_and(|r| r.contains("404")) {
            session = None; // the session is gone (never expected): start another
        }
        let refused = seen.refused.is_some();
        out.push(Record {
            kind,
            session: session.clone().unwrap_or_default(),
            id,
            seen,
        });
        let pause = if refused {
            200
        } else if kind == "long" {
            rng.below(300)
        } else {
            100 + rng.below(200)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    out
}

/// Injects up to `count` random faults (fewer if `limit` passes first) into the region, one
/// after another; returns how many of each kind and in all.
async fn inject(
    region: &mut Region,
    rng: &mut Rng,
    count: usize,
    limit: Duration,
) -> anyhow::Result<(std::collections::BTreeMap<&'static str, usize>, usize)> {
    let started = Instant::now();
    let mut done: std::collections::BTreeMap<&'static str, usize> = Default::default();
    let mut injected = 0;
    while injected < count && started.elapsed() < limit {
        tokio::time::sleep(rng.millis(300, 1500)).await;
        let what = match rng.below(10) {
            // kill -9 of a Haven node, restarted at once or after the heartbeat TTL.
            0..=3 => {
                let i = rng.below(3) as usize;
                region.nodes[i] = None;
                tokio::time::sleep(rng.millis(100, 7000)).await;
                region.start_node(i).await?;
                "kill -9 + restart of a Haven node"
            }
            // SIGSTOP of a Haven node, shorter or longer than the TTL.
            4..=6 => {
                let i = rng.below(3) as usize;
                region.stop(i, true);
                tokio::time::sleep(rng.millis(500, 10_000)).await;
                region.stop(i, false);
                "SIGSTOP/SIGCONT of a Haven node"
            }
            // kill -9 of a nats-server: the stream leader or any.
            _ => {
                let leader = rng.below(2) == 0;
                let i = match region.stream_leader().await {
                    Some(l) if leader => l,
                    _ => rng.below(3) as usize,
                };
                let was_leader = region.stream_leader().await == Some(i);
                region.nats.kill9(i);
                tokio::time::sleep(rng.millis(100, 3000)).await;
                region.nats.restart(i).await;
                if was_leader {
                    "kill -9 + restart of the NATS stream leader"
                } else {
                    "kill -9 + restart of a NATS follower"
                }
            }
        };
        *done.entry(what).or_default() += 1;
        injected += 1;
        if injected % 10 == 0 {
            eprintln!(
                "{injected} faults in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok((done, injected))
}

/// What the stored streams and the clients' records say, request by request.
#[derive(Default)]
struct Tally {
    /// Requests with a stored stream.
    started: usize,
    by_kind: std::collections::BTreeMap<&'static str, usize>,
    /// Why requests were refused before a stream existed.
    refused: std::collections::BTreeMap<String, usize>,
    /// Final responses stored per request -> requests.
    stored: std::collections::BTreeMap<usize, usize>,
    /// Final responses received per request -> requests.
    received: std::collections::BTreeMap<usize, usize>,
    problems: Vec<String>,
}

impl Tally {
    fn of(records: &[Record], reads: Vec<Option<StoredStream>>) -> Tally {
        let mut t = Tally::default();
        for (r, stored) in records.iter().zip(reads) {
            let (Some(stream), Some(stored)) = (&r.seen.stream, stored) else {
                let why = r.seen.refused.clone().unwrap_or_else(|| "?".into());
                let why = if why.starts_with("transport") {
                    "transport error".to_owned()
                } else {
                    why
                };
                *t.refused.entry(why).or_default() += 1;
                continue;
            };
            t.started += 1;
            *t.by_kind.entry(r.kind).or_default() += 1;
            *t.stored.entry(stored.finals).or_default() += 1;
            *t.received.entry(r.seen.finals).or_default() += 1;
            if stored.finals != 1 || !stored.ended {
                t.problems.push(format!(
                    "{} request {} of session {}, stream {stream}: {} finals stored, ended: {}, client saw {} finals",
                    r.kind, r.id, r.session, stored.finals, stored.ended, r.seen.finals
                ));
            }
            // What the client received was stored as received (stored before sent).
            for (i, data) in &r.seen.events {
                let at_i = stored.events.iter().find(|(j, _)| j == i).map(|(_, d)| d);
                if at_i != Some(data) {
                    t.problems.push(format!(
                        "{} request {} of session {}, stream {stream}: event {i} received but not stored as such; received {data}, stored {at_i:?}",
                        r.kind, r.id, r.session
                    ));
                }
            }
        }
        t
    }
}

#[allow(clippy::too_many_arguments)]
async fn faults(
    haven: &Path,
    tools: &Path,
    count: usize,
    seed: u64,
    long_clients: usize,
    quick_clients: usize,
    max_minutes: u64,
    keep: bool,
) -> anyhow::Result<()> {
    let mut region = Region::start(haven, tools).await?;
    let proxy = region.proxy_url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for (kind, many) in [("long", long_clients), ("quick", quick_clients)] {
        for n in 0..many {
            let client = client_loop(kind, n, seed, proxy.clone(), stop.clone());
            clients.push(tokio::spawn(client));
        }
    }
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let started = Instant::now();
    let limit = Duration::from_secs(max_minutes * 60);
    let (done, injected) = inject(&mut region, &mut rng, count, limit).await?;
    let chaos = started.elapsed();
    // Let the region settle (every node ready), stop the clients once their last calls ended.
    for i in 0..3 {
        wait_ready(region.ports[i], "haven").await?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut records = Vec::new();
    for c in clients {
        records.extend(c.await?);
    }
    // Every request whose stream the client learned: its stored stream read back from a node.
    let client = reqwest::Client::new();
    // Read back concurrently (a few at a time), in the order of the records.
    let reads: Vec<Option<StoredStream>> = {
        use futures::StreamExt;
        let client = &client;
        let region = &region;
        futures::stream::iter(records.iter().enumerate().map(|(k, r)| async move {
            let stream = r.seen.stream.as_ref()?;
            let url = region.url(k % 3);
            Some(
                read_back(
                    client,
                    &url,
                    &r.session,
                    stream,
                    r.id,
                    Duration::from_secs(60),
                )
                .await,
            )
        }))
        .buffered(8)
        .collect()
        .await
    };
    let t = Tally::of(&records, reads);
    println!(
        "\n{injected} faults in {:.0} s (seed {seed}, {long_clients} long-call and {quick_clients} quick-write clients):",
        chaos.as_secs_f64()
    );
    for (what, n) in &done {
        println!("  {n:>4} {what}");
    }
    println!(
        "\nrequests: {} sent, {} with a stored stream ({}), {} refused before a stream existed",
        records.len(),
        t.started,
        t.by_kind
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        records.len() - t.started
    );
    for (why, n) in &t.refused {
        println!("  {n:>6} refused: {why}");
    }
    println!("\n| final responses stored in the request's stream | requests |\n|---|---|");
    for (finals, n) in &t.stored {
        println!("| {finals} | {n} |");
    }
    println!("\n| final responses the client received | requests |\n|---|---|");
    for (finals, n) in &t.received {
        println!("| {finals} | {n} |");
    }
    let finals_error = records
        .iter()
        .filter(|r| r.seen.finals == 1 && r.seen.final_error)
        .count();
    println!(
        "\n{finals_error} finals were errors (interrupted non-re-run requests or store outages); nodes logged {} re-runs, {} interrupted-error settlements, {} lost executions, {} refused handler writes",
        region.count_logged(RERUN),
        region.count_logged(SETTLED),
        region.count_logged(LOST),
        region.count_logged(REFUSED)
    );
    if t.problems.is_empty() {
        println!("\nevery request with a stream has exactly one final response: OK");
        if keep {
            println!("kept {}", region.dir.keep().display());
        }
        Ok(())
    } else {
        for p in t.problems.iter().take(50) {
            println!("VIOLATION: {p}");
        }
        let dir = region.dir.keep();
        println!("logs and data kept in {}", dir.display());
        bail!("{} violations", t.problems.len())
    }
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
        Cmd::Takeover { kills, seconds } => rt.block_on(takeover(&haven, &tools, kills, seconds)),
        Cmd::Faults {
            faults: count,
            seed,
            long_clients,
            quick_clients,
            max_minutes,
            keep,
        } => rt.block_on(faults(
            &haven,
            &tools,
            count,
            seed,
            long_clients,
            quick_clients,
            max_minutes,
            keep,
        )),
        Cmd::Throughput {
            rounds,
            load,
            notes_put,
            nodes,
        } => rt.block_on(throughput(
            &haven,
            &tools,
            rounds,
            &load,
            notes_put,
            usize::from(nodes),
        )),
    }
}
