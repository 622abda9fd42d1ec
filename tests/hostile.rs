//! Hostile input, end to end through the built `cachegate serve` (requests
//! written byte for byte on raw TCP, so casing, duplicates and odd targets
//! reach the server exactly as an attacker would send them) in front of
//! the real test upstream, which echoes the headers it received.
//!
//! The answers each case must get are tabled in docs/hostile-input.md.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::raw::{parse, raw, Raw};
use common::{cachegate, upstream};

/// `GET target` with `headers` (written exactly as given) on a fresh connection.
async fn get_raw(cg: &common::Cachegate, target: &str, headers: &[(&str, &str)]) -> Raw {
    common::raw::send(cg, "GET", target, headers).await
}

const CACHEABLE: &str = "cc=max-age%3D60";

// ---------------------------------------------------------------------------
// Poisoning

/// A case name, the headers an attacker adds, and a marker that must never
/// reach a client that did not send it.
type PoisoningCase = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static str,
);

fn poisoning_cases() -> Vec<PoisoningCase> {
    vec![
        (
            "x-forwarded-host",
            vec![("X-Forwarded-Host", "evil-xfh.example")],
            "evil-xfh",
        ),
        (
            "x-forwarded-proto",
            vec![("X-Forwarded-Proto", "evilproto")],
            "evilproto",
        ),
        (
            "x-original-url",
            vec![("X-Original-URL", "/evil-original")],
            "evil-original",
        ),
        (
            "x-rewrite-url",
            vec![("X-Rewrite-URL", "/evil-rewrite")],
            "evil-rewrite",
        ),
        (
            "x-http-method-override",
            vec![("X-HTTP-Method-Override", "DELETE")],
            "DELETE",
        ),
        ("x-http-method", vec![("X-HTTP-Method", "DELETE")], "DELETE"),
        (
            "x-method-override",
            vec![("X-Method-Override", "DELETE")],
            "DELETE",
        ),
        (
            "forwarded",
            vec![("Forwarded", "host=evil-fwd.example;proto=http")],
            "evil-fwd",
        ),
        (
            "x-forwarded-server",
            vec![("X-Forwarded-Server", "evil-xfs")],
            "evil-xfs",
        ),
        (
            "x-forwarded-scheme",
            vec![("X-Forwarded-Scheme", "evil-scheme")],
            "evil-scheme",
        ),
        (
            "x-forwarded-port",
            vec![("X-Forwarded-Port", "31337")],
            "31337",
        ),
        (
            "x-forwarded-prefix",
            vec![("X-Forwarded-Prefix", "/evil-prefix")],
            "evil-prefix",
        ),
        (
            "x-host",
            vec![("X-Host", "evil-xhost.example")],
            "evil-xhost",
        ),
        (
            "x-original-host",
            vec![("X-Original-Host", "evil-xoh")],
            "evil-xoh",
        ),
        ("host", vec![("Host", "evil-host.example")], "evil-host"),
        (
            "odd casing",
            vec![("x-FORWARDED-host", "evil-case.example")],
            "evil-case",
        ),
        (
            "odd casing 2",
            vec![("FORWARDED", "for=1;host=evil-case2")],
            "evil-case2",
        ),
        (
            "duplicates",
            vec![
                ("X-Forwarded-Host", "good.example"),
                ("x-forwarded-host", "evil-dup.example"),
                ("X-FORWARDED-HOST", "evil-dup2.example"),
            ],
            "evil-dup",
        ),
        (
            "underscore spelling",
            vec![("X_Forwarded_Host", "evil-underscore.example")],
            "evil-underscore",
        ),
        (
            "underscore, mixed",
            vec![("x-forwarded_HOST", "evil-mixed.example")],
            "evil-mixed",
        ),
        (
            "x-original-uri",
            vec![("X-Original-URI", "/evil-xouri")],
            "evil-xouri",
        ),
        (
            "x-forwarded-uri",
            vec![("X-Forwarded-Uri", "/evil-xfuri")],
            "evil-xfuri",
        ),
        (
            "x-forwarded-path",
            vec![("X-Forwarded-Path", "/evil-xfpath")],
            "evil-xfpath",
        ),
        (
            "x-forwarded-ssl",
            vec![("X-Forwarded-Ssl", "evil-ssl")],
            "evil-ssl",
        ),
        (
            "x-forwarded-protocol",
            vec![("X-Forwarded-Protocol", "evil-protocol")],
            "evil-protocol",
        ),
        (
            "front-end-https",
            vec![("Front-End-Https", "evil-feh")],
            "evil-feh",
        ),
        (
            "x-url-scheme",
            vec![("X-Url-Scheme", "evil-urlscheme")],
            "evil-urlscheme",
        ),
        (
            "folded list",
            vec![("X-Forwarded-Host", "good.example, evil-list.example")],
            "evil-list",
        ),
        (
            "all at once",
            vec![
                ("X-Forwarded-Host", "evil-all.example"),
                ("X-Forwarded-Proto", "evil-all"),
                ("X-Original-URL", "/evil-all"),
                ("X-Rewrite-URL", "/evil-all"),
                ("X-HTTP-Method-Override", "POST"),
                ("Forwarded", "host=evil-all"),
            ],
            "evil-all",
        ),
    ]
}

