//! `mcp-load`: a closed-loop MCP `tools/call` load generator for Haven's benchmarks.
//!
//! Each of `--connections` keep-alive HTTP/1.1 connections (hyper, `TCP_NODELAY`) sends one
//! `echo` call at a time and checks every reply (JSON or SSE) is a successful result echoing
//! the input. `--era 2026` sends stateless 2026-07-28 requests; `--era legacy` initializes a
//! 2025-11-25 session per connection first. After `--warmup` seconds the run is measured for
//! `--duration` seconds (or `--requests` calls) and one JSON line is printed on stdout.
//! The exit status is 0 for a clean run, 1 if any call failed, 2 if the run could not start.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use haven_bench::client::{ClientOptions, McpConnection, ResponseKind, Target};
use haven_bench::{Era, LoadReport, machine_busy_seconds, process_cpu_seconds, self_cpu_seconds};
use hdrhistogram::Histogram;

/// Command-line flags of the load generator.
#[derive(Parser, Debug)]
#[command(
    about = "Closed-loop MCP tools/call load generator (2026-07-28 stateless or legacy sessions)"
)]
struct Args {
    /// MCP endpoint URL, e.g. http://127.0.0.1:8931/mcp.
    #[arg(long)]
    url: String,
    /// Protocol era: `2026` (stateless 2026-07-28) or `legacy` (2025-11-25 sessions).
    #[arg(long, default_value = "2026")]
    era: Era,
    /// Concurrent keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured seconds (ignored when --requests is given).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Measure exactly this many calls instead of a fixed duration.
    #[arg(long)]
    requests: Option<u64>,
    /// Unmeasured seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Tokio worker threads of the load generator itself.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Text sent to `echo` (and expected back).
    #[arg(long, default_value = "hello")]
    text: String,
    /// Per-call timeout in seconds; a timed-out call counts as an error and reconnects.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Server process id: report its CPU time over the measured window (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Legacy era: accept a server that issues no Mcp-Session-Id.
    #[arg(long)]
    allow_sessionless: bool,
    /// Call `notes_put` (a durable write) instead of `echo`.
    #[arg(long)]
    notes_put: bool,
    /// Name of the echo tool to call (e.g. a federated `ref__echo`).
    #[arg(long, default_value = "echo")]
    tool: String,
    /// Extra header sent on every request, `Name: value` (repeatable), e.g.
    /// `--header 'Authorization: Bearer TOKEN'`.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Parses `Name: value` into a header.
fn parse_header(s: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("a header is `Name: value`, not {s:?}"))?;
    let name = http::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("header name {:?}: {e}", name.trim()))?;
    let value = http::HeaderValue::from_str(value.trim())
        .map_err(|e| format!("value of the header {name}: {e}"))?;
    Ok((name, value))
}

/// What one connection task measured.
struct ConnStats {
    hist: Histogram<u64>,
    requests: u64,
    errors: u64,
    json: u64,
    sse: u64,
    reconnects: u64,
    last_done: Instant,
    error_samples: BTreeMap<String, u64>,
}

impl ConnStats {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
            requests: 0,
            errors: 0,
            json: 0,
            sse: 0,
            reconnects: 0,
            last_done: Instant::now(),
            error_samples: BTreeMap::new(),
        }
    }

    /// Adds what another connection measured.
    fn add(&mut self, stats: ConnStats) {
        self.hist.add(&stats.hist).expect("same bounds");
        self.requests += stats.requests;
        self.errors += stats.errors;
        self.json += stats.json;
        self.sse += stats.sse;
        self.reconnects += stats.reconnects;
        for (message, count) in stats.error_samples {
            *self.error_samples.entry(message).or_default() += count;
        }
    }

    fn note_error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < 8 || self.error_samples.contains_key(&message) {
            *self.error_samples.entry(message).or_default() += 1;
        }
    }
}

/// When the measured window opens and how it closes.
struct Plan {
    measure_start: Instant,
    end: Option<Instant>,
    budget: Option<AtomicU64>,
    timeout: Duration,
}

