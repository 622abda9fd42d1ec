//! `cachegate serve`: the handler as a plain HTTP server (axum on hyper).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use http::{Request, Response, StatusCode};

use crate::proxy::{json_error, Proxy};

struct ServeState {
    proxy: Arc<Proxy>,
    max_request_bytes: usize,
}

async fn handle(State(state): State<Arc<ServeState>>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, state.max_request_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                &format!("request body exceeds {} bytes", state.max_request_bytes),
            )
            .map(Body::from)
        }
    };
    state
        .proxy
        .handle(Request::from_parts(parts, body))
        .await
        .map(Body::from)
}

/// The router serving every path through the proxy.
pub fn router(proxy: Arc<Proxy>, max_request_bytes: usize) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .with_state(Arc::new(ServeState {
            proxy,
            max_request_bytes,
        }))
}

/// Serve until SIGINT/SIGTERM, then finish in-flight requests.
pub async fn run(
    proxy: Arc<Proxy>,
    listen: SocketAddr,
    max_request_bytes: usize,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, backend = proxy.cache().backend_name(), "cachegate serving");
    // A line on stdout that scripts and tests can wait for.
    println!("cachegate listening on http://{addr}");
    axum::serve(listener, router(proxy, max_request_bytes))
        .with_graceful_shutdown(shutdown_signal())
        .await
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
