//! The request flow, top to bottom. Lambda and `serve` are thin adapters
//! that turn their requests into `http::Request<Bytes>` and call
//! [`Proxy::handle`].
//!
//! Beside it: [`coalesce`] (one upstream call per key, in the process and
//! across instances), [`fetch`] (the upstream call and storing its answer),
//! [`respond`] (building the client's response), [`purge`] (invalidation)
//! and [`outcome`] (the one typed value a request ends in). The HTTP rules
//! themselves are pure code in [`crate::policy`].

mod body;
mod bounded;
mod coalesce;
mod decide;
// Compressed entries (#26): gzip for storing, decoding for clients. Public
// so that benches can time it.
pub mod encoding;
mod explain;
mod fetch;
mod guard;
pub mod outcome;
mod purge;
mod range;
mod respond;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::policy::compression::{self, ClientAccept};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Request, Response, StatusCode};
use reqwest::Url;
use tokio::sync::watch;

use cachegate_store::tiered::TieredCache;
use cachegate_store::{now_millis, Entry, Record, StoreError, StoreKey};

use crate::background::Background;
use crate::config::Mode;
use crate::error_code::ErrorCode;
use crate::key::{self, Target};
use crate::policy::{self, Bypass, RequestFacts};
use crate::request::{CanonicalRequest, Forwarding};
use crate::routes::{RouteTable, Rule};
use crate::telemetry::{RequestId, RequestRecord, Telemetry};
use crate::upstream::{Upstream, UpstreamError, UpstreamResponse};

pub use body::ResponseBody;
use coalesce::{OnContention, Shared};
use decide::{HitDecision, HitFacts};
pub use explain::render_text as render_explanation;
use fetch::{MissCtx, Streamed};
pub use guard::GuardSettings;
use guard::UpstreamGuard;
use outcome::{Forward, Kind, Outcome, Refresh};
pub use respond::json_error;

/// Process-wide settings of the request flow.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the handler runs: under Lambda an answer must also fit a
    /// Lambda response payload ([`crate::lambda_payload::fits`]).
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
    /// Send the key's digest in `X-Cache-Key` (`cache.expose_key`).
    pub expose_key: bool,
    /// Lower-case request headers the cache in front keys on
    /// (`edge.key_headers`); `None` when not configured.
    pub edge_key_headers: Option<Vec<String>>,
    /// Lower-case request headers added to the routing headers stripped
    /// from requests whose answer may be stored (`cache.routing_headers`).
    pub routing_headers: Vec<String>,
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
    /// Entries stored gzip-compressed, the upstream asked for gzip
    /// (`cache.compression = "gzip"`).
    pub compression: bool,
    /// The most a body decoded for a client may grow to
    /// (`upstream.max_response_bytes`).
    pub max_response_bytes: usize,
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
    /// Keys whose last answer was not storable, until when their requests
    /// skip coalescing ([`coalesce::HIT_FOR_PASS`]).
    not_storable: Mutex<HashMap<StoreKey, tokio::time::Instant>>,
    /// CloudFront in front, when configured ([`crate::edge`]).
    edge: Option<Arc<crate::edge::Edge>>,
    /// cachegate's own upstream credentials (`upstream.headers`): a
    /// client's copies are dropped on the way in.
    own_headers: Option<Arc<crate::upstream::own_headers::OwnHeaders>>,
}

/// The response header `cache.expose_key` sends the key's digest in.
const X_CACHE_KEY: HeaderName = HeaderName::from_static("x-cache-key");

/// Most entries whose refresh-ahead this process remembers having started.
const REFRESH_AHEAD_MEMORY: usize = 10_000;

/// A response for the client and the outcome it is rendered with.
type Reply = (Response<ResponseBody>, Outcome);

/// An entry as the request flow uses it: with its stored headers as a
/// `HeaderMap`, built once, when the entry is read or made.
#[derive(Debug, Clone)]
struct Stored {
    entry: Entry,
    headers: HeaderMap,
    /// A gzip entry's body decoded, made on the first request of a client
    /// that does not take gzip and kept: with the entry in the memory
    /// store (which counts its size, [`Entry::gzip_decoded_len`]), later
    /// such hits decode nothing.
    decoded: OnceLock<Bytes>,
    /// The headers that go with the decoded body
    /// ([`compression::mark_decoded`]), made once like it.
    decoded_headers: OnceLock<HeaderMap>,
}

