//! A backend that connects on first use and keeps retrying.
//!
//! If Redis or DynamoDB cannot be reached when the process starts, the
//! proxy must still start: in Lambda, failing start-up would turn a cache
//! outage into an API outage on every cold start. Until the connection is
//! made, every operation fails at once (a miss for the proxy) and a new
//! attempt is made at most every `retry_every`, by one caller at a time
//! (ten times less often after a permanent failure: credentials refused,
//! a setting the server rejects). Each failure is logged once with its
//! cause, and again only when the cause changes, never per request.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Mutex, OnceCell};

use crate::{
    CacheStore, Capabilities, LockToken, Permit, PurgeListener, PurgeLogEntry, PurgeNotice,
    PutOptions, Rate, Read, Seen, StoreError, StoreKey, UnixMillis,
};

/// Why a connection attempt failed (no secrets in `message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    pub message: String,
    /// Retrying cannot help until someone fixes the setup (credentials
    /// refused, say); otherwise the backend may come back by itself
    /// (refused, timed out, DNS).
    pub permanent: bool,
}

impl ConnectFailure {
    pub fn transient(message: impl Into<String>) -> Self {
        ConnectFailure {
            message: message.into(),
            permanent: false,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        ConnectFailure {
            message: message.into(),
            permanent: true,
        }
    }
    /// `permanent` or `transient`, for logs.
    pub fn kind(&self) -> &'static str {
        if self.permanent {
            "permanent"
        } else {
            "transient"
        }
    }
}

/// Makes a connected store, or says why it could not.
pub type Connect = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn CacheStore>, ConnectFailure>> + Send>>
        + Send
        + Sync,
>;

/// A permanent failure is retried this many times less often.
const PERMANENT_BACKOFF: u32 = 10;

pub struct LazyStore {
    caps: Capabilities,
    connected: OnceCell<Arc<dyn CacheStore>>,
    connect: Connect,
    /// Serialises attempts and remembers the last failure.
    last_failure: Mutex<Option<(Instant, ConnectFailure)>>,
    retry_every: Duration,
    /// Handed to the store once connected (the L1 stays bypassed until
    /// its subscription is live).
    purge_listener: OnceLock<Weak<dyn PurgeListener>>,
}

impl fmt::Debug for LazyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyStore")
            .field("backend", &self.caps.name)
            .field("connected", &self.connected.initialized())
            .finish()
    }
}

impl LazyStore {
    /// `caps` must be what the connected store will report; `failed` is
    /// the attempt the caller made already (logged by the caller), so the
    /// next one waits and the same cause is not logged again.
    pub fn new(
        caps: Capabilities,
        connect: Connect,
        retry_every: Duration,
        failed: Option<ConnectFailure>,
    ) -> Self {
        LazyStore {
            caps,
            connected: OnceCell::new(),
            connect,
            last_failure: Mutex::new(failed.map(|f| (Instant::now(), f))),
            retry_every,
            purge_listener: OnceLock::new(),
        }
    }

    /// How long after `failure` the next attempt may be made.
    pub fn retry_after(&self, failure: &ConnectFailure) -> Duration {
        if failure.permanent {
            self.retry_every * PERMANENT_BACKOFF
        } else {
            self.retry_every
        }
    }

