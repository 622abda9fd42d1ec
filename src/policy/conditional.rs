//! Conditional requests: the client's, answered from an entry (RFC 9110
//! §13), and ours, sent upstream to revalidate a stale entry (RFC 9111 §4.3).

use http::header::{self, HeaderValue};
use http::HeaderMap;

use cachegate_store::Entry;

/// RFC 9110 §13.1.2 / §13.1.3: weak comparison for If-None-Match;
/// If-Modified-Since only when there is no If-None-Match, against
/// `Last-Modified` or, without one, `Date`, or without that the time the
/// entry was received (RFC 9111 §4.3.2: the latest the representation can
/// have been modified).
pub fn not_modified(req: &HeaderMap, entry: &Entry) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = entry_str(entry, header::ETAG) else {
            return false;
        };
        return inm
            .split(',')
            .any(|t| t.trim() == "*" || opaque(t) == opaque(etag));
    }
    let Some(ims) = req_time(req, header::IF_MODIFIED_SINCE) else {
        return false;
    };
    last_modified_or_date(entry).is_some_and(|lm| lm <= ims)
}

/// RFC 9110 §13.2.2 steps 1-2, answered from a stored 2xx: `If-Match`
/// (strong comparison; `*` matches any stored answer), else
/// `If-Unmodified-Since` against `Last-Modified`. True when the request's
/// precondition fails (answer 412).
pub fn precondition_failed(req: &HeaderMap, entry: &Entry) -> bool {
    if !(200..300).contains(&entry.status) {
        return false;
    }
    if let Some(im) = req.get(header::IF_MATCH) {
        let Ok(im) = im.to_str() else { return true };
        let strong = entry_str(entry, header::ETAG).filter(|e| !e.trim().starts_with("W/"));
        return !im.split(',').any(|t| {
            t.trim() == "*"
                || strong.is_some_and(|e| !t.trim().starts_with("W/") && t.trim() == e.trim())
        });
    }
    let (Some(ius), Some(lm)) = (
        req_time(req, header::IF_UNMODIFIED_SINCE),
        entry_str(entry, header::LAST_MODIFIED).and_then(super::date::parse_http_date),
    ) else {
        return false;
    };
    lm > ius
}

fn entry_str(entry: &Entry, name: header::HeaderName) -> Option<&str> {
    entry
        .header(name.as_str())
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn opaque(tag: &str) -> &str {
    tag.trim().trim_start_matches("W/")
}

fn req_time(req: &HeaderMap, name: header::HeaderName) -> Option<u64> {
    super::date::parse_http_date(req.get(name)?.to_str().ok()?)
}

fn last_modified_or_date(entry: &Entry) -> Option<u64> {
    match entry_str(entry, header::LAST_MODIFIED).or_else(|| entry_str(entry, header::DATE)) {
        Some(date) => super::date::parse_http_date(date),
        None => Some(entry.stored_at),
    }
}

/// The client's preconditions are answered by us from the entry; the
/// upstream gets ours: the stale entry's `ETag` as `If-None-Match`, else its
/// `Last-Modified` as `If-Modified-Since` (RFC 9111 §4.3.1).
pub fn upstream_conditionals(headers: &mut HeaderMap, stale: Option<&Entry>) {
    for h in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
    ] {
        headers.remove(h);
    }
    let Some(s) = stale else { return };
    if let Some(etag) = s
        .header(header::ETAG.as_str())
        .and_then(|v| HeaderValue::from_bytes(v).ok())
    {
        headers.insert(header::IF_NONE_MATCH, etag);
    } else if let Some(lm) = s
        .header(header::LAST_MODIFIED.as_str())
        .and_then(|v| HeaderValue::from_bytes(v).ok())
    {
        headers.insert(header::IF_MODIFIED_SINCE, lm);
    }
}

