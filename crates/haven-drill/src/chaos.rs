//! `haven chaos`: a randomized schedule of faults drawn from a seed, run on a local deployment
//! under load, with the invariants checked afterwards: no acknowledged write lost, every long
//! call answered exactly once, every node serving every acknowledged write (the region
//! converged), and every client served again once the faults stop. The same seed gives the
//! same schedule.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::DrillError;
use crate::link::LinkState;
use crate::load::{self, Load, LoadOptions, Recorder};
use crate::local::Local;
use crate::report::{Inputs, Mark, Report};
use crate::run::{Finished, Target, save, wind_down};
use crate::scenario::{Fault, Scenario};

/// One kind of fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ChaosFault {
    /// `kill -9` of a node, started again at the repair.
    KillNode { node: usize },
    /// SIGSTOP of a node, SIGCONT at the repair.
    PauseNode { node: usize },
    /// Every link of a node to the NATS servers cut, healed at the repair.
    CutNode { node: usize },
    /// Latency added to every link of a node to the NATS servers.
    SlowNode { node: usize, latency_ms: u64 },
    /// `kill -9` of a NATS server, started again at the repair.
    KillNats { server: usize },
    /// SIGSTOP of a NATS server, SIGCONT at the repair.
    PauseNats { server: usize },
    /// A NATS server's routes to the other servers cut (a partition: its clients still
    /// reach it), healed at the repair.
    CutNats { server: usize },
    /// Latency added to a NATS server's routes to the other servers.
    SlowNats { server: usize, latency_ms: u64 },
    /// A NATS server's disk filled to its last 4 KiB, freed at the repair (a deployment
    /// whose servers have file systems of their own; skipped otherwise).
    FillDisk { server: usize },
    /// Every NATS server killed, all started again at the repair.
    StoreOutage,
    /// The link between regions A and B cut (a partition between regions), healed at the
    /// repair (a two-region deployment).
    CutRegions,
    /// Latency added to the link between regions A and B.
    SlowRegions { latency_ms: u64 },
    /// A described deployment's fault: the `cause` and `repair` commands of its drill.
    Command { drill: String },
}

impl ChaosFault {
    /// The fault in words.
    pub fn describe(&self) -> String {
        match self {
            ChaosFault::KillNode { node } => format!("kill -9 node{node}"),
            ChaosFault::PauseNode { node } => format!("SIGSTOP node{node}"),
            ChaosFault::CutNode { node } => format!("cut node{node} off the store"),
            ChaosFault::SlowNode { node, latency_ms } => {
                format!("{latency_ms} ms on node{node}'s store links")
            }
            ChaosFault::KillNats { server } => format!("kill -9 nats{server}"),
            ChaosFault::PauseNats { server } => format!("SIGSTOP nats{server}"),
            ChaosFault::CutNats { server } => {
                format!("nats{server} cut off from the other NATS servers")
            }
            ChaosFault::SlowNats { server, latency_ms } => {
                format!("{latency_ms} ms on nats{server}'s routes")
            }
            ChaosFault::FillDisk { server } => format!("nats{server}'s disk full"),
            ChaosFault::StoreOutage => "every NATS server killed".into(),
            ChaosFault::CutRegions => "the link between regions A and B cut".into(),
            ChaosFault::SlowRegions { latency_ms } => {
                format!("{latency_ms} ms on the link between regions A and B")
            }
            ChaosFault::Command { drill } => format!("the {drill} fault's commands"),
        }
    }
}

/// One fault of the schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Planned {
    /// Seconds of calm before it (after the deployment is whole again).
    pub gap: f64,
    /// What.
    pub fault: ChaosFault,
    /// Seconds it lasts before its repair.
    pub lasts: f64,
}

/// SplitMix64: a small generator whose sequence for a seed never changes between builds or
/// versions of any library (a schedule must replay from its seed).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A time between `lo` and `hi` seconds, in tenths.
    fn secs(&mut self, lo: f64, hi: f64) -> f64 {
        let (lo, hi) = ((lo * 10.0).round() as u64, (hi * 10.0).round() as u64);
        (lo + self.below(hi - lo + 1)) as f64 / 10.0
    }
}

