//! Building the client's response: from an entry (with `Age` and the
//! edge `Cache-Control`, 304 for a matching conditional request, no body
//! for HEAD), or relaying the upstream's.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use cachegate_store::{now_millis, Entry};

use super::outcome::Outcome;
use super::{Proxy, Reply};
use crate::policy;
use crate::routes::Rule;
use crate::upstream::UpstreamResponse;

impl Proxy {
    /// Build the client response from an entry: conditional requests
    /// answered with 304, `Age`, the edge `Cache-Control`, cache status.
    pub(super) fn respond_from_entry(
        &self,
        entry: &Entry,
        rule: &Rule,
        req_headers: &HeaderMap,
        head: bool,
        outcome: Outcome,
    ) -> Reply {
        let now = now_millis();
        let mut headers = header_map_of(entry);
        headers.insert(header::AGE, HeaderValue::from(entry.age_secs(now)));
        let cc = policy::edge_cache_control(entry.fresh_secs_left(now), rule);
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(&cc).expect("ASCII"),
        );
        if let Some(edge) = &self.edge {
            edge.tag_response(&mut headers, &entry.tags);
        }
        let not_modified =
            entry.status == 200 && policy::conditional::not_modified(req_headers, entry);
        let status = if not_modified {
            StatusCode::NOT_MODIFIED
        } else {
            StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK)
        };
        let body = if head || not_modified {
            Bytes::new()
        } else {
            entry.body.clone()
        };
        if head || not_modified {
            // Describe the representation, not the empty body we send.
            if !not_modified {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
            }
        }
        if not_modified {
            for h in [
                header::CONTENT_TYPE,
                header::CONTENT_LENGTH,
                header::CONTENT_ENCODING,
            ] {
                headers.remove(h);
            }
        }
        (build(status, headers, body), outcome)
    }
}

/// The headers stored with an entry, as a header map.
pub(super) fn header_map_of(entry: &Entry) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(entry.headers.len() + 4);
    for (n, v) in &entry.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_maybe_shared(v.clone()),
        ) {
            h.append(n, v);
        }
    }
    h
}

pub(super) fn relay(resp: UpstreamResponse, outcome: Outcome, head: bool) -> Reply {
    let body = if head { Bytes::new() } else { resp.body };
    let mut headers = resp.headers;
    if head {
        // Keep the upstream's Content-Length for HEAD; the body is empty by definition.
    } else {
        headers.remove(header::CONTENT_LENGTH);
    }
    (build(resp.status, headers, body), outcome)
}

fn build(status: StatusCode, headers: HeaderMap, body: Bytes) -> Response<Bytes> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// A JSON error body: `{"error": {"status": 502, "code": "...", "message": "..."}}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "error": { "status": status.as_u16(), "code": code, "message": message } });
    let mut resp = Response::new(Bytes::from(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
