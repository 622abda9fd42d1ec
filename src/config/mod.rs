//! Configuration: built-in defaults < a TOML file < `CACHEGATE_*` environment
//! variables (`__` separates nesting levels), layered with figment.
//!
//! Every field documents its default. A bad value stops start-up with an
//! error naming the key and its environment variable ([`invalid`]).
//!
//! [`Config`] is the configuration as read, with its plain values checked;
//! the values that need parsing (the upstream URL, address ranges, methods,
//! header names, the route table) are parsed once, into
//! [`crate::resolved::ResolvedConfig`], which is what runs. This module
//! imports nothing else of the crate.

mod edge;

pub use edge::EdgeConfig;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use cachegate_store::guard::GuardConfig;
use cachegate_store::settings::{exact_bytes, DynamoConfig, RedisConfig};

/// Which store holds the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// In-process moka cache (per process / per Lambda execution context).
    #[default]
    Memory,
    /// Redis or ElastiCache (standalone, TLS, cluster mode).
    Redis,
    /// A DynamoDB table with a TTL attribute.
    Dynamodb,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::Redis => "redis",
            BackendKind::Dynamodb => "dynamodb",
        }
    }
}

/// What the binary does when it runs as the Lambda function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Answer HTTP events (API Gateway, function URL, ALB) through the proxy.
    #[default]
    Proxy,
    /// Take EventBridge events and SQS messages naming URLs and tags, and
    /// purge them from the shared backend (docs/invalidation.md).
    Invalidator,
}

/// Where the handler runs: `cachegate serve`, or the Lambda function.
/// Not a key: the command line decides. Telemetry and the edge read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Lambda,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `proxy` (default) or `invalidator`: what the Lambda function does.
    /// The invalidator needs a shared backend (`redis` or `dynamodb`) and
    /// the proxy's `upstream.url` and `routes`, which decide how a URL maps
    /// to its entries. Env: `CACHEGATE_ROLE`.
    #[serde(default)]
    pub role: Role,
    /// `memory` (default), `redis` or `dynamodb`. Env: `CACHEGATE_BACKEND`.
    #[serde(default)]
    pub backend: BackendKind,
    /// The API in front of which cachegate sits. Required.
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    /// Time bounds and circuit breaker around the shared backend (redis,
    /// dynamodb; memory is never slow). Defaults: `read_timeout = "50ms"`,
    /// `write_timeout = "1s"`, `purge_timeout = "10s"`,
    /// `failure_threshold = 3`, `open_for = "500ms"`.
    #[serde(default)]
    pub store: GuardConfig,
    /// The Redis backend (see `RedisConfig`). Checked whichever backends
    /// this build has; a build without the `redis` feature refuses a
    /// section that is not at its defaults.
    #[serde(default)]
    pub redis: RedisConfig,
    /// The DynamoDB backend (see `DynamoConfig`); as `redis`, with the
    /// `dynamodb` feature.
    #[serde(default)]
    pub dynamodb: DynamoConfig,
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The cache in front of cachegate (CloudFront, a CDN): the request
    /// headers it keys on, invalidations and cache tags (see
    /// [`EdgeConfig`]). Default: no CloudFront configured.
    #[serde(default)]
    pub edge: EdgeConfig,
    /// Per-route rules, matched on the request path; the most specific
    /// pattern wins (see [`RouteConfig`]).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the upstream API, e.g. `https://api.example.com/v1`.
    /// Request paths are appended to its path. No default.
    /// Env: `CACHEGATE_UPSTREAM__URL`.
    pub url: String,
    /// Longest the upstream may take to send its response head, and then
    /// between two chunks of its body (a stream that keeps coming is
    /// relayed however long it lasts). Default `10s`. Without a head in
    /// time the client gets 504 (or a stale entry within stale-if-error);
    /// a body that stalls ends the client's response there (its
    /// connection is closed) and is not stored.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest connecting to the upstream may take. Default `2s`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest upstream response body relayed at all. Default `6MiB`, the
    /// Lambda response limit; larger answers 502.
    #[serde(default = "default_max_response", serialize_with = "exact_bytes")]
    pub max_response_bytes: bytesize::ByteSize,
    /// Extra attempts for a GET or HEAD that could not connect (refused,
    /// reset before a byte was sent, connect timeout), after 12-25 ms,
    /// then 25-50 ms, doubling, all within `timeout`. Other methods are
    /// never retried. Default `2`. Env: `CACHEGATE_UPSTREAM__RETRIES`.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// How long an idle pooled upstream connection is kept for reuse.
    /// Servers close idle keep-alive connections on their own clock
    /// (gunicorn after 2 s, Node and Apache after 5 s); a request sent on
    /// a connection the server is closing at that moment fails before any
    /// answer. Dropping ours first avoids that race; an idempotent request
    /// that meets it anyway is sent again at once on a new connection.
    /// Raise it only for an upstream known to keep connections longer.
    /// Default `1500ms`. Env: `CACHEGATE_UPSTREAM__POOL_IDLE_TIMEOUT`.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// The upstream breakers (one for the upstream host, one per
    /// endpoint: the matched route's pattern, or the first path segment
    /// where no route matches) open when, over the last `failure_window`,
    /// at least `min_calls` GET and HEAD calls of their scope were made and
    /// `failure_rate` percent or more of them failed. Refused connections,
    /// connect timeouts and TLS failures count toward the host's breaker;
    /// gateway failures (502, 503 without `Retry-After`, 504), response
    /// timeouts and broken answers toward the endpoint's (a 500 is one
    /// request's error, not the upstream's state, and does not count).
    /// While open, for `open_for`, nothing of that scope is sent, entries
    /// within stale-if-error answer at once and other requests get 503 with
    /// `Retry-After`; then one request of the scope probes.
    /// Percent, 1 to 100. Default `50`. Env: `CACHEGATE_UPSTREAM__FAILURE_RATE`.
    #[serde(default = "default_failure_rate")]
    pub failure_rate: u8,
    /// Calls within `failure_window` before a breaker may open; `0` turns
    /// the breakers off. Default `10`. Env: `CACHEGATE_UPSTREAM__MIN_CALLS`.
    #[serde(default = "default_min_calls")]
    pub min_calls: u32,
    /// How far back a breaker counts calls. Default `30s`.
    /// Env: `CACHEGATE_UPSTREAM__FAILURE_WINDOW`.
    #[serde(default = "default_failure_window", with = "humantime_serde")]
    pub failure_window: Duration,
    /// How long an open upstream breaker calls nothing of its scope.
    /// Default `10s`.
    #[serde(default = "default_open_for", with = "humantime_serde")]
    pub open_for: Duration,
    /// How long every instance leaves the upstream alone after a 429 that
    /// names no (readable) `Retry-After`. Default `1s`.
    #[serde(default = "default_back_off", with = "humantime_serde")]
    pub back_off: Duration,
    /// The longest a `Retry-After` (on a 429, or a 503) holds calls back;
    /// longer ones are cut to this. Default `5m`.
    #[serde(default = "default_max_back_off", with = "humantime_serde")]
    pub max_back_off: Duration,
    /// Requests a second that all instances sharing the backend send the
    /// upstream together, at most: the GET and HEAD requests the proxy
    /// sends (misses, revalidations, refreshes, bypassed reads; writes are
    /// never held). Kept in the backend (one Redis script, a conditional
    /// DynamoDB update; in-process on `memory`). Unset: no budget.
    /// Env: `CACHEGATE_UPSTREAM__MAX_RPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rps: Option<f64>,
    /// Requests the budget lets go at once after a quiet spell, on top of
    /// its pace. Default `1` (an even pace: what a per-second limit upstream
    /// accepts). Env: `CACHEGATE_UPSTREAM__BURST`.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// The longest a client's miss waits for the budget (or for
    /// `max_concurrency`); then an entry within stale-if-error answers, or
    /// 503 with `Retry-After`. Background refreshes never wait: they yield
    /// to client misses. Default `1s`. Env: `CACHEGATE_UPSTREAM__QUEUE_WAIT`.
    #[serde(default = "default_queue_wait", with = "humantime_serde")]
    pub queue_wait: Duration,
    /// Upstream calls (GET and HEAD) in flight at once from this instance;
    /// `0` = no limit. Default `0`. Env: `CACHEGATE_UPSTREAM__MAX_CONCURRENCY`.
    #[serde(default)]
    pub max_concurrency: u32,
    /// Requests a second this instance allows itself while the backend
    /// cannot be asked for the shared budget. Default: a quarter of
    /// `max_rps` (room for four instances). Env: `CACHEGATE_UPSTREAM__FALLBACK_RPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_rps: Option<f64>,
    /// Which spellings of a path the upstream may take for the same
    /// resource: `lenient` (default) or `strict`
    /// ([`PathEquivalence`], docs/hostile-input.md).
    /// Env: `CACHEGATE_UPSTREAM__PATH_EQUIVALENCE`.
    #[serde(default)]
    pub path_equivalence: PathEquivalence,
    /// Request headers cachegate adds to every upstream call: its own
    /// credentials (an API key, a token). Each value is a literal, or
    /// `env:NAME` (an environment variable), `secretsmanager:ARN` or
    /// `secretsmanager:ARN#field` (an AWS Secrets Manager secret, or one
    /// field of its JSON), `ssm:NAME` (an SSM Parameter Store parameter,
    /// decrypted). Read at start-up, refreshed every `headers_refresh` and
    /// at once when the upstream answers 401 or 403; never logged, never
    /// part of a key; a client's own copy of such a header is dropped.
    /// Default: none.
    #[serde(default, skip_serializing_if = "OwnHeaderSources::is_empty")]
    pub headers: OwnHeaderSources,
    /// How often the values of `headers` read from the environment,
    /// Secrets Manager or SSM are read again. Default `5m`.
    #[serde(default = "default_headers_refresh", with = "humantime_serde")]
    pub headers_refresh: Duration,
}