/// The schedule of `faults` faults for a deployment of `nodes` nodes and `servers` NATS
/// servers, drawn from `seed`.
pub fn schedule(seed: u64, faults: usize, nodes: usize, servers: usize) -> Vec<Planned> {
    let mut r = SplitMix(seed);
    (0..faults)
        .map(|_| {
            let node = r.below(nodes as u64) as usize;
            let server = r.below(servers as u64) as usize;
            let (fault, lasts) = match r.below(15) {
                0..=2 => (ChaosFault::KillNode { node }, r.secs(0.5, 4.0)),
                // Most pauses end before the 5 s time-to-live; some outlast it, so that the
                // paused node's work is taken over and it wakes up fenced.
                3..=4 => (ChaosFault::PauseNode { node }, r.secs(0.5, 8.0)),
                5..=6 => (ChaosFault::CutNode { node }, r.secs(0.5, 6.0)),
                7 => (
                    ChaosFault::SlowNode {
                        node,
                        latency_ms: 50 + r.below(451),
                    },
                    r.secs(1.0, 5.0),
                ),
                8..=9 => (ChaosFault::KillNats { server }, r.secs(0.5, 4.0)),
                10 => (ChaosFault::PauseNats { server }, r.secs(0.5, 4.0)),
                11 => (ChaosFault::StoreOutage, r.secs(0.5, 3.0)),
                12 => (ChaosFault::CutNats { server }, r.secs(0.5, 6.0)),
                13 => (ChaosFault::FillDisk { server }, r.secs(0.5, 6.0)),
                _ => (
                    ChaosFault::SlowNats {
                        server,
                        latency_ms: 20 + r.below(181),
                    },
                    r.secs(1.0, 5.0),
                ),
            };
            Planned {
                gap: r.secs(0.2, 2.0),
                fault,
                lasts,
            }
        })
        .collect()
}

/// The schedule of `faults` faults for a two-region deployment (regions A and B, one node
/// and one NATS server each: node and server 0 are A's, 1 B's), drawn from `seed`: the link
/// between the regions cut or slowed, a region's node or NATS server killed or paused.
pub fn schedule_regions(seed: u64, faults: usize) -> Vec<Planned> {
    let mut r = SplitMix(seed);
    (0..faults)
        .map(|_| {
            let node = r.below(2) as usize;
            let server = r.below(2) as usize;
            let (fault, lasts) = match r.below(10) {
                // Some cuts outlast the region lease, so that the active region's claimable
                // work waits for the other region while they are apart.
                0..=2 => (ChaosFault::CutRegions, r.secs(0.5, 8.0)),
                3 => (
                    ChaosFault::SlowRegions {
                        latency_ms: 50 + r.below(451),
                    },
                    r.secs(1.0, 5.0),
                ),
                4..=5 => (ChaosFault::KillNode { node }, r.secs(0.5, 4.0)),
                6 => (ChaosFault::PauseNode { node }, r.secs(0.5, 8.0)),
                7..=8 => (ChaosFault::KillNats { server }, r.secs(0.5, 4.0)),
                _ => (ChaosFault::PauseNats { server }, r.secs(0.5, 4.0)),
            };
            Planned {
                gap: r.secs(0.2, 2.0),
                fault,
                lasts,
            }
        })
        .collect()
}

/// Drills whose commands a chaos run on a described deployment never draws: they restore
/// the deployment's state from its backup, which is not a fault to repeat at random.
const NOT_DRAWN: [&str; 2] = ["point-in-time-restore", "cold-region"];

/// The drills of a described deployment a chaos run draws from: those with commands in its
/// file, but the restores.
pub fn drawable(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| !NOT_DRAWN.contains(&n.as_str()))
        .cloned()
        .collect()
}

/// The schedule of `faults` faults on a described deployment: each one of `drills` (the
/// drills with commands in its file, in their order there), drawn from `seed`.
pub fn schedule_described(seed: u64, faults: usize, drills: &[String]) -> Vec<Planned> {
    let mut r = SplitMix(seed);
    (0..faults)
        .map(|_| {
            let drill = drills[r.below(drills.len() as u64) as usize].clone();
            let lasts = r.secs(0.5, 6.0);
            Planned {
                gap: r.secs(0.2, 2.0),
                fault: ChaosFault::Command { drill },
                lasts,
            }
        })
        .collect()
}

