//! Whether the upstream may be called now, and what each call taught us.
//!
//! Four things hold calls back, for the GET and HEAD requests the proxy
//! sends (writes always go through: they are the client's to make), in
//! this order, each on the smallest scope that failed or was limited:
//! - a back-off the upstream asked for (a 429, or a 503 with
//!   `Retry-After`), kept here and, with a shared backend, left in it as an
//!   [`UpstreamHold`] record under its scope's key that every instance
//!   reads before it calls. Its scope ([`HoldScope`]):
//!   - the request carried a client credential (`Authorization`, `Cookie`,
//!     a header of `cache.credential_headers`): that client's requests to
//!     that endpoint only; the upstream limited that client, not cachegate.
//!     The client is named by a hash of its credential values, never the
//!     values;
//!   - otherwise the request went with cachegate's own identity (its
//!     address, the headers of `upstream.headers`): a 429 limits that
//!     identity, which every request shares, so it holds every request; a
//!     503 with `Retry-After` says that endpoint is unavailable, and holds
//!     that endpoint only;
//! - this instance's breakers ([`Breaker`], opening on a failure rate): the
//!   upstream host's, fed by transport failures (no connection: refused,
//!   connect timeout, TLS), and the endpoint's, fed by HTTP failures (502,
//!   503 without `Retry-After`, 504, response timeouts, broken answers). An
//!   endpoint is the matched route's pattern, or where no route matches,
//!   the first segment of the path (`/users/7` is `/users`); at most
//!   [`MAX_ENDPOINTS`] endpoints are tracked (hostile paths cannot grow
//!   the map), the least used dropped first;
//! - `upstream.max_concurrency`, calls in flight from this instance;
//! - `upstream.max_rps`, the request budget every instance sharing the
//!   backend draws on ([`cachegate_store::CacheStore::take_permit`]); while
//!   the backend cannot be asked, each instance keeps to `fallback_rps`.
//!
//! Client misses wait up to `upstream.queue_wait` for the last two;
//! background refreshes do not wait at all, so they yield to clients.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method};
use reqwest::Url;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use cachegate_store::rate::{gcra, max_wait_us, Step};
use cachegate_store::{now_millis, Permit, Rate, Record, StoreKey, UpstreamHold};

use super::bounded::BoundedMap;
use super::Proxy;
use crate::key::Target;
use crate::policy::back_off::{signal_of, BackOffRules, Signal};
use crate::policy::rule::Rule;
use crate::upstream::breaker::{Admit, Breaker, BreakerRules};
use crate::upstream::{BreakerScope, Hold, HoldScope, UpstreamError, UpstreamResponse};

/// Endpoints (route patterns and first path segments) with a breaker of
/// their own; past this the least used are dropped (a dropped breaker
/// starts again closed, with an empty window).
pub(super) const MAX_ENDPOINTS: usize = 4096;
/// Scoped holds kept in this instance (per endpoint, per client and
/// endpoint); past this the least used are dropped, and the shared
/// backend, when there is one, still has them.
const MAX_HOLDS: usize = 65_536;
/// An endpoint named by a path segment is cut to this many bytes.
const MAX_SEGMENT: usize = 128;

/// The upstream's standing as this instance knows it.
#[derive(Debug)]
pub(super) struct UpstreamGuard {
    breaker_rules: BreakerRules,
    /// The upstream host's breaker: transport failures.
    host: Breaker,
    /// Each endpoint's breaker: HTTP failures.
    endpoints: BoundedMap<Arc<str>, Arc<Breaker>>,
    /// Until when (Unix ms) the upstream asked to be left alone, by the
    /// store key of the hold's scope ([`Scope::hold_keys`]).
    holds: BoundedMap<StoreKey, u64>,
    rules: BackOffRules,
    /// `upstream.max_concurrency`, when set.
    in_flight: Option<Arc<Semaphore>>,
    budget: Option<Budget>,
    queue_wait: Duration,
    /// The quota the upstream last announced to cachegate's own requests
    /// ([`crate::policy::rate_limit`]): the rate that spends what it said
    /// is left, and until when (Unix ms) it holds.
    announced: Mutex<Option<(Rate, u64)>>,
}

