//! Haven's deterministic simulator.
//!
//! One seed drives one history: a region of Haven nodes ([`haven_mcp::Engine`]s) runs in one
//! process on the in-memory change log ([`haven_state::MemLog`]), which behaves like the
//! region's JetStream stream; clients of the legacy era call tools on random nodes, follow
//! their SSE streams and resume them elsewhere with `Last-Event-ID` when a connection dies;
//! and faults hit the nodes: crashes at any await point and restarts, pauses (a SIGSTOP:
//! every store operation waits, then resumes), a node's lost connection to the store, a whole
//! store outage, lost acknowledgements, a flaky link (each write goes through, fails, or is
//! stored with its answer lost), late delivery of the log to a node, and clock skew.
//! Time is tokio's paused clock, identifiers come from the seed, and scheduling is the one
//! thread's: the same seed gives the same history, so any failure replays exactly with
//! `haven-sim --seed N`.
//!
//! The invariants ([`check`]) are checked while each history runs and at its end. Every batch
//! the log takes is judged at once by [`check::Checker`]: no write of an execution lands
//! after its node lost it (fencing, epochs), takeover by exactly one node (epochs go up by
//! one, one process each), at most one final event per request stream and nothing after it,
//! no task finished twice, and a write acknowledged to a client is in the log when the client
//! gets the answer; the first violation ends the history, reported with its log sequence and
//! entry. After each fault is applied or repaired, what must hold at any moment is checked
//! (the checker has seen the whole log, no node ahead of the log, every node's view of a live
//! execution names the log's owner of that epoch). At the end the whole log is judged again
//! by a fresh checker, which must agree, and what only the end can tell is checked: every
//! request has exactly one final answer (in the store, and as its client saw it), an
//! interrupted request's "changed state" is the truth, tasks ended as their clients saw them,
//! and every node's view converges.

pub mod check;
mod client;
mod world;

use std::time::Duration;

pub use world::{Fault, Report};

/// What a simulated history holds.
#[derive(Clone, Debug)]
pub struct Options {
    /// Haven nodes in the region.
    pub nodes: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// How long clients send requests and faults strike (simulated time).
    pub active: Duration,
    /// Whether faults strike.
    pub faults: bool,
    /// Which faults strike.
    pub mix: FaultMix,
    /// Largest clock offset a node may get, in milliseconds.
    pub max_skew_millis: i64,
    /// Log every step (for replaying a failure).
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            clients: 4,
            active: Duration::from_secs(40),
            faults: true,
            mix: FaultMix::All,
            max_skew_millis: 8_000,
            verbose: false,
        }
    }
}

/// Which faults a history gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMix {
    /// Every kind of fault.
    All,
    /// Only clock skew and pauses shorter than a heartbeat's time-to-live: faults that must
    /// never make a node take another's work over.
    ClockAndShortPauses,
}

/// Runs the history of `seed` on a fresh single-threaded runtime with a paused clock and
/// checks it. `Err` carries what broke, with the command that replays it.
pub fn run(seed: u64, options: &Options) -> Result<Report, String> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().start_paused(true);
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let runtime = builder
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    haven_state::ids::seed_this_thread(Some(seed));
    let result = runtime.block_on(world::World::run(seed, options.clone()));
    haven_state::ids::seed_this_thread(None);
    // Tasks of killed nodes may still be parked; dropping the runtime ends them.
    drop(runtime);
    result.map_err(|e| {
        format!(
            "seed {seed}: {e}\n  replay: {}",
            replay_command(seed, options)
        )
    })
}

/// The command that replays `seed` with `options`.
pub fn replay_command(seed: u64, options: &Options) -> String {
    format!(
        "cargo run -p haven-sim --bin haven-sim -- --seed {seed} --nodes {} --clients {} --active-secs {}{} --verbose",
        options.nodes,
        options.clients,
        options.active.as_secs(),
        match (options.faults, options.mix) {
            (false, _) => " --no-faults",
            (true, FaultMix::All) => "",
            (true, FaultMix::ClockAndShortPauses) => " --clock-faults-only",
        }
    )
}
