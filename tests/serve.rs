//! End-to-end: the built `cachegate serve` on the memory backend in front
//! of a real HTTP upstream on loopback.

mod common;

use std::time::Duration;

use common::{cachegate, client, get, send, upstream};

const CACHEABLE: &str = "cc=max-age%3D60";

#[tokio::test]
async fn miss_then_hit_with_cache_headers() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/items/1?{CACHEABLE}", cg.url);
    let first = get(&url).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    assert!(
        first.header("cache-status").contains("fwd=uri-miss"),
        "{}",
        first.header("cache-status")
    );
    assert!(first.header("cache-status").contains("stored"));
    let second = get(&url).await;
    assert_eq!(second.x_cache(), "HIT");
    assert_eq!(second.body, first.body);
    assert!(second
        .header("cache-status")
        .starts_with("cachegate; hit; ttl="));
    assert_eq!(second.header("x-upstream-header"), "kept");
    assert_eq!(second.header("content-type"), "application/json");
    // The upstream's Cache-Control goes out as it came; Age says how old.
    assert_eq!(second.header("cache-control"), "max-age=60");
    assert_eq!(first.header("cache-control"), "max-age=60");
    // Server-Timing: the lookup always, the upstream call when there was one.
    let timing = |g: &common::Got| {
        g.headers
            .get_all("server-timing")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    assert!(
        timing(&first).contains("cache;dur=") && timing(&first).contains("upstream;dur="),
        "{}",
        timing(&first)
    );
    assert!(
        timing(&second).contains("cache;dur=") && !timing(&second).contains("upstream"),
        "{}",
        timing(&second)
    );
    let age: u64 = second.header("age").parse().unwrap();
    assert!(age <= 2);
    assert_eq!(up.state.hits("/items/1"), 1);
}

#[tokio::test]
async fn unstorable_responses_are_never_served_to_another_request() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_CACHE__DEFAULT_TTL", "60s")]);
    for (path, query, why) in [
        ("/no-store", "cc=no-store%2C%20max-age%3D60", "no-store"),
        ("/private", "cc=private%2C%20max-age%3D60", "private"),
        (
            "/cookie",
            "cc=max-age%3D60&set_cookie=session%3Dalice",
            "set-cookie",
        ),
    ] {
        let url = format!("{}{path}?{query}", cg.url);
        let a = get(&url).await;
        let b = get(&url).await;
        assert_eq!(a.x_cache(), "MISS", "{path}");
        assert_eq!(b.x_cache(), "MISS", "{path} was served from cache");
        assert!(
            b.header("cache-status").contains(why),
            "{path}: {}",
            b.header("cache-status")
        );
        assert_ne!(
            a.json()["n"],
            b.json()["n"],
            "{path}: same upstream answer twice"
        );
        assert_eq!(up.state.hits(path), 2, "{path}");
        // The upstream's own Cache-Control goes out unchanged: the edge must not share it either.
        if path != "/cookie" {
            assert!(
                b.header("cache-control").contains(why),
                "{path}: {}",
                b.header("cache-control")
            );
        }
    }
    // The cookie reached each client that caused a fetch.
    let c = get(&format!(
        "{}/cookie?cc=max-age%3D60&set_cookie=session%3Dalice",
        cg.url
    ))
    .await;
    assert_eq!(c.header("set-cookie"), "session=alice");
}

