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

/// Request headers that upstream frameworks commonly use to build absolute
/// URLs, rewrite the path or change the method. On a request whose response
/// may be stored they would let one client shape what every other client is
/// served (cache poisoning), so they are not forwarded unless the route
/// makes them part of the key. Bypassed requests forward them unchanged.
///
/// `Forwarded`, `X-Forwarded-Host` and `X-Forwarded-Proto` are not here:
/// the canonical request has replaced the client's with cachegate's own,
/// which are part of every key ([`crate::request`]).
const UNKEYED_ROUTING_HEADERS: &[&str] = &[
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-host",
    "x-original-url",
    "x-original-host",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-uri",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-forwarded-ssl",
    "x-forwarded-protocol",
    "front-end-https",
    "x-url-scheme",
];

pub fn strip_unkeyed_routing_headers(headers: &mut HeaderMap, key_headers: &[String]) {
    strip_listed(headers, UNKEYED_ROUTING_HEADERS, key_headers);
}

/// Remove every header named in `listed` (lower case), in any spelling a
/// CGI-style gateway reads as it: PHP, WSGI and CGI adapters read
/// `X_Forwarded_Host` as the same HTTP_X_FORWARDED_HOST variable as
/// `X-Forwarded-Host`, so names are compared with `_` read as `-`. A header
/// in `keep` (a key header) stays, under the exact name the key reads.
pub fn strip_listed(headers: &mut HeaderMap, listed: &[&str], keep: &[String]) {
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
            listed.iter().any(|l| same(n.as_str(), l)) && !keep.iter().any(|k| k == n.as_str())
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
