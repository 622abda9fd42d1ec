//! The proxy's view of the cache: records instead of bytes, an optional
//! in-process L1 in front of a shared backend, and failures as misses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::coherence::{Subscriber, L1};
use crate::guard::GuardedStore;
use crate::memory::MemoryStore;
use crate::{
    now_millis, CacheStore, Found, LockToken, Permit, PurgeFeed, PurgeListener, PurgeNotice,
    PutOptions, Rate, Read, Record, Seen, StoreError, StoreKey,
};

/// Counters of what went wrong below the proxy, for metrics and tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Values that did not decode (foreign, truncated, older format): served as misses.
    pub corrupt: AtomicU64,
    /// Backend errors, timeouts and open-breaker refusals: served as misses.
    pub backend_errors: AtomicU64,
    /// Records not stored because they exceed the backend's limit.
    pub too_large: AtomicU64,
}

impl CacheStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The outcome of a lookup: a live record or not, and if the backend
/// failed, why (the caller still treats it as a miss).
#[derive(Debug)]
pub struct Lookup {
    /// The record decoded; from the memory store, shared by every read of
    /// the same value ([`Found`]).
    pub found: Option<Arc<Found>>,
    pub error: Option<StoreError>,
}

impl Lookup {
    pub fn record(&self) -> Option<&Record> {
        self.found.as_deref().map(Found::record)
    }

    /// The record, owned.
    pub fn into_record(self) -> Option<Record> {
        self.found.map(Found::into_record)
    }
}

/// The optional L1 of a [`TieredCache`].
#[derive(Debug, Clone)]
pub struct L1Config {
    /// The in-process store.
    pub store: MemoryStore,
    /// How long it may keep a copy of what the main backend holds.
    pub ttl: Duration,
    /// How often a purge log is read, for backends that keep one
    /// ([`PurgeFeed::Log`]).
    pub check_every: Duration,
}

/// Records over a guarded main backend, with an optional L1 that hears of
/// purges made by other instances through the backend ([`crate::coherence`]).
#[derive(Debug, Clone)]
pub struct TieredCache {
    main: GuardedStore,
    /// The main backend itself when it is the embedded memory store: read
    /// directly (in-process memory is never slow and never fails, so the
    /// guard has nothing to do), each value decoded once.
    memory_main: Option<MemoryStore>,
    l1: Option<Arc<L1>>,
    /// Without an L1: the last value read from the main backend under each
    /// key, with its decoded form (and what the proxy derived from it). A
    /// read that returns the same bytes again reuses them instead of
    /// decoding; nothing is answered from here without that read, so the
    /// backend alone still says what is cached.
    prepared: Option<MemoryStore>,
    /// Keeps the push subscription's listener alive as long as the cache.
    _subscriber: Option<Arc<dyn PurgeListener>>,
    /// The stale window a soft purge gives entries that name none.
    soft_purge_window: Duration,
    stats: Arc<CacheStats>,
}

impl TieredCache {
    /// With a push backend, subscribes to its purges (needs a Tokio runtime).
    pub fn new(main: GuardedStore, l1: Option<L1Config>) -> Self {
        let feed = main.capabilities().purge_feed;
        let l1 = l1.map(|c| Arc::new(L1::new(c.store, c.ttl, feed, c.check_every)));
        let subscriber = match (&l1, feed) {
            (Some(l1), PurgeFeed::Push) => {
                let listener: Arc<dyn PurgeListener> = Arc::new(Subscriber(l1.clone()));
                main.watch_purges(Arc::downgrade(&listener));
                Some(listener)
            }
            _ => None,
        };
        TieredCache {
            main,
            memory_main: None,
            l1,
            prepared: None,
            _subscriber: subscriber,
            soft_purge_window: Duration::ZERO,
            stats: Arc::default(),
        }
    }

    /// The stale-while-revalidate window a soft purge gives an entry whose
    /// response named none (`cache.stale_while_revalidate`). Default 0: such
    /// an entry is removed.
    pub fn with_soft_purge_window(mut self, window: Duration) -> Self {
        self.soft_purge_window = window;
        self
    }

    /// Reads of the main backend, the embedded memory `store` that `main`
    /// guards, go to it directly.
    pub fn with_memory_main(mut self, store: MemoryStore) -> Self {
        self.memory_main = Some(store);
        self
    }

    /// Keep the decoded form of what reads of the main backend return in
    /// `store`, to reuse when the next read returns the same bytes. Only
    /// without an L1 (which keeps decoded copies itself).
    pub fn with_prepared_reads(mut self, store: MemoryStore) -> Self {
        if self.l1.is_none() && self.memory_main.is_none() {
            self.prepared = Some(store);
        }
        self
    }

