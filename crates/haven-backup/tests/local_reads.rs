//! Reading a local target's catalog holds few of the runtime's blocking threads, however
//! many manifest records there are. (Alone in its test binary: it counts the process's
//! threads.)

#![cfg(target_os = "linux")]

use haven_backup::manifest::{ObjectKind, manifest_key};
use haven_backup::{Catalog, Target};

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .expect("Threads line")
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn a_catalog_of_many_records_reads_a_local_target_few_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..1000u64 {
        let key = manifest_key("g1", ObjectKind::Segment, i * 10 + 1, i * 10 + 10);
        let path = dir.path().join(&key);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, b"{}").expect("write");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let before = threads();
    let catalog = rt.block_on(async {
        let target = Target::open(dir.path().to_str().expect("utf-8")).expect("open");
        Catalog::load(&target).await.expect("catalog")
    });
    let grown = threads().saturating_sub(before);
    // Every record was read (none parses: they are all reported).
    assert_eq!(catalog.bad_manifests.len(), 1000);
    // Blocking threads end only after 10 s idle, so all that the read started are still
    // there: the deployment record's read, the listing and the records' read, one after
    // another, take one or two (a thread that has just finished is not yet counted idle
    // when the next blocking task starts). With the records read 32 at a time, each in a
    // blocking task of its own: about 45; 4 at a time: about 20.
    assert!(grown <= 3, "reading the catalog started {grown} threads");
}
