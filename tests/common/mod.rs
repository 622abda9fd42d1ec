//! Shared test harness: a real HTTP upstream on loopback whose answers are
//! steered by the query string, and the built `cachegate serve` binary.
#![allow(dead_code)]

pub mod raw;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
pub struct UpstreamState {
    pub seen: Mutex<Vec<Seen>>,
    /// Answer every request with 503 while set.
    pub failing: AtomicBool,
    /// Requests answered (not counting those that saw `failing`).
    pub answered: AtomicUsize,
    /// Per-path bodies the test can change ("version 2" of a resource).
    pub versions: Mutex<HashMap<String, String>>,
}

impl UpstreamState {
    /// How many requests reached the upstream for `path` (any query).
    pub fn hits(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path_and_query.split('?').next() == Some(path))
            .count()
    }
    pub fn last(&self, path: &str) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.path_and_query.split('?').next() == Some(path))
            .cloned()
            .expect("the upstream saw no request for the path")
    }
    pub fn set_version(&self, path: &str, v: &str) {
        self.versions
            .lock()
            .unwrap()
            .insert(path.to_owned(), v.to_owned());
    }
}

pub struct TestUpstream {
    pub url: String,
    pub state: Arc<UpstreamState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The upstream answers according to its query parameters:
/// `cc` Cache-Control, `status`, `delay_ms`, `etag` (and 304 on a matching
/// If-None-Match), `lm` Last-Modified, `vary`, `set_cookie`, `bin` (N
/// binary bytes; `bin_ct` their content type, `-` for none), `surrogate` (Surrogate-Key), `location`, `echo` (the
/// JSON body gets a `headers` object of every request header received),
/// `h=name:value` (any header, repeatable; `h200=` on full answers only,
/// `h304=` on 304s only).
/// Otherwise it answers a
/// ~1 KB JSON body naming the path, the version, the request count and the
/// Accept-Language it saw.
pub async fn upstream() -> TestUpstream {
    let state = Arc::new(UpstreamState::default());
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(state.clone());
    let (url, task) = serve_on_loopback(app).await;
    TestUpstream { url, state, task }
}

/// Serve `app` on a free loopback port: its base URL, and the task to
/// abort when the test is done with it.
pub async fn serve_on_loopback(app: axum::Router) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), task)
}

async fn answer(State(state): State<Arc<UpstreamState>>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    state.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path_and_query: pq.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let q: HashMap<String, String> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    // What the answer says is decided when the request arrives.
    let path = parts.uri.path().to_owned();
    let version = state
        .versions
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or_else(|| "1".into());
    if let Some(ms) = q.get("delay_ms") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    // `delay_v2_ms`: only once the test has moved the path past version 1
    // (a refresh that takes long, after a first fetch that did not).
    if let (Some(ms), false) = (q.get("delay_v2_ms"), version == "1") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    if state.failing.load(Ordering::SeqCst) {
        return Response::builder()
            .status(503)
            .body(Body::from("upstream is down"))
            .unwrap();
    }
    let n = state.answered.fetch_add(1, Ordering::SeqCst) + 1;
    let mut resp = Response::builder().status(q.get("status").map_or(200, |s| s.parse().unwrap()));
    let h = resp.headers_mut().unwrap();
    let mut set = |name: &'static str, v: &str| {
        h.append(name, HeaderValue::from_str(v).unwrap());
    };
    // `cc_v2`: the Cache-Control once the test has moved the path past version 1.
    match (q.get("cc"), q.get("cc_v2")) {
        (_, Some(v2)) if version != "1" => set("cache-control", v2),
        (Some(v), _) => set("cache-control", v),
        _ => {}
    }
    if let Some(v) = q.get("vary") {
        set("vary", v);
    }
    if let Some(v) = q.get("set_cookie") {
        set("set-cookie", v);
    }
    if let Some(v) = q.get("lm") {
        set("last-modified", v);
    }
    if let Some(v) = q.get("surrogate") {
        set("surrogate-key", v);
    }
    if let Some(v) = q.get("location") {
        set("location", v);
    }
    if let Some(v) = q.get("content_location") {
        set("content-location", v);
    }
    set("x-upstream-header", "kept");
    // `h=name:value` (repeatable): a header on every answer; `h200=` only
    // on full answers, `h304=` only on 304s.
    let extra = |only: &str| -> Vec<(String, String)> {
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .filter(|(k, _)| k == "h" || k == only)
            .filter_map(|(_, v)| {
                let (n, v) = v.split_once(':')?;
                Some((n.trim().to_owned(), v.trim().to_owned()))
            })
            .collect()
    };
    let not_modified = q.get("etag").is_some_and(|etag| {
        parts
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            == Some(etag.as_str())
    });
    for (n, v) in extra(if not_modified { "h304" } else { "h200" }) {
        h.append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    let mut set = |name: &'static str, v: &str| {
        h.append(name, HeaderValue::from_str(v).unwrap());
    };
    if let Some(etag) = q.get("etag") {
        set("etag", etag);
        if not_modified {
            return resp.status(304).body(Body::empty()).unwrap();
        }
    }
    if let Some(n) = q.get("bin") {
        let n: usize = n.parse().unwrap();
        // `bin_ct`: another content type for them (`-`: none at all).
        match q.get("bin_ct").map(String::as_str) {
            Some("-") => {}
            Some(ct) => set("content-type", ct),
            None => set("content-type", "application/octet-stream"),
        }
        let bytes: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
        return resp.body(Body::from(bytes)).unwrap();
    }
    if let Some(n) = q.get("json_bytes") {
        // A JSON list of about `n` bytes, like a REST collection answer;
        // `gzip_self`: compressed here when the request takes gzip, as an
        // upstream that compresses does.
        let n: usize = n.parse().unwrap();
        set("content-type", "application/json");
        let body = json_list(n);
        let takes_gzip = parts
            .headers
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("gzip"));
        if q.contains_key("gzip_self") {
            set("vary", "accept-encoding");
            if takes_gzip {
                use std::io::Write;
                set("content-encoding", "gzip");
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&body).unwrap();
                return resp.body(Body::from(e.finish().unwrap())).unwrap();
            }
        }
        return resp.body(Body::from(body)).unwrap();
    }
    let lang = parts
        .headers
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    set("content-type", "application/json");
    let padding = "x".repeat(800);
    let mut json = serde_json::json!({"path": path, "version": version, "n": n, "lang": lang, "method": parts.method.as_str(), "padding": padding});
    if q.contains_key("echo") {
        // Every header as received (values lossy), so a test can see what
        // a stored answer was built from.
        let mut seen = serde_json::Map::new();
        for (name, value) in &parts.headers {
            let values = seen
                .entry(name.as_str())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let serde_json::Value::Array(a) = values {
                a.push(String::from_utf8_lossy(value.as_bytes()).into());
            }
        }
        json["headers"] = seen.into();
    }
    resp.body(Body::from(json.to_string())).unwrap()
}

