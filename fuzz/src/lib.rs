//! Shared pieces of Haven's fuzz targets: one Tokio runtime and one scratch directory per
//! process, and the check every target makes of an error message.
//!
//! The targets themselves are in `fuzz_targets/`; `scripts/fuzz` builds them with libFuzzer's
//! coverage instrumentation on stable Rust and runs them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use haven_state::{HybridClock, Origin, RedbStore, Store};

/// The process's Tokio runtime (two workers, like a small node).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a Tokio runtime")
    })
}

const SCRATCH_PREFIX: &str = "haven-fuzz-";

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

/// A directory for this process's stores, on tmpfs when there is one (a store's fsync is then
/// cheap). Directories left by earlier processes that are gone (a crash ends a run without
/// cleaning up) are removed first; this process's own is removed when it exits normally.
pub fn scratch_dir() -> &'static Path {
    SCRATCH.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        remove_stale(&base);
        let dir = base.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the fuzz scratch directory");
        // SAFETY: registers a plain `extern "C" fn` that captures nothing.
        unsafe { libc::atexit(remove_scratch) };
        dir
    })
}

extern "C" fn remove_scratch() {
    if let Some(dir) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh embedded store in the scratch directory, under `name`.
pub fn redb_store(name: &str) -> Arc<dyn Store> {
    let dir = scratch_dir().join(name);
    let store = RedbStore::open(
        &dir,
        Origin::new("fuzz", "node-1"),
        Arc::new(HybridClock::default()),
    )
    .expect("opening a store in the scratch directory");
    Arc::new(store)
}

/// Asserts that an error shown to a client or operator says something: not empty, and not a
/// Rust debug dump or a panic message.
pub fn assert_clear_message(what: &str, message: &str) {
    assert!(!message.trim().is_empty(), "{what}: empty error message");
    assert!(
        !message.contains("panicked at"),
        "{what}: error message carries a panic: {message}"
    );
}
