//! Whether a stored response's content coding may be served to a request
//! (RFC 9110 §12.5.3, §8.4).

use http::{HeaderMap, HeaderValue};

/// Whether every content coding of a stored response's `Content-Encoding`
/// (`None`: not encoded) is one the request's `Accept-Encoding` accepts.
/// A stored response that fails this is a miss for the request: its
/// bytes are no use to a client that cannot decode them, whatever the
/// key or a `Vary` (perhaps damaged, perhaps absent) said.
///
/// - `identity` (no coding) is acceptable unless the request excludes it
///   (`identity;q=0`, or `*;q=0` without naming identity).
/// - A coding is acceptable when named with a non-zero weight, or when
///   `*` has one and it is not named; `x-gzip` is `gzip` (§8.4.1.3).
/// - A request without `Accept-Encoding` gets only `identity`. RFC 9110
///   lets a server send it any coding, but the clients that send none
///   (scripts, simple HTTP libraries) mostly cannot decode one, and the
///   cost of the stricter reading is one upstream call, which the
///   upstream answers as it sees fit.
pub fn accepts_stored_coding(request: &HeaderMap, content_encoding: Option<&[u8]>) -> bool {
    accepts_coding(
        request.get_all(http::header::ACCEPT_ENCODING).iter(),
        content_encoding,
    )
}

/// [`accepts_stored_coding`] for the values of an `Accept-Encoding` kept
/// apart from their request.
pub fn accepts_coding<'a>(
    accept_encoding: impl Iterator<Item = &'a HeaderValue>,
    content_encoding: Option<&[u8]>,
) -> bool {
    // Borrowed and compared without case: this runs on every hit.
    let accepted = members(accept_encoding);
    let weight = |coding: &str| -> Option<f32> {
        accepted
            .iter()
            .find(|(c, _)| same_coding(c, coding))
            .or_else(|| accepted.iter().find(|(c, _)| *c == "*"))
            .map(|(_, q)| *q)
    };
    let mut codings = content_encoding
        .and_then(|v| std::str::from_utf8(v).ok())
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        .peekable();
    if codings.peek().is_none() {
        return weight("identity").is_none_or(|q| q > 0.0);
    }
    codings.all(|c| weight(c).is_some_and(|q| q > 0.0))
}

/// The `Accept-Encoding` members as (coding, weight), codings trimmed and
/// as written; a weight that does not parse counts as 1 (the member is
/// there).
fn members<'a>(accept_encoding: impl Iterator<Item = &'a HeaderValue>) -> Vec<(&'a str, f32)> {
    accept_encoding
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|member| {
            let mut parts = member.split(';');
            let coding = parts.next()?.trim();
            if coding.is_empty() {
                return None;
            }
            let q = parts
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse().unwrap_or(1.0));
            Some((coding, q))
        })
        .collect()
}

/// Whether two coding tokens name one coding: case-insensitive, `x-gzip`
/// is `gzip` and `x-compress` is `compress` (RFC 9110 §8.4.1).
fn same_coding(a: &str, b: &str) -> bool {
    fn normal(c: &str) -> &str {
        if c.eq_ignore_ascii_case("x-gzip") {
            "gzip"
        } else if c.eq_ignore_ascii_case("x-compress") {
            "compress"
        } else {
            c
        }
    }
    normal(a).eq_ignore_ascii_case(normal(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(accept: Option<&str>, stored: Option<&str>) -> bool {
        let mut h = HeaderMap::new();
        if let Some(a) = accept {
            h.insert(
                http::header::ACCEPT_ENCODING,
                HeaderValue::from_str(a).unwrap(),
            );
        }
        accepts_stored_coding(&h, stored.map(str::as_bytes))
    }

    /// RFC 9110 §12.5.3 (Accept-Encoding) and §8.4.1.3 (x-gzip).
    #[test]
    fn a_coding_is_served_only_to_requests_that_accept_it() {
        assert!(accepts(Some("gzip, deflate, br"), Some("gzip")));
        assert!(accepts(Some("br;q=1.0, GZIP;q=0.5"), Some("gzip")));
        assert!(accepts(Some("x-gzip"), Some("gzip")));
        assert!(accepts(Some("*"), Some("br")));
        assert!(accepts(Some("gzip, br"), Some("gzip, br")));
        assert!(!accepts(Some("br"), Some("gzip")));
        assert!(!accepts(Some("gzip;q=0, br"), Some("gzip")));
        assert!(!accepts(Some("*, gzip;q=0"), Some("gzip")));
        assert!(!accepts(Some("gzip"), Some("gzip, br")));
        assert!(!accepts(Some("identity"), Some("gzip")));
        assert!(
            !accepts(None, Some("gzip")),
            "no Accept-Encoding: identity only"
        );
        // Unencoded answers go to everyone who does not refuse identity.
        assert!(accepts(None, None));
        assert!(accepts(Some("br"), None));
        assert!(accepts(Some("gzip"), Some("identity")));
        assert!(!accepts(Some("identity;q=0"), None));
        assert!(!accepts(Some("*;q=0"), None));
        assert!(accepts(Some("*;q=0, identity"), None));
    }
}
