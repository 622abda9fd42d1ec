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
//!
//! - [`cache_control`]: the `Cache-Control` parser.
//! - [`request`]: may a request use the cache at all.
//! - [`response`]: may a response be stored, and for how long.
//! - [`conditional`]: conditional requests, ours upstream and the client's,
//!   and what a 304 may update.
//! - [`content_coding`]: whether a stored coding may go to a request.
//! - [`compression`]: what cachegate may compress, the `Accept-Encoding`
//!   token, and what coding a client is sent.
//! - [`range`]: byte ranges answered from a stored complete response.
//! - [`headers`]: what is forwarded upstream and what is stored.
//! - [`edge`]: what the next cache out is told (`s-maxage`, `Vary`, `private`).
//! - [`date`]: HTTP dates read by RFC 9110 §5.6.7's grammar.
//! - [`back_off`]: what an upstream answer says about calling it again.
//! - [`rule`]: the effective route rule the policy reads.

pub mod back_off;
pub mod cache_control;
pub mod compression;
pub mod conditional;
pub mod content_coding;
pub mod date;
pub mod edge;
pub mod headers;
pub mod range;
pub mod rate_limit;
pub mod request;
pub mod response;
pub mod rule;

pub use cache_control::{CacheControl, MAX_DELTA_SECONDS};
pub use edge::{edge_headers, mark_keyed, EdgeFacts};
pub use request::{
    explicitly_shareable, request_policy, Bypass, Personal, RequestFacts, RequestPolicy,
};
pub use response::{response_policy, Freshness, NotStorable, ResponseFacts};
pub use rule::Rule;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;
    use cachegate_store::UnixMillis;
    use http::HeaderValue;
    use http::{HeaderMap, Method, StatusCode};
    use std::time::Duration;

    const T0: UnixMillis = 1_700_000_000_000;

    fn rule() -> Rule {
        Rule::global(&CacheConfig::default())
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
        policy_for(RequestPolicy::PLAIN_GET, status, pairs, rule)
    }

    fn policy_for(
        request: RequestPolicy,
        status: u16,
        pairs: &[(&str, &str)],
        rule: &Rule,
    ) -> Result<Freshness, NotStorable> {
        let h = headers(pairs);
        response_policy(
            ResponseFacts {
                status: StatusCode::from_u16(status).unwrap(),
                headers: &h,
                body_len: 10,
                request_time: T0 - 100,
                response_time: T0,
                request,
            },
            rule,
        )
    }

    fn admit(method: &Method, h: &HeaderMap, rule: &Rule) -> Result<RequestPolicy, Bypass> {
        admit_with(method, h, false, false, rule)
    }

    fn admit_with(
        method: &Method,
        headers: &HeaderMap,
        has_body: bool,
        upgrade: bool,
        rule: &Rule,
    ) -> Result<RequestPolicy, Bypass> {
        request_policy(
            RequestFacts {
                method,
                headers,
                has_body,
                upgrade,
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
        for v in ["+5", "-1", "5s"] {
            let cc = CacheControl::parse(&headers(&[("cache-control", &format!("max-age={v}"))]));
            assert_eq!(cc.max_age, Some(0), "{v:?}");
        }
        // No argument at all is not a directive list: no-store.
        let cc = CacheControl::parse(&headers(&[("cache-control", "max-age=")]));
        assert!(cc.no_store);
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
        assert!(admit(&Method::GET, &none, &r).is_ok());
        assert!(admit(&Method::HEAD, &none, &r).is_ok());
        assert_eq!(admit(&Method::POST, &none, &r), Err(Bypass::Method));
        assert_eq!(
            admit_with(&Method::GET, &none, true, false, &r),
            Err(Bypass::Body)
        );
        let auth = headers(&[("authorization", "Bearer x")]);
        assert_eq!(admit(&Method::GET, &auth, &r), Err(Bypass::Authorization));
        let mut keyed = r.clone();
        keyed.key_headers = vec!["authorization".into()];
        assert!(admit(&Method::GET, &auth, &keyed).is_ok());
        let nc = headers(&[("cache-control", "no-cache")]);
        assert!(
            admit(&Method::GET, &nc, &r).unwrap().lookup,
            "client no-cache ignored unless the rule honours it"
        );
        let mut honor = r.clone();
        honor.honor_client_no_cache = true;
        assert!(!admit(&Method::GET, &nc, &honor).unwrap().lookup);
        let ns = headers(&[("cache-control", "no-store")]);
        assert!(!admit(&Method::GET, &ns, &r).unwrap().store);
        assert!(admit(&Method::HEAD, &none, &r).unwrap().head);
        assert!(!admit(&Method::GET, &none, &r).unwrap().head);
    }

    /// `Upgrade` is hop-by-hop: the canonical request has dropped the
    /// header and carries the flag, which alone decides. A GET's `Range`
    /// may be cut from a fresh stored response (RFC 9110 §14.2); a HEAD's
    /// has nothing to cut.
    #[test]
    fn upgrade_and_range_requests() {
        let r = rule();
        let none = HeaderMap::new();
        assert_eq!(
            admit_with(&Method::GET, &none, false, true, &r),
            Err(Bypass::Upgrade)
        );
        let range = headers(&[("range", "bytes=0-9")]);
        assert!(admit(&Method::GET, &range, &r).unwrap().range);
        assert!(!admit(&Method::GET, &none, &r).unwrap().range);
        assert_eq!(admit(&Method::HEAD, &range, &r), Err(Bypass::Range));
        // A method that may not use the cache says so first.
        assert_eq!(
            admit_with(&Method::POST, &range, false, true, &r),
            Err(Bypass::Method)
        );
    }

    /// The request's share of storability, decided with the response's.
    #[test]
    fn the_request_limits_what_is_stored() {
        let r = rule();
        let fresh = [("cache-control", "max-age=60")];
        let head = RequestPolicy {
            head: true,
            ..RequestPolicy::PLAIN_GET
        };
        assert_eq!(policy_for(head, 200, &fresh, &r), Err(NotStorable::Head));
        let no_store = RequestPolicy {
            store: false,
            ..RequestPolicy::PLAIN_GET
        };
        assert_eq!(
            policy_for(no_store, 200, &fresh, &r),
            Err(NotStorable::ClientNoStore)
        );
        let cookie = RequestPolicy {
            shareable_only: Some(Personal::Cookie),
            ..RequestPolicy::PLAIN_GET
        };
        assert_eq!(
            policy_for(cookie, 200, &fresh, &r),
            Err(NotStorable::Cookie),
            "asked with a cookie: personal unless marked shareable"
        );
        let credential = RequestPolicy {
            shareable_only: Some(Personal::Credential),
            ..RequestPolicy::PLAIN_GET
        };
        assert_eq!(
            policy_for(credential, 200, &fresh, &r),
            Err(NotStorable::Credential),
            "asked with an API key: personal unless marked shareable (RFC 9111 §3.5)"
        );
        let route_ttl = Rule {
            ttl: Some(Duration::from_secs(60)),
            ..r.clone()
        };
        assert_eq!(
            policy_for(credential, 200, &[], &route_ttl),
            Err(NotStorable::Credential),
            "a route ttl does not make a personal answer shareable"
        );
        for shareable in ["public, max-age=60", "s-maxage=60"] {
            for asked in [cookie, credential] {
                assert!(
                    policy_for(asked, 200, &[("cache-control", shareable)], &r).is_ok(),
                    "{shareable}"
                );
            }
        }
        // Marked public, the response's own refusals still hold.
        assert_eq!(
            policy_for(
                cookie,
                200,
                &[
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "s=1")
                ],
                &r
            ),
            Err(NotStorable::SetCookie)
        );
        // The request's reasons come first.
        assert_eq!(
            policy_for(head, 200, &[("cache-control", "no-store")], &r),
            Err(NotStorable::Head)
        );
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
            policy(206, &[("cache-control", "max-age=60")], &r),
            Err(NotStorable::Partial)
        );
        assert_eq!(
            policy(100, &[("cache-control", "max-age=60")], &r),
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
    fn any_status_with_explicit_freshness_is_stored() {
        let r = rule();
        for status in [503, 500, 302, 403, 299] {
            let f = policy(status, &[("cache-control", "max-age=60")], &r).unwrap();
            assert_eq!(f.fresh_until, T0 - 100 + 60_000, "{status}");
        }
        // A stored server error is never served stale.
        let mut sie = r.clone();
        sie.stale_if_error = Duration::from_secs(300);
        let f = policy(
            503,
            &[("cache-control", "max-age=60, stale-if-error=60")],
            &sie,
        )
        .unwrap();
        assert_eq!(f.stale_if_error_until, f.fresh_until);
        assert_eq!(f.stale_while_revalidate_until, f.fresh_until);
        // A 200 with Content-Range is complete.
        assert!(policy(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("content-range", "bytes 0-9/10")
            ],
            &r
        )
        .is_ok());
    }

    #[test]
    fn configured_freshness_only_for_heuristically_cacheable_or_named_statuses() {
        let mut d = rule();
        d.ttl = Some(Duration::from_secs(60));
        assert!(policy(404, &[], &d).is_ok());
        for status in [500, 503, 302, 403] {
            assert_eq!(
                policy(status, &[], &d),
                Err(NotStorable::Status),
                "{status}"
            );
        }
        d.status_ttl = vec![
            (404, Duration::from_secs(10)),
            (503, Duration::from_secs(2)),
        ];
        assert_eq!(policy(404, &[], &d).unwrap().fresh_until, T0 - 100 + 10_000);
        assert_eq!(policy(503, &[], &d).unwrap().fresh_until, T0 - 100 + 2_000);
        assert_eq!(policy(200, &[], &d).unwrap().fresh_until, T0 - 100 + 60_000);
        // The upstream's own freshness still wins.
        assert_eq!(
            policy(404, &[("cache-control", "max-age=1")], &d)
                .unwrap()
                .fresh_until,
            T0 - 100 + 1_000
        );
        assert!(response::route_supplied_freshness(
            StatusCode::NOT_FOUND,
            &headers(&[]),
            &d
        ));
        assert!(!response::route_supplied_freshness(
            StatusCode::NOT_FOUND,
            &headers(&[("cache-control", "max-age=1")]),
            &d
        ));
        assert!(!response::route_supplied_freshness(
            StatusCode::FORBIDDEN,
            &headers(&[]),
            &d
        ));
    }

    #[test]
    fn must_understand() {
        let r = rule();
        // Understood status: no-store is the fallback for caches that do not know it.
        assert!(policy(
            200,
            &[("cache-control", "must-understand, no-store, max-age=60")],
            &r
        )
        .is_ok());
        assert_eq!(
            policy(
                299,
                &[("cache-control", "must-understand, no-store, max-age=60")],
                &r
            ),
            Err(NotStorable::MustUnderstand)
        );
        assert_eq!(
            policy(
                200,
                &[("cache-control", "must-understand, private, max-age=60")],
                &r
            ),
            Err(NotStorable::Private)
        );
        // must-understand counts wherever it is: another field line, one
        // that also carries a quoted string.
        assert!(policy(
            200,
            &[
                ("cache-control", "no-store"),
                ("cache-control", "must-understand, ext=\"a, b\", max-age=60")
            ],
            &r
        )
        .is_ok());
        // A malformed line is read as no-store to fail safe, and
        // must-understand does not lift that guess.
        for malformed in ["no-store;x", "max-age=60 public", "max-age=\"60"] {
            assert_eq!(
                policy(
                    200,
                    &[
                        ("cache-control", "must-understand, max-age=60"),
                        ("cache-control", malformed)
                    ],
                    &r
                ),
                Err(NotStorable::NoStore),
                "{malformed}"
            );
        }
    }

    #[test]
    fn age_counts_by_its_first_member_and_invalid_is_ignored() {
        let r = rule();
        let age = |v: &str| {
            let f = policy(200, &[("cache-control", "max-age=600"), ("age", v)], &r).unwrap();
            (T0 - f.born_at) / 1000
        };
        assert_eq!(age("7200, 0"), 7200);
        assert_eq!(age("30"), 30);
        assert_eq!(age("abc"), 0);
        assert_eq!(age("-5"), 0);
    }

    #[test]
    fn lenient_dates_and_unparseable_expires() {
        let r = rule();
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let expires = "sunday, 06-nov-94 08:50:37 gmt";
        let f = policy(200, &[("date", date), ("expires", expires)], &r)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(f.fresh_until - f.born_at, 60_000);
        // Unparseable Expires: already expired (stored only to revalidate).
        let f = policy(200, &[("expires", "soon"), ("etag", "\"a\"")], &r).unwrap();
        assert!(f.fresh_until <= T0);
        let mut no_stale = r.clone();
        no_stale.stale_if_error = Duration::ZERO;
        assert_eq!(
            policy(200, &[("expires", "soon")], &no_stale),
            Err(NotStorable::NoFreshness)
        );
    }

    #[test]
    fn stale_entries_with_validators_are_kept_to_revalidate() {
        let mut r = rule();
        r.keep_for_revalidation = Duration::from_secs(3600);
        for cc in [
            "max-age=0",
            "no-cache",
            "max-age=60, must-revalidate",
            "s-maxage=60",
        ] {
            let f = policy(200, &[("cache-control", cc), ("etag", "\"a\"")], &r).unwrap();
            assert_eq!(f.keep_until, f.fresh_until + 3_600_000, "{cc}");
        }
        let f = policy(200, &[("cache-control", "max-age=60")], &r).unwrap();
        assert_eq!(f.keep_until, f.fresh_until, "nothing to revalidate with");
    }

    #[test]
    fn cdn_cache_control_is_obeyed_ahead_of_cache_control() {
        let r = rule();
        let f = policy(
            200,
            &[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "max-age=60"),
            ],
            &r,
        )
        .unwrap();
        assert_eq!(f.fresh_until, T0 - 100 + 60_000);
        assert_eq!(
            policy(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "private")
                ],
                &r
            ),
            Err(NotStorable::Private)
        );
        assert_eq!(
            policy(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "no-store")
                ],
                &r
            ),
            Err(NotStorable::NoStore)
        );
        // The targeted field replaces Expires too.
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let exp = "Sun, 06 Nov 1994 09:49:37 GMT";
        assert_eq!(
            policy(
                200,
                &[
                    ("date", date),
                    ("expires", exp),
                    ("cdn-cache-control", "stale-if-error=5")
                ],
                &r
            ),
            Err(NotStorable::NoFreshness)
        );
        // cachegate's own field wins over both.
        let f = policy(
            200,
            &[
                ("cdn-cache-control", "no-store"),
                (
                    "cachegate-cache-control",
                    "max-age=5, stale-while-revalidate=7",
                ),
            ],
            &r,
        )
        .unwrap();
        assert_eq!(f.fresh_until, T0 - 100 + 5_000);
        assert_eq!(f.stale_while_revalidate_until - f.fresh_until, 7_000);
        let f = policy(
            200,
            &[
                ("cdn-cache-control", "max-age=60, no-cache"),
                ("etag", "\"a\""),
            ],
            &r,
        )
        .unwrap();
        assert!(f.fresh_until <= T0);
    }
}
