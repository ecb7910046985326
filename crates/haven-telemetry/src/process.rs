//! The usual process metrics (`process_*`, as Prometheus' client libraries name them), read
//! from `/proc/self` at scrape, and the limits they are compared with (`haven_memory_limit_bytes`,
//! `haven_cpu_limit_cores`; the open-files limit is `process_max_fds`): the cgroup v2 limits of
//! the process's cgroup (`memory.max`, `cpu.max`, the smallest along the way up to the root of
//! `/sys/fs/cgroup`) when there are any, else the machine's memory and the CPUs the process may
//! run on. On a system without `/proc` the process metrics stay 0.

use std::path::Path;
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
    memory_limit: Gauge,
    cpu_limit: Gauge<f64, AtomicU64>,
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
        r.register_with_unit(
            "haven_memory_limit",
            "Memory the process may use: its cgroup's memory.max (cgroup v2) when set and below the machine's memory, else the machine's memory",
            Unit::Bytes,
            self.memory_limit.clone(),
        );
        r.register(
            "haven_cpu_limit_cores",
            "CPU the process may use, in cores: its cgroup's cpu.max quota / period (cgroup v2) when set and below the CPUs it may run on, else the number of those CPUs",
            self.cpu_limit.clone(),
        );
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
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let limits = cgroup_limits(Path::new(CGROUP_ROOT), &cgroup);
        let memory = [limits.memory_bytes, physical_memory()]
            .into_iter()
            .flatten()
            .min();
        if let Some(bytes) = memory {
            self.memory_limit.set(bytes.min(i64::MAX as u64) as i64);
        }
        let cpus = [limits.cpu_cores, usable_cpus()]
            .into_iter()
            .flatten()
            .min_by(f64::total_cmp);
        if let Some(cores) = cpus {
            self.cpu_limit.set(cores);
        }
    }
}

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup v2 limits of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct CgroupLimits {
    /// The smallest `memory.max` of the cgroup and its ancestors, if any is set.
    pub memory_bytes: Option<u64>,
    /// The smallest `cpu.max` quota / period of the cgroup and its ancestors, if any is set.
    pub cpu_cores: Option<f64>,
}

/// The cgroup v2 path of a process from its `/proc/PID/cgroup` (the `0::PATH` line), if it has
/// one and the path stays inside the cgroup namespace (a path with `..` lies outside what this
/// process can see under the mount).
pub(crate) fn cgroup_v2_path(proc_cgroup: &str) -> Option<&str> {
    let path = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim_end();
    (path.starts_with('/') && !path.split('/').any(|c| c == "..")).then_some(path)
}

/// A `memory.max` file: bytes, or `None` for `max` (no limit) and anything unreadable.
pub(crate) fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&b| b > 0)
}

/// A `cpu.max` file (`QUOTA PERIOD`, microseconds, or `max PERIOD`): cores, or `None` for no
/// limit and anything unreadable.
pub(crate) fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut f = text.split_whitespace();
    let quota: u64 = f.next()?.parse().ok()?;
    let period: u64 = f.next().map_or(Some(100_000), |p| p.parse().ok())?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// The limits of the cgroup `proc_cgroup` names, under `root` (the cgroup v2 mount): the
/// smallest of the cgroup's and each ancestor's up to `root` (a parent's limit binds its
/// children). Missing or unreadable files count as no limit.
pub(crate) fn cgroup_limits(root: &Path, proc_cgroup: &str) -> CgroupLimits {
    let mut out = CgroupLimits::default();
    let Some(path) = cgroup_v2_path(proc_cgroup) else {
        return out;
    };
    let mut dir = root.to_path_buf();
    let mut dirs = vec![dir.clone()];
    for part in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        dir.push(part);
        dirs.push(dir.clone());
    }
    for d in dirs {
        let read = |name: &str| std::fs::read_to_string(d.join(name)).ok();
        if let Some(b) = read("memory.max").as_deref().and_then(parse_memory_max) {
            out.memory_bytes = Some(out.memory_bytes.map_or(b, |m| m.min(b)));
        }
        if let Some(c) = read("cpu.max").as_deref().and_then(parse_cpu_max) {
            out.cpu_cores = Some(out.cpu_cores.map_or(c, |m| m.min(c)));
        }
    }
    out
}

