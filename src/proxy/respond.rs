//! Building the client's response: from an entry (with `Age` and the
//! edge `Cache-Control`, 304 for a matching conditional request, no body
//! for HEAD), or relaying the upstream's.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use cachegate_store::{now_millis, Entry};

use super::outcome::Outcome;
use super::{Proxy, Reply, ResponseBody, Stored};
use crate::error_code::ErrorCode;
use crate::policy;
use crate::policy::compression::ClientAccept;
use crate::routes::Rule;
use crate::upstream::UpstreamResponse;

impl Proxy {
    /// Build the client response from an entry: the upstream's headers as
    /// stored, its current `Age`, what configuration tells the edge
    /// ([`policy::edge`]), the client's conditional request answered (412
    /// or 304), no body for HEAD.
    /// A gzip entry goes to a `client` that does not take gzip decoded
    /// (`cache.compression`); a streamed answer's head (no body yet) is
    /// left for [`super::encoding::fit_to_client`].
    pub(super) fn respond_from_entry(
        &self,
        stored: &Stored,
        rule: &Rule,
        req_headers: &HeaderMap,
        client: Option<&ClientAccept>,
        head: bool,
        outcome: Outcome,
    ) -> Reply {
        let now = now_millis();
        let entry = &stored.entry;
        if policy::conditional::precondition_failed(req_headers, entry) {
            let resp = json_error(
                StatusCode::PRECONDITION_FAILED,
                ErrorCode::PreconditionFailed,
                "the request's If-Match or If-Unmodified-Since does not hold for the stored answer",
            )
            .map(ResponseBody::from);
            return (resp, outcome);
        }
        let decoded_len = entry.gzip_decoded_len();
        let decode =
            client.is_some_and(|c| c.must_decode(&stored.headers)) && decoded_len.is_some();
        let mut headers = if decode {
            stored.decoded_headers().clone()
        } else {
            stored.headers.clone()
        };
        let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
        let age_secs = entry.age_secs(now);
        headers.insert(header::AGE, HeaderValue::from(age_secs));
        let route_supplied = policy::response::route_supplied_freshness(status, &headers, rule);
        policy::edge_headers(
            &mut headers,
            policy::EdgeFacts {
                age_secs,
                lifetime_secs: entry.fresh_until.saturating_sub(entry.born_at) / 1000,
                route_supplied,
                rule,
                edge_key_headers: self.settings.edge_key_headers.as_deref(),
            },
        );
        policy::headers::strip_cachegate_fields(&mut headers);
        if let Some(edge) = &self.edge {
            edge.tag_response(&mut headers, &entry.tags);
        }
        let not_modified =
            entry.status == 200 && policy::conditional::not_modified(req_headers, entry);
        let status = if not_modified {
            StatusCode::NOT_MODIFIED
        } else {
            status
        };
        let body = if head || not_modified {
            Bytes::new()
        } else if decode {
            match stored.decoded_body(self.settings.max_response_bytes) {
                Ok(body) => body,
                Err(e) => {
                    tracing::warn!(error = ?e, "a stored gzip body did not decode");
                    let resp = json_error(
                        StatusCode::BAD_GATEWAY,
                        ErrorCode::UpstreamError,
                        "the stored gzip answer could not be decoded for a client that does not take gzip",
                    )
                    .map(ResponseBody::from);
                    return (resp, outcome);
                }
            }
        } else {
            entry.body.clone()
        };
        if head && !not_modified {
            // Describe the representation, not the empty body we send.
            let len = if decode {
                decoded_len.unwrap_or_default()
            } else {
                entry.body.len()
            };
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
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

/// The headers stored with an entry, as a header map: built once per
/// entry read ([`Stored::read`]).
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

/// The inverse of [`header_map_of`]: headers as an entry stores them.
pub(super) fn entry_headers(headers: &HeaderMap) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// An upstream answer relayed with its own headers. `keyed` is the rule
/// and the edge's key headers for a request that used the cache: an answer
/// to it on a route keyed on request headers is marked for the edge as a
/// stored one would be ([`policy::mark_keyed`]); the upstream's own `Vary`
/// is its own statement there.
pub(super) fn relay(
    resp: UpstreamResponse,
    outcome: Outcome,
    head: bool,
    keyed: Option<(&Rule, Option<&[String]>)>,
) -> Reply {
    let body = if head {
        ResponseBody::default()
    } else {
        ResponseBody::from(resp.body)
    };
    let mut headers = resp.headers;
    if let ResponseBody::Full(_) = body {
        // A whole body is its own length (HEAD keeps the upstream's); a
        // streamed one keeps the upstream's, which the stream is held to.
        if !head {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
    if let Some((rule, edge_key_headers)) = keyed {
        if !rule.key_headers.is_empty() {
            policy::mark_keyed(&mut headers, rule, edge_key_headers, false);
        }
    }
    policy::headers::strip_cachegate_fields(&mut headers);
    (build(resp.status, headers, body), outcome)
}

/// The 502 for an answer too large to return through Lambda
/// ([`crate::lambda_payload::fits`]), with its outcome.
pub(super) fn too_large_for_lambda<B>(
    resp: &Response<B>,
    body_len: usize,
    outcome: Outcome,
) -> Reply {
    let resp = json_error(
        StatusCode::BAD_GATEWAY,
        ErrorCode::ResponseTooLargeForLambda,
        &format!(
            "the answer ({} {}, a {} byte body) is larger than a Lambda response can carry ({} bytes)",
            resp.status().as_u16(),
            resp.status().canonical_reason().unwrap_or(""),
            body_len,
            crate::lambda_payload::MAX_PAYLOAD_BYTES
        ),
    );
    (resp.map(ResponseBody::from), outcome.too_large_for_lambda())
}

fn build(
    status: StatusCode,
    headers: HeaderMap,
    body: impl Into<ResponseBody>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// A JSON error body: `{"error": {"status": 502, "code": "...", "message": "..."}}`.
pub fn json_error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "error": { "status": status.as_u16(), "code": code.as_str(), "message": message } });
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
