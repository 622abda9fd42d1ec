//! The request flow, top to bottom. Lambda and `serve` are thin adapters
//! that turn their requests into `http::Request<Bytes>` and call
//! [`Proxy::handle`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use reqwest::Url;
use tokio::sync::watch;

use cachegate_store::tiered::TieredCache;
use cachegate_store::{
    now_millis, Entry, PurgeMark, Record, StoreError, StoreKey, UnixMillis, VaryIndex,
};

use crate::key::{self, Target};
use crate::policy::{self, Bypass, NotStorable, RequestPolicy, ResponseFacts};
use crate::routes::{RouteTable, Rule};
use crate::telemetry::{RequestId, RequestRecord, Telemetry};
use crate::upstream::{strip_hop_by_hop, Upstream, UpstreamError, UpstreamResponse};

/// Where the handler runs; it decides how a stale-while-revalidate refresh
/// happens (nothing may run after a Lambda response is returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Lambda,
}

/// What a coalesced fetch shares with the requests that waited for it:
/// the stored entry and the key it went under, or `None` when the response
/// was not storable (then every waiter fetches for itself: an unstorable
/// response may be private to the request that caused it).
type Shared = Option<(Arc<Entry>, Option<Vec<String>>, StoreKey)>;

/// Process-wide settings of the request flow.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// How long a miss waits for the same key's fetch (`cache.coalesce_wait`).
    pub coalesce_wait: Duration,
    /// How long a cross-instance fetch lock lives if its holder dies.
    pub lock_ttl: Duration,
    /// Lower-case response header names carrying surrogate keys.
    pub surrogate_key_headers: Vec<String>,
    pub expose_surrogate_keys: bool,
}

/// The proxy: one per process, shared by every request.
pub struct Proxy {
    base: Url,
    routes: RouteTable,
    cache: TieredCache,
    upstream: Upstream,
    settings: Settings,
    telemetry: Telemetry,
    /// Fetches in flight in this process, by primary key.
    inflight: Mutex<HashMap<StoreKey, watch::Receiver<Option<Shared>>>>,
}

/// The cache outcome of one request, rendered as `X-Cache` and `Cache-Status`.
#[derive(Debug, Clone)]
struct Outcome {
    x_cache: &'static str,
    /// RFC 9211 parameters after the cache name.
    status: String,
    /// Time spent waiting for the upstream, for `Server-Timing`.
    upstream: Option<Duration>,
}

impl Outcome {
    fn new(x_cache: &'static str, status: impl Into<String>) -> Self {
        Outcome {
            x_cache,
            status: status.into(),
            upstream: None,
        }
    }
    fn timed(upstream: Duration, x_cache: &'static str, status: impl Into<String>) -> Self {
        Outcome {
            upstream: Some(upstream),
            ..Outcome::new(x_cache, status)
        }
    }
}