impl Stored {
    /// An entry read from the cache.
    fn read(entry: Entry) -> Self {
        let headers = respond::header_map_of(&entry);
        Stored::new(entry, headers)
    }

    fn new(entry: Entry, headers: HeaderMap) -> Self {
        Stored {
            entry,
            headers,
            decoded: OnceLock::new(),
            decoded_headers: OnceLock::new(),
        }
    }

    /// The stored headers as they go out with the decoded body.
    fn decoded_headers(&self) -> &HeaderMap {
        self.decoded_headers.get_or_init(|| {
            let mut h = self.headers.clone();
            compression::mark_decoded(&mut h);
            h
        })
    }

    /// The gzip body decoded, at most `limit` bytes: the kept copy, or
    /// decoded now and kept when it is the length the store counted.
    fn decoded_body(&self, limit: usize) -> Result<Bytes, encoding::DecodeError> {
        if let Some(body) = self.decoded.get() {
            return Ok(body.clone());
        }
        let body = Bytes::from(encoding::gunzip(&self.entry.body, limit)?);
        if self.entry.gzip_decoded_len() == Some(body.len()) {
            let _ = self.decoded.set(body.clone());
        }
        Ok(body)
    }

    /// The entry a record holds ([`Proxy::lookup`] passes entries only).
    fn of_record(record: &Record) -> Self {
        match record {
            Record::Entry(e) => Stored::read(e.clone()),
            // Not reached: only entries are passed.
            _ => Stored::read(Entry::default()),
        }
    }
}

/// What a lookup found. A cache failure is reported, never raised.
#[derive(Debug, Default)]
struct Found {
    stored: Option<Arc<Stored>>,
    trouble: Option<String>,
}

/// What [`Proxy::admit`] decided for a request.
enum Admission {
    /// It may use the cache: what its fetch would need.
    Cache(MissCtx),
    /// It may not: forwarded as it is.
    Bypass(Pass, Bypass),
    /// Refused before any cache or upstream work.
    Rejected(Reply),
}

/// Why a refresh runs after the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackgroundRefresh {
    /// The entry was answered stale within stale-while-revalidate.
    StaleWhileRevalidate,
    /// The entry is in the last part of its freshness (`cache.refresh_ahead`).
    Ahead,
}

/// A request forwarded without the cache.
struct Pass {
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    target: Target,
    rule: Arc<Rule>,
}

impl From<MissCtx> for Pass {
    /// A cache-using request (no body) forwarded without the cache after all.
    fn from(miss: MissCtx) -> Pass {
        let mut headers = miss.headers;
        if let Some(client) = &miss.accept {
            client.restore(&mut headers);
        }
        Pass {
            method: miss.method,
            headers,
            body: Bytes::new(),
            target: miss.target,
            rule: miss.rule,
        }
    }
}

/// What a fetch produced for the client.
enum Fetched {
    /// Stored (or refreshed) entry to serve from.
    Entry(Arc<Stored>, Outcome),
    /// An entry this request's fetch stored, and the headers only this
    /// request's client gets (the `Set-Cookie` left out of the stored copy).
    Own(Arc<Stored>, Outcome, HeaderMap),
    /// An upstream response relayed as is (not storable).
    Relay(UpstreamResponse, Outcome),
    /// Streamed to this request's client as it arrived (its head went out
    /// through [`fetch::ClientSink`]), and not stored: it outgrew the entry
    /// limit (`too_large`), or a purge ran while it was on its way.
    Sent { too_large: bool },
}

