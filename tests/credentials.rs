//! Credentials beyond `Authorization` and `Cookie` (#24 item 1): with a
//! `default_ttl` or a route `ttl`, requests carrying an API-key or token
//! header never get another tenant's answer, an answer the upstream marks
//! `public` is shared, a route keyed on the header caches per key, and
//! the edge is told what it may share.
//!
//! The upstream is a real HTTP server on loopback that answers per tenant:
//! the tenant is whichever credential header the request carries.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use common::{cachegate, client, send, Got};
use http::{Request, Response};

use cachegate::config::DEFAULT_CREDENTIAL_HEADERS;

/// An API whose answers are the caller's own data: the body names the
/// tenant, taken from the first credential header the request carries
/// (`anonymous` without one). `cc` sets `Cache-Control`; without it the
/// answer has no freshness of its own, as many APIs send it.
async fn tenant_api() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    async fn answer(State(calls): State<Arc<AtomicUsize>>, req: Request<Body>) -> Response<Body> {
        calls.fetch_add(1, Ordering::SeqCst);
        let tenant = DEFAULT_CREDENTIAL_HEADERS
            .iter()
            .find_map(|h| req.headers().get(*h))
            .map_or("anonymous".to_owned(), |v| {
                format!("tenant {}", v.to_str().unwrap())
            });
        let q: HashMap<String, String> =
            form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let mut resp = Response::builder().header("content-type", "application/json");
        if let Some(cc) = q.get("cc") {
            resp = resp.header("cache-control", cc.as_str());
        }
        let body = serde_json::json!({ "path": req.uri().path(), "data": tenant });
        resp.body(Body::from(body.to_string())).unwrap()
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, calls, task)
}

async fn get_as(base: &str, path: &str, credential: Option<(&str, &str)>) -> Got {
    let mut req = client().get(format!("{base}{path}"));
    if let Some((name, value)) = credential {
        req = req.header(name, value);
    }
    send(req).await
}

fn data(got: &Got) -> String {
    got.json()["data"].as_str().unwrap().to_owned()
}

/// For every default credential header: tenant A's and tenant B's answers
/// are their own, never stored, never each other's, and go out `private`
/// with the header in `Vary`; an anonymous client's entry (stored, and
/// told `s-maxage=60` at the edge) is served to neither tenant.
async fn tenants_never_share(base: &str, prefix: &str) {
    let mut crossed = Vec::new();
    for name in DEFAULT_CREDENTIAL_HEADERS {
        let path = format!("{prefix}/{name}");
        let a = get_as(base, &path, Some((name, "a"))).await;
        assert_eq!(a.status, 200, "{name}");
        assert_eq!(data(&a), "tenant a", "{name}");
        let b = get_as(base, &path, Some((name, "b"))).await;
        if data(&b) != "tenant b" {
            crossed.push(format!("{name} ({})", b.header("cache-status")));
            continue;
        }
        assert_ne!(b.x_cache(), "HIT", "{name}");
        assert!(
            b.header("cache-status").contains("detail=credential"),
            "{name}: {}",
            b.header("cache-status")
        );
        // What the next cache out is told: this answer is B's alone.
        let cc = b.header("cache-control");
        assert!(
            cc.contains("private") && !cc.contains("s-maxage"),
            "{name}: {cc}"
        );
        assert!(b.header("vary").contains(name), "{name}: {:?}", b.headers);
        // The anonymous answer is stored and shared, and given to no tenant.
        let anon = get_as(base, &path, None).await;
        assert_eq!(data(&anon), "anonymous", "{name}");
        let anon = get_as(base, &path, None).await;
        assert_eq!(
            (data(&anon).as_str(), anon.x_cache()),
            ("anonymous", "HIT"),
            "{name}"
        );
        assert!(
            anon.header("cache-control").contains("s-maxage=60"),
            "{name}: {}",
            anon.header("cache-control")
        );
        let a = get_as(base, &path, Some((name, "a"))).await;
        assert_eq!(data(&a), "tenant a", "{name}: got the anonymous entry");
        assert!(a.header("cache-status").contains("detail=credential"));
        // The header's name is matched in any letter case.
        let upper = name.to_ascii_uppercase();
        let b = get_as(base, &path, Some((&upper, "b"))).await;
        assert_eq!(data(&b), "tenant b", "{upper}");
    }
    assert!(
        crossed.is_empty(),
        "tenant B got tenant A's answer for {} of {} credential headers: {crossed:?}",
        crossed.len(),
        DEFAULT_CREDENTIAL_HEADERS.len()
    );
}

