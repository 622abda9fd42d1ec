//! One path spelling, one rule (issue 24 item 2), end to end: the built
//! `cachegate serve` in front of an origin on loopback that reads paths
//! leniently, requests written byte for byte on raw TCP. A file of its own
//! so that its cachegate processes do not run beside the timing-sensitive
//! tests of `tests/canonical.rs`. The model: docs/hostile-input.md, "One
//! path spelling, one rule".

mod common;

use common::cachegate;
use common::raw::Raw;

async fn get(cg: &common::Cachegate, target: &str, headers: &[(&str, &str)]) -> Raw {
    common::raw::send(cg, "GET", target, headers).await
}

/// How an origin that is lenient about spelling reads a path, as many
/// frameworks do some of it: escapes decoded twice (a framework decoding
/// what its server already decoded), Unicode compatibility forms folded
/// (NFKC), case ignored, `;params` stripped (Tomcat, Jetty, Spring), `//`
/// and a trailing slash ignored, then dot segments resolved.
fn read_leniently(raw: &str) -> String {
    use percent_encoding::percent_decode_str;
    let once = percent_decode_str(raw).decode_utf8_lossy().into_owned();
    let twice = percent_decode_str(&once).decode_utf8_lossy().into_owned();
    let folded = icu_normalizer::ComposingNormalizerBorrowed::new_nfkc()
        .normalize(&twice.to_lowercase())
        .into_owned();
    let mut segments: Vec<&str> = Vec::new();
    for segment in folded.split(['/', '\\']) {
        match segment.split(';').next().unwrap_or_default() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

/// A multi-tenant API that reads paths leniently: `/t/…` answers the
/// tenant named by `X-Tenant`, `/admin/users` the admin list, `/account`
/// the account of the session cookie; none says anything about caching.
async fn lenient_origin() -> (String, tokio::task::JoinHandle<()>) {
    use axum::body::Body;
    use axum::http::{Request, Response};
    let app = axum::Router::new().fallback(|req: Request<Body>| async move {
        let path = read_leniently(req.uri().path());
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned()
        };
        let body = if path.starts_with("/t/") {
            format!("{path} of tenant {}", header("x-tenant"))
        } else if path == "/admin/users" {
            "the admin list".to_owned()
        } else if path == "/account" {
            format!("the account of {}", header("cookie"))
        } else {
            return Response::builder().status(404).body(Body::empty()).unwrap();
        };
        Response::new(Body::from(body))
    });
    common::serve_on_loopback(app).await
}

const LENIENT_ROUTES: &str = r#"[{path="/t/{*rest}", key_headers=["x-tenant"]},
    {path="/admin/{*rest}", cache=false},
    {path="/assets/{*rest}", ttl="1h", ignore_cookies=true}]"#;

/// Spellings of `/t/dN` (N tells them apart); before issue 24 item 2 the
/// ones after the first two fell to the default rule, which does not key
/// on `x-tenant`.
const TENANT_SPELLINGS: &[&str] = &[
    "/t/d0",
    "/t/d1/",
    "//t/d2",
    "/T/d3",
    "/t;x/d4",
    "/t%2Fd5",
    "/%2574/d6",
    "/%EF%BD%94/d7",
    "/t%5Cd8",
    "/t%252Fd9",
];

/// For each spelling, acme asks first, then evilcorp: the spellings on
/// which evilcorp got acme's answer, and how many spellings were answered
/// (not refused).
async fn cross_tenant_answers(cg: &common::Cachegate) -> (Vec<&'static str>, usize) {
    let mut crossed = Vec::new();
    let mut answered = 0;
    for &target in TENANT_SPELLINGS {
        let acme = get(cg, target, &[("X-Tenant", "acme")]).await;
        let evil = get(cg, target, &[("X-Tenant", "evilcorp")]).await;
        if acme.status == 200 {
            answered += 1;
            assert!(
                acme.text().contains("tenant acme"),
                "{target}: {}",
                acme.text()
            );
        } else {
            assert_eq!(acme.status, 400, "{target}: {}", acme.head);
            assert_eq!(acme.json()["error"]["code"], "ambiguous_path", "{target}");
        }
        if evil.text().contains("acme") {
            crossed.push(target);
        }
    }
    (crossed, answered)
}

fn lenient_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CACHEGATE_CACHE__DEFAULT_TTL", "60s"),
        ("CACHEGATE_ROUTES", LENIENT_ROUTES),
    ]
}

