//! A small map bounded in entries, for the guard's per-endpoint breakers,
//! scoped holds and per-client shares: hostile paths and rotating
//! credentials cannot grow it. Past its bound it first drops what its
//! owner says is dead (expired holds, idle clients), then the entries used
//! longest ago, an eighth of the bound at a time, so that dropping costs
//! O(1) a call amortised. A `Mutex<HashMap>`: the guard's maps are small
//! and touched once a miss, and a general cache (moka) instantiated three
//! more times cost the function binary about 0.75 MB.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

pub(super) struct BoundedMap<K, V> {
    map: Mutex<HashMap<K, Slot<V>>>,
    max: usize,
}

struct Slot<V> {
    value: V,
    used: Instant,
}

impl<K: Hash + Eq + Clone, V: Clone> BoundedMap<K, V> {
    pub(super) fn new(max: usize) -> Self {
        BoundedMap {
            map: Mutex::new(HashMap::new()),
            max: max.max(8),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Slot<V>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value under `key` (marked used now).
    pub(super) fn get<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.lock();
        let slot = map.get_mut(key)?;
        slot.used = now;
        Some(slot.value.clone())
    }

    /// The value under `key`, made by `make` when there is none; with the
    /// number of entries held. `alive(value, last used)` says which
    /// entries to keep when the map is full.
    pub(super) fn get_or_insert_with<Q>(
        &self,
        key: &Q,
        now: Instant,
        make: impl FnOnce() -> V,
        alive: impl Fn(&V, Instant) -> bool,
    ) -> (V, usize)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut map = self.lock();
        if let Some(slot) = map.get_mut(key) {
            slot.used = now;
            let value = slot.value.clone();
            return (value, map.len());
        }
        self.make_room(&mut map, &alive);
        let value = make();
        map.insert(
            key.to_owned(),
            Slot {
                value: value.clone(),
                used: now,
            },
        );
        (value, map.len())
    }

    /// Set `key` to `value` (marked used now).
    pub(super) fn insert(
        &self,
        key: K,
        value: V,
        now: Instant,
        alive: impl Fn(&V, Instant) -> bool,
    ) {
        let mut map = self.lock();
        if !map.contains_key(&key) {
            self.make_room(&mut map, &alive);
        }
        map.insert(key, Slot { value, used: now });
    }

    /// Drop the entries `alive` says are dead; the number left.
    pub(super) fn retain_alive(&self, alive: impl Fn(&V, Instant) -> bool) -> usize {
        let mut map = self.lock();
        map.retain(|_, s| alive(&s.value, s.used));
        map.len()
    }

    fn make_room(&self, map: &mut HashMap<K, Slot<V>>, alive: &impl Fn(&V, Instant) -> bool) {
        if map.len() < self.max {
            return;
        }
        map.retain(|_, s| alive(&s.value, s.used));
        if map.len() < self.max {
            return;
        }
        // Still full: the least recently used eighth goes.
        let mut used: Vec<Instant> = map.values().map(|s| s.used).collect();
        let cut = self.max / 8;
        let (_, cutoff, _) = used.select_nth_unstable(cut);
        let cutoff = *cutoff;
        map.retain(|_, s| s.used > cutoff);
    }
}

impl<K, V> std::fmt::Debug for BoundedMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.map.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("BoundedMap")
            .field("len", &len)
            .field("max", &self.max)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn it_never_holds_more_than_its_bound_and_keeps_the_recently_used() {
        let m: BoundedMap<String, u32> = BoundedMap::new(64);
        let t0 = Instant::now();
        m.insert("hot".into(), 1, t0, |_, _| true);
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) + 1);
            m.insert(format!("k{i}"), i, now, |_, _| true);
            // The hot key is used all the time.
            assert_eq!(m.get("hot", now), Some(1));
            assert!(m.lock().len() <= 64);
        }
        assert_eq!(m.get("k9999", t0), Some(9999));
    }

    #[test]
    fn dead_entries_go_first() {
        let m: BoundedMap<String, u64> = BoundedMap::new(8);
        let t0 = Instant::now();
        for i in 0..8u64 {
            m.insert(format!("k{i}"), i, t0, |_, _| true);
        }
        // Even values are dead: they make room before any live one goes.
        let alive = |v: &u64, _: Instant| v % 2 == 1;
        let (v, len) = m.get_or_insert_with("new", t0, || 99, alive);
        assert_eq!((v, len), (99, 5));
        for i in [1u64, 3, 5, 7] {
            assert_eq!(m.get(format!("k{i}").as_str(), t0), Some(i));
        }
        assert_eq!(m.retain_alive(|v, _| *v != 99), 4);
    }
}
