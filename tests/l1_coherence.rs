//! Every instance's L1 hears of purges made anywhere: several `cachegate
//! serve` processes with the default L1 (`cache.l1_ttl` 5 s) on a real
//! Redis (standalone and the 3-node cluster scripts/test starts, pub/sub)
//! and on dynalite (the purge log). A purge is made by `cachegate purge`
//! (by tag, by URL), by an unsafe method through one instance and by the
//! serve purge endpoint, and every instance must answer a miss well within
//! `l1_ttl`: an L1 that did not hear of it would answer HIT for 5 s.
//!
//! The delays are printed (from the purge returning to each instance's
//! first answer that is not a HIT, with every instance polled without
//! pause from before the purge); they are measured, not asserted. The
//! bound asserted is generous (1 s on Redis, 2 s on DynamoDB).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{backend_env, cachegate, client, free_port, get, need, upstream, Cachegate, Killed};

fn start(upstream_url: &str, env: &[(String, String)], extra: &[(&str, &str)]) -> Cachegate {
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    cachegate(upstream_url, &all)
}

fn run_cli(upstream_url: &str, env: &[(String, String)], args: &[&str]) -> String {
    let out = common::cli(upstream_url, env, args);
    assert!(out.status.success(), "{}", common::describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PURGE_TOKEN: &str = "l1-coherence-test-token";

/// GET `path` on every instance until each answers HIT (the second answer
/// of each comes from its L1, filled by the first).
async fn warm(instances: &[&Cachegate], path: &str) {
    for cg in instances {
        let url = format!("{}{path}", cg.url);
        let mut answers = Vec::new();
        for _ in 0..2 {
            answers.push(get(&url).await.x_cache().to_owned());
        }
        assert_eq!(
            answers.last().unwrap(),
            "HIT",
            "{path} on {}: {answers:?}",
            cg.url
        );
    }
}

/// Polls `path` on every instance without pause until each answers the
/// upstream's version 2 of it (set here, before `purge` runs: only a purged
/// copy is fetched again), while `purge` runs. Returns, per instance, how
/// long after `purge` returned the first such answer was asked for and
/// came (zero when before): the purge became visible between the two
/// (requests follow one another, so the one before was asked for and
/// answered version 1 before that). And the answer's `X-Cache` (MISS, or
/// HIT when another instance stored the new version first).
async fn visibility<F, Fut>(
    up: &common::UpstreamState,
    instances: &[&Cachegate],
    path: &str,
    bound: Duration,
    purge: F,
) -> Vec<(Duration, Duration, String)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let c = client();
    up.set_version(path.split('?').next().unwrap(), "2");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = instances
        .iter()
        .map(|cg| {
            let (url, c, stop) = (format!("{}{path}", cg.url), c.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let sent = Instant::now();
                    let r = common::send(c.get(&url)).await;
                    if r.json()["version"] == "2" {
                        return Some((sent, Instant::now(), r.x_cache().to_owned()));
                    }
                    assert_eq!(r.x_cache(), "HIT", "{url} answered version 1 uncached");
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return None;
                    }
                }
            })
        })
        .collect();
    purge().await;
    let returned = Instant::now();
    let deadline = tokio::time::sleep(bound);
    tokio::pin!(deadline);
    let mut out = Vec::new();
    for (poller, cg) in pollers.into_iter().zip(instances) {
        let seen = tokio::select! {
            seen = poller => seen.unwrap(),
            _ = &mut deadline => None,
        };
        let Some((sent, at, x_cache)) = seen else {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            panic!(
                "{path}: {} (pid {}) still answered the purged version {bound:?} after the purge (its L1 did not hear of it)",
                cg.url, cg.pid()
            );
        };
        out.push((
            sent.saturating_duration_since(returned),
            at.saturating_duration_since(returned),
            x_cache,
        ));
    }
    out
}

fn report(what: &str, delays: Vec<(Duration, Duration)>) {
    let pct = |mut d: Vec<Duration>, p: f64| {
        d.sort();
        d[((d.len() as f64 * p).ceil() as usize).clamp(1, d.len()) - 1]
    };
    let asked: Vec<Duration> = delays.iter().map(|d| d.0).collect();
    let answered: Vec<Duration> = delays.iter().map(|d| d.1).collect();
    eprintln!(
        "{what}: {} samples; the first answer of the new version, after the purge returned: \
         asked for at p50 {:?} / p99 {:?} / max {:?}, answered at p50 {:?} / p99 {:?} / max {:?}",
        delays.len(),
        pct(asked.clone(), 0.50),
        pct(asked.clone(), 0.99),
        pct(asked, 1.0),
        pct(answered.clone(), 0.50),
        pct(answered.clone(), 0.99),
        pct(answered, 1.0),
    );
}

