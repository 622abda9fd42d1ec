//! The canonical request: built once, first, by [`CanonicalRequest::new`]
//! (the same code for `serve` and Lambda), before anything reads the
//! request. The route lookup, the cache key and the upstream call all read
//! this one value, so no spelling of a target can put one route's rule on
//! another path, and the key is computed from what the upstream is sent.
//!
//! - **Path** ([`canonical_path`]): percent-escapes of unreserved
//!   characters are decoded (`%61` is `a`, `%2E` is `.`), the others
//!   upper-cased (`%2f` is `%2F`), bytes a path cannot hold are escaped,
//!   then dot segments are removed (RFC 3986 §5.2.4, §6.2.2). Forms that
//!   common origins read as dot segments but RFC 3986 does not — a segment
//!   `..;x` or `.;x` (Tomcat, Jetty and Spring strip `;params`), a dot
//!   segment behind an escaped slash or backslash (`..%2F`, `..%5C`), a
//!   raw backslash (browsers, IIS and the URL parser of the upstream
//!   client read it as `/`) — and malformed escapes are **rejected** with
//!   400 `ambiguous_path`: resolving them one way would still be wrong for
//!   the origins that read them the other way, and no real client needs
//!   them.
//! - **Route**: chosen from the canonical path. Unless the upstream is
//!   known to read paths strictly (`upstream.path_equivalence`), the path
//!   is also read as the most lenient common origins read it
//!   ([`lenient_path`]: case, `//`, `;params`, `%2F`, escapes decoded
//!   more than once, NFKC), and a request whose lenient reading falls
//!   under another route, or has dot segments, is **rejected** with 400
//!   `ambiguous_path` (`RouteTable::rule_for_request`): one spelling must
//!   never carry another route's rule to a resource the origin takes for
//!   the same.
//! - **Query**: kept byte for byte (see [`crate::key::canonical_query`]).
//! - **Headers**: hop-by-hop headers and every header `Connection` names are
//!   removed (RFC 9110 §7.6.1) before the key is computed; client-supplied
//!   forwarding and client-IP headers are removed and cachegate's own are
//!   set ([`Forwarding`]), unless a route keys on one of them.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use percent_encoding::{percent_encode_byte, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::policy;
use crate::routes::{RouteTable, Rule};

/// The address of the peer that sent the request: the TCP peer in serve
/// mode, API Gateway's `requestContext` source IP under Lambda. Set by the
/// adapters as a request extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub IpAddr);

/// Set by the Lambda adapter: the hop in front (API Gateway, a function
/// URL, an ALB) sets `X-Forwarded-Proto` itself, so its value is the
/// client-facing scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayProto;

/// Why a request target is refused before anything else reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub code: crate::error_code::ErrorCode,
    pub message: String,
}

/// Client-supplied headers naming the client or the way it came in. An
/// upstream that reflects one into an answer would have a client-chosen
/// value stored and served to everyone; they are replaced by cachegate's
/// own (`X-Forwarded-For`, `-Host`, `-Proto`, `Via`). Compared with `_`
/// read as `-` (CGI gateways read both as the same variable).
pub const CLIENT_FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-envoy-external-address",
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The `Via` entry cachegate adds to requests it forwards (RFC 9110 §7.6.3:
/// a gateway must send one inbound; it may on responses, which it does not,
/// so answers reach clients as the upstream sent them).
pub const VIA: &str = "1.1 cachegate";

/// How client addresses are learnt: only proxies in `trusted` may vouch
/// for the address of the client behind them (`serve.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct Forwarding {
    pub trusted: Vec<ipnet::IpNet>,
}

