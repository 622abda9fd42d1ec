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
        tags.extend(
            self.same_origin_locations(&target.url, resp_headers)
                .iter()
                .filter_map(|path| self.url_tag(path).ok()),
        );
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
            crate::edge::after_write(edge, &purged).await;
        }
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
        let path = crate::request::canonical_path(prefix).map_err(|r| r.message)?;
        let base = self.base.path().trim_end_matches('/');
        let tag_prefix = format!("{}{base}{path}", crate::key::URL_TAG_PREFIX);
        self.cache
            .stored_tags_with_prefix(&tag_prefix)
            .await
            .map(|tags| tags.into_iter().collect())
            .map_err(|e| e.to_string())
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
