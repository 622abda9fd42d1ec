//! The call to the upstream API: a faithful forward of the client request,
//! bounded in time (to the response head, then between body chunks) and
//! size, its body read as it arrives ([`UpstreamBody`]), retried (GET and HEAD only) when no connection
//! could be made, and (idempotent methods) once on a new connection when a
//! connection closed under it before any answer; failures classified for
//! the client. [`breaker`] is one upstream breaker (the guard keeps one per
//! host and per endpoint).

pub mod breaker;
pub mod own_headers;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::Url;

use crate::config::UpstreamConfig;
use crate::error_code::ErrorCode;
use crate::policy::headers::strip_hop_by_hop;

/// What the upstream answered: the head, and the body read whole or still
/// arriving.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: UpstreamBody,
}

/// An upstream response body.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read whole (under Lambda, which answers whole), or made here.
    Full(Bytes),
    /// Still arriving: read chunk by chunk as the client takes it.
    Streaming(BodyReader),
}

impl UpstreamBody {
    /// The whole body, read to its end (bounded as each chunk is).
    pub async fn collect(self) -> Result<Bytes, UpstreamError> {
        match self {
            UpstreamBody::Full(b) => Ok(b),
            UpstreamBody::Streaming(mut reader) => {
                let mut body = BytesMut::new();
                while let Some(chunk) = reader.next().await? {
                    body.extend_from_slice(&chunk);
                }
                Ok(body.freeze())
            }
        }
    }

    /// The length, when known before reading: a whole body's, or the
    /// `Content-Length` of one still arriving.
    pub fn known_len(&self) -> Option<usize> {
        match self {
            UpstreamBody::Full(b) => Some(b.len()),
            UpstreamBody::Streaming(r) => r.content_length,
        }
    }
}

impl From<Bytes> for UpstreamBody {
    fn from(b: Bytes) -> Self {
        UpstreamBody::Full(b)
    }
}

/// The body of an upstream response still arriving. Each chunk must come
/// within the idle timeout (`upstream.timeout`) of the one before, and the
/// whole stays within `upstream.max_response_bytes`.
pub struct BodyReader {
    body: Incoming,
    idle: Duration,
    limit: usize,
    read: usize,
    content_length: Option<usize>,
}

impl std::fmt::Debug for BodyReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyReader")
            .field("read", &self.read)
            .field("content_length", &self.content_length)
            .finish_non_exhaustive()
    }
}

impl BodyReader {
    /// The upstream's `Content-Length`, if it sent one.
    pub fn content_length(&self) -> Option<usize> {
        self.content_length
    }

    /// The next chunk; `None` at the end. Cancel-safe: a chunk is taken
    /// only when it is returned.
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let chunk = loop {
            let frame = match tokio::time::timeout(self.idle, self.body.frame()).await {
                Err(_) => return Err(UpstreamError::Timeout(self.idle)),
                Ok(Some(Err(e))) => {
                    return Err(UpstreamError::Other(format!(
                        "upstream response body broke off: {}",
                        error_chain(&e)
                    )))
                }
                Ok(None) => break None,
                Ok(Some(Ok(frame))) => frame,
            };
            // Trailers are not relayed (nor were they ever stored).
            if let Ok(data) = frame.into_data() {
                break Some(data);
            }
        };
        if let Some(c) = &chunk {
            self.read += c.len();
            if self.read > self.limit {
                return Err(UpstreamError::TooLarge { limit: self.limit });
            }
        }
        Ok(chunk)
    }
}

/// Why there is no upstream answer to relay.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("upstream response body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("upstream request failed: {0}")]
    Other(String),
    /// Not sent: the upstream is being left alone for `retry_in`.
    #[error("{}; retry in {}s", hold.explain(), retry_after_secs(*retry_in))]
    Held { hold: Hold, retry_in: Duration },
}

/// Why the upstream is not being called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A breaker of this instance is open: the upstream host's (transport
    /// failures) or the endpoint's (HTTP failures).
    BreakerOpen(BreakerScope),
    /// The upstream asked to be left alone (a 429, or a 503 with
    /// `Retry-After`), for this scope; this instance or another sharing
    /// the backend was told.
    RetryAfter(HoldScope),
    /// The request budget (`upstream.max_rps`, `max_concurrency`) had no
    /// room within `upstream.queue_wait`.
    Budget,
}

