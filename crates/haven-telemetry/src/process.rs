//! The usual process metrics (`process_*`, as Prometheus' client libraries name them), read
//! from `/proc/self` at scrape. On a system without `/proc` they stay 0.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// Process CPU, memory, descriptors and start time.
#[derive(Default)]
pub struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    virtual_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
    threads: Gauge,
}

impl ProcessMetrics {
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "process_cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            self.cpu_seconds.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            self.resident_bytes.clone(),
        );
        r.register_with_unit(
            "process_virtual_memory",
            "Virtual memory size",
            Unit::Bytes,
            self.virtual_bytes.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors",
            self.open_fds.clone(),
        );
        r.register(
            "process_max_fds",
            "Limit of open file descriptors",
            self.max_fds.clone(),
        );
        r.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            self.start_time.clone(),
        );
        r.register("process_threads", "OS threads", self.threads.clone());
    }

    /// Reads `/proc/self` now.
    pub fn refresh(&self) {
        let page = page_size();
        let tick = clock_ticks();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            // Fields after the command name (which may hold spaces), from field 3 (state).
            && let Some((_, rest)) = stat.rsplit_once(") ")
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            // utime 14, stime 15, num_threads 20, starttime 22, vsize 23, rss 24 (1-based
            // fields of stat(5)); `f[0]` is field 3.
            let cpu = (num(11) + num(12)) as f64 / tick;
            let seen = self.cpu_seconds.get();
            if cpu > seen {
                self.cpu_seconds.inc_by(cpu - seen);
            }
            self.threads.set(num(17) as i64);
            self.virtual_bytes.set(num(20) as i64);
            self.resident_bytes.set((num(21) * page) as i64);
            if let Some(boot) = boot_time() {
                self.start_time
                    .set((boot + (num(19) as f64 / tick) as u64) as i64);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
            && let Some(line) = limits.lines().find(|l| l.starts_with("Max open files"))
            && let Some(soft) = line
                .trim_start_matches("Max open files")
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<i64>().ok())
        {
            self.max_fds.set(soft);
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 { v as u64 } else { 4096 }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as f64 } else { 100.0 }
}

fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_memory_descriptors_and_a_start_time() {
        let m = super::ProcessMetrics::default();
        m.refresh();
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(m.resident_bytes.get() > 0);
            assert!(m.open_fds.get() > 0 && m.max_fds.get() >= m.open_fds.get());
            assert!(m.start_time.get() > 1_600_000_000);
        }
    }
}