/// `upstream.headers`: header name → where its value comes from. `Debug`
/// shows literal values only as `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct OwnHeaderSources(pub std::collections::BTreeMap<String, String>);

impl OwnHeaderSources {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `value` is a literal (a secret itself) rather than a
    /// reference to where the secret is kept.
    pub fn is_literal(value: &str) -> bool {
        !["env:", "secretsmanager:", "ssm:"]
            .iter()
            .any(|p| value.starts_with(p))
    }
}

impl fmt::Debug for OwnHeaderSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, value)| {
                let shown = if Self::is_literal(value) {
                    "<redacted>"
                } else {
                    value.as_str()
                };
                (name, shown)
            }))
            .finish()
    }
}

/// Where one of `upstream.headers` comes from, parsed.
#[derive(Clone, PartialEq, Eq)]
pub enum OwnHeaderSource {
    /// The value itself.
    Literal(String),
    /// An environment variable, read again at each refresh.
    Env(String),
    /// A Secrets Manager secret (name or ARN), or one field of its JSON.
    SecretsManager { id: String, field: Option<String> },
    /// An SSM Parameter Store parameter, decrypted.
    Ssm(String),
}

impl OwnHeaderSource {
    /// Read at start-up only (a literal) or again at each refresh.
    pub fn refreshes(&self) -> bool {
        !matches!(self, OwnHeaderSource::Literal(_))
    }
}

impl fmt::Debug for OwnHeaderSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OwnHeaderSource::Literal(_) => f.write_str("Literal(<redacted>)"),
            OwnHeaderSource::Env(name) => write!(f, "Env({name})"),
            OwnHeaderSource::SecretsManager { id, field } => {
                write!(f, "SecretsManager({id}")?;
                if let Some(field) = field {
                    write!(f, "#{field}")?;
                }
                f.write_str(")")
            }
            OwnHeaderSource::Ssm(name) => write!(f, "Ssm({name})"),
        }
    }
}

