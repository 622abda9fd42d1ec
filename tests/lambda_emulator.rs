//! The Lambda runtime for real: cargo-lambda's runtime API emulator
//! (`cargo lambda watch --only-lambda-apis`) in front of the built binary,
//! reached through its function-URL endpoint. scripts/test installs
//! cargo-lambda; without it these tests fail, they never skip.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Killed;

/// The emulator on a free port, and the function process attached to it.
struct Emulated {
    // Fields drop in order: the function goes before the emulator it talks to.
    _function: Killed,
    _emulator: common::Logged,
    port: u16,
    /// From starting the function process to its first answered request.
    cold_start: Duration,
    /// The function's stdout lines (EMF metrics).
    stdout: std::sync::mpsc::Receiver<String>,
}

async fn emulated(upstream_url: &str, env: &[(&str, &str)]) -> Emulated {
    let (emulator, port) = common::lambda_emulator();
    let started = Instant::now();
    let mut cmd = common::lambda_function(port, upstream_url);
    cmd.env("RUST_LOG", "warn").stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut function = cmd.spawn().unwrap();
    let stdout = common::lines_of(function.stdout.take().unwrap());
    let mut function = Killed(function);
    let url = format!("http://127.0.0.1:{port}/lambda-url/_/warm-up");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = common::client()
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            if r.headers().contains_key("x-cache") {
                break;
            }
        }
        if let Ok(Some(status)) = function.0.try_wait() {
            panic!("the function exited ({status}) before answering through the emulator");
        }
        assert!(
            Instant::now() < deadline,
            "the function never answered through the emulator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Emulated {
        _function: function,
        _emulator: emulator,
        port,
        cold_start: started.elapsed(),
        stdout,
    }
}

/// Through the emulator, an answer comes or the test fails: a lost
/// invocation must not hold the suite until CI's own limit.
const INVOKE_LIMIT: Duration = Duration::from_secs(30);

async fn get(url: &str) -> common::Got {
    common::send(common::client().get(url).timeout(INVOKE_LIMIT)).await
}

impl Emulated {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/lambda-url/_{path}", self.port)
    }
}

async fn miss_then_hit(backend_env: &[(&str, &str)]) {
    let up = common::upstream().await;
    let lambda = emulated(&up.url, backend_env).await;
    eprintln!("cold start under the emulator: {:?}", lambda.cold_start);
    let path = format!("/items/{}?cc=max-age%3D60", std::process::id());
    let first = get(&lambda.url(&path)).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    let second = get(&lambda.url(&path)).await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.body, first.body);
    assert_eq!(up.state.hits(&format!("/items/{}", std::process::id())), 1);
    assert!(second.header("server-timing").contains("cache;dur="));

    // CloudWatch EMF, one line per invocation, with the runtime's request id.
    let emf: Vec<serde_json::Value> =
        std::iter::from_fn(|| lambda.stdout.recv_timeout(Duration::from_millis(300)).ok())
            .filter_map(|l| serde_json::from_str(&l).ok())
            .filter(|v: &serde_json::Value| v.get("_aws").is_some())
            .collect();
    let hits: Vec<_> = emf.iter().filter(|d| d["Hit"] == 1).collect();
    assert_eq!(hits.len(), 1, "{emf:#?}");
    assert!(hits[0]["requestId"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert!(hits[0]["CacheLatency"].as_f64().is_some());

    // Binary bodies survive the base64 round trip through the runtime API.
    // Kept to a few KB: cargo-lambda 1.9's emulator answers the runtime's
    // POST of a response before reading its body, and a body that takes
    // several writes is then sometimes cut off and the invocation never
    // answered (about 1 in 600 at 100 KB under load). Bodies up to
    // Lambda's limit go through lambda_http in process (tests/hostile.rs).
    let blob = lambda.url("/blob?cc=max-age%3D60&bin=4096");
    for want in ["MISS", "HIT"] {
        let r = get(&blob).await;
        assert_eq!(r.x_cache(), want);
        assert_eq!(r.body.len(), 4096);
        assert!(r
            .body
            .iter()
            .enumerate()
            .all(|(i, &x)| x == (i * 7 % 256) as u8));
    }
    let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let posted = common::send(
        common::client()
            .post(lambda.url("/upload"))
            .timeout(INVOKE_LIMIT)
            .header("content-type", "application/octet-stream")
            .body(payload.clone()),
    )
    .await;
    assert_eq!(posted.status, 200, "{posted:?}");
    assert_eq!(&up.state.last("/upload").body[..], &payload[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_under_the_lambda_emulator() {
    miss_then_hit(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_under_the_lambda_emulator() {
    let env = common::backend_env("redis", "lambda");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    miss_then_hit(&env).await;
}

/// An event that is not an HTTP event gets an error response from the
/// runtime, and the function keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_an_error_not_a_crash() {
    let up = common::upstream().await;
    let lambda = emulated(&up.url, &[]).await;
    let out = common::lambda_invoke(lambda.port)
        .args(["--data-ascii", "{\"not\": \"an http event\"}"])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "a malformed event was accepted: {said}"
    );
    assert!(said.to_lowercase().contains("error"), "{said}");
    let r = get(&lambda.url("/after?cc=max-age%3D60")).await;
    assert_eq!(
        r.status, 200,
        "the function stopped serving after a malformed event"
    );
}
