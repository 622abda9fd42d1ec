//! The Lambda adapter: lambda_http events in, the same handler, responses out.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use lambda_http::request::LambdaRequest;
use lambda_http::{Body, LambdaEvent};

use lambda_http::lambda_runtime::LambdaInvocation;
use tokio_util::task::TaskTracker;

use crate::background::{Background, Finished, Waited};
use crate::lambda_payload::textual;
use crate::proxy::Proxy;
use crate::request::{GatewayProto, PeerAddr};
use crate::telemetry::RequestId;

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
    let textual = textual(resp.headers());
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

/// A response whose body is already in the form it goes out in
/// ([`lambda_body`]), handed to lambda_http as it is. lambda_http's own
/// `IntoResponse` for `Response<Body>` reads the body again by its
/// content type: a text type is decoded with its charset into UTF-8 (a
/// `charset=iso-8859-1` body would reach the client as UTF-8 still labelled
/// ISO-8859-1), and a response without `Content-Type` is decoded as UTF-8,
/// lossily (binary bytes would become U+FFFD). What the upstream said must
/// arrive byte for byte.
pub struct AsIs(pub Response<Body>);

impl lambda_http::IntoResponse for AsIs {
    fn into_response(
        self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>> {
        Box::pin(std::future::ready(self.0))
    }
}

/// The handler's request for a lambda_http request. The peer is the
/// source IP API Gateway saw (its `X-Forwarded-For` ends with it; what
/// lies left of it is whatever the client wrote); behind an ALB, which
/// has no source IP field, the last `X-Forwarded-For` entry, which the ALB
/// appended. The hop in front sets `X-Forwarded-Proto` itself.
pub fn handler_request(req: lambda_http::Request) -> Request<Bytes> {
    use lambda_http::request::RequestContext;
    use lambda_http::RequestExt;
    let request_id = req
        .lambda_context_ref()
        .map(|c| RequestId(c.request_id.clone()));
    let source_ip = match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.http.source_ip.clone(),
        Some(RequestContext::ApiGatewayV1(ctx)) => ctx.identity.source_ip.clone(),
        Some(RequestContext::Alb(_)) => req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .map(|s| s.trim().to_owned()),
        _ => None,
    };
    let (mut parts, body) = req.into_parts();
    if let Some(id) = request_id {
        parts.extensions.insert(id);
    }
    if let Some(ip) = source_ip.and_then(|s| s.parse().ok()) {
        parts.extensions.insert(PeerAddr(ip));
    }
    parts.extensions.insert(GatewayProto);
    Request::from_parts(parts, body_bytes(body))
}

/// An invocation payload as the handler sees it, through the same steps as
/// [`run`]; `None` when it is no HTTP event. For the fuzz target and tests.
#[doc(hidden)]
pub fn parse_event(payload: &[u8]) -> Option<Request<Bytes>> {
    let mut event: LambdaRequest = serde_json::from_slice(payload).ok()?;
    make_convertible(&mut event);
    Some(handler_request(event.into()))
}

/// lambda_http turns an event into a request with `unwrap` and `expect` on
/// the way: it builds an absolute URI from `Host`, `X-Forwarded-Proto`, the
/// stage and the path, and decodes base64 bodies. A release build aborts on
/// panic, so one odd event would end the whole execution environment. What
/// would panic is repaired first. None of it reaches the cache key or the
/// upstream URL, which come from the path and query alone.
#[doc(hidden)]
pub fn make_convertible(event: &mut LambdaRequest) {
    match event {
        LambdaRequest::ApiGatewayV2(ag) => {
            let ctx = &mut ag.request_context;
            repair_authority(&mut ag.headers, &mut ctx.domain_name);
            repair_stage(&mut ctx.stage);
            repair_path(&mut ag.raw_path);
            if let Some(q) = &mut ag.raw_query_string {
                // Appended to the URI as it is.
                *q = crate::request::uri_safe_query(q);
            }
            repair_body(&mut ag.body, &mut ag.is_base64_encoded);
        }
        LambdaRequest::ApiGatewayV1(ag) => {
            let ctx = &mut ag.request_context;
            repair_authority(&mut ag.headers, &mut ctx.domain_name);
            repair_stage(&mut ctx.stage);
            repair_path(&mut ag.path);
            repair_query_map(&mut ag.query_string_parameters);
            repair_query_map(&mut ag.multi_value_query_string_parameters);
            repair_body(&mut ag.body, &mut ag.is_base64_encoded);
        }
        LambdaRequest::Alb(alb) => {
            repair_authority(&mut alb.headers, &mut None);
            repair_path(&mut alb.path);
            repair_query_map(&mut alb.query_string_parameters);
            repair_query_map(&mut alb.multi_value_query_string_parameters);
            repair_body(&mut alb.body, &mut alb.is_base64_encoded);
        }
        _ => {}
    }
}

