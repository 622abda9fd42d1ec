//! Whether the upstream may be called now, and what each call taught us.
//!
//! Four things hold calls back, for the GET and HEAD requests the proxy
//! sends (writes always go through: they are the client's to make), in
//! this order:
//! - a back-off the upstream asked for (a 429, or a 503 with
//!   `Retry-After`), kept here and, with a shared backend, left in it as an
//!   [`UpstreamHold`] record that every instance reads before it calls;
//! - this instance's [`Breaker`], after failures in a row;
//! - `upstream.max_concurrency`, calls in flight from this instance;
//! - `upstream.max_rps`, the request budget every instance sharing the
//!   backend draws on ([`cachegate_store::CacheStore::take_permit`]); while
//!   the backend cannot be asked, each instance keeps to `fallback_rps`.
//!
//! Client misses wait up to `upstream.queue_wait` for the last two;
//! background refreshes do not wait at all, so they yield to clients.
//!
//! A 429 to a request that carried credentials (`Authorization`, a
//! `Cookie`) sets no back-off: the limit it reports may be that client's
//! alone, and one client must not stop the upstream for all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method};
use reqwest::Url;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use cachegate_store::rate::{gcra, max_wait_us, Step};
use cachegate_store::{now_millis, Permit, Rate, Record, StoreKey, UpstreamHold};

use super::Proxy;
use crate::policy::back_off::{signal_of, BackOffRules, Signal};
use crate::upstream::breaker::{Admit, Breaker};
use crate::upstream::{Hold, UpstreamError, UpstreamResponse};

/// The upstream's standing as this instance knows it.
#[derive(Debug)]
pub(super) struct UpstreamGuard {
    breaker: Breaker,
    /// Until when (Unix ms) the upstream asked to be left alone; 0 for never.
    hold_until: AtomicU64,
    rules: BackOffRules,
    /// `upstream.max_concurrency`, when set.
    in_flight: Option<Arc<Semaphore>>,
    budget: Option<Budget>,
    queue_wait: Duration,
}

/// The shared request budget, and this instance's own for when the
/// backend cannot be asked.
#[derive(Debug)]
struct Budget {
    shared: Rate,
    fallback: Rate,
    /// The fallback budget's TAT, µs on `epoch`'s monotonic clock.
    local_tat: Mutex<Option<u64>>,
    epoch: Instant,
}

impl Budget {
    /// One GCRA step of the fallback budget ([`cachegate_store::rate`]).
    fn take_local(&self, max_wait: Duration) -> Permit {
        let now = self.epoch.elapsed().as_micros() as u64;
        let mut tat = self.local_tat.lock().unwrap_or_else(|p| p.into_inner());
        let step = gcra(
            *tat,
            now,
            self.fallback.emission_us(),
            self.fallback.tolerance_us(),
            max_wait_us(max_wait),
        );
        if let Step::Grant { new_tat, .. } = step {
            *tat = Some(new_tat);
        }
        step.permit()
    }
}

/// How the guard behaves (`upstream.failure_threshold`, `open_for`,
/// `back_off`, `max_back_off`, `max_rps`, `burst`, `fallback_rps`,
/// `max_concurrency`, `queue_wait`).
#[derive(Debug, Clone, Copy)]
pub struct GuardSettings {
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub back_off: BackOffRules,
    /// The shared budget and the fallback one, when `max_rps` is set.
    pub budget: Option<(Rate, Rate)>,
    pub max_concurrency: u32,
    pub queue_wait: Duration,
}

impl GuardSettings {
    pub fn from_config(cfg: &crate::config::UpstreamConfig) -> Self {
        GuardSettings {
            failure_threshold: cfg.failure_threshold,
            open_for: cfg.open_for,
            back_off: BackOffRules {
                default_wait: cfg.back_off,
                max_wait: cfg.max_back_off,
            },
            budget: cfg.max_rps.map(|rps| {
                let fallback = cfg.fallback_rps.unwrap_or(rps / 4.0);
                (Rate::new(rps, cfg.burst), Rate::new(fallback, cfg.burst))
            }),
            max_concurrency: cfg.max_concurrency,
            queue_wait: cfg.queue_wait,
        }
    }
}

impl UpstreamGuard {
    pub(super) fn new(s: GuardSettings) -> Self {
        UpstreamGuard {
            breaker: Breaker::new(s.failure_threshold, s.open_for),
            hold_until: AtomicU64::new(0),
            rules: s.back_off,
            in_flight: (s.max_concurrency > 0)
                .then(|| Arc::new(Semaphore::new(s.max_concurrency as usize))),
            budget: s.budget.map(|(shared, fallback)| Budget {
                shared,
                fallback,
                local_tat: Mutex::new(None),
                epoch: Instant::now(),
            }),
            queue_wait: s.queue_wait,
        }
    }
}

/// Leave to call the upstream: what the breaker said, and the
/// `max_concurrency` slot held until the call ends.
#[derive(Debug)]
pub(super) struct Admission {
    admitted: Admit,
    _slot: Option<OwnedSemaphorePermit>,
}

/// Who is asking: a client waits (bounded) for the budget; a background
/// refresh never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    Client,
    Background,
}

/// The one key the shared back-off lives under (the backend's prefix keeps
/// deployments apart).
fn hold_key() -> StoreKey {
    StoreKey::hash("upstream-hold", ["upstream"])
}

/// The one shared request budget (permits live in their own namespace).
fn budget_key() -> StoreKey {
    StoreKey::hash("upstream-budget", ["upstream"])
}

