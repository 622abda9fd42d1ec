//! Whether a request may use the cache at all (RFC 9111 §2, §3.5, §4).

use http::{HeaderMap, Method};

use super::CacheControl;
use super::NotStorable;
use super::Rule;

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
    /// The client asked for a protocol upgrade (`Upgrade`, e.g. a
    /// WebSocket handshake). cachegate relays one exchange and upgrades
    /// nothing, so the upstream answers the request as a plain one; that
    /// answer is not what the client asked for and is neither stored nor
    /// served from the cache.
    Upgrade,
    /// A `Range` request that no fresh stored response could answer
    /// (a miss, a stale entry, or HEAD): partial answers are not stored;
    /// the upstream answers the range.
    Range,
    /// Carries `Cookie`, the route does not key on cookies, and what is
    /// stored is not marked shareable (`public`, `s-maxage`).
    Cookie,
    /// Carries a credential header (`cache.credential_headers`) the route
    /// does not key on, and what is stored is not marked shareable.
    Credential,
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
            Bypass::Cookie => "cookie",
            Bypass::Credential => "credential",
        }
    }
}

/// Why a request may take only answers the upstream marks shareable
/// ([`explicitly_shareable`]): it says who the client is, the route does
/// not key on that, and an upstream that never thought about caching
/// personalises on it without saying so. RFC 9111 §3.5 gives this rule
/// for `Authorization`; it holds for any credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personal {
    /// Carries `Cookie`, and the route does not key on cookies.
    Cookie,
    /// Carries a header of `cache.credential_headers` the route does not
    /// key on (it may carry cookies too).
    Credential,
}

impl Personal {
    /// The request's bypass when what is stored is not for it.
    pub fn bypass(self) -> Bypass {
        match self {
            Personal::Cookie => Bypass::Cookie,
            Personal::Credential => Bypass::Credential,
        }
    }

    /// Why its answer is not stored when it is not marked shareable.
    pub fn not_storable(self) -> NotStorable {
        match self {
            Personal::Cookie => NotStorable::Cookie,
            Personal::Credential => NotStorable::Credential,
        }
    }

    /// Why, for this request, the whole question is whether the answer is
    /// shareable: the credential first, cookies otherwise.
    pub fn of(headers: &HeaderMap, rule: &Rule) -> Option<Personal> {
        if rule.unkeyed_credentials(headers).next().is_some() {
            Some(Personal::Credential)
        } else if headers.contains_key(http::header::COOKIE) && !rule.cookies_are_keyed() {
            Some(Personal::Cookie)
        } else {
            None
        }
    }
}

/// Inputs about one request (its canonical form).
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub has_body: bool,
    /// The client asked for a protocol upgrade. `Upgrade` is hop-by-hop,
    /// so the canonical request's headers no longer carry it; the
    /// canonical request keeps this flag instead.
    pub upgrade: bool,
}

/// How a request may use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Look up a stored response.
    pub lookup: bool,
    /// Store the response (the client did not send `no-store`).
    pub store: bool,
    /// The request says who the client is and the route does not key on
    /// it ([`Personal`]): only answers the upstream marks shareable
    /// ([`explicitly_shareable`]) may be stored for it or served to it.
    pub shareable_only: Option<Personal>,
    /// A HEAD: its answer has no body to store.
    pub head: bool,
    /// A GET with `Range`: answered only from a fresh stored complete
    /// response (cut to the range); otherwise passed to the upstream,
    /// whose partial answer is not stored.
    pub range: bool,
}

impl RequestPolicy {
    /// A plain GET: nothing in it limits what the cache may do.
    pub const PLAIN_GET: RequestPolicy = RequestPolicy {
        lookup: true,
        store: true,
        shareable_only: None,
        head: false,
        range: false,
    };
}

