//! A purge request (`{"urls": [...], "tags": [...], "prefixes": [...],
//! "all": false}`) and why one fails:
//! plain data shared by `cachegate purge`, serve's purge endpoint, the
//! invalidator ([`crate::invalidate`]) and the edge's queue messages.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most URLs plus tags one request may name: a purge is a store round trip
/// (or several) per item, and one message must finish well within the
/// function timeout and the queue's visibility timeout.
pub const MAX_ITEMS: usize = 100;

/// Longest URL or tag accepted; anything longer is a mistake, not a key.
pub const MAX_ITEM_BYTES: usize = 4096;

/// What to purge: every stored variant of each URL, every entry carrying
/// each tag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Paths with optional query as clients request them (`/items/1?lang=en`),
    /// or absolute URLs whose scheme and host are ignored.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Route tags or surrogate keys.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Path prefixes as clients request them (`/items/`): every stored
    /// URL whose path starts with one (a string prefix: `/items` also
    /// matches `/itemsets`). Finding them reads the whole shared cache.
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Everything stored (the prefix `/`).
    #[serde(default)]
    pub all: bool,
    /// Mark the entries stale instead of removing them: the next requests
    /// are answered stale within the entry's stale-while-revalidate window
    /// (or `cache.stale_while_revalidate`) while one refresh runs; with no
    /// such window, a hard purge. Default `false`.
    #[serde(default)]
    pub soft: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// The request itself is wrong: sending it again cannot help.
    #[error("invalid purge request: {0}")]
    Invalid(String),
    /// The backend failed (unreachable, timed out): sending it again may.
    #[error("purge {what}: {message}")]
    Store { what: String, message: String },
    /// The shared cache was purged, CloudFront was not: sending the
    /// request again purges both (purging is idempotent).
    #[error("the shared cache was purged ({removed} entries), CloudFront was not: {message}")]
    Edge { removed: u64, message: String },
}

impl PurgeRequest {
    /// Parse a JSON purge request (a queue message's body) and check it.
    pub fn from_json(body: &[u8]) -> Result<PurgeRequest, PurgeError> {
        serde_json::from_slice(body)
            .map_err(not_a_purge_request)
            .and_then(PurgeRequest::from_value)
    }

    /// A purge request already read as JSON (an event's `detail`, a direct
    /// invocation), checked.
    pub fn from_value(value: Value) -> Result<PurgeRequest, PurgeError> {
        let request: PurgeRequest = serde_json::from_value(value).map_err(not_a_purge_request)?;
        request.validate_message()?;
        Ok(request)
    }

    /// A message's checks: [`PurgeRequest::validate`], and at most
    /// [`MAX_ITEMS`] items.
    fn validate_message(&self) -> Result<(), PurgeError> {
        self.validate()?;
        let n = self.urls.len() + self.tags.len() + self.prefixes.len();
        if n > MAX_ITEMS {
            return Err(PurgeError::Invalid(format!(
                "{n} URLs, tags and prefixes in one request; at most {MAX_ITEMS} (split it)"
            )));
        }
        Ok(())
    }

    /// Something to purge, and no empty or absurdly long item.
    pub fn validate(&self) -> Result<(), PurgeError> {
        let invalid = |m: String| Err(PurgeError::Invalid(m));
        if self.urls.is_empty() && self.tags.is_empty() && self.prefixes.is_empty() && !self.all {
            return invalid(
                "name at least one URL (`urls`), tag (`tags`) or path prefix (`prefixes`), or `all`"
                    .into(),
            );
        }
        if let Some(p) = self.prefixes.iter().find(|p| !p.starts_with('/')) {
            return invalid(format!(
                "the prefix `{p}` is not a path (it must start with /)"
            ));
        }
        if let Some(p) = self.prefixes.iter().find(|p| p.contains(['?', '#'])) {
            return invalid(format!(
                "the prefix `{p}` is a path prefix: no query or fragment"
            ));
        }
        for (kind, items) in [
            ("url", &self.urls),
            ("tag", &self.tags),
            ("prefix", &self.prefixes),
        ] {
            for item in items {
                if item.trim().is_empty() {
                    return invalid(format!("an empty {kind}"));
                }
                if item.len() > MAX_ITEM_BYTES {
                    return invalid(format!(
                        "a {kind} of {} bytes; at most {MAX_ITEM_BYTES}",
                        item.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

fn not_a_purge_request(e: serde_json::Error) -> PurgeError {
    PurgeError::Invalid(format!(
        "expected {{\"urls\": [...], \"tags\": [...]}}: {e}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let err = |body: &str| match PurgeRequest::from_json(body.as_bytes()) {
            Err(PurgeError::Invalid(m)) => m,
            other => panic!("{body}: {other:?}"),
        };
        assert!(err("{}").contains("at least one"));
        assert!(err(r#"{"urls": [], "tags": []}"#).contains("at least one"));
        assert!(err(r#"{"url": ["/a"]}"#).contains("unknown field `url`"));
        assert!(err(r#"{"urls": "/a"}"#).contains("expected a sequence"));
        assert!(err(r#"{"tags": [" "]}"#).contains("empty tag"));
        assert!(err(r#"{"prefixes": ["items/"]}"#).contains("must start with /"));
        assert!(err(r#"{"all": false}"#).contains("at least one"));
        assert_eq!(
            PurgeRequest::from_json(br#"{"prefixes": ["/items/"], "all": true}"#).unwrap(),
            PurgeRequest {
                prefixes: vec!["/items/".into()],
                all: true,
                ..PurgeRequest::default()
            }
        );
        assert!(err("not json").contains("expected {\"urls\""));
        let many = serde_json::json!({ "tags": vec!["t"; MAX_ITEMS + 1] }).to_string();
        assert!(err(&many).contains("at most 100"));
        let long = serde_json::json!({ "urls": ["/".repeat(MAX_ITEM_BYTES + 1)] }).to_string();
        assert!(err(&long).contains("bytes"));
        assert_eq!(
            PurgeRequest::from_json(br#"{"urls": ["/a?b=1"], "tags": ["t"]}"#).unwrap(),
            PurgeRequest {
                urls: vec!["/a?b=1".into()],
                tags: vec!["t".into()],
                ..PurgeRequest::default()
            }
        );
    }
}
