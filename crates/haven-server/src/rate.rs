//! Rate limits: token buckets per client address, per principal and per (principal, tool),
//! bounded in memory, read against an injectable monotonic clock so that tests control time.
//!
//! Each bucket is kept in its GCRA form (the "generic cell rate algorithm", equivalent to a
//! token bucket): one number per key, the *theoretical arrival time* (TAT) at which the bucket
//! would be full again. A request at `now` is let through when
//! `max(TAT, now) + interval - now <= burst * interval`, and then moves TAT on by one interval;
//! otherwise it is refused, nothing is taken, and the caller learns how long until it would
//! pass. A bucket whose TAT has passed is full, which is the same as having no entry at all, so
//! such entries are dropped (swept) at will: memory holds only keys that were busy recently.
//!
//! A table holds at most `max_keys` entries. When it is full and a sweep frees nothing (every
//! key is busy, e.g. a flood from many addresses), a new key shares one *overflow* bucket with
//! every other key that did not fit, so memory stays bounded and a flood of distinct keys gets
//! one key's allowance between them, while the keys already in the table keep their own.
//!
//! The limits are settings (`limits.rate.*`), shared atomics read at every request; a change
//! applies to the next request (a bucket is one number whatever its quota; one in debt under
//! a slower quota counts as just empty under a faster one).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A monotonic clock: time since some fixed origin. Injectable so that tests move time by
/// hand instead of sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Time elapsed since the clock's origin.
    fn now(&self) -> Duration;
}

/// The process's monotonic clock.
#[derive(Debug)]
pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// Moves the clock on by `d`.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// A rate: `count` requests per `period`, with bursts of up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Requests per period (0: no limit).
    pub count: u64,
    /// The period.
    pub period: Duration,
    /// Requests let through at once by a full bucket (at least 1).
    pub burst: u64,
}

impl Quota {
    /// `rps` requests per second with bursts of `burst` (`rps` 0: no limit).
    pub fn per_second(rps: u64, burst: u64) -> Quota {
        Quota {
            count: rps,
            period: Duration::from_secs(1),
            burst,
        }
    }

    /// Whether this quota limits anything.
    pub fn is_limited(&self) -> bool {
        self.count > 0
    }

    /// Nanoseconds between two requests at the steady rate (at least 1).
    fn interval(&self) -> u64 {
        ((self.period.as_nanos() / u128::from(self.count.max(1))) as u64).max(1)
    }

    /// The rate as people read it: `5/s (burst 10)`.
    pub fn describe(&self) -> String {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            _ => {
                return format!(
                    "{} per {:?} (burst {})",
                    self.count, self.period, self.burst
                );
            }
        };
        format!("{}/{unit} (burst {})", self.count, self.burst)
    }
}

/// Sweeps of idle buckets happen at least this often while requests come.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// A full table is swept at most this often (a sweep walks the whole table).
const SWEEP_WHEN_FULL_GAP: Duration = Duration::from_secs(1);

/// One table of buckets, keyed by `K`, at most `max_keys` entries plus the overflow bucket.
#[derive(Debug)]
pub struct Limiter<K> {
    table: Mutex<Table<K>>,
}

#[derive(Debug)]
struct Table<K> {
    /// TAT of each key, nanoseconds since the clock's origin.
    tats: HashMap<K, u64>,
    /// TAT of the bucket shared by keys that did not fit.
    overflow: u64,
    last_sweep: u64,
}

impl<K: Hash + Eq> Default for Limiter<K> {
    fn default() -> Self {
        Limiter {
            table: Mutex::new(Table {
                tats: HashMap::new(),
                overflow: 0,
                last_sweep: 0,
            }),
        }
    }
}

/// One GCRA step on `tat`: `Ok` (and `tat` moved on) or how long until a request would pass.
fn step(tat: &mut u64, quota: &Quota, now: u64) -> Result<(), Duration> {
    let interval = quota.interval();
    let tolerance = interval.saturating_mul(quota.burst.max(1));
    // A bucket is never emptier than empty under the quota in force: a debt run up under a
    // slower quota does not outlast a change to a faster one.
    *tat = (*tat).min(now.saturating_add(tolerance));
    let next = (*tat).max(now).saturating_add(interval);
    let ahead = next - now;
    if ahead <= tolerance {
        *tat = next;
        Ok(())
    } else {
        Err(Duration::from_nanos(ahead - tolerance))
    }
}