#[tokio::test]
async fn authorization_bypasses_unless_the_route_keys_on_it() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/me?{CACHEABLE}", cg.url);
    let alice = send(client().get(&url).header("authorization", "Bearer alice")).await;
    assert_eq!(alice.x_cache(), "BYPASS");
    assert!(alice
        .header("cache-status")
        .contains("detail=authorization"));
    assert_eq!(
        up.state.last("/me").headers["authorization"],
        "Bearer alice"
    );
    // Nothing Alice fetched is served to an anonymous request...
    let anon = get(&url).await;
    assert_eq!(anon.x_cache(), "MISS");
    // ...and what is cached for anonymous requests is not served to Bob.
    let bob = send(client().get(&url).header("authorization", "Bearer bob")).await;
    assert_eq!(bob.x_cache(), "BYPASS");
    assert_eq!(up.state.hits("/me"), 3);

    // A route keyed on Authorization caches per credential, private at the edge.
    let keyed = cachegate(
        &up.url,
        &[(
            "CACHEGATE_ROUTES",
            "[{path=\"/mine\", key_headers=[\"authorization\"]}]",
        )],
    );
    let url = format!("{}/mine?{CACHEABLE}", keyed.url);
    let a1 = send(client().get(&url).header("authorization", "Bearer alice")).await;
    let b1 = send(client().get(&url).header("authorization", "Bearer bob")).await;
    let a2 = send(client().get(&url).header("authorization", "Bearer alice")).await;
    let anon = get(&url).await;
    assert_eq!(
        (a1.x_cache(), b1.x_cache(), a2.x_cache(), anon.x_cache()),
        ("MISS", "MISS", "HIT", "MISS")
    );
    assert_eq!(a2.body, a1.body);
    assert_ne!(b1.json()["n"], a1.json()["n"]);
    // Never shareable at the edge: private, no public, no s-maxage, keyed in Vary.
    for g in [&a1, &a2] {
        let cc = g.header("cache-control");
        assert!(
            cc.contains("private") && !cc.contains("public") && !cc.contains("s-maxage"),
            "{cc}"
        );
        assert_eq!(g.header("vary"), "authorization");
    }
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/greeting?{CACHEABLE}&vary=Accept-Language", cg.url);
    let c = client();
    let en = send(c.get(&url).header("accept-language", "en")).await;
    let fr = send(c.get(&url).header("accept-language", "fr")).await;
    let en2 = send(c.get(&url).header("accept-language", "en")).await;
    let fr2 = send(c.get(&url).header("accept-language", "fr")).await;
    let none = send(c.get(&url)).await;
    assert_eq!(
        (
            en.x_cache(),
            fr.x_cache(),
            en2.x_cache(),
            fr2.x_cache(),
            none.x_cache()
        ),
        ("MISS", "MISS", "HIT", "HIT", "MISS")
    );
    assert_eq!(en2.json()["lang"], "en");
    assert_eq!(fr2.json()["lang"], "fr");
    assert_eq!(none.json()["lang"], "");
    assert_eq!(up.state.hits("/greeting"), 3);
}

#[tokio::test]
async fn head_is_served_from_the_get_entry_and_not_stored_on_its_own() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/h?{CACHEABLE}", cg.url);
    let cold = send(client().head(&url)).await;
    assert_eq!(cold.x_cache(), "MISS");
    assert!(cold.body.is_empty());
    assert_eq!(up.state.last("/h").method, "HEAD");
    let get1 = get(&url).await;
    assert_eq!(
        get1.x_cache(),
        "MISS",
        "a HEAD response was stored as the GET entry"
    );
    let head = send(client().head(&url)).await;
    assert_eq!(head.x_cache(), "HIT");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get1.body.len().to_string());
    assert_eq!(up.state.hits("/h"), 2);
}

#[tokio::test]
async fn conditional_requests_get_304_from_a_fresh_entry() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/etag?{CACHEABLE}&etag=%22v1%22", cg.url);
    let first = get(&url).await;
    assert_eq!(first.header("etag"), "\"v1\"");
    let nm = send(client().get(&url).header("if-none-match", "\"v1\"")).await;
    assert_eq!(nm.status, 304);
    assert_eq!(nm.x_cache(), "HIT");
    assert!(nm.body.is_empty());
    let weak = send(
        client()
            .get(&url)
            .header("if-none-match", "W/\"v1\", \"other\""),
    )
    .await;
    assert_eq!(weak.status, 304);
    let other = send(client().get(&url).header("if-none-match", "\"v0\"")).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.body, first.body);
    assert_eq!(up.state.hits("/etag"), 1);
    // The client's validators never reached the upstream in place of ours.
    assert!(up
        .state
        .last("/etag")
        .headers
        .get("if-none-match")
        .is_none());
}

