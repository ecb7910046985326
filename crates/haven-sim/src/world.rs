//! The simulated region: nodes on one in-memory log, the faults that strike them, and the
//! course of one history.

use std::sync::Arc;
use std::time::Duration;

use haven_mcp::engine::{EngineConfig, LegacyResponses};
use haven_mcp::{Catalog, Engine};
use haven_secrets::{KekSource, Secrets};
use haven_state::{HybridClock, LinkFaults, MemLog, MemStore, Origin, Store, VirtualClock};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::check::Watch;
use crate::client::{Client, ClientLog};
use crate::{FaultMix, Options};

/// Wall-clock time every simulated clock starts from (2027-01-15).
const EPOCH_MILLIS: u64 = 1_800_000_000_000;

/// A fault the simulator can inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The node's process dies at whatever await point it is at; it restarts later.
    Crash,
    /// The node stops (SIGSTOP): every store operation waits until it resumes.
    Pause,
    /// The node loses its connection to the store.
    LinkDown,
    /// The store is unavailable to every node.
    Outage,
    /// The node's next writes are stored but their acknowledgements are lost.
    LostAcks,
    /// The node's link to the store is flaky: each write goes through, fails before it is
    /// stored, or is stored with its acknowledgement lost (a log whose leader is changing).
    Flaky,
    /// The log reaches the node late.
    SlowDelivery,
    /// The node's clock jumps ahead or behind.
    Skew,
}

/// What a history did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Requests sent by clients.
    pub requests: usize,
    /// Requests that ended with a final answer the client saw.
    pub answered: usize,
    /// Tasks started by clients.
    pub tasks: usize,
    /// Executions taken over or settled by another process than their first owner.
    pub takeovers: usize,
    /// Faults injected.
    pub faults: usize,
    /// Entries of the change log at the end.
    pub log_entries: u64,
    /// A digest of the history (the same seed gives the same digest).
    pub digest: u64,
}

/// One node: its clock, and while it runs, its engine and store connection.
pub(crate) struct Node {
    pub name: String,
    pub clock: Arc<VirtualClock>,
    pub running: Option<Running>,
    pub restarts: u32,
}

pub(crate) struct Running {
    pub engine: Engine,
    pub faults: Arc<LinkFaults>,
    pub store: Arc<MemStore>,
}

/// The region as the clients and the fault schedule share it.
pub(crate) struct World {
    pub log: Arc<MemLog>,
    /// The invariants, checked as the log grows and between steps of the fault schedule.
    pub watch: Arc<Watch>,
    pub nodes: Mutex<Vec<Node>>,
    kek: String,
    catalog: Arc<dyn Catalog>,
    legacy_responses: LegacyResponses,
    pub verbose: bool,
}

