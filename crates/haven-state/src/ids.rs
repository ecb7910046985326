//! Random identifiers (sessions, streams, tasks, processes), drawn from one place so that a
//! simulation can make them reproducible: a thread that called [`seed_this_thread`] draws them
//! from a seeded generator; every other thread from the operating system's randomness. Key
//! material never comes from here.

use std::cell::RefCell;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes this thread's identifiers a function of `seed` (for simulations); `None` goes back to
/// real randomness.
pub fn seed_this_thread(seed: Option<u64>) {
    SEEDED.with(|s| *s.borrow_mut() = seed.map(StdRng::seed_from_u64));
}

/// A random 64-bit identifier.
pub fn random_u64() -> u64 {
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(rng) => rng.random(),
        None => rand::random(),
    })
}

/// A random 128-bit identifier.
pub fn random_u128() -> u128 {
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(rng) => rng.random(),
        None => rand::random(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_thread_repeats_its_identifiers() {
        seed_this_thread(Some(7));
        let a = (random_u64(), random_u128());
        seed_this_thread(Some(7));
        assert_eq!(a, (random_u64(), random_u128()));
        seed_this_thread(None);
        assert_ne!(random_u64(), random_u64());
    }
}
