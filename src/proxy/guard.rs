//! Whether the upstream may be called now, and what each call taught us.
//!
//! Two things hold calls back, for the GET and HEAD requests the proxy
//! sends (writes always go through: they are the client's to make):
//! - a back-off the upstream asked for (a 429, or a 503 with
//!   `Retry-After`), kept here and, with a shared backend, left in it as an
//!   [`UpstreamHold`] record that every instance reads before it calls;
//! - this instance's [`Breaker`], after failures in a row.
//!
//! A 429 to a request that carried credentials (`Authorization`, a
//! `Cookie`) sets no back-off: the limit it reports may be that client's
//! alone, and one client must not stop the upstream for all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderMap;

use cachegate_store::{now_millis, Record, StoreKey, UpstreamHold};

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
}

/// How the guard behaves (`upstream.failure_threshold`, `open_for`,
/// `back_off`, `max_back_off`).
#[derive(Debug, Clone, Copy)]
pub struct GuardSettings {
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub back_off: BackOffRules,
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
        }
    }
}

impl UpstreamGuard {
    pub(super) fn new(s: GuardSettings) -> Self {
        UpstreamGuard {
            breaker: Breaker::new(s.failure_threshold, s.open_for),
            hold_until: AtomicU64::new(0),
            rules: s.back_off,
        }
    }
}

/// The one key the shared back-off lives under (the backend's prefix keeps
/// deployments apart).
fn hold_key() -> StoreKey {
    StoreKey::hash("upstream-hold", ["upstream"])
}

impl Proxy {
    /// May a GET or HEAD go upstream now? `Err` is the answer to give
    /// instead (a stale entry, or 503 with `Retry-After`).
    pub(super) async fn admit_upstream(&self) -> Result<Admit, UpstreamError> {
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
        match guard.breaker.admit(Instant::now()) {
            Admit::Refused { retry_in } => Err(UpstreamError::Held {
                hold: Hold::BreakerOpen,
                retry_in,
            }),
            admitted => Ok(admitted),
        }
    }

    /// Learn from what an admitted call got: feed the breaker, and set
    /// (and share) a back-off the upstream asked for.
    pub(super) async fn report_upstream(
        &self,
        admitted: Admit,
        sent_headers_had_credentials: bool,
        sent: &Result<UpstreamResponse, UpstreamError>,
    ) {
        let guard = &self.guard;
        let now = now_millis();
        let signal = match sent {
            Ok(r) => signal_of(r.status, &r.headers, now, guard.rules),
            Err(e) if e.is_failure() => Signal::Failure,
            Err(_) => Signal::Healthy,
        };
        guard
            .breaker
            .report(admitted, signal == Signal::Failure, Instant::now());
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
            let hold = Record::UpstreamHold(UpstreamHold { until, status });
            if let Err(e) = self.cache.put(&hold_key(), &hold).await {
                tracing::debug!(error = %e, "could not share the upstream back-off; this instance keeps it");
            }
        }
    }
}

/// Whether forwarded request headers carry a client's credentials.
pub(super) fn has_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key(http::header::COOKIE)
}
