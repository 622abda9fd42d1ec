//! One canonical request (issue 13), end to end through the built
//! `cachegate serve` in front of the real test upstream, requests written
//! byte for byte on raw TCP; and the same inputs through the Lambda adapter
//! in process where an event can carry them. Every case here was an attack
//! that worked before: see docs/hostile-input.md.

mod common;

use std::time::Duration;

use common::raw::Raw;
use common::{cachegate, upstream};

async fn send(cg: &common::Cachegate, method: &str, target: &str, headers: &[(&str, &str)]) -> Raw {
    common::raw::send(cg, method, target, headers).await
}

async fn get(cg: &common::Cachegate, target: &str, headers: &[(&str, &str)]) -> Raw {
    send(cg, "GET", target, headers).await
}

const ROUTES: &str = r#"[{path="/assets/{*rest}", ttl="1h", override_upstream=true},
    {path="/admin/{*rest}", cache=false},
    {path="/lang/{*rest}", key_cookies=["lang"]},
    {path="/shared/{*rest}", ignore_cookies=true}]"#;

/// `/assets/../account` and its spellings stored the upstream's
/// `/account` for an hour under the assets route's rule.
#[tokio::test]
async fn a_routes_rule_never_applies_to_another_path() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_ROUTES", ROUTES)]);
    for target in [
        "/assets/../account?echo=1",
        "/assets/%2e%2e/account?echo=1",
        "/assets/%2E%2e/account?echo=1",
        "/%61ssets/../account?echo=1",
    ] {
        let r = get(&cg, target, &[]).await;
        assert_eq!(r.status, 200, "{target}");
        assert_eq!(r.json()["path"], "/account", "{target}");
        // `/account` has no route: no freshness, not stored.
        assert!(
            !r.cache_status().contains("stored"),
            "{target}: {}",
            r.cache_status()
        );
        assert!(
            !r.header("cache-control").unwrap_or("").contains("s-maxage"),
            "{target} got the assets route's edge directives"
        );
    }
    let victim = get(&cg, "/account?echo=1", &[]).await;
    assert_eq!(victim.x_cache(), "MISS", "a later GET /account was a HIT");
    // A cache = false route stays uncached whatever the spelling.
    let r = get(&cg, "/x/../admin/users?cc=max-age%3D60", &[]).await;
    assert_eq!(r.x_cache(), "BYPASS");
    assert!(
        r.cache_status().contains("detail=route"),
        "{}",
        r.cache_status()
    );
    assert_eq!(r.json()["path"], "/admin/users");
    let again = get(&cg, "/admin/users?cc=max-age%3D60", &[]).await;
    assert_eq!(again.x_cache(), "BYPASS");
}

/// Forms origins read as dot segments though RFC 3986 does not are
/// refused before anything reads them.
#[tokio::test]
async fn ambiguous_paths_are_refused_with_a_json_400() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_ROUTES", ROUTES)]);
    for target in [
        "/assets/..;/account",
        "/assets/..;x/account",
        "/assets/.;x/../account",
        "/assets/..\\account",
        "/assets/..%5Caccount",
        "/assets/..%2Faccount",
        "/assets/%2e%2e;/account",
        "/assets/a%zz",
    ] {
        let r = get(&cg, target, &[]).await;
        assert_eq!(r.status, 400, "{target}: {}", r.head);
        assert_eq!(r.json()["error"]["code"], "ambiguous_path", "{target}");
    }
    assert_eq!(
        up.state.seen.lock().unwrap().len(),
        0,
        "an ambiguous path reached the upstream"
    );
}

/// `Connection: x-tenant` removed the key header from the upstream call
/// but not from the key: acme's key got the header-less answer.
#[tokio::test]
async fn headers_named_by_connection_never_reach_the_key() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[("CACHEGATE_CACHE__KEY_HEADERS", "[\"x-tenant\"]")],
    );
    let target = "/tenant?cc=max-age%3D60&echo=1";
    let attack = get(
        &cg,
        target,
        &[("X-Tenant", "acme"), ("Connection", "x-tenant")],
    )
    .await;
    assert_eq!(attack.status, 200);
    assert!(attack.json()["headers"].get("x-tenant").is_none());
    let acme = get(&cg, target, &[("X-Tenant", "acme")]).await;
    assert_eq!(
        acme.x_cache(),
        "MISS",
        "acme was served the header-less answer"
    );
    assert_eq!(acme.json()["headers"]["x-tenant"][0], "acme");

    // The same with a Vary: Origin variant.
    let target = "/cors?cc=max-age%3D60&vary=Origin&echo=1";
    let attack = get(
        &cg,
        target,
        &[("Origin", "https://app.example"), ("Connection", "origin")],
    )
    .await;
    assert!(attack.json()["headers"].get("origin").is_none());
    let cors = get(&cg, target, &[("Origin", "https://app.example")]).await;
    assert_eq!(cors.x_cache(), "MISS");
    assert_eq!(cors.json()["headers"]["origin"][0], "https://app.example");
}

