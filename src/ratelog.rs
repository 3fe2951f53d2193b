//! Log lines that a peer (or a flood of refused connections) could make
//! arbitrarily many of are said at most once per key per period, with how
//! many were held back since: a hostile input costs a counter increment,
//! never a log flood.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How often one kind of line may be logged.
pub const PERIOD: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct RateLog<K> {
    period: Duration,
    last: HashMap<K, (Instant, u64)>,
}

impl<K: Hash + Eq + Clone> RateLog<K> {
    pub fn new(period: Duration) -> RateLog<K> {
        RateLog { period, last: HashMap::new() }
    }

    /// Whether to log a line for `key` now: `Some(n)` with the lines held
    /// back since the last one, or `None` to stay silent (counted).
    pub fn allow(&mut self, key: &K) -> Option<u64> {
        self.allow_at(key, Instant::now())
    }

    pub fn allow_at(&mut self, key: &K, now: Instant) -> Option<u64> {
        match self.last.get_mut(key) {
            Some((at, held)) if now.saturating_duration_since(*at) < self.period => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                if self.last.len() >= 4096 {
                    // Bounded too: forget keys quiet for a period.
                    let period = self.period;
                    self.last.retain(|_, (at, _)| now.saturating_duration_since(*at) < period);
                }
                self.last.insert(key.clone(), (now, 0));
                Some(0)
            }
        }
    }
}

impl<K: Hash + Eq + Clone> Default for RateLog<K> {
    fn default() -> Self {
        RateLog::new(PERIOD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_period_per_key_with_the_count_held_back() {
        let mut r = RateLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(r.allow_at(&"a", t0), Some(0));
        assert_eq!(r.allow_at(&"a", t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow_at(&"a", t0 + Duration::from_secs(2)), None);
        assert_eq!(r.allow_at(&"b", t0 + Duration::from_secs(2)), Some(0), "each key on its own");
        assert_eq!(r.allow_at(&"a", t0 + Duration::from_secs(6)), Some(2));
        assert_eq!(r.allow_at(&"a", t0 + Duration::from_secs(7)), None);
    }
}
