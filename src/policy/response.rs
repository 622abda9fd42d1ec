//! Whether a response may be stored, and for how long (RFC 9111 §3, §4.2).

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use cachegate_store::UnixMillis;

use super::cache_control::{delta_seconds, millis};
use super::request::{explicitly_shareable, RequestPolicy};
use super::CacheControl;
use super::Rule;

/// Why a response is not stored (pingora-cache's `NoCacheReason`): the
/// request's reasons first, then the response's.
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
    /// `must-understand` on a status whose caching rules cachegate does not know.
    MustUnderstand,
    /// Asked with `Cookie` on a route that does not key on cookies, and
    /// not marked `public` or `s-maxage`.
    Cookie,
    /// Asked with a credential header (`cache.credential_headers`) the
    /// route does not key on, and not marked `public` or `s-maxage`.
    Credential,
    /// The upstream rejected this request as malformed or too large
    /// ([`request_provoked_error`]); `cache.store_request_errors` is off.
    RequestError,
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
            NotStorable::MustUnderstand => "must-understand",
            NotStorable::Cookie => "cookie",
            NotStorable::Credential => "credential",
            NotStorable::RequestError => "request-error",
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
    /// Kept for revalidation until then (see [`cachegate_store::Entry::keep_until`]).
    pub keep_until: UnixMillis,
    /// Drop `Set-Cookie` before storing (allowed by configuration).
    pub strip_set_cookie: bool,
}

/// Statuses a cache may store when freshness comes from configuration
/// rather than explicit directives (RFC 9110 §15.1 "heuristically cacheable").
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses that say the upstream rejected this one request for its form
/// or size (400 Bad Request, 413 Content Too Large, 414 URI Too Long,
/// 431 Request Header Fields Too Large; RFC 9110 §15.5.1, §15.5.14,
/// §15.5.15, RFC 6585 §5), not that the resource is in that state. RFC
/// 9111 §3 allows storing them with explicit freshness, but a shared cache
/// that does lets one client's oversized or malformed request become
/// everyone's answer: the cache-poisoned denial of service of Nguyen et
/// al., "Your Cache Has Fallen" (CCS 2019), whose HHO (oversized header)
/// and HMC (meta character) attacks provoke exactly these statuses.
pub fn request_provoked_error(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 413 | 414 | 431)
}

/// Statuses whose caching rules cachegate knows (the final statuses RFC
/// 9110 defines): what `must-understand` (RFC 9111 §5.2.2.3) asks about.
fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200..=206 | 300..=305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 500..=505
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
    /// What the request that caused the response allows
    /// ([`super::request_policy`]).
    pub request: RequestPolicy,
}

/// Shorten `f`'s freshness, counted from `now`, by `fraction * rand` of
/// what is left (`rand` in [0, 1)): `cache.ttl_jitter`. Never lengthens
/// it, and never moves the stale windows, which stay what the upstream and
/// the route allowed.
pub fn jitter_freshness(f: &mut Freshness, now: UnixMillis, fraction: f64, rand: f64) {
    let left = f.fresh_until.saturating_sub(now);
    let cut = (left as f64 * fraction.clamp(0.0, 1.0) * rand.clamp(0.0, 1.0)) as u64;
    f.fresh_until -= cut.min(left);
}

/// Whether a hit at `now` on an entry stored at `stored_at` and fresh
/// until `fresh_until` falls in the last `fraction` of that freshness
/// (`cache.refresh_ahead`): time to refresh it before it expires.
pub fn refresh_ahead_due(
    stored_at: UnixMillis,
    fresh_until: UnixMillis,
    now: UnixMillis,
    fraction: f64,
) -> bool {
    if fraction <= 0.0 || now >= fresh_until {
        return false;
    }
    let lifetime = fresh_until.saturating_sub(stored_at);
    let window = (lifetime as f64 * fraction.min(1.0)) as u64;
    fresh_until - now <= window
}