/// What a fetch produced for the client.
enum Fetched {
    /// Stored (or refreshed) entry to serve from.
    Entry(Arc<Entry>, Outcome),
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
            settings,
            telemetry,
            inflight: Mutex::default(),
        }
    }

    pub fn cache(&self) -> &TieredCache {
        &self.cache
    }

    /// Answer one client request. Never fails: every problem becomes a
    /// response (a JSON error for the client's or the upstream's faults;
    /// cache problems are misses).
    pub async fn handle(self: &Arc<Self>, req: Request<Bytes>) -> Response<Bytes> {
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let path = self
            .telemetry
            .logs_access()
            .then(|| req.uri().path().to_owned());
        let request_id = req.extensions().get::<RequestId>().cloned();
        let mut trace = Trace::default();
        let mut resp = self.handle_request(req, &mut trace).await;
        let upstream_time = resp.extensions().get::<UpstreamTime>().map(|t| t.0);
        if let Some(d) = trace.lookup_time {
            // One header value: Lambda's response formats keep one value per name.
            let mut timing = format!(
                "cache;dur={:.3};desc=\"{}\"",
                ms(d),
                self.cache.backend_name()
            );
            if let Some(upstream) = upstream_time {
                timing = format!("{timing}, upstream;dur={:.3}", ms(upstream));
            }
            resp.headers_mut().insert(
                SERVER_TIMING,
                HeaderValue::from_str(&timing).expect("ASCII"),
            );
        }
        self.telemetry.record(&RequestRecord {
            request_id: request_id.as_ref().map(|r| r.0.as_str()),
            method: &method,
            path: path.as_deref(),
            route: trace.route.as_ref().map_or("*", |r| r.name.as_str()),
            key: trace.key.as_ref().map(StoreKey::digest),
            status: resp.status(),
            cache_status: resp
                .headers()
                .get(X_CACHE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("ERROR"),
            cache_time: trace.lookup_time,
            upstream_time,
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

    async fn handle_request(
        self: &Arc<Self>,
        req: Request<Bytes>,
        trace: &mut Trace,
    ) -> Response<Bytes> {
        let (parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "CONNECT is not supported: this is not a forward proxy",
            );
        }
        let rule = self.routes.rule_for(parts.uri.path());
        trace.route = Some(rule.clone());
        let target = Target::resolve(
            &self.base,
            parts.uri.path(),
            parts.uri.query(),
            &rule.ignored_query_params,
        );

        // 1. May this request use the cache at all?
        let policy =
            match policy::request_policy(&parts.method, &parts.headers, !body.is_empty(), &rule) {
                Ok(p) => p,
                Err(bypass) => {
                    return self
                        .pass_through(parts.method, parts.headers, body, &target, bypass)
                        .await
                }
            };
        if parts.headers.contains_key(header::RANGE) {
            // Partial responses are not cached; let the upstream handle ranges.
            return self
                .pass_through(parts.method, parts.headers, body, &target, Bypass::Method)
                .await;
        }

        // 2. Look up: the primary key, then the variant its Vary names.
        let primary = target.primary_key(&rule.key_headers, &parts.headers);
        trace.key = Some(primary.clone());
        let (stored, cache_trouble) = if policy.lookup {
            let started = std::time::Instant::now();
            let found = self.lookup(&primary, &parts.headers).await;
            trace.lookup_time = Some(started.elapsed());
            trace.backend_error = found.1.is_some();
            found
        } else {
            (None, None)
        };
        let now = now_millis();
        let head = parts.method == Method::HEAD;
        let miss = MissCtx {
            fwd: match (&stored, &cache_trouble) {
                (Some(_), _) => "stale",
                (None, Some(_)) => "miss",
                (None, None) => "uri-miss",
            },
            cache_down: cache_trouble.is_some(),
            arrived_at: now,
            primary,
            target,
            method: parts.method,
            headers: parts.headers,
            rule,
            policy,
        };
        let mut on_contention = OnContention::Wait;
        if let Some(entry) = &stored {
            // 3. Fresh hit.
            if entry.is_fresh(now) {
                let ttl = entry.fresh_secs_left(now);
                let outcome = Outcome::new("HIT", format!("hit; ttl={ttl}"));
                return self.respond_from_entry(entry, &miss.rule, &miss.headers, head, outcome);
            }
            // 4. Stale, within stale-while-revalidate: answer stale and let one
            // request refresh: in the background in serve mode; inline in
            // Lambda (nothing may run after the response), by the request
            // that wins the refresh here and, with a shared store, the lock.
            if now < entry.stale_while_revalidate_until {
                let running = self.is_fetching(&miss.primary);
                let detail = match (running, self.settings.mode) {
                    (true, _) => Some("refresh in progress"),
                    (false, Mode::Serve) => {
                        let (this, miss, stale) = (self.clone(), miss.clone(), entry.clone());
                        tokio::spawn(async move {
                            if let Err(e) = this
                                .fetch_coalesced(&miss, Some(stale), OnContention::Wait)
                                .await
                            {
                                tracing::warn!(error = %e, path = %miss.target.path_and_query, "background refresh failed");
                            }
                        });
                        Some("background refresh")
                    }
                    (false, Mode::Lambda) => None,
                };
                if let Some(detail) = detail {
                    let outcome = stale_while_revalidate_outcome(entry, now, detail);
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
            Ok(Fetched::Entry(entry, outcome)) => {
                self.respond_from_entry(&entry, &miss.rule, &miss.headers, head, outcome)
            }
            Ok(Fetched::Relay(resp, outcome)) => relay(resp, outcome, head),
            Err(e) => {
                tracing::warn!(error = %e, path = %miss.target.path_and_query, "upstream failed");
                json_error(e.status(), e.code(), &e.to_string())
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
            Some(Record::PurgeMark(_)) | None => None,
        };
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
        why: Bypass,
    ) -> Response<Bytes> {
        prepare_request_headers(&mut headers);
        let unsafe_method = !matches!(
            method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        let head = method == Method::HEAD;
        let sent_at = std::time::Instant::now();
        match self
            .upstream
            .send(method, target.url.clone(), headers, body)
            .await
        {
            Ok(mut resp) => {
                let upstream_time = sent_at.elapsed();
                hide_surrogate_keys(&mut resp.headers, &self.settings);
                if unsafe_method && (resp.status.is_success() || resp.status.is_redirection()) {
                    let mut tags = vec![target.url_tag()];
                    tags.extend(
                        self.same_origin_locations(&target.url, &resp.headers)
                            .iter()
                            .filter_map(|path| self.url_tag(path).ok()),
                    );
                    tags.dedup();
                    for tag in tags {
                        if let Err(e) = self.purge_tag(&tag, false).await {
                            tracing::warn!(error = %e, "invalidation after {} failed", why.as_str());
                        }
                    }
                }
                let outcome = Outcome::timed(
                    upstream_time,
                    "BYPASS",
                    format!(
                        "fwd=bypass; fwd-status={}; detail={}",
                        resp.status.as_u16(),
                        why.as_str()
                    ),
                );
                relay(resp, outcome, head)
            }
            Err(e) => json_error(e.status(), e.code(), &e.to_string()),
        }
    }

    /// One upstream call per primary key at a time in this process: the
    /// first caller fetches, later ones wait (bounded) and take its entry
    /// if it was stored and matches their `Vary` variant.
    async fn fetch_coalesced(
        &self,
        miss: &MissCtx,
        stale: Option<Entry>,
        on_contention: OnContention,
    ) -> Result<Fetched, UpstreamError> {
        let fallback_stale = stale.clone();
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
                    Ok(Fetched::Entry(entry, _)) => {
                        let vary = key::vary_names(&header_map_of(entry));
                        Some((
                            entry.clone(),
                            vary.clone(),
                            stored_under(&miss.primary, vary.as_deref(), &miss.headers),
                        ))
                    }
                    _ => None,
                };
                leader.finish(share);
                return result;
            }
            Err(rx) => rx,
        };
        if let (OnContention::ServeStale, Some(s)) = (on_contention, &fallback_stale) {
            let outcome = stale_while_revalidate_outcome(s, now_millis(), "refresh in progress");
            return Ok(Fetched::Entry(Arc::new(s.clone()), outcome));
        }
        let shared = tokio::time::timeout(self.settings.coalesce_wait, async {
            rx.wait_for(|v| v.is_some()).await.map(|v| v.clone())
        })
        .await;
        let timed_out = shared.is_err();
        if let Ok(Ok(Some(Some((entry, vary, leader_key))))) = shared {
            if stored_under(&miss.primary, vary.as_deref(), &miss.headers) == leader_key {
                return Ok(Fetched::Entry(
                    entry,
                    Outcome::new("MISS", format!("fwd={}; collapsed", miss.fwd)),
                ));
            }
        }
        // Not shareable, another variant, or the leader took too long.
        if timed_out {
            tracing::debug!("coalesce_wait ran out waiting for this process's fetch; fetching too");
        }
        self.fetch(miss, fallback_stale).await
    }

    /// With a shared store, one instance at a time fetches a key: the
    /// backend lock decides. The others wait (bounded) for its entry; if the
    /// holder goes away without storing one, or the wait runs out, they
    /// fetch themselves rather than fail. A lock the store cannot give (it
    /// is down) is no reason to wait.
    async fn fetch_once_across_instances(
        &self,
        miss: &MissCtx,
        stale: Option<Entry>,
        on_contention: OnContention,
    ) -> Result<Fetched, UpstreamError> {
        // Our lookup missed, but the previous fetcher may have stored its
        // entry and let go (of this process's flight, then of the lock)
        // after that lookup and before we took over: look once more, or a
        // late request of a stampede calls the upstream a second time.
        let stored_meanwhile = |entry: Entry| {
            Ok(Fetched::Entry(
                Arc::new(entry),
                Outcome::new(
                    "MISS",
                    format!("fwd={}; collapsed; detail=stored-meanwhile", miss.fwd),
                ),
            ))
        };
        if !self.cache.is_shared() {
            if let Some(entry) = self.newer_entry(miss, stale.as_ref()).await {
                return stored_meanwhile(entry);
            }
            return self.fetch(miss, stale).await;
        }
        let lock = StoreKey::hash("lock", [miss.primary.as_str()]);
        match self.cache.try_lock(&lock, self.settings.lock_ttl).await {
            Ok(Some(token)) => {
                let locked_at = tokio::time::Instant::now();
                if let Some(entry) = self.newer_entry(miss, stale.as_ref()).await {
                    let _ = self.cache.unlock(&lock, &token).await;
                    return stored_meanwhile(entry);
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
                        stale_while_revalidate_outcome(s, now_millis(), "refresh in progress");
                    return Ok(Fetched::Entry(Arc::new(stale.expect("matched")), outcome));
                }
                match self
                    .wait_for_other_instance(miss, &lock, stale.as_ref())
                    .await
                {
                    Some(entry) => Ok(Fetched::Entry(
                        Arc::new(entry),
                        Outcome::new(
                            "MISS",
                            format!("fwd={}; collapsed; detail=other-instance", miss.fwd),
                        ),
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
    async fn wait_for_other_instance(
        &self,
        miss: &MissCtx,
        lock: &StoreKey,
        stale: Option<&Entry>,
    ) -> Option<Entry> {
        let deadline = tokio::time::Instant::now() + self.settings.coalesce_wait;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LOCK_POLL).await;
            let (found, trouble) = self.lookup(&miss.primary, &miss.headers).await;
            if let Some(e) = trouble {
                tracing::debug!(error = %e, "store failed while waiting for another instance's fetch; fetching too");
                return None;
            }
            if let Some(e) = found.filter(|e| miss.may_take(e, stale)) {
                return Some(e);
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
                    tracing::debug!(error = %e, "store failed while waiting for another instance's fetch; fetching too");
                    return None;
                }
            }
        }
        tracing::debug!("coalesce_wait ran out waiting for another instance's fetch; fetching too");
        None
    }

    /// An entry stored meanwhile that may answer this miss
    /// ([`MissCtx::may_take`]). A store that fails here is no entry: the
    /// caller fetches. Not asked when this request's lookup already failed:
    /// a second timeout would only delay the fetch.
    async fn newer_entry(&self, miss: &MissCtx, stale: Option<&Entry>) -> Option<Entry> {
        if miss.cache_down {
            return None;
        }
        let (found, _) = self.lookup(&miss.primary, &miss.headers).await;
        found.filter(|e| miss.may_take(e, stale))
    }

    /// Call the upstream (conditionally if we hold a stale entry with
    /// validators) and store what may be stored.
    async fn fetch(&self, miss: &MissCtx, stale: Option<Entry>) -> Result<Fetched, UpstreamError> {
        let MissCtx {
            primary,
            target,
            method,
            headers: client_headers,
            rule,
            policy,
            fwd,
            cache_down,
            arrived_at: _,
        } = miss;
        let (policy, cache_down) = (*policy, *cache_down);
        let mut headers = client_headers.clone();
        prepare_request_headers(&mut headers);
        strip_unkeyed_routing_headers(&mut headers, &rule.key_headers);
        // We answer the client's conditionals ourselves; upstream gets ours.
        for h in [
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
        ] {
            headers.remove(h);
        }
        if let Some(s) = &stale {
            if let Some(etag) = s
                .header("etag")
                .and_then(|v| HeaderValue::from_bytes(v).ok())
            {
                headers.insert(header::IF_NONE_MATCH, etag);
            } else if let Some(lm) = s
                .header("last-modified")
                .and_then(|v| HeaderValue::from_bytes(v).ok())
            {
                headers.insert(header::IF_MODIFIED_SINCE, lm);
            }
        }
        let request_time = now_millis();
        let sent_at = std::time::Instant::now();
        let sent = self
            .upstream
            .send(method.clone(), target.url.clone(), headers, Bytes::new())
            .await;
        let response_time = now_millis();
        let upstream_time = sent_at.elapsed();
        let detail = if cache_down {
            "; detail=cache-unavailable"
        } else {
            ""
        };

        let resp = match sent {
            Ok(r) if !r.status.is_server_error() => r,
            // 6. Upstream failed: a stale entry within stale-if-error answers.
            failed => {
                if let Some(s) = stale.filter(|s| response_time < s.stale_if_error_until) {
                    let what = match &failed {
                        Ok(r) => format!("fwd-status={}", r.status.as_u16()),
                        Err(e) => format!("detail=\"{}\"", e.code()),
                    };
                    let age = response_time.saturating_sub(s.fresh_until) / 1000;
                    return Ok(Fetched::Entry(
                        Arc::new(s),
                        Outcome::timed(
                            upstream_time,
                            "STALE",
                            format!("fwd=stale; {what}; ttl=-{age}; detail=stale-if-error"),
                        ),
                    ));
                }
                let r = failed?;
                let outcome = Outcome::timed(
                    upstream_time,
                    "MISS",
                    format!("fwd={fwd}; fwd-status={}{detail}", r.status.as_u16()),
                );
                return Ok(Fetched::Relay(r, outcome));
            }
        };

        // A 304 to our conditional request refreshes the stale entry (RFC 9111 §4.3.4).
        let (status, mut resp_headers, body, inherited_tags) = match (resp.status, stale) {
            (StatusCode::NOT_MODIFIED, Some(s)) => {
                let mut merged = header_map_of(&s);
                for (name, value) in resp.headers.iter() {
                    if name != header::CONTENT_LENGTH {
                        merged.insert(name.clone(), value.clone());
                    }
                }
                (
                    StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK),
                    merged,
                    s.body.clone(),
                    Some(s.tags),
                )
            }
            _ => (resp.status, resp.headers.clone(), resp.body.clone(), None),
        };
        let revalidated = inherited_tags.is_some();
        let mut tags = inherited_tags.unwrap_or_default();
        tags.extend(surrogate_keys(
            &resp_headers,
            &self.settings.surrogate_key_headers,
        ));
        hide_surrogate_keys(&mut resp_headers, &self.settings);

        let storable = if *method == Method::HEAD {
            Err(NotStorable::Head)
        } else if !policy.store {
            Err(NotStorable::ClientNoStore)
        } else {
            policy::response_policy(
                ResponseFacts {
                    status,
                    headers: &resp_headers,
                    body_len: body.len(),
                    request_time,
                    response_time,
                },
                rule,
            )
        };
        let fwd_status = resp.status.as_u16();
        let freshness = match storable {
            Ok(f) => f,
            Err(why) => {
                let outcome = Outcome::timed(
                    upstream_time,
                    "MISS",
                    format!(
                        "fwd={fwd}; fwd-status={fwd_status}; detail={}",
                        why.as_str()
                    ),
                );
                return Ok(Fetched::Relay(
                    UpstreamResponse {
                        status,
                        headers: resp_headers,
                        body,
                    },
                    outcome,
                ));
            }
        };

        tags.extend(rule.tags.iter().cloned());
        tags.push(target.url_tag());
        tags.sort();
        tags.dedup();
        let entry = Entry {
            status: status.as_u16(),
            headers: stored_headers(&resp_headers, freshness.strip_set_cookie),
            body,
            born_at: freshness.born_at,
            stored_at: response_time,
            fresh_until: freshness.fresh_until,
            stale_while_revalidate_until: freshness.stale_while_revalidate_until,
            stale_if_error_until: freshness.stale_if_error_until,
            tags,
        };
        let vary = key::vary_names(&resp_headers).unwrap_or_default();
        let stored = if self.purged_since(&entry.tags, request_time).await {
            // A purge ran while this response was on its way: it may be
            // older than what the purge made room for.
            false
        } else {
            self.store(primary, &vary, client_headers, &entry).await
        };
        let x_cache = if revalidated { "HIT" } else { "MISS" };
        let stored_param = if stored { "; stored" } else { "" };
        let outcome = Outcome::timed(
            upstream_time,
            x_cache,
            format!("fwd={fwd}; fwd-status={fwd_status}{stored_param}{detail}"),
        );
        Ok(Fetched::Entry(Arc::new(entry), outcome))
    }

    /// Whether any of `tags` was purged at or after `since` (the purge
    /// marks live as long as a fetch lock, the longest a fetch can take).
    async fn purged_since(&self, tags: &[String], since: UnixMillis) -> bool {
        for tag in tags {
            if let Some(Record::PurgeMark(m)) = self.cache.get(&purge_mark_key(tag)).await.record {
                if m.purged_at >= since {
                    return true;
                }
            }
        }
        false
    }

    /// Remove every entry tagged `tag` (all `Vary` variants of a URL carry
    /// its URL tag). First a mark that keeps fetches already in flight from
    /// storing their older responses under the tag (a timestamp check: it
    /// needs no coordination and costs a read per tag only on stores), then
    /// the purge itself, which reaches every instance's L1 too. `soft`
    /// marks the entries stale instead of removing them. Returns how many
    /// entries were removed (or marked).
    pub async fn purge_tag(&self, tag: &str, soft: bool) -> Result<u64, StoreError> {
        let now = now_millis();
        let mark = Record::PurgeMark(PurgeMark {
            purged_at: now,
            expires_at: now + self.settings.lock_ttl.as_millis() as u64,
        });
        if let Err(e) = self.cache.put(&purge_mark_key(tag), &mark).await {
            tracing::warn!(error = %e, "could not leave a purge mark; an in-flight fetch may re-store an older response");
        }
        self.cache.purge_tag(tag, soft).await
    }

    /// The tag naming every stored variant of `url` (a path with optional
    /// query, or an absolute URL whose scheme and host are ignored),
    /// resolved exactly as a request for it would be.
    pub fn url_tag(&self, url: &str) -> Result<String, String> {
        let parsed;
        let (path, query) = if url.starts_with('/') {
            match url.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (url, None),
            }
        } else {
            parsed =
                Url::parse(url).map_err(|e| format!("`{url}` is neither a path nor a URL: {e}"))?;
            (parsed.path(), parsed.query())
        };
        let rule = self.routes.rule_for(path);
        Ok(Target::resolve(&self.base, path, query, &rule.ignored_query_params).url_tag())
    }

    /// The `Location` and `Content-Location` of an upstream response that
    /// name resources behind this proxy, as client paths: RFC 9111 §4.4 has
    /// them invalidated too, but only on the same origin (so a response
    /// cannot make us drop another site's entries). References resolve
    /// against the upstream URL of the request and must fall under the
    /// upstream's base path, which is then removed.
    fn same_origin_locations(&self, request_url: &Url, headers: &HeaderMap) -> Vec<String> {
        let prefix = self.base.path().trim_end_matches('/');
        [header::LOCATION, header::CONTENT_LOCATION]
            .iter()
            .filter_map(|name| headers.get(name)?.to_str().ok())
            .filter_map(|reference| request_url.join(reference).ok())
            .filter(|url| url.origin() == self.base.origin())
            .filter_map(|url| {
                let path = url.path().strip_prefix(prefix)?;
                if !path.starts_with('/') {
                    return None;
                }
                Some(match url.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_owned(),
                })
            })
            .collect()
    }

    /// Write the entry (and a Vary index when it varies). Failures are
    /// logged and counted; the response goes out regardless.
    async fn store(
        &self,
        primary: &StoreKey,
        vary: &[String],
        client_headers: &HeaderMap,
        entry: &Entry,
    ) -> bool {
        let key = if vary.is_empty() {
            primary.clone()
        } else {
            let index = Record::VaryIndex(VaryIndex {
                headers: vary.to_vec(),
                expires_at: entry.expires_at(),
            });
            if let Err(e) = self.cache.put(primary, &index).await {
                tracing::warn!(error = %e, "storing the Vary index failed");
                return false;
            }
            key::variant_key(primary, vary, client_headers)
        };
        match self.cache.put(&key, &Record::Entry(entry.clone())).await {
            Ok(()) => true,
            Err(e @ StoreError::CircuitOpen { .. }) => {
                tracing::debug!(error = %e, "not stored: cache skipped");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "storing the response failed; served without caching");
                false
            }
        }
    }

    /// Build the client response from an entry: conditional requests
    /// answered with 304, `Age`, the edge `Cache-Control`, cache status.
    fn respond_from_entry(
        &self,
        entry: &Entry,
        rule: &Rule,
        req_headers: &HeaderMap,
        head: bool,
        outcome: Outcome,
    ) -> Response<Bytes> {
        let now = now_millis();
        let mut headers = header_map_of(entry);
        headers.insert(header::AGE, HeaderValue::from(entry.age_secs(now)));
        let cc = policy::edge_cache_control(entry.fresh_secs_left(now), rule);
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(&cc).expect("ASCII"),
        );
        let not_modified = entry.status == 200 && not_modified(req_headers, entry);
        let status = if not_modified {
            StatusCode::NOT_MODIFIED
        } else {
            StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK)
        };
        let body = if head || not_modified {
            Bytes::new()
        } else {
            entry.body.clone()
        };
        if head || not_modified {
            // Describe the representation, not the empty body we send.
            if !not_modified {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
            }
        }
        if not_modified {
            for h in [
                header::CONTENT_TYPE,
                header::CONTENT_LENGTH,
                header::CONTENT_ENCODING,
            ] {
                headers.remove(h);
            }
        }
        build(status, headers, body, &outcome)
    }
}