/// `rounds` purges, by turns: `cachegate purge --tag`, `cachegate purge
/// --url`, a PUT through one instance (RFC 9111 §4.4), the serve purge
/// endpoint of another; each must reach every instance's L1.
async fn purges_reach_every_l1(
    label: &str,
    env: &[(String, String)],
    instances_n: usize,
    rounds: usize,
    bound: Duration,
) {
    let up = upstream().await;
    let log = std::env::var("L1_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let token = [
        ("CACHEGATE_SERVE__PURGE_TOKEN", PURGE_TOKEN),
        ("RUST_LOG", log.as_str()),
    ];
    let owned: Vec<Cachegate> = (0..instances_n)
        .map(|_| start(&up.url, env, &token))
        .collect();
    let instances: Vec<&Cachegate> = owned.iter().collect();
    let id = std::process::id();
    let mut delays = Vec::new();
    for round in 0..rounds {
        let tag = format!("l1-{label}-{id}-{round}");
        let path = format!("/l1-{label}-{id}-{round}?cc=max-age%3D60&surrogate={tag}");
        warm(&instances, &path).await;
        let via = instances[round % instances.len()];
        let how = round % 4;
        let seen = visibility(&up.state, &instances, &path, bound, || async {
            match how {
                0 => {
                    let out = run_cli(&up.url, env, &["purge", "--tag", &tag]);
                    assert!(out.contains("removed 1 entries"), "{out}");
                }
                1 => {
                    let out = run_cli(&up.url, env, &["purge", "--url", &path]);
                    assert!(out.contains("removed 1 entries"), "{out}");
                }
                2 => {
                    let r = common::send(client().put(format!("{}{path}", via.url))).await;
                    assert_eq!(r.status, 200);
                }
                _ => {
                    let r = common::send(
                        client()
                            .post(format!("{}/_cachegate/purge", via.url))
                            .bearer_auth(PURGE_TOKEN)
                            .body(serde_json::json!({ "tags": [tag] }).to_string()),
                    )
                    .await;
                    assert_eq!(r.status, 200, "{:?}", r.body);
                    assert_eq!(r.json()["removed"], 1, "{:?}", r.body);
                }
            }
        })
        .await;
        for (asked, answered, x_cache) in seen {
            assert!(x_cache == "MISS" || x_cache == "HIT", "{path}: {x_cache}");
            delays.push((asked, answered));
        }
    }
    report(
        &format!("{label}: purge visible on {instances_n} instances' L1"),
        delays,
    );
}