impl Forwarding {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client chain to send upstream, left (client) to right (peer):
    /// the peer, and while the rightmost address so far is a trusted
    /// proxy, the `X-Forwarded-For` entry to its left. The first
    /// untrusted address is the client; what lies left of it is whatever
    /// the client wrote, and is dropped. Every entry is a parsed address.
    pub fn client_chain(&self, peer: IpAddr, forwarded_for: &HeaderMap) -> Vec<IpAddr> {
        let mut chain = vec![peer];
        if !self.trusts(peer) {
            return chain;
        }
        let mut listed: Vec<&str> = forwarded_for
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        // A gateway that lists its peer itself (API Gateway appends the
        // source IP) is not one more hop.
        if listed.last().and_then(|s| s.parse::<IpAddr>().ok()) == Some(peer) {
            listed.pop();
        }
        for entry in listed.iter().rev() {
            let Ok(ip) = entry.parse::<IpAddr>() else {
                break;
            };
            chain.push(ip);
            if !self.trusts(ip) {
                break;
            }
        }
        chain.reverse();
        chain
    }
}

/// The one normalised form of a client request.
#[derive(Debug, Clone)]
pub struct CanonicalRequest {
    pub method: Method,
    /// The canonical path ([`canonical_path`]), before the upstream base path.
    pub path: String,
    /// The query exactly as sent (bytes a URI cannot hold escaped).
    pub query: Option<String>,
    /// Without hop-by-hop or `Connection`-named headers, without `Host`,
    /// with cachegate's forwarding headers instead of the client's.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The client asked for a protocol upgrade (the header itself is
    /// hop-by-hop and gone from `headers`).
    pub upgrade: bool,
    /// `scheme://host` as the client addressed us, when known: what a
    /// `Location` naming the upstream is rewritten to.
    pub client_origin: Option<String>,
}

impl CanonicalRequest {
    /// Normalise `parts` and `body`, and find the route of the canonical
    /// path. A forwarding header the route keys on is the client's (the
    /// route asked for it) and cachegate does not set its own.
    pub fn new(
        mut parts: http::request::Parts,
        body: Bytes,
        forwarding: &Forwarding,
        routes: &RouteTable,
    ) -> Result<(CanonicalRequest, Arc<Rule>), Rejected> {
        let path = canonical_path(parts.uri.path())?;
        let rule = routes.rule_for_request(&path)?;
        let keyed = &rule.key_headers;
        let query = parts.uri.query().map(uri_safe_query);
        let mut headers = std::mem::take(&mut parts.headers);
        let upgrade = headers.contains_key(http::header::UPGRADE);
        policy::headers::strip_hop_by_hop(&mut headers);

        let peer = parts.extensions.get::<PeerAddr>().map(|p| p.0);
        let trusted_peer = peer.is_some_and(|p| forwarding.trusts(p));
        let proto = client_proto(&parts, &headers, trusted_peer);
        let host = client_host(&parts, &headers);
        let chain = peer.map(|p| forwarding.client_chain(p, &headers));

        policy::headers::strip_listed(&mut headers, CLIENT_FORWARDING_HEADERS, keyed);
        headers.remove(http::header::HOST);
        set_forwarding_headers(&mut headers, keyed, chain, &proto, host.as_ref());
        let client_origin = host.and_then(|h| {
            let (proto, host) = (proto.to_str().ok()?, h.to_str().ok()?);
            let mut origin = String::with_capacity(proto.len() + 3 + host.len());
            origin.push_str(proto);
            origin.push_str("://");
            origin.push_str(host);
            Some(origin)
        });
        Ok((
            CanonicalRequest {
                method: parts.method,
                path,
                query,
                headers,
                body,
                upgrade,
                client_origin,
            },
            rule,
        ))
    }
}

/// How the client came in: what the gateway in front says (Lambda), or
/// a trusted proxy in front of serve, else the request's own scheme.
fn client_proto(
    parts: &http::request::Parts,
    headers: &HeaderMap,
    trusted_peer: bool,
) -> HeaderValue {
    let told = |trusted: bool| {
        trusted
            .then(|| headers.get(&X_FORWARDED_PROTO).cloned())
            .flatten()
            .filter(|p| *p == "http" || *p == "https")
    };
    told(parts.extensions.get::<GatewayProto>().is_some())
        .or_else(|| told(trusted_peer))
        .unwrap_or_else(|| {
            HeaderValue::from_static(match parts.uri.scheme_str() {
                Some("https") => "https",
                _ => "http",
            })
        })
}