/// What a request needs to know when another instance holds the fetch lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnContention {
    /// Wait for the other instance's entry.
    Wait,
    /// Answer the stale entry at once (Lambda stale-while-revalidate).
    ServeStale,
}

/// How often a request waiting on another instance's fetch looks for its entry.
const LOCK_POLL: Duration = Duration::from_millis(25);

/// Everything a fetch needs to know about the request it serves.
#[derive(Debug, Clone)]
struct MissCtx {
    primary: StoreKey,
    target: Target,
    method: Method,
    headers: HeaderMap,
    rule: Arc<Rule>,
    policy: RequestPolicy,
    /// RFC 9211 `fwd` value: why the upstream is asked.
    fwd: &'static str,
    cache_down: bool,
    /// When the request arrived (after its lookup).
    arrived_at: UnixMillis,
}

impl MissCtx {
    /// Whether an entry that turned up while this miss waited, or just
    /// before it fetched, may answer it: one stored after the stale entry
    /// it started from (any, without one); for a request that may not be
    /// answered from what was stored before it (a client `no-cache` the
    /// route honours), one stored after it arrived.
    fn may_take(&self, entry: &Entry, stale: Option<&Entry>) -> bool {
        if !self.policy.lookup {
            return entry.stored_at >= self.arrived_at;
        }
        stale.is_none_or(|s| entry.stored_at > s.stored_at)
    }
}