/// Whether and for how long a response to a request that may use the
/// cache may be stored: the whole decision, the request's part included.
///
/// The directives obeyed are the targeted field's when there is one
/// (`Cachegate-Cache-Control`, then `CDN-Cache-Control`: RFC 9213), else
/// `Cache-Control` with `Expires`.
pub fn response_policy(facts: ResponseFacts<'_>, rule: &Rule) -> Result<Freshness, NotStorable> {
    let h = facts.headers;
    request_refusal(facts.request, h)?;
    let cc = CacheControl::for_storing(h);
    response_refusal(&cc, &facts, rule)?;
    let date = header_time(h, http::header::DATE);
    let lifetime_ms = lifetime(&cc, &facts, date, rule)?;
    // Times saturate rather than wrap: a wrapped expiry would turn the
    // longest lifetimes into ones already over.
    let born_at = born_at(h, date, &facts);
    let fresh_until = born_at.saturating_add(lifetime_ms);
    let (swr, sie) = stale_windows(&cc, facts.status, rule);
    let has_validator =
        h.contains_key(http::header::ETAG) || h.contains_key(http::header::LAST_MODIFIED);
    // Already stale on arrival, nothing to revalidate with and no stale use:
    // storing it would only cost a write.
    if fresh_until <= facts.response_time && !has_validator && swr == 0 && sie == 0 {
        return Err(NotStorable::NoFreshness);
    }
    // §4.3.1: a stale entry with validators is worth keeping past its stale
    // windows, to be revalidated (a 304 instead of a full body), for as
    // long as configuration allows.
    let keep_until = if has_validator {
        fresh_until.saturating_add(millis(rule.keep_for_revalidation))
    } else {
        fresh_until
    };
    Ok(Freshness {
        born_at,
        fresh_until,
        stale_while_revalidate_until: fresh_until.saturating_add(swr),
        stale_if_error_until: fresh_until.saturating_add(sie),
        keep_until,
        strip_set_cookie: h.contains_key(http::header::SET_COOKIE),
    })
}

/// What the request that caused a response forbids storing.
fn request_refusal(request: RequestPolicy, h: &HeaderMap) -> Result<(), NotStorable> {
    // A HEAD answer has no body: stored, it would answer a GET with nothing.
    if request.head {
        return Err(NotStorable::Head);
    }
    // RFC 9111 §5.2.1.5: the client's no-store covers the response too.
    if !request.store {
        return Err(NotStorable::ClientNoStore);
    }
    // Asked with cookies or a credential the route does not key on
    // (RFC 9111 §3.5's rule for `Authorization`): stored only when the
    // upstream says outright that anyone may have it.
    if let Some(personal) = request.shareable_only {
        if !explicitly_shareable(h) {
            return Err(personal.not_storable());
        }
    }
    Ok(())
}

