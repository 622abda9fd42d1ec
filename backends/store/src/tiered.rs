//! The proxy's view of the cache: records instead of bytes, an optional
//! in-process L1 in front of a shared backend, and failures as misses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::guard::GuardedStore;
use crate::memory::MemoryStore;
use crate::{now_millis, CacheStore, LockToken, PutOptions, Record, StoreError, StoreKey};

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
    pub record: Option<Record>,
    pub error: Option<StoreError>,
}

/// Records over a guarded main backend, with an optional L1.
#[derive(Debug, Clone)]
pub struct TieredCache {
    main: GuardedStore,
    l1: Option<(MemoryStore, Duration)>,
    stats: Arc<CacheStats>,
}

impl TieredCache {
    /// `l1`: an in-process store and how long it may keep a copy of what
    /// the main backend holds (which bounds how long a purge made by another
    /// instance can go unseen here).
    pub fn new(main: GuardedStore, l1: Option<(MemoryStore, Duration)>) -> Self {
        TieredCache {
            main,
            l1,
            stats: Arc::default(),
        }
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
        if let Some((l1, _)) = &self.l1 {
            // The L1 is in-process memory: it cannot fail. Its copy of a
            // stale entry is not used: the shared store may hold a fresher
            // one another instance stored.
            let now = now_millis();
            match self.live(l1.get(key).await.ok().flatten()) {
                Some((Record::Entry(e), _)) if !e.is_fresh(now) => {}
                Some((record, _)) => {
                    return Lookup {
                        record: Some(record),
                        error: None,
                    }
                }
                None => {}
            }
        }
        match self.main.get(key).await {
            Ok(found) => match self.live(found) {
                Some((record, bytes)) => {
                    self.fill_l1(key, &record, bytes).await;
                    Lookup {
                        record: Some(record),
                        error: None,
                    }
                }
                None => Lookup {
                    record: None,
                    error: None,
                },
            },
            Err(e) => {
                CacheStats::bump(&self.stats.backend_errors);
                Lookup {
                    record: None,
                    error: Some(e),
                }
            }
        }
    }

    async fn fill_l1(&self, key: &StoreKey, record: &Record, bytes: Bytes) {
        if let Some((l1, ttl)) = &self.l1 {
            let opts = PutOptions {
                expires_at: record
                    .expires_at()
                    .min(now_millis() + ttl.as_millis() as u64),
                tags: tags_of(record),
            };
            let _ = l1.put(key, bytes, &opts).await;
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
        let result = self.main.put(key, bytes.clone(), &opts).await;
        match &result {
            Ok(()) => self.fill_l1(key, record, bytes).await,
            Err(_) => CacheStats::bump(&self.stats.backend_errors),
        }
        result
    }

    pub async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        if let Some((l1, _)) = &self.l1 {
            let _ = l1.delete(key).await;
        }
        self.main.delete(key).await
    }

    /// Purge a tag in the main backend and in this process's L1.
    pub async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
        if let Some((l1, _)) = &self.l1 {
            let _ = l1.purge_tag(tag).await;
        }
        self.main.purge_tag(tag).await
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
}

fn tags_of(record: &Record) -> Vec<String> {
    match record {
        Record::Entry(e) => e.tags.clone(),
        Record::VaryIndex(_) | Record::PurgeMark(_) => Vec::new(),
    }
}
