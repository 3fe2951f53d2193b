//! Which routes this instance holds when several gateway instances of one
//! cluster run (`[erlang] coordinate = true`). Plain state: no I/O, no
//! clock (the shell passes the time in).
//!
//! Each instance claims every route it has: its pg process joins the
//! route's claim group (`group_term`) on every local node. The claims of a
//! group are ordered by age, as the coordinating node's scope took them.
//! The coordinating node is the connected node with the least name whose
//! scope is known, so every instance that sees the same nodes asks the
//! same one. One scope process takes joins and leaves one at a time and
//! tells every watcher (`pg:monitor/2`) of them in that order, so the
//! instances agree without a protocol of their own.
//!
//! Routes are spread over the instances: the routes claimed by the same
//! set of instances, in name order, go round that set in age order (the
//! first to the oldest claim, the second to the next...). Every instance
//! of the set claims all of those routes, so all of them compute the same.
//! With one route, the oldest claim holds it, and a restarted instance,
//! the newest, stands by; with more, an instance that comes back takes its
//! share again (the one it takes them from leaves them gracefully).
//!
//! An instance that knows no coordinating node for `give_up` gives its
//! routes up: a gateway cut off from its cluster cannot serve them, and
//! its siblings, which still see the cluster, take them over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::etf::{Pid, Ref, Term};

/// What the gateway is to do with a route (part of the local-side contract).
pub use crate::local::Step;

/// The pg group whose members claim the route to `cluster`:
/// `{wandist_claim, <<Cluster>>}` (never exported, never imported:
/// `is_claim_group`).
pub fn group_term(cluster: &str) -> Term {
    Term::tuple(vec![Term::atom(CLAIM_TAG), Term::Binary(cluster.as_bytes().to_vec())])
}

/// The pg group an instance joins once it serves the route to `cluster`
/// (its session is up and the peer's members are in pg through it):
/// `{wandist_serving, <<Cluster>>}`. An instance handing the route over
/// waits for the next one to be in it before it withdraws its own.
pub fn serving_term(cluster: &str) -> Term {
    Term::tuple(vec![Term::atom(SERVING_TAG), Term::Binary(cluster.as_bytes().to_vec())])
}

const CLAIM_TAG: &str = "wandist_claim";
const SERVING_TAG: &str = "wandist_serving";

/// Whether a group term is a claim or serving group (reserved for the
/// gateways).
pub fn is_claim_group(t: &Term) -> bool {
    matches!(t.as_tuple(), Some([tag, _]) if matches!(tag.as_atom(), Some(CLAIM_TAG | SERVING_TAG)))
}

#[derive(Debug, Default)]
struct Claim {
    held: bool,
    /// The coordinating scope's monitor on the claim group, once it answered.
    watch: Option<Ref>,
    /// The claims in the group, oldest first, once the scope answered.
    order: Option<Vec<Pid>>,
    /// The same for the serving group.
    serving_watch: Option<Ref>,
    serving: Option<Vec<Pid>>,
    /// The claim was withdrawn (`unclaim`); the groups are still watched.
    withdrawn: bool,
}

#[derive(Debug)]
pub struct Claims {
    me: Pid,
    routes: BTreeMap<Arc<str>, Claim>,
    coordinator: Option<Arc<str>>,
    /// Monitor calls sent to the coordinator and not answered: tag ->
    /// (route, whether for its serving group).
    calls: BTreeMap<u64, (Arc<str>, bool)>,
    /// Since when no coordinating node has been known.
    orphaned_since: Option<Instant>,
    give_up: Duration,
    /// Orders changed since the last decision.
    dirty: bool,
}

impl Claims {
    /// `me`: the pg process whose membership is this instance's claim.
    pub fn new(me: Pid, give_up: Duration) -> Claims {
        Claims {
            me,
            routes: BTreeMap::new(),
            coordinator: None,
            calls: BTreeMap::new(),
            orphaned_since: None,
            give_up,
            dirty: false,
        }
    }

