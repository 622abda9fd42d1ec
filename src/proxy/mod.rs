//! The request flow, top to bottom. Lambda and `serve` are thin adapters
//! that turn their requests into `http::Request<Bytes>` and call
//! [`Proxy::handle`].
//!
//! Beside it: [`coalesce`] (one upstream call per key, in the process and
//! across instances), [`fetch`] (the upstream call and storing its answer),
//! [`respond`] (building the client's response), [`purge`] (invalidation)
//! and [`outcome`] (the one typed value a request ends in). The HTTP rules
//! themselves are pure code in [`crate::policy`].

mod coalesce;
mod fetch;
mod guard;
pub mod outcome;
mod purge;
mod range;
mod respond;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use reqwest::Url;
use tokio::sync::watch;

use cachegate_store::tiered::TieredCache;
use cachegate_store::{now_millis, Entry, Record, StoreError, StoreKey};

use crate::background::Background;
use crate::config::Mode;
use crate::key::{self, Target};
use crate::policy::{self, Bypass};
use crate::request::{CanonicalRequest, Forwarding};
use crate::routes::{RouteTable, Rule};
use crate::telemetry::{RequestId, RequestRecord, Telemetry};
use crate::upstream::{Upstream, UpstreamError, UpstreamResponse};

use coalesce::{OnContention, Shared};
use fetch::MissCtx;
pub use guard::GuardSettings;
use guard::UpstreamGuard;
use outcome::{Forward, Kind, Outcome, Refresh};
pub use respond::json_error;

/// Process-wide settings of the request flow.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the handler runs: under Lambda an answer must also fit a
    /// Lambda response payload ([`crate::lambda::fits`]).
    pub mode: Mode,
    /// How stale-while-revalidate refreshes and refresh-ahead run after the
    /// response ([`crate::background`]).
    pub background: Background,
    /// How long a miss waits for the same key's fetch (`cache.coalesce_wait`).
    pub coalesce_wait: Duration,
    /// How long a cross-instance fetch lock lives if its holder dies.
    pub lock_ttl: Duration,
    /// Lower-case response header names carrying surrogate keys.
    pub surrogate_key_headers: Vec<String>,
    pub expose_surrogate_keys: bool,
    /// Lower-case request headers the cache in front keys on
    /// (`edge.key_headers`); `None` when not configured.
    pub edge_key_headers: Option<Vec<String>>,
    /// Which proxies may vouch for a client's address (`serve.trusted_proxies`).
    pub forwarding: Forwarding,
    /// Safe methods whose success invalidates the URL anyway
    /// (`cache.invalidating_methods`); every other method does.
    pub invalidating_methods: Vec<Method>,
    /// Most tags one entry keeps (`cache.max_tags_per_entry`).
    pub max_tags_per_entry: usize,
    /// The last part of freshness in which a hit refreshes (`cache.refresh_ahead`).
    pub refresh_ahead: f64,
    /// Random shortening of stored freshness (`cache.ttl_jitter`).
    pub ttl_jitter: f64,
    /// The upstream breaker and back-off (`upstream.*`).
    pub guard: GuardSettings,
}

/// The proxy: one per process, shared by every request.
pub struct Proxy {
    base: Url,
    routes: RouteTable,
    cache: TieredCache,
    upstream: Upstream,
    /// The upstream breaker and the back-off it asked for.
    guard: UpstreamGuard,
    settings: Settings,
    telemetry: Telemetry,
    /// Fetches in flight in this process, by primary key.
    inflight: Mutex<HashMap<StoreKey, watch::Receiver<Option<Shared>>>>,
    /// Entries a refresh-ahead was started for (key, the entry's
    /// `fresh_until`): each is tried once, even if its refresh stored nothing.
    refreshed_ahead: Mutex<HashMap<StoreKey, u64>>,
    /// CloudFront in front, when configured ([`crate::edge`]).
    edge: Option<Arc<crate::edge::Edge>>,
}

/// Most entries whose refresh-ahead this process remembers having started.
const REFRESH_AHEAD_MEMORY: usize = 10_000;

/// A response for the client and the outcome it is rendered with.
type Reply = (Response<Bytes>, Outcome);