    /// The live record under `key` in the main backend, read with what
    /// `prepared` kept of an earlier read: when the backend names writes,
    /// the read names the kept one and the value crosses the network only
    /// if the key holds another write now; otherwise the kept decoded form
    /// is reused when the bytes read are the very same (compared in full:
    /// the value decides, never a digest of it). Anything new is decoded
    /// and kept.
    async fn prepared_read(
        &self,
        prepared: &MemoryStore,
        key: &StoreKey,
    ) -> Result<Option<Arc<Found>>, StoreError> {
        let kept = match prepared.get_found(key).await {
            Some((bytes, slot)) => slot.get().map(|found| (bytes, found.clone())),
            None => None,
        };
        let seen = kept.as_ref().and_then(|(bytes, found)| {
            let write = found.write()?;
            Some(Seen {
                write,
                len: bytes.len(),
            })
        });
        let (bytes, write) = match self.main.get_since(key, seen).await? {
            Read::Unchanged => {
                let found = kept.map(|(_, found)| found);
                return Ok(found.filter(|f| !f.record().is_expired(now_millis())));
            }
            Read::Current(None) => return Ok(None),
            Read::Current(Some(read)) => read,
        };
        if let Some((kept, found)) = kept {
            // Two named writes are the same value only if they are one
            // write; unnamed, the bytes decide.
            let same = match (found.write(), &write) {
                (Some(a), Some(b)) => a == b,
                _ => {
                    kept.len() == bytes.len()
                        && (kept.as_ptr() == bytes.as_ptr() || kept[..] == bytes[..])
                }
            };
            if same {
                return Ok((!found.record().is_expired(now_millis())).then_some(found));
            }
        }
        let Some((record, bytes)) = self.live(Some(bytes)) else {
            return Ok(None);
        };
        let found = Arc::new(Found::read(record, write));
        if matches!(found.record(), Record::Entry(_) | Record::VaryIndex(_)) {
            let opts = PutOptions {
                expires_at: found.record().expires_at(),
                tags: Vec::new(),
            };
            let _ = prepared
                .put_found(key, bytes, &opts, Some(found.clone()))
                .await;
        }
        Ok(Some(found))
    }

    /// The live record under `key` in an in-process store, decoded once
    /// per value and kept with it. Corrupt values are misses.
    async fn found_in(&self, store: &MemoryStore, key: &StoreKey) -> Option<Arc<Found>> {
        let (bytes, slot) = store.get_found(key).await?;
        let found = match slot.get() {
            Some(found) => found.clone(),
            None => {
                let (record, _) = self.live(Some(bytes))?;
                let found = Arc::new(Found::new(record));
                let _ = slot.set(found.clone());
                found
            }
        };
        (!found.record().is_expired(now_millis())).then_some(found)
    }

    /// The L1 may answer now (for a log backend: after a read that is due).
    async fn l1_usable(&self) -> Option<&L1> {
        let l1 = self.l1.as_deref()?;
        l1.usable(&self.main).await.then_some(l1)
    }

