//! Every body streams in serve mode (#23 item 6), and waiters are released
//! at the head of an answer that cannot be stored (#23 item 5), against a
//! real loopback upstream whose bodies the test releases chunk by chunk:
//! what the client has received is compared with what the upstream has
//! sent, not with a clock.
//!
//! - the first bytes of a cacheable, an uncacheable and a bypassed answer
//!   reach the client while the upstream still holds the rest; the
//!   cacheable one is stored whole once it ends;
//! - a stream longer than `upstream.timeout` whose chunks keep coming is
//!   relayed and stored whole; one that stalls longer than it is cut off
//!   and not stored;
//! - a body beyond `cache.max_entry_bytes` streams whole and is not stored;
//! - concurrent requests for a new key whose head says "not storable" all
//!   reach the upstream before the first body ends;
//! - clients that stop reading are disconnected after `serve.send_timeout`.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use common::{cachegate, client, get, serve_on_loopback};

/// The upstream: each request for a path sends its head and `first,` at
/// once; the rest waits until the test releases the path's gate.
#[derive(Default)]
struct Streams {
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    calls: AtomicUsize,
}

impl Streams {
    fn gate(&self, path: &str) -> Arc<Semaphore> {
        self.gates
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(0)))
            .clone()
    }
    /// Let `n` bodies of `path` finish.
    fn release(&self, path: &str, n: usize) {
        self.gate(path).add_permits(n);
    }
}

