//! `bench-compare`: runs Haven and the rmcp reference server side by side and compares them.
//!
//! Every server is started once as a child process on a free 127.0.0.1 port (Haven's data in
//! a temporary directory), checked to answer an `echo` call in each era, then loaded by
//! `mcp-load` in alternating rounds (A then B, B then A, ...) so that machine noise falls on
//! both alike. The report gives per-round numbers, medians and the A/B ratios. Every process
//! started is stopped at the end, on error, and on Ctrl-C or SIGTERM.
//!
//! With `--self-check` the candidate is a second rmcp reference instead of Haven, which
//! tests the harness itself: the ratios should be 1.0 within the machine's noise.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, ValueEnum};
use haven_bench::client::{ClientOptions, McpConnection, Target};
use haven_bench::{Era, median, median_ci95};
use serde::Serialize;
use tokio::process::{Child, Command};

/// Framing the stateless rmcp reference is asked to use.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum RmcpResponse {
    /// `json_response = true` (rmcp's fastest stateless configuration).
    Json,
    /// `json_response = false`: SSE streams.
    Sse,
}

/// Command-line flags of the comparison runner.
#[derive(Parser, Debug)]
#[command(
    about = "Benchmark Haven against the rmcp reference server, side by side, in alternating rounds"
)]
struct Args {
    /// Compare a second rmcp reference against the first instead of Haven (harness self-check).
    #[arg(long)]
    self_check: bool,
    /// Haven binary (default: `haven` next to this binary).
    #[arg(long)]
    haven_bin: Option<PathBuf>,
    /// Extra argument appended to `haven serve ...` (repeatable), e.g. `--haven-arg=--legacy-responses=sse`.
    #[arg(long = "haven-arg", allow_hyphen_values = true)]
    haven_args: Vec<String>,
    /// HTTP path of Haven's MCP endpoint.
    #[arg(long, default_value = "/mcp")]
    haven_path: String,
    /// Directory holding `rmcp-reference` and `mcp-load` (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Eras to benchmark, comma-separated: `2026`, `legacy`.
    #[arg(long, value_delimiter = ',', default_value = "2026,legacy")]
    eras: Vec<Era>,
    /// Rounds per era; each round loads A and B once, in alternating order.
    #[arg(long, default_value_t = 12)]
    rounds: usize,
    /// Measured seconds of each load run.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Unmeasured warmup seconds before each load run.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    load_threads: usize,
    /// Worker threads of both servers (`--threads` of the rmcp reference, `--worker-threads`
    /// of Haven); by default each uses one per core. The load generator shares the same cores,
    /// so fewer server threads can be faster: compare both servers at the same setting.
    #[arg(long)]
    server_threads: Option<usize>,
    /// Framing of the stateless rmcp reference's replies (2026 era).
    #[arg(long, value_enum, default_value = "json")]
    rmcp_response: RmcpResponse,
    /// Noise guard: rerun a round when other processes used more than this share of the
    /// machine (0-1) during either of its runs.
    #[arg(long, default_value_t = 0.15)]
    max_other_cpu: f64,
    /// Noise guard: how many times a noisy round may be rerun.
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// Keep one process per server for the whole run instead of fresh processes every round.
    ///
    /// Fresh processes (the default) spread per-process effects (memory layout, thread
    /// placement) over the rounds; a long-lived process can be persistently faster or slower.
    #[arg(long)]
    keep_processes: bool,
    /// Seconds to wait for each server to answer before giving up.
    #[arg(long, default_value_t = 60.0)]
    ready_timeout: f64,
    /// Also write every run's raw `mcp-load` result to this JSON file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// A server to start: its label, program and arguments (`{addr}` is replaced by its address).
#[derive(Clone, Debug)]
struct ServerSpec {
    label: String,
    program: PathBuf,
    args: Vec<String>,
    path: String,
}

/// A started server process.
struct Server {
    label: String,
    child: Child,
    pid: u32,
    url: String,
    log: PathBuf,
    data: Option<PathBuf>,
}

/// The pair compared in one era: A (candidate) against B (reference).
struct Matchup {
    era: Era,
    a: usize,
    b: usize,
}

/// One `mcp-load` result as printed by it.
type LoadResult = haven_bench::LoadReport;

/// One run's raw result, as written by `--json-out`.
#[derive(Serialize)]
struct RawRun {
    era: &'static str,
    round: usize,
    attempt: usize,
    position: usize,
    server: String,
    result: LoadResult,
}

/// One round of an era: A's and B's results, which ran first, and how many attempts it took.
struct Row {
    a: LoadResult,
    b: LoadResult,
    a_first: bool,
    attempts: usize,
}

impl Row {
    /// The larger share of the machine other processes took during A's or B's run.
    fn other_share(&self) -> f64 {
        let share = |r: &LoadResult| r.other_cpu_share.unwrap_or(0.0);
        share(&self.a).max(share(&self.b))
    }
}

/// The servers currently running, by spec index; every one is stopped on drop at the latest.
#[derive(Default)]
struct Fleet {
    servers: Vec<(usize, Server)>,
    starts: usize,
}

impl Fleet {
    /// Starts the server of `specs[index]` (with its own log and data directory).
    fn start(&mut self, specs: &[ServerSpec], index: usize, work: &Path) -> anyhow::Result<()> {
        self.starts += 1;
        let n = self.starts;
        let data = work.join(format!("data-{n}"));
        let server = start_server(&specs[index], &work.join(format!("server-{n}.log")), &data)?;
        eprintln!(
            "started {} (pid {}) at {}",
            server.label, server.pid, server.url
        );
        self.servers.push((index, server));
        Ok(())
    }

