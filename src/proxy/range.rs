//! A GET's `Range` answered from a fresh stored 200 ([`policy::range`]
//! decides; this cuts the response).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

use cachegate_store::Entry;

use super::Reply;
use crate::policy::range::{range_answer, RangeAnswer};

/// `reply` (built from `entry` for a request with `request` headers) as
/// the request's `Range` asks: a 206 with one range, a 416, or as it is.
/// A reply that is not the entry's 200 (a 304 or 412 answered already)
/// stays as it is: preconditions come before `Range` (RFC 9110 §13.2.2).
pub(super) fn cut((resp, outcome): Reply, entry: &Entry, request: &HeaderMap) -> Reply {
    if resp.status() != StatusCode::OK {
        return (resp, outcome);
    }
    let len = entry.body.len() as u64;
    let (mut parts, body) = resp.into_parts();
    // Built from the stored entry: whole.
    let body = body
        .as_full()
        .cloned()
        .unwrap_or_else(|| entry.body.clone());
    let (status, content_range, body) =
        match range_answer(request, entry.status, &parts.headers, len) {
            RangeAnswer::Full => return (http::Response::from_parts(parts, body.into()), outcome),
            RangeAnswer::Partial(r) => (
                StatusCode::PARTIAL_CONTENT,
                format!("bytes {}-{}/{len}", r.start(), r.end()),
                body.slice(*r.start() as usize..=*r.end() as usize),
            ),
            RangeAnswer::Unsatisfiable => {
                parts.headers.remove(header::CONTENT_TYPE);
                (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("bytes */{len}"),
                    Bytes::new(),
                )
            }
        };
    parts.status = status;
    if let Ok(v) = HeaderValue::from_str(&content_range) {
        parts.headers.insert(header::CONTENT_RANGE, v);
    }
    (http::Response::from_parts(parts, body.into()), outcome)
}
