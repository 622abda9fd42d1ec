//! A cache outage under load: 50 concurrent clients through `cachegate
//! serve` on Redis (and on DynamoDB), the cache server killed in the middle
//! and started again on the same port. Every client response must still be
//! a success, the breaker must keep the outage's latency bounded, and hits
//! must come back soon after the server does.
//!
//! The test starts and kills its own redis-server and dynalite (the shared
//! ones of scripts/test must stay up for the other tests). By default it
//! runs a short version (20 clients, about 6 s per backend, looser cache
//! time bounds for a debug build on a shared machine);
//! `scripts/outage-under-load` runs the full one
//! (`CACHEGATE_TEST_OUTAGE_FULL=1`, a release build, at least 10,000 requests)
//! and prints the figures.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachegate_test_net::wait_listening;
use common::{cachegate, free_port, upstream};

/// How long each phase lasts and how much load there is.
struct Plan {
    /// `store.*` overrides: the short run shares two cores with compilers
    /// and a debug build, where the 50ms default read bound is often missed
    /// even with the server up; the full run uses the defaults.
    store: &'static [(&'static str, &'static str)],
    clients: usize,
    before: Duration,
    during: Duration,
    after: Duration,
    min_requests: usize,
}

fn plan() -> Plan {
    if std::env::var("CACHEGATE_TEST_OUTAGE_FULL").is_ok_and(|v| v == "1") {
        Plan {
            store: &[],
            clients: 50,
            before: Duration::from_secs(5),
            during: Duration::from_secs(5),
            after: Duration::from_secs(5),
            min_requests: 10_000,
        }
    } else {
        Plan {
            store: &[
                ("CACHEGATE_STORE__READ_TIMEOUT", "500ms"),
                ("CACHEGATE_STORE__WRITE_TIMEOUT", "2s"),
            ],
            clients: 20,
            before: Duration::from_millis(1500),
            during: Duration::from_millis(1500),
            after: Duration::from_millis(2500),
            min_requests: 1_000,
        }
    }
}

const KEYS: usize = 200;

/// A cache server this test owns: it can be killed and started again on
/// the same port.
struct Server {
    child: Option<Child>,
    port: u16,
    start: Box<dyn Fn(u16) -> Child + Send>,
}