#[tokio::test]
async fn unkeyed_routing_headers_never_shape_what_others_are_served() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let upstream_host = up.url.trim_start_matches("http://").to_owned();
    for (i, (case, headers, marker)) in poisoning_cases().into_iter().enumerate() {
        let target = format!("/poison/{i}?{CACHEABLE}&echo=1");
        let attack = get_raw(&cg, &target, &headers).await;
        assert_eq!(attack.status, 200, "{case}: {}", attack.head);
        let stored = attack
            .header("cache-status")
            .is_some_and(|s| s.contains("stored"));
        let seen = up.state.last(&format!("/poison/{i}"));
        let seen_text = format!("{:?}", seen.headers);
        // `Host` becomes cachegate's own `X-Forwarded-Host`, which is part
        // of the key: the attacker's answer is its own entry.
        let keyed = case == "host";
        if stored && !keyed {
            // What was stored was built without the attacker's headers.
            assert!(
                !seen_text.contains(marker) && !attack.text().contains(marker),
                "{case}: a stored response was built from the attacker's header: {seen_text}"
            );
        }
        assert_eq!(seen.method, "GET", "{case}");
        assert_eq!(seen.path_and_query, target, "{case}");
        // The upstream is always addressed by its configured host.
        assert_eq!(seen.headers["host"], upstream_host.as_str(), "{case}");

        let victim = get_raw(&cg, &target, &[]).await;
        assert_eq!(victim.status, 200, "{case}");
        assert!(
            !victim.text().contains(marker),
            "{case}: the victim was served the attacker's variant: {}",
            victim.text()
        );
        if stored && !keyed {
            assert_eq!(victim.x_cache(), "HIT", "{case}");
            assert_eq!(victim.body, attack.body, "{case}");
        }
        if keyed {
            assert_eq!(victim.x_cache(), "MISS", "{case}");
        }
    }

    // A bypassed request (here: unsafe method) is forwarded faithfully but
    // for the forwarding headers, which are cachegate's own on every
    // request, and nothing it causes is stored.
    let target = format!("/poison/post?{CACHEABLE}&echo=1");
    let post = raw(
        cg.addr,
        format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: app.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(post.x_cache(), "BYPASS");
    assert!(!post.text().contains("app.example"));
    assert!(
        post.text().contains(r#""x-forwarded-host":["x"]"#),
        "{}",
        post.text()
    );
    let after = get_raw(&cg, &target, &[]).await;
    assert_eq!(after.x_cache(), "MISS");
    assert!(!after.text().contains("app.example"));
}

/// When a route keys on such a header, it reaches the upstream and each
/// value gets its own entry: a client without it never sees another's.
#[tokio::test]
async fn a_keyed_routing_header_splits_entries_instead() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[(
            "CACHEGATE_CACHE__KEY_HEADERS",
            "[\"x-forwarded-host\", \"x-http-method-override\"]",
        )],
    );
    let target = format!("/keyed?{CACHEABLE}&echo=1");
    let a = get_raw(&cg, &target, &[("X-Forwarded-Host", "tenant-a.example")]).await;
    assert!(a.text().contains("tenant-a.example"));
    for (headers, marker_absent) in [
        (vec![], "tenant-a"),
        (vec![("X-Forwarded-Host", "tenant-b.example")], "tenant-a"),
        (
            vec![("x-forwarded-host", "TENANT-A.example")],
            "tenant-a.example",
        ),
        (
            vec![
                ("X-Forwarded-Host", "tenant-a.example"),
                ("X-Forwarded-Host", "x"),
            ],
            "\"tenant-a.example\"]",
        ),
        (
            vec![
                ("X-Forwarded-Host", "tenant-a.example"),
                ("X-HTTP-Method-Override", "DELETE"),
            ],
            "\"tenant-a.example\"],\"host\"",
        ),
    ] {
        let r = get_raw(&cg, &target, &headers).await;
        assert_eq!(r.x_cache(), "MISS", "{headers:?} shared tenant-a's entry");
        assert!(
            !r.text().contains(marker_absent),
            "{headers:?}: {}",
            r.text()
        );
    }
    let again = get_raw(&cg, &target, &[("X-Forwarded-Host", "tenant-a.example")]).await;
    assert_eq!(again.x_cache(), "HIT");
    assert_eq!(again.body, a.body);
}

