//! Runs simulated histories of a Haven region: `haven-sim --seeds 0..1000`, or one seed with
//! `--seed N --verbose` to replay a failure step by step.

use std::time::{Duration, Instant};

use clap::Parser;

/// Runs seeded simulations of a Haven region under faults and checks its invariants.
#[derive(Parser, Debug)]
#[command(name = "haven-sim")]
struct Args {
    /// One seed to run (a replay).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// A range of seeds, `START..END` (END excluded).
    #[arg(long, default_value = "0..100")]
    seeds: String,
    /// Haven nodes in the region.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Simulated seconds during which clients send requests and faults strike.
    #[arg(long, default_value_t = 40)]
    active_secs: u64,
    /// No faults.
    #[arg(long)]
    no_faults: bool,
    /// Only clock skew and pauses shorter than a heartbeat's time-to-live (no takeover may
    /// happen).
    #[arg(long)]
    clock_faults_only: bool,
    /// Also run each seed twice and compare the histories (determinism).
    #[arg(long)]
    twice: bool,
    /// Log every step.
    #[arg(long)]
    verbose: bool,
    /// Stop at the first failing seed.
    #[arg(long)]
    fail_fast: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.verbose {
        tracing_subscriber::fmt()
            .with_env_filter("info,haven=debug")
            .with_ansi(false)
            .init();
    }
    let options = haven_sim::Options {
        nodes: args.nodes,
        clients: args.clients,
        active: Duration::from_secs(args.active_secs),
        faults: !args.no_faults,
        mix: if args.clock_faults_only {
            haven_sim::FaultMix::ClockAndShortPauses
        } else {
            haven_sim::FaultMix::All
        },
        verbose: args.verbose,
        ..haven_sim::Options::default()
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => match args.seeds.split_once("..") {
            Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(a), Ok(b)) if a < b => (a..b).collect(),
                _ => {
                    eprintln!(
                        "--seeds must be START..END with START < END, got {:?}",
                        args.seeds
                    );
                    return std::process::ExitCode::from(2);
                }
            },
            None => {
                eprintln!("--seeds must be START..END, got {:?}", args.seeds);
                return std::process::ExitCode::from(2);
            }
        },
    };
    let started = Instant::now();
    let (mut failed, mut requests, mut takeovers, mut faults, mut tasks) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for seed in &seeds {
        match haven_sim::run(*seed, &options) {
            Ok(report) => {
                requests += report.requests;
                tasks += report.tasks;
                takeovers += report.takeovers;
                faults += report.faults;
                if args.twice {
                    match haven_sim::run(*seed, &options) {
                        Ok(again) if again.digest == report.digest => {}
                        Ok(_) => {
                            failed += 1;
                            println!(
                                "seed {seed}: two runs gave different histories\n  replay: {}",
                                haven_sim::replay_command(*seed, &options)
                            );
                        }
                        Err(e) => {
                            failed += 1;
                            println!("{e}");
                        }
                    }
                }
                if args.seed.is_some() {
                    println!("{report:?}");
                }
            }
            Err(e) => {
                failed += 1;
                println!("{e}");
                if args.fail_fast {
                    break;
                }
            }
        }
    }
    println!(
        "{} seeds, {failed} failed; {requests} requests, {tasks} tasks, {faults} faults, {takeovers} takeovers; {:.1} s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