/// The shared request budget, this instance's own for when the backend
/// cannot be asked, and each client's share of it.
#[derive(Debug)]
struct Budget {
    shared: Rate,
    fallback: Rate,
    /// The fallback budget's TAT, µs on `epoch`'s monotonic clock.
    local_tat: Mutex<Option<u64>>,
    /// Each client's TAT in its share of `shared` ([`MAX_CLIENTS`] at
    /// most; a client idle for [`CLIENT_IDLE`] is forgotten). The clients
    /// in it are the ones the budget is shared among.
    clients: BoundedMap<String, Arc<Mutex<Option<u64>>>>,
    /// When idle clients were last swept out of `clients`.
    swept: Mutex<Instant>,
    epoch: Instant,
}

/// How often idle clients are swept out (the count of active clients is
/// this much behind at most).
const CLIENT_SWEEP: Duration = Duration::from_millis(250);

/// Clients whose share of the budget is tracked; past this the least
/// used are dropped (rotating addresses cannot grow the map), each
/// dropped client starting again with a full share.
const MAX_CLIENTS: usize = 65_536;
/// A client with no miss for this long no longer counts as one the
/// budget is shared among.
const CLIENT_IDLE: Duration = Duration::from_secs(2);

impl Budget {
    fn new(shared: Rate, fallback: Rate) -> Self {
        Budget {
            shared,
            fallback,
            local_tat: Mutex::new(None),
            clients: BoundedMap::new(MAX_CLIENTS),
            swept: Mutex::new(Instant::now()),
            epoch: Instant::now(),
        }
    }

    /// One GCRA step ([`cachegate_store::rate`]) of an in-process budget
    /// at `rate` whose TAT is `tat`.
    fn step(&self, tat: &Mutex<Option<u64>>, rate: Rate, max_wait: Duration) -> Permit {
        let now = self.epoch.elapsed().as_micros() as u64;
        let mut tat = tat.lock().unwrap_or_else(|p| p.into_inner());
        let step = gcra(
            *tat,
            now,
            rate.emission_us(),
            rate.tolerance_us(),
            max_wait_us(max_wait),
        );
        if let Step::Grant { new_tat, .. } = step {
            *tat = Some(new_tat);
        }
        step.permit()
    }

    /// The fallback budget, while the backend cannot be asked.
    fn take_local(&self, max_wait: Duration) -> Permit {
        self.step(&self.local_tat, self.fallback, max_wait)
    }

    /// `client`'s share: the budget divided among the clients that asked
    /// within [`CLIENT_IDLE`] (on this instance), so that while others
    /// wait no client takes more than its share, and a client alone has
    /// all of it.
    async fn take_share(&self, client: &str, max_wait: Duration) -> Permit {
        let now = Instant::now();
        let active = |_: &Arc<Mutex<Option<u64>>>, used: Instant| {
            now.saturating_duration_since(used) < CLIENT_IDLE
        };
        {
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if now.saturating_duration_since(*swept) >= CLIENT_SWEEP {
                *swept = now;
                self.clients.retain_alive(active);
            }
        }
        let (tat, active) =
            self.clients
                .get_or_insert_with(client, now, || Arc::new(Mutex::new(None)), active);
        let active = active.max(1);
        let share = Rate::new(self.shared.per_second / active as f64, self.shared.burst);
        self.step(&tat, share, max_wait)
    }
}

/// How the guard behaves (`upstream.failure_rate`, `min_calls`,
/// `failure_window`, `open_for`, `back_off`, `max_back_off`, `max_rps`,
/// `burst`, `fallback_rps`, `max_concurrency`, `queue_wait`).
#[derive(Debug, Clone, Copy)]
pub struct GuardSettings {
    pub breaker: BreakerRules,
    pub back_off: BackOffRules,
    /// The shared budget and the fallback one, when `max_rps` is set.
    pub budget: Option<(Rate, Rate)>,
    pub max_concurrency: u32,
    pub queue_wait: Duration,
}

impl GuardSettings {
    pub fn from_config(cfg: &crate::config::UpstreamConfig) -> Self {
        GuardSettings {
            breaker: BreakerRules {
                failure_rate: cfg.failure_rate,
                min_calls: cfg.min_calls,
                window: cfg.failure_window,
                open_for: cfg.open_for,
            },
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
            breaker_rules: s.breaker,
            host: Breaker::new(s.breaker, Instant::now()),
            endpoints: BoundedMap::new(MAX_ENDPOINTS),
            // No hold outlives its `until`, which max_back_off bounds.
            holds: BoundedMap::new(MAX_HOLDS),
            rules: s.back_off,
            in_flight: (s.max_concurrency > 0)
                .then(|| Arc::new(Semaphore::new(s.max_concurrency as usize))),
            budget: s
                .budget
                .map(|(shared, fallback)| Budget::new(shared, fallback)),
            queue_wait: s.queue_wait,
            announced: Mutex::new(None),
        }
    }
}

