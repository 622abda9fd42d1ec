//! Keeping every instance's L1 in step with purges made anywhere.
//!
//! Each process keeps an in-memory L1 in front of the shared backend. A
//! purge removes entries from the backend and from the L1 of the process
//! that made it; the other processes learn of it through the backend:
//!
//! - [`PurgeFeed::Push`] (Redis): the purge is published on a channel every
//!   instance subscribes to; a notice drops the matching L1 entries at
//!   once. While the subscription is down (reconnect, failover, restart)
//!   the L1 is flushed and not used: what was published meanwhile is lost.
//! - [`PurgeFeed::Log`] (DynamoDB, which has no push): one log item per
//!   purge, read by each instance at most every `cache.l1_check`, on the
//!   request path when a read is due (one read shared by all requests of
//!   the process). The L1 does not answer while a read is due; a read that
//!   fails flushes it.
//!
//! [`L1`] holds the state on the receiving side; `tiered` uses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::memory::MemoryStore;
use crate::{now_millis, CacheStore, UnixMillis};

/// How other instances' L1s hear of a purge made through a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeFeed {
    /// No other instance shares the backend (memory): nothing to tell.
    Local,
    /// The backend pushes purges to subscribers ([`CacheStore::watch_purges`]).
    Push,
    /// The backend keeps a purge log that is read ([`CacheStore::read_purge_log`]).
    Log,
}

/// One purge as the other instances hear of it: a URL purge is a purge of
/// the URL's tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeNotice {
    pub tag: String,
    /// A soft purge (the backend's entries were marked stale, not removed).
    /// L1s drop their copies either way.
    #[serde(default)]
    pub soft: bool,
}

impl PurgeNotice {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("plain struct")
    }
    pub fn decode(bytes: &[u8]) -> Option<PurgeNotice> {
        serde_json::from_slice(bytes).ok()
    }
}

/// One item of a purge log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeLogEntry {
    /// When it was logged, by the logging instance's clock.
    pub at: UnixMillis,
    /// Unique per purge, so a purge read twice is applied once.
    pub id: String,
    pub notice: PurgeNotice,
}

/// Most log entries one read returns; a read that comes back full cannot
/// be known to be complete, and flushes the L1 instead.
pub const LOG_READ_MAX: usize = 1000;

/// How far back each log read looks beyond the previous read: instances'
/// clocks may differ by this much (each logs with its own clock).
pub const LOG_CLOCK_SLACK: Duration = Duration::from_secs(2);

/// How long log entries are kept (the TTL a log backend sets); an L1 whose
/// last read is older than this is flushed rather than read up.
pub const LOG_RETENTION: Duration = Duration::from_secs(600);

/// What a push backend's subscription tells the L1.
#[async_trait]
pub trait PurgeListener: Send + Sync {
    /// Another instance purged `notice.tag`.
    async fn purged(&self, notice: PurgeNotice);
    /// The subscription is live (`true`: made or made again) or lost
    /// (`false`). Either way the L1 is flushed: it cannot know what was
    /// published while nobody listened.
    async fn subscribed(&self, live: bool);
}

impl std::fmt::Debug for dyn PurgeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PurgeListener")
    }
}

/// The L1 and what decides whether it may answer.
#[derive(Debug)]
pub struct L1 {
    pub store: MemoryStore,
    pub ttl: Duration,
    feed: PurgeFeed,
    /// Push: the subscription is live.
    live: AtomicBool,
    /// Bumped by every purge notice applied and every flush. A fill reads
    /// it before its backend read and fills only if it did not move: a
    /// value read before a purge was applied must not be kept after it.
    generation: AtomicU64,
    log: Option<LogReader>,
}

#[derive(Debug)]
struct LogReader {
    every: Duration,
    /// Held while a read is made: one read per process at a time.
    state: tokio::sync::Mutex<LogState>,
    /// Fast path: milliseconds since `base` before which no read is due.
    due_at: AtomicU64,
    base: Instant,
}

#[derive(Debug)]
struct LogState {
    /// The next read asks for entries logged at or after this.
    since: UnixMillis,
    /// Ids already applied, with when they were logged (pruned as `since` moves).
    seen: HashMap<String, UnixMillis>,
}

