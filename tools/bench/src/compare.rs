//! `cachegate bench --compare`: one synthetic upstream, then for each
//! backend a proxy built from the usual configuration (backend and upstream
//! overridden) served by [`cachegate::serve::router`] on a loopback port, so the
//! measured path is the real one: HTTP in, proxy, cache, HTTP out.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use serde::Serialize;

use crate::load::{self, Report, Stop, Workload};
use crate::BenchArgs;
use cachegate::config::Mode;
use cachegate::config::{BackendKind, Config};
use cachegate::resolved::ResolvedConfig;

/// Body size of every synthetic upstream answer.
pub const BODY_BYTES: usize = 1024;

/// An upstream on loopback answering every GET after `latency` with a
/// 1 KB JSON body naming the path, cacheable for an hour.
pub struct SyntheticUpstream {
    pub url: String,
    /// Requests it has answered.
    pub calls: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

struct UpstreamState {
    latency: Duration,
    calls: Arc<AtomicU64>,
}

/// `{"path": ..., "pad": "xxx..."}` of exactly [`BODY_BYTES`] bytes.
pub fn body_for(path: &str) -> String {
    let base = serde_json::json!({ "path": path, "pad": "" }).to_string();
    let pad = "x".repeat(BODY_BYTES.saturating_sub(base.len()));
    serde_json::json!({ "path": path, "pad": pad }).to_string()
}

async fn answer(
    State(state): State<Arc<UpstreamState>>,
    uri: http::Uri,
) -> http::Response<axum::body::Body> {
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    state.calls.fetch_add(1, Ordering::Relaxed);
    http::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "public, max-age=3600")
        .body(axum::body::Body::from(body_for(uri.path())))
        .expect("static response parts")
}

impl SyntheticUpstream {
    pub async fn start(latency: Duration) -> Result<SyntheticUpstream, String> {
        let calls = Arc::new(AtomicU64::new(0));
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(Arc::new(UpstreamState {
                latency,
                calls: calls.clone(),
            }));
        let (addr, shutdown, task) = serve_loopback(app).await?;
        Ok(SyntheticUpstream {
            url: format!("http://{addr}"),
            calls,
            shutdown: Some(shutdown),
            task,
        })
    }

    pub async fn stop(mut self) {
        stop_server(self.shutdown.take(), &mut self.task).await;
    }
}

/// A running loopback server: its address, its shutdown switch, its task.
type Running = (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

/// Serve on a free loopback port with `run(listener, shutdown)`.
async fn on_loopback<F, Fut>(run: F) -> Result<Running, String>
where
    F: FnOnce(tokio::net::TcpListener, tokio::sync::oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(listener, rx));
    Ok((addr, tx, task))
}

async fn serve_loopback(app: axum::Router) -> Result<Running, String> {
    on_loopback(|listener, rx| async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    })
    .await
}

/// The proxy on a loopback port through the same HTTP server `cachegate
/// serve` runs (head limits, timeouts, TCP_NODELAY).
async fn serve_proxy_loopback(
    proxy: Arc<cachegate::proxy::Proxy>,
    config: &Config,
) -> Result<Running, String> {
    let serve = config.serve.clone();
    let app = cachegate::serve::router(proxy, &serve);
    on_loopback(|listener, rx| async move {
        cachegate::serve::serve_http1(listener, app, &serve, async {
            let _ = rx.await;
        })
        .await;
    })
    .await
}

/// Graceful stop, bounded: idle keep-alive connections must not hold it up.
async fn stop_server(
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: &mut tokio::task::JoinHandle<()>,
) {
    if let Some(tx) = shutdown {
        let _ = tx.send(());
    }
    if tokio::time::timeout(Duration::from_secs(2), &mut *task)
        .await
        .is_err()
    {
        task.abort();
    }
}

/// One backend's results.
#[derive(Debug, Serialize)]
pub struct BackendRun {
    pub backend: &'static str,
    /// Upstream calls while warming (one per key unless already cached).
    pub upstream_calls_warm: u64,
    /// Upstream calls while measuring (0 when every key stayed cached).
    pub upstream_calls_measure: u64,
    pub warm: Report,
    pub report: Report,
}

/// The whole comparison, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub upstream_latency_ms: f64,
    pub body_bytes: usize,
    pub keys: usize,
    pub concurrency: usize,
    pub l1: bool,
    pub chart: String,
    pub backends: Vec<BackendRun>,
}

/// The configuration for one backend: the usual layers, with the backend
/// and upstream replaced and (unless `keep_l1`) the L1 off.
fn backend_config(
    config_file: Option<&Path>,
    backend: BackendKind,
    upstream_url: &str,
    keep_l1: bool,
) -> Result<ResolvedConfig, String> {
    let mut fig = Config::figment(config_file)
        .map_err(|e| e.to_string())?
        .merge(("backend", backend.as_str()))
        .merge(("upstream.url", upstream_url));
    if !keep_l1 {
        fig = fig.merge(("cache.l1_ttl", "0s"));
    }
    ResolvedConfig::from_figment(fig)
        .map_err(|e| format!("{} configuration: {e}", backend.as_str()))
}