/// Drop a `Host`, domain name or `X-Forwarded-Proto` that does not make a
/// URL: only lambda_http's URI uses them (the upstream is configured).
fn repair_authority(headers: &mut http::HeaderMap, domain_name: &mut Option<String>) {
    let proto_ok = headers
        .get(X_FORWARDED_PROTO)
        .is_none_or(|p| p == "http" || p == "https");
    if !proto_ok {
        headers.remove(X_FORWARDED_PROTO);
    }
    let makes_url = |host: &str| {
        host.parse::<http::uri::Authority>().is_ok()
            && reqwest::Url::parse(&format!("https://{host}/")).is_ok()
    };
    let host_ok = headers
        .get(http::header::HOST)
        .is_none_or(|h| h.to_str().is_ok_and(makes_url));
    if !host_ok {
        headers.remove(http::header::HOST);
    }
    if domain_name.as_deref().is_some_and(|d| !makes_url(d)) {
        *domain_name = None;
    }
}

/// API Gateway stage names are letters, digits, `-`, `_` (and `$default`).
fn repair_stage(stage: &mut Option<String>) {
    let valid = |s: &str| {
        s == "$default"
            || (!s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    };
    if stage.as_deref().is_some_and(|s| !valid(s)) {
        *stage = None;
    }
}

/// A path must start with `/`, or it would run into the authority.
fn repair_path(path: &mut Option<String>) {
    if let Some(p) = path {
        if !p.starts_with('/') {
            p.insert(0, '/');
        }
    }
}

/// A query parameter with an empty list of values (`"a": []` in an
/// event's `multiValueQueryStringParameters`, which the deserializer
/// accepts) makes `query_map`'s iterator index past the end when
/// lambda_http writes the query string (found by the `lambda_event` fuzz
/// target). Such a parameter has no value to send and is dropped; a map
/// without one is left as it is. The map's only view of its lists is its
/// serialized form.
fn repair_query_map(map: &mut lambda_http::aws_lambda_events::query_map::QueryMap) {
    use std::collections::HashMap;
    if map.is_empty() {
        return;
    }
    let Ok(mut lists) = serde_json::to_value(&*map)
        .and_then(serde_json::from_value::<HashMap<String, Vec<String>>>)
    else {
        return;
    };
    if lists.values().all(|values| !values.is_empty()) {
        return;
    }
    lists.retain(|_, values| !values.is_empty());
    *map = lists.into();
}

/// A body marked base64 that is not base64 is passed on as sent.
fn repair_body(body: &mut Option<String>, is_base64: &mut bool) {
    use base64::Engine;
    if *is_base64
        && body
            .as_deref()
            .is_some_and(|b| base64::engine::general_purpose::STANDARD.decode(b).is_err())
    {
        *is_base64 = false;
    }
}

const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");

/// Repairs each event before lambda_http's adapter converts it.
struct Convertible<S>(S);

impl<S> lambda_http::Service<LambdaEvent<LambdaRequest>> for Convertible<S>
where
    S: lambda_http::Service<LambdaEvent<LambdaRequest>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut event: LambdaEvent<LambdaRequest>) -> Self::Future {
        make_convertible(&mut event.payload);
        self.0.call(event)
    }
}

/// One Lambda invocation through the proxy. An answer too large for a
/// Lambda payload was already replaced, logged and counted by the proxy.
pub async fn invoke(proxy: &Arc<Proxy>, req: lambda_http::Request) -> Response<Body> {
    lambda_body(proxy.handle(handler_request(req)).await)
}