/// A JSON array of objects of about `n` bytes (a little more), the same
/// for the same `n`.
pub fn json_list(n: usize) -> Vec<u8> {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"id":{i},"title":"item number {i}","author":"user{}","tags":["a","b{}"],"price":{}.{:02},"active":{}}},"#,
            i % 97,
            i % 13,
            (i * 7919) % 1000,
            i % 100,
            i % 2 == 0
        ));
        i += 1;
    }
    s.pop();
    s.push(']');
    s.into_bytes()
}

/// A running `cachegate serve`; killed on drop.
pub struct Cachegate {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
}

impl Cachegate {
    /// The process id of the running binary (for RSS measurements).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Cachegate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start the built binary in front of `upstream_url` on the memory backend
/// (unless `env` says otherwise), on a free port. `CACHEGATE_TEST_SERVE_BIN`
/// names another binary to start instead (measurements of a release build,
/// tests/memory_rss.rs); the suite never sets it.
pub fn cachegate(upstream_url: &str, env: &[(&str, &str)]) -> Cachegate {
    let binary = std::env::var_os("CACHEGATE_TEST_SERVE_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_cachegate").into());
    let mut cmd = Command::new(binary);
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("CACHEGATE_UPSTREAM__URL", upstream_url)
        .env("CACHEGATE_BACKEND", "memory")
        .env("RUST_LOG", "warn")
        // Run from an empty directory so no config/cachegate.toml is picked up.
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start cachegate");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("cachegate listening on ")
        .unwrap_or_else(|| panic!("cachegate did not start: {line:?}"))
        .to_owned();
    let addr = url.trim_start_matches("http://").parse().unwrap();
    Cachegate { child, addr, url }
}

/// The built `cachegate` binary run as a command (`purge`, `init`,
/// `config`, ...) against `upstream_url` with the environment `env`, outside
/// any Lambda runtime and outside the repository (so `config/cachegate.toml`
/// is not read).
pub fn cli(upstream_url: &str, env: &[(String, String)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(args)
        .env("CACHEGATE_UPSTREAM__URL", upstream_url)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap()
}

/// The `Host` every request of [`client`] carries. Instances of a test
/// listen on different ports, but behind a load balancer they share one
/// client-facing host; cachegate's `X-Forwarded-Host` (the client's `Host`)
/// is part of the key, so without one name the instances would never share
/// an entry.
pub const TEST_HOST: &str = "cachegate.test";

pub fn client() -> reqwest::Client {
    cachegate::tls::install_crypto_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::HOST,
        reqwest::header::HeaderValue::from_static(TEST_HOST),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Response parts tests look at.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn x_cache(&self) -> &str {
        self.headers
            .get("x-cache")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> Got {
    let r = req.send().await.expect("request to cachegate");
    Got {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.bytes().await.unwrap(),
    }
}

pub async fn get(url: &str) -> Got {
    send(client().get(url)).await
}

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub use cachegate_test_net::free_port;

/// A gzip body decoded (the test clients have no decompression of their
/// own: they see the bytes cachegate sends).
pub fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .expect("a gzip body");
    out
}

/// Wait until `child`, a server started by a test, listens on `port`
/// (loopback); panics naming `what` if it exits first or takes 30 s.
pub fn wait_listening(child: &mut Child, port: u16, what: &str) {
    cachegate_test_net::wait_listening(child, port, what, Duration::from_secs(30));
}

/// A variable scripts/test exports for the services it started; missing
/// means the tests run outside it, which fails loudly, never skips.
pub fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through scripts/test, which starts the services")
    })
}

