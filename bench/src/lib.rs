//! Haven's benchmark harness: a minimal MCP-over-HTTP client used by the load generator
//! (`mcp-load`) and the comparison runner (`bench-compare`), plus small shared helpers.
//!
//! The binaries are:
//! - `rmcp-reference`: the rmcp 3.x reference server (one `echo` tool);
//! - `mcp-load`: a closed-loop `tools/call` load generator for both MCP protocol eras;
//! - `bench-compare`: runs servers side by side in alternating rounds and reports ratios;
//! - `backup-bench`, `cluster-bench`, `federation-bench`: Haven's own scenarios, which start
//!   `haven serve` processes ([`haven_serve`], [`wait_ready`]) and load them with `mcp-load`
//!   ([`mcp_load`]).

pub mod client;
pub mod sse;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

/// The report `mcp-load` prints at the end of a run (one JSON line), as `bench-compare` and the
/// scenario benchmarks read it.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct LoadReport {
    pub url: String,
    pub era: String,
    pub connections: usize,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
    pub json_responses: u64,
    pub sse_responses: u64,
    pub reconnects: u64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_us_per_req: Option<f64>,
    pub load_cpu_s: f64,
    #[serde(default)]
    pub load_cpu_us_per_req: f64,
    #[serde(default)]
    pub other_cpu_s: Option<f64>,
    #[serde(default)]
    pub other_cpu_share: Option<f64>,
    #[serde(default)]
    pub error_samples: BTreeMap<String, u64>,
}

/// The load of a scenario benchmark: `mcp-load`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadFlags {
    /// Measured seconds per run.
    #[arg(long, default_value_t = 4.0)]
    pub duration: f64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Protocol era of the load: 2026 (stateless) or legacy.
    #[arg(long, default_value = "2026")]
    pub era: String,
}

impl LoadFlags {
    /// `mcp-load`'s arguments for a run against `url` after one second of warm-up.
    pub fn mcp_load_args(&self, url: &str) -> Vec<String> {
        [
            "--url",
            url,
            "--era",
            &self.era,
            "--connections",
            &self.connections.to_string(),
            "--duration",
            &self.duration.to_string(),
            "--warmup",
            "1",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// `haven serve` of the binary `bin` on loopback port `port` with data directory `data`,
/// quiet (warnings only, nothing on stdout or stderr); add arguments and spawn it.
pub fn haven_serve(bin: &Path, port: u16, data: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data)
        .env("HAVEN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Writes a key or token file that only its owner may read (mode 0600): Haven refuses key
/// files that other users can read.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Waits (at most 60 s) until the server on `port` answers `/readyz` with 200.
pub async fn wait_ready(port: u16, what: &str) -> anyhow::Result<()> {
    if !haven_testkit::wait_for_status(port, "/readyz", Duration::from_secs(60)).await {
        bail!("{what} did not become ready");
    }
    Ok(())
}

/// Waits (at most 60 s) until something accepts connections on `port`.
pub async fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    if !haven_testkit::wait_listening(port, Duration::from_secs(60)).await {
        bail!("{what} did not start listening on {port}");
    }
    Ok(())
}

/// Runs the load generator `mcp-load` (at `bin`) with `args` and returns its report; a run in
/// which calls failed is an error.
pub fn mcp_load(bin: &Path, args: &[String]) -> anyhow::Result<LoadReport> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .context("running mcp-load")?;
    let line = String::from_utf8_lossy(&out.stdout);
    let report: LoadReport = serde_json::from_str(line.trim())
        .with_context(|| format!("mcp-load: {line} {}", String::from_utf8_lossy(&out.stderr)))?;
    if report.errors != 0 {
        bail!("load errors ({}): {}", args.join(" "), line.trim());
    }
    Ok(report)
}

/// The MCP protocol era a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Era {
    /// The stateless 2026-07-28 revision: no initialize, per-request `_meta`, standard headers.
    Modern,
    /// The session-based 2025-11-25 revision: initialize, `Mcp-Session-Id`, then requests.
    Legacy,
}

impl Era {
    /// The protocol version string this era's client sends.
    pub fn protocol_version(self) -> &'static str {
        match self {
            Era::Modern => "2026-07-28",
            Era::Legacy => "2025-11-25",
        }
    }

    /// The short name used on command lines and in reports (`2026` or `legacy`).
    pub fn name(self) -> &'static str {
        match self {
            Era::Modern => "2026",
            Era::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Era {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Era {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "2026" | "2026-07-28" | "modern" | "stateless" => Ok(Era::Modern),
            "legacy" | "2025-11-25" | "sessions" => Ok(Era::Legacy),
            other => Err(format!(
                "unknown era `{other}` (expected `2026` or `legacy`)"
            )),
        }
    }
}

/// CPU time (user + system) consumed so far by process `pid`, read from `/proc/PID/stat`.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may contain spaces: skip past it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Machine-wide busy CPU seconds so far (all cores; user, nice, system, irq, softirq and
/// steal from `/proc/stat`), used to tell how much CPU other processes took during a run.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    Some(busy / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU time (user + system) consumed so far by the calling process, all threads included.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Median of a slice of numbers (mean of the two middle values for even lengths); NaN if empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// A distribution-free confidence interval for the median of `values` (order statistics of
/// the sign test): `(low, high, coverage)` with coverage at least 0.95, or `None` when there
/// are too few values for that (fewer than 6).
pub fn median_ci95(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    // P(Binomial(n, 1/2) <= j), accumulated term by term.
    let mut term = 0.5f64.powi(n as i32);
    let mut tail = 0.0;
    let mut k = 0;
    for j in 0..n {
        tail += term;
        if tail > 0.025 {
            break;
        }
        k = j + 1;
        term = term * (n - j) as f64 / (j + 1) as f64;
    }
    if k == 0 {
        return None;
    }
    // tail(k-1) = P(X <= k-1) <= 0.025: the interval [x_(k), x_(n+1-k)] (1-based) covers the
    // median with probability 1 - 2 * tail(k-1).
    let below: f64 = (0..k).map(|j| binomial(n, j) * 0.5f64.powi(n as i32)).sum();
    Some((sorted[k - 1], sorted[n - k], 1.0 - 2.0 * below))
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// Resident memory of process `pid` (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_handles_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn median_ci_uses_sign_test_order_statistics() {
        assert!(median_ci95(&[1.0, 2.0, 3.0, 4.0, 5.0]).is_none());
        let values: Vec<f64> = (1..=12).map(f64::from).collect();
        let (low, high, coverage) = median_ci95(&values).unwrap();
        // n = 12: P(X <= 2) = 79/4096, so the interval is [x_3, x_10] at 96.1 %.
        assert_eq!((low, high), (3.0, 10.0));
        assert!((coverage - (1.0 - 2.0 * 79.0 / 4096.0)).abs() < 1e-12);
        let (low, high, _) = median_ci95(&[5.0, 1.0, 4.0, 2.0, 3.0, 6.0]).unwrap();
        assert_eq!((low, high), (1.0, 6.0));
    }

    #[test]
    fn era_parses_aliases() {
        assert_eq!("2026".parse::<Era>().unwrap(), Era::Modern);
        assert_eq!("legacy".parse::<Era>().unwrap(), Era::Legacy);
        assert!("2024".parse::<Era>().is_err());
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let pid = std::process::id();
        assert!(process_cpu_seconds(pid).is_some());
        assert!(self_cpu_seconds() >= 0.0);
        assert!(machine_busy_seconds().is_some_and(|s| s > 0.0));
    }
}
