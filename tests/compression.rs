//! Compressed entries (`cache.compression = "gzip"`, the default), end to
//! end: `cachegate serve` (memory backend) in front of the loopback test
//! upstream, whose `json_bytes=N` answers a JSON list of about N bytes
//! (`gzip_self`: gzip-compressed by the upstream when asked for it).
//! The client here is reqwest without its decompression features: it sees
//! the bytes cachegate sends.

mod common;

async fn get_with(url: &str, accept_encoding: Option<&str>) -> common::Got {
    let mut req = common::client().get(url);
    if let Some(ae) = accept_encoding {
        req = req.header("accept-encoding", ae);
    }
    common::send(req).await
}

fn vary_names(r: &common::Got) -> Vec<String> {
    r.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect()
}

/// The issue's six spellings, a client without `Accept-Encoding` and two
/// that do not take gzip: one upstream call, asked for gzip; the stored
/// copy gzip-compressed to at most a quarter of the 1 MB answer; each
/// client gets bytes it can read, and `Vary` says they depend on
/// `Accept-Encoding`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_accept_encoding_shares_one_compressed_entry() {
    every_spelling_shares_one_entry("memory").await;
}

/// The same through Redis and DynamoDB, the L1 off: the shared backend
/// holds the gzip copy and decoding happens on the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_shares_one_entry_in_redis() {
    every_spelling_shares_one_entry("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_shares_one_entry_in_dynamodb() {
    every_spelling_shares_one_entry("dynamodb").await;
}

async fn every_spelling_shares_one_entry(backend: &str) {
    let up = common::upstream().await;
    let mut env = if backend == "memory" {
        Vec::new()
    } else {
        common::backend_env(backend, &format!("compression-{backend}"))
    };
    if backend == "dynamodb" {
        // `cachegate init` creates the table.
        let out = common::cli("http://127.0.0.1:9", &env, &["init"]);
        assert!(out.status.success(), "{}", common::describe(&out));
    }
    env.push(("CACHEGATE_CACHE__L1_TTL".into(), "0s".into()));
    let env_owned = env.clone();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cg = common::cachegate(&up.url, &env);
    let path = &format!("/list-{backend}");
    let url = format!("{}{path}?json_bytes=1048576&cc=max-age%3D60", cg.url);
    let original = common::json_list(1 << 20);
    let gzip_spellings = [
        "gzip, deflate, br",
        "br, gzip",
        "GZIP,BR",
        "br;q=1.0, gzip;q=0.8, *;q=0.1",
        "gzip, deflate, br, zstd",
        "x-gzip, br",
    ];
    let mut stored_len = 0;
    for (i, ae) in gzip_spellings.iter().enumerate() {
        let r = get_with(&url, Some(ae)).await;
        assert_eq!(r.status, 200, "{ae}: {r:?}");
        assert_eq!(r.x_cache(), if i == 0 { "MISS" } else { "HIT" }, "{ae}");
        assert!(
            vary_names(&r).contains(&"accept-encoding".into()),
            "{ae}: {r:?}"
        );
        if i == 0 {
            // The first client got the answer as the upstream sent it,
            // streamed while it was being stored.
            assert_eq!(r.body.as_ref(), &original[..], "{ae}");
            continue;
        }
        assert_eq!(r.header("content-encoding"), "gzip", "{ae}: {r:?}");
        assert_eq!(common::gunzip(&r.body), original, "{ae}");
        stored_len = r.body.len();
    }
    for ae in [None, Some("identity"), Some("br"), Some("gzip;q=0, br")] {
        let r = get_with(&url, ae).await;
        assert_eq!(r.status, 200, "{ae:?}: {r:?}");
        assert_eq!(r.x_cache(), "HIT", "{ae:?}");
        assert!(r.headers.get("content-encoding").is_none(), "{ae:?}: {r:?}");
        assert_eq!(r.body.as_ref(), &original[..], "{ae:?}");
        assert!(vary_names(&r).contains(&"accept-encoding".into()), "{ae:?}");
    }
    // HEAD describes what a GET would send each of them.
    let r = common::send(common::client().head(&url)).await;
    assert_eq!(
        r.header("content-length"),
        original.len().to_string(),
        "{r:?}"
    );
    assert!(r.headers.get("content-encoding").is_none(), "{r:?}");
    let r = common::send(
        common::client()
            .head(&url)
            .header("accept-encoding", "gzip"),
    )
    .await;
    assert_eq!(r.header("content-length"), stored_len.to_string(), "{r:?}");
    assert_eq!(r.header("content-encoding"), "gzip", "{r:?}");
    assert_eq!(
        up.state.hits(path),
        1,
        "one upstream call for every spelling"
    );
    assert_eq!(up.state.last(path).headers["accept-encoding"], "gzip");
    if backend != "memory" {
        // Stored under the primary key itself: `Accept-Encoding` selects
        // no variant when every request asks the upstream for gzip, so a
        // hit is one read, not a Vary index and then the variant.
        let target = format!(
            "http://{}{path}?json_bytes=1048576&cc=max-age%3D60",
            common::TEST_HOST
        );
        let out = common::cli(
            &up.url,
            &env_owned,
            &["explain", "--json", &target, "-H", "Accept-Encoding: br"],
        );
        assert!(out.status.success(), "{}", common::describe(&out));
        let explained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(explained["stored"]["found"], true, "{explained:#}");
        assert_eq!(explained["decision"]["action"], "hit", "{explained:#}");
        assert!(
            explained["key"].get("variant").is_none(),
            "no Vary index: {explained:#}"
        );
    }
    eprintln!(
        "1 MB JSON stored in {stored_len} bytes ({:.1} %)",
        stored_len as f64 * 100.0 / original.len() as f64
    );
    assert!(
        stored_len * 4 <= original.len(),
        "stored in {stored_len} of {} bytes",
        original.len()
    );
}

