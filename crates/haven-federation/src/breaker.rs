//! The circuit breaker of one upstream, as plain state (the caller holds it under its lock and
//! passes the time in, so it is tested without a clock).

use std::time::{Duration, Instant};

/// How a call was let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// The breaker is closed.
    Normal,
    /// The breaker is half-open and this call is its one trial.
    Trial,
}

/// Closed → open after `threshold` consecutive failures → (after the cooldown) half-open, one
/// trial call → closed on its success, open again on its failure.
#[derive(Clone, Debug, Default)]
pub(crate) struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    /// Whether a call may go through now; `Err` holds how long the breaker stays open (zero
    /// while a trial call is in flight).
    pub(crate) fn admit(&mut self, now: Instant) -> Result<Admit, Duration> {
        match self.open_until {
            None => Ok(Admit::Normal),
            Some(until) if now < until => Err(until - now),
            Some(_) if self.trial_in_flight => Err(Duration::ZERO),
            Some(_) => {
                self.trial_in_flight = true;
                Ok(Admit::Trial)
            }
        }
    }

    /// The call succeeded (the upstream answered): the breaker closes.
    pub(crate) fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.trial_in_flight = false;
    }

    /// The call failed; returns whether the breaker opened because of it.
    pub(crate) fn failure(
        &mut self,
        admit: Admit,
        now: Instant,
        threshold: u32,
        cooldown: Duration,
    ) -> bool {
        self.failures = self.failures.saturating_add(1);
        match admit {
            Admit::Trial => {
                self.trial_in_flight = false;
                self.open_until = Some(now + cooldown);
                true
            }
            Admit::Normal => {
                if self.open_until.is_none() && self.failures >= threshold.max(1) {
                    self.open_until = Some(now + cooldown);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// The call ended without telling anything about the upstream (cancelled by the client,
    /// never sent): a trial slot is given back.
    pub(crate) fn release(&mut self, admit: Admit) {
        if admit == Admit::Trial {
            self.trial_in_flight = false;
        }
    }

    /// Whether the breaker is open or half-open.
    pub(crate) fn is_open(&self) -> bool {
        self.open_until.is_some()
    }

    /// Consecutive failures so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_millis(100);

    #[test]
    fn opens_after_threshold_and_half_opens_after_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for i in 0..2 {
            let a = b.admit(t0).unwrap();
            assert_eq!(a, Admit::Normal);
            assert!(
                !b.failure(a, t0, 3, COOL),
                "opened after {} failures",
                i + 1
            );
        }
        let a = b.admit(t0).unwrap();
        assert!(b.failure(a, t0, 3, COOL));
        assert!(b.is_open());
        // Refused during the cooldown, with the remaining time.
        let left = b.admit(t0 + Duration::from_millis(40)).unwrap_err();
        assert_eq!(left, Duration::from_millis(60));
        // After it: one trial, others refused while it runs.
        let t1 = t0 + COOL;
        assert_eq!(b.admit(t1).unwrap(), Admit::Trial);
        assert_eq!(b.admit(t1).unwrap_err(), Duration::ZERO);
        // A failed trial opens again for a full cooldown.
        assert!(b.failure(Admit::Trial, t1, 3, COOL));
        assert!(b.admit(t1 + Duration::from_millis(99)).is_err());
        let t2 = t1 + COOL;
        assert_eq!(b.admit(t2).unwrap(), Admit::Trial);
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.admit(t2).unwrap(), Admit::Normal);
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn success_resets_the_count_and_release_returns_the_trial() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        b.failure(Admit::Normal, t0, 2, COOL);
        b.success();
        assert!(!b.failure(Admit::Normal, t0, 2, COOL));
        assert!(b.failure(Admit::Normal, t0, 2, COOL));
        let t1 = t0 + COOL;
        assert_eq!(b.admit(t1).unwrap(), Admit::Trial);
        b.release(Admit::Trial);
        assert_eq!(b.admit(t1).unwrap(), Admit::Trial);
    }
}
