//! Whether a response may be stored, and for how long (RFC 9111 §3, §4.2).

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use cachegate_store::UnixMillis;

use super::cache_control::{delta_seconds, millis};
use super::CacheControl;
use crate::routes::Rule;

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    NoStore,
    Private,
    SetCookie,
    VaryStar,
    Status,
    Partial,
    NoFreshness,
    TooLarge,
    ClientNoStore,
    Head,
    /// Asked with `Cookie` on a route that does not key on cookies, and
    /// not marked `public` or `s-maxage`.
    Cookie,
}

impl NotStorable {
    pub fn as_str(self) -> &'static str {
        match self {
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::VaryStar => "vary-star",
            NotStorable::Status => "status",
            NotStorable::Partial => "partial-content",
            NotStorable::NoFreshness => "no-freshness",
            NotStorable::TooLarge => "too-large",
            NotStorable::ClientNoStore => "client-no-store",
            NotStorable::Head => "head",
            NotStorable::Cookie => "cookie",
        }
    }
}

/// The times a storable response is kept by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub born_at: UnixMillis,
    pub fresh_until: UnixMillis,
    pub stale_while_revalidate_until: UnixMillis,
    pub stale_if_error_until: UnixMillis,
    /// Drop `Set-Cookie` before storing (allowed by configuration).
    pub strip_set_cookie: bool,
}

/// Statuses a cache may store when freshness comes from configuration
/// rather than explicit directives (RFC 9110 §15.1 "heuristically cacheable").
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Inputs about one upstream response.
#[derive(Debug, Clone, Copy)]
pub struct ResponseFacts<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
    pub body_len: usize,
    /// When the request was sent and the response received (§4.2.3).
    pub request_time: UnixMillis,
    pub response_time: UnixMillis,
}

/// Whether and for how long a response to a cache-eligible GET may be stored.
pub fn response_policy(facts: ResponseFacts<'_>, rule: &Rule) -> Result<Freshness, NotStorable> {
    let h = facts.headers;
    let cc = CacheControl::parse(h);
    // §3: never store what the origin forbids a shared cache to store.
    if cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    if crate::key::vary_names(h).is_none() {
        return Err(NotStorable::VaryStar);
    }
    if facts.status == StatusCode::PARTIAL_CONTENT || h.contains_key(http::header::CONTENT_RANGE) {
        return Err(NotStorable::Partial);
    }
    if facts.status.is_server_error()
        || facts.status.is_informational()
        || facts.status == StatusCode::NOT_MODIFIED
    {
        return Err(NotStorable::Status);
    }
    let has_set_cookie = h.contains_key(http::header::SET_COOKIE);
    if has_set_cookie && !rule.store_set_cookie_responses {
        return Err(NotStorable::SetCookie);
    }
    if facts.body_len > rule.max_entry_bytes {
        return Err(NotStorable::TooLarge);
    }

    let date = header_time(h, http::header::DATE);
    let explicit = if rule.override_upstream {
        None
    } else if let Some(s) = cc.s_maxage {
        Some(s.saturating_mul(1000))
    } else if let Some(m) = cc.max_age {
        Some(m.saturating_mul(1000))
    } else if h.contains_key(http::header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (§5.3).
        let expires = header_time(h, http::header::EXPIRES).unwrap_or(0);
        Some(expires.saturating_sub(date.unwrap_or(facts.response_time)))
    } else {
        None
    };
    let lifetime_ms = match explicit {
        Some(_) if cc.no_cache => 0,
        Some(ms) => ms,
        None if cc.no_cache && !rule.override_upstream => 0,
        None => {
            let ttl = rule.ttl.ok_or(NotStorable::NoFreshness)?;
            if !heuristically_cacheable(facts.status) {
                return Err(NotStorable::Status);
            }
            millis(ttl)
        }
    };

    // §4.2.3: the age the response already had when it arrived.
    let age_value = h
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| delta_seconds(v.trim()))
        .unwrap_or(0)
        .saturating_mul(1000);
    let apparent_age = date.map_or(0, |d| facts.response_time.saturating_sub(d));
    let response_delay = facts.response_time.saturating_sub(facts.request_time);
    let corrected_initial_age = apparent_age.max(age_value.saturating_add(response_delay));
    let born_at = facts.response_time.saturating_sub(corrected_initial_age);
    // Times saturate rather than wrap: a wrapped expiry would turn the
    // longest lifetimes into ones already over.
    let fresh_until = born_at.saturating_add(lifetime_ms);

    // §4.2.4: stale only where the origin allows it. Explicit RFC 5861
    // directives win; `s-maxage` implies proxy-revalidate for shared caches.
    let may_serve_stale =
        rule.override_upstream || !(cc.must_revalidate || cc.proxy_revalidate || cc.no_cache);
    let window = |explicit: Option<u64>, configured: Duration| -> u64 {
        if !may_serve_stale {
            0
        } else if let Some(s) = explicit.filter(|_| !rule.override_upstream) {
            s.saturating_mul(1000)
        } else if cc.s_maxage.is_some() && !rule.override_upstream {
            0
        } else {
            millis(configured)
        }
    };
    let swr = window(cc.stale_while_revalidate, rule.stale_while_revalidate);
    let sie = window(cc.stale_if_error, rule.stale_if_error);

    let has_validator =
        h.contains_key(http::header::ETAG) || h.contains_key(http::header::LAST_MODIFIED);
    // Already stale on arrival, nothing to revalidate with and no stale use:
    // storing it would only cost a write.
    if fresh_until <= facts.response_time && !has_validator && swr == 0 && sie == 0 {
        return Err(NotStorable::NoFreshness);
    }
    Ok(Freshness {
        born_at,
        fresh_until,
        stale_while_revalidate_until: fresh_until.saturating_add(swr),
        stale_if_error_until: fresh_until.saturating_add(sie),
        strip_set_cookie: has_set_cookie,
    })
}

fn header_time(h: &HeaderMap, name: http::HeaderName) -> Option<UnixMillis> {
    let v = h.get(name)?.to_str().ok()?;
    let t = httpdate::parse_http_date(v).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}