impl<K: Hash + Eq> Limiter<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table<K>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one request for `key` at `now`, or says how long until one would pass. Nothing is
    /// taken from a bucket when the request is refused.
    pub fn check(
        &self,
        key: K,
        quota: &Quota,
        max_keys: usize,
        now: Duration,
    ) -> Result<(), Duration> {
        if !quota.is_limited() {
            return Ok(());
        }
        let now = now.as_nanos() as u64;
        let mut t = self.lock();
        let since_sweep = now.saturating_sub(t.last_sweep);
        if since_sweep >= SWEEP_EVERY.as_nanos() as u64
            || (t.tats.len() >= max_keys && since_sweep >= SWEEP_WHEN_FULL_GAP.as_nanos() as u64)
        {
            t.tats.retain(|_, tat| *tat > now);
            t.last_sweep = now;
        }
        if let Some(tat) = t.tats.get_mut(&key) {
            return step(tat, quota, now);
        }
        if t.tats.len() >= max_keys {
            return step(&mut t.overflow, quota, now);
        }
        let mut tat = now;
        let r = step(&mut tat, quota, now);
        t.tats.insert(key, tat);
        r
    }

    /// Keys held now (the overflow bucket not counted).
    pub fn len(&self) -> usize {
        self.lock().tats.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The rate limit settings in force, shared with whoever changes them at runtime (the binary
/// applies `limits.rate.*`). A rate of 0 turns that limit off.
#[derive(Debug)]
pub struct RateLimits {
    /// Requests per second from one client address, before authentication.
    pub per_ip_rps: AtomicU64,
    /// Burst per client address.
    pub per_ip_burst: AtomicU64,
    /// Requests per second of one principal, after authentication.
    pub per_principal_rps: AtomicU64,
    /// Burst per principal.
    pub per_principal_burst: AtomicU64,
    /// `tools/call` requests per second of one principal for one tool, unless the tool has
    /// its own rate in `tool_overrides`.
    pub per_tool_rps: AtomicU64,
    /// Burst per principal and tool.
    pub per_tool_burst: AtomicU64,
    /// Keys one table (addresses, principals, principal and tool pairs) holds at most.
    pub max_keys: AtomicUsize,
    /// Tools with their own rate, by name.
    pub tool_overrides: RwLock<HashMap<String, Quota>>,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_ip_rps: AtomicU64::new(0),
            per_ip_burst: AtomicU64::new(200),
            per_principal_rps: AtomicU64::new(0),
            per_principal_burst: AtomicU64::new(100),
            per_tool_rps: AtomicU64::new(0),
            per_tool_burst: AtomicU64::new(20),
            max_keys: AtomicUsize::new(100_000),
            tool_overrides: RwLock::new(HashMap::new()),
        }
    }
}

impl RateLimits {
    fn quota(rps: &AtomicU64, burst: &AtomicU64) -> Quota {
        Quota::per_second(rps.load(Ordering::Relaxed), burst.load(Ordering::Relaxed))
    }

    /// The quota of a tool: its own, or the default per-tool one.
    pub fn tool_quota(&self, tool: &str) -> Quota {
        let overrides = self
            .tool_overrides
            .read()
            .unwrap_or_else(|p| p.into_inner());
        match overrides.get(tool) {
            Some(q) => *q,
            None => Self::quota(&self.per_tool_rps, &self.per_tool_burst),
        }
    }

    /// Replaces the per-tool rates.
    pub fn set_tool_overrides(&self, overrides: HashMap<String, Quota>) {
        *self
            .tool_overrides
            .write()
            .unwrap_or_else(|p| p.into_inner()) = overrides;
    }
}

/// What a refused request exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The client address's rate.
    Address,
    /// The principal's rate.
    Principal,
    /// The principal's rate for one tool.
    Tool,
}

/// A request refused by a rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    /// Which limit.
    pub scope: Scope,
    /// The quota exceeded.
    pub quota: Quota,
    /// How long until a request of the same kind would pass.
    pub retry_after: Duration,
    /// The tool, for [`Scope::Tool`].
    pub tool: Option<String>,
}

impl Limited {
    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }

    /// The message for the client: what was exceeded, which setting, when to retry.
    pub fn message(&self) -> String {
        let rate = self.quota.describe();
        let (who, setting) = match self.scope {
            Scope::Address => (
                "this client address".to_owned(),
                "limits.rate.per_ip_rps".to_owned(),
            ),
            Scope::Principal => (
                "this principal".to_owned(),
                "limits.rate.per_principal_rps".to_owned(),
            ),
            Scope::Tool => {
                let tool = self.tool.as_deref().unwrap_or_default();
                (
                    format!("this principal's calls of tool '{tool}'"),
                    "limits.rate.per_tool_rps or limits.rate.tools".to_owned(),
                )
            }
        };
        format!(
            "Too Many Requests: {who} exceeded its rate of {rate} (setting {setting}); retry in {} s",
            self.retry_after_secs()
        )
    }
}

