//! Time bounds and a circuit breaker around any backend.
//!
//! A cache must never turn a backend outage into an API outage: every
//! operation is bounded by a timeout, and after `failure_threshold`
//! consecutive failures the breaker opens and operations fail at once
//! (no timeout paid) for `open_for`. Then one probe is let through; its
//! success closes the breaker, its failure opens it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    CacheStore, Capabilities, LockToken, Permit, PurgeListener, PurgeLogEntry, PurgeNotice,
    PutOptions, Rate, Read, Seen, StoreError, StoreKey, UnixMillis, WriteId,
};

/// Time bounds and breaker settings of one backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    /// Longest a read (get) may take before it counts as a miss.
    /// Default `50ms`: on the hit path a slow cache is worse than none.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Longest a write (put, delete, lock, unlock, permit) may take. Default `1s`:
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
    /// Added to `read_timeout` per MiB of a value this process has seen
    /// under the key (stored or read), and of the large values being read
    /// beside it, so a large value that takes long to transfer (and the
    /// small reads queued behind it) is not mistaken for a failing
    /// backend. Default `20ms`.
    #[serde(with = "humantime_serde")]
    pub read_timeout_per_mib: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            read_timeout: Duration::from_millis(50),
            write_timeout: Duration::from_secs(1),
            purge_timeout: Duration::from_secs(10),
            failure_threshold: 3,
            open_for: Duration::from_millis(500),
            read_timeout_per_mib: Duration::from_millis(20),
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
///
/// The breaker must count backend failures, not large values: concurrent
/// reads of one key share one backend read (sixteen clients on a 4 MB
/// entry are one transfer, not sixteen queued on the connection in front
/// of everyone else's keys); a read's bound grows with the size of the
/// value last seen under its key and with the large values being read
/// beside it (a small read queues behind them on the connection); and a
/// read that times out while the backend is visibly answering (a large
/// read in flight, or any operation answered since it started) is a miss
/// for its request but no failure of the backend.
#[derive(Debug, Clone)]
pub struct GuardedStore {
    inner: Arc<dyn CacheStore>,
    config: GuardConfig,
    breaker: Arc<Breaker>,
    reads: Arc<Mutex<HashMap<StoreKey, ReadInFlight>>>,
    large: Arc<Mutex<HashMap<StoreKey, usize>>>,
    /// Sum of the remembered sizes of the reads in flight.
    large_in_flight: Arc<AtomicUsize>,
}

/// Counts a read's remembered size in [`GuardedStore::large_in_flight`]
/// for as long as the read runs (however it ends).
struct InFlight<'a> {
    total: &'a AtomicUsize,
    bytes: usize,
}

