//! The README's json-server recipe, end to end: a real json-server 0.17
//! (npm; scripts/services/json-server.sh exports CACHEGATE_TEST_JSON_SERVER)
//! over a db file of its own, and `cachegate serve` started with exactly
//! `config/json-server.toml` (only `upstream.url` set from the environment,
//! for the free port json-server got). json-server answers everything with
//! `Cache-Control: no-cache` and `Expires: -1`, and one write changes many
//! URLs (the listings, their filters, embeds, and, for a DELETE, the
//! dependants it cascades to). The recipe must cache for real (a repeat is
//! a HIT that json-server never sees) and answer every read after every
//! write (POST, PUT, PATCH, DELETE) with json-server's current data.
//! Loopback only.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{cachegate, client, free_port, need, send, Got};
use serde_json::{json, Value};

/// The recipe's configuration file, as the README points to it.
const RECIPE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/json-server.toml");

/// Read through cachegate after each write; each must show json-server's
/// current answer. Lists with and without a query, items with and without
/// one, and a listing of another resource that a DELETE cascades to.
/// Queries are written sorted by name, as cachegate sends them upstream,
/// so they read the same in json-server's log.
const URLS: [&str; 6] = [
    "/posts",
    "/posts?author=a",
    "/posts?_order=desc&_sort=id",
    "/posts/1",
    "/posts/1?_embed=comments",
    "/comments?postId=1",
];

/// A json-server over a db file in a directory of its own; killed, and the
/// directory removed, when dropped.
struct JsonServer {
    child: Child,
    url: String,
    dir: std::path::PathBuf,
    /// json-server's request log (`GET /posts?author=a 200 6.085 ms - 62`):
    /// what reached the upstream.
    log: mpsc::Receiver<String>,
}

impl Drop for JsonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl JsonServer {
    fn start() -> JsonServer {
        let bin = need("CACHEGATE_TEST_JSON_SERVER");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "cachegate-json-server-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let db = json!({
            "posts": [
                {"id": 1, "title": "one", "author": "a"},
                {"id": 2, "title": "two", "author": "b"}
            ],
            "comments": [
                {"id": 1, "postId": 1, "body": "first on one"},
                {"id": 2, "postId": 2, "body": "first on two"}
            ]
        });
        std::fs::write(dir.join("db.json"), db.to_string()).unwrap();
        let mut child = Command::new(&bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "db.json",
            ])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let log = common::lines_of(child.stdout.take().unwrap());
        let mut server = JsonServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            log,
        };
        common::wait_listening(&mut server.child, port, "json-server");
        server
    }

    /// The requests json-server logged since the last call, as
    /// `METHOD /path?query`, once its log has been quiet for a moment (it
    /// logs as each response finishes).
    fn requests_seen(&self) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(line) = self.log.recv_timeout(Duration::from_millis(300)) {
            let line = without_colours(&line);
            let mut words = line.split_whitespace();
            if let (Some(method), Some(target)) = (words.next(), words.next()) {
                if method.chars().all(|c| c.is_ascii_uppercase()) && target.starts_with('/') {
                    seen.push(format!("{method} {target}"));
                }
            }
        }
        seen
    }

    /// What json-server itself answers now: the truth a read through
    /// cachegate must show.
    async fn current(&self, path: &str) -> (u16, Value) {
        let got = send(reqwest::Client::new().get(format!("{}{path}", self.url))).await;
        (got.status.as_u16(), got.json())
    }
}

/// json-server colours its log even into a pipe: drop the ANSI escapes.
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every URL twice through cachegate: the first read must be json-server's
/// current answer, fetched once (a MISS: the write before emptied the
/// cache); the second a HIT with the same body that json-server never saw.
async fn reads_are_current_and_cached(server: &JsonServer, cachegate_url: &str, after: &str) {
    server.requests_seen();
    let mut first: BTreeMap<&str, Got> = BTreeMap::new();
    for path in URLS {
        let url = format!("{cachegate_url}{path}");
        let miss = send(client().get(&url)).await;
        assert_eq!(miss.x_cache(), "MISS", "{path} after {after}: {miss:?}");
        let hit = send(client().get(&url)).await;
        assert_eq!(hit.x_cache(), "HIT", "{path} after {after}: {hit:?}");
        assert!(
            hit.header("cache-status").starts_with("cachegate; hit"),
            "{path} after {after}: a hit, not a revalidation: {hit:?}"
        );
        assert_eq!(hit.status, miss.status, "{path} after {after}");
        assert_eq!(hit.body, miss.body, "{path} after {after}");
        first.insert(path, miss);
    }
    let seen = server.requests_seen();
    let expected: Vec<String> = URLS.iter().map(|p| format!("GET {p}")).collect();
    assert_eq!(
        seen, expected,
        "after {after}: one upstream request per URL, none for the repeats"
    );
    for path in URLS {
        let (status, body) = server.current(path).await;
        let through = &first[path];
        assert_eq!(through.status.as_u16(), status, "{path} after {after}");
        assert_eq!(through.json(), body, "{path} after {after}: stale");
    }
    server.requests_seen();
}