fn main() {
    let args = Args::parse();
    // One thread: a current-thread runtime, the cheapest scheduler; more: a work-stealing one.
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(args.threads);
        builder
    };
    let runtime = builder.enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("report serializes")
            );
            std::process::exit(if report.errors == 0 { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("mcp-load: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    let target = Arc::new(Target::resolve(&args.url).await?);
    let options = Arc::new(ClientOptions {
        era: args.era,
        text: args.text.clone(),
        allow_sessionless: args.allow_sessionless,
        notes_put: args.notes_put,
        echo_tool: args.tool.clone(),
        headers: args.headers.clone(),
    });

    // Set up every connection (and legacy session) before the clock starts.
    let mut setups = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let (target, options) = (target.clone(), options.clone());
        setups.push(tokio::spawn(McpConnection::connect(target, options)));
    }
    let mut connections = Vec::with_capacity(args.connections);
    for setup in setups {
        connections.push(setup.await?.context("setting up a connection")?);
    }

    let start = Instant::now();
    let measure_start = start + Duration::from_secs_f64(args.warmup.max(0.0));
    let plan = Arc::new(Plan {
        measure_start,
        end: match args.requests {
            Some(_) => None,
            None => Some(measure_start + Duration::from_secs_f64(args.duration.max(0.001))),
        },
        budget: args.requests.map(AtomicU64::new),
        timeout: Duration::from_secs_f64(args.timeout.max(0.001)),
    });

    let pid = args.server_pid;
    let sample = move || {
        (
            pid.and_then(process_cpu_seconds),
            self_cpu_seconds(),
            machine_busy_seconds(),
        )
    };
    // Without warmup, sample now, before any call is sent; otherwise when measuring starts.
    let early = (args.warmup <= 0.0).then(sample);
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(measure_start.into()).await;
        early.unwrap_or_else(sample)
    });
    // With --duration, the closing sample is taken when the window ends, not after the
    // calls still in flight then have finished.
    let end_sampler = plan.end.map(|end| {
        tokio::spawn(async move {
            tokio::time::sleep_until(end.into()).await;
            sample()
        })
    });
    let mut tasks = Vec::with_capacity(connections.len());
    for conn in connections {
        tasks.push(tokio::spawn(drive(conn, plan.clone())));
    }
    let mut total = ConnStats::new();
    let mut finished = measure_start;
    let mut open = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (stats, conn) = task.await?;
        open.push(conn);
        finished = finished.max(stats.last_done);
        total.add(stats);
    }
    let (server_cpu_end, load_cpu_end, busy_end) = match end_sampler {
        Some(task) => task.await?,
        None => sample(),
    };
    let (server_cpu_start, load_cpu_start, busy_start) = sampler.await?;
    // Legacy sessions are ended (DELETE) outside the measured window.
    futures_close(open).await;
    let seconds = plan
        .end
        .unwrap_or(finished)
        .duration_since(measure_start)
        .as_secs_f64();
    let server_cpu_s = match (server_cpu_start, server_cpu_end) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let load_cpu_s = load_cpu_end - load_cpu_start;
    // CPU that neither the server nor this generator used: other processes and steal.
    let other_cpu_s = match (busy_start, busy_end) {
        (Some(a), Some(b)) => Some((b - a - load_cpu_s - server_cpu_s.unwrap_or(0.0)).max(0.0)),
        _ => None,
    };
    let cpu = Cpu {
        server_s: server_cpu_s,
        load_s: load_cpu_s,
        other_s: other_cpu_s,
    };
    Ok(report(args, total, seconds, cpu))
}

/// CPU seconds used during the measured window.
struct Cpu {
    /// By the server (with --server-pid).
    server_s: Option<f64>,
    /// By this load generator.
    load_s: f64,
    /// By everything else (with /proc/stat).
    other_s: Option<f64>,
}

