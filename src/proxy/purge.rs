//! Invalidation: purge by tag (every stored variant of a URL carries its
//! URL tag), the purge marks that keep in-flight fetches from re-storing
//! older answers, and RFC 9111 §4.4 invalidation after a write.

use http::header;
use http::HeaderMap;
use reqwest::Url;

use cachegate_store::{now_millis, PurgeMark, Record, StoreError, StoreKey};

use super::Proxy;
use crate::key::Target;
use crate::policy::Bypass;
use crate::routes::Rule;

impl Proxy {
    /// After a successful unsafe request: invalidate the cached GET of its
    /// URL and of the same-origin `Location` / `Content-Location` of the
    /// response (RFC 9111 §4.4), and the tags its route names
    /// (`invalidate_tags`); then the same at the edge, if one is
    /// configured (never waiting for CloudFront: [`crate::edge::Dispatch`]).
    pub(super) async fn invalidate_after_write(
        &self,
        target: &Target,
        rule: &Rule,
        resp_headers: &HeaderMap,
        why: Bypass,
    ) {
        let mut tags = vec![target.url_tag()];
        // A Location that names no route is purged here (our own cache:
        // cheap) but not at the edge, where each path costs money and any
        // upstream answer could name any number of them.
        let mut off_route = Vec::new();
        for path in self.same_origin_locations(target.url(), resp_headers) {
            if let Ok(tag) = self.url_tag(&path) {
                if !self.on_a_route(&path) {
                    off_route.push(tag.clone());
                }
                tags.push(tag);
            }
        }
        tags.extend(rule.invalidate_tags.iter().cloned());
        tags.sort();
        tags.dedup();
        let mut purged = Vec::with_capacity(tags.len());
        for tag in tags {
            match self.purge_tag(&tag, false).await {
                Ok(_) => purged.push(tag),
                Err(e) => {
                    tracing::warn!(error = %e, "invalidation after {} failed", why.as_str())
                }
            }
        }
        if let Some(edge) = &self.edge {
            purged.retain(|t| !off_route.contains(t));
            let allowed = self.within_write_budget(edge, purged).await;
            crate::edge::after_write(edge, &allowed).await;
        }
    }

    /// Whether a client path falls under a configured route.
    fn on_a_route(&self, path: &str) -> bool {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        crate::request::canonical_path(path)
            .is_ok_and(|p| self.routes.rule_for(&p).name != Rule::global_name())
    }

    /// The tags of a write's purge the edge gets: not sent by a write
    /// within `edge.batch_window`, and one permit each of the shared
    /// `edge.write_paths_per_hour` budget. A backend that cannot be asked
    /// grants nothing: the edge then keeps those objects until their TTL,
    /// which costs nothing.
    async fn within_write_budget(
        &self,
        edge: &crate::edge::Edge,
        tags: Vec<String>,
    ) -> Vec<String> {
        let tags = edge.unsent_write_tags(tags);
        let Some(rate) = edge.write_budget() else {
            edge.dropped_write_paths(tags.len() as u64);
            return Vec::new();
        };
        let key = crate::edge::write_budget_key();
        let mut allowed = Vec::with_capacity(tags.len());
        let mut dropped = 0;
        for tag in tags {
            match self
                .cache
                .take_permit(&key, rate, std::time::Duration::ZERO)
                .await
            {
                Ok(cachegate_store::Permit::Granted { .. }) => allowed.push(tag),
                Ok(cachegate_store::Permit::Denied { .. }) => dropped += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "edge write budget unavailable; not invalidating");
                    dropped += 1;
                }
            }
        }
        edge.dropped_write_paths(dropped);
        allowed
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
        let path = crate::request::canonical_path(path).map_err(|r| r.message)?;
        let rule = self.routes.rule_for(&path);
        Ok(Target::from_canonical(&self.base, &path, query, rule.query_filter()).url_tag())
    }

    /// The URL tags of every URL stored under the path prefix `prefix` (as
    /// clients request it; canonicalised as a request's path is), found
    /// by reading the whole shared cache ([`TieredCache::stored_tags_with_prefix`]).
    ///
    /// [`TieredCache::stored_tags_with_prefix`]: cachegate_store::tiered::TieredCache::stored_tags_with_prefix
    pub async fn stored_url_tags_under(&self, prefix: &str) -> Result<Vec<String>, String> {
        let tag_prefix = format!(
            "{}{}",
            crate::key::URL_TAG_PREFIX,
            self.upstream_prefix(prefix)?
        );
        self.cache
            .stored_tags_with_prefix(&tag_prefix)
            .await
            .map(|tags| tags.into_iter().collect())
            .map_err(|e| e.to_string())
    }

    /// The tag that purges the path prefix `prefix` (as clients request
    /// it) at the edge: one wildcard path ([`crate::key::URL_PREFIX_TAG_PREFIX`]).
    pub fn url_prefix_tag(&self, prefix: &str) -> Result<String, String> {
        Ok(format!(
            "{}{}",
            crate::key::URL_PREFIX_TAG_PREFIX,
            self.upstream_prefix(prefix)?
        ))
    }

    /// A client path prefix as the upstream path prefix it stands for.
    fn upstream_prefix(&self, prefix: &str) -> Result<String, String> {
        let path = crate::request::canonical_path(prefix).map_err(|r| r.message)?;
        Ok(format!("{}{path}", self.base.path().trim_end_matches('/')))
    }

    /// The `Location` and `Content-Location` of an upstream response that
    /// name resources behind this proxy, as client paths: RFC 9111 §4.4 has
    /// them invalidated too, but only on the same origin (so a response
    /// cannot make us drop another site's entries). References resolve
    /// against the upstream URL of the request and must fall under the
    /// upstream's base path, which is then removed.
    pub(super) fn same_origin_locations(
        &self,
        request_url: &Url,
        headers: &HeaderMap,
    ) -> Vec<String> {
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
}

pub(super) fn purge_mark_key(tag: &str) -> StoreKey {
    StoreKey::hash("purge-mark", [tag])
}
