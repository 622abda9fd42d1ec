//! What the next cache out (CloudFront, a corporate proxy, the browser) is
//! told. The upstream's headers go out as they are, except where
//! configuration supplies or limits freshness, and then only the
//! shared-cache part (`s-maxage`); and except where an answer is keyed on
//! request headers the edge cannot key on, which goes out `private`.
//!
//! - A route `ttl` / `status_ttl` that gave a response its freshness adds
//!   `s-maxage` = the lifetime it gave (not the time left: the next cache
//!   subtracts `Age` itself).
//! - `edge_ttl` caps `s-maxage` at `Age + cap`: the edge keeps it at most
//!   `cap` longer. `edge_ttl = "0s"` sends `s-maxage=0`: shared caches must
//!   revalidate every use with cachegate (which answers from its own
//!   cache), browsers keep what `max-age` allows. `private` would keep the
//!   edge out too, but it says the answer is per-user, which it is not.
//! - Browser-facing directives (`max-age`, `no-cache`, `must-revalidate`,
//!   `immutable`, `stale-*`, anything unknown) are never changed, and a
//!   `private` or `no-store` answer is never touched.
//! - Keyed answers name their keys in `Vary`. When the edge cannot key on
//!   one of them (`edge.key_headers`; the upstream's own `Vary` counts
//!   only when that is configured, see [`mark_keyed`]), or the answer is keyed on
//!   `Authorization` (RFC 9111 §3.5: a shared cache reuses such answers
//!   only when told it may), `public` and `s-maxage` go and `private`
//!   comes: every shared cache must then not store it, whether or not it
//!   honours `Vary`, while the browser (one user) still may. `s-maxage=0`
//!   with `Vary` would leave it to caches that ignore `Vary` (CloudFront
//!   does, for headers outside its cache policy) to revalidate one
//!   tenant's copy with another tenant's request.

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;

use super::cache_control::split_directives;
use super::CacheControl;
use super::Rule;

/// What the edge rewrite needs to know about an entry going out.
#[derive(Debug, Clone, Copy)]
pub struct EdgeFacts<'a> {
    /// The entry's current age in whole seconds (the `Age` sent).
    pub age_secs: u64,
    /// The freshness lifetime cachegate gave the entry, in whole seconds.
    pub lifetime_secs: u64,
    /// Its freshness came from the route (`ttl`, `status_ttl`).
    pub route_supplied: bool,
    pub rule: &'a Rule,
    /// Lower-case request headers the cache in front keys on
    /// (`edge.key_headers`); `None` when not configured.
    pub edge_key_headers: Option<&'a [String]>,
}

/// The request headers the cache in front keys on, lower case: those
/// `edge.key_headers` names; unset with CloudFront configured, what
/// template.yaml's cache policy keys on (`Accept-Encoding`), since
/// CloudFront keys only on its cache policy whatever `Vary` says; unset
/// and no edge configured, `None`: whatever is in front is taken to honour
/// `Vary` (RFC 9111 §4.1).
pub fn edge_key_headers(configured: Option<&[String]>, cloudfront: bool) -> Option<Vec<String>> {
    match configured {
        Some(names) => Some(names.iter().map(|h| h.to_ascii_lowercase()).collect()),
        None if cloudfront => Some(vec!["accept-encoding".into()]),
        None => None,
    }
}

/// Rewrite the headers of a stored answer going out, per the module rules.
pub fn edge_headers(headers: &mut HeaderMap, facts: EdgeFacts<'_>) {
    if mark_keyed(headers, facts.rule, facts.edge_key_headers, true) {
        return;
    }
    if !facts.route_supplied && facts.rule.edge_ttl.is_none() {
        // Nothing to supply or cap (the common hit): the upstream's
        // headers go out as stored, without parsing them again.
        return;
    }
    let cc = CacheControl::parse(headers);
    if cc.no_store || cc.private {
        return;
    }
    let mut s_maxage = facts.route_supplied.then_some(facts.lifetime_secs);
    if let Some(cap) = facts.rule.edge_ttl.map(|d| d.as_secs()) {
        s_maxage = if cap == 0 {
            Some(0)
        } else {
            s_maxage
                .or_else(|| downstream_lifetime(&cc, headers))
                .map(|l| l.min(facts.age_secs.saturating_add(cap)))
        };
    }
    match s_maxage {
        Some(s) if cc.s_maxage != Some(s) => {
            rewrite(headers, &["s-maxage"], &format!("s-maxage={s}"));
        }
        _ => {}
    }
}