/// The report of a run: `total` measured over `seconds`.
fn report(args: Args, total: ConnStats, seconds: f64, cpu: Cpu) -> LoadReport {
    let Cpu {
        server_s: server_cpu_s,
        load_s: load_cpu_s,
        other_s: other_cpu_s,
    } = cpu;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let hist = &total.hist;
    let quantile = |q: f64| {
        if hist.is_empty() {
            0
        } else {
            hist.value_at_quantile(q)
        }
    };
    LoadReport {
        url: args.url,
        era: args.era.name().to_owned(),
        connections: args.connections,
        requests: total.requests,
        errors: total.errors,
        seconds,
        rps: if seconds > 0.0 {
            total.requests as f64 / seconds
        } else {
            0.0
        },
        p50_us: quantile(0.50),
        p90_us: quantile(0.90),
        p99_us: quantile(0.99),
        max_us: hist.max(),
        mean_us: if hist.is_empty() { 0.0 } else { hist.mean() },
        json_responses: total.json,
        sse_responses: total.sse,
        reconnects: total.reconnects,
        server_cpu_s,
        server_cpu_us_per_req: server_cpu_s
            .filter(|_| total.requests > 0)
            .map(|cpu| cpu * 1e6 / total.requests as f64),
        load_cpu_s,
        load_cpu_us_per_req: if total.requests > 0 {
            load_cpu_s * 1e6 / total.requests as f64
        } else {
            0.0
        },
        other_cpu_s,
        other_cpu_share: other_cpu_s.map(|cpu| cpu / (seconds * cores)),
        error_samples: total.error_samples,
    }
}

/// Closes every connection (ending legacy sessions) concurrently.
async fn futures_close(connections: Vec<McpConnection>) {
    let closing: Vec<_> = connections
        .into_iter()
        .map(|conn| tokio::spawn(conn.close()))
        .collect();
    for task in closing {
        let _ = task.await;
    }
}

/// Runs one connection's closed loop until the plan's end and hands the connection back.
async fn drive(mut conn: McpConnection, plan: Arc<Plan>) -> (ConnStats, McpConnection) {
    let mut stats = ConnStats::new();
    loop {
        let began = Instant::now();
        if plan.end.is_some_and(|end| began >= end) {
            break;
        }
        let measured = began >= plan.measure_start;
        if measured
            && let Some(budget) = &plan.budget
            && budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err()
        {
            break;
        }
        let outcome = match tokio::time::timeout(plan.timeout, conn.call_echo()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(haven_bench::client::CallError {
                kind: haven_bench::client::FailureKind::Transport,
                message: "call timed out".into(),
            }),
        };
        let done = Instant::now();
        // With --duration, count the calls that complete inside the measured window; with
        // --requests, the calls that took one of the budgeted slots.
        let in_window = match plan.end {
            Some(end) => done >= plan.measure_start && done <= end,
            None => measured,
        };
        match outcome {
            Ok(kind) => {
                if in_window {
                    stats.requests += 1;
                    stats.last_done = done;
                    let micros = done.duration_since(began).as_micros() as u64;
                    stats.hist.saturating_record(micros.max(1));
                    match kind {
                        ResponseKind::Json => stats.json += 1,
                        ResponseKind::Sse => stats.sse += 1,
                    }
                }
            }
            Err(error) => {
                // Errors count wherever they happen, warmup included: a run with any is not clean.
                stats.note_error(error.message.clone());
                if let Err(e) = conn.recover(error.kind).await {
                    stats.note_error(format!("recovery failed: {e:#}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    stats.reconnects = conn.reconnects();
    (stats, conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_name_colon_value() {
        let (name, value) = parse_header("Authorization: Bearer a.b.c").unwrap();
        assert_eq!(name, http::header::AUTHORIZATION);
        assert_eq!(value, "Bearer a.b.c");
        let (name, value) = parse_header("x-trace:v:1").unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("x-trace", "v:1"));
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
        let args = Args::try_parse_from([
            "mcp-load",
            "--url",
            "http://127.0.0.1:1/mcp",
            "--header",
            "A: 1",
            "--header",
            "B: 2",
        ])
        .unwrap();
        assert_eq!(args.headers.len(), 2);
    }
}
