//! The `[edge]` section: the cache in front of cachegate (CloudFront).
//! What the edge does with it is [`crate::edge`]'s.

use std::time::Duration;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// The `[edge]` section: CloudFront in front of cachegate.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Most CloudFront paths the purges that writes cause (a successful
    /// POST, PUT, PATCH, DELETE: its URL, a `Location` on a route, the
    /// route's `invalidate_tags`) may invalidate in an hour, all instances
    /// sharing the backend together (a budget kept there; per instance on
    /// the memory backend). Any client that can write can cause these,
    /// and CloudFront bills every path past the first 1,000 a month, so
    /// this bounds what writes can cost: past it a write's paths are not
    /// sent (logged, counted as `cachegate_edge_write_paths_dropped_total`)
    /// and the edge keeps those objects until their TTL (bound it with
    /// `cache.edge_max_ttl`). The same path within `batch_window` counts
    /// once. Purges asked for (`cachegate purge`, the invalidator's events,
    /// the purge endpoint) are not counted. `0`: writes never invalidate
    /// the edge. Start-up logs what the cap allows a month. Default `20`.
    pub write_paths_per_hour: u32,
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
            write_paths_per_hour: 20,
        }
    }
}

impl EdgeConfig {
    /// Whether an edge sits in front: responses then carry their tags.
    pub fn is_configured(&self) -> bool {
        self.cloudfront_distribution_id.is_some() || self.invalidation_queue_url.is_some()
    }

    /// `cache_tag_header` parsed.
    pub fn cache_tag_header_name(&self) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(self.cache_tag_header.as_bytes()).map_err(|_| {
            invalid(
                "edge.cache_tag_header",
                format!("`{}` is not a header name", self.cache_tag_header),
            )
        })
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.cloudfront_distribution_id {
            if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(invalid(
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
                    return Err(invalid(
                        "edge.invalidation_queue_url",
                        format!("`{url}` is not an http(s) queue URL"),
                    ))
                }
            }
        }
        if self.batch_window > Duration::from_secs(60) {
            return Err(invalid("edge.batch_window", "must be at most 60s"));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(invalid("edge.max_attempts", "must be 1 to 20"));
        }
        if self.write_paths_per_hour > 1_000_000 {
            return Err(invalid(
                "edge.write_paths_per_hour",
                "must be at most 1000000 (0 keeps writes from invalidating the edge)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let check = |c: EdgeConfig| c.validate().unwrap_err().to_string();
        let base = EdgeConfig::default();
        assert!(check(EdgeConfig {
            cloudfront_distribution_id: Some("E1/../x".into()),
            ..base.clone()
        })
        .contains("edge.cloudfront_distribution_id"));
        assert!(EdgeConfig {
            cache_tag_header: "Cache Tag".into(),
            ..base.clone()
        }
        .cache_tag_header_name()
        .unwrap_err()
        .to_string()
        .contains("`edge.cache_tag_header` (CACHEGATE_EDGE__CACHE_TAG_HEADER)"));
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
}
