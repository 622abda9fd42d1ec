//! The header parsers and the caching policy: `CacheControl::parse`, the
//! lenient HTTP date parser, `request_policy`, `response_policy`, the
//! edge rewrite (`edge_headers`), the upstream back-off (`signal_of`) and announced quotas (`rate_limit::announced`), on any
//! header values, statuses and clocks, under several route rules.
//!
//! Input, as text lines:
//! ```text
//! METHOD STATUS REQUEST_TIME_MS RESPONSE_TIME_MS BODY_LEN   (any may be missing)
//! request-header: value
//! ...
//!                                                       (empty line)
//! response-header: value
//! ...
//! ```
#![no_main]

use std::time::Duration;

use cachegate::config::CacheConfig;
use cachegate::policy::back_off::{signal_of, BackOffRules, Signal};
use cachegate::policy::{
    edge_headers, request_policy, response_policy, Bypass, CacheControl, EdgeFacts, RequestFacts,
    RequestPolicy, ResponseFacts, MAX_DELTA_SECONDS,
};
use cachegate::routes::{RouteTable, Rule};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use libfuzzer_sys::fuzz_target;

const T0: u64 = 1_700_000_000_000;
const MAX_DELTA_MS: u64 = MAX_DELTA_SECONDS * 1000;

fn rules() -> Vec<Rule> {
    let base = (*RouteTable::build(&[], &CacheConfig::default())
        .expect("default routes")
        .rule_for("/"))
    .clone();
    let mut ttl = base.clone();
    ttl.ttl = Some(Duration::from_secs(60));
    ttl.stale_while_revalidate = Duration::from_secs(10);
    ttl.stale_if_error = Duration::from_secs(3600);
    let mut over = ttl.clone();
    over.override_upstream = true;
    over.edge_ttl = Some(Duration::from_secs(5));
    let mut cookies = ttl.clone();
    cookies.store_set_cookie_responses = true;
    cookies.honor_client_no_cache = true;
    let mut negative = ttl.clone();
    negative.status_ttl = vec![
        (404, Duration::from_secs(10)),
        (503, Duration::from_secs(1)),
    ];
    negative.key_headers = vec!["x-tenant".into()];
    negative.edge_ttl = Some(Duration::ZERO);
    let mut auth = ttl.clone();
    auth.key_headers = vec!["authorization".into()];
    auth.ttl = Some(Duration::MAX);
    auth.stale_if_error = Duration::MAX;
    vec![base, ttl, over, cookies, negative, auth]
}

fn headers(lines: &[&[u8]]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    h
}

/// A `Cache-Control` directive the headers plainly carry (visible ASCII,
/// no quoted strings anywhere, so there is no doubt what is a directive).
fn plainly_has(h: &HeaderMap, directive: &str) -> bool {
    h.get_all(http::header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok()
            && !v.as_bytes().contains(&b'"')
            && v.as_bytes().split(|&b| b == b',').any(|d| {
                let d = d.trim_ascii();
                let name = d.split(|&b| b == b'=').next().unwrap_or(d).trim_ascii();
                name.eq_ignore_ascii_case(directive.as_bytes())
            })
    })
}