impl World {
    /// Runs one history and checks it: as it runs (the first broken invariant ends it), and
    /// at its end.
    pub async fn run(seed: u64, options: Options) -> Result<Report, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let log = MemLog::new();
        let watch = Watch::attach(&log);
        let world = Arc::new(World {
            log,
            watch: watch.clone(),
            nodes: Mutex::new(Vec::new()),
            kek: format!("sim {}", base64_key(&mut rng)),
            catalog: Arc::new(crate::client::SimCatalog::default()),
            legacy_responses: if rng.random_bool(0.5) {
                LegacyResponses::Sse
            } else {
                LegacyResponses::Adaptive
            },
            verbose: options.verbose,
        });
        // The history ends as soon as it moves on after the first broken invariant (whose
        // sequence is kept). The violation is looked at whenever the history is polled, not
        // waited on: waiting on it as well would change the schedule of the tasks, and so the
        // history of a seed.
        let mut history = std::pin::pin!(Self::history(world.clone(), &mut rng, &options));
        let (logs, faults) = std::future::poll_fn(|cx| match watch.failed() {
            Some(v) => std::task::Poll::Ready(Err(v)),
            None => history.as_mut().poll(cx),
        })
        .await?;
        let report = crate::check::check(&world, &watch, &logs).await?;
        if let Some(v) = watch.failed() {
            return Err(v);
        }
        Ok(Report {
            seed,
            faults,
            ..report
        })
    }

    /// The course of a history: nodes start, clients run and faults strike until the end of
    /// the active phase, every fault is repaired, and clients finish. Returns what the
    /// clients saw and how many faults struck.
    async fn history(
        world: Arc<World>,
        rng: &mut StdRng,
        options: &Options,
    ) -> Result<(Vec<ClientLog>, usize), String> {
        for i in 0..options.nodes {
            world.nodes.lock().push(Node {
                name: format!("n{}", i + 1),
                clock: Arc::new(VirtualClock::new(EPOCH_MILLIS)),
                running: None,
                restarts: 0,
            });
            world.start_node(i).await?;
        }
        let active_until = tokio::time::Instant::now() + options.active;
        let mut clients = Vec::new();
        for c in 0..options.clients {
            let client = Client::new(c, world.clone(), StdRng::seed_from_u64(rng.random()));
            clients.push(tokio::spawn(client.run(active_until)));
        }
        let faults = if options.faults {
            world
                .clone()
                .strike(rng, active_until, options.max_skew_millis, options.mix)
                .await
        } else {
            tokio::time::sleep_until(active_until).await;
            0
        };
        world.heal().await?;
        let mut logs: Vec<ClientLog> = Vec::new();
        for c in clients {
            logs.push(c.await.map_err(|e| format!("a client task failed: {e}"))?);
        }
        // Let every node's follower reach the end of the log.
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok((logs, faults))
    }

    /// Starts (or restarts) node `i` as a new process on the log.
    pub async fn start_node(&self, i: usize) -> Result<(), String> {
        let (name, clock) = {
            let nodes = self.nodes.lock();
            (nodes[i].name.clone(), nodes[i].clock.clone())
        };
        let (store, faults) = self
            .log
            .join(
                Origin::new("sim", name.as_str()),
                Arc::new(HybridClock::new(clock)),
            )
            .await
            .map_err(|e| format!("node {name} cannot join the log: {e}"))?;
        let store = Arc::new(store);
        let dyn_store: Arc<dyn Store> = store.clone();
        let secrets = Secrets::open(dyn_store.clone(), KekSource::text(self.kek.clone()))
            .map_err(|e| format!("node {name}: secrets: {e}"))?;
        let config = EngineConfig {
            node_id: name.clone(),
            boot_id: format!("{:016x}", haven_state::ids::random_u64()),
            legacy_responses: self.legacy_responses,
            ..EngineConfig::default()
        };
        let engine = Engine::start(dyn_store, self.catalog.clone(), config, secrets)
            .await
            .map_err(|e| format!("node {name} cannot start: {e}"))?;
        self.nodes.lock()[i].running = Some(Running {
            engine,
            faults,
            store,
        });
        if self.verbose {
            tracing::info!(node = %name, "started");
        }
        Ok(())
    }

    /// A running node's engine, chosen by `rng` (clients do not know which nodes are paused
    /// or cut off, only which answer connections).
    pub fn pick(&self, rng: &mut StdRng) -> Option<(String, Engine)> {
        let nodes = self.nodes.lock();
        let up: Vec<&Node> = nodes.iter().filter(|n| n.running.is_some()).collect();
        if up.is_empty() {
            return None;
        }
        let n = up[rng.random_range(0..up.len())];
        n.running
            .as_ref()
            .map(|r| (n.name.clone(), r.engine.clone()))
    }

    /// Injects faults until `until`; returns how many.
    async fn strike(
        self: Arc<Self>,
        rng: &mut StdRng,
        until: tokio::time::Instant,
        max_skew: i64,
        mix: FaultMix,
    ) -> usize {
        let mut count = 0;
        let n = self.nodes.lock().len();
        loop {
            let wait = Duration::from_millis(rng.random_range(500..4_000));
            if tokio::time::Instant::now() + wait >= until {
                tokio::time::sleep_until(until).await;
                return count;
            }
            tokio::time::sleep(wait).await;
            let i = rng.random_range(0..n);
            let fault = match rng.random_range(0..15) {
                0..=3 => Fault::Crash,
                4..=6 => Fault::Pause,
                7..=8 => Fault::LinkDown,
                9 => Fault::Outage,
                10 => Fault::LostAcks,
                11 => Fault::SlowDelivery,
                12 => Fault::Flaky,
                _ => Fault::Skew,
            };
            let (fault, lasts) = match mix {
                FaultMix::All => (fault, Duration::from_millis(rng.random_range(500..12_000))),
                // Well under the 5 s time-to-live of a heartbeat, even with a beat's interval.
                FaultMix::ClockAndShortPauses => (
                    if rng.random_bool(0.5) {
                        Fault::Skew
                    } else {
                        Fault::Pause
                    },
                    Duration::from_millis(rng.random_range(200..2_500)),
                ),
            };
            if self.apply(i, &fault, lasts, rng, max_skew) {
                count += 1;
                let name = self.nodes.lock()[i].name.clone();
                self.watch.step(&self, &format!("{fault:?} on {name}"));
            }
        }
    }

    /// Applies one fault to node `i` and schedules its repair; false when it does not apply
    /// (the node is down, or it would leave no node running).
    fn apply(
        self: &Arc<Self>,
        i: usize,
        fault: &Fault,
        lasts: Duration,
        rng: &mut StdRng,
        max_skew: i64,
    ) -> bool {
        let mut nodes = self.nodes.lock();
        let up = nodes.iter().filter(|n| n.running.is_some()).count();
        let name = nodes[i].name.clone();
        let Some(running) = nodes[i].running.as_ref() else {
            return false;
        };
        let faults = running.faults.clone();
        if self.verbose {
            tracing::info!(node = %name, ?fault, ?lasts, "fault");
        }
        match fault {
            Fault::Crash => {
                if up <= 1 {
                    return false;
                }
                running.engine.kill();
                faults.kill();
                nodes[i].running = None;
                nodes[i].restarts += 1;
                drop(nodes);
                let world = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    world.restart_until_up(i).await;
                    world.watch.step(&world, &format!("the restart of {name}"));
                });
            }
            Fault::Pause => {
                faults.set_paused(true);
                drop(nodes);
                let world = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    faults.set_paused(false);
                    world
                        .watch
                        .step(&world, &format!("the end of the pause of {name}"));
                });
            }
            Fault::LinkDown => {
                faults.set_down(true);
                drop(nodes);
                let world = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    faults.set_down(false);
                    world
                        .watch
                        .step(&world, &format!("the repair of the link of {name}"));
                });
            }
            Fault::Outage => {
                let all: Vec<Arc<LinkFaults>> = nodes
                    .iter()
                    .filter_map(|n| n.running.as_ref().map(|r| r.faults.clone()))
                    .collect();
                drop(nodes);
                for f in &all {
                    f.set_down(true);
                }
                let world = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    for f in &all {
                        f.set_down(false);
                    }
                    world.watch.step(&world, "the end of the outage");
                });
            }
            Fault::LostAcks => faults.lose_acks(rng.random_range(1..4)),
            Fault::Flaky => {
                // As while a log's leader changes: writes go through, fail or lose their
                // answer, and the log reaches the node late.
                faults.set_flaky(Some(rng.random()));
                faults.set_delivery_delay(Duration::from_millis(rng.random_range(20..500)));
                drop(nodes);
                let world = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    faults.set_flaky(None);
                    faults.set_delivery_delay(Duration::ZERO);
                    world
                        .watch
                        .step(&world, &format!("the end of the flaky link of {name}"));
                });
            }
            Fault::SlowDelivery => {
                faults.set_delivery_delay(Duration::from_millis(rng.random_range(50..2_000)));
                drop(nodes);
                let world = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(lasts).await;
                    faults.set_delivery_delay(Duration::ZERO);
                    world
                        .watch
                        .step(&world, &format!("the end of slow delivery to {name}"));
                });
            }
            Fault::Skew => nodes[i]
                .clock
                .set_offset(rng.random_range(-max_skew..=max_skew)),
        }
        true
    }

    async fn restart_until_up(&self, i: usize) {
        loop {
            if self.nodes.lock()[i].running.is_some() {
                return;
            }
            match self.start_node(i).await {
                Ok(()) => return,
                Err(e) => {
                    if self.verbose {
                        tracing::info!(error = %e, "restart failed; trying again");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Ends every fault: every node runs, connected, on time.
    async fn heal(&self) -> Result<(), String> {
        // Repairs scheduled before the end may still be pending: do them now.
        let n = self.nodes.lock().len();
        for i in 0..n {
            let faults = self.nodes.lock()[i]
                .running
                .as_ref()
                .map(|r| r.faults.clone());
            match faults {
                Some(f) => {
                    f.set_paused(false);
                    f.set_down(false);
                    f.lose_acks(0);
                    f.set_flaky(None);
                    f.set_delivery_delay(Duration::ZERO);
                }
                None => self.restart_until_up(i).await,
            }
        }
        self.watch.step(self, "healing every fault");
        if self.verbose {
            tracing::info!("healed");
        }
        Ok(())
    }
}

fn base64_key(rng: &mut StdRng) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: [u8; 32] = rng.random();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for j in 0..4 {
            if j <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * j)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