/// Which breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerScope {
    Host,
    Endpoint,
}

/// Whose requests a `Retry-After` holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldScope {
    /// Every request (cachegate's own identity was limited).
    Upstream,
    /// Every request to this endpoint.
    Endpoint,
    /// This client's requests to this endpoint.
    Client,
}

impl Hold {
    /// The RFC 9211 `detail` of an answer given without asking the upstream.
    pub fn detail(self) -> &'static str {
        match self {
            Hold::BreakerOpen(BreakerScope::Host) => "upstream-open-host",
            Hold::BreakerOpen(BreakerScope::Endpoint) => "upstream-open-endpoint",
            Hold::RetryAfter(HoldScope::Upstream) => "upstream-retry-after",
            Hold::RetryAfter(HoldScope::Endpoint) => "upstream-retry-after-endpoint",
            Hold::RetryAfter(HoldScope::Client) => "upstream-retry-after-client",
            Hold::Budget => "upstream-budget",
        }
    }
    fn explain(self) -> &'static str {
        match self {
            Hold::BreakerOpen(BreakerScope::Host) => {
                "connections to the upstream host failed repeatedly; it is not being called"
            }
            Hold::BreakerOpen(BreakerScope::Endpoint) => {
                "this upstream endpoint failed repeatedly and is not being called"
            }
            Hold::RetryAfter(HoldScope::Upstream) => {
                "the upstream asked to be left alone (Retry-After)"
            }
            Hold::RetryAfter(HoldScope::Endpoint) => {
                "this upstream endpoint asked to be left alone (Retry-After)"
            }
            Hold::RetryAfter(HoldScope::Client) => {
                "the upstream limited this client on this endpoint (Retry-After)"
            }
            Hold::Budget => "the upstream request budget (upstream.max_rps) is spent",
        }
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

impl UpstreamError {
    /// 504 for a timeout, 502 for everything else (RFC 9110 §15.6.3, §15.6.5).
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Held { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
    pub fn code(&self) -> ErrorCode {
        match self {
            UpstreamError::Timeout(_) => ErrorCode::UpstreamTimeout,
            UpstreamError::Connect(_) => ErrorCode::UpstreamUnreachable,
            UpstreamError::TooLarge { .. } => ErrorCode::UpstreamResponseTooLarge,
            UpstreamError::Other(_) => ErrorCode::UpstreamError,
            UpstreamError::Held {
                hold: Hold::BreakerOpen(_),
                ..
            } => ErrorCode::UpstreamOpen,
            UpstreamError::Held {
                hold: Hold::RetryAfter(_),
                ..
            } => ErrorCode::UpstreamRetryAfter,
            UpstreamError::Held {
                hold: Hold::Budget, ..
            } => ErrorCode::UpstreamBudget,
        }
    }

    /// A timeout, no connection, or a broken exchange: the upstream's
    /// health is in doubt (a response too large is an answer).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout(_) | UpstreamError::Connect(_) | UpstreamError::Other(_)
        )
    }
}

/// The most an upstream connection reads ahead of the client: hyper's read
/// buffer grows to this (from 8 KiB) while the upstream sends faster than
/// it is taken, and each body chunk comes out of it. hyper's default (about
/// 400 KiB) made 200 clients that stopped reading a large answer hold 200
/// MiB between them; this is 64 KiB, the TCP window's usual size, so a read
/// still takes what one round trip brings.
pub const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One reusable client (connection pool) per process.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: HttpsClient,
    /// The same client without a pool: every request on a new connection.
    /// The one retry after a connection closed under a request goes here,
    /// so it cannot land on another pooled connection closing the same way.
    fresh: HttpsClient,
    timeout: Duration,
    max_response_bytes: usize,
    /// Extra attempts for a GET or HEAD that could not connect.
    retries: u32,
    /// cachegate's own credentials (`upstream.headers`), set on every call.
    own: Option<std::sync::Arc<own_headers::OwnHeaders>>,
    /// Bodies are read whole before the response is returned.
    buffered: bool,
}