/// Whether any `Cache-Control` line contains `word` at all (in any case,
/// quoted or not): the weakest reading, for skipping a check.
fn mentions(h: &HeaderMap, word: &str) -> bool {
    h.get_all(http::header::CACHE_CONTROL).iter().any(|v| {
        v.as_bytes()
            .windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let mut fields = first.split(|&b| b == b' ');
    let method = fields
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let num = |f: Option<&[u8]>| f.and_then(|f| std::str::from_utf8(f).ok()?.parse::<u64>().ok());
    let status = num(fields.next())
        .and_then(|s| StatusCode::from_u16(u16::try_from(s).ok()?).ok())
        .unwrap_or(StatusCode::OK);
    let request_time = num(fields.next()).unwrap_or(T0 - 100);
    let response_time = num(fields.next()).unwrap_or(T0);
    let body_len = num(fields.next()).unwrap_or(10) as usize;
    let rest: Vec<&[u8]> = lines.collect();
    let split = rest.iter().position(|l| l.trim_ascii().is_empty());
    let (req_lines, resp_lines) = match split {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&rest[..], &[][..]),
    };
    let req = headers(req_lines);
    let resp = headers(resp_lines);

    for (_, v) in req.iter().chain(resp.iter()) {
        if let Some(t) = v
            .to_str()
            .ok()
            .and_then(cachegate::policy::date::parse_http_date)
        {
            // Whatever parses is a real instant before year 10000.
            assert!(t < 253_402_300_800_000, "{v:?} read as {t}");
        }
    }
    // A back-off never exceeds its cap, only 429 and 503 ask for one, and
    // only gateway failures count towards the breaker.
    let back_off_rules = BackOffRules {
        default_wait: Duration::from_secs(1),
        max_wait: Duration::from_secs(300),
    };
    match signal_of(status, &resp, response_time, back_off_rules) {
        Signal::BackOff { wait, status: s } => {
            assert!(
                wait <= back_off_rules.max_wait,
                "back-off {wait:?} past the cap"
            );
            assert!(s == 429 || s == 503, "back-off asked by {s}");
        }
        Signal::Failure => assert!(matches!(status.as_u16(), 502..=504)),
        Signal::Answered => assert!(
            !matches!(status.as_u16(), 502..=504) && status != StatusCode::TOO_MANY_REQUESTS
        ),
    }
    // An announced quota resets within the cap and spends what is left
    // at a finite rate.
    if let Some(q) = cachegate::policy::rate_limit::announced(&resp, response_time) {
        assert!(q.reset_in <= cachegate::policy::rate_limit::MAX_RESET, "{q:?}");
        assert!(q.rate_per_second().is_finite(), "{q:?}");
    }
    // Browser-facing directives, and the ones cachegate stores by (RFC 9213
    // targeted fields first).
    let cc = CacheControl::parse(&resp);
    let stored_cc = CacheControl::for_storing(&resp);
    for delta in [
        cc.max_age,
        cc.s_maxage,
        cc.stale_while_revalidate,
        cc.stale_if_error,
    ]
    .into_iter()
    .flatten()
    {
        assert!(
            delta <= MAX_DELTA_SECONDS,
            "delta-seconds {delta} above 2^31"
        );
    }
    // A value that is not visible ASCII cannot be read: the safest reading.
    let unreadable = resp
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .any(|v| v.to_str().is_err());
    if plainly_has(&resp, "no-store") || unreadable {
        assert!(cc.no_store);
    }
    if plainly_has(&resp, "private") {
        assert!(cc.private);
    }

    for rule in rules() {
        let request = RequestFacts {
            method: &method,
            headers: &req,
            has_body: false,
            upgrade: req.contains_key("upgrade"),
        };
        match request_policy(request, &rule) {
            Ok(p) => {
                assert!(method == Method::GET || method == Method::HEAD);
                assert!(rule.keys_on_authorization() || !req.contains_key("authorization"));
                assert!(!req.contains_key("upgrade"));
                if plainly_has(&req, "no-store") {
                    assert!(!p.store, "client no-store ignored");
                }
            }
            Err(Bypass::Authorization) => assert!(req.contains_key("authorization")),
            Err(_) => {}
        }

        let facts = ResponseFacts {
            status,
            headers: &resp,
            body_len,
            request_time,
            response_time,
            request: RequestPolicy::PLAIN_GET,
        };
        let Ok(f) = response_policy(facts, &rule) else {
            continue;
        };
        // Never stored where a shared cache must not store (by the
        // directives cachegate obeys: a targeted field, else Cache-Control).
        let scc = CacheControl::for_storing(&resp);
        assert!(
            !(scc.no_store && !scc.must_understand) && !scc.private,
            "stored despite {scc:?}"
        );
        if !CacheControl::targeted(&resp) {
            // `private` always refuses. `no-store` does unless
            // must-understand lifts it (RFC 9111 §5.2.2.3), which it may
            // from any line, even one with quoted strings: so only a
            // response that nowhere mentions it is checked here.
            assert!(!plainly_has(&resp, "private"));
            if !mentions(&resp, "must-understand") {
                assert!(!plainly_has(&resp, "no-store"));
            }
            // A line that cannot be read is no-store, never lifted.
            assert!(!unreadable, "stored despite an unreadable Cache-Control");
        }
        if resp.contains_key("set-cookie") {
            assert!(rule.store_set_cookie_responses && f.strip_set_cookie);
        }
        assert!(body_len <= rule.max_entry_bytes);
        assert!(!matches!(status.as_u16(), 206 | 304) && !status.is_informational());
        if status.is_server_error() {
            assert_eq!(
                f.stale_if_error_until, f.fresh_until,
                "a stored error served stale"
            );
        }
        assert!(f.keep_until >= f.fresh_until, "{f:?}");
        assert!(cachegate::key::vary_names(&resp).is_some());

        // Times are ordered and clamped, never wrapped.
        assert!(f.born_at <= response_time, "born in the future: {f:?}");
        assert!(f.fresh_until >= f.born_at, "{f:?}");
        assert!(f.stale_while_revalidate_until >= f.fresh_until, "{f:?}");
        assert!(f.stale_if_error_until >= f.fresh_until, "{f:?}");
        if stored_cc.no_cache && !rule.override_upstream {
            assert!(
                f.fresh_until <= f.born_at.max(response_time),
                "no-cache is fresh: {f:?}"
            );
        }
        if response_time < 1 << 50 && !resp.contains_key("expires") {
            // Realistic clocks: no saturation, lifetimes within 2^31 s
            // unless the route configures more.
            if rule
                .ttl
                .is_none_or(|t| t.as_millis() < MAX_DELTA_MS as u128)
            {
                assert!(f.fresh_until - f.born_at <= MAX_DELTA_MS, "{f:?}");
            }
        }

        // The edge rewrite: browser freshness never raised, private and
        // no-store never touched, Authorization-keyed answers private.
        let age_secs = response_time.saturating_sub(f.born_at) / 1000;
        let mut out = resp.clone();
        edge_headers(
            &mut out,
            EdgeFacts {
                age_secs,
                lifetime_secs: f.fresh_until.saturating_sub(f.born_at) / 1000,
                route_supplied: cachegate::policy::response::route_supplied_freshness(
                    status, &resp, &rule,
                ),
                rule: &rule,
                edge_key_headers: Some(&["accept-encoding".to_string()]),
            },
        );
        let out_cc = CacheControl::parse(&out);
        assert_eq!(out_cc.max_age, cc.max_age, "browser max-age changed");
        assert_eq!(out_cc.no_cache, cc.no_cache);
        assert_eq!(out_cc.must_revalidate, cc.must_revalidate);
        if cc.private || cc.no_store {
            let cc_of = |h: &HeaderMap| {
                h.get_all(http::header::CACHE_CONTROL)
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect::<Vec<_>>()
            };
            assert_eq!(cc_of(&out), cc_of(&resp), "a private answer rewritten");
        } else if !rule.key_headers.is_empty() {
            assert!(out_cc.private && !out_cc.public && out_cc.s_maxage.is_none());
        } else if let (Some(cap), Some(s)) = (rule.edge_ttl, out_cc.s_maxage) {
            if out_cc.s_maxage != cc.s_maxage {
                assert!(
                    s <= age_secs.saturating_add(cap.as_secs()),
                    "s-maxage {s} past the cap"
                );
            }
        }
    }
});
