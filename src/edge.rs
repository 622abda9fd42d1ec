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

use http::{HeaderMap, HeaderName, HeaderValue};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;

use crate::config::EdgeConfig;
use crate::key::{URL_PREFIX_TAG_PREFIX, URL_TAG_PREFIX};

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
    let out = utf8_percent_encode(tag, NOT_IN_A_CLOUDFRONT_TAG).to_string();
    (!out.is_empty() && out.len() <= MAX_TAG_BYTES).then_some(out)
}

/// What [`edge_tag`] escapes (with every non-ASCII byte): controls, space,
/// `,` and `%`.
const NOT_IN_A_CLOUDFRONT_TAG: &AsciiSet = &CONTROLS.add(b' ').add(b',').add(b'%');

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    /// Paths (`/path`, `#tag`) sent to CloudFront, or handed on to be sent.
    pub paths: Vec<String>,
    /// The invalidation CloudFront created (when sent at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidation_id: Option<String>,
    pub status: EdgeStatus,
    /// What these paths cost once the month's free paths are used up.
    pub usd_beyond_free_tier: f64,
    /// Tags not invalidated at the edge (too long for CloudFront).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// Where a purge's edge invalidation went; serialised in lower case
/// (`"status": "sent"`) in purge reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeStatus {
    /// Sent to CloudFront, which answered with an invalidation id.
    Sent,
    /// Handed to serve's background task, which sends it within
    /// `edge.batch_window`.
    Batched,
    /// Sent to the invalidator's queue.
    Queued,
}

impl EdgeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeStatus::Sent => "sent",
            EdgeStatus::Batched => "batched",
            EdgeStatus::Queued => "queued",
        }
    }
}

impl EdgeReport {
    #[cfg_attr(not(feature = "edge"), allow(dead_code))]
    pub(crate) fn new(items: &EdgeItems, status: EdgeStatus) -> EdgeReport {
        EdgeReport {
            paths: items.items.iter().cloned().collect(),
            invalidation_id: None,
            status,
            usd_beyond_free_tier: cost_usd(items.items.len()),
            skipped: items.skipped.clone(),
        }
    }