    /// The running server of `specs[index]`.
    fn get(&self, index: usize) -> &Server {
        &self
            .servers
            .iter()
            .find(|(i, _)| *i == index)
            .expect("server running")
            .1
    }

    /// The running server of `specs[index]`, mutably.
    fn get_mut(&mut self, index: usize) -> &mut Server {
        &mut self
            .servers
            .iter_mut()
            .find(|(i, _)| *i == index)
            .expect("server running")
            .1
    }

    /// Stops every server: SIGTERM, then SIGKILL after a grace period.
    async fn shutdown(&mut self) {
        for (_, server) in &self.servers {
            // SAFETY: kill(2) on the pid of a child we spawned and have not yet reaped.
            unsafe {
                libc::kill(server.pid as libc::pid_t, libc::SIGTERM);
            }
        }
        for (_, server) in &mut self.servers {
            let waited = tokio::time::timeout(Duration::from_secs(5), server.child.wait()).await;
            if waited.is_err() {
                eprintln!("{} did not stop on SIGTERM; killing it", server.label);
                let _ = server.child.kill().await;
            }
            if let Some(data) = &server.data {
                let _ = std::fs::remove_dir_all(data);
            }
        }
        self.servers.clear();
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async move {
        match main_async(args).await {
            Ok(clean) => i32::from(!clean),
            Err(e) => {
                eprintln!("bench-compare: {e:#}");
                2
            }
        }
    });
    std::process::exit(code);
}

/// Runs the whole comparison; `Ok(false)` means it finished but some calls failed.
async fn main_async(args: Args) -> anyhow::Result<bool> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("binary has no parent directory"))?
            .to_path_buf(),
    };
    let rmcp_bin = bin_dir.join("rmcp-reference");
    let load_bin = bin_dir.join("mcp-load");
    for bin in [&rmcp_bin, &load_bin] {
        anyhow::ensure!(
            bin.exists(),
            "{} not found: build with `cargo build --release -p haven-bench`",
            bin.display()
        );
    }
    let work = tempfile::Builder::new().prefix("haven-bench-").tempdir()?;
    let (specs, matchups) = plan(&args, &bin_dir, &rmcp_bin)?;

    let mut fleet = Fleet::default();
    let outcome = {
        let run = run_all(&args, &specs, &matchups, &load_bin, work.path(), &mut fleet);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = run => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    };
    if outcome.is_err() {
        for (_, server) in &fleet.servers {
            print_log_tail(server);
        }
    }
    fleet.shutdown().await;
    drop(work);
    outcome
}