    async fn store(&self) -> Result<&Arc<dyn CacheStore>, StoreError> {
        if let Some(s) = self.connected.get() {
            return Ok(s);
        }
        // Not connected reads as an open breaker: the cause was logged once
        // when it happened, and a request that is told "not trying" does
        // not log it again.
        let not_connected = |retry_in: Duration| StoreError::CircuitOpen {
            backend: self.caps.name,
            retry_in,
        };
        // Another caller is connecting: do not queue behind it.
        let Ok(mut last_failure) = self.last_failure.try_lock() else {
            return Err(not_connected(self.retry_every));
        };
        if let Some(s) = self.connected.get() {
            return Ok(s);
        }
        if let Some((at, failure)) = &*last_failure {
            let wait = self.retry_after(failure);
            if at.elapsed() < wait {
                return Err(not_connected(wait - at.elapsed()));
            }
        }
        match (self.connect)().await {
            Ok(store) => {
                tracing::info!(backend = self.caps.name, "cache backend connected");
                *last_failure = None;
                if let Some(listener) = self.purge_listener.get() {
                    store.watch_purges(listener.clone());
                }
                let _ = self.connected.set(store);
                Ok(self.connected.get().expect("just set"))
            }
            Err(failure) => {
                let same = last_failure
                    .as_ref()
                    .is_some_and(|(_, last)| *last == failure);
                if !same {
                    tracing::error!(
                        backend = self.caps.name,
                        error = %failure.message,
                        failure = failure.kind(),
                        retry_every = ?self.retry_after(&failure),
                        "cache backend connect failed; serving without it (logged again only if the cause changes)"
                    );
                }
                let err = not_connected(self.retry_after(&failure));
                *last_failure = Some((Instant::now(), failure));
                Err(err)
            }
        }
    }
}

#[async_trait]
impl CacheStore for LazyStore {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        self.store().await?.get(key).await
    }
    async fn get_since(&self, key: &StoreKey, seen: Option<Seen<'_>>) -> Result<Read, StoreError> {
        self.store().await?.get_since(key, seen).await
    }
    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        self.store().await?.put(key, value, opts).await
    }
    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.store().await?.delete(key).await
    }
    async fn try_lock(
        &self,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        self.store().await?.try_lock(key, ttl).await
    }
    async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        self.store().await?.unlock(key, token).await
    }
    async fn take_permit(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError> {
        self.store().await?.take_permit(key, rate, max_wait).await
    }
    async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
        self.store().await?.purge_tag(tag).await
    }
    async fn tag_members(&self, tag: &str) -> Result<Vec<StoreKey>, StoreError> {
        self.store().await?.tag_members(tag).await
    }
    async fn scan_values(&self, cursor: Option<&str>) -> Result<crate::ScanPage, StoreError> {
        self.store().await?.scan_values(cursor).await
    }
    async fn announce_purge(&self, notice: &PurgeNotice) -> Result<(), StoreError> {
        self.store().await?.announce_purge(notice).await
    }
    fn watch_purges(&self, listener: Weak<dyn PurgeListener>) {
        match self.connected.get() {
            Some(store) => store.watch_purges(listener),
            None => {
                let _ = self.purge_listener.set(listener);
            }
        }
    }
    async fn read_purge_log(&self, since: UnixMillis) -> Result<Vec<PurgeLogEntry>, StoreError> {
        self.store().await?.read_purge_log(since).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    #[tokio::test]
    async fn fails_fast_until_connected_then_delegates() {
        let reachable = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU32::new(0));
        let memory = MemoryStore::new(1 << 20, 1 << 16);
        let caps = memory.capabilities().clone();
        let connect: Connect = {
            let (reachable, attempts) = (reachable.clone(), attempts.clone());
            Arc::new(move || {
                let (reachable, attempts, memory) =
                    (reachable.clone(), attempts.clone(), memory.clone());
                Box::pin(async move {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    if reachable.load(Ordering::SeqCst) {
                        Ok(Arc::new(memory) as Arc<dyn CacheStore>)
                    } else {
                        Err(ConnectFailure::transient("connection refused"))
                    }
                })
            })
        };
        let lazy = LazyStore::new(caps, connect, Duration::from_millis(100), None);
        let key = StoreKey::hash("t", ["k"]);
        assert!(lazy.get(&key).await.is_err());
        // Within retry_every: no new attempt.
        assert!(lazy.get(&key).await.is_err());
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        reachable.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(lazy.get(&key).await.unwrap(), None);
        lazy.put(
            &key,
            Bytes::from_static(b"v"),
            &PutOptions {
                expires_at: crate::now_millis() + 60_000,
                tags: vec![],
            },
        )
        .await
        .unwrap();
        assert_eq!(
            lazy.get(&key).await.unwrap(),
            Some(Bytes::from_static(b"v"))
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }
}