/// The machine's physical memory.
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    (pages > 0).then(|| pages as u64 * page_size())
}

/// The CPUs this process may run on (its affinity mask), else the machine's online CPUs.
fn usable_cpus() -> Option<f64> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it.
    let n = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            libc::CPU_COUNT(&set) as i64
        } else {
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN) as i64
        }
    };
    (n > 0).then_some(n as f64)
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
        assert!(m.memory_limit.get() > 0);
        assert!(m.cpu_limit.get() > 0.0);
    }

    #[test]
    fn the_cgroup_v2_path_is_the_0_line_inside_the_namespace() {
        use super::cgroup_v2_path;
        assert_eq!(
            cgroup_v2_path("0::/system.slice/haven.service\n"),
            Some("/system.slice/haven.service")
        );
        // Hybrid: v1 controllers and the unified line.
        let hybrid = "12:memory:/x\n4:cpu,cpuacct:/x\n1:name=systemd:/x\n0::/\n";
        assert_eq!(cgroup_v2_path(hybrid), Some("/"));
        // cgroup v1 only, empty, odd.
        assert_eq!(cgroup_v2_path("4:memory:/docker/abc\n"), None);
        assert_eq!(cgroup_v2_path(""), None);
        assert_eq!(cgroup_v2_path("0::"), None);
        assert_eq!(cgroup_v2_path("0::relative"), None);
        // Outside the process's cgroup namespace.
        assert_eq!(cgroup_v2_path("0::/../../user.slice"), None);
    }

    #[test]
    fn memory_max_and_cpu_max_are_parsed_and_max_means_no_limit() {
        use super::{parse_cpu_max, parse_memory_max};
        assert_eq!(parse_memory_max("536870912\n"), Some(536_870_912));
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max(""), None);
        assert_eq!(parse_memory_max("0\n"), None);
        assert_eq!(parse_memory_max("-1"), None);
        assert_eq!(parse_memory_max("12k"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cpu_max("200000"), Some(2.0));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("100000 0"), None);
        assert_eq!(parse_cpu_max("100000 x"), None);
        assert_eq!(parse_cpu_max(""), None);
    }

    #[test]
    fn the_smallest_limit_on_the_way_up_binds_and_missing_files_are_no_limit() {
        use super::{CgroupLimits, cgroup_limits};
        let root = tempfile::tempdir().unwrap();
        let slice = root.path().join("haven.slice");
        let service = slice.join("haven.service");
        std::fs::create_dir_all(&service).unwrap();
        let write = |dir: &std::path::Path, name: &str, text: &str| {
            std::fs::write(dir.join(name), text).unwrap()
        };
        // The root of a real mount has neither file.
        write(&slice, "memory.max", "1073741824\n");
        write(&slice, "cpu.max", "max 100000\n");
        write(&service, "memory.max", "max\n");
        write(&service, "cpu.max", "250000 100000\n");
        let me = "0::/haven.slice/haven.service\n";
        assert_eq!(
            cgroup_limits(root.path(), me),
            CgroupLimits {
                memory_bytes: Some(1 << 30),
                cpu_cores: Some(2.5)
            }
        );
        write(&service, "memory.max", "268435456\n");
        write(&service, "cpu.max", "garbage");
        assert_eq!(
            cgroup_limits(root.path(), me),
            CgroupLimits {
                memory_bytes: Some(256 << 20),
                cpu_cores: None
            }
        );
        // A cgroup whose directory is not there (another mount), cgroup v1, no file at all.
        for other in ["0::/elsewhere/x\n", "4:memory:/x\n", ""] {
            assert_eq!(
                cgroup_limits(root.path(), other),
                CgroupLimits::default(),
                "{other}"
            );
        }
        assert_eq!(
            cgroup_limits(&root.path().join("absent"), me),
            CgroupLimits::default()
        );
    }
}