#[tokio::test]
async fn stale_entries_are_revalidated_with_their_validator() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    // Three seconds of freshness: the HIT after the 304 must come within
    // them even on a busy machine (one second was too little under load).
    let url = format!("{}/reval?cc=max-age%3D3&etag=%22r1%22", cg.url);
    let first = get(&url).await;
    assert_eq!(first.x_cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let second = get(&url).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, first.body, "revalidated entry lost its body");
    assert!(
        second
            .header("cache-status")
            .contains("fwd=stale; fwd-status=304"),
        "{}",
        second.header("cache-status")
    );
    assert_eq!(up.state.last("/reval").headers["if-none-match"], "\"r1\"");
    // The 304 refreshed the entry: fresh again, no upstream call.
    let third = get(&url).await;
    assert_eq!(third.x_cache(), "HIT");
    assert_eq!(up.state.hits("/reval"), 2);
}

#[tokio::test]
async fn upstream_failures_are_clear_json_errors() {
    // Nothing listens on this port: connection refused.
    let port = cachegate_test_net::free_port();
    let cg = cachegate(&format!("http://127.0.0.1:{port}"), &[]);
    let r = get(&format!("{}/x", cg.url)).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");

    let up = upstream().await;
    let slow = cachegate(&up.url, &[("CACHEGATE_UPSTREAM__TIMEOUT", "300ms")]);
    let r = get(&format!("{}/slow?delay_ms=2000", slow.url)).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn stale_if_error_answers_when_the_upstream_fails() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/sie?cc=max-age%3D1%2C%20stale-if-error%3D60", cg.url);
    let first = get(&url).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.state
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let stale = get(&url).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(stale.body, first.body);
    assert!(stale.header("cache-status").contains("stale-if-error"));
    // The upstream's directives with an Age past them: the next cache sees
    // a stale answer, not a fresh one.
    assert_eq!(
        stale.header("cache-control"),
        "max-age=1, stale-if-error=60"
    );
    let age: u64 = stale.header("age").parse().unwrap();
    assert!(age >= 1, "a stale answer promised freshness: Age {age}");

    // Past the window: the upstream's failure is relayed.
    let url = format!(
        "{}/sie-short?cc=max-age%3D1%2C%20stale-if-error%3D1",
        cg.url
    );
    up.state
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    get(&url).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    up.state
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = get(&url).await;
    assert_eq!(failed.status, 503);
    assert_eq!(failed.x_cache(), "MISS");
}

#[tokio::test]
async fn unsafe_methods_pass_through_and_invalidate() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/things/1?{CACHEABLE}", cg.url);
    assert_eq!(get(&url).await.x_cache(), "MISS");
    assert_eq!(get(&url).await.x_cache(), "HIT");
    let post = send(
        client()
            .post(&url)
            .header("content-type", "text/plain")
            .body("new body"),
    )
    .await;
    assert_eq!(post.x_cache(), "BYPASS");
    let seen = up.state.last("/things/1");
    assert_eq!(seen.method, "POST");
    assert_eq!(&seen.body[..], b"new body");
    assert_eq!(
        get(&url).await.x_cache(),
        "MISS",
        "POST did not invalidate the cached GET"
    );
    for method in ["PUT", "PATCH", "DELETE", "OPTIONS"] {
        let r = send(client().request(method.parse().unwrap(), &url)).await;
        assert_eq!(r.x_cache(), "BYPASS", "{method}");
        assert_eq!(up.state.last("/things/1").method, method);
    }
}

