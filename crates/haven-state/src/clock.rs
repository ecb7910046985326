//! Hybrid logical clock: timestamps that follow wall-clock time but never go backwards and
//! always move past every timestamp this node has seen from others.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Bits of a [`Hlc`] that hold the logical counter; the rest hold milliseconds since the epoch.
const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock timestamp: wall-clock milliseconds in the high 48 bits and a logical
/// counter in the low 16 bits, so that ordering the raw `u64` orders the timestamps.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The smallest timestamp, older than every real one.
    pub const ZERO: Hlc = Hlc(0);

    /// Builds a timestamp from its wall-clock and logical parts.
    pub fn new(millis: u64, logical: u16) -> Hlc {
        Hlc((millis << LOGICAL_BITS) | u64::from(logical))
    }

    /// Wall-clock part: milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// Logical part: orders events within one millisecond.
    pub fn logical(self) -> u16 {
        (self.0 & ((1 << LOGICAL_BITS) - 1)) as u16
    }
}

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.millis(), self.logical())
    }
}

/// Source of wall-clock time, injectable so that simulations and tests control time.
pub trait PhysicalClock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl PhysicalClock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock whose time only moves when told to: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A manual clock set to `millis`.
    pub fn new(millis: u64) -> ManualClock {
        ManualClock(AtomicU64::new(millis))
    }

    /// Moves the clock forward (or backward, to simulate a skewed clock) to `millis`.
    pub fn set(&self, millis: u64) {
        self.0.store(millis, Ordering::SeqCst);
    }

    /// Moves the clock forward by `millis`.
    pub fn advance(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl PhysicalClock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A wall clock that follows tokio's clock (which tests pause and advance) from a starting
/// time, shifted by an offset that can change: a node's clock in a simulation, skew included.
#[derive(Debug)]
pub struct VirtualClock {
    base_millis: u64,
    start: tokio::time::Instant,
    offset_millis: std::sync::atomic::AtomicI64,
}

impl VirtualClock {
    /// A clock reading `base_millis` now, moving with tokio's time.
    pub fn new(base_millis: u64) -> VirtualClock {
        VirtualClock {
            base_millis,
            start: tokio::time::Instant::now(),
            offset_millis: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Sets how far this clock is ahead (positive) or behind (negative) of true time.
    pub fn set_offset(&self, millis: i64) {
        self.offset_millis.store(millis, Ordering::SeqCst);
    }
}

impl PhysicalClock for VirtualClock {
    fn now_millis(&self) -> u64 {
        let elapsed = self.start.elapsed().as_millis() as u64;
        (self.base_millis + elapsed)
            .saturating_add_signed(self.offset_millis.load(Ordering::SeqCst))
    }
}

/// A hybrid logical clock shared by everything that stamps writes on one node.
#[derive(Debug)]
pub struct HybridClock {
    last: AtomicU64,
    physical: Arc<dyn PhysicalClock>,
}

impl Default for HybridClock {
    fn default() -> Self {
        HybridClock::new(Arc::new(SystemClock))
    }
}

impl HybridClock {
    /// A clock driven by `physical`.
    pub fn new(physical: Arc<dyn PhysicalClock>) -> HybridClock {
        HybridClock {
            last: AtomicU64::new(0),
            physical,
        }
    }

    /// Wall-clock milliseconds from the physical clock (not a timestamp: may repeat or go back).
    pub fn wall_millis(&self) -> u64 {
        self.physical.now_millis()
    }

    /// A new timestamp, greater than every timestamp this clock returned or observed before.
    pub fn now(&self) -> Hlc {
        let wall = Hlc::new(self.physical.now_millis(), 0).0;
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = if wall > last { wall } else { last + 1 };
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Hlc(next),
                Err(actual) => last = actual,
            }
        }
    }

    /// Moves the clock past `remote`, a timestamp seen in a record written elsewhere, so that
    /// every later local write orders after it.
    pub fn observe(&self, remote: Hlc) {
        self.last.fetch_max(remote.0, Ordering::AcqRel);
    }

    /// The greatest timestamp returned or observed so far.
    pub fn last(&self) -> Hlc {
        Hlc(self.last.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let t = Hlc::new(1_700_000_000_123, 42);
        assert_eq!(t.millis(), 1_700_000_000_123);
        assert_eq!(t.logical(), 42);
        assert!(Hlc::new(5, 0) > Hlc::new(4, 65535));
    }

    #[test]
    fn monotonic_when_wall_clock_stalls_or_goes_back() {
        let wall = Arc::new(ManualClock::new(1000));
        let clock = HybridClock::new(wall.clone());
        let a = clock.now();
        let b = clock.now();
        assert!(b > a);
        wall.set(500);
        let c = clock.now();
        assert!(c > b);
        assert_eq!(c.millis(), 1000);
        wall.set(2000);
        assert_eq!(clock.now(), Hlc::new(2000, 0));
    }

    #[test]
    fn observe_moves_past_remote() {
        let wall = Arc::new(ManualClock::new(1000));
        let clock = HybridClock::new(wall);
        clock.observe(Hlc::new(9000, 7));
        let t = clock.now();
        assert!(t > Hlc::new(9000, 7));
    }
}
