//! Two `cachegate serve` processes on one shared backend (a real Redis and a
//! real DynamoDB-compatible server started by scripts/test): entries are
//! shared, and a stampede on a cold key reaches the upstream once.

mod common;

use std::time::{Duration, Instant};

use common::{backend_env, cachegate, client, get, upstream, Cachegate};

fn start(upstream_url: &str, env: &[(String, String)], extra: &[(&str, &str)]) -> Cachegate {
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    cachegate(upstream_url, &all)
}

/// `cachegate init` prepares the backend (creates the DynamoDB table).
fn init(env: &[(String, String)]) {
    let out = common::cli("http://127.0.0.1:9", env, &["init"]);
    assert!(
        out.status.success(),
        "cachegate init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn two_processes_share_entries(backend: &str) {
    let env = backend_env(backend, "share");
    init(&env);
    let up = upstream().await;
    let a = start(&up.url, &env, &[]);
    let b = start(&up.url, &env, &[]);
    let path = format!("/shared-{}", std::process::id());
    let url = |cg: &Cachegate| format!("{}{path}?cc=max-age%3D60", cg.url);
    let first = get(&url(&a)).await;
    assert_eq!(first.x_cache(), "MISS");
    assert!(
        first.header("cache-status").contains("stored"),
        "{}",
        first.header("cache-status")
    );
    let other = get(&url(&b)).await;
    assert_eq!(
        other.x_cache(),
        "HIT",
        "{backend}: the second process did not see the entry"
    );
    assert_eq!(other.body, first.body);
    assert_eq!(up.state.hits(&path), 1);
    let timing = other.header("server-timing");
    assert!(timing.contains(&format!("desc=\"{backend}\"")), "{timing}");

    // A 2 MB binary body stored by one process comes back intact from the other.
    let blob = format!("/blob-{}?cc=max-age%3D60&bin=2000000", std::process::id());
    let stored = get(&format!("{}{blob}", a.url)).await;
    assert_eq!(stored.x_cache(), "MISS");
    assert!(
        stored.header("cache-status").contains("stored"),
        "{}",
        stored.header("cache-status")
    );
    let shared = get(&format!("{}{blob}", b.url)).await;
    assert_eq!(
        shared.x_cache(),
        "HIT",
        "{backend}: the 2 MB entry was not shared"
    );
    assert_eq!(shared.body.len(), 2_000_000);
    assert!(
        shared.body == stored.body,
        "{backend}: the 2 MB body changed"
    );

    // Past its freshness an entry still in the store (DynamoDB deletes
    // lazily, local servers never) is not served as fresh. Three seconds
    // of freshness so that the HIT comes within them on a busy machine.
    let short = format!("/short-{}?cc=max-age%3D3", std::process::id());
    assert_eq!(get(&format!("{}{short}", a.url)).await.x_cache(), "MISS");
    assert_eq!(get(&format!("{}{short}", b.url)).await.x_cache(), "HIT");
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let expired = get(&format!("{}{short}", b.url)).await;
    assert_eq!(
        expired.x_cache(),
        "MISS",
        "{backend}: an expired entry was served"
    );
    assert_eq!(up.state.hits(&format!("/short-{}", std::process::id())), 2);
}

/// 200 concurrent requests for one cold key, split over two processes, with
/// an upstream that takes 300 ms: one upstream call, every client the body.
async fn stampede_reaches_the_upstream_once(backend: &str) {
    let calls = stampede(backend, true).await;
    assert_eq!(
        calls, 1,
        "{backend}: the stampede reached the upstream more than once"
    );
}

/// The same stampede with coalescing off (`cache.coalesce_wait = 0s`): the
/// baseline the coalesced figures compare with.
async fn stampede_without_coalescing_reaches_the_upstream_many_times(backend: &str) {
    let calls = stampede(backend, false).await;
    assert!(
        calls > 10,
        "{backend}: only {calls} upstream calls without coalescing; is it still on?"
    );
}

/// One stampede at a time: 200 requests against a single-threaded local
/// DynamoDB server next to another 200 measure the machine, not us.
static ONE_STAMPEDE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the stampede, prints its figures, returns the upstream calls.
async fn stampede(backend: &str, coalesce: bool) -> usize {
    let _alone = ONE_STAMPEDE_AT_A_TIME.lock().await;
    let env = backend_env(backend, "stampede");
    init(&env);
    let up = upstream().await;
    let mut extra = Vec::new();
    if !coalesce {
        extra.push(("CACHEGATE_CACHE__COALESCE_WAIT", "0s"));
    }
    let extra = &extra[..];
    let a = start(&up.url, &env, extra);
    let b = start(&up.url, &env, extra);
    let path = format!("/stampede-{}-{coalesce}", std::process::id());
    let c = client();
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let url = format!(
                "{}{path}?cc=max-age%3D60&delay_ms=300",
                if i % 2 == 0 { &a.url } else { &b.url }
            );
            let req = c.get(url);
            tokio::spawn(async move {
                let t = Instant::now();
                (common::send(req).await, t.elapsed())
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut body = None;
    for t in tasks {
        let (r, took) = t.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        if coalesce {
            assert_eq!(
                body.get_or_insert_with(|| r.body.clone()),
                &r.body,
                "clients got different bodies"
            );
        }
        latencies.push(took);
    }
    latencies.sort();
    eprintln!(
        "{backend} stampede (coalescing {}): upstream calls {}, p50 {:?}, p99 {:?}, all in {:?}",
        if coalesce { "on" } else { "off" },
        up.state.hits(&path),
        latencies[100],
        latencies[197],
        started.elapsed()
    );
    up.state.hits(&path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_two_processes_share_entries() {
    two_processes_share_entries("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_two_processes_share_entries() {
    two_processes_share_entries("dynamodb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stampede_reaches_the_upstream_once() {
    stampede_reaches_the_upstream_once("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_stampede_reaches_the_upstream_once() {
    stampede_reaches_the_upstream_once("dynamodb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stampede_without_coalescing_reaches_the_upstream_many_times() {
    stampede_without_coalescing_reaches_the_upstream_many_times("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_stampede_without_coalescing_reaches_the_upstream_many_times() {
    stampede_without_coalescing_reaches_the_upstream_many_times("dynamodb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stampede_reaches_the_upstream_once() {
    let _alone = ONE_STAMPEDE_AT_A_TIME.lock().await;
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let c = client();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(common::send(
                c.get(format!("{}/cold?cc=max-age%3D60&delay_ms=300", cg.url)),
            ))
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(up.state.hits("/cold"), 1);
}

/// The shared backend stops answering while requests flow: every request
/// still gets its upstream answer, and the breaker keeps the added latency
/// bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_backend_is_a_plain_proxy_not_an_outage() {
    // A port that accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hung.local_addr().unwrap().port();
    let _accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_BACKEND", "redis"),
            ("CACHEGATE_REDIS__URL", &format!("redis://127.0.0.1:{port}")),
        ],
    );
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let t = Instant::now();
        let r = get(&format!("{}/down-{i}?cc=max-age%3D60", cg.url)).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "MISS");
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?} with the cache down"
    );
}

/// `cachegate purge` talks to the shared backend directly: what it removes
/// is gone for every process.
async fn purge_cli_reaches_every_process(backend: &str) {
    let env = backend_env(backend, "purge");
    init(&env);
    let up = upstream().await;
    // No L1: this is about the backend; tests/l1_coherence.rs is about the L1s.
    let a = start(&up.url, &env, &[("CACHEGATE_CACHE__L1_TTL", "0s")]);
    let b = start(&up.url, &env, &[("CACHEGATE_CACHE__L1_TTL", "0s")]);
    let id = std::process::id();
    let keep = format!("/keep-{id}?cc=max-age%3D60");
    let gone = format!("/gone-{id}?cc=max-age%3D60&surrogate=k-{id}");
    let varied = format!("/varied-{id}?cc=max-age%3D60&vary=Accept-Language");
    for path in [&keep, &gone] {
        assert_eq!(get(&format!("{}{path}", a.url)).await.x_cache(), "MISS");
        assert_eq!(get(&format!("{}{path}", b.url)).await.x_cache(), "HIT");
    }
    for lang in ["en", "fr"] {
        in_language(&format!("{}{varied}", a.url), lang).await;
    }
    let stdout = purge_cli(
        &up.url,
        &env,
        &["--url", &varied, "--tag", &format!("k-{id}")],
    );
    assert!(stdout.contains("removed 3 entries"), "{stdout}");
    assert_eq!(get(&format!("{}{gone}", b.url)).await.x_cache(), "MISS");
    for lang in ["en", "fr"] {
        let r = in_language(&format!("{}{varied}", b.url), lang).await;
        assert_eq!(r.x_cache(), "MISS", "{lang} variant survived the purge");
    }
    assert_eq!(get(&format!("{}{keep}", a.url)).await.x_cache(), "HIT");
    assert_eq!(get(&format!("{}{keep}", b.url)).await.x_cache(), "HIT");
}

/// `cachegate purge --prefix` removes every stored URL under a path
/// prefix (every variant), and nothing else; `--all` everything. Both
/// read the whole backend (Redis SCAN, a DynamoDB Scan) to find them.
async fn purge_by_prefix_and_all(backend: &str) {
    let env = backend_env(backend, "prefix");
    init(&env);
    let up = upstream().await;
    let a = start(&up.url, &env, &[("CACHEGATE_CACHE__L1_TTL", "0s")]);
    let b = start(&up.url, &env, &[("CACHEGATE_CACHE__L1_TTL", "0s")]);
    let id = std::process::id();
    let under = [
        format!("/pfx-{id}/a?cc=max-age%3D60"),
        format!("/pfx-{id}/b?cc=max-age%3D60&x=1"),
    ];
    let varied = format!("/pfx-{id}/c?cc=max-age%3D60&vary=Accept-Language");
    let outside = [
        format!("/pfx-{id}x?cc=max-age%3D60"),
        format!("/other-{id}/pfx-{id}/?cc=max-age%3D60"),
    ];
    for path in under.iter().chain(&outside) {
        assert_eq!(get(&format!("{}{path}", a.url)).await.x_cache(), "MISS");
    }
    for lang in ["en", "fr"] {
        let r = in_language(&format!("{}{varied}", a.url), lang).await;
        assert_eq!(r.x_cache(), "MISS");
    }
    let prefix = format!("/pfx-{id}/");
    let stdout = purge_cli(&up.url, &env, &["--prefix", &prefix, "--prefix", "/none/"]);
    assert!(
        stdout.contains(&format!("prefix {prefix}: removed 4")),
        "{stdout}"
    );
    assert!(stdout.contains("prefix /none/: removed 0"), "{stdout}");
    for path in &under {
        assert_eq!(
            get(&format!("{}{path}", b.url)).await.x_cache(),
            "MISS",
            "{path}"
        );
    }
    for lang in ["en", "fr"] {
        let r = in_language(&format!("{}{varied}", b.url), lang).await;
        assert_eq!(r.x_cache(), "MISS", "{lang} variant survived the purge");
    }
    for path in &outside {
        assert_eq!(
            get(&format!("{}{path}", b.url)).await.x_cache(),
            "HIT",
            "{path}"
        );
    }
    // Everything: what is stored now is the 4 just refetched and the 2 outside.
    let stdout = purge_cli(&up.url, &env, &["--all"]);
    assert!(stdout.contains("prefix /: removed 6"), "{stdout}");
    for path in under.iter().chain(&outside) {
        assert_eq!(
            get(&format!("{}{path}", a.url)).await.x_cache(),
            "MISS",
            "{path}"
        );
    }
}

#[tokio::test]
async fn redis_purge_by_prefix_and_all() {
    purge_by_prefix_and_all("redis").await;
}

#[tokio::test]
async fn dynamodb_purge_by_prefix_and_all() {
    purge_by_prefix_and_all("dynamodb").await;
}

/// A GET of `url` in `lang` (`Accept-Language`).
async fn in_language(url: &str, lang: &str) -> common::Got {
    common::send(client().get(url).header("accept-language", lang)).await
}

/// `cachegate purge ARGS` on the backend `env` names; its stdout.
fn purge_cli(upstream_url: &str, env: &[(String, String)], args: &[&str]) -> String {
    let out = common::cli(upstream_url, env, &[&["purge"], args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A purge made (by `cachegate purge`) while a fetch of the same URL is on
/// its way: the older response that fetch brings back is not stored, so
/// the next request, on any process, gets the new version.
async fn a_purge_during_a_fetch_keeps_the_older_response_out(backend: &str) {
    let env = backend_env(backend, "race");
    init(&env);
    let up = upstream().await;
    let no_l1 = [("CACHEGATE_CACHE__L1_TTL", "0s")];
    let a = start(&up.url, &env, &no_l1);
    let b = start(&up.url, &env, &no_l1);
    let path = format!("/race-{}", std::process::id());
    let query = "cc=max-age%3D60&delay_ms=1500";
    let slow = tokio::spawn(common::send(
        client().get(format!("{}{path}?{query}", a.url)),
    ));
    while up.state.hits(&path) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    up.state.set_version(&path, "2");
    purge_cli(&up.url, &env, &["--url", &format!("{path}?{query}")]);
    let old = slow.await.unwrap();
    assert_eq!(old.json()["version"], "1");
    assert!(
        !old.header("cache-status").contains("stored"),
        "{backend}: the pre-purge response was stored: {}",
        old.header("cache-status")
    );
    let next = get(&format!("{}{path}?{query}", b.url)).await;
    assert_eq!(
        next.x_cache(),
        "MISS",
        "{backend}: served what the purge removed"
    );
    assert_eq!(next.json()["version"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_a_purge_during_a_fetch_keeps_the_older_response_out() {
    a_purge_during_a_fetch_keeps_the_older_response_out("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_a_purge_during_a_fetch_keeps_the_older_response_out() {
    a_purge_during_a_fetch_keeps_the_older_response_out("dynamodb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_purge_cli_reaches_every_process() {
    purge_cli_reaches_every_process("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_purge_cli_reaches_every_process() {
    purge_cli_reaches_every_process("dynamodb").await;
}

/// RFC 9111 §4.4: a successful unsafe request through one process
/// invalidates its URI, and the same-origin Location and Content-Location
/// of the response, for every process on the backend; a Location on
/// another origin invalidates nothing.
async fn unsafe_methods_invalidate_everywhere(backend: &str) {
    let up = upstream().await;
    let env = if backend == "memory" {
        Vec::new()
    } else {
        let env = backend_env(backend, "unsafe");
        init(&env);
        env
    };
    let no_l1 = [("CACHEGATE_CACHE__L1_TTL", "0s")];
    let a = start(&up.url, &env, &no_l1);
    // On memory the cache is the process's own: one process plays both parts.
    let b_owned = (backend != "memory").then(|| start(&up.url, &env, &no_l1));
    let b = b_owned.as_ref().unwrap_or(&a);
    let id = std::process::id();
    let cc = "cc=max-age%3D60";
    let thing = format!("/things/{id}?{cc}");
    let created = format!("/created/{id}?{cc}");
    let described = format!("/described/{id}?{cc}");
    let elsewhere = format!("/elsewhere/{id}?{cc}");
    for path in [&thing, &created, &described, &elsewhere] {
        assert_eq!(get(&format!("{}{path}", a.url)).await.x_cache(), "MISS");
        assert_eq!(get(&format!("{}{path}", b.url)).await.x_cache(), "HIT");
    }
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let post = format!(
        "{}/things/{id}?location={}&content_location={}",
        b.url,
        enc(&created),
        enc(&format!("{}{described}", up.url)),
    );
    let r = common::send(client().post(&post).body("x")).await;
    assert_eq!(r.x_cache(), "BYPASS");
    assert_eq!(get(&format!("{}{created}", a.url)).await.x_cache(), "MISS");
    assert_eq!(
        get(&format!("{}{described}", a.url)).await.x_cache(),
        "MISS"
    );
    assert_eq!(get(&format!("{}{thing}", a.url)).await.x_cache(), "HIT");

    let delete = format!("{}{thing}", b.url);
    let r = common::send(client().delete(&delete)).await;
    assert_eq!(r.status, 200);
    assert_eq!(get(&format!("{}{thing}", a.url)).await.x_cache(), "MISS");

    // Another origin's Location, and a failed request, invalidate nothing.
    let foreign = format!(
        "{}/things/{id}?location={}",
        b.url,
        enc(&format!("http://127.0.0.1:9{elsewhere}"))
    );
    let r = common::send(client().put(&foreign)).await;
    assert_eq!(r.status, 200);
    up.state
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let r = common::send(client().patch(format!("{}{elsewhere}", b.url))).await;
    assert_eq!(r.status, 503);
    up.state
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(get(&format!("{}{elsewhere}", a.url)).await.x_cache(), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_unsafe_methods_invalidate_everywhere() {
    unsafe_methods_invalidate_everywhere("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_unsafe_methods_invalidate_everywhere() {
    unsafe_methods_invalidate_everywhere("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_unsafe_methods_invalidate_everywhere() {
    unsafe_methods_invalidate_everywhere("dynamodb").await;
}

/// A fetch lock whose release fails is released in the background once the
/// store lets it, so other instances do not wait out the lock's TTL (here
/// 31 s: the upstream timeout and a second) for a fetch that is over. The
/// failure is real: an ACL user of the shared Redis may take locks (`SET`)
/// but not run the release script, until the test grants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_failed_unlock_is_retried_in_the_background() {
    let url = common::need("CACHEGATE_TEST_REDIS_URL");
    let port = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let id = std::process::id();
    let user = format!("unlock-{id}");
    let prefix = format!("t-unlock-{id}:");
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .expect("redis-cli not found: scripts/test installs redis-tools");
        assert!(out.status.success(), "{}", common::describe(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // Entries and tags as usual; on lock keys, only SET (taking a lock).
    let granted = cli(&[
        "ACL",
        "SETUSER",
        &user,
        "reset",
        "on",
        ">unlock-test",
        "+@all",
        "&*",
        &format!("~{prefix}v:*"),
        &format!("~{prefix}t:*"),
        &format!("(~{prefix}l:* +set)"),
    ]);
    assert_eq!(granted, "OK");
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_BACKEND", "redis"),
            ("CACHEGATE_REDIS__URL", &url),
            ("CACHEGATE_REDIS__USERNAME", &user),
            ("CACHEGATE_REDIS__PASSWORD", "unlock-test"),
            ("CACHEGATE_REDIS__KEY_PREFIX", &prefix),
            ("CACHEGATE_UPSTREAM__TIMEOUT", "30s"),
            ("CACHEGATE_STORE__FAILURE_THRESHOLD", "1000"),
        ],
    );
    let r = get(&format!("{}/unlock?cc=no-store&delay_ms=50", cg.url)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let locks = || cli(&["--scan", "--pattern", &format!("{prefix}l:*")]);
    assert!(
        !locks().is_empty(),
        "no lock left behind: was the release script not denied?"
    );
    cli(&["ACL", "SETUSER", &user, "allkeys"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !locks().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the lock outlived its fetch by 5 s: the failed release was not retried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cli(&["ACL", "DELUSER", &user]);
}
