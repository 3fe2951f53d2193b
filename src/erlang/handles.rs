//! The handles this gateway issued to one peer: the only names that peer
//! has for processes and references of our cluster (capability
//! addressing, SECURITY.md). A local identity crossing to the peer — a
//! member exported to it, the sender of a message, a pid or reference
//! inside one — gets a handle on first crossing; whatever the peer sends
//! back is resolved through this table, and nothing else of ours can be
//! named: not by guessing pid numbers, not by a handle issued to another
//! peer, not by a handle of the wrong kind.
//!
//! Handles are numbered 1, 2, … per peer and never reused, so a handle is
//! either current, forgotten ([`Refusal::Stale`]: issued, since evicted),
//! or was never issued ([`Refusal::Forged`]). The table is bounded: past
//! its quota the oldest unpinned handle is forgotten; membership (an
//! exported member) and monitors the peer holds pin them.

use std::sync::Arc;

use crate::shard::ShardedMap as HashMap;

use super::etf::{Kind, Refusal};
use super::evict::{current, Order, Slot};
use crate::wire::Handle;

#[derive(Debug)]
struct Entry {
    kind: Kind,
    /// The identity's canonical encoding (`etf::pid_bytes` / `ref_bytes`).
    local: Arc<[u8]>,
    slot: Slot,
}

#[derive(Debug)]
pub struct Handles {
    by_handle: HashMap<u64, Entry>,
    by_local: HashMap<Arc<[u8]>, u64>,
    order: Order,
    /// The next handle to issue; every handle below it was issued once.
    next: u64,
    max: usize,
}