/// What a fetch produced for the client.
enum Fetched {
    /// Stored (or refreshed) entry to serve from.
    Entry(Arc<Entry>, Outcome),
    /// An entry this request's fetch stored, and the headers only this
    /// request's client gets (the `Set-Cookie` left out of the stored copy).
    Own(Arc<Entry>, Outcome, HeaderMap),
    /// An upstream response relayed as is (not storable).
    Relay(UpstreamResponse, Outcome),
}

impl Proxy {
    pub fn new(
        base: Url,
        routes: RouteTable,
        cache: TieredCache,
        upstream: Upstream,
        settings: Settings,
        telemetry: Telemetry,
    ) -> Self {
        Proxy {
            base,
            routes,
            cache,
            upstream,
            guard: UpstreamGuard::new(settings.guard),
            settings,
            telemetry,
            inflight: Mutex::default(),
            refreshed_ahead: Mutex::default(),
            edge: None,
        }
    }

    /// The edge (CloudFront) this proxy tags responses for and invalidates.
    pub fn with_edge(mut self, edge: Option<Arc<crate::edge::Edge>>) -> Self {
        self.edge = edge;
        self
    }

    pub fn edge(&self) -> Option<&crate::edge::Edge> {
        self.edge.as_deref()
    }

    pub fn cache(&self) -> &TieredCache {
        &self.cache
    }

    /// Answer one client request. Never fails: every problem becomes a
    /// response (a JSON error for the client's or the upstream's faults;
    /// cache problems are misses). The request's outcome is rendered here,
    /// once, into the response headers, the access log and the metrics.
    pub async fn handle(self: &Arc<Self>, req: Request<Bytes>) -> Response<Bytes> {
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let path = self
            .telemetry
            .logs_access()
            .then(|| req.uri().path().to_owned());
        let request_id = req.extensions().get::<RequestId>().cloned();
        let mut trace = Trace::default();
        let (mut resp, mut outcome) = self.handle_request(req, &mut trace).await;
        if let Some(origin) = &trace.client_origin {
            policy::headers::rewrite_upstream_locations(resp.headers_mut(), &self.base, origin);
        }
        let lookup = trace.lookup_time.map(|d| (d, self.cache.backend_name()));
        outcome.render(resp.headers_mut(), lookup);
        if self.settings.mode == Mode::Lambda && !crate::lambda::fits(resp.headers(), resp.body()) {
            // What Lambda cannot carry is this request's 502, in the
            // headers, the log and the metrics alike.
            (resp, outcome) = respond::too_large_for_lambda(&resp, outcome);
            outcome.render(resp.headers_mut(), lookup);
        }
        self.telemetry.record(&RequestRecord {
            request_id: request_id.as_ref().map(|r| r.0.as_str()),
            method: &method,
            path: path.as_deref(),
            route: trace.route.as_ref().map_or("*", |r| r.name.as_str()),
            key: trace.key.as_ref().map(StoreKey::digest),
            status: resp.status(),
            cache_status: outcome.label(),
            cache_time: trace.lookup_time,
            upstream_time: outcome.upstream_time,
            total_time: started.elapsed(),
            backend_error: trace.backend_error,
        });
        resp
    }

    /// The Prometheus text exposition of this process's request metrics,
    /// when `metrics.prometheus_listen` is configured.
    pub fn prometheus_text(&self) -> Option<String> {
        self.telemetry.prometheus_text()
    }

    async fn handle_request(self: &Arc<Self>, req: Request<Bytes>, trace: &mut Trace) -> Reply {
        let (parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            let resp = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "CONNECT is not supported: this is not a forward proxy",
            );
            return (resp, Outcome::new(Kind::Rejected));
        }
        // 0. One canonical request, before anything reads it: the route, the
        // key and the upstream call all come from it.
        let (canon, rule) =
            match CanonicalRequest::new(parts, body, &self.settings.forwarding, &self.routes) {
                Ok(c) => c,
                Err(rejected) => {
                    let resp =
                        json_error(StatusCode::BAD_REQUEST, rejected.code, &rejected.message);
                    return (resp, Outcome::new(Kind::Rejected));
                }
            };
        trace.route = Some(rule.clone());
        trace.client_origin = canon.client_origin.clone();
        let CanonicalRequest {
            method,
            path,
            query,
            headers,
            body,
            upgrade,
            client_origin: _,
        } = canon;
        let target = Target::from_canonical(
            &self.base,
            &path,
            query.as_deref(),
            &rule.ignored_query_params,
        );

