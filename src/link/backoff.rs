//! Reconnect delays: exponential, capped, with jitter. Plain state, no clock;
//! the caller supplies randomness so tests are exact.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max: max.max(min), failures: 0 }
    }

    /// The delay before the next attempt after one more failure. `unit` is a
    /// random number in [0, 1): the delay is drawn from [ceiling/2, ceiling],
    /// so peers that fail together do not retry together.
    pub fn fail(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let unit = unit.clamp(0.0, 1.0);
        ceiling.mul_f64(0.5 + 0.5 * unit).max(self.min)
    }

    /// The current upper bound, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(30));
        self.min.saturating_mul(factor).min(self.max)
    }

    /// A success: the next failure starts from the minimum again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let ceilings: Vec<_> = (0..8)
            .map(|_| {
                let c = b.ceiling();
                b.fail(1.0);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn jitter_stays_within_half_to_full_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..3 {
            b.fail(0.5);
        }
        let ceiling = b.ceiling();
        let mut low = b.clone();
        let mut high = b.clone();
        assert_eq!(low.fail(0.0), ceiling / 2);
        assert_eq!(high.fail(0.999_999).as_millis(), ceiling.as_millis() - 1);
    }

    #[test]
    fn never_below_the_minimum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(b.fail(0.0), Duration::from_millis(100));
        for _ in 0..100 {
            b.fail(0.3);
        }
        assert!(b.ceiling() <= Duration::from_secs(10));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert_eq!(b.failures(), 0);
    }
}
