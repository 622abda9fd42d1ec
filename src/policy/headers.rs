//! What goes upstream and what is kept: hop-by-hop headers (RFC 9110
//! §7.6.1), headers that would let one client shape a shared answer, the
//! headers stored with an entry, surrogate keys.

use http::header::{self, HeaderName};
use http::HeaderMap;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the transport sets.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Drop hop-by-hop headers, including any the `Connection` header names.
/// One pass over the request's few headers: most have none of them, and
/// nine removals by name (each a hash lookup) were a measurable part of a
/// cache hit.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

/// Headers of a request about to go upstream: no hop-by-hop headers, no
/// `Host` (the upstream URL sets it), no `Content-Length` (the body does).
pub fn prepare_request_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
}

/// Request headers that upstream frameworks and proxies use to rebuild the
/// request's host, scheme, port, path or method, or to decide who the
/// client is. On a request whose response may be stored they would let one
/// client shape what every other client is served (cache poisoning; with a
/// method override, cache-poisoned denial of service), so they are not
/// forwarded unless the route makes them part of the key.
/// `cache.routing_headers` adds names. Bypassed requests (writes,
/// `Authorization`) forward them unchanged: their answers are not shared.
///
/// Sources: PortSwigger's Param Miner header wordlist
/// (`resources/headers`), J. Kettle, "Practical Web Cache Poisoning"
/// (2018) and "Web Cache Entanglement" (2020), and the HMO (HTTP Method
/// Override) headers of Nguyen et al., "Your Cache Has Fallen:
/// Cache-Poisoned Denial-of-Service Attack" (CCS 2019). Each name is here
/// for the reader named beside it; `Destination` is not (only WebDAV
/// `COPY`/`MOVE` read it, and those are writes, never stored).
///
/// `Forwarded`, `X-Forwarded-For`, `-Host`, `-Proto`, `X-Real-IP` and the
/// other client-IP headers are not here: the canonical request has replaced
/// the client's with cachegate's own on every request, and `-Host` and
/// `-Proto` are part of every key ([`crate::request::CLIENT_FORWARDING_HEADERS`]).
///
/// Sorted (a unit test checks), lower case, compared with `_` read as `-`.
pub const UNKEYED_ROUTING_HEADERS: &[&str] = &[
    "base-url",                  // base URL for links (PHP apps; Param Miner)
    "cf-visitor", // Cloudflare's `{"scheme":"https"}`: trusted-proxy packages, WordPress
    "front-end-https", // scheme: IIS / Outlook Web Access, Rack
    "http-url",   // request URL (CGI `HTTP_URL`; Param Miner)
    "proxy-url",  // target URL for gateways and PHP proxies (Param Miner)
    "request-uri", // path: read as `HTTP_REQUEST_URI` by CGI/PHP code
    "uri",        // path (Param Miner; 403-bypass lists)
    "url",        // path (Param Miner; 403-bypass lists)
    "x-arr-ssl",  // scheme: IIS Application Request Routing marks TLS
    "x-backend-host", // backend selection in proxy configurations
    "x-custom-ip-authorization", // client IP for allow-lists (Kettle's research)
    "x-forwarded-path", // path prefix (gateways, Spring)
    "x-forwarded-port", // port in absolute URLs: Rack, Symfony, Laravel, Spring
    "x-forwarded-prefix", // path base: Spring, ASP.NET Core, Traefik
    "x-forwarded-protocol", // scheme: Rack, Symfony
    "x-forwarded-scheme", // scheme: Rack, nginx configurations (Kettle: redirect loops)
    "x-forwarded-server", // host: Apache mod_proxy sets it, frameworks read it
    "x-forwarded-ssl", // scheme: Rack, Laravel
    "x-forwarded-uri", // path: Traefik forward-auth, nginx configurations
    "x-host",     // host (Kettle, "Practical Web Cache Poisoning")
    "x-http-host-override", // host (Param Miner; Kettle)
    "x-http-method", // method: OData, ASP.NET (HMO, CPDoS)
    "x-http-method-override", // method: Express, Rails, Laravel, Google APIs (HMO, CPDoS)
    "x-http-path-override", // path (Param Miner)
    "x-method-override", // method: IBM, Symfony-style middleware (HMO, CPDoS)
    "x-original-for", // client IP: ASP.NET Core forwarded-headers middleware
    "x-original-host", // host: IIS ARR, ASP.NET Core forwarded-headers middleware
    "x-original-proto", // scheme: ASP.NET Core forwarded-headers middleware
    "x-original-uri", // path: nginx `auth_request` convention
    "x-original-url", // path: IIS URL Rewrite, Zend/Laminas, Symfony before 4.4
    "x-proxy-url", // target URL for gateways (Param Miner)
    "x-proxyuser-ip", // client IP: Google front ends
    "x-rewrite-url", // path: ISAPI_Rewrite, Zend/Laminas, Symfony before 4.4
    "x-scheme",   // scheme: ingress-nginx sets it, Tornado reads it
    "x-script-name", // path base: WSGI reverse-proxy recipes (Flask, Django)
    "x-url-scheme", // scheme: Rack
];