impl OwnHeaderSources {
    /// Each header name checked and each source parsed. Names that say
    /// how the request travels (hop-by-hop, `Host`, cachegate's forwarding
    /// headers) are refused: they are not credentials.
    pub fn parse(&self) -> Result<Vec<(http::HeaderName, OwnHeaderSource)>, ConfigError> {
        let key = "upstream.headers";
        let mut out = Vec::with_capacity(self.0.len());
        for (name, value) in &self.0 {
            let header = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(key, format!("`{name}` is not a header name")))?;
            const NOT_CREDENTIALS: [&str; 12] = [
                "host",
                "connection",
                "keep-alive",
                "transfer-encoding",
                "te",
                "trailer",
                "upgrade",
                "content-length",
                "via",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
            ];
            if NOT_CREDENTIALS.contains(&header.as_str()) {
                return Err(invalid(
                    key,
                    format!(
                        "`{name}` says how the request travels; cachegate sets or relays it itself"
                    ),
                ));
            }
            let empty = |what: &str| invalid(key, format!("`{name}`: {what} is empty"));
            let source = if let Some(var) = value.strip_prefix("env:") {
                if var.is_empty() {
                    return Err(empty("the variable name"));
                }
                OwnHeaderSource::Env(var.to_owned())
            } else if let Some(rest) = value.strip_prefix("secretsmanager:") {
                let (id, field) = match rest.split_once('#') {
                    Some((_, "")) => {
                        return Err(invalid(
                            key,
                            format!("`{name}`: nothing after `#` in `{rest}`"),
                        ))
                    }
                    Some((id, field)) => (id, Some(field.to_owned())),
                    None => (rest, None),
                };
                if id.is_empty() {
                    return Err(empty("the secret's name or ARN"));
                }
                OwnHeaderSource::SecretsManager {
                    id: id.to_owned(),
                    field,
                }
            } else if let Some(param) = value.strip_prefix("ssm:") {
                if param.is_empty() {
                    return Err(empty("the parameter name"));
                }
                OwnHeaderSource::Ssm(param.to_owned())
            } else {
                if http::HeaderValue::from_str(value).is_err() {
                    // Never echo the value: it is a secret.
                    return Err(invalid(
                        key,
                        format!("the value of `{name}` is not a header value"),
                    ));
                }
                OwnHeaderSource::Literal(value.clone())
            };
            out.push((header, source));
        }
        Ok(out)
    }
}

fn default_headers_refresh() -> Duration {
    Duration::from_secs(300)
}

/// How the upstream reads a request path, as far as route rules care
/// (`upstream.path_equivalence`). The path sent upstream and keyed is the
/// canonical one either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PathEquivalence {
    /// The upstream may read spellings as one resource that RFC 3986
    /// keeps apart: repeated slashes, letter case, `;params`, `%2F` as
    /// `/`, escapes decoded more than once, Unicode compatibility forms
    /// (NFKC), a trailing slash. Many frameworks do some of these. A
    /// request whose canonical path and lenient reading choose different
    /// routes, or whose lenient reading has dot segments, is refused
    /// (400 `ambiguous_path`): which one the upstream serves cannot be
    /// known here.
    #[default]
    Lenient,
    /// The upstream reads paths as RFC 3986 does (case-sensitive, `%2F`
    /// is data, decoded once): routes match the canonical path alone.
    Strict,
}

/// Whether cachegate compresses what it stores (`cache.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// A request that uses the cache asks the upstream for gzip (one key
    /// and one upstream call for every spelling of `Accept-Encoding`); a
    /// compressible answer (text, JSON, XML, JavaScript, 1 KiB or more,
    /// without `no-transform`) is stored gzip-compressed if the upstream
    /// did not; a client that does not take gzip is sent it decoded.
    #[default]
    Gzip,
    /// Stored and relayed in the coding the upstream chose for the
    /// client's own `Accept-Encoding`, which is then part of the key
    /// whenever the upstream varies on it.
    Off,
}

impl UpstreamConfig {
    /// `url` parsed: an http(s) URL with a host and no query or fragment.
    pub fn base_url(&self) -> Result<reqwest::Url, ConfigError> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| invalid("upstream.url", format!("`{}` is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "upstream.url",
                "must be an http:// or https:// URL",
            ));
        }
        if url.host_str().is_none() {
            return Err(invalid("upstream.url", "has no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("upstream.url", "must not have a query or fragment"));
        }
        Ok(url)
    }
}

fn default_burst() -> u32 {
    1
}
fn default_queue_wait() -> Duration {
    Duration::from_secs(1)
}

fn default_retries() -> u32 {
    2
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_millis(1500)
}
fn default_failure_rate() -> u8 {
    50
}
fn default_min_calls() -> u32 {
    10
}
fn default_failure_window() -> Duration {
    Duration::from_secs(30)
}
fn default_open_for() -> Duration {
    Duration::from_secs(10)
}
fn default_back_off() -> Duration {
    Duration::from_secs(1)
}
fn default_max_back_off() -> Duration {
    Duration::from_secs(300)
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_response() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(6)
}

