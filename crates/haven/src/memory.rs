//! How a serving node's heap gives memory back. glibc's allocator, left to itself, raises its
//! mmap threshold after the first large buffer is freed (a snapshot's, a backup segment's), so
//! that later large buffers come from the heap and their pages stay with the process after
//! they are freed; and each new thread may get an arena of its own that keeps its free pages.
//! Under a steady load that made a node's memory step up at every snapshot and retention pass
//! (BENCHMARKS.md, "Soak"). A serving node therefore fixes the thresholds at glibc's initial
//! values, bounds the arenas, and hands free pages back to the system once a minute.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
use std::time::Duration;

/// Arenas at most: enough that two to four worker threads rarely wait on one another.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 4;

/// Largest allocation served from the heap; larger ones are mapped and unmapped on free
/// (glibc's initial value, kept fixed).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// How often free pages are handed back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Sets the allocator's thresholds. Call before any thread is started.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; called before other threads
    // run, as its documentation advises.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Starts the thread that hands free heap pages back to the system every minute (it runs
/// until the process ends; a trim of a heap of tens of MiB takes about a millisecond).
pub fn start_trimming() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let _ = std::thread::Builder::new()
        .name("haven-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: malloc_trim takes the allocator's own locks; it is safe at any time.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
}
