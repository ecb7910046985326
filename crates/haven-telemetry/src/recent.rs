//! What a node's requests looked like lately, kept in the process for its status page and
//! its heartbeat (so every node of every region can show every other's): availability over
//! the last hour and day, throughput and latency percentiles over the last five minutes.
//!
//! Requests are counted in one slot per wall-clock minute, the last [`DAY_MINUTES`] kept; a
//! slot holds the requests, the ones Haven failed (the same definition as the alert rules'
//! `region:haven_mcp_server_errors:rate5m`: errors except the client's own and a federated
//! upstream's) and a latency histogram of the requests that are not long by design. Every
//! function takes the time as an argument, so the windows are tested under a chosen clock.

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Minutes kept: a day.
pub const DAY_MINUTES: u64 = 24 * 60;

/// Upper bounds of the latency slots, in seconds (a geometric series, ×1.5 from 0.5 ms to
/// about a minute); a last slot holds everything longer.
fn bounds() -> &'static [f64; 30] {
    static B: std::sync::OnceLock<[f64; 30]> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let mut b = [0.0; 30];
        let mut v = 0.0005;
        for x in &mut b {
            *x = v;
            v *= 1.5;
        }
        b
    })
}

/// JSON-RPC error codes that are not Haven's failure: the client's (parse error, invalid
/// request, unknown method, invalid params, resource not found) and a federated upstream's.
const NOT_HAVENS: [&str; 8] = [
    "-32700", "-32600", "-32601", "-32602", "-32002", "-32050", "-32051", "-32052",
];

/// Whether an error answer with this JSON-RPC code counts against availability.
pub fn is_server_error(code: &str) -> bool {
    !NOT_HAVENS.contains(&code)
}

/// Whether a request is long by design, and so left out of the latency percentiles (as the
/// alert rules leave it out): a `subscriptions/listen` stream, `tasks/result` (it waits for
/// its task) and the catalog's `sleep` tool.
pub fn is_long_by_design(method: &str, tool: &str) -> bool {
    matches!(method, "subscriptions/listen" | "tasks/result") || tool == "sleep"
}

#[derive(Clone)]
struct Minute {
    /// Unix minute.
    at: u64,
    requests: u64,
    server_errors: u64,
    latency: [u32; 31],
}

impl Minute {
    fn new(at: u64) -> Minute {
        Minute {
            at,
            requests: 0,
            server_errors: 0,
            latency: [0; 31],
        }
    }
}

/// A node's recent requests, by minute.
#[derive(Default)]
pub struct Recent {
    minutes: Mutex<VecDeque<Minute>>,
}

/// A summary of [`Recent`] at a moment: what a heartbeat carries and the status page shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecentSummary {
    /// Requests answered in the last hour.
    pub requests_1h: u64,
    /// Of those, the ones Haven failed.
    pub server_errors_1h: u64,
    /// Requests answered in the last 24 hours.
    pub requests_24h: u64,
    /// Of those, the ones Haven failed.
    pub server_errors_24h: u64,
    /// Requests per second over the last five minutes.
    pub rate_5m: f64,
    /// Latency percentiles over the last five minutes, milliseconds (`None` without
    /// requests): p50, p95, p99.
    pub p50_ms: Option<f64>,
    /// See `p50_ms`.
    pub p95_ms: Option<f64>,
    /// See `p50_ms`.
    pub p99_ms: Option<f64>,
}

impl RecentSummary {
    /// Availability over the last hour (`None` without requests).
    pub fn availability_1h(&self) -> Option<f64> {
        availability(self.requests_1h, self.server_errors_1h)
    }

    /// Availability over the last 24 hours (`None` without requests).
    pub fn availability_24h(&self) -> Option<f64> {
        availability(self.requests_24h, self.server_errors_24h)
    }
}

/// The share of `requests` that were not `errors` (`None` for no requests).
pub fn availability(requests: u64, errors: u64) -> Option<f64> {
    (requests > 0).then(|| 1.0 - errors.min(requests) as f64 / requests as f64)
}

impl Recent {
    /// Counts a request that ended at `now_secs` (Unix seconds) after `took_secs`.
    /// `server_error`: Haven failed it; `timed`: it counts in the latency percentiles.
    pub fn record(&self, now_secs: u64, took_secs: f64, server_error: bool, timed: bool) {
        let at = now_secs / 60;
        let mut minutes = self.minutes.lock();
        if minutes.back().is_none_or(|m| m.at < at) {
            minutes.push_back(Minute::new(at));
            while minutes
                .front()
                .is_some_and(|m| m.at + DAY_MINUTES <= at || minutes.len() as u64 > DAY_MINUTES)
            {
                minutes.pop_front();
            }
        }
        // A clock stepped back lands in the newest slot.
        let m = minutes.back_mut().expect("pushed above");
        m.requests += 1;
        m.server_errors += server_error as u64;
        if timed {
            let slot = bounds().partition_point(|b| *b < took_secs);
            m.latency[slot] = m.latency[slot].saturating_add(1);
        }
    }