/// Remove the routing headers ([`UNKEYED_ROUTING_HEADERS`] and the
/// configured `extra` ones, lower case) from a request whose answer may be
/// stored, but for those in `keep` (the route's key headers).
pub fn strip_unkeyed_routing_headers(headers: &mut HeaderMap, extra: &[String], keep: &[String]) {
    strip_listed(headers, UNKEYED_ROUTING_HEADERS, keep);
    if !extra.is_empty() {
        strip_listed(headers, extra, keep);
    }
}

/// Remove every header named in `listed` (lower case), in any spelling a
/// CGI-style gateway reads as it: PHP, WSGI and CGI adapters read
/// `X_Forwarded_Host` as the same HTTP_X_FORWARDED_HOST variable as
/// `X-Forwarded-Host`, so names are compared with `_` read as `-`. A header
/// in `keep` (a key header) stays, under the exact name the key reads.
pub fn strip_listed<L: AsRef<str>>(headers: &mut HeaderMap, listed: &[L], keep: &[String]) {
    let same = |name: &str, listed: &str| {
        name.len() == listed.len()
            && name
                .bytes()
                .zip(listed.bytes())
                .all(|(n, l)| n == l || (n == b'_' && l == b'-'))
    };
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            listed.iter().any(|l| same(n.as_str(), l.as_ref()))
                && !keep.iter().any(|k| k == n.as_str())
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The surrogate keys (tags) a response names: space-separated as in
/// `Surrogate-Key`, comma-separated as in `Cache-Tag`.
pub fn surrogate_keys(headers: &HeaderMap, names: &[String]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| headers.get_all(n.as_str()))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([' ', ',']))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Keep at most `max - reserved` of the surrogate keys `tags` (the first
/// ones, de-duplicated): `reserved` slots are for the route's tags and the
/// URL tag, which purging by URL needs. One response cannot make the tag
/// index grow without bound (`cache.max_tags_per_entry`).
pub fn cap_tags(tags: &mut Vec<String>, max: usize, reserved: usize) {
    let mut seen = std::collections::HashSet::new();
    tags.retain(|t| seen.insert(t.clone()));
    let room = max.saturating_sub(reserved);
    if tags.len() > room {
        tracing::debug!(
            kept = room,
            sent = tags.len(),
            "surrogate keys over cache.max_tags_per_entry dropped"
        );
        tags.truncate(room);
    }
}

/// Remove the surrogate-key headers from a response going out, unless
/// configuration exposes them.
pub fn hide_surrogate_keys(headers: &mut HeaderMap, names: &[String], expose: bool) {
    if !expose {
        for n in names {
            headers.remove(n.as_str());
        }
    }
}

/// Headers kept with an entry: not hop-by-hop, not `Age` (recomputed), not
/// `Set-Cookie` when the response is stored without it, not
/// `Content-Length` (the body is its own length).
pub fn stored_headers(headers: &HeaderMap, strip_set_cookie: bool) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (n, v) in headers {
        let dropped = *n == header::AGE
            || *n == header::CONTENT_LENGTH
            || (strip_set_cookie && *n == header::SET_COOKIE);
        if !dropped {
            kept.append(n.clone(), v.clone());
        }
    }
    kept
}

/// Remove the fields meant for cachegate alone (`Cachegate-Cache-Control`,
/// RFC 9213 §2.1) from an answer going out. `CDN-Cache-Control` stays: it
/// is for every CDN-like cache of the operator's.
pub fn strip_cachegate_fields(headers: &mut HeaderMap) {
    headers.remove(super::cache_control::CACHEGATE_CACHE_CONTROL);
}

