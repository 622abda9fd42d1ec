//! What may be cached and for how long: RFC 9111 for a shared cache, with
//! the route rules on top. Pure code: no I/O, no clock (times come in).
//!
//! Why not the http-cache-semantics crate: it answers "storable?" and "TTL?"
//! well, but we also need per-route overrides (a TTL for upstreams that send
//! none or wrong ones), explicit stale-while-revalidate / stale-if-error
//! windows stored as absolute times in a compact entry, the edge
//! `Cache-Control` we emit, and a reason for every "no" (for `Cache-Status`).
//! Its policy object serialises whole request and response headers, which
//! would double what every entry stores. The rules themselves are short;
//! they are written here against the RFC sections they cite.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};

use cachegate_store::UnixMillis;

use crate::routes::Rule;

/// Parsed `Cache-Control` directives (request or response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
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
        let mut cc = CacheControl::default();
        for value in headers.get_all(http::header::CACHE_CONTROL) {
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

/// RFC 9111 §1.2.2: a delta-seconds value too large to represent, or any
/// calculation with it that would overflow, counts as 2^31 seconds.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// `1*DIGIT`, capped at [`MAX_DELTA_SECONDS`]; `None` when not digits.
fn delta_seconds(s: &str) -> Option<u64> {
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
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Conflicting duplicates: keep the smaller (fresher-for-less) value.
fn min_opt(old: Option<u64>, new: u64) -> u64 {
    old.map_or(new, |o| o.min(new))
}

/// Split on commas that are not inside a quoted string.
fn split_directives(value: &str) -> impl Iterator<Item = &str> {
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
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Method => "method",
            Bypass::Authorization => "authorization",
            Bypass::Route => "route",
            Bypass::Body => "request-body",
            Bypass::Upgrade => "upgrade",
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

/// The `Cache-Control` sent with a response served from (or just stored
/// in) the cache, for the next cache out: CloudFront, browsers. It never
/// promises more than the entry has left, capped by the route's edge TTL;
/// entries keyed on `Authorization` are `private` (never shared at the edge).
pub fn edge_cache_control(fresh_secs_left: u64, rule: &Rule) -> String {
    let cap = rule.edge_ttl.map_or(u64::MAX, |d| d.as_secs());
    let ttl = fresh_secs_left.min(cap);
    if rule.keys_on_authorization() {
        format!("private, max-age={ttl}")
    } else {
        format!("public, max-age={ttl}, s-maxage={ttl}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;
    use crate::routes::RouteTable;
    use http::HeaderValue;

    const T0: UnixMillis = 1_700_000_000_000;

    fn rule() -> Rule {
        (*RouteTable::build(&[], &CacheConfig::default())
            .unwrap()
            .rule_for("/"))
        .clone()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn policy(status: u16, pairs: &[(&str, &str)], rule: &Rule) -> Result<Freshness, NotStorable> {
        let h = headers(pairs);
        response_policy(
            ResponseFacts {
                status: StatusCode::from_u16(status).unwrap(),
                headers: &h,
                body_len: 10,
                request_time: T0 - 100,
                response_time: T0,
            },
            rule,
        )
    }

    #[test]
    fn parses_directives() {
        let cc = CacheControl::parse(&headers(&[
            ("cache-control", "Public, max-age=60, s-maxage=\"30\""),
            (
                "cache-control",
                "no-cache=\"set-cookie, x\", stale-if-error=600, max-age=90",
            ),
        ]));
        assert!(cc.public && cc.no_cache && !cc.private);
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.s_maxage, Some(30));
        assert_eq!(cc.stale_if_error, Some(600));
        assert_eq!(
            CacheControl::parse(&headers(&[("cache-control", "max-age=abc")])).max_age,
            Some(0)
        );
    }

    #[test]
    fn delta_seconds_are_capped_not_wrapped() {
        // RFC 9111 §1.2.2: too large to represent means 2^31.
        for v in ["2147483649", "99999999999", "18446744073709551616"] {
            let cc = CacheControl::parse(&headers(&[(
                "cache-control",
                &format!("max-age={v}, s-maxage={v}, stale-if-error={v}"),
            )]));
            assert_eq!(cc.max_age, Some(MAX_DELTA_SECONDS), "{v}");
            assert_eq!(cc.s_maxage, Some(MAX_DELTA_SECONDS), "{v}");
            assert_eq!(cc.stale_if_error, Some(MAX_DELTA_SECONDS), "{v}");
        }
        // Not 1*DIGIT: invalid, so stale.
        for v in ["+5", "-1", "5s", ""] {
            let cc = CacheControl::parse(&headers(&[("cache-control", &format!("max-age={v}"))]));
            assert_eq!(cc.max_age, Some(0), "{v:?}");
        }
    }

    /// Found by the `policy` fuzz target: huge deltas, `Age` values and
    /// configured TTLs overflowed the millisecond arithmetic.
    #[test]
    fn huge_values_saturate_instead_of_overflowing() {
        let mut r = rule();
        r.stale_while_revalidate = Duration::MAX;
        r.stale_if_error = Duration::MAX;
        let f = policy(
            200,
            &[
                ("cache-control", "max-age=18446744073709551615"),
                ("age", "18446744073709551615"),
            ],
            &r,
        )
        .unwrap();
        assert_eq!(f.fresh_until - f.born_at, MAX_DELTA_SECONDS * 1000);
        assert!(f.born_at <= T0);
        assert_eq!(f.stale_if_error_until, u64::MAX);
        assert_eq!(f.stale_while_revalidate_until, u64::MAX);
        let mut forever = rule();
        forever.ttl = Some(Duration::MAX);
        let f = policy(200, &[], &forever).unwrap();
        assert_eq!(
            f.fresh_until,
            u64::MAX,
            "a huge TTL must not wrap to a short one"
        );
    }

    #[test]
    fn only_get_and_head_without_credentials_use_the_cache() {
        let r = rule();
        let none = HeaderMap::new();
        assert!(request_policy(&Method::GET, &none, false, &r).is_ok());
        assert!(request_policy(&Method::HEAD, &none, false, &r).is_ok());
        assert_eq!(
            request_policy(&Method::POST, &none, false, &r),
            Err(Bypass::Method)
        );
        assert_eq!(
            request_policy(&Method::GET, &none, true, &r),
            Err(Bypass::Body)
        );
        let auth = headers(&[("authorization", "Bearer x")]);
        assert_eq!(
            request_policy(&Method::GET, &auth, false, &r),
            Err(Bypass::Authorization)
        );
        let mut keyed = r.clone();
        keyed.key_headers = vec!["authorization".into()];
        assert!(request_policy(&Method::GET, &auth, false, &keyed).is_ok());
        let nc = headers(&[("cache-control", "no-cache")]);
        assert!(
            request_policy(&Method::GET, &nc, false, &r).unwrap().lookup,
            "client no-cache ignored unless the rule honours it"
        );
        let mut honor = r.clone();
        honor.honor_client_no_cache = true;
        assert!(
            !request_policy(&Method::GET, &nc, false, &honor)
                .unwrap()
                .lookup
        );
        let ns = headers(&[("cache-control", "no-store")]);
        assert!(!request_policy(&Method::GET, &ns, false, &r).unwrap().store);
    }

    #[test]
    fn never_stores_what_a_shared_cache_must_not() {
        let r = rule();
        assert_eq!(
            policy(200, &[("cache-control", "no-store, max-age=60")], &r),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            policy(200, &[("cache-control", "private, max-age=60")], &r),
            Err(NotStorable::Private)
        );
        assert_eq!(
            policy(200, &[("cache-control", "private=\"x\", max-age=60")], &r),
            Err(NotStorable::Private)
        );
        assert_eq!(
            policy(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
                &r
            ),
            Err(NotStorable::SetCookie)
        );
        assert_eq!(
            policy(200, &[("cache-control", "max-age=60"), ("vary", "*")], &r),
            Err(NotStorable::VaryStar)
        );
        assert_eq!(
            policy(206, &[("cache-control", "max-age=60")], &r),
            Err(NotStorable::Partial)
        );
        assert_eq!(
            policy(503, &[("cache-control", "max-age=60")], &r),
            Err(NotStorable::Status)
        );
        assert_eq!(
            policy(200, &[], &r),
            Err(NotStorable::NoFreshness),
            "heuristic freshness without config"
        );
        // Even a route that overrides upstream freshness obeys no-store and private.
        let mut o = r.clone();
        o.override_upstream = true;
        o.ttl = Some(Duration::from_secs(60));
        assert_eq!(
            policy(200, &[("cache-control", "no-store")], &o),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            policy(200, &[("cache-control", "private")], &o),
            Err(NotStorable::Private)
        );
        let mut sc = r.clone();
        sc.store_set_cookie_responses = true;
        assert!(
            policy(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
                &sc
            )
            .unwrap()
            .strip_set_cookie
        );
    }

    #[test]
    fn freshness_follows_the_rfc_order() {
        let r = rule();
        let f = policy(200, &[("cache-control", "max-age=60, s-maxage=30")], &r).unwrap();
        // s-maxage wins for a shared cache; the 100 ms response delay counts as age.
        assert_eq!(f.fresh_until, T0 - 100 + 30_000);
        let date = httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(T0));
        let exp =
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(T0 + 120_000));
        let f = policy(200, &[("date", &date), ("expires", &exp)], &r).unwrap();
        assert_eq!(f.fresh_until, T0 - 100 + 120_000);
        // Age already spent upstream is subtracted.
        let f = policy(200, &[("cache-control", "max-age=60"), ("age", "50")], &r).unwrap();
        assert_eq!(f.fresh_until, T0 - 50_100 + 60_000);
        // An invalid Expires means already expired.
        assert!(
            policy(200, &[("expires", "0")], &r).is_err()
                || policy(200, &[("expires", "0")], &r).unwrap().fresh_until <= T0
        );
        // Configured TTL only when the upstream gives none, and only for
        // heuristically cacheable statuses.
        let mut d = r.clone();
        d.ttl = Some(Duration::from_secs(10));
        assert_eq!(policy(200, &[], &d).unwrap().fresh_until, T0 - 100 + 10_000);
        assert_eq!(
            policy(200, &[("cache-control", "max-age=5")], &d)
                .unwrap()
                .fresh_until,
            T0 - 100 + 5_000
        );
        assert_eq!(policy(302, &[], &d), Err(NotStorable::Status));
        assert!(policy(302, &[("cache-control", "max-age=5")], &d).is_ok());
        // A route override replaces upstream freshness.
        let mut o = d.clone();
        o.override_upstream = true;
        assert_eq!(
            policy(200, &[("cache-control", "max-age=5, no-cache")], &o)
                .unwrap()
                .fresh_until,
            T0 - 100 + 10_000
        );
    }

    #[test]
    fn no_cache_is_stored_only_for_revalidation() {
        let r = rule();
        let f = policy(
            200,
            &[("cache-control", "no-cache, max-age=60"), ("etag", "\"a\"")],
            &r,
        )
        .unwrap();
        assert!(f.fresh_until <= T0, "no-cache entry must be stale at once");
        assert_eq!(
            f.stale_if_error_until, f.fresh_until,
            "no-cache entry must never be served stale"
        );
        assert_eq!(
            policy(200, &[("cache-control", "no-cache")], &r),
            Err(NotStorable::NoFreshness)
        );
    }

    #[test]
    fn stale_windows() {
        let mut r = rule();
        r.stale_if_error = Duration::from_secs(300);
        r.stale_while_revalidate = Duration::from_secs(10);
        let f = policy(200, &[("cache-control", "max-age=60")], &r).unwrap();
        assert_eq!(f.stale_while_revalidate_until - f.fresh_until, 10_000);
        assert_eq!(f.stale_if_error_until - f.fresh_until, 300_000);
        let f = policy(
            200,
            &[(
                "cache-control",
                "max-age=60, stale-while-revalidate=5, stale-if-error=7",
            )],
            &r,
        )
        .unwrap();
        assert_eq!(f.stale_while_revalidate_until - f.fresh_until, 5_000);
        assert_eq!(f.stale_if_error_until - f.fresh_until, 7_000);
        for strict in [
            "max-age=60, must-revalidate",
            "max-age=60, proxy-revalidate",
            "s-maxage=60",
        ] {
            let f = policy(200, &[("cache-control", strict)], &r).unwrap();
            assert_eq!(f.stale_if_error_until, f.fresh_until, "{strict}");
            assert_eq!(f.stale_while_revalidate_until, f.fresh_until, "{strict}");
        }
    }

    #[test]
    fn edge_header_never_promises_more_than_left() {
        let mut r = rule();
        assert_eq!(
            edge_cache_control(42, &r),
            "public, max-age=42, s-maxage=42"
        );
        r.edge_ttl = Some(Duration::from_secs(10));
        assert_eq!(
            edge_cache_control(42, &r),
            "public, max-age=10, s-maxage=10"
        );
        assert_eq!(edge_cache_control(3, &r), "public, max-age=3, s-maxage=3");
        r.key_headers = vec!["authorization".into()];
        assert_eq!(edge_cache_control(3, &r), "private, max-age=3");
    }
}