#[tokio::test]
async fn the_proxy_is_faithful() {
    let up = upstream().await;
    let cg = cachegate(&format!("{}/base", up.url), &[]);
    let r = send(
        client()
            .get(format!("{}/a/b?z=1&a=2", cg.url))
            .header("x-custom", "one")
            .header("connection", "x-hop")
            .header("x-hop", "dropped")
            .header("host", "evil.example"),
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.state.last("/base/a/b");
    assert_eq!(seen.path_and_query, "/base/a/b?a=2&z=1");
    assert_eq!(seen.headers["x-custom"], "one");
    assert!(
        seen.headers.get("x-hop").is_none(),
        "hop-by-hop header forwarded"
    );
    assert_ne!(seen.headers["host"], "evil.example");
    // Status codes are relayed, redirects not followed.
    let r = get(&format!("{}/gone?status=410", cg.url)).await;
    assert_eq!(r.status, 410);
    let r = get(&format!("{}/moved?status=302", cg.url)).await;
    assert_eq!(r.status, 302);
}

#[tokio::test]
async fn binary_bodies_round_trip() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/blob?{CACHEABLE}&bin=300000", cg.url);
    let a = get(&url).await;
    let b = get(&url).await;
    assert_eq!(b.x_cache(), "HIT");
    assert_eq!(a.body.len(), 300_000);
    assert_eq!(a.body, b.body);
    assert!(a
        .body
        .iter()
        .enumerate()
        .all(|(i, &x)| x == (i * 7 % 256) as u8));
    // Binary request bodies are forwarded intact.
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    send(
        client()
            .put(format!("{}/upload", cg.url))
            .body(payload.clone()),
    )
    .await;
    assert_eq!(&up.state.last("/upload").body[..], &payload[..]);
}

#[tokio::test]
async fn concurrent_misses_share_one_upstream_call() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/stampede?{CACHEABLE}&delay_ms=300", cg.url);
    let c = client();
    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(common::send(c.get(&url))))
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(up.state.hits("/stampede"), 1);
}

#[tokio::test]
async fn default_ttl_enables_caching_of_responses_without_freshness() {
    let up = upstream().await;
    let plain = cachegate(&up.url, &[]);
    let url = format!("{}/plain", plain.url);
    assert_eq!(get(&url).await.x_cache(), "MISS");
    assert_eq!(
        get(&url).await.x_cache(),
        "MISS",
        "cached without freshness information"
    );
    let with_ttl = cachegate(&up.url, &[("CACHEGATE_CACHE__DEFAULT_TTL", "30s")]);
    let url = format!("{}/plain", with_ttl.url);
    assert_eq!(get(&url).await.x_cache(), "MISS");
    assert_eq!(get(&url).await.x_cache(), "HIT");
}

