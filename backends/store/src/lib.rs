//! The storage side of cachegate.
//!
//! Backends are dumb, shared byte stores: they keep a value under a
//! [`StoreKey`] until an absolute expiry, remember which tags each value
//! carries so a purge needs no scan, and offer an owner-checked lock and a
//! rate budget shared by every instance ([`rate`]). They never interpret
//! the bytes. Everything backends would otherwise repeat lives here once:
//! the record encoding ([`record`]), key hashing ([`key`]), expiry checks,
//! the rate arithmetic ([`rate`]), and the timeout + circuit breaker
//! wrapper ([`guard`]).
//!
//! A new backend implements [`CacheStore`] and adds one line to its tests:
//! `cachegate_store::conformance_tests!(make_store());`.

pub mod coherence;
pub mod found;
pub mod guard;
pub mod key;
pub mod lazy;
pub mod memory;
pub mod rate;
pub mod record;
pub mod settings;
pub mod shared;
pub mod tiered;

#[cfg(feature = "conformance")]
pub mod conformance;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

pub use coherence::{PurgeFeed, PurgeListener, PurgeLogEntry, PurgeNotice};
pub use found::{Found, FoundSlot};
pub use key::{KeyHasher, StoreKey};
pub use rate::{Permit, Rate};
pub use record::{DecodeError, Entry, PurgeMark, Record, UpstreamHold, VaryIndex};

/// Milliseconds since the Unix epoch: the one time unit every backend stores.
pub type UnixMillis = u64;

/// The current wall-clock time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether a value that lives until `expires_at` is gone at `now`.
/// One definition, so every backend agrees on the boundary.
pub fn is_expired(expires_at: UnixMillis, now: UnixMillis) -> bool {
    now >= expires_at
}

/// What a backend can and cannot do, so the proxy decides up front instead
/// of a backend silently dropping work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Short name used in logs, metrics and `Cache-Status` (`memory`, `redis`, ...).
    pub name: &'static str,
    /// Largest value (encoded record bytes) the backend accepts. Larger puts
    /// fail with [`StoreError::TooLarge`]; the proxy checks first and skips them.
    pub max_value_bytes: usize,
    /// True when other processes see what this one stores (Redis, DynamoDB).
    /// A shared store's lock and rate budgets coordinate instances; a local
    /// one's only this process.
    pub shared: bool,
    /// How the L1s of other instances hear of purges made through this
    /// backend (see [`coherence`]).
    pub purge_feed: PurgeFeed,
    /// [`CacheStore::tag_members`] lists a tag's keys, so a soft purge can
    /// mark them stale; without it a soft purge purges hard.
    pub lists_tag_members: bool,
    /// [`CacheStore::scan_values`] lists every key holding a value, so a
    /// purge by path prefix, or of everything, can find what to remove.
    pub scans_values: bool,
    /// Each put stores a fresh [`WriteId`] with the value, reads return it,
    /// and [`CacheStore::get_since`] answers [`Read::Unchanged`] for the
    /// write the key still holds without sending the value.
    pub write_ids: bool,
}

/// One page of [`CacheStore::scan_values`]: keys, and where the next page
/// starts (`None` when the scan is done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    pub keys: Vec<StoreKey>,
    pub next: Option<String>,
}

/// Options of one put.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Absolute time after which the value must never be returned. For a
    /// cached response this is the end of its longest stale window.
    pub expires_at: UnixMillis,
    /// Tags a later [`CacheStore::purge_tag`] removes this key by.
    pub tags: Vec<String>,
}

/// Names one write of a value, for a backend that keeps it with the value
/// ([`Capabilities::write_ids`]): a reader that already holds what a write
/// stored asks [`CacheStore::get_since`] whether the key still holds that
/// write, and is not sent the value again when it does. Random (UUID v4)
/// for each put, so two writes, from one instance or two, never share one;
/// it says nothing about the bytes, and nothing is compared but the id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WriteId(Bytes);

impl WriteId {
    /// A fresh id for one put.
    pub fn generate() -> Self {
        WriteId(Bytes::copy_from_slice(uuid::Uuid::new_v4().as_bytes()))
    }
    /// The id as a backend stored it.
    pub fn from_stored(bytes: Bytes) -> Self {
        WriteId(bytes)
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WriteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WriteId(")?;
        for b in self.0.iter().take(4) {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

/// What a reader holds of a key already: the value of `write`, `len`
/// bytes long. The length only lets a backend choose how to ask (a small
/// value may cost less to send again than to check without sending); the
/// answer is the same either way.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub write: &'a WriteId,
    pub len: usize,
}

/// What [`CacheStore::get_since`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The key still holds, live, the write the caller named: what the
    /// caller kept of it is current. Only ever the answer to a read that
    /// named a write.
    Unchanged,
    /// The live value under the key (`None`: absent or expired), with the
    /// id of its write when the backend keeps one.
    Current(Option<(Bytes, Option<WriteId>)>),
}

/// Proof of holding a lock; only its holder can release it.
#[derive(Clone, PartialEq, Eq)]
pub struct LockToken(String);

impl LockToken {
    /// A fresh random token (UUID v4): unique across processes and instances.
    pub fn generate() -> Self {
        LockToken(uuid::Uuid::new_v4().simple().to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockToken({}…)", &self.0[..8.min(self.0.len())])
    }
}

/// Why a store operation failed. The proxy treats every one of them as a
/// miss (fail open); the kinds exist for logs, metrics and the breaker.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{backend}: operation timed out after {after:?}")]
    Timeout {
        backend: &'static str,
        after: Duration,
    },
    #[error(
        "{backend}: circuit open after repeated failures; not trying until {retry_in:?} from now"
    )]
    CircuitOpen {
        backend: &'static str,
        retry_in: Duration,
    },
    #[error("{backend}: value of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        backend: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("{backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
    /// The backend answers but cannot be used as configured (a DynamoDB
    /// table that does not exist, credentials refused): the same call
    /// fails the same way until someone fixes the setup.
    /// [`guard::GuardedStore`] then stops calling it for a while and
    /// reports the cause once.
    #[error("{backend}: {message} (permanent until the setup is fixed)")]
    Unusable {
        backend: &'static str,
        message: String,
    },
}

