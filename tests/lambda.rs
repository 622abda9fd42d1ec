//! The Lambda path: API Gateway HTTP API (v2) events, parsed by lambda_http
//! exactly as the runtime does, through the same handler as `serve`, with a
//! real HTTP upstream on loopback. (The runtime API itself is exercised
//! under cargo-lambda's emulator in the deployment tests.)

mod common;

use std::sync::Arc;

use figment::providers::{Format, Toml};
use figment::Figment;
use lambda_http::Body;

use cachegate::config::Mode;
use cachegate::lambda::invoke;
use cachegate::proxy::Proxy;
use cachegate::resolved::ResolvedConfig;

async fn proxy(upstream: &str) -> Arc<Proxy> {
    proxy_with(upstream, "").await
}

async fn proxy_with(upstream: &str, extra: &str) -> Arc<Proxy> {
    let toml = format!("backend = \"memory\"\n[upstream]\nurl = \"{upstream}\"\n{extra}");
    let config = ResolvedConfig::from_figment(Figment::new().merge(Toml::string(&toml))).unwrap();
    cachegate::build_proxy(&config, Mode::Lambda).await.unwrap()
}

fn event(name: &str) -> lambda_http::Request {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    lambda_http::request::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn header<'a>(r: &'a http::Response<Body>, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

fn text(r: &http::Response<Body>) -> &str {
    match r.body() {
        Body::Text(s) => s,
        other => panic!("expected a text body, got {other:?}"),
    }
}

#[tokio::test]
async fn v2_events_miss_then_hit_through_the_shared_handler() {
    let up = common::upstream().await;
    // The GET carries `Cookie: theme=dark`: the route says cookies do not
    // change its answers, or a cookie request would not fill the cache.
    let p = proxy_with(
        &up.url,
        "[[routes]]\npath = \"/items/{id}\"\nignore_cookies = true\n",
    )
    .await;
    let first = invoke(&p, event("apigw_v2_get.json")).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    let seen = up.state.last("/items/1");
    assert_eq!(seen.path_and_query, "/items/1?a=1&b=2&cc=max-age%3D60");
    assert_eq!(seen.headers["accept-language"], "en");
    assert_eq!(seen.headers["cookie"], "theme=dark");
    // JSON goes back as text, not base64.
    let body: serde_json::Value = serde_json::from_str(text(&first)).unwrap();
    assert_eq!(body["path"], "/items/1");

    // Same query in another order: the same entry.
    let second = invoke(&p, event("apigw_v2_head.json")).await;
    assert_eq!(header(&second, "x-cache"), "HIT");
    assert!(matches!(second.body(), Body::Empty));
    let third = invoke(&p, event("apigw_v2_get.json")).await;
    assert_eq!(header(&third, "x-cache"), "HIT");
    assert_eq!(text(&third), text(&first));
    assert_eq!(up.state.hits("/items/1"), 1);

    // A request with credentials never sees the shared entry.
    let auth = invoke(&p, event("apigw_v2_get_authorization.json")).await;
    assert_eq!(header(&auth, "x-cache"), "BYPASS");
    assert_eq!(up.state.hits("/items/1"), 2);
}

#[tokio::test]
async fn binary_bodies_cross_the_lambda_boundary_intact() {
    let up = common::upstream().await;
    let p = proxy(&up.url).await;
    // Request: a base64 event body arrives upstream as the raw bytes.
    let post = invoke(&p, event("apigw_v2_post_binary.json")).await;
    assert_eq!(header(&post, "x-cache"), "BYPASS");
    let expected: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    assert_eq!(&up.state.last("/upload").body[..], &expected[..]);
    // Response: binary content is handed to lambda_http as Binary (it
    // base64-encodes it for API Gateway), from the upstream and from cache.
    for want in ["MISS", "HIT"] {
        let r = invoke(&p, event("apigw_v2_get_binary.json")).await;
        assert_eq!(header(&r, "x-cache"), want);
        match r.body() {
            Body::Binary(b) => {
                assert_eq!(b.len(), 1000);
                assert!(b.iter().enumerate().all(|(i, &x)| x == (i * 7 % 256) as u8));
            }
            other => panic!("expected a binary body, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn upstream_failure_in_lambda_is_a_json_502() {
    // Nothing listens there (a port outside the ephemeral range, which no
    // other test's listener or connection can take meanwhile).
    let url = format!("http://127.0.0.1:{}", cachegate_test_net::free_port());
    let p = proxy(&url).await;
    let r = invoke(&p, event("apigw_v2_get.json")).await;
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = serde_json::from_str(text(&r)).unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn stale_while_revalidate_in_lambda_refreshes_inline_exactly_once() {
    let up = common::upstream().await;
    let p = proxy(&up.url).await;
    let ev = || {
        let mut e = event("apigw_v2_get.json");
        *e.uri_mut() = "/swr?cc=max-age%3D1%2C%20stale-while-revalidate%3D30&cc_v2=max-age%3D60"
            .parse()
            .unwrap();
        // Anonymous: a cookie request would not fill the cache here.
        e.headers_mut().remove("cookie");
        e
    };
    let first = invoke(&p, ev()).await;
    assert_eq!(header(&first, "x-cache"), "MISS");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    up.state.set_version("/swr", "2");
    // The same execution environment gets concurrent invocations only with
    // the runtime's concurrency mode; the proxy must hold up either way.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (p, e) = (p.clone(), ev());
            tokio::spawn(async move { invoke(&p, e).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        let v: serde_json::Value = serde_json::from_str(text(&r)).unwrap();
        outcomes.push((
            header(&r, "x-cache").to_owned(),
            v["version"].as_str().unwrap().to_owned(),
        ));
    }
    let refreshed: Vec<_> = outcomes.iter().filter(|(x, _)| x != "STALE").collect();
    assert_eq!(
        refreshed.len(),
        1,
        "exactly one request refreshes inline: {outcomes:?}"
    );
    assert_eq!(refreshed[0].1, "2");
    assert!(outcomes
        .iter()
        .filter(|(x, _)| x == "STALE")
        .all(|(_, v)| v == "1"));
    assert_eq!(up.state.hits("/swr"), 2);
    let after = invoke(&p, ev()).await;
    assert_eq!(header(&after, "x-cache"), "HIT");
}