// ---------------------------------------------------------------------------
// Deception and key confusion

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Served from the seed's entry, no upstream call.
    Same,
    /// Its own entry: the upstream is asked for exactly this path and query.
    Different(&'static str),
    /// Refused with this status before reaching the upstream.
    Rejected(u16),
}

#[tokio::test]
async fn lookalike_targets_get_their_documented_key() {
    let up = upstream().await;
    let cg = cachegate(&format!("{}/api", up.url), &[]);
    let seeds = [
        "/items/1?cc=max-age%3D60",
        "/q?a=1&a=2&cc=max-age%3D60",
        "/s?cc=max-age%3D60&q=a+b",
    ];
    let mut seed_bodies = Vec::new();
    for seed in seeds {
        let r = get_raw(&cg, seed, &[]).await;
        assert_eq!(r.x_cache(), "MISS", "{seed}");
        assert!(r.header("cache-status").unwrap().contains("stored"));
        seed_bodies.push(r.body);
    }
    use Expect::*;
    let cases: &[(&str, usize, Expect)] = &[
        ("/items/1?cc=max-age%3D60", 0, Same),
        // Query bytes are kept as sent: `=` and `%3D` are different bytes.
        (
            "/items/1?cc=max-age=60",
            0,
            Different("/api/items/1?cc=max-age=60"),
        ),
        // Unreserved escapes are decoded (RFC 3986 §6.2.2.2).
        ("/items/%31?cc=max-age%3D60", 0, Same),
        ("/%69tems/1?cc=max-age%3D60", 0, Same),
        // Forms origins read as dot segments though RFC 3986 does not.
        ("/x/..;/items/1?cc=max-age%3D60", 0, Rejected(400)),
        ("/items/..;x/items/1?cc=max-age%3D60", 0, Rejected(400)),
        ("/items/.;x/1?cc=max-age%3D60", 0, Rejected(400)),
        ("/x/..%2Fitems/1?cc=max-age%3D60", 0, Rejected(400)),
        ("/x/..%5Citems/1?cc=max-age%3D60", 0, Rejected(400)),
        ("/items/%zz?cc=max-age%3D60", 0, Rejected(400)),
        ("/items/1?cc=max-age%3D60&", 0, Same),
        ("/items/1?&cc=max-age%3D60", 0, Same),
        ("/items/1?cc=max-age%3D60#frag", 0, Same),
        ("/items/./1?cc=max-age%3D60", 0, Same),
        ("/x/../items/1?cc=max-age%3D60", 0, Same),
        ("/x/%2e%2E/items/1?cc=max-age%3D60", 0, Same),
        ("/../../items/1?cc=max-age%3D60", 0, Same),
        ("http://evil.example/items/1?cc=max-age%3D60", 0, Same),
        (
            "/items/1/?cc=max-age%3D60",
            0,
            Different("/api/items/1/?cc=max-age%3D60"),
        ),
        (
            "/items/1;x?cc=max-age%3D60",
            0,
            Different("/api/items/1;x?cc=max-age%3D60"),
        ),
        ("/items/1%2F..?cc=max-age%3D60", 0, Rejected(400)),
        ("/items/1%2f..?cc=max-age%3D60", 0, Rejected(400)),
        (
            "/items/1%2f?cc=max-age%3D60",
            0,
            Different("/api/items/1%2F?cc=max-age%3D60"),
        ),
        (
            "/ITEMS/1?cc=max-age%3D60",
            0,
            Different("/api/ITEMS/1?cc=max-age%3D60"),
        ),
        // Dot segments to an origin that decodes twice or folds NFKC
        // (issue 24); `upstream.path_equivalence` is lenient by default.
        ("/items/1%252F..?cc=max-age%3D60", 0, Rejected(400)),
        ("/x/%252e%252e/items/1?cc=max-age%3D60", 0, Rejected(400)),
        (
            "/x/%EF%BC%8E%EF%BC%8E/items/1?cc=max-age%3D60",
            0,
            Rejected(400),
        ),
        (
            "/items/%2531?cc=max-age%3D60",
            0,
            Different("/api/items/%2531?cc=max-age%3D60"),
        ),
        (
            "/items//1?cc=max-age%3D60",
            0,
            Different("/api/items//1?cc=max-age%3D60"),
        ),
        (
            "/items/1%3Fa=1?cc=max-age%3D60",
            0,
            Different("/api/items/1%3Fa=1?cc=max-age%3D60"),
        ),
        (
            "/items/1%23frag?cc=max-age%3D60",
            0,
            Different("/api/items/1%23frag?cc=max-age%3D60"),
        ),
        (
            "/items/1?cc=max-age%3D60&x=",
            0,
            Different("/api/items/1?cc=max-age%3D60&x="),
        ),
        (
            "/q?A=1&a=2&cc=max-age%3D60",
            1,
            Different("/api/q?A=1&a=2&cc=max-age%3D60"),
        ),
        (
            "/q?a=2&a=1&cc=max-age%3D60",
            1,
            Different("/api/q?a=2&a=1&cc=max-age%3D60"),
        ),
        ("/q?a=1&cc=max-age%3D60&a=2", 1, Same),
        ("/q?cc=max-age%3D60&a=1&a=2", 1, Same),
        (
            "/q?a=1,2&cc=max-age%3D60",
            1,
            Different("/api/q?a=1,2&cc=max-age%3D60"),
        ),
        (
            "/s?cc=max-age%3D60&q=a%20b",
            2,
            Different("/api/s?cc=max-age%3D60&q=a%20b"),
        ),
        ("/s?q=a+b&cc=max-age%3D60", 2, Same),
        (
            "/s?cc=max-age%3D60&q=a%2Bb",
            2,
            Different("/api/s?cc=max-age%3D60&q=a%2Bb"),
        ),
        (
            "/s?cc=max-age%3D60&q=a%2520b",
            2,
            Different("/api/s?cc=max-age%3D60&q=a%2520b"),
        ),
        ("/items\\1?cc=max-age%3D60", 0, Rejected(400)),
        ("/items/1 x?cc=max-age%3D60", 0, Rejected(400)),
        (
            "/items/\u{e9}?cc=max-age%3D60",
            0,
            Different("/api/items/%C3%A9?cc=max-age%3D60"),
        ),
        ("items/1?cc=max-age%3D60", 0, Rejected(400)),
    ];
    for &(target, seed, expect) in cases {
        let before = up.state.seen.lock().unwrap().len();
        let r = get_raw(&cg, target, &[]).await;
        let after = up.state.seen.lock().unwrap().len();
        match expect {
            Same => {
                assert_eq!(r.status, 200, "{target}");
                assert_eq!(r.x_cache(), "HIT", "{target} did not share the seed's key");
                assert_eq!(r.body, seed_bodies[seed], "{target}");
                assert_eq!(after, before, "{target} reached the upstream");
            }
            Different(pq) => {
                assert_eq!(r.status, 200, "{target}");
                assert_eq!(r.x_cache(), "MISS", "{target} shared another entry");
                assert_eq!(after, before + 1, "{target}");
                let seen = up.state.seen.lock().unwrap().last().unwrap().clone();
                assert_eq!(seen.path_and_query, pq, "{target}");
                // The answer is the upstream's for this very path.
                let path = pq.split('?').next().unwrap();
                assert_eq!(r.json()["path"], path, "{target}");
                // And it is now an entry of its own.
                let again = get_raw(&cg, target, &[]).await;
                assert_eq!(again.x_cache(), "HIT", "{target}");
                assert_eq!(again.json()["path"], path, "{target}");
            }
            Rejected(status) => {
                assert_eq!(r.status, status, "{target}: {}", r.head);
                assert_eq!(after, before, "{target} reached the upstream");
            }
        }
    }
    // No look-alike replaced what the seeds stored.
    for (seed, body) in seeds.iter().zip(&seed_bodies) {
        let r = get_raw(&cg, seed, &[]).await;
        assert_eq!(r.x_cache(), "HIT", "{seed}");
        assert_eq!(&r.body, body, "{seed}");
    }
}

