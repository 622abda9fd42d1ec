//! The Lambda adapter: lambda_http events in, the same handler, responses out.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use lambda_http::Body;

use crate::proxy::{json_error, Proxy};
use crate::telemetry::RequestId;

/// Lambda's synchronous response payload limit is 6 MB, base64 and JSON
/// envelope included; leave room for them.
pub const MAX_LAMBDA_BODY_BYTES: usize = 6 * 1024 * 1024 * 3 / 4 - 16 * 1024;

/// Convert a lambda_http request body to bytes (binary bodies arrive
/// already base64-decoded by lambda_http).
pub fn body_bytes(body: Body) -> Bytes {
    match body {
        Body::Empty => Bytes::new(),
        Body::Text(s) => Bytes::from(s),
        Body::Binary(b) => Bytes::from(b),
        _ => Bytes::new(),
    }
}

/// Text bodies go out as text; everything else base64 (lambda_http does
/// the encoding for `Body::Binary`).
pub fn lambda_body(resp: Response<Bytes>) -> Response<Body> {
    let textual = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.to_ascii_lowercase();
            ct.starts_with("text/")
                || ct.contains("json")
                || ct.contains("xml")
                || ct.contains("javascript")
        });
    let (parts, body) = resp.into_parts();
    let body = if body.is_empty() {
        Body::Empty
    } else if textual {
        match String::from_utf8(body.to_vec()) {
            Ok(s) => Body::Text(s),
            Err(e) => Body::Binary(e.into_bytes()),
        }
    } else {
        Body::Binary(body.to_vec())
    };
    Response::from_parts(parts, body)
}

/// The handler's request for a lambda_http request.
pub fn handler_request(req: lambda_http::Request) -> Request<Bytes> {
    use lambda_http::RequestExt;
    let request_id = req
        .lambda_context_ref()
        .map(|c| RequestId(c.request_id.clone()));
    let (mut parts, body) = req.into_parts();
    if let Some(id) = request_id {
        parts.extensions.insert(id);
    }
    Request::from_parts(parts, body_bytes(body))
}

/// An invocation payload as the handler sees it, through the same steps as
/// [`run`]; `None` when it is no HTTP event. For the fuzz target and tests.
#[doc(hidden)]
pub fn parse_event(payload: &[u8]) -> Option<Request<Bytes>> {
    let event: lambda_http::request::LambdaRequest = serde_json::from_slice(payload).ok()?;
    Some(handler_request(event.into()))
}

/// One Lambda invocation through the proxy.
pub async fn invoke(proxy: &Arc<Proxy>, req: lambda_http::Request) -> Response<Body> {
    let resp = proxy.handle(handler_request(req)).await;
    if resp.body().len() > MAX_LAMBDA_BODY_BYTES {
        return lambda_body(json_error(
            StatusCode::BAD_GATEWAY,
            "response_too_large_for_lambda",
            &format!(
                "the upstream response body ({} bytes) exceeds what a Lambda response can carry",
                resp.body().len()
            ),
        ));
    }
    lambda_body(resp)
}

/// Run the Lambda runtime loop until the environment ends it.
pub async fn run(proxy: Arc<Proxy>) -> Result<(), lambda_http::Error> {
    lambda_http::run(lambda_http::service_fn(move |req: lambda_http::Request| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(invoke(&proxy, req).await) }
    }))
    .await
}
