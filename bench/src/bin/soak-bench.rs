//! Soak: `haven serve` under a steady workload that overwrites, deletes and expires, for a
//! long time (30 minutes by default), sampling the node's memory and disk.
//!
//! The workload, from `--workers` clients at about `--rate` cycles per second in all: a
//! legacy session is opened (`initialize`), writes one of `--notes` notes (overwriting it),
//! and every legacy reply is a stored, resumable SSE stream (`--legacy-responses sse`); half
//! of the sessions are closed with DELETE, the other half are left to expire by their TTL
//! (`--session-ttl`, 60 s); every tenth cycle deletes a note (a tombstone); every cycle
//! also makes a stateless 2026-07-28 `echo` call. Backups ship every second to a local
//! directory (the reclaimer trims only what they shipped); event and tombstone retention
//! are set to `--retention-secs` so that they pass inside the run.
//!
//! Every `--sample-secs` it records the node's resident memory (`VmRSS`) and threads, the data
//! directory's allocated size, the backup directory's size and the cycles done, and writes
//! `soak.csv` and a chart, `soak.svg`, into `--out`; it prints a Markdown summary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use haven_backup::BackupKey;
use haven_bench::{haven_serve, median, rss_kib, wait_ready};
use haven_testkit::{Process, free_port};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Haven soak: memory and disk over time under a steady overwrite/expire load")]
struct Cli {
    /// Haven binary [default: `haven` next to this binary]
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// How long the load runs.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 15)]
    sample_secs: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Workload cycles per second, all clients together.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Distinct note names written (each is overwritten again and again).
    #[arg(long, default_value_t = 200)]
    notes: u64,
    /// Bytes of each note's text.
    #[arg(long, default_value_t = 4096)]
    note_bytes: usize,
    /// Legacy session TTL (seconds).
    #[arg(long, default_value_t = 60)]
    session_ttl: u64,
    /// Event and tombstone retention set on the node (seconds).
    #[arg(long, default_value_t = 120)]
    retention_secs: u64,
    /// Where soak.csv and soak.svg go.
    #[arg(long, default_value = "soak-out")]
    out: PathBuf,
    /// Run the node on a three-server JetStream cluster started for the run (the tools
    /// folder's nats-server) instead of the embedded store.
    #[arg(long)]
    nats: bool,
    /// One more argument for `haven serve`, appended to its command line (repeat for each,
    /// e.g. `--haven-arg=--backup-prune-interval --haven-arg=5m`).
    #[arg(long = "haven-arg", value_name = "ARG", allow_hyphen_values = true)]
    haven_args: Vec<String>,
    /// An environment variable for the node, `NAME=VALUE` (repeat for each), e.g.
    /// `MALLOC_ARENA_MAX=2`.
    #[arg(long = "haven-env", value_name = "NAME=VALUE")]
    haven_env: Vec<String>,
}

#[derive(Clone, Debug)]
struct Sample {
    minutes: f64,
    rss_kib: u64,
    /// The node's threads (`Threads` in `/proc/PID/status`).
    threads: u64,
    data_kib: u64,
    backup_kib: u64,
    /// What the store's status says it holds: JetStream messages and bytes (0 embedded).
    store_messages: u64,
    store_kib: u64,
    cycles: u64,
    errors: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(soak(cli))
}

