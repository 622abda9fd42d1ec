//! `cachegate serve`: the handler as a plain HTTP server (axum on hyper).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use http::{Request, Response, StatusCode};

use crate::config::ServeConfig;
use crate::error_code::ErrorCode;
use crate::invalidate::{self, PurgeError, PurgeRequest};
use crate::proxy::{json_error, Proxy, ResponseBody};
use crate::request::PeerAddr;
use crate::telemetry::RequestId;

struct ServeState {
    proxy: Arc<Proxy>,
    max_request_bytes: usize,
    max_uri_bytes: usize,
    body_read_timeout: std::time::Duration,
    purge_token: Option<String>,
}

/// The one path serve mode keeps for itself, and only when a purge token is configured.
pub const PURGE_PATH: &str = "/_cachegate/purge";

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn purge(
    proxy: &Proxy,
    method: &http::Method,
    headers: &http::HeaderMap,
    body: &[u8],
    token: &str,
) -> Response<bytes::Bytes> {
    let authorised = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|t| token_matches(t, token.as_bytes()));
    if !authorised {
        // Indistinguishable from a path that does not exist.
        return json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such endpoint",
        );
    }
    if method != http::Method::POST {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            "use POST",
        );
    }
    let report = match PurgeRequest::from_json(body) {
        // Batched with the other purges of the window (crate::edge).
        Ok(request) => {
            invalidate::purge_with(proxy, &request, crate::edge::Dispatch::Background).await
        }
        Err(e) => Err(e),
    };
    match report {
        Ok(report) => {
            let mut resp = Response::new(bytes::Bytes::from(
                serde_json::to_string(&report).expect("a report serialises"),
            ));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e @ PurgeError::Invalid(_)) => json_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadPurgeRequest,
            &e.to_string(),
        ),
        Err(e @ PurgeError::Edge { .. }) => json_error(
            StatusCode::BAD_GATEWAY,
            ErrorCode::EdgeInvalidationFailed,
            &e.to_string(),
        ),
        Err(e @ PurgeError::Store { .. }) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::PurgeFailed,
            &e.to_string(),
        ),
    }
}

async fn handle(State(state): State<Arc<ServeState>>, req: Request<Body>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    // A caller's request id ties our log line to theirs; bounded and
    // printable so it cannot flood or forge log lines.
    if let Some(id) = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
    {
        let id = RequestId(id.to_owned());
        parts.extensions.insert(id);
    }
    let target_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target_len > state.max_uri_bytes {
        return json_error(
            StatusCode::URI_TOO_LONG,
            ErrorCode::UriTooLong,
            &format!("request target exceeds {} bytes", state.max_uri_bytes),
        )
        .map(Body::from);
    }
    // A total bound, not an idle one: a body trickled a byte at a time
    // would reset an idle timer forever.
    let read = tokio::time::timeout(
        state.body_read_timeout,
        axum::body::to_bytes(body, state.max_request_bytes),
    );
    let body = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::RequestTooLarge,
                &format!("request body exceeds {} bytes", state.max_request_bytes),
            )
            .map(Body::from)
        }
        Err(_) => {
            let mut resp = json_error(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::RequestBodyTimeout,
                &format!(
                    "request body not received within {:?}",
                    state.body_read_timeout
                ),
            );
            // The rest of the body may still be on its way: the connection
            // cannot carry another request.
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return resp.map(Body::from);
        }
    };
    if let Some(token) = &state.purge_token {
        if parts.uri.path() == PURGE_PATH {
            return purge(&state.proxy, &parts.method, &parts.headers, &body, token)
                .await
                .map(Body::from);
        }
    }
    state
        .proxy
        .respond(Request::from_parts(parts, body))
        .await
        .map(|body| match body {
            ResponseBody::Full(b) => Body::from(b),
            ResponseBody::Streaming(s) => Body::from_stream(s),
        })
}

/// The router serving every path through the proxy.
pub fn router(proxy: Arc<Proxy>, serve: &ServeConfig) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .with_state(Arc::new(ServeState {
            proxy,
            max_request_bytes: serve.max_request_bytes.as_u64() as usize,
            max_uri_bytes: serve.max_uri_bytes.as_u64() as usize,
            body_read_timeout: serve.body_read_timeout,
            purge_token: serve.purge_token.clone(),
        }))
}

/// Serve on `listen` until SIGINT/SIGTERM, then finish in-flight requests.
pub async fn run(
    proxy: Arc<Proxy>,
    listen: SocketAddr,
    serve: &ServeConfig,
    metrics_listen: Option<SocketAddr>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    if let Some(metrics_addr) = metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(metrics_addr).await?;
        let metrics_addr = metrics_listener.local_addr()?;
        tracing::info!(%metrics_addr, "prometheus metrics at /metrics");
        let app = metrics_router(proxy.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics_listener, app).await {
                tracing::error!(error = %e, "metrics listener stopped");
            }
        });
    }
    tracing::info!(%addr, backend = proxy.cache().backend_name(), "cachegate serving");
    // A line on stdout that scripts and tests can wait for.
    // Not println!: a closed stdout must not stop the server.
    let _ = std::io::Write::write_all(
        &mut std::io::stdout(),
        format!("cachegate listening on http://{addr}\n").as_bytes(),
    );
    serve_http1(listener, router(proxy, serve), serve, shutdown_signal()).await;
    Ok(())
}