/// Name the route's key headers in `Vary` (the stored answer's `Vary`
/// already names its own) and, when the edge cannot key on every header
/// the answer varies by, make it `private`. `with_vary` counts the
/// upstream's `Vary` among the keys (a stored entry is keyed on it; a
/// relayed answer is the upstream's own statement) — only when
/// `edge.key_headers` is configured: an edge that keys only on what it is
/// told. Without it the next cache is one that honours `Vary` (RFC 9111
/// §4.1), and the origin's own `Vary` is the origin's to state; the
/// route's key headers still go out `private` (cachegate added them, and
/// a cache that ignores `Vary` would mix tenants). Returns whether it
/// marked the answer `private` (or found it so already).
pub fn mark_keyed(
    headers: &mut HeaderMap,
    rule: &Rule,
    edge_key_headers: Option<&[String]>,
    with_vary: bool,
) -> bool {
    let keys: Vec<&str> = rule.key_headers.iter().map(String::as_str).collect();
    mark_keyed_on(headers, &keys, edge_key_headers, with_vary)
}

/// An answer relayed to a request carrying credential headers its route
/// does not key on (`unkeyed`, [`Rule::unkeyed_credentials`]), which the
/// upstream did not mark shareable: it goes out as an answer keyed on
/// them would ([`mark_keyed`]), named in `Vary` and `private` unless the
/// edge keys on them all. Caches in front apply RFC 9111 §3.5 to
/// `Authorization` themselves; they do not know that `X-Api-Key` says who
/// the client is, and would otherwise give one tenant's answer to another.
pub fn mark_credential_answer(
    headers: &mut HeaderMap,
    unkeyed: &[HeaderName],
    edge_key_headers: Option<&[String]>,
) {
    if unkeyed.is_empty() || super::explicitly_shareable(headers) {
        return;
    }
    let keys: Vec<&str> = unkeyed.iter().map(HeaderName::as_str).collect();
    mark_keyed_on(headers, &keys, edge_key_headers, false);
}

/// [`mark_keyed`] for the request headers `keys` (lower case).
fn mark_keyed_on(
    headers: &mut HeaderMap,
    keys: &[&str],
    edge_key_headers: Option<&[String]>,
    with_vary: bool,
) -> bool {
    if keys.is_empty() && !(with_vary && edge_key_headers.is_some()) {
        // Nothing to name in `Vary` and nothing the edge could fail to key
        // on: the common hit, which need not parse `Vary` to find that out.
        return false;
    }
    let vary = super::headers::vary_names(headers).unwrap_or_default();
    let missing: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| !vary.iter().any(|v| v == k))
        .collect();
    if !missing.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&missing.join(", ")) {
            headers.append(header::VARY, v);
        }
    }
    let mut keys = keys.to_vec();
    if with_vary && edge_key_headers.is_some() {
        keys.extend(vary.iter().map(String::as_str));
    }
    let edge_keys = edge_key_headers.unwrap_or_default();
    let edge_cannot_key = keys
        .iter()
        .any(|k| *k == "authorization" || !edge_keys.iter().any(|e| e == k));
    if !edge_cannot_key {
        return false;
    }
    let cc = CacheControl::parse(headers);
    if !(cc.no_store || cc.private) {
        rewrite(headers, &["public", "s-maxage"], "private");
    }
    true
}

/// The freshness lifetime a downstream cache reads from these headers
/// (`s-maxage`, `max-age`, `Expires - Date`), in whole seconds.
fn downstream_lifetime(cc: &CacheControl, headers: &HeaderMap) -> Option<u64> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(s);
    }
    let expires = super::response::header_time(headers, header::EXPIRES);
    if headers.contains_key(header::EXPIRES) {
        let date = super::response::header_time(headers, header::DATE)?;
        return Some(expires.unwrap_or(0).saturating_sub(date) / 1000);
    }
    None
}

