//! End-to-end: the built `cachegate serve` relays what the upstream said
//! (headers, `Age`), tells the edge only what configuration asks for, and
//! follows the RFC 9111 / RFC 9213 rules these tests name. A real HTTP
//! upstream on loopback (tests/common).

mod common;

use std::time::{Duration, SystemTime};

use common::{cachegate, client, get, send, upstream, Got};

fn all(g: &Got, name: &str) -> Vec<String> {
    g.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn age(g: &Got) -> u64 {
    g.header("age")
        .parse()
        .unwrap_or_else(|_| panic!("no Age: {:?}", g.headers))
}

#[tokio::test]
async fn upstream_headers_reach_the_client_unchanged_on_miss_hit_head_and_304() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let cc =
        "public, max-age=60, must-revalidate, no-transform, immutable, stale-while-revalidate=30";
    let expires = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
    let url = format!(
        "{}/same?cc={}&etag=%22v1%22&lm={}&h={}&h={}&h={}&h={}&vary=Accept-Encoding",
        cg.url,
        enc(cc),
        enc("Sun, 06 Nov 1994 08:49:37 GMT"),
        enc("x-unknown: 1"),
        enc("link: </a>; rel=preload"),
        enc("link: </b>; rel=preload"),
        enc(&format!("expires: {expires}")),
    );
    let miss = get(&url).await;
    let hit = get(&url).await;
    let head = send(client().head(&url)).await;
    let not_modified = send(client().get(&url).header("if-none-match", "\"v1\"")).await;
    assert_eq!(
        (miss.x_cache(), hit.x_cache(), head.x_cache()),
        ("MISS", "HIT", "HIT")
    );
    assert_eq!(not_modified.status, 304);
    for (what, g) in [
        ("MISS", &miss),
        ("HIT", &hit),
        ("HEAD", &head),
        ("304", &not_modified),
    ] {
        assert_eq!(g.header("cache-control"), cc, "{what}");
        assert_eq!(g.header("etag"), "\"v1\"", "{what}");
        assert_eq!(g.header("expires"), expires, "{what}");
        assert_eq!(g.header("vary"), "Accept-Encoding", "{what}");
        assert_eq!(
            all(g, "link"),
            ["</a>; rel=preload", "</b>; rel=preload"],
            "{what}"
        );
        if what != "304" {
            assert_eq!(
                g.header("last-modified"),
                "Sun, 06 Nov 1994 08:49:37 GMT",
                "{what}"
            );
            assert_eq!(g.header("x-unknown"), "1", "{what}");
            assert_eq!(g.header("content-type"), "application/json", "{what}");
        }
        assert!(age(g) <= 2, "{what}");
    }
    assert_eq!(head.header("content-length"), miss.body.len().to_string());
    assert_eq!(up.state.hits("/same"), 1);
}

#[tokio::test]
async fn age_is_the_upstreams_age_plus_time_in_cache() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/aged?cc=max-age%3D60&h={}", cg.url, enc("age: 30"));
    let miss = get(&url).await;
    assert_eq!(
        miss.header("cache-control"),
        "max-age=60",
        "freshness rewritten"
    );
    assert!((30..=31).contains(&age(&miss)), "{}", age(&miss));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let hit = get(&url).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.header("cache-control"), "max-age=60");
    assert!((32..=33).contains(&age(&hit)), "{}", age(&hit));
    // A list counts by its first member; an invalid Age is ignored.
    let list = get(&format!(
        "{}/aged-list?cc=max-age%3D86400&h={}",
        cg.url,
        enc("age: 7200, 0")
    ))
    .await;
    assert!((7200..=7201).contains(&age(&list)), "{}", age(&list));
    let bad = get(&format!(
        "{}/aged-bad?cc=max-age%3D60&h={}",
        cg.url,
        enc("age: soon")
    ))
    .await;
    assert!(age(&bad) <= 1);
    assert_eq!(
        get(&format!(
            "{}/aged-bad?cc=max-age%3D60&h={}",
            cg.url,
            enc("age: soon")
        ))
        .await
        .x_cache(),
        "HIT"
    );
}