impl Upstream {
    /// The client of `upstream`: HTTP/1.1 over TCP or TLS (rustls with
    /// ring, the platform's roots, as reqwest verifies). It follows no
    /// redirect (a proxy relays them), adds no header but `Host`, and has
    /// no total timeout: `timeout` bounds the wait for the response head
    /// (`send_once`) and then each wait for a body chunk (`BodyReader`), so
    /// a long stream that keeps coming is relayed whole.
    pub fn new(cfg: &UpstreamConfig) -> Result<Upstream, crate::StartError> {
        use rustls_platform_verifier::ConfigVerifierExt;
        crate::tls::install_crypto_provider();
        let tls = rustls::ClientConfig::with_platform_verifier()
            .map_err(|e| crate::StartError::Client(e.to_string()))?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(cfg.connect_timeout));
        tcp.set_nodelay(true);
        // reqwest's keepalive probes: a connection a NAT or load balancer
        // dropped silently is found before a request is lost on it.
        tcp.set_keepalive(Some(Duration::from_secs(15)));
        tcp.set_keepalive_interval(Some(Duration::from_secs(15)));
        tcp.set_keepalive_retries(Some(3));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let build = |idle: Option<Duration>, max_idle: usize| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(idle)
                .pool_max_idle_per_host(max_idle)
                .http1_max_buf_size(UPSTREAM_READ_BUFFER)
                .build(connector.clone())
        };
        let client = build(Some(cfg.pool_idle_timeout), usize::MAX);
        let fresh = build(None, 0);
        Ok(Upstream {
            client,
            fresh,
            timeout: cfg.timeout,
            max_response_bytes: cfg.max_response_bytes.as_u64() as usize,
            retries: cfg.retries,
            own: None,
            buffered: false,
        })
    }

    /// Read every body whole before answering (Lambda, whose responses
    /// go out whole anyway).
    pub fn buffered(mut self, buffered: bool) -> Self {
        self.buffered = buffered;
        self
    }

    /// Add cachegate's own credentials (`upstream.headers`) to every call.
    pub fn with_own_headers(
        mut self,
        own: Option<std::sync::Arc<own_headers::OwnHeaders>>,
    ) -> Self {
        self.own = own;
        self
    }

    /// Send a request upstream ([`Upstream::send_once`]) with cachegate's
    /// own credentials, when configured. When the upstream refuses them
    /// (401, 403) and reading them again finds new values (a rotated
    /// secret), an idempotent request without a body is sent once more
    /// with those.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let Some(own) = &self.own else {
            return self.send_once(method, url, headers, body).await;
        };
        own.apply(&mut headers);
        let again = (body.is_empty() && method.is_idempotent())
            .then(|| (method.clone(), url.clone(), headers.clone()));
        let sent = self.send_once(method, url, headers, body).await;
        let refused = matches!(&sent, Ok(r) if matches!(r.status.as_u16(), 401 | 403));
        if refused && own.refused().await {
            if let Some((method, url, mut headers)) = again {
                own.apply(&mut headers);
                tracing::info!("upstream refused cachegate's credentials; sending once more with the values just read");
                return self.send_once(method, url, headers, Bytes::new()).await;
            }
        }
        sent
    }

    /// Send `method url` with `headers` (already stripped of hop-by-hop
    /// headers and `Host`) and `body`, until the response head arrives
    /// (within `upstream.timeout`); its body is read as it is taken
    /// (whole first when `buffered`). A GET
    /// or HEAD that could not connect is tried again, after a jittered
    /// pause, while `upstream.timeout` allows: nothing reached the upstream,
    /// so nothing is repeated. A request of an idempotent method whose
    /// connection closed or reset before its response head arrived (a
    /// pooled connection the server was closing as it was reused) is sent
    /// once more, at once, on a new connection, as nginx does (RFC 9110
    /// §9.2.2 allows repeating idempotent requests). Nothing of a response
    /// had been read, and a failure while reading the body is never retried.
    pub async fn send_once(
        &self,
        method: Method,
        url: Url,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let deadline = Instant::now() + self.timeout;
        let uri: http::Uri = url
            .as_str()
            .parse()
            .map_err(|e| UpstreamError::Other(format!("upstream URL: {e}")))?;
        let retries = if matches!(method, Method::GET | Method::HEAD) {
            self.retries
        } else {
            0
        };
        let idempotent = method.is_idempotent();
        let mut resent = false;
        let mut attempt = 0;
        let resp = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // The last attempt takes the headers; only a retry needs a copy.
            let attempt_headers = if attempt < retries || (idempotent && !resent) {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            // After a closed connection, a new one (and never a third try).
            let client = if resent { &self.fresh } else { &self.client };
            let mut req = http::Request::new(Full::new(body.clone()));
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = attempt_headers;
            let sent = match tokio::time::timeout(left, client.request(req)).await {
                Ok(sent) => sent,
                Err(_) => return Err(UpstreamError::Timeout(self.timeout)),
            };
            match sent {
                Ok(resp) => break resp,
                Err(e) if e.is_connect() && attempt < retries => {
                    let pause = retry_pause(attempt, fastrand::f64());
                    if Instant::now() + pause >= deadline {
                        return Err(self.classify(&e));
                    }
                    tracing::debug!(attempt, ?pause, error = %error_chain(&e), "upstream connect failed; retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(e) if idempotent && !resent && closed_before_answer(&e) => {
                    tracing::debug!(error = %error_chain(&e), "upstream connection closed before an answer; resending on a new connection");
                    resent = true;
                }
                Err(e) => return Err(self.classify(&e)),
            }
        };
        let content_length = resp.body().size_hint().exact().map(|n| n as usize);
        if content_length.is_some_and(|n| n > self.max_response_bytes) {
            return Err(UpstreamError::TooLarge {
                limit: self.max_response_bytes,
            });
        }
        let (head, body) = resp.into_parts();
        let status = head.status;
        let mut headers = head.headers;
        strip_hop_by_hop(&mut headers);
        let reader = BodyReader {
            content_length,
            body,
            idle: self.timeout,
            limit: self.max_response_bytes,
            read: 0,
        };
        let body = if self.buffered {
            UpstreamBody::Full(UpstreamBody::Streaming(reader).collect().await?)
        } else {
            UpstreamBody::Streaming(reader)
        };
        Ok(UpstreamResponse {
            status,
            headers,
            body,
        })
    }

    fn classify(&self, e: &hyper_util::client::legacy::Error) -> UpstreamError {
        if e.is_connect() {
            // Refused, reset, TLS refused, or `upstream.connect_timeout`
            // ran out: no connection, the host's trouble (its breaker),
            // 502 `upstream_unreachable`. The URL is in the configuration;
            // the cause chain says what broke.
            UpstreamError::Connect(error_chain(e))
        } else if timed_out(e) {
            UpstreamError::Timeout(self.timeout)
        } else {
            UpstreamError::Other(error_chain(e))
        }
    }
}

