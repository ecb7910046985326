//! The store contract (tests/contract) on the in-memory and the embedded (redb) backends. The
//! JetStream backend runs the same suite in tests/nats_store.rs.

mod contract;

use std::sync::Arc;

use haven_state::{MemStore, Origin, RedbStore, Store};
use proptest::test_runner::{Config, TestRunner};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn mem() -> (Arc<haven_state::ManualClock>, Arc<dyn Store>) {
    let (wall, clock) = contract::clock();
    let s = MemStore::open_alone(Origin::new("r", "n1"), clock)
        .await
        .unwrap();
    (wall, Arc::new(s))
}

fn redb(dir: &std::path::Path) -> (Arc<haven_state::ManualClock>, Arc<dyn Store>) {
    let (wall, clock) = contract::clock();
    let s = RedbStore::open(dir, Origin::new("r", "n1"), clock).unwrap();
    (wall, Arc::new(s))
}

/// Checks `cases` random histories, each on a new store: embedded (in a new directory) or in
/// memory.
fn random_histories(cases: u32, embedded: bool) {
    let rt = runtime();
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    runner
        .run(&contract::history(24), |steps| {
            let dir = embedded.then(|| tempfile::tempdir().unwrap());
            rt.block_on(async {
                let (wall, s) = match &dir {
                    Some(dir) => redb(dir.path()),
                    None => mem().await,
                };
                contract::check_history(&*s, &wall, &steps).await;
            });
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_in_memory_backend_keeps_the_contract_in_random_histories() {
    random_histories(256, false);
}

#[test]
fn the_embedded_backend_keeps_the_contract_in_random_histories() {
    random_histories(96, true);
}

#[tokio::test]
async fn the_in_memory_backend_passes_the_fixed_cases() {
    let (_, s) = mem().await;
    contract::basics(s).await;
}

#[tokio::test]
async fn the_embedded_backend_passes_the_fixed_cases() {
    let dir = tempfile::tempdir().unwrap();
    let (_, s) = redb(dir.path());
    contract::basics(s).await;
}

/// A history the random ones found: a removal of a subject's old entries (several at once)
/// must not end a reclamation pass while another subject's obsolete entry waits behind the
/// ones it took.
#[tokio::test]
async fn a_pass_ends_only_once_every_obsolete_entry_below_the_floor_is_gone() {
    use contract::{ExpectSpec::Any, OpSpec::*, Step::*};
    let steps = vec![
        Commit(vec![
            Put {
                ns: 0,
                key: 2,
                value: vec![],
                expect: Any,
                ttl: None,
            },
            Merge {
                ns: 0,
                key: 0,
                offset_millis: 0,
                logical: 0,
                node: 0,
                value: None,
            },
        ]),
        Commit(vec![Append {
            stream: 1,
            data: vec![],
        }]),
        Commit(vec![Put {
            ns: 0,
            key: 0,
            value: vec![],
            expect: Any,
            ttl: None,
        }]),
        Commit(vec![
            Append {
                stream: 1,
                data: vec![],
            },
            Delete {
                ns: 1,
                key: 0,
                expect: Any,
            },
        ]),
        Commit(vec![
            Append {
                stream: 1,
                data: vec![],
            },
            Put {
                ns: 0,
                key: 1,
                value: vec![],
                expect: Any,
                ttl: Some(1),
            },
        ]),
        Commit(vec![Delete {
            ns: 0,
            key: 0,
            expect: Any,
        }]),
        Advance(604),
        Commit(vec![MergeEvent {
            stream: 1,
            index: 1,
            offset_millis: 0,
            node: 0,
            data: vec![],
        }]),
        Reclaim {
            retention: 0,
            grace: 0,
        },
    ];
    let (wall, s) = mem().await;
    contract::check_history(&*s, &wall, &steps).await;
}