#[tokio::test]
async fn route_freshness_goes_to_the_edge_as_s_maxage_and_edge_ttl_caps_it() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[(
            "CACHEGATE_ROUTES",
            "[{path=\"/ttl\", ttl=\"60s\"}, {path=\"/capped\", edge_ttl=\"10s\"}, {path=\"/zero\", edge_ttl=\"0s\"}]",
        )],
    );
    let ttl = get(&format!("{}/ttl", cg.url)).await;
    assert_eq!(ttl.header("cache-control"), "s-maxage=60");
    let ttl = get(&format!("{}/ttl", cg.url)).await;
    assert_eq!(
        (ttl.x_cache(), ttl.header("cache-control")),
        ("HIT", "s-maxage=60")
    );
    // The upstream's own freshness is not the route's to restate.
    let own = get(&format!("{}/ttl?cc=max-age%3D30", cg.url)).await;
    assert_eq!(own.header("cache-control"), "max-age=30");

    let capped = get(&format!(
        "{}/capped?cc=max-age%3D60&h={}",
        cg.url,
        enc("age: 5")
    ))
    .await;
    let a = age(&capped);
    assert_eq!(
        capped.header("cache-control"),
        format!("max-age=60, s-maxage={}", a + 10)
    );
    let zero = get(&format!("{}/zero?cc=public%2C%20max-age%3D60", cg.url)).await;
    assert_eq!(
        zero.header("cache-control"),
        "public, max-age=60, s-maxage=0"
    );
    assert_eq!(
        get(&format!("{}/zero?cc=public%2C%20max-age%3D60", cg.url))
            .await
            .x_cache(),
        "HIT"
    );
    // Never made cacheable: a private answer goes out as it came.
    let private = get(&format!("{}/zero?cc=private%2C%20max-age%3D60", cg.url)).await;
    assert_eq!(private.header("cache-control"), "private, max-age=60");
}

#[tokio::test]
async fn keyed_answers_name_their_keys_and_stay_out_of_shared_caches() {
    let up = upstream().await;
    let routes = (
        "CACHEGATE_ROUTES",
        "[{path=\"/tenant\", key_headers=[\"x-tenant\"]}]",
    );
    let cg = cachegate(&up.url, &[routes]);
    let url = format!("{}/tenant?cc=public%2C%20max-age%3D60", cg.url);
    let acme = send(client().get(&url).header("x-tenant", "acme")).await;
    let acme2 = send(client().get(&url).header("x-tenant", "acme")).await;
    assert_eq!((acme.x_cache(), acme2.x_cache()), ("MISS", "HIT"));
    for g in [&acme, &acme2] {
        assert_eq!(g.header("cache-control"), "max-age=60, private");
        assert_eq!(g.header("vary"), "x-tenant");
    }
    // The upstream's own Vary is the upstream's to state: with no
    // `edge.key_headers`, the next cache is one that honours Vary (RFC
    // 9111 §4.1), and the answer goes out as it came.
    let lang_url = format!("{}/lang?cc=max-age%3D60&vary=Accept-Language", cg.url);
    get(&lang_url).await;
    let lang = get(&lang_url).await;
    assert_eq!(lang.x_cache(), "HIT");
    assert_eq!(lang.header("cache-control"), "max-age=60");
    assert_eq!(lang.header("vary"), "Accept-Language");
    // An edge that keys only on what it is told (`edge.key_headers`, as
    // template.yaml sets for CloudFront) keeps it out when it cannot key
    // on it; and when it does key on the route's headers, Vary tells it how.
    let keyed_edge = cachegate(
        &up.url,
        &[
            routes,
            (
                "CACHEGATE_EDGE__KEY_HEADERS",
                "[\"accept-encoding\", \"x-tenant\"]",
            ),
        ],
    );
    let lang_url = format!(
        "{}/lang?cc=max-age%3D60&vary=Accept-Language",
        keyed_edge.url
    );
    get(&lang_url).await;
    let lang = get(&lang_url).await;
    assert_eq!(lang.x_cache(), "HIT");
    assert_eq!(lang.header("cache-control"), "max-age=60, private");
    let url = format!("{}/tenant?cc=public%2C%20max-age%3D60", keyed_edge.url);
    let g = send(client().get(&url).header("x-tenant", "acme")).await;
    assert_eq!(g.header("cache-control"), "public, max-age=60");
    assert_eq!(g.header("vary"), "x-tenant");
}