/// What a fetch made for the client waiting on it.
enum ClientFetch {
    /// The fetch ended: serve what it produced.
    Done(Result<Fetched, UpstreamError>),
    /// The answer streams to the client while it is stored.
    Streaming(Streamed),
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
            not_storable: Mutex::default(),
            edge: None,
            own_headers: None,
        }
    }

    /// cachegate's own upstream credentials, whose client copies are
    /// dropped before anything reads a request.
    pub fn with_own_headers(
        mut self,
        own: Option<Arc<crate::upstream::own_headers::OwnHeaders>>,
    ) -> Self {
        self.own_headers = own;
        self
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

    /// [`Proxy::respond`], with the body read whole (Lambda answers whole;
    /// tests and benchmarks read it so). A body that breaks off ends where
    /// it broke.
    pub async fn handle(self: &Arc<Self>, req: Request<Bytes>) -> Response<Bytes> {
        let (parts, body) = self.respond(req).await.into_parts();
        let body = match body {
            ResponseBody::Full(b) => b,
            streaming => streaming.collect().await.unwrap_or_default(),
        };
        Response::from_parts(parts, body)
    }

    /// Answer one client request. Never fails: every problem becomes a
    /// response (a JSON error for the client's or the upstream's faults;
    /// cache problems are misses). The request's outcome is rendered here,
    /// once, into the response headers, the access log and the metrics.
    /// In serve mode the body of an upstream answer streams as it arrives.
    pub async fn respond(self: &Arc<Self>, req: Request<Bytes>) -> Response<ResponseBody> {
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
        if let Some(client) = &trace.accept {
            // gzip (stored so, or asked for) decoded for a client that
            // does not take it.
            let limit = self.settings.max_response_bytes;
            if let Err(e) = encoding::fit_to_client(&mut resp, client, limit) {
                tracing::warn!(error = ?e, "a gzip body did not decode for a client that does not take gzip");
                let e =
                    UpstreamError::Other(format!("the gzip answer could not be decoded: {e:?}"));
                (resp, outcome) = upstream_error_reply(&e, None);
            }
        }
        let lookup = trace.lookup_time.map(|d| (d, self.cache.backend_name()));
        outcome.render(resp.headers_mut(), lookup);
        if let Some(key) = trace.key.as_ref().filter(|_| self.settings.expose_key) {
            if let Ok(v) = http::HeaderValue::from_str(key.digest()) {
                resp.headers_mut().insert(X_CACHE_KEY, v);
            }
        }
        if self.settings.mode == Mode::Lambda {
            // Bodies are read whole under Lambda (`Upstream::buffered`).
            let body = resp.body().as_full().cloned().unwrap_or_default();
            if !crate::lambda_payload::fits(resp.headers(), &body) {
                // What Lambda cannot carry is this request's 502, in the
                // headers, the log and the metrics alike.
                (resp, outcome) = respond::too_large_for_lambda(&resp, body.len(), outcome);
                outcome.render(resp.headers_mut(), lookup);
            }
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

    /// The request flow: canonicalise and admit, look up, then serve what
    /// is stored or go upstream, each step a typed decision.
    async fn handle_request(self: &Arc<Self>, req: Request<Bytes>, trace: &mut Trace) -> Reply {
        let miss = match self.admit(req, trace) {
            Admission::Cache(miss) => miss,
            Admission::Bypass(pass, why) => return self.pass_through(pass, why).await,
            Admission::Rejected(reply) => return reply,
        };
        let (stored, miss) = self.look_up(miss, trace).await;
        let facts = HitFacts {
            now: miss.arrived_at,
            shareable_only: miss.policy.shareable_only,
            background: self.settings.background.available(),
            refresh_ahead: self.settings.refresh_ahead,
        };
        let decision = decide::serve_or_revalidate(stored.as_deref(), facts, || {
            self.is_fetching(&miss.primary)
        });
        let on_contention = match (decision, &stored) {
            (HitDecision::PersonalPass(personal), _) => {
                return self.pass_through(Pass::from(miss), personal.bypass()).await
            }
            _ if miss.policy.range => return self.answer_range(miss, stored).await,
            (HitDecision::Fresh { ttl, refresh_ahead }, Some(s)) => {
                if refresh_ahead {
                    self.refresh_ahead(&miss, s);
                }
                return self.respond_to(&miss, s, Outcome::new(Kind::Hit { ttl }));
            }
            (HitDecision::StaleWhileRevalidate(refresh), Some(s)) => {
                if refresh == Refresh::InProgress
                    || self.refresh_in_background(&miss, s, BackgroundRefresh::StaleWhileRevalidate)
                {
                    let outcome =
                        coalesce::stale_while_revalidate(&s.entry, miss.arrived_at, refresh);
                    return self.respond_to(&miss, s, outcome);
                }
                // Nothing could be started after the response: refresh here.
                OnContention::ServeStale
            }
            (HitDecision::RefreshInline, _) => OnContention::ServeStale,
            // Miss and Revalidate (Fresh and stale-while-revalidate always
            // come with an entry).
            _ => OnContention::Wait,
        };
        match self.fetch_for_client(&miss, stored, on_contention).await {
            ClientFetch::Done(fetched) => self.respond_fetched(miss, fetched).await,
            ClientFetch::Streaming(streamed) => self.respond_streamed(&miss, streamed),
        }
    }

    /// Fetch for a client request. In serve mode the fetch runs in a task
    /// of its own and an answer being stored streams to the client from
    /// its head on: the client does not wait for the body to be read and
    /// stored, and the entry is stored (and the requests waiting for it
    /// answered) even when the client leaves first.
    async fn fetch_for_client(
        self: &Arc<Self>,
        miss: &MissCtx,
        stored: Option<Arc<Stored>>,
        on_contention: OnContention,
    ) -> ClientFetch {
        if self.settings.mode == Mode::Lambda || miss.policy.head {
            return ClientFetch::Done(self.fetch_coalesced(miss, stored, on_contention).await);
        }
        let (sink, head) = fetch::ClientSink::new();
        let miss = MissCtx {
            sink: Some(Arc::new(sink)),
            ..miss.clone()
        };
        let this = self.clone();
        let task =
            tokio::spawn(async move { this.fetch_coalesced(&miss, stored, on_contention).await });
        tokio::select! {
            biased;
            Ok(streamed) = head => ClientFetch::Streaming(streamed),
            joined = task => ClientFetch::Done(joined.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a fetch task failed");
                Err(UpstreamError::Other("the fetch failed".into()))
            })),
        }
    }

    /// The client's answer from the head of an entry being stored, its
    /// body streaming.
    fn respond_streamed(&self, miss: &MissCtx, streamed: Streamed) -> Reply {
        let Streamed {
            stored,
            outcome,
            own,
            body,
            content_length,
        } = streamed;
        let (mut resp, outcome) = self.respond_to(miss, &stored, outcome);
        // A 304 or 412 answered from the head has no body; the entry is
        // still stored.
        if resp.status().as_u16() == stored.entry.status {
            *resp.body_mut() = body;
            if let Some(n) = content_length {
                resp.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
            }
        }
        for (name, value) in &own {
            resp.headers_mut().append(name, value.clone());
        }
        (resp, outcome)
    }

    /// Canonicalise the request and decide whether it may use the cache
    /// ([`policy::request_policy`]); for one that may, its key.
    fn admit(&self, req: Request<Bytes>, trace: &mut Trace) -> Admission {
        let (parts, body) = req.into_parts();
        if parts.method == Method::CONNECT {
            let resp = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "CONNECT is not supported: this is not a forward proxy",
            )
            .map(ResponseBody::from);
            return Admission::Rejected((resp, Outcome::new(Kind::Rejected)));
        }
        // One canonical request, before anything reads it: the route, the
        // key and the upstream call all come from it.
        let (mut canon, rule) =
            match CanonicalRequest::new(parts, body, &self.settings.forwarding, &self.routes) {
                Ok(c) => c,
                Err(rejected) => {
                    let resp =
                        json_error(StatusCode::BAD_REQUEST, rejected.code, &rejected.message)
                            .map(ResponseBody::from);
                    return Admission::Rejected((resp, Outcome::new(Kind::Rejected)));
                }
            };
        if let Some(own) = &self.own_headers {
            // The upstream gets cachegate's; a client's copy neither goes
            // upstream nor makes the request personal or keyed.
            own.drop_client_copies(&mut canon.headers);
        }
        trace.route = Some(rule.clone());
        trace.client_origin = canon.client_origin.clone();
        let target = Target::from_canonical(
            &self.base,
            &canon.path,
            canon.query.as_deref(),
            rule.query_filter(),
        );
        let admitted = policy::request_policy(
            RequestFacts {
                method: &canon.method,
                headers: &canon.headers,
                has_body: !canon.body.is_empty(),
                upgrade: canon.upgrade,
            },
            &rule,
        );
        let CanonicalRequest {
            method,
            mut headers,
            body,
            ..
        } = canon;
        let policy = match admitted {
            Ok(p) => p,
            Err(why) => {
                let pass = Pass {
                    method,
                    headers,
                    body,
                    target,
                    rule,
                };
                return Admission::Bypass(pass, why);
            }
        };
        // One key and one upstream call for every spelling of
        // `Accept-Encoding`: the upstream is asked for gzip, and the
        // client's own value decides only what it is sent.
        let accept = self.settings.compression.then(|| {
            let client = Arc::new(ClientAccept::of(&headers));
            headers.insert(http::header::ACCEPT_ENCODING, compression::ASK_UPSTREAM);
            client
        });
        trace.accept = accept.clone();
        let primary = primary_key(&target, &rule, &mut headers);
        trace.key = Some(primary.clone());
        Admission::Cache(MissCtx {
            accept,
            fwd: Forward::UriMiss,
            cache_down: false,
            arrived_at: 0,
            caller: guard::Caller::Client,
            sink: None,
            primary,
            target,
            method,
            headers,
            rule,
            policy,
        })
    }

    /// Look up what is stored for an admitted request (unless it may not
    /// be answered from the cache), and note why a miss goes upstream.
    async fn look_up(&self, miss: MissCtx, trace: &mut Trace) -> (Option<Arc<Stored>>, MissCtx) {
        let found = if miss.policy.lookup {
            let started = std::time::Instant::now();
            let found = self
                .lookup(&miss.primary, &miss.headers, miss.accept.as_deref())
                .await;
            trace.lookup_time = Some(started.elapsed());
            trace.backend_error = found.trouble.is_some();
            found
        } else {
            Found::default()
        };
        let fwd = match (&found.stored, &found.trouble) {
            (Some(_), _) => Forward::Stale,
            (None, Some(_)) => Forward::Miss,
            (None, None) => Forward::UriMiss,
        };
        let miss = MissCtx {
            fwd,
            cache_down: found.trouble.is_some(),
            arrived_at: now_millis(),
            ..miss
        };
        (found.stored, miss)
    }

    /// Start a refresh of `current` to run after the response, as a
    /// background caller; `false` when nothing can run then.
    fn refresh_in_background(
        self: &Arc<Self>,
        miss: &MissCtx,
        current: &Arc<Stored>,
        why: BackgroundRefresh,
    ) -> bool {
        let (this, current) = (self.clone(), current.clone());
        let miss = MissCtx {
            caller: guard::Caller::Background,
            sink: None,
            ..miss.clone()
        };
        // A refresh-ahead yields to another instance's fetch: its entry is
        // still fresh, so nothing waits for this one.
        let on_contention = match why {
            BackgroundRefresh::StaleWhileRevalidate => OnContention::Wait,
            BackgroundRefresh::Ahead => OnContention::ServeStale,
        };
        self.settings.background.spawn(async move {
            let fetched = this.fetch_coalesced(&miss, Some(current), on_contention);
            if let Err(e) = fetched.await {
                let path = &miss.target.path_and_query;
                match why {
                    BackgroundRefresh::StaleWhileRevalidate => {
                        tracing::warn!(error = %e, path = %path, "background refresh failed")
                    }
                    BackgroundRefresh::Ahead => {
                        tracing::debug!(error = %e, path = %path, "refresh-ahead failed")
                    }
                }
            }
        })
    }

    /// The client's answer from what a fetch produced.
    async fn respond_fetched(
        self: &Arc<Self>,
        miss: MissCtx,
        fetched: Result<Fetched, UpstreamError>,
    ) -> Reply {
        if let (Ok(Fetched::Entry(stored, _)), Some(personal)) =
            (&fetched, miss.policy.shareable_only)
        {
            if !policy::explicitly_shareable(&stored.headers) {
                // Another request's fetch, stored under its rules.
                return self.pass_through(Pass::from(miss), personal.bypass()).await;
            }
        }
        match fetched {
            Ok(Fetched::Entry(stored, outcome)) => self.respond_to(&miss, &stored, outcome),
            Ok(Fetched::Own(stored, outcome, own)) => {
                let (mut resp, outcome) = self.respond_to(&miss, &stored, outcome);
                for (name, value) in &own {
                    resp.headers_mut().append(name, value.clone());
                }
                (resp, outcome)
            }
            Ok(Fetched::Relay(mut resp, outcome)) => {
                let unkeyed: Vec<HeaderName> = miss
                    .rule
                    .unkeyed_credentials(&miss.headers)
                    .cloned()
                    .collect();
                self.mark_credential_answer(&mut resp.headers, &unkeyed);
                respond::relay(
                    resp,
                    outcome,
                    miss.policy.head,
                    Some((&miss.rule, self.settings.edge_key_headers.as_deref())),
                )
            }
            Err(e) => {
                if !matches!(e, UpstreamError::Held { .. }) {
                    tracing::warn!(error = %e, path = %miss.target.path_and_query, "upstream failed");
                }
                upstream_error_reply(&e, Some(miss.fwd))
            }
            Ok(Fetched::Sent { .. }) => {
                // Only a fetch with a sink ends so, and its head went to
                // the client first ([`Proxy::fetch_for_client`]).
                tracing::error!("a streamed answer reached the whole-answer path");
                upstream_error_reply(&UpstreamError::Other("the answer was lost".into()), None)
            }
        }
    }

    /// A GET's `Range`: cut from a fresh stored complete response (206 or
    /// 416); anything else goes to the upstream, whose partial answers are
    /// not stored.
    async fn answer_range(self: &Arc<Self>, miss: MissCtx, stored: Option<Arc<Stored>>) -> Reply {
        let now = miss.arrived_at;
        match stored.filter(|s| s.entry.is_fresh(now)) {
            Some(s) => {
                let ttl = s.entry.fresh_secs_left(now);
                let reply = self.respond_to(&miss, &s, Outcome::new(Kind::Hit { ttl }));
                if miss
                    .accept
                    .as_ref()
                    .is_some_and(|c| c.must_decode(&s.headers))
                {
                    // Ranges of the gzip bytes are no use to a client that
                    // gets them decoded: the whole answer (RFC 9110 §14.2
                    // lets a server ignore `Range`).
                    return reply;
                }
                range::cut(reply, &s.entry, &miss.headers)
            }
            None => self.pass_through(Pass::from(miss), Bypass::Range).await,
        }
    }

    /// Answer a cache-using request from a stored entry.
    fn respond_to(&self, miss: &MissCtx, stored: &Stored, outcome: Outcome) -> Reply {
        let client = miss.accept.as_deref();
        let head = miss.policy.head;
        self.respond_from_entry(stored, &miss.rule, &miss.headers, client, head, outcome)
    }

    /// The stored entry for a request: the primary key's, or the variant
    /// its Vary index names. A cache failure is reported, never raised.
    async fn lookup(
        &self,
        primary: &StoreKey,
        headers: &HeaderMap,
        client: Option<&ClientAccept>,
    ) -> Found {
        let found = self.cache.get(primary).await;
        let mut trouble = found.error;
        let entry = match found.found {
            Some(f) => match f.record() {
                Record::Entry(_) => Some(f),
                Record::VaryIndex(v) => {
                    let found = self
                        .cache
                        .get(&key::variant_key(primary, &v.headers, headers))
                        .await;
                    trouble = trouble.or(found.error);
                    found.found
                }
                Record::PurgeMark(_) | Record::UpstreamHold(_) => None,
            },
            None => None,
        };
        // A stored coding this client cannot decode is a miss for it
        // (RFC 9110 §12.5.3), whatever the key and Vary said. With
        // compression, its own `Accept-Encoding` decides, not the `gzip`
        // asked of the upstream in its place.
        let entry = entry.filter(|f| match f.record() {
            Record::Entry(e) => {
                let coding = e.header("content-encoding");
                match client {
                    Some(client) => client.takes_stored(coding),
                    None => policy::content_coding::accepts_stored_coding(headers, coding),
                }
            }
            _ => false,
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
        Found {
            // Made once per stored value and kept with it in the memory
            // store (a prepared hit): later hits build nothing.
            stored: entry.map(|f| f.derived(Stored::of_record)),
            trouble: trouble.map(|e| e.to_string()),
        }
    }

    /// An answer relayed to a request that carries credential headers its
    /// route does not key on: keyed on them for the edge
    /// ([`policy::edge::mark_credential_answer`]).
    fn mark_credential_answer(&self, response: &mut HeaderMap, unkeyed: &[HeaderName]) {
        policy::edge::mark_credential_answer(
            response,
            unkeyed,
            self.settings.edge_key_headers.as_deref(),
        );
    }

    /// Refresh a hot entry before it expires, in the background, once per
    /// entry: skipped when this process is already fetching the key, and,
    /// with a shared backend, when another instance holds its fetch lock.
    fn refresh_ahead(self: &Arc<Self>, miss: &MissCtx, current: &Arc<Stored>) {
        let entry = &current.entry;
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
        self.refresh_in_background(miss, current, BackgroundRefresh::Ahead);
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
    async fn pass_through(self: &Arc<Self>, pass: Pass, why: Bypass) -> Reply {
        let Pass {
            method,
            mut headers,
            body,
            target,
            rule,
        } = pass;
        policy::headers::prepare_request_headers(&mut headers);
        let unkeyed_credentials: Vec<HeaderName> =
            rule.unkeyed_credentials(&headers).cloned().collect();
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
                target.url().clone(),
                headers,
                body,
                guard::Caller::Client,
                guard::Scope::of(&rule, &target),
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
                    self.invalidate_after_write(&target, &rule, &resp.headers, why)
                        .await;
                }
                let outcome = Outcome::timed(
                    upstream_time,
                    Kind::Bypass {
                        status: resp.status.as_u16(),
                        why,
                    },
                );
                self.mark_credential_answer(&mut resp.headers, &unkeyed_credentials);
                respond::relay(resp, outcome, head, None)
            }
            Err(e) => upstream_error_reply(&e, None),
        }
    }
}