    /// One line for `cachegate purge`.
    pub fn summary(&self) -> String {
        let n = self.paths.len();
        let what = match (self.status, &self.invalidation_id) {
            (EdgeStatus::Sent, Some(id)) => format!("sent in invalidation {id}"),
            (status, _) => status.as_str().to_owned(),
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

/// Hours in an average month (365.25 × 24 / 12).
const HOURS_PER_MONTH: u64 = 730;

/// The most paths writes can invalidate in a month under
/// `edge.write_paths_per_hour`, and what that costs past the free tier.
pub fn write_cap_per_month(paths_per_hour: u32) -> (u64, f64) {
    let paths = u64::from(paths_per_hour) * HOURS_PER_MONTH;
    let billed = paths.saturating_sub(FREE_PATHS_PER_MONTH);
    (paths, billed as f64 * USD_PER_PATH)
}

/// Paths writes would have invalidated but `edge.write_paths_per_hour`
/// left out (the `cachegate_edge_write_paths_dropped_total` metric).
static WRITE_PATHS_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn write_paths_dropped() -> u64 {
    WRITE_PATHS_DROPPED.load(std::sync::atomic::Ordering::Relaxed)
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
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The edge in front of this process: how its responses are tagged and
/// where its invalidations go. One per process.
pub struct Edge {
    header: HeaderName,
    /// The upstream base path (no trailing `/`), which edge paths lack.
    base_prefix: String,
    /// `edge.write_paths_per_hour`, and `edge.batch_window`: a path a
    /// write invalidated that recently is not sent (or counted) again.
    write_paths_per_hour: u32,
    batch_window: std::time::Duration,
    /// Write-caused edge items sent recently, and when (this process).
    recent_writes: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
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
    /// The edge for `config`, or `None` when none is configured; `header`
    /// is `config.cache_tag_header` parsed. Builds the
    /// SDK clients (no request is made) and, in serve mode, starts the
    /// batching task.
    pub async fn build(
        config: &EdgeConfig,
        header: HeaderName,
        upstream_base: &reqwest::Url,
        runs: Runs,
    ) -> Result<Option<Arc<Edge>>, EdgeError> {
        if !config.is_configured() {
            return Ok(None);
        }
        #[cfg(not(feature = "edge"))]
        {
            let _ = (header, upstream_base, runs);
            Err(EdgeError::Config(crate::config::invalid(
                "edge",
                "is set, but this cachegate was built without the `edge` feature \
                 (CloudFront and SQS clients)",
            )))
        }
        #[cfg(feature = "edge")]
        {
            let (paths, usd) = write_cap_per_month(config.write_paths_per_hour);
            tracing::info!(
                write_paths_per_hour = config.write_paths_per_hour,
                paths_per_month = paths,
                usd_per_month_beyond_free_tier = usd,
                "edge: writes invalidate at most {} CloudFront paths an hour across instances: at most {paths} paths a month, {usd:.2} USD beyond the {FREE_PATHS_PER_MONTH} free (edge.write_paths_per_hour)",
                config.write_paths_per_hour,
            );
            Ok(Some(Arc::new(Edge {
                header,
                base_prefix: upstream_base.path().trim_end_matches('/').to_owned(),
                write_paths_per_hour: config.write_paths_per_hour,
                batch_window: config.batch_window,
                recent_writes: std::sync::Mutex::default(),
                sinks: aws::Sinks::build(config, runs).await?,
            })))
        }
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
            } else if let Some(upstream) = tag.strip_prefix(URL_PREFIX_TAG_PREFIX) {
                // A purge by prefix: one wildcard path (a `*` may only end
                // a CloudFront path; any inside is escaped).
                if let Some(path) = edge_path(upstream, &self.base_prefix) {
                    items.items.insert(format!("{path}*"));
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

/// The shared budget of write-caused edge paths (permits live in their
/// own namespace in the backend).
pub fn write_budget_key() -> cachegate_store::StoreKey {
    cachegate_store::StoreKey::hash("edge-write-paths", ["cloudfront"])
}

impl Edge {
    /// `edge.write_paths_per_hour` as a rate budget (burst: one hour's
    /// worth, so a quiet hour's paths can go at once); `None` for 0.
    pub fn write_budget(&self) -> Option<cachegate_store::Rate> {
        (self.write_paths_per_hour > 0).then(|| {
            cachegate_store::Rate::new(
                f64::from(self.write_paths_per_hour) / 3600.0,
                self.write_paths_per_hour,
            )
        })
    }

    /// The tags of a write's purge that still need the edge: those that
    /// become an edge item, and not sent by a write of this process
    /// within `batch_window` (which marks them sent now).
    pub fn unsent_write_tags(&self, tags: Vec<String>) -> Vec<String> {
        let now = std::time::Instant::now();
        let mut recent = self.recent_writes.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|_, at| now.duration_since(*at) < self.batch_window);
        tags.into_iter()
            .filter(|tag| !self.items_for(std::slice::from_ref(tag)).is_empty())
            .filter(|tag| recent.insert(tag.clone(), now).is_none())
            .collect()
    }

    /// Count write-caused paths left out by the cap, and say so (at most
    /// once a minute per process: an abusive client must not flood logs).
    pub fn dropped_write_paths(&self, n: u64) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static LAST_WARNED: AtomicU64 = AtomicU64::new(0);
        if n == 0 {
            return;
        }
        WRITE_PATHS_DROPPED.fetch_add(n, Ordering::Relaxed);
        let now = cachegate_store::now_millis();
        let last = LAST_WARNED.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && LAST_WARNED
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = write_paths_dropped(),
                write_paths_per_hour = self.write_paths_per_hour,
                "edge: writes asked for more CloudFront paths than edge.write_paths_per_hour allows; \
                 those were not invalidated and the edge keeps them until their TTL"
            );
        }
    }
}

/// A write's purges at the edge: batched in serve, enqueued for the
/// invalidator from Lambda; a failure is logged (the write succeeded, and
/// the edge keeps the old object until its TTL at worst).
pub async fn after_write(edge: &Edge, purged: &[String]) {
    if purged.is_empty() {
        return;
    }
    if let Err(e) = edge.invalidate(purged, Dispatch::Background).await {
        tracing::warn!(error = %e, "edge invalidation after a write failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_cap_bounds_a_months_cost() {
        // 20 an hour: 14,600 paths in an average month, 13,600 billed.
        assert_eq!(write_cap_per_month(20), (14_600, 68.0));
        assert_eq!(write_cap_per_month(1), (730, 0.0));
        assert_eq!(write_cap_per_month(0), (0, 0.0));
    }

    #[test]
    fn every_byte_is_escaped_as_before() {
        assert_eq!(
            edge_tag(&crate::request::every_ascii_byte()).as_deref(),
            Some(
                r##"%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13%14%15%16%17%18%19%1A%1B%1C%1D%1E%1F%20!"#$%25&'()*+%2C-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\]^_`abcdefghijklmnopqrstuvwxyz{|}~%7F%C3%A9"##
            )
        );
    }

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
    fn cost_is_half_a_cent_a_path() {
        assert_eq!(cost_usd(0), 0.0);
        assert!((cost_usd(3) - 0.015).abs() < 1e-9);
    }
}
