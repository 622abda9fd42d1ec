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
//! The SDK half (CloudFront, SQS, the batching task) is [`aws`], behind
//! the `edge` cargo feature, so a build without it carries no AWS SDK for
//! the edge; this file is the pure half (tags, paths, reports).
//!
//! Throttling (`TooManyInvalidationsInProgress`, `Throttling`) and
//! transient failures are retried with jittered exponential backoff, with
//! the same `CallerReference`, so a retry of a call that did reach
//! CloudFront cannot invalidate twice.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::config::{invalid_key, ConfigError};

#[cfg(feature = "edge")]
mod aws;

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
#[derive(Clone, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// Request headers the cache in front keys on (lower case), for a
    /// cache that keys only on what it is told (CloudFront keys on what
    /// its cache policy names, whatever `Vary` says). Set, an answer keyed
    /// on any other request header (route `key_headers`,
    /// `cache.key_headers`, the upstream's `Vary`) goes out `private`, so
    /// that the edge never stores what it cannot tell apart; cachegate
    /// still caches it. Unset (the default) with CloudFront configured
    /// (either key below), `["accept-encoding"]`, what template.yaml's
    /// cache policy keys on. Unset without it, the next cache is taken to
    /// honour `Vary` as RFC 9111 §4.1 requires: the upstream's own `Vary`
    /// goes out as it came, and only answers keyed on cachegate's own key
    /// headers go out `private`. template.yaml sets `["accept-encoding"]`
    /// with its CloudFront distribution.
    /// Env: `CACHEGATE_EDGE__KEY_HEADERS` (e.g. `["accept-encoding","x-tenant"]`).
    pub key_headers: Option<Vec<String>>,
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
            key_headers: None,
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
            .field("key_headers", &self.key_headers)
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
pub(crate) const URL_TAG_PREFIX: &str = "url:";

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
    #[cfg_attr(not(feature = "edge"), allow(dead_code))]
    pub(crate) fn new(items: &EdgeItems, status: &str) -> EdgeReport {
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
    /// The SDK clients and serve's batching task.
    #[cfg(feature = "edge")]
    sinks: aws::Sinks,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Edge");
        d.field("header", &self.header);
        #[cfg(feature = "edge")]
        d.field("sinks", &self.sinks);
        d.finish()
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
        #[cfg(not(feature = "edge"))]
        {
            let _ = (header, upstream_base, runs);
            Err(EdgeError::Config(
                "configuration keys `edge.*`: this cachegate was built without the `edge` \
                 feature (CloudFront and SQS clients)"
                    .into(),
            ))
        }
        #[cfg(feature = "edge")]
        Ok(Some(Arc::new(Edge {
            header,
            base_prefix: upstream_base.path().trim_end_matches('/').to_owned(),
            sinks: aws::Sinks::build(config, runs).await?,
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
        #[cfg(feature = "edge")]
        return self
            .sinks
            .invalidate(items, tags, &self.base_prefix, dispatch)
            .await;
        #[cfg(not(feature = "edge"))]
        {
            let _ = dispatch;
            Ok(None)
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
