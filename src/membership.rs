//! Process-group membership toward one peer, as plain state.
//!
//! The rule that makes the meta-cluster safe: membership is not transitive.
//! We advertise to a peer only members of our OWN cluster (what the local
//! side reports), filtered by the route's `export` patterns; we accept from a
//! peer only adverts whose origin is that peer's own cluster, filtered by
//! `import`. Imported members are never put where exports come from.
//!
//! Adverts are numbered. A session starts with a snapshot (possibly in
//! parts), then ordered deltas; a receiver that sees a gap asks for a new
//! snapshot. Members are counted, as `pg` counts repeated joins.

use std::collections::BTreeMap;

use crate::wire::{Advert, AdvertBody, Member};

/// Snapshot parts are cut at about this many bytes of member data.
const PART_BYTES: usize = 256 * 1024;

/// A group-name pattern: `*` matches any run of characters, `?` one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: impl Into<String>) -> Pattern {
        Pattern(p.into())
    }

    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    // Iterative wildcard match with single backtrack point: linear-ish, no recursion.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Which groups pass; empty = none, the default is `["*"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Pattern>);

impl Filter {
    pub fn all() -> Filter {
        Filter(vec![Pattern::new("*")])
    }

    pub fn new(patterns: Vec<Pattern>) -> Filter {
        Filter(patterns)
    }

    pub fn allows(&self, group: &str) -> bool {
        self.0.iter().any(|p| p.matches(group))
    }
}

/// A change the local side must apply to what it shows of the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Join { group: String, members: Vec<Member> },
    Leave { group: String, members: Vec<Member> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("advert about another cluster's members (transitive advert)")]
    NotOwnCluster,
    #[error("advert would exceed {0} imported members")]
    TooManyMembers(usize),
}

/// The outcome of an accepted (or ignored) advert.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<Change>,
    /// We lost track: ask the peer for a fresh snapshot.
    pub resync: bool,
}

type Table = BTreeMap<String, BTreeMap<Member, u32>>;

#[derive(Debug)]
pub struct PeerMembership {
    peer: String,
    own: String,
    export: Filter,
    import: Filter,
    max_members: usize,
    local: Table,
    out_counter: u64,
    live: bool,
    imported: Table,
    imported_members: usize,
    in_counter: Option<u64>,
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    counter: u64,
    next_part: u32,
    table: Table,
    members: usize,
}

fn add(table: &mut Table, group: &str, members: &[Member]) -> usize {
    let entry = table.entry(group.to_string()).or_default();
    for m in members {
        *entry.entry(m.clone()).or_insert(0) += 1;
    }
    members.len()
}

/// Removes members; returns those that were there.
fn remove(table: &mut Table, group: &str, members: &[Member]) -> Vec<Member> {
    let mut gone = Vec::new();
    if let Some(entry) = table.get_mut(group) {
        for m in members {
            if let Some(n) = entry.get_mut(m) {
                *n -= 1;
                if *n == 0 {
                    entry.remove(m);
                }
                gone.push(m.clone());
            }
        }
        if entry.is_empty() {
            table.remove(group);
        }
    }
    gone
}

#[cfg(test)]
fn count(table: &Table) -> usize {
    table.values().flat_map(|g| g.values()).map(|&n| n as usize).sum()
}

fn expand(members: &BTreeMap<Member, u32>) -> Vec<Member> {
    members.iter().flat_map(|(m, &n)| std::iter::repeat_n(m.clone(), n as usize)).collect()
}

/// Members of `a` beyond their count in `b`, repeated as often as they exceed it.
fn surplus(a: &BTreeMap<Member, u32>, b: &BTreeMap<Member, u32>) -> Vec<Member> {
    a.iter()
        .flat_map(|(m, &n)| std::iter::repeat_n(m.clone(), n.saturating_sub(*b.get(m).unwrap_or(&0)) as usize))
        .collect()
}