#[tokio::test]
async fn cdn_cache_control_is_obeyed_and_passed_on_cachegate_cache_control_obeyed_and_removed() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!(
        "{}/cdn?cc=no-store&h={}",
        cg.url,
        enc("cdn-cache-control: max-age=60")
    );
    let a = get(&url).await;
    let b = get(&url).await;
    assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "HIT"));
    assert_eq!(b.header("cache-control"), "no-store");
    assert_eq!(b.header("cdn-cache-control"), "max-age=60");
    // It forbids as well as allows.
    let url = format!(
        "{}/cdn-private?cc=max-age%3D60&h={}",
        cg.url,
        enc("cdn-cache-control: private")
    );
    get(&url).await;
    let b = get(&url).await;
    assert_eq!(b.x_cache(), "MISS");
    assert!(
        b.header("cache-status").contains("detail=private"),
        "{}",
        b.header("cache-status")
    );

    let url = format!(
        "{}/own?cc=no-cache&h={}&h={}",
        cg.url,
        enc("cdn-cache-control: no-store"),
        enc("cachegate-cache-control: max-age=60")
    );
    let a = get(&url).await;
    let b = get(&url).await;
    assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "HIT"));
    for g in [&a, &b] {
        assert!(g.headers.get("cachegate-cache-control").is_none());
        assert_eq!(g.header("cdn-cache-control"), "no-store");
        assert_eq!(g.header("cache-control"), "no-cache");
    }
}

#[tokio::test]
async fn stale_entries_with_validators_are_revalidated_not_refetched() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_CACHE__STALE_IF_ERROR", "0s")]);
    for cc in [
        "max-age=0",
        "no-cache",
        "max-age=1, must-revalidate",
        "s-maxage=1",
    ] {
        let path = format!("/reval-{}", cc.len());
        let url = format!("{}{path}?cc={}&etag=%22e%22", cg.url, enc(cc));
        let first = get(&url).await;
        assert!(
            first.header("cache-status").contains("stored"),
            "{cc}: {}",
            first.header("cache-status")
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let second = get(&url).await;
        assert_eq!(second.status, 200, "{cc}");
        assert_eq!(second.body, first.body, "{cc}");
        assert_eq!(
            second.x_cache(),
            "HIT",
            "{cc}: {}",
            second.header("cache-status")
        );
        assert!(
            second
                .header("cache-status")
                .contains("fwd=stale; fwd-status=304"),
            "{cc}: {}",
            second.header("cache-status")
        );
        assert_eq!(
            up.state.last(&path).headers["if-none-match"],
            "\"e\"",
            "{cc}"
        );
        assert_eq!(up.state.hits(&path), 2, "{cc}");
    }
    // Last-Modified alone revalidates with If-Modified-Since.
    let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
    let url = format!("{}/reval-lm?cc=max-age%3D0&lm={}", cg.url, enc(lm));
    get(&url).await;
    get(&url).await;
    assert_eq!(up.state.last("/reval-lm").headers["if-modified-since"], lm);
}