impl StoreError {
    /// A backend failure with its cause flattened into the message.
    pub fn backend(backend: &'static str, err: impl fmt::Display) -> Self {
        StoreError::Backend {
            backend,
            message: err.to_string(),
        }
    }
}

/// A cache backend: bytes under a key until an absolute expiry, tags for
/// purging, and a lock for one upstream call per key across instances.
///
/// Implementations must be safe to share across tasks and must not block
/// the runtime. Time bounds and the circuit breaker are added around any
/// implementation by [`guard::GuardedStore`]; implementations themselves
/// only need their own connect/operation timeouts to not hang forever.
#[async_trait]
pub trait CacheStore: Send + Sync + fmt::Debug + 'static {
    fn capabilities(&self) -> &Capabilities;

    /// The value under `key`, or `None` when absent or past its expiry.
    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError>;

    /// [`CacheStore::get`] for a caller that holds what a write stored
    /// under `key` already (`seen`): [`Read::Unchanged`] when the key still
    /// holds that write, live, so the value need not cross the network
    /// again. One round trip either way. Backends without
    /// [`Capabilities::write_ids`] read the value (this default).
    async fn get_since(&self, key: &StoreKey, seen: Option<Seen<'_>>) -> Result<Read, StoreError> {
        let _ = seen;
        Ok(Read::Current(self.get(key).await?.map(|v| (v, None))))
    }

    /// Store `value` under `key` until `opts.expires_at`, replacing any
    /// previous value, and record it under each of `opts.tags`.
    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError>;

    /// Remove `key`. Returns whether a (live) value was there.
    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError>;

    /// Take the lock named `key` for at most `ttl`, unless another holder
    /// has it and its ttl has not run out. Lock names live in their own
    /// namespace: locking a key never touches its value.
    async fn try_lock(
        &self,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError>;

    /// Release the lock if `token` still holds it. Returns whether it did:
    /// a lock that expired and was taken by someone else is left alone.
    async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError>;

    /// Take one permit of the rate budget named `key`, shared by everyone
    /// using this store (every instance, for a shared backend), if one is
    /// free within `max_wait`: [`Permit::Granted`] with how long to wait
    /// before going (the slot is reserved), or [`Permit::Denied`] with
    /// when to come back (nothing reserved). One atomic GCRA step (see
    /// [`rate`]): however many callers, over any window of `T` seconds at
    /// most `rate.burst + T × rate.per_second` grants have their go-time
    /// in it. Budgets live in their own namespace (never touching a value
    /// or lock of the same key) and vanish once idle. An invalid `rate`
    /// (see [`Rate::check`]) is an error, and the server is not asked.
    async fn take_permit(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError>;

    /// Remove every value stored with `tag` (and nothing else). Returns how
    /// many live values were removed.
    async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError>;

    /// The keys that may hold a value stored with `tag` (a candidate list:
    /// some may since have been overwritten without it, or have expired).
    /// Soft purges read it. Default: unsupported (a soft purge then
    /// purges hard); a backend that implements it declares
    /// [`Capabilities::lists_tag_members`].
    async fn tag_members(&self, tag: &str) -> Result<Vec<StoreKey>, StoreError> {
        let _ = tag;
        Err(StoreError::backend(
            self.capabilities().name,
            "cannot list a tag's members",
        ))
    }

    /// One page of the keys that hold values (never locks, permits, tag
    /// lists or logs), from `cursor` (`None` to start; then each page's
    /// `next`). A full scan returns every key that held a value throughout
    /// it, possibly some twice, and possibly some since expired or
    /// removed; keys written during it may be missing. Purges by path
    /// prefix read it; it reads the whole keyspace (Redis `SCAN`, a
    /// DynamoDB `Scan`), so it is for operators, never the request path.
    /// Default: unsupported; a backend that implements it declares
    /// [`Capabilities::scans_values`].
    async fn scan_values(&self, cursor: Option<&str>) -> Result<ScanPage, StoreError> {
        let _ = cursor;
        Err(StoreError::backend(
            self.capabilities().name,
            "cannot list its keys",
        ))
    }

    /// Tell the other instances' L1s of a purge made here: published
    /// ([`PurgeFeed::Push`]) or appended to the purge log
    /// ([`PurgeFeed::Log`]). Default: nobody to tell.
    async fn announce_purge(&self, notice: &PurgeNotice) -> Result<(), StoreError> {
        let _ = notice;
        Ok(())
    }

    /// [`PurgeFeed::Push`] backends: deliver every purge announced from now
    /// on to `listener`, and tell it whenever the subscription is lost or
    /// made again, until the listener is dropped. Default: nothing.
    fn watch_purges(&self, listener: std::sync::Weak<dyn PurgeListener>) {
        let _ = listener;
    }

    /// [`PurgeFeed::Log`] backends: the purges logged at or after `since`,
    /// oldest first, at most [`coherence::LOG_READ_MAX`]. Default: none.
    async fn read_purge_log(&self, since: UnixMillis) -> Result<Vec<PurgeLogEntry>, StoreError> {
        let _ = since;
        Ok(Vec::new())
    }
}