/// What the response itself forbids storing (RFC 9111 §3).
fn response_refusal(
    cc: &CacheControl,
    facts: &ResponseFacts<'_>,
    rule: &Rule,
) -> Result<(), NotStorable> {
    let (h, status) = (facts.headers, facts.status);
    // §5.2.2.3: must-understand stores only statuses we know the rules of,
    // and for those it overrides no-store (its purpose: a no-store
    // fallback for caches that do not know it).
    if cc.must_understand && !understood(status) {
        return Err(NotStorable::MustUnderstand);
    }
    // §3: never store what the origin forbids a shared cache to store.
    // A malformed list read as no-store stays no-store: must-understand
    // lifts the sender's no-store, not our guess at what it meant.
    if cc.no_store && (!cc.must_understand || cc.malformed) {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    if super::headers::vary_names(h).is_none() {
        return Err(NotStorable::VaryStar);
    }
    // A 200 with Content-Range is the complete representation (RFC 9110
    // §14.4); only a 206 is a part of one.
    if status == StatusCode::PARTIAL_CONTENT {
        return Err(NotStorable::Partial);
    }
    if status.is_informational() || status == StatusCode::NOT_MODIFIED {
        return Err(NotStorable::Status);
    }
    if request_provoked_error(status) && !rule.store_request_errors {
        return Err(NotStorable::RequestError);
    }
    if h.contains_key(http::header::SET_COOKIE) && !rule.store_set_cookie_responses {
        return Err(NotStorable::SetCookie);
    }
    if facts.body_len > rule.max_entry_bytes {
        return Err(NotStorable::TooLarge);
    }
    Ok(())
}

/// §3: any status may be stored with explicit freshness; a configured
/// one only where the route names the status or it is heuristically
/// cacheable (RFC 9110 §15.1). In milliseconds.
fn lifetime(
    cc: &CacheControl,
    facts: &ResponseFacts<'_>,
    date: Option<UnixMillis>,
    rule: &Rule,
) -> Result<u64, NotStorable> {
    let route_ttl = ttl_for(rule, facts.status);
    Ok(
        match explicit_lifetime(cc, facts.headers, date, facts.response_time) {
            _ if rule.override_upstream && route_ttl.is_some() => {
                millis(route_ttl.unwrap_or_default())
            }
            Some(_) if cc.no_cache => 0,
            Some(ms) => ms,
            None if cc.no_cache => 0,
            None => match route_ttl {
                Some(ttl) => millis(ttl),
                None if rule.ttl.is_none() && rule.status_ttl.is_empty() => {
                    return Err(NotStorable::NoFreshness)
                }
                None => return Err(NotStorable::Status),
            },
        },
    )
}

/// §4.2.3: when the response was generated: its arrival less the age it
/// already had. A list (`Age: 7200, 0`, two caches' worth) counts by its
/// first member; an invalid one is ignored.
fn born_at(h: &HeaderMap, date: Option<UnixMillis>, facts: &ResponseFacts<'_>) -> UnixMillis {
    let age_value = h
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| delta_seconds(v.split(',').next().unwrap_or("").trim()))
        .unwrap_or(0)
        .saturating_mul(1000);
    let apparent_age = date.map_or(0, |d| facts.response_time.saturating_sub(d));
    let response_delay = facts.response_time.saturating_sub(facts.request_time);
    let corrected_initial_age = apparent_age.max(age_value.saturating_add(response_delay));
    facts.response_time.saturating_sub(corrected_initial_age)
}

/// §4.2.4: the stale-while-revalidate and stale-if-error windows, in
/// milliseconds, only where the origin allows stale use. Explicit RFC 5861
/// directives win; `s-maxage` implies proxy-revalidate for shared caches.
/// A stored server error is never served stale: stale-if-error exists to
/// hide errors, and a stale error in place of a fresh one hides nothing.
fn stale_windows(cc: &CacheControl, status: StatusCode, rule: &Rule) -> (u64, u64) {
    let may_serve_stale = !status.is_server_error()
        && (rule.override_upstream || !(cc.must_revalidate || cc.proxy_revalidate || cc.no_cache));
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
    (
        window(cc.stale_while_revalidate, rule.stale_while_revalidate),
        window(cc.stale_if_error, rule.stale_if_error),
    )
}

/// The configured freshness for a response with `status` and none of its
/// own: the route's `status_ttl` for it, else `ttl` for the statuses RFC
/// 9110 §15.1 calls heuristically cacheable.
pub fn ttl_for(rule: &Rule, status: StatusCode) -> Option<Duration> {
    match rule.status_ttl.iter().find(|(s, _)| *s == status.as_u16()) {
        Some((_, ttl)) => Some(*ttl),
        None if heuristically_cacheable(status) => rule.ttl,
        None => None,
    }
}

/// Whether the freshness of a stored response with these headers came from
/// the route (`ttl`, `status_ttl`) rather than from the upstream: then the
/// edge is told it in `s-maxage`.
pub fn route_supplied_freshness(status: StatusCode, h: &HeaderMap, rule: &Rule) -> bool {
    let Some(_) = ttl_for(rule, status) else {
        return false;
    };
    if rule.override_upstream {
        return true;
    }
    let cc = CacheControl::for_storing(h);
    !cc.no_cache && explicit_lifetime(&cc, h, None, 0).is_none()
}

/// §4.2.1: the lifetime the upstream gave, in milliseconds: `s-maxage`,
/// then `max-age`, then `Expires - Date` (not with a targeted field, which
/// replaces `Expires` as well, RFC 9213 §2.2). An `Expires` that does not
/// parse means already expired (§5.3).
fn explicit_lifetime(
    cc: &CacheControl,
    h: &HeaderMap,
    date: Option<UnixMillis>,
    response_time: UnixMillis,
) -> Option<u64> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(s.saturating_mul(1000));
    }
    if CacheControl::targeted(h) || !h.contains_key(http::header::EXPIRES) {
        return None;
    }
    let expires = header_time(h, http::header::EXPIRES).unwrap_or(0);
    Some(expires.saturating_sub(date.unwrap_or(response_time)))
}

