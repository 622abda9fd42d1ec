//! `Cache-Control` parsing (RFC 9111 §5.2), for requests and responses.

use std::time::Duration;

use http::HeaderMap;

/// Parsed `Cache-Control` directives (request or response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    /// RFC 9111 §5.2.2.3: store only if the status's caching rules are known.
    pub must_understand: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl CacheControl {
    /// Parse every `Cache-Control` value of `headers`. Unknown directives
    /// are ignored; a malformed delta for a freshness directive counts as 0
    /// (stale), per RFC 9111 §4.2.1, and `no-cache="x"` / `private="x"`
    /// are treated as their unqualified, stricter forms.
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        Self::parse_field(headers, http::header::CACHE_CONTROL.as_str())
    }

    /// The directives cachegate obeys for its own storing (RFC 9213): the
    /// first of `Cachegate-Cache-Control` (for cachegate only), then
    /// `CDN-Cache-Control` (for every CDN-like cache of the operator), that
    /// the response carries replaces `Cache-Control` entirely; otherwise
    /// `Cache-Control`.
    pub fn for_storing(headers: &HeaderMap) -> CacheControl {
        for name in [CACHEGATE_CACHE_CONTROL, CDN_CACHE_CONTROL] {
            if headers.contains_key(name) {
                return Self::parse_field(headers, name);
            }
        }
        Self::parse(headers)
    }

    /// Whether the directives cachegate stores by come from a targeted
    /// field rather than `Cache-Control`.
    pub fn targeted(headers: &HeaderMap) -> bool {
        headers.contains_key(CACHEGATE_CACHE_CONTROL) || headers.contains_key(CDN_CACHE_CONTROL)
    }

    /// Parse every value of the field `name` with the `Cache-Control` syntax.
    pub fn parse_field(headers: &HeaderMap, name: &str) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(name) {
            let Ok(value) = value.to_str() else {
                // Not visible ASCII: obey the safest reading.
                cc.no_store = true;
                continue;
            };
            for directive in split_directives(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let delta = || arg.and_then(delta_seconds).unwrap_or(0);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "must-understand" => cc.must_understand = true,
                    "max-age" => cc.max_age = Some(min_opt(cc.max_age, delta())),
                    "s-maxage" => cc.s_maxage = Some(min_opt(cc.s_maxage, delta())),
                    "stale-while-revalidate" => cc.stale_while_revalidate = Some(delta()),
                    "stale-if-error" => cc.stale_if_error = Some(delta()),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// RFC 9213's field for every CDN-like cache the operator runs.
pub const CDN_CACHE_CONTROL: &str = "cdn-cache-control";
/// The RFC 9213 §2.1-style field for cachegate alone: obeyed, then removed
/// from what goes out.
pub const CACHEGATE_CACHE_CONTROL: &str = "cachegate-cache-control";

/// RFC 9111 §1.2.2: a delta-seconds value too large to represent, or any
/// calculation with it that would overflow, counts as 2^31 seconds.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// `1*DIGIT`, capped at [`MAX_DELTA_SECONDS`]; `None` when not digits.
pub(crate) fn delta_seconds(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |d| d.min(MAX_DELTA_SECONDS)),
    )
}

/// Whole milliseconds of a configured duration, saturating (a TTL of
/// centuries must not wrap around to a short one).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Conflicting duplicates: keep the smaller (fresher-for-less) value.
fn min_opt(old: Option<u64>, new: u64) -> u64 {
    old.map_or(new, |o| o.min(new))
}

/// Split on commas that are not inside a quoted string.
pub(crate) fn split_directives(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty())
}