/// The joins and leaves that turn `old` into `new`.
fn diff(old: &Table, new: &Table) -> Vec<Change> {
    let mut changes = Vec::new();
    let empty = BTreeMap::new();
    for (group, members) in old {
        let gone = surplus(members, new.get(group).unwrap_or(&empty));
        if !gone.is_empty() {
            changes.push(Change::Leave { group: group.clone(), members: gone });
        }
    }
    for (group, members) in new {
        let came = surplus(members, old.get(group).unwrap_or(&empty));
        if !came.is_empty() {
            changes.push(Change::Join { group: group.clone(), members: came });
        }
    }
    changes
}

impl PeerMembership {
    pub fn new(own: &str, peer: &str, export: Filter, import: Filter, max_members: usize) -> PeerMembership {
        PeerMembership {
            peer: peer.to_string(),
            own: own.to_string(),
            export,
            import,
            max_members,
            local: Table::new(),
            out_counter: 0,
            live: false,
            imported: Table::new(),
            imported_members: 0,
            in_counter: None,
            partial: None,
        }
    }

    fn advert(&mut self, body: AdvertBody) -> Advert {
        self.out_counter += 1;
        Advert { origin: self.own.clone(), counter: self.out_counter, body }
    }

    // ---- our side ----

    /// Members of our own cluster joined; returns the delta for the peer.
    pub fn local_join(&mut self, group: &str, members: &[Member]) -> Option<Advert> {
        add(&mut self.local, group, members);
        (self.live && self.export.allows(group) && !members.is_empty())
            .then(|| self.advert(AdvertBody::Join { group: group.to_string(), members: members.to_vec() }))
    }

    pub fn local_leave(&mut self, group: &str, members: &[Member]) -> Option<Advert> {
        let gone = remove(&mut self.local, group, members);
        (self.live && self.export.allows(group) && !gone.is_empty())
            .then(|| self.advert(AdvertBody::Leave { group: group.to_string(), members: gone }))
    }