/// Two non-UTF-8 queries shared one key and the upstream got U+FFFD.
#[tokio::test]
async fn query_bytes_reach_the_key_and_the_upstream_as_sent() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let a = get(&cg, "/q?id=%E9t%E9&cc=max-age%3D60", &[]).await;
    assert_eq!(a.x_cache(), "MISS");
    assert_eq!(
        up.state.last("/q").path_and_query,
        "/q?cc=max-age%3D60&id=%E9t%E9"
    );
    let b = get(&cg, "/q?id=%E8t%E8&cc=max-age%3D60", &[]).await;
    assert_eq!(b.x_cache(), "MISS", "another byte shared the key");
    assert_eq!(
        up.state.last("/q").path_and_query,
        "/q?cc=max-age%3D60&id=%E8t%E8"
    );
    // `+` and `%20` are different bytes to the upstream: different keys.
    let plus = get(&cg, "/s?q=a+b&cc=max-age%3D60", &[]).await;
    let pct = get(&cg, "/s?q=a%20b&cc=max-age%3D60", &[]).await;
    assert_eq!((plus.x_cache(), pct.x_cache()), ("MISS", "MISS"));
    assert_eq!(
        up.state.last("/s").path_and_query,
        "/s?cc=max-age%3D60&q=a%20b"
    );
    assert_eq!(
        get(&cg, "/s?cc=max-age%3D60&q=a+b", &[]).await.x_cache(),
        "HIT"
    );
}

/// An answer to a request with `Cookie` was stored and served to others.
#[tokio::test]
async fn cookie_requests_share_only_what_the_upstream_marks_shareable() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_CACHE__DEFAULT_TTL", "60s"),
            ("CACHEGATE_ROUTES", ROUTES),
        ],
    );
    let alice = [("Cookie", "session=alice")];
    // Miss side: not stored, said so.
    let r = get(&cg, "/me?echo=1", &alice).await;
    assert!(r.text().contains("session=alice"));
    assert!(
        r.cache_status().contains("detail=cookie"),
        "{}",
        r.cache_status()
    );
    assert!(!r.cache_status().contains("stored"));
    let anon = get(&cg, "/me?echo=1", &[]).await;
    assert_eq!(anon.x_cache(), "MISS");
    assert!(
        !anon.text().contains("alice"),
        "alice's answer reached an anonymous client"
    );
    assert!(anon.cache_status().contains("stored"));
    // Hit side: what anonymous clients stored is not served to a cookie.
    let r = get(&cg, "/me?echo=1", &[("Cookie", "session=bob")]).await;
    assert_eq!(r.x_cache(), "BYPASS");
    assert!(
        r.cache_status().contains("detail=cookie"),
        "{}",
        r.cache_status()
    );
    assert!(r.text().contains("session=bob"));

    // Explicitly shareable answers are stored and shared.
    let target = "/pub?cc=public%2C%20max-age%3D60&echo=1";
    let r = get(&cg, target, &alice).await;
    assert!(r.cache_status().contains("stored"), "{}", r.cache_status());
    assert_eq!(get(&cg, target, &[]).await.x_cache(), "HIT");
    assert_eq!(
        get(&cg, target, &[("Cookie", "session=bob")])
            .await
            .x_cache(),
        "HIT"
    );

    // key_cookies: keyed on `lang`, and only `lang` goes upstream.
    let en_alice = get(
        &cg,
        "/lang/home?echo=1",
        &[("Cookie", "session=alice; lang=en")],
    )
    .await;
    assert_eq!(en_alice.x_cache(), "MISS");
    assert_eq!(en_alice.json()["headers"]["cookie"][0], "lang=en");
    let en_bob = get(
        &cg,
        "/lang/home?echo=1",
        &[("Cookie", "lang=en; session=bob")],
    )
    .await;
    assert_eq!(en_bob.x_cache(), "HIT");
    let fr = get(&cg, "/lang/home?echo=1", &[("Cookie", "lang=fr")]).await;
    assert_eq!(fr.x_cache(), "MISS");
    // ignore_cookies: the route's opt-in.
    get(&cg, "/shared/x", &alice).await;
    assert_eq!(get(&cg, "/shared/x", &[]).await.x_cache(), "HIT");
}