pub async fn run(
    args: &BenchArgs,
    backends: &[BackendKind],
    config_file: Option<&Path>,
) -> Result<(), String> {
    if backends.is_empty() {
        return Err("--compare: name at least one backend".into());
    }
    let keys = args.keys.unwrap_or(100);
    if keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    let upstream = SyntheticUpstream::start(args.upstream_latency).await?;
    // A fresh path prefix per run: a shared backend may hold a previous run's entries.
    let run_id = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );
    let mut runs = Vec::new();
    let mut failure = None;
    for &backend in backends {
        match run_backend(args, backend, config_file, &upstream, &run_id, keys).await {
            Ok(r) => runs.push(r),
            Err(e) => {
                failure = Some(format!("--compare {}: {e}", backend.as_str()));
                break;
            }
        }
    }
    upstream.stop().await;
    if let Some(e) = failure {
        return Err(e);
    }

    let chart_path = args.chart.display().to_string();
    // Runs without a hit are left out of the chart.
    let hits: Vec<(&str, &hdrhistogram::Histogram<u64>)> = runs
        .iter()
        .filter_map(|r| r.report.histograms.get("HIT").map(|h| (r.backend, h)))
        .collect();
    crate::chart::write_svg(&args.chart, &hits, args.upstream_latency)?;
    let comparison = Comparison {
        upstream_latency_ms: args.upstream_latency.as_secs_f64() * 1000.0,
        body_bytes: BODY_BYTES,
        keys,
        concurrency: args.concurrency,
        l1: args.l1,
        chart: chart_path,
        backends: runs,
    };
    crate::print_report(&render(&comparison), &comparison, args.json)
}

async fn run_backend(
    args: &BenchArgs,
    backend: BackendKind,
    config_file: Option<&Path>,
    upstream: &SyntheticUpstream,
    run_id: &str,
    keys: usize,
) -> Result<BackendRun, String> {
    let config = backend_config(config_file, backend, &upstream.url, args.l1)?;
    if backend != BackendKind::Memory {
        // Fails loudly when the backend is unreachable; the proxy itself
        // would start without it and the comparison would measure misses.
        cachegate::backend::init(&config)
            .await
            .map_err(|e| e.to_string())?;
    }
    let proxy = cachegate::build_proxy(&config, Mode::Serve)
        .await
        .map_err(|e| e.to_string())?;
    let (addr, shutdown, mut task) = serve_proxy_loopback(proxy, &config).await?;

    let urls = (0..keys)
        .map(|i| {
            reqwest::Url::parse(&format!(
                "http://{addr}/bench/{run_id}/{}/{i}",
                backend.as_str()
            ))
            .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let base = args.workload(urls)?;
    let result = async {
        let before = upstream.calls.load(Ordering::Relaxed);
        let warm = load::run(&Workload {
            stop: Stop::Requests(keys as u64),
            concurrency: base.concurrency.min(keys),
            progress: false,
            ..base.clone()
        })
        .await?;
        if warm.responses != keys as u64 {
            return Err(format!(
                "warming: {} of {keys} keys answered (errors: {:?})",
                warm.responses, warm.errors
            ));
        }
        let warmed = upstream.calls.load(Ordering::Relaxed);
        let report = load::run(&base).await?;
        let after = upstream.calls.load(Ordering::Relaxed);
        Ok(BackendRun {
            backend: backend.as_str(),
            upstream_calls_warm: warmed - before,
            upstream_calls_measure: after - warmed,
            warm,
            report,
        })
    }
    .await;
    stop_server(Some(shutdown), &mut task).await;
    result
}

/// The side-by-side table.
pub fn render(c: &Comparison) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} keys of {} B, upstream latency {:.0} ms, concurrency {}, L1 {} (hit latencies in ms)",
        c.keys,
        c.body_bytes,
        c.upstream_latency_ms,
        c.concurrency,
        if c.l1 { "as configured" } else { "off" }
    );
    let _ = writeln!(
        out,
        "{:<9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7}",
        "backend", "req/s", "hit %", "p50", "p90", "p99", "max", "upstream", "errors"
    );
    for run in &c.backends {
        let r = &run.report;
        let hit = r.by_x_cache.get("HIT");
        let cell = |f: fn(&load::Latency) -> f64| {
            hit.map_or_else(|| "-".to_owned(), |l| format!("{:.3}", f(l)))
        };
        let _ = writeln!(
            out,
            "{:<9} {:>9.0} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7}",
            run.backend,
            r.throughput_rps,
            r.hit_ratio * 100.0,
            cell(|l| l.p50_ms),
            cell(|l| l.p90_ms),
            cell(|l| l.p99_ms),
            cell(|l| l.max_ms),
            run.upstream_calls_measure,
            r.error_count(),
        );
    }
    let _ = writeln!(out, "chart: {}", c.chart);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_body_is_one_kilobyte_of_json() {
        for path in ["/", "/bench/abc/memory/12345"] {
            let body = body_for(path);
            assert_eq!(body.len(), BODY_BYTES);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["path"], path);
        }
    }
}
