//! Compressed entries, the pure part: which answers cachegate compresses
//! for storing, what it asks the upstream for, and when a client must be
//! sent a decoded body. The byte work is in `proxy/encoding.rs`.
//!
//! With `cache.compression = "gzip"` (the default), a request that uses
//! the cache asks the upstream for `Accept-Encoding: gzip` whatever the
//! client sent, so every spelling of `Accept-Encoding` is one key and one
//! upstream call; the client's own value is kept ([`ClientAccept`]) and
//! decides what it is sent: the gzip bytes as they are, or decoded.
//! An identity answer worth compressing ([`may_compress`]) is stored
//! gzip-compressed. Requests that bypass the cache keep the client's
//! `Accept-Encoding`.

use http::header::{self, HeaderValue};
use http::{HeaderMap, StatusCode};

use super::content_coding::{accepts_coding, accepts_stored_coding};

/// A content coding cachegate stores or serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Br,
}

impl Coding {
    /// The `Content-Encoding` token (`None` for identity, which is sent as
    /// no header at all).
    pub fn token(self) -> Option<&'static str> {
        match self {
            Coding::Identity => None,
            Coding::Gzip => Some("gzip"),
            Coding::Br => Some("br"),
        }
    }

    /// The coding a stored `Content-Encoding` names, when it is one
    /// cachegate can decode; `None` for anything else (`deflate`, `zstd`,
    /// several codings), which is then relayed untouched.
    pub fn from_content_encoding(value: Option<&[u8]>) -> Option<Coding> {
        let Some(value) = value else {
            return Some(Coding::Identity);
        };
        let v = value.trim_ascii();
        let is = |token: &str| v.eq_ignore_ascii_case(token.as_bytes());
        if v.is_empty() || is("identity") {
            Some(Coding::Identity)
        } else if is("gzip") || is("x-gzip") {
            Some(Coding::Gzip)
        } else if is("br") {
            Some(Coding::Br)
        } else {
            None
        }
    }
}

/// Whether a media type is worth compressing: text, JSON, XML, JavaScript
/// (and their `+json` / `+xml` structured suffixes). Parameters
/// (`; charset=utf-8`) are ignored.
pub fn compressible_type(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type.and_then(|v| std::str::from_utf8(v).ok()) else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    match kind {
        "text" => true,
        "application" => {
            matches!(
                sub,
                "json"
                    | "xml"
                    | "javascript"
                    | "x-javascript"
                    | "ecmascript"
                    | "x-ndjson"
                    | "ndjson"
                    | "graphql-response+json"
            ) || sub.ends_with("+json")
                || sub.ends_with("+xml")
        }
        "image" => sub == "svg+xml",
        _ => false,
    }
}

/// Whether an answer about to be stored may be compressed by cachegate:
/// a 200 (never a 206 or anything with `Content-Range`), not already
/// encoded, not `Cache-Control: no-transform` (RFC 9111 §5.2.2.6, RFC 9110
/// §7.7), a compressible type, and at least `min_bytes` long.
pub fn may_compress(
    status: StatusCode,
    headers: &HeaderMap,
    body_len: usize,
    min_bytes: usize,
) -> bool {
    if status != StatusCode::OK || headers.contains_key(http::header::CONTENT_RANGE) {
        return false;
    }
    let encoded = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .any(|v| {
            !matches!(
                v.as_bytes().trim_ascii().to_ascii_lowercase().as_slice(),
                b"" | b"identity"
            )
        });
    if encoded {
        return false;
    }
    if no_transform(headers) {
        return false;
    }
    compressible_type(
        headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes()),
    ) && body_len >= min_bytes
}

/// Whether any `Cache-Control` value carries `no-transform` (the parser in
/// `cache_control` does not keep it; a directive name match is enough).
pub fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            d.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("no-transform")
        })
}

/// What cachegate asks the upstream for on a cache-using request.
pub const ASK_UPSTREAM: HeaderValue = HeaderValue::from_static("gzip");

/// Answers shorter than this are stored as they come: gzip's header and
/// trailer (18 bytes) and a hit's decoding would cost more than they save.
pub const MIN_COMPRESS_BYTES: usize = 1024;

/// How much larger than `cache.max_entry_bytes` the body of a compressible
/// answer may be while it is read for storing (JSON gzips to 10-25 %): it
/// is the compressed copy that must fit. This bounds what one miss being
/// stored holds in serve mode: 4 × 5 MiB by default.
pub const RAW_PER_STORED: usize = 4;

/// A client's own `Accept-Encoding`, kept when cachegate asks the upstream
/// for gzip on its behalf.
#[derive(Clone, Debug, Default)]
pub struct ClientAccept {
    /// The client takes gzip (RFC 9110 §12.5.3; none sent: it does not).
    pub gzip: bool,
    original: Vec<HeaderValue>,
}

