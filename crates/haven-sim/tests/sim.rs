//! The simulator in the test command: a thousand seeded histories of a three-node region under
//! every kind of fault, each checked against every invariant; histories with only clock skew
//! and short pauses, in which no work may change hands; and replays that must be exact.
//! `HAVEN_SIM_SEEDS` changes the number of seeds (the documented long run uses 100 000).

use haven_sim::{FaultMix, Options};

fn seeds() -> u64 {
    std::env::var("HAVEN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

/// Runs `range` and fails with every failing seed's message (each names its replay command).
fn run_all(range: std::ops::Range<u64>, options: &Options) -> Vec<haven_sim::Report> {
    let mut failures = Vec::new();
    let mut reports = Vec::new();
    for seed in range {
        match haven_sim::run(seed, options) {
            Ok(r) => reports.push(r),
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    reports
}

// Two halves, so that the two run in parallel on two cores.
#[test]
fn seeded_histories_under_every_fault_keep_every_invariant_first_half() {
    let n = seeds();
    let reports = run_all(0..n / 2, &Options::default());
    assert!(
        reports.iter().map(|r| r.takeovers).sum::<usize>() > 0,
        "faults caused takeovers"
    );
}

#[test]
fn seeded_histories_under_every_fault_keep_every_invariant_second_half() {
    let n = seeds();
    let reports = run_all(n / 2..n, &Options::default());
    assert!(reports.iter().map(|r| r.requests).sum::<usize>() > 0);
    assert!(reports.iter().map(|r| r.tasks).sum::<usize>() > 0);
}

#[test]
fn clock_skew_and_short_pauses_never_move_work_between_nodes() {
    let options = Options {
        mix: FaultMix::ClockAndShortPauses,
        ..Options::default()
    };
    let range = 1_000_000..1_000_000 + seeds() / 5;
    for r in run_all(range, &options) {
        assert_eq!(
            r.takeovers,
            0,
            "seed {}: work changed hands without a node failing\n  replay: {}",
            r.seed,
            haven_sim::replay_command(r.seed, &options)
        );
    }
}

#[test]
fn the_same_seed_gives_the_same_history() {
    for seed in 0..20 {
        let options = Options::default();
        let a = haven_sim::run(seed, &options).unwrap();
        let b = haven_sim::run(seed, &options).unwrap();
        assert_eq!(a.digest, b.digest, "seed {seed} gave two histories");
        assert_eq!(
            (a.requests, a.tasks, a.faults),
            (b.requests, b.tasks, b.faults)
        );
    }
}

/// Seeds that once failed, kept so that their bug stays fixed. Each names what it found.
#[test]
fn seeds_that_found_bugs_stay_green() {
    // 3155, 3357, 10897, 67885 (found by the 100 000-seed run): a task's final write failed in
    // a store outage and was dropped; this node's own recovery resumed the task, and the
    // fenced old run, ending late, removed its successor's entry from the set of runs here,
    // so every recovery pass took the task again and fenced the run before: a task that
    // never ended. Finals are now retried until stored, and runs are counted per key.
    //
    // 26, 220 (notes_put) and 276 (ledger_append, on a flaky link): a handler's write whose
    // answer was lost was stored; the final answer's first attempt then failed, and its retry
    // found the ownership record moved and took that for its own earlier attempt: the client
    // got an answer the store never held, and recovery later stored "interrupted" in its
    // place (36 of 2000 seeds with that rule put back). Writes are now recognised by the id
    // they were tried under; every event a client receives is checked against the store.
    //
    // 1456 (found by a 5 000-seed run): a notes_put on a node with a stale index rebuilt the
    // notes index (a derived record), lost its link before writing the note, and was settled
    // as "interrupted after changing state": the index upkeep counted as an effect. Upkeep is
    // now committed without counting (`FencedStore::commit_upkeep`).
    for seed in [3155, 3357, 10897, 67885, 26, 220, 276, 1456] {
        run_all(seed..seed + 1, &Options::default());
    }
}