impl Handles {
    pub fn new(max: usize) -> Handles {
        Handles {
            by_handle: HashMap::default(),
            by_local: HashMap::default(),
            order: Order::default(),
            next: 1,
            max: max.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.by_handle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_handle.is_empty()
    }

    /// The handle of a local identity (its canonical encoding), issuing one
    /// if it has none; past the quota the oldest unpinned handle is
    /// forgotten first, and with all pinned this refuses.
    pub fn issue(&mut self, kind: Kind, local: &[u8]) -> Result<Handle, Refusal> {
        if let Some(&h) = self.by_local.get(local) {
            return Ok(Handle(h));
        }
        if self.by_handle.len() >= self.max && !self.evict_one() {
            return Err(Refusal::HandleQuota);
        }
        let h = self.next;
        self.next += 1;
        let local: Arc<[u8]> = local.into();
        self.by_local.insert(local.clone(), h);
        let slot = self.order.insert(h);
        self.by_handle.insert(h, Entry { kind, local, slot });
        Ok(Handle(h))
    }

    /// The handle of a local identity, if it has one (nothing issued).
    pub fn find(&self, local: &[u8]) -> Option<Handle> {
        self.by_local.get(local).map(|&h| Handle(h))
    }

    /// The local identity `h` names, if this table issued it as `kind`.
    pub fn resolve(&self, h: Handle, kind: Kind) -> Result<&Arc<[u8]>, Refusal> {
        match self.by_handle.get(&h.0) {
            Some(e) if e.kind == kind => Ok(&e.local),
            Some(_) => Err(Refusal::Forged),
            None if h.0 > 0 && h.0 < self.next => Err(Refusal::Stale),
            None => Err(Refusal::Forged),
        }
    }

    /// Keeps `h` from being forgotten until as many `unpin`s.
    pub fn pin(&mut self, h: Handle) {
        if let Some(e) = self.by_handle.get_mut(&h.0) {
            self.order.pin(&mut e.slot);
        }
    }

    pub fn unpin(&mut self, h: Handle) {
        let Some(mut slot) = self.by_handle.get(&h.0).map(|e| e.slot) else { return };
        let entries = &self.by_handle;
        self.order.unpin(h.0, &mut slot, |k, g| current(entries.get(&k).map(|e| &e.slot), g));
        if let Some(e) = self.by_handle.get_mut(&h.0) {
            e.slot = slot;
        }
    }

    fn evict_one(&mut self) -> bool {
        let entries = &self.by_handle;
        let Some(h) = self.order.pop(|k, g| current(entries.get(&k).map(|e| &e.slot), g)) else { return false };
        if let Some(e) = self.by_handle.remove(&h) {
            self.by_local.remove(&e.local);
        }
        true
    }

    /// Handles issued so far (forgotten ones included).
    pub fn issued(&self) -> u64 {
        self.next - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Vec<u8> {
        vec![88, n]
    }

    #[test]
    fn issued_once_per_identity_and_resolved_only_as_issued() {
        let mut t = Handles::new(10);
        let a = t.issue(Kind::Pid, &id(1)).unwrap();
        assert_eq!(t.issue(Kind::Pid, &id(1)).unwrap(), a, "the same identity keeps its handle");
        let r = t.issue(Kind::Ref, &id(2)).unwrap();
        assert_ne!(a, r);
        assert_eq!(t.resolve(a, Kind::Pid).unwrap().as_ref(), &id(1)[..]);
        assert_eq!(t.resolve(a, Kind::Ref), Err(Refusal::Forged), "a pid's handle is not an alias");
        assert_eq!(t.resolve(r, Kind::Ref).unwrap().as_ref(), &id(2)[..]);
        for never in [Handle(0), Handle(3), Handle(u64::MAX)] {
            assert_eq!(t.resolve(never, Kind::Pid), Err(Refusal::Forged), "{never}");
        }
        assert_eq!(t.find(&id(1)), Some(a));
        assert_eq!(t.find(&id(9)), None);
    }

    #[test]
    fn bounded_oldest_unpinned_forgotten_never_reused() {
        let mut t = Handles::new(3);
        let a = t.issue(Kind::Pid, &id(1)).unwrap();
        t.pin(a);
        let b = t.issue(Kind::Pid, &id(2)).unwrap();
        let c = t.issue(Kind::Pid, &id(3)).unwrap();
        let d = t.issue(Kind::Pid, &id(4)).unwrap();
        assert_eq!(t.len(), 3);
        assert!(t.resolve(a, Kind::Pid).is_ok(), "pinned stays");
        assert_eq!(t.resolve(b, Kind::Pid), Err(Refusal::Stale), "oldest unpinned goes, and is known as forgotten");
        // The identity comes back under a new handle, never the old one.
        let b2 = t.issue(Kind::Pid, &id(2)).unwrap();
        assert!(b2.0 > d.0);
        assert_eq!(t.resolve(c, Kind::Pid), Err(Refusal::Stale));
        // All pinned: no room, refused.
        t.pin(d);
        t.pin(b2);
        assert_eq!(t.issue(Kind::Pid, &id(5)), Err(Refusal::HandleQuota));
        t.unpin(d);
        assert!(t.issue(Kind::Pid, &id(5)).is_ok());
        assert_eq!(t.resolve(d, Kind::Pid), Err(Refusal::Stale));
        assert_eq!(t.issued(), 6);
    }

    /// With every entry pinned, each new identity still costs O(1): the
    /// pinned ones are not in the eviction queue at all.
    #[test]
    fn pinned_entries_cost_nothing_per_issue() {
        let mut t = Handles::new(100_001);
        for n in 0..100_000u32 {
            let h = t.issue(Kind::Pid, &n.to_be_bytes()).unwrap();
            t.pin(h);
        }
        assert_eq!(t.order.queued(), 100_000, "queued once each, stale since pinned");
        for n in 0..1_000u32 {
            let h = t.issue(Kind::Pid, &(1_000_000 + n).to_be_bytes()).unwrap();
            assert_eq!(t.len(), 100_001);
            let _ = h;
        }
        assert!(t.order.queued() < 2_000, "stale positions were swept or popped: {}", t.order.queued());
    }
}
