//! Protecting the upstream (issue #15, items 2-4), end to end: a real
//! upstream on loopback that can be told to rate-limit (429 with
//! `Retry-After`), hang or go away, and real `cachegate serve` processes in
//! front of it, two of them sharing Redis or DynamoDB (dynalite) for the
//! back-off. Counts of what reached the upstream are asserted; latencies
//! are printed, never asserted (benchmarks measure those).

mod common;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use http::{Request, Response};

use common::{backend_env, cachegate, client, free_port, send, Cachegate, Got};

const OK: u8 = 0;
const RATE_LIMITED: u8 = 1;
const HANGING: u8 = 2;

#[derive(Default)]
struct Limits {
    mode: AtomicU8,
    /// Requests that reached the upstream, whatever it answered.
    seen: AtomicUsize,
    /// The `Retry-After` it sends while rate-limiting, in seconds.
    retry_after: AtomicUsize,
    /// `max-age` of its OK answers, in seconds (0: the default, 1).
    max_age: AtomicUsize,
    /// When each request arrived.
    arrivals: std::sync::Mutex<Vec<Instant>>,
}

/// An upstream that answers `max-age=1, stale-if-error=60` JSON while OK
/// (another `max-age` if set),
/// 429 with `Retry-After` while rate-limited, and nothing (for a minute)
/// while hanging.
struct Upstream {
    url: String,
    state: Arc<Limits>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    fn set(&self, mode: u8) {
        self.state.mode.store(mode, Ordering::SeqCst);
    }
    fn seen(&self) -> usize {
        self.state.seen.load(Ordering::SeqCst)
    }
}

