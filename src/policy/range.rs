//! Byte ranges answered from a stored complete response (RFC 9110 §14,
//! §13.1.5; RFC 9111 §3.4 lets a cache do so). Parsing is the
//! `http-range-header` crate's; what to answer is decided here.

use std::ops::RangeInclusive;

use http::header::{self, HeaderMap};

/// What a GET carrying `Range` gets from a stored 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The whole stored response (200): no usable `Range`, an `If-Range`
    /// that does not hold, several ranges, or a unit other than bytes.
    Full,
    /// 206 with this one range of the body (offsets inclusive).
    Partial(RangeInclusive<u64>),
    /// 416 with `Content-Range: bytes */len`: no range overlaps the body.
    Unsatisfiable,
}

/// The answer to a GET's `Range` from a stored `status` response with
/// `stored` headers and a body of `len` bytes.
///
/// - Only a 200 is cut (a stored 206 is never made; other statuses are
///   not representations to take ranges of).
/// - One `Range` field, `bytes` only (§14.2: other units and a field that
///   does not parse are ignored).
/// - `If-Range` (§13.1.5): an entity-tag must match the stored `ETag` by
///   strong comparison, a date must equal the stored `Last-Modified`;
///   otherwise the full response.
/// - One range: 206. Several: the full 200 (§14.2 lets a server ignore
///   `Range`; a multipart/byteranges body is not built here).
/// - None satisfiable: 416.
pub fn range_answer(request: &HeaderMap, status: u16, stored: &HeaderMap, len: u64) -> RangeAnswer {
    if status != 200 {
        return RangeAnswer::Full;
    }
    let mut fields = request.get_all(header::RANGE).iter();
    let (Some(range), None) = (fields.next(), fields.next()) else {
        return RangeAnswer::Full;
    };
    let Ok(range) = range.to_str() else {
        return RangeAnswer::Full;
    };
    if let Some(if_range) = request.get(header::IF_RANGE) {
        if !if_range_holds(if_range.to_str().unwrap_or(""), stored) {
            return RangeAnswer::Full;
        }
    }
    let parsed = match http_range_header::parse_range_header(range) {
        Ok(p) => p,
        Err(http_range_header::RangeUnsatisfiableError::Unsatisfiable) => {
            return RangeAnswer::Unsatisfiable
        }
        Err(_) => return RangeAnswer::Full,
    };
    match parsed.validate(len) {
        Ok(ranges) => match <[_; 1]>::try_from(ranges) {
            Ok([one]) => RangeAnswer::Partial(one),
            Err(_) => RangeAnswer::Full,
        },
        Err(http_range_header::RangeUnsatisfiableError::Unsatisfiable) => {
            RangeAnswer::Unsatisfiable
        }
        Err(_) => RangeAnswer::Full,
    }
}

/// RFC 9110 §13.1.5: an entity-tag (it starts with `"` or `W/`) holds when
/// it strongly matches the stored `ETag`; a date when it is exactly the
/// stored `Last-Modified`.
fn if_range_holds(if_range: &str, stored: &HeaderMap) -> bool {
    let if_range = if_range.trim();
    let stored_str = |name| {
        stored
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
    };
    if if_range.starts_with('"') || if_range.starts_with("W/") {
        return !if_range.starts_with("W/")
            && stored_str(header::ETAG)
                .is_some_and(|e| !e.trim().starts_with("W/") && e.trim() == if_range);
    }
    let date = super::date::parse_http_date(if_range);
    date.is_some()
        && stored_str(header::LAST_MODIFIED).and_then(super::date::parse_http_date) == date
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use RangeAnswer::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

    /// RFC 9110 §14.1.2 (byte ranges), §14.2 (one range answered, others
    /// may be ignored), §15.5.17 (416).
    #[test]
    fn one_byte_range_of_a_stored_200() {
        let stored = h(&[]);
        let ask = |r: &'static str| range_answer(&h(&[("range", r)]), 200, &stored, 10);
        assert_eq!(ask("bytes=0-3"), Partial(0..=3));
        assert_eq!(ask("bytes=5-"), Partial(5..=9));
        assert_eq!(ask("bytes=-3"), Partial(7..=9));
        assert_eq!(
            ask("bytes=-30"),
            Partial(0..=9),
            "a longer suffix is all of it"
        );
        assert_eq!(ask("bytes=8-100"), Partial(8..=9), "the end is clipped");
        assert_eq!(ask("bytes=10-"), Unsatisfiable);
        assert_eq!(ask("bytes=20-30"), Unsatisfiable);
        assert_eq!(ask("bytes=0-1, 4-5"), Full, "several ranges: the whole");
        assert_eq!(ask("items=0-3"), Full, "unknown unit ignored");
        assert_eq!(ask("bytes=3-1"), Full, "invalid ignored");
        assert_eq!(ask("bytes=abc"), Full);
        // Only a 200 is cut.
        assert_eq!(
            range_answer(&h(&[("range", "bytes=0-3")]), 404, &stored, 10),
            Full
        );
        assert_eq!(range_answer(&h(&[]), 200, &stored, 10), Full);
    }

    /// RFC 9110 §13.1.5: If-Range by strong entity-tag or exact date.
    #[test]
    fn if_range_must_hold_for_a_part() {
        let stored = h(&[("etag", "\"v1\""), ("last-modified", LM)]);
        let ask = |if_range: &'static str| {
            range_answer(
                &h(&[("range", "bytes=0-3"), ("if-range", if_range)]),
                200,
                &stored,
                10,
            )
        };
        assert_eq!(ask("\"v1\""), Partial(0..=3));
        assert_eq!(ask("\"v2\""), Full);
        assert_eq!(ask("W/\"v1\""), Full, "weak never matches");
        assert_eq!(ask(LM), Partial(0..=3));
        assert_eq!(ask("Sun, 06 Nov 1994 08:49:38 GMT"), Full);
        assert_eq!(ask("not a date"), Full);
        let weak = h(&[("etag", "W/\"v1\"")]);
        let r = range_answer(
            &h(&[("range", "bytes=0-3"), ("if-range", "W/\"v1\"")]),
            200,
            &weak,
            10,
        );
        assert_eq!(r, Full);
    }
}
