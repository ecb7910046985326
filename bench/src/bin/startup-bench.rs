//! Start-up of a node joining a JetStream region with a long history: how long `haven serve`
//! takes to become ready, and how much memory it holds then, on a stream of `--live` records
//! each written `--versions` times, before and after reclamation trimmed the history.
//!
//! On a three-server JetStream cluster started for the run: a writer (this process, through
//! Haven's store) writes the records in batches of 1000, then `haven serve` starts on the
//! region and is timed until `/readyz` answers 200; then the writer runs reclamation passes
//! (removing every superseded version; no backup, so nothing holds the floor) and is timed,
//! and a node is started and timed again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use haven_bench::{haven_serve, rss_kib};
use haven_state::{Batch, HybridClock, NatsConfig, NatsStore, Origin, Reclaim, Store};
use haven_testkit::{NatsCluster, Process, free_port};

#[derive(Parser)]
#[command(about = "Haven: start-up of a node on a JetStream region with a long history")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// Live records.
    #[arg(long, default_value_t = 1_000_000)]
    live: u64,
    /// Times each record is written (the history holds live × (versions − 1) superseded
    /// entries).
    #[arg(long, default_value_t = 10)]
    versions: u64,
    /// Bytes of each value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Skip starting a node on the whole history before reclamation (only the start-up
    /// after it is measured).
    #[arg(long)]
    no_whole_history: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

/// How a node's start ended.
enum Start {
    /// Ready after this many seconds, holding this much memory (KiB).
    Ready(f64, u64),
    /// The process exited after this many seconds, with the last line it wrote.
    Exited(f64, String),
}

impl Start {
    fn row(&self, what: &str, messages: &str) -> String {
        match self {
            Start::Ready(secs, rss) => format!(
                "| {what} | {messages} | {secs:.1} s | {:.0} MiB |",
                *rss as f64 / 1024.0
            ),
            Start::Exited(secs, line) => {
                format!("| {what} | {messages} | exited after {secs:.1} s: {line} | — |")
            }
        }
    }
}

/// Starts a node on the region and times it until ready (or until it exits, keeping the
/// last line of its log).
async fn node_start(bin: &std::path::Path, nats: &NatsCluster) -> anyhow::Result<Start> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let log = dir.path().join("haven.log");
    let mut cmd = haven_serve(bin, port, &dir.path().join("data"));
    cmd.args(["--store", &nats.store_url(), "--region", "startup"]);
    cmd.env(
        "HAVEN_SECRETS_KEYS",
        "bench AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    cmd.stderr(std::fs::File::create(&log)?);
    let started = Instant::now();
    let mut server = Process(cmd.spawn().context("starting haven")?);
    let deadline = started + Duration::from_secs(900);
    loop {
        if haven_testkit::http_status(port, "/readyz").await == Some(200) {
            let secs = started.elapsed().as_secs_f64();
            let rss = rss_kib(server.0.id()).unwrap_or(0);
            return Ok(Start::Ready(secs, rss));
        }
        if server.0.try_wait()?.is_some() {
            let secs = started.elapsed().as_secs_f64();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let line = text.lines().last().unwrap_or("(nothing)").to_owned();
            return Ok(Start::Exited(secs, line));
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the node did not become ready within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let haven = cli
        .haven_bin
        .clone()
        .unwrap_or_else(|| me.parent().expect("binary directory").join("haven"));
    let nats = NatsCluster::start().await;
    let config = NatsConfig {
        servers: vec![nats.url(0)],
        region: "startup".into(),
        replicas: 3,
        tls: Default::default(),
    };
    let writer = NatsStore::open(
        &config,
        Origin::new("startup", "writer"),
        Arc::new(HybridClock::default()),
    )
    .await?;
    let value = vec![b'x'; cli.value_bytes];
    let started = Instant::now();
    let mut written = 0u64;
    for version in 0..cli.versions {
        let mut next = 0;
        while next < cli.live {
            let end = (next + 1000).min(cli.live);
            let mut batch = Batch::new();
            for i in next..end {
                batch = batch.put("bench", &format!("k{i:08}"), value.clone());
            }
            writer.commit(batch).await?;
            written += end - next;
            next = end;
        }
        eprintln!(
            "version {} of {} written: {written} entries, {:.0} entries/s",
            version + 1,
            cli.versions,
            written as f64 / started.elapsed().as_secs_f64()
        );
    }
    let write_secs = started.elapsed().as_secs_f64();
    let untrimmed = if cli.no_whole_history {
        None
    } else {
        let s = node_start(&haven, &nats).await?;
        eprintln!(
            "node start on the whole history: {}",
            s.row("whole history", &written.to_string())
        );
        Some(s)
    };

    let policy = Reclaim {
        log_floor: u64::MAX,
        now_millis: writer.clock().wall_millis(),
        expired_grace_millis: 60_000,
        tombstone_retention_millis: 7 * 24 * 3_600_000,
        event_retention_millis: 24 * 3_600_000,
        step: 4096,
        trim_log: true,
    };
    let started = Instant::now();
    let mut removed = 0;
    let mut last_report = Instant::now();
    // A step that fails puts back what it did not remove (as the node's reclaimer, which
    // tries again at its next pass); ten failures in a row end the run.
    let (mut failures, mut in_a_row) = (0u64, 0u32);
    loop {
        let r = match writer.reclaim(&policy).await {
            Ok(r) => {
                in_a_row = 0;
                r
            }
            Err(e) if in_a_row < 10 => {
                failures += 1;
                in_a_row += 1;
                eprintln!("a reclamation step failed ({e}); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        removed += r.log_entries;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "trimming: {removed} removed, {:.0}/s",
                removed as f64 / started.elapsed().as_secs_f64()
            );
        }
        if r.done {
            break;
        }
    }
    let trim_secs = started.elapsed().as_secs_f64();
    let trimmed = node_start(&haven, &nats).await?;
    let d = writer.describe().await;
    drop(writer);
    drop(nats);

    println!(
        "{} live records of {} bytes, each written {} times: {written} entries written in {write_secs:.0} s ({:.0}/s)",
        cli.live,
        cli.value_bytes,
        cli.versions,
        written as f64 / write_secs
    );
    println!(
        "reclamation removed {removed} superseded entries in {trim_secs:.0} s ({:.0}/s, {failures} failed steps tried again); the stream holds {} messages of {}",
        removed as f64 / trim_secs,
        d["messages"],
        d["last_seq"]
    );
    println!();
    println!("| stream | messages | node start-up until ready | node memory when ready |");
    println!("|---|---|---|---|");
    if let Some(untrimmed) = &untrimmed {
        println!("{}", untrimmed.row("whole history", &written.to_string()));
    }
    println!(
        "{}",
        trimmed.row("after reclamation", &d["messages"].to_string())
    );
    Ok(())
}
