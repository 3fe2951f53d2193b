//! Monitors across clusters, as plain state: local processes watching
//! proxies ([`Watchers`]), and the monitors the gateway holds on local
//! processes for peers ([`Held`]), indexed so that a demonitor, a peer
//! lost or a count per peer is never a scan of everyone's monitors.

use std::collections::hash_map::Entry;

use foldhash::{HashMap, HashSet};

use super::etf::{Pid, Ref};
use super::proxies::PeerIx;
use crate::wire::Handle;

/// Local processes monitoring proxies.
#[derive(Debug, Default)]
pub struct Watchers {
    by_key: HashMap<u64, Vec<(Pid, Ref)>>,
}

impl Watchers {
    /// Adds a watcher of proxy `key`; true if it is the first.
    pub fn add(&mut self, key: u64, watcher: Pid, mref: Ref) -> bool {
        let list = self.by_key.entry(key).or_default();
        list.push((watcher, mref));
        list.len() == 1
    }

    /// Removes the monitor `mref` of proxy `key`; true if that was the last.
    pub fn remove(&mut self, key: u64, mref: &Ref) -> bool {
        let Entry::Occupied(mut e) = self.by_key.entry(key) else { return false };
        let before = e.get().len();
        e.get_mut().retain(|(_, r)| r != mref);
        let removed = e.get().len() < before;
        if e.get().is_empty() {
            e.remove();
        }
        removed && !self.by_key.contains_key(&key)
    }

    /// Everyone watching `key` (who is then told it is down).
    pub fn take(&mut self, key: u64) -> Vec<(Pid, Ref)> {
        self.by_key.remove(&key).unwrap_or_default()
    }

    pub fn is_watched(&self, key: u64) -> bool {
        self.by_key.contains_key(&key)
    }

    /// The watched proxies `pick` selects.
    pub fn keys(&self, mut pick: impl FnMut(u64) -> bool) -> Vec<u64> {
        let mut v: Vec<u64> = self.by_key.keys().copied().filter(|&k| pick(k)).collect();
        v.sort_unstable();
        v
    }

    /// A node went down: its processes' monitors are gone (it told them
    /// `noconnection` itself). Returns the proxies left without a watcher.
    pub fn node_down(&mut self, node: &str) -> Vec<u64> {
        let mut unwatched = Vec::new();
        self.by_key.retain(|&k, list| {
            list.retain(|(w, _)| w.node != node);
            if list.is_empty() {
                unwatched.push(k);
            }
            !list.is_empty()
        });
        unwatched.sort_unstable();
        unwatched
    }

    pub fn len(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// A monitor the gateway holds on a local process for a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitor {
    pub peer: PeerIx,
    /// The handle the peer knows the process by.
    pub target: Handle,
    pub pid: Pid,
}

/// Monitors held for peers, by the id of the gateway's own reference.
#[derive(Debug, Default)]
pub struct Held {
    by_id: HashMap<u64, Monitor>,
    by_target: HashMap<(PeerIx, u64), u64>,
    of_peer: Vec<HashSet<u64>>,
}

impl Held {
    pub fn new(peers: usize) -> Held {
        Held { of_peer: (0..peers).map(|_| HashSet::default()).collect(), ..Default::default() }
    }

    /// Room for one more peer (a route added by a reload).
    pub fn add_peer(&mut self) {
        self.of_peer.push(HashSet::default());
    }

    pub fn count(&self, peer: PeerIx) -> usize {
        self.of_peer.get(peer).map_or(0, HashSet::len)
    }

    pub fn find(&self, peer: PeerIx, target: Handle) -> Option<u64> {
        self.by_target.get(&(peer, target.0)).copied()
    }

    pub fn add(&mut self, id: u64, m: Monitor) {
        self.by_target.insert((m.peer, m.target.0), id);
        if let Some(s) = self.of_peer.get_mut(m.peer) {
            s.insert(id);
        }
        self.by_id.insert(id, m);
    }

    pub fn remove(&mut self, id: u64) -> Option<Monitor> {
        let m = self.by_id.remove(&id)?;
        self.by_target.remove(&(m.peer, m.target.0));
        if let Some(s) = self.of_peer.get_mut(m.peer) {
            s.remove(&id);
        }
        Some(m)
    }

    /// Every monitor held for `peer`, taken out.
    pub fn take_peer(&mut self, peer: PeerIx) -> Vec<(u64, Monitor)> {
        let ids: Vec<u64> = self.of_peer.get_mut(peer).map(|s| s.drain().collect()).unwrap_or_default();
        let mut out: Vec<(u64, Monitor)> = ids.into_iter().filter_map(|id| Some((id, self.remove(id)?))).collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }

    /// Every monitor on a process of `node`, taken out.
    pub fn take_node(&mut self, node: &str) -> Vec<(u64, Monitor)> {
        let ids: Vec<u64> = self.by_id.iter().filter(|(_, m)| m.pid.node == node).map(|(id, _)| *id).collect();
        let mut out: Vec<(u64, Monitor)> = ids.into_iter().filter_map(|id| Some((id, self.remove(id)?))).collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(node: &str, id: u32) -> Pid {
        Pid { node: node.into(), id, serial: 0, creation: 1 }
    }

    fn mref(n: u32) -> Ref {
        Ref { node: "a@h".into(), creation: 1, ids: vec![n, 0, 0] }
    }

    #[test]
    fn watchers_first_last_and_node_down() {
        let mut w = Watchers::default();
        assert!(w.add(7, pid("a@h", 1), mref(1)));
        assert!(!w.add(7, pid("b@h", 2), mref(2)));
        assert!(w.add(8, pid("a@h", 1), mref(3)));
        assert!(!w.remove(7, &mref(9)), "not a monitor of 7");
        assert!(!w.remove(7, &mref(1)), "one left");
        assert_eq!(w.node_down("a@h"), vec![8]);
        assert!(w.is_watched(7));
        assert_eq!(w.take(7), vec![(pid("b@h", 2), mref(2))]);
        assert!(w.is_empty());
    }

    #[test]
    fn held_monitors_are_indexed_by_target_and_peer() {
        let mut h = Held::new(2);
        h.add(1, Monitor { peer: 0, target: Handle(5), pid: pid("a@h", 1) });
        h.add(2, Monitor { peer: 1, target: Handle(5), pid: pid("b@h", 1) });
        h.add(3, Monitor { peer: 0, target: Handle(6), pid: pid("b@h", 2) });
        assert_eq!((h.count(0), h.count(1)), (2, 1));
        assert_eq!(h.find(0, Handle(5)), Some(1));
        assert_eq!(h.find(1, Handle(6)), None, "peer 1 holds no monitor on its handle 6");
        assert_eq!(h.remove(1).map(|m| m.target), Some(Handle(5)));
        assert_eq!(h.find(0, Handle(5)), None);
        assert_eq!(h.take_node("b@h").iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!((h.count(0), h.count(1)), (0, 0));
        h.add(4, Monitor { peer: 1, target: Handle(1), pid: pid("a@h", 1) });
        assert_eq!(h.take_peer(1).len(), 1);
        assert!(h.take_peer(0).is_empty());
    }
}