fn purge_mark_key(tag: &str) -> StoreKey {
    StoreKey::hash("purge-mark", [tag])
}

/// The key an entry for these request headers is stored under.
fn stored_under(primary: &StoreKey, vary: Option<&[String]>, headers: &HeaderMap) -> StoreKey {
    match vary {
        Some(v) if !v.is_empty() => key::variant_key(primary, v, headers),
        _ => primary.clone(),
    }
}

fn stale_while_revalidate_outcome(entry: &Entry, now: UnixMillis, detail: &str) -> Outcome {
    let age = now.saturating_sub(entry.fresh_until) / 1000;
    Outcome::new(
        "STALE",
        format!("hit; ttl=-{age}; detail=\"stale-while-revalidate; {detail}\""),
    )
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
                *v = Some(None);
                true
            } else {
                false
            }
        });
    }
}

/// Headers kept with an entry: not hop-by-hop, not `Age` (recomputed), not
/// `Set-Cookie` when the response is stored without it, not
/// `Content-Length` (the body is its own length).
/// The surrogate keys (tags) a response names: space-separated as in
/// `Surrogate-Key`, comma-separated as in `Cache-Tag`.
fn surrogate_keys(headers: &HeaderMap, names: &[String]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| headers.get_all(n.as_str()))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([' ', ',']))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn hide_surrogate_keys(headers: &mut HeaderMap, settings: &Settings) {
    if !settings.expose_surrogate_keys {
        for n in &settings.surrogate_key_headers {
            headers.remove(n.as_str());
        }
    }
}

