//! End-to-end: the HTTP caching rules of docs/http-caching.md where they
//! cross the proxy — request-provoked errors kept out of the cache, what a
//! 304 may update, byte ranges from stored responses, `Expires` read
//! strictly, unknown methods invalidating. The built `cachegate serve` in
//! front of real HTTP upstreams on loopback, each written here to answer
//! the way the rule under test needs (an origin that rejects large
//! headers, one that answers 304 the way Express does, ...).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use http::{Request, Response};

use common::{cachegate, client, send};

/// An upstream on loopback answering with `answer(request headers, the
/// number of this request for its path, starting at 1)`.
struct Origin {
    url: String,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Answer = fn(&http::request::Parts, usize) -> Response<Body>;

async fn origin(answer: Answer) -> Origin {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .fallback(
            |State((calls, answer)): State<(Arc<AtomicUsize>, Answer)>, req: Request<Body>| async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                answer(&req.into_parts().0, n)
            },
        )
        .with_state((calls.clone(), answer));
    let (url, task) = common::serve_on_loopback(app).await;
    Origin { url, calls, task }
}

fn respond(status: u16, headers: &[(&str, &str)], body: &'static str) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    r.body(Body::from(body)).unwrap()
}

/// CPDoS (Nguyen et al., CCS 2019, "HTTP Header Oversize"): one request
/// with a header the origin will not take makes it answer 400, and the
/// origin marks even that answer `public, max-age=300`. Before
/// `NotStorable::RequestError`, every later client got that 400 as a HIT.
#[tokio::test]
async fn a_400_provoked_by_an_oversized_header_is_not_served_to_the_next_client() {
    let up = origin(|req, _| {
        let oversized = req.headers.values().any(|v| v.len() > 4096);
        if oversized {
            respond(
                400,
                &[("cache-control", "public, max-age=300")],
                "header too large",
            )
        } else {
            respond(200, &[("cache-control", "public, max-age=300")], "the page")
        }
    })
    .await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/page", cg.url);
    let attack = send(client().get(&url).header("x-oversized", "a".repeat(5000))).await;
    assert_eq!(attack.status, 400);
    assert!(
        attack
            .header("cache-status")
            .contains("detail=request-error"),
        "{}",
        attack.header("cache-status")
    );
    let victim = send(client().get(&url)).await;
    assert_eq!(victim.status, 200, "the stored 400 was served");
    assert_eq!(&victim.body[..], b"the page");
    assert_eq!(up.calls.load(Ordering::SeqCst), 2);
    // And the good answer is stored as usual.
    assert_eq!(send(client().get(&url)).await.x_cache(), "HIT");

    // The setting lets an operator who wants them stored have them.
    let stored = cachegate(
        &up.url,
        &[("CACHEGATE_CACHE__STORE_REQUEST_ERRORS", "true")],
    );
    let url = format!("{}/other", stored.url);
    send(client().get(&url).header("x-oversized", "a".repeat(5000))).await;
    let next = send(client().get(&url)).await;
    assert_eq!((next.status.as_u16(), next.x_cache()), (400, "HIT"));
}

fn accepts_gzip(req: &http::request::Parts) -> bool {
    req.headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"))
}