#[tokio::test]
async fn a_304_replaces_the_fields_it_carries_and_keeps_repeated_values() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!(
        "{}/merge?etag=%22m%22&h200={}&h200={}&h200={}&h304={}&h304={}&h304={}",
        cg.url,
        enc("cache-control: max-age=0"),
        enc("link: </a>"),
        enc("x-stays: 1"),
        enc("link: </b>"),
        enc("link: </c>"),
        enc("cache-control: max-age=60"),
    );
    let first = get(&url).await;
    assert_eq!(all(&first, "link"), ["</a>"]);
    let revalidated = get(&url).await;
    assert_eq!(revalidated.x_cache(), "HIT");
    assert_eq!(all(&revalidated, "link"), ["</b>", "</c>"]);
    assert_eq!(revalidated.header("x-stays"), "1");
    assert_eq!(all(&revalidated, "cache-control"), ["max-age=60"]);
    // And what the 304 said is what the entry now lives by.
    let hit = get(&url).await;
    assert!(
        hit.header("cache-status").starts_with("cachegate; hit"),
        "{}",
        hit.header("cache-status")
    );
    assert_eq!(all(&hit, "link"), ["</b>", "</c>"]);
    assert_eq!(up.state.hits("/merge"), 2);
}

#[tokio::test]
async fn server_errors_with_explicit_freshness_are_stored_but_never_served_stale() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_CACHE__DEFAULT_TTL", "60s")]);
    let url = format!(
        "{}/err?status=503&cc=max-age%3D3%2C%20stale-if-error%3D60",
        cg.url
    );
    let a = get(&url).await;
    let b = get(&url).await;
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (503, 503));
    assert_eq!((a.x_cache(), b.x_cache()), ("MISS", "HIT"));
    // 3 s of freshness: the HIT must come within it on a busy machine too.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let c = get(&url).await;
    assert_eq!(
        c.x_cache(),
        "MISS",
        "a stale error served: {}",
        c.header("cache-status")
    );
    assert_eq!(up.state.hits("/err"), 2);
    // default_ttl is for heuristically cacheable statuses only.
    let url = format!("{}/err-nottl?status=500", cg.url);
    get(&url).await;
    let again = get(&url).await;
    assert_eq!(again.x_cache(), "MISS");
    assert!(
        again.header("cache-status").contains("detail=status"),
        "{}",
        again.header("cache-status")
    );
    // And the upstream's failure on a stale good entry still answers stale.
    let url = format!("{}/good?cc=max-age%3D1%2C%20stale-if-error%3D60", cg.url);
    let good = get(&url).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.state
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let stale = get(&url).await;
    assert_eq!((stale.status.as_u16(), stale.x_cache()), (200, "STALE"));
    assert_eq!(stale.body, good.body);
    assert_eq!(
        stale.header("cache-status").matches("detail=").count(),
        1,
        "{}",
        stale.header("cache-status")
    );
    // Faithful: the next cache sees it stale (Age past max-age).
    assert_eq!(
        stale.header("cache-control"),
        "max-age=1, stale-if-error=60"
    );
    assert!(age(&stale) >= 1);
}

#[tokio::test]
async fn status_ttl_caches_negative_answers_for_their_own_time() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[(
            "CACHEGATE_ROUTES",
            "[{path=\"/neg/{*rest}\", ttl=\"60s\", status_ttl={404=\"3s\", 503=\"60s\"}}]",
        )],
    );
    let missing = format!("{}/neg/missing?status=404", cg.url);
    let found = format!("{}/neg/found", cg.url);
    let down = format!("{}/neg/down?status=503", cg.url);
    for u in [&missing, &found, &down] {
        get(u).await;
        assert_eq!(get(u).await.x_cache(), "HIT", "{u}");
    }
    // 3 s for the 404: its HIT must come within it on a busy machine too.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(get(&missing).await.x_cache(), "MISS");
    assert_eq!(get(&found).await.x_cache(), "HIT");
    assert_eq!(get(&down).await.x_cache(), "HIT");
    // A status that is not storable stops start-up naming the key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("CACHEGATE_UPSTREAM__URL", &up.url)
        .env(
            "CACHEGATE_ROUTES",
            "[{path=\"/x\", status_ttl={206=\"1s\"}}]",
        )
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("routes[0].status_ttl"),
        "{}",
        common::describe(&out)
    );
}