/// Decides which servers to start and which pairs to compare in each era.
fn plan(
    args: &Args,
    bin_dir: &Path,
    rmcp_bin: &Path,
) -> anyhow::Result<(Vec<ServerSpec>, Vec<Matchup>)> {
    let rmcp = |label: &str, mode: &str| ServerSpec {
        label: label.to_owned(),
        program: rmcp_bin.to_path_buf(),
        args: vec![
            "--listen".into(),
            "{addr}".into(),
            "--mode".into(),
            mode.into(),
            "--response".into(),
            match args.rmcp_response {
                RmcpResponse::Json => "json".into(),
                RmcpResponse::Sse => "sse".into(),
            },
        ]
        .into_iter()
        .chain(
            args.server_threads
                .iter()
                .flat_map(|n| ["--threads".to_owned(), n.to_string()]),
        )
        .collect(),
        path: "/mcp".into(),
    };
    let mut specs = Vec::new();
    let mut matchups = Vec::new();
    let mut haven_index = None;
    for &era in &args.eras {
        let mode = match era {
            Era::Modern => "stateless",
            Era::Legacy => "stateful",
        };
        let a = if args.self_check {
            specs.push(rmcp(&format!("rmcp-A ({mode})"), mode));
            specs.len() - 1
        } else {
            *haven_index.get_or_insert_with(|| {
                let mut haven_args: Vec<String> = vec![
                    "serve".into(),
                    "--listen".into(),
                    "{addr}".into(),
                    "--data".into(),
                    "{data}".into(),
                    "--catalog".into(),
                    "default".into(),
                ];
                if let Some(n) = args.server_threads {
                    haven_args.extend(["--worker-threads".to_owned(), n.to_string()]);
                }
                haven_args.extend(args.haven_args.iter().cloned());
                specs.push(ServerSpec {
                    label: "haven".into(),
                    program: args
                        .haven_bin
                        .clone()
                        .unwrap_or_else(|| bin_dir.join("haven")),
                    args: haven_args,
                    path: args.haven_path.clone(),
                });
                specs.len() - 1
            })
        };
        let label = if args.self_check { "rmcp-B" } else { "rmcp" };
        specs.push(rmcp(&format!("{label} ({mode})"), mode));
        let b = specs.len() - 1;
        matchups.push(Matchup { era, a, b });
    }
    if let Some(i) = haven_index {
        anyhow::ensure!(
            specs[i].program.exists(),
            "Haven binary {} not found: build it with `cargo build --release -p haven`, pass --haven-bin, or use --self-check",
            specs[i].program.display()
        );
    }
    Ok((specs, matchups))
}

