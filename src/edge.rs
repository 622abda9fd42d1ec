//! The edge layer: CloudFront in front of the proxy (docs/invalidation.md).
//!
//! Two halves. Responses served from an entry carry its tags in the header
//! the distribution's `CacheTagConfig` names ([`Edge::tag_response`]), so
//! CloudFront stores them with the object. Every purge also becomes a
//! CloudFront invalidation: tags as `#tag` items, URLs as paths (a path
//! invalidation covers every query string of the path), sent with
//! `CreateInvalidation`.
//!
//! Where the call is made depends on who purges ([`Dispatch`]):
//! - `cachegate purge` and the invalidator role call CloudFront at once
//!   (one call for everything one command or one SQS batch names);
//! - `cachegate serve` hands purges to a background task that batches
//!   everything within `edge.batch_window` into one call;
//! - the Lambda proxy never calls CloudFront on a request's path: a write's
//!   purge is sent to the invalidator's SQS queue (`edge.invalidation_queue_url`),
//!   and the invalidator calls CloudFront.
//!
//! Throttling (`TooManyInvalidationsInProgress`, `Throttling`) and
//! transient failures are retried with jittered exponential backoff, with
//! the same `CallerReference`, so a retry of a call that did reach
//! CloudFront cannot invalidate twice.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_cloudfront::error::ProvideErrorMetadata;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::config::{invalid_key, ConfigError};

/// CloudFront's limits on the cache tags of one object.
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_BYTES: usize = 256;
/// Most items one `CreateInvalidation` may name (and most paths in
/// progress at once per distribution).
pub const MAX_PATHS_PER_CALL: usize = 3000;
/// Paths invalidated free each month per account, then [`USD_PER_PATH`].
pub const FREE_PATHS_PER_MONTH: u64 = 1000;
pub const USD_PER_PATH: f64 = 0.005;

/// The `[edge]` section: CloudFront in front of cachegate.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// The CloudFront distribution in front of this proxy. Set, every purge
    /// (CLI, invalidator, purge endpoint, writes) also invalidates it, and
    /// responses carry their tags in `cache_tag_header`. Default: unset.
    /// Env: `CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID`.
    pub cloudfront_distribution_id: Option<String>,
    /// The invalidator's SQS queue. Set, the proxy running in Lambda (and
    /// `cachegate serve`) sends the purges its writes cause there instead
    /// of calling CloudFront itself; it also turns on `cache_tag_header`.
    /// Required in Lambda when the distribution is set. Default: unset.
    /// Env: `CACHEGATE_EDGE__INVALIDATION_QUEUE_URL`.
    pub invalidation_queue_url: Option<String>,
    /// The response header carrying an entry's tags, as the distribution's
    /// `CacheTagConfig.HeaderName` names it. Sent only when the edge is
    /// configured (either key above). Default `Cache-Tag`.
    pub cache_tag_header: String,
    /// `cachegate serve`: how long purges are collected into one
    /// `CreateInvalidation`. Default `2s`; at most `60s`.
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Tries per `CreateInvalidation` (throttling, transient errors), with
    /// jittered exponential backoff from 500 ms (at most 20 s between
    /// tries). Default `6`.
    pub max_attempts: u32,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            cloudfront_distribution_id: None,
            invalidation_queue_url: None,
            cache_tag_header: "Cache-Tag".into(),
            batch_window: Duration::from_secs(2),
            max_attempts: 6,
        }
    }
}