    /// Claims the route to `cluster` (the caller joins the claim group and,
    /// with a coordinator, asks for its order). False if already claimed.
    pub fn claim(&mut self, cluster: Arc<str>) -> bool {
        match self.routes.get_mut(&cluster) {
            Some(c) if c.withdrawn => {
                c.withdrawn = false;
                self.dirty = true;
                true
            }
            Some(_) => false,
            None => {
                self.routes.insert(cluster, Claim::default());
                true
            }
        }
    }

    /// Withdraws the claim (the caller leaves the group): released if held.
    /// The route's groups are still watched, so a hand-over sees who
    /// serves it next (`another_serves`).
    pub fn unclaim(&mut self, cluster: &str) -> Option<Step> {
        let claim = self.routes.get_mut(cluster).filter(|c| !c.withdrawn)?;
        claim.withdrawn = true;
        let held = std::mem::take(&mut claim.held);
        // (The other routes' rounds may change: decided with the rest.)
        self.dirty = true;
        held.then(|| Step::Release(cluster.into()))
    }

    /// Decides who holds what after the changes so far (the caller calls
    /// it once whatever arrived together has been taken in, so a burst of
    /// notifications is one decision).
    pub fn decide(&mut self) -> Vec<Step> {
        if !std::mem::take(&mut self.dirty) {
            return Vec::new();
        }
        self.decide_all()
    }

    /// Every route claimed.
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<str>> {
        self.routes.iter().filter(|(_, c)| !c.withdrawn).map(|(k, _)| k)
    }

    pub fn holds(&self, cluster: &str) -> bool {
        self.routes.get(cluster).is_some_and(|c| c.held)
    }

    pub fn coordinator(&self) -> Option<&Arc<str>> {
        self.coordinator.as_ref()
    }

    /// The coordinating node is now `node` (None: none is known). When it
    /// changes, every order is asked again (the caller sends a monitor call
    /// per claimed route, `calling`); what is held stays held meanwhile.
    /// None if unchanged; else the monitors on the previous coordinator,
    /// to be ended.
    pub fn set_coordinator(&mut self, node: Option<Arc<str>>) -> Option<Vec<(Arc<str>, Ref)>> {
        if node == self.coordinator {
            return None;
        }
        if node.is_some() {
            self.orphaned_since = None;
        }
        self.calls.clear();
        let previous = std::mem::replace(&mut self.coordinator, node);
        let mut old = Vec::new();
        for c in self.routes.values_mut() {
            c.order = None;
            c.serving = None;
            for w in [c.watch.take(), c.serving_watch.take()].into_iter().flatten() {
                if let Some(n) = &previous {
                    old.push((n.clone(), w));
                }
            }
        }
        Some(old)
    }

    /// A monitor call for `cluster`'s claim group (or, with `serving`, its
    /// serving group) went to the coordinator.
    pub fn calling(&mut self, tag: u64, cluster: Arc<str>, serving: bool) {
        self.calls.insert(tag, (cluster, serving));
    }