/// Whether a request may use the cache, and how; `Err` says why not.
pub fn request_policy(facts: RequestFacts<'_>, rule: &Rule) -> Result<RequestPolicy, Bypass> {
    let RequestFacts {
        method,
        headers,
        has_body,
        upgrade,
    } = facts;
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
    if upgrade {
        return Err(Bypass::Upgrade);
    }
    let range = headers.contains_key(http::header::RANGE);
    if range && method != Method::GET {
        // A HEAD's range: nothing to cut; the upstream answers it.
        return Err(Bypass::Range);
    }
    let cc = CacheControl::parse(headers);
    let pragma_no_cache = headers
        .get_all(http::header::PRAGMA)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
    Ok(RequestPolicy {
        lookup: !(rule.honor_client_no_cache && (cc.no_cache || pragma_no_cache)),
        store: !cc.no_store,
        shareable_only: Personal::of(headers, rule),
        head: method == Method::HEAD,
        range,
    })
}

/// Whether a 2xx or 3xx answer to `method` invalidates what is stored for
/// its target URI (RFC 9111 §4.4: "a cache MUST invalidate the target URI
/// ... when it receives a non-error status code in response to an unsafe
/// request method (including methods whose safety is unknown)"). Only the
/// safe methods of RFC 9110 §9.2.1 do not: GET, HEAD, OPTIONS, TRACE.
/// Every other method does — the writes, and whatever else a client sends
/// (`M-SEARCH`, `PURGEME`, a lower-case `get`). That is no lever to empty
/// the cache: it drops only the entries of the one URI the request named
/// (and its same-origin `Location` / `Content-Location`), only after the
/// upstream accepted the request, which any client can already cause
/// with a POST to that URI.
pub fn invalidates_on_success(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// Whether a response says outright that a shared cache may give it to
/// anyone: `public` or `s-maxage` (RFC 9111 §5.2.2.9, §5.2.2.10).
pub fn explicitly_shareable(response_headers: &HeaderMap) -> bool {
    let cc = CacheControl::parse(response_headers);
    !cc.no_store && !cc.private && (cc.public || cc.s_maxage.is_some())
}

/// Keep only the cookies named in `names` (`key_cookies`), sorted by name
/// then in the order sent, in one `Cookie` header: what goes upstream on a
/// cached request, and what its key reads. Without any of them, no `Cookie`.
pub fn keep_key_cookies(headers: &mut HeaderMap, names: &[String]) {
    let mut kept: Vec<(&str, &str)> = Vec::new();
    let all: Vec<String> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    for pair in all.iter().flat_map(|v| v.split(';')) {
        let pair = pair.trim();
        let name = pair.split('=').next().unwrap_or("").trim();
        if names.iter().any(|n| n == name) {
            kept.push((name, pair));
        }
    }
    kept.sort_by(|a, b| a.0.cmp(b.0));
    let value = kept.iter().map(|(_, p)| *p).collect::<Vec<_>>().join("; ");
    headers.remove(http::header::COOKIE);
    if let Ok(v) = http::HeaderValue::from_str(&value) {
        if !value.is_empty() {
            headers.insert(http::header::COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheConfig, DEFAULT_CREDENTIAL_HEADERS};

    fn get(pairs: &[(&str, &str)], rule: &Rule) -> Result<RequestPolicy, Bypass> {
        let mut headers = HeaderMap::new();
        for (n, v) in pairs {
            headers.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        request_policy(
            RequestFacts {
                method: &Method::GET,
                headers: &headers,
                has_body: false,
                upgrade: false,
            },
            rule,
        )
    }

    fn keyed_on(names: &[&str]) -> Rule {
        Rule {
            key_headers: names.iter().map(|&n| n.to_owned()).collect(),
            ..Rule::global(&CacheConfig::default())
        }
    }

    /// Every default credential header makes a request's answer personal
    /// unless marked shareable (RFC 9111 §3.5's rule for `Authorization`),
    /// in any letter case; keying on the header lifts that for it alone.
    #[test]
    fn a_credential_header_the_route_does_not_key_on_takes_only_shareable_answers() {
        let global = Rule::global(&CacheConfig::default());
        assert_eq!(
            global.credential_headers.len(),
            DEFAULT_CREDENTIAL_HEADERS.len()
        );
        for name in DEFAULT_CREDENTIAL_HEADERS {
            let upper = name.to_ascii_uppercase();
            for sent in [*name, upper.as_str()] {
                assert_eq!(
                    get(&[(sent, "tenant-a")], &global).unwrap().shareable_only,
                    Some(Personal::Credential),
                    "{sent}"
                );
            }
            let keyed = keyed_on(&[name]);
            assert_eq!(
                get(&[(name, "tenant-a")], &keyed).unwrap().shareable_only,
                None,
                "{name} is part of the key"
            );
        }
        // Keyed on one credential, another one still says who the client is.
        let keyed = keyed_on(&["x-api-key"]);
        assert_eq!(
            get(&[("x-api-key", "a"), ("x-auth-token", "t")], &keyed)
                .unwrap()
                .shareable_only,
            Some(Personal::Credential)
        );
    }

    /// The credential is named before the cookie, whatever the route says
    /// of cookies; `Authorization` keeps its own, stricter rule.
    #[test]
    fn credentials_cookies_and_authorization_each_keep_their_rule() {
        let global = Rule::global(&CacheConfig::default());
        assert_eq!(
            get(&[("cookie", "s=1")], &global).unwrap().shareable_only,
            Some(Personal::Cookie)
        );
        assert_eq!(
            get(&[("cookie", "s=1"), ("x-api-key", "a")], &global)
                .unwrap()
                .shareable_only,
            Some(Personal::Credential)
        );
        let ignore_cookies = Rule {
            ignore_cookies: true,
            ..global.clone()
        };
        assert_eq!(
            get(&[("cookie", "s=1"), ("x-api-key", "a")], &ignore_cookies)
                .unwrap()
                .shareable_only,
            Some(Personal::Credential),
            "ignore_cookies is about cookies only"
        );
        assert_eq!(
            get(
                &[("authorization", "Bearer t"), ("x-api-key", "a")],
                &global
            ),
            Err(Bypass::Authorization)
        );
        assert_eq!(Personal::Credential.bypass().as_str(), "credential");
        assert_eq!(Personal::Cookie.bypass().as_str(), "cookie");
    }

    /// Headers that are not credentials of the resource leave a request
    /// anonymous: an anti-forgery token (the cookie it echoes is the
    /// credential), identity assertions and tracing ids; so does a list
    /// that does not name a header.
    #[test]
    fn other_headers_leave_a_request_anonymous() {
        let global = Rule::global(&CacheConfig::default());
        for name in [
            "x-csrf-token",
            "x-xsrf-token",
            "x-tenant-id",
            "x-user-id",
            "x-request-id",
            "accept-language",
        ] {
            assert_eq!(
                get(&[(name, "v")], &global).unwrap(),
                RequestPolicy::PLAIN_GET,
                "{name}"
            );
        }
        let only_tenant = Rule::global(&CacheConfig {
            credential_headers: vec!["X-Tenant-Key".into()],
            ..CacheConfig::default()
        });
        assert_eq!(
            get(&[("x-tenant-key", "k")], &only_tenant)
                .unwrap()
                .shareable_only,
            Some(Personal::Credential),
            "configured names are matched in any case"
        );
        assert_eq!(
            get(&[("x-api-key", "a")], &only_tenant)
                .unwrap()
                .shareable_only,
            None,
            "the configured list replaces the default"
        );
    }

    /// RFC 9111 §4.4 with RFC 9110 §9.2.1: every method that is not known
    /// to be safe invalidates on success.
    #[test]
    fn every_method_not_known_safe_invalidates() {
        for safe in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(
                !invalidates_on_success(&Method::from_bytes(safe.as_bytes()).unwrap()),
                "{safe}"
            );
        }
        for other in [
            "POST", "PUT", "PATCH", "DELETE", "M-SEARCH", "PURGEME", "PROPFIND", "get",
        ] {
            assert!(
                invalidates_on_success(&Method::from_bytes(other.as_bytes()).unwrap()),
                "{other}"
            );
        }
    }
}