impl std::fmt::Debug for EdgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Nothing secret here; spelled out so the fields stay in order.
        f.debug_struct("EdgeConfig")
            .field(
                "cloudfront_distribution_id",
                &self.cloudfront_distribution_id,
            )
            .field("invalidation_queue_url", &self.invalidation_queue_url)
            .field("cache_tag_header", &self.cache_tag_header)
            .field("batch_window", &self.batch_window)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl EdgeConfig {
    /// Whether an edge sits in front: responses then carry their tags.
    pub fn is_configured(&self) -> bool {
        self.cloudfront_distribution_id.is_some() || self.invalidation_queue_url.is_some()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.cloudfront_distribution_id {
            if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(invalid_key(
                    "edge.cloudfront_distribution_id",
                    format!(
                        "`{id}` is not a distribution id (letters and digits, e.g. E2QWRUHAPOMQZL)"
                    ),
                ));
            }
        }
        if let Some(url) = &self.invalidation_queue_url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(invalid_key(
                        "edge.invalidation_queue_url",
                        format!("`{url}` is not an http(s) queue URL"),
                    ))
                }
            }
        }
        if HeaderName::from_bytes(self.cache_tag_header.as_bytes()).is_err() {
            return Err(invalid_key(
                "edge.cache_tag_header",
                format!("`{}` is not a header name", self.cache_tag_header),
            ));
        }
        if self.batch_window > Duration::from_secs(60) {
            return Err(invalid_key("edge.batch_window", "must be at most 60s"));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(invalid_key("edge.max_attempts", "must be 1 to 20"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Tags and paths as CloudFront takes them
// ---------------------------------------------------------------------------

/// A tag as CloudFront can store it: bytes outside ASCII 33–126, the comma
/// (the header's separator) and `%` (so the escape is unambiguous) are
/// percent-encoded, the same way in the header and in the `#tag`
/// invalidation, so an escaped tag still purges. `None` when the result is
/// longer than [`MAX_TAG_BYTES`]: such a tag is not sent (and not
/// invalidated at the edge; the purge output says so).
pub fn edge_tag(tag: &str) -> Option<String> {
    let mut out = String::with_capacity(tag.len());
    for b in tag.bytes() {
        if (33..=126).contains(&b) && b != b',' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    (!out.is_empty() && out.len() <= MAX_TAG_BYTES).then_some(out)
}

/// The prefix of the URL tags the proxy gives every entry (`url:` and the
/// upstream path and query): they are purged as paths, not as tags.
const URL_TAG_PREFIX: &str = "url:";

/// The `Cache-Tag` value for an entry's tags: its route tags and surrogate
/// keys (not its URL tag), escaped by [`edge_tag`], the first
/// [`MAX_TAGS`] in the entry's (sorted) order. Returns the value, if any,
/// and the tags left out.
pub fn cache_tag_value(tags: &[String]) -> (Option<HeaderValue>, Vec<&str>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for tag in tags.iter().filter(|t| !t.starts_with(URL_TAG_PREFIX)) {
        match edge_tag(tag) {
            Some(t) if kept.len() < MAX_TAGS => kept.push(t),
            _ => dropped.push(tag.as_str()),
        }
    }
    kept.dedup();
    let value = (!kept.is_empty())
        .then(|| HeaderValue::from_str(&kept.join(",")).expect("escaped to visible ASCII"));
    (value, dropped)
}

/// The edge path of an upstream path: the client path, which is the
/// upstream path without the base path (`/v1/items/1` → `/items/1` for an
/// upstream `https://api/v1`). A `*` is escaped: in an invalidation path it
/// would be a wildcard.
fn edge_path(upstream_path_and_query: &str, base_prefix: &str) -> Option<String> {
    let path = upstream_path_and_query
        .split_once('?')
        .map_or(upstream_path_and_query, |(p, _)| p);
    let path = path.strip_prefix(base_prefix)?;
    if !path.starts_with('/') {
        return None;
    }
    Some(path.replace('*', "%2A"))
}

/// What a set of purged tags becomes at the edge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeItems {
    /// Invalidation items: `/paths` and `#tags`, sorted, unique.
    pub items: BTreeSet<String>,
    /// Tags that cannot be CloudFront tags (longer than 256 bytes escaped).
    pub skipped: Vec<String>,
}

impl EdgeItems {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn extend(&mut self, other: EdgeItems) {
        self.items.extend(other.items);
        self.skipped.extend(other.skipped);
    }
}

// ---------------------------------------------------------------------------
// The edge: where invalidations go
// ---------------------------------------------------------------------------

/// Who asks for an invalidation, which decides how it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The caller waits for CloudFront's answer (CLI, invalidator).
    Now,
    /// Batched by serve's background task or, in Lambda, sent to the
    /// invalidator's queue; the caller does not wait for CloudFront.
    Background,
}

/// What the edge did with a purge, for the purge report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    /// Paths (`/path`, `#tag`) sent to CloudFront, or handed on to be sent.
    pub paths: Vec<String>,
    /// The invalidation CloudFront created (when sent at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidation_id: Option<String>,
    /// `sent`, `batched` (serve's background task sends it within
    /// `edge.batch_window`) or `queued` (to the invalidator's queue).
    pub status: String,
    /// What these paths cost once the month's free paths are used up.
    pub usd_beyond_free_tier: f64,
    /// Tags not invalidated at the edge (too long for CloudFront).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

impl EdgeReport {
    fn new(items: &EdgeItems, status: &str) -> EdgeReport {
        EdgeReport {
            paths: items.items.iter().cloned().collect(),
            invalidation_id: None,
            status: status.into(),
            usd_beyond_free_tier: cost_usd(items.items.len()),
            skipped: items.skipped.clone(),
        }
    }

    /// One line for `cachegate purge`.
    pub fn summary(&self) -> String {
        let n = self.paths.len();
        let what = match (self.status.as_str(), &self.invalidation_id) {
            ("sent", Some(id)) => format!("sent in invalidation {id}"),
            (status, _) => status.to_owned(),
        };
        let mut line = format!(
            "cloudfront: {n} path{} {what} ({:.3} USD beyond the {FREE_PATHS_PER_MONTH} free paths a month, at {USD_PER_PATH} USD a path)",
            if n == 1 { "" } else { "s" },
            self.usd_beyond_free_tier
        );
        if !self.skipped.is_empty() {
            line.push_str(&format!(
                "; not invalidated at the edge (tags over {MAX_TAG_BYTES} bytes): {}",
                self.skipped.join(", ")
            ));
        }
        line
    }
}

pub fn cost_usd(paths: usize) -> f64 {
    paths as f64 * USD_PER_PATH
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("CloudFront CreateInvalidation on {distribution}: {message}")]
    CloudFront {
        distribution: String,
        message: String,
    },
    #[error("sending to the invalidation queue: {0}")]
    Queue(String),
    #[error("{0}")]
    Config(String),
}

/// The edge in front of this process: how its responses are tagged and
/// where its invalidations go. One per process.
pub struct Edge {
    header: HeaderName,
    /// The upstream base path (no trailing `/`), which edge paths lack.
    base_prefix: String,
    cloudfront: Option<Arc<CloudFront>>,
    queue: Option<Queue>,
    /// Serve's batching task; `None` elsewhere.
    batcher: Option<tokio::sync::mpsc::UnboundedSender<EdgeItems>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("header", &self.header)
            .field(
                "distribution",
                &self.cloudfront.as_ref().map(|c| &c.distribution_id),
            )
            .field("queue", &self.queue.as_ref().map(|q| &q.url))
            .field("batched", &self.batcher.is_some())
            .finish()
    }
}

