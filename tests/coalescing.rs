//! Coalescing never adds latency (#23 item 5), against a real loopback
//! upstream that counts the requests it has in flight: concurrent requests
//! for a key known to be uncacheable go upstream side by side
//! (hit-for-pass), and concurrent requests that time out share the one
//! upstream call's 504 instead of each waiting and calling again.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use http::HeaderMap;

use common::{cachegate, get, serve_on_loopback};

#[derive(Default)]
struct Counting {
    in_flight: AtomicUsize,
    most_at_once: AtomicUsize,
    calls: AtomicUsize,
}

/// Every answer takes `delay_ms` (query) and is `no-store` unless `cc`
/// says otherwise.
async fn slow(State(c): State<Arc<Counting>>, uri: http::Uri) -> (HeaderMap, String) {
    let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    c.most_at_once.fetch_max(now, Ordering::SeqCst);
    c.calls.fetch_add(1, Ordering::SeqCst);
    let q = uri.query().unwrap_or("");
    let param = |name: &str| {
        q.split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    let delay: u64 = param("delay_ms").and_then(|d| d.parse().ok()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    c.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut h = HeaderMap::new();
    h.insert(
        "cache-control",
        param("cc")
            .unwrap_or_else(|| "no-store".into())
            .replace("%3D", "=")
            .parse()
            .unwrap(),
    );
    (h, format!("{{\"path\":\"{}\"}}", uri.path()))
}

async fn counting_upstream() -> (String, Arc<Counting>, tokio::task::JoinHandle<()>) {
    let c = Arc::new(Counting::default());
    let app = axum::Router::new().fallback(slow).with_state(c.clone());
    let (url, task) = serve_on_loopback(app).await;
    (url, c, task)
}

async fn concurrently(url: &str, n: usize) -> Vec<common::Got> {
    // Spawned first, all of them, then awaited.
    let all: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    let mut out = Vec::new();
    for h in all {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_known_uncacheable_goes_upstream_side_by_side() {
    let (up, counting, _task) = counting_upstream().await;
    let cg = cachegate(&up, &[]);
    let url = format!("{}/private?delay_ms=600", cg.url);
    // The first answer shows the key is not storable.
    assert_eq!(get(&url).await.status, 200);
    counting.most_at_once.store(0, Ordering::SeqCst);
    let got = concurrently(&url, 4).await;
    assert!(got.iter().all(|g| g.status == 200));
    // All four were in flight at the upstream together: none waited for
    // another's answer first (which would take twice the upstream's time).
    assert_eq!(counting.most_at_once.load(Ordering::SeqCst), 4);
    assert_eq!(counting.calls.load(Ordering::SeqCst), 5);

    // A cacheable key still coalesces: one call for four requests.
    let before = counting.calls.load(Ordering::SeqCst);
    let url = format!("{}/shared?delay_ms=400&cc=max-age%3D60", cg.url);
    let got = concurrently(&url, 4).await;
    assert!(got.iter().all(|g| g.status == 200));
    assert_eq!(counting.calls.load(Ordering::SeqCst), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_timeouts_share_the_one_upstream_calls_answer() {
    let (up, counting, _task) = counting_upstream().await;
    let cg = cachegate(
        &up,
        &[
            ("CACHEGATE_UPSTREAM__TIMEOUT", "700ms"),
            ("CACHEGATE_UPSTREAM__RETRIES", "0"),
            // The breaker is not what is tested here.
            ("CACHEGATE_UPSTREAM__MIN_CALLS", "0"),
        ],
    );
    let url = format!("{}/hangs?delay_ms=5000&cc=max-age%3D60", cg.url);
    let got = concurrently(&url, 4).await;
    for g in &got {
        assert_eq!(g.status, 504, "{:?}", g.body);
    }
    // One call: the waiters took its 504 instead of calling after it.
    assert_eq!(counting.calls.load(Ordering::SeqCst), 1);
}