/// A date header, read leniently ([`super::date::parse_http_date`]).
pub(crate) fn header_time(h: &HeaderMap, name: http::HeaderName) -> Option<UnixMillis> {
    super::date::parse_http_date(h.get(name)?.to_str().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freshness(fresh_until: UnixMillis) -> Freshness {
        Freshness {
            born_at: 0,
            fresh_until,
            stale_while_revalidate_until: fresh_until + 10_000,
            stale_if_error_until: fresh_until + 60_000,
            keep_until: fresh_until + 60_000,
            strip_set_cookie: false,
        }
    }

    fn rule() -> Rule {
        Rule::global(&crate::config::CacheConfig::default())
    }

    fn storable(status: u16, cc: &str, rule: &Rule) -> Result<Freshness, NotStorable> {
        let mut h = HeaderMap::new();
        h.insert(http::header::CACHE_CONTROL, cc.parse().unwrap());
        response_policy(
            ResponseFacts {
                status: StatusCode::from_u16(status).unwrap(),
                headers: &h,
                body_len: 10,
                request_time: 1_000,
                response_time: 1_000,
                request: RequestPolicy::PLAIN_GET,
            },
            rule,
        )
    }

    /// RFC 9111 §3 would allow storing these with explicit freshness; the
    /// CPDoS attacks (Nguyen et al., CCS 2019) are why a shared cache does
    /// not by default.
    #[test]
    fn request_provoked_errors_are_not_stored_unless_configured() {
        let r = rule();
        for status in [400, 413, 414, 431] {
            assert_eq!(
                storable(status, "public, max-age=300", &r),
                Err(NotStorable::RequestError),
                "{status}"
            );
        }
        // Other client errors describe the resource: stored as before.
        for status in [404, 403, 405, 410, 429] {
            assert!(
                storable(status, "public, max-age=300", &r).is_ok(),
                "{status}"
            );
        }
        let mut allowed = r.clone();
        allowed.store_request_errors = true;
        for status in [400, 413, 414, 431] {
            assert!(
                storable(status, "public, max-age=300", &allowed).is_ok(),
                "{status}"
            );
        }
        // Even with a route TTL, a 414 (heuristically cacheable) is not stored.
        let mut ttl = r.clone();
        ttl.ttl = Some(Duration::from_secs(60));
        assert_eq!(storable(414, "", &ttl), Err(NotStorable::RequestError));
    }

    #[test]
    fn jitter_only_shortens_what_is_left() {
        let mut f = freshness(100_000);
        jitter_freshness(&mut f, 40_000, 0.1, 0.5);
        assert_eq!(f.fresh_until, 97_000, "5% of the 60 s left");
        assert_eq!(
            f.stale_while_revalidate_until, 110_000,
            "stale windows unchanged"
        );
        let mut f = freshness(100_000);
        jitter_freshness(&mut f, 40_000, 0.1, 0.0);
        assert_eq!(f.fresh_until, 100_000);
        // Out-of-range inputs cannot lengthen it or cut below now.
        let mut f = freshness(100_000);
        jitter_freshness(&mut f, 40_000, 5.0, 7.0);
        assert_eq!(f.fresh_until, 40_000);
        let mut f = freshness(100_000);
        jitter_freshness(&mut f, 200_000, 0.5, 0.5);
        assert_eq!(f.fresh_until, 100_000, "already stale: unchanged");
    }

    #[test]
    fn refresh_ahead_is_due_in_the_last_part_only() {
        // Stored at 0, fresh for 100 s; the last 10 % is from 90 s.
        assert!(!refresh_ahead_due(0, 100_000, 89_999, 0.1));
        assert!(refresh_ahead_due(0, 100_000, 90_000, 0.1));
        assert!(refresh_ahead_due(0, 100_000, 99_999, 0.1));
        assert!(
            !refresh_ahead_due(0, 100_000, 100_000, 0.1),
            "stale is not ahead"
        );
        assert!(!refresh_ahead_due(0, 100_000, 99_999, 0.0), "off");
    }
}