impl ClientAccept {
    /// The client's `Accept-Encoding`, from its request headers.
    pub fn of(request: &HeaderMap) -> ClientAccept {
        ClientAccept {
            gzip: accepts_stored_coding(request, Some(b"gzip")),
            original: request
                .get_all(header::ACCEPT_ENCODING)
                .iter()
                .cloned()
                .collect(),
        }
    }

    /// Put the client's own `Accept-Encoding` back (a request forwarded
    /// without the cache after all).
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.remove(header::ACCEPT_ENCODING);
        for v in &self.original {
            headers.append(header::ACCEPT_ENCODING, v.clone());
        }
    }

    /// Whether a stored answer with this `Content-Encoding` can be given
    /// to the client: gzip always (decoded for a client that does not take
    /// it), anything else only when the client's own `Accept-Encoding`
    /// takes it (RFC 9110 §12.5.3). The request's own header says gzip
    /// by then ([`ASK_UPSTREAM`]), so it cannot tell: an upstream's `br`
    /// must reach the clients that take `br`, and only them.
    pub fn takes_stored(&self, content_encoding: Option<&[u8]>) -> bool {
        Coding::from_content_encoding(content_encoding) == Some(Coding::Gzip)
            || accepts_coding(self.original.iter(), content_encoding)
    }

    /// Whether an answer with these headers must be decoded for this
    /// client: gzip (alone) that it does not take.
    pub fn must_decode(&self, response: &HeaderMap) -> bool {
        !self.gzip && coding_of(response) == Some(Coding::Gzip)
    }
}

/// The one coding of a response's `Content-Encoding`, when it is one
/// cachegate knows (several codings, or others: `None`).
pub fn coding_of(response: &HeaderMap) -> Option<Coding> {
    let mut values = response.get_all(header::CONTENT_ENCODING).iter();
    let first = values.next();
    if values.next().is_some() {
        return None;
    }
    Coding::from_content_encoding(first.map(|v| v.as_bytes()))
}

/// The headers of an answer whose body cachegate gzip-compressed:
/// `Content-Encoding: gzip`, no `Content-Length` (the body is its own
/// length), `Accept-Encoding` in `Vary` (who gets which bytes depends on
/// it) and a strong `ETag` made weak (RFC 9110 §8.8.3: it named other
/// bytes).
pub fn mark_compressed(headers: &mut HeaderMap) {
    headers.insert(header::CONTENT_ENCODING, ASK_UPSTREAM);
    headers.remove(header::CONTENT_LENGTH);
    vary_on_accept_encoding(headers);
    weaken_etag(headers);
}

/// The headers of a gzip answer sent decoded: no `Content-Encoding`, no
/// `Content-Length`, `Accept-Encoding` in `Vary`, a strong `ETag` weak.
pub fn mark_decoded(headers: &mut HeaderMap) {
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    vary_on_accept_encoding(headers);
    weaken_etag(headers);
}