        // 1. May this request use the cache at all?
        let policy = match policy::request_policy(&method, &headers, !body.is_empty(), &rule)
            .and_then(|p| if upgrade { Err(Bypass::Upgrade) } else { Ok(p) })
        {
            Ok(p) => p,
            Err(bypass) => {
                return self
                    .pass_through(method, headers, body, &target, &rule, bypass)
                    .await
            }
        };
        // A GET's Range is answered from a fresh stored 200 (below); any
        // other goes to the upstream, whose partial answers are not stored.
        let wants_range = headers.contains_key(http::header::RANGE);
        if wants_range && method != Method::GET {
            return self
                .pass_through(method, headers, body, &target, &rule, Bypass::Range)
                .await;
        }

        let mut headers = headers;
        let primary = if rule.key_cookies.is_empty() {
            target.primary_key(&rule.name, &rule.key_headers, &headers)
        } else {
            // Only the keyed cookies go upstream, so what is stored cannot
            // depend on the others; the key reads them.
            policy::request::keep_key_cookies(&mut headers, &rule.key_cookies);
            let mut names = rule.key_headers.clone();
            names.push("cookie".into());
            target.primary_key(&rule.name, &names, &headers)
        };

        // 2. Look up: the primary key, then the variant its Vary names.
        trace.key = Some(primary.clone());
        let (stored, cache_trouble) = if policy.lookup {
            let started = std::time::Instant::now();
            let found = self.lookup(&primary, &headers).await;
            trace.lookup_time = Some(started.elapsed());
            trace.backend_error = found.1.is_some();
            found
        } else {
            (None, None)
        };
        let now = now_millis();
        let head = method == Method::HEAD;
        let miss = MissCtx {
            fwd: match (&stored, &cache_trouble) {
                (Some(_), _) => Forward::Stale,
                (None, Some(_)) => Forward::Miss,
                (None, None) => Forward::UriMiss,
            },
            cache_down: cache_trouble.is_some(),
            arrived_at: now,
            caller: guard::Caller::Client,
            primary,
            target,
            method,
            headers,
            rule,
            policy,
        };
        let mut on_contention = OnContention::Wait;
        if miss.policy.shareable_only
            && stored
                .as_ref()
                .is_some_and(|e| !policy::explicitly_shareable(&respond::header_map_of(e)))
        {
            // Stored for requests without cookies; this one may be personal.
            return self.cookie_pass_through(miss).await;
        }
        if wants_range {
            return match stored.as_ref().filter(|e| e.is_fresh(now)) {
                Some(entry) => {
                    let outcome = Outcome::new(Kind::Hit {
                        ttl: entry.fresh_secs_left(now),
                    });
                    let reply =
                        self.respond_from_entry(entry, &miss.rule, &miss.headers, head, outcome);
                    range::cut(reply, entry, &miss.headers)
                }
                None => {
                    let MissCtx {
                        method,
                        headers,
                        target,
                        rule,
                        ..
                    } = miss;
                    self.pass_through(method, headers, Bytes::new(), &target, &rule, Bypass::Range)
                        .await
                }
            };
        }
        if let Some(entry) = &stored {
            // 3. Fresh hit.
            if entry.is_fresh(now) {
                let ttl = entry.fresh_secs_left(now);
                if self.settings.background.available()
                    && policy::response::refresh_ahead_due(
                        entry.stored_at,
                        entry.fresh_until,
                        now,
                        self.settings.refresh_ahead,
                    )
                {
                    self.refresh_ahead(&miss, entry);
                }
                let outcome = Outcome::new(Kind::Hit { ttl });
                return self.respond_from_entry(entry, &miss.rule, &miss.headers, head, outcome);
            }
            // 4. Stale, within stale-while-revalidate: answer stale and let one
            // request refresh after the response (serve, and Lambda with the
            // after-response extension); where nothing may run after it, the
            // request that wins the refresh here (and, with a shared store,
            // the lock) refreshes inline.
            if now < entry.stale_while_revalidate_until {
                let refresh = if self.is_fetching(&miss.primary) {
                    Some(Refresh::InProgress)
                } else if self.settings.background.available() {
                    let (this, stale) = (self.clone(), entry.clone());
                    let miss = MissCtx {
                        caller: guard::Caller::Background,
                        ..miss.clone()
                    };
                    let spawned = self.settings.background.spawn(async move {
                        if let Err(e) = this
                            .fetch_coalesced(&miss, Some(stale), OnContention::Wait)
                            .await
                        {
                            tracing::warn!(error = %e, path = %miss.target.path_and_query, "background refresh failed");
                        }
                    });
                    spawned.then_some(Refresh::Background)
                } else {
                    None
                };
                if let Some(refresh) = refresh {
                    let outcome = coalesce::stale_while_revalidate(entry, now, refresh);
                    return self.respond_from_entry(
                        entry,
                        &miss.rule,
                        &miss.headers,
                        head,
                        outcome,
                    );
                }
                on_contention = OnContention::ServeStale;
            }
        }

