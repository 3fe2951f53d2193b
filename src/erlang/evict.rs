//! The order in which a bounded table forgets entries: oldest unpinned
//! first, in O(1) amortized per operation however many entries are pinned.
//!
//! Pinned entries are not in the queue at all: pinning only bumps the
//! entry's generation, which makes its queued position stale, and
//! unpinning queues it again under the new generation. Stale positions are
//! skipped when popped, and swept out once they are half the queue, so the
//! queue never holds more than twice the unpinned entries (plus a little).

use std::collections::VecDeque;

/// What a table keeps per entry for its eviction order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pins: u32,
    generation: u32,
}

impl Slot {
    pub fn is_pinned(&self) -> bool {
        self.pins > 0
    }
}

#[derive(Debug, Default)]
pub struct Order {
    queue: VecDeque<(u64, u32)>,
    /// Entries not pinned (queued under their current generation).
    unpinned: usize,
}

impl Order {
    /// A new entry `key`, unpinned: the newest to go.
    pub fn insert(&mut self, key: u64) -> Slot {
        self.queue.push_back((key, 0));
        self.unpinned += 1;
        Slot::default()
    }

    pub fn pin(&mut self, slot: &mut Slot) {
        if slot.pins == 0 {
            slot.generation = slot.generation.wrapping_add(1);
            self.unpinned -= 1;
        }
        slot.pins += 1;
    }

    /// Releases one pin; back in the queue (as the newest) once none is left.
    pub fn unpin(&mut self, key: u64, slot: &mut Slot, sweep: impl FnMut(u64, u32) -> bool) {
        if slot.pins == 0 {
            return;
        }
        slot.pins -= 1;
        if slot.pins == 0 {
            slot.generation = slot.generation.wrapping_add(1);
            self.queue.push_back((key, slot.generation));
            self.unpinned += 1;
            self.sweep(sweep);
        }
    }

    /// The oldest unpinned entry, taken out of the order (the caller
    /// removes it from its table). `current(key, generation)`: whether the
    /// table still has `key` unpinned under that generation.
    pub fn pop(&mut self, mut current: impl FnMut(u64, u32) -> bool) -> Option<u64> {
        while let Some((key, generation)) = self.queue.pop_front() {
            if current(key, generation) {
                self.unpinned -= 1;
                return Some(key);
            }
        }
        None
    }

    /// Drops stale positions once they are half the queue.
    fn sweep(&mut self, mut current: impl FnMut(u64, u32) -> bool) {
        if self.queue.len() > 2 * self.unpinned + 64 {
            self.queue.retain(|&(k, g)| current(k, g));
        }
    }

    #[cfg(test)]
    pub fn unpinned(&self) -> usize {
        self.unpinned
    }

    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

/// Whether `slot` is `generation` and unpinned (for `pop` and `sweep`).
pub fn current(slot: Option<&Slot>, generation: u32) -> bool {
    slot.is_some_and(|s| s.pins == 0 && s.generation == generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn oldest_unpinned_first_and_the_queue_stays_small() {
        let mut o = Order::default();
        let mut slots: HashMap<u64, Slot> = HashMap::new();
        for k in 0..10 {
            slots.insert(k, o.insert(k));
        }
        // Pin the oldest three; they are skipped.
        for k in 0..3 {
            o.pin(slots.get_mut(&k).unwrap());
        }
        let pop = |o: &mut Order, slots: &mut HashMap<u64, Slot>| {
            let k = o.pop(|k, g| current(slots.get(&k), g));
            if let Some(k) = k {
                slots.remove(&k);
            }
            k
        };
        assert_eq!(pop(&mut o, &mut slots), Some(3));
        // Unpinning queues again as the newest.
        let mut s = slots[&1];
        o.unpin(1, &mut s, |k, g| current(slots.get(&k), g));
        slots.insert(1, s);
        assert_eq!(o.unpinned(), 7);
        let order: Vec<u64> = std::iter::from_fn(|| pop(&mut o, &mut slots)).collect();
        assert_eq!(order, vec![4, 5, 6, 7, 8, 9, 1]);
        // Pinned twice needs two unpins.
        let mut s = slots[&2];
        o.pin(&mut s);
        o.unpin(2, &mut s, |_, _| true);
        assert!(s.is_pinned());
        // Many pin/unpin cycles keep the queue within twice the unpinned entries.
        let mut o = Order::default();
        let mut slots: HashMap<u64, Slot> = HashMap::new();
        for k in 0..100 {
            slots.insert(k, o.insert(k));
        }
        for _ in 0..1000 {
            for k in 0..100 {
                let mut s = slots[&k];
                o.pin(&mut s);
                slots.insert(k, s);
                let snapshot = slots.clone();
                let mut s = slots[&k];
                o.unpin(k, &mut s, |k2, g| current(if k2 == k { None } else { snapshot.get(&k2) }, g));
                slots.insert(k, s);
            }
        }
        assert!(o.queued() <= 2 * 100 + 64 + 1, "{} queued", o.queued());
    }
}