/// A GET with a body neither reads nor writes the cache: what a body means
/// on a GET is undefined, so it cannot share an entry with one without.
#[tokio::test]
async fn a_get_with_a_body_bypasses_the_cache() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let target = format!("/items/1?{CACHEABLE}");
    let seed = get_raw(&cg, &target, &[]).await;
    assert_eq!(seed.x_cache(), "MISS");
    for request in [
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{{\"id\": 666}}"),
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nb\r\n{{\"id\": 666}}\r\n0\r\n\r\n"),
    ] {
        let r = raw(cg.addr, request.as_bytes()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "BYPASS");
        assert!(r.header("cache-status").unwrap().contains("request-body"));
        assert_eq!(&up.state.last("/items/1").body[..], b"{\"id\": 666}");
    }
    let after = get_raw(&cg, &target, &[]).await;
    assert_eq!(after.x_cache(), "HIT");
    assert_eq!(after.body, seed.body);
    // Ambiguous framing is refused outright (request smuggling).
    let r = raw(
        cg.addr,
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello!").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400);
}

// ---------------------------------------------------------------------------
// No open proxy

/// A loopback listener that must never be reached: counts connections.
async fn evil_listener() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
                .await;
        }
    });
    (addr, count)
}

#[tokio::test]
async fn requests_cannot_send_the_proxy_anywhere_but_the_upstream() {
    let (evil, evil_hits) = evil_listener().await;
    let up = upstream().await;
    let cg = cachegate(&format!("{}/api", up.url), &[]);
    let requests = [
        format!("GET http://{evil}/x HTTP/1.1\r\nHost: {evil}\r\n"),
        format!("GET https://{evil}/x HTTP/1.1\r\nHost: {evil}\r\n"),
        format!("GET http://user@{evil}/x HTTP/1.1\r\nHost: {evil}\r\n"),
        format!("GET http://{}@{evil}/x HTTP/1.1\r\n", up.url.trim_start_matches("http://")),
        format!("GET /x HTTP/1.1\r\nHost: {evil}\r\n"),
        format!("GET //{evil}/x HTTP/1.1\r\nHost: {evil}\r\n"),
        format!("GET ///{evil}/x HTTP/1.1\r\nHost: x\r\n"),
        format!("GET /@{evil}/x HTTP/1.1\r\nHost: x\r\n"),
        format!("GET @{evil}/x HTTP/1.1\r\nHost: x\r\n"),
        format!("GET /%2F%2F{evil}/x HTTP/1.1\r\nHost: x\r\n"),
        format!("GET /..//{evil}/x HTTP/1.1\r\nHost: x\r\n"),
        format!("GET {evil} HTTP/1.1\r\nHost: x\r\n"),
        format!("GET /x?url=http://{evil}/ HTTP/1.1\r\nHost: x\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: {evil}\r\nForwarded: host={evil}\r\nX-Original-URL: http://{evil}/x\r\nX-Rewrite-URL: http://{evil}/x\r\n"),
        format!("POST http://{evil}/x HTTP/1.1\r\nHost: {evil}\r\nContent-Length: 0\r\n"),
        format!("OPTIONS * HTTP/1.1\r\nHost: {evil}\r\n"),
        format!("CONNECT {evil} HTTP/1.1\r\nHost: {evil}\r\n"),
        // The upstream redirects: relayed, never followed.
        format!("GET /redirect?status=302&location=http://{evil}/x HTTP/1.1\r\nHost: x\r\n"),
    ];
    for r in &requests {
        let before = up.state.seen.lock().unwrap().len();
        let resp = raw(cg.addr, format!("{r}Connection: close\r\n\r\n").as_bytes()).await;
        let first_line = r.lines().next().unwrap();
        assert!(
            !resp.text().contains("evil"),
            "{first_line}: {}",
            resp.text()
        );
        let seen = up.state.seen.lock().unwrap()[before..].to_vec();
        for s in &seen {
            assert!(
                s.path_and_query.starts_with("/api/"),
                "{first_line} reached {}",
                s.path_and_query
            );
        }
        if first_line.starts_with("CONNECT") {
            assert!(
                matches!(resp.status, 400 | 405),
                "{first_line}: {}",
                resp.head
            );
            assert!(seen.is_empty());
        }
        if first_line.contains("redirect") {
            assert_eq!(resp.status, 302);
            assert_eq!(
                resp.header("location"),
                Some(format!("http://{evil}/x").as_str())
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        evil_hits.load(Ordering::SeqCst),
        0,
        "the proxy connected to a host that is not its upstream"
    );
}

// ---------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn request_heads_over_the_limits_are_refused() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_SERVE__MAX_URI_BYTES", "1KiB"),
            ("CACHEGATE_SERVE__MAX_HEADER_BYTES", "16KiB"),
            ("CACHEGATE_SERVE__MAX_HEADERS", "20"),
        ],
    );
    // At the limits: fine.
    let ok_target = format!("/u?q={}", "a".repeat(1024 - 5));
    assert_eq!(ok_target.len(), 1024);
    let ok = get_raw(&cg, &ok_target, &[("x-pad", &"p".repeat(12 * 1024))]).await;
    assert_eq!(ok.status, 200);
    // Request target over max_uri_bytes: 414 before anything else.
    let long = format!("/u?q={}", "a".repeat(1024 - 4));
    let r = get_raw(&cg, &long, &[]).await;
    assert_eq!(r.status, 414);
    assert_eq!(r.json()["error"]["code"], "uri_too_long");
    // A head over max_header_bytes: 431.
    let r = get_raw(&cg, "/h", &[("x-pad", &"p".repeat(17 * 1024))]).await;
    assert_eq!(r.status, 431);
    let many: Vec<(String, String)> = (0..10)
        .map(|i| (format!("x-h{i}"), "p".repeat(1700)))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(get_raw(&cg, "/h", &many).await.status, 431);
    // More header lines than max_headers: 431.
    let names: Vec<String> = (0..25).map(|i| format!("x-n{i}")).collect();
    let lines: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    assert_eq!(get_raw(&cg, "/h", &lines).await.status, 431);
    assert_eq!(up.state.hits("/h"), 0);
    assert_eq!(up.state.hits("/u"), 1);
}