/// The primary key of a request that may use the cache. On a route keyed
/// on cookies only the keyed ones go upstream, so what is stored cannot
/// depend on the others; the key reads them.
fn primary_key(target: &Target, rule: &Rule, headers: &mut HeaderMap) -> StoreKey {
    if rule.key_cookies.is_empty() {
        return target.primary_key(&rule.name, &rule.key_headers, headers);
    }
    policy::request::keep_key_cookies(headers, &rule.key_cookies);
    let mut names = rule.key_headers.clone();
    names.push(http::header::COOKIE.as_str().to_owned());
    target.primary_key(&rule.name, &names, headers)
}

/// The JSON error for a request the upstream did not answer (`fwd` is
/// `None` for a bypassed request). Held back, it is a 503 with
/// `Retry-After` (RFC 9110 §10.2.3).
fn upstream_error_reply(e: &UpstreamError, fwd: Option<Forward>) -> Reply {
    let mut resp = json_error(e.status(), e.code(), &e.to_string()).map(ResponseBody::from);
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
    /// The client's own `Accept-Encoding`, when cachegate asked the
    /// upstream for gzip instead (`cache.compression`).
    accept: Option<Arc<ClientAccept>>,
    route: Option<Arc<Rule>>,
    key: Option<StoreKey>,
    lookup_time: Option<Duration>,
    backend_error: bool,
    client_origin: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gzip_entry(body: &[u8]) -> Entry {
        Entry {
            status: 200,
            headers: vec![("content-encoding".into(), Bytes::from_static(b"gzip"))],
            body: Bytes::from(encoding::gzip(body).unwrap()),
            ..Entry::default()
        }
    }

    #[test]
    fn a_gzip_entrys_decoded_body_is_made_once_and_kept() {
        let json = br#"{"items":["a","b","c"],"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#
            .repeat(50);
        let stored = Stored::read(gzip_entry(&json));
        let first = stored.decoded_body(1 << 20).unwrap();
        assert_eq!(first.as_ref(), &json[..]);
        let again = stored.decoded_body(1 << 20).unwrap();
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "the kept copy, not decoded again"
        );
        // Over the limit: an error, and nothing kept.
        let small = Stored::read(gzip_entry(&json));
        assert!(small.decoded_body(100).is_err());
        assert!(small.decoded.get().is_none());
    }
}