impl<'a> InFlight<'a> {
    fn add(total: &'a AtomicUsize, bytes: usize) -> Self {
        total.fetch_add(bytes, Ordering::AcqRel);
        InFlight { total, bytes }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A read's result as the requests that waited for it get it.
type SharedRead = Result<Read, String>;

/// The read of a key in flight, which others asking the same may share.
#[derive(Debug)]
struct ReadInFlight {
    /// The write it named ([`CacheStore::get_since`]): only a read naming
    /// the same one may share its answer (`Unchanged` means "still `seen`").
    seen: Option<WriteId>,
    result: watch::Receiver<Option<SharedRead>>,
}

/// Values from this size on have their size remembered, to bound reads.
const LARGE_VALUE_BYTES: usize = 256 * 1024;

/// Most large-value sizes remembered (the map is cleared when full).
const LARGE_VALUES_REMEMBERED: usize = 4096;

/// Removes a read's in-flight slot however the leading read ends
/// (finished, failed, or its request went away).
struct ReadSlot<'a> {
    reads: &'a Mutex<HashMap<StoreKey, ReadInFlight>>,
    key: &'a StoreKey,
}

impl Drop for ReadSlot<'_> {
    fn drop(&mut self) {
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.key);
    }
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
    /// Monotonic milliseconds of the last operation the backend answered.
    last_answer: AtomicU64,
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
            reads: Arc::default(),
            large: Arc::default(),
            large_in_flight: Arc::default(),
        }
    }

    fn remember_size(&self, key: &StoreKey, size: usize) {
        let mut large = self.large.lock().unwrap_or_else(|p| p.into_inner());
        if size < LARGE_VALUE_BYTES {
            large.remove(key);
            return;
        }
        if large.len() >= LARGE_VALUES_REMEMBERED {
            large.clear();
        }
        large.insert(key.clone(), size);
    }

    /// The size of the value last seen under `key`, if it was large.
    fn remembered_size(&self, key: &StoreKey) -> usize {
        self.large
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// `read_timeout`, plus `read_timeout_per_mib` for each MiB of the
    /// value last seen under `key`.
    #[cfg(test)]
    fn read_limit(&self, key: &StoreKey) -> Duration {
        self.read_bound(self.remembered_size(key))
    }

    /// `read_timeout`, plus `read_timeout_per_mib` for each MiB of `bytes`.
    fn read_bound(&self, bytes: usize) -> Duration {
        let mib = bytes as f64 / (1024.0 * 1024.0);
        self.config.read_timeout + self.config.read_timeout_per_mib.mul_f64(mib)
    }

    /// One read of `key` from the backend, bounded by its own remembered
    /// size plus the large reads already in flight (it waits behind them).
    async fn bounded_read(
        &self,
        key: &StoreKey,
        seen: Option<Seen<'_>>,
    ) -> Result<Read, StoreError> {
        let own = self.remembered_size(key);
        let beside = self.large_in_flight.load(Ordering::Acquire);
        let _in_flight = InFlight::add(&self.large_in_flight, own);
        let limit = self.read_bound(own + beside);
        self.admit()?;
        let started = mono_millis();
        match tokio::time::timeout(limit, self.inner.get_since(key, seen)).await {
            Ok(result) => self.record(result),
            Err(_) => {
                let timeout = StoreError::Timeout {
                    backend: self.inner.capabilities().name,
                    after: limit,
                };
                let answering = self.large_in_flight.load(Ordering::Acquire) > own
                    || self.breaker.last_answer.load(Ordering::Acquire) > started;
                if answering {
                    // Congestion: the backend is answering, just not this
                    // read in time. A miss for this request only.
                    Err(timeout)
                } else {
                    self.record(Err(timeout))
                }
            }
        }
    }

    /// One backend read for `key`, however many requests naming the same
    /// write ask at once.
    async fn shared_read(
        &self,
        key: &StoreKey,
        seen: Option<Seen<'_>>,
    ) -> Result<Read, StoreError> {
        let role = {
            let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
            match reads.get(key) {
                Some(read) if read.seen.as_ref() == seen.map(|s| s.write) => {
                    Some(Err(read.result.clone()))
                }
                // Another write named: its answer is not this one's.
                Some(_) => None,
                None => {
                    let (tx, rx) = watch::channel(None);
                    let read = ReadInFlight {
                        seen: seen.map(|s| s.write.clone()),
                        result: rx,
                    };
                    reads.insert(key.clone(), read);
                    Some(Ok(tx))
                }
            }
        };
        let Some(role) = role else {
            return self.bounded_read(key, seen).await;
        };
        match role {
            Ok(tx) => {
                let slot = ReadSlot {
                    reads: &self.reads,
                    key,
                };
                let result = self.bounded_read(key, seen).await;
                if let Ok(Read::Current(Some((v, _)))) = &result {
                    self.remember_size(key, v.len());
                }
                drop(slot);
                let _ = tx.send(Some(match &result {
                    Ok(v) => Ok(v.clone()),
                    Err(e) => Err(e.to_string()),
                }));
                result
            }
            Err(mut rx) => match rx
                .wait_for(Option::is_some)
                .await
                .map(|shared| shared.clone().expect("waited for Some"))
            {
                Ok(shared) => match shared {
                    Ok(v) => Ok(v),
                    Err(message) => Err(StoreError::Backend {
                        backend: self.inner.capabilities().name,
                        message,
                    }),
                },
                // The leading read's request went away: read ourselves.
                Err(_) => self.bounded_read(key, seen).await,
            },
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
                    .last_answer
                    .store(mono_millis(), Ordering::Release);
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
                // Reported here, once per cause, where it is classified;
                // every caller then sees an open breaker (logged at debug),
                // whichever read or write met it first.
                if !reported {
                    tracing::warn!(
                        backend = self.inner.capabilities().name,
                        error = %message,
                        "cache backend unusable; skipped, probed every {}s",
                        UNUSABLE_OPEN_FOR.as_secs()
                    );
                }
                return Err(self.open_error(UNUSABLE_OPEN_FOR));
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
        match self.shared_read(key, None).await? {
            Read::Current(value) => Ok(value.map(|(v, _)| v)),
            Read::Unchanged => Err(StoreError::backend(
                self.inner.capabilities().name,
                "answered 'unchanged' to a read that named no write",
            )),
        }
    }
    async fn get_since(&self, key: &StoreKey, seen: Option<Seen<'_>>) -> Result<Read, StoreError> {
        self.shared_read(key, seen).await
    }
    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        let size = value.len();
        let result = self
            .run(self.config.write_timeout, self.inner.put(key, value, opts))
            .await;
        if result.is_ok() {
            self.remember_size(key, size);
        }
        result
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
    /// Bounded and classified like [`try_lock`](CacheStore::try_lock): a
    /// write. An invalid rate is refused here, never counted as a backend
    /// failure.
    async fn take_permit(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError> {
        rate.check(self.inner.capabilities().name)?;
        self.run(
            self.config.write_timeout,
            self.inner.take_permit(key, rate, max_wait),
        )
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
    async fn scan_values(&self, cursor: Option<&str>) -> Result<crate::ScanPage, StoreError> {
        self.run(self.config.purge_timeout, self.inner.scan_values(cursor))
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
        /// Every get takes this long (a large value on the wire).
        delay: Duration,
    }

    impl Hangable {
        /// A memory store that hangs while `hang` is set and makes every
        /// get take `delay`.
        fn new(capacity: u64, max_value: usize, hang: bool, delay: Duration) -> Arc<Self> {
            Arc::new(Hangable {
                inner: MemoryStore::new(capacity, max_value),
                hang: AtomicBool::new(hang),
                calls: AtomicU32::new(0),
                delay,
            })
        }
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
            tokio::time::sleep(self.delay).await;
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
        async fn take_permit(
            &self,
            key: &StoreKey,
            rate: Rate,
            max_wait: Duration,
        ) -> Result<Permit, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.inner.take_permit(key, rate, max_wait).await
        }
        async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
            self.inner.purge_tag(tag).await
        }
    }

    #[tokio::test]
    async fn breaker_opens_fails_fast_probes_and_closes() {
        let backend = Hangable::new(1 << 20, 1 << 16, true, Duration::ZERO);
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

    /// A permit is bounded like a lock (the write timeout) and counts
    /// toward the breaker; an invalid rate is refused without asking the
    /// backend and without counting as its failure.
    #[tokio::test]
    async fn permits_are_bounded_and_invalid_rates_are_not_failures() {
        let backend = Hangable::new(1 << 20, 1 << 16, false, Duration::ZERO);
        let config = GuardConfig {
            read_timeout: Duration::from_millis(10),
            write_timeout: Duration::from_millis(80),
            failure_threshold: 2,
            ..GuardConfig::default()
        };
        let guarded = GuardedStore::new(backend.clone(), config);
        let key = StoreKey::hash("t", ["budget"]);
        for _ in 0..3 {
            assert!(matches!(
                guarded
                    .take_permit(&key, Rate::new(0.0, 1), Duration::ZERO)
                    .await,
                Err(StoreError::Backend { .. })
            ));
        }
        assert_eq!(backend.calls.load(Ordering::SeqCst), 0);
        assert_eq!(guarded.breaker_state(), BreakerState::Closed);
        let rate = Rate::new(10.0, 1);
        assert_eq!(
            guarded
                .take_permit(&key, rate, Duration::ZERO)
                .await
                .unwrap(),
            Permit::Granted {
                wait: Duration::ZERO
            }
        );

        backend.hang.store(true, Ordering::SeqCst);
        let started = Instant::now();
        match guarded.take_permit(&key, rate, Duration::ZERO).await {
            Err(StoreError::Timeout { after, .. }) => {
                assert_eq!(after, Duration::from_millis(80))
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(80));
        assert!(guarded
            .take_permit(&key, rate, Duration::ZERO)
            .await
            .is_err());
        assert_eq!(guarded.breaker_state(), BreakerState::Open);
    }

    /// Sixteen clients on one large entry are one backend read, and the
    /// read's bound grows with the size last seen: the breaker stays closed
    /// for everyone else.
    #[tokio::test]
    async fn concurrent_reads_of_one_key_share_one_backend_read() {
        let backend = Hangable::new(64 << 20, 8 << 20, false, Duration::from_millis(60));
        let config = GuardConfig {
            read_timeout: Duration::from_millis(40),
            read_timeout_per_mib: Duration::from_millis(20),
            failure_threshold: 3,
            ..GuardConfig::default()
        };
        let guarded = GuardedStore::new(backend.clone(), config);
        let key = StoreKey::hash("test", ["big"]);
        let value = Bytes::from(vec![7u8; 4 << 20]);
        let opts = PutOptions {
            expires_at: crate::now_millis() + 60_000,
            tags: vec![],
        };
        guarded.put(&key, value.clone(), &opts).await.unwrap();
        assert_eq!(guarded.read_limit(&key), Duration::from_millis(120));
        let reads = (0..16).map(|_| guarded.get(&key));
        for r in futures_join(reads).await {
            assert_eq!(r.unwrap().as_deref(), Some(&value[..]));
        }
        assert_eq!(backend.calls.load(Ordering::SeqCst), 1);
        assert_eq!(guarded.breaker_state(), BreakerState::Closed);
    }

    /// Reads naming the same write share one backend read; a read naming
    /// another write (or none) is not given their answer: `Unchanged`
    /// would mean a write it does not hold.
    #[tokio::test]
    async fn only_reads_naming_the_same_write_share_one() {
        let backend = Hangable::new(1 << 20, 1 << 16, false, Duration::from_millis(50));
        let guarded = GuardedStore::new(backend.clone(), GuardConfig::default());
        let key = StoreKey::hash("test", ["since"]);
        let opts = PutOptions {
            expires_at: crate::now_millis() + 60_000,
            tags: vec![],
        };
        guarded
            .put(&key, Bytes::from_static(b"v"), &opts)
            .await
            .unwrap();
        let (a, b) = (WriteId::generate(), WriteId::generate());
        let (a, b) = (
            [&a; 8].map(|write| Seen { write, len: 1 }),
            Seen { write: &b, len: 1 },
        );
        let same = a.map(|seen| guarded.get_since(&key, Some(seen)));
        let others = [Some(b), None].map(|seen| guarded.get_since(&key, seen));
        let (same, others) = tokio::join!(
            futures_join(same.into_iter()),
            futures_join(others.into_iter())
        );
        for r in same.into_iter().chain(others) {
            let current = Read::Current(Some((Bytes::from_static(b"v"), None)));
            assert_eq!(r.unwrap(), current);
        }
        assert_eq!(backend.calls.load(Ordering::SeqCst), 3);
    }

    /// A small read waits behind a large one on the connection: its bound
    /// grows with the large read in flight, so it is answered; alone, the
    /// same slow answers still time out and open the breaker.
    #[tokio::test]
    async fn a_read_beside_a_large_one_gets_its_time() {
        let backend = Hangable::new(64 << 20, 8 << 20, false, Duration::from_millis(60));
        let config = GuardConfig {
            read_timeout: Duration::from_millis(40),
            read_timeout_per_mib: Duration::from_millis(20),
            failure_threshold: 2,
            ..GuardConfig::default()
        };
        let guarded = GuardedStore::new(backend.clone(), config);
        let opts = PutOptions {
            expires_at: crate::now_millis() + 60_000,
            tags: vec![],
        };
        let big = StoreKey::hash("test", ["big"]);
        let small = StoreKey::hash("test", ["small"]);
        guarded
            .put(&big, Bytes::from(vec![7u8; 4 << 20]), &opts)
            .await
            .unwrap();
        guarded
            .put(&small, Bytes::from_static(b"s"), &opts)
            .await
            .unwrap();
        let (g, b, s) = (&guarded, &big, &small);
        let both = futures_join(
            [
                Box::pin(async move { g.get(b).await.map(|v| v.map(|v| v.len())) })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>,
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    g.get(s).await.map(|v| v.map(|v| v.len()))
                }),
            ]
            .into_iter(),
        )
        .await;
        assert_eq!(both[0].as_ref().unwrap(), &Some(4 << 20));
        assert_eq!(
            both[1].as_ref().unwrap(),
            &Some(1),
            "the small read timed out"
        );
        assert_eq!(guarded.breaker_state(), BreakerState::Closed);
        // Alone, a 60 ms answer is past the 40 ms bound: a failing backend.
        for _ in 0..2 {
            assert!(matches!(
                guarded.get(&small).await,
                Err(StoreError::Timeout { .. })
            ));
        }
        assert_eq!(guarded.breaker_state(), BreakerState::Open);
    }

    async fn futures_join<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
        let mut set = Vec::new();
        for f in fs {
            set.push(Box::pin(f));
        }
        let mut out = Vec::new();
        // Poll all together: a join without an extra dependency.
        let mut pending: Vec<_> = set.into_iter().map(Some).collect();
        let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut done = true;
            for (i, slot) in pending.iter_mut().enumerate() {
                if let Some(f) = slot {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => {
                            results[i] = Some(v);
                            *slot = None;
                        }
                        std::task::Poll::Pending => done = false,
                    }
                }
            }
            if done {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        out.extend(
            results
                .into_iter()
                .map(|r| r.expect("polled to completion")),
        );
        out
    }
}