#[tokio::test]
async fn crafted_targets_cannot_escape_or_redirect() {
    let up = upstream().await;
    let cg = cachegate(&format!("{}/api", up.url), &[]);
    // Absolute-form request target: scheme and authority are ignored.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(cg.addr).await.unwrap();
    s.write_all(b"GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert_eq!(up.state.last("/api/steal").path_and_query, "/api/steal");
    // Dot segments cannot climb out of the base path.
    let mut s = tokio::net::TcpStream::connect(cg.addr).await.unwrap();
    s.write_all(b"GET /../../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    assert_eq!(up.state.last("/api/admin").path_and_query, "/api/admin");
    assert_eq!(up.state.hits("/admin"), 0);
    // CONNECT is refused with a JSON error.
    let mut s = tokio::net::TcpStream::connect(cg.addr).await.unwrap();
    s.write_all(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(
        head.starts_with("HTTP/1.1 405") || head.starts_with("HTTP/1.1 400"),
        "{head}"
    );
}

#[tokio::test]
async fn oversized_request_bodies_get_413_json() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_SERVE__MAX_REQUEST_BYTES", "1KiB")]);
    let r = send(
        client()
            .post(format!("{}/upload", cg.url))
            .body(vec![0u8; 4096]),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    assert_eq!(up.state.hits("/upload"), 0);
}

#[tokio::test]
async fn stale_while_revalidate_refreshes_in_the_background() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!(
        "{}/swr?cc=max-age%3D1%2C%20stale-while-revalidate%3D30&cc_v2=max-age%3D60",
        cg.url
    );
    let first = get(&url).await;
    assert_eq!(first.json()["version"], "1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.state.set_version("/swr", "2");
    let stale = get(&url).await;
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(
        stale.json()["version"],
        "1",
        "stale answer must not wait for the refresh"
    );
    assert!(
        stale.header("cache-status").contains("background refresh"),
        "{}",
        stale.header("cache-status")
    );
    // The background refresh lands; the next request is a fresh hit on the new body.
    let mut next = get(&url).await;
    for _ in 0..20 {
        if next.x_cache() == "HIT" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        next = get(&url).await;
    }
    assert_eq!(next.x_cache(), "HIT");
    assert_eq!(next.json()["version"], "2");
    assert_eq!(up.state.hits("/swr"), 2);
}

#[tokio::test]
async fn unkeyed_routing_headers_cannot_poison_the_cache() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/poison?{CACHEABLE}", cg.url);
    let attack = send(
        client()
            .get(&url)
            .header("X-Forwarded-Host", "evil.example")
            .header("x-forwarded-host", "evil2.example")
            .header("X-Forwarded-Proto", "http")
            .header("X-Original-URL", "/admin")
            .header("X-Rewrite-URL", "/admin")
            .header("X-HTTP-Method-Override", "DELETE")
            .header("Forwarded", "host=evil.example;proto=http"),
    )
    .await;
    assert_eq!(attack.x_cache(), "MISS");
    let seen = up.state.last("/poison");
    for h in [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "forwarded",
    ] {
        assert!(
            seen.headers.get(h).is_none(),
            "{h} reached the upstream on a cacheable request"
        );
    }
    // The forwarding headers are cachegate's own, not the client's.
    assert_eq!(seen.headers["x-forwarded-host"], common::TEST_HOST);
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.method, "GET");
    // The victim gets the entry the attacker caused, built without the attacker's headers.
    let victim = get(&url).await;
    assert_eq!(victim.x_cache(), "HIT");
    // On a bypassed request the proxy stays faithful, but for the
    // forwarding headers, which are cachegate's own on every request.
    send(
        client()
            .post(&url)
            .header("x-original-url", "/app")
            .header("x-forwarded-host", "app.example"),
    )
    .await;
    let seen = up.state.last("/poison");
    assert_eq!(seen.headers["x-original-url"], "/app");
    assert_eq!(seen.headers["x-forwarded-host"], common::TEST_HOST);
    // A route that keys on such a header forwards it and keeps variants apart.
    let keyed = cachegate(
        &up.url,
        &[("CACHEGATE_CACHE__KEY_HEADERS", "[\"x-forwarded-host\"]")],
    );
    let url = format!("{}/keyed?{CACHEABLE}", keyed.url);
    let a = send(client().get(&url).header("x-forwarded-host", "a.example")).await;
    let b = send(client().get(&url).header("x-forwarded-host", "b.example")).await;
    assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "MISS"));
    assert_eq!(
        up.state.last("/keyed").headers["x-forwarded-host"],
        "b.example"
    );
}

const TOKEN: &str = "purge-token-0123456789";

