//! Conditional requests: the client's, answered from an entry (RFC 9110
//! §13), and ours, sent upstream to revalidate a stale entry (RFC 9111 §4.3).

use http::header::{self, HeaderValue};
use http::HeaderMap;

use cachegate_store::Entry;

/// RFC 9110 §13.1.2 / §13.1.3: weak comparison for If-None-Match; If-Modified-Since
/// only when there is no If-None-Match.
pub fn not_modified(req: &HeaderMap, entry: &Entry) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = entry
            .header("etag")
            .and_then(|v| std::str::from_utf8(v).ok())
        else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        return inm
            .split(',')
            .any(|t| t.trim() == "*" || weak(t) == weak(etag));
    }
    let ims = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let lm = entry
        .header("last-modified")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((ims, lm), (Some(ims), Some(lm)) if lm <= ims)
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
        .header("etag")
        .and_then(|v| HeaderValue::from_bytes(v).ok())
    {
        headers.insert(header::IF_NONE_MATCH, etag);
    } else if let Some(lm) = s
        .header("last-modified")
        .and_then(|v| HeaderValue::from_bytes(v).ok())
    {
        headers.insert(header::IF_MODIFIED_SINCE, lm);
    }
}

/// RFC 9111 §4.3.4: the stored headers, updated with those of a 304 that
/// freshens them (`Content-Length` describes the 304, not the entry).
pub fn merge_not_modified(mut stored: HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    for (name, value) in not_modified.iter() {
        if name != header::CONTENT_LENGTH {
            stored.insert(name.clone(), value.clone());
        }
    }
    stored
}