#[tokio::test]
async fn conditional_requests_on_cached_gets() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
    let url = format!(
        "{}/cond?cc=max-age%3D60&etag=%22c%22&lm={}",
        cg.url,
        enc(lm)
    );
    get(&url).await;
    let with =
        |name: &'static str, value: &'static str| send(client().get(&url).header(name, value));
    assert_eq!(with("if-match", "\"c\"").await.status, 200);
    assert_eq!(with("if-match", "*").await.status, 200);
    let failed = with("if-match", "\"other\"").await;
    assert_eq!(failed.status, 412);
    assert_eq!(failed.json()["error"]["code"], "precondition_failed");
    assert_eq!(
        with("if-unmodified-since", "Mon, 07 Nov 1994 08:49:37 GMT")
            .await
            .status,
        200
    );
    assert_eq!(
        with("if-unmodified-since", "Sat, 05 Nov 1994 08:49:37 GMT")
            .await
            .status,
        412
    );
    assert_eq!(with("if-modified-since", lm).await.status, 304);
    // Without Last-Modified, If-Modified-Since is compared with Date.
    let url = format!("{}/cond-date?cc=max-age%3D60", cg.url);
    let first = get(&url).await;
    let date = first.header("date").to_owned();
    let g = send(client().get(&url).header("if-modified-since", &date)).await;
    assert_eq!(g.status, 304);
    let g = send(
        client()
            .get(&url)
            .header("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT"),
    )
    .await;
    assert_eq!(g.status, 200);
    assert_eq!(up.state.hits("/cond") + up.state.hits("/cond-date"), 2);
}

#[tokio::test]
async fn range_requests_bypass_saying_range() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let g = send(
        client()
            .get(format!("{}/r?cc=max-age%3D60", cg.url))
            .header("range", "bytes=0-9"),
    )
    .await;
    assert_eq!(g.x_cache(), "BYPASS");
    assert!(
        g.header("cache-status").ends_with("detail=range"),
        "{}",
        g.header("cache-status")
    );
    // A 200 with Content-Range is complete, and stored.
    let url = format!(
        "{}/cr?cc=max-age%3D60&h={}",
        cg.url,
        enc("content-range: bytes 0-9/10")
    );
    get(&url).await;
    assert_eq!(get(&url).await.x_cache(), "HIT");
}

#[tokio::test]
async fn upstream_errors_carry_cache_status() {
    let port = common::free_port();
    let cg = cachegate(&format!("http://127.0.0.1:{port}"), &[]);
    let g = get(&format!("{}/gone", cg.url)).await;
    assert_eq!(g.status, 502);
    assert_eq!(g.x_cache(), "MISS");
    assert_eq!(
        g.header("cache-status"),
        "cachegate; fwd=uri-miss; detail=upstream_unreachable"
    );
    let up = upstream().await;
    let slow = cachegate(&up.url, &[("CACHEGATE_UPSTREAM__TIMEOUT", "300ms")]);
    let g = get(&format!("{}/slow?delay_ms=2000", slow.url)).await;
    assert_eq!(g.status, 504);
    assert_eq!(g.x_cache(), "MISS");
    assert_eq!(
        g.header("cache-status"),
        "cachegate; fwd=uri-miss; detail=upstream_timeout"
    );
}

#[tokio::test]
async fn a_stored_set_cookie_response_keeps_its_cookie_for_the_fetcher_only() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[("CACHEGATE_CACHE__STORE_SET_COOKIE_RESPONSES", "true")],
    );
    let url = format!("{}/sc?cc=max-age%3D60&set_cookie=s%3D1", cg.url);
    let fetcher = get(&url).await;
    assert_eq!(fetcher.x_cache(), "MISS");
    assert!(fetcher.header("cache-status").contains("stored"));
    assert_eq!(fetcher.header("set-cookie"), "s=1");
    let other = get(&url).await;
    assert_eq!(other.x_cache(), "HIT");
    assert!(other.headers.get("set-cookie").is_none(), "a cookie shared");
}