/// Titles of the posts a listing answered, in its order.
async fn titles(cachegate_url: &str, path: &str) -> Vec<String> {
    let got = send(client().get(format!("{cachegate_url}{path}"))).await;
    got.json()
        .as_array()
        .unwrap_or_else(|| panic!("{path}: not a list: {got:?}"))
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_owned())
        .collect()
}

/// A write through cachegate; json-server must have done it.
async fn write(cachegate_url: &str, method: reqwest::Method, path: &str, body: Value) -> Got {
    let got = send(
        client()
            .request(method.clone(), format!("{cachegate_url}{path}"))
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await;
    assert!(got.status.is_success(), "{method} {path}: {got:?}");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_server_recipe_caches_and_every_write_is_seen() {
    let server = JsonServer::start();
    let cg = cachegate(
        &server.url,
        &[("CACHEGATE_CONFIG", RECIPE), ("RUST_LOG", "warn")],
    );
    let base = cg.url.as_str();

    reads_are_current_and_cached(&server, base, "start-up").await;

    let created = write(
        base,
        reqwest::Method::POST,
        "/posts",
        json!({"title": "three", "author": "a"}),
    )
    .await;
    assert_eq!(created.status, 201);
    assert_eq!(created.json()["id"], 3);
    reads_are_current_and_cached(&server, base, "POST /posts").await;
    assert_eq!(titles(base, "/posts?author=a").await, ["one", "three"]);

    write(
        base,
        reqwest::Method::PUT,
        "/posts/1",
        json!({"title": "one, again", "author": "a"}),
    )
    .await;
    reads_are_current_and_cached(&server, base, "PUT /posts/1").await;
    assert_eq!(
        titles(base, "/posts?author=a").await,
        ["one, again", "three"]
    );

    write(
        base,
        reqwest::Method::PATCH,
        "/posts/3",
        json!({"author": "b"}),
    )
    .await;
    reads_are_current_and_cached(&server, base, "PATCH /posts/3").await;
    assert_eq!(titles(base, "/posts?author=a").await, ["one, again"]);
    assert_eq!(
        titles(base, "/posts?_order=desc&_sort=id").await,
        ["three", "two", "one, again"]
    );

    // json-server deletes post 1's comments with it.
    write(base, reqwest::Method::DELETE, "/posts/1", json!({})).await;
    reads_are_current_and_cached(&server, base, "DELETE /posts/1").await;
    let gone = send(client().get(format!("{base}/posts/1"))).await;
    assert_eq!(gone.status, 404);
    assert_eq!(titles(base, "/posts?author=a").await, Vec::<String>::new());
    let comments = send(client().get(format!("{base}/comments?postId=1"))).await;
    assert_eq!(comments.json(), json!([]));
}

/// json-server compresses (Express's `compression`, for bodies of 1 KB or
/// more when asked): the issue's measurement, 10 GETs of one listing with
/// 6 spellings of `Accept-Encoding` and clients without one, made 4
/// upstream calls. With compressed entries (the default) it is one, asked
/// for gzip; gzip clients get gzip, the others the JSON decoded, and both
/// decode to what json-server itself answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accept_encoding_shares_one_json_server_call() {
    cachegate::tls::install_crypto_provider();
    let server = JsonServer::start();
    for i in 3..40 {
        let post = json!({"title": format!("post number {i}"), "author": "c"});
        let r = send(
            reqwest::Client::new()
                .post(format!("{}/posts", server.url))
                .header("content-type", "application/json")
                .body(post.to_string()),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    let (_, truth) = server.current("/posts?author=c").await;
    let cg = cachegate(
        &server.url,
        &[("CACHEGATE_CONFIG", RECIPE), ("RUST_LOG", "warn")],
    );
    server.requests_seen();
    let url = format!("{}/posts?author=c", cg.url);
    let spellings = [
        Some("gzip, deflate, br"),
        Some("br, gzip"),
        None,
        Some("GZIP,BR"),
        Some("br;q=1.0, gzip;q=0.8, *;q=0.1"),
        Some("identity"),
        Some("gzip, deflate, br, zstd"),
        Some("x-gzip, br"),
        None,
        Some("gzip"),
    ];
    for ae in spellings {
        let mut req = client().get(&url);
        if let Some(ae) = ae {
            req = req.header("accept-encoding", ae);
        }
        let r = send(req).await;
        assert_eq!(r.status, 200, "{ae:?}: {r:?}");
        let body: Vec<u8> = match r.headers.get("content-encoding") {
            None => r.body.to_vec(),
            Some(ce) => {
                assert_eq!(ce, "gzip", "{ae:?}");
                assert!(
                    ae.is_some_and(|a| a.to_ascii_lowercase().contains("gzip")),
                    "{ae:?}"
                );
                let mut out = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(&r.body[..]),
                    &mut out,
                )
                .unwrap();
                out
            }
        };
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body, truth, "{ae:?}");
    }
    assert_eq!(
        server.requests_seen(),
        ["GET /posts?author=c"],
        "one upstream call for every spelling"
    );
}