/// The authority the client addressed (`Host`, else the request target's),
/// when it is one.
fn client_host(parts: &http::request::Parts, headers: &HeaderMap) -> Option<HeaderValue> {
    headers
        .get(http::header::HOST)
        .cloned()
        .or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        })
        .filter(|h| {
            h.to_str()
                .is_ok_and(|h| h.parse::<http::uri::Authority>().is_ok())
        })
}

/// cachegate's own forwarding headers (`X-Forwarded-For`, `-Proto`,
/// `-Host`, `Via`), except those the route keys on (the client's then).
fn set_forwarding_headers(
    headers: &mut HeaderMap,
    keyed: &[String],
    chain: Option<Vec<IpAddr>>,
    proto: &HeaderValue,
    host: Option<&HeaderValue>,
) {
    let ours = |h: &HeaderName| !keyed.iter().any(|k| k == h.as_str());
    if let Some(chain) = chain.filter(|_| ours(&X_FORWARDED_FOR)) {
        let mut list = String::with_capacity(chain.len() * 17);
        for (i, ip) in chain.iter().enumerate() {
            if i > 0 {
                list.push_str(", ");
            }
            push_ip(&mut list, ip);
        }
        if let Ok(v) = HeaderValue::from_str(&list) {
            headers.insert(X_FORWARDED_FOR, v);
        }
    }
    if ours(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, proto.clone());
    }
    if let Some(host) = host.filter(|_| ours(&X_FORWARDED_HOST)) {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    headers.append(http::header::VIA, HeaderValue::from_static(VIA));
}

/// An address as `Display` writes it; an IPv4 one digit by digit (the
/// formatter took a fiftieth of every request's instructions for it).
fn push_ip(out: &mut String, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(_) => {
            use std::fmt::Write;
            let _ = write!(out, "{ip}");
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What a path segment may hold unescaped (RFC 3986 `pchar`), and `/`.
fn is_path_byte(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,;=:@/".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

pub(crate) fn ambiguous(message: impl Into<String>) -> Rejected {
    Rejected {
        code: crate::error_code::ErrorCode::AmbiguousPath,
        message: message.into(),
    }
}

/// The canonical form of a request path (see the module documentation);
/// `Err` for forms origins read differently from RFC 3986.
pub fn canonical_path(raw: &str) -> Result<String, Rejected> {
    if is_canonical_already(raw) {
        return Ok(raw.to_owned());
    }
    canonical_path_rewritten(raw)
}

/// Most request paths are canonical as sent: `/`-led, every byte one a
/// path holds unescaped (no `%` to decode, no `\`), and no segment
/// that is, or starts with, a dot segment (`.`, `..`, `..;x`), which the
/// general form resolves or refuses. Such a path is its own canonical
/// form: one pass over its bytes instead of a decode, a split and a
/// re-join (a tenth of a memory hit's instructions).
fn is_canonical_already(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    bytes.first() == Some(&b'/')
        && bytes.iter().all(|&b| is_path_byte(b))
        && !raw.split('/').any(|segment| {
            let first = segment.split(';').next().unwrap_or_default();
            first == "." || first == ".."
        })
}

/// [`canonical_path`] for a path that may need decoding, resolving or
/// refusing (public for the fuzz target, which checks that it agrees with
/// the shortcut).
pub fn canonical_path_rewritten(raw: &str) -> Result<String, Rejected> {
    let bytes = raw.as_bytes();
    if !raw.starts_with('/') {
        return Err(ambiguous("the request target must start with /"));
    }
    if bytes.contains(&b'\\') {
        return Err(ambiguous(
            "a backslash in the path is read as / by some servers and not by others",
        ));
    }
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(ambiguous("a % in the path that is not a %XX escape"));
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                decoded.push(v as char);
            } else {
                decoded.push_str(percent_encode_byte(v));
            }
            i += 3;
        } else if is_path_byte(b) {
            decoded.push(b as char);
            i += 1;
        } else {
            decoded.push_str(percent_encode_byte(b));
            i += 1;
        }
    }
    // Segments origins read as dot segments though RFC 3986 does not.
    for segment in decoded.split('/') {
        if segment == "." || segment == ".." {
            continue;
        }
        let lenient = segment.replace("%2F", "/").replace("%5C", "/");
        for piece in lenient.split('/') {
            let piece = piece.split(';').next().unwrap_or("");
            if piece == "." || piece == ".." {
                return Err(ambiguous(format!(
                    "the path segment `{segment}` is a dot segment to some servers and not to others"
                )));
            }
        }
    }
    Ok(remove_dot_segments(&decoded))
}

