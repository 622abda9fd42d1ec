//! The edge layer (src/edge.rs) and the write rules of routes, end to end:
//! the built binary, a loopback upstream, and moto's server as the
//! CloudFront API (started by scripts/test: CACHEGATE_TEST_MOTO_ENDPOINT;
//! `cachegate purge` also needs the Redis that scripts/test starts). The
//! SDK reaches moto through AWS_ENDPOINT_URL_CLOUDFRONT with static
//! credentials. Missing services fail these tests; they never skip.

mod common;

use std::collections::BTreeSet;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_cloudfront::types::{
    CustomOriginConfig, DefaultCacheBehavior, DistributionConfig, Origin, OriginProtocolPolicy,
    Origins, ViewerProtocolPolicy,
};

use common::{backend_env, cachegate, client, get, need, send, upstream};

const TOKEN: &str = "edge-test-purge-token-0123";

fn aws_env(cloudfront_endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL_CLOUDFRONT", cloudfront_endpoint),
        ("AWS_REGION", "eu-west-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        // No profile file, no IMDS: the static credentials above only.
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn cloudfront_client(endpoint: &str) -> aws_sdk_cloudfront::Client {
    let conf = aws_sdk_cloudfront::Config::builder()
        .behavior_version(aws_sdk_cloudfront::config::BehaviorVersion::latest())
        .http_client(cachegate_aws_http::https_client())
        .endpoint_url(endpoint)
        .region(aws_sdk_cloudfront::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_cloudfront::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .build();
    aws_sdk_cloudfront::Client::from_conf(conf)
}

/// A distribution of its own for each test (moto keeps them in memory).
async fn create_distribution(cf: &aws_sdk_cloudfront::Client, name: &str) -> String {
    let origin = Origin::builder()
        .id("api")
        .domain_name("api.example.com")
        .custom_origin_config(
            CustomOriginConfig::builder()
                .http_port(80)
                .https_port(443)
                .origin_protocol_policy(OriginProtocolPolicy::HttpsOnly)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let config = DistributionConfig::builder()
        .caller_reference(format!("{name}-{}", std::process::id()))
        .comment(name)
        .enabled(true)
        .origins(
            Origins::builder()
                .quantity(1)
                .items(origin)
                .build()
                .unwrap(),
        )
        .default_cache_behavior(
            DefaultCacheBehavior::builder()
                .target_origin_id("api")
                .viewer_protocol_policy(ViewerProtocolPolicy::HttpsOnly)
                // The managed CachingOptimized policy.
                .cache_policy_id("658327ea-f89d-4fab-a63d-7e88639e58f6")
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let out = cf
        .create_distribution()
        .distribution_config(config)
        .send()
        .await
        .expect("CreateDistribution on moto");
    out.distribution().unwrap().id().to_owned()
}

/// Every invalidation of the distribution, each as its set of paths.
async fn invalidations(cf: &aws_sdk_cloudfront::Client, id: &str) -> Vec<BTreeSet<String>> {
    let list = cf
        .list_invalidations()
        .distribution_id(id)
        .send()
        .await
        .expect("ListInvalidations");
    let mut out = Vec::new();
    for summary in list
        .invalidation_list()
        .map(|l| l.items())
        .unwrap_or_default()
    {
        let got = cf
            .get_invalidation()
            .distribution_id(id)
            .id(summary.id())
            .send()
            .await
            .expect("GetInvalidation");
        let batch = got.invalidation().unwrap().invalidation_batch().unwrap();
        out.push(batch.paths().unwrap().items().iter().cloned().collect());
    }
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `cachegate purge ARGS` on Redis, in front of an upstream with a base
/// path (`/v1`, which edge paths do not have).
fn purge_cli(args: &[&str], env: &[(String, String)]) -> Output {
    common::cli("http://127.0.0.1:9/v1", env, &[&["purge"], args].concat())
}

#[tokio::test]
async fn cli_purge_invalidates_tags_as_hash_items_and_urls_as_client_paths() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let cf = cloudfront_client(&moto).await;
    let dist = create_distribution(&cf, "cli-purge").await;
    let mut env = backend_env("redis", "edge-cli");
    env.extend(aws_env(&moto));
    env.push((
        "CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID".into(),
        dist.clone(),
    ));
    let out = purge_cli(
        &[
            "--tag",
            "posts",
            "--tag",
            "caf\u{e9} au lait",
            "--url",
            "/posts?author=a",
            "--url",
            "https://api.example.com/items/1?x=1",
            "--url",
            "/posts?author=b",
        ],
        &env,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", common::describe(&out));
    // Two query variants of /posts are one path: a path invalidation
    // covers all its query strings.
    assert!(
        stdout.contains("cloudfront: 4 paths sent in invalidation ")
            && stdout.contains("0.020 USD beyond the 1000 free paths a month"),
        "{stdout}"
    );
    assert_eq!(
        invalidations(&cf, &dist).await,
        vec![set(&[
            "#posts",
            "#caf%C3%A9%20au%20lait",
            "/posts",
            "/items/1"
        ])]
    );

    // A prefix (and everything) is one wildcard path each, whatever is
    // stored under it.
    let out = purge_cli(&["--prefix", "/articles/", "--all"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", common::describe(&out));
    assert!(stdout.contains("cloudfront: 2 paths sent"), "{stdout}");
    assert!(
        invalidations(&cf, &dist)
            .await
            .contains(&set(&["/articles/*", "/*"])),
        "{:?}",
        invalidations(&cf, &dist).await
    );
}

#[tokio::test]
async fn serve_batches_purges_of_a_window_into_one_invalidation() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let cf = cloudfront_client(&moto).await;
    let dist = create_distribution(&cf, "serve-batch").await;
    let up = upstream().await;
    let mut env: Vec<(String, String)> = aws_env(&moto);
    env.extend(
        [
            ("CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID", dist.as_str()),
            ("CACHEGATE_EDGE__BATCH_WINDOW", "1500ms"),
            ("CACHEGATE_SERVE__PURGE_TOKEN", TOKEN),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cg = cachegate(&up.url, &env);
    let purge_url = format!("{}/_cachegate/purge", cg.url);
    let started = Instant::now();
    for i in 0..10 {
        // Tag t3 twice and the same URL in every request: deduplicated.
        let body = serde_json::json!({"tags": [format!("t{i}"), "t3"], "urls": ["/items/1?v=1"]});
        let got = send(
            client()
                .post(&purge_url)
                .bearer_auth(TOKEN)
                .body(body.to_string()),
        )
        .await;
        assert_eq!(got.status, 200, "{:?}", got.body);
        assert_eq!(got.json()["edge"]["status"], "batched", "{:?}", got.body);
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the purges must fall within one window for this test to mean anything"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while invalidations(&cf, &dist).await.is_empty() {
        assert!(Instant::now() < deadline, "no invalidation reached moto");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another window passes: nothing more is sent.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut expected: Vec<String> = (0..10).map(|i| format!("#t{i}")).collect();
    expected.push("/items/1".into());
    assert_eq!(
        invalidations(&cf, &dist).await,
        vec![expected.into_iter().collect::<BTreeSet<_>>()]
    );
}

/// Stands in for CloudFront throttling only: moto never answers
/// TooManyInvalidationsInProgress, so this loopback server answers the
/// first CreateInvalidation with it (CloudFront's status and XML error
/// body) and forwards everything else to moto unchanged.
struct Throttler {
    url: String,
    /// Bodies of the CreateInvalidation requests it saw, in order.
    creates: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn throttler(moto: &str) -> Throttler {
    use axum::body::Body;
    use http::{Request, Response};
    let creates: Arc<Mutex<Vec<String>>> = Arc::default();
    let (seen, moto) = (creates.clone(), moto.to_owned());
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let (seen, moto) = (seen.clone(), moto.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let is_create =
                parts.method == http::Method::POST && parts.uri.path().ends_with("/invalidation");
            if is_create {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(String::from_utf8_lossy(&body).into_owned());
                    seen.len()
                };
                if n == 1 {
                    return Response::builder()
                        .status(400)
                        .header("content-type", "text/xml")
                        .header("x-amzn-requestid", "throttle-stand-in")
                        .body(Body::from(
                            "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"http://cloudfront.amazonaws.com/doc/2020-05-31/\"><Error><Type>Sender</Type><Code>TooManyInvalidationsInProgress</Code><Message>Processing your request will cause you to exceed the maximum number of in-progress wildcard invalidations.</Message></Error><RequestId>throttle-stand-in</RequestId></ErrorResponse>",
                        ))
                        .unwrap();
                }
            }
            cachegate::tls::install_crypto_provider();
            let mut forward = reqwest::Client::new().request(
                parts.method.clone(),
                format!("{moto}{}", parts.uri.path_and_query().unwrap()),
            );
            for (name, value) in &parts.headers {
                if name != http::header::HOST {
                    forward = forward.header(name, value);
                }
            }
            let answer = forward.body(body).send().await.unwrap();
            let mut resp = Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                resp = resp.header(name, value);
            }
            resp.body(Body::from(answer.bytes().await.unwrap()))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Throttler {
        url: format!("http://{addr}"),
        creates,
        task,
    }
}

#[tokio::test]
async fn a_throttled_invalidation_is_retried_with_the_same_caller_reference() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let cf = cloudfront_client(&moto).await;
    let dist = create_distribution(&cf, "throttled").await;
    let stand_in = throttler(&moto).await;
    let mut env = backend_env("redis", "edge-throttle");
    env.extend(aws_env(&stand_in.url));
    env.push((
        "CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID".into(),
        dist.clone(),
    ));
    env.push(("RUST_LOG".into(), "info".into()));
    let out = tokio::task::spawn_blocking(move || purge_cli(&["--tag", "items"], &env))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}", common::describe(&out));
    assert!(stdout.contains("cloudfront: 1 path sent"), "{stdout}");
    assert!(
        stderr.contains("TooManyInvalidationsInProgress"),
        "{stderr}"
    );
    let creates = stand_in.creates.lock().unwrap().clone();
    assert_eq!(
        creates.len(),
        2,
        "one throttled call, one retry: {creates:?}"
    );
    let reference = |body: &str| {
        body.split("<CallerReference>")
            .nth(1)
            .and_then(|r| r.split("</CallerReference>").next())
            .unwrap()
            .to_owned()
    };
    assert_eq!(reference(&creates[0]), reference(&creates[1]));
    assert_eq!(invalidations(&cf, &dist).await, vec![set(&["#items"])]);
}
/// Item 5 of issue 14 with json-server's layout: `/posts/{id}` writes
/// purge `posts`, which the `/posts` listings carry.
#[tokio::test]
async fn a_write_purges_the_collections_its_route_names() {
    let up = upstream().await;
    let routes = r#"[
        {path = "/posts", ttl = "60s", tags = ["posts"]},
        {path = "/posts/{id}", ttl = "60s", tags = ["post-{id}"], invalidate_tags = ["posts", "post-{id}"]}
    ]"#;
    let cg = cachegate(&up.url, &[("CACHEGATE_ROUTES", routes)]);
    let urls = ["/posts", "/posts?author=a", "/posts/2"];
    for u in urls {
        assert_eq!(
            get(&format!("{}{u}", cg.url)).await.x_cache(),
            "MISS",
            "{u}"
        );
        assert_eq!(get(&format!("{}{u}", cg.url)).await.x_cache(), "HIT", "{u}");
    }
    let patched = send(
        client()
            .patch(format!("{}/posts/1", cg.url))
            .body(r#"{"title": "new"}"#),
    )
    .await;
    assert_eq!(patched.status, 200);
    assert_eq!(up.state.last("/posts/1").method, "PATCH");
    assert_eq!(get(&format!("{}/posts", cg.url)).await.x_cache(), "MISS");
    assert_eq!(
        get(&format!("{}/posts?author=a", cg.url)).await.x_cache(),
        "MISS"
    );
    // Another post's entry carries post-2, not posts: it stays.
    assert_eq!(get(&format!("{}/posts/2", cg.url)).await.x_cache(), "HIT");
    // A failed write purges nothing.
    let failed = send(client().patch(format!("{}/posts/1?status=422", cg.url))).await;
    assert_eq!(failed.status, 422);
    assert_eq!(get(&format!("{}/posts", cg.url)).await.x_cache(), "HIT");
}

/// With an edge configured, responses carry their tags in the cache-tag
/// header, and a write's purge reaches CloudFront (batched by serve).
#[tokio::test]
async fn responses_carry_cache_tags_and_writes_invalidate_the_edge() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let cf = cloudfront_client(&moto).await;
    let dist = create_distribution(&cf, "serve-writes").await;
    let up = upstream().await;
    let routes = r#"[
        {path = "/posts", ttl = "60s", tags = ["posts"]},
        {path = "/posts/{id}", ttl = "60s", tags = ["post-{id}"], invalidate_tags = ["posts", "post-{id}"]}
    ]"#;
    let mut env: Vec<(String, String)> = aws_env(&moto);
    env.extend(
        [
            ("CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID", dist.as_str()),
            ("CACHEGATE_EDGE__BATCH_WINDOW", "300ms"),
            ("CACHEGATE_EDGE__CACHE_TAG_HEADER", "Edge-Tag"),
            ("CACHEGATE_ROUTES", routes),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cg = cachegate(&up.url, &env);
    let miss = get(&format!("{}/posts?surrogate=user-9%20feed", cg.url)).await;
    assert_eq!(miss.x_cache(), "MISS");
    assert_eq!(miss.header("edge-tag"), "feed,posts,user-9");
    // The upstream's own header stays hidden (cache.expose_surrogate_keys).
    assert_eq!(miss.header("surrogate-key"), "");
    let hit = get(&format!("{}/posts?surrogate=user-9%20feed", cg.url)).await;
    assert_eq!(hit.x_cache(), "HIT");
    assert_eq!(hit.header("edge-tag"), "feed,posts,user-9");
    assert_eq!(
        get(&format!("{}/posts/1", cg.url)).await.header("edge-tag"),
        "post-1"
    );

    let patched = send(client().patch(format!("{}/posts/1", cg.url)).body("{}")).await;
    assert_eq!(patched.status, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = invalidations(&cf, &dist).await;
        if !found.is_empty() {
            assert_eq!(found, vec![set(&["#posts", "#post-1", "/posts/1"])]);
            break;
        }
        assert!(Instant::now() < deadline, "no invalidation reached moto");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A method whose safety is unknown invalidates on success as a write
    // does (RFC 9111 §4.4), through the same edge rules: its URI and the
    // route's invalidate_tags, batched.
    let m_search = reqwest::Method::from_bytes(b"M-SEARCH").unwrap();
    let searched = send(client().request(m_search, format!("{}/posts/2", cg.url))).await;
    assert_eq!(searched.status, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = invalidations(&cf, &dist).await;
        if found.len() > 1 {
            assert_eq!(found.len(), 2, "{found:?}");
            assert!(
                found.contains(&set(&["#posts", "#post-2", "/posts/2"])),
                "{found:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the M-SEARCH invalidation did not reach moto"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the Lambda proxy sends its writes' purges (and serve too, when a
/// queue is configured): the invalidator's SQS queue, here moto's SQS. The
/// message is a purge request the invalidator accepts.
#[tokio::test]
async fn with_a_queue_writes_enqueue_their_purges_for_the_invalidator() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .http_client(cachegate_aws_http::https_client())
            .endpoint_url(&moto)
            .region(aws_sdk_sqs::config::Region::new("eu-west-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test", "test", None, None, "static",
            ))
            .build(),
    );
    let queue_url = sqs
        .create_queue()
        .queue_name(format!("edge-writes-{}", std::process::id()))
        .send()
        .await
        .expect("CreateQueue on moto")
        .queue_url()
        .unwrap()
        .to_owned();
    let up = upstream().await;
    let routes = r#"[{path = "/posts/{id}", ttl = "60s", tags = ["post-{id}"], invalidate_tags = ["posts"]}]"#;
    let mut env: Vec<(String, String)> = aws_env("http://127.0.0.1:9");
    env.extend(
        [
            ("AWS_ENDPOINT_URL_SQS", moto.as_str()),
            ("CACHEGATE_EDGE__INVALIDATION_QUEUE_URL", queue_url.as_str()),
            ("CACHEGATE_ROUTES", routes),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cg = cachegate(&format!("{}/v1", up.url), &env);
    // A queue alone is an edge too: the tag header is on.
    assert_eq!(
        get(&format!("{}/posts/1", cg.url))
            .await
            .header("cache-tag"),
        "post-1"
    );
    let patched = send(
        client()
            .put(format!("{}/posts/1?draft=1", cg.url))
            .body("{}"),
    )
    .await;
    assert_eq!(patched.status, 200);
    let got = sqs
        .receive_message()
        .queue_url(&queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(5)
        .send()
        .await
        .expect("ReceiveMessage");
    let bodies: Vec<&str> = got.messages().iter().filter_map(|m| m.body()).collect();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let request = cachegate::invalidate::PurgeRequest::from_json(bodies[0].as_bytes())
        .expect("the invalidator accepts the message");
    // The client URL (no upstream base path), and the route's tags.
    assert_eq!(request.urls, vec!["/posts/1?draft=1"]);
    assert_eq!(request.tags, vec!["posts"]);
}

/// The invalidator role under cargo-lambda's runtime API emulator: one SQS
/// batch of several purge messages becomes one CloudFront invalidation
/// (after each message's backend purge); a malformed record is reported
/// back alone.
#[tokio::test]
async fn the_invalidator_sends_one_invalidation_per_sqs_batch() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let cf = cloudfront_client(&moto).await;
    let dist = create_distribution(&cf, "invalidator-batch").await;
    let (_emulator, port) = common::lambda_emulator();
    let mut function = common::lambda_function(port, "http://127.0.0.1:9/v1");
    function
        .env("CACHEGATE_ROLE", "invalidator")
        .env("CACHEGATE_CACHE__L1_TTL", "0s")
        .env("CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID", &dist)
        .env("RUST_LOG", "info")
        .envs(backend_env("redis", "edge-invalidator"))
        .envs(aws_env(&moto));
    let _function = common::Killed(function.spawn().unwrap());
    let record = |id: &str, body: &str| serde_json::json!({"messageId": id, "eventSource": "aws:sqs", "body": body});
    let event = serde_json::json!({"Records": [
        record("m-1", r#"{"urls": ["/posts/1?x=1"], "tags": ["posts"]}"#),
        record("m-2", r#"{"urls": "/not-a-list"}"#),
        record("m-3", r#"{"tags": ["post-2", "posts"]}"#),
    ]})
    .to_string();
    let out = tokio::task::spawn_blocking(move || {
        common::lambda_invoke(port)
            .args(["--data-ascii", &event])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    let answer: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m-2"}]})
    );
    assert_eq!(
        invalidations(&cf, &dist).await,
        vec![set(&["/posts/1", "#posts", "#post-2"])]
    );
}

/// What writes cost at the edge is bounded: a path a write invalidated
/// within `edge.batch_window` is not sent (or counted) again,
/// `edge.write_paths_per_hour` caps the paths, and a write's `Location`
/// reaches CloudFront only when it names a route.
#[tokio::test]
async fn write_invalidations_are_deduplicated_capped_and_kept_to_routes() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let cf = cloudfront_client(&moto).await;
    let up = upstream().await;
    let start = |dist: &str, per_hour: &str| {
        let mut env: Vec<(String, String)> = aws_env(&moto);
        env.extend(
            [
                ("CACHEGATE_EDGE__CLOUDFRONT_DISTRIBUTION_ID", dist),
                ("CACHEGATE_EDGE__BATCH_WINDOW", "300ms"),
                ("CACHEGATE_EDGE__WRITE_PATHS_PER_HOUR", per_hour),
                (
                    "CACHEGATE_ROUTES",
                    r#"[{path = "/items/{id}", ttl = "60s"}]"#,
                ),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        cachegate(&up.url, &env)
    };
    // Every path of every invalidation, once `want` of them have arrived
    // (then a little longer, in case more are on their way).
    let paths_sent = |dist: String, want: usize| {
        let cf = cf.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let all: BTreeSet<String> = invalidations(&cf, &dist)
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
                if all.len() >= want {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    return invalidations(&cf, &dist)
                        .await
                        .into_iter()
                        .flatten()
                        .collect::<BTreeSet<_>>();
                }
                assert!(Instant::now() < deadline, "only {all:?} reached moto");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let post = |url: String| async move {
        let r = send(client().post(url).body("{}")).await;
        assert_eq!(r.status, 200);
    };

    // Locations: one naming no route is not sent; one on a route is.
    let routed = create_distribution(&cf, "write-locations").await;
    let cg = start(&routed, "100");
    post(format!("{}/items/1?location=%2Fvictim%2F1", cg.url)).await;
    post(format!("{}/items/2?location=%2Fitems%2F9", cg.url)).await;
    assert_eq!(
        paths_sent(routed, 3).await,
        set(&["/items/1", "/items/2", "/items/9"])
    );

    // The cap: 5 an hour (and at most 5 at once). Ten writes of one path
    // within the window cost one; of twenty more paths, four go.
    let capped = create_distribution(&cf, "write-cap").await;
    let cg = start(&capped, "5");
    for _ in 0..10 {
        post(format!("{}/items/1", cg.url)).await;
    }
    for i in 0..20 {
        post(format!("{}/w/{i}", cg.url)).await;
    }
    let sent = paths_sent(capped, 5).await;
    assert_eq!(sent.len(), 5, "{sent:?}");
    assert!(sent.contains("/items/1"), "{sent:?}");
}