async fn run_all(
    args: &Args,
    specs: &[ServerSpec],
    matchups: &[Matchup],
    load_bin: &Path,
    work: &Path,
    fleet: &mut Fleet,
) -> anyhow::Result<bool> {
    let started = now_utc();
    if args.keep_processes {
        for index in 0..specs.len() {
            fleet.start(specs, index, work)?;
        }
        for matchup in matchups {
            for index in [matchup.a, matchup.b] {
                wait_ready(fleet.get_mut(index), matchup.era, args.ready_timeout).await?;
            }
        }
    }

    let mut report = String::new();
    let mut raw = Vec::new();
    let mut clean = true;
    write_header(&mut report, args, &started)?;
    for matchup in matchups {
        let (a_label, b_label) = (&specs[matchup.a].label, &specs[matchup.b].label);
        let mut rows: Vec<Row> = Vec::new();
        for round in 0..args.rounds {
            if !args.keep_processes {
                for index in [matchup.a, matchup.b] {
                    fleet.start(specs, index, work)?;
                    wait_ready(fleet.get_mut(index), matchup.era, args.ready_timeout).await?;
                }
            }
            let best = run_round(args, load_bin, fleet, matchup, round, &mut raw).await?;
            rows.push(best);
            if !args.keep_processes {
                fleet.shutdown().await;
            }
        }
        clean &= rows.iter().all(|r| r.a.errors == 0 && r.b.errors == 0);
        write_era(
            &mut report,
            matchup.era,
            a_label,
            b_label,
            &rows,
            args.self_check,
        )?;
    }
    println!("{report}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&raw)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(clean)
}

/// The report's header: when, what and how the comparison ran.
fn write_header(report: &mut String, args: &Args, started: &str) -> anyhow::Result<()> {
    writeln!(report, "## bench-compare results\n")?;
    writeln!(report, "- date: {started}")?;
    writeln!(report, "- command: `{}`", command_line())?;
    writeln!(report, "- machine: {}", machine())?;
    writeln!(
        report,
        "- load: mcp-load, {} keep-alive connections, {} thread(s), {} round(s) x {} s measured (+{} s warmup) per server and era, order alternating",
        args.connections, args.load_threads, args.rounds, args.duration, args.warmup
    )?;
    writeln!(
        report,
        "- processes: {}",
        if args.keep_processes {
            "one per server for the whole run"
        } else {
            "fresh server processes (and data directories) for every round"
        }
    )?;
    writeln!(
        report,
        "- noise guard: a round is run again (up to {} more time(s)) when other processes took more than {:.0} % of the machine during either run; the quietest attempt is kept",
        args.retries,
        args.max_other_cpu * 100.0
    )?;
    Ok(())
}

/// One round of a matchup: each server loaded once, in the round's order, again (up to
/// `--retries` times) while other processes took too much of the machine; the quietest attempt.
async fn run_round(
    args: &Args,
    load_bin: &Path,
    fleet: &Fleet,
    matchup: &Matchup,
    round: usize,
    raw: &mut Vec<RawRun>,
) -> anyhow::Result<Row> {
    let a_first = round.is_multiple_of(2);
    let mut best: Option<Row> = None;
    for attempt in 1..=args.retries + 1 {
        let mut results = Vec::with_capacity(2);
        let order = if a_first {
            [matchup.a, matchup.b]
        } else {
            [matchup.b, matchup.a]
        };
        for (position, &index) in order.iter().enumerate() {
            let server = fleet.get(index);
            let result = run_load(args, load_bin, server, matchup.era).await?;
            eprintln!(
                "[{} round {}/{} try {}] {:<20} {:>9.0} rps  p50 {:>6} us  p99 {:>6} us  cpu/call {:>6} us  other cpu {:>3} %  errors {}",
                matchup.era,
                round + 1,
                args.rounds,
                attempt,
                server.label,
                result.rps,
                result.p50_us,
                result.p99_us,
                fmt_opt(result.server_cpu_us_per_req, 1),
                fmt_opt(result.other_cpu_share.map(|s| s * 100.0), 0),
                result.errors
            );
            raw.push(RawRun {
                era: matchup.era.name(),
                round: round + 1,
                attempt,
                position,
                server: server.label.clone(),
                result: result.clone(),
            });
            results.push(result);
        }
        let (first, second) = (results.remove(0), results.remove(0));
        let (ra, rb) = if a_first {
            (first, second)
        } else {
            (second, first)
        };
        let row = Row {
            a: ra,
            b: rb,
            a_first,
            attempts: attempt,
        };
        let noise = row.other_share();
        if best.as_ref().is_none_or(|b| noise < b.other_share()) {
            best = Some(row);
        } else if let Some(b) = best.as_mut() {
            b.attempts = attempt;
        }
        if noise <= args.max_other_cpu {
            break;
        }
    }
    Ok(best.expect("at least one attempt"))
}

fn start_server(spec: &ServerSpec, log: &Path, data: &Path) -> anyhow::Result<Server> {
    let port = haven_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let args: Vec<String> = spec
        .args
        .iter()
        .map(|a| a.replace("{addr}", &addr))
        .collect();
    let uses_data = args.iter().any(|a| a.contains("{data}"));
    if uses_data {
        std::fs::create_dir_all(data)?;
    }
    let data_arg = data.to_string_lossy();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{data}", &data_arg))
        .collect();
    let log_file = std::fs::File::create(log)?;
    let mut command = Command::new(&spec.program);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true);
    die_with_parent(&mut command);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", spec.program.display()))?;
    Ok(Server {
        label: spec.label.clone(),
        pid: child
            .id()
            .ok_or_else(|| anyhow!("{} exited at once", spec.label))?,
        child,
        url: format!("http://{addr}{}", spec.path),
        log: log.to_path_buf(),
        data: uses_data.then(|| data.to_path_buf()),
    })
}

/// Asks the kernel to SIGTERM the child if this runner dies without cleaning up.
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe. The runner uses a
    // current-thread runtime, so the spawning thread (whose exit fires the signal) is main.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// Waits until `server` answers an `echo` call in `era` (or exits, or times out).