#[tokio::test]
async fn with_default_ttl_no_tenant_gets_another_tenants_answer() {
    let (upstream, _calls, _task) = tenant_api().await;
    let cg = cachegate(&upstream, &[("CACHEGATE_CACHE__DEFAULT_TTL", "60s")]);
    tenants_never_share(&cg.url, "/global").await;
}

#[tokio::test]
async fn with_a_route_ttl_no_tenant_gets_another_tenants_answer() {
    let (upstream, _calls, _task) = tenant_api().await;
    let cg = cachegate(
        &upstream,
        &[(
            "CACHEGATE_ROUTES",
            r#"[{path="/routed/{*rest}", ttl="60s"}]"#,
        )],
    );
    tenants_never_share(&cg.url, "/routed").await;
}

/// What the upstream marks `public` (or `s-maxage`) it says anyone may
/// have: stored from tenant A's request, served to tenant B.
#[tokio::test]
async fn an_answer_marked_shareable_is_shared() {
    let (upstream, calls, _task) = tenant_api().await;
    let cg = cachegate(&upstream, &[("CACHEGATE_CACHE__DEFAULT_TTL", "60s")]);
    for cc in ["public,max-age=60", "s-maxage=60"] {
        let path = format!("/catalogue?cc={cc}");
        let a = get_as(&cg.url, &path, Some(("x-api-key", "a"))).await;
        assert_eq!(data(&a), "tenant a");
        let before = calls.load(Ordering::SeqCst);
        let b = get_as(&cg.url, &path, Some(("x-api-key", "b"))).await;
        assert_eq!(
            (data(&b).as_str(), b.x_cache()),
            ("tenant a", "HIT"),
            "{cc}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), before, "{cc}");
        // The upstream's own statement goes out as it came.
        assert_eq!(b.header("cache-control"), cc, "{cc}");
    }
}

/// A route that keys on the API key caches per key: each tenant hits its
/// own entry, and the edge (none configured, so one that may ignore
/// `Vary`) is told `private` with the key in `Vary`.
#[tokio::test]
async fn a_route_keyed_on_the_api_key_caches_per_key() {
    let (upstream, calls, _task) = tenant_api().await;
    let cg = cachegate(
        &upstream,
        &[(
            "CACHEGATE_ROUTES",
            r#"[{path="/keyed/{*rest}", ttl="60s", key_headers=["x-api-key"]}]"#,
        )],
    );
    for tenant in ["a", "b"] {
        let miss = get_as(&cg.url, "/keyed/items", Some(("x-api-key", tenant))).await;
        assert_eq!(
            (data(&miss).as_str(), miss.x_cache()),
            (format!("tenant {tenant}").as_str(), "MISS")
        );
    }
    let before = calls.load(Ordering::SeqCst);
    for tenant in ["a", "b"] {
        let hit = get_as(&cg.url, "/keyed/items", Some(("x-api-key", tenant))).await;
        assert_eq!(
            (data(&hit).as_str(), hit.x_cache()),
            (format!("tenant {tenant}").as_str(), "HIT")
        );
        assert!(hit.header("cache-control").contains("private"));
        assert!(!hit.header("cache-control").contains("s-maxage"));
        assert!(hit.header("vary").contains("x-api-key"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), before);
    // Another credential the route does not key on is still one.
    let other = get_as(&cg.url, "/keyed/items", Some(("x-auth-token", "c"))).await;
    assert_eq!(data(&other), "tenant c");
    assert!(other.header("cache-status").contains("detail=credential"));
}
