//! `haven drill`: list, run and history of disaster drills (the `haven-drill` crate).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use haven_drill::described::Described;
use haven_drill::local::{BackupStore, Local, LocalOptions};
use haven_drill::run::{Finished, RunOptions, Target, run_all};
use haven_drill::scenario::{self, Scenario};

use crate::settings::{ChaosArgs, DrillCommand, DrillHistoryArgs, DrillRunArgs};

/// Runs a `haven drill` subcommand.
pub async fn run(cmd: DrillCommand) -> Result<ExitCode> {
    match cmd {
        DrillCommand::List => {
            list();
            Ok(ExitCode::SUCCESS)
        }
        DrillCommand::Run(args) => run_drills(args).await,
        DrillCommand::History(args) => history(args),
    }
}

fn list() {
    print!("{}", list_text());
}

/// What `haven drill list` prints: a row per drill, columns as wide as their widest cell.
fn list_text() -> String {
    let mut rows = vec![
        [
            "drill",
            "design RTO",
            "design RPO",
            "Haven RTO",
            "Haven RPO",
            "what it rehearses",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for s in scenario::all() {
        rows.push(vec![
            s.name.to_owned(),
            humantime::format_duration(s.seed_rto).to_string(),
            humantime::format_duration(s.seed_rpo).to_string(),
            format!(
                "{}{}",
                humantime::format_duration(s.haven_rto),
                if s.rto_from_repair { "*" } else { "" }
            ),
            if s.haven_rpo_window.is_zero() {
                "no loss".to_owned()
            } else {
                format!("last {}", humantime::format_duration(s.haven_rpo_window))
            },
            s.summary.to_owned(),
        ]);
    }
    let mut t = haven_drill::history::aligned(&rows, &[false, true, true, true, true, false]);
    t.push_str("\n* counted from the repair: the fault takes the whole store away.\n");
    t
}

fn chosen(names: &[String]) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    for n in names {
        if n == "all" {
            out.extend(scenario::all());
            continue;
        }
        match scenario::find(n) {
            Some(s) => out.push(s),
            None => {
                let known: Vec<&str> = scenario::all().iter().map(|s| s.name).collect();
                bail!("no drill named '{n}'; the drills are: {}", known.join(", "));
            }
        }
    }
    Ok(out)
}

fn seconds(what: &str, v: f64) -> Result<Duration> {
    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
        bail!("--{what} must be between 0 and 86400 seconds, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

async fn run_drills(args: DrillRunArgs) -> Result<ExitCode> {
    let scenarios = chosen(&args.scenarios)?;
    // A path given for the object store must be one (a bare name is looked up on PATH, and
    // without it the backup goes to a directory).
    if args.object_store.components().count() > 1
        && haven_drill::local::which(&args.object_store).is_none()
    {
        bail!(
            "--object-store {}: no such file (give a moto_server binary, or leave the option out to back up to a directory when moto_server is not on PATH)",
            args.object_store.display()
        );
    }
    if !args.local && args.deployment.is_none() {
        bail!(
            "say where to run the drills: --local starts a deployment on this machine, --deployment FILE names an existing one"
        );
    }
    if !(args.rate > 0.0 && args.rate <= 10_000.0) {
        bail!("--rate must be above 0 and at most 10000 requests/s");
    }
    let opts = RunOptions {
        warmup: seconds("warmup", args.warmup)?,
        after: seconds("after", args.after)?,
        outage: args.outage.map(|o| seconds("outage", o)).transpose()?,
        rate: args.rate,
        long_seconds: args.long_seconds.clamp(1, 600),
        reports: args.reports.clone(),
    };
    let mut print = |f: &Finished| {
        let r = &f.report;
        let secs = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{v:.2} s"));
        println!(
            "drill {}: {} (RTO {}, target {} s; {} of {} acknowledged writes lost; {} of {} requests failed; long calls {} once, {} twice, {} never; tasks {} ended, {} lost, {} never ended)",
            r.scenario,
            if r.passed { "passed" } else { "FAILED" },
            secs(r.rto),
            r.haven_rto,
            r.rpo.missing,
            r.rpo.acknowledged,
            r.failed,
            r.requests,
            r.exactly_once.answered_once,
            r.exactly_once.answered_twice,
            r.exactly_once.never_answered,
            r.tasks.completed + r.tasks.failed,
            r.tasks.lost,
            r.tasks.unfinished,
        );
        for finding in &r.findings {
            println!("  finding: {finding}");
        }
        println!("  report: {}", f.dir.join("report.md").display());
    };
    let finished = if let Some(file) = &args.deployment {
        let d = Described::load(file)?;
        // Every drill asked for must be runnable here before anything is broken.
        for s in &scenarios {
            d.commands(s)?;
        }
        let plan = d.plan(&scenarios, opts.warmup, opts.outage);
        if args.dry_run {
            print!("{plan}");
            return Ok(ExitCode::SUCCESS);
        }
        if !args.yes {
            confirm(&d.name, &plan)?;
        }
        run_all(Target::Described(&d), &scenarios, &opts, &mut print).await?
    } else {
        // One deployment per kind: the one-region drills on one region, the multi-region
        // drills on two.
        let mut finished = Vec::new();
        for two_regions in [false, true] {
            let group: Vec<Scenario> = scenarios
                .iter()
                .filter(|s| (s.regions == 2) == two_regions)
                .cloned()
                .collect();
            if group.is_empty() {
                continue;
            }
            let dir = tempfile::Builder::new()
                .prefix("haven-drill-")
                .tempdir()?
                .keep();
            println!("starting a local deployment in {}", dir.display());
            let started = Local::start(LocalOptions {
                haven: std::env::current_exe()?,
                nats_server: args.nats_server.clone(),
                haproxy: args.haproxy.clone(),
                nodes: args.nodes,
                dir: dir.clone(),
                keep: args.keep,
                links: false,
                two_regions,
                // The one-region deployment ships a backup (the restore drills need one), to a
                // local object store when there is one.
                backup: if two_regions {
                    BackupStore::Off
                } else if let Some(bin) = haven_drill::local::which(&args.object_store) {
                    BackupStore::Moto(bin)
                } else {
                    BackupStore::Directory
                },
                disks: false,
            })
            .await;
            let mut local = removing_on_error(started, &dir, args.keep)?;
            if two_regions {
                println!(
                    "ready: regions A (active) and B behind HAProxy at {}/mcp",
                    local.lb_base()
                );
            } else {
                println!(
                    "ready: {} Haven nodes behind HAProxy at {}/mcp",
                    args.nodes,
                    local.lb_base()
                );
            }
            let result = run_all(Target::Local(&mut local), &group, &opts, &mut print).await;
            if args.keep {
                println!("kept the deployment's directory: {}", dir.display());
            }
            drop(local);
            finished.extend(result?);
        }
        finished
    };
    Ok(if finished.iter().all(|f| f.report.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A local deployment that did not start leaves no directory behind (unless kept: its logs
/// say why).
fn removing_on_error<T>(
    started: Result<T, haven_drill::DrillError>,
    dir: &std::path::Path,
    keep: bool,
) -> Result<T, haven_drill::DrillError> {
    if started.is_err() && !keep {
        let _ = std::fs::remove_dir_all(dir);
    }
    started
}

/// Shows the plan and asks for the deployment's name on the terminal; anything else (or no
/// terminal) stops here.
fn confirm(name: &str, plan: &str) -> Result<()> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if !std::io::stdin().is_terminal() {
        bail!(
            "these drills break the deployment '{name}': confirm on a terminal, or pass --yes (see the plan with --dry-run)"
        );
    }
    print!("{plan}\nThese drills break the deployment '{name}'. Type its name to go on: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != name {
        bail!("not confirmed: nothing was done");
    }
    Ok(())
}

fn history(args: DrillHistoryArgs) -> Result<ExitCode> {
    let reports = haven_drill::history::load(&args.reports)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(ExitCode::SUCCESS);
    }
    if reports.is_empty() {
        println!("no drill reports in {}", args.reports.display());
        return Ok(ExitCode::SUCCESS);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    print!("{}", haven_drill::history::table(&reports, now));
    Ok(ExitCode::SUCCESS)
}

/// `haven chaos`.
pub async fn chaos(args: ChaosArgs) -> Result<ExitCode> {
    use haven_drill::chaos::{self, ChaosOptions};
    if args.faults == 0 || args.faults > 100_000 {
        bail!("--faults must be between 1 and 100000");
    }
    if !(args.rate > 0.0 && args.rate <= 10_000.0) {
        bail!("--rate must be above 0 and at most 10000 requests/s");
    }
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    let two_regions = args.regions == 2;
    if two_regions && args.deployment.is_some() {
        bail!(
            "--regions is for a local deployment; a described deployment's faults are its file's"
        );
    }
    let max = seconds("max-minutes", args.max_minutes * 60.0)?;
    let described = args
        .deployment
        .as_deref()
        .map(Described::load)
        .transpose()?;
    let plan = match &described {
        Some(d) => {
            let drills = chaos::drawable(&d.fault_names());
            if drills.is_empty() {
                bail!(
                    "the deployment file has no [faults.NAME] commands a chaos run can draw (every drill's but point-in-time-restore's and cold-region's)"
                );
            }
            chaos::schedule_described(args.seed, args.faults, &drills)
        }
        None if two_regions => chaos::schedule_regions(args.seed, args.faults),
        None => chaos::schedule(args.seed, args.faults, args.nodes, 3),
    };
    if args.plan {
        for (n, p) in plan.iter().enumerate() {
            println!(
                "#{:<5} after {:>4.1} s calm: {:<40} for {:.1} s",
                n + 1,
                p.gap,
                p.fault.describe(),
                p.lasts
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = ChaosOptions {
        seed: args.seed,
        warmup: Duration::from_secs(3),
        after: Duration::from_secs(3),
        max_duration: max,
        rate: args.rate,
        long_seconds: args.long_seconds.clamp(1, 600),
        reports: args.reports.clone(),
    };
    if let Some(d) = &described {
        if !args.yes {
            let plan_text = format!(
                "{} faults drawn from seed {} among the drills of the file, each its cause command, a pause and its repair command (`--plan` lists them)\n",
                plan.len(),
                args.seed
            );
            confirm(&d.name, &plan_text)?;
        }
        let f = chaos::run(Target::Described(d), &plan, &opts).await?;
        match d.record(&f.report).await {
            Ok(node) => tracing::info!("the chaos run's result is recorded (by {node})"),
            Err(e) => tracing::warn!("{e}"),
        }
        return Ok(chaos_verdict(&args, &f));
    }
    let dir = tempfile::Builder::new()
        .prefix("haven-chaos-")
        .tempdir()?
        .keep();
    println!("starting a local deployment in {}", dir.display());
    let started = Local::start(LocalOptions {
        haven: std::env::current_exe()?,
        nats_server: args.nats_server.clone(),
        haproxy: args.haproxy.clone(),
        nodes: args.nodes,
        dir: dir.clone(),
        keep: args.keep,
        // Two regions: one link between them, which the faults cut and slow.
        links: !two_regions,
        two_regions,
        backup: BackupStore::Off,
        disks: !two_regions,
    })
    .await;
    let mut local = removing_on_error(started, &dir, args.keep)?;
    println!(
        "ready; {} faults from seed {} (at most {} minutes)",
        plan.len(),
        args.seed,
        args.max_minutes
    );
    let result = chaos::run(Target::Local(&mut local), &plan, &opts).await;
    if args.keep {
        println!("kept the deployment's directory: {}", dir.display());
    }
    drop(local);
    let f = result?;
    Ok(chaos_verdict(&args, &f))
}

/// Prints a chaos run's verdict and findings; its exit status.
fn chaos_verdict(args: &ChaosArgs, f: &Finished) -> ExitCode {
    let r = &f.report;
    println!(
        "chaos seed {}: {} ({} faults done; {} of {} acknowledged writes lost; long calls {} once, {} twice, {} never; tasks {} ended, {} lost, {} never ended; {} of {} requests failed)",
        args.seed,
        if r.passed {
            "invariants held"
        } else {
            "INVARIANT BROKEN"
        },
        r.chaos
            .as_ref()
            .map_or(0, |c| c["faults_done"].as_u64().unwrap_or(0)),
        r.rpo.missing,
        r.rpo.acknowledged,
        r.exactly_once.answered_once,
        r.exactly_once.answered_twice,
        r.exactly_once.never_answered,
        r.tasks.completed + r.tasks.failed,
        r.tasks.lost,
        r.tasks.unfinished,
        r.failed,
        r.requests,
    );
    for finding in &r.findings {
        println!("  finding: {finding}");
    }
    println!("  report: {}", f.dir.join("report.md").display());
    if r.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drill_list_aligns_its_columns_for_every_name() {
        let text = list_text();
        let lines: Vec<&str> = text.lines().collect();
        let header = lines[0];
        let at = |h: &str, what: &str| h.find(what).unwrap();
        let (design_end, what_at) = (
            at(header, "design RTO") + "design RTO".len(),
            at(header, "what it rehearses"),
        );
        for s in scenario::all() {
            let row = lines
                .iter()
                .find(|l| l.starts_with(&format!("{} ", s.name)))
                .unwrap_or_else(|| panic!("no row for {} in\n{text}", s.name));
            // The summary starts under its header, two spaces after the column before it.
            assert_eq!(row.find(s.summary), Some(what_at), "{row:?} in\n{text}");
            assert_eq!(&row[what_at - 2..what_at], "  ", "{row:?}");
            // The design RTO ends under its header (right-aligned).
            let rto = humantime::format_duration(s.seed_rto).to_string();
            assert_eq!(
                row[..design_end].trim_end().len(),
                design_end,
                "{row:?} in\n{text}"
            );
            assert!(row[..design_end].ends_with(&rto), "{row:?} in\n{text}");
            assert!(!row.ends_with(' '), "{row:?}");
        }
    }
}