/// Lines of a child's output as they come, read on a thread of their own
/// (so the child never blocks on a full pipe).
pub fn lines_of(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The environment pointing a cachegate process at the shared `backend`
/// (`redis` or `dynamodb`) that scripts/test started, in a `namespace` of
/// its own (Redis key prefix, DynamoDB table). Store time bounds are loose:
/// the tests using this are about sharing, coalescing and purging; the
/// ones about time bounds (tests/outage.rs, the hung-backend test) set
/// their own, and a busy machine's slow reply must not turn a HIT into a
/// miss here.
pub fn backend_env(backend: &str, namespace: &str) -> Vec<(String, String)> {
    let id = std::process::id();
    let mut env: Vec<(&str, String)> = vec![
        ("CACHEGATE_STORE__READ_TIMEOUT", "2s".into()),
        ("CACHEGATE_STORE__WRITE_TIMEOUT", "2s".into()),
        // Nor is the breaker: opened by a few slow replies, it would make
        // an instance fetch without the shared lock.
        ("CACHEGATE_STORE__FAILURE_THRESHOLD", "1000".into()),
    ];
    match backend {
        "redis" => env.extend([
            ("CACHEGATE_BACKEND", "redis".into()),
            ("CACHEGATE_REDIS__URL", need("CACHEGATE_TEST_REDIS_URL")),
            (
                "CACHEGATE_REDIS__KEY_PREFIX",
                format!("t-{namespace}-{id}:"),
            ),
        ]),
        "dynamodb" => env.extend([
            ("CACHEGATE_BACKEND", "dynamodb".into()),
            (
                "AWS_ENDPOINT_URL_DYNAMODB",
                need("CACHEGATE_TEST_DYNAMODB_ENDPOINT"),
            ),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            // Per test process like the Redis prefix: a rerun against a
            // local server that outlived the last run starts clean.
            (
                "CACHEGATE_DYNAMODB__TABLE",
                format!("cachegate-{namespace}-{id}"),
            ),
            ("CACHEGATE_DYNAMODB__OPERATION_TIMEOUT", "2s".into()),
        ]),
        other => panic!("unknown backend {other}"),
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// cargo-lambda's runtime API emulator (`cargo lambda watch
/// --only-lambda-apis -v`) on a free port. Ready when the port accepts
/// connections: its log lines change between versions. Its output is read
/// to the end (a closed pipe would fail its writes) and, when the test
/// panics, printed: a lost invocation is otherwise a mystery.
pub fn lambda_emulator() -> (Logged, u16) {
    let port = free_port();
    let emulator = Command::new("cargo")
        .args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "-v",
            "-A",
            "127.0.0.1",
            "-P",
        ])
        .arg(port.to_string())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("`cargo lambda` not found: scripts/test installs cargo-lambda");
    let mut emulator = Logged::new(format!("cargo lambda watch on {port}"), emulator);
    cachegate_test_net::wait_listening(
        &mut emulator.process.0,
        port,
        "cargo lambda watch",
        Duration::from_secs(60),
    );
    (emulator, port)
}

/// A child process whose stdout and stderr are drained into a log that is
/// printed if the test panics while the process is alive.
pub struct Logged {
    pub process: Killed,
    name: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    fn new(name: String, mut child: Child) -> Logged {
        let log = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout piped")),
            Box::new(child.stderr.take().expect("stderr piped")),
        ];
        for pipe in pipes {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        Logged {
            process: Killed(child),
            name,
            log,
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!("--- {} printed:\n{}\n---", self.name, log.join("\n"));
        }
    }
}

/// The built binary as the Lambda function `_` of the emulator on `port`,
/// in front of `upstream_url`, from an empty directory.
pub fn lambda_function(port: u16, upstream_url: &str) -> Command {
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
    .current_dir(std::env::temp_dir());
    cmd
}

/// A finished command's exit code and output, for assertion messages.
pub fn describe(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cargo lambda invoke` of the function `_` on the emulator at `port`;
/// the caller adds the payload (`--data-file PATH` or `--data-ascii JSON`).
pub fn lambda_invoke(port: u16) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["lambda", "invoke", "-A", "127.0.0.1", "-P"])
        .arg(port.to_string())
        .arg("_")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}