/// `GET /metrics` in the Prometheus text format, on its own listener so
/// proxied clients never reach it.
fn metrics_router(proxy: Arc<Proxy>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let proxy = proxy.clone();
            async move {
                let text = proxy.prometheus_text().unwrap_or_default();
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    )
}

/// HTTP/1.1 on `listener` with the head limits and timeouts of `serve`
/// (`axum::serve` sets no header read timeout at all), until `shutdown`;
/// then in-flight requests finish.
pub async fn serve_http1(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    serve: &ServeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(serve.header_read_timeout)
        .max_header_size(serve.max_header_bytes.as_u64() as usize)
        .max_headers(serve.max_headers)
        // hyper queues up to ~400 KB of a response per connection by
        // default; a client that stops reading would hold that much. A
        // buffer the size of the largest request head is enough to read
        // heads and to keep a connection's writes flowing.
        .max_buf_size((serve.max_header_bytes.as_u64() as usize).max(16 * 1024));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead
                    // of spinning; the listener itself is still good.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let stream = SendTimeout::new(stream, serve.send_timeout);
        // The TCP peer, for the forwarding headers the proxy sets.
        let peer = PeerAddr(peer.ip().to_canonical());
        let app = tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer);
                req
            },
        );
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A client connection whose writes may wait at most `limit` for the
/// client to take bytes (`serve.send_timeout`): then the write fails and
/// hyper closes the connection. A client that stops reading a streamed
/// response holds its socket buffers for that long, no more.
struct SendTimeout<S> {
    inner: S,
    limit: std::time::Duration,
    /// Armed while a write is waiting.
    waiting: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendTimeout<S> {
    fn new(inner: S, limit: std::time::Duration) -> Self {
        SendTimeout {
            inner,
            limit,
            waiting: None,
        }
    }

    /// What a write returned: progress disarms the timer; `Pending` arms
    /// it and fails once it has waited `limit`.
    fn timed<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let sleep = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client took no bytes within serve.send_timeout",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Largest write of several slices copied into one ([`SendTimeout`]'s
/// `poll_write_vectored`).
const COALESCED_WRITE_MAX: usize = 4096;

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.timed(cx, polled)
    }

    /// hyper hands a response over as its head and its body, two slices.
    /// A small response goes out as one contiguous write instead: for a
    /// 1 KB hit that was 3 % more requests a second, and at 64 KB a copy
    /// would cost more than the vectored write saves (docs/benchmarks.md,
    /// "The server side").
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if bufs.len() > 1 && total <= COALESCED_WRITE_MAX {
            // One buffer per worker thread, reused: a zeroed array on the
            // stack cost a 4 KB memset a response (a twelfth of a 1 KB
            // hit's instructions), a buffer per connection would hold
            // memory for every idle keep-alive client.
            thread_local! {
                static FLAT: std::cell::RefCell<Vec<u8>> =
                    std::cell::RefCell::new(Vec::with_capacity(COALESCED_WRITE_MAX));
            }
            let polled = FLAT.with_borrow_mut(|flat| {
                flat.clear();
                for b in bufs {
                    flat.extend_from_slice(b);
                }
                Pin::new(&mut self.inner).poll_write(cx, flat)
            });
            return self.timed(cx, polled);
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.timed(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Takes at most `per_call` bytes a write and notes how each came.
    struct Recorder {
        got: Vec<u8>,
        calls: Vec<(&'static str, usize)>,
        per_call: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.per_call);
            self.got.extend_from_slice(&buf[..n]);
            self.calls.push(("write", n));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.per_call - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
            }
            self.calls.push(("vectored", n));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes `parts` as hyper does: vectored, again from where a short
    /// write stopped. What the recorder got, and how.
    async fn send(parts: &[&[u8]], per_call: usize) -> (Vec<u8>, Vec<(&'static str, usize)>) {
        let recorder = Recorder {
            got: Vec::new(),
            calls: Vec::new(),
            per_call,
        };
        let mut w = SendTimeout::new(recorder, std::time::Duration::from_secs(10));
        let whole: Vec<u8> = parts.concat();
        let mut sent = 0;
        while sent < whole.len() {
            // The rest, still in the parts' own slices.
            let mut skip = sent;
            let mut rest = Vec::new();
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                rest.push(std::io::IoSlice::new(&p[skip..]));
                skip = 0;
            }
            sent += w.write_vectored(&rest).await.unwrap();
        }
        (w.inner.got, w.inner.calls)
    }

    #[tokio::test]
    async fn a_small_response_goes_out_in_one_write_a_large_one_vectored() {
        let head: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\n\r\n";
        let small = vec![b's'; 1024];
        let (got, calls) = send(&[head, &small], usize::MAX).await;
        assert_eq!(got, [head, &small[..]].concat());
        assert_eq!(calls, vec![("write", head.len() + small.len())]);

        let large = vec![b'l'; 64 * 1024];
        let (got, calls) = send(&[head, &large], usize::MAX).await;
        assert_eq!(got, [head, &large[..]].concat());
        assert_eq!(calls, vec![("vectored", head.len() + large.len())]);

        // Short writes: every byte once, in order (once the head is out,
        // what is left is one slice, written as it is).
        let (got, calls) = send(&[head, &small], 100).await;
        assert_eq!(got, [head, &small[..]].concat());
        assert_eq!(calls[0], ("write", 100));
        assert!(calls.iter().all(|(_, n)| *n <= 100), "{calls:?}");
    }
}
