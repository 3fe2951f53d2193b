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
//! snapshot. Members are handles of the advertising gateway, counted as
//! `pg` counts repeated joins.
//!
//! What a peer may make us hold is bounded ([`ImportLimits`]): members,
//! groups and bytes (group names plus 8 per member), counting a snapshot
//! still arriving in parts; a group name the local side cannot use (for
//! Erlang: not an atom a node accepts) is refused and never imported.

use std::collections::BTreeMap;

use crate::wire::{Advert, AdvertBody, Member};

/// Snapshot parts are cut at about this many bytes of member data.
const PART_BYTES: usize = 256 * 1024;
/// What one member costs in the byte count (its handle).
const MEMBER_BYTES: usize = 8;
/// Members per delta this side sends (larger changes go as several).
pub const ADVERT_MEMBERS: usize = PART_BYTES / MEMBER_BYTES;
/// Members one advert (a delta, or one snapshot part) may carry: work per
/// advert is bounded, so one peer's membership never holds up a route
/// task, or the thread it runs on, for long.
pub const MAX_ADVERT_MEMBERS: usize = 2 * ADVERT_MEMBERS;

/// How much one peer may make us import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    pub members: usize,
    pub groups: usize,
    /// Group names' bytes plus 8 per member.
    pub bytes: usize,
}

impl ImportLimits {
    pub const DEFAULT: ImportLimits = ImportLimits { members: 1_000_000, groups: 100_000, bytes: 64 * 1024 * 1024 };
}

/// Whether a group name is one the local side can use.
pub type GroupCheck = fn(&str) -> Result<(), &'static str>;

fn any_group(_: &str) -> Result<(), &'static str> {
    Ok(())
}

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

    pub fn from_patterns(patterns: &[String]) -> Filter {
        Filter(patterns.iter().map(|p| Pattern::new(p.as_str())).collect())
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
    #[error("advert would exceed {0} imported groups")]
    TooManyGroups(usize),
    #[error("advert would exceed {0} bytes of imported membership")]
    TooManyBytes(usize),
    #[error("one advert of {0} members (at most {MAX_ADVERT_MEMBERS} per advert)")]
    TooLarge(usize),
    /// A group in an advert whose name the local side cannot take (the
    /// rest of the advert is applied: `Applied::refused`).
    #[error("a group name the local side cannot take")]
    BadGroup,
}

impl Rejected {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Rejected::NotOwnCluster => "not_own_cluster",
            Rejected::TooManyMembers(_) => "member_limit",
            Rejected::TooManyGroups(_) => "group_limit",
            Rejected::TooManyBytes(_) => "byte_limit",
            Rejected::TooLarge(_) => "advert_size",
            Rejected::BadGroup => "bad_group",
        }
    }
}

/// The outcome of an accepted (or ignored) advert.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<Change>,
    /// We lost track: ask the peer for a fresh snapshot.
    pub resync: bool,
    /// Groups left out because the local side cannot use their names
    /// (the name, cut to 64 bytes, and why).
    pub refused: Vec<(String, &'static str)>,
    /// A snapshot was completed by this advert: the imports are the
    /// peer's whole membership now.
    pub synced: bool,
}

type Table = BTreeMap<String, BTreeMap<Member, u32>>;

/// What a table holds: (members, groups, bytes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Size {
    members: usize,
    groups: usize,
    bytes: usize,
}

impl Size {
    fn over(&self, l: &ImportLimits) -> Option<Rejected> {
        if self.members > l.members {
            Some(Rejected::TooManyMembers(l.members))
        } else if self.groups > l.groups {
            Some(Rejected::TooManyGroups(l.groups))
        } else if self.bytes > l.bytes {
            Some(Rejected::TooManyBytes(l.bytes))
        } else {
            None
        }
    }
}

#[derive(Debug)]
pub struct PeerMembership {
    peer: String,
    own: String,
    export: Filter,
    import: Filter,
    limits: ImportLimits,
    check: GroupCheck,
    local: Table,
    local_size: Size,
    out_counter: u64,
    live: bool,
    imported: Table,
    imported_size: Size,
    in_counter: Option<u64>,
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    counter: u64,
    next_part: u32,
    table: Table,
    size: Size,
}