/// How a chaos run goes.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// The seed (for the report).
    pub seed: u64,
    /// Load before the first fault.
    pub warmup: Duration,
    /// Load after the last repair, once every client is served again.
    pub after: Duration,
    /// Stop injecting faults after this long, even if some are left.
    pub max_duration: Duration,
    /// Requests per second of the paced clients.
    pub rate: f64,
    /// Seconds each long call sleeps.
    pub long_seconds: u32,
    /// Where the report goes.
    pub reports: std::path::PathBuf,
}

fn chaos_scenario() -> Scenario {
    Scenario {
        name: "chaos",
        summary: "a randomized schedule of faults from a seed, invariants checked afterwards",
        fault: Fault::Chaos,
        outage: Duration::ZERO,
        seed_rto: Duration::from_secs(15 * 60),
        seed_rpo: Duration::from_secs(5 * 60),
        haven_rto: Duration::from_secs(60),
        rto_from_repair: true,
        haven_rpo_writes: 0,
        haven_rpo_window: Duration::ZERO,
        runbook: "disaster-drills",
        regions: 1,
    }
}

/// Causes `f`; what went wrong in causing it (a finding), if anything.
async fn cause_local(local: &mut Local, f: &ChaosFault) -> Option<String> {
    match *f {
        ChaosFault::KillNode { node } => local.kill_node(node),
        ChaosFault::PauseNode { node } => local.pause_node(node, true),
        ChaosFault::CutNode { node } => local.set_node_links(
            node,
            LinkState {
                cut: true,
                latency_ms: 0,
            },
        ),
        ChaosFault::SlowNode { node, latency_ms } => local.set_node_links(
            node,
            LinkState {
                cut: false,
                latency_ms,
            },
        ),
        ChaosFault::KillNats { server } => local.kill_nats(server),
        ChaosFault::PauseNats { server } => local.pause_nats(server, true),
        ChaosFault::CutNats { server } => {
            local.set_nats_links(
                server,
                LinkState {
                    cut: true,
                    latency_ms: 0,
                },
            );
            // The partition holds only if the server found no way around the cut links.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match local.nats_routes(server).await {
                    Some(0) => break,
                    n if Instant::now() > deadline => {
                        return Some(format!(
                            "{} still had {} routes 5 s into its cut: the partition did not hold",
                            local.nats_name(server),
                            n.map_or("unknown".to_owned(), |n| n.to_string())
                        ));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        ChaosFault::SlowNats { server, latency_ms } => local.set_nats_links(
            server,
            LinkState {
                cut: false,
                latency_ms,
            },
        ),
        ChaosFault::FillDisk { server } => {
            if local.has_disks()
                && let Err(e) = local.fill_disk(server)
            {
                return Some(format!(
                    "filling {}'s disk failed: {e}",
                    local.nats_name(server)
                ));
            }
        }
        ChaosFault::StoreOutage => {
            for i in 0..local.nats_count() {
                local.kill_nats(i);
            }
        }
        ChaosFault::CutRegions | ChaosFault::SlowRegions { .. } if !local.two_regions() => {
            return Some("a fault between regions drawn for a one-region deployment".into());
        }
        ChaosFault::CutRegions => local.set_region_link(LinkState {
            cut: true,
            latency_ms: 0,
        }),
        ChaosFault::SlowRegions { latency_ms } => local.set_region_link(LinkState {
            cut: false,
            latency_ms,
        }),
        ChaosFault::Command { .. } => {
            return Some("a described deployment's fault drawn for a local one".into());
        }
    }
    None
}

async fn repair_local(local: &mut Local, f: &ChaosFault) -> Result<(), DrillError> {
    match *f {
        ChaosFault::PauseNode { node } => local.pause_node(node, false),
        ChaosFault::CutNode { node } | ChaosFault::SlowNode { node, .. } => {
            local.set_node_links(node, LinkState::default())
        }
        ChaosFault::PauseNats { server } => local.pause_nats(server, false),
        ChaosFault::CutNats { server } | ChaosFault::SlowNats { server, .. } => {
            local.set_nats_links(server, LinkState::default())
        }
        ChaosFault::FillDisk { server } => local.free_disk(server),
        ChaosFault::CutRegions | ChaosFault::SlowRegions { .. } => {
            local.set_region_link(LinkState::default())
        }
        // Killed processes are started again by `ensure_all_ready`.
        ChaosFault::KillNode { .. }
        | ChaosFault::KillNats { .. }
        | ChaosFault::StoreOutage
        | ChaosFault::Command { .. } => {}
    }
    local.ensure_all_ready().await
}

/// Causes `f` on `target`; a finding when causing it went wrong, or an error when the run
/// cannot go on (a described deployment's command failed).
async fn cause(target: &mut Target<'_>, f: &ChaosFault) -> Result<Option<String>, DrillError> {
    match (target, f) {
        (Target::Local(local), f) => Ok(cause_local(local, f).await),
        (Target::Described(d), ChaosFault::Command { drill }) => {
            let c = d.commands_of(drill)?;
            d.run_command("the fault's command", &c.cause, &[]).await?;
            Ok(None)
        }
        (Target::Described(_), f) => Ok(Some(format!(
            "{} cannot be caused on a described deployment",
            f.describe()
        ))),
    }
}

/// Repairs `f` on `target`, then waits until the deployment is whole again.
async fn repair(target: &mut Target<'_>, f: &ChaosFault) -> Result<(), DrillError> {
    if let (Target::Described(d), ChaosFault::Command { drill }) = (&*target, f) {
        let c = d.commands_of(drill)?;
        d.run_command("the repair's command", &c.repair, &[])
            .await?;
    }
    match target {
        Target::Local(local) => repair_local(local, f).await,
        Target::Described(_) => target.ensure_ready().await,
    }
}

/// Runs `plan` on `target` (a local deployment started with links, or a described one)
/// under load; the report.
pub async fn run(
    mut target: Target<'_>,
    plan: &[Planned],
    opts: &ChaosOptions,
) -> Result<Finished, DrillError> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rec = Recorder::new();
    let base = target.lb_base();
    let load = Load::start(
        LoadOptions {
            base: base.clone(),
            admin_token: Some(target.admin_token()),
            rate: opts.rate,
            clients_per_kind: 2,
            long_clients: 3,
            task_clients: 2,
            long_seconds: opts.long_seconds,
            run: format!("{started_unix}-chaos-{}", opts.seed),
        },
        rec.clone(),
    );
    let mut marks: Vec<Mark> = Vec::new();
    let mut mark = |kind: &str, what: String| {
        tracing::info!(at = rec.now(), kind, "{what}");
        marks.push(Mark {
            at: rec.now(),
            kind: kind.into(),
            what,
        });
    };
    tokio::time::sleep(opts.warmup).await;
    let deadline = Instant::now() + opts.max_duration;
    let mut done = 0;
    let mut failure = None;
    let mut findings = Vec::new();
    for (n, p) in plan.iter().enumerate() {
        if Instant::now() > deadline {
            mark("note", format!("time is up after {n} faults"));
            break;
        }
        tokio::time::sleep(Duration::from_secs_f64(p.gap)).await;
        let problem = match cause(&mut target, &p.fault).await {
            Ok(p) => p,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        mark("fault", format!("#{} {}", n + 1, p.fault.describe()));
        findings.extend(problem.map(|f| format!("fault #{}: {f}", n + 1)));
        tokio::time::sleep(Duration::from_secs_f64(p.lasts)).await;
        if let Err(e) = repair(&mut target, &p.fault).await {
            failure = Some(e);
            break;
        }
        mark("repair", format!("#{} repaired", n + 1));
        done += 1;
    }
    if let Some(e) = failure {
        load.stop().await;
        return Err(e);
    }
    let mut served = None;
    let settled = wind_down(
        load,
        &rec,
        &base,
        Duration::from_secs(90),
        opts.after,
        |m| served = Some((rec.now(), m.to_owned())),
    )
    .await?;
    if let Some((at, what)) = served {
        marks.push(Mark {
            at,
            kind: "note".into(),
            what,
        });
    }
    let (duration, acks, missing) = (settled.duration, settled.acks, settled.missing);
    // Convergence: every node serves every acknowledged write by itself.
    for node in target.node_bases() {
        let absent = load::missing_writes(&node, &acks)
            .await
            .map_err(DrillError::Deployment)?;
        if !absent.is_empty() {
            findings.push(format!(
                "{node} does not serve {} acknowledged writes (e.g. {})",
                absent.len(),
                absent[0]
            ));
        }
    }
    load::clean_up(&base, &rec).await;
    let scenario = chaos_scenario();
    let mut report = Report::build(Inputs {
        scenario: &scenario,
        deployment: match &target {
            Target::Local(local) if local.two_regions() => "a local deployment of two regions (A active, B standby: one NATS server in its own JetStream domain and one Haven node each, B's leafnode connection to A through a link that faults cut and slow, HAProxy as the global load balancer)".to_owned(),
            Target::Local(local) => format!(
                "a local deployment ({} NATS servers in one JetStream cluster, routed to each other and to {} Haven nodes through cuttable links, HAProxy)",
                local.nats_count(),
                local.node_bases().len()
            ),
            Target::Described(_) => target.describe(),
        },
        rate: opts.rate,
        started_unix,
        duration,
        samples: &rec.samples(),
        acks: &acks,
        missing: &missing,
        long_calls: &rec.long_calls(),
        tasks: &rec.tasks(),
        marks,
        measured: Vec::new(),
        restore_point: None,
    });
    report.findings.extend(findings);
    report.passed = report.findings.is_empty();
    report.chaos = Some(json!({
        "seed": opts.seed,
        "faults_planned": plan.len(),
        "faults_done": done,
        "disks": matches!(&target, Target::Local(l) if l.has_disks()),
        "regions": if matches!(&target, Target::Local(l) if l.two_regions()) { 2 } else { 1 },
        "schedule": plan,
    }));
    let dir = save(&opts.reports, &report)?;
    Ok(Finished { report, dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = schedule(7, 200, 3, 3);
        assert_eq!(a, schedule(7, 200, 3, 3));
        assert_ne!(a, schedule(8, 200, 3, 3));
        // Every kind of fault is drawn, on every node and server, within the bounds.
        for kind in [
            "kill-node",
            "pause-node",
            "cut-node",
            "slow-node",
            "kill-nats",
            "pause-nats",
            "store-outage",
            "cut-nats",
            "slow-nats",
            "fill-disk",
        ] {
            assert!(
                a.iter()
                    .any(|p| serde_json::to_value(&p.fault).unwrap()["kind"] == kind),
                "{kind}"
            );
        }
        assert!(a.iter().all(|p| (0.2..=2.0).contains(&p.gap)));
        assert!(a.iter().all(|p| (0.5..=8.0).contains(&p.lasts)));
        // Seed 7's first faults, pinned: a schedule replays from its seed in any build with
        // these kinds of fault (adding a kind changes every schedule).
        assert_eq!(
            a[0],
            Planned {
                gap: 0.8,
                fault: ChaosFault::CutNode { node: 0 },
                lasts: 0.8,
            }
        );
        assert_eq!(a[3].fault, ChaosFault::StoreOutage);
    }

    #[test]
    fn a_two_region_schedule_draws_faults_between_and_within_the_regions() {
        let a = schedule_regions(5, 200);
        assert_eq!(a, schedule_regions(5, 200));
        assert_ne!(a, schedule_regions(6, 200));
        for kind in [
            "cut-regions",
            "slow-regions",
            "kill-node",
            "pause-node",
            "kill-nats",
            "pause-nats",
        ] {
            assert!(
                a.iter()
                    .any(|p| serde_json::to_value(&p.fault).unwrap()["kind"] == kind),
                "{kind}"
            );
        }
        // Only the two regions' one node and one server each.
        for p in &a {
            match p.fault {
                ChaosFault::KillNode { node } | ChaosFault::PauseNode { node } => {
                    assert!(node < 2)
                }
                ChaosFault::KillNats { server } | ChaosFault::PauseNats { server } => {
                    assert!(server < 2)
                }
                ChaosFault::CutRegions => {}
                ChaosFault::SlowRegions { latency_ms } => {
                    assert!((50..=500).contains(&latency_ms))
                }
                ref f => panic!("{f:?} drawn for two regions"),
            }
        }
        assert!(a.iter().all(|p| (0.5..=8.0).contains(&p.lasts)));
    }
}
