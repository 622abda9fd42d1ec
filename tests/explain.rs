//! `cachegate explain`: what the proxy would do with a request, read from
//! the real backend a running `cachegate serve` stored into (a real Redis
//! and the DynamoDB-compatible server), without calling the upstream; and
//! `cache.expose_key`, whose `X-Cache-Key` names the same key.

mod common;

use common::{backend_env, cachegate, cli, get, upstream, TEST_HOST};
use serde_json::Value;

fn explain(upstream_url: &str, env: &[(String, String)], args: &[&str]) -> Value {
    let mut all = vec!["explain", "--json"];
    all.extend_from_slice(args);
    let out = cli(upstream_url, env, &all);
    assert!(
        out.status.success(),
        "cachegate explain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain --json prints JSON")
}

async fn explains_from_the_shared_backend(backend: &str) {
    let mut env = backend_env(backend, "explain");
    env.push((
        "CACHEGATE_ROUTES".into(),
        r#"[{path="/items/{id}", ttl="60s", key_headers=["accept-language"], tags=["item-{id}"]}]"#
            .into(),
    ));
    env.push(("CACHEGATE_CACHE__EXPOSE_KEY".into(), "true".into()));
    let init = cli("http://127.0.0.1:9", &env, &["init"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let up = upstream().await;
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cg = cachegate(&up.url, &env_refs);
    let path = format!("/items/{}", std::process::id());

    let url = format!("http://{TEST_HOST}{path}?b=2&a=1");
    // Nothing stored yet: a miss, and the key is what serving will use.
    let before = explain(&up.url, &env, &[&url, "-H", "Accept-Language: de"]);
    assert_eq!(before["decision"]["action"], "miss", "{before:#}");
    assert_eq!(before["stored"]["found"], false);
    assert_eq!(before["route"]["pattern"], "/items/{id}");
    assert_eq!(
        before["key"]["parts"]["path_and_query"],
        format!("{path}?a=1&b=2")
    );
    assert_eq!(
        before["key"]["parts"]["key_headers"]["accept-language"][0],
        "de"
    );
    assert_eq!(
        before["key"]["parts"]["forwarded_origin"]["x-forwarded-host"][0],
        TEST_HOST
    );

    let served = common::send(
        common::client()
            .get(format!("{}{path}?b=2&a=1", cg.url))
            .header("accept-language", "de"),
    )
    .await;
    assert_eq!(served.x_cache(), "MISS");
    let key = served.header("x-cache-key").to_owned();
    assert_eq!(key.len(), 64, "X-Cache-Key is the key's digest");
    assert_eq!(
        before["key"]["primary"],
        key.as_str(),
        "explain and serve compute one key"
    );

    let seen = up.state.hits(&path);
    let after = explain(&up.url, &env, &[&url, "-H", "Accept-Language: de"]);
    assert_eq!(after["decision"]["action"], "hit", "{after:#}");
    let stored = &after["stored"];
    assert_eq!(stored["found"], true);
    assert_eq!(stored["status"], 200);
    assert!(stored["fresh_for_s"].as_u64().unwrap() > 50, "{stored:#}");
    assert!(stored["body_bytes"].as_u64().unwrap() > 0);
    assert!(
        stored["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == &format!("item-{}", std::process::id())),
        "{stored:#}"
    );
    // Another language is another key, not stored.
    let other = explain(&up.url, &env, &[&url, "-H", "Accept-Language: fr"]);
    assert_ne!(other["key"]["primary"], key.as_str());
    assert_eq!(other["decision"]["action"], "miss");

    // A credential: bypass, and never printed.
    let out = cli(
        &up.url,
        &env,
        &[
            "explain",
            &url,
            "-H",
            "Authorization: Bearer very-secret-token",
        ],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("action: bypass"), "{text}");
    assert!(text.contains("reason: authorization"), "{text}");
    assert!(
        !text.contains("very-secret-token"),
        "a credential was printed: {text}"
    );

    // A path the proxy refuses: the 400 it would answer.
    let refused = explain(
        &up.url,
        &env,
        &[&format!("http://{TEST_HOST}/a/..;/items/1")],
    );
    assert_eq!(refused["decision"]["action"], "reject");
    assert_eq!(refused["decision"]["status"], 400);
    assert_eq!(
        refused["decision"]["error"]["error"]["code"], "ambiguous_path",
        "{refused:#}"
    );

    // Explaining never calls the upstream.
    assert_eq!(up.state.hits(&path), seen);
    let again = get(&format!("{}{path}?a=1&b=2", cg.url)).await;
    assert_eq!(again.header("x-cache-key").len(), 64);
}

#[tokio::test]
async fn explains_from_redis() {
    explains_from_the_shared_backend("redis").await;
}

#[tokio::test]
async fn explains_from_dynamodb() {
    explains_from_the_shared_backend("dynamodb").await;
}

#[tokio::test]
async fn the_key_is_not_exposed_by_default_and_memory_says_where_entries_live() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let got = get(&format!("{}/x?cc=max-age%3D60", cg.url)).await;
    assert_eq!(got.x_cache(), "MISS");
    assert_eq!(got.header("x-cache-key"), "");
    let out = explain(
        &up.url,
        &[],
        &[&format!("http://{TEST_HOST}/x?cc=max-age%3D60")],
    );
    assert_eq!(out["backend"], "memory");
    assert_eq!(out["stored"]["found"], false);
    assert!(out["stored"]["note"]
        .as_str()
        .unwrap()
        .contains("inside each serving process"));
}