    /// Everything we export, as snapshot parts; deltas follow from now on.
    pub fn snapshot(&mut self) -> Vec<Advert> {
        let mut parts: Vec<Vec<(String, Vec<Member>)>> = vec![Vec::new()];
        let mut size = 0;
        let exported: Vec<(String, Vec<Member>)> =
            self.local.iter().filter(|(g, _)| self.export.allows(g)).map(|(g, m)| (g.clone(), expand(m))).collect();
        for (group, members) in exported {
            let bytes: usize = group.len() + members.iter().map(|m| m.len() + 2).sum::<usize>();
            if size > 0 && size + bytes > PART_BYTES {
                parts.push(Vec::new());
                size = 0;
            }
            size += bytes;
            if let Some(last) = parts.last_mut() {
                last.push((group, members));
            }
        }
        self.live = true;
        let n = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(i, groups)| self.advert(AdvertBody::Snapshot { part: i as u32, last: i + 1 == n, groups }))
            .collect()
    }

    /// No link to send deltas on: the next session or primary starts with a snapshot.
    pub fn pause(&mut self) {
        self.live = false;
    }

    // ---- the peer's side ----

    /// The peer is a new run: what it told us before is void.
    pub fn peer_restarted(&mut self) -> Vec<Change> {
        self.in_counter = None;
        self.partial = None;
        self.withdraw()
    }

    /// The route is down: stop showing the peer's members locally. They
    /// come back with the next snapshot.
    pub fn withdraw(&mut self) -> Vec<Change> {
        let old = std::mem::take(&mut self.imported);
        self.imported_members = 0;
        self.in_counter = None;
        self.partial = None;
        diff(&old, &Table::new())
    }

    pub fn on_advert(&mut self, a: Advert) -> Result<Applied, Rejected> {
        if a.origin != self.peer {
            return Err(Rejected::NotOwnCluster);
        }
        let stale = |last: Option<u64>| last.is_some_and(|l| a.counter <= l);
        match a.body {
            AdvertBody::Snapshot { part, last, groups } => {
                if part == 0 {
                    if stale(self.in_counter) {
                        return Ok(Applied::default());
                    }
                    self.partial = Some(Partial { counter: a.counter, next_part: 0, table: Table::new(), members: 0 });
                }
                let Some(p) = self.partial.as_mut() else { return Ok(Applied { changes: vec![], resync: true }) };
                if p.next_part != part || (part > 0 && a.counter != p.counter + 1) {
                    self.partial = None;
                    return Ok(Applied { changes: vec![], resync: true });
                }
                p.counter = a.counter;
                p.next_part += 1;
                for (group, members) in groups {
                    if self.import.allows(&group) {
                        p.members += add(&mut p.table, &group, &members);
                    }
                }
                if p.members > self.max_members {
                    self.partial = None;
                    return Err(Rejected::TooManyMembers(self.max_members));
                }
                if !last {
                    return Ok(Applied::default());
                }
                let Some(p) = self.partial.take() else { return Ok(Applied::default()) };
                let changes = diff(&self.imported, &p.table);
                self.imported = p.table;
                self.imported_members = p.members;
                self.in_counter = Some(p.counter);
                Ok(Applied { changes, resync: false })
            }
            body => {
                let newest = self.partial.as_ref().map(|p| p.counter).or(self.in_counter);
                if stale(newest) {
                    return Ok(Applied::default()); // from before the latest snapshot
                }
                if self.partial.is_some() || self.in_counter.map(|c| c + 1) != Some(a.counter) {
                    self.partial = None;
                    return Ok(Applied { changes: vec![], resync: true });
                }
                self.in_counter = Some(a.counter);
                let change = match body {
                    AdvertBody::Join { group, members } if self.import.allows(&group) => {
                        if self.imported_members + members.len() > self.max_members {
                            return Err(Rejected::TooManyMembers(self.max_members));
                        }
                        self.imported_members += add(&mut self.imported, &group, &members);
                        Some(Change::Join { group, members })
                    }
                    AdvertBody::Leave { group, members } if self.import.allows(&group) => {
                        let gone = remove(&mut self.imported, &group, &members);
                        self.imported_members -= gone.len();
                        (!gone.is_empty()).then_some(Change::Leave { group, members: gone })
                    }
                    _ => None,
                };
                Ok(Applied { changes: change.into_iter().collect(), resync: false })
            }
        }
    }

    /// (groups, members) we export to this peer.
    pub fn exported(&self) -> (usize, usize) {
        let groups: Vec<_> = self.local.iter().filter(|(g, _)| self.export.allows(g)).collect();
        (groups.len(), groups.iter().map(|(_, m)| m.values().map(|&n| n as usize).sum::<usize>()).sum())
    }

    /// (groups, members) imported from this peer.
    pub fn imported(&self) -> (usize, usize) {
        (self.imported.len(), self.imported_members)
    }

    pub fn imported_table(&self) -> impl Iterator<Item = (&str, Vec<Member>)> {
        self.imported.iter().map(|(g, m)| (g.as_str(), expand(m)))
    }

    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.imported_members, count(&self.imported));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Member {
        s.as_bytes().to_vec()
    }

    fn pair() -> (PeerMembership, PeerMembership) {
        (
            PeerMembership::new("a", "b", Filter::all(), Filter::all(), 1000),
            PeerMembership::new("b", "a", Filter::all(), Filter::all(), 1000),
        )
    }

    /// Delivers adverts from one side to the other; returns the changes.
    fn send(to: &mut PeerMembership, adverts: Vec<Advert>) -> Vec<Change> {
        let mut all = Vec::new();
        for a in adverts {
            let applied = to.on_advert(a).unwrap();
            assert!(!applied.resync);
            all.extend(applied.changes);
            to.check();
        }
        all
    }

    #[test]
    fn patterns() {
        let p = |s: &str| Pattern::new(s);
        assert!(p("*").matches("") && p("*").matches("chat"));
        assert!(p("chat.*").matches("chat.eu") && !p("chat.*").matches("chat"));
        assert!(p("c?at").matches("chat") && !p("c?at").matches("cht"));
        assert!(p("*.eu.*").matches("chat.eu.1") && !p("*.eu.*").matches("chat.us.1"));
        assert!(p("a*b*c").matches("aXXbYYc") && !p("a*b*c").matches("aXXbYY"));
        assert!(!Filter::new(vec![]).allows("x"));
    }

    #[test]
    fn snapshot_then_deltas() {
        let (mut a, mut b) = pair();
        assert_eq!(a.local_join("chat", &[m("p1")]), None, "no deltas before the session's snapshot");
        let changes = send(&mut b, a.snapshot());
        assert_eq!(changes, vec![Change::Join { group: "chat".into(), members: vec![m("p1")] }]);
        let d = a.local_join("chat", &[m("p2"), m("p2")]).unwrap();
        assert_eq!(send(&mut b, vec![d]), vec![Change::Join { group: "chat".into(), members: vec![m("p2"), m("p2")] }]);
        let d = a.local_leave("chat", &[m("p2")]).unwrap();
        assert_eq!(send(&mut b, vec![d]), vec![Change::Leave { group: "chat".into(), members: vec![m("p2")] }]);
        assert_eq!(b.imported(), (1, 2));
        assert_eq!(a.exported(), (1, 2));
        // Leaving what is not there says nothing.
        assert_eq!(a.local_leave("chat", &[m("nobody")]), None);
    }

    #[test]
    fn a_new_snapshot_replaces_by_difference() {
        let (mut a, mut b) = pair();
        a.local_join("g1", &[m("x"), m("y")]);
        send(&mut b, a.snapshot());
        a.pause();
        a.local_leave("g1", &[m("x")]);
        a.local_join("g2", &[m("z")]);
        let changes = send(&mut b, a.snapshot());
        assert_eq!(
            changes,
            vec![
                Change::Leave { group: "g1".into(), members: vec![m("x")] },
                Change::Join { group: "g2".into(), members: vec![m("z")] },
            ]
        );
    }

    #[test]
    fn large_snapshots_come_in_parts() {
        let (mut a, mut b) = pair();
        let mut b_big = PeerMembership::new("b", "a", Filter::all(), Filter::all(), 100_000);
        for g in 0..100 {
            let members: Vec<Member> =
                (0..100).map(|i| format!("{g:03}-{i:03}-{}", "x".repeat(40)).into_bytes()).collect();
            a.local_join(&format!("group{g}"), &members);
        }
        let parts = a.snapshot();
        assert!(parts.len() > 1, "{} parts", parts.len());
        let n = parts.len();
        // Not applied until the last part is in.
        for (i, p) in parts.into_iter().enumerate() {
            let applied = b_big.on_advert(p).unwrap();
            assert_eq!(applied.changes.is_empty(), i + 1 < n);
        }
        assert_eq!(b_big.imported(), (100, 10_000));
        // The same snapshot is too big for a receiver limited to 1000 members.
        let mut last = Ok(Applied::default());
        for p in a.snapshot() {
            last = b.on_advert(p);
            if last.is_err() {
                break;
            }
        }
        assert_eq!(last, Err(Rejected::TooManyMembers(1000)));
    }

    #[test]
    fn transitive_adverts_are_rejected() {
        let (_, mut b) = pair();
        let forged = Advert {
            origin: "c".into(),
            counter: 1,
            body: AdvertBody::Snapshot { part: 0, last: true, groups: vec![("g".into(), vec![m("x")])] },
        };
        assert_eq!(b.on_advert(forged), Err(Rejected::NotOwnCluster));
        assert_eq!(b.imported(), (0, 0));
    }

    #[test]
    fn imported_members_never_reach_exports() {
        // b learns a's members; what b exports to c is only b's own.
        let (mut a, mut b) = pair();
        let mut b_to_c = PeerMembership::new("b", "c", Filter::all(), Filter::all(), 1000);
        a.local_join("chat", &[m("a-member")]);
        send(&mut b, a.snapshot());
        b_to_c.local_join("chat", &[m("b-member")]);
        let snap = b_to_c.snapshot();
        let AdvertBody::Snapshot { groups, .. } = &snap[0].body else { panic!() };
        assert_eq!(groups, &vec![("chat".to_string(), vec![m("b-member")])]);
        assert_eq!(snap[0].origin, "b");
    }

    #[test]
    fn filters_apply_both_ways() {
        let mut a = PeerMembership::new("a", "b", Filter::new(vec![Pattern::new("pub.*")]), Filter::all(), 1000);
        let mut b = PeerMembership::new("b", "a", Filter::all(), Filter::new(vec![Pattern::new("*.eu")]), 1000);
        a.local_join("pub.eu", &[m("1")]);
        a.local_join("pub.us", &[m("2")]);
        a.local_join("private.eu", &[m("3")]);
        assert_eq!(a.exported(), (2, 2));
        send(&mut b, a.snapshot());
        assert_eq!(b.imported_table().collect::<Vec<_>>(), vec![("pub.eu", vec![m("1")])]);
        assert_eq!(a.local_join("private.x", &[m("4")]), None, "not exported: no delta");
        let d = a.local_join("pub.us", &[m("5")]).unwrap();
        assert_eq!(send(&mut b, vec![d]), vec![], "not imported: no change");
        // The counter still advanced: the next delta applies.
        let d = a.local_join("pub.eu", &[m("6")]).unwrap();
        assert_eq!(send(&mut b, vec![d]).len(), 1);
    }

    #[test]
    fn gaps_ask_for_a_resync_and_stale_adverts_are_ignored() {
        let (mut a, mut b) = pair();
        send(&mut b, a.snapshot());
        let lost = a.local_join("g", &[m("1")]).unwrap();
        let next = a.local_join("g", &[m("2")]).unwrap();
        let applied = b.on_advert(next).unwrap();
        assert!(applied.resync && applied.changes.is_empty());
        // The fresh snapshot fixes everything; the lost delta, arriving late, is stale.
        let changes = send(&mut b, a.snapshot());
        assert_eq!(changes, vec![Change::Join { group: "g".into(), members: vec![m("1"), m("2")] }]);
        assert_eq!(b.on_advert(lost).unwrap(), Applied::default());
        assert_eq!(b.imported(), (1, 2));
    }

    #[test]
    fn withdraw_and_restore() {
        let (mut a, mut b) = pair();
        a.local_join("g", &[m("1"), m("2")]);
        send(&mut b, a.snapshot());
        assert_eq!(b.withdraw(), vec![Change::Leave { group: "g".into(), members: vec![m("1"), m("2")] }]);
        assert_eq!(b.imported(), (0, 0));
        a.pause();
        assert_eq!(send(&mut b, a.snapshot()), vec![Change::Join { group: "g".into(), members: vec![m("1"), m("2")] }]);
    }

    #[test]
    fn a_restarted_peer_starts_over_and_its_low_counters_are_accepted() {
        let (mut a, mut b) = pair();
        a.local_join("g", &[m("1")]);
        for _ in 0..5 {
            send(&mut b, a.snapshot());
        }
        let mut a2 = PeerMembership::new("a", "b", Filter::all(), Filter::all(), 1000);
        a2.local_join("h", &[m("9")]);
        assert_eq!(b.peer_restarted(), vec![Change::Leave { group: "g".into(), members: vec![m("1")] }]);
        assert_eq!(send(&mut b, a2.snapshot()), vec![Change::Join { group: "h".into(), members: vec![m("9")] }]);
    }

    #[test]
    fn member_limits_are_enforced() {
        let mut a = PeerMembership::new("a", "b", Filter::all(), Filter::all(), 1000);
        let mut b = PeerMembership::new("b", "a", Filter::all(), Filter::all(), 3);
        a.local_join("g", &[m("1"), m("2"), m("3"), m("4")]);
        assert_eq!(b.on_advert(a.snapshot().remove(0)), Err(Rejected::TooManyMembers(3)));
        assert_eq!(b.imported(), (0, 0));
    }
}