/// Most rounds of decoding [`lenient_path`] applies before it gives up: a
/// path still changing after this many is refused.
const LENIENT_ROUNDS: usize = 8;

/// The path as the most lenient common origins read `canonical` (a
/// [`canonical_path`], which is what the upstream is sent), for choosing
/// the route rule only: percent-escapes decoded until none is left
/// (servers and frameworks that decode twice), NFKC (`．` is `.`, `／` is
/// `/`) and lower case (IIS, ASP.NET, Express) until neither changes it,
/// `\` read as `/`, `;params` stripped from each segment (Tomcat, Jetty,
/// Spring), empty segments dropped (`//` collapsed, no trailing slash).
/// `Err` when a segment is then made only of dots: such an origin would
/// climb a level cachegate did not (`%252e%252e`, `．．`, `..%252F`), so
/// which resource is served cannot be known here.
pub fn lenient_path(canonical: &str) -> Result<String, Rejected> {
    let plain = canonical
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase() && !matches!(b, b'%' | b';' | b'\\'));
    let text = if plain {
        std::borrow::Cow::Borrowed(canonical)
    } else {
        std::borrow::Cow::Owned(decoded_folded(canonical)?)
    };
    let mut form = String::with_capacity(text.len());
    for segment in text.split(['/', '\\']) {
        let segment = segment.split(';').next().unwrap_or_default();
        if segment.is_empty() {
            continue;
        }
        let trimmed = segment.trim();
        if !trimmed.is_empty() && trimmed.bytes().all(|b| b == b'.') {
            return Err(ambiguous(format!(
                "the path `{canonical}` has a dot segment to servers that decode escapes \
                 more than once, fold Unicode compatibility forms or strip `;params`, \
                 and none to cachegate"
            )));
        }
        form.push('/');
        form.push_str(segment);
    }
    if form.is_empty() {
        form.push('/');
    }
    Ok(form)
}

/// `text` percent-decoded, lower-cased and NFKC-normalised until that
/// changes nothing (bytes that are not UTF-8 read as U+FFFD).
fn decoded_folded(text: &str) -> Result<String, Rejected> {
    let nfkc = icu_normalizer::ComposingNormalizerBorrowed::new_nfkc();
    let mut text = text.to_owned();
    for _ in 0..LENIENT_ROUNDS {
        let decoded = percent_encoding::percent_decode_str(&text).decode_utf8_lossy();
        let next = nfkc.normalize(&decoded.to_lowercase()).into_owned();
        if next == text {
            return Ok(next);
        }
        text = next;
    }
    Err(ambiguous(format!(
        "the path is still changing after {LENIENT_ROUNDS} rounds of percent-decoding"
    )))
}

/// RFC 3986 §5.2.4 on an absolute path: `.` and `..` segments removed,
/// never climbing above `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Escape what a URI query cannot hold (a raw space or non-ASCII byte
/// arriving through a Lambda event); every other byte, `%` escapes
/// included, is kept exactly as sent.
pub fn uri_safe_query(q: &str) -> String {
    utf8_percent_encode(q, NOT_IN_A_URI_QUERY).to_string()
}