async fn soak(cli: Cli) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let bin_dir = me.parent().context("binary directory")?;
    let haven = cli
        .haven_bin
        .clone()
        .unwrap_or_else(|| bin_dir.join("haven"));
    std::fs::create_dir_all(&cli.out)?;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("backup.key");
    haven_bench::write_private(&key, &BackupKey::generate().to_hex())?;
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");
    let port = free_port();
    let nats = if cli.nats {
        Some(haven_testkit::NatsCluster::start().await)
    } else {
        None
    };
    let mut cmd = haven_serve(&haven, port, &data);
    if let Some(n) = &nats {
        cmd.args(["--store", &n.store_url(), "--region", "soak"]);
        cmd.env(
            "HAVEN_SECRETS_KEYS",
            "soak AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        );
    }
    cmd.args(["--legacy-responses", "sse", "--session-ttl"])
        .arg(cli.session_ttl.to_string())
        .arg("--backup-url")
        .arg(&backup)
        .arg("--backup-key-file")
        .arg(&key)
        .args(["--backup-interval", "1s"])
        .args(&cli.haven_args);
    for pair in &cli.haven_env {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("--haven-env {pair:?}: expected NAME=VALUE"))?;
        cmd.env(name, value);
    }
    let server = Process(cmd.spawn().context("starting haven")?);
    wait_ready(port, "haven").await?;
    let pid = server.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let token = std::fs::read_to_string(data.join("admin.token"))?;
    let token = token.trim().to_owned();
    let retention = (cli.retention_secs * 1000).to_string();
    for setting in [
        "storage.event_retention_ms",
        "storage.tombstone_retention_ms",
    ] {
        let r = http
            .put(format!("{base}/admin/v1/config/{setting}"))
            .bearer_auth(&token)
            .json(&json!({ "value": retention.parse::<u64>()? }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("setting {setting}: HTTP {}", r.status());
        }
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs_f64(cli.minutes * 60.0);
    let period = Duration::from_secs_f64(cli.workers as f64 / cli.rate);
    let text: String = "x".repeat(cli.note_bytes);
    let mut workers = Vec::new();
    for w in 0..cli.workers {
        let (http, url) = (http.clone(), format!("{base}/mcp"));
        let (cycles, errors, text) = (cycles.clone(), errors.clone(), text.clone());
        let stop = stop.clone();
        let notes = cli.notes;
        workers.push(tokio::spawn(async move {
            let mut n = w as u64;
            let mut next = Instant::now();
            while Instant::now() < stop_at && !stop.load(Ordering::Relaxed) {
                if let Err(e) = cycle(&http, &url, n, notes, &text).await
                    && errors.fetch_add(1, Ordering::Relaxed) < 5
                {
                    eprintln!("cycle failed: {e:#}");
                }
                cycles.fetch_add(1, Ordering::Relaxed);
                n += 7919;
                next += period;
                tokio::time::sleep_until(next.into()).await;
            }
        }));
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    loop {
        let status: Value = match http
            .get(format!("{base}/admin/v1/status"))
            .bearer_auth(&token)
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let s = Sample {
            minutes: started.elapsed().as_secs_f64() / 60.0,
            rss_kib: rss_kib(pid).unwrap_or(0),
            threads: threads(pid).unwrap_or(0),
            data_kib: allocated_kib(&data),
            backup_kib: allocated_kib(&backup),
            store_messages: status["store"]["messages"].as_u64().unwrap_or(0),
            store_kib: status["store"]["bytes"].as_u64().unwrap_or(0) / 1024,
            cycles: cycles.load(Ordering::Relaxed),
            errors: errors.load(Ordering::Relaxed),
        };
        eprintln!(
            "{:6.1} min: node holds {} cached sessions, {} live sessions, {} hub topics, {} executions, {} obsolete entries",
            started.elapsed().as_secs_f64() / 60.0,
            status["cached_sessions"],
            status["live_sessions"],
            status["hub_topics"],
            status["running_executions"],
            status["store"]["obsolete_entries"]
        );
        eprintln!(
            "{:6.1} min: rss {} KiB, {} threads, data {} KiB, backup {} KiB, stream {} messages {} KiB, {} cycles, {} errors",
            s.minutes,
            s.rss_kib,
            s.threads,
            s.data_kib,
            s.backup_kib,
            s.store_messages,
            s.store_kib,
            s.cycles,
            s.errors
        );
        samples.push(s);
        if Instant::now() >= stop_at || stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(cli.sample_secs)) => {}
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: stopping the load, the node and what the run started");
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
    for w in workers {
        w.await?;
    }
    let status: Value = http
        .get(format!("{base}/admin/v1/status"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    drop(server);
    drop(nats);

    write_csv(&cli.out.join("soak.csv"), &samples)?;
    std::fs::write(cli.out.join("soak.svg"), chart(&samples, cli.nats))?;
    report(&cli, &samples, &status);
    Ok(())
}

/// One workload cycle; `n` picks the note.
async fn cycle(
    http: &reqwest::Client,
    url: &str,
    n: u64,
    notes: u64,
    text: &str,
) -> anyhow::Result<()> {
    let init = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "soak", "version": "1"}}}),
        )
        .send()
        .await?;
    let session = init
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .context("initialize without a session")?;
    reply(init, 0).await?;
    let legacy = |body: Value| {
        http.post(url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-11-25")
            .header("mcp-session-id", &session)
            .json(&body)
            .send()
    };
    legacy(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await?;
    let name = format!("soak-{}", n % notes);
    let put = legacy(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "notes_put", "arguments": {"name": name, "text": text}}}))
    .await?;
    reply(put, 1).await?;
    if n % 10 == 3 {
        let del = legacy(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "notes_delete", "arguments": {"name": name}}}))
        .await?;
        reply(del, 2).await?;
    }
    if n.is_multiple_of(2) {
        let r = http
            .delete(url)
            .header("mcp-protocol-version", "2025-11-25")
            .header("mcp-session-id", &session)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("DELETE session: HTTP {}", r.status());
        }
    }
    let echo = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "echo")
        .json(
            &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "echo", "arguments": {"text": "soak"},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "soak", "version": "1"}}}}),
        )
        .send()
        .await?;
    reply(echo, 3).await?;
    Ok(())
}

