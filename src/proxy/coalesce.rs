//! One upstream call per key: single-flight inside the process, and the
//! backend's fetch lock across processes and Lambda instances.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::watch;

use cachegate_store::{now_millis, Entry, StoreKey, UnixMillis};

use super::fetch::MissCtx;
use super::outcome::{Collapsed, Kind, Outcome, Refresh};
use super::{Fetched, Proxy, Stored};
use crate::key;
use crate::upstream::UpstreamError;

/// What a coalesced fetch tells the requests that waited for it.
#[derive(Debug, Clone)]
pub(super) enum Shared {
    /// It stored an entry: the waiters whose variant it is take it.
    Entry(SharedEntry),
    /// Its answer may not be stored (it may be private to the request
    /// that caused it): every waiter fetches for itself, at once.
    NotStorable,
    /// The upstream failed it (a timeout, no connection, a hold): the
    /// waiters get the same error at the same time, not a second wait.
    Failed(UpstreamError),
    /// The fetch was dropped before it ended: the waiters fetch.
    Gone,
}

/// How long keys whose answer was not storable skip coalescing (and the
/// fetch lock): concurrent requests for them go upstream side by side, as
/// Varnish's hit-for-pass does. Forgotten sooner when an answer is stored.
pub(super) const HIT_FOR_PASS: Duration = Duration::from_secs(60);

/// Most keys remembered as not storable (bounded under hostile input).
const HIT_FOR_PASS_MAX: usize = 10_000;

/// The entry a coalesced fetch stored, and which requests it answers.
#[derive(Debug, Clone)]
pub(super) struct SharedEntry {
    stored: Arc<Stored>,
    /// The request headers that select its variant (`None` for `Vary: *`).
    vary: Option<Vec<String>>,
    /// The key it went under: a waiter takes it only if its own request
    /// would be stored under the same one.
    key: StoreKey,
}

