//! The `pg` scope mirror, as plain state: what each local node's scope
//! says its own members are (sync, join, leave; the scope ending and
//! coming back; the node going down), reported as [`LocalChange`]s; and
//! which proxies the gateway joined into the local scopes, per group, so
//! that a scope that (re)discovers the gateway gets them all, and a leave
//! costs O(1) per member however large the group.
//!
//! Also the scope protocol's messages, written straight as ETF bytes (no
//! term tree: a sync may list a million proxies).

use std::collections::BTreeMap;
use std::sync::Arc;

use foldhash::HashMap;

use crate::shard::ShardedMap;

use super::etf::{self, Pid};

/// Pids per join message sent to a scope: joins to one group are batched
/// until a step takes them to this many (or they end). A scope copies the
/// whole group into its table on every message, so fewer, larger ones:
/// 16 messages of 65,536 for a million members took a node 2.3 s, 4 of
/// 262,144 0.9 s (`cargo bench --bench peers`). A message of 262,144 pids
/// is about 4.5 MB.
pub const PIDS_PER_MESSAGE: usize = 262_144;

/// Local members that joined or left a group (canonical pid encodings,
/// repeated as often as they joined or left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalChange {
    pub group: String,
    pub join: bool,
    pub members: Vec<Vec<u8>>,
}

type Members = ShardedMap<Vec<u8>, u32>;

#[derive(Debug, Default)]
struct NodeScope {
    connected: bool,
    scope: Option<Pid>,
    /// The node's own members, per group (counted as pg counts joins).
    members: BTreeMap<String, Members>,
}

#[derive(Debug, Default)]
pub struct Mirror {
    nodes: HashMap<Arc<str>, NodeScope>,
    /// Proxies joined into the local scopes, per group.
    joined: BTreeMap<String, ShardedMap<u64, u32>>,
}

fn add(m: &mut Members, pid: Vec<u8>) {
    *m.entry(pid).or_insert(0) += 1;
}

/// Takes one of `pid` out of `m`; whether it was there.
fn take(m: &mut Members, pid: &[u8]) -> bool {
    match m.get_mut(pid) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            m.remove(pid);
            true
        }
        None => false,
    }
}

fn expand(m: &Members) -> Vec<Vec<u8>> {
    m.iter().flat_map(|(p, &n)| std::iter::repeat_n(p.clone(), n as usize)).collect()
}

/// The changes that turn `old` into `new` (each group's members).
fn diff(old: &BTreeMap<String, Members>, new: &BTreeMap<String, Members>) -> Vec<LocalChange> {
    let mut out = Vec::new();
    let surplus = |a: &Members, b: Option<&Members>| -> Vec<Vec<u8>> {
        a.iter()
            .flat_map(|(p, &n)| {
                let there = b.and_then(|b| b.get(p)).copied().unwrap_or(0);
                std::iter::repeat_n(p.clone(), n.saturating_sub(there) as usize)
            })
            .collect()
    };
    for (group, members) in old {
        let gone = surplus(members, new.get(group));
        if !gone.is_empty() {
            out.push(LocalChange { group: group.clone(), join: false, members: gone });
        }
    }
    for (group, members) in new {
        let came = surplus(members, old.get(group));
        if !came.is_empty() {
            out.push(LocalChange { group: group.clone(), join: true, members: came });
        }
    }
    out
}