impl L1 {
    /// An L1 kept coherent through `feed`; `check_every` is how often a
    /// purge log is read ([`PurgeFeed::Log`] only).
    pub fn new(store: MemoryStore, ttl: Duration, feed: PurgeFeed, check_every: Duration) -> Self {
        let log = (feed == PurgeFeed::Log).then(|| LogReader {
            every: check_every,
            state: tokio::sync::Mutex::new(LogState {
                // Nothing is in the L1 yet: only what is logged from now on matters.
                since: now_millis().saturating_sub(LOG_CLOCK_SLACK.as_millis() as u64),
                seen: HashMap::new(),
            }),
            due_at: AtomicU64::new(0),
            base: Instant::now(),
        });
        L1 {
            store,
            ttl,
            feed,
            // Push: not until subscribed. The others: always.
            live: AtomicBool::new(feed != PurgeFeed::Push),
            generation: AtomicU64::new(0),
            log,
        }
    }

    pub fn feed(&self) -> PurgeFeed {
        self.feed
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drop everything (the L1 may have missed purges).
    pub fn flush(&self) {
        self.bump();
        self.store.clear();
    }

    /// Drop the entries carrying `tag`; how many there were.
    pub async fn drop_tag(&self, tag: &str) -> u64 {
        self.bump();
        let dropped = self.store.purge_tag(tag).await.unwrap_or(0);
        // Entries filled while the purge ran were read before it was
        // applied; the generation check keeps later fills out.
        self.bump();
        dropped
    }

    /// Whether the L1 may answer (and be filled) now. With a purge log, a
    /// read that is due is made first (one per process at a time; the
    /// others wait for it), through `main`.
    pub async fn usable(&self, main: &dyn CacheStore) -> bool {
        if !self.live.load(Ordering::Acquire) {
            return false;
        }
        let Some(log) = &self.log else {
            return true;
        };
        let elapsed = || log.base.elapsed().as_millis() as u64;
        if elapsed() < log.due_at.load(Ordering::Acquire) {
            return true;
        }
        let mut state = log.state.lock().await;
        if elapsed() < log.due_at.load(Ordering::Acquire) {
            // Another request read it while this one waited.
            return true;
        }
        let started = now_millis();
        if started.saturating_sub(state.since) > LOG_RETENTION.as_millis() as u64 {
            // Asleep (a frozen Lambda environment) longer than the log keeps
            // entries: start over.
            self.flush();
            state.since = started.saturating_sub(LOG_CLOCK_SLACK.as_millis() as u64);
            state.seen.clear();
        }
        match main.read_purge_log(state.since).await {
            Ok(entries) => {
                if entries.len() >= LOG_READ_MAX {
                    tracing::info!(
                        entries = entries.len(),
                        "more purges logged than one read returns; L1 flushed"
                    );
                    self.flush();
                } else {
                    for entry in entries {
                        if state.seen.contains_key(&entry.id) {
                            continue;
                        }
                        self.drop_tag(&entry.notice.tag).await;
                        state.seen.insert(entry.id, entry.at);
                    }
                }
                let since = started.saturating_sub(LOG_CLOCK_SLACK.as_millis() as u64);
                state.since = since;
                state.seen.retain(|_, at| *at >= since);
                log.due_at
                    .store(elapsed() + log.every.as_millis() as u64, Ordering::Release);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "purge log unreadable; L1 flushed and bypassed");
                self.flush();
                false
            }
        }
    }
}

/// The listener a push backend's subscription reports to.
#[derive(Debug)]
pub struct Subscriber(pub Arc<L1>);

#[async_trait]
impl PurgeListener for Subscriber {
    async fn purged(&self, notice: PurgeNotice) {
        let dropped = self.0.drop_tag(&notice.tag).await;
        tracing::debug!(tag = %notice.tag, soft = notice.soft, dropped, "purge notice; dropped from the L1");
    }
    async fn subscribed(&self, live: bool) {
        let l1 = &self.0;
        l1.flush();
        let was = l1.live.swap(live, Ordering::AcqRel);
        if was != live {
            if live {
                tracing::info!("purge subscription live; L1 in use");
            } else {
                tracing::warn!("purge subscription lost; L1 flushed and bypassed until it is back");
            }
        }
        l1.flush();
    }
}