impl UpstreamGuard {
    /// `endpoint`'s breaker, made closed the first time; past
    /// [`MAX_ENDPOINTS`] the least used are dropped.
    fn endpoint_breaker(&self, endpoint: &Arc<str>, now: Instant) -> Arc<Breaker> {
        let rules = self.breaker_rules;
        let (breaker, _) = self.endpoints.get_or_insert_with(
            endpoint,
            now,
            || Arc::new(Breaker::new(rules, now)),
            // No breaker is dead: past the bound the least used go.
            |_, _| true,
        );
        breaker
    }

    /// Remember a hold until `until` (Unix ms); past the bound, expired
    /// holds go first.
    fn insert_hold(&self, key: StoreKey, until: u64) {
        let now = now_millis();
        self.holds
            .insert(key, until, Instant::now(), |&u, _| u > now);
    }
}

/// Leave to call the upstream: what the breakers said, and the
/// `max_concurrency` slot held until the call ends.
#[derive(Debug)]
pub(super) struct Admission {
    host: Admit,
    endpoint: (Arc<Breaker>, Admit),
    _slot: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// The call will not be made: a probe among these must not keep its
    /// breaker waiting.
    fn abandon(self, now: Instant, host: &Breaker) {
        host.abandon(self.host, now);
        self.endpoint.0.abandon(self.endpoint.1, now);
    }
}

/// What a GET or HEAD is, for the guard: the endpoint it goes to, and the
/// credential headers that name a client.
#[derive(Debug, Clone)]
pub(super) struct Scope {
    /// `route:` and the route's pattern, or `path:` and the first segment.
    endpoint: Arc<str>,
    credential_headers: Arc<[HeaderName]>,
}

impl Scope {
    /// The scope of a request for `target` under `rule` (the rule chosen
    /// for the canonical request; the global rule, `*`, where no route
    /// matches).
    pub(super) fn of(rule: &Rule, target: &Target) -> Scope {
        let endpoint = if rule.name != "*" {
            format!("route:{}", rule.name)
        } else {
            format!("path:{}", first_segment(&target.path_and_query))
        };
        Scope {
            endpoint: endpoint.into(),
            credential_headers: rule.credential_headers.clone(),
        }
    }

    /// A hash of the client credentials `headers` carry (`Authorization`,
    /// `Cookie`, `cache.credential_headers`), or `None` for a request made
    /// with cachegate's own identity alone.
    fn client(&self, headers: &HeaderMap) -> Option<String> {
        let names = [http::header::AUTHORIZATION, http::header::COOKIE];
        let mut parts: Vec<&[u8]> = Vec::new();
        for name in names.iter().chain(self.credential_headers.iter()) {
            for value in headers.get_all(name) {
                parts.push(name.as_str().as_bytes());
                parts.push(value.as_bytes());
            }
        }
        (!parts.is_empty()).then(|| StoreKey::hash("upstream-client", parts).digest().to_owned())
    }

    /// The keys of the holds that apply to a request of this scope, from
    /// the widest, with the scope each names.
    fn hold_keys(&self, client: Option<&str>) -> Vec<(HoldScope, StoreKey)> {
        let mut keys = vec![
            (HoldScope::Upstream, hold_key()),
            (
                HoldScope::Endpoint,
                StoreKey::hash("upstream-hold", ["endpoint", &*self.endpoint]),
            ),
        ];
        if let Some(c) = client {
            keys.push((
                HoldScope::Client,
                StoreKey::hash("upstream-hold", ["client", &*self.endpoint, c]),
            ));
        }
        keys
    }
}

/// The client's address as `serve.trusted_proxies` resolved it: the first
/// entry of the `X-Forwarded-For` cachegate sends (a route that keys on
/// `X-Forwarded-For` forwards the client's own, and its first entry is
/// what the client wrote).
fn forwarded_client(headers: &HeaderMap) -> Option<&str> {
    let first = headers.get("x-forwarded-for")?.to_str().ok()?;
    let ip = first.split(',').next()?.trim();
    (!ip.is_empty()).then_some(ip)
}

