//! A peer's atom budget. Every atom a peer's messages and group names
//! bring to our nodes stays in their atom tables for good (a node dies
//! when its table is full), so each peer may introduce at most so many
//! distinct atoms; a message that would bring one more is refused.

use foldhash::HashSet;

use super::etf::Refusal;

#[derive(Debug)]
pub struct Atoms {
    seen: HashSet<Box<[u8]>>,
    max: usize,
}

impl Atoms {
    pub fn new(max: usize) -> Atoms {
        Atoms { seen: HashSet::default(), max }
    }

    /// An atom (its UTF-8 text) the peer sends; refused if it is new and
    /// the budget is spent.
    pub fn admit(&mut self, text: &[u8]) -> Result<(), Refusal> {
        if self.seen.contains(text) {
            return Ok(());
        }
        if self.seen.len() >= self.max {
            return Err(Refusal::AtomBudget);
        }
        self.seen.insert(text.into());
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
    }
}