/// RFC 9111 §4.3.4: whether a 304 answering the conditional request we
/// made from one stored response may update it (freshen its headers).
/// A strong `ETag` in the 304 selects the stored response with that same
/// strong `ETag`; otherwise a weak one selects by weak comparison, and a
/// `Last-Modified` by the same date. A 304 with another validator than the
/// stored response's is about another representation (the origin changed
/// it between our request and its answer): it must not update this one,
/// whose body would then go out under the new validator.
///
/// A 304 carrying no validator at all updates the response: §4.3.4
/// selects one only where the stored response lacks validators too, for
/// a client that made up its own `If-Modified-Since`; here the validator
/// was the stored response's own, sent by cachegate for it alone, and
/// origins such as Express answer 304 without repeating it.
pub fn not_modified_selects(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    fn etag(h: &HeaderMap) -> Option<&str> {
        h.get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    }
    if let Some(new) = etag(not_modified) {
        let Some(old) = etag(stored) else {
            return false;
        };
        return if new.starts_with("W/") {
            opaque(old) == opaque(new)
        } else {
            !old.starts_with("W/") && old == new
        };
    }
    if let Some(new) = not_modified.get(header::LAST_MODIFIED) {
        let date = |v: &HeaderValue| v.to_str().ok().and_then(super::date::parse_http_date);
        return stored
            .get(header::LAST_MODIFIED)
            .is_some_and(|old| old == new || date(old).is_some_and(|d| Some(d) == date(new)));
    }
    true
}

/// Fields a 304 never changes in the stored response: they describe the
/// stored bytes (`Content-Encoding`, `Content-Length`, `Content-Range`),
/// select the representation (`ETag`), or the variant it is stored as
/// (`Vary`). RFC 9111 §3.2 excepts the fields "the cache's stored response
/// depends upon"; a 304 carrying `Vary: Origin` alone (Express does) would
/// otherwise drop `Accept-Encoding` from the stored `Vary`, and gzip bytes
/// would go to clients that cannot read them.
const NEVER_FROM_304: [header::HeaderName; 5] = [
    header::CONTENT_ENCODING,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::VARY,
    header::ETAG,
];