/// `/users` for `/users/7?x=1`; `/` for `/` (cut to [`MAX_SEGMENT`] bytes).
fn first_segment(path_and_query: &str) -> &str {
    let path = path_and_query.split(['?', '#']).next().unwrap_or("/");
    let end = path[1.min(path.len())..]
        .find('/')
        .map_or(path.len(), |i| i + 1);
    let mut end = end.min(MAX_SEGMENT);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    if end == 0 {
        "/"
    } else {
        &path[..end]
    }
}

/// Who is asking: a client waits (bounded) for the budget; a background
/// refresh never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    Client,
    Background,
}

/// The key of the hold on every request (the backend's prefix keeps
/// deployments apart): the same as before holds had scopes.
fn hold_key() -> StoreKey {
    StoreKey::hash("upstream-hold", ["upstream"])
}

/// The one shared request budget (permits live in their own namespace).
fn budget_key() -> StoreKey {
    StoreKey::hash("upstream-budget", ["upstream"])
}

/// The budget the upstream's announced quota sets, shared like the other.
fn announced_key() -> StoreKey {
    StoreKey::hash("upstream-budget", ["announced"])
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
        scope: Scope,
    ) -> Result<UpstreamResponse, UpstreamError> {
        if !matches!(method, Method::GET | Method::HEAD) {
            return self.upstream.send(method, url, headers, body).await;
        }
        let client = scope.client(&headers);
        let fair_client = client
            .as_ref()
            .map(|c| format!("credential:{c}"))
            .or_else(|| forwarded_client(&headers).map(|ip| format!("address:{ip}")));
        let admission = self
            .admit_upstream(caller, &scope, client.as_deref(), fair_client.as_deref())
            .await?;
        let sent = self.upstream.send(method, url, headers, body).await;
        self.report_upstream(admission, &scope, client.as_deref(), &sent)
            .await;
        sent
    }

    /// The widest hold in force on `scope` (and `client`), and until when.
    async fn hold_on(&self, scope: &Scope, client: Option<&str>) -> Option<(HoldScope, u64)> {
        let now = now_millis();
        let keys = scope.hold_keys(client);
        let mut found = Vec::with_capacity(keys.len());
        for (_, key) in &keys {
            found.push(
                self.guard
                    .holds
                    .get(key, Instant::now())
                    .filter(|&u| u > now),
            );
        }
        if found.iter().all(Option::is_none) && self.cache.is_shared() {
            // Another instance may have been told; an unreachable backend
            // is no reason to stop (the breakers still guard).
            // Two or three keys, read at once.
            let read = |i: usize| {
                let key = keys.get(i).map(|(_, k)| k);
                async move {
                    match key {
                        Some(k) => self.cache.get(k).await.into_record(),
                        None => None,
                    }
                }
            };
            let (a, b, c) = tokio::join!(read(0), read(1), read(2));
            let records = [a, b, c];
            for ((_, key), (slot, got)) in keys.iter().zip(found.iter_mut().zip(records)) {
                if let Some(Record::UpstreamHold(h)) = got {
                    if h.until > now {
                        self.guard.insert_hold(key.clone(), h.until);
                        *slot = Some(h.until);
                    }
                }
            }
        }
        keys.iter()
            .zip(found)
            .find_map(|((which, _), until)| until.map(|u| (*which, u)))
    }

    /// May a GET or HEAD go upstream now? `Err` is the answer to give
    /// instead (a stale entry, or 503 with `Retry-After`).
    async fn admit_upstream(
        &self,
        caller: Caller,
        scope: &Scope,
        client: Option<&str>,
        fair_client: Option<&str>,
    ) -> Result<Admission, UpstreamError> {
        let guard = &self.guard;
        if let Some((which, until)) = self.hold_on(scope, client).await {
            return Err(UpstreamError::Held {
                hold: Hold::RetryAfter(which),
                retry_in: Duration::from_millis(until.saturating_sub(now_millis())),
            });
        }
        let now = Instant::now();
        let refused = |which, retry_in| UpstreamError::Held {
            hold: Hold::BreakerOpen(which),
            retry_in,
        };
        let host = match guard.host.admit(now) {
            Admit::Refused { retry_in } => return Err(refused(BreakerScope::Host, retry_in)),
            admitted => admitted,
        };
        let breaker = guard.endpoint_breaker(&scope.endpoint, now);
        let endpoint = match breaker.admit(now) {
            Admit::Refused { retry_in } => {
                guard.host.abandon(host, now);
                return Err(refused(BreakerScope::Endpoint, retry_in));
            }
            admitted => admitted,
        };
        let admission = Admission {
            host,
            endpoint: (breaker, endpoint),
            _slot: None,
        };
        let taken = match self.take_budget(caller, fair_client).await {
            // A client's own credentials spend its own quota; cachegate's
            // spend the one the upstream announced to cachegate.
            Ok(slot) if client.is_none() => self.take_announced(caller).await.map(|()| slot),
            taken => taken,
        };
        match taken {
            Ok(slot) => Ok(Admission {
                _slot: slot,
                ..admission
            }),
            Err(held) => {
                admission.abandon(Instant::now(), &guard.host);
                Err(held)
            }
        }
    }

    /// A permit of the budget the upstream's announced quota sets (while
    /// it holds), within `queue_wait` for a client; shared through the
    /// backend, kept by this instance alone when the backend cannot be
    /// asked (then the next answer's announcement is the guide).
    async fn take_announced(&self, caller: Caller) -> Result<(), UpstreamError> {
        let now = now_millis();
        let rate = {
            let announced = self
                .guard
                .announced
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match *announced {
                Some((rate, until)) if until > now => rate,
                _ => return Ok(()),
            }
        };
        let may_wait = match caller {
            Caller::Client => self.guard.queue_wait,
            Caller::Background => Duration::ZERO,
        };
        match self
            .cache
            .take_permit(&announced_key(), rate, may_wait)
            .await
        {
            Ok(Permit::Granted { wait }) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(())
            }
            Ok(Permit::Denied { retry_in }) => Err(UpstreamError::Held {
                hold: Hold::Budget,
                retry_in,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "announced-quota budget unavailable; not holding back");
                Ok(())
            }
        }
    }

    /// What an answer to cachegate's own identity announces of the
    /// upstream's quota: remember the rate that spends what is left by
    /// the reset; `Some(wait)` when nothing is left (hold the upstream
    /// until the reset).
    fn learn_announced(&self, headers: &HeaderMap, now: u64) -> Option<Duration> {
        let quota = crate::policy::rate_limit::announced(headers, now)?;
        if quota.remaining == 0 {
            return (!quota.reset_in.is_zero())
                .then_some(quota.reset_in.min(self.guard.rules.max_wait));
        }
        let until = now + quota.reset_in.as_millis().max(1000) as u64;
        let rate = Rate::new(quota.rate_per_second(), 1);
        *self
            .guard
            .announced
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((rate, until));
        None
    }

    /// A `max_concurrency` slot, a permit of `client`'s share of the
    /// request budget and one of the budget, each within what is left of
    /// `queue_wait` (nothing for a background refresh, which takes no
    /// client's share); `Err` when one does not come in time.
    async fn take_budget(
        &self,
        caller: Caller,
        client: Option<&str>,
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
        if let (Caller::Client, Some(client)) = (caller, client) {
            let max_wait = may_wait.saturating_sub(started.elapsed());
            match budget.take_share(client, max_wait).await {
                Permit::Granted { wait } if !wait.is_zero() => tokio::time::sleep(wait).await,
                Permit::Granted { .. } => {}
                Permit::Denied { retry_in } => return Err(over_budget(retry_in)),
            }
        }
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

    /// Learn from what an admitted call got: feed the breakers of the
    /// scopes it tells about, and set (and share) a back-off the upstream
    /// asked for, on the scope it applies to.
    async fn report_upstream(
        &self,
        admission: Admission,
        scope: &Scope,
        client: Option<&str>,
        sent: &Result<UpstreamResponse, UpstreamError>,
    ) {
        let guard = &self.guard;
        let now = now_millis();
        let mut signal = match sent {
            Ok(r) => signal_of(r.status, &r.headers, now, guard.rules),
            Err(e) if e.is_failure() => Signal::Failure,
            Err(_) => Signal::Answered,
        };
        // The quota the upstream announces to cachegate's own identity
        // (a client's credentials have quotas of their own): spent, it is
        // a hold on the whole upstream until the reset, as a 429 would be.
        let mut quota_spent = false;
        if let (None, Ok(r)) = (client, sent) {
            if let Some(wait) = self.learn_announced(&r.headers, now) {
                if !matches!(signal, Signal::BackOff { .. }) {
                    signal = Signal::BackOff {
                        wait,
                        status: r.status.as_u16(),
                    };
                    quota_spent = true;
                }
            }
        }
        let at = Instant::now();
        let (breaker, endpoint_admit) = &admission.endpoint;
        if matches!(sent, Err(UpstreamError::Connect(_))) {
            // No connection: the host's trouble; nothing is known of the
            // endpoint.
            if guard.host.report(admission.host, true, at) {
                tracing::warn!(open_for = ?guard.breaker_rules.open_for, "upstream host breaker open: connections keep failing; not calling the upstream");
            }
            breaker.abandon(*endpoint_admit, at);
        } else {
            // The host answered (or the exchange broke after connecting).
            guard.host.report(admission.host, false, at);
            if breaker.report(*endpoint_admit, signal == Signal::Failure, at) {
                tracing::warn!(
                    endpoint = %scope.endpoint,
                    open_for = ?guard.breaker_rules.open_for,
                    "upstream endpoint breaker open: not calling it; answering stale where allowed"
                );
            }
        }
        // The concurrency slot is free again from here.
        drop(admission);
        let Signal::BackOff { wait, status } = signal else {
            return;
        };
        if wait.is_zero() {
            return;
        }
        let which = match (client, status) {
            (Some(_), _) => HoldScope::Client,
            (None, 429) => HoldScope::Upstream,
            (None, _) if quota_spent => HoldScope::Upstream,
            (None, _) => HoldScope::Endpoint,
        };
        let Some((_, key)) = scope
            .hold_keys(client)
            .into_iter()
            .find(|(w, _)| *w == which)
        else {
            return;
        };
        let until = now + wait.as_millis() as u64;
        let before = guard.holds.get(&key, Instant::now()).unwrap_or(0);
        if before >= until {
            return;
        }
        guard.insert_hold(key.clone(), until);
        tracing::warn!(
            status,
            ?wait,
            scope = ?which,
            endpoint = %scope.endpoint,
            "upstream asked to back off: not calling it for this scope until then"
        );
        if self.cache.is_shared() {
            // Never shorten a hold another instance shared: an answer that
            // left before its 429 came back with a shorter Retry-After
            // would let every other instance call again early. (Read, then
            // write: two instances writing at the same moment can still
            // leave the shorter one; each keeps its own either way.)
            if let Some(Record::UpstreamHold(shared)) = self.cache.get(&key).await.into_record() {
                if shared.until >= until {
                    guard.insert_hold(key, shared.until);
                    return;
                }
            }
            let hold = Record::UpstreamHold(UpstreamHold { until, status });
            if let Err(e) = self.cache.put(&key, &hold).await {
                tracing::debug!(error = %e, "could not share the upstream back-off; this instance keeps it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(endpoint: &str, credential_headers: &[&str]) -> Scope {
        Scope {
            endpoint: endpoint.into(),
            credential_headers: credential_headers
                .iter()
                .map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap())
                .collect(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn budget(rps: f64) -> Budget {
        Budget::new(Rate::new(rps, 1), Rate::new(rps, 1))
    }

    #[tokio::test]
    async fn a_flooding_client_takes_no_more_than_its_share() {
        let b = budget(10.0);
        // Alone, a client has the whole budget: 10/s.
        assert_eq!(
            b.take_share("address:a", Duration::ZERO).await,
            Permit::Granted {
                wait: Duration::ZERO
            }
        );
        assert_eq!(
            b.take_share("address:b", Duration::ZERO).await,
            Permit::Granted {
                wait: Duration::ZERO
            }
        );
        // Two clients: 5/s each. The flooding one reserves at most its
        // share within the second it may wait, then is refused.
        let mut granted = 0;
        for _ in 0..20 {
            if let Permit::Granted { .. } = b.take_share("address:a", Duration::from_secs(1)).await
            {
                granted += 1;
            }
        }
        assert!((4..=6).contains(&granted), "{granted} of 20 in one second");
        // The other still goes at once: the flood took none of its share.
        assert!(matches!(
            b.take_share("address:b", Duration::from_millis(250)).await,
            Permit::Granted { wait } if wait <= Duration::from_millis(200)
        ));
    }

    #[test]
    fn the_forwarded_client_is_the_first_address() {
        let h = headers(&[("x-forwarded-for", "203.0.113.7, 10.0.0.1")]);
        assert_eq!(forwarded_client(&h), Some("203.0.113.7"));
        assert_eq!(forwarded_client(&HeaderMap::new()), None);
    }

    /// Hostile paths cannot grow the endpoint map, and an endpoint in use
    /// keeps its breaker (with what it counted) while they come and go.
    #[test]
    fn endpoints_are_bounded_and_the_busy_one_keeps_its_breaker() {
        let guard = UpstreamGuard::new(GuardSettings {
            breaker: BreakerRules {
                failure_rate: 50,
                min_calls: 10,
                window: Duration::from_secs(30),
                open_for: Duration::from_secs(10),
            },
            back_off: BackOffRules {
                default_wait: Duration::from_secs(1),
                max_wait: Duration::from_secs(60),
            },
            budget: None,
            max_concurrency: 0,
            queue_wait: Duration::from_secs(1),
        });
        let now = Instant::now();
        let busy: Arc<str> = Arc::from("route:/busy");
        let first = guard.endpoint_breaker(&busy, now);
        for i in 0..3 * MAX_ENDPOINTS {
            let t = now + Duration::from_micros(i as u64 + 1);
            guard.endpoint_breaker(&Arc::from(format!("path:/x{i}")), t);
            assert!(guard.endpoints.retain_alive(|_, _| true) <= MAX_ENDPOINTS);
            guard.endpoint_breaker(&busy, t);
        }
        let again = guard.endpoint_breaker(&busy, now);
        assert!(
            Arc::ptr_eq(&first, &again),
            "the busy endpoint's breaker was dropped"
        );
    }

    #[test]
    fn an_endpoint_without_a_route_is_its_first_path_segment() {
        assert_eq!(first_segment("/users/7?x=1"), "/users");
        assert_eq!(first_segment("/users?x=/a"), "/users");
        assert_eq!(first_segment("/"), "/");
        assert_eq!(first_segment("/status"), "/status");
        assert_eq!(first_segment(""), "/");
        let long = format!("/{}/x", "é".repeat(200));
        let cut = first_segment(&long);
        assert!(cut.len() <= MAX_SEGMENT && cut.starts_with("/é"), "{cut}");
    }

    #[test]
    fn a_client_is_a_hash_of_its_credentials_never_the_secret() {
        let s = scope("path:/orders", &["x-api-key"]);
        assert_eq!(s.client(&headers(&[("accept", "*/*")])), None);
        let one = s.client(&headers(&[("x-api-key", "secret-one")])).unwrap();
        let two = s.client(&headers(&[("x-api-key", "secret-two")])).unwrap();
        assert_ne!(one, two);
        assert!(!one.contains("secret"));
        assert_eq!(
            s.client(&headers(&[("x-api-key", "secret-one")])),
            Some(one.clone())
        );
        // The same value in another credential header is another client.
        let bearer = s
            .client(&headers(&[("authorization", "secret-one")]))
            .unwrap();
        assert_ne!(bearer, one);
        assert!(s.client(&headers(&[("cookie", "sid=1")])).is_some());
        // A header outside the list is no credential.
        assert_eq!(
            scope("path:/orders", &[]).client(&headers(&[("x-api-key", "k")])),
            None
        );
    }

    #[test]
    fn hold_keys_go_from_everyone_to_the_client() {
        let orders = scope("path:/orders", &[]);
        let users = scope("path:/users", &[]);
        let scopes =
            |keys: Vec<(HoldScope, StoreKey)>| keys.into_iter().map(|(w, _)| w).collect::<Vec<_>>();
        assert_eq!(
            scopes(orders.hold_keys(None)),
            [HoldScope::Upstream, HoldScope::Endpoint]
        );
        let with_client = orders.hold_keys(Some("c1"));
        assert_eq!(
            scopes(with_client.clone()),
            [HoldScope::Upstream, HoldScope::Endpoint, HoldScope::Client]
        );
        // Everyone's key is shared by every endpoint; the others are not.
        assert_eq!(with_client[0].1, users.hold_keys(None)[0].1);
        assert_eq!(with_client[0].1, hold_key());
        assert_ne!(with_client[1].1, users.hold_keys(None)[1].1);
        assert_ne!(with_client[2].1, orders.hold_keys(Some("c2"))[2].1);
    }
}