/// json-server (Express) as measured: `no-cache` with a weak ETag, so
/// every use revalidates; gzip with `Vary: Origin, Accept-Encoding` when
/// the client accepts it, identity with `Vary: Origin` otherwise; and 304s
/// that carry `Vary: Origin` and nothing else. Before the fix the 304's
/// `Vary` replaced the stored one, and identity clients got gzip bytes.
#[tokio::test]
async fn a_304_with_only_vary_origin_never_sends_gzip_to_a_client_that_cannot_read_it() {
    let up = origin(|req, _| {
        if req.headers.contains_key("if-none-match") {
            return respond(304, &[("vary", "Origin")], "");
        }
        if accepts_gzip(req) {
            respond(
                200,
                &[
                    ("cache-control", "no-cache"),
                    ("etag", "W/\"posts-1\""),
                    ("vary", "Origin, Accept-Encoding"),
                    ("content-encoding", "gzip"),
                ],
                "GZIP-BYTES",
            )
        } else {
            respond(
                200,
                &[
                    ("cache-control", "no-cache"),
                    ("etag", "W/\"posts-1\""),
                    ("vary", "Origin"),
                ],
                "plain",
            )
        }
    })
    .await;
    // The upstream's own codings relayed (`cache.compression = "off"`);
    // the default asks for gzip and decodes for these clients
    // (tests/compression.rs). The gzip here is a label, not gzip.
    let cg = cachegate(&up.url, &[("CACHEGATE_CACHE__COMPRESSION", "off")]);
    let url = format!("{}/posts", cg.url);
    let gzip = || {
        client()
            .get(&url)
            .header("accept-encoding", "gzip, deflate")
    };
    let first = send(gzip()).await;
    assert_eq!(
        (first.x_cache(), &first.body[..]),
        ("MISS", &b"GZIP-BYTES"[..])
    );
    // Revalidated twice by 304s carrying only `Vary: Origin`.
    for _ in 0..2 {
        let again = send(gzip()).await;
        assert_eq!(again.x_cache(), "HIT", "{:?}", again.headers);
        assert_eq!(again.header("vary"), "Origin, Accept-Encoding");
        assert_eq!(again.header("content-encoding"), "gzip");
    }
    for accept in [None, Some("br"), Some("identity")] {
        let mut req = client().get(&url);
        if let Some(a) = accept {
            req = req.header("accept-encoding", a);
        }
        let g = send(req).await;
        assert_eq!(g.header("content-encoding"), "", "{accept:?} got gzip");
        assert_eq!(&g.body[..], b"plain", "{accept:?}");
    }
    // A gzip client still gets what it can read.
    let g = send(gzip()).await;
    assert!(g.status.is_success());
    assert!(g.header("content-encoding") == "gzip" || &g.body[..] == b"plain");
}

/// An origin that compresses without saying `Vary`: whatever the key, a
/// stored coding the request does not accept is a miss for it.
#[tokio::test]
async fn a_stored_coding_the_request_does_not_accept_is_a_miss() {
    let up = origin(|req, _| {
        if accepts_gzip(req) {
            respond(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("content-encoding", "gzip"),
                ],
                "GZIP-BYTES",
            )
        } else {
            respond(200, &[("cache-control", "max-age=60")], "plain")
        }
    })
    .await;
    // The upstream's own codings relayed (`cache.compression = "off"`);
    // the default asks for gzip and decodes for these clients
    // (tests/compression.rs). The gzip here is a label, not gzip.
    let cg = cachegate(&up.url, &[("CACHEGATE_CACHE__COMPRESSION", "off")]);
    let url = format!("{}/no-vary", cg.url);
    send(client().get(&url).header("accept-encoding", "gzip")).await;
    let hit = send(client().get(&url).header("accept-encoding", "gzip")).await;
    assert_eq!(hit.x_cache(), "HIT");
    let br = send(client().get(&url).header("accept-encoding", "br")).await;
    assert_eq!((br.x_cache(), &br.body[..]), ("MISS", &b"plain"[..]));
    assert_eq!(up.calls.load(Ordering::SeqCst), 2);
}

/// RFC 9111 §4.3.4: a 304 naming another strong validator than the
/// stored response's must not update it. Before, the old body went out
/// as `ETag: "v2"`; now cachegate asks again without a condition.
#[tokio::test]
async fn a_304_with_a_different_etag_does_not_update_the_stored_response() {
    let up = origin(|req, n| {
        if req.headers.contains_key("if-none-match") {
            return respond(
                304,
                &[("etag", "\"v2\""), ("cache-control", "no-cache")],
                "",
            );
        }
        if n == 1 {
            respond(
                200,
                &[("etag", "\"v1\""), ("cache-control", "no-cache")],
                "one",
            )
        } else {
            respond(
                200,
                &[("etag", "\"v2\""), ("cache-control", "no-cache")],
                "two",
            )
        }
    })
    .await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/doc", cg.url);
    let first = send(client().get(&url)).await;
    assert_eq!(
        (first.header("etag"), &first.body[..]),
        ("\"v1\"", &b"one"[..])
    );
    let second = send(client().get(&url)).await;
    assert_eq!(
        (second.header("etag"), &second.body[..]),
        ("\"v2\"", &b"two"[..]),
        "the body and its ETag must belong together"
    );
    // The conditional request, then the unconditional one.
    assert_eq!(up.calls.load(Ordering::SeqCst), 3);
}