impl Mirror {
    pub fn new(nodes: impl IntoIterator<Item = Arc<str>>) -> Mirror {
        Mirror { nodes: nodes.into_iter().map(|n| (n, NodeScope::default())).collect(), joined: BTreeMap::new() }
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.connected)
    }

    /// The node's name as the mirror holds it, if it is connected.
    pub fn node(&self, node: &str) -> Option<Arc<str>> {
        self.nodes.get_key_value(node).filter(|(_, n)| n.connected).map(|(k, _)| k.clone())
    }

    /// A node connected: its scope is to be discovered.
    pub fn connected(&mut self, node: &Arc<str>) {
        let n = self.nodes.entry(node.clone()).or_default();
        n.connected = true;
        n.scope = None;
    }

    /// A node is gone, and its members with it.
    pub fn disconnected(&mut self, node: &str) -> Vec<LocalChange> {
        let Some(n) = self.nodes.get_mut(node) else { return Vec::new() };
        n.connected = false;
        n.scope = None;
        let old = std::mem::take(&mut n.members);
        diff(&old, &BTreeMap::new())
    }

    /// The node's scope process ended (it will be discovered again).
    pub fn scope_ended(&mut self, node: &str) -> Vec<LocalChange> {
        let Some(n) = self.nodes.get_mut(node) else { return Vec::new() };
        n.scope = None;
        let old = std::mem::take(&mut n.members);
        diff(&old, &BTreeMap::new())
    }

    /// The node's scope is `scope`; true if that is news.
    pub fn set_scope(&mut self, node: &str, scope: &Pid) -> bool {
        let Some(n) = self.nodes.get_mut(node).filter(|n| n.connected) else { return false };
        if n.scope.as_ref() == Some(scope) {
            return false;
        }
        n.scope = Some(scope.clone());
        true
    }

    pub fn scope_of(&self, node: &str) -> Option<&Pid> {
        self.nodes.get(node).filter(|n| n.connected)?.scope.as_ref()
    }

    /// Connected nodes, in name order.
    pub fn connected_nodes(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> = self.nodes.iter().filter(|(_, n)| n.connected).map(|(k, _)| k.clone()).collect();
        v.sort();
        v
    }

    /// Connected nodes whose scope is not known yet.
    pub fn undiscovered(&self) -> Vec<Arc<str>> {
        let mut v: Vec<Arc<str>> =
            self.nodes.iter().filter(|(_, n)| n.connected && n.scope.is_none()).map(|(k, _)| k.clone()).collect();
        v.sort();
        v
    }

    /// Connected nodes with their scope processes.
    pub fn scopes(&self) -> Vec<(Arc<str>, Pid)> {
        let mut v: Vec<(Arc<str>, Pid)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.connected)
            .filter_map(|(k, n)| Some((k.clone(), n.scope.clone()?)))
            .collect();
        v.sort();
        v
    }

    /// A sync from the node's scope: everything it has, replacing what it
    /// said before.
    pub fn replace(&mut self, node: &str, groups: Vec<(String, Vec<Vec<u8>>)>) -> Vec<LocalChange> {
        let Some(n) = self.nodes.get_mut(node) else { return Vec::new() };
        let mut new: BTreeMap<String, Members> = BTreeMap::new();
        for (g, pids) in groups {
            let m = new.entry(g).or_default();
            for p in pids {
                add(m, p);
            }
        }
        new.retain(|_, m| !m.is_empty());
        let old = std::mem::replace(&mut n.members, new);
        diff(&old, &n.members)
    }

    pub fn join(&mut self, node: &str, group: &str, pids: Vec<Vec<u8>>) -> Option<LocalChange> {
        let n = self.nodes.get_mut(node)?;
        if pids.is_empty() {
            return None;
        }
        let m = n.members.entry(group.to_string()).or_default();
        for p in &pids {
            add(m, p.clone());
        }
        Some(LocalChange { group: group.to_string(), join: true, members: pids })
    }

    pub fn leave(&mut self, node: &str, pids: &[Vec<u8>], groups: &[String]) -> Vec<LocalChange> {
        let Some(n) = self.nodes.get_mut(node) else { return Vec::new() };
        let mut out = Vec::new();
        for g in groups {
            let Some(m) = n.members.get_mut(g) else { continue };
            let gone: Vec<Vec<u8>> = pids.iter().filter(|p| take(m, p)).cloned().collect();
            if m.is_empty() {
                n.members.remove(g);
            }
            if !gone.is_empty() {
                out.push(LocalChange { group: g.clone(), join: false, members: gone });
            }
        }
        out
    }

    /// Every local member, per group, across nodes (what a new route
    /// exports first).
    pub fn local_members(&self) -> Vec<LocalChange> {
        let mut all: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
        for n in self.nodes.values() {
            for (g, m) in &n.members {
                all.entry(g).or_default().extend(expand(m));
            }
        }
        all.into_iter().map(|(g, members)| LocalChange { group: g.to_string(), join: true, members }).collect()
    }

    // ---- proxies joined into the local scopes ----

    pub fn remote_join(&mut self, group: &str, keys: &[u64]) {
        if keys.is_empty() {
            return;
        }
        let m = self.joined.entry(group.to_string()).or_default();
        for k in keys {
            *m.entry(*k).or_insert(0) += 1;
        }
    }

    /// Takes the proxies out of the group; returns those that were in it.
    pub fn remote_leave(&mut self, group: &str, keys: &[u64]) -> Vec<u64> {
        let Some(m) = self.joined.get_mut(group) else { return Vec::new() };
        let mut gone = Vec::with_capacity(keys.len());
        for k in keys {
            match m.get_mut(k) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    m.remove(k);
                }
                None => continue,
            }
            gone.push(*k);
        }
        if m.is_empty() {
            self.joined.remove(group);
        }
        gone
    }

    /// Takes these proxies out of every group (their peer's run ended);
    /// returns how many memberships went.
    pub fn remote_forget(&mut self, keys: &foldhash::HashSet<u64>) -> usize {
        let mut gone = 0;
        self.joined.retain(|_, m| {
            m.retain(|k, n| {
                let keep = !keys.contains(k);
                if !keep {
                    gone += *n as usize;
                }
                keep
            });
            !m.is_empty()
        });
        gone
    }

    /// The proxies joined, per group (each repeated as often as joined).
    pub fn joined(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = u64> + '_)> {
        self.joined.iter().map(|(g, m)| (g.as_str(), m.iter().flat_map(|(&k, &n)| std::iter::repeat_n(k, n as usize))))
    }

    pub fn joined_count(&self) -> usize {
        self.joined.values().map(|m| m.values().map(|&n| n as usize).sum::<usize>()).sum()
    }
}