/// Run the Lambda runtime loop until the environment ends it; with the
/// after-response extension beside it when it registered.
pub async fn run(
    proxy: Arc<Proxy>,
    extension: Option<AfterResponseExtension>,
) -> Result<(), lambda_http::Error> {
    use lambda_http::lambda_runtime::{layers::TracingLayer, Runtime};
    // lambda_http::run with the repair step in front of its adapter.
    let handler = lambda_http::service_fn(move |req: lambda_http::Request| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(AsIs(invoke(&proxy, req).await)) }
    });
    let runtime =
        Runtime::new(Convertible(lambda_http::Adapter::from(handler))).layer(TracingLayer::new());
    match extension {
        None => runtime.run().await,
        Some(AfterResponseExtension {
            events, finished, ..
        }) => {
            // Outermost: its inner service has posted the response when it
            // returns, whatever the event was.
            let runtime = runtime.layer(tower::layer::layer_fn(move |inner| ReportFinished {
                inner,
                finished: finished.clone(),
            }));
            tokio::try_join!(runtime.run(), events).map(|_| ())
        }
    }
}

/// The internal extension that holds each invocation open until the work
/// it left after its response has ended ([`crate::background`]).
pub struct AfterResponseExtension {
    /// The extension's event loop, run beside the runtime's.
    events: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), lambda_http::Error>>>>,
    finished: Finished,
    tracker: TaskTracker,
}

/// The name the extension registers under (Lambda logs it at start-up).
const EXTENSION_NAME: &str = "cachegate-after-response";

/// A Runtime API that never answers the registration must not hold the
/// start-up; cachegate then runs without the extension.
const REGISTER_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

