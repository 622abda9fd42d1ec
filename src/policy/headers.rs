//! What goes upstream and what is kept: hop-by-hop headers (RFC 9110
//! §7.6.1), headers that would let one client shape a shared answer, the
//! headers stored with an entry, surrogate keys.

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::HeaderMap;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the transport sets.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Drop hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
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
const UNKEYED_ROUTING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-proto",
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
    // CGI-style gateways (PHP, WSGI/CGI adapters) read `X_Forwarded_Host`
    // as the same HTTP_X_FORWARDED_HOST variable as `X-Forwarded-Host`:
    // names are compared with `_` read as `-`. A key header is kept only
    // under the exact name the key reads.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let dashed = n.as_str().replace('_', "-");
            UNKEYED_ROUTING_HEADERS.contains(&dashed.as_str())
                && !key_headers.iter().any(|k| k == n.as_str())
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
pub fn stored_headers(headers: &HeaderMap, strip_set_cookie: bool) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .filter(|(n, _)| {
            *n != header::AGE
                && *n != header::CONTENT_LENGTH
                && !(strip_set_cookie && *n == header::SET_COOKIE)
        })
        .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// Remove the fields meant for cachegate alone (`Cachegate-Cache-Control`,
/// RFC 9213 §2.1) from an answer going out. `CDN-Cache-Control` stays: it
/// is for every CDN-like cache of the operator's.
pub fn strip_cachegate_fields(headers: &mut HeaderMap) {
    headers.remove(super::cache_control::CACHEGATE_CACHE_CONTROL);
}