/// How responses are cached when no route says otherwise.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Freshness for storable responses that carry none (no `max-age`,
    /// `s-maxage` or `Expires`). Default: unset, so such responses are not
    /// cached (no heuristic freshness). Env: `CACHEGATE_CACHE__DEFAULT_TTL`.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Option<Duration>,
    /// Serve stale while one request refreshes, when the upstream names no
    /// `stale-while-revalidate`. Default `0s`.
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// Serve stale when the upstream fails (5xx, timeout, refused), when the
    /// upstream names no `stale-if-error`. Default `5m`. Never for
    /// responses with `must-revalidate`, `proxy-revalidate` or `no-cache`.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// How long a stale entry that has validators (`ETag`, `Last-Modified`)
    /// is kept after its freshness and stale windows, so that the next
    /// request revalidates it (`If-None-Match`, a 304 instead of a body)
    /// rather than refetching. Such entries are never served without that
    /// revalidation; the store's own capacity bounds them as any entry.
    /// Default `1h`.
    #[serde(with = "humantime_serde")]
    pub keep_for_revalidation: Duration,
    /// Largest response body stored; larger ones are relayed, not stored.
    /// Default `5MiB` (the backend's own limit applies too).
    #[serde(serialize_with = "exact_bytes")]
    pub max_entry_bytes: bytesize::ByteSize,
    /// Query parameters left out of the key and of the upstream request
    /// (tracking parameters, say). Default: none.
    pub ignored_query_params: Vec<String>,
    /// Request headers whose values are part of every key (lower case).
    /// Default: none (the response's `Vary` adds its own).
    pub key_headers: Vec<String>,
    /// Request headers that identify a client, as `Authorization` and
    /// `Cookie` do: API keys and tokens. A request carrying one is
    /// answered from, or stored in, the cache only when the route keys on
    /// that header (`key_headers`) or the upstream marks the answer
    /// `public` or `s-maxage` (the rule RFC 9111 §3.5 gives for
    /// `Authorization`); otherwise it passes through, and the edge is
    /// told the answer varies by the header. Setting the list replaces
    /// the default: repeat it to add a name. Default:
    /// [`DEFAULT_CREDENTIAL_HEADERS`]. Env:
    /// `CACHEGATE_CACHE__CREDENTIAL_HEADERS`.
    pub credential_headers: Vec<String>,
    /// Store responses that carry `Set-Cookie` (with the `Set-Cookie`
    /// header removed; only the client that caused the fetch gets the
    /// cookie). Default `false`: such responses are not stored.
    pub store_set_cookie_responses: bool,
    /// Store answers to requests the upstream rejected as malformed or too
    /// large (400, 413, 414, 431) when they carry freshness. Default
    /// `false`: one client's oversized or malformed request must not
    /// become every client's answer (cache-poisoned denial of service,
    /// Nguyen et al., CCS 2019; docs/http-caching.md).
    pub store_request_errors: bool,
    /// Honour a client's `Cache-Control: no-cache` / `Pragma: no-cache` by
    /// going to the upstream. Default `false`: any client could otherwise
    /// make every request reach the upstream.
    pub honor_client_no_cache: bool,
    /// Request headers, besides the built-in list
    /// (`policy::headers::UNKEYED_ROUTING_HEADERS`, docs/hostile-input.md),
    /// that the upstream reads to re-route or re-scheme a request: they are
    /// not forwarded on requests whose answer may be stored unless a route
    /// keys on them. Default: none.
    /// Env: `CACHEGATE_CACHE__ROUTING_HEADERS` (`["x-tenant-route"]`).
    pub routing_headers: Vec<String>,
    /// Longest the `s-maxage` sent to the edge (CloudFront, browsers) may
    /// be; it is never more than the entry's freshness left. Default: unset.
    #[serde(with = "humantime_serde")]
    pub edge_max_ttl: Option<Duration>,
    /// With a shared backend, how long this process keeps a copy in its
    /// in-memory L1. Purges made elsewhere reach it at once on Redis
    /// (pub/sub) and within `l1_check` on DynamoDB (docs/invalidation.md).
    /// `0s` disables the L1. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    /// On DynamoDB, how often this process reads the purge log before its
    /// L1 answers (one Query at a time per process, made by a request when
    /// due); a purge made elsewhere is seen here within this plus one
    /// round trip. Must be more than 0. Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub l1_check: Duration,
    /// How long a miss waits at least for another request already
    /// fetching the same key (here or, with a shared backend, in another
    /// instance); it waits as long as that fetch can take
    /// (`upstream.timeout` and 1 s) when that is longer, and takes its
    /// answer or its error. `0s` turns coalescing off. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub coalesce_wait: Duration,
    /// Response headers whose values tag the entry for purging (surrogate
    /// keys). Default `["surrogate-key", "cache-tag"]`.
    pub surrogate_key_headers: Vec<String>,
    /// Pass those headers on to clients. Default `false`: they describe
    /// the upstream's data model, not something clients need.
    pub expose_surrogate_keys: bool,
    /// Send each cache-using request's key (its digest, as the access log
    /// and `cachegate explain` show it) to the client in `X-Cache-Key`,
    /// for debugging. Default `false`.
    pub expose_key: bool,
    /// Methods whose successful (2xx/3xx) answer invalidates the URL's
    /// entries. Every method but GET, HEAD, OPTIONS and TRACE already does
    /// (RFC 9111 §4.4, methods of unknown safety included), so this can
    /// only add one of those four. Default: none.
    pub invalidating_methods: Vec<String>,
    /// Most tags (surrogate keys, route tags) one entry keeps; more are
    /// dropped, so one response cannot make the tag index explode.
    /// Default `64` (CloudFront keeps 50).
    pub max_tags_per_entry: usize,
    /// The last part of an entry's freshness, as a fraction (`0.1`: the
    /// last 10 %), in which a hit also refreshes the entry in the
    /// background, so a hot key never misses. One request per process and,
    /// with a shared backend, one instance (the fetch lock) refreshes; an
    /// entry is tried once. Under Lambda it runs after the response, held
    /// open by the after-response extension, and is off if that could not
    /// register. `0` = off. Default `0`.
    /// Env: `CACHEGATE_CACHE__REFRESH_AHEAD`.
    pub refresh_ahead: f64,
    /// Shorten each stored entry's remaining freshness by a random part of
    /// up to this fraction (`0.1`: up to 10 %), so entries stored together
    /// do not expire together. Only ever shorter than the upstream allows,
    /// and only in this cache: what is relayed (`Cache-Control`, `Age`) is
    /// unchanged. `0` = off. Default `0`. Env: `CACHEGATE_CACHE__TTL_JITTER`.
    pub ttl_jitter: f64,
    /// `"gzip"` (default): entries are stored gzip-compressed and every
    /// spelling of `Accept-Encoding` shares them ([`Compression::Gzip`]);
    /// `"off"`: codings as the upstream chose them.
    /// Env: `CACHEGATE_CACHE__COMPRESSION`.
    pub compression: Compression,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            default_ttl: None,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(300),
            keep_for_revalidation: Duration::from_secs(3600),
            max_entry_bytes: bytesize::ByteSize::mib(5),
            ignored_query_params: Vec::new(),
            key_headers: Vec::new(),
            credential_headers: DEFAULT_CREDENTIAL_HEADERS
                .iter()
                .map(|&h| h.to_owned())
                .collect(),
            store_set_cookie_responses: false,
            store_request_errors: false,
            honor_client_no_cache: false,
            routing_headers: Vec::new(),
            edge_max_ttl: None,
            l1_ttl: Duration::from_secs(5),
            l1_check: Duration::from_millis(250),
            coalesce_wait: Duration::from_secs(5),
            surrogate_key_headers: vec!["surrogate-key".into(), "cache-tag".into()],
            expose_surrogate_keys: false,
            expose_key: false,
            invalidating_methods: Vec::new(),
            max_tags_per_entry: 64,
            refresh_ahead: 0.0,
            ttl_jitter: 0.0,
            compression: Compression::Gzip,
        }
    }
}

