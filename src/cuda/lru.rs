//! A bounded map that forgets the least recently used entry: the cuBLASLt plan cache, whose keys
//! (one per distinct token count) would otherwise grow without bound on a long-running host.
//! Pure bookkeeping (no CUDA), unit-tested here. Eviction scans for the oldest entry: it runs only
//! on a miss, which already costs a heuristic query, and the capacity is small.

use std::collections::HashMap;
use std::hash::Hash;

/// An LRU map of at most `capacity` entries (at least one).
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: usize,
    tick: u64,
    map: HashMap<K, (V, u64)>,
    evictions: u64,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    /// An empty map holding at most `capacity` entries (0 is taken as 1).
    pub fn new(capacity: usize) -> Self {
        Lru { capacity: capacity.max(1), tick: 0, map: HashMap::new(), evictions: 0 }
    }

    /// The entry for `k`, made with `make` on a miss (the oldest entry is dropped first when the
    /// map is full). A failing `make` leaves the map as it was.
    pub fn get_or_try_insert<E>(&mut self, k: K, make: impl FnOnce() -> Result<V, E>) -> Result<&mut V, E> {
        self.tick += 1;
        let tick = self.tick;
        if !self.map.contains_key(&k) {
            let v = make()?;
            while self.map.len() >= self.capacity {
                self.evict_oldest();
            }
            self.map.insert(k, (v, tick));
        }
        let e = self.map.get_mut(&k).expect("present");
        e.1 = tick;
        Ok(&mut e.0)
    }

    /// The entry for `k`, if held (counts as a use).
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(k).map(|e| {
            e.1 = tick;
            &mut e.0
        })
    }

    /// Holds `v` for `k` (replacing an entry for `k`; the oldest entry is dropped first when the
    /// map is full).
    pub fn insert(&mut self, k: K, v: V) {
        self.tick += 1;
        if !self.map.contains_key(&k) {
            while self.map.len() >= self.capacity {
                self.evict_oldest();
            }
        }
        self.map.insert(k, (v, self.tick));
    }

    /// Changes the capacity (0 is taken as 1), dropping the oldest entries that no longer fit.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.map.len() > self.capacity {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(k) = self.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
            self.map.remove(&k);
            self.evictions += 1;
        }
    }

    /// Drops every entry.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The most entries it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries dropped so far to make room.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether `k` is held (does not count as a use).
    pub fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn make(v: u32, made: &Cell<u32>) -> impl FnOnce() -> Result<u32, ()> + '_ {
        move || {
            made.set(made.get() + 1);
            Ok(v)
        }
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let made = Cell::new(0);
        let mut lru = Lru::new(2);
        assert_eq!(*lru.get_or_try_insert(1, make(10, &made)).unwrap(), 10);
        assert_eq!(*lru.get_or_try_insert(2, make(20, &made)).unwrap(), 20);
        assert_eq!(*lru.get_or_try_insert(1, make(99, &made)).unwrap(), 10, "a hit keeps the value");
        assert_eq!(made.get(), 2, "a hit makes nothing");
        lru.get_or_try_insert(3, make(30, &made)).unwrap(); // evicts 2, the older use
        assert!(lru.contains(&1) && lru.contains(&3) && !lru.contains(&2));
        assert_eq!((lru.len(), lru.evictions()), (2, 1));
        lru.set_capacity(1);
        assert!(lru.contains(&3) && !lru.contains(&1));
    }

    #[test]
    fn get_counts_as_a_use_and_insert_evicts_the_oldest() {
        let mut lru = Lru::new(2);
        lru.insert(1, 10);
        lru.insert(2, 20);
        assert_eq!(lru.get_mut(&1).copied(), Some(10)); // 2 is now the older use
        lru.insert(3, 30);
        assert!(lru.contains(&1) && lru.contains(&3) && !lru.contains(&2));
        lru.insert(3, 31); // a replacement evicts nothing
        assert_eq!((lru.get_mut(&3).copied(), lru.len(), lru.evictions()), (Some(31), 2, 1));
        assert!(lru.get_mut(&2).is_none());
    }

    #[test]
    fn a_failed_make_changes_nothing() {
        let mut lru: Lru<u32, u32> = Lru::new(1);
        lru.get_or_try_insert(1, || Ok::<_, ()>(1)).unwrap();
        assert!(lru.get_or_try_insert(2, || Err(())).is_err());
        assert!(lru.contains(&1) && lru.len() == 1 && lru.evictions() == 0);
    }

    #[test]
    fn many_distinct_keys_stay_bounded() {
        let mut lru = Lru::new(64);
        for k in 0..10_000u32 {
            lru.get_or_try_insert(k, || Ok::<_, ()>(k)).unwrap();
            // A hot key used every step is never evicted.
            lru.get_or_try_insert(u32::MAX, || Ok::<_, ()>(0)).unwrap();
            assert!(lru.len() <= 64);
        }
        assert!(lru.contains(&u32::MAX));
        assert_eq!(lru.evictions(), 10_001 - 64);
    }
}