/// With `cache.compression = "off"` the client's `Accept-Encoding` is the
/// variant's, matched however the list is written; with the default
/// (gzip), every client's request goes upstream asking for gzip, so they
/// all share one variant (tests/compression.rs).
#[tokio::test]
async fn vary_matches_lists_however_they_are_written() {
    let up = upstream().await;
    for (compression, want) in [
        ("off", ("MISS", "HIT", "MISS")),
        ("gzip", ("MISS", "HIT", "HIT")),
    ] {
        let cg = cachegate(&up.url, &[("CACHEGATE_CACHE__COMPRESSION", compression)]);
        let url = format!(
            "{}/v-{compression}?cc=max-age%3D60&vary=Accept-Encoding",
            cg.url
        );
        let a = send(client().get(&url).header("accept-encoding", "gzip, br")).await;
        let b = send(client().get(&url).header("accept-encoding", "br,GZIP")).await;
        let c = send(client().get(&url).header("accept-encoding", "gzip")).await;
        assert_eq!(
            (a.x_cache(), b.x_cache(), c.x_cache()),
            want,
            "{compression}"
        );
    }
}

#[tokio::test]
async fn lenient_dates_and_must_understand() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    // RFC 850, lower case, wrong weekday (a weekday name all the same:
    // the grammar asks for one, RFC 9110 §5.6.7): 60 s ahead.
    let imf = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
    let (weekday, rest) = imf.split_once(", ").unwrap();
    let parts: Vec<&str> = rest.split(' ').collect();
    let wrong = if weekday == "Sun" { "monday" } else { "sunday" };
    let rfc850 = format!(
        "{wrong}, {}-{}-{} {} gmt",
        parts[0],
        parts[1].to_lowercase(),
        &parts[2][2..],
        parts[3]
    );
    let url = format!("{}/d?h={}", cg.url, enc(&format!("expires: {rfc850}")));
    get(&url).await;
    assert_eq!(get(&url).await.x_cache(), "HIT", "{rfc850}");
    // An Expires that does not parse: expired (stored to revalidate).
    let url = format!("{}/d-bad?etag=%22x%22&h={}", cg.url, enc("expires: soon"));
    get(&url).await;
    let g = get(&url).await;
    assert!(
        g.header("cache-status").contains("fwd=stale"),
        "{}",
        g.header("cache-status")
    );

    let url = format!(
        "{}/mu?cc={}",
        cg.url,
        enc("must-understand, no-store, max-age=60")
    );
    get(&url).await;
    assert_eq!(get(&url).await.x_cache(), "HIT");
    let url = format!(
        "{}/mu-unknown?status=299&cc={}",
        cg.url,
        enc("must-understand, no-store, max-age=60")
    );
    get(&url).await;
    let g = get(&url).await;
    assert_eq!(g.x_cache(), "MISS");
    assert!(g.header("cache-status").contains("detail=must-understand"));
}

#[tokio::test]
async fn entries_kept_for_revalidation_are_kept_only_as_long_as_configured() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_CACHE__STALE_IF_ERROR", "0s"),
            // Date has whole seconds: the entry may be up to 1 s old on arrival.
            ("CACHEGATE_CACHE__KEEP_FOR_REVALIDATION", "3s"),
        ],
    );
    let url = format!("{}/keep?cc=max-age%3D0&etag=%22k%22", cg.url);
    get(&url).await;
    let within = get(&url).await;
    assert!(
        within.header("cache-status").contains("fwd=stale"),
        "{}",
        within.header("cache-status")
    );
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let after = get(&url).await;
    assert!(
        after.header("cache-status").contains("fwd=uri-miss"),
        "kept past keep_for_revalidation: {}",
        after.header("cache-status")
    );
    assert!(up
        .state
        .last("/keep")
        .headers
        .get("if-none-match")
        .is_none());
}
