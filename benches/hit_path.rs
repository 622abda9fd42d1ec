//! The hit path's parts, measured: key normalisation, the response policy,
//! entry encode/decode, and a whole in-process hit through `Proxy::handle`
//! on the memory backend (a 1 KB JSON body). The network-level figure comes
//! from `scripts/bench-hit` (wrk against `cachegate serve`).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use figment::providers::{Format, Toml};
use figment::Figment;
use http::{HeaderMap, HeaderValue, Request, StatusCode};

use cachegate::config::CacheConfig;
use cachegate::config::Mode;
use cachegate::key::Target;
use cachegate::policy::{response_policy, RequestPolicy, ResponseFacts};
use cachegate::resolved::ResolvedConfig;
use cachegate::routes::RouteTable;
use cachegate_store::{now_millis, Entry, Record};

fn json_1k() -> Bytes {
    let mut s = String::from("{\"items\":[");
    while s.len() < 1000 {
        s.push_str("{\"id\":12345,\"name\":\"widget\"},");
    }
    s.push_str("{}]}");
    Bytes::from(s)
}

fn parts(c: &mut Criterion) {
    let base = reqwest::Url::parse("https://api.example.com/v1").unwrap();
    let ignored = vec!["utm_source".to_string()];
    let mut headers = HeaderMap::new();
    headers.insert(
        "accept-language",
        HeaderValue::from_static("en-GB,en;q=0.9"),
    );
    let key_headers = vec!["accept-language".to_string()];
    c.bench_function("key: resolve target + primary key", |b| {
        b.iter(|| {
            let t = Target::resolve(
                &base,
                "/items/42/reviews",
                Some("sort=desc&page=2&utm_source=x"),
                cachegate::key::QueryFilter::ignoring(&ignored),
            )
            .expect("a canonical path");
            t.primary_key("*", &key_headers, &headers)
        })
    });

    let table = RouteTable::build(&[], &CacheConfig::default()).unwrap();
    let rule = table.rule_for("/items/42");
    let mut resp = HeaderMap::new();
    resp.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=60, stale-while-revalidate=30"),
    );
    resp.insert("etag", HeaderValue::from_static("\"abc\""));
    resp.insert("content-type", HeaderValue::from_static("application/json"));
    c.bench_function("policy: response storability and freshness", |b| {
        let now = now_millis();
        b.iter(|| {
            response_policy(
                ResponseFacts {
                    status: StatusCode::OK,
                    headers: &resp,
                    body_len: 1024,
                    request_time: now - 20,
                    response_time: now,
                    request: RequestPolicy::PLAIN_GET,
                },
                &rule,
            )
        })
    });

    let now = now_millis();
    let entry = Record::Entry(Entry {
        status: 200,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            ("etag".into(), Bytes::from_static(b"\"abc\"")),
            (
                "date".into(),
                Bytes::from_static(b"Mon, 23 Nov 2026 02:00:00 GMT"),
            ),
        ],
        body: json_1k(),
        born_at: now,
        stored_at: now,
        fresh_until: now + 60_000,
        stale_while_revalidate_until: now + 90_000,
        stale_if_error_until: now + 360_000,
        keep_until: now + 3_660_000,
        tags: vec!["url:/v1/items/42".into()],
    });
    let encoded = entry.encode();
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode 1 KB entry", |b| b.iter(|| entry.encode()));
    g.bench_function("decode 1 KB entry", |b| {
        b.iter(|| Record::decode(&encoded).unwrap())
    });
    g.finish();
}

/// A whole hit through the shared handler, no network: what the proxy adds
/// on top of the transport. The one miss that fills the cache goes to a
/// real loopback upstream started here.
fn in_process_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(async {
        let body = json_1k();
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move {
                (
                    [
                        ("cache-control", "max-age=3600"),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    });
    let toml = format!("[upstream]\nurl = \"{upstream}\"\n");
    let config = ResolvedConfig::from_figment(Figment::new().merge(Toml::string(&toml))).unwrap();
    let proxy = rt
        .block_on(cachegate::build_proxy(&config, Mode::Serve))
        .unwrap();
    let request = || {
        Request::get("/items/42?page=2")
            .header("accept", "application/json")
            .body(Bytes::new())
            .unwrap()
    };
    let first = rt.block_on(proxy.handle(request()));
    assert_eq!(first.headers()["x-cache"], "MISS");
    let proxy = Arc::clone(&proxy);
    c.bench_function("proxy: memory hit, 1 KB JSON (in-process)", |b| {
        b.iter(|| {
            let r = rt.block_on(proxy.handle(request()));
            debug_assert_eq!(r.headers()["x-cache"], "HIT");
            r
        })
    });
}

criterion_group!(benches, parts, in_process_hit);
criterion_main!(benches);