// ---- the scope protocol's messages, as ETF bytes (with version) ----

const SMALL_TUPLE: u8 = 104;
const LIST: u8 = 108;
const NIL: u8 = 106;

fn list(out: &mut Vec<u8>, n: usize) {
    if n > 0 {
        out.push(LIST);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn end_list(out: &mut Vec<u8>) {
    out.push(NIL);
}

/// `{discover, Gw}`.
pub fn discover(gw: &Pid) -> Vec<u8> {
    let mut out = vec![etf::VERSION, SMALL_TUPLE, 2];
    etf::put_atom(&mut out, "discover");
    etf::put_pid(&mut out, gw);
    out
}

/// `{join, Gw, Group, [Pids]}`; `group` is the group term's encoding.
pub fn join(gw: &Pid, group: &[u8], pids: &[u64], put: impl Fn(&mut Vec<u8>, u64)) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + group.len() + 40 * pids.len());
    out.extend_from_slice(&[etf::VERSION, SMALL_TUPLE, 4]);
    etf::put_atom(&mut out, "join");
    etf::put_pid(&mut out, gw);
    out.extend_from_slice(group);
    list(&mut out, pids.len());
    for &k in pids {
        put(&mut out, k);
    }
    end_list(&mut out);
    out
}

/// `{leave, Gw, [Pids], [Group]}`.
pub fn leave(gw: &Pid, group: &[u8], pids: &[u64], put: impl Fn(&mut Vec<u8>, u64)) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + group.len() + 40 * pids.len());
    out.extend_from_slice(&[etf::VERSION, SMALL_TUPLE, 4]);
    etf::put_atom(&mut out, "leave");
    etf::put_pid(&mut out, gw);
    list(&mut out, pids.len());
    for &k in pids {
        put(&mut out, k);
    }
    end_list(&mut out);
    list(&mut out, 1);
    out.extend_from_slice(group);
    end_list(&mut out);
    out
}