const LAST_MODIFIED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// RFC 9110 §14 and §13.1.5, RFC 9111 §3.4: a fresh stored 200 answers
/// one byte range; a miss still goes upstream.
#[tokio::test]
async fn byte_ranges_are_answered_from_a_fresh_stored_response() {
    let up = origin(|_, _| {
        respond(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("etag", "\"r1\""),
                ("last-modified", LAST_MODIFIED),
                ("content-type", "text/plain"),
            ],
            "0123456789",
        )
    })
    .await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/file", cg.url);
    let ranged = |range: &str| client().get(&url).header("range", range);
    // Nothing stored: the upstream answers the range (this one ignores it).
    let miss = send(ranged("bytes=2-5")).await;
    assert_eq!((miss.status.as_u16(), miss.x_cache()), (200, "BYPASS"));
    assert_eq!(send(client().get(&url)).await.x_cache(), "MISS");

    let part = send(ranged("bytes=2-5")).await;
    assert_eq!((part.status.as_u16(), part.x_cache()), (206, "HIT"));
    assert_eq!(part.header("content-range"), "bytes 2-5/10");
    assert_eq!(part.header("content-length"), "4");
    assert_eq!(part.header("content-type"), "text/plain");
    assert_eq!(part.header("etag"), "\"r1\"");
    assert_eq!(&part.body[..], b"2345");
    let suffix = send(ranged("bytes=-3")).await;
    assert_eq!(
        (suffix.status.as_u16(), &suffix.body[..]),
        (206, &b"789"[..])
    );
    assert_eq!(suffix.header("content-range"), "bytes 7-9/10");

    let past = send(ranged("bytes=20-")).await;
    assert_eq!(past.status.as_u16(), 416);
    assert_eq!(past.header("content-range"), "bytes */10");
    assert!(past.body.is_empty());

    // Several ranges: the whole representation (allowed, RFC 9110 §14.2).
    let several = send(ranged("bytes=0-1, 4-5")).await;
    assert_eq!(
        (several.status.as_u16(), &several.body[..]),
        (200, &b"0123456789"[..])
    );

    for (if_range, status) in [
        ("\"r1\"", 206),
        ("\"other\"", 200),
        ("W/\"r1\"", 200),
        (LAST_MODIFIED, 206),
        ("Sun, 06 Nov 1994 08:49:38 GMT", 200),
    ] {
        let g = send(ranged("bytes=0-3").header("if-range", if_range)).await;
        assert_eq!(g.status.as_u16(), status, "If-Range: {if_range}");
    }
    // A precondition comes before the range (RFC 9110 §13.2.2).
    let cond = send(ranged("bytes=0-3").header("if-none-match", "\"r1\"")).await;
    assert_eq!(cond.status.as_u16(), 304);
    assert_eq!(up.calls.load(Ordering::SeqCst), 2);
}

/// RFC 9110 §5.6.7 and RFC 9111 §5.3: an `Expires` with several spaces
/// between its parts is not an HTTP-date, so the response has already
/// expired. Before, the lenient reader took it for an hour of freshness.
#[tokio::test]
async fn an_expires_that_is_not_an_http_date_has_expired() {
    let up = origin(|req, _| {
        let now = std::time::SystemTime::now();
        let later = httpdate::fmt_http_date(now + std::time::Duration::from_secs(3600));
        let expires = if req.uri.path() == "/spaced" {
            later.split(' ').collect::<Vec<_>>().join("  ")
        } else {
            later
        };
        let date = httpdate::fmt_http_date(now);
        let mut r = respond(200, &[("date", date.as_str())], "x");
        r.headers_mut()
            .insert("expires", http::HeaderValue::from_str(&expires).unwrap());
        r
    })
    .await;
    let cg = cachegate(&up.url, &[]);
    for (path, second) in [("/spaced", "MISS"), ("/valid", "HIT")] {
        let url = format!("{}{path}", cg.url);
        send(client().get(&url)).await;
        assert_eq!(send(client().get(&url)).await.x_cache(), second, "{path}");
    }
}

