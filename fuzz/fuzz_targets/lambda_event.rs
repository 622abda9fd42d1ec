//! The Lambda event adapter: any bytes as the invocation payload, through
//! lambda_http's event deserialisation and request conversion, then our
//! adapter into the handler's `Request<Bytes>` and the handler's first,
//! pure steps (route lookup, key, request policy). Nothing may panic: in
//! the release build a panic aborts the whole execution environment.
#![no_main]

use cachegate::config::{CacheConfig, RouteConfig};
use cachegate::key::Target;
use cachegate::lambda;
use cachegate::policy::{request_policy, RequestFacts};
use cachegate::request::{CanonicalRequest, Forwarding};
use cachegate::routes::RouteTable;
use libfuzzer_sys::fuzz_target;
use reqwest::Url;
use std::sync::OnceLock;

fn routes() -> &'static RouteTable {
    static ROUTES: OnceLock<RouteTable> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let routes: Vec<RouteConfig> = serde_json::from_str(
            r#"[{"path": "/items/{id}", "ttl": "60s", "key_headers": ["Accept-Language"]},
                {"path": "/users/{*rest}", "cache": false}]"#,
        )
        .expect("route config");
        RouteTable::build(&routes, &CacheConfig::default()).expect("routes")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(req) = lambda::parse_event(data) else {
        return;
    };
    let (parts, body) = req.into_parts();
    let has_body = !body.is_empty();
    let base = Url::parse("https://api.example.com/v1").expect("literal");
    let Ok((canon, rule)) =
        CanonicalRequest::new(parts, body.clone(), &Forwarding::default(), &routes())
    else {
        return;
    };
    let t = Target::from_canonical(
        &base,
        &canon.path,
        canon.query.as_deref(),
        rule.query_filter(),
    );
    assert!(t.url().path().starts_with("/v1/"));
    assert_eq!(t.url().host_str(), Some("api.example.com"));
    let _ = t.primary_key(&rule.name, &rule.key_headers, &canon.headers);
    let _ = request_policy(
        RequestFacts {
            method: &canon.method,
            headers: &canon.headers,
            has_body,
            upgrade: canon.upgrade,
        },
        &rule,
    );
});