    /// Whether monitor calls to the coordinator are unanswered (a scope
    /// that ends meanwhile likely could not take them: `pg:monitor/2` is
    /// OTP 25.1 and later).
    pub fn waiting(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Whether `tag` is a monitor call this is waiting on.
    pub fn is_call(&self, tag: u64) -> bool {
        self.calls.contains_key(&tag)
    }

    /// The coordinator's answer to a monitor call: its monitor, and the
    /// group's members as pg lists them (the latest joined first).
    pub fn answered(&mut self, tag: u64, watch: Ref, newest_first: Vec<Pid>) {
        let Some((cluster, serving)) = self.calls.remove(&tag) else { return };
        let Some(claim) = self.routes.get_mut(&cluster) else { return };
        let order = Some(newest_first.into_iter().rev().collect());
        if serving {
            claim.serving_watch = Some(watch);
            claim.serving = order;
        } else {
            claim.watch = Some(watch);
            claim.order = order;
        }
        self.dirty = true;
    }

    /// Pids joined the group watched by `watch` (they are the newest).
    pub fn joined(&mut self, watch: &Ref, pids: Vec<Pid>) {
        if let Some(order) = self.watched(watch) {
            order.extend(pids);
            self.dirty = true;
        }
    }

    /// Pids left the group watched by `watch`.
    pub fn left(&mut self, watch: &Ref, pids: &[Pid]) {
        if let Some(order) = self.watched(watch) {
            for p in pids {
                // (pg lets a pid join twice; one leave takes one.)
                if let Some(i) = order.iter().position(|o| o == p) {
                    order.remove(i);
                }
            }
            self.dirty = true;
        }
    }

    /// Whether another instance serves `cluster`'s route (is in its
    /// serving group).
    pub fn another_serves(&self, cluster: &str) -> bool {
        self.routes.get(cluster).and_then(|c| c.serving.as_ref()).is_some_and(|s| s.iter().any(|p| *p != self.me))
    }

    /// Whether another instance claims `cluster`'s route (true while the
    /// order is not known: there may be one; false for a route never
    /// claimed here).
    pub fn another_claims(&self, cluster: &str) -> bool {
        self.routes.get(cluster).is_some_and(|c| c.order.as_ref().is_none_or(|o| o.iter().any(|p| *p != self.me)))
    }

    /// On a timer: with no coordinating node for `give_up`, every route
    /// held is given up.
    pub fn tick(&mut self, now: Instant) -> Vec<Step> {
        if self.coordinator.is_some() {
            return Vec::new();
        }
        let since = *self.orphaned_since.get_or_insert(now);
        if now.duration_since(since) < self.give_up {
            return Vec::new();
        }
        let mut steps = Vec::new();
        for (cluster, c) in &mut self.routes {
            if std::mem::take(&mut c.held) {
                steps.push(Step::Release(cluster.clone()));
            }
        }
        steps
    }

    /// The order a monitor of ours watches (a claim or a serving group).
    fn watched(&mut self, watch: &Ref) -> Option<&mut Vec<Pid>> {
        self.routes.values_mut().find_map(|c| {
            if c.watch.as_ref() == Some(watch) {
                c.order.as_mut()
            } else if c.serving_watch.as_ref() == Some(watch) {
                c.serving.as_mut()
            } else {
                None
            }
        })
    }

    /// Who holds what, for every route whose order is known: the routes
    /// with the same set of claims, in name order, go round that set in
    /// age order. (Routes waiting for an order stay as they are.)
    fn decide_all(&mut self) -> Vec<Step> {
        let sets: Vec<(Arc<str>, Vec<Pid>)> = self
            .routes
            .iter()
            .filter(|(_, claim)| !claim.withdrawn)
            .filter_map(|(c, claim)| {
                let mut set = claim.order.clone()?;
                set.sort();
                set.dedup();
                Some((c.clone(), set))
            })
            .collect();
        let mut steps = Vec::new();
        for (cluster, set) in &sets {
            // (BTreeMap: in name order.)
            let rank = sets.iter().filter(|(_, s)| s == set).position(|(c, _)| c == cluster).unwrap_or(0);
            let claim = self.routes.get_mut(cluster).expect("a claimed route");
            let order = claim.order.as_ref().expect("an order");
            let mut by_age: Vec<&Pid> = Vec::with_capacity(order.len());
            for p in order {
                if !by_age.contains(&p) {
                    by_age.push(p);
                }
            }
            let want = !by_age.is_empty() && *by_age[rank % by_age.len()] == self.me;
            if want != claim.held {
                claim.held = want;
                steps.push(if want { Step::Hold(cluster.clone()) } else { Step::Release(cluster.clone()) });
            }
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(node: &str, id: u32) -> Pid {
        Pid { node: node.into(), id, serial: 0, creation: 1 }
    }

    fn watch(n: u32) -> Ref {
        Ref { node: "a1@h".into(), creation: 1, ids: vec![n, 0, 0] }
    }

    fn hold(c: &str) -> Step {
        Step::Hold(c.into())
    }

    fn release(c: &str) -> Step {
        Step::Release(c.into())
    }

    #[test]
    fn the_oldest_claim_holds_and_a_later_one_waits_for_it_to_leave() {
        let (me, sibling) = (pid("gw_b@h", 1), pid("gw_a@h", 1));
        let mut c = Claims::new(me.clone(), Duration::from_secs(5));
        assert!(c.claim("dc2".into()));
        assert!(!c.claim("dc2".into()), "claimed once");
        assert_eq!(c.set_coordinator(Some("a1@h".into())), Some(vec![]), "a first coordinator");
        assert_eq!(c.set_coordinator(Some("a1@h".into())), None, "unchanged");
        c.calling(7, "dc2".into(), false);
        // pg lists the latest joined first: the sibling was there first.
        c.answered(7, watch(1), vec![me.clone(), sibling.clone()]);
        assert_eq!(c.decide(), vec![]);
        assert!(!c.holds("dc2"));
        // Another claim joins after ours: it changes nothing.
        c.joined(&watch(1), vec![pid("gw_c@h", 1)]);
        assert_eq!(c.decide(), vec![]);
        // A notification for a monitor not ours (an earlier coordinator's) is ignored.
        c.left(&watch(9), std::slice::from_ref(&sibling));
        assert_eq!(c.decide(), vec![]);
        // The sibling's claim leaves (it stopped, or its connection dropped): ours is oldest.
        c.left(&watch(1), std::slice::from_ref(&sibling));
        assert_eq!(c.decide(), vec![hold("dc2")]);
        assert_eq!(c.decide(), vec![], "decided once");
        // It comes back: it is the newest now, and we keep the route.
        c.joined(&watch(1), vec![pid("gw_a@h", 2)]);
        assert_eq!(c.decide(), vec![]);
        assert!(c.holds("dc2"));
        // Withdrawn by a reload: released.
        assert_eq!(c.unclaim("dc2"), Some(release("dc2")));
        assert_eq!(c.unclaim("dc2"), None);
    }

    #[test]
    fn a_new_coordinator_is_asked_again_and_its_order_decides() {
        let (me, sibling) = (pid("gw_a@h", 1), pid("gw_b@h", 1));
        let mut c = Claims::new(me.clone(), Duration::from_secs(5));
        c.claim("dc2".into());
        c.set_coordinator(Some("a2@h".into()));
        c.calling(1, "dc2".into(), false);
        c.answered(1, watch(1), vec![sibling.clone(), me.clone()]);
        assert_eq!(c.decide(), vec![hold("dc2")]);
        // A node with a lesser name comes: the order is asked again, what
        // is held stays held meanwhile, and the old monitor is handed back.
        let old = c.set_coordinator(Some("a1@h".into())).unwrap();
        assert_eq!(old, vec![("a2@h".into(), watch(1))]);
        assert!(c.holds("dc2"));
        assert!(!c.is_call(1), "answers to the old coordinator's calls are not taken");
        c.answered(1, watch(1), vec![me.clone()]);
        assert_eq!(c.decide(), vec![]);
        // There, the sibling's claim is older.
        c.calling(3, "dc2".into(), false);
        c.answered(3, watch(3), vec![me.clone(), sibling.clone()]);
        assert_eq!(c.decide(), vec![release("dc2")]);
    }

    #[test]
    fn with_no_coordinator_for_the_give_up_time_routes_are_released() {
        let me = pid("gw_a@h", 1);
        let mut c = Claims::new(me.clone(), Duration::from_secs(5));
        c.claim("dc2".into());
        c.set_coordinator(Some("a1@h".into()));
        c.calling(1, "dc2".into(), false);
        c.answered(1, watch(1), vec![me.clone()]);
        assert_eq!(c.decide(), vec![hold("dc2")]);
        let t0 = Instant::now();
        assert_eq!(c.tick(t0), vec![], "a coordinator is known");
        c.set_coordinator(None);
        assert_eq!(c.tick(t0), vec![]);
        assert_eq!(c.tick(t0 + Duration::from_secs(4)), vec![]);
        assert_eq!(c.tick(t0 + Duration::from_secs(5)), vec![release("dc2")]);
        assert_eq!(c.tick(t0 + Duration::from_secs(6)), vec![], "released once");
        // A coordinator again: the order decides again.
        c.set_coordinator(Some("a1@h".into()));
        c.calling(2, "dc2".into(), false);
        c.answered(2, watch(2), vec![me]);
        assert_eq!(c.decide(), vec![hold("dc2")]);
        // A coordinator back in time resets the clock.
        c.set_coordinator(None);
        assert_eq!(c.tick(t0 + Duration::from_secs(10)), vec![]);
        c.set_coordinator(Some("a1@h".into()));
        c.set_coordinator(None);
        assert_eq!(c.tick(t0 + Duration::from_secs(14)), vec![], "the clock started again");
    }

    fn held(c: &Claims) -> Vec<bool> {
        ["dc2", "dc3", "dc4", "dc5"].iter().map(|cl| c.holds(cl)).collect()
    }

    #[test]
    fn routes_claimed_by_the_same_instances_go_round_them_by_age() {
        let (a, b, me) = (pid("gw_a@h", 1), pid("gw_b@h", 1), pid("gw_c@h", 1));
        let mut c = Claims::new(me.clone(), Duration::from_secs(5));
        for cl in ["dc2", "dc3", "dc4", "dc5"] {
            c.claim(cl.into());
        }
        c.set_coordinator(Some("a1@h".into()));
        // dc2..dc4 are claimed by a, b and us (a oldest, then us, then b);
        // dc5 by us alone (say the others have no route to it).
        for (tag, cl) in [(1, "dc2"), (2, "dc3"), (3, "dc4")] {
            c.calling(tag, cl.into(), false);
            c.answered(tag, watch(tag as u32), vec![b.clone(), me.clone(), a.clone()]);
        }
        c.calling(4, "dc5".into(), false);
        c.answered(4, watch(4), vec![me.clone()]);
        // Round {a, b, us} by age: dc2 -> a, dc3 -> us, dc4 -> b; dc5 is ours alone.
        assert_eq!(c.decide(), vec![hold("dc3"), hold("dc5")]);
        assert_eq!(held(&c), [false, true, false, true]);
        // a stops (its claims leave together): {us, b} by age: dc2 -> us,
        // dc3 -> b, dc4 -> us; each route changes hands once.
        for n in 1..=3 {
            c.left(&watch(n), std::slice::from_ref(&a));
        }
        assert_eq!(c.decide(), vec![hold("dc2"), release("dc3"), hold("dc4")]);
        // a comes back, the newest: {us, b, a}: dc2 -> us, dc3 -> b, dc4 -> a.
        for n in 1..=3 {
            c.joined(&watch(n), vec![pid("gw_a@h", 2)]);
        }
        assert_eq!(c.decide(), vec![release("dc4")]);
        assert_eq!(held(&c), [true, false, false, true]);
    }

    #[test]
    fn a_withdrawn_claim_still_sees_who_serves_next() {
        let (me, next) = (pid("gw_a@h", 1), pid("gw_b@h", 1));
        let mut c = Claims::new(me.clone(), Duration::from_secs(5));
        c.claim("dc2".into());
        assert!(!c.another_claims("dc3"), "a route never claimed here has nobody else");
        assert!(c.another_claims("dc2"), "not known yet: there may be another");
        c.set_coordinator(Some("a1@h".into()));
        c.calling(1, "dc2".into(), false);
        c.calling(2, "dc2".into(), true);
        c.answered(1, watch(1), vec![next.clone(), me.clone()]);
        c.answered(2, watch(2), vec![me.clone()]);
        assert_eq!(c.decide(), vec![hold("dc2")]);
        assert!(c.another_claims("dc2") && !c.another_serves("dc2"));
        // Withdrawn (the gateway stops): released, no longer listed, still watched.
        assert_eq!(c.unclaim("dc2"), Some(release("dc2")));
        assert_eq!(c.clusters().count(), 0);
        c.joined(&watch(2), vec![next.clone()]);
        assert!(c.another_serves("dc2"));
        assert_eq!(c.decide(), vec![], "a withdrawn claim holds nothing");
        // Claimed again (a reload added it back): listed again.
        assert!(c.claim("dc2".into()));
        assert_eq!(c.clusters().count(), 1);
    }

    #[test]
    fn claim_groups_are_recognised() {
        assert!(is_claim_group(&group_term("dc2")));
        assert!(is_claim_group(&serving_term("dc2")));
        assert!(!is_claim_group(&Term::atom("chat")));
        assert!(!is_claim_group(&Term::tuple(vec![Term::atom("wandist_other"), Term::Binary(b"x".to_vec())])));
    }
}