/// The request headers that are credentials by default
/// (`cache.credential_headers`): the API-key and token headers of common
/// APIs and API gateways. Each carries a secret that says who the client
/// is, so an upstream may answer each value differently. Not here:
/// `X-CSRF-Token` / `X-XSRF-Token` (an anti-forgery echo of a cookie,
/// which is the credential and already counts; it does not select what a
/// GET returns), identity assertions such as `X-User-Id` or `X-Tenant-Id`
/// (not secrets; a route that answers per tenant keys on them with
/// `key_headers`), `Proxy-Authorization` (hop-by-hop: dropped before
/// anything reads the request, never forwarded).
pub const DEFAULT_CREDENTIAL_HEADERS: &[&str] = &[
    // Generic API-key headers.
    "x-api-key",
    "api-key",
    "apikey",
    "x-apikey",
    // Generic token headers.
    "x-auth-token",
    "x-access-token",
    "x-token",
    "x-session-token",
    "x-session-id",
    "x-authorization",
    // Named services and gateways: Google APIs, Azure API Management,
    // Azure Functions, RapidAPI, GitLab, AWS temporary credentials.
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "x-functions-key",
    "x-rapidapi-key",
    "private-token",
    "x-amz-security-token",
];

/// Headers that cannot be listed in `cache.credential_headers`, and why.
const NOT_CREDENTIAL_HEADERS: [(&str, &str); 3] = [
    (
        "authorization",
        "is a credential already (bypasses the cache unless a route keys on it)",
    ),
    (
        "cookie",
        "is a credential already (see routes' ignore_cookies and key_cookies)",
    ),
    (
        "proxy-authorization",
        "is hop-by-hop: dropped before anything reads the request, never forwarded",
    ),
];

impl CacheConfig {
    /// Check `credential_headers`: header names, none of those with rules
    /// of their own.
    fn check_credential_headers(&self) -> Result<(), ConfigError> {
        const KEY: &str = "cache.credential_headers";
        for name in header_names(KEY, &self.credential_headers)? {
            if let Some((_, why)) = NOT_CREDENTIAL_HEADERS
                .iter()
                .find(|(n, _)| *n == name.as_str())
            {
                return Err(invalid(KEY, format!("`{name}` {why}")));
            }
        }
        Ok(())
    }

    /// `invalidating_methods` as methods (checked by validation).
    pub fn invalidating_method_list(&self) -> Result<Vec<http::Method>, ConfigError> {
        self.invalidating_methods
            .iter()
            .map(|m| {
                http::Method::from_bytes(m.as_bytes()).map_err(|_| {
                    invalid(
                        "cache.invalidating_methods",
                        format!("`{m}` is not a method"),
                    )
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes the in-process cache may hold (the memory backend, or the L1
    /// in front of a shared one). Default `128MiB`.
    #[serde(serialize_with = "exact_bytes")]
    pub capacity: bytesize::ByteSize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: bytesize::ByteSize::mib(128),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address `cachegate serve` listens on. Default `127.0.0.1:3000`.
    pub listen: SocketAddr,
    /// Largest request body accepted. Default `6MiB`; larger gets 413.
    #[serde(serialize_with = "exact_bytes")]
    pub max_request_bytes: bytesize::ByteSize,
    /// Enables `POST /_cachegate/purge` (JSON `{"urls": [...], "tags": [...]}`)
    /// for requests carrying `Authorization: Bearer <token>`; others get 404.
    /// Useful with the memory backend, whose cache lives in the process.
    /// Default: unset, and the path is proxied like any other.
    pub purge_token: Option<String>,
    /// Longest request target (path and query) accepted. Default `8KiB`;
    /// longer gets 414 before anything else happens.
    #[serde(serialize_with = "exact_bytes")]
    pub max_uri_bytes: bytesize::ByteSize,
    /// Largest request head (request line and all header lines) accepted.
    /// Default `32KiB`; larger gets 431 and the connection is closed.
    #[serde(serialize_with = "exact_bytes")]
    pub max_header_bytes: bytesize::ByteSize,
    /// Most request header lines accepted. Default `100`; more gets 431
    /// and the connection is closed.
    pub max_headers: usize,
    /// Longest a client may take to send a request head once it has
    /// connected or finished its previous request; then the connection is
    /// closed (slowloris, idle keep-alive). Default `10s`.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest a client may take to send a request body after its head.
    /// Default `30s`; slower gets 408 and the connection is closed.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Longest a write to a client may wait for it to take bytes (nginx's
    /// `send_timeout`): a client that stops reading a response is
    /// disconnected after this, so what it holds is bounded by the socket
    /// buffers. Default `60s`.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Proxies (CIDR ranges, e.g. `["10.0.0.0/8"]`) whose `X-Forwarded-For`
    /// and `X-Forwarded-Proto` are believed: the client address sent
    /// upstream is the first one left of them. Without it the peer (the
    /// TCP peer; under Lambda API Gateway's source IP) is the client, and
    /// client-supplied forwarding headers are dropped. Default: none.
    pub trusted_proxies: Vec<String>,
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("max_request_bytes", &self.max_request_bytes)
            .field(
                "purge_token",
                &self.purge_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_uri_bytes", &self.max_uri_bytes)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_headers", &self.max_headers)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

impl ServeConfig {
    /// `trusted_proxies` parsed (a bare address is a one-address range).
    pub fn trusted_proxy_nets(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        invalid(
                            "serve.trusted_proxies",
                            format!("`{s}` is not an address or CIDR range"),
                        )
                    })
            })
            .collect()
    }

    fn check_limits(&self) -> Result<(), ConfigError> {
        let (uri, head) = (self.max_uri_bytes.as_u64(), self.max_header_bytes.as_u64());
        if !(256..=64 * 1024).contains(&uri) {
            return Err(invalid("serve.max_uri_bytes", "must be 256B to 64KiB"));
        }
        // hyper cannot parse a head in a buffer smaller than 8KiB, and
        // a head must hold the longest accepted request line.
        if !(8 * 1024..=1024 * 1024).contains(&head) || head < uri {
            return Err(invalid(
                "serve.max_header_bytes",
                "must be 8KiB to 1MiB and at least serve.max_uri_bytes",
            ));
        }
        if !(8..=1000).contains(&self.max_headers) {
            return Err(invalid("serve.max_headers", "must be 8 to 1000"));
        }
        for (key, d) in [
            ("serve.header_read_timeout", self.header_read_timeout),
            ("serve.body_read_timeout", self.body_read_timeout),
            ("serve.send_timeout", self.send_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be more than 0s"));
            }
        }
        Ok(())
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:3000".parse().expect("literal address"),
            max_request_bytes: bytesize::ByteSize::mib(6),
            purge_token: None,
            max_uri_bytes: bytesize::ByteSize::kib(8),
            max_header_bytes: bytesize::ByteSize::kib(32),
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            trusted_proxies: Vec::new(),
        }
    }
}

/// Request metrics: CloudWatch Embedded Metric Format on stdout under
/// Lambda, Prometheus text on an opt-in port in serve mode.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// CloudWatch namespace of the EMF metrics. Default `cachegate`.
    pub namespace: String,
    /// Write one EMF line per request to stdout (CloudWatch turns them into
    /// metrics without an agent). Default: on under Lambda, off in serve mode.
    pub emf: Option<bool>,
    /// Serve mode: address of a separate listener answering `GET /metrics`
    /// in the Prometheus text format. Default: unset (no metrics listener;
    /// keep it off the proxied port so clients cannot read it).
    pub prometheus_listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            namespace: "cachegate".into(),
            emf: None,
            prometheus_listen: None,
        }
    }
}