async fn wait_ready(server: &mut Server, era: Era, timeout_s: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s);
    let target = Arc::new(Target::resolve(&server.url).await?);
    let options = Arc::new(ClientOptions {
        era,
        text: "ready?".into(),
        allow_sessionless: false,
        notes_put: false,
        echo_tool: "echo".into(),
        headers: Vec::new(),
    });
    loop {
        if let Some(status) = server.child.try_wait()? {
            print_log_tail(server);
            bail!("{} exited before answering: {status}", server.label);
        }
        let attempt = async {
            let mut conn = McpConnection::connect(target.clone(), options.clone()).await?;
            conn.call_echo().await?;
            conn.close().await;
            anyhow::Ok(())
        };
        let last_error = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "probe timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            print_log_tail(server);
            bail!(
                "{} did not answer an {era} echo call in time: {last_error}",
                server.label
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_load(
    args: &Args,
    load_bin: &Path,
    server: &Server,
    era: Era,
) -> anyhow::Result<LoadResult> {
    let mut command = Command::new(load_bin);
    die_with_parent(&mut command);
    let output = command
        .arg("--url")
        .arg(&server.url)
        .arg("--era")
        .arg(era.name())
        .arg("--connections")
        .arg(args.connections.to_string())
        .arg("--duration")
        .arg(args.duration.to_string())
        .arg("--warmup")
        .arg(args.warmup.to_string())
        .arg("--threads")
        .arg(args.load_threads.to_string())
        .arg("--server-pid")
        .arg(server.pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .context("running mcp-load")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match line {
        Some(line) => {
            serde_json::from_str(line).with_context(|| format!("parsing mcp-load output: {line}"))
        }
        None => bail!(
            "mcp-load against {} failed ({}): {}",
            server.label,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

/// `x / y`, or NaN when `y` is not positive.
fn ratio(x: f64, y: f64) -> f64 {
    if y > 0.0 { x / y } else { f64::NAN }
}

/// Writes one era's table, medians and ratios.
fn write_era(
    out: &mut String,
    era: Era,
    a: &str,
    b: &str,
    rows: &[Row],
    self_check: bool,
) -> anyhow::Result<()> {
    let era_title = match era {
        Era::Modern => "2026-07-28 era (stateless)",
        Era::Legacy => "legacy era (2025-11-25 sessions)",
    };
    writeln!(out, "\n### {era_title}: A = {a}, B = {b}\n")?;
    write_rounds(out, rows)?;
    let col = |f: &dyn Fn(&LoadResult) -> f64, pick_a: bool| -> f64 {
        let values: Vec<f64> = rows
            .iter()
            .map(|r| f(if pick_a { &r.a } else { &r.b }))
            .collect();
        median(&values)
    };
    let per_round = |f: &dyn Fn(&LoadResult) -> f64| -> Vec<f64> {
        rows.iter().map(|r| ratio(f(&r.a), f(&r.b))).collect()
    };
    let rps = |r: &LoadResult| r.rps;
    let p50 = |r: &LoadResult| r.p50_us as f64;
    let p99 = |r: &LoadResult| r.p99_us as f64;
    let cpu = |r: &LoadResult| r.server_cpu_us_per_req.unwrap_or(f64::NAN);
    let rps_ratios = per_round(&rps);
    let errors_a: u64 = rows.iter().map(|r| r.a.errors).sum();
    let errors_b: u64 = rows.iter().map(|r| r.b.errors).sum();
    let other: Vec<f64> = rows.iter().map(|r| r.other_share() * 100.0).collect();
    writeln!(
        out,
        "| **median** | | **{:.0}** | **{:.0}** | **{:.3}** | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | | | {errors_a}/{errors_b} |",
        col(&rps, true),
        col(&rps, false),
        median(&rps_ratios),
        col(&p50, true),
        col(&p50, false),
        col(&p99, true),
        col(&p99, false),
        col(&cpu, true),
        col(&cpu, false),
        median(&other),
    )?;
    let best = |pick_a: bool| {
        rows.iter()
            .map(|r| if pick_a { r.a.rps } else { r.b.rps })
            .fold(0.0, f64::max)
    };
    writeln!(
        out,
        "| best | | {:.0} | {:.0} | {:.3} | | | | | | | | | | |",
        best(true),
        best(false),
        ratio(best(true), best(false))
    )?;
    let (lo, hi) = rps_ratios
        .iter()
        .filter(|v| !v.is_nan())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let ci = match median_ci95(&rps_ratios) {
        Some((low, high, coverage)) => {
            format!("{:.0} % CI {low:.3}–{high:.3}", coverage * 100.0)
        }
        None => "too few rounds for a 95 % CI".to_owned(),
    };
    writeln!(out)?;
    writeln!(
        out,
        "Ratios A/B (median of per-round ratios): throughput **{:.3}x** ({ci}; rounds {:.3}–{:.3}; ratio of medians {:.3}; ratio of bests {:.3}), p50 latency {:.3}x, p99 latency {:.3}x, server CPU per call {:.3}x.",
        median(&rps_ratios),
        lo,
        hi,
        ratio(col(&rps, true), col(&rps, false)),
        ratio(best(true), best(false)),
        median(&per_round(&p50)),
        median(&per_round(&p99)),
        median(&per_round(&cpu)),
    )?;
    let load = |r: &LoadResult| r.load_cpu_us_per_req;
    writeln!(
        out,
        "\nLoad generator CPU per call (median): {:.1} µs against A, {:.1} µs against B. It runs on the same cores, so throughput ratios understate server-side cost ratios.",
        col(&load, true),
        col(&load, false)
    )?;
    let errors = errors_a + errors_b;
    write_errors(out, rows, (a, b), errors)?;
    write_target(out, era, &rps_ratios, errors, self_check, (lo, hi))
}

/// The table of rounds: one row per round, A against B.
fn write_rounds(out: &mut String, rows: &[Row]) -> anyhow::Result<()> {
    writeln!(
        out,
        "| round | first | A rps | B rps | A/B rps | A p50 µs | B p50 µs | A p99 µs | B p99 µs | A cpu µs/call | B cpu µs/call | other cpu % | tries | A/B reply | errors A/B |"
    )?;
    writeln!(
        out,
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"
    )?;
    for (i, row) in rows.iter().enumerate() {
        let (ra, rb) = (&row.a, &row.b);
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {}/{} | {}/{} |",
            i + 1,
            if row.a_first { "A" } else { "B" },
            ra.rps,
            rb.rps,
            ratio(ra.rps, rb.rps),
            ra.p50_us,
            rb.p50_us,
            ra.p99_us,
            rb.p99_us,
            fmt_opt(ra.server_cpu_us_per_req, 1),
            fmt_opt(rb.server_cpu_us_per_req, 1),
            row.other_share() * 100.0,
            row.attempts,
            reply_kind(ra),
            reply_kind(rb),
            ra.errors,
            rb.errors
        )?;
    }
    Ok(())
}

/// The failed calls of every round, if any.
fn write_errors(
    out: &mut String,
    rows: &[Row],
    (a, b): (&str, &str),
    errors: u64,
) -> anyhow::Result<()> {
    if errors > 0 {
        writeln!(
            out,
            "\n**{errors} call(s) failed: this comparison is not clean.**"
        )?;
        for row in rows {
            for (label, r) in [(a, &row.a), (b, &row.b)] {
                for (message, count) in &r.error_samples {
                    writeln!(out, "- {label}: {count} x {message}")?;
                }
            }
        }
    }
    Ok(())
}

/// The run's noise (a self-check) or whether the throughput target is met.
fn write_target(
    out: &mut String,
    era: Era,
    rps_ratios: &[f64],
    errors: u64,
    self_check: bool,
    (lo, hi): (f64, f64),
) -> anyhow::Result<()> {
    if self_check {
        let spread = (hi - lo) / 2.0 * 100.0;
        writeln!(
            out,
            "\nSelf-check: both sides run the same server, so every ratio should be 1.0 (and the CI should contain it); per-round throughput ratios span ±{spread:.1} %, which is this run's noise."
        )?;
    } else {
        let target = match era {
            Era::Modern => 2.0,
            Era::Legacy => 1.0,
        };
        let got = median(rps_ratios);
        let verdict = match median_ci95(rps_ratios) {
            _ if errors > 0 => "not met (calls failed)",
            Some((low, _, _)) if low >= target => "met (the whole CI is above it)",
            Some((_, high, _)) if high < target => "not met (the whole CI is below it)",
            _ if got >= target => "met by the median, but the CI straddles it: add rounds",
            _ => "not met by the median, but the CI straddles it: add rounds",
        };
        writeln!(
            out,
            "\nTarget: throughput ratio ≥ {target:.1}x: **{verdict}** (median {got:.3}x)."
        )?;
    }
    Ok(())
}

fn reply_kind(r: &LoadResult) -> &'static str {
    match (r.json_responses > 0, r.sse_responses > 0) {
        (true, false) => "JSON",
        (false, true) => "SSE",
        (true, true) => "mixed",
        (false, false) => "-",
    }
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

fn print_log_tail(server: &Server) {
    let text = std::fs::read_to_string(&server.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    if !tail.is_empty() {
        eprintln!("--- last lines of {}'s output ---", server.label);
        for line in tail {
            eprintln!("{line}");
        }
    }
}

/// The command line this process was started with, shell-quoted where needed.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPU(s), {model}; servers and load generator share them")
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