/// Adds members (to `size` too).
fn add(table: &mut Table, size: &mut Size, group: &str, members: &[Member]) {
    if members.is_empty() {
        return;
    }
    let entry = match table.get_mut(group) {
        Some(e) => e,
        None => {
            size.groups += 1;
            size.bytes += group.len();
            table.entry(group.to_string()).or_default()
        }
    };
    for m in members {
        *entry.entry(*m).or_insert(0) += 1;
    }
    size.members += members.len();
    size.bytes += MEMBER_BYTES * members.len();
}

/// Removes members (from `size` too); returns those that were there.
fn remove(table: &mut Table, size: &mut Size, group: &str, members: &[Member]) -> Vec<Member> {
    let mut gone = Vec::new();
    if let Some(entry) = table.get_mut(group) {
        for m in members {
            if let Some(n) = entry.get_mut(m) {
                *n -= 1;
                if *n == 0 {
                    entry.remove(m);
                }
                gone.push(*m);
            }
        }
        if entry.is_empty() {
            table.remove(group);
            size.groups -= 1;
            size.bytes -= group.len();
        }
    }
    size.members -= gone.len();
    size.bytes -= MEMBER_BYTES * gone.len();
    gone
}

#[cfg(test)]
fn count(table: &Table) -> usize {
    table.values().flat_map(|g| g.values()).map(|&n| n as usize).sum()
}

fn expand(members: &BTreeMap<Member, u32>) -> Vec<Member> {
    members.iter().flat_map(|(m, &n)| std::iter::repeat_n(*m, n as usize)).collect()
}

