//! The upstream's announced quota is obeyed before it has to say 429
//! (#26 item 4): a real loopback upstream that allows 5 requests a second
//! (fixed one-second windows), announces what is left in every answer and
//! answers 429 past it. 50 cold misses arrive within 2 s at cachegate,
//! which has no `upstream.max_rps`: none of them reaches the upstream over
//! its limit. Each header spelling is tried.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use http::{HeaderMap, StatusCode};

use common::{cachegate, get, serve_on_loopback};

const LIMIT: usize = 5;

struct Quota {
    /// Which header spelling to announce in.
    spelling: &'static str,
    /// (window second, requests in it)
    window: Mutex<(u64, usize)>,
    over: AtomicUsize,
    answered: AtomicUsize,
}

async fn limited(State(q): State<Arc<Quota>>) -> (StatusCode, HeaderMap, &'static str) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let second = now.as_secs();
    let used = {
        let mut w = q.window.lock().unwrap();
        if w.0 != second {
            *w = (second, 0);
        }
        w.1 += 1;
        w.1
    };
    let mut h = HeaderMap::new();
    h.insert("cache-control", "no-store".parse().unwrap());
    if used > LIMIT {
        q.over.fetch_add(1, Ordering::SeqCst);
        h.insert("retry-after", "1".parse().unwrap());
        return (StatusCode::TOO_MANY_REQUESTS, h, "{}");
    }
    q.answered.fetch_add(1, Ordering::SeqCst);
    let left = LIMIT - used;
    match q.spelling {
        "draft" => {
            h.insert(
                "ratelimit-policy",
                format!("\"default\";q={LIMIT};w=1").parse().unwrap(),
            );
            h.insert(
                "ratelimit",
                format!("\"default\";r={left};t=1").parse().unwrap(),
            );
        }
        "x" => {
            h.insert("x-ratelimit-limit", LIMIT.into());
            h.insert("x-ratelimit-remaining", left.into());
            h.insert("x-ratelimit-reset", (second + 1).into());
        }
        _ => unreachable!(),
    }
    (StatusCode::OK, h, "{}")
}

async fn fifty_cold_misses_in_two_seconds(spelling: &'static str) -> (usize, usize) {
    let q = Arc::new(Quota {
        spelling,
        window: Mutex::new((0, 0)),
        over: AtomicUsize::new(0),
        answered: AtomicUsize::new(0),
    });
    let app = axum::Router::new().fallback(limited).with_state(q.clone());
    let (up, _task) = serve_on_loopback(app).await;
    let cg = cachegate(&up, &[]);
    let mut all = Vec::new();
    for i in 0..50 {
        let url = format!("{}/cold/{i}", cg.url);
        all.push(tokio::spawn(async move { get(&url).await.status }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut statuses = Vec::new();
    for h in all {
        statuses.push(h.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    (q.over.load(Ordering::SeqCst), ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drafts_ratelimit_header_is_obeyed() {
    let (over, ok) = fifty_cold_misses_in_two_seconds("draft").await;
    assert_eq!(
        over, 0,
        "requests over the announced limit reached the upstream"
    );
    assert!(ok >= LIMIT, "only {ok} answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn x_ratelimit_headers_are_obeyed() {
    let (over, ok) = fifty_cold_misses_in_two_seconds("x").await;
    assert_eq!(
        over, 0,
        "requests over the announced limit reached the upstream"
    );
    assert!(ok >= LIMIT, "only {ok} answered");
}