/// RFC 9111 §3.2 / §4.3.4: the stored headers, updated with those of a 304
/// that freshens them ([`not_modified_selects`]): each field the 304
/// carries replaces the stored one, every value of it (a repeated field
/// keeps all its values), except the fields of [`NEVER_FROM_304`].
pub fn merge_not_modified(mut stored: HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let updates = |name: &header::HeaderName| !NEVER_FROM_304.contains(name);
    for name in not_modified.keys().filter(|n| updates(n)) {
        stored.remove(name);
    }
    for (name, value) in not_modified.iter().filter(|(n, _)| updates(n)) {
        stored.append(name.clone(), value.clone());
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(headers: &[(&str, &str)]) -> Entry {
        Entry {
            status: 200,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body: Bytes::new(),
            born_at: 0,
            stored_at: 0,
            fresh_until: 0,
            stale_while_revalidate_until: 0,
            stale_if_error_until: 0,
            keep_until: 0,
            tags: vec![],
        }
    }

    fn req(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    const DATE: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const LATER: &str = "Mon, 07 Nov 1994 08:49:37 GMT";
    const EARLIER: &str = "Sat, 05 Nov 1994 08:49:37 GMT";

    #[test]
    fn if_modified_since_falls_back_to_date() {
        let e = entry(&[("date", DATE)]);
        assert!(not_modified(&req(&[("if-modified-since", DATE)]), &e));
        assert!(not_modified(&req(&[("if-modified-since", LATER)]), &e));
        assert!(!not_modified(&req(&[("if-modified-since", EARLIER)]), &e));
        let e = entry(&[("date", LATER), ("last-modified", EARLIER)]);
        assert!(not_modified(&req(&[("if-modified-since", DATE)]), &e));
        // If-None-Match wins over If-Modified-Since.
        let e = entry(&[("etag", "\"a\""), ("date", DATE)]);
        assert!(!not_modified(
            &req(&[("if-none-match", "\"b\""), ("if-modified-since", LATER)]),
            &e
        ));
        assert!(not_modified(&req(&[("if-none-match", "W/\"a\"")]), &e));
        // RFC 9111 §4.3.2: no Date either, the time it was received.
        let mut received = entry(&[]);
        received.stored_at = super::super::date::parse_http_date(DATE).unwrap();
        assert!(not_modified(
            &req(&[("if-modified-since", DATE)]),
            &received
        ));
        assert!(!not_modified(
            &req(&[("if-modified-since", EARLIER)]),
            &received
        ));
    }

    #[test]
    fn if_match_and_if_unmodified_since() {
        let e = entry(&[("etag", "\"a\""), ("last-modified", DATE)]);
        assert!(!precondition_failed(&req(&[("if-match", "\"a\"")]), &e));
        assert!(!precondition_failed(
            &req(&[("if-match", "\"x\", \"a\"")]),
            &e
        ));
        assert!(!precondition_failed(&req(&[("if-match", "*")]), &e));
        assert!(precondition_failed(&req(&[("if-match", "\"b\"")]), &e));
        // Strong comparison: a weak tag never matches.
        assert!(precondition_failed(&req(&[("if-match", "W/\"a\"")]), &e));
        let weak = entry(&[("etag", "W/\"a\"")]);
        assert!(precondition_failed(&req(&[("if-match", "W/\"a\"")]), &weak));
        assert!(!precondition_failed(
            &req(&[("if-unmodified-since", DATE)]),
            &e
        ));
        assert!(!precondition_failed(
            &req(&[("if-unmodified-since", LATER)]),
            &e
        ));
        assert!(precondition_failed(
            &req(&[("if-unmodified-since", EARLIER)]),
            &e
        ));
        // If-Match wins over If-Unmodified-Since.
        assert!(!precondition_failed(
            &req(&[("if-match", "\"a\""), ("if-unmodified-since", EARLIER)]),
            &e
        ));
        assert!(!precondition_failed(&req(&[]), &e));
    }

    /// RFC 9111 §4.3.4: only the stored response the 304's validator
    /// selects is updated.
    #[test]
    fn a_304_updates_only_the_response_its_validator_selects() {
        let strong = req(&[("etag", "\"v1\""), ("last-modified", DATE)]);
        assert!(not_modified_selects(&strong, &req(&[("etag", "\"v1\"")])));
        assert!(!not_modified_selects(&strong, &req(&[("etag", "\"v2\"")])));
        // Weak in the 304: weak comparison.
        assert!(not_modified_selects(&strong, &req(&[("etag", "W/\"v1\"")])));
        let weak = req(&[("etag", "W/\"v1\"")]);
        assert!(
            !not_modified_selects(&weak, &req(&[("etag", "\"v1\"")])),
            "strong needs strong"
        );
        assert!(not_modified_selects(&weak, &req(&[("etag", "W/\"v1\"")])));
        assert!(!not_modified_selects(
            &req(&[("last-modified", DATE)]),
            &req(&[("etag", "\"v1\"")])
        ));
        // Last-Modified when the 304 has no ETag.
        assert!(not_modified_selects(
            &strong,
            &req(&[("last-modified", DATE)])
        ));
        assert!(!not_modified_selects(
            &strong,
            &req(&[("last-modified", LATER)])
        ));
        assert!(!not_modified_selects(
            &weak,
            &req(&[("last-modified", DATE)])
        ));
        // No validator: the answer to the one we sent.
        assert!(not_modified_selects(&strong, &req(&[("vary", "Origin")])));
    }

    /// RFC 9111 §3.2: what the stored bytes and their variant depend on is
    /// never taken from a 304.
    #[test]
    fn a_304_never_changes_what_selects_the_representation() {
        let stored = req(&[
            ("content-encoding", "gzip"),
            ("vary", "Accept-Encoding"),
            ("etag", "W/\"v1\""),
            ("content-range", "bytes 0-9/10"),
            ("cache-control", "no-cache"),
        ]);
        let nm = req(&[
            ("vary", "Origin"),
            ("content-encoding", "br"),
            ("etag", "W/\"v1-other\""),
            ("content-range", "bytes 0-1/2"),
            ("cache-control", "max-age=5"),
            ("date", DATE),
        ]);
        let m = merge_not_modified(stored, &nm);
        assert_eq!(m["content-encoding"], "gzip");
        assert_eq!(m["vary"], "Accept-Encoding");
        assert_eq!(m["etag"], "W/\"v1\"");
        assert_eq!(m["content-range"], "bytes 0-9/10");
        assert_eq!(m["cache-control"], "max-age=5");
        assert_eq!(m["date"], DATE);
    }

    #[test]
    fn a_304_replaces_fields_and_keeps_repeated_values() {
        let stored = req(&[
            ("cache-control", "max-age=1"),
            ("link", "</a>; rel=preload"),
            ("x-kept", "1"),
        ]);
        let nm = req(&[
            ("cache-control", "max-age=60"),
            ("link", "</b>; rel=preload"),
            ("link", "</c>; rel=preload"),
            ("content-length", "0"),
        ]);
        let m = merge_not_modified(stored, &nm);
        assert_eq!(m["cache-control"], "max-age=60");
        let links: Vec<_> = m.get_all("link").iter().collect();
        assert_eq!(links, ["</b>; rel=preload", "</c>; rel=preload"]);
        assert_eq!(m["x-kept"], "1");
        assert!(m.get("content-length").is_none());
    }
}
