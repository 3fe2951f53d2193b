//! Which of a route's endpoints to dial next: plain state, no I/O, no
//! clock (the route task turns `Retry` into a time).
//!
//! Endpoints that reached another instance of the peer cluster than the
//! one the route holds its session with, or an instance standing by, are
//! not dialed while the route has links; they are probed now and then
//! instead (the next holder of the peer is found that way). Once the route
//! has no link, every endpoint is tried again.

/// When to dial again after a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// At once (the next endpoint).
    Now,
    /// After a heartbeat interval.
    Heartbeat,
}

#[derive(Debug)]
pub(super) struct Endpoints {
    /// Where the round-robin goes on from.
    next: usize,
    /// Reached another instance of the peer, or one standing by.
    other_instance: Vec<bool>,
    /// Standby refusals in a row.
    standby_streak: usize,
}

impl Endpoints {
    pub(super) fn new(n: usize) -> Endpoints {
        Endpoints { next: 0, other_instance: vec![false; n], standby_streak: 0 }
    }

    fn len(&self) -> usize {
        self.other_instance.len()
    }

    /// The next endpoint to dial (there is one at least): one no live link
    /// uses (`in_use`) if there is one; while the route has links, never
    /// one that reached another instance, unless all did.
    pub(super) fn pick(&mut self, has_links: bool, in_use: impl Fn(usize) -> bool) -> usize {
        let n = self.len();
        if !has_links {
            self.other_instance.iter_mut().for_each(|o| *o = false);
        }
        let usable = |ep: usize| !self.other_instance[ep];
        let order = |next: usize| (0..n).map(move |i| (next + i) % n);
        let ep = order(self.next)
            .find(|&ep| usable(ep) && !in_use(ep))
            .or_else(|| order(self.next).find(|&ep| usable(ep)))
            .unwrap_or(self.next % n);
        self.next = ep + 1;
        ep
    }

    /// Whether any endpoint is worth a probe (it reached another instance).
    pub(super) fn probing(&self) -> bool {
        self.other_instance.iter().any(|o| *o)
    }

    /// The next endpoint to probe, if any.
    pub(super) fn probe(&mut self) -> Option<usize> {
        let n = self.len();
        let ep = (0..n).map(|i| (self.next + i) % n).find(|&ep| self.other_instance[ep])?;
        self.next = ep + 1;
        Some(ep)
    }

    /// `ep` reached another instance of the peer than the route's.
    pub(super) fn other_instance(&mut self, ep: usize) {
        self.other_instance[ep] = true;
    }

    /// `ep`'s instance stands by (another of its cluster holds our route):
    /// the next endpoint at once, round the list once, then each heartbeat
    /// (the holder may be on its way).
    pub(super) fn standby(&mut self, ep: usize) -> Retry {
        self.other_instance[ep] = true;
        self.standby_streak += 1;
        if self.standby_streak >= self.len() {
            self.standby_streak = 0;
            Retry::Heartbeat
        } else {
            Retry::Now
        }
    }

    /// Any outcome but a standby refusal ends a streak of them.
    pub(super) fn not_standby(&mut self) {
        self.standby_streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_prefers_endpoints_no_link_uses() {
        let mut e = Endpoints::new(3);
        assert_eq!(e.pick(false, |_| false), 0);
        assert_eq!(e.pick(true, |ep| ep == 0), 1);
        // 0 and 1 in use: 2, then round again past the ones in use.
        assert_eq!(e.pick(true, |ep| ep < 2), 2);
        assert_eq!(e.pick(true, |ep| ep != 1), 1);
        // All in use: the next in turn.
        assert_eq!(e.pick(true, |_| true), 2);
        assert_eq!(e.pick(true, |_| true), 0);
    }

    #[test]
    fn another_instance_is_not_dialed_while_the_route_has_links() {
        let mut e = Endpoints::new(3);
        e.other_instance(1);
        assert!(e.probing());
        assert_eq!(e.pick(true, |_| false), 0);
        assert_eq!(e.pick(true, |_| false), 2);
        assert_eq!(e.pick(true, |_| false), 0, "1 is skipped");
        // It is probed instead.
        assert_eq!(e.probe(), Some(1));
        // Every endpoint reached another instance: the next in turn anyway.
        e.other_instance(0);
        e.other_instance(2);
        assert_eq!(e.pick(true, |_| false), 2);
        // Without links, the marks are forgotten: all are tried again.
        assert_eq!(e.pick(false, |_| false), 0);
        assert!(!e.probing());
        assert_eq!(e.probe(), None);
    }

    #[test]
    fn standby_refusals_go_round_the_list_once_then_wait() {
        let mut e = Endpoints::new(3);
        assert_eq!(e.standby(0), Retry::Now);
        assert_eq!(e.standby(1), Retry::Now);
        assert_eq!(e.standby(2), Retry::Heartbeat);
        // The streak starts again.
        assert_eq!(e.standby(0), Retry::Now);
        e.not_standby();
        assert_eq!(e.standby(1), Retry::Now);
        assert_eq!(e.standby(2), Retry::Now);
        assert_eq!(e.standby(0), Retry::Heartbeat);
        // One endpoint: every refusal waits a heartbeat.
        let mut one = Endpoints::new(1);
        assert_eq!(one.standby(0), Retry::Heartbeat);
        assert_eq!(one.standby(0), Retry::Heartbeat);
    }
}