/// Replace `Cache-Control` with its directives minus those named in
/// `drop`, plus `add`: one value, the other directives in their order.
fn rewrite(headers: &mut HeaderMap, drop: &[&str], add: &str) {
    let mut kept: Vec<String> = Vec::new();
    for v in headers.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { continue };
        for d in split_directives(v) {
            let d = d.trim();
            let name = d.split('=').next().unwrap_or("").trim();
            if !drop.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                kept.push(d.to_owned());
            }
        }
    }
    kept.push(add.to_owned());
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        headers.insert(header::CACHE_CONTROL, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;
    use std::time::Duration;

    fn rule() -> Rule {
        Rule::global(&CacheConfig::default())
    }

    fn out(cc: Option<&str>, facts: impl FnOnce(&Rule) -> EdgeFacts<'_>, r: &Rule) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(cc) = cc {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_str(cc).unwrap());
        }
        edge_headers(&mut h, facts(r));
        h
    }

    fn facts(age: u64, lifetime: u64, route: bool) -> impl FnOnce(&Rule) -> EdgeFacts<'_> {
        move |rule| EdgeFacts {
            age_secs: age,
            lifetime_secs: lifetime,
            route_supplied: route,
            rule,
            edge_key_headers: Some(EDGE),
        }
    }

    static EDGE: &[String] = &[];

    fn cc(h: &HeaderMap) -> &str {
        h.get(header::CACHE_CONTROL)
            .map_or("", |v| v.to_str().unwrap())
    }

    /// RFC 9111 §4.1: a cache honours `Vary`; CloudFront keys only on its
    /// cache policy, so with it configured the keys are never left unknown.
    #[test]
    fn edge_keys_are_unknown_only_without_an_edge() {
        assert_eq!(edge_key_headers(None, false), None);
        assert_eq!(
            edge_key_headers(None, true),
            Some(vec!["accept-encoding".to_string()])
        );
        let named = ["X-Tenant".to_string()];
        assert_eq!(
            edge_key_headers(Some(&named), false),
            Some(vec!["x-tenant".to_string()])
        );
        assert_eq!(edge_key_headers(Some(&[]), false), Some(vec![]));
    }

    #[test]
    fn upstream_directives_go_out_unchanged() {
        let r = rule();
        for v in [
            "max-age=60",
            "public, max-age=0, s-maxage=60",
            "max-age=60, must-revalidate, no-transform, immutable",
            "no-cache",
            "max-age=60, stale-while-revalidate=30, stale-if-error=600",
        ] {
            let h = out(Some(v), facts(8, 60, false), &r);
            assert_eq!(cc(&h), v);
            assert!(h.get(header::VARY).is_none());
        }
        assert!(out(None, facts(8, 60, false), &r).is_empty());
    }

    #[test]
    fn a_route_ttl_adds_the_lifetime_it_gave_as_s_maxage() {
        let r = rule();
        assert_eq!(cc(&out(None, facts(10, 60, true), &r)), "s-maxage=60");
        // The browser's part stays as the upstream said.
        assert_eq!(
            cc(&out(Some("max-age=5"), facts(10, 60, true), &r)),
            "max-age=5, s-maxage=60"
        );
    }

    #[test]
    fn edge_ttl_caps_s_maxage_at_age_plus_cap() {
        let mut r = rule();
        r.edge_ttl = Some(Duration::from_secs(10));
        assert_eq!(
            cc(&out(Some("max-age=60"), facts(8, 60, false), &r)),
            "max-age=60, s-maxage=18"
        );
        // Nothing to cap when the lifetime is shorter than Age + cap.
        assert_eq!(
            cc(&out(Some("max-age=60"), facts(55, 60, false), &r)),
            "max-age=60, s-maxage=60"
        );
        assert_eq!(
            cc(&out(
                Some("public, s-maxage=300, max-age=30"),
                facts(0, 300, false),
                &r
            )),
            "public, max-age=30, s-maxage=10"
        );
        // No lifetime: nothing added (the edge has none to cap either).
        assert_eq!(
            cc(&out(Some("no-cache"), facts(0, 0, false), &r)),
            "no-cache"
        );
        r.edge_ttl = Some(Duration::ZERO);
        assert_eq!(
            cc(&out(Some("max-age=60"), facts(8, 60, false), &r)),
            "max-age=60, s-maxage=0"
        );
        assert_eq!(cc(&out(None, facts(8, 60, true), &r)), "s-maxage=0");
        // Never makes a private or no-store answer cacheable.
        for v in ["private, max-age=60", "no-store"] {
            assert_eq!(cc(&out(Some(v), facts(0, 60, false), &r)), v);
        }
    }

    #[test]
    fn keyed_answers_name_their_keys_and_stay_out_of_shared_caches() {
        let mut r = rule();
        r.key_headers = vec!["x-tenant".into()];
        let edge = vec!["accept-encoding".to_string()];
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=60, s-maxage=60"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        assert!(mark_keyed(&mut h, &r, Some(&edge), true));
        assert_eq!(cc(&h), "max-age=60, private");
        let vary: Vec<_> = h.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "x-tenant"]);
        // An edge that keys on it may share it, Vary tells it how.
        let edge = vec!["accept-encoding".to_string(), "x-tenant".to_string()];
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );
        assert!(!mark_keyed(&mut h, &r, Some(&edge), true));
        assert_eq!(cc(&h), "max-age=60");
        assert_eq!(h[header::VARY], "x-tenant");
        // The upstream's Vary counts for a stored entry.
        let r = rule();
        let mut h = HeaderMap::new();
        h.insert(header::VARY, HeaderValue::from_static("accept-language"));
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );
        assert!(!mark_keyed(&mut h.clone(), &r, Some(&edge), false));
        assert!(mark_keyed(&mut h.clone(), &r, Some(&edge), true));
        // No edge.key_headers: the next cache honours Vary (RFC 9111
        // §4.1), so the origin's own Vary goes out as it came.
        assert!(!mark_keyed(&mut h, &r, None, true));
        assert_eq!(cc(&h), "max-age=60");
        assert_eq!(h[header::VARY], "accept-language");
        // cachegate's own key headers still go out private without it.
        let mut keyed = rule();
        keyed.key_headers = vec!["x-tenant".into()];
        assert!(mark_keyed(&mut h, &keyed, None, true));
        assert_eq!(cc(&h), "max-age=60, private");
        // Authorization is never shared, whatever the edge keys on.
        let mut a = rule();
        a.key_headers = vec!["authorization".into()];
        let edge = vec!["authorization".to_string()];
        let mut h = HeaderMap::new();
        edge_headers(
            &mut h,
            EdgeFacts {
                age_secs: 0,
                lifetime_secs: 60,
                route_supplied: true,
                rule: &a,
                edge_key_headers: Some(&edge),
            },
        );
        assert_eq!(cc(&h), "private");
        assert_eq!(h[header::VARY], "authorization");
    }

    /// An answer relayed to a request with a credential header its route
    /// does not key on goes out as one keyed on it would: named in `Vary`,
    /// `private` unless the edge keys on it; what the upstream marked
    /// shareable, or already keeps out of shared caches, is left as it is.
    #[test]
    fn credential_answers_go_out_keyed_on_the_credential() {
        let api_key = [HeaderName::from_static("x-api-key")];
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            h
        };
        for edge in [None, Some(&[][..])] {
            let mut h = with("max-age=60");
            mark_credential_answer(&mut h, &api_key, edge);
            assert_eq!(cc(&h), "max-age=60, private", "{edge:?}");
            assert_eq!(h[header::VARY], "x-api-key");
        }
        let keyed_edge = vec!["x-api-key".to_string()];
        let mut h = with("max-age=60");
        mark_credential_answer(&mut h, &api_key, Some(&keyed_edge));
        assert_eq!(cc(&h), "max-age=60", "an edge that keys on it may share it");
        assert_eq!(h[header::VARY], "x-api-key");
        for v in ["public, max-age=60", "s-maxage=60"] {
            let mut h = with(v);
            mark_credential_answer(&mut h, &api_key, None);
            assert_eq!(cc(&h), v);
            assert!(h.get(header::VARY).is_none(), "{v}");
        }
        for v in ["private, max-age=60", "no-store"] {
            let mut h = with(v);
            mark_credential_answer(&mut h, &api_key, None);
            assert_eq!(cc(&h), v);
        }
        let mut h = with("max-age=60");
        mark_credential_answer(&mut h, &[], None);
        assert_eq!(cc(&h), "max-age=60", "no credential: untouched");
        assert!(h.get(header::VARY).is_none());
    }
}