#[tokio::test]
async fn default_head_limits_hold() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let r = get_raw(&cg, &format!("/u?q={}", "a".repeat(9 * 1024)), &[]).await;
    assert_eq!(r.status, 414);
    let r = get_raw(&cg, "/h", &[("x-pad", &"p".repeat(40 * 1024))]).await;
    assert_eq!(r.status, 431);
    let names: Vec<String> = (0..110).map(|i| format!("x-n{i}")).collect();
    let lines: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    assert_eq!(get_raw(&cg, "/h", &lines).await.status, 431);
    assert_eq!(up.state.hits("/h") + up.state.hits("/u"), 0);
}

/// Reads until the server closes the connection (or `limit` passes);
/// returns what was read and when the close came.
async fn until_closed(s: &mut TcpStream, started: Instant, limit: Duration) -> (Vec<u8>, Duration) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, started.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn slow_clients_are_timed_out() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_SERVE__HEADER_READ_TIMEOUT", "1s"),
            ("CACHEGATE_SERVE__BODY_READ_TIMEOUT", "1s"),
        ],
    );
    // Slowloris: a head trickled a byte every 200ms never completes; the
    // server closes the connection once header_read_timeout has passed.
    let s = TcpStream::connect(cg.addr).await.unwrap();
    let started = Instant::now();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = w.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n").await;
        for _ in 0..50 {
            if w.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut out = Vec::new();
    let closed_after = loop {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("a trickled head kept its connection for 5s"),
        }
    };
    writer.abort();
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(3),
        "{closed_after:?}"
    );

    // A connection that sends nothing at all is closed too.
    let mut idle = TcpStream::connect(cg.addr).await.unwrap();
    let (_, idle_closed) = until_closed(&mut idle, Instant::now(), Duration::from_secs(5)).await;
    assert!(idle_closed >= Duration::from_millis(900), "{idle_closed:?}");

    // A body trickled after a complete head: 408 once body_read_timeout passes.
    let mut s = TcpStream::connect(cg.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let (r, w) = s.split();
    let mut r = r;
    let mut w = w;
    let write = async {
        for _ in 0..50 {
            if w.write_all(b"b").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => panic!("slow body not cut off within 5s"),
            }
        }
        (out, started.elapsed())
    };
    let (out, took) = tokio::select! {
        got = read => got,
        () = write => panic!("the server read the whole trickled body"),
    };
    let resp = parse(&out);
    assert_eq!(resp.status, 408, "{}", resp.head);
    assert_eq!(resp.json()["error"]["code"], "request_body_timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(up.state.hits("/slow") + up.state.hits("/slow-body"), 0);

    // Clients at a normal pace are unaffected.
    let ok = get_raw(&cg, "/fine", &[]).await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn upstream_bodies_over_the_limits() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_CACHE__MAX_ENTRY_BYTES", "64KiB"),
            ("CACHEGATE_UPSTREAM__MAX_RESPONSE_BYTES", "1MiB"),
        ],
    );
    // Over the cache limit: relayed whole, not stored.
    let url = format!("/big?{CACHEABLE}&bin=100000");
    let a = get_raw(&cg, &url, &[]).await;
    let b = get_raw(&cg, &url, &[]).await;
    for r in [&a, &b] {
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 100_000);
        assert_eq!(r.x_cache(), "MISS");
    }
    assert!(
        a.header("cache-status").unwrap().contains("too-large"),
        "{}",
        a.header("cache-status").unwrap()
    );
    assert_eq!(up.state.hits("/big"), 2);
    // Under it: stored.
    let url = format!("/small?{CACHEABLE}&bin=60000");
    get_raw(&cg, &url, &[]).await;
    assert_eq!(get_raw(&cg, &url, &[]).await.x_cache(), "HIT");
    // Over upstream.max_response_bytes: a clear 502.
    let r = get_raw(&cg, &format!("/huge?{CACHEABLE}&bin=2000000"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_response_too_large");
}

#[tokio::test]
async fn over_lambdas_response_limit_is_a_clear_502_in_lambda_mode() {
    use figment::providers::{Format, Toml};
    let up = upstream().await;
    let toml = format!("backend = \"memory\"\n[upstream]\nurl = \"{}\"\n", up.url);
    let config = cachegate::resolved::ResolvedConfig::from_figment(
        figment::Figment::new().merge(Toml::string(&toml)),
    )
    .unwrap();
    let proxy = cachegate::build_proxy(&config, cachegate::config::Mode::Lambda)
        .await
        .unwrap();
    let event = |query: &str| {
        let path = format!(
            "{}/tests/fixtures/apigw_v2_get.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["rawPath"] = "/lambda-big".into();
        v["requestContext"]["http"]["path"] = "/lambda-big".into();
        v["rawQueryString"] = query.into();
        lambda_http::request::from_str(&v.to_string()).unwrap()
    };
    // A binary body goes out base64: 4 bytes for 3, within 6 MiB of payload.
    let max = cachegate::lambda_payload::MAX_PAYLOAD_BYTES / 4 * 3;
    let fits = cachegate::lambda::invoke(&proxy, event(&format!("bin={}", max - 8192))).await;
    assert_eq!(fits.status(), 200);
    let over = cachegate::lambda::invoke(&proxy, event(&format!("bin={}", max + 1))).await;
    assert_eq!(over.status(), 502);
    assert_eq!(over.headers()["x-cache"], "MISS");
    let body = match over.body() {
        lambda_http::Body::Text(t) => t.clone(),
        other => panic!("{other:?}"),
    };
    assert!(body.contains("response_too_large_for_lambda"), "{body}");
    // The same answer is fine in serve mode (no such limit there).
    let cg = cachegate(&up.url, &[]);
    let r = get_raw(&cg, &format!("/lambda-big?bin={}", max + 1), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), max + 1);
}

#[test]
fn unsafe_limit_values_stop_start_up_naming_the_key() {
    use figment::providers::{Format, Toml};
    for (serve, key) in [
        ("max_uri_bytes = \"10B\"", "serve.max_uri_bytes"),
        ("max_uri_bytes = \"1MiB\"", "serve.max_uri_bytes"),
        ("max_header_bytes = \"1KiB\"", "serve.max_header_bytes"),
        (
            "max_uri_bytes = \"32KiB\"\nmax_header_bytes = \"16KiB\"",
            "serve.max_header_bytes",
        ),
        ("max_headers = 0", "serve.max_headers"),
        ("max_headers = 100000", "serve.max_headers"),
        ("header_read_timeout = \"0s\"", "serve.header_read_timeout"),
        ("body_read_timeout = \"0s\"", "serve.body_read_timeout"),
    ] {
        let toml = format!("[upstream]\nurl = \"http://127.0.0.1:9\"\n[serve]\n{serve}\n");
        let err = cachegate::config::Config::from_figment(
            figment::Figment::new().merge(Toml::string(&toml)),
        )
        .expect_err(serve)
        .to_string();
        assert!(err.contains(key), "{serve}: {err}");
    }
}
