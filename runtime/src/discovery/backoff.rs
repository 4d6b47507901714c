//! Retry delays: exponential, capped, with full jitter, so a fleet that lost etcd at the
//! same moment does not hammer it in lockstep when it comes back.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    #[cfg(test)]
    fn seeded(base: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            rng: fastrand::Rng::with_seed(seed),
            ..Backoff::new(base, max)
        }
    }

    /// The next delay: uniform in [ceiling/2, ceiling], where the ceiling doubles per
    /// attempt up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis().min(u64::MAX as u128) as u64;
        Duration::from_millis(ms / 2 + self.rng.u64(0..=ms - ms / 2))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_capped_and_jitter() {
        let mut b = Backoff::seeded(Duration::from_millis(100), Duration::from_secs(2), 3);
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        for d in &delays[5..] {
            assert!(
                *d >= Duration::from_secs(1) && *d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = delays[5..].iter().collect();
        assert!(distinct.len() > 1, "jittered");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