/// The JSON-RPC reply with `id` in a JSON or SSE answer; an error reply is an error.
async fn reply(response: reqwest::Response, id: u64) -> anyhow::Result<Value> {
    let status = response.status();
    let sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let body = response.text().await?;
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            body.chars().take(200).collect::<String>()
        );
    }
    let messages: Vec<Value> = if sse {
        body.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    } else {
        vec![serde_json::from_str(&body)?]
    };
    let found = messages
        .into_iter()
        .find(|m| m.get("id") == Some(&json!(id)))
        .context("no reply with the request's id")?;
    if let Some(e) = found.get("error") {
        bail!("JSON-RPC error: {e}");
    }
    if found["result"]["isError"] == json!(true) {
        bail!("tool error: {}", found["result"]);
    }
    Ok(found)
}

/// The number of threads of process `pid`.
fn threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Disk space allocated to the files under `dir` (KiB).
fn allocated_kib(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total / 1024
}

fn write_csv(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut out = String::from(
        "minutes,rss_kib,threads,data_kib,backup_kib,store_messages,store_kib,cycles,errors\n",
    );
    for s in samples {
        out.push_str(&format!(
            "{:.2},{},{},{},{},{},{},{},{}\n",
            s.minutes,
            s.rss_kib,
            s.threads,
            s.data_kib,
            s.backup_kib,
            s.store_messages,
            s.store_kib,
            s.cycles,
            s.errors
        ));
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Two panels, the node's memory and its data directory (MiB) over minutes.
fn chart(samples: &[Sample], nats: bool) -> String {
    let (w, h, pad) = (760.0, 220.0, 50.0);
    let end = samples.last().map_or(1.0, |s| s.minutes).max(1e-9);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="12">"#,
        w + 2.0 * pad,
        2.0 * h + 3.0 * pad
    );
    type Value = fn(&Sample) -> u64;
    let panels: [(&str, Value); 2] = if nats {
        [
            ("resident memory (MiB)", |s| s.rss_kib),
            ("JetStream stream (MiB)", |s| s.store_kib),
        ]
    } else {
        [
            ("resident memory (MiB)", |s| s.rss_kib),
            ("data directory (MiB)", |s| s.data_kib),
        ]
    };
    for (i, (label, value)) in panels.iter().enumerate() {
        let top = pad + i as f64 * (h + pad);
        let max = samples.iter().map(value).max().unwrap_or(1).max(1) as f64 / 1024.0 * 1.1;
        svg.push_str(&format!(
            r##"<rect x="{pad}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/><text x="{pad}" y="{}">{label}; x: minutes (0 to {end:.0})</text><text x="4" y="{}">{max:.0}</text><text x="4" y="{}">0</text>"##,
            top - 8.0,
            top + 12.0,
            top + h
        ));
        let points: Vec<String> = samples
            .iter()
            .map(|s| {
                let x = pad + s.minutes / end * w;
                let y = top + h - (value(s) as f64 / 1024.0) / max * h;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        svg.push_str(&format!(
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            if i == 0 { "#c33" } else { "#36c" },
            points.join(" ")
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn report(cli: &Cli, samples: &[Sample], status: &Value) {
    let last = samples.last().cloned().expect("at least one sample");
    println!(
        "soak: {:.0} min, {} workers, {} cycles/s asked, {} cycles ({:.1}/s), {} errors",
        last.minutes,
        cli.workers,
        cli.rate,
        last.cycles,
        last.cycles as f64 / (last.minutes * 60.0).max(1e-9),
        last.errors
    );
    println!();
    println!(
        "| minutes | RSS (MiB) | data dir (MiB) | backup dir (MiB) | stream messages | stream (MiB) | cycles |"
    );
    println!("|---|---|---|---|---|---|---|");
    let every = (samples.len() / 12).max(1);
    for (i, s) in samples.iter().enumerate() {
        if i % every == 0 || i + 1 == samples.len() {
            println!(
                "| {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {} |",
                s.minutes,
                s.rss_kib as f64 / 1024.0,
                s.data_kib as f64 / 1024.0,
                s.backup_kib as f64 / 1024.0,
                s.store_messages,
                s.store_kib as f64 / 1024.0,
                s.cycles
            );
        }
    }
    // Flatness: the median of the second quarter against the median of the last quarter.
    let quarter = |q: usize, value: fn(&Sample) -> u64| {
        let n = samples.len();
        let part: Vec<f64> = samples[n * q / 4..(n * (q + 1) / 4).max(n * q / 4 + 1).min(n)]
            .iter()
            .map(|s| value(s) as f64)
            .collect();
        median(&part)
    };
    let rss = quarter(3, |s| s.rss_kib) / quarter(1, |s| s.rss_kib);
    let disk = if cli.nats {
        quarter(3, |s| s.store_kib) / quarter(1, |s| s.store_kib)
    } else {
        quarter(3, |s| s.data_kib) / quarter(1, |s| s.data_kib)
    };
    println!();
    println!(
        "last quarter's median against the second quarter's: memory x{rss:.2}, {} x{disk:.2}",
        if cli.nats {
            "JetStream stream"
        } else {
            "data directory"
        }
    );
    println!(
        "reclamation at the end: {}",
        status.get("reclamation").unwrap_or(&Value::Null)
    );
}