/// A `Location` or `Content-Location` naming the upstream itself
/// (`base`, its origin and base path) is rewritten to the origin the
/// client addressed, with the base path removed, as nginx's
/// `proxy_redirect default` does: a client following it stays behind the
/// proxy. Other values, relative ones included, are relayed as sent.
pub fn rewrite_upstream_locations(
    headers: &mut HeaderMap,
    base: &reqwest::Url,
    client_origin: &str,
) {
    if !headers.contains_key(header::LOCATION) && !headers.contains_key(header::CONTENT_LOCATION) {
        // Most answers (every plain hit): nothing to look at.
        return;
    }
    let origin = base.origin().ascii_serialization();
    let prefix = base.path().trim_end_matches('/');
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Some(rest) = value
            .strip_prefix(origin.as_str())
            .and_then(|r| r.strip_prefix(prefix))
            .filter(|r| r.is_empty() || r.starts_with(['/', '?']))
        else {
            continue;
        };
        let rest = if rest.starts_with('/') {
            rest.to_owned()
        } else {
            format!("/{rest}")
        };
        if let Ok(v) = http::HeaderValue::from_str(&format!("{client_origin}{rest}")) {
            headers.insert(name, v);
        }
    }
}

/// The `Vary` header names of a response: lower case, sorted, de-duplicated.
/// `None` for `Vary: *` (never storable).
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for v in headers.get_all(header::VARY) {
        for name in v.to_str().unwrap_or("*").split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name == "*" {
                return None;
            }
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names.sort();
    names.dedup();
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_naming_the_upstream_point_back_at_the_proxy() {
        let base = reqwest::Url::parse("http://10.0.0.5:8080/api").unwrap();
        let cases = [
            (
                "http://10.0.0.5:8080/api/items/2?x=1",
                "https://cg.example/items/2?x=1",
            ),
            ("http://10.0.0.5:8080/api", "https://cg.example/"),
            ("http://10.0.0.5:8080/apix", "http://10.0.0.5:8080/apix"),
            ("http://10.0.0.5:8080/other", "http://10.0.0.5:8080/other"),
            ("https://login.example/", "https://login.example/"),
            ("/api/items/2", "/api/items/2"),
        ];
        for (sent, want) in cases {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, sent.parse().unwrap());
            h.insert(header::CONTENT_LOCATION, sent.parse().unwrap());
            rewrite_upstream_locations(&mut h, &base, "https://cg.example");
            assert_eq!(h[header::LOCATION], want, "{sent}");
            assert_eq!(h[header::CONTENT_LOCATION], want, "{sent}");
        }
    }

    #[test]
    fn routing_headers_are_one_sorted_list_apart_from_the_replaced_ones() {
        assert!(
            UNKEYED_ROUTING_HEADERS.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
        for name in UNKEYED_ROUTING_HEADERS {
            assert_eq!(HeaderName::from_static(name).as_str(), *name);
            // The ones the canonical request replaces on every request
            // are listed there, once.
            assert!(
                !crate::request::CLIENT_FORWARDING_HEADERS.contains(name),
                "{name}"
            );
        }
    }

    /// The header in every spelling a client may send it: the name, its
    /// upper-case form, `_` for `-` (one CGI variable for both).
    fn spellings(name: &str) -> [String; 3] {
        [
            name.to_owned(),
            name.to_ascii_uppercase(),
            name.replace('-', "_"),
        ]
    }

    #[test]
    fn every_routing_header_in_every_spelling_is_stripped() {
        let extra = vec!["x-tenant-route".to_owned()];
        let names = UNKEYED_ROUTING_HEADERS
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str));
        for name in names {
            for spelling in spellings(name) {
                let mut h = HeaderMap::new();
                h.insert(
                    HeaderName::from_bytes(spelling.as_bytes()).unwrap(),
                    "evil".parse().unwrap(),
                );
                h.insert(header::ACCEPT, "*/*".parse().unwrap());
                strip_unkeyed_routing_headers(&mut h, &extra, &[]);
                assert_eq!(h.len(), 1, "{spelling} was forwarded: {h:?}");
                assert!(h.contains_key(header::ACCEPT));
            }
        }
    }

    #[test]
    fn a_keyed_routing_header_is_kept_under_the_name_the_key_reads() {
        let extra = vec!["x-tenant-route".to_owned()];
        for name in ["x-script-name", "cf-visitor", "x-tenant-route"] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), "a".parse().unwrap());
            let underscored = name.replace('-', "_");
            h.insert(
                HeaderName::from_bytes(underscored.as_bytes()).unwrap(),
                "b".parse().unwrap(),
            );
            strip_unkeyed_routing_headers(&mut h, &extra, &[name.to_owned()]);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
            assert_eq!(h[name], "a", "{name}");
        }
    }

    #[test]
    fn connection_names_are_removed_with_the_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-tenant", "acme".parse().unwrap());
        h.insert("origin", "https://a.example".parse().unwrap());
        h.append(header::CONNECTION, "x-tenant, Origin".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }
}