/// `{'$gen_cast', {sync, Gw, [{Group, [Pids]}]}}`: everything the gateway
/// joined, replacing what it said before. A scope takes a sync in one pass
/// over what changed, where each join or leave message costs a pass over
/// its whole group: so a large change goes as one sync (`Core::work`).
/// `groups`: each group term's encoding, with its proxies.
pub fn sync<'a>(
    gw: &Pid,
    groups: impl Iterator<Item = (Vec<u8>, Vec<u64>)> + 'a,
    put: impl Fn(&mut Vec<u8>, u64),
) -> Vec<u8> {
    let groups: Vec<(Vec<u8>, Vec<u64>)> = groups.filter(|(_, pids)| !pids.is_empty()).collect();
    let pids: usize = groups.iter().map(|(_, p)| p.len()).sum();
    let mut out = Vec::with_capacity(64 + 40 * pids);
    out.extend_from_slice(&[etf::VERSION, SMALL_TUPLE, 2]);
    etf::put_atom(&mut out, "$gen_cast");
    out.extend_from_slice(&[SMALL_TUPLE, 3]);
    etf::put_atom(&mut out, "sync");
    etf::put_pid(&mut out, gw);
    list(&mut out, groups.len());
    for (group, keys) in &groups {
        out.extend_from_slice(&[SMALL_TUPLE, 2]);
        out.extend_from_slice(group);
        list(&mut out, keys.len());
        for &k in keys {
            put(&mut out, k);
        }
        end_list(&mut out);
    }
    end_list(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erlang::etf::Term;

    fn pid(n: u8) -> Vec<u8> {
        etf::pid_bytes(&Pid { node: "a@h".into(), id: n as u32, serial: 0, creation: 1 })
    }

    fn sorted(mut v: Vec<LocalChange>) -> Vec<LocalChange> {
        for c in &mut v {
            c.members.sort();
        }
        v.sort_by_key(|c| (c.group.clone(), c.join));
        v
    }

    #[test]
    fn a_sync_replaces_by_difference_and_joins_leaves_count() {
        let node: Arc<str> = "a@h".into();
        let mut m = Mirror::new([node.clone()]);
        m.connected(&node);
        let scope = Pid { node: "a@h".into(), id: 50, serial: 0, creation: 1 };
        assert!(m.set_scope(&node, &scope));
        assert!(!m.set_scope(&node, &scope), "no news");
        assert_eq!(m.scopes(), vec![(node.clone(), scope.clone())]);
        let c = m.replace(&node, vec![("g".into(), vec![pid(1), pid(2)])]);
        assert_eq!(sorted(c), vec![LocalChange { group: "g".into(), join: true, members: vec![pid(1), pid(2)] }]);
        // Joined twice, left once: still a member.
        m.join(&node, "g", vec![pid(1)]);
        assert_eq!(
            m.leave(&node, &[pid(1), pid(9)], &["g".into(), "nope".into()]),
            vec![LocalChange { group: "g".into(), join: false, members: vec![pid(1)] }]
        );
        let c = m.replace(&node, vec![("g".into(), vec![pid(2)]), ("h".into(), vec![pid(3)])]);
        assert_eq!(
            sorted(c),
            vec![
                LocalChange { group: "g".into(), join: false, members: vec![pid(1)] },
                LocalChange { group: "h".into(), join: true, members: vec![pid(3)] },
            ]
        );
        assert_eq!(sorted(m.local_members()).len(), 2);
        // The scope ends: everything leaves; the node is undiscovered again.
        assert_eq!(m.scope_ended(&node).len(), 2);
        assert_eq!(m.undiscovered(), vec![node.clone()]);
        m.set_scope(&node, &scope);
        m.join(&node, "g", vec![pid(4)]);
        assert_eq!(m.disconnected(&node).len(), 1);
        assert!(m.scopes().is_empty());
    }

    #[test]
    fn remote_leaves_cost_one_step_per_member() {
        let mut m = Mirror::default();
        let keys: Vec<u64> = (0..40_000).collect();
        m.remote_join("big", &keys);
        m.remote_join("big", &[7]);
        assert_eq!(m.joined_count(), 40_001);
        // (40,000 leaves with a Vec took 9.7 s; this is a hash removal each)
        let gone = m.remote_leave("big", &keys);
        assert_eq!(gone.len(), 40_000);
        assert_eq!(m.joined_count(), 1, "7 was joined twice");
        assert_eq!(m.remote_leave("big", &[7, 7]), vec![7], "never more than joined");
        assert_eq!(m.joined().count(), 0);
    }

    #[test]
    fn scope_messages_are_what_the_term_encoder_writes() {
        let gw = Pid { node: "gw@h".into(), id: 1, serial: 0, creation: 5 };
        let put = |out: &mut Vec<u8>, k: u64| {
            etf::put_pid(out, &Pid { node: "gw@h".into(), id: k as u32, serial: 0, creation: 5 })
        };
        let p = |k: u32| Term::Pid(Pid { node: "gw@h".into(), id: k, serial: 0, creation: 5 });
        let group = etf::encode(&Term::atom("chat"))[1..].to_vec();
        assert_eq!(
            join(&gw, &group, &[7, 8], put),
            etf::encode(&Term::tuple(vec![
                Term::atom("join"),
                Term::Pid(gw.clone()),
                Term::atom("chat"),
                Term::list(vec![p(7), p(8)])
            ]))
        );
        assert_eq!(
            leave(&gw, &group, &[7], put),
            etf::encode(&Term::tuple(vec![
                Term::atom("leave"),
                Term::Pid(gw.clone()),
                Term::list(vec![p(7)]),
                Term::list(vec![Term::atom("chat")])
            ]))
        );
        assert_eq!(
            sync(&gw, std::iter::empty(), put),
            etf::encode(&Term::tuple(vec![
                Term::atom("$gen_cast"),
                Term::tuple(vec![Term::atom("sync"), Term::Pid(gw.clone()), Term::Nil])
            ]))
        );
        let other = etf::encode(&Term::atom("other"))[1..].to_vec();
        assert_eq!(
            sync(&gw, vec![(group.clone(), vec![7, 8]), (other, vec![])].into_iter(), put),
            etf::encode(&Term::tuple(vec![
                Term::atom("$gen_cast"),
                Term::tuple(vec![
                    Term::atom("sync"),
                    Term::Pid(gw.clone()),
                    Term::list(vec![Term::tuple(vec![Term::atom("chat"), Term::list(vec![p(7), p(8)])])])
                ])
            ]))
        );
        assert_eq!(discover(&gw), etf::encode(&Term::tuple(vec![Term::atom("discover"), Term::Pid(gw)])));
    }
}