/// `GET /gated/NAME?cc=...`: `first,` then, once released, `rest`.
/// `GET /paced?every_ms=N&chunks=K&cc=...`: K chunks N ms apart.
/// `GET /stall?cc=...`: `first,` with a Content-Length of 100, then nothing.
/// `GET /big?kib=N&cc=...`: N KiB, chunked (no Content-Length), in 16 KiB
/// chunks sent as fast as they are taken.
async fn answer(State(s): State<Arc<Streams>>, req: Request<Body>) -> Response<Body> {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let q: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let cc = q.get("cc").cloned().unwrap_or_else(|| "no-store".into());
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let path = req.uri().path().to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let mut head = Response::builder()
        .header("cache-control", cc)
        .header("content-type", "text/plain");
    match path.as_str() {
        "/paced" => {
            let (every, chunks) = (num("every_ms"), num("chunks"));
            tokio::spawn(async move {
                for i in 0..chunks {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(every)).await;
                    }
                    let _ = tx.send(Ok(Bytes::from(format!("{i},")))).await;
                }
            });
        }
        "/stall" => {
            head = head.header("content-length", "100");
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"first,"))).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
        "/big" => {
            let kib = num("kib");
            tokio::spawn(async move {
                for _ in 0..kib / 16 {
                    if tx
                        .send(Ok(Bytes::from(vec![b'x'; 16 * 1024])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        _ => {
            let gate = s.gate(&path);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from_static(b"first,"))).await;
                gate.acquire().await.unwrap().forget();
                let _ = tx.send(Ok(Bytes::from_static(b"rest"))).await;
            });
        }
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    head.body(Body::from_stream(stream)).unwrap()
}

async fn streams_upstream() -> (String, Arc<Streams>, tokio::task::JoinHandle<()>) {
    let s = Arc::new(Streams::default());
    let app = axum::Router::new().fallback(answer).with_state(s.clone());
    let (url, task) = serve_on_loopback(app).await;
    (url, s, task)
}

/// The first chunk a client receives of `req`'s body, with the response.
async fn first_chunk(req: reqwest::RequestBuilder) -> (reqwest::Response, Bytes) {
    let mut resp = tokio::time::timeout(Duration::from_secs(10), req.send())
        .await
        .expect("a head while the upstream holds the body")
        .unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("a first chunk while the upstream holds the rest")
        .unwrap()
        .expect("a chunk, not the end");
    (resp, chunk)
}

async fn rest_of(mut resp: reqwest::Response) -> Vec<u8> {
    let mut rest = Vec::new();
    while let Some(c) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_bytes_arrive_while_the_upstream_holds_the_rest() {
    let (up, streams, _task) = streams_upstream().await;
    let cg = cachegate(&up, &[]);
    let cases = [
        ("cacheable", "/gated/a?cc=max-age%3D60", None),
        ("uncacheable", "/gated/b?cc=no-store", None),
        ("bypassed", "/gated/c?cc=max-age%3D60", Some("Bearer t")),
    ];
    for (what, target, authorization) in cases {
        let mut req = client().get(format!("{}{target}", cg.url));
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let (resp, first) = first_chunk(req).await;
        assert_eq!(resp.status(), 200, "{what}");
        assert_eq!(
            first, "first,",
            "{what}: the first bytes came before the rest was sent"
        );
        let path = target.split('?').next().unwrap();
        streams.release(path, 1);
        assert_eq!(rest_of(resp).await, b"rest", "{what}");
    }
    // The cacheable answer was stored whole once its body ended.
    let again = get(&format!("{}/gated/a?cc=max-age%3D60", cg.url)).await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.body, "first,rest");
    assert_eq!(streams.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_longer_than_the_timeout_is_relayed_and_stored_while_it_keeps_coming() {
    let (up, _streams, _task) = streams_upstream().await;
    let cg = cachegate(&up, &[("CACHEGATE_UPSTREAM__TIMEOUT", "1s")]);
    // 8 chunks, 300 ms apart: 2.1 s in all, never 1 s without a chunk.
    let url = format!("{}/paced?every_ms=300&chunks=8&cc=max-age%3D60", cg.url);
    let r = get(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "0,1,2,3,4,5,6,7,");
    let again = get(&url).await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.body, "0,1,2,3,4,5,6,7,");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_stalls_past_the_timeout_is_cut_off_and_not_stored() {
    let (up, streams, _task) = streams_upstream().await;
    let cg = cachegate(&up, &[("CACHEGATE_UPSTREAM__TIMEOUT", "1s")]);
    let url = format!("{}/stall?cc=max-age%3D60", cg.url);
    let (resp, first) = first_chunk(client().get(&url)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        "100",
        "the upstream's length"
    );
    assert_eq!(first, "first,");
    let rest = tokio::time::timeout(Duration::from_secs(10), resp.bytes())
        .await
        .expect("cut off after upstream.timeout, not after the upstream's 30 s");
    assert!(rest.is_err(), "the client sees the body end short");
    let calls = streams.calls.load(Ordering::SeqCst);
    let (again, _) = first_chunk(client().get(&url)).await;
    assert_ne!(
        again.headers()["x-cache"],
        "HIT",
        "a cut-off body is never stored"
    );
    assert_eq!(streams.calls.load(Ordering::SeqCst), calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_beyond_the_entry_limit_streams_whole_and_is_not_stored() {
    let (up, streams, _task) = streams_upstream().await;
    // The limit counts the bytes stored; without compression they are
    // the upstream's (compressed, this repetitive body would fit).
    let cg = cachegate(
        &up,
        &[
            ("CACHEGATE_CACHE__MAX_ENTRY_BYTES", "64KiB"),
            ("CACHEGATE_CACHE__COMPRESSION", "off"),
        ],
    );
    // 256 KiB without a Content-Length: the limit shows only as it streams.
    let url = format!("{}/big?kib=256&cc=max-age%3D60", cg.url);
    let r = get(&url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 256 * 1024, "relayed whole");
    let again = get(&url).await;
    assert_eq!(again.body.len(), 256 * 1024);
    assert_eq!(again.x_cache(), "MISS", "not stored");
    assert_eq!(streams.calls.load(Ordering::SeqCst), 2);
    // Within the limit, the same stream is stored.
    let small = format!("{}/big?kib=32&cc=max-age%3D60", cg.url);
    assert_eq!(get(&small).await.body.len(), 32 * 1024);
    assert_eq!(get(&small).await.x_cache(), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_released_at_the_head_of_an_answer_that_cannot_be_stored() {
    let (up, streams, _task) = streams_upstream().await;
    let cg = cachegate(&up, &[]);
    let url = format!("{}/gated/new?cc=no-store", cg.url);
    // Three requests for a key never seen, at once: one fetches, two wait
    // for it; its head says no-store, so the two go upstream then, while
    // the first body is still held.
    let heads: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { first_chunk(client().get(url)).await })
        })
        .collect();
    let mut responses = Vec::new();
    for h in heads {
        let (resp, first) = h.await.unwrap();
        assert_eq!(first, "first,");
        responses.push(resp);
    }
    assert_eq!(
        streams.calls.load(Ordering::SeqCst),
        3,
        "all three reached the upstream before any body ended"
    );
    streams.release("/gated/new", 3);
    for resp in responses {
        assert_eq!(rest_of(resp).await, b"rest");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_stop_reading_are_disconnected_after_the_send_timeout() {
    let (up, _streams, _task) = streams_upstream().await;
    let cg = cachegate(&up, &[("CACHEGATE_SERVE__SEND_TIMEOUT", "1s")]);
    // 8 MiB, uncacheable: far more than socket buffers hold.
    let request = "GET /big?kib=8192&cc=no-store HTTP/1.1\r\nHost: cachegate.test\r\n\r\n";
    let mut sockets = Vec::new();
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(cg.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        sockets.push(s);
    }
    // Not reading for longer than the send timeout.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for mut s in sockets {
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the connection was closed");
        assert!(
            got < 8 * 1024 * 1024,
            "closed before the whole body was sent ({got} bytes)"
        );
    }
}