/// RFC 9213 §2.1: a `CDN-Cache-Control` that is not a valid Structured
/// Field Dictionary, or gives a known directive the wrong type, is
/// ignored as a whole: `Cache-Control` applies. Before, `no-store=5` was
/// obeyed as `no-store`.
#[tokio::test]
async fn an_invalid_cdn_cache_control_is_ignored() {
    let up = origin(|req, _| {
        let cdn = match req.uri.path() {
            "/wrong-type" => "no-store=5",
            "/not-a-dictionary" => "no-store max-age=1",
            _ => "no-store",
        };
        respond(
            200,
            &[("cache-control", "max-age=60"), ("cdn-cache-control", cdn)],
            "x",
        )
    })
    .await;
    let cg = cachegate(&up.url, &[]);
    for (path, second) in [
        ("/wrong-type", "HIT"),
        ("/not-a-dictionary", "HIT"),
        ("/valid", "MISS"),
    ] {
        let url = format!("{}{path}", cg.url);
        send(client().get(&url)).await;
        let g = send(client().get(&url)).await;
        assert_eq!(g.x_cache(), second, "{path}");
        assert!(
            !g.header("cdn-cache-control").is_empty(),
            "passed on as it came"
        );
    }
}

/// RFC 9111 §4.4: methods whose safety is unknown invalidate on success,
/// like the writes — only the URI they name, only when the upstream
/// accepted them. Safe methods never do. (Replaces canonical.rs's
/// `only_writes_and_configured_methods_invalidate`, the old rule.)
#[tokio::test]
async fn unknown_methods_invalidate_their_uri_on_success_only() {
    let up = origin(|req, _| {
        if req.headers.contains_key("x-refuse") {
            respond(405, &[], "no")
        } else {
            respond(200, &[("cache-control", "max-age=60")], "x")
        }
    })
    .await;
    let cg = cachegate(&up.url, &[]);
    let target = format!("{}/inv", cg.url);
    let other = format!("{}/inv-other", cg.url);
    let x_cache = |url: &str| {
        let req = client().get(url);
        async move { send(req).await.x_cache().to_owned() }
    };
    // A miss stores as its body ends: wait for the entry to answer.
    let stored = |url: String| async move {
        for _ in 0..100 {
            if send(client().get(&url)).await.x_cache() == "HIT" {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("{url} was never stored");
    };
    stored(target.clone()).await;
    stored(other.clone()).await;
    let method = |m: &str| reqwest::Method::from_bytes(m.as_bytes()).unwrap();
    for safe in ["OPTIONS", "TRACE"] {
        send(client().request(method(safe), &target)).await;
        assert_eq!(x_cache(&target).await, "HIT", "{safe} invalidated");
    }
    for unknown in ["PURGEME", "M-SEARCH", "PROPFIND", "get"] {
        let refused = send(
            client()
                .request(method(unknown), &target)
                .header("x-refuse", "1"),
        )
        .await;
        assert_eq!(refused.status, 405, "{unknown}");
        assert_eq!(
            x_cache(&target).await,
            "HIT",
            "{unknown} refused, yet invalidated"
        );
        let accepted = send(client().request(method(unknown), &target)).await;
        assert_eq!(accepted.status, 200, "{unknown}");
        assert_eq!(
            x_cache(&target).await,
            "MISS",
            "{unknown} did not invalidate"
        );
        assert_eq!(
            x_cache(&other).await,
            "HIT",
            "{unknown} reached another URI"
        );
        stored(target.clone()).await;
    }
}