impl AfterResponseExtension {
    /// Register with the Lambda Extensions API (during init, before the
    /// runtime asks for its first event). `None`, with a warning, when it
    /// cannot: stale-while-revalidate refreshes then run inline and
    /// refresh-ahead is off.
    pub async fn register() -> Option<AfterResponseExtension> {
        let (tracker, finished, waiter) = crate::background::after_response();
        let waiter = Arc::new(tokio::sync::Mutex::new(waiter));
        let processor = lambda_extension::service_fn(
            move |event: lambda_extension::LambdaEvent| {
                let waiter = waiter.clone();
                async move {
                    if let lambda_extension::NextEvent::Invoke(invoke) = event.next {
                        let started = std::time::Instant::now();
                        let deadline =
                            crate::background::deadline_from_epoch_ms(invoke.deadline_ms);
                        let waited = waiter.lock().await.wait(&invoke.request_id, deadline).await;
                        match waited {
                            Waited::Done => tracing::debug!(
                                request_id = %invoke.request_id,
                                held_ms = started.elapsed().as_millis() as u64,
                                "invocation complete: its response and the work after it are done"
                            ),
                            Waited::Deadline => tracing::warn!(
                                request_id = %invoke.request_id,
                                deadline_ms = invoke.deadline_ms,
                                "work after the response was still running at the invocation's deadline"
                            ),
                        }
                    }
                    Ok::<(), lambda_extension::Error>(())
                }
            },
        );
        let registering = lambda_extension::Extension::new()
            .with_events(&["INVOKE"])
            .with_events_processor(processor)
            .with_extension_name(EXTENSION_NAME)
            .register();
        match tokio::time::timeout(REGISTER_LIMIT, registering).await {
            Ok(Ok(registered)) => Some(AfterResponseExtension {
                events: Box::pin(registered.run()),
                finished,
                tracker,
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the after-response extension could not register; refreshes run inline");
                None
            }
            Err(_) => {
                tracing::warn!("the Extensions API did not answer the registration within {REGISTER_LIMIT:?}; refreshes run inline");
                None
            }
        }
    }

    /// How the proxy runs work after a response with this extension.
    pub fn background(&self) -> Background {
        Background::AfterResponse(self.tracker.clone())
    }
}

/// Tells the extension when the runtime has posted an invocation's response.
struct ReportFinished<S> {
    inner: S,
    finished: Finished,
}

impl<S> lambda_http::Service<LambdaInvocation> for ReportFinished<S>
where
    S: lambda_http::Service<LambdaInvocation, Response = (), Error = lambda_http::Error>,
    S::Future: 'static,
{
    type Response = ();
    type Error = lambda_http::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Self::Error>>>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        let request_id = invocation.context.request_id.clone();
        let finished = self.finished.clone();
        let posted = self.inner.call(invocation);
        Box::pin(async move {
            let result = posted.await;
            finished.report(&request_id);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lambda_payload::{entry_fits, fits, payload_len, ENVELOPE_BYTES, MAX_PAYLOAD_BYTES};
    use http::header::CONTENT_TYPE;

    /// An API Gateway HTTP API (v2) event for `GET /items/1?a=1`.
    fn v2(headers: &str) -> String {
        format!(
            r#"{{"version":"2.0","rawPath":"/items/1","rawQueryString":"a=1",
                "headers":{{{headers}}},"isBase64Encoded":false,
                "requestContext":{{"http":{{"method":"GET","path":"/items/1",
                "protocol":"HTTP/1.1","sourceIp":"192.0.2.1"}},"stage":"$default",
                "domainName":"api.example.net"}}}}"#
        )
    }

    fn base64_body(event: &str, body: &str) -> String {
        event.replace(
            r#""isBase64Encoded":false"#,
            &format!(r#""isBase64Encoded":true,"body":"{body}""#),
        )
    }

    fn parse(event: &str) -> Request<Bytes> {
        parse_event(event.as_bytes()).expect("an HTTP event")
    }

    /// Each of these panicked inside lambda_http's conversion (first found
    /// by the `lambda_event` fuzz target: a `Host` with `>`).
    #[test]
    fn events_lambda_http_would_panic_on_are_repaired() {
        for host in ["lb.example>net", "a b", "x:99999", "[::1", ""] {
            let req = parse(&v2(&format!(r#""host":"{host}""#)));
            assert_eq!(req.uri().path(), "/items/1", "host {host:?}");
            assert!(req.headers().get("host").is_none(), "host {host:?} kept");
        }
        let req = parse(&v2(r#""x-forwarded-proto":"ht tp""#));
        assert_eq!(req.uri().path(), "/items/1");
        let req = parse(&base64_body(&v2(""), "not base64!"));
        assert_eq!(req.body(), &Bytes::from_static(b"not base64!"));
        let odd_query = r#""rawQueryString":"q=a b&x=\"<é>\"""#;
        let req = parse(&v2("").replace(r#""rawQueryString":"a=1""#, odd_query));
        assert_eq!(
            crate::key::canonical_query(req.uri().query().unwrap(), Default::default()).as_deref(),
            Some("q=a%20b&x=%22%3C%C3%A9%3E%22"),
            "the key reads the query as sent"
        );
        let req = parse(&v2("").replace(r#""rawPath":"/items/1""#, r#""rawPath":":1""#));
        assert_eq!(req.uri().path(), "/:1");
        let req = parse(&v2("").replace(r#""stage":"$default""#, r#""stage":"a#b""#));
        assert_eq!(req.uri().path(), "/items/1");
        let alb = r#"{"requestContext":{"elb":{"targetGroupArn":"arn"}},"httpMethod":"GET",
            "path":"x","headers":{"host":"a b"},"isBase64Encoded":true,"body":"%%"}"#;
        let req = parse(alb);
        assert_eq!(req.uri().path(), "/x");
        assert_eq!(req.body(), &Bytes::from_static(b"%%"));

        // A parameter with no values (the `lambda_event` fuzz target's
        // find: an ALB event, `"cookies": []` among its parameters).
        for (event, field) in [
            (
                r#"{"requestContext":{"elb":{"targetGroupArn":"arn"}},"httpMethod":"GET","path":"/x","#,
                "queryStringParameters",
            ),
            (
                r#"{"requestContext":{"elb":{"targetGroupArn":"arn"}},"httpMethod":"GET","path":"/x","#,
                "multiValueQueryStringParameters",
            ),
            (
                r#"{"resource":"/x","requestContext":{"accountId":"1","resourceId":"r","stage":"prod",
                "requestId":"i","identity":{"sourceIp":"192.0.2.1"},"resourcePath":"/x",
                "httpMethod":"GET","apiId":"a"},"httpMethod":"GET","path":"/x","headers":{},"#,
                "multiValueQueryStringParameters",
            ),
        ] {
            let event =
                format!(r#"{event}"{field}":{{"a":["1"],"none":[],"b":["2","3"]}},"body":null}}"#);
            let req = parse_event(event.as_bytes())
                .unwrap_or_else(|| panic!("not an HTTP event: {event}"));
            let mut pairs: Vec<String> = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .map(str::to_owned)
                .collect();
            pairs.sort();
            assert_eq!(pairs, ["a=1", "b=2", "b=3"], "{field} in {event}");
        }
    }

    /// The payloads lambda_http posts for `resp` (built as its
    /// `LambdaResponse::from_response` builds them): an HTTP API's, and an
    /// ALB's, which carries every header twice.
    fn posted_payloads(resp: Response<Bytes>) -> [usize; 2] {
        use lambda_http::aws_lambda_events::alb::AlbTargetGroupResponse;
        use lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpResponse;
        let resp = lambda_body(resp);
        let (parts, body) = resp.into_parts();
        let (base64, body) = match body {
            Body::Empty => (false, None),
            b @ Body::Text(_) => (false, Some(b)),
            b => (true, Some(b)),
        };
        let mut v2 = ApiGatewayV2httpResponse::default();
        v2.status_code = parts.status.as_u16().into();
        v2.headers = parts.headers.clone();
        v2.body = body.clone();
        v2.is_base64_encoded = base64;
        let mut alb = AlbTargetGroupResponse::default();
        alb.status_code = parts.status.as_u16().into();
        alb.status_description = Some("200 OK".into());
        alb.headers = parts.headers.clone();
        alb.multi_value_headers = parts.headers;
        alb.body = body;
        alb.is_base64_encoded = base64;
        [
            serde_json::to_vec(&v2).unwrap().len(),
            serde_json::to_vec(&alb).unwrap().len(),
        ]
    }

    fn response(content_type: &str, body: Vec<u8>) -> Response<Bytes> {
        let mut resp = Response::new(Bytes::from(body));
        resp.headers_mut()
            .insert(CONTENT_TYPE, content_type.parse().unwrap());
        resp.headers_mut()
            .insert("etag", "\"quoted \\ value\"".parse().unwrap());
        resp
    }

    #[test]
    fn the_payload_rule_bounds_what_lambda_http_posts_closely() {
        let cases = [
            response(
                "application/octet-stream",
                (0..=255).cycle().take(100_000).collect(),
            ),
            response(
                "application/json",
                br#"{"a":"line\nbreak \"q\""}"#.repeat(5_000),
            ),
            response("text/plain", "é\u{1}\t".repeat(10_000).into_bytes()),
            // Labelled text, not UTF-8: goes out base64.
            response("text/plain", vec![0xff; 30_000]),
            response("application/json", Vec::new()),
        ];
        for resp in cases {
            let computed = payload_len(resp.headers(), resp.body());
            for posted in posted_payloads(resp.clone()) {
                assert!(computed >= posted, "{computed} < {posted}");
                assert!(
                    computed - posted <= ENVELOPE_BYTES + 64,
                    "{computed} vs {posted}"
                );
            }
        }
    }

    #[test]
    fn binary_bodies_count_as_base64_and_text_as_itself() {
        let binary = response("image/png", vec![0; 4_800_000]);
        assert!(!fits(binary.headers(), binary.body()), "6.4 MB in base64");
        let text = response("application/json", vec![b'a'; 4_700_000]);
        assert!(fits(text.headers(), text.body()));
        let text = response("text/plain", vec![b'a'; 1]);
        let edge = MAX_PAYLOAD_BYTES - payload_len(text.headers(), &[]) - 2;
        let text = response("text/plain", vec![b'a'; edge]);
        assert!(fits(text.headers(), text.body()));
        assert!(
            !entry_fits(text.headers(), text.body()),
            "no room for the answer's headers"
        );
        let text = response("text/plain", vec![b'a'; edge + 1]);
        assert!(!fits(text.headers(), text.body()));
    }

    #[test]
    fn ordinary_events_are_left_alone() {
        let event = v2(r#""host":"api.example.net","x-forwarded-proto":"https""#);
        let req = parse(&base64_body(&event, "AAEC/w=="));
        assert_eq!(req.uri().to_string(), "https://api.example.net/items/1?a=1");
        assert_eq!(req.headers()["host"], "api.example.net");
        assert_eq!(req.body(), &Bytes::from_static(&[0, 1, 2, 0xff]));
        assert!(parse_event(b"{\"source\":\"aws.events\"}").is_none());
    }
}