/// With the L1 off, every hit reads the shared backend, and the decoded
/// form of what the last read returned is reused while the backend returns
/// the very same bytes. Another instance replacing the entry (same size,
/// other content) must show at once: the first instance's clients that
/// do not take gzip get the new version decoded, never the kept decoding
/// of the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_entry_is_never_answered_from_the_old_decoding_in_redis() {
    a_replaced_entry_is_never_answered_from_the_old_decoding("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_entry_is_never_answered_from_the_old_decoding_in_dynamodb() {
    a_replaced_entry_is_never_answered_from_the_old_decoding("dynamodb").await;
}

async fn a_replaced_entry_is_never_answered_from_the_old_decoding(backend: &str) {
    let up = common::upstream().await;
    let mut env = common::backend_env(backend, &format!("replaced-{backend}"));
    if backend == "dynamodb" {
        let out = common::cli("http://127.0.0.1:9", &env, &["init"]);
        assert!(out.status.success(), "{}", common::describe(&out));
    }
    env.push(("CACHEGATE_CACHE__L1_TTL".into(), "0s".into()));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (a, b) = (
        common::cachegate(&up.url, &pairs),
        common::cachegate(&up.url, &pairs),
    );
    // The answer carries its path: a long one takes it past the 1 KiB
    // below which nothing is compressed.
    let path = format!("/replaced-{backend}/{}", "p".repeat(200));
    let at = |cg: &common::Cachegate| format!("{}{path}?cc=max-age%3D300", cg.url);
    let first = get_with(&at(&a), None).await;
    assert_eq!(first.x_cache(), "MISS", "{first:?}");
    for _ in 0..3 {
        let r = get_with(&at(&a), None).await;
        assert_eq!(r.x_cache(), "HIT", "{r:?}");
        assert!(r.headers.get("content-encoding").is_none(), "{r:?}");
        assert_eq!(r.json()["version"], "1", "{r:?}");
    }
    let gzip = get_with(&at(&a), Some("gzip")).await;
    assert_eq!(
        gzip.header("content-encoding"),
        "gzip",
        "stored gzipped: {gzip:?}"
    );

    // Another instance replaces it: purged, then fetched again.
    up.state.set_version(&path, "2");
    let out = common::cli(
        &up.url,
        &env,
        &["purge", "--url", &format!("{path}?cc=max-age%3D300")],
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    let refetched = get_with(&at(&b), None).await;
    assert_eq!(refetched.x_cache(), "MISS", "{refetched:?}");
    assert_eq!(refetched.json()["version"], "2", "{refetched:?}");

    for _ in 0..3 {
        let r = get_with(&at(&a), None).await;
        assert_eq!(r.x_cache(), "HIT", "{r:?}");
        assert_eq!(r.json()["version"], "2", "the old decoding answered: {r:?}");
    }
    assert_eq!(up.state.hits(&path), 2, "one fetch per version");
}

/// An upstream that compresses itself: its gzip is stored as it came, and
/// a client that does not take gzip gets it decoded, on the miss (as it
/// streams) and on hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_own_gzip_is_decoded_for_clients_that_do_not_take_it() {
    let up = common::upstream().await;
    let cg = common::cachegate(&up.url, &[]);
    let path = "/self";
    let url = format!(
        "{}{path}?json_bytes=300000&gzip_self=1&cc=max-age%3D60&etag=%22v1%22",
        cg.url
    );
    let original = common::json_list(300_000);
    let r = get_with(&url, None).await;
    assert_eq!(r.x_cache(), "MISS");
    assert!(r.headers.get("content-encoding").is_none(), "{r:?}");
    assert_eq!(r.body.as_ref(), &original[..]);
    assert_eq!(
        r.header("etag"),
        "W/\"v1\"",
        "other bytes than the strong ETag named"
    );
    let r = get_with(&url, Some("gzip")).await;
    assert_eq!(r.x_cache(), "HIT");
    assert_eq!(r.header("content-encoding"), "gzip");
    assert_eq!(r.header("etag"), "\"v1\"", "the upstream's bytes, its ETag");
    assert_eq!(common::gunzip(&r.body), original);
    let r = get_with(&url, Some("br")).await;
    assert_eq!(r.x_cache(), "HIT");
    assert!(r.headers.get("content-encoding").is_none(), "{r:?}");
    assert_eq!(r.body.as_ref(), &original[..]);
    // A conditional request with the weak validator a decoded answer
    // carried still matches (weak comparison, RFC 9110 §13.1.2).
    let r = common::send(
        common::client()
            .get(&url)
            .header("if-none-match", "W/\"v1\""),
    )
    .await;
    assert_eq!(r.status, 304, "{r:?}");
    // A range of a decoded answer would be a range of other bytes: the
    // whole answer instead; a gzip client gets its range of the gzip.
    let r = common::send(common::client().get(&url).header("range", "bytes=0-9")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.as_ref(), &original[..]);
    let r = common::send(
        common::client()
            .get(&url)
            .header("range", "bytes=0-9")
            .header("accept-encoding", "gzip"),
    )
    .await;
    assert_eq!(r.status, 206, "{r:?}");
    assert_eq!(&r.body[..2], &[0x1f, 0x8b], "the start of the gzip stream");
    assert_eq!(up.state.hits(path), 1);
}