async fn purge(cg: &common::Cachegate, token: &str, body: serde_json::Value) -> common::Got {
    send(
        client()
            .post(format!("{}/_cachegate/purge", cg.url))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await
}

#[tokio::test]
async fn purge_by_url_removes_every_variant_and_by_tag_only_its_entries() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_SERVE__PURGE_TOKEN", TOKEN),
            (
                "CACHEGATE_ROUTES",
                "[{path=\"/tagged/{id}\", tags=[\"tagged\"]}]",
            ),
        ],
    );
    let c = client();
    let varied = format!("{}/v?{CACHEABLE}&vary=Accept-Language", cg.url);
    let other = format!("{}/other?{CACHEABLE}", cg.url);
    let tagged = format!("{}/tagged/1?{CACHEABLE}", cg.url);
    let surrogate = format!("{}/s?{CACHEABLE}&surrogate=product-7%20catalog", cg.url);
    for lang in ["en", "fr"] {
        send(c.get(&varied).header("accept-language", lang)).await;
    }
    for url in [&other, &tagged, &surrogate] {
        let r = get(url).await;
        assert_eq!(
            r.header("surrogate-key"),
            "",
            "surrogate keys leaked to the client"
        );
    }
    assert_eq!(
        send(c.get(&varied).header("accept-language", "fr"))
            .await
            .x_cache(),
        "HIT"
    );

    // By URL, as a client would write it (query in another order): both variants.
    let r = purge(
        &cg,
        TOKEN,
        serde_json::json!({"urls": [format!("/v?vary=Accept-Language&{CACHEABLE}")]}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["removed"], 2);
    for lang in ["en", "fr"] {
        assert_eq!(
            send(c.get(&varied).header("accept-language", lang))
                .await
                .x_cache(),
            "MISS",
            "{lang} variant survived"
        );
    }
    assert_eq!(get(&other).await.x_cache(), "HIT");

    // By route tag and by surrogate key: exactly those entries.
    let r = purge(
        &cg,
        TOKEN,
        serde_json::json!({"tags": ["tagged", "product-7"]}),
    )
    .await;
    assert_eq!(r.json()["tags"]["tagged"], 1);
    assert_eq!(r.json()["tags"]["product-7"], 1);
    assert_eq!(get(&tagged).await.x_cache(), "MISS");
    assert_eq!(get(&surrogate).await.x_cache(), "MISS");
    assert_eq!(get(&other).await.x_cache(), "HIT");

    // By path prefix (the memory backend lists its keys): `/tagged/1`
    // only, then everything.
    let r = purge(&cg, TOKEN, serde_json::json!({"prefixes": ["/tagged/"]})).await;
    assert_eq!(r.json()["prefixes"]["/tagged/"], 1, "{:?}", r.body);
    assert_eq!(get(&tagged).await.x_cache(), "MISS");
    assert_eq!(get(&other).await.x_cache(), "HIT");
    let r = purge(&cg, TOKEN, serde_json::json!({"all": true})).await;
    assert!(
        r.json()["prefixes"]["/"].as_u64().unwrap() >= 3,
        "{:?}",
        r.body
    );
    assert_eq!(get(&other).await.x_cache(), "MISS");

    // Without the right token the endpoint does not exist.
    assert_eq!(
        purge(
            &cg,
            "wrong-token-0123456789",
            serde_json::json!({"tags": ["x"]})
        )
        .await
        .status,
        404
    );
    assert_eq!(
        send(c.post(format!("{}/_cachegate/purge", cg.url)).body("{}"))
            .await
            .status,
        404
    );
    assert_eq!(up.state.hits("/_cachegate/purge"), 0);
}

#[tokio::test]
async fn without_a_token_the_purge_path_is_an_ordinary_path() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let r = send(
        client()
            .post(format!("{}/_cachegate/purge", cg.url))
            .body("{}"),
    )
    .await;
    assert_eq!(r.x_cache(), "BYPASS");
    assert_eq!(up.state.hits("/_cachegate/purge"), 1);
}

