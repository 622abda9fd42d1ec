//! Whether a stored response's content coding may be served to a request
//! (RFC 9110 §12.5.3, §8.4).

use http::HeaderMap;

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
    let codings: Vec<String> = content_encoding
        .and_then(|v| std::str::from_utf8(v).ok())
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|c| normal(c.trim()))
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    let accepted = accept_encoding(request);
    let weight = |coding: &str| -> Option<f32> {
        accepted
            .iter()
            .find(|(c, _)| c == coding)
            .or_else(|| accepted.iter().find(|(c, _)| c == "*"))
            .map(|(_, q)| *q)
    };
    if codings.is_empty() {
        return weight("identity").is_none_or(|q| q > 0.0);
    }
    codings.iter().all(|c| weight(c).is_some_and(|q| q > 0.0))
}

/// The `Accept-Encoding` members as (lower-case coding, weight); a weight
/// that does not parse counts as 1 (the member is there).
fn accept_encoding(request: &HeaderMap) -> Vec<(String, f32)> {
    request
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|member| {
            let mut parts = member.split(';');
            let coding = normal(parts.next()?.trim());
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

fn normal(coding: &str) -> String {
    let c = coding.to_ascii_lowercase();
    match c.as_str() {
        "x-gzip" => "gzip".into(),
        "x-compress" => "compress".into(),
        _ => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