/// Rules for the requests whose path matches `path`.
///
/// Patterns use `{name}` for one segment and `{*name}` for the rest of the
/// path: `/items/{id}`, `/static/{*path}`. When several match, the most
/// specific one wins (a literal segment beats `{id}`, which beats `{*rest}`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The path pattern. Required.
    pub path: String,
    /// `false` makes every request on this route bypass the cache. Default `true`.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Freshness for responses that carry none, for the statuses RFC 9110
    /// §15.1 calls heuristically cacheable (200, 203, 204, 300, 301, 308,
    /// 404, 405, 410, 414, 501). Default: `cache.default_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Freshness by status for responses that carry none, ahead of `ttl`
    /// and for any status named (negative caching), e.g.
    /// `status_ttl = { 404 = "10s", 410 = "1h" }`. Default: none.
    #[serde(default)]
    pub status_ttl: std::collections::BTreeMap<String, humantime_serde::Serde<Duration>>,
    /// Use `ttl` even when the upstream sends its own freshness, `no-cache`
    /// or `must-revalidate` (for upstreams that send wrong ones). `no-store`
    /// and `private` are still obeyed: they protect users. Default `false`.
    #[serde(default)]
    pub override_upstream: bool,
    /// Default: `cache.stale_while_revalidate`.
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// Default: `cache.stale_if_error`.
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// Tags stored with every entry of the route, for purging. `{name}`
    /// is replaced by that placeholder of `path` as the request has it
    /// (`item-{id}` on `/items/{id}` tags `/items/7` with `item-7`).
    /// Default: none.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Tags a successful unsafe request (POST, PUT, PATCH, DELETE, ...:
    /// a 2xx or 3xx answer) on this route purges, besides its own URL and
    /// `Location`; placeholders as in `tags`. `["posts", "post-{id}"]` on
    /// `/posts/{id}` makes `PATCH /posts/1` purge the `/posts` listings
    /// tagged `posts`. Default: none.
    #[serde(default)]
    pub invalidate_tags: Vec<String>,
    /// Added to `cache.ignored_query_params` for this route. Default: none.
    #[serde(default)]
    pub ignored_query_params: Vec<String>,
    /// The only query parameters kept for this route, in the key and in
    /// the upstream call alike (an allowlist; the ignored ones are dropped
    /// too): `["page", "q"]` makes `?q=x&utm_id=1&_=17` one entry with
    /// `?q=x`, sent upstream as `?q=x`. `[]` drops the whole query.
    /// Default: unset, every parameter not ignored is kept.
    #[serde(default)]
    pub key_query: Option<Vec<String>>,
    /// Added to `cache.key_headers` for this route. Naming `authorization`
    /// caches per credential: then requests with `Authorization` use the
    /// cache, each seeing only entries stored for the same value, and the
    /// edge is told `private`. Default: none.
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// Caps the `s-maxage` sent to the edge for this route; `0s` keeps the
    /// edge from caching it. Default: `cache.edge_max_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub edge_ttl: Option<Duration>,
    /// Cookies (by name) whose values are part of the key: requests
    /// carrying `Cookie` then use the cache, each value of these cookies
    /// with its own entries, and only these cookies are sent upstream on
    /// cached requests (so what is stored cannot depend on the others).
    /// Default: none.
    #[serde(default)]
    pub key_cookies: Vec<String>,
    /// The upstream's answers on this route do not depend on cookies:
    /// requests carrying `Cookie` use the cache like any other (the
    /// `Cookie` header is still sent upstream). Default `false`: such a
    /// request is answered from, or stored in, the cache only when the
    /// upstream marks the answer `public` or `s-maxage`, or the route keys
    /// on `cookie` or `key_cookies`; otherwise it passes through.
    #[serde(default)]
    pub ignore_cookies: bool,
}

