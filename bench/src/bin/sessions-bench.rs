//! Idle sessions at scale: the memory one idle legacy session costs a node, and whether a
//! node with many of them still answers as fast.
//!
//! Starts `haven serve` (embedded, or with `--nats` on a three-server JetStream cluster
//! started for the run), measures its resident memory and the latency of stateless `echo`
//! calls, opens `--sessions` legacy sessions (`initialize` and `notifications/initialized`,
//! `--concurrency` at a time) and leaves them idle, then measures both again. Prints the
//! memory per session and the latency medians, before and after.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use haven_bench::{haven_serve, median, rss_kib, wait_ready};
use haven_testkit::{NatsCluster, Process, free_port};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Haven idle sessions: memory per session and latency with many sessions")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// Sessions to open.
    #[arg(long, default_value_t = 100_000)]
    sessions: u64,
    /// Sessions opened at once.
    #[arg(long, default_value_t = 32)]
    concurrency: u64,
    /// Stateless `echo` calls timed before and after (one at a time).
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Use a JetStream cluster started for the run instead of the embedded store.
    #[arg(long)]
    nats: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

/// Median and 99th percentile of `calls` stateless echo calls, in microseconds.
async fn echo_latency(
    http: &reqwest::Client,
    url: &str,
    calls: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut micros = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        let r = http
            .post(url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "echo")
            .json(
                &json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {
                "name": "echo", "arguments": {"text": "x"},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientCapabilities": {},
                    "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"}}}}),
            )
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("echo: HTTP {}", r.status());
        }
        r.bytes().await?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    Ok((
        median(&micros),
        micros[(micros.len() * 99 / 100).min(micros.len() - 1)],
    ))
}

async fn open_session(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let r = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "sessions-bench", "version": "1"}}}),
        )
        .send()
        .await?;
    let Some(session) = r
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        bail!("initialize without a session: HTTP {status}: {body}");
    };
    r.bytes().await?;
    let r = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .header("mcp-session-id", session)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("notifications/initialized: HTTP {}", r.status());
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let haven = cli
        .haven_bin
        .clone()
        .unwrap_or_else(|| me.parent().expect("binary directory").join("haven"));
    let dir = tempfile::tempdir()?;
    let nats = if cli.nats {
        Some(NatsCluster::start().await)
    } else {
        None
    };
    let port = free_port();
    let mut cmd = haven_serve(&haven, port, &dir.path().join("data"));
    if let Some(n) = &nats {
        cmd.args(["--store", &n.store_url(), "--region", "sessions"]);
        cmd.env(
            "HAVEN_SECRETS_KEYS",
            "bench AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
    }
    let server = Process(cmd.spawn().context("starting haven")?);
    wait_ready(port, "haven").await?;
    let pid = server.0.id();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(cli.concurrency as usize)
        .build()?;
    // The node's limit on live sessions (100 000 by default) must leave room for the warm-up's
    // sessions as well as the measured ones.
    let token = std::fs::read_to_string(dir.path().join("data").join("admin.token"))?;
    let r = http
        .put(format!(
            "http://127.0.0.1:{port}/admin/v1/config/limits.max_sessions_per_node"
        ))
        .bearer_auth(token.trim())
        .json(&json!({"value": cli.sessions + 1000}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("raising limits.max_sessions_per_node: HTTP {}", r.status());
    }
    // Warm up (allocator, caches, connections), then the baseline.
    echo_latency(&http, &url, cli.calls).await?;
    for _ in 0..200 {
        open_session(&http, &url).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_kib(pid).unwrap_or(0);
    let before = echo_latency(&http, &url, cli.calls).await?;
    eprintln!(
        "baseline: rss {rss_before} KiB, echo p50 {:.0} us",
        before.0
    );

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..cli.concurrency {
        let (http, url, next) = (http.clone(), url.clone(), next.clone());
        let total = cli.sessions;
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                // A retryable refusal (503: the store was briefly unavailable) is tried
                // again, as a client would; anything else ends the run.
                let mut tries = 0;
                while let Err(e) = open_session(&http, &url).await {
                    tries += 1;
                    if tries > 50 || !e.to_string().contains("HTTP 503") {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    let mut last = Instant::now();
    while workers.iter().any(|w| !w.is_finished()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if last.elapsed() >= Duration::from_secs(10) {
            last = Instant::now();
            eprintln!(
                "{} sessions opened, rss {} KiB",
                next.load(Ordering::Relaxed).min(cli.sessions),
                rss_kib(pid).unwrap_or(0)
            );
        }
    }
    for w in workers {
        w.await??;
    }
    let opened_in = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after = rss_kib(pid).unwrap_or(0);
    let after = echo_latency(&http, &url, cli.calls).await?;
    drop(server);
    drop(nats);

    let per = (rss_after.saturating_sub(rss_before) * 1024) as f64 / cli.sessions as f64;
    println!(
        "{} idle legacy sessions on the {} store, opened in {opened_in:.0} s ({:.0}/s)",
        cli.sessions,
        if cli.nats { "JetStream" } else { "embedded" },
        cli.sessions as f64 / opened_in
    );
    println!();
    println!("| | resident memory | stateless echo p50 | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| before | {:.1} MiB | {:.0} us | {:.0} us |",
        rss_before as f64 / 1024.0,
        before.0,
        before.1
    );
    println!(
        "| with the sessions | {:.1} MiB | {:.0} us | {:.0} us |",
        rss_after as f64 / 1024.0,
        after.0,
        after.1
    );
    println!();
    println!(
        "memory per idle session: {per:.0} bytes; echo p50 with the sessions / before: {:.2}",
        after.0 / before.0
    );
    Ok(())
}
