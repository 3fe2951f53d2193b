//! A peer's refusal budget. Every message a peer sends that this gateway
//! refuses (forged, stale, over a quota, undecodable...) still costs the
//! gateway the work of reading and refusing it, on the CPUs every other
//! peer's traffic needs too. So refusals are paid for: each peer may cause
//! at most `rate` per second (a burst of one second's worth), and a peer
//! past it is read no further until its budget is back above zero. Its
//! messages wait (its route's window fills and it stops sending); nothing
//! is dropped, and a peer whose messages are accepted never pays.
//!
//! Plain state: the caller passes the time.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Budget {
    /// Refusals per second; 0 = unlimited.
    rate: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Budget {
    pub fn new(per_second: usize) -> Budget {
        Budget { rate: per_second as f64, tokens: per_second as f64, at: None }
    }

    /// Charges `n` refusals at `now`. Past the budget, returns how long the
    /// peer is not read: until its budget is back to zero.
    pub fn spend(&mut self, n: u64, now: Instant) -> Option<Duration> {
        if self.rate == 0.0 || n == 0 {
            return None;
        }
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.rate);
        }
        self.at = Some(now);
        self.tokens -= n as f64;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_one_seconds_worth_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Budget::new(1000);
        // A second's worth at once is free.
        assert_eq!(b.spend(1000, t0), None);
        // One more: a millisecond's wait.
        let wait = b.spend(1, t0).unwrap();
        assert!((wait.as_secs_f64() - 0.001).abs() < 1e-9, "{wait:?}");
        // After waiting it out, the budget is zero: 10 ms later, 10 more
        // are free and the 11th is not.
        let t1 = t0 + wait + Duration::from_millis(10);
        assert_eq!(b.spend(10, t1), None);
        assert!(b.spend(1, t1).is_some());
        // A long quiet refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(b.spend(1000, t2), None);
        assert!(b.spend(1, t2).is_some());
    }

    #[test]
    fn a_flood_is_held_to_the_rate() {
        // 100,000 refusals offered as fast as allowed: the waits add up to
        // what the rate says, less the burst.
        let t0 = Instant::now();
        let mut b = Budget::new(10_000);
        let mut now = t0;
        for _ in 0..1000 {
            if let Some(wait) = b.spend(100, now) {
                now += wait;
            }
        }
        let took = now.duration_since(t0).as_secs_f64();
        assert!((took - 9.0).abs() < 0.01, "{took}");
    }

    #[test]
    fn zero_means_unlimited_and_nothing_costs_nothing() {
        let t0 = Instant::now();
        let mut b = Budget::new(0);
        assert_eq!(b.spend(u64::MAX, t0), None);
        let mut b = Budget::new(5);
        assert_eq!(b.spend(0, t0), None);
        assert!(b.spend(6, t0).is_some());
    }
}