/// `Accept-Encoding` added to `Vary`, unless it (or `*`) is there.
pub fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let named = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| {
            let n = n.trim();
            n == "*" || n.eq_ignore_ascii_case("accept-encoding")
        });
    if !named {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                headers.insert(header::ETAG, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(accept: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = accept {
            h.insert(
                http::header::ACCEPT_ENCODING,
                HeaderValue::from_str(a).unwrap(),
            );
        }
        h
    }

    /// What a client takes, whatever its spelling; none sent is identity.
    #[test]
    fn what_a_client_takes() {
        for s in [
            "gzip, deflate, br",
            "br, gzip",
            "GZIP,BR",
            "br;q=1.0, gzip;q=0.8, *;q=0.1",
            "gzip, deflate, br, zstd",
            "x-gzip, br",
            "*",
        ] {
            assert!(ClientAccept::of(&req(Some(s))).gzip, "{s}");
        }
        for s in ["br", "identity", "gzip;q=0, br", "*;q=0", "deflate"] {
            assert!(!ClientAccept::of(&req(Some(s))).gzip, "{s}");
        }
        assert!(!ClientAccept::of(&req(None)).gzip);
    }

    #[test]
    fn the_clients_own_value_is_put_back() {
        let a = ClientAccept::of(&req(Some("br, zstd")));
        let mut h = req(Some("gzip"));
        a.restore(&mut h);
        assert_eq!(h.get(header::ACCEPT_ENCODING).unwrap(), "br, zstd");
        let none = ClientAccept::of(&req(None));
        none.restore(&mut h);
        assert!(h.get(header::ACCEPT_ENCODING).is_none());
    }

    /// A stored gzip reaches everyone (decoded when need be); an
    /// upstream's `br` only the clients that asked for it themselves,
    /// although the request went upstream asking for gzip.
    #[test]
    fn which_stored_codings_a_client_is_given() {
        let br_client = ClientAccept::of(&req(Some("br, gzip")));
        let gzip_client = ClientAccept::of(&req(Some("gzip")));
        let plain_client = ClientAccept::of(&req(None));
        let shy_client = ClientAccept::of(&req(Some("gzip, identity;q=0")));
        for c in [&br_client, &gzip_client, &plain_client, &shy_client] {
            assert!(c.takes_stored(Some(b"gzip")), "{c:?}");
            assert!(c.takes_stored(Some(b"x-gzip")), "{c:?}");
        }
        assert!(br_client.takes_stored(Some(b"br")));
        assert!(!gzip_client.takes_stored(Some(b"br")));
        assert!(!plain_client.takes_stored(Some(b"br")));
        assert!(!br_client.takes_stored(Some(b"deflate")));
        assert!(plain_client.takes_stored(None));
        assert!(gzip_client.takes_stored(None));
        assert!(!shy_client.takes_stored(None), "identity;q=0");
    }

    #[test]
    fn compressible_types() {
        for t in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
            "application/xml",
            "application/atom+xml",
            "text/html",
            "text/plain;charset=utf-8",
            "application/javascript",
            "image/svg+xml",
        ] {
            assert!(compressible_type(Some(t.as_bytes())), "{t}");
        }
        for t in [
            "image/png",
            "application/octet-stream",
            "application/zip",
            "video/mp4",
            "json",
        ] {
            assert!(!compressible_type(Some(t.as_bytes())), "{t}");
        }
        assert!(!compressible_type(None));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn what_may_be_compressed() {
        let json = [("content-type", "application/json")];
        assert!(may_compress(StatusCode::OK, &headers(&json), 2000, 1024));
        assert!(
            !may_compress(StatusCode::OK, &headers(&json), 100, 1024),
            "too small"
        );
        assert!(!may_compress(
            StatusCode::PARTIAL_CONTENT,
            &headers(&json),
            2000,
            1024
        ));
        assert!(!may_compress(
            StatusCode::OK,
            &headers(&[
                ("content-type", "application/json"),
                ("content-range", "bytes 0-1/2")
            ]),
            2000,
            1024
        ));
        assert!(!may_compress(
            StatusCode::OK,
            &headers(&[
                ("content-type", "application/json"),
                ("cache-control", "max-age=60, no-transform")
            ]),
            2000,
            1024
        ));
        assert!(!may_compress(
            StatusCode::OK,
            &headers(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip")
            ]),
            2000,
            1024
        ));
        assert!(may_compress(
            StatusCode::OK,
            &headers(&[
                ("content-type", "application/json"),
                ("content-encoding", "identity")
            ]),
            2000,
            1024
        ));
        assert!(!may_compress(
            StatusCode::OK,
            &headers(&[("content-type", "image/png")]),
            2000,
            1024
        ));
    }

    #[test]
    fn who_is_sent_a_decoded_body() {
        let gzip = headers(&[("content-encoding", "gzip")]);
        let identity = HeaderMap::new();
        let br = headers(&[("content-encoding", "br")]);
        let takes_gzip = ClientAccept::of(&req(Some("gzip, br")));
        let takes_none = ClientAccept::of(&req(None));
        assert!(!takes_gzip.must_decode(&gzip));
        assert!(takes_none.must_decode(&gzip));
        assert!(takes_none.must_decode(&headers(&[("content-encoding", "x-gzip")])));
        assert!(!takes_none.must_decode(&identity));
        // Not a coding cachegate decodes: relayed as it is.
        assert!(!takes_none.must_decode(&br));
        assert!(!takes_none.must_decode(&headers(&[("content-encoding", "gzip, br")])));
    }

    #[test]
    fn headers_of_a_compressed_and_a_decoded_answer() {
        let mut h = headers(&[
            ("content-length", "5000"),
            ("etag", "\"v1\""),
            ("vary", "Origin"),
        ]);
        mark_compressed(&mut h);
        assert_eq!(h.get("content-encoding").unwrap(), "gzip");
        assert!(h.get("content-length").is_none());
        assert_eq!(h.get("etag").unwrap(), "W/\"v1\"");
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["Origin", "accept-encoding"]);
        mark_decoded(&mut h);
        assert!(h.get("content-encoding").is_none());
        assert_eq!(h.get("etag").unwrap(), "W/\"v1\"", "weak stays weak");
        assert_eq!(h.get_all("vary").iter().count(), 2, "named once");
        let mut star = headers(&[("vary", "*")]);
        vary_on_accept_encoding(&mut star);
        assert_eq!(star.get_all("vary").iter().count(), 1);
    }

    #[test]
    fn stored_codings_cachegate_can_decode() {
        assert_eq!(Coding::from_content_encoding(None), Some(Coding::Identity));
        assert_eq!(
            Coding::from_content_encoding(Some(b"GZIP")),
            Some(Coding::Gzip)
        );
        assert_eq!(
            Coding::from_content_encoding(Some(b"x-gzip")),
            Some(Coding::Gzip)
        );
        assert_eq!(Coding::from_content_encoding(Some(b"br")), Some(Coding::Br));
        assert_eq!(Coding::from_content_encoding(Some(b"deflate")), None);
        assert_eq!(Coding::from_content_encoding(Some(b"gzip, br")), None);
    }
}