/// What [`uri_safe_query`] escapes: all but RFC 3986's unreserved
/// characters, sub-delims, `:`, `@`, `/`, `?` and `%` (every non-ASCII
/// byte too).
const NOT_IN_A_URI_QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@')
    .remove(b'/')
    .remove(b'?')
    .remove(b'%');

/// Every ASCII byte but NUL, and a two-byte character: the input of the
/// tests that pin each percent-escape set byte for byte.
#[cfg(test)]
pub(crate) fn every_ascii_byte() -> String {
    (1u8..128).map(char::from).chain(['é']).collect()
}

/// A deterministic random generator (xorshift, so a failure reproduces)
/// for the tests that try many paths.
#[cfg(test)]
pub(crate) struct Xorshift(pub u64);

#[cfg(test)]
impl Xorshift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `/` and 1 to `max_pieces` pieces of `alphabet`.
    pub(crate) fn path(&mut self, alphabet: &[&str], max_pieces: u64) -> String {
        let mut path = String::from("/");
        for _ in 0..1 + self.next() % max_pieces {
            path.push_str(alphabet[(self.next() % alphabet.len() as u64) as usize]);
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes a query and a path go upstream (and into the key) with:
    /// pinned, since a change would change keys.
    #[test]
    fn queries_and_paths_are_escaped_byte_for_byte_as_before() {
        assert_eq!(
            uri_safe_query(&every_ascii_byte()),
            r##"%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13%14%15%16%17%18%19%1A%1B%1C%1D%1E%1F%20!%22%23$%&'()*+,-./0123456789:;%3C=%3E?@ABCDEFGHIJKLMNOPQRSTUVWXYZ%5B%5C%5D%5E_%60abcdefghijklmnopqrstuvwxyz%7B%7C%7D~%7F%C3%A9"##
        );
        let path: String = (1u8..128)
            .map(char::from)
            .filter(|c| !"\\%/".contains(*c))
            .collect();
        assert_eq!(
            canonical_path(&format!("/{path}%41%2f%7E%e9%20%3Bé")).unwrap(),
            r##"/%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13%14%15%16%17%18%19%1A%1B%1C%1D%1E%1F%20!%22%23$&'()*+,-.0123456789:;%3C=%3E%3F@ABCDEFGHIJKLMNOPQRSTUVWXYZ%5B%5D%5E_%60abcdefghijklmnopqrstuvwxyz%7B%7C%7D~%7FA%2F~%E9%20%3B%C3%A9"##
        );
    }

    fn p(raw: &str) -> Result<String, &'static str> {
        canonical_path(raw).map_err(|r| r.code.as_str())
    }

    #[test]
    fn dot_segments_resolve_after_unreserved_escapes_are_decoded() {
        assert_eq!(p("/a/../b").unwrap(), "/b");
        assert_eq!(p("/a/%2e%2E/b").unwrap(), "/b");
        assert_eq!(p("/a/%2E/b").unwrap(), "/a/b");
        assert_eq!(p("/../../admin").unwrap(), "/admin");
        assert_eq!(p("/a/b/..").unwrap(), "/a/");
        assert_eq!(p("/a/.").unwrap(), "/a/");
        assert_eq!(p("/").unwrap(), "/");
        assert_eq!(p("/%61ssets/%7Ex").unwrap(), "/assets/~x");
        assert_eq!(p("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(p("/a b/\u{e9}").unwrap(), "/a%20b/%C3%A9");
        assert_eq!(p("/items//1").unwrap(), "/items//1");
        assert_eq!(p("/items/1;x").unwrap(), "/items/1;x");
        assert_eq!(p("/%2531").unwrap(), "/%2531");
    }

    #[test]
    fn forms_origins_read_differently_are_rejected() {
        for raw in [
            "/assets/..;/account",
            "/assets/..;x/account",
            "/assets/.;x/account",
            "/assets/%2e%2e;/account",
            "/assets/..\\account",
            "/assets\\..\\account",
            "/assets/..%2Faccount",
            "/assets/..%2faccount",
            "/assets/..%5Caccount",
            "/a/..;x/../b",
            "/a/%zz",
            "/a/%4",
            "a/b",
        ] {
            assert_eq!(p(raw), Err("ambiguous_path"), "{raw}");
        }
    }

    #[test]
    fn canonical_is_a_fixed_point() {
        for raw in ["/a/../b/%7e/%2f/x%20y/", "/%C3%A9/./q", "/a;b=c/d"] {
            let once = p(raw).unwrap();
            assert_eq!(p(&once).unwrap(), once, "{raw}");
        }
    }

    fn lenient(raw: &str) -> Result<String, &'static str> {
        canonical_path(raw)
            .and_then(|c| lenient_path(&c))
            .map_err(|r| r.code.as_str())
    }

    /// Issue 24: the spellings a lenient origin takes for `/t/data`.
    #[test]
    fn lenient_spellings_read_as_the_plain_path() {
        for raw in [
            "/t/data",
            "//t/data",
            "/t//data/",
            "/T/DATA",
            "/t;x/data",
            "/t;jsessionid=1/data;v=2",
            "/;x/t/data",
            "/t%2Fdata",
            "/t%2fdata",
            "/t%5Cdata",
            "/%2574/data",
            "/%252574/data",
            "/%74/data",
            "/\u{ff54}/data",
            "/%EF%BD%94/%EF%BC%A4ata",
            "/t\u{ff0f}data",
        ] {
            assert_eq!(lenient(raw), Ok("/t/data".to_owned()), "{raw}");
        }
        assert_eq!(lenient("/"), Ok("/".to_owned()));
        assert_eq!(lenient("//;x/"), Ok("/".to_owned()));
        // Escapes that are data to every reader stay apart.
        assert_eq!(lenient("/a%20b/50%25"), Ok("/a b/50%".to_owned()));
    }

    /// Dot segments only a lenient origin sees: it would climb a level
    /// cachegate did not (issue 24: double-encoded and fullwidth dots).
    #[test]
    fn dot_segments_only_a_lenient_reader_sees_are_rejected() {
        for raw in [
            "/assets/%252e%252e/account",
            "/assets/%252E%252E/account",
            "/assets/%25252e%25252e/account",
            "/assets/..%252Faccount",
            "/assets/..%252faccount",
            "/assets/%252e%252e%252Faccount",
            "/assets/\u{ff0e}\u{ff0e}/account",
            "/assets/%EF%BC%8E%EF%BC%8E/account",
            "/assets/\u{2025}/account",
            "/assets/%252e/account",
            "/assets/...;x/account",
            "/assets/..%2520/account",
            "/assets/x%252F..%252Faccount",
            "/assets/\u{ff0e}\u{ff0e}\u{ff0f}account",
        ] {
            assert_eq!(lenient(raw), Err("ambiguous_path"), "{raw}");
        }
        // Every reader agrees on these: no dot segment left.
        assert_eq!(lenient("/assets/%2e%2e/account"), Ok("/account".to_owned()));
        assert_eq!(lenient("/assets/a..b/c."), Ok("/assets/a..b/c.".to_owned()));
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let mut random = Xorshift(0x2545_F491_4F6C_DD1D);
        let mut ips: Vec<IpAddr> = [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.9.100",
            "::1",
            "2001:db8::7",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        ips.extend((0..2_000).map(|_| IpAddr::from((random.next() as u32).to_be_bytes())));
        for ip in ips {
            let mut s = String::new();
            push_ip(&mut s, &ip);
            assert_eq!(s, ip.to_string());
        }
    }

    /// A path taken as canonical without rewriting is exactly what the
    /// general rewrite makes of it, on hand-picked and random paths (the
    /// alphabet leans on what the shortcut must leave to the rewrite:
    /// dots, `;`, escapes, bytes a path cannot hold raw).
    #[test]
    fn the_canonical_shortcut_agrees_with_the_rewrite() {
        for raw in [
            "/",
            "/items/1",
            "/items/1/",
            "//a//b",
            "/a/b;v=1",
            "/a.b/c.",
            "/...",
            "/a/..;x",
            "/a/.;x/b",
            "/a/./b",
            "/a/../b",
            "/.",
            "/..",
            "/a/.b",
            "/a/b..",
            "/~user/x@y:z",
        ] {
            if is_canonical_already(raw) {
                assert_eq!(canonical_path_rewritten(raw), Ok(raw.to_owned()), "{raw}");
            }
        }
        assert!(is_canonical_already("/items/1;v=2/x.json"));
        assert!(!is_canonical_already("/a/./b"));
        assert!(!is_canonical_already("/a/..;x/b"));
        assert!(!is_canonical_already("/a%41"));
        assert!(!is_canonical_already("items"));
        const ALPHABET: &[&str] = &[
            "/", "/", ".", "..", "...", ";", ";x", ".;", "a", "B", "~", "-", "%41", "%2e", "%2F",
            " ", "\\", "?", "#", "\u{e9}", "@", ":", "=", "+",
        ];
        let mut random = Xorshift(0x51_7CC1_B727_220A);
        let mut shortcut = 0;
        for _ in 0..20_000 {
            let raw = random.path(ALPHABET, 8);
            if is_canonical_already(&raw) {
                shortcut += 1;
                assert_eq!(canonical_path_rewritten(&raw), Ok(raw.clone()), "{raw:?}");
            }
        }
        assert!(
            shortcut > 1_000,
            "the generator gave the shortcut too little: {shortcut}"
        );
    }

    /// Random paths from the bytes that matter: the canonical path and its
    /// lenient form are each a fixed point, and the lenient form has no
    /// backslash, `;` or `//` left.
    #[test]
    fn canonical_and_lenient_forms_are_fixed_points() {
        const ALPHABET: &[&str] = &[
            "/", "/", ".", "..", "%2e", "%252e", "%2F", "%252F", "%5C", "%25", "%41", "A", "t",
            ";", ";x", "%3B", "\u{ff0e}", "\u{ff0f}", "\u{ff34}", "\u{e9}", "e\u{301}", "%E9", " ",
        ];
        let mut random = Xorshift(0x2545_F491_4F6C_DD1D);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..6_000 {
            let path = random.path(ALPHABET, 7);
            let Ok(canonical) = canonical_path(&path) else {
                continue;
            };
            assert_eq!(p(&canonical), Ok(canonical.clone()), "{path:?}");
            match lenient_path(&canonical) {
                Ok(form) => {
                    accepted += 1;
                    assert_eq!(lenient_path(&form).ok(), Some(form.clone()), "{path:?}");
                    assert!(
                        !form.contains(['\\', ';']) && !form.contains("//"),
                        "{form:?}"
                    );
                }
                Err(_) => refused += 1,
            }
        }
        assert!(accepted > 500 && refused > 100, "{accepted} {refused}");
    }

    #[test]
    fn only_trusted_proxies_vouch_for_the_client() {
        let f = Forwarding {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.9, 10.1.1.1"),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // An untrusted peer is the client, whatever it wrote.
        assert_eq!(
            f.client_chain(ip("198.51.100.1"), &h),
            vec![ip("198.51.100.1")]
        );
        // A trusted one vouches up to the first untrusted address.
        assert_eq!(
            f.client_chain(ip("10.0.0.2"), &h),
            vec![ip("203.0.113.9"), ip("10.1.1.1"), ip("10.0.0.2")]
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("<script>"));
        assert_eq!(f.client_chain(ip("10.0.0.2"), &h), vec![ip("10.0.0.2")]);
    }
}