/// Whether an I/O timeout is among the causes of `e`.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether a request failed because its connection closed or reset before
/// the response head was read: hyper's "connection closed before message
/// completed", or a reset or broken pipe while sending or waiting. Not a
/// connect failure (retried apart) nor a timeout.
fn closed_before_answer(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() || timed_out(e) {
        return false;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The pause before retry `attempt` (0 for the first): 25 ms doubling,
/// with "equal jitter" (half fixed, half random by `rand` in [0, 1)) so
/// instances that lost the upstream together do not return together.
fn retry_pause(attempt: u32, rand: f64) -> Duration {
    let full = Duration::from_millis(25u64 << attempt.min(10));
    full / 2 + full.mul_f64(rand.clamp(0.0, 1.0) / 2.0)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_pauses_double_with_bounded_jitter() {
        assert_eq!(retry_pause(0, 0.0), Duration::from_micros(12_500));
        assert_eq!(retry_pause(0, 1.0), Duration::from_millis(25));
        assert_eq!(retry_pause(1, 0.0), Duration::from_millis(25));
        assert_eq!(retry_pause(2, 0.5), Duration::from_millis(75));
        assert!(retry_pause(u32::MAX, 1.0) <= Duration::from_millis(25 << 10));
    }

    #[test]
    fn retry_after_seconds_round_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(3_001)), 4);
    }
}
