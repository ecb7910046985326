//! Overhead of federation: `tools/call` of an upstream's `echo` through Haven (`ref__echo`)
//! against calling the same upstream directly, in alternating rounds of one run on loopback.
//!
//! The upstream is the rmcp reference server (`rmcp-reference`, stateless, JSON replies);
//! Haven runs on its embedded store with the upstream registered through the admin API. A third
//! setup, Haven's own `echo`, shows what Haven costs without federation. Every run is
//! `mcp-load` with the same connections and duration; the report gives medians of calls/s and
//! of the median latency, and the ratios federated/direct per round.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use haven_bench::{LoadFlags, haven_serve, mcp_load, median, wait_listening};
use haven_testkit::{Process, free_port};

#[derive(Parser)]
#[command(about = "Overhead of a federated tools/call against calling the upstream directly")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// Rounds; each loads every setup once, in rotating order.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[command(flatten)]
    load: LoadFlags,
}

/// One admin API request to Haven on `port` with the bearer `token`; status and body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&serde_json::Value>,
) -> Option<(u16, String)> {
    let auth = format!("Bearer {token}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let within = Duration::from_secs(5);
    haven_testkit::http_request(port, method, path, &headers, Some(&body), within).await
}

struct Load {
    rps: f64,
    p50_us: f64,
}

fn load(load_bin: &Path, url: &str, tool: &str, cli: &Cli) -> anyhow::Result<Load> {
    let mut args = cli.load.mcp_load_args(url);
    args.extend(["--tool".to_owned(), tool.to_owned()]);
    let report = mcp_load(load_bin, &args)?;
    Ok(Load {
        rps: report.rps,
        p50_us: report.p50_us as f64,
    })
}

/// Registers the upstream on `up_port` as `ref` through Haven's admin API and waits until
/// Haven is connected to it.
async fn register_upstream(port: u16, token: &str, up_port: u16) -> anyhow::Result<()> {
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
    Ok(())
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

    let up_port = free_port();
    let _upstream = Process(
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
    let port = free_port();
    let token = "federation-bench-token-0123456789";
    let _haven = Process(
        haven_serve(&haven, port, &data.path().join("data"))
            .env("HAVEN_ADMIN_TOKEN", token)
            .spawn()
            .with_context(|| format!("starting {}", haven.display()))?,
    );
    wait_listening(port, "haven").await?;
    register_upstream(port, token, up_port).await?;

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
