//! Time bounds and a circuit breaker around any backend.
//!
//! A cache must never turn a backend outage into an API outage: every
//! operation is bounded by a timeout, and after `failure_threshold`
//! consecutive failures the breaker opens and operations fail at once
//! (no timeout paid) for `open_for`. Then one probe is let through; its
//! success closes the breaker, its failure opens it again.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    CacheStore, Capabilities, LockToken, PurgeListener, PurgeLogEntry, PurgeNotice, PutOptions,
    StoreError, StoreKey, UnixMillis,
};

/// Time bounds and breaker settings of one backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Longest a read (get) may take before it counts as a miss.
    /// Default `50ms`: on the hit path a slow cache is worse than none.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Longest a write (put, delete, lock, unlock) may take. Default `1s`:
    /// writes are off the hit path, and a DynamoDB put of a large entry
    /// (several chunk items) needs more than a read.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Longest a purge by tag may take (it touches many keys). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub purge_timeout: Duration,
    /// Consecutive failures that open the breaker. Default `3`.
    pub failure_threshold: u32,
    /// How long an open breaker skips the backend before one probe. Default `500ms`.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            read_timeout: Duration::from_millis(50),
            write_timeout: Duration::from_secs(1),
            purge_timeout: Duration::from_secs(10),
            failure_threshold: 3,
            open_for: Duration::from_millis(500),
        }
    }
}

/// What the breaker is doing, for `Cache-Status`, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
}

/// A backend with every operation time-bounded and behind a breaker.
#[derive(Debug, Clone)]
pub struct GuardedStore {
    inner: Arc<dyn CacheStore>,
    config: GuardConfig,
    breaker: Arc<Breaker>,
}

/// How long the breaker stays open after a permanent failure
/// ([`StoreError::Unusable`]): long enough not to pay for a call that
/// cannot succeed, short enough to notice the fix (`cachegate init`) soon.
pub const UNUSABLE_OPEN_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Breaker {
    /// The cause of the last permanent failure, reported once: the same
    /// cause again reads as an open breaker.
    unusable: std::sync::Mutex<Option<String>>,
    /// Whether `unusable` holds a cause (a success then clears it), so
    /// the hit path reads one atomic instead of taking the lock.
    unusable_set: std::sync::atomic::AtomicBool,
    consecutive_failures: AtomicU32,
    /// Monotonic milliseconds (since [`epoch`]) until which the breaker is
    /// open; 0 when closed.
    open_until: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn mono_millis() -> u64 {
    // +1 so that a real reading is never the "closed" sentinel 0.
    epoch().elapsed().as_millis() as u64 + 1
}

impl GuardedStore {
    pub fn new(inner: Arc<dyn CacheStore>, config: GuardConfig) -> Self {
        epoch();
        GuardedStore {
            inner,
            config,
            breaker: Arc::default(),
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        let until = self.breaker.open_until.load(Ordering::Relaxed);
        if until != 0 && mono_millis() < until {
            BreakerState::Open
        } else {
            BreakerState::Closed
        }
    }

    /// Whether this call may go to the backend. While open, no; once the
    /// open period has passed, exactly one caller wins the probe (by moving
    /// `open_until` forward) and the rest keep failing fast.
    fn admit(&self) -> Result<(), StoreError> {
        let until = self.breaker.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        let now = mono_millis();
        if now < until {
            return Err(self.open_error(Duration::from_millis(until - now)));
        }
        // Hold the others off for as long as the probe may take.
        let probe_deadline = now + self.config.write_timeout.as_millis() as u64 + 1;
        match self.breaker.open_until.compare_exchange(
            until,
            probe_deadline,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(()),
            Err(_) => Err(self.open_error(self.config.write_timeout)),
        }
    }

    fn open_error(&self, retry_in: Duration) -> StoreError {
        StoreError::CircuitOpen {
            backend: self.inner.capabilities().name,
            retry_in,
        }
    }

    fn record<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) | Err(StoreError::TooLarge { .. }) => {
                self.breaker
                    .consecutive_failures
                    .store(0, Ordering::Relaxed);
                self.breaker.open_until.store(0, Ordering::Release);
                if result.is_ok() && self.breaker.unusable_set.load(Ordering::Relaxed) {
                    if let Ok(mut u) = self.breaker.unusable.lock() {
                        *u = None;
                    }
                    self.breaker.unusable_set.store(false, Ordering::Relaxed);
                }
            }
            Err(StoreError::CircuitOpen { .. }) => {}
            Err(StoreError::Unusable { message, .. }) => {
                let until = mono_millis() + UNUSABLE_OPEN_FOR.as_millis() as u64;
                self.breaker.open_until.store(until, Ordering::Release);
                let reported = self
                    .breaker
                    .unusable
                    .lock()
                    .map(|mut last| {
                        let same = last.as_deref() == Some(message.as_str());
                        *last = Some(message.clone());
                        self.breaker.unusable_set.store(true, Ordering::Relaxed);
                        same
                    })
                    .unwrap_or(false);
                if reported {
                    return Err(self.open_error(UNUSABLE_OPEN_FOR));
                }
            }
            Err(_) => {
                let n = self
                    .breaker
                    .consecutive_failures
                    .fetch_add(1, Ordering::AcqRel)
                    + 1;
                if n >= self.config.failure_threshold {
                    let until = mono_millis() + self.config.open_for.as_millis() as u64;
                    if self.breaker.open_until.swap(until, Ordering::AcqRel) == 0 {
                        tracing::warn!(
                            backend = self.inner.capabilities().name,
                            failures = n,
                            open_for = ?self.config.open_for,
                            "cache backend failing; circuit open, serving without it"
                        );
                    }
                }
            }
        }
        result
    }

    async fn run<T, F>(&self, limit: Duration, op: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.admit()?;
        let result = match tokio::time::timeout(limit, op).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                backend: self.inner.capabilities().name,
                after: limit,
            }),
        };
        self.record(result)
    }
}

