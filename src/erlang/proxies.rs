//! Proxy identities: pids and references minted on the gateway's own node
//! that stand for processes and references of a peer cluster. Bounded: past
//! the limit, the oldest proxies not pinned (by group membership or a
//! monitor) are forgotten; a message to a forgotten proxy is dropped and
//! counted.

use std::collections::VecDeque;

use foldhash::HashMap;
use std::sync::Arc;

use super::etf::{self, Pid, Ref};

/// Where a proxy points: the peer cluster and the identity's encoding there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Home {
    pub peer: Arc<str>,
    pub bytes: Vec<u8>,
}

#[derive(Debug)]
pub struct Table {
    me: Arc<str>,
    creation: u32,
    next: u64,
    by_key: HashMap<u64, Home>,
    /// Peer, then the identity's encoding there: looked up by borrowed
    /// bytes (`known`), no `Home` built.
    by_home: HashMap<Arc<str>, HashMap<Vec<u8>, u64>>,
    pins: HashMap<u64, u32>,
    order: VecDeque<u64>,
    max: usize,
}

impl Table {
    /// Keys start at `first` (lower ones are the gateway's own processes).
    pub fn new(me: Arc<str>, creation: u32, first: u64, max: usize) -> Table {
        Table {
            me,
            creation,
            next: first,
            by_key: HashMap::default(),
            by_home: HashMap::default(),
            pins: HashMap::default(),
            order: VecDeque::new(),
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The key for `home`, minting one if needed.
    pub fn key_for(&mut self, home: Home) -> u64 {
        if let Some(k) = self.known(&home.peer, &home.bytes) {
            return k;
        }
        self.evict();
        let k = self.next;
        self.next += 1;
        self.by_home.entry(home.peer.clone()).or_default().insert(home.bytes.clone(), k);
        self.by_key.insert(k, home);
        self.order.push_back(k);
        k
    }

    /// The key of `peer`'s identity encoded as `bytes`, if it has one
    /// (`bytes` as `etf::pid_bytes` or `etf::ref_bytes` write them).
    pub fn known(&self, peer: &str, bytes: &[u8]) -> Option<u64> {
        self.by_home.get(peer)?.get(bytes).copied()
    }

    pub fn home(&self, key: u64) -> Option<&Home> {
        self.by_key.get(&key)
    }

    pub fn pin(&mut self, key: u64) {
        *self.pins.entry(key).or_insert(0) += 1;
    }

    pub fn unpin(&mut self, key: u64) {
        if let Some(n) = self.pins.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&key);
            }
        }
    }

    fn evict(&mut self) {
        let mut scanned = 0;
        while self.by_key.len() >= self.max && scanned < self.order.len() {
            let Some(k) = self.order.pop_front() else { break };
            if self.pins.contains_key(&k) {
                self.order.push_back(k);
                scanned += 1;
                continue;
            }
            if let Some(home) = self.by_key.remove(&k) {
                if let Some(of_peer) = self.by_home.get_mut(&home.peer) {
                    of_peer.remove(&home.bytes);
                    if of_peer.is_empty() {
                        self.by_home.remove(&home.peer);
                    }
                }
            }
        }
    }

    /// Every key pointing into `peer`.
    pub fn keys_of(&self, peer: &str) -> Vec<u64> {
        self.by_key.iter().filter(|(_, h)| &*h.peer == peer).map(|(k, _)| *k).collect()
    }

    /// Writes the proxy pid for `key` as `etf::put_pid` writes `pid(key)`.
    pub fn put_pid(&self, out: &mut Vec<u8>, key: u64) {
        let (id, serial) = Self::pid_parts(key);
        etf::put_pid_parts(out, &self.me, id, serial, self.creation);
    }

    fn pid_parts(key: u64) -> (u32, u32) {
        ((key & 0x0fff_ffff) as u32, (key >> 28) as u32)
    }

    // Proxy pids: id holds the low 28 bits of the key, serial the rest.
    pub fn pid(&self, key: u64) -> Pid {
        let (id, serial) = Self::pid_parts(key);
        Pid { node: self.me.to_string(), id, serial, creation: self.creation }
    }

    pub fn pid_key(&self, p: &Pid) -> Option<u64> {
        if *p.node != *self.me {
            return None;
        }
        self.pid_key_parts(p.id, p.serial, p.creation)
    }

    /// `pid_key` for a pid on our node, given its parts.
    pub fn pid_key_parts(&self, id: u32, serial: u32, creation: u32) -> Option<u64> {
        (creation == self.creation).then_some(((serial as u64) << 28) | id as u64)
    }

    // Proxy references: three words, the key in the first two.
    pub fn reference(&self, key: u64) -> Ref {
        Ref {
            node: self.me.to_string(),
            creation: self.creation,
            ids: vec![key as u32, (key >> 32) as u32, 0x5741_4e44],
        }
    }

    pub fn ref_key(&self, r: &Ref) -> Option<u64> {
        (*r.node == *self.me && r.creation == self.creation && r.ids.len() == 3 && r.ids[2] == 0x5741_4e44)
            .then(|| r.ids[0] as u64 | ((r.ids[1] as u64) << 32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(peer: &str, b: u8) -> Home {
        Home { peer: peer.into(), bytes: vec![b] }
    }

    #[test]
    fn minting_is_stable_and_reversible() {
        let mut t = Table::new("gw@h".into(), 9, 100, 10);
        let k = t.key_for(home("dc2", 1));
        assert_eq!(t.key_for(home("dc2", 1)), k);
        assert_ne!(t.key_for(home("dc3", 1)), k);
        let p = t.pid(k);
        assert_eq!(t.pid_key(&p), Some(k));
        assert_eq!(t.home(k), Some(&home("dc2", 1)));
        let r = t.reference(k);
        assert_eq!(t.ref_key(&r), Some(k));
        assert_eq!(t.pid_key(&Pid { creation: 8, ..p }), None, "another incarnation");
        let big = 1u64 << 40;
        assert_eq!(t.pid_key(&t.pid(big)), Some(big));
    }

    #[test]
    fn bounded_with_pinned_entries_kept() {
        let mut t = Table::new("gw@h".into(), 9, 100, 3);
        let a = t.key_for(home("p", 1));
        t.pin(a);
        let b = t.key_for(home("p", 2));
        t.key_for(home("p", 3));
        t.key_for(home("p", 4));
        assert_eq!(t.len(), 3);
        assert!(t.home(a).is_some(), "pinned survives");
        assert!(t.home(b).is_none(), "oldest unpinned goes");
        assert_eq!(t.keys_of("p").len(), 3);
        // What was forgotten is not known any more; what stays is.
        assert_eq!(t.known("p", &[2]), None);
        assert_eq!(t.known("p", &[1]), Some(a));
        assert_eq!(t.known("q", &[1]), None);
    }

    #[test]
    fn known_identities_are_found_by_their_bytes_and_written_in_place() {
        let mut t = Table::new("gw@h".into(), 9, 100, 10);
        let p = Pid { node: "x@dc2".into(), id: 3, serial: 0, creation: 1 };
        assert_eq!(t.known("dc2", &etf::pid_bytes(&p)), None);
        let k = t.key_for(Home { peer: "dc2".into(), bytes: etf::pid_bytes(&p) });
        assert_eq!(t.known("dc2", &etf::pid_bytes(&p)), Some(k));
        assert_eq!(t.known("dc3", &etf::pid_bytes(&p)), None);
        for key in [k, 1 << 40] {
            let mut out = Vec::new();
            t.put_pid(&mut out, key);
            assert_eq!(out, etf::pid_bytes(&t.pid(key)));
        }
    }
}