fn stored_headers(headers: &HeaderMap, strip_set_cookie: bool) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .filter(|(n, _)| {
            *n != header::AGE
                && *n != header::CONTENT_LENGTH
                && !(strip_set_cookie && *n == header::SET_COOKIE)
        })
        .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

fn header_map_of(entry: &Entry) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(entry.headers.len() + 4);
    for (n, v) in &entry.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_maybe_shared(v.clone()),
        ) {
            h.append(n, v);
        }
    }
    h
}

/// Headers of a request about to go upstream: no hop-by-hop headers, no
/// `Host` (the upstream URL sets it), no `Content-Length` (the body does).
fn prepare_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
}

/// Request headers that upstream frameworks commonly use to build absolute
/// URLs, rewrite the path or change the method. On a request whose response
/// may be stored they would let one client shape what every other client is
/// served (cache poisoning), so they are not forwarded unless the route
/// makes them part of the key. Bypassed requests forward them unchanged.
const UNKEYED_ROUTING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-host",
    "x-original-url",
    "x-original-host",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-forwarded-ssl",
    "x-forwarded-protocol",
    "front-end-https",
    "x-url-scheme",
];

fn strip_unkeyed_routing_headers(headers: &mut HeaderMap, key_headers: &[String]) {
    // CGI-style gateways (PHP, WSGI/CGI adapters) read `X_Forwarded_Host`
    // as the same HTTP_X_FORWARDED_HOST variable as `X-Forwarded-Host`:
    // names are compared with `_` read as `-`. A key header is kept only
    // under the exact name the key reads.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let dashed = n.as_str().replace('_', "-");
            UNKEYED_ROUTING_HEADERS.contains(&dashed.as_str())
                && !key_headers.iter().any(|k| k == n.as_str())
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// RFC 9110 §13.1.2 / §13.1.3: weak comparison for If-None-Match; If-Modified-Since
/// only when there is no If-None-Match.
fn not_modified(req: &HeaderMap, entry: &Entry) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = entry
            .header("etag")
            .and_then(|v| std::str::from_utf8(v).ok())
        else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm
            .split(',')
            .any(|t| t.trim() == "*" || weak(t) == weak(etag));
    }
    let ims = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let lm = entry
        .header("last-modified")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((ims, lm), (Some(ims), Some(lm)) if lm <= ims)
}