#[async_trait]
impl CacheStore for GuardedStore {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        self.run(self.config.read_timeout, self.inner.get(key))
            .await
    }
    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        self.run(self.config.write_timeout, self.inner.put(key, value, opts))
            .await
    }
    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.run(self.config.write_timeout, self.inner.delete(key))
            .await
    }
    async fn try_lock(
        &self,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        self.run(self.config.write_timeout, self.inner.try_lock(key, ttl))
            .await
    }
    async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.run(self.config.write_timeout, self.inner.unlock(key, token))
            .await
    }
    async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
        self.run(self.config.purge_timeout, self.inner.purge_tag(tag))
            .await
    }
    async fn tag_members(&self, tag: &str) -> Result<Vec<StoreKey>, StoreError> {
        self.run(self.config.purge_timeout, self.inner.tag_members(tag))
            .await
    }
    async fn announce_purge(&self, notice: &PurgeNotice) -> Result<(), StoreError> {
        self.run(self.config.write_timeout, self.inner.announce_purge(notice))
            .await
    }
    fn watch_purges(&self, listener: std::sync::Weak<dyn PurgeListener>) {
        self.inner.watch_purges(listener)
    }
    /// On the request path (when a read is due), so bounded like a read.
    async fn read_purge_log(&self, since: UnixMillis) -> Result<Vec<PurgeLogEntry>, StoreError> {
        self.run(self.config.read_timeout, self.inner.read_purge_log(since))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use std::sync::atomic::AtomicBool;

    /// A memory store that can be made to hang, standing in for a backend
    /// that accepts connections but never answers. (The real servers are
    /// stopped and hung in each backend's own fault tests.)
    #[derive(Debug)]
    struct Hangable {
        inner: MemoryStore,
        hang: AtomicBool,
        calls: AtomicU32,
    }

    #[async_trait]
    impl CacheStore for Hangable {
        fn capabilities(&self) -> &Capabilities {
            self.inner.capabilities()
        }
        async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.inner.get(key).await
        }
        async fn put(
            &self,
            key: &StoreKey,
            value: Bytes,
            opts: &PutOptions,
        ) -> Result<(), StoreError> {
            self.inner.put(key, value, opts).await
        }
        async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
            self.inner.delete(key).await
        }
        async fn try_lock(
            &self,
            key: &StoreKey,
            ttl: Duration,
        ) -> Result<Option<LockToken>, StoreError> {
            self.inner.try_lock(key, ttl).await
        }
        async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
            self.inner.unlock(key, token).await
        }
        async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
            self.inner.purge_tag(tag).await
        }
    }

    #[tokio::test]
    async fn breaker_opens_fails_fast_probes_and_closes() {
        let backend = Arc::new(Hangable {
            inner: MemoryStore::new(1 << 20, 1 << 16),
            hang: AtomicBool::new(true),
            calls: AtomicU32::new(0),
        });
        let config = GuardConfig {
            read_timeout: Duration::from_millis(30),
            write_timeout: Duration::from_millis(30),
            failure_threshold: 3,
            open_for: Duration::from_millis(200),
            ..GuardConfig::default()
        };
        let guarded = GuardedStore::new(backend.clone(), config);
        let key = StoreKey::hash("t", ["k"]);
        for _ in 0..3 {
            assert!(matches!(
                guarded.get(&key).await,
                Err(StoreError::Timeout { .. })
            ));
        }
        assert_eq!(guarded.breaker_state(), BreakerState::Open);
        // Open: no call reaches the backend, and none waits for a timeout.
        let started = Instant::now();
        for _ in 0..100 {
            assert!(matches!(
                guarded.get(&key).await,
                Err(StoreError::CircuitOpen { .. })
            ));
        }
        assert!(
            started.elapsed() < Duration::from_millis(30),
            "open breaker still waited"
        );
        assert_eq!(backend.calls.load(Ordering::SeqCst), 3);
        // After open_for, one probe goes through; it fails, the breaker re-opens.
        tokio::time::sleep(Duration::from_millis(220)).await;
        assert!(matches!(
            guarded.get(&key).await,
            Err(StoreError::Timeout { .. })
        ));
        assert_eq!(backend.calls.load(Ordering::SeqCst), 4);
        assert_eq!(guarded.breaker_state(), BreakerState::Open);
        // The backend recovers: the next probe succeeds and closes the breaker.
        backend.hang.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(220)).await;
        assert!(guarded.get(&key).await.unwrap().is_none());
        assert_eq!(guarded.breaker_state(), BreakerState::Closed);
        assert!(guarded.get(&key).await.is_ok());
    }
}
