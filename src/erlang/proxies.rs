//! Proxies: pids and references minted on the gateway's own node that
//! stand for processes and references of a peer cluster, each known here
//! by the handle that peer's gateway gave it.
//!
//! Every peer has its own quota: past it, that peer's oldest unpinned
//! proxy is forgotten (pinned by membership or a local monitor), and with
//! all of them pinned a new one is refused ([`Refusal::ProxyQuota`]) — one
//! peer never evicts another's proxies (a reply alias, say). Proxies
//! belong to one run of the peer (its session): a restarted peer numbers
//! its handles afresh, so its old proxies are forgotten, as the pids of a
//! restarted node die with it. Forgetting is O(1) when the run ends (the
//! old proxies stop resolving at once) and their memory is reclaimed a
//! step at a time ([`Proxies::reclaim`]), so a peer that held a million
//! proxies costs no one a pause when it restarts. Keys are never reused.

use std::sync::Arc;

use crate::shard::ShardedMap as HashMap;

use super::etf::{self, Kind, Pid, Ref, Refusal};
use super::evict::{current, Order, Slot};
use crate::wire::Handle;

/// A route's index among the gateway's peers.
pub type PeerIx = usize;

/// Where a proxy points: the peer, its handle there, pid or reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Home {
    pub peer: PeerIx,
    pub handle: Handle,
    pub kind: Kind,
}

#[derive(Debug)]
struct Entry {
    home: Home,
    slot: Slot,
    /// The peer's run this proxy belongs to (`PeerTable::run`).
    run: u32,
}

#[derive(Debug, Default)]
struct PeerTable {
    by_handle: HashMap<(u64, Kind), u64>,
    order: Order,
    max: usize,
    /// Counts the peer's runs; entries of earlier runs resolve no more.
    run: u32,
    /// Proxies of earlier runs still taking memory, to reclaim.
    retired: Vec<Retired>,
}

#[derive(Debug)]
enum Retired {
    /// As the run left it (moved, not walked, when it ended).
    Table(HashMap<(u64, Kind), u64>),
    /// Being reclaimed.
    Keys(Vec<u64>),
}

/// Tags proxy references (their third word).
const REF_TAG: u32 = 0x5741_4e44;

#[derive(Debug)]
pub struct Proxies {
    me: Arc<str>,
    creation: u32,
    next: u64,
    by_key: HashMap<u64, Entry>,
    peers: Vec<PeerTable>,
}

impl Proxies {
    /// Keys start at `first` (lower ones are the gateway's own processes);
    /// `quotas[peer]` proxies at most per peer.
    pub fn new(me: Arc<str>, creation: u32, first: u64, quotas: &[usize]) -> Proxies {
        Proxies {
            me,
            creation,
            next: first,
            by_key: HashMap::default(),
            peers: quotas.iter().map(|&max| PeerTable { max: max.max(1), ..Default::default() }).collect(),
        }
    }