impl Server {
    fn new(start: Box<dyn Fn(u16) -> Child + Send>) -> Server {
        let port = free_port();
        let mut child = start(port);
        wait_listening(&mut child, port, "cache server", Duration::from_secs(20));
        Server {
            child: Some(child),
            port,
            start,
        }
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
    /// Start again on the same port; returns once it accepts connections.
    fn restart(&mut self) {
        // The port may linger a moment after the kill.
        let started = Instant::now();
        loop {
            let mut child = (self.start)(self.port);
            std::thread::sleep(Duration::from_millis(100));
            if child.try_wait().unwrap().is_none() {
                wait_listening(
                    &mut child,
                    self.port,
                    "cache server",
                    Duration::from_secs(20),
                );
                self.child = Some(child);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "could not restart on port {}",
                self.port
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_server() -> Server {
    Server::new(Box::new(|port| {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server not found: scripts/services/redis.sh installs it")
    }))
}

/// dynalite keeping its data on disk, so the table survives the kill (a
/// DynamoDB outage does not drop tables).
fn dynalite(dir: &std::path::Path) -> Server {
    let bin = std::env::var("CACHEGATE_TEST_DYNALITE").unwrap_or_else(|_| {
        panic!("CACHEGATE_TEST_DYNALITE is not set: run through scripts/test (scripts/services/dynamodb.sh exports it)")
    });
    let dir = dir.to_owned();
    Server::new(Box::new(move |port| {
        Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--createTableMs", "50", "--path"])
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("start dynalite")
    }))
}

/// One client request's outcome.
struct Sample {
    /// When it was sent, since the load started.
    sent: Duration,
    latency: Duration,
    /// 0 when there was no HTTP response at all.
    status: u16,
    hit: bool,
}

async fn client_loop(
    id: usize,
    client: reqwest::Client,
    base: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    t0: Instant,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut i = id * 7;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let url = format!("{base}/load/{}?cc=max-age%3D300", i % KEYS);
        let sent = t0.elapsed();
        let started = Instant::now();
        let (status, hit) = match client.get(&url).send().await {
            Ok(r) => {
                let hit = r.headers().get("x-cache").is_some_and(|v| v == "HIT");
                let status = r.status().as_u16();
                // A response only counts once its body has arrived.
                match r.bytes().await {
                    Ok(_) => (status, hit),
                    Err(_) => (0, false),
                }
            }
            Err(_) => (0, false),
        };
        samples.push(Sample {
            sent,
            latency: started.elapsed(),
            status,
            hit,
        });
        done.fetch_add(1, Ordering::Relaxed);
    }
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Load through `cg`, kill the server after `plan.before`, restart it after
/// `plan.during`, keep going for `plan.after` (and until `min_requests`).
async fn outage_under_load(backend: &str, server: &mut Server, cg: &common::Cachegate) {
    let plan = plan();
    // One outage at a time: two loads on two cores would measure each other.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    // One pool for all clients: building a TLS-capable client per task
    // costs more CPU than the requests themselves in a debug build.
    cachegate::tls::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(plan.clients)
        .build()
        .unwrap();
    // A warm cache, as in production before an outage: every key stored.
    let warm: Vec<_> = (0..KEYS)
        .map(|k| {
            let (client, url) = (
                client.clone(),
                format!("{}/load/{k}?cc=max-age%3D300", cg.url),
            );
            tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
        })
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap(), 200);
    }
    // The cache works before the outage (checked without load: a slow
    // store under load may miss its read bound, which is a miss, not a fault).
    let mut hit = false;
    for _ in 0..20 {
        let r = client
            .get(format!("{}/load/0?cc=max-age%3D300", cg.url))
            .send()
            .await
            .unwrap();
        if r.headers().get("x-cache").is_some_and(|v| v == "HIT") {
            hit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hit, "no hit before the outage: the cache never worked");
    let t0 = Instant::now();
    let clients: Vec<_> = (0..plan.clients)
        .map(|id| {
            tokio::spawn(client_loop(
                id,
                client.clone(),
                cg.url.clone(),
                stop.clone(),
                done.clone(),
                t0,
            ))
        })
        .collect();
    tokio::time::sleep(plan.before).await;
    let killed_at = t0.elapsed();
    server.kill();
    tokio::time::sleep(plan.during).await;
    let restarting_at = t0.elapsed();
    tokio::task::block_in_place(|| server.restart());
    let back_at = t0.elapsed();
    tokio::time::sleep(plan.after).await;
    while done.load(Ordering::Relaxed) < plan.min_requests {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for c in clients {
        samples.extend(c.await.unwrap());
    }

    let failed: Vec<&Sample> = samples
        .iter()
        .filter(|s| !(200..300).contains(&s.status))
        .collect();
    let phase = |from: Duration, to: Duration| {
        let mut l: Vec<Duration> = samples
            .iter()
            .filter(|s| s.sent >= from && s.sent < to)
            .map(|s| s.latency)
            .collect();
        l.sort();
        let hits = samples
            .iter()
            .filter(|s| s.sent >= from && s.sent < to && s.hit)
            .count();
        (
            l.len(),
            hits,
            percentile(&l, 0.50),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or_default(),
        )
    };
    let before = phase(Duration::ZERO, killed_at);
    let during = phase(killed_at, back_at);
    let after = phase(back_at, Duration::MAX);
    // The first hit served after the server is back (the L1 is off: a hit
    // came from the server).
    let first_hit = samples
        .iter()
        .filter(|s| s.hit && s.sent >= back_at)
        .map(|s| s.sent + s.latency)
        .min()
        .map(|t| t - back_at);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "outage[{backend}]: total={} failed={} clients={} killed_at={:.0}ms restart_took={:.0}ms \
         before: n={} hits={} p50={:.1}ms p99={:.1}ms max={:.1}ms | during: n={} hits={} p50={:.1}ms p99={:.1}ms max={:.1}ms | \
         after: n={} hits={} p50={:.1}ms p99={:.1}ms max={:.1}ms | first hit {:?} after the server was back",
        samples.len(),
        failed.len(),
        plan.clients,
        ms(killed_at),
        ms(back_at - restarting_at),
        before.0,
        before.1,
        ms(before.2),
        ms(before.3),
        ms(before.4),
        during.0,
        during.1,
        ms(during.2),
        ms(during.3),
        ms(during.4),
        after.0,
        after.1,
        ms(after.2),
        ms(after.3),
        ms(after.4),
        first_hit.map(ms),
    );
    assert!(samples.len() >= plan.min_requests);
    assert!(
        failed.is_empty(),
        "{} failed responses, first statuses: {:?}",
        failed.len(),
        failed.iter().take(10).map(|s| s.status).collect::<Vec<_>>()
    );
    assert!(during.0 > 0, "no requests during the outage");
    // A generous bound that only a breaker failing to open can exceed:
    // without it each request could wait read + lock + write timeouts.
    assert!(
        during.3 < Duration::from_millis(1500),
        "p99 during the outage {:?}",
        during.3
    );
    let first_hit = first_hit.expect("no hit after the cache server came back");
    assert!(
        first_hit <= Duration::from_secs(2),
        "first hit {first_hit:?} after the cache server came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_loses_no_request() {
    let mut server = redis_server();
    let up = upstream().await;
    let url = format!("redis://127.0.0.1:{}", server.port);
    let mut env = vec![
        ("CACHEGATE_BACKEND", "redis"),
        ("CACHEGATE_REDIS__URL", url.as_str()),
        ("CACHEGATE_CACHE__L1_TTL", "0s"),
    ];
    env.extend_from_slice(plan().store);
    let cg = cachegate(&up.url, &env);
    outage_under_load("redis", &mut server, &cg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamodb_killed_under_load_loses_no_request() {
    let dir =
        std::env::temp_dir().join(format!("cachegate-outage-dynalite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = dynalite(&dir);
    let up = upstream().await;
    let endpoint = format!("http://127.0.0.1:{}", server.port);
    let env = [
        ("CACHEGATE_BACKEND", "dynamodb"),
        ("AWS_ENDPOINT_URL_DYNAMODB", endpoint.as_str()),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("CACHEGATE_DYNAMODB__TABLE", "outage"),
        ("CACHEGATE_CACHE__L1_TTL", "0s"),
    ];
    let init = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .arg("init")
        .env("CACHEGATE_UPSTREAM__URL", "http://127.0.0.1:9")
        .envs(env)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "cachegate init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut env = env.to_vec();
    env.extend_from_slice(plan().store);
    let cg = cachegate(&up.url, &env);
    outage_under_load("dynamodb", &mut server, &cg).await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