/// The rate limiters of one node: settings, clock and the three tables.
#[derive(Debug)]
pub struct RateLimiter {
    /// The settings in force.
    pub limits: Arc<RateLimits>,
    clock: Arc<dyn Clock>,
    ip: Limiter<IpAddr>,
    principal: Limiter<String>,
    tool: Limiter<(String, String)>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(Arc::default(), Arc::new(MonotonicClock::default()))
    }
}

impl RateLimiter {
    /// Limiters with `limits`, reading time from `clock`.
    pub fn new(limits: Arc<RateLimits>, clock: Arc<dyn Clock>) -> RateLimiter {
        RateLimiter {
            limits,
            clock,
            ip: Limiter::default(),
            principal: Limiter::default(),
            tool: Limiter::default(),
        }
    }

    fn max_keys(&self) -> usize {
        self.limits.max_keys.load(Ordering::Relaxed).max(1)
    }

    /// A request from client address `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        let l = &self.limits;
        let quota = RateLimits::quota(&l.per_ip_rps, &l.per_ip_burst);
        if !quota.is_limited() {
            return Ok(());
        }
        self.ip
            .check(ip, &quota, self.max_keys(), self.clock.now())
            .map_err(|retry_after| Limited {
                scope: Scope::Address,
                quota,
                retry_after,
                tool: None,
            })
    }

    /// Whether the per-principal limit is on (so that callers skip building the key).
    pub fn principal_limited(&self) -> bool {
        self.limits.per_principal_rps.load(Ordering::Relaxed) > 0
    }

    /// A request of the principal named `principal` ([`haven_auth::Principal::id`]).
    pub fn check_principal(&self, principal: &str) -> Result<(), Limited> {
        let l = &self.limits;
        let quota = RateLimits::quota(&l.per_principal_rps, &l.per_principal_burst);
        if !quota.is_limited() {
            return Ok(());
        }
        self.principal
            .check(
                principal.to_owned(),
                &quota,
                self.max_keys(),
                self.clock.now(),
            )
            .map_err(|retry_after| Limited {
                scope: Scope::Principal,
                quota,
                retry_after,
                tool: None,
            })
    }

    /// A `tools/call` of `tool` by the principal named `principal`.
    /// Whether calls of `tool` are rate limited.
    pub fn tool_limited(&self, tool: &str) -> bool {
        self.limits.tool_quota(tool).is_limited()
    }

    pub fn check_tool(&self, principal: &str, tool: &str) -> Result<(), Limited> {
        let quota = self.limits.tool_quota(tool);
        if !quota.is_limited() {
            return Ok(());
        }
        self.tool
            .check(
                (principal.to_owned(), tool.to_owned()),
                &quota,
                self.max_keys(),
                self.clock.now(),
            )
            .map_err(|retry_after| Limited {
                scope: Scope::Tool,
                quota,
                retry_after,
                tool: Some(tool.to_owned()),
            })
    }

    /// Keys held by the address, principal and tool tables.
    pub fn keys_held(&self) -> (usize, usize, usize) {
        (self.ip.len(), self.principal.len(), self.tool.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_full_bucket_lets_a_burst_through_then_the_steady_rate() {
        let l = Limiter::<u32>::default();
        let q = Quota::per_second(10, 3);
        let t0 = Duration::from_secs(5);
        for _ in 0..3 {
            assert_eq!(l.check(1, &q, 10, t0), Ok(()));
        }
        // The fourth must wait one interval (100 ms).
        assert_eq!(l.check(1, &q, 10, t0), Err(100 * MS));
        // A refusal takes nothing: the wait does not grow.
        assert_eq!(l.check(1, &q, 10, t0), Err(100 * MS));
        assert_eq!(l.check(1, &q, 10, t0 + 40 * MS), Err(60 * MS));
        assert_eq!(l.check(1, &q, 10, t0 + 100 * MS), Ok(()));
        assert_eq!(l.check(1, &q, 10, t0 + 100 * MS), Err(100 * MS));
        // Another key has its own bucket.
        assert_eq!(l.check(2, &q, 10, t0), Ok(()));
        // Idle for a while: the bucket is full again, not fuller than its burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.check(1, &q, 10, later), Ok(()));
        }
        assert!(l.check(1, &q, 10, later).is_err());
    }

    #[test]
    fn slower_rates_and_a_quota_change_apply_to_the_same_bucket() {
        let l = Limiter::<&str>::default();
        let per_min = Quota {
            count: 6,
            period: Duration::from_secs(60),
            burst: 1,
        };
        assert_eq!(per_min.describe(), "6/min (burst 1)");
        assert_eq!(l.check("a", &per_min, 10, Duration::ZERO), Ok(()));
        assert_eq!(
            l.check("a", &per_min, 10, Duration::ZERO),
            Err(Duration::from_secs(10))
        );
        // A more generous quota applies to the next request: the bucket is empty under it,
        // not ten seconds in debt.
        let fast = Quota::per_second(100, 50);
        assert_eq!(l.check("a", &fast, 10, Duration::ZERO), Err(10 * MS));
        assert_eq!(l.check("a", &fast, 10, 10 * MS), Ok(()));
        // Off: everything passes and nothing is stored.
        let off = Quota::per_second(0, 1);
        for _ in 0..100 {
            assert_eq!(l.check("b", &off, 10, Duration::ZERO), Ok(()));
        }
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn retry_after_is_rounded_up_to_whole_seconds() {
        let mut l = Limited {
            scope: Scope::Address,
            quota: Quota::per_second(1, 1),
            retry_after: MS,
            tool: None,
        };
        assert_eq!(l.retry_after_secs(), 1);
        l.retry_after = Duration::from_millis(1001);
        assert_eq!(l.retry_after_secs(), 2);
        l.retry_after = Duration::from_secs(2);
        assert_eq!(l.retry_after_secs(), 2);
        l.retry_after = Duration::ZERO;
        assert_eq!(l.retry_after_secs(), 1);
        assert!(
            l.message().contains("limits.rate.per_ip_rps"),
            "{}",
            l.message()
        );
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_within_max_keys_and_idle_keys_go() {
        let l = Limiter::<u64>::default();
        let q = Quota::per_second(1, 2);
        let max = 100;
        let t0 = Duration::from_secs(1);
        // Ten times more distinct keys than the table holds, all at once.
        let mut refused = 0;
        for k in 0..(10 * max as u64) {
            if l.check(k, &q, max, t0).is_err() {
                refused += 1;
            }
            assert!(l.len() <= max);
        }
        assert_eq!(l.len(), max);
        // The keys that fit had their own buckets; the rest shared one (burst 2).
        assert_eq!(refused, 10 * max - max - 2);
        // A key in the table keeps its own allowance.
        assert_eq!(l.check(0, &q, max, t0), Ok(()));
        // Once the buckets are full again, a full table is swept to make room.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(l.check(5000, &q, max, later), Ok(()));
        assert_eq!(l.len(), 1);
        // And idle keys go on the periodic sweep even when the table is not full.
        let much_later = later + SWEEP_EVERY;
        assert_eq!(l.check(5001, &q, max, much_later), Ok(()));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn the_limiter_reads_its_settings_and_clock_at_every_request() {
        let clock = Arc::new(ManualClock::default());
        let limits = Arc::new(RateLimits::default());
        let r = RateLimiter::new(limits.clone(), clock.clone());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Off by default: nothing is limited, nothing is stored.
        for _ in 0..1000 {
            r.check_ip(ip).unwrap();
            r.check_principal("anonymous").unwrap();
            r.check_tool("anonymous", "notes_put").unwrap();
        }
        assert_eq!(r.keys_held(), (0, 0, 0));
        limits.per_ip_rps.store(2, Ordering::Relaxed);
        limits.per_ip_burst.store(2, Ordering::Relaxed);
        r.check_ip(ip).unwrap();
        r.check_ip(ip).unwrap();
        let e = r.check_ip(ip).unwrap_err();
        assert_eq!((e.scope, e.retry_after), (Scope::Address, 500 * MS));
        assert_eq!(e.retry_after_secs(), 1);
        clock.advance(500 * MS);
        r.check_ip(ip).unwrap();
        // Per tool: the default rate, and a tool's own.
        limits.per_tool_rps.store(1, Ordering::Relaxed);
        limits.per_tool_burst.store(1, Ordering::Relaxed);
        limits.set_tool_overrides(HashMap::from([(
            "notes_put".to_owned(),
            Quota {
                count: 1,
                period: Duration::from_secs(60),
                burst: 1,
            },
        )]));
        r.check_tool("alice", "notes_put").unwrap();
        let e = r.check_tool("alice", "notes_put").unwrap_err();
        assert_eq!(e.retry_after_secs(), 60);
        assert!(e.message().contains("'notes_put'"), "{}", e.message());
        // Another principal, another tool: their own buckets.
        r.check_tool("bob", "notes_put").unwrap();
        r.check_tool("alice", "echo").unwrap();
        assert_eq!(
            r.check_tool("alice", "echo")
                .unwrap_err()
                .retry_after_secs(),
            1
        );
        // Per principal.
        limits.per_principal_rps.store(1, Ordering::Relaxed);
        limits.per_principal_burst.store(1, Ordering::Relaxed);
        r.check_principal("alice").unwrap();
        assert_eq!(
            r.check_principal("alice").unwrap_err().scope,
            Scope::Principal
        );
        r.check_principal("bob").unwrap();
    }
}