/// Where this process runs, as far as the edge is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// `cachegate purge`, the invalidator role: calls CloudFront itself.
    Direct,
    /// `cachegate serve`: a background task batches the calls.
    Serve,
    /// The Lambda proxy: nothing may run after a response; writes enqueue.
    LambdaProxy,
}

impl Edge {
    /// The edge for `config`, or `None` when none is configured. Builds the
    /// SDK clients (no request is made) and, in serve mode, starts the
    /// batching task.
    pub async fn build(
        config: &EdgeConfig,
        upstream_base: &reqwest::Url,
        runs: Runs,
    ) -> Result<Option<Arc<Edge>>, EdgeError> {
        if !config.is_configured() {
            return Ok(None);
        }
        let header = HeaderName::from_bytes(config.cache_tag_header.as_bytes())
            .map_err(|e| EdgeError::Config(format!("edge.cache_tag_header: {e}")))?;
        let sdk = || async {
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .load()
                .await
        };
        let cloudfront = match (&config.cloudfront_distribution_id, runs) {
            // The Lambda proxy never calls CloudFront.
            (Some(_), Runs::LambdaProxy) => None,
            (Some(id), _) => Some(Arc::new(CloudFront::new(
                &sdk().await,
                id,
                config.max_attempts,
            ))),
            (None, _) => None,
        };
        let queue = match (&config.invalidation_queue_url, runs) {
            // The invalidator reads this queue: sending to it would loop.
            (_, Runs::Direct) => None,
            (Some(url), _) => Some(Queue {
                client: aws_sdk_sqs::Client::new(&sdk().await),
                url: url.clone(),
            }),
            (None, _) => None,
        };
        if runs == Runs::LambdaProxy
            && config.cloudfront_distribution_id.is_some()
            && queue.is_none()
        {
            return Err(EdgeError::Config(
                "configuration key `edge.invalidation_queue_url`: the proxy in Lambda sends \
                 CloudFront invalidations to the invalidator's queue (it never calls CloudFront \
                 on a request's path): set it, or unset edge.cloudfront_distribution_id"
                    .into(),
            ));
        }
        let batcher = match (&cloudfront, &queue, runs) {
            (Some(cf), None, Runs::Serve) => Some(spawn_batcher(cf.clone(), config.batch_window)),
            _ => None,
        };
        Ok(Some(Arc::new(Edge {
            header,
            base_prefix: upstream_base.path().trim_end_matches('/').to_owned(),
            cloudfront,
            queue,
            batcher,
        })))
    }

