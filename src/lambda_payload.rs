//! What fits in a Lambda response: the payload rule, in one place. The
//! proxy checks it where it renders a request's outcome and before it
//! stores an entry (Lambda mode only); the adapter ([`crate::lambda`])
//! turns bodies into text or base64 by the same [`textual`] test.

use http::header::CONTENT_TYPE;
use http::HeaderMap;

/// Lambda's limit on a synchronous response payload: the JSON document
/// the runtime posts (status, headers, the body as text or base64).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// What the proxy adds to a stored entry's headers when it answers from
/// it (`Age`, `X-Cache`, `Cache-Status`, `Server-Timing`, the edge's
/// `Cache-Control` and cache tags, at most 50 of 256 bytes): an entry is
/// stored only with this much room left, so what is stored can be served.
pub const ANSWER_HEADERS_HEADROOM: usize = 16 * 1024;

/// The JSON fields around the body and headers (`statusCode`,
/// `isBase64Encoded`, `cookies`, the field names), generously.
pub(crate) const ENVELOPE_BYTES: usize = 256;

/// The size of the Lambda response payload for an answer with these
/// headers and body: the body as it goes out ([`crate::lambda::lambda_body`]: text
/// JSON-escaped, anything else base64), and every header twice (REST APIs
/// and ALBs get `headers` and `multiValueHeaders`), quoted and escaped.
/// The one place the payload rule lives: the proxy checks it where it
/// renders the outcome ([`crate::proxy`]), and before storing, in Lambda
/// mode; this adapter relays what the proxy answered.
pub fn payload_len(headers: &HeaderMap, body: &[u8]) -> usize {
    let body_len = if body.is_empty() {
        0
    } else if sent_as_text(headers, body) {
        json_escaped_len(body)
    } else {
        body.len().div_ceil(3) * 4
    };
    let headers_len: usize = headers
        .iter()
        // "name":"value", (and a list's brackets in multiValueHeaders)
        .map(|(n, v)| json_escaped_len(n.as_str().as_bytes()) + json_escaped_len(v.as_bytes()) + 8)
        .sum();
    ENVELOPE_BYTES + body_len + 2 * headers_len
}

/// Whether an answer with these headers and body can be returned through
/// Lambda.
pub fn fits(headers: &HeaderMap, body: &[u8]) -> bool {
    payload_len(headers, body) <= MAX_PAYLOAD_BYTES
}

/// Whether an entry with these stored headers and body could be served
/// through Lambda, with the headers an answer adds.
pub fn entry_fits(headers: &HeaderMap, body: &[u8]) -> bool {
    payload_len(headers, body) + ANSWER_HEADERS_HEADROOM <= MAX_PAYLOAD_BYTES
}

/// Bytes of `bytes` inside a JSON string as serde_json writes it: `"` and
/// `\` and the short control escapes take two, other control characters
/// six (`\u00XX`), everything else (UTF-8 included) itself.
fn json_escaped_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .map(|&b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
        + 2
}

/// Whether a body goes out as text: a textual content type and valid
/// UTF-8; anything else goes out base64.
fn sent_as_text(headers: &HeaderMap, body: &[u8]) -> bool {
    textual(headers) && std::str::from_utf8(body).is_ok()
}

/// Whether the content type is one that goes out as text.
pub fn textual(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.to_ascii_lowercase();
            ct.starts_with("text/")
                || ct.contains("json")
                || ct.contains("xml")
                || ct.contains("javascript")
        })
}