    /// The summary at `now_secs` (Unix seconds).
    pub fn summary(&self, now_secs: u64) -> RecentSummary {
        let now = now_secs / 60;
        let minutes = self.minutes.lock();
        let mut s = RecentSummary::default();
        let mut latency = [0u64; 31];
        let mut requests_5m = 0;
        for m in minutes.iter().filter(|m| m.at + DAY_MINUTES > now) {
            s.requests_24h += m.requests;
            s.server_errors_24h += m.server_errors;
            if m.at + 60 > now {
                s.requests_1h += m.requests;
                s.server_errors_1h += m.server_errors;
            }
            // The current minute and the four before it.
            if m.at + 5 > now {
                requests_5m += m.requests;
                for (t, c) in latency.iter_mut().zip(m.latency) {
                    *t += c as u64;
                }
            }
        }
        drop(minutes);
        // Over the whole minutes passed plus the part of the current one.
        let span = 4.0 * 60.0 + (now_secs % 60) as f64 + 1.0;
        s.rate_5m = requests_5m as f64 / span;
        s.p50_ms = quantile(&latency, 0.50).map(|v| v * 1000.0);
        s.p95_ms = quantile(&latency, 0.95).map(|v| v * 1000.0);
        s.p99_ms = quantile(&latency, 0.99).map(|v| v * 1000.0);
        s
    }
}

/// The `q` quantile of a latency histogram, interpolated linearly inside its slot (as
/// Prometheus' `histogram_quantile` does); the open last slot answers its lower bound.
fn quantile(counts: &[u64; 31], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let b = bounds();
    let mut seen = 0u64;
    for (i, c) in counts.iter().enumerate() {
        if *c > 0 && (seen + c) as f64 >= rank {
            if i == b.len() {
                return Some(b[b.len() - 1]);
            }
            let lower = if i == 0 { 0.0 } else { b[i - 1] };
            let within = (rank - seen as f64) / *c as f64;
            return Some(lower + (b[i] - lower) * within);
        }
        seen += c;
    }
    Some(b[b.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole minute (1 800 000 000 is divisible by 60).
    const T0: u64 = 1_800_000_000;

    #[test]
    fn availability_counts_the_hour_and_the_day() {
        let r = Recent::default();
        // Two hours ago: 10 requests, 5 failed; now: 100, 1 failed.
        for i in 0..10 {
            r.record(T0 - 7200, 0.01, i < 5, true);
        }
        for i in 0..100 {
            r.record(T0 + 10, 0.01, i == 0, true);
        }
        let s = r.summary(T0 + 20);
        assert_eq!((s.requests_1h, s.server_errors_1h), (100, 1));
        assert_eq!((s.requests_24h, s.server_errors_24h), (110, 6));
        assert_eq!(s.availability_1h(), Some(0.99));
        assert!((s.availability_24h().unwrap() - (1.0 - 6.0 / 110.0)).abs() < 1e-12);
        // A day and a minute later, none of it counts.
        let s = r.summary(T0 + 10 + DAY_MINUTES * 60 + 60);
        assert_eq!((s.requests_24h, s.availability_24h()), (0, None));
    }

    #[test]
    fn percentiles_and_rate_cover_five_minutes_and_leave_out_untimed_requests() {
        let r = Recent::default();
        // An old slow minute, out of the window.
        for _ in 0..50 {
            r.record(T0 - 600, 5.0, false, true);
        }
        // 90 fast and 10 slow requests, and long-by-design ones that are not timed.
        for _ in 0..90 {
            r.record(T0, 0.002, false, true);
        }
        for _ in 0..10 {
            r.record(T0 + 30, 0.4, false, true);
        }
        for _ in 0..20 {
            r.record(T0 + 30, 3600.0, false, false);
        }
        let s = r.summary(T0 + 59);
        let (p50, p99) = (s.p50_ms.unwrap(), s.p99_ms.unwrap());
        assert!((1.0..=3.0).contains(&p50), "p50 {p50}");
        assert!((200.0..=600.0).contains(&p99), "p99 {p99}");
        // 120 requests over 4 minutes and the 60 s of this one.
        assert!((s.rate_5m - 120.0 / 300.0).abs() < 1e-9, "{}", s.rate_5m);
        assert_eq!(Recent::default().summary(T0).p50_ms, None);
    }

    #[test]
    fn a_day_of_minutes_is_the_most_kept_and_a_clock_stepped_back_is_counted() {
        let r = Recent::default();
        for m in 0..(DAY_MINUTES + 100) {
            r.record(T0 + m * 60, 0.001, false, true);
        }
        assert_eq!(r.minutes.lock().len() as u64, DAY_MINUTES);
        r.record(T0, 0.001, true, true);
        let s = r.summary(T0 + (DAY_MINUTES + 99) * 60);
        assert_eq!((s.requests_1h, s.server_errors_1h), (61, 1));
    }

    #[test]
    fn server_errors_are_havens_own() {
        assert!(is_server_error("-32603"));
        assert!(is_server_error(""));
        assert!(!is_server_error("-32602"));
        assert!(!is_server_error("-32051"));
        assert!(is_long_by_design("tools/call", "sleep"));
        assert!(!is_long_by_design("tools/call", "echo"));
    }
}