    /// Put the entry's tags in the cache-tag header (replacing one the
    /// upstream sent under that name: ours includes its tags).
    pub fn tag_response(&self, headers: &mut HeaderMap, tags: &[String]) {
        let (value, dropped) = cache_tag_value(tags);
        if !dropped.is_empty() {
            tracing::debug!(
                header = %self.header,
                dropped = ?dropped,
                "tags left out of the cache-tag header (over {MAX_TAGS} tags or {MAX_TAG_BYTES} bytes)"
            );
        }
        match value {
            Some(v) => headers.insert(self.header.clone(), v),
            None => headers.remove(&self.header),
        };
    }

    /// The invalidation items for purged tags: URL tags become their edge
    /// paths, other tags `#tag`.
    pub fn items_for(&self, tags: &[String]) -> EdgeItems {
        let mut items = EdgeItems::default();
        for tag in tags {
            if let Some(upstream) = tag.strip_prefix(URL_TAG_PREFIX) {
                if let Some(path) = edge_path(upstream, &self.base_prefix) {
                    items.items.insert(path);
                }
            } else {
                match edge_tag(tag) {
                    Some(t) => {
                        items.items.insert(format!("#{t}"));
                    }
                    None => items.skipped.push(tag.clone()),
                }
            }
        }
        items
    }

    /// Invalidate what purging `tags` removed, the way `dispatch` says.
    /// `None` when this process has nowhere to send it (a queue-only
    /// configuration in the CLI, say).
    pub async fn invalidate(
        &self,
        tags: &[String],
        dispatch: Dispatch,
    ) -> Result<Option<EdgeReport>, EdgeError> {
        let items = self.items_for(tags);
        if items.is_empty() {
            return Ok(None);
        }
        match (dispatch, &self.batcher, &self.queue, &self.cloudfront) {
            (Dispatch::Background, Some(tx), _, _) => {
                let report = EdgeReport::new(&items, "batched");
                // The task runs as long as the process; a send can only
                // fail while it shuts down.
                let _ = tx.send(items);
                Ok(Some(report))
            }
            (Dispatch::Background, None, Some(queue), _) => {
                queue.send(tags, &self.base_prefix).await?;
                Ok(Some(EdgeReport::new(&items, "queued")))
            }
            (_, _, _, Some(cf)) => {
                let id = cf.invalidate(&items.items).await?;
                let mut report = EdgeReport::new(&items, "sent");
                report.invalidation_id = id;
                Ok(Some(report))
            }
            (Dispatch::Now, _, Some(queue), None) => {
                queue.send(tags, &self.base_prefix).await?;
                Ok(Some(EdgeReport::new(&items, "queued")))
            }
            _ => Ok(None),
        }
    }
}

/// A write's purges at the edge: batched in serve, enqueued for the
/// invalidator from Lambda; a failure is logged (the write succeeded, and
/// the edge keeps the old object until its TTL at worst).
pub async fn after_write(edge: &Edge, purged: &[String]) {
    if let Err(e) = edge.invalidate(purged, Dispatch::Background).await {
        tracing::warn!(error = %e, "edge invalidation after a write failed");
    }
}