impl Proxy {
    /// Send a request upstream. GET and HEAD go through the guard (they
    /// may be held back, and what they get teaches it); other methods are
    /// sent as they are.
    pub(super) async fn send_upstream(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: Bytes,
        caller: Caller,
    ) -> Result<UpstreamResponse, UpstreamError> {
        if !matches!(method, Method::GET | Method::HEAD) {
            return self.upstream.send(method, url, headers, body).await;
        }
        let admission = self.admit_upstream(caller).await?;
        let credentials = has_credentials(&headers);
        let sent = self.upstream.send(method, url, headers, body).await;
        self.report_upstream(admission, credentials, &sent).await;
        sent
    }

    /// May a GET or HEAD go upstream now? `Err` is the answer to give
    /// instead (a stale entry, or 503 with `Retry-After`).
    async fn admit_upstream(&self, caller: Caller) -> Result<Admission, UpstreamError> {
        let guard = &self.guard;
        let now = now_millis();
        let mut until = guard.hold_until.load(Ordering::Relaxed);
        if until <= now && self.cache.is_shared() {
            // Another instance may have been told; an unreachable backend
            // is no reason to stop (the breaker still guards).
            if let Some(Record::UpstreamHold(h)) = self.cache.get(&hold_key()).await.record {
                until = h.until;
                guard.hold_until.fetch_max(until, Ordering::Relaxed);
            }
        }
        if until > now {
            return Err(UpstreamError::Held {
                hold: Hold::RetryAfter,
                retry_in: Duration::from_millis(until - now),
            });
        }
        let admitted = match guard.breaker.admit(Instant::now()) {
            Admit::Refused { retry_in } => {
                return Err(UpstreamError::Held {
                    hold: Hold::BreakerOpen,
                    retry_in,
                })
            }
            admitted => admitted,
        };
        match self.take_budget(caller).await {
            Ok(slot) => Ok(Admission {
                admitted,
                _slot: slot,
            }),
            Err(held) => {
                // A probe that may not go must not keep the breaker waiting.
                guard.breaker.abandon(admitted, Instant::now());
                Err(held)
            }
        }
    }

    /// A `max_concurrency` slot and a permit of the request budget, each
    /// within what is left of `queue_wait` (nothing for a background
    /// refresh); `Err` when either does not come in time.
    async fn take_budget(
        &self,
        caller: Caller,
    ) -> Result<Option<OwnedSemaphorePermit>, UpstreamError> {
        let guard = &self.guard;
        let started = Instant::now();
        let may_wait = match caller {
            Caller::Client => guard.queue_wait,
            Caller::Background => Duration::ZERO,
        };
        let over_budget = |retry_in: Duration| UpstreamError::Held {
            hold: Hold::Budget,
            retry_in,
        };
        let slot = match &guard.in_flight {
            None => None,
            Some(sem) => {
                let sem = sem.clone();
                let slot = match caller {
                    Caller::Background => sem.try_acquire_owned().ok(),
                    Caller::Client => tokio::time::timeout(may_wait, sem.acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok),
                };
                Some(slot.ok_or_else(|| over_budget(may_wait.max(Duration::from_secs(1))))?)
            }
        };
        let Some(budget) = &guard.budget else {
            return Ok(slot);
        };
        let max_wait = may_wait.saturating_sub(started.elapsed());
        let permit = match self
            .cache
            .take_permit(&budget_key(), budget.shared, max_wait)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "shared request budget unavailable; keeping to this instance's fallback_rps");
                budget.take_local(max_wait)
            }
        };
        match permit {
            Permit::Granted { wait } => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(slot)
            }
            Permit::Denied { retry_in } => Err(over_budget(retry_in)),
        }
    }

    /// Learn from what an admitted call got: feed the breaker, and set
    /// (and share) a back-off the upstream asked for.
    async fn report_upstream(
        &self,
        admission: Admission,
        sent_headers_had_credentials: bool,
        sent: &Result<UpstreamResponse, UpstreamError>,
    ) {
        let guard = &self.guard;
        let now = now_millis();
        let signal = match sent {
            Ok(r) => signal_of(r.status, &r.headers, now, guard.rules),
            Err(e) if e.is_failure() => Signal::Failure,
            Err(_) => Signal::Answered,
        };
        guard.breaker.report(
            admission.admitted,
            signal == Signal::Failure,
            Instant::now(),
        );
        // The concurrency slot is free again from here.
        drop(admission);
        let Signal::BackOff { wait, status } = signal else {
            return;
        };
        if sent_headers_had_credentials || wait.is_zero() {
            return;
        }
        let until = now + wait.as_millis() as u64;
        let before = guard.hold_until.fetch_max(until, Ordering::Relaxed);
        if before >= until {
            return;
        }
        tracing::warn!(
            status,
            ?wait,
            "upstream asked to back off: not calling it until then"
        );
        if self.cache.is_shared() {
            // Never shorten a hold another instance shared: an answer that
            // left before its 429 came back with a shorter Retry-After
            // would let every other instance call again early. (Read, then
            // write: two instances writing at the same moment can still
            // leave the shorter one; each keeps its own either way.)
            if let Some(Record::UpstreamHold(shared)) = self.cache.get(&hold_key()).await.record {
                if shared.until >= until {
                    guard.hold_until.fetch_max(shared.until, Ordering::Relaxed);
                    return;
                }
            }
            let hold = Record::UpstreamHold(UpstreamHold { until, status });
            if let Err(e) = self.cache.put(&hold_key(), &hold).await {
                tracing::debug!(error = %e, "could not share the upstream back-off; this instance keeps it");
            }
        }
    }
}

/// Whether forwarded request headers carry a client's credentials.
fn has_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key(http::header::COOKIE)
}