/// Members of `a` beyond their count in `b`, repeated as often as they exceed it.
fn surplus(a: &BTreeMap<Member, u32>, b: &BTreeMap<Member, u32>) -> Vec<Member> {
    a.iter().flat_map(|(m, &n)| std::iter::repeat_n(*m, n.saturating_sub(*b.get(m).unwrap_or(&0)) as usize)).collect()
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

/// A group name cut to 64 bytes for a log line (on a character boundary).
fn shown(group: &str) -> String {
    let mut end = group.len().min(64);
    while !group.is_char_boundary(end) {
        end -= 1;
    }
    group[..end].to_string()
}

impl PeerMembership {
    pub fn new(own: &str, peer: &str, export: Filter, import: Filter, limits: ImportLimits) -> PeerMembership {
        PeerMembership {
            peer: peer.to_string(),
            own: own.to_string(),
            export,
            import,
            limits,
            check: any_group,
            local: Table::new(),
            local_size: Size::default(),
            out_counter: 0,
            live: false,
            imported: Table::new(),
            imported_size: Size::default(),
            in_counter: None,
            partial: None,
        }
    }

    /// Refuses imported groups whose names `check` refuses.
    pub fn with_check(mut self, check: GroupCheck) -> PeerMembership {
        self.check = check;
        self
    }

    fn advert(&mut self, body: AdvertBody) -> Advert {
        self.out_counter += 1;
        Advert { origin: self.own.clone(), counter: self.out_counter, body }
    }

    // ---- our side ----

    /// Members of our own cluster joined; returns the delta for the peer.
    pub fn local_join(&mut self, group: &str, members: &[Member]) -> Option<Advert> {
        add(&mut self.local, &mut self.local_size, group, members);
        (self.live && self.export.allows(group) && !members.is_empty())
            .then(|| self.advert(AdvertBody::Join { group: group.to_string(), members: members.to_vec() }))
    }

    pub fn local_leave(&mut self, group: &str, members: &[Member]) -> Option<Advert> {
        let gone = remove(&mut self.local, &mut self.local_size, group, members);
        (self.live && self.export.allows(group) && !gone.is_empty())
            .then(|| self.advert(AdvertBody::Leave { group: group.to_string(), members: gone }))
    }

    /// Everything we export, as snapshot parts of about PART_BYTES (a
    /// large group spread over several); deltas follow from now on.
    pub fn snapshot(&mut self) -> Vec<Advert> {
        let mut parts: Vec<Vec<(String, Vec<Member>)>> = vec![Vec::new()];
        let mut size = 0;
        let exported: Vec<(String, Vec<Member>)> =
            self.local.iter().filter(|(g, _)| self.export.allows(g)).map(|(g, m)| (g.clone(), expand(m))).collect();
        for (group, members) in exported {
            for chunk in members.chunks(ADVERT_MEMBERS) {
                let bytes: usize = group.len() + MEMBER_BYTES * chunk.len();
                if size > 0 && size + bytes > PART_BYTES {
                    parts.push(Vec::new());
                    size = 0;
                }
                size += bytes;
                if let Some(last) = parts.last_mut() {
                    last.push((group.clone(), chunk.to_vec()));
                }
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
        self.imported_size = Size::default();
        self.in_counter = None;
        self.partial = None;
        diff(&old, &Table::new())
    }

    /// Whether we take `group` from this peer: passes `import`, and the
    /// local side can use its name (else it goes to `refused`).
    fn wanted(&self, group: &str, refused: &mut Vec<(String, &'static str)>) -> bool {
        if !self.import.allows(group) {
            return false;
        }
        match (self.check)(group) {
            Ok(()) => true,
            Err(why) => {
                refused.push((shown(group), why));
                false
            }
        }
    }

    pub fn on_advert(&mut self, a: Advert) -> Result<Applied, Rejected> {
        if a.origin != self.peer {
            return Err(Rejected::NotOwnCluster);
        }
        let carried = match &a.body {
            AdvertBody::Snapshot { groups, .. } => groups.iter().map(|(_, m)| m.len()).sum(),
            AdvertBody::Join { members, .. } | AdvertBody::Leave { members, .. } => members.len(),
        };
        if carried > MAX_ADVERT_MEMBERS {
            self.partial = None;
            return Err(Rejected::TooLarge(carried));
        }
        let stale = |last: Option<u64>| last.is_some_and(|l| a.counter <= l);
        let resync = || Ok(Applied { resync: true, ..Default::default() });
        let mut refused = Vec::new();
        match a.body {
            AdvertBody::Snapshot { part, last, groups } => {
                if part == 0 {
                    if stale(self.in_counter) {
                        return Ok(Applied::default());
                    }
                    self.partial =
                        Some(Partial { counter: a.counter, next_part: 0, table: Table::new(), size: Size::default() });
                }
                let Some(p) = self.partial.as_ref() else { return resync() };
                if p.next_part != part || (part > 0 && a.counter != p.counter + 1) {
                    self.partial = None;
                    return resync();
                }
                let groups: Vec<_> = groups.into_iter().filter(|(g, _)| self.wanted(g, &mut refused)).collect();
                let Some(p) = self.partial.as_mut() else { return resync() };
                p.counter = a.counter;
                p.next_part += 1;
                for (group, members) in groups {
                    add(&mut p.table, &mut p.size, &group, &members);
                    // Checked as it grows: a snapshot that never ends
                    // holds no more than a whole one may.
                    if let Some(over) = p.size.over(&self.limits) {
                        self.partial = None;
                        return Err(over);
                    }
                }
                if !last {
                    return Ok(Applied { refused, ..Default::default() });
                }
                let Some(p) = self.partial.take() else { return Ok(Applied::default()) };
                let changes = diff(&self.imported, &p.table);
                self.imported = p.table;
                self.imported_size = p.size;
                self.in_counter = Some(p.counter);
                Ok(Applied { changes, resync: false, refused, synced: true })
            }
            body => {
                let newest = self.partial.as_ref().map(|p| p.counter).or(self.in_counter);
                if stale(newest) {
                    return Ok(Applied::default()); // from before the latest snapshot
                }
                if self.partial.is_some() || self.in_counter.map(|c| c + 1) != Some(a.counter) {
                    self.partial = None;
                    return resync();
                }
                self.in_counter = Some(a.counter);
                let change = match body {
                    AdvertBody::Join { group, members } if self.wanted(&group, &mut refused) => {
                        let mut after = self.imported_size;
                        after.members += members.len();
                        after.bytes += MEMBER_BYTES * members.len();
                        if !self.imported.contains_key(&group) && !members.is_empty() {
                            after.groups += 1;
                            after.bytes += group.len();
                        }
                        if let Some(over) = after.over(&self.limits) {
                            return Err(over);
                        }
                        add(&mut self.imported, &mut self.imported_size, &group, &members);
                        (!members.is_empty()).then_some(Change::Join { group, members })
                    }
                    AdvertBody::Leave { group, members } if self.import.allows(&group) => {
                        let gone = remove(&mut self.imported, &mut self.imported_size, &group, &members);
                        (!gone.is_empty()).then_some(Change::Leave { group, members: gone })
                    }
                    _ => None,
                };
                Ok(Applied { changes: change.into_iter().collect(), resync: false, refused, synced: false })
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
        (self.imported_size.groups, self.imported_size.members)
    }

    /// The first `max` groups exported to this peer, by name, with their
    /// member counts (`/status`).
    pub fn exported_groups(&self, max: usize) -> Vec<(String, usize)> {
        let groups = self.local.iter().filter(|(g, _)| self.export.allows(g));
        groups.take(max).map(|(g, m)| (g.clone(), m.values().map(|&n| n as usize).sum())).collect()
    }

    /// The first `max` groups imported from this peer, by name, with their
    /// member counts.
    pub fn imported_groups(&self, max: usize) -> Vec<(String, usize)> {
        self.imported.iter().take(max).map(|(g, m)| (g.clone(), m.values().map(|&n| n as usize).sum())).collect()
    }

    pub fn imported_table(&self) -> impl Iterator<Item = (&str, Vec<Member>)> {
        self.imported.iter().map(|(g, m)| (g.as_str(), expand(m)))
    }

    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.imported_size.members, count(&self.imported));
        assert_eq!(self.imported_size.groups, self.imported.len());
        let bytes: usize = self.imported.keys().map(|g| g.len()).sum::<usize>() + MEMBER_BYTES * count(&self.imported);
        assert_eq!(self.imported_size.bytes, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: u64) -> Member {
        crate::wire::Handle(n)
    }

    fn limit(members: usize) -> ImportLimits {
        ImportLimits { members, ..ImportLimits::DEFAULT }
    }

    fn pair() -> (PeerMembership, PeerMembership) {
        (
            PeerMembership::new("a", "b", Filter::all(), Filter::all(), limit(1000)),
            PeerMembership::new("b", "a", Filter::all(), Filter::all(), limit(1000)),
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
        assert_eq!(a.local_join("chat", &[m(1)]), None, "no deltas before the session's snapshot");
        let changes = send(&mut b, a.snapshot());
        assert_eq!(changes, vec![Change::Join { group: "chat".into(), members: vec![m(1)] }]);
        let d = a.local_join("chat", &[m(2), m(2)]).unwrap();
        assert_eq!(send(&mut b, vec![d]), vec![Change::Join { group: "chat".into(), members: vec![m(2), m(2)] }]);
        let d = a.local_leave("chat", &[m(2)]).unwrap();
        assert_eq!(send(&mut b, vec![d]), vec![Change::Leave { group: "chat".into(), members: vec![m(2)] }]);
        assert_eq!(b.imported(), (1, 2));
        assert_eq!(a.exported(), (1, 2));
        // Leaving what is not there says nothing.
        assert_eq!(a.local_leave("chat", &[m(99)]), None);
    }

    #[test]
    fn a_new_snapshot_replaces_by_difference() {
        let (mut a, mut b) = pair();
        a.local_join("g1", &[m(24), m(25)]);
        send(&mut b, a.snapshot());
        a.pause();
        a.local_leave("g1", &[m(24)]);
        a.local_join("g2", &[m(26)]);
        let changes = send(&mut b, a.snapshot());
        assert_eq!(
            changes,
            vec![
                Change::Leave { group: "g1".into(), members: vec![m(24)] },
                Change::Join { group: "g2".into(), members: vec![m(26)] },
            ]
        );
    }

    #[test]
    fn large_snapshots_come_in_parts() {
        let (mut a, mut b) = pair();
        let mut b_big = PeerMembership::new("b", "a", Filter::all(), Filter::all(), limit(100_000));
        for g in 0..100u64 {
            let members: Vec<Member> = (0..500).map(|i| m(1000 * g + i)).collect();
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
        assert_eq!(b_big.imported(), (100, 50_000));
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
            body: AdvertBody::Snapshot { part: 0, last: true, groups: vec![("g".into(), vec![m(24)])] },
        };
        assert_eq!(b.on_advert(forged), Err(Rejected::NotOwnCluster));
        assert_eq!(b.imported(), (0, 0));
    }

    #[test]
    fn imported_members_never_reach_exports() {
        // b learns a's members; what b exports to c is only b's own.
        let (mut a, mut b) = pair();
        let mut b_to_c = PeerMembership::new("b", "c", Filter::all(), Filter::all(), limit(1000));
        a.local_join("chat", &[m(100)]);
        send(&mut b, a.snapshot());
        b_to_c.local_join("chat", &[m(200)]);
        let snap = b_to_c.snapshot();
        let AdvertBody::Snapshot { groups, .. } = &snap[0].body else { panic!() };
        assert_eq!(groups, &vec![("chat".to_string(), vec![m(200)])]);
        assert_eq!(snap[0].origin, "b");
    }

    #[test]
    fn filters_apply_both_ways() {
        let mut a = PeerMembership::new("a", "b", Filter::new(vec![Pattern::new("pub.*")]), Filter::all(), limit(1000));
        let mut b = PeerMembership::new("b", "a", Filter::all(), Filter::new(vec![Pattern::new("*.eu")]), limit(1000));
        a.local_join("pub.eu", &[m(1)]);
        a.local_join("pub.us", &[m(2)]);
        a.local_join("private.eu", &[m(3)]);
        assert_eq!(a.exported(), (2, 2));
        send(&mut b, a.snapshot());
        assert_eq!(b.imported_table().collect::<Vec<_>>(), vec![("pub.eu", vec![m(1)])]);
        assert_eq!(a.local_join("private.x", &[m(4)]), None, "not exported: no delta");
        let d = a.local_join("pub.us", &[m(5)]).unwrap();
        assert_eq!(send(&mut b, vec![d]), vec![], "not imported: no change");
        // The counter still advanced: the next delta applies.
        let d = a.local_join("pub.eu", &[m(6)]).unwrap();
        assert_eq!(send(&mut b, vec![d]).len(), 1);
    }

    #[test]
    fn gaps_ask_for_a_resync_and_stale_adverts_are_ignored() {
        let (mut a, mut b) = pair();
        send(&mut b, a.snapshot());
        let lost = a.local_join("g", &[m(1)]).unwrap();
        let next = a.local_join("g", &[m(2)]).unwrap();
        let applied = b.on_advert(next).unwrap();
        assert!(applied.resync && applied.changes.is_empty());
        // The fresh snapshot fixes everything; the lost delta, arriving late, is stale.
        let changes = send(&mut b, a.snapshot());
        assert_eq!(changes, vec![Change::Join { group: "g".into(), members: vec![m(1), m(2)] }]);
        assert_eq!(b.on_advert(lost).unwrap(), Applied::default());
        assert_eq!(b.imported(), (1, 2));
    }

    #[test]
    fn withdraw_and_restore() {
        let (mut a, mut b) = pair();
        a.local_join("g", &[m(1), m(2)]);
        send(&mut b, a.snapshot());
        assert_eq!(b.withdraw(), vec![Change::Leave { group: "g".into(), members: vec![m(1), m(2)] }]);
        assert_eq!(b.imported(), (0, 0));
        a.pause();
        assert_eq!(send(&mut b, a.snapshot()), vec![Change::Join { group: "g".into(), members: vec![m(1), m(2)] }]);
    }

    #[test]
    fn a_restarted_peer_starts_over_and_its_low_counters_are_accepted() {
        let (mut a, mut b) = pair();
        a.local_join("g", &[m(1)]);
        for _ in 0..5 {
            send(&mut b, a.snapshot());
        }
        let mut a2 = PeerMembership::new("a", "b", Filter::all(), Filter::all(), limit(1000));
        a2.local_join("h", &[m(9)]);
        assert_eq!(b.peer_restarted(), vec![Change::Leave { group: "g".into(), members: vec![m(1)] }]);
        assert_eq!(send(&mut b, a2.snapshot()), vec![Change::Join { group: "h".into(), members: vec![m(9)] }]);
    }

    #[test]
    fn member_limits_are_enforced() {
        let mut a = PeerMembership::new("a", "b", Filter::all(), Filter::all(), limit(1000));
        let mut b = PeerMembership::new("b", "a", Filter::all(), Filter::all(), limit(3));
        a.local_join("g", &[m(1), m(2), m(3), m(4)]);
        assert_eq!(b.on_advert(a.snapshot().remove(0)), Err(Rejected::TooManyMembers(3)));
        assert_eq!(b.imported(), (0, 0));
    }

    #[test]
    fn group_and_byte_limits_hold_for_snapshots_and_deltas() {
        let mut a = PeerMembership::new("a", "b", Filter::all(), Filter::all(), ImportLimits::DEFAULT);
        let few_groups = ImportLimits { groups: 2, ..ImportLimits::DEFAULT };
        let mut b = PeerMembership::new("b", "a", Filter::all(), Filter::all(), few_groups);
        a.local_join("g1", &[m(1)]);
        a.local_join("g2", &[m(2)]);
        send(&mut b, a.snapshot());
        b.check();
        let d = a.local_join("g3", &[m(3)]).unwrap();
        assert_eq!(b.on_advert(d), Err(Rejected::TooManyGroups(2)));
        assert_eq!(b.imported(), (2, 2), "nothing of the refused delta is kept");
        // The refused delta is dropped (counted by the caller), and the next
        // one applies: another member of a group already there is fine.
        let d = a.local_join("g1", &[m(4)]).unwrap();
        assert_eq!(send(&mut b, vec![d]), vec![Change::Join { group: "g1".into(), members: vec![m(4)] }]);
        // Bytes: names count too.
        let tight = ImportLimits { bytes: 40, ..ImportLimits::DEFAULT };
        let mut c = PeerMembership::new("b", "a", Filter::all(), Filter::all(), tight);
        let mut a2 = PeerMembership::new("a", "b", Filter::all(), Filter::all(), ImportLimits::DEFAULT);
        a2.local_join(&"n".repeat(30), &[m(1)]); // 30 + 8 bytes
        send(&mut c, a2.snapshot());
        a2.local_join("x", &[m(2)]); // + 1 + 8: over 40
        a2.pause();
        assert_eq!(c.on_advert(a2.snapshot().remove(0)), Err(Rejected::TooManyBytes(40)));
        assert_eq!(c.imported(), (1, 1));
        c.check();
    }

    /// A snapshot whose last part never comes holds no more than a whole
    /// snapshot may: each part counts as it arrives.
    #[test]
    fn large_groups_are_spread_over_parts_and_oversized_adverts_refused() {
        let (mut a, _) = pair();
        let mut b = PeerMembership::new("b", "a", Filter::all(), Filter::all(), limit(1_000_000));
        let members: Vec<Member> = (0..200_000).map(m).collect();
        a.local_join("big", &members);
        let parts = a.snapshot();
        assert!(parts.len() >= 200_000 / ADVERT_MEMBERS, "{} parts", parts.len());
        let joined: usize = send(&mut b, parts)
            .iter()
            .map(|c| match c {
                Change::Join { members, .. } => members.len(),
                Change::Leave { .. } => panic!(),
            })
            .sum();
        assert_eq!(joined, 200_000);
        let huge = Advert {
            origin: "a".into(),
            counter: 1_000,
            body: AdvertBody::Join { group: "x".into(), members: (0..MAX_ADVERT_MEMBERS as u64 + 1).map(m).collect() },
        };
        assert_eq!(b.on_advert(huge), Err(Rejected::TooLarge(MAX_ADVERT_MEMBERS + 1)));
        assert_eq!(b.imported(), (1, 200_000));
    }

    #[test]
    fn a_snapshot_that_never_ends_is_bounded() {
        let mut b = PeerMembership::new("b", "a", Filter::all(), Filter::all(), limit(1000));
        let part = |n: u32, members: std::ops::Range<u64>| Advert {
            origin: "a".into(),
            counter: 1 + n as u64,
            body: AdvertBody::Snapshot {
                part: n,
                last: false,
                groups: vec![(format!("g{n}"), members.map(m).collect())],
            },
        };
        for n in 0..3 {
            assert!(b.on_advert(part(n, 0..300)).unwrap().changes.is_empty());
        }
        assert_eq!(b.on_advert(part(3, 0..300)), Err(Rejected::TooManyMembers(1000)));
        assert!(b.partial.is_none(), "the unfinished snapshot is dropped");
        assert_eq!(b.imported(), (0, 0));
    }

    #[test]
    fn groups_the_local_side_cannot_use_are_refused_and_never_imported() {
        fn short(g: &str) -> Result<(), &'static str> {
            if g.len() > 10 {
                Err("too long")
            } else {
                Ok(())
            }
        }
        let mut a = PeerMembership::new("a", "b", Filter::all(), Filter::all(), ImportLimits::DEFAULT);
        let mut b =
            PeerMembership::new("b", "a", Filter::all(), Filter::all(), ImportLimits::DEFAULT).with_check(short);
        let long = "x".repeat(300);
        a.local_join("ok", &[m(1)]);
        a.local_join(&long, &[m(2)]);
        let applied = b.on_advert(a.snapshot().remove(0)).unwrap();
        assert_eq!(applied.changes, vec![Change::Join { group: "ok".into(), members: vec![m(1)] }]);
        assert_eq!(applied.refused, vec![("x".repeat(64), "too long")]);
        let d = a.local_join(&long, &[m(3)]).unwrap();
        let applied = b.on_advert(d).unwrap();
        assert!(applied.changes.is_empty() && applied.refused.len() == 1);
        assert_eq!(b.imported(), (1, 1));
        b.check();
    }
}