/// The background task of `cachegate serve`: everything submitted within
/// `window` of the first item becomes one call (deduplicated).
fn spawn_batcher(
    cloudfront: Arc<CloudFront>,
    window: Duration,
) -> tokio::sync::mpsc::UnboundedSender<EdgeItems> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<EdgeItems>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = first.items;
            let deadline = tokio::time::Instant::now() + window;
            while let Ok(Some(more)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                batch.extend(more.items);
            }
            match cloudfront.invalidate(&batch).await {
                Ok(id) => tracing::info!(
                    paths = batch.len(),
                    invalidation = id.as_deref().unwrap_or("?"),
                    usd_beyond_free_tier = cost_usd(batch.len()),
                    "CloudFront invalidation sent"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, paths = ?batch, "CloudFront invalidation failed; the edge keeps these until their TTL")
                }
            }
        }
    });
    tx
}

/// The invalidator's SQS queue, fed by a Lambda proxy.
struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl Queue {
    /// One message per write: a purge request (`{"urls": [...], "tags": [...]}`)
    /// for what the write purged. The invalidator purges the shared backend
    /// once more (idempotent) and then CloudFront.
    async fn send(&self, tags: &[String], base_prefix: &str) -> Result<(), EdgeError> {
        let mut request = crate::invalidate::PurgeRequest::default();
        for tag in tags {
            match tag.strip_prefix(URL_TAG_PREFIX) {
                Some(upstream) => {
                    if let Some(path) = upstream.strip_prefix(base_prefix) {
                        request.urls.push(path.to_owned());
                    }
                }
                None => request.tags.push(tag.clone()),
            }
        }
        let body = serde_json::to_string(&request).expect("plain struct");
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| EdgeError::Queue(describe(&e)))?;
        Ok(())
    }
}

/// A CloudFront distribution and the client that invalidates it.
struct CloudFront {
    client: aws_sdk_cloudfront::Client,
    distribution_id: String,
    max_attempts: u32,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(20);

impl CloudFront {
    fn new(sdk: &aws_config::SdkConfig, distribution_id: &str, max_attempts: u32) -> CloudFront {
        // CloudFront is global; its API signs for us-east-1 whatever the
        // process's region. Retries are ours (below): the SDK's would not
        // know TooManyInvalidationsInProgress.
        let mut conf = aws_sdk_cloudfront::config::Builder::from(sdk)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            );
        if sdk.region().is_none() {
            conf = conf.region(aws_config::Region::from_static("us-east-1"));
        }
        CloudFront {
            client: aws_sdk_cloudfront::Client::from_conf(conf.build()),
            distribution_id: distribution_id.to_owned(),
            max_attempts,
        }
    }

    /// One `CreateInvalidation` per [`MAX_PATHS_PER_CALL`] items, each
    /// retried on throttling. Returns the (last) invalidation id.
    async fn invalidate(&self, items: &BTreeSet<String>) -> Result<Option<String>, EdgeError> {
        let items: Vec<String> = items.iter().cloned().collect();
        let mut last = None;
        for chunk in items.chunks(MAX_PATHS_PER_CALL) {
            last = self.create_invalidation(chunk).await?;
        }
        Ok(last)
    }

    async fn create_invalidation(&self, paths: &[String]) -> Result<Option<String>, EdgeError> {
        use aws_sdk_cloudfront::types::{InvalidationBatch, Paths};
        let err = |message: String| EdgeError::CloudFront {
            distribution: self.distribution_id.clone(),
            message,
        };
        let batch = InvalidationBatch::builder()
            // Unique per batch, kept across its retries: CloudFront answers
            // a repeated reference with the invalidation it already made.
            .caller_reference(format!("cachegate-{}", uuid::Uuid::new_v4()))
            .paths(
                Paths::builder()
                    .quantity(paths.len() as i32)
                    .set_items(Some(paths.to_vec()))
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            )
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut backoff = BACKOFF_FIRST;
        let mut attempt = 1;
        loop {
            let sent = self
                .client
                .create_invalidation()
                .distribution_id(&self.distribution_id)
                .invalidation_batch(batch.clone())
                .send()
                .await;
            match sent {
                Ok(out) => return Ok(out.invalidation().map(|i| i.id().to_owned())),
                Err(e) if attempt < self.max_attempts && retryable(&e) => {
                    // Equal jitter: half the backoff, plus up to as much again.
                    let half = backoff / 2;
                    let wait = half + half.mul_f64(fastrand::f64());
                    tracing::info!(
                        error = %describe(&e),
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        "CloudFront CreateInvalidation throttled or failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    attempt += 1;
                }
                Err(e) => {
                    return Err(err(format!(
                        "{} (after {attempt} attempt{})",
                        describe(&e),
                        if attempt == 1 { "" } else { "s" }
                    )))
                }
            }
        }
    }
}

/// Throttling, and failures that say nothing about the request itself
/// (connection, timeout, a 5xx).
fn retryable<E: ProvideErrorMetadata>(
    e: &aws_sdk_cloudfront::error::SdkError<E, aws_sdk_cloudfront::config::http::HttpResponse>,
) -> bool {
    use aws_sdk_cloudfront::error::SdkError;
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => {
            matches!(
                s.err().code(),
                Some(
                    "TooManyInvalidationsInProgress"
                        | "Throttling"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                        | "ServiceUnavailable"
                        | "InternalError"
                )
            ) || s.raw().status().as_u16() >= 500
        }
        _ => false,
    }
}

