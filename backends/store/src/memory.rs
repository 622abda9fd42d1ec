//! The embedded backend: a moka cache bounded in bytes with per-entry
//! expiry. The default store, and the L1 in front of the shared ones (a
//! Lambda execution context outlives one invocation, so it keeps paying off).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use moka::future::Cache;
use moka::notification::RemovalCause;

use crate::rate::{self, gcra, Step};
use crate::shared::{prepare_put, PutPlan};
use crate::{
    is_expired, now_millis, CacheStore, Capabilities, Found, FoundSlot, LockToken, Permit,
    PurgeFeed, PutOptions, Rate, Record, StoreError, StoreKey, UnixMillis,
};

/// Fixed per-entry cost counted against the byte budget besides the bytes
/// an entry holds (moka's nodes, deques and timer wheel, the allocator's
/// rounding), so many tiny entries cannot exceed the budget several times
/// over. Measured, with [`TAG_OVERHEAD`]: see docs/hostile-input.md.
const ENTRY_OVERHEAD: usize = 384;

/// Fixed cost of one tag of one entry besides its bytes, on 64-bit: the
/// `Arc<str>` in the entry's tag list (16 B) and the allocator's rounding
/// of its bytes with the Arc's counts (~36 B); the index's map slot
/// (56 B, ~100 B at hashbrown's load factor and growth; its key is the
/// same `Arc<str>`); the member set, a table of its own for a tag few
/// entries share (4 buckets of 32 B and control bytes: ~160 B); the set's
/// copy of the key (~10 B rounding). About 320 B; 384 with the
/// allocator's headers. A first estimate of 96 B let 500-tag entries
/// reach 2.5 × capacity, 256 B 1.53–1.61 ×.
const TAG_OVERHEAD: usize = 384;

/// What a value's decoded form ([`Found`]) costs besides the value it
/// slices (header values and body are slices of it): the record's and the
/// proxy's copies of each header name and tag, their vectors, the proxy's
/// header map (a bucket and a name per header) and the two structs; for a
/// gzip entry, the decoded body the proxy keeps once a client that does
/// not take gzip has asked for it ([`Entry::gzip_decoded_len`]).
fn prepared_cost(found: &Found) -> usize {
    const BASE: usize = 512;
    const PER_HEADER: usize = 160;
    const PER_TAG: usize = 64;
    match found.record() {
        Record::Entry(e) => {
            let headers: usize = e
                .headers
                .iter()
                .map(|(n, _)| 2 * n.len() + PER_HEADER)
                .sum();
            let tags: usize = e.tags.iter().map(|t| 2 * (t.len() + PER_TAG)).sum();
            let decoded = e.gzip_decoded_len().unwrap_or(0);
            BASE + headers + tags + decoded
        }
        _ => BASE,
    }
}

/// Everything the store holds for one entry: the value (body, headers and
/// tags as encoded), the key in the cache, the entry's own tag list (whose
/// strings the tag index shares), and in the tag index one copy of the key
/// per tag.
fn weight(key: &StoreKey, v: &Stored) -> u32 {
    let key_len = key.as_str().len();
    let tags: usize = v
        .tags
        .iter()
        .map(|t| t.len() + key_len + TAG_OVERHEAD)
        .sum();
    (v.value.len() + key_len + tags + ENTRY_OVERHEAD + v.prepared_cost)
        .try_into()
        .unwrap_or(u32::MAX)
}

#[derive(Clone)]
struct Stored {
    value: Bytes,
    expires_at: UnixMillis,
    /// Shared with the tag index: a long tag (the URL tag of a long URL)
    /// is held once, not once here and once in the index.
    tags: Arc<[Arc<str>]>,
    /// Which put stored it: the tag index names the put that recorded each
    /// member, so removing an old value (replaced, invalidated by a flush,
    /// evicted) never unrecords the same key stored again since.
    put: u64,
    /// The value decoded when it was stored, for hits ([`Found`]); empty
    /// for a value that is not a record.
    found: FoundSlot,
    /// What `found` and what the proxy derives from it cost.
    prepared_cost: usize,
}

/// Tag -> the keys stored with it, each with the put that recorded it.
type TagIndex = Arc<Mutex<HashMap<Arc<str>, HashMap<StoreKey, u64>>>>;