impl Proxy {
    /// One upstream call per primary key at a time in this process: the
    /// first caller fetches, later ones wait (bounded) and take its entry
    /// if it was stored and matches their `Vary` variant.
    pub(super) async fn fetch_coalesced(
        &self,
        miss: &MissCtx,
        stale: Option<Arc<Stored>>,
        on_contention: OnContention,
    ) -> Result<Fetched, UpstreamError> {
        let fallback_stale = stale.clone();
        if self.settings.coalesce_wait.is_zero() || self.known_not_storable(&miss.primary) {
            return self.fetch(miss, stale).await;
        }
        let role = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&miss.primary) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(miss.primary.clone(), rx);
                    Ok(tx)
                }
            }
        };
        let mut rx = match role {
            Ok(tx) => {
                let leader = LeaderGuard {
                    proxy: self,
                    key: &miss.primary,
                    tx,
                };
                let result = self
                    .fetch_once_across_instances(miss, stale, on_contention)
                    .await;
                let share = match &result {
                    // Waiters get the stored copy, never the fetcher's own headers.
                    Ok(Fetched::Entry(stored, _) | Fetched::Own(stored, _, _)) => {
                        self.forget_not_storable(&miss.primary);
                        let vary = key::variant_names(&stored.headers, self.settings.compression);
                        Shared::Entry(SharedEntry {
                            stored: stored.clone(),
                            key: stored_under(&miss.primary, vary.as_deref(), &miss.headers),
                            vary,
                        })
                    }
                    Ok(Fetched::Relay(..) | Fetched::Sent { too_large: true }) => {
                        self.remember_not_storable(&miss.primary);
                        Shared::NotStorable
                    }
                    // Not stored for now (a purge ran meanwhile): the
                    // waiters fetch.
                    Ok(Fetched::Sent { too_large: false }) => Shared::Gone,
                    Err(e) => Shared::Failed(e.clone()),
                };
                leader.finish(share);
                return result;
            }
            Err(rx) => rx,
        };
        if let (OnContention::ServeStale, Some(s)) = (on_contention, &fallback_stale) {
            let outcome = stale_while_revalidate(&s.entry, now_millis(), Refresh::InProgress);
            return Ok(Fetched::Entry(s.clone(), outcome));
        }
        // As long as the fetch in flight can take: it ends by then (its
        // upstream call times out), and waiting less would only start a
        // second call.
        let shared = tokio::time::timeout(self.coalesce_deadline(), async {
            rx.wait_for(|v| v.is_some()).await.map(|v| v.clone())
        })
        .await;
        match shared {
            Ok(Ok(Some(Shared::Entry(shared))))
                if stored_under(&miss.primary, shared.vary.as_deref(), &miss.headers)
                    == shared.key =>
            {
                return Ok(Fetched::Entry(
                    shared.stored,
                    Outcome::new(Kind::Collapsed {
                        fwd: miss.fwd,
                        how: Collapsed::InProcess,
                    }),
                ));
            }
            Ok(Ok(Some(Shared::Failed(e)))) => return Err(e),
            Err(_) => {
                tracing::debug!("the fetch in flight outlived upstream.timeout; fetching too")
            }
            // Not storable, gone, or another variant: fetch.
            _ => {}
        }
        self.fetch(miss, fallback_stale).await
    }

    /// With a shared store, one instance at a time fetches a key: the
    /// backend lock decides. The others wait (bounded) for its entry; if the
    /// holder goes away without storing one, or the wait runs out, they
    /// fetch themselves rather than fail. A lock the store cannot give (it
    /// is down) is no reason to wait.
    pub(super) async fn fetch_once_across_instances(
        &self,
        miss: &MissCtx,
        stale: Option<Arc<Stored>>,
        on_contention: OnContention,
    ) -> Result<Fetched, UpstreamError> {
        // Our lookup missed, but the previous fetcher may have stored its
        // entry and let go (of this process's flight, then of the lock)
        // after that lookup and before we took over: look once more, or a
        // late request of a stampede calls the upstream a second time.
        let stored_meanwhile = |stored: Arc<Stored>| {
            Ok(Fetched::Entry(
                stored,
                Outcome::new(Kind::Collapsed {
                    fwd: miss.fwd,
                    how: Collapsed::StoredMeanwhile,
                }),
            ))
        };
        if !self.cache.is_shared() {
            if let Some(stored) = self.newer_entry(miss, stale.as_deref()).await {
                return stored_meanwhile(stored);
            }
            return self.fetch(miss, stale).await;
        }
        let lock = StoreKey::hash("lock", [miss.primary.as_str()]);
        match self.cache.try_lock(&lock, self.settings.lock_ttl).await {
            Ok(Some(token)) => {
                let locked_at = tokio::time::Instant::now();
                if let Some(stored) = self.newer_entry(miss, stale.as_deref()).await {
                    let _ = self.cache.unlock(&lock, &token).await;
                    return stored_meanwhile(stored);
                }
                let result = self.fetch(miss, stale).await;
                if let Err(e) = self.cache.unlock(&lock, &token).await {
                    // Left in place, the lock would make every other instance
                    // wait out `coalesce_wait` for a fetch nobody is running
                    // (a store that was briefly down keeps its locks).
                    tracing::debug!(error = %e, "unlock failed; retrying until the lock expires");
                    let cache = self.cache.clone();
                    let expires = locked_at + self.settings.lock_ttl;
                    tokio::spawn(async move {
                        while tokio::time::Instant::now() < expires {
                            tokio::time::sleep(LOCK_POLL * 10).await;
                            if cache.unlock(&lock, &token).await.is_ok() {
                                break;
                            }
                        }
                    });
                }
                result
            }
            Ok(None) => {
                if let (OnContention::ServeStale, Some(s)) = (on_contention, &stale) {
                    let outcome =
                        stale_while_revalidate(&s.entry, now_millis(), Refresh::InProgress);
                    return Ok(Fetched::Entry(s.clone(), outcome));
                }
                match self
                    .wait_for_other_instance(miss, &lock, stale.as_deref())
                    .await
                {
                    Some(stored) => Ok(Fetched::Entry(
                        stored,
                        Outcome::new(Kind::Collapsed {
                            fwd: miss.fwd,
                            how: Collapsed::OtherInstance,
                        }),
                    )),
                    None => self.fetch(miss, stale).await,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "fetch lock unavailable; fetching without it");
                self.fetch(miss, stale).await
            }
        }
    }

    /// Poll for the entry another instance is fetching. `None` when it does
    /// not come: the lock was released or expired without a new entry, the
    /// store failed, or `coalesce_wait` ran out.
    pub(super) async fn wait_for_other_instance(
        &self,
        miss: &MissCtx,
        lock: &StoreKey,
        stale: Option<&Stored>,
    ) -> Option<Arc<Stored>> {
        let deadline = tokio::time::Instant::now() + self.coalesce_deadline();
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LOCK_POLL).await;
            let found = self
                .lookup(&miss.primary, &miss.headers, miss.accept.as_deref())
                .await;
            if let Some(e) = found.trouble {
                // A slow or failed read is a reason to look again, not to
                // call the upstream beside the holder.
                tracing::debug!(error = %e, "store failed while waiting for another instance's fetch; polling on");
                continue;
            }
            if let Some(s) = found.stored.filter(|s| miss.may_take(s, stale)) {
                return Some(s);
            }
            match self.cache.try_lock(lock, LOCK_POLL * 4).await {
                Ok(Some(token)) => {
                    // Free again. The holder may have stored its entry and
                    // unlocked between our lookup and this lock, so look
                    // once more; still nothing means its response was not
                    // storable (or it died), and every waiter fetches at
                    // once rather than queueing behind one another.
                    let found = self.newer_entry(miss, stale).await;
                    let _ = self.cache.unlock(lock, &token).await;
                    if found.is_none() {
                        tracing::debug!("fetch lock released without an entry; fetching too");
                    }
                    return found;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "store failed while waiting for another instance's fetch; polling on");
                }
            }
        }
        tracing::debug!("the other instance's fetch outlived upstream.timeout; fetching too");
        None
    }

    /// How long a request waits for a fetch of its key in flight (here or
    /// in another instance): as long as that fetch can take (the fetch
    /// lock's life, `upstream.timeout` and a margin), or `cache.coalesce_wait`
    /// when that is longer.
    fn coalesce_deadline(&self) -> Duration {
        self.settings.coalesce_wait.max(self.settings.lock_ttl)
    }

    /// Whether an answer for `key` was recently found not storable
    /// ([`HIT_FOR_PASS`]).
    fn known_not_storable(&self, key: &StoreKey) -> bool {
        let map = self.not_storable.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .is_some_and(|until| *until > tokio::time::Instant::now())
    }

    fn remember_not_storable(&self, key: &StoreKey) {
        let now = tokio::time::Instant::now();
        let mut map = self.not_storable.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= HIT_FOR_PASS_MAX {
            map.retain(|_, until| *until > now);
            if map.len() >= HIT_FOR_PASS_MAX {
                map.clear();
            }
        }
        map.insert(key.clone(), now + HIT_FOR_PASS);
    }

    fn forget_not_storable(&self, key: &StoreKey) {
        self.not_storable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// An entry stored meanwhile that may answer this miss
    /// ([`MissCtx::may_take`]). A store that fails here is no entry: the
    /// caller fetches. Not asked when this request's lookup already failed:
    /// a second timeout would only delay the fetch.
    pub(super) async fn newer_entry(
        &self,
        miss: &MissCtx,
        stale: Option<&Stored>,
    ) -> Option<Arc<Stored>> {
        if miss.cache_down {
            return None;
        }
        let found = self
            .lookup(&miss.primary, &miss.headers, miss.accept.as_deref())
            .await;
        found.stored.filter(|s| miss.may_take(s, stale))
    }
}