async fn answer(State(s): State<Arc<Limits>>, req: Request<Body>) -> Response<Body> {
    s.seen.fetch_add(1, Ordering::SeqCst);
    s.arrivals.lock().unwrap().push(Instant::now());
    if req.uri().path() == "/late-429" {
        // A request that was already on its way when the limit came in:
        // answered late, with a shorter wait than the one in force.
        tokio::time::sleep(Duration::from_secs(1)).await;
        return Response::builder()
            .status(429)
            .header("retry-after", "1")
            .body(Body::empty())
            .unwrap();
    }
    match s.mode.load(Ordering::SeqCst) {
        RATE_LIMITED => Response::builder()
            .status(429)
            .header(
                "retry-after",
                s.retry_after.load(Ordering::SeqCst).to_string(),
            )
            .header("content-type", "application/json")
            .body(Body::from(r#"{"error":"slow down"}"#))
            .unwrap(),
        HANGING => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Response::new(Body::empty())
        }
        _ => Response::builder()
            .header(
                "cache-control",
                format!(
                    "max-age={}, stale-if-error=60",
                    s.max_age.load(Ordering::SeqCst).max(1)
                ),
            )
            .header("content-type", "application/json")
            .body(Body::from(format!(r#"{{"path":"{}"}}"#, req.uri().path())))
            .unwrap(),
    }
}

async fn upstream_on(listener: tokio::net::TcpListener) -> Upstream {
    let state = Arc::new(Limits::default());
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(state.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Upstream { url, state, task }
}

async fn limited_upstream() -> Upstream {
    upstream_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await
}

/// The settings of a shared `backend` under its own `namespace`, its
/// table created first for DynamoDB.
fn shared_backend_env(backend: &str, namespace: &str) -> Vec<(String, String)> {
    let env = backend_env(backend, namespace);
    if backend == "dynamodb" {
        let out = common::cli("http://127.0.0.1:9", &env, &["init"]);
        assert!(out.status.success(), "{}", common::describe(&out));
    }
    env
}

fn start(upstream_url: &str, env: &[(String, String)], extra: &[(&str, &str)]) -> Cachegate {
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    cachegate(upstream_url, &all)
}

async fn get(at: &Cachegate, path: &str) -> Got {
    send(client().get(format!("{}{path}", at.url))).await
}

fn retry_after(got: &Got) -> u64 {
    got.header("retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("no Retry-After: {got:?}"))
}

/// A 429 one instance got holds both instances back until its
/// `Retry-After` has passed: entries within stale-if-error answer stale,
/// other requests get 503 with the time left, and the upstream sees
/// nothing in the window.
async fn a_429_holds_every_instance_back(backend: &str) {
    let env = shared_backend_env(backend, "hold");
    let up = limited_upstream().await;
    up.state.retry_after.store(3, Ordering::SeqCst);
    let a = start(&up.url, &env, &[]);
    let b = start(&up.url, &env, &[]);

    let first = get(&a, "/kept").await;
    assert_eq!(first.status, 200, "{first:?}");
    tokio::time::sleep(Duration::from_millis(1_200)).await; // /kept is stale now

    up.set(RATE_LIMITED);
    let limited = get(&a, "/new").await;
    assert_eq!(
        limited.status, 429,
        "the upstream's own answer is relayed: {limited:?}"
    );
    assert_eq!(limited.header("retry-after"), "3");
    let told = Instant::now();
    let seen = up.seen();

    // The other instance learns of it through the backend.
    let stale = get(&b, "/kept").await;
    assert_eq!(stale.status, 200, "{stale:?}");
    assert_eq!(stale.x_cache(), "STALE");
    assert!(
        stale
            .header("cache-status")
            .contains("detail=upstream-retry-after"),
        "{:?}",
        stale.header("cache-status")
    );
    let held = get(&b, "/other").await;
    assert_eq!(held.status, 503, "{held:?}");
    assert_eq!(held.json()["error"]["code"], "upstream_retry_after");
    assert!((1..=3).contains(&retry_after(&held)), "{held:?}");
    assert_eq!(held.header("cache-control"), "no-store");
    // And so does the instance that was told, for a bypassed read too.
    let bypass = send(
        client()
            .get(format!("{}/bypassed", a.url))
            .header("range", "bytes=0-1"),
    )
    .await;
    assert_eq!(bypass.status, 503, "{bypass:?}");
    assert_eq!(bypass.x_cache(), "BYPASS");
    assert_eq!(
        up.seen(),
        seen,
        "nothing reached the upstream in the window"
    );

    // After the window, calls resume.
    up.set(OK);
    let wait = Duration::from_millis(3_100).saturating_sub(told.elapsed());
    tokio::time::sleep(wait).await;
    let back = get(&b, "/other").await;
    assert_eq!(back.status, 200, "{back:?}");
    assert_eq!(up.seen(), seen + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_429_holds_every_instance_back() {
    a_429_holds_every_instance_back("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_a_429_holds_every_instance_back() {
    a_429_holds_every_instance_back("dynamodb").await;
}

/// A 429 with a shorter `Retry-After`, to a request that was on its way
/// before a longer hold was shared, does not shorten that hold: an
/// instance that has not called the upstream since is still held.
async fn a_late_shorter_429_does_not_shorten_the_shared_hold(backend: &str) {
    let env = shared_backend_env(backend, "hold-longest");
    let up = limited_upstream().await;
    up.state.retry_after.store(6, Ordering::SeqCst);
    let (a, b, c) = (
        start(&up.url, &env, &[]),
        start(&up.url, &env, &[]),
        start(&up.url, &env, &[]),
    );
    // b's request reaches the upstream first and is answered a second later.
    let late = {
        let url = format!("{}/late-429", b.url);
        tokio::spawn(async move { send(client().get(url)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    up.set(RATE_LIMITED);
    let limited = get(&a, "/now").await;
    assert_eq!(limited.status, 429, "{limited:?}");
    let told = Instant::now();
    let late = late.await.unwrap();
    assert_eq!(late.status, 429, "{late:?}");
    assert_eq!(late.header("retry-after"), "1");

    // Past the late answer's second, well within a's six.
    tokio::time::sleep(Duration::from_millis(2_000).saturating_sub(told.elapsed())).await;
    let seen = up.seen();
    let held = get(&c, "/fresh").await;
    assert_eq!(held.status, 503, "c called the upstream: {held:?}");
    assert_eq!(held.json()["error"]["code"], "upstream_retry_after");
    assert!(retry_after(&held) >= 3, "{held:?}");
    assert_eq!(up.seen(), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_late_shorter_429_does_not_shorten_the_shared_hold() {
    a_late_shorter_429_does_not_shorten_the_shared_hold("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_a_late_shorter_429_does_not_shorten_the_shared_hold() {
    a_late_shorter_429_does_not_shorten_the_shared_hold("dynamodb").await;
}

/// A client's own rate limit (its request carried credentials) is that
/// client's answer; it stops no one else.
#[tokio::test]
async fn a_credentialed_429_holds_no_one_back() {
    let up = limited_upstream().await;
    up.state.retry_after.store(30, Ordering::SeqCst);
    let gw = cachegate(&up.url, &[]);
    up.set(RATE_LIMITED);
    let theirs = send(
        client()
            .get(format!("{}/mine", gw.url))
            .header("authorization", "Bearer one-client"),
    )
    .await;
    assert_eq!(theirs.status, 429, "{theirs:?}");
    up.set(OK);
    let others = get(&gw, "/public").await;
    assert_eq!(others.status, 200, "{others:?}");
}

/// A hanging endpoint opens its breaker once `failure_rate` of at least
/// `min_calls` calls timed out: then stale entries answer at once, without
/// the timeout, and the upstream is not called; after `open_for` one
/// probe of that endpoint closes it again.
#[tokio::test]
async fn the_breaker_answers_stale_without_waiting_and_a_probe_closes_it() {
    let up = limited_upstream().await;
    let gw = cachegate(
        &up.url,
        &[
            ("CACHEGATE_UPSTREAM__TIMEOUT", "500ms"),
            ("CACHEGATE_UPSTREAM__MIN_CALLS", "3"),
            ("CACHEGATE_UPSTREAM__FAILURE_RATE", "60"),
            ("CACHEGATE_UPSTREAM__OPEN_FOR", "2s"),
        ],
    );
    assert_eq!(get(&gw, "/e/kept").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    up.set(HANGING);
    // Two timeouts of three calls to /e: the first on a stale entry
    // (answered stale after the timeout), the second on a miss (504).
    let slow = Instant::now();
    let first = get(&gw, "/e/kept").await;
    let slow = slow.elapsed();
    assert_eq!(first.x_cache(), "STALE", "{first:?}");
    assert!(first.header("cache-status").contains("upstream_timeout"));
    assert_eq!(get(&gw, "/e/missing").await.status, 504);
    let seen = up.seen();

    let fast = Instant::now();
    let stale = get(&gw, "/e/kept").await;
    let fast = fast.elapsed();
    assert_eq!(stale.x_cache(), "STALE", "{stale:?}");
    assert!(
        stale
            .header("cache-status")
            .contains("detail=upstream-open-endpoint"),
        "{:?}",
        stale.header("cache-status")
    );
    let held = get(&gw, "/e/missing").await;
    assert_eq!(held.status, 503, "{held:?}");
    assert_eq!(held.json()["error"]["code"], "upstream_open");
    assert!((1..=2).contains(&retry_after(&held)), "{held:?}");
    assert_eq!(up.seen(), seen, "an open breaker calls nothing");
    println!("stale answer with the upstream hanging: {slow:?} before the breaker opened, {fast:?} after");

    up.set(OK);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let probe = get(&gw, "/e/missing").await;
    assert_eq!(probe.status, 200, "the probe goes through: {probe:?}");
    assert_eq!(
        get(&gw, "/e/after").await.status,
        200,
        "and closed the breaker"
    );
    assert_eq!(up.seen(), seen + 2);
}

/// A GET that cannot connect is tried again within the timeout; a POST is
/// sent once (it may not be repeated, and here it never arrives).
#[tokio::test]
async fn connect_failures_are_retried_for_reads_only() {
    for (method, retried) in [("GET", true), ("POST", false)] {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let gw = cachegate(
            &url,
            &[
                ("CACHEGATE_UPSTREAM__RETRIES", "8"),
                ("CACHEGATE_UPSTREAM__TIMEOUT", "10s"),
            ],
        );
        // The upstream comes up a little after the first attempt failed.
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            upstream_on(
                tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap(),
            )
            .await
        });
        let got = send(client().request(method.parse().unwrap(), format!("{}/r", gw.url))).await;
        let up = late.await.unwrap();
        if retried {
            assert_eq!(got.status, 200, "{method}: {got:?}");
            assert_eq!(up.seen(), 1);
        } else {
            assert_eq!(got.status, 502, "{method}: {got:?}");
            assert_eq!(got.json()["error"]["code"], "upstream_unreachable");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(up.seen(), 0, "{method} was not sent again");
        }
    }
}

/// With `cache.refresh_ahead`, a key requested all the time never misses:
/// each entry is refreshed in the background during the last part of its
/// freshness, once.
#[tokio::test]
async fn refresh_ahead_keeps_a_hot_key_from_missing() {
    let up = limited_upstream().await;
    up.state.max_age.store(2, Ordering::SeqCst);
    let gw = cachegate(&up.url, &[("CACHEGATE_CACHE__REFRESH_AHEAD", "0.5")]);
    assert_eq!(get(&gw, "/hot").await.x_cache(), "MISS");
    let started = Instant::now();
    let mut answers = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        answers.push(get(&gw, "/hot").await.x_cache().to_owned());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answers.iter().all(|x| x == "HIT"), "{answers:?}");
    // One refresh per entry: about one a second (the last 1 s of 2 s).
    let seen = up.seen();
    assert!((4..=8).contains(&seen), "upstream saw {seen}");
}

/// GET every URL at once.
async fn get_all(urls: Vec<String>) -> Vec<Got> {
    let mut set = tokio::task::JoinSet::new();
    for url in urls {
        set.spawn(async move { send(client().get(url)).await });
    }
    set.join_all().await
}

/// The most requests the upstream saw within any `window`.
fn busiest(arrivals: &[Instant], window: Duration) -> usize {
    let mut a = arrivals.to_vec();
    a.sort();
    (0..a.len())
        .map(|i| a[i..].iter().take_while(|t| **t < a[i] + window).count())
        .max()
        .unwrap_or(0)
}

/// `upstream.max_rps` holds across instances: misses spread over two
/// instances never reach the upstream faster than the budget, those that
/// cannot get a slot within `queue_wait` get 503 `upstream_budget`.
async fn the_budget_holds_across_instances(backend: &str) {
    let env = shared_backend_env(backend, "budget");
    let up = limited_upstream().await;
    let budget = [
        ("CACHEGATE_UPSTREAM__MAX_RPS", "5"),
        ("CACHEGATE_UPSTREAM__QUEUE_WAIT", "2s"),
    ];
    let a = start(&up.url, &env, &budget);
    let b = start(&up.url, &env, &budget);
    let started = Instant::now();
    let answers = get_all(
        (0..40)
            .map(|i| {
                let at = if i % 2 == 0 { &a } else { &b };
                format!("{}/cold/{i}", at.url)
            })
            .collect(),
    )
    .await;
    let elapsed = started.elapsed();
    let ok = answers.iter().filter(|g| g.status == 200).count();
    for g in answers.iter().filter(|g| g.status != 200) {
        assert_eq!(g.status, 503, "{g:?}");
        assert_eq!(g.json()["error"]["code"], "upstream_budget");
        assert!(retry_after(g) >= 1);
    }
    let arrivals = up.state.arrivals.lock().unwrap().clone();
    let busiest = busiest(&arrivals, Duration::from_secs(1));
    println!(
        "{backend}: {ok} of 40 answered in {elapsed:?}, the rest 503; busiest second upstream: {busiest}"
    );
    assert_eq!(up.seen(), ok, "every answer is one upstream call");
    // burst 1 + 2 s x 5/s = 11 may go within queue_wait of the first
    // request (a few more for those sent a little later); at least a few do.
    assert!((5..=14).contains(&ok), "{ok} answered");
    // GCRA: at most burst + 1 s x 5/s = 6 in any second (one more for
    // the jitter between a slot's time and the request's arrival).
    assert!(busiest <= 7, "{busiest} requests within one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_the_budget_holds_across_instances() {
    the_budget_holds_across_instances("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_the_budget_holds_across_instances() {
    the_budget_holds_across_instances("dynamodb").await;
}

/// Over budget, an entry within stale-if-error answers (`detail=
/// upstream-budget`); `max_concurrency` bounds the calls in flight.
#[tokio::test]
async fn over_budget_answers_stale_and_concurrency_is_bounded() {
    let up = limited_upstream().await;
    let gw = cachegate(
        &up.url,
        &[
            ("CACHEGATE_UPSTREAM__MAX_RPS", "0.2"),
            ("CACHEGATE_UPSTREAM__QUEUE_WAIT", "0s"),
        ],
    );
    assert_eq!(get(&gw, "/kept").await.status, 200); // the one permit for 5 s
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let stale = get(&gw, "/kept").await;
    assert_eq!(stale.x_cache(), "STALE", "{stale:?}");
    assert!(
        stale
            .header("cache-status")
            .contains("detail=upstream-budget"),
        "{:?}",
        stale.header("cache-status")
    );
    let held = get(&gw, "/other").await;
    assert_eq!(held.status, 503, "{held:?}");
    assert_eq!(held.json()["error"]["code"], "upstream_budget");
    assert_eq!(up.seen(), 1);

    let gw = cachegate(
        &up.url,
        &[
            ("CACHEGATE_UPSTREAM__MAX_CONCURRENCY", "1"),
            ("CACHEGATE_UPSTREAM__QUEUE_WAIT", "200ms"),
            ("CACHEGATE_UPSTREAM__TIMEOUT", "2s"),
        ],
    );
    up.set(HANGING);
    let url = gw.url.clone();
    let hanging = tokio::spawn(async move { send(client().get(format!("{url}/slow"))).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = get(&gw, "/also-slow").await;
    assert_eq!(
        second.status, 503,
        "one call in flight at a time: {second:?}"
    );
    assert_eq!(second.json()["error"]["code"], "upstream_budget");
    assert_eq!(hanging.await.unwrap().status, 504);
}

/// A backend that cannot be asked leaves each instance its fallback share.
#[tokio::test]
async fn without_the_backend_each_instance_keeps_to_its_fallback() {
    let up = limited_upstream().await;
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let gw = cachegate(
        &up.url,
        &[
            ("CACHEGATE_BACKEND", "redis"),
            ("CACHEGATE_REDIS__URL", dead.as_str()),
            ("CACHEGATE_UPSTREAM__MAX_RPS", "100"),
            ("CACHEGATE_UPSTREAM__FALLBACK_RPS", "0.5"),
            ("CACHEGATE_UPSTREAM__QUEUE_WAIT", "0s"),
        ],
    );
    let answers = get_all((0..6).map(|i| format!("{}/f/{i}", gw.url)).collect()).await;
    let ok = answers.iter().filter(|g| g.status == 200).count();
    assert_eq!(ok, 1, "burst 1 of the 0.5/s fallback: {answers:?}");
    assert_eq!(up.seen(), 1);
}

/// An upstream with endpoints in every kind of trouble beside healthy
/// ones (all answers uncacheable, so every request reaches it):
/// `/broken/{502,503,504}`, `/hang/…` (a minute), `/malformed/…` (a body
/// that breaks off), `/quota/…` (two requests per
/// `X-Api-Key`, then 429 `Retry-After: 30`), `/maintenance/…` (503
/// `Retry-After: 30`); anything else answers 200.
struct Scoped {
    url: String,
    /// Requests that reached it, by first path segment.
    seen: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scoped {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scoped {
    fn seen(&self, segment: &str) -> usize {
        self.seen.lock().unwrap().get(segment).copied().unwrap_or(0)
    }
}

#[derive(Default)]
struct ScopedState {
    seen: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    quota_used: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A body that breaks off after its first bytes (the answer's head is
/// already out: the exchange, not the connection, fails).
struct BreaksOff(bool);

impl tokio::io::AsyncRead for BreaksOff {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("broken off")));
        }
        self.0 = true;
        buf.put_slice(b"short");
        std::task::Poll::Ready(Ok(()))
    }
}

async fn scoped_answer(State(s): State<Arc<ScopedState>>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segment = path.split('/').nth(1).unwrap_or("").to_owned();
    *s.seen.lock().unwrap().entry(segment.clone()).or_default() += 1;
    let reply = |status: u16| {
        Response::builder()
            .status(status)
            .header("cache-control", "no-store")
    };
    match segment.as_str() {
        "broken" => {
            let status = path.rsplit('/').next().unwrap().parse().unwrap();
            reply(status).body(Body::from("broken")).unwrap()
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            reply(200).body(Body::empty()).unwrap()
        }
        "malformed" => reply(200)
            .body(Body::from_stream(tokio_util::io::ReaderStream::new(
                BreaksOff(false),
            )))
            .unwrap(),
        "quota" => {
            let key = req
                .headers()
                .get("x-api-key")
                .map_or("", |v| v.to_str().unwrap())
                .to_owned();
            let mut used = s.quota_used.lock().unwrap();
            let n = used.entry(key).or_default();
            *n += 1;
            if *n > 2 {
                reply(429)
                    .header("retry-after", "30")
                    .body(Body::empty())
                    .unwrap()
            } else {
                reply(200).body(Body::from("ok")).unwrap()
            }
        }
        "maintenance" => reply(503)
            .header("retry-after", "30")
            .body(Body::from("down for maintenance"))
            .unwrap(),
        _ => reply(200).body(Body::from("ok")).unwrap(),
    }
}

async fn scoped_upstream() -> Scoped {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let state = Arc::new(ScopedState::default());
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = state.seen.clone();
    let app = axum::Router::new()
        .fallback(scoped_answer)
        .with_state(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Scoped { url, seen, task }
}

async fn get_with(at: &Cachegate, path: &str, api_key: Option<&str>) -> Got {
    let mut req = client().get(format!("{}{path}", at.url));
    if let Some(k) = api_key {
        req = req.header("x-api-key", k);
    }
    send(req).await
}

fn assert_held(got: &Got, code: &str, detail: &str) {
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.json()["error"]["code"], code, "{got:?}");
    let status = got.header("cache-status");
    assert!(
        status.contains(&format!("detail={detail}")),
        "{detail}: {status}"
    );
}

/// With the default breaker settings, endpoints that fail every time (a
/// gateway status, a hang past `upstream.timeout`, a malformed answer)
/// are held back once `min_calls` of theirs failed, each alone; healthy
/// endpoints in between are never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_endpoint_is_held_back_alone() {
    let up = scoped_upstream().await;
    let gw = cachegate(&up.url, &[("CACHEGATE_UPSTREAM__TIMEOUT", "300ms")]);
    let broken = ["/broken/502", "/broken/503", "/broken/504"];
    let mut refused_healthy = Vec::new();
    let mut last = Vec::new();
    for round in 0..12 {
        last.clear();
        for path in broken
            .iter()
            .map(|p| p.to_string())
            .chain([format!("/hang/{round}"), format!("/malformed/{round}")])
        {
            last.push(get(&gw, &path).await);
        }
        // Five failures in a row, then healthy requests: what opened the
        // one breaker of before, for every path.
        for k in 0..5 {
            for healthy in [
                format!("/healthy/{round}/{k}"),
                format!("/other/{round}/{k}"),
            ] {
                let got = get(&gw, &healthy).await;
                if got.status != 200 {
                    refused_healthy.push(got);
                }
            }
        }
    }
    assert!(refused_healthy.is_empty(), "{refused_healthy:?}");
    assert_eq!(up.seen("healthy"), 60);
    // All failures: each endpoint's breaker opened at its tenth call.
    assert_eq!(up.seen("broken"), 10);
    assert_eq!(up.seen("hang"), 10);
    // A broken-off exchange may be resent once on a new connection
    // (src/upstream): one or two upstream calls per failure counted.
    assert!(
        (10..=20).contains(&up.seen("malformed")),
        "{}",
        up.seen("malformed")
    );
    for got in &last {
        assert_held(got, "upstream_open", "upstream-open-endpoint");
        assert!((1..=10).contains(&retry_after(got)), "{got:?}");
    }
    // The 503 body says it is this endpoint.
    assert!(last[0].json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("endpoint"));
}

/// Spend `key`'s quota of two on `/quota` through `at`: the third answer
/// is the upstream's 429, relayed.
async fn spend_quota(at: &Cachegate, key: &str) {
    for i in 0..2 {
        let got = get_with(at, &format!("/quota/{i}"), Some(key)).await;
        assert_eq!(got.status, 200, "{got:?}");
    }
    let limited = get_with(at, "/quota/2", Some(key)).await;
    assert_eq!(limited.status, 429, "relayed: {limited:?}");
}

/// A client that spent its own quota upstream (429 to a request with its
/// API key) is held back on that endpoint; other keys, anonymous requests
/// and its own requests elsewhere go on.
#[tokio::test]
async fn a_clients_quota_holds_that_client_alone() {
    let up = scoped_upstream().await;
    let gw = cachegate(&up.url, &[]);
    spend_quota(&gw, "key-a").await;
    let seen = up.seen("quota");
    let held = get_with(&gw, "/quota/3", Some("key-a")).await;
    assert_held(&held, "upstream_retry_after", "upstream-retry-after-client");
    assert!((25..=30).contains(&retry_after(&held)), "{held:?}");
    assert_eq!(
        up.seen("quota"),
        seen,
        "the held client did not reach the upstream"
    );
    assert_eq!(get_with(&gw, "/quota/3", Some("key-b")).await.status, 200);
    assert_eq!(get_with(&gw, "/quota/4", None).await.status, 200);
    assert_eq!(get_with(&gw, "/other/1", Some("key-a")).await.status, 200);
}

/// A maintenance endpoint's 503 with `Retry-After` holds that endpoint
/// back for everyone, and nothing else.
#[tokio::test]
async fn a_maintenance_endpoint_is_held_alone() {
    let up = scoped_upstream().await;
    let gw = cachegate(&up.url, &[]);
    let first = get(&gw, "/maintenance/a").await;
    assert_eq!(first.status, 503, "{first:?}");
    assert_eq!(first.header("retry-after"), "30");
    let held = get_with(&gw, "/maintenance/b", Some("key-a")).await;
    assert_held(
        &held,
        "upstream_retry_after",
        "upstream-retry-after-endpoint",
    );
    assert_eq!(up.seen("maintenance"), 1);
    assert_eq!(get(&gw, "/healthy/1").await.status, 200);
    assert_eq!(get(&gw, "/quota/1").await.status, 200);
}

/// Scoped holds are shared through the backend: what one instance was
/// told holds the same scope, and only it, on the other.
async fn scoped_holds_are_shared(backend: &str) {
    let env = shared_backend_env(backend, "scoped-hold");
    let up = scoped_upstream().await;
    let a = start(&up.url, &env, &[]);
    let b = start(&up.url, &env, &[]);
    spend_quota(&a, "key-a").await;
    assert_eq!(get(&a, "/maintenance/x").await.status, 503);
    let (quota, maintenance) = (up.seen("quota"), up.seen("maintenance"));

    let held = get_with(&b, "/quota/9", Some("key-a")).await;
    assert_held(&held, "upstream_retry_after", "upstream-retry-after-client");
    let held = get(&b, "/maintenance/y").await;
    assert_held(
        &held,
        "upstream_retry_after",
        "upstream-retry-after-endpoint",
    );
    assert_eq!(up.seen("quota"), quota);
    assert_eq!(up.seen("maintenance"), maintenance);
    assert_eq!(get_with(&b, "/quota/9", Some("key-b")).await.status, 200);
    assert_eq!(get_with(&b, "/other/1", Some("key-a")).await.status, 200);
    assert_eq!(get(&b, "/healthy/1").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_scoped_holds_are_shared() {
    scoped_holds_are_shared("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_scoped_holds_are_shared() {
    scoped_holds_are_shared("dynamodb").await;
}
