//! Whether a request may use the cache at all (RFC 9111 §2, §3.5, §4).

use http::{HeaderMap, Method};

use super::CacheControl;
use crate::routes::Rule;

/// Why a request does not use the cache at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Not GET or HEAD (RFC 9111 §2, §4.4: unsafe methods invalidate).
    Method,
    /// Carries `Authorization` and the route does not key on it (§3.5).
    Authorization,
    /// The route says `cache = false`.
    Route,
    /// A GET or HEAD with a body: what it would mean is undefined.
    Body,
    /// `Upgrade` / WebSocket-like requests.
    Upgrade,
    /// A `Range` request: partial answers are not stored; the upstream
    /// answers the range.
    Range,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Method => "method",
            Bypass::Authorization => "authorization",
            Bypass::Route => "route",
            Bypass::Body => "request-body",
            Bypass::Upgrade => "upgrade",
            Bypass::Range => "range",
        }
    }
}

/// How a request may use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Look up a stored response.
    pub lookup: bool,
    /// Store the response (the client did not send `no-store`).
    pub store: bool,
}

pub fn request_policy(
    method: &Method,
    headers: &HeaderMap,
    has_body: bool,
    rule: &Rule,
) -> Result<RequestPolicy, Bypass> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Bypass::Method);
    }
    if !rule.cache {
        return Err(Bypass::Route);
    }
    if headers.contains_key(http::header::AUTHORIZATION) && !rule.keys_on_authorization() {
        return Err(Bypass::Authorization);
    }
    if has_body {
        return Err(Bypass::Body);
    }
    if headers.contains_key(http::header::UPGRADE) {
        return Err(Bypass::Upgrade);
    }
    let cc = CacheControl::parse(headers);
    let pragma_no_cache = headers
        .get_all(http::header::PRAGMA)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
    Ok(RequestPolicy {
        lookup: !(rule.honor_client_no_cache && (cc.no_cache || pragma_no_cache)),
        store: !cc.no_store,
    })
}