/// In-process store. Cloning shares the same cache.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<StoreKey, Stored>,
    tags: TagIndex,
    puts: Arc<AtomicU64>,
    locks: Arc<Mutex<HashMap<StoreKey, (LockToken, Instant)>>>,
    permits: Arc<Mutex<Budgets>>,
    /// The monotonic origin of the TATs (an in-process budget needs no
    /// wall clock, and a wall clock stepping back must not free slots).
    clock: Instant,
    caps: Capabilities,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("weighted_bytes", &self.cache.weighted_size())
            .field("max_value_bytes", &self.caps.max_value_bytes)
            .finish()
    }
}

/// Rate budgets: each key's TAT in microseconds since `MemoryStore::clock`.
#[derive(Default)]
struct Budgets {
    tats: HashMap<StoreKey, u64>,
    /// Size at which idle budgets are next swept out: doubles with the live
    /// ones, so a sweep costs O(1) per call amortised.
    sweep_at: usize,
}

/// Fewest budgets held before idle ones are swept out.
const BUDGETS_SWEEP_MIN: usize = 4096;

struct ExpiresAt;

impl moka::Expiry<StoreKey, Stored> for ExpiresAt {
    fn expire_after_create(&self, _: &StoreKey, v: &Stored, _: Instant) -> Option<Duration> {
        Some(Duration::from_millis(
            v.expires_at.saturating_sub(now_millis()),
        ))
    }
    fn expire_after_update(
        &self,
        _: &StoreKey,
        v: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            v.expires_at.saturating_sub(now_millis()),
        ))
    }
}

impl MemoryStore {
    /// A store holding at most `capacity_bytes` (everything an entry holds:
    /// value, key, tags and tag index, plus a fixed overhead each); values
    /// over `max_value_bytes` are refused.
    pub fn new(capacity_bytes: u64, max_value_bytes: usize) -> Self {
        let tags: TagIndex = Arc::default();
        let index = tags.clone();
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(weight)
            .expire_after(ExpiresAt)
            .eviction_listener(move |key: Arc<StoreKey>, v: Stored, _: RemovalCause| {
                // Only this put's records: a newer put of the key recorded
                // its own (and, for a replaced value, the tags it dropped
                // are unrecorded here).
                let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
                for tag in v.tags.iter() {
                    if let Some(set) = index.get_mut(tag) {
                        if set.get(&*key) == Some(&v.put) {
                            set.remove(&*key);
                        }
                        if set.is_empty() {
                            index.remove(tag);
                        }
                    }
                }
            })
            .build();
        MemoryStore {
            cache,
            tags,
            puts: Arc::default(),
            locks: Arc::default(),
            permits: Arc::default(),
            clock: Instant::now(),
            caps: Capabilities {
                name: "memory",
                max_value_bytes,
                shared: false,
                purge_feed: PurgeFeed::Local,
                lists_tag_members: true,
                scans_values: true,
                write_ids: false,
            },
        }
    }

    /// The live value under `key` and the slot its decoded form is kept
    /// in (a prepared hit reads it from there).
    pub async fn get_found(&self, key: &StoreKey) -> Option<(Bytes, FoundSlot)> {
        self.cache
            .get(key)
            .await
            .filter(|s| !is_expired(s.expires_at, now_millis()))
            .map(|s| (s.value, s.found))
    }

    /// [`CacheStore::put`], with the value's decoded form when the caller
    /// has it already (an L1 copy of what the main backend returned);
    /// otherwise it is decoded here, once, for every hit to share.
    pub async fn put_found(
        &self,
        key: &StoreKey,
        value: Bytes,
        opts: &PutOptions,
        found: Option<Arc<Found>>,
    ) -> Result<(), StoreError> {
        let tags: Arc<[Arc<str>]> = match prepare_put(&self.caps, value.len(), opts)? {
            PutPlan::Remove => {
                self.cache.invalidate(key).await;
                return Ok(());
            }
            PutPlan::Store(put) => put.tags.iter().map(|t| Arc::from(*t)).collect(),
        };
        let put = self.puts.fetch_add(1, Ordering::Relaxed);
        {
            let mut index = self.tags.lock().unwrap_or_else(|p| p.into_inner());
            for tag in tags.iter() {
                index
                    .entry(tag.clone())
                    .or_default()
                    .insert(key.clone(), put);
            }
        }
        let found = found.or_else(|| Record::decode(&value).ok().map(|r| Arc::new(Found::new(r))));
        let slot = FoundSlot::default();
        let mut prepared = 0;
        if let Some(found) = found {
            prepared = prepared_cost(&found);
            let _ = slot.set(found);
        }
        let stored = Stored {
            value,
            expires_at: opts.expires_at,
            tags,
            put,
            found: slot,
            prepared_cost: prepared,
        };
        self.cache.insert(key.clone(), stored).await;
        Ok(())
    }