    pub fn backend_name(&self) -> &'static str {
        self.main.capabilities().name
    }
    pub fn max_record_bytes(&self) -> usize {
        self.main.capabilities().max_value_bytes
    }
    pub fn is_shared(&self) -> bool {
        self.main.capabilities().shared
    }
    pub fn stats(&self) -> &Arc<CacheStats> {
        &self.stats
    }

    /// Decode what a tier returned; corrupt and expired values are misses.
    fn live(&self, bytes: Option<Bytes>) -> Option<(Record, Bytes)> {
        let bytes = bytes?;
        match Record::decode(&bytes) {
            Ok(r) if !r.is_expired(now_millis()) => Some((r, bytes)),
            Ok(_) => None,
            Err(e) => {
                CacheStats::bump(&self.stats.corrupt);
                tracing::debug!(error = %e, "undecodable cache value treated as a miss");
                None
            }
        }
    }

    pub async fn get(&self, key: &StoreKey) -> Lookup {
        if let Some(memory) = &self.memory_main {
            return Lookup {
                found: self.found_in(memory, key).await,
                error: None,
            };
        }
        let l1 = self.l1_usable().await;
        // Read before the backend: a purge applied meanwhile moves it, and
        // what the backend returned from before that purge is not kept.
        let generation = l1.map(|l1| l1.generation());
        if let Some(l1) = l1 {
            // The L1 is in-process memory: it cannot fail. Its copy of a
            // stale entry is not used: the shared store may hold a fresher
            // one another instance stored.
            let now = now_millis();
            match self.found_in(&l1.store, key).await {
                Some(found) if matches!(found.record(), Record::Entry(e) if !e.is_fresh(now)) => {}
                Some(found) => {
                    return Lookup {
                        found: Some(found),
                        error: None,
                    }
                }
                None => {}
            }
        }
        // Set only when there is no L1 (`with_prepared_reads`).
        let read = match &self.prepared {
            Some(prepared) => match self.prepared_read(prepared, key).await {
                Ok(found) => {
                    return Lookup { found, error: None };
                }
                Err(e) => Err(e),
            },
            None => self.main.get(key).await,
        };
        match read {
            Ok(read) => match self.live(read) {
                Some((record, bytes)) => {
                    let found = Arc::new(Found::new(record));
                    if let (Some(l1), Some(generation)) = (l1, generation) {
                        // The L1 copy keeps the decoded record.
                        fill_l1(l1, generation, key, Some(&found), found.record(), bytes).await;
                    }
                    Lookup {
                        found: Some(found),
                        error: None,
                    }
                }
                None => Lookup {
                    found: None,
                    error: None,
                },
            },
            Err(e) => {
                CacheStats::bump(&self.stats.backend_errors);
                Lookup {
                    found: None,
                    error: Some(e),
                }
            }
        }
    }

    /// Store a record in the main backend (and the L1). A record larger
    /// than the backend takes is refused with [`StoreError::TooLarge`]
    /// before any I/O.
    pub async fn put(&self, key: &StoreKey, record: &Record) -> Result<(), StoreError> {
        let bytes = record.encode();
        let limit = self.max_record_bytes();
        if bytes.len() > limit {
            CacheStats::bump(&self.stats.too_large);
            return Err(StoreError::TooLarge {
                backend: self.backend_name(),
                size: bytes.len(),
                limit,
            });
        }
        let opts = PutOptions {
            expires_at: record.expires_at(),
            tags: tags_of(record),
        };
        let l1 = self.l1_usable().await;
        let generation = l1.map(|l1| l1.generation());
        let result = self.main.put(key, bytes.clone(), &opts).await;
        match &result {
            Ok(()) => {
                if let (Some(l1), Some(generation)) = (l1, generation) {
                    fill_l1(l1, generation, key, None, record, bytes).await;
                }
            }
            Err(_) => CacheStats::bump(&self.stats.backend_errors),
        }
        result
    }

    pub async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        if let Some(l1) = &self.l1 {
            let _ = l1.store.delete(key).await;
        }
        self.main.delete(key).await
    }

    /// Purge a tag in the main backend, in this process's L1, and (through
    /// the backend) in every other instance's L1. Hard: the entries are
    /// removed. Soft: they are marked stale, answerable within their own
    /// stale-while-revalidate window counted from now (or the
    /// [soft purge window](Self::with_soft_purge_window)); an entry with
    /// neither is removed. L1s drop their copies either way. Returns how
    /// many entries were removed or marked.
    pub async fn purge_tag(&self, tag: &str, soft: bool) -> Result<u64, StoreError> {
        if let Some(l1) = &self.l1 {
            l1.drop_tag(tag).await;
        }
        let n = if soft {
            self.soft_purge_main(tag).await?
        } else {
            self.main.purge_tag(tag).await?
        };
        if let Some(l1) = &self.l1 {
            // Again: a request of this process may have refilled it from
            // the backend before the purge there was done.
            l1.drop_tag(tag).await;
        }
        // After the backend's purge: an instance that drops its copy on
        // the notice must not find the old entry in the backend.
        let notice = PurgeNotice {
            tag: tag.to_owned(),
            soft,
        };
        self.main.announce_purge(&notice).await.map_err(|e| {
            StoreError::backend(
                self.backend_name(),
                format!("purged, but other instances' L1s were not told: {e}"),
            )
        })?;
        Ok(n)
    }

    /// The tags starting with `prefix` that entries stored in the main
    /// backend carry, found by listing its keys
    /// ([`CacheStore::scan_values`]) and reading each value: what a purge
    /// by path prefix purges (the proxy's URL tags). It reads the whole
    /// backend, one value at a time: for operators, never the request path.
    pub async fn stored_tags_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        if !self.main.capabilities().scans_values {
            return Err(StoreError::backend(
                self.backend_name(),
                "cannot list its keys, so it cannot purge by prefix",
            ));
        }
        let mut tags = std::collections::BTreeSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.main.scan_values(cursor.as_deref()).await?;
            for key in &page.keys {
                if let Some((Record::Entry(e), _)) = self.live(self.main.get(key).await?) {
                    tags.extend(e.tags.into_iter().filter(|t| t.starts_with(prefix)));
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(tags),
            }
        }
    }

    /// Mark every entry carrying `tag` stale in the main backend. An entry
    /// with no stale window is removed; so is everything when the backend
    /// cannot list a tag's members.
    async fn soft_purge_main(&self, tag: &str) -> Result<u64, StoreError> {
        if !self.main.capabilities().lists_tag_members {
            return self.main.purge_tag(tag).await;
        }
        let members = match self.main.tag_members(tag).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "soft purge cannot list the tag; purging hard");
                return self.main.purge_tag(tag).await;
            }
        };
        let mut marked = 0;
        for key in members {
            let Some(bytes) = self.main.get(&key).await? else {
                continue;
            };
            let Ok(Record::Entry(mut entry)) = Record::decode(&bytes) else {
                continue;
            };
            if !entry.tags.iter().any(|t| t == tag) {
                continue; // overwritten since without the tag
            }
            let now = now_millis();
            if !entry.is_fresh(now) {
                // Already stale: nothing to mark; it is answered (or not) as it is.
                continue;
            }
            let own = entry
                .stale_while_revalidate_until
                .saturating_sub(entry.fresh_until);
            let window = if own > 0 {
                own
            } else {
                self.soft_purge_window.as_millis() as u64
            };
            if window == 0 {
                if self.main.delete(&key).await? {
                    marked += 1;
                }
                continue;
            }
            entry.fresh_until = now;
            entry.stale_while_revalidate_until = now + window;
            // A put that replaced the entry between the read and this write
            // is overwritten by the older one marked stale: it is answered
            // stale at most `window` while the refresh runs, as the purge asked.
            let record = Record::Entry(entry);
            let opts = PutOptions {
                expires_at: record.expires_at(),
                tags: tags_of(&record),
            };
            self.main.put(&key, record.encode(), &opts).await?;
            marked += 1;
        }
        Ok(marked)
    }

    pub async fn try_lock(
        &self,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        self.main.try_lock(key, ttl).await
    }

    pub async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.main.unlock(key, token).await
    }

    /// A permit of the budget `key`, always from the main backend: the
    /// budget is shared by every instance, and an L1 is this process's only.
    pub async fn take_permit(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError> {
        self.main.take_permit(key, rate, max_wait).await
    }
}