fn redis_cluster_env(namespace: &str) -> Vec<(String, String)> {
    let mut env = backend_env("redis", namespace);
    env.retain(|(k, _)| k != "CACHEGATE_REDIS__URL");
    env.push((
        "CACHEGATE_REDIS__URL".into(),
        need("CACHEGATE_TEST_REDIS_CLUSTER_URL"),
    ));
    env.push(("CACHEGATE_REDIS__CLUSTER".into(), "true".into()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_purges_reach_every_l1() {
    let env = backend_env("redis", "l1");
    purges_reach_every_l1("redis", &env, 3, 40, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_purges_reach_every_l1() {
    let env = redis_cluster_env("l1c");
    purges_reach_every_l1("redis-cluster", &env, 3, 40, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_purges_reach_every_l1() {
    let env = backend_env("dynamodb", "l1");
    run_cli("http://127.0.0.1:9", &env, &["init"]);
    purges_reach_every_l1("dynamodb", &env, 2, 24, Duration::from_secs(2)).await;
}

/// A redis-server of this test's own, on a fixed port so it can be
/// restarted where the instances look for it.
fn own_redis(port: u16) -> Killed {
    let dir = std::env::temp_dir().join(format!("cg-l1-redis-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (scripts/test installs it)");
    common::wait_listening(&mut child, port, "redis-server");
    Killed(child)
}

/// The subscription is lost when Redis goes away: the L1 is flushed and
/// bypassed (a HIT from it now could be an entry purged meanwhile), and
/// once Redis is back the subscription is made again and purges reach the
/// L1s as before. Redis restarts empty (no persistence), so an L1 that
/// kept its copy would answer HIT where the right answer is a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_subscription_loss_flushes_the_l1() {
    let _ = need("CACHEGATE_TEST_REDIS_URL"); // run under scripts/test
    let port = free_port();
    let mut redis = own_redis(port);
    let url = format!("redis://127.0.0.1:{port}");
    let env: Vec<(String, String)> = backend_env("redis", "loss")
        .into_iter()
        .map(|(k, v)| {
            if k == "CACHEGATE_REDIS__URL" {
                (k, url.clone())
            } else {
                (k, v)
            }
        })
        .collect();
    let up = upstream().await;
    // A long L1: only the flush can empty it within this test.
    let long_l1 = [("CACHEGATE_CACHE__L1_TTL", "60s")];
    let a = start(&up.url, &env, &long_l1);
    let b = start(&up.url, &env, &long_l1);
    let id = std::process::id();
    let path = format!("/loss-{id}?cc=max-age%3D60");
    warm(&[&a, &b], &path).await;

    // Version 2 from now on: an answer of version 1 comes from an L1.
    up.state.set_version(&format!("/loss-{id}"), "2");
    drop(redis); // killed: the subscription connections drop
    tokio::time::sleep(Duration::from_millis(300)).await;
    for cg in [&a, &b] {
        let r = get(&format!("{}{path}", cg.url)).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["version"],
            "2",
            "{}: answered from the L1 with the subscription down ({})",
            cg.url,
            r.x_cache()
        );
    }

    redis = own_redis(port);
    // Resubscribed within the retry backoff (at most 1 s apart).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for cg in [&a, &b] {
        let r = get(&format!("{}{path}", cg.url)).await;
        assert_eq!(
            r.json()["version"],
            "2",
            "{}: the L1 kept its copy over the outage ({})",
            cg.url,
            r.x_cache()
        );
    }
    // Back to normal: the L1s fill again and hear of purges again.
    let fresh = format!("/loss-after-{id}?cc=max-age%3D60");
    warm(&[&a, &b], &fresh).await;
    let seen = visibility(
        &up.state,
        &[&a, &b],
        &fresh,
        Duration::from_secs(1),
        || async {
            let r = common::send(client().delete(format!("{}{fresh}", a.url))).await;
            assert_eq!(r.status, 200);
        },
    )
    .await;
    eprintln!("after resubscribing: {seen:?}");
    drop(redis);
}

/// A soft purge marks stale instead of removing: with a stale window the
/// next requests on every instance (their L1s dropped their fresh copies)
/// are answered STALE at once while exactly one refresh, across the two
/// instances, reaches the upstream; without one, it is a hard purge.
async fn soft_purge_serves_stale_with_one_refresh(backend: &str, via_endpoint: bool) {
    let env = backend_env(backend, "soft");
    if backend == "dynamodb" {
        run_cli("http://127.0.0.1:9", &env, &["init"]);
    }
    let up = upstream().await;
    let token = [("CACHEGATE_SERVE__PURGE_TOKEN", PURGE_TOKEN)];
    let a = start(&up.url, &env, &token);
    let b = start(&up.url, &env, &token);
    let id = std::process::id();
    let tag = format!("soft-{backend}-{id}");
    let swr_path = format!("/soft-swr-{backend}-{id}");
    let swr = format!(
        "{swr_path}?cc=max-age%3D60%2C%20stale-while-revalidate%3D30&surrogate={tag}&delay_ms=400"
    );
    let plain_path = format!("/soft-plain-{backend}-{id}");
    let plain = format!("{plain_path}?cc=max-age%3D60&surrogate={tag}");
    warm(&[&a, &b], &swr).await;
    warm(&[&a, &b], &plain).await;
    assert_eq!(up.state.hits(&swr_path), 1);
    up.state.set_version(&swr_path, "2");

    if via_endpoint {
        let r = common::send(
            client()
                .post(format!("{}/_cachegate/purge", a.url))
                .bearer_auth(PURGE_TOKEN)
                .body(serde_json::json!({ "tags": [tag], "soft": true }).to_string()),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["removed"], 2, "{:?}", r.body);
    } else {
        let out = run_cli(&up.url, &env, &["purge", "--soft", "--tag", &tag]);
        assert!(out.contains("marked stale 2 entries"), "{out}");
    }

    if backend == "dynamodb" {
        // The L1s read the purge log every cache.l1_check (250 ms).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then: 10 requests on each instance at once, all during the refresh
    // (the upstream takes 400 ms).
    let c = client();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let url = format!("{}{swr}", if i % 2 == 0 { &a.url } else { &b.url });
            let req = c.get(url);
            tokio::spawn(async move { common::send(req).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.x_cache(), "STALE", "{}", r.header("cache-status"));
        assert_eq!(r.json()["version"], "1");
    }
    // The refresh lands; both instances then answer the new version.
    let deadline = Instant::now() + Duration::from_secs(5);
    for cg in [&a, &b] {
        loop {
            let r = get(&format!("{}{swr}", cg.url)).await;
            if r.x_cache() == "HIT" && r.json()["version"] == "2" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no refreshed HIT: {}",
                cg.url,
                r.header("cache-status")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        up.state.hits(&swr_path),
        2,
        "{backend}: the soft purge did not lead to exactly one refresh across the instances"
    );
    // No stale window: the soft purge removed it.
    for cg in [&a, &b] {
        let r = get(&format!("{}{plain}", cg.url)).await;
        assert_ne!(r.x_cache(), "STALE", "{}", r.header("cache-status"));
    }
    assert_eq!(get(&format!("{}{plain}", a.url)).await.x_cache(), "HIT");
    assert_eq!(up.state.hits(&plain_path), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_soft_purge_serves_stale_with_one_refresh() {
    soft_purge_serves_stale_with_one_refresh("redis", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_soft_purge_serves_stale_with_one_refresh() {
    soft_purge_serves_stale_with_one_refresh("dynamodb", true).await;
}