        // 5. Miss, expired, or the Lambda-mode refresh winner: go upstream
        // (once per key), revalidating what we have.
        match self.fetch_coalesced(&miss, stored, on_contention).await {
            Ok(Fetched::Entry(entry, _))
                if miss.policy.shareable_only
                    && !policy::explicitly_shareable(&respond::header_map_of(&entry)) =>
            {
                // Another request's fetch, stored under its rules.
                self.cookie_pass_through(miss).await
            }
            Ok(Fetched::Entry(entry, outcome)) => {
                self.respond_from_entry(&entry, &miss.rule, &miss.headers, head, outcome)
            }
            Ok(Fetched::Own(entry, outcome, own)) => {
                let (mut resp, outcome) =
                    self.respond_from_entry(&entry, &miss.rule, &miss.headers, head, outcome);
                for (name, value) in &own {
                    resp.headers_mut().append(name, value.clone());
                }
                (resp, outcome)
            }
            Ok(Fetched::Relay(resp, outcome)) => respond::relay(
                resp,
                outcome,
                head,
                Some((&miss.rule, self.settings.edge_key_headers.as_deref())),
            ),
            Err(e) => {
                if !matches!(e, UpstreamError::Held { .. }) {
                    tracing::warn!(error = %e, path = %miss.target.path_and_query, "upstream failed");
                }
                upstream_error_reply(&e, Some(miss.fwd))
            }
        }
    }

    /// The stored entry for a request: the primary key's, or the variant
    /// its Vary index names. A cache failure is reported, never raised.
    async fn lookup(
        &self,
        primary: &StoreKey,
        headers: &HeaderMap,
    ) -> (Option<Entry>, Option<String>) {
        let found = self.cache.get(primary).await;
        let mut trouble = found.error;
        let entry = match found.record {
            Some(Record::Entry(e)) => Some(e),
            Some(Record::VaryIndex(v)) => {
                let found = self
                    .cache
                    .get(&key::variant_key(primary, &v.headers, headers))
                    .await;
                trouble = trouble.or(found.error);
                match found.record {
                    Some(Record::Entry(e)) => Some(e),
                    _ => None,
                }
            }
            Some(Record::PurgeMark(_) | Record::UpstreamHold(_)) | None => None,
        };
        // A stored coding this client cannot decode is a miss for it
        // (RFC 9110 §12.5.3), whatever the key and Vary said.
        let entry = entry.filter(|e| {
            policy::content_coding::accepts_stored_coding(headers, e.header("content-encoding"))
        });
        match &trouble {
            // The breaker logged when it opened; once per request is noise.
            Some(e @ StoreError::CircuitOpen { .. }) => {
                tracing::debug!(error = %e, "cache skipped; treating as a miss")
            }
            Some(e) => {
                tracing::warn!(backend = self.cache.backend_name(), error = %e, "cache lookup failed; treating as a miss")
            }
            None => {}
        }
        let trouble = trouble.map(|e| e.to_string());
        (entry, trouble)
    }

    /// A cookie-carrying request that may not use what is stored: passed
    /// through like any bypass.
    async fn cookie_pass_through(self: &Arc<Self>, miss: MissCtx) -> Reply {
        self.pass_through(
            miss.method,
            miss.headers,
            Bytes::new(),
            &miss.target,
            &miss.rule,
            Bypass::Cookie,
        )
        .await
    }

    /// Refresh a hot entry before it expires, in the background, once per
    /// entry: skipped when this process is already fetching the key, and,
    /// with a shared backend, when another instance holds its fetch lock.
    fn refresh_ahead(self: &Arc<Self>, miss: &MissCtx, entry: &Entry) {
        if self.is_fetching(&miss.primary) {
            return;
        }
        {
            let mut tried = self
                .refreshed_ahead
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if tried.get(&miss.primary) == Some(&entry.fresh_until) {
                return;
            }
            if tried.len() >= REFRESH_AHEAD_MEMORY {
                // Bounded: forget the entries that have expired, or all.
                let now = now_millis();
                tried.retain(|_, fresh_until| *fresh_until > now);
                if tried.len() >= REFRESH_AHEAD_MEMORY {
                    tried.clear();
                }
            }
            tried.insert(miss.primary.clone(), entry.fresh_until);
        }
        let (this, current) = (self.clone(), entry.clone());
        let miss = MissCtx {
            caller: guard::Caller::Background,
            ..miss.clone()
        };
        self.settings.background.spawn(async move {
            if let Err(e) = this
                .fetch_coalesced(&miss, Some(current), OnContention::ServeStale)
                .await
            {
                tracing::debug!(error = %e, path = %miss.target.path_and_query, "refresh-ahead failed");
            }
        });
    }

    fn is_fetching(&self, primary: &StoreKey) -> bool {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(primary)
    }

    /// Requests that do not use the cache: forwarded as they are. A
    /// successful unsafe method invalidates what is cached for its URL
    /// (RFC 9111 §4.4).
    async fn pass_through(
        self: &Arc<Self>,
        method: Method,
        mut headers: HeaderMap,
        body: Bytes,
        target: &Target,
        rule: &Rule,
        why: Bypass,
    ) -> Reply {
        policy::headers::prepare_request_headers(&mut headers);
        // RFC 9111 §4.4: unsafe methods, and those whose safety is
        // unknown, invalidate the target URI on success (see the policy
        // function for why an unknown method may).
        let unsafe_method = policy::request::invalidates_on_success(&method)
            || self.settings.invalidating_methods.contains(&method);
        let head = method == Method::HEAD;
        let sent_at = std::time::Instant::now();
        let sent = self
            .send_upstream(
                method,
                target.url.clone(),
                headers,
                body,
                guard::Caller::Client,
            )
            .await;
        match sent {
            Ok(mut resp) => {
                let upstream_time = sent_at.elapsed();
                policy::headers::hide_surrogate_keys(
                    &mut resp.headers,
                    &self.settings.surrogate_key_headers,
                    self.settings.expose_surrogate_keys,
                );
                if unsafe_method && (resp.status.is_success() || resp.status.is_redirection()) {
                    self.invalidate_after_write(target, rule, &resp.headers, why)
                        .await;
                }
                let outcome = Outcome::timed(
                    upstream_time,
                    Kind::Bypass {
                        status: resp.status.as_u16(),
                        why,
                    },
                );
                respond::relay(resp, outcome, head, None)
            }
            Err(e) => upstream_error_reply(&e, None),
        }
    }
}

/// The JSON error for a request the upstream did not answer (`fwd` is
/// `None` for a bypassed request). Held back, it is a 503 with
/// `Retry-After` (RFC 9110 §10.2.3).
fn upstream_error_reply(e: &UpstreamError, fwd: Option<Forward>) -> Reply {
    let mut resp = json_error(e.status(), e.code(), &e.to_string());
    let kind = match e {
        UpstreamError::Held { hold, retry_in } => {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(crate::upstream::retry_after_secs(*retry_in)),
            );
            Kind::Held {
                hold: *hold,
                bypass: fwd.is_none(),
            }
        }
        _ => Kind::UpstreamFailed {
            fwd,
            code: e.code(),
        },
    };
    (resp, Outcome::new(kind))
}

/// What [`Proxy::handle`] learns while the request flows, for its
/// timing header and telemetry.
#[derive(Default)]
struct Trace {
    route: Option<Arc<Rule>>,
    key: Option<StoreKey>,
    lookup_time: Option<Duration>,
    backend_error: bool,
    client_origin: Option<String>,
}