    /// A table for one more peer (a route added by a reload), with its quota.
    pub fn add_peer(&mut self, quota: usize) -> PeerIx {
        self.peers.push(PeerTable { max: quota.max(1), ..Default::default() });
        self.peers.len() - 1
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn len_of(&self, peer: PeerIx) -> usize {
        self.peers.get(peer).map_or(0, |p| p.by_handle.len())
    }

    /// The proxy for `peer`'s identity `handle`, minting one if needed.
    pub fn mint(&mut self, peer: PeerIx, handle: Handle, kind: Kind) -> Result<u64, Refusal> {
        let Some(table) = self.peers.get(peer) else { return Err(Refusal::Forged) };
        if let Some(&k) = table.by_handle.get(&(handle.0, kind)) {
            return Ok(k);
        }
        if table.by_handle.len() >= table.max && !self.evict_one(peer) {
            return Err(Refusal::ProxyQuota);
        }
        let k = self.next;
        self.next += 1;
        let table = &mut self.peers[peer];
        table.by_handle.insert((handle.0, kind), k);
        let slot = table.order.insert(k);
        let run = table.run;
        self.by_key.insert(k, Entry { home: Home { peer, handle, kind }, slot, run });
        Ok(k)
    }

    /// The proxy for `peer`'s identity `handle`, if there is one.
    pub fn find(&self, peer: PeerIx, handle: Handle, kind: Kind) -> Option<u64> {
        self.peers.get(peer)?.by_handle.get(&(handle.0, kind)).copied()
    }

    /// Where a proxy points, if it is one of a run still on.
    pub fn home(&self, key: u64) -> Option<Home> {
        self.live(key).map(|e| e.home)
    }

    fn live(&self, key: u64) -> Option<&Entry> {
        self.by_key.get(&key).filter(|e| self.peers.get(e.home.peer).is_some_and(|t| t.run == e.run))
    }

    pub fn pin(&mut self, key: u64) {
        if self.live(key).is_none() {
            return;
        }
        let Some(e) = self.by_key.get_mut(&key) else { return };
        if let Some(t) = self.peers.get_mut(e.home.peer) {
            t.order.pin(&mut e.slot);
        }
    }

    pub fn unpin(&mut self, key: u64) {
        if self.live(key).is_none() {
            return;
        }
        let Some((peer, mut slot)) = self.by_key.get(&key).map(|e| (e.home.peer, e.slot)) else { return };
        let entries = &self.by_key;
        if let Some(t) = self.peers.get_mut(peer) {
            t.order.unpin(key, &mut slot, |k, g| current(entries.get(&k).map(|e| &e.slot), g));
        }
        if let Some(e) = self.by_key.get_mut(&key) {
            e.slot = slot;
        }
    }

    fn evict_one(&mut self, peer: PeerIx) -> bool {
        let entries = &self.by_key;
        let Some(t) = self.peers.get_mut(peer) else { return false };
        let Some(k) = t.order.pop(|k, g| current(entries.get(&k).map(|e| &e.slot), g)) else { return false };
        if let Some(e) = self.by_key.remove(&k) {
            t.by_handle.remove(&(e.home.handle.0, e.home.kind));
        }
        true
    }

    /// A new run of `peer` (its handles are numbered afresh): every proxy
    /// of the run before resolves no more, at once and in O(1). Their
    /// memory is reclaimed by `reclaim`.
    pub fn retire_peer(&mut self, peer: PeerIx) {
        let Some(t) = self.peers.get_mut(peer) else { return };
        t.run += 1;
        let old = std::mem::take(&mut t.by_handle);
        t.order = Order::default();
        if !old.is_empty() {
            t.retired.push(Retired::Table(old));
        }
    }

    /// Whether `peer` has proxies of earlier runs left to reclaim.
    pub fn retired(&self, peer: PeerIx) -> bool {
        self.peers.get(peer).is_some_and(|t| !t.retired.is_empty())
    }

    /// Reclaims up to `max` proxies of `peer`'s earlier runs; returns those
    /// that were pinned (by membership or a monitor: the caller takes them
    /// out of groups), and whether any are left.
    pub fn reclaim(&mut self, peer: PeerIx, max: usize) -> (Vec<u64>, bool) {
        let Some(t) = self.peers.get_mut(peer) else { return (Vec::new(), false) };
        let mut pinned = Vec::new();
        let Some(last) = t.retired.last_mut() else { return (pinned, false) };
        if let Retired::Table(map) = last {
            // One pass over the old table's values (no hashing): the
            // removals below are what costs, and they go a step at a time.
            *last = Retired::Keys(std::mem::take(map).into_values().collect());
        }
        let Retired::Keys(keys) = last else { unreachable!() };
        for k in keys.drain(keys.len().saturating_sub(max)..) {
            if let Some(e) = self.by_key.remove(&k) {
                if e.slot.is_pinned() {
                    pinned.push(k);
                }
            }
        }
        if keys.is_empty() {
            t.retired.pop();
        }
        (pinned, !t.retired.is_empty())
    }

    // ---- what proxies look like on the gateway's node ----

    /// Proxy pids: the id holds the low 15 bits of the key, the serial the
    /// rest. (Nodes before OTP 24, without DFLAG_V4_NC, refuse a pid whose
    /// id is over 15 bits or serial over 13, and drop the connection: this
    /// way the first 2^28 keys suit them too.)
    fn pid_parts(key: u64) -> (u32, u32) {
        ((key & 0x7fff) as u32, (key >> 15) as u32)
    }

    pub fn pid(&self, key: u64) -> Pid {
        let (id, serial) = Self::pid_parts(key);
        Pid { node: self.me.to_string(), id, serial, creation: self.creation }
    }

    /// Writes the proxy pid for `key` as `etf::put_pid` writes `pid(key)`.
    pub fn put_pid(&self, out: &mut Vec<u8>, key: u64) {
        let (id, serial) = Self::pid_parts(key);
        etf::put_pid_parts(out, &self.me, id, serial, self.creation);
    }

    /// The key of a pid on our node, given its parts (whether or not a
    /// proxy has it now).
    pub fn pid_key_parts(&self, id: u32, serial: u32, creation: u32) -> Option<u64> {
        (creation == self.creation && id <= 0x7fff).then_some(((serial as u64) << 15) | id as u64)
    }

    pub fn pid_key(&self, p: &Pid) -> Option<u64> {
        (*p.node == *self.me).then(|| self.pid_key_parts(p.id, p.serial, p.creation))?
    }

    /// Proxy references: three words, the key in the first two.
    pub fn reference(&self, key: u64) -> Ref {
        Ref { node: self.me.to_string(), creation: self.creation, ids: vec![key as u32, (key >> 32) as u32, REF_TAG] }
    }

    pub fn put_ref(&self, out: &mut Vec<u8>, key: u64) {
        etf::put_ref_parts(out, &self.me, self.creation, &[key as u32, (key >> 32) as u32, REF_TAG]);
    }

    /// The key of a reference on our node that has a proxy's shape.
    pub fn ref_key_parts(&self, node: &[u8], creation: u32, words: &[u8]) -> Option<u64> {
        let w = |i: usize| u32::from_be_bytes([words[4 * i], words[4 * i + 1], words[4 * i + 2], words[4 * i + 3]]);
        (node == self.me.as_bytes() && creation == self.creation && words.len() == 12 && w(2) == REF_TAG)
            .then(|| w(0) as u64 | ((w(1) as u64) << 32))
    }

    pub fn ref_key(&self, r: &Ref) -> Option<u64> {
        let words: Vec<u8> = r.ids.iter().flat_map(|w| w.to_be_bytes()).collect();
        self.ref_key_parts(r.node.as_bytes(), r.creation, &words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(quotas: &[usize]) -> Proxies {
        Proxies::new("gw@h".into(), 9, 100, quotas)
    }

    #[test]
    fn minting_is_stable_and_reversible() {
        let mut t = table(&[10, 10]);
        let k = t.mint(0, Handle(1), Kind::Pid).unwrap();
        assert_eq!(t.mint(0, Handle(1), Kind::Pid).unwrap(), k);
        assert_ne!(t.mint(1, Handle(1), Kind::Pid).unwrap(), k, "another peer's handle 1 is another identity");
        assert_ne!(t.mint(0, Handle(1), Kind::Ref).unwrap(), k, "and so is a reference");
        let p = t.pid(k);
        assert_eq!(t.pid_key(&p), Some(k));
        assert_eq!(t.home(k), Some(Home { peer: 0, handle: Handle(1), kind: Kind::Pid }));
        let r = t.reference(k);
        assert_eq!(t.ref_key(&r), Some(k));
        assert_eq!(t.pid_key(&Pid { creation: 8, ..p }), None, "another incarnation");
        let big = 1u64 << 40;
        assert_eq!(t.pid_key(&t.pid(big)), Some(big));
        let mut out = Vec::new();
        t.put_pid(&mut out, big);
        assert_eq!(out, etf::pid_bytes(&t.pid(big)));
        let mut out = Vec::new();
        t.put_ref(&mut out, big);
        assert_eq!(out, etf::ref_bytes(&t.reference(big)));
        assert_eq!(t.find(0, Handle(1), Kind::Pid), Some(k));
        assert_eq!(t.find(0, Handle(2), Kind::Pid), None);
        assert_eq!(t.mint(7, Handle(1), Kind::Pid), Err(Refusal::Forged), "no such peer");
    }

    #[test]
    fn each_peer_has_its_own_quota() {
        let mut t = table(&[3, 2]);
        // Peer 1 holds a reply alias; peer 0 floods.
        let alias = t.mint(1, Handle(1), Kind::Ref).unwrap();
        let pinned = t.mint(0, Handle(1), Kind::Pid).unwrap();
        t.pin(pinned);
        for h in 2..1000 {
            t.mint(0, Handle(h), Kind::Pid).unwrap();
        }
        assert_eq!(t.len_of(0), 3);
        assert!(t.home(alias).is_some(), "another peer's flood evicts nothing of peer 1");
        assert!(t.home(pinned).is_some(), "pinned stays");
        assert!(t.find(0, Handle(2), Kind::Pid).is_none(), "the oldest unpinned went");
        assert!(t.find(0, Handle(999), Kind::Pid).is_some());
        // All of peer 1's pinned: refused, and peer 0 unaffected.
        let other = t.mint(1, Handle(2), Kind::Pid).unwrap();
        t.pin(alias);
        t.pin(other);
        assert_eq!(t.mint(1, Handle(3), Kind::Pid), Err(Refusal::ProxyQuota));
        assert!(t.mint(0, Handle(5000), Kind::Pid).is_ok());
        t.unpin(other);
        assert!(t.mint(1, Handle(3), Kind::Pid).is_ok());
        assert!(t.home(other).is_none());
    }

    #[test]
    fn a_new_run_of_the_peer_forgets_its_proxies() {
        let mut t = table(&[10, 10]);
        let a = t.mint(0, Handle(1), Kind::Pid).unwrap();
        let c = t.mint(0, Handle(2), Kind::Pid).unwrap();
        let b = t.mint(1, Handle(1), Kind::Pid).unwrap();
        t.pin(a);
        t.retire_peer(0);
        // At once: the old run's proxies resolve no more, the other
        // peer's do, and the new run starts afresh with its own quota.
        assert!(t.home(a).is_none() && t.home(c).is_none() && t.home(b).is_some());
        assert_eq!(t.find(0, Handle(1), Kind::Pid), None);
        assert_eq!(t.len_of(0), 0);
        let a2 = t.mint(0, Handle(1), Kind::Pid).unwrap();
        assert!(a2 > b, "keys are never reused");
        assert_eq!(t.home(a2).unwrap().handle, Handle(1));
        // Pinning or unpinning a retired proxy does nothing to the new run.
        t.unpin(a);
        t.pin(c);
        assert_eq!(t.len(), 4, "memory not reclaimed yet");
        // Reclaimed a step at a time; the pinned one is named.
        assert!(t.retired(0) && !t.retired(1));
        let (mut pinned, more) = t.reclaim(0, 1);
        assert!(more);
        let (p2, more) = t.reclaim(0, 1);
        pinned.extend(p2);
        assert!(!more && !t.retired(0));
        assert_eq!(pinned, vec![a]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.reclaim(0, 10), (vec![], false));
    }

    /// A million proxies retired: each reclaim step is bounded, and the
    /// total comes back.
    #[test]
    fn a_large_run_is_reclaimed_in_bounded_steps() {
        let mut t = table(&[2_000_000]);
        for h in 0..1_000_000 {
            t.mint(0, Handle(h), Kind::Pid).unwrap();
        }
        t.retire_peer(0);
        let mut steps = 0;
        loop {
            let before = t.len();
            let (_, more) = t.reclaim(0, 65_536);
            assert!(before - t.len() <= 65_536);
            steps += 1;
            if !more {
                break;
            }
        }
        assert_eq!((t.len(), steps), (0, 16));
    }
}
