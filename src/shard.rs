//! A hash map in shards. A hash map doubles its table when it fills, and
//! rehashes every entry at once: at a million entries that took ~90 ms
//! here, during which no other peer's messages moved. In 16 shards that
//! grow at different moments, the worst pause is about a sixteenth of
//! that. Equal shards would fill, and so grow, all at once; so shard `i`
//! takes a share of the keys proportional to 2^(i/16), which puts their
//! doublings 2^(1/16) (4.4 %) of the map's size apart. Keys go to a shard
//! by a keyed hash, so a peer choosing its handles cannot pile them into
//! one shard.

use std::borrow::Borrow;
use std::collections::hash_map::{self, HashMap};
use std::hash::{BuildHasher, Hash};

const SHARDS: usize = 16;

type Hasher = foldhash::fast::RandomState;

#[derive(Debug, Clone)]
pub struct ShardedMap<K, V> {
    shards: Vec<HashMap<K, V, Hasher>>,
    pick: Hasher,
}

/// Shard `i` takes the hashes below `BOUNDS[i]` (and at or above the one
/// before): shares proportional to 2^(i/16).
static BOUNDS: std::sync::LazyLock<[u64; SHARDS]> = std::sync::LazyLock::new(|| {
    let w: Vec<f64> = (0..SHARDS).map(|i| (i as f64 / SHARDS as f64).exp2()).collect();
    let total: f64 = w.iter().sum();
    let mut bounds = [u64::MAX; SHARDS];
    let mut cum = 0.0;
    for i in 0..SHARDS - 1 {
        cum += w[i];
        bounds[i] = (cum / total * u64::MAX as f64) as u64;
    }
    bounds
});

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap { shards: (0..SHARDS).map(|_| HashMap::default()).collect(), pick: Hasher::default() }
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    /// (A key and what it borrows as hash alike: `Borrow`'s contract.)
    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        let h = self.pick.hash_one(k);
        BOUNDS.partition_point(|&b| b <= h).min(SHARDS - 1)
    }

    pub fn get<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.shards[self.shard(k)].get(k)
    }

    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let i = self.shard(k);
        self.shards[i].get_mut(k)
    }

    pub fn contains_key<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(k).is_some()
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let i = self.shard(&k);
        self.shards[i].insert(k, v)
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let i = self.shard(k);
        self.shards[i].remove(k)
    }

    pub fn entry(&mut self, k: K) -> hash_map::Entry<'_, K, V> {
        let i = self.shard(&k);
        self.shards[i].entry(k)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(HashMap::values)
    }

    pub fn into_values(self) -> impl Iterator<Item = V> {
        self.shards.into_iter().flat_map(HashMap::into_values)
    }

    pub fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        for s in &mut self.shards {
            s.retain(&mut f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut m: ShardedMap<u64, u64> = ShardedMap::default();
        assert!(m.is_empty());
        for k in 0..10_000 {
            assert_eq!(m.insert(k, k * 2), None);
        }
        assert_eq!(m.insert(7, 0), Some(14));
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.get(&7), Some(&0));
        *m.get_mut(&8).unwrap() += 1;
        assert_eq!(m.get(&8), Some(&17));
        *m.entry(20_000).or_insert(5) += 1;
        assert_eq!(m.get(&20_000), Some(&6));
        assert_eq!(m.remove(&20_000), Some(6));
        m.retain(|k, _| k % 2 == 0);
        assert_eq!(m.len(), 5_000);
        assert_eq!(m.iter().count(), 5_000);
        assert!(!m.contains_key(&3) && m.contains_key(&4));
        let mut values: Vec<u64> = m.into_values().collect();
        values.sort();
        assert_eq!(values[..3], [0, 4, 8]);
        // Every shard takes its share of sequential keys.
        let mut m: ShardedMap<u64, ()> = ShardedMap::default();
        for k in 0..160_000 {
            m.insert(k, ());
        }
        let sizes: Vec<usize> = m.shards.iter().map(HashMap::len).collect();
        assert!(sizes.iter().all(|&n| (6_500..14_500).contains(&n)), "{sizes:?}");
        assert!(sizes[15] > sizes[0] * 3 / 2, "{sizes:?}");
    }

    /// The point of it all: while a map of a million grows, its shards
    /// double at different moments, never three within 1 % of the inserts.
    #[test]
    fn shards_grow_at_different_moments() {
        let mut m: ShardedMap<u64, u64> = ShardedMap::default();
        let mut caps: Vec<usize> = m.shards.iter().map(HashMap::capacity).collect();
        let mut grew = Vec::new();
        let n = 1 << 20;
        for k in 0..n {
            let i = m.shard(&k);
            m.insert(k, k);
            let c = m.shards[i].capacity();
            if c != caps[i] {
                caps[i] = c;
                if k >= n / 2 {
                    grew.push(k);
                }
            }
        }
        assert!(grew.len() >= 12, "{grew:?}");
        for w in grew.windows(3) {
            assert!(w[2] - w[0] >= n / 100, "three shards grew within 1 % of the inserts: {grew:?}");
        }
    }
}