/// The error code and message, or the error chain when there is none.
fn describe<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: &aws_sdk_cloudfront::error::SdkError<E, R>,
) -> String {
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_escaped_into_cloudfronts_alphabet_or_left_out() {
        assert_eq!(edge_tag("item-1").as_deref(), Some("item-1"));
        assert_eq!(edge_tag("a b,c%").as_deref(), Some("a%20b%2Cc%25"));
        assert_eq!(edge_tag("café").as_deref(), Some("caf%C3%A9"));
        assert_eq!(edge_tag(&"x".repeat(256)).map(|t| t.len()), Some(256));
        assert_eq!(edge_tag(&"x".repeat(257)), None);
        // Escaping counts: 86 spaces are 258 bytes escaped.
        assert_eq!(edge_tag(&" ".repeat(86)), None);
    }

    #[test]
    fn the_header_names_route_tags_and_surrogate_keys_not_the_url_tag() {
        let mut tags: Vec<String> = vec!["url:/v1/posts".into(), "posts".into(), "a b".into()];
        let (v, dropped) = cache_tag_value(&tags);
        assert_eq!(v.unwrap(), "posts,a%20b");
        assert!(dropped.is_empty());
        tags.extend((0..60).map(|i| format!("t{i:02}")));
        tags.push("y".repeat(300));
        let (v, dropped) = cache_tag_value(&tags);
        assert_eq!(v.unwrap().to_str().unwrap().split(',').count(), MAX_TAGS);
        assert_eq!(dropped.len(), 2 + 60 - MAX_TAGS + 1);
        assert!(dropped.contains(&"y".repeat(300).as_str()));
        assert_eq!(cache_tag_value(&["url:/a".into()]).0, None);
    }

    #[test]
    fn url_tags_become_client_paths_without_query_or_base() {
        assert_eq!(
            edge_path("/v1/items/1?lang=en", "/v1"),
            Some("/items/1".into())
        );
        assert_eq!(edge_path("/items/1", ""), Some("/items/1".into()));
        assert_eq!(edge_path("/v1", "/v1"), None);
        assert_eq!(edge_path("/other/x", "/v1"), None);
        assert_eq!(edge_path("/a*b", ""), Some("/a%2Ab".into()));
    }

    #[test]
    fn bad_values_name_their_key() {
        let check = |c: EdgeConfig| c.validate().unwrap_err().to_string();
        let base = EdgeConfig::default();
        assert!(check(EdgeConfig {
            cloudfront_distribution_id: Some("E1/../x".into()),
            ..base.clone()
        })
        .contains("edge.cloudfront_distribution_id"));
        assert!(check(EdgeConfig {
            cache_tag_header: "Cache Tag".into(),
            ..base.clone()
        })
        .contains("edge.cache_tag_header"));
        assert!(check(EdgeConfig {
            invalidation_queue_url: Some("queue".into()),
            ..base.clone()
        })
        .contains("edge.invalidation_queue_url"));
        assert!(check(EdgeConfig {
            max_attempts: 0,
            ..base.clone()
        })
        .contains("edge.max_attempts"));
        assert!(base.validate().is_ok() && !base.is_configured());
    }

    #[test]
    fn cost_is_half_a_cent_a_path() {
        assert_eq!(cost_usd(0), 0.0);
        assert!((cost_usd(3) - 0.015).abs() < 1e-9);
    }
}
