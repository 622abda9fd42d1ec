//! The Lambda runtime for real: cargo-lambda's runtime API emulator
//! (`cargo lambda watch --only-lambda-apis`) in front of the built binary,
//! reached through its function-URL endpoint. scripts/test installs
//! cargo-lambda; without it these tests fail, they never skip.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The emulator on a free port, and the function process attached to it.
struct Emulated {
    _emulator: Killed,
    _function: Killed,
    port: u16,
    /// From starting the function process to its first answered request.
    cold_start: Duration,
    /// The function's stdout lines (EMF metrics).
    stdout: std::sync::mpsc::Receiver<String>,
}

async fn emulated(upstream_url: &str, env: &[(&str, &str)]) -> Emulated {
    let port = free_port();
    let emulator = Command::new("cargo")
        .args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "-A",
            "127.0.0.1",
            "-P",
            &port.to_string(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("`cargo lambda` not found: scripts/test installs cargo-lambda");
    let mut emulator = Killed(emulator);
    // Its log lines change between versions; the open port does not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = emulator.0.try_wait() {
            panic!("cargo lambda watch exited before serving: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "cargo lambda watch did not open port {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachegate"));
    cmd.env(
        "AWS_LAMBDA_RUNTIME_API",
        format!("http://127.0.0.1:{port}/.rt"),
    )
    .env("AWS_LAMBDA_FUNCTION_NAME", "_")
    .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
    .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
    .env("CACHEGATE_UPSTREAM__URL", upstream_url)
    .env("CACHEGATE_BACKEND", "memory")
    .env("RUST_LOG", "warn")
    .current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped());
    let mut function = cmd.spawn().unwrap();
    let (tx, stdout) = std::sync::mpsc::channel();
    let out = BufReader::new(function.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let function = Killed(function);
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
        assert!(
            Instant::now() < deadline,
            "the function never answered through the emulator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Emulated {
        _emulator: emulator,
        _function: function,
        port,
        cold_start: started.elapsed(),
        stdout,
    }
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
    let first = common::get(&lambda.url(&path)).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    let second = common::get(&lambda.url(&path)).await;
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
    let blob = lambda.url("/blob?cc=max-age%3D60&bin=100000");
    for want in ["MISS", "HIT"] {
        let r = common::get(&blob).await;
        assert_eq!(r.x_cache(), want);
        assert_eq!(r.body.len(), 100_000);
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
    let url = std::env::var("CACHEGATE_TEST_REDIS_URL")
        .expect("CACHEGATE_TEST_REDIS_URL is not set: run the tests through scripts/test");
    let prefix = format!("lambda-{}:", std::process::id());
    miss_then_hit(&[
        ("CACHEGATE_BACKEND", "redis"),
        ("CACHEGATE_REDIS__URL", &url),
        ("CACHEGATE_REDIS__KEY_PREFIX", &prefix),
    ])
    .await;
}

/// An event that is not an HTTP event gets an error response from the
/// runtime, and the function keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_an_error_not_a_crash() {
    let up = common::upstream().await;
    let lambda = emulated(&up.url, &[]).await;
    let out = Command::new("cargo")
        .args([
            "lambda",
            "invoke",
            "-A",
            "127.0.0.1",
            "-P",
            &lambda.port.to_string(),
            "_",
            "--data-ascii",
            "{\"not\": \"an http event\"}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
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
    let r = common::get(&lambda.url("/after?cc=max-age%3D60")).await;
    assert_eq!(
        r.status, 200,
        "the function stopped serving after a malformed event"
    );
}
