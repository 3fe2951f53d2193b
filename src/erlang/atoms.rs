//! A peer's atom budget. Every atom a peer's messages and group names
//! bring to our nodes stays in their atom tables for good (a node dies
//! when its table is full), so each peer may introduce at most so many
//! distinct atoms; a message that would bring one more is refused.
//!
//! Atoms are remembered by a 64-bit hash keyed with a per-process random
//! seed, not by their text: a lookup is one hash and one probe (this runs
//! for every atom of every message from a peer; BENCHMARKS.md, "Atom
//! budget"), and a table of 10,000 costs 80 KiB. Two distinct atoms with
//! the same hash would count once; with the seed unknown to the peer it
//! cannot aim for that, and by chance it happens about once in 2^64 / n.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::etf::Refusal;

/// The keys are hashes already: used as they are.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub struct Atoms {
    seen: HashSet<u64, BuildHasherDefault<Identity>>,
    key: foldhash::fast::RandomState,
    max: usize,
}

impl std::fmt::Debug for Atoms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Atoms({} of {})", self.seen.len(), self.max)
    }
}

impl Atoms {
    pub fn new(max: usize) -> Atoms {
        Atoms { seen: HashSet::default(), key: foldhash::fast::RandomState::default(), max }
    }

    /// An atom (its UTF-8 text) the peer sends; refused if it is new and
    /// the budget is spent.
    pub fn admit(&mut self, text: &[u8]) -> Result<(), Refusal> {
        let h = self.key.hash_one(text);
        if self.seen.contains(&h) {
            return Ok(());
        }
        if self.seen.len() >= self.max {
            return Err(Refusal::AtomBudget);
        }
        self.seen.insert(h);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_atoms_are_counted_once_up_to_the_budget() {
        let mut a = Atoms::new(2);
        assert!(a.admit(b"ok").is_ok());
        assert!(a.admit(b"ok").is_ok());
        assert!(a.admit(b"error").is_ok());
        assert_eq!(a.admit(b"third"), Err(Refusal::AtomBudget));
        assert!(a.admit(b"ok").is_ok(), "known atoms still pass");
        assert_eq!(a.len(), 2);
        // Long atoms and the empty atom count the same way.
        let mut a = Atoms::new(3);
        let long = [b'l'; 200];
        for _ in 0..3 {
            a.admit(&long).unwrap();
            a.admit(b"").unwrap();
        }
        assert_eq!(a.len(), 2);
        a.admit(b"x").unwrap();
        assert_eq!(a.admit(&[b'l'; 201]), Err(Refusal::AtomBudget));
        // Many atoms: each one counted exactly once.
        let mut a = Atoms::new(100_000);
        for round in 0..2 {
            for i in 0..10_000 {
                a.admit(format!("atom_{i}").as_bytes()).unwrap();
            }
            assert_eq!(a.len(), 10_000, "round {round}");
        }
    }
}