/// Keep a copy of what the backend holds in the L1, unless a purge was
/// applied to the L1 since `generation` was read. Purge marks and upstream
/// holds stay out: an older copy here would hide a newer one another
/// instance left.
async fn fill_l1(
    l1: &L1,
    generation: u64,
    key: &StoreKey,
    found: Option<&Arc<Found>>,
    record: &Record,
    bytes: Bytes,
) {
    if matches!(record, Record::PurgeMark(_) | Record::UpstreamHold(_)) {
        return;
    }
    let opts = PutOptions {
        expires_at: record
            .expires_at()
            .min(now_millis() + l1.ttl.as_millis() as u64),
        tags: tags_of(record),
    };
    if l1.generation() != generation {
        return;
    }
    let _ = l1.store.put_found(key, bytes, &opts, found.cloned()).await;
    if l1.generation() != generation {
        // A purge ran during the put: it may have missed this copy.
        let _ = l1.store.delete(key).await;
    }
}

fn tags_of(record: &Record) -> Vec<String> {
    match record {
        Record::Entry(e) => e.tags.clone(),
        Record::VaryIndex(_) | Record::PurgeMark(_) | Record::UpstreamHold(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::GuardConfig;

    /// The budget is the main backend's (shared by every instance), never
    /// the L1's (this process's only).
    #[tokio::test]
    async fn permits_come_from_the_main_backend() {
        let main = MemoryStore::new(1 << 20, 1 << 16);
        let l1 = MemoryStore::new(1 << 20, 1 << 16);
        let cache = TieredCache::new(
            GuardedStore::new(Arc::new(main.clone()), GuardConfig::default()),
            Some(L1Config {
                store: l1.clone(),
                ttl: Duration::from_secs(60),
                check_every: Duration::from_secs(1),
            }),
        );
        let k = StoreKey::hash("t", ["budget"]);
        let rate = Rate::new(0.5, 2);
        for _ in 0..2 {
            assert_eq!(
                cache.take_permit(&k, rate, Duration::ZERO).await.unwrap(),
                Permit::Granted {
                    wait: Duration::ZERO
                }
            );
        }
        assert!(matches!(
            main.take_permit(&k, rate, Duration::ZERO).await.unwrap(),
            Permit::Denied { .. }
        ));
        assert_eq!(
            l1.take_permit(&k, rate, Duration::ZERO).await.unwrap(),
            Permit::Granted {
                wait: Duration::ZERO
            },
            "the L1's budget was spent"
        );
    }

    fn entry(body: &'static str) -> Record {
        Record::Entry(crate::Entry {
            status: 200,
            headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
            body: Bytes::from_static(body.as_bytes()),
            fresh_until: now_millis() + 60_000,
            keep_until: now_millis() + 60_000,
            ..crate::Entry::default()
        })
    }

    /// Memory hits share one decoded record (and what the proxy derives
    /// from it) per stored value; a value stored again is decoded anew, so
    /// a replaced entry never answers from the old decoding. The same for
    /// an L1 in front of a shared backend, whose copy keeps the record
    /// decoded when it was read from the backend.
    #[tokio::test]
    async fn memory_hits_reuse_the_decoded_value_until_it_is_replaced() {
        let memory = MemoryStore::new(1 << 20, 1 << 16);
        let cache = TieredCache::new(
            GuardedStore::new(Arc::new(memory.clone()), GuardConfig::default()),
            None,
        )
        .with_memory_main(memory);
        let k = StoreKey::hash("t", ["prepared"]);
        cache.put(&k, &entry("one")).await.unwrap();
        let a = cache.get(&k).await.found.unwrap();
        let b = cache.get(&k).await.found.unwrap();
        assert!(Arc::ptr_eq(&a, &b), "decoded once");
        let derived = a.derived(|_| 7u32);
        assert!(Arc::ptr_eq(&derived, &b.derived(|_| 8u32)), "derived once");
        let two = entry("two"); // once: its times are read from the clock
        cache.put(&k, &two).await.unwrap();
        let c = cache.get(&k).await.found.unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.record(), &two);
        assert_eq!(*c.derived(|_| 9u32), 9);

        let main = MemoryStore::new(1 << 20, 1 << 16);
        let l1 = MemoryStore::new(1 << 20, 1 << 16);
        let tiered = TieredCache::new(
            GuardedStore::new(Arc::new(main.clone()), GuardConfig::default()),
            Some(L1Config {
                store: l1.clone(),
                ttl: Duration::from_secs(60),
                check_every: Duration::from_secs(1),
            }),
        );
        main.put(
            &k,
            entry("three").encode(),
            &PutOptions {
                expires_at: now_millis() + 60_000,
                tags: Vec::new(),
            },
        )
        .await
        .unwrap();
        let from_main = tiered.get(&k).await.found.unwrap();
        let from_l1 = tiered.get(&k).await.found.unwrap();
        assert!(
            Arc::ptr_eq(&from_main, &from_l1),
            "the L1 kept the decoded record"
        );
    }

    /// Without an L1, a read that returns the very bytes read before
    /// reuses their decoded form (and what the proxy derived from it); a
    /// value changed in the backend, however slightly, is decoded anew,
    /// and one gone from it is a miss although its decoded form is kept.
    #[tokio::test]
    async fn reads_of_unchanged_values_reuse_the_decoded_value_without_an_l1() {
        let main = MemoryStore::new(1 << 20, 1 << 16);
        let tiered = TieredCache::new(
            GuardedStore::new(Arc::new(main.clone()), GuardConfig::default()),
            None,
        )
        .with_prepared_reads(MemoryStore::new(1 << 20, 1 << 16));
        let k = StoreKey::hash("t", ["prepared reads"]);
        let opts = PutOptions {
            expires_at: now_millis() + 60_000,
            tags: Vec::new(),
        };
        main.put(&k, entry("four").encode(), &opts).await.unwrap();
        let first = tiered.get(&k).await.found.unwrap();
        let again = tiered.get(&k).await.found.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "decoded once");
        assert_eq!(*first.derived(|_| 1u32), *again.derived(|_| 2u32));

        // Same length, one byte different: the bytes decide.
        let five = entry("five"); // once: its times are read from the clock
        main.put(&k, five.encode(), &opts).await.unwrap();
        let changed = tiered.get(&k).await.found.unwrap();
        assert!(!Arc::ptr_eq(&first, &changed));
        assert_eq!(changed.record(), &five);
        assert_eq!(*changed.derived(|_| 3u32), 3);

        main.delete(&k).await.unwrap();
        assert!(
            tiered.get(&k).await.found.is_none(),
            "gone from the backend"
        );

        // Undecodable bytes are a miss, and nothing is kept for them.
        main.put(&k, Bytes::from_static(b"garbage"), &opts)
            .await
            .unwrap();
        assert!(tiered.get(&k).await.found.is_none());
    }
}
