//! Backup benchmarks:
//!
//! - `restore`: builds a store of N records (default one million), ships it to a local
//!   backup directory, then times restores from a snapshot and from replaying segments;
//! - `overhead`: serving throughput of `haven serve` under a write load (`notes_put`) with
//!   shipping every second against shipping off, fresh processes, alternating order, in one
//!   run; reports medians and the ratio.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use haven_backup::{BackupConfig, BackupKey, Point, RestoreOptions, Shipper, Target};
use haven_bench::{LoadFlags, haven_serve, mcp_load, median, wait_ready};
use haven_state::{Batch, HybridClock, Origin, RedbStore, Store, SystemClock};
use haven_testkit::{Process, free_port};

#[derive(Parser)]
#[command(about = "Haven backup benchmarks: restore speed and the cost of continuous shipping")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Restore speed from a snapshot and from segments.
    Restore {
        /// Records to back up and restore.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        /// Restores of each kind (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// Throughput with shipping at 1 s against shipping off.
    Overhead {
        /// Haven binary [default: `haven` next to this binary]
        #[arg(long)]
        haven_bin: Option<PathBuf>,
        /// Rounds; each runs both configurations once, in alternating order.
        #[arg(long, default_value_t = 6)]
        rounds: usize,
        #[command(flatten)]
        load: LoadFlags,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Restore { records, repeat } => rt.block_on(restore_bench(records, repeat)),
        Cmd::Overhead {
            haven_bin,
            rounds,
            load,
        } => rt.block_on(overhead_bench(haven_bin, rounds, &load)),
    }
}

async fn restore_bench(records: u64, repeat: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let store = Arc::new(RedbStore::open(
        &data,
        Origin::new("bench", "n1"),
        Arc::new(HybridClock::new(Arc::new(SystemClock))),
    )?);
    let key = BackupKey::generate();
    let url = dir.path().join("backup").to_str().unwrap().to_owned();
    let mut config = BackupConfig::new(url.clone(), key.clone());
    config.interval = Duration::from_secs(3600);
    config.verify_interval = Duration::from_secs(3600 * 24 * 365);
    config.prune_interval = Duration::from_secs(3600 * 24 * 365);
    let as_dyn: Arc<dyn Store> = store.clone();
    let shipper = Shipper::start(as_dyn, config, &data, Arc::new(SystemClock)).await?;
    shipper.ship_now(false).await.map_err(anyhow::Error::msg)?;

    let started = Instant::now();
    write_notes(&store, records).await?;
    let written = store.last_seq().await?;
    println!(
        "wrote {written} log entries in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let r = shipper.ship_now(true).await.map_err(anyhow::Error::msg)?;
    println!(
        "shipped {} entries in {} segments plus a snapshot in {:.1} s",
        r.entries,
        r.segments,
        started.elapsed().as_secs_f64()
    );
    drop(shipper);

    let target = Target::open(&url)?;
    let mut results = Vec::new();
    for (label, point) in [
        ("from the snapshot", Point::Latest),
        (
            "from the empty first snapshot + every segment",
            Point::Seq(written - 1),
        ),
    ] {
        let mut secs = Vec::new();
        let mut entries = 0;
        for i in 0..repeat {
            let to = dir.path().join(format!("restored-{i}"));
            let opts = RestoreOptions {
                to: to.clone(),
                point,
                generation: None,
                overwrite: false,
            };
            let started = Instant::now();
            let report = haven_backup::restore(&target, &key, &opts, &|_, _, _| {}).await?;
            secs.push(started.elapsed().as_secs_f64());
            entries = report.entries;
            if !report.complete {
                bail!("restore incomplete: {report:?}");
            }
            std::fs::remove_dir_all(&to)?;
        }
        let m = median(&secs);
        println!(
            "restore {label}: {entries} entries, median {m:.2} s of {repeat} ({:.0} entries/s); runs: {secs:.2?}",
            entries as f64 / m
        );
        results.push((label, entries, m));
    }
    println!();
    println!("| restore | entries | median time | entries/s |");
    println!("|---|---|---|---|");
    for (label, entries, m) in results {
        println!(
            "| {label} | {entries} | {m:.2} s | {:.0} |",
            entries as f64 / m
        );
    }
    Ok(())
}

/// Writes `records` notes of ~120 bytes, by 8 writers in batches of 1000.
async fn write_notes(store: &Arc<RedbStore>, records: u64) -> anyhow::Result<()> {
    let per_writer = records / 8;
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while i < per_writer {
                let mut b = Batch::new();
                for _ in 0..1000.min(per_writer - i) {
                    let value = format!("{{\"text\":\"note {w}-{i} {}\"}}", "x".repeat(80));
                    b = b.put("notes", &format!("w{w}-{i:08}"), value.into_bytes());
                    i += 1;
                }
                store.commit(b).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn start_haven(
    bin: &Path,
    dir: &Path,
    backup: bool,
    key: &Path,
) -> anyhow::Result<(Process, u16)> {
    let port = free_port();
    let mut cmd = haven_serve(bin, port, &dir.join("data"));
    if backup {
        cmd.args(["--backup-url"])
            .arg(dir.join("backup"))
            .arg("--backup-key-file")
            .arg(key)
            .args(["--backup-interval", "1s"]);
    }
    let server = Process(cmd.spawn().context("starting haven")?);
    wait_ready(port, "haven").await?;
    Ok((server, port))
}

async fn overhead_bench(
    haven_bin: Option<PathBuf>,
    rounds: usize,
    flags: &LoadFlags,
) -> anyhow::Result<()> {
    let (era, connections) = (&flags.era, flags.connections);
    let me = std::env::current_exe()?;
    let bin_dir = me.parent().context("binary directory")?;
    let haven = haven_bin.unwrap_or_else(|| bin_dir.join("haven"));
    let load = bin_dir.join("mcp-load");
    let keydir = tempfile::tempdir()?;
    let key = keydir.path().join("key");
    haven_bench::write_private(&key, &BackupKey::generate().to_hex())?;
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut rps = [0.0f64; 2];
        for backup in order {
            let dir = tempfile::tempdir()?;
            let (server, port) = start_haven(&haven, dir.path(), backup, &key).await?;
            let mut args = flags.mcp_load_args(&format!("http://127.0.0.1:{port}/mcp"));
            args.extend(["--notes-put".into(), "--server-pid".into()]);
            args.push(server.0.id().to_string());
            let r = mcp_load(&load, &args)?.rps;
            drop(server);
            rps[usize::from(backup)] = r;
            if backup {
                let segs = std::fs::read_dir(dir.path().join("backup/generations"))
                    .ok()
                    .and_then(|mut d| d.next())
                    .and_then(|g| g.ok())
                    .and_then(|g| std::fs::read_dir(g.path().join("segments")).ok())
                    .map_or(0, |d| d.count());
                println!("round {round}: shipping on:  {r:.0} calls/s ({segs} segments shipped)");
            } else {
                println!("round {round}: shipping off: {r:.0} calls/s");
            }
        }
        off.push(rps[0]);
        on.push(rps[1]);
        ratios.push(rps[1] / rps[0]);
    }
    let (mo, mn, mr) = (median(&off), median(&on), median(&ratios));
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!();
    println!("| configuration | median calls/s |");
    println!("|---|---|");
    println!("| shipping off | {mo:.0} |");
    println!("| shipping every 1 s | {mn:.0} |");
    println!(
        "\nratio on/off: median {mr:.3} over {rounds} rounds (min {:.3}, max {:.3}); era {era}, {connections} connections, notes_put",
        ratios[0],
        ratios[ratios.len() - 1]
    );
    Ok(())
}