fn yes() -> bool {
    true
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}", describe_figment(.0))]
    Figment(#[from] Box<figment::Error>),
    /// Built by [`invalid`], the one place this message is written.
    #[error("configuration key `{key}`{}: {problem}", env_note(key))]
    Invalid { key: String, problem: String },
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
}

/// The error for configuration key `key` (in config-file form,
/// `upstream.url`, `routes[1].path`): "configuration key `upstream.url`
/// (CACHEGATE_UPSTREAM__URL): problem".
pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The environment variable that sets `key` (a list entry's, `routes[1].path`,
/// is set with its whole list, `CACHEGATE_ROUTES`), as " (VARIABLE)".
fn env_note(key: &str) -> String {
    let key = key.split('[').next().unwrap_or_default();
    if key.is_empty() {
        return String::new();
    }
    format!(
        " (CACHEGATE_{})",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

/// One line per problem, each built by [`invalid`]: the key in
/// config-file form (`upstream.timeout`; a missing or unknown field's own
/// name included) and where the value came from.
fn describe_figment(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            if let figment::error::Kind::MissingField(name) = &e.kind {
                path.push(name.to_string());
            }
            // List entries as the file writes them: `routes[0].path`.
            let mut key = String::new();
            for part in &path {
                if part.bytes().all(|b| b.is_ascii_digit()) {
                    key.push_str(&format!("[{part}]"));
                } else {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(&part.to_ascii_lowercase());
                }
            }
            let problem = match e.metadata.as_ref().map(|m| m.name.to_string()) {
                Some(source) if !source.is_empty() => format!("{} (from {source})", e.kind),
                _ => e.kind.to_string(),
            };
            invalid(key, problem).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Header names as configured under `key`, parsed (lower case).
pub fn header_names(key: &str, names: &[String]) -> Result<Vec<http::HeaderName>, ConfigError> {
    names
        .iter()
        .map(|n| {
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| invalid(key, format!("`{n}` is not a header name")))
        })
        .collect()
}

impl Config {
    /// The layered figment: defaults, then `file` (if given, it must exist;
    /// otherwise `config/cachegate.toml` if present), then `CACHEGATE_*`.
    pub fn figment(file: Option<&Path>) -> Result<Figment, ConfigError> {
        let mut fig = Figment::new();
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::MissingFile(path.to_owned()));
                }
                fig = fig.merge(Toml::file_exact(path));
            }
            None => {
                let default_file = Path::new("config/cachegate.toml");
                if default_file.exists() {
                    fig = fig.merge(Toml::file_exact(default_file));
                }
            }
        }
        // `CACHEGATE_CONFIG` names the file, it is not a key; `CACHEGATE_TEST_*`
        // belongs to the test suite (service endpoints).
        let env = Env::prefixed("CACHEGATE_")
            .filter(|k| {
                let k = k.as_str().to_ascii_lowercase();
                k != "config" && !k.starts_with("test_")
            })
            .split("__");
        Ok(fig.merge(env))
    }

    /// The configuration as TOML that `--config` reads back to the same
    /// configuration, secrets left out: each secret that is set becomes a
    /// comment saying so and naming its environment variable.
    pub fn to_toml(&self) -> Result<String, String> {
        let mut table = toml::Table::try_from(self).map_err(|e| e.to_string())?;
        let mut secrets: Vec<(&str, &str)> = Vec::new();
        if self.serve.purge_token.is_some() {
            secrets.push(("serve", "purge_token"));
        }
        if self.redis.password.is_some() {
            secrets.push(("redis", "password"));
        }
        if cachegate_store::settings::redact_url(&self.redis.url) != self.redis.url {
            secrets.push(("redis", "url"));
        }
        for (section, key) in &secrets {
            if let Some(toml::Value::Table(t)) = table.get_mut(*section) {
                t.remove(*key);
            }
        }
        // Literal upstream.headers values are secrets; references are not.
        let literal_headers: Vec<&String> = self
            .upstream
            .headers
            .0
            .iter()
            .filter(|(_, v)| OwnHeaderSources::is_literal(v))
            .map(|(k, _)| k)
            .collect();
        if let Some(toml::Value::Table(upstream)) = table.get_mut("upstream") {
            if let Some(toml::Value::Table(headers)) = upstream.get_mut("headers") {
                for name in &literal_headers {
                    headers.remove(name.as_str());
                }
            }
        }
        let mut text = toml::to_string(&table).map_err(|e| e.to_string())?;
        if !literal_headers.is_empty() {
            let header = "[upstream.headers]\n";
            let notes: String = literal_headers
                .iter()
                .map(|name| {
                    format!(
                        "# {name} = \"<redacted>\"  (set, not shown: give it again in a file or in CACHEGATE_UPSTREAM__HEADERS)\n"
                    )
                })
                .collect();
            match text.find(header) {
                Some(at) => text.insert_str(at + header.len(), &notes),
                None => text.push_str(&format!("\n{header}{notes}")),
            }
        }
        for (section, key) in secrets {
            let header = format!("[{section}]\n");
            let note = format!(
                "# {key} = \"<redacted>\"  (set, not shown: give it again in a file or as CACHEGATE_{}__{})\n",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            );
            match text.find(&header) {
                Some(at) => text.insert_str(at + header.len(), &note),
                None => text.push_str(&format!("\n{header}{note}")),
            }
        }
        Ok(format!(
            "# cachegate's effective configuration (defaults, file, CACHEGATE_*), as `--config` reads it\n{text}"
        ))
    }

    /// Load and validate.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment(file)?)
    }

    pub fn from_figment(fig: Figment) -> Result<Config, ConfigError> {
        // The one key without a default: figment would say only "missing
        // field `upstream`", naming neither the key nor its variable.
        if let Err(e) = fig.find_value("upstream.url") {
            if matches!(e.kind, figment::error::Kind::MissingField(_)) {
                return Err(invalid(
                    "upstream.url",
                    "is not set: the base URL of the API cachegate sits in front of \
                     (e.g. https://api.example.com/v1), in the file's [upstream] section \
                     or in the environment; it has no default",
                ));
            }
        }
        let config: Config = fig
            .extract()
            .map_err(|e| ConfigError::Figment(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// The backend sections, whichever backends this build has: each is
    /// checked, and one this build cannot use is refused (named by
    /// `backend`, or set away from its defaults).
    fn check_backends(&self) -> Result<(), ConfigError> {
        let setting = |e: cachegate_store::settings::SettingError| invalid(e.key, e.problem);
        self.redis.validate().map_err(setting)?;
        self.dynamodb.validate().map_err(setting)?;
        let built = |kind: BackendKind| match kind {
            BackendKind::Memory => true,
            BackendKind::Redis => cfg!(feature = "redis"),
            BackendKind::Dynamodb => cfg!(feature = "dynamodb"),
        };
        let not_built = |kind: BackendKind| {
            format!(
                "this build of cachegate has no {0} backend (built without the cargo feature `{0}`)",
                kind.as_str()
            )
        };
        if !built(self.backend) {
            return Err(invalid("backend", not_built(self.backend)));
        }
        if !built(BackendKind::Redis) && self.redis != RedisConfig::default() {
            return Err(invalid(
                "redis",
                format!("is set, but {}", not_built(BackendKind::Redis)),
            ));
        }
        if !built(BackendKind::Dynamodb) && self.dynamodb != DynamoConfig::default() {
            return Err(invalid(
                "dynamodb",
                format!("is set, but {}", not_built(BackendKind::Dynamodb)),
            ));
        }
        let store = &self.store;
        for (key, d) in [
            ("store.read_timeout", store.read_timeout),
            ("store.write_timeout", store.write_timeout),
            ("store.purge_timeout", store.purge_timeout),
            ("store.open_for", store.open_for),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be more than 0s"));
            }
        }
        if store.failure_threshold == 0 {
            return Err(invalid("store.failure_threshold", "must be at least 1"));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.role == Role::Invalidator && self.backend == BackendKind::Memory {
            return Err(invalid(
                "role",
                "`invalidator` purges a shared cache, but `backend` is `memory`, which lives \
                 inside each proxy process where no invalidator can reach it: \
                 set `backend` to `redis` or `dynamodb`",
            ));
        }
        if self.upstream.timeout.is_zero() {
            return Err(invalid("upstream.timeout", "must be more than 0s"));
        }
        if self.cache.l1_check.is_zero() {
            return Err(invalid(
                "cache.l1_check",
                "must be more than 0s (set cache.l1_ttl = \"0s\" to turn the L1 off)",
            ));
        }
        if self
            .serve
            .purge_token
            .as_ref()
            .is_some_and(|t| t.len() < 16)
        {
            return Err(invalid(
                "serve.purge_token",
                "must be at least 16 characters",
            ));
        }
        self.serve.check_limits()?;
        self.edge.validate()?;
        self.check_backends()?;
        if self.upstream.connect_timeout.is_zero() {
            return Err(invalid("upstream.connect_timeout", "must be more than 0s"));
        }
        if self.upstream.min_calls > 0 {
            if self.upstream.open_for.is_zero() {
                return Err(invalid(
                    "upstream.open_for",
                    "must be more than 0s (set upstream.min_calls = 0 to turn the breakers off)",
                ));
            }
            if !(1..=100).contains(&self.upstream.failure_rate) {
                return Err(invalid(
                    "upstream.failure_rate",
                    "must be 1 to 100 (percent)",
                ));
            }
            if self.upstream.failure_window < Duration::from_millis(10) {
                return Err(invalid(
                    "upstream.failure_window",
                    "must be at least 10ms (set upstream.min_calls = 0 to turn the breakers off)",
                ));
            }
        }
        if self.upstream.retries > 10 {
            return Err(invalid("upstream.retries", "must be at most 10"));
        }
        for (key, rps) in [
            ("upstream.max_rps", self.upstream.max_rps),
            ("upstream.fallback_rps", self.upstream.fallback_rps),
        ] {
            if let Some(rps) = rps {
                if !(rps.is_finite() && (0.001..=1_000_000.0).contains(&rps)) {
                    return Err(invalid(
                        key,
                        "must be from 0.001 to 1000000 requests a second",
                    ));
                }
            }
        }
        if self.upstream.fallback_rps.is_some() && self.upstream.max_rps.is_none() {
            return Err(invalid("upstream.fallback_rps", "needs upstream.max_rps"));
        }
        if !(1..=100_000).contains(&self.upstream.burst) {
            return Err(invalid("upstream.burst", "must be 1 to 100000"));
        }
        if self.upstream.back_off > self.upstream.max_back_off {
            return Err(invalid(
                "upstream.back_off",
                "must not be longer than upstream.max_back_off",
            ));
        }
        if self.upstream.max_response_bytes.as_u64() == 0 {
            return Err(invalid(
                "upstream.max_response_bytes",
                "must be more than 0",
            ));
        }
        for (key, v) in [
            ("cache.refresh_ahead", self.cache.refresh_ahead),
            ("cache.ttl_jitter", self.cache.ttl_jitter),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(key, "must be a fraction from 0 (off) to below 1"));
            }
        }
        self.cache.check_credential_headers()?;
        if !(1..=10_000).contains(&self.cache.max_tags_per_entry) {
            return Err(invalid("cache.max_tags_per_entry", "must be 1 to 10000"));
        }
        if self.memory.capacity.as_u64() < 1024 * 1024 {
            return Err(invalid("memory.capacity", "must be at least 1MiB"));
        }
        let ns = &self.metrics.namespace;
        if ns.is_empty() || ns.len() > 255 || ns.starts_with("AWS/") {
            return Err(invalid(
                "metrics.namespace",
                "must be 1 to 255 characters and not start with AWS/",
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("routes[{i}].{field}");
            if !r.path.starts_with('/') {
                return Err(invalid(
                    key("path"),
                    format!("`{}` must start with /", r.path),
                ));
            }
            if r.override_upstream && r.ttl.is_none() {
                return Err(invalid(key("ttl"), "override_upstream needs a ttl"));
            }
        }
        Ok(())
    }
}
