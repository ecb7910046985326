//! How a serving node's heap gives memory back. glibc's allocator, left to itself, raises its
//! mmap threshold after the first large buffer is freed (a snapshot's, a backup segment's), so
//! that later large buffers come from the heap and their pages stay with the process after
//! they are freed; and each new thread may get an arena of its own that keeps its free pages.
//! Under a steady load that made a node's memory step up at every snapshot and retention pass
//! (BENCHMARKS.md, "Soak"). A serving node therefore fixes the thresholds, bounds the arenas,
//! and hands free pages back to the system once a minute.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
use std::time::Duration;

/// Arenas at most: enough that two to four worker threads rarely wait on one another.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENAS: libc::c_int = 4;

/// Largest allocation served from the heap; larger ones (a snapshot's or a segment's
/// buffers) are mapped, and unmapped when freed. Kept fixed: glibc would raise it to the size
/// of the largest buffer freed so far. Not lower: at glibc's initial 128 KiB every request
/// body of a few hundred KiB was mapped and unmapped, and a 100 KB `echo` ran at 0.6 of the
/// calls per second (BENCHMARKS.md, "Soak").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;

/// Free memory at the top of the heap beyond which a `free` gives it back at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 2 * MMAP_THRESHOLD;

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
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
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