fn relay(resp: UpstreamResponse, outcome: Outcome, head: bool) -> Response<Bytes> {
    let body = if head { Bytes::new() } else { resp.body };
    let mut headers = resp.headers;
    if head {
        // Keep the upstream's Content-Length for HEAD; the body is empty by definition.
    } else {
        headers.remove(header::CONTENT_LENGTH);
    }
    build(resp.status, headers, body, &outcome)
}

fn build(
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
    outcome: &Outcome,
) -> Response<Bytes> {
    if let Some(d) = outcome.upstream {
        // A request that was not looked up in the cache (a bypass) has no
        // cache timing for `handle` to combine this with.
        let timing = format!("upstream;dur={:.3}", ms(d));
        headers.insert(
            SERVER_TIMING,
            HeaderValue::from_str(&timing).expect("ASCII"),
        );
    }
    headers.insert(X_CACHE, HeaderValue::from_static(outcome.x_cache));
    let cache_status = format!("cachegate; {}", outcome.status);
    if let Ok(v) = HeaderValue::from_str(&cache_status) {
        headers.insert(HeaderName::from_static("cache-status"), v);
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if let Some(d) = outcome.upstream {
        resp.extensions_mut().insert(UpstreamTime(d));
    }
    resp
}

/// Time the upstream took, handed from [`build`] to [`Proxy::handle`].
#[derive(Clone, Copy)]
struct UpstreamTime(Duration);

/// What [`Proxy::handle`] learns while the request flows, for its
/// timing header and telemetry.
#[derive(Default)]
struct Trace {
    route: Option<Arc<Rule>>,
    key: Option<StoreKey>,
    lookup_time: Option<Duration>,
    backend_error: bool,
}

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A JSON error body: `{"error": {"status": 502, "code": "...", "message": "..."}}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "error": { "status": status.as_u16(), "code": code, "message": message } });
    let mut resp = Response::new(Bytes::from(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
