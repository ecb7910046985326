//! Overhead of federation: `tools/call` of an upstream's `echo` through Haven (`ref__echo`)
//! against calling the same upstream directly, in alternating rounds of one run on loopback.
//!
//! The upstream is the rmcp reference server (`rmcp-reference`, stateless, JSON replies);
//! Haven runs on its embedded store with the upstream registered through the admin API. A third
//! setup, Haven's own `echo`, shows what Haven costs without federation. Every run is
//! `mcp-load` with the same connections and duration; the report gives medians of calls/s and
//! of the median latency, and the ratios federated/direct per round.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use haven_bench::median;

#[derive(Parser)]
#[command(about = "Overhead of a federated tools/call against calling the upstream directly")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// Rounds; each loads every setup once, in rotating order.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 4.0)]
    duration: f64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Protocol era of the client: 2026 (stateless) or legacy.
    #[arg(long, default_value = "2026")]
    era: String,
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

/// One HTTP/1.1 request on loopback (Connection: close); status and body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&serde_json::Value>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

async fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not start listening on {port}")
}

struct Load {
    rps: f64,
    p50_us: f64,
}

fn load(load_bin: &Path, url: &str, tool: &str, cli: &Cli) -> anyhow::Result<Load> {
    let out = Command::new(load_bin)
        .args([
            "--url",
            url,
            "--era",
            &cli.era,
            "--connections",
            &cli.connections.to_string(),
            "--duration",
            &cli.duration.to_string(),
            "--warmup",
            "1",
            "--tool",
            tool,
        ])
        .output()
        .context("running mcp-load")?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("mcp-load: {line} {}", String::from_utf8_lossy(&out.stderr)))?;
    if v["errors"].as_u64() != Some(0) {
        bail!("load errors calling {tool} at {url}: {v}");
    }
    Ok(Load {
        rps: v["rps"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_f64().unwrap_or(0.0),
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let dir_bin = me.parent().context("binary directory")?;
    let haven = cli
        .haven_bin
        .clone()
        .unwrap_or_else(|| dir_bin.join("haven"));
    let load_bin = dir_bin.join("mcp-load");
    let reference = dir_bin.join("rmcp-reference");

    let up_port = free_port()?;
    let _upstream = Proc(
        Command::new(&reference)
            .args([
                "--listen",
                &format!("127.0.0.1:{up_port}"),
                "--mode",
                "stateless",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", reference.display()))?,
    );
    wait_listening(up_port, "rmcp-reference").await?;

    let data = tempfile::tempdir()?;
    let port = free_port()?;
    let token = "federation-bench-token-0123456789";
    let _haven = Proc(
        Command::new(&haven)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
            .arg(data.path().join("data"))
            .env("HAVEN_ADMIN_TOKEN", token)
            .env("HAVEN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", haven.display()))?,
    );
    wait_listening(port, "haven").await?;
    let entry = serde_json::json!({
        "name": "ref",
        "transport": "http",
        "url": format!("http://127.0.0.1:{up_port}/mcp"),
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http(port, "POST", "/admin/v1/registry", token, Some(&entry)).await {
            Some((201, _)) => break,
            other if Instant::now() > deadline => bail!("registering the upstream: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = http(port, "GET", "/admin/v1/registry/ref", token, None)
            .await
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .map(|v| v["status"]["state"].clone());
        if state == Some(serde_json::json!("connected")) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the upstream did not connect: {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let direct = format!("http://127.0.0.1:{up_port}/mcp");
    let through = format!("http://127.0.0.1:{port}/mcp");
    let setups: [(&str, &str, &str); 3] = [
        ("upstream directly (echo)", direct.as_str(), "echo"),
        ("through Haven (ref__echo)", through.as_str(), "ref__echo"),
        ("Haven's own echo (no upstream)", through.as_str(), "echo"),
    ];
    let mut rps = vec![Vec::new(); 3];
    let mut p50 = vec![Vec::new(); 3];
    let mut ratios = Vec::new();
    let mut added_us = Vec::new();
    for round in 0..cli.rounds {
        let mut this = [0.0f64; 3];
        let mut lat = [0.0f64; 3];
        for k in 0..3 {
            let i = (round + k) % 3;
            let (_, url, tool) = setups[i];
            let l = load(&load_bin, url, tool, &cli)?;
            this[i] = l.rps;
            lat[i] = l.p50_us;
        }
        println!(
            "round {round}: direct {:.0}/s (p50 {:.0} us), federated {:.0}/s (p50 {:.0} us), own echo {:.0}/s",
            this[0], lat[0], this[1], lat[1], this[2]
        );
        for i in 0..3 {
            rps[i].push(this[i]);
            p50[i].push(lat[i]);
        }
        ratios.push(this[1] / this[0]);
        added_us.push(lat[1] - lat[0]);
    }
    println!("\n| setup | median calls/s | median p50 latency |\n|---|---|---|");
    for (i, (name, _, _)) in setups.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.0} us |",
            median(&rps[i]),
            median(&p50[i])
        );
    }
    println!(
        "\nfederated/direct throughput ratio: median {:.3} over {} rounds; added median latency {:.0} us",
        median(&ratios),
        cli.rounds,
        median(&added_us)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
}
