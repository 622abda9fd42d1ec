//! Compressed entries (issue #26 item 1), the pure part: which answers may
//! be compressed for storing, the `Accept-Encoding` token a variant is keyed
//! on, and what coding a client is sent. No I/O and no byte work here; the
//! byte work belongs in `proxy/encoding.rs` (not written yet).
//!
//! cachegate serves three codings: `br`, `gzip` and identity. A request's
//! `Accept-Encoding`, however spelt, is reduced to the subset of those it
//! accepts ([`accept_token`]), so spellings and orders never multiply
//! variants.

use http::{HeaderMap, StatusCode};

use super::content_coding::accepts_stored_coding;

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
        let v = std::str::from_utf8(value).ok()?.trim().to_ascii_lowercase();
        match v.as_str() {
            "" | "identity" => Some(Coding::Identity),
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "br" => Some(Coding::Br),
            _ => None,
        }
    }
}

/// Which of the served codings a request accepts, as a short canonical
/// token for the variant key: `"br,gzip,identity"`, `"gzip,identity"`,
/// `"identity"`, `"gzip"` (identity refused), or `"none"`. Every spelling
/// of the same acceptance gives the same token (RFC 9111 §4.1 lets a cache
/// normalise the fields it varies on).
pub fn accept_token(request: &HeaderMap) -> &'static str {
    let br = accepts_stored_coding(request, Some(b"br"));
    let gzip = accepts_stored_coding(request, Some(b"gzip"));
    let identity = accepts_stored_coding(request, None);
    match (br, gzip, identity) {
        (true, true, true) => "br,gzip,identity",
        (true, true, false) => "br,gzip",
        (true, false, true) => "br,identity",
        (true, false, false) => "br",
        (false, true, true) => "gzip,identity",
        (false, true, false) => "gzip",
        (false, false, true) => "identity",
        (false, false, false) => "none",
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

/// What to send a client for a stored coding: the stored bytes as they
/// are, decoded to identity, or nothing usable (`None`: treat as a miss,
/// as today).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Send {
    AsStored,
    Decode(Coding),
}

/// Chooses what a request gets from an entry stored in `stored`.
pub fn choose(request: &HeaderMap, stored: Coding) -> Option<Send> {
    let accepted = match stored.token() {
        None => accepts_stored_coding(request, None),
        Some(t) => accepts_stored_coding(request, Some(t.as_bytes())),
    };
    if accepted {
        return Some(Send::AsStored);
    }
    if stored != Coding::Identity && accepts_stored_coding(request, None) {
        return Some(Send::Decode(stored));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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

    /// The issue's six spellings of one acceptance give one token.
    #[test]
    fn spellings_and_orders_give_one_token() {
        let spellings = [
            "gzip, deflate, br",
            "br, gzip",
            "GZIP,BR",
            "br;q=1.0, gzip;q=0.8, *;q=0.1",
            "gzip, deflate, br, zstd",
            "x-gzip, br",
        ];
        for s in spellings {
            assert_eq!(accept_token(&req(Some(s))), "br,gzip,identity", "{s}");
        }
        assert_eq!(accept_token(&req(None)), "identity");
        assert_eq!(accept_token(&req(Some("gzip"))), "gzip,identity");
        assert_eq!(accept_token(&req(Some("gzip, identity;q=0"))), "gzip");
        assert_eq!(accept_token(&req(Some("*;q=0"))), "none");
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
    fn choosing_what_to_send() {
        assert_eq!(
            choose(&req(Some("gzip, br")), Coding::Gzip),
            Some(Send::AsStored)
        );
        assert_eq!(
            choose(&req(None), Coding::Gzip),
            Some(Send::Decode(Coding::Gzip))
        );
        assert_eq!(
            choose(&req(Some("br")), Coding::Gzip),
            Some(Send::Decode(Coding::Gzip))
        );
        assert_eq!(
            choose(&req(Some("gzip;q=0, identity;q=0")), Coding::Gzip),
            None
        );
        assert_eq!(choose(&req(None), Coding::Identity), Some(Send::AsStored));
        assert_eq!(choose(&req(Some("identity;q=0")), Coding::Identity), None);
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
