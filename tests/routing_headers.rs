//! Routing headers (issue #24 item 3), end to end through the built
//! `cachegate serve` in front of the real test upstream, which records the
//! headers it received: on a cacheable GET none of the headers frameworks
//! and proxies read to re-route or re-scheme a request reaches the
//! upstream, unless a route keys on it; a write forwards them all.
//!
//! The rules are tabled in docs/hostile-input.md.

mod common;

use cachegate::policy::headers::UNKEYED_ROUTING_HEADERS;
use common::{cachegate, upstream};

const CACHEABLE: &str = "cc=max-age%3D60";

/// Names the issue measured reaching the upstream, written here rather
/// than read from the crate's list so that dropping one from it fails.
const NAMED_IN_ISSUE: &[&str] = &[
    "Base-Url",
    "CF-Visitor",
    "Forwarded",
    "Http-Url",
    "Proxy-Url",
    "Request-Uri",
    "Uri",
    "Url",
    "X-Backend-Host",
    "X-Custom-IP-Authorization",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Forwarded-Scheme",
    "X-Forwarded-Server",
    "X-HTTP-Host-Override",
    "X-Host",
    "X-Original-Proto",
    "X-Original-URL",
    "X-Proxy-Url",
    "X-ProxyUser-Ip",
    "X-Rewrite-URL",
    "X-Script-Name",
];

/// Added by `cache.routing_headers` in these tests.
const CONFIGURED: &str = "X-Tenant-Route";

/// Every name to check, as a client would capitalise it.
fn all_names() -> Vec<String> {
    let mut names: Vec<String> = UNKEYED_ROUTING_HEADERS
        .iter()
        .map(|n| n.to_string())
        .chain(NAMED_IN_ISSUE.iter().map(|n| n.to_string()))
        .chain([CONFIGURED.to_owned()])
        .collect();
    names.sort_by_key(|n| n.to_ascii_lowercase());
    names.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    names
}

fn configured_extra() -> (&'static str, String) {
    (
        "CACHEGATE_CACHE__ROUTING_HEADERS",
        format!("[\"{}\"]", CONFIGURED.to_ascii_lowercase()),
    )
}

#[tokio::test]
async fn no_routing_header_reaches_the_upstream_on_a_cacheable_get() {
    let up = upstream().await;
    let (var, value) = configured_extra();
    let cg = cachegate(&up.url, &[(var, &value)]);
    let mut forwarded = Vec::new();
    for (i, name) in all_names().iter().enumerate() {
        let path = format!("/routing/{i}");
        let target = format!("{path}?{CACHEABLE}");
        let underscored = name.replace('-', "_");
        let attack = common::raw::send(
            &cg,
            "GET",
            &target,
            &[(name, "evil.example"), (&underscored, "evil.example")],
        )
        .await;
        assert_eq!(attack.status, 200, "{name}: {}", attack.head);
        let seen = up.state.last(&path).headers;
        if seen
            .keys()
            .any(|n| n.as_str().replace('_', "-") == name.to_ascii_lowercase())
        {
            forwarded.push(name.clone());
        }
        // The entry is the one built without it: a client without the
        // header shares it.
        let victim = common::raw::send(&cg, "GET", &target, &[]).await;
        assert_eq!(victim.x_cache(), "HIT", "{name}");
    }
    assert!(
        forwarded.is_empty(),
        "forwarded on a cacheable GET: {forwarded:?}"
    );
}

/// A route keyed on a routing header forwards it, under the name the key
/// reads, and each value gets its own entry.
#[tokio::test]
async fn a_route_keyed_on_a_routing_header_forwards_it_and_keys_on_it() {
    let up = upstream().await;
    let (var, value) = configured_extra();
    let routes = r#"[{path="/keyed/{*rest}", key_headers=["x-script-name", "x-tenant-route"]}]"#;
    let cg = cachegate(&up.url, &[(var, &value), ("CACHEGATE_ROUTES", routes)]);
    for name in ["x-script-name", "x-tenant-route"] {
        let path = format!("/keyed/{name}");
        let target = format!("{path}?{CACHEABLE}");
        let a = common::raw::send(&cg, "GET", &target, &[(name, "/tenant-a")]).await;
        assert_eq!(a.x_cache(), "MISS", "{name}");
        assert_eq!(up.state.last(&path).headers[name], "/tenant-a", "{name}");

        let b = common::raw::send(&cg, "GET", &target, &[(name, "/tenant-b")]).await;
        assert_eq!(
            b.x_cache(),
            "MISS",
            "{name}: tenant-b shared tenant-a's entry"
        );
        assert_eq!(up.state.last(&path).headers[name], "/tenant-b", "{name}");

        let none = common::raw::send(&cg, "GET", &target, &[]).await;
        assert_eq!(none.x_cache(), "MISS", "{name}: no header shared an entry");
        assert!(!up.state.last(&path).headers.contains_key(name), "{name}");

        let again = common::raw::send(&cg, "GET", &target, &[(name, "/tenant-a")]).await;
        assert_eq!(again.x_cache(), "HIT", "{name}");
        assert_eq!(up.state.hits(&path), 3, "{name}");
    }
    // Another routing header on the keyed route is still stripped.
    let path = "/keyed/other";
    common::raw::send(
        &cg,
        "GET",
        &format!("{path}?{CACHEABLE}"),
        &[("X-Original-URL", "/admin")],
    )
    .await;
    assert!(!up.state.last(path).headers.contains_key("x-original-url"));
}

/// A write is not shared: it reaches the upstream as sent, routing
/// headers included (docs/hostile-input.md says why).
#[tokio::test]
async fn a_write_forwards_routing_headers() {
    let up = upstream().await;
    let (var, value) = configured_extra();
    let cg = cachegate(&up.url, &[(var, &value)]);
    let names = all_names();
    // `Forwarded` is replaced by cachegate's own on every request.
    let sent: Vec<(&str, &str)> = names
        .iter()
        .filter(|n| !n.eq_ignore_ascii_case("forwarded"))
        .map(|n| (n.as_str(), "/write-route"))
        .collect();
    let post = common::raw::send(&cg, "POST", "/write?echo=1", &sent).await;
    assert_eq!(post.x_cache(), "BYPASS");
    let seen = up.state.last("/write");
    assert_eq!(seen.method, "POST");
    for (name, value) in sent {
        assert_eq!(
            seen.headers.get(name).map(|v| v.to_str().unwrap()),
            Some(value),
            "{name} was not forwarded on a write"
        );
    }
}

/// `cache.routing_headers` is checked at load: a value that is not a
/// header name stops start-up, naming the key and its variable.
#[test]
fn a_routing_header_that_is_not_a_header_name_is_refused_at_load() {
    use figment::providers::{Format, Toml};
    let load = |names: &str| {
        cachegate::resolved::ResolvedConfig::from_figment(figment::Figment::new().merge(
            Toml::string(&format!(
                "[upstream]\nurl = \"http://127.0.0.1:9\"\n[cache]\nrouting_headers = {names}\n"
            )),
        ))
    };
    let err = load(r#"["x-ok", "x tenant"]"#).unwrap_err().to_string();
    assert!(
        err.contains("`cache.routing_headers`")
            && err.contains("CACHEGATE_CACHE__ROUTING_HEADERS")
            && err.contains("`x tenant` is not a header name"),
        "{err}"
    );
    let resolved = load(r#"["X-Tenant-Route"]"#).unwrap();
    assert_eq!(resolved.routing_headers, ["x-tenant-route"]);
}