    /// Entries currently held (approximate until moka runs its housekeeping).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Drop every value at once (locks and rate budgets are kept). Their
    /// tag records go as moka removes them.
    pub fn clear(&self) {
        self.cache.invalidate_all();
    }
}

#[async_trait]
impl CacheStore for MemoryStore {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .cache
            .get(key)
            .await
            .filter(|s| !is_expired(s.expires_at, now_millis()))
            .map(|s| s.value))
    }

    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        self.put_found(key, value, opts, None).await
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        Ok(self
            .cache
            .remove(key)
            .await
            .is_some_and(|s| !is_expired(s.expires_at, now_millis())))
    }

    async fn try_lock(
        &self,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        let now = Instant::now();
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 4096 {
            // Holders that died never unlock; drop their expired locks.
            locks.retain(|_, (_, until)| *until > now);
        }
        match locks.get(key) {
            Some((_, until)) if *until > now => Ok(None),
            _ => {
                let token = LockToken::generate();
                locks.insert(key.clone(), (token.clone(), now + ttl));
                Ok(Some(token))
            }
        }
    }

    async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        match locks.get(key) {
            Some((held, until)) if held == token && *until > Instant::now() => {
                locks.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A budget of this process only (the store is not shared): one
    /// mutex'd step on a monotonic clock.
    async fn take_permit(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError> {
        rate.check(self.caps.name)?;
        let mut budgets = self.permits.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock, so steps are applied in the order of their `now`.
        let now = u64::try_from(self.clock.elapsed().as_micros()).unwrap_or(u64::MAX);
        if budgets.tats.len() >= budgets.sweep_at.max(BUDGETS_SWEEP_MIN) {
            // A TAT in the past is the same as none: idle budgets go.
            budgets.tats.retain(|_, tat| *tat > now);
            budgets.sweep_at = 2 * budgets.tats.len();
        }
        let step = gcra(
            budgets.tats.get(key).copied(),
            now,
            rate.emission_us(),
            rate.tolerance_us(),
            rate::max_wait_us(max_wait),
        );
        if let Step::Grant { new_tat, .. } = step {
            budgets.tats.insert(key.clone(), new_tat);
        }
        Ok(step.permit())
    }

    async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
        let members = {
            let mut index = self.tags.lock().unwrap_or_else(|p| p.into_inner());
            index.remove(tag).unwrap_or_default()
        };
        let mut removed = 0;
        for key in members.into_keys() {
            // The key may have been re-stored since without this tag.
            let Some(current) = self.cache.get(&key).await else {
                continue;
            };
            if current.tags.iter().any(|t| &**t == tag) {
                self.cache.invalidate(&key).await;
                if !is_expired(current.expires_at, now_millis()) {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    async fn tag_members(&self, tag: &str) -> Result<Vec<StoreKey>, StoreError> {
        let index = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        Ok(index
            .get(tag)
            .map(|set| set.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// Every live key, in one page: the map is in this process's memory.
    async fn scan_values(&self, _cursor: Option<&str>) -> Result<crate::ScanPage, StoreError> {
        let now = now_millis();
        let keys = self
            .cache
            .iter()
            .filter(|(_, v)| !is_expired(v.expires_at, now))
            .map(|(k, _)| StoreKey::clone(&k))
            .collect();
        Ok(crate::ScanPage { keys, next: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle budgets do not pile up: once enough are held, the ones whose
    /// TAT has passed are swept out.
    #[tokio::test]
    async fn idle_budgets_are_swept() {
        let store = MemoryStore::new(1 << 20, 1 << 16);
        let rate = Rate::new(1e5, 1); // 10 µs apart: idle almost at once
        for i in 0..BUDGETS_SWEEP_MIN {
            let k = StoreKey::hash("t", [i.to_string()]);
            store.take_permit(&k, rate, Duration::ZERO).await.unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
        let busy = StoreKey::hash("t", ["busy"]);
        store
            .take_permit(&busy, Rate::new(1.0, 1), Duration::ZERO)
            .await
            .unwrap();
        let budgets = store.permits.lock().unwrap();
        assert_eq!(budgets.tats.len(), 1, "idle budgets kept");
        assert!(budgets.tats.contains_key(&busy));
    }
}