/// What a request needs to know when another instance holds the fetch lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnContention {
    /// Wait for the other instance's entry.
    Wait,
    /// Answer the stale entry at once (Lambda stale-while-revalidate).
    ServeStale,
}

/// How often a request waiting on another instance's fetch looks for its entry.
const LOCK_POLL: Duration = Duration::from_millis(25);

/// The key an entry for these request headers is stored under.
pub(super) fn stored_under(
    primary: &StoreKey,
    vary: Option<&[String]>,
    headers: &HeaderMap,
) -> StoreKey {
    match vary {
        Some(v) if !v.is_empty() => key::variant_key(primary, v, headers),
        _ => primary.clone(),
    }
}

/// A stale-while-revalidate answer's outcome.
pub(super) fn stale_while_revalidate(entry: &Entry, now: UnixMillis, refresh: Refresh) -> Outcome {
    Outcome::new(Kind::StaleWhileRevalidate {
        stale_for: now.saturating_sub(entry.fresh_until) / 1000,
        refresh,
    })
}

/// Removes the in-flight marker however the leader ends (even if its
/// future is dropped), so waiters never wait on a fetch nobody runs.
struct LeaderGuard<'a> {
    proxy: &'a Proxy,
    key: &'a StoreKey,
    tx: watch::Sender<Option<Shared>>,
}

impl LeaderGuard<'_> {
    fn finish(self, share: Shared) {
        let _ = self.tx.send(Some(share));
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        self.proxy
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.key);
        // A leader dropped mid-fetch releases waiters with nothing to share.
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(Shared::Gone);
                true
            } else {
                false
            }
        });
    }
}