/// What is not compressed: a binary type, `no-transform`, a small answer.
/// What keeps the client's own `Accept-Encoding`: a request that bypasses
/// the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_left_as_it_came() {
    let up = common::upstream().await;
    let cg = common::cachegate(&up.url, &[]);
    for (path, query) in [
        ("/binary", "bin=200000"),
        (
            "/no-transform",
            "json_bytes=200000&cc=max-age%3D60%2C%20no-transform",
        ),
        ("/small", "json_bytes=500"),
    ] {
        let cc = if query.contains("cc=") {
            ""
        } else {
            "&cc=max-age%3D60"
        };
        let url = format!("{}{path}?{query}{cc}", cg.url);
        let first = get_with(&url, Some("gzip")).await;
        let r = get_with(&url, Some("gzip")).await;
        assert_eq!(r.x_cache(), "HIT", "{path}: {r:?}");
        assert!(r.headers.get("content-encoding").is_none(), "{path}: {r:?}");
        assert_eq!(r.body, first.body, "{path}");
    }
    let url = format!("{}/personal?json_bytes=200000&cc=max-age%3D60", cg.url);
    let r = common::send(
        common::client()
            .get(&url)
            .header("authorization", "Bearer abc")
            .header("accept-encoding", "br, zstd"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.state.last("/personal").headers["accept-encoding"],
        "br, zstd",
        "a bypassed request is forwarded as the client sent it"
    );
}

/// `cache.compression = "off"`: the client's `Accept-Encoding` goes
/// upstream as it was, and what the upstream chose is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_off_relays_the_upstreams_choice() {
    let up = common::upstream().await;
    let cg = common::cachegate(&up.url, &[("CACHEGATE_CACHE__COMPRESSION", "off")]);
    let path = "/plain";
    let url = format!("{}{path}?json_bytes=200000&cc=max-age%3D60", cg.url);
    let original = common::json_list(200_000);
    for _ in 0..2 {
        let r = get_with(&url, Some("br, gzip")).await;
        assert!(r.headers.get("content-encoding").is_none(), "{r:?}");
        assert_eq!(r.body.as_ref(), &original[..]);
    }
    assert_eq!(up.state.hits(path), 1);
    assert_eq!(up.state.last(path).headers["accept-encoding"], "br, gzip");
}