#[tokio::test]
async fn a_purge_during_a_fetch_keeps_the_older_response_out() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_SERVE__PURGE_TOKEN", TOKEN)]);
    let url = format!("{}/race?{CACHEABLE}&delay_ms=600", cg.url);
    let in_flight = tokio::spawn(get_owned(url.clone()));
    // Once the upstream has the request (it decides the version on arrival),
    // and while it delays its answer:
    while up.state.hits("/race") == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The upstream changed and the purge says so, while the old answer is on its way.
    up.state.set_version("/race", "2");
    let r = purge(
        &cg,
        TOKEN,
        serde_json::json!({"urls": [format!("/race?{CACHEABLE}&delay_ms=600")]}),
    )
    .await;
    assert_eq!(r.status, 200);
    let old = in_flight.await.unwrap();
    assert_eq!(old.json()["version"], "1");
    let next = get(&url).await;
    assert_eq!(
        next.x_cache(),
        "MISS",
        "the response fetched before the purge was stored after it"
    );
    assert_eq!(next.json()["version"], "2");
}

async fn get_owned(url: String) -> common::Got {
    get(&url).await
}

/// An upstream that answers every request with `cache_control` and closes
/// the connection (so nothing is pooled), until its task is aborted: then
/// connections are refused, as from a stopped server.
async fn closing_upstream(cache_control: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            n += 1;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => head.extend_from_slice(&buf[..k]),
                }
            }
            let body = format!("{{\"n\": {n}}}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncache-control: {cache_control}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(resp.as_bytes()).await;
        }
    });
    (url, task)
}

#[tokio::test]
async fn stale_if_error_answers_when_the_upstream_is_stopped() {
    let (up_url, up_task) = closing_upstream("max-age=1, stale-if-error=60").await;
    let (short_url, short_task) = closing_upstream("max-age=1, stale-if-error=1").await;
    let cg = cachegate(&up_url, &[]);
    let short = cachegate(&short_url, &[]);
    let first = get(&format!("{}/down", cg.url)).await;
    assert_eq!(first.x_cache(), "MISS");
    get(&format!("{}/down", short.url)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    up_task.abort();
    short_task.abort();
    let _ = up_task.await;
    let _ = short_task.await;

    let stale = get(&format!("{}/down", cg.url)).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.x_cache(), "STALE");
    assert_eq!(stale.body, first.body);
    assert!(
        stale.header("cache-status").contains("stale-if-error"),
        "{}",
        stale.header("cache-status")
    );

    // Past its one-second window: a 502 that says what failed.
    let failed = get(&format!("{}/down", short.url)).await;
    assert_eq!(failed.status, 502);
    assert_eq!(failed.header("content-type"), "application/json");
    let error = &failed.json()["error"];
    assert_eq!(error["status"], 502);
    assert!(
        error["message"].as_str().unwrap().contains("connect")
            || error["code"].as_str().unwrap().contains("unreachable"),
        "{error}"
    );
}

/// `cache.honor_client_no_cache`: a client's `no-cache` goes upstream even
/// with a fresh entry stored (and a request that just took over a key's
/// fetch does not answer it from what was stored before it arrived).
/// Without the setting, `no-cache` is a hit like any other request.
#[tokio::test]
async fn client_no_cache_goes_upstream_only_when_honoured() {
    let up = upstream().await;
    for (honour, want, upstream_calls) in [("true", "MISS", 2), ("false", "HIT", 1)] {
        let cg = cachegate(
            &up.url,
            &[("CACHEGATE_CACHE__HONOR_CLIENT_NO_CACHE", honour)],
        );
        let path = format!("/no-cache-{honour}");
        let url = format!("{}{path}?{CACHEABLE}", cg.url);
        assert_eq!(get(&url).await.x_cache(), "MISS");
        assert_eq!(get(&url).await.x_cache(), "HIT");
        let forced = send(client().get(&url).header("cache-control", "no-cache")).await;
        assert_eq!(forced.x_cache(), want, "honor_client_no_cache={honour}");
        assert_eq!(
            up.state.hits(&path),
            upstream_calls,
            "honor_client_no_cache={honour}"
        );
    }
}
