//! A route's query allowlist (`key_query`): only the parameters it names
//! are kept, in the key and in the upstream call alike, so parameters
//! clients invent (cache busters, tracking) never make a new entry or a
//! new upstream call. Against a real loopback upstream and the built
//! binary.

mod common;

use common::{cachegate, get, upstream};

/// `/search` keeps `q` and `page` only; `/items/{id}` has no allowlist;
/// `utm_source` is ignored everywhere.
const ROUTES: &str = r#"[{path="/search", ttl="1h", key_query=["q", "page"]},
                         {path="/items/{id}", ttl="1h"},
                         {path="/bare", ttl="1h", key_query=[]}]"#;

#[tokio::test]
async fn only_the_allowed_parameters_reach_the_key_and_the_upstream() {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_ROUTES", ROUTES),
            ("CACHEGATE_CACHE__IGNORED_QUERY_PARAMS", "[\"utm_source\"]"),
        ],
    );

    // Five spellings with invented parameters: one entry, one call, and
    // the upstream sees only `q`.
    let first = get(&format!("{}/search?q=rust&_=1712&utm_id=9", cg.url)).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.x_cache(), "MISS");
    for q in [
        "q=rust",
        "_=99&q=rust",
        "q=rust&fbclid=abc&utm_source=news",
        "callback=x&q=rust&&",
    ] {
        let got = get(&format!("{}/search?{q}", cg.url)).await;
        assert_eq!(got.x_cache(), "HIT", "?{q}");
        assert_eq!(got.body, first.body, "?{q}");
    }
    assert_eq!(up.state.hits("/search"), 1);
    assert_eq!(up.state.last("/search").path_and_query, "/search?q=rust");

    // An allowed parameter is part of the key, and goes upstream sorted
    // with the others, byte for byte.
    let page = get(&format!("{}/search?page=2&x=1&q=rust", cg.url)).await;
    assert_eq!(page.x_cache(), "MISS");
    assert_eq!(
        up.state.last("/search").path_and_query,
        "/search?page=2&q=rust"
    );
    assert_eq!(
        get(&format!("{}/search?q=go", cg.url)).await.x_cache(),
        "MISS"
    );
    assert_eq!(up.state.hits("/search"), 3);

    // No allowlist: every parameter not ignored still counts.
    assert_eq!(
        get(&format!("{}/items/1?a=1", cg.url)).await.x_cache(),
        "MISS"
    );
    assert_eq!(
        get(&format!("{}/items/1?a=2", cg.url)).await.x_cache(),
        "MISS"
    );
    assert_eq!(
        get(&format!("{}/items/1?a=2&utm_source=x", cg.url))
            .await
            .x_cache(),
        "HIT"
    );
    assert_eq!(up.state.last("/items/1").path_and_query, "/items/1?a=2");

    // An empty allowlist drops the whole query.
    assert_eq!(get(&format!("{}/bare?a=1", cg.url)).await.x_cache(), "MISS");
    assert_eq!(get(&format!("{}/bare?b=2", cg.url)).await.x_cache(), "HIT");
    assert_eq!(up.state.last("/bare").path_and_query, "/bare");
}
