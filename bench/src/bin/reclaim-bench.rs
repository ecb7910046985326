//! The throughput cost of storage reclamation: serving throughput of `haven serve` under an
//! overwrite load (`notes_put` of one note: every call supersedes the previous version, so
//! reclamation has one entry to remove per call) with reclamation every 5 s (the default)
//! against reclamation put off (`storage.reclaim_interval_ms` at 24 h), backups shipping
//! every second in both (the reclaimer's floor moves with them). Fresh processes, the two
//! configurations alternating in order, in one run; reports medians and the ratio.
//! `--nats`: on a three-server JetStream cluster started for the run (a fresh region per
//! process), where the trimming node removes the stream's messages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use haven_backup::BackupKey;
use haven_bench::{LoadFlags, haven_serve, mcp_load, median, wait_ready};
use haven_testkit::{NatsCluster, Process, free_port};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Haven: serving throughput with storage reclamation on against put off")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// Rounds; each runs both configurations once, in alternating order.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Use a JetStream cluster started for the run instead of the embedded store.
    #[arg(long)]
    nats: bool,
    #[command(flatten)]
    load: LoadFlags,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

/// Starts a node with backups every second and `storage.reclaim_interval_ms` at
/// `interval_ms`, and waits until the reclaimer has slept through its first interval (so
/// that the setting is the one it uses).
async fn start(
    bin: &Path,
    dir: &Path,
    key: &Path,
    nats: Option<(&NatsCluster, String)>,
    interval_ms: u64,
) -> anyhow::Result<(Process, u16)> {
    let port = free_port();
    let data = dir.join("data");
    let mut cmd = haven_serve(bin, port, &data);
    cmd.arg("--backup-url")
        .arg(dir.join("backup"))
        .arg("--backup-key-file")
        .arg(key)
        .args(["--backup-interval", "1s"]);
    if let Some((n, region)) = nats {
        cmd.args(["--store", &n.store_url(), "--region", &region]);
        cmd.env(
            "HAVEN_SECRETS_KEYS",
            "bench AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
    }
    let server = Process(cmd.spawn().context("starting haven")?);
    wait_ready(port, "haven").await?;
    let token = std::fs::read_to_string(data.join("admin.token"))?;
    let r = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{port}/admin/v1/config/storage.reclaim_interval_ms"
        ))
        .bearer_auth(token.trim())
        .json(&json!({ "value": interval_ms }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("setting the reclamation interval: HTTP {}", r.status());
    }
    // The first sleep used the default (5 s); after it the setting is in force.
    tokio::time::sleep(Duration::from_secs(6)).await;
    Ok((server, port))
}

async fn removed(port: u16, data: &Path) -> anyhow::Result<(u64, Value)> {
    let token = std::fs::read_to_string(data.join("admin.token"))?;
    let s: Value = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/admin/v1/status"))
        .bearer_auth(token.trim())
        .send()
        .await?
        .json()
        .await?;
    Ok((
        s["reclamation"]["removed"]["log_entries"]
            .as_u64()
            .unwrap_or(0),
        s["store"].clone(),
    ))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let bin_dir = me.parent().context("binary directory")?;
    let haven = cli
        .haven_bin
        .clone()
        .unwrap_or_else(|| bin_dir.join("haven"));
    let load = bin_dir.join("mcp-load");
    let keydir = tempfile::tempdir()?;
    let key = keydir.path().join("key");
    haven_bench::write_private(&key, &BackupKey::generate().to_hex())?;
    let nats = if cli.nats {
        Some(NatsCluster::start().await)
    } else {
        None
    };
    let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    // The server's CPU time per call, and its ratio off/on: what reclamation adds to each
    // call's cost, less sensitive to other work on a shared machine than calls per second.
    let (mut cpu_on, mut cpu_off, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..cli.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut rps = [0.0f64; 2];
        let mut cpu = [0.0f64; 2];
        for reclaim in order {
            let dir = tempfile::tempdir()?;
            let interval = if reclaim { 5_000 } else { 86_400_000 };
            let region = nats
                .as_ref()
                .map(|n| (n, format!("reclaim-{round}-{}", u8::from(reclaim))));
            let (server, port) = start(&haven, dir.path(), &key, region, interval).await?;
            let mut args = cli
                .load
                .mcp_load_args(&format!("http://127.0.0.1:{port}/mcp"));
            args.extend(["--notes-put".into(), "--server-pid".into()]);
            args.push(server.0.id().to_string());
            let report = mcp_load(&load, &args)?;
            let r = report.rps;
            cpu[usize::from(reclaim)] = report.server_cpu_us_per_req.unwrap_or(f64::NAN);
            // Let a pass run after the load, to show what reclamation removed.
            tokio::time::sleep(Duration::from_secs(if reclaim { 7 } else { 1 })).await;
            let (gone, store) = removed(port, &dir.path().join("data")).await?;
            drop(server);
            rps[usize::from(reclaim)] = r;
            let held = match store.get("messages") {
                Some(m) => format!(", the stream holds {m} of {} messages", store["last_seq"]),
                None => String::new(),
            };
            println!(
                "round {round}: reclamation {}: {r:.0} calls/s, {:.0} µs of server CPU per call ({gone} entries removed{held})",
                if reclaim { "on " } else { "off" },
                cpu[usize::from(reclaim)]
            );
        }
        off.push(rps[0]);
        on.push(rps[1]);
        ratios.push(rps[1] / rps[0]);
        cpu_off.push(cpu[0]);
        cpu_on.push(cpu[1]);
        cpu_ratios.push(cpu[0] / cpu[1]);
    }
    drop(nats);
    let (m_on, m_off, m_ratio) = (median(&on), median(&off), median(&ratios));
    println!();
    println!(
        "| store | reclamation off (calls/s, median) | reclamation on | ratio on/off (median of rounds) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| {} | {m_off:.0} | {m_on:.0} | {m_ratio:.3} |",
        if cli.nats { "JetStream" } else { "embedded" }
    );
    println!("per-round ratios: {ratios:.3?}");
    println!(
        "server CPU per call: off {:.0} µs, on {:.0} µs (medians); ratio off/on {:.3} (median of rounds; per round {cpu_ratios:.3?})",
        median(&cpu_off),
        median(&cpu_on),
        median(&cpu_ratios)
    );
    Ok(())
}