/// Client-IP and forwarding headers reached the upstream unkeyed; now
/// cachegate sets its own.
#[tokio::test]
async fn client_ip_headers_are_replaced_by_cachegates_own() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let evil = [
        ("X-Forwarded-For", "<script>evil-xff</script>"),
        ("X-Real-IP", "evil-real-ip"),
        ("True-Client-IP", "evil-tci"),
        ("CF-Connecting-IP", "evil-cf"),
        ("Client-IP", "evil-client-ip"),
        ("X-Cluster-Client-IP", "evil-cluster"),
        ("X_Real_IP", "evil-underscore"),
        ("Forwarded", "for=evil-fwd"),
        ("X-Forwarded-Proto", "evil-proto"),
    ];
    let target = "/ip?cc=max-age%3D60&echo=1";
    let attack = get(&cg, target, &evil).await;
    assert!(!attack.text().contains("evil"), "{}", attack.text());
    let seen = up.state.last("/ip");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        cg.addr.to_string().as_str()
    );
    assert_eq!(seen.headers["via"], "1.1 cachegate");
    let victim = get(&cg, target, &[]).await;
    assert_eq!(victim.x_cache(), "HIT");
    assert!(!victim.text().contains("evil"));

    // A trusted proxy vouches for the client behind it.
    let cg = cachegate(
        &up.url,
        &[("CACHEGATE_SERVE__TRUSTED_PROXIES", "[\"127.0.0.0/8\"]")],
    );
    get(
        &cg,
        "/ip2",
        &[
            ("X-Forwarded-For", "6.6.6.6, 203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    .await;
    let seen = up.state.last("/ip2");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

/// `Location: http://<upstream>/…` sent clients around the proxy.
#[tokio::test]
async fn locations_naming_the_upstream_point_back_at_the_proxy() {
    let up = upstream().await;
    let cg = cachegate(&format!("{}/api", up.url), &[]);
    let location = format!("{}/api/next?x=1", up.url);
    let target = format!(
        "/go?status=302&location={}&content_location={}",
        urlencode(&location),
        urlencode(&location)
    );
    let r = get(&cg, &target, &[]).await;
    assert_eq!(r.status, 302);
    let want = format!("http://{}/next?x=1", cg.addr);
    assert_eq!(r.header("location"), Some(want.as_str()));
    assert_eq!(r.header("content-location"), Some(want.as_str()));
    // Elsewhere is left alone.
    let r = get(
        &cg,
        "/go?status=302&location=https%3A%2F%2Flogin.example%2F",
        &[],
    )
    .await;
    assert_eq!(r.header("location"), Some("https://login.example/"));
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Malformed Cache-Control lost its `private` on a TTL route.
#[tokio::test]
async fn malformed_cache_control_is_never_stored() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[("CACHEGATE_CACHE__DEFAULT_TTL", "60s")]);
    for (i, cc) in [
        "private max-age=60",
        "max-age=60, private;",
        "ext=\"a\\\"b\", private",
    ]
    .iter()
    .enumerate()
    {
        let target = format!("/cc/{i}?cc={}", urlencode(cc));
        let first = get(&cg, &target, &[]).await;
        assert!(
            !first.cache_status().contains("stored"),
            "{cc}: {}",
            first.cache_status()
        );
        let second = get(&cg, &target, &[]).await;
        assert_eq!(second.x_cache(), "MISS", "{cc} was stored");
    }
}

// ---------------------------------------------------------------------------
// The Lambda adapter, in process: the same canonical request.

mod lambda {
    use super::*;
    use cachegate::config::Mode;
    use cachegate::lambda::invoke;
    use cachegate::resolved::ResolvedConfig;
    use figment::providers::{Format, Toml};
    use figment::Figment;

    fn event(raw_path: &str, query: &str, headers: &str) -> lambda_http::Request {
        let json = format!(
            r#"{{"version":"2.0","rawPath":"{raw_path}","rawQueryString":"{query}",
                "headers":{{"host":"abc.execute-api.eu-west-1.amazonaws.com",
                "x-forwarded-proto":"https","x-forwarded-for":"6.6.6.6, 203.0.113.9"{headers}}},
                "isBase64Encoded":false,
                "requestContext":{{"http":{{"method":"GET","path":"{raw_path}",
                "protocol":"HTTP/1.1","sourceIp":"203.0.113.9"}},"stage":"$default",
                "domainName":"abc.execute-api.eu-west-1.amazonaws.com"}}}}"#
        );
        // Through lambda_http's own conversion, as the runtime does.
        lambda_http::request::from_str(&json).unwrap()
    }

    fn header<'a>(r: &'a http::Response<lambda_http::Body>, name: &str) -> &'a str {
        r.headers().get(name).map_or("", |v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn lambda_requests_get_the_same_canonical_form() {
        let up = upstream().await;
        let toml = format!(
            "backend = \"memory\"\n[upstream]\nurl = \"{}\"\n[cache]\ndefault_ttl = \"60s\"\n\
             [[routes]]\npath = \"/assets/{{*rest}}\"\nttl = \"1h\"\noverride_upstream = true\n",
            up.url
        );
        let config =
            ResolvedConfig::from_figment(Figment::new().merge(Toml::string(&toml))).unwrap();
        let p = cachegate::build_proxy(&config, Mode::Lambda).await.unwrap();

        let r = invoke(&p, event("/assets/..;/account", "", "")).await;
        assert_eq!(r.status(), 400);
        // A dot segment only a lenient origin sees (issue 24).
        let r = invoke(&p, event("/assets/%252e%252e/account", "", "")).await;
        assert_eq!(r.status(), 400);
        let r = invoke(&p, event("/assets/x", "echo=1", r#","x-real-ip":"evil""#)).await;
        assert_eq!(r.status(), 200);
        let seen = up.state.last("/assets/x");
        // API Gateway's source IP is the client; what the client wrote is dropped.
        assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9");
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
        assert!(seen.headers.get("x-real-ip").is_none());
        assert_eq!(seen.headers["via"], "1.1 cachegate");

        // Cookies: not stored for others unless shareable.
        let r = invoke(&p, event("/me", "echo=1", r#","cookie":"session=alice""#)).await;
        assert!(header(&r, "cache-status").contains("detail=cookie"));
        let r = invoke(&p, event("/me", "echo=1", "")).await;
        assert_eq!(header(&r, "x-cache"), "MISS");
    }
}

/// Sixteen clients re-reading a 4 MB entry on Redis (L1 off) pushed reads
/// past `store.read_timeout`, opened the breaker, and a bystander's small
/// key answered `detail=cache-unavailable` 49 times in 153. Needs the
/// suite's Redis (`CACHEGATE_TEST_REDIS_URL`).
#[tokio::test(flavor = "multi_thread")]
async fn a_large_entry_does_not_open_the_breaker_for_everyone() {
    let up = upstream().await;
    let prefix = format!("canon-big-{}:", std::process::id());
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_BACKEND", "redis"),
            (
                "CACHEGATE_REDIS__URL",
                &common::need("CACHEGATE_TEST_REDIS_URL"),
            ),
            ("CACHEGATE_REDIS__KEY_PREFIX", &prefix),
            ("CACHEGATE_CACHE__L1_TTL", "0s"),
        ],
    );
    let big = format!("{}/big?bin=4194304&cc=max-age%3D600", cg.url);
    let small = format!("{}/small?cc=max-age%3D600", cg.url);
    // Stored first (a loaded machine may need a second try at a 4 MB write).
    for url in [&big, &small] {
        let mut tries = 0;
        while common::get(url).await.x_cache() != "HIT" {
            tries += 1;
            assert!(tries < 10, "{url} never became a hit");
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (big, stop, client) = (big.clone(), stop.clone(), common::client());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = client.get(&big).send().await.unwrap();
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    let (mut answers, mut unavailable) = (0, 0);
    // A fixed number of bystander requests, however long they take (a
    // debug build decoding sixteen 4 MB answers at once is slow).
    while answers < 30 {
        let r = common::get(&small).await;
        answers += 1;
        if r.header("cache-status").contains("cache-unavailable") || r.x_cache() != "HIT" {
            unavailable += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    println!("bystander: {unavailable} of {answers} answers not from the cache");
    // The breaker counts backend failures: on a loaded machine a read of
    // the small key can still be slow now and then, but the large entry
    // must not take the cache away from everyone.
    assert!(
        unavailable * 10 <= answers,
        "bystander: {unavailable} of {answers} answers not from the cache"
    );
}