/// Issue 24: with an origin that reads `//t/`, `/T/`, `/t;x/`, `/t%2F`,
/// `/%2574/` as `/t/`, evilcorp was served acme's data, 5 of 5 spellings.
#[tokio::test]
async fn no_spelling_shares_a_tenants_answer_with_another_tenant() {
    let (url, origin) = lenient_origin().await;
    let cg = cachegate(&url, &lenient_env());
    let (crossed, answered) = cross_tenant_answers(&cg).await;
    assert_eq!(crossed, Vec::<&str>::new(), "cross-tenant answers");
    // The plain spellings are answered, and cached per tenant.
    assert!(answered >= 2, "{answered}");
    let again = get(&cg, "/t/d0", &[("X-Tenant", "acme")]).await;
    assert_eq!(again.x_cache(), "HIT");
    assert!(again.text().contains("tenant acme"));
    origin.abort();
}

/// The same origin behind `upstream.path_equivalence = "strict"` (a
/// setting for origins that do not read paths this way): the spellings
/// fall to the default rule again, tenants share answers and alice's page
/// leaks, which is what the lenient default prevents (and what the tests
/// above would see if it did not).
#[tokio::test]
async fn a_strict_setting_in_front_of_a_lenient_origin_shares_answers_across_tenants() {
    let (url, origin) = lenient_origin().await;
    let mut env = lenient_env();
    env.push(("CACHEGATE_UPSTREAM__PATH_EQUIVALENCE", "strict"));
    let cg = cachegate(&url, &env);
    let (crossed, answered) = cross_tenant_answers(&cg).await;
    assert_eq!(answered, TENANT_SPELLINGS.len(), "strict refuses none");
    assert!(crossed.len() >= 5, "{crossed:?}");
    assert!(alices_page_leaks(&cg).await.len() >= 3);
    origin.abort();
}

/// Issue 24: 9 of 15 spellings of `/admin/users` lost the route's
/// `cache = false` and were stored under `cache.default_ttl`.
#[tokio::test]
async fn no_spelling_of_an_uncached_path_is_stored() {
    let (url, origin) = lenient_origin().await;
    let cg = cachegate(&url, &lenient_env());
    let mut stored = Vec::new();
    for target in [
        "/admin/users",
        "/admin/users/",
        "/admin//users",
        "//admin/users",
        "/Admin/users",
        "/ADMIN/USERS",
        "/admin;x/users",
        "/admin/users;x",
        "/admin%2Fusers",
        "/admin%2fusers",
        "/%2561dmin/users",
        "/%61dmin/users",
        "/x/../admin/users",
        "/%EF%BD%81dmin/users",
        "/admin%5Cusers",
    ] {
        let first = get(&cg, target, &[]).await;
        let second = get(&cg, target, &[]).await;
        if first.status == 400 {
            assert_eq!(first.json()["error"]["code"], "ambiguous_path", "{target}");
            continue;
        }
        assert_eq!(first.text(), "the admin list", "{target}");
        if first.cache_status().contains("stored") || second.x_cache() == "HIT" {
            stored.push(target);
        }
    }
    assert_eq!(stored, Vec::<&str>::new(), "stored despite cache = false");
    origin.abort();
}

/// Spellings of `/assets/…/account` with dot segments only an origin
/// that decodes twice or folds NFKC resolves.
const LENIENT_DOTS: &[&str] = &[
    "/assets/%252e%252e/account",
    "/assets/%252E%252E/account",
    "/assets/..%252Faccount",
    "/assets/x/..%252F..%252Faccount",
    "/assets/%EF%BC%8E%EF%BC%8E/account",
    "/assets/\u{ff0e}\u{ff0e}/account",
];

/// Alice follows each link with her session cookie, then another client
/// asks for it: the links on which that client got alice's page.
async fn alices_page_leaks(cg: &common::Cachegate) -> Vec<&'static str> {
    let mut leaked = Vec::new();
    for &target in LENIENT_DOTS {
        let _alice = get(cg, target, &[("Cookie", "session=alice")]).await;
        let mallory = get(cg, target, &[]).await;
        if mallory.text().contains("alice") {
            leaked.push(target);
        }
    }
    leaked
}

/// Issue 24: double-encoded and fullwidth dots reached alice's `/account`
/// through the assets route (`ttl` + `ignore_cookies`) at an origin that
/// decodes twice or folds NFKC; the next client got alice's page, 3 of 3.
#[tokio::test]
async fn dots_only_a_lenient_origin_resolves_never_reach_another_users_page() {
    let (url, origin) = lenient_origin().await;
    let cg = cachegate(&url, &lenient_env());
    for &target in LENIENT_DOTS {
        let r = get(&cg, target, &[("Cookie", "session=alice")]).await;
        assert_eq!(r.status, 400, "{target}: {}", r.text());
    }
    assert_eq!(alices_page_leaks(&cg).await, Vec::<&str>::new());
    origin.abort();
}
