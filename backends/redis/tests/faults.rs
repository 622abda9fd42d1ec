//! Faults: a server that accepts connections but never answers, a server
//! that freezes after the connection is made, and a server that goes away
//! and comes back on the same port. These tests start their own
//! redis-server processes (from PATH; scripts/services/redis.sh installs
//! it) and their own silent listener; a missing redis-server is a failure.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachegate_redis::{connect, ConnectError, RedisConfig};
use cachegate_store::{now_millis, CacheStore, PutOptions, Rate, StoreError, StoreKey};
use cachegate_test_net::{free_port, wait_listening};

fn opts(ttl_ms: u64) -> PutOptions {
    PutOptions {
        expires_at: now_millis() + ttl_ms,
        tags: vec!["fault".into()],
    }
}

/// A redis-server child on `port`, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(port: u16) -> Server {
        let dir = std::env::temp_dir().join(format!("cachegate-redis-fault-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server from PATH ({e}); \
                     scripts/services/redis.sh installs it"
                )
            });
        wait_listening(&mut child, port, "redis-server", Duration::from_secs(10));
        Server { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.child.id());
    }

    fn stop(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_backend_error(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Backend {
            backend: "redis",
            ..
        }
    )
}

/// A listener that accepts connections and never says a word.
async fn silent_listener() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_fails_connect_within_the_timeout() {
    let (port, task) = silent_listener().await;
    for (url, cluster, tls) in [
        (format!("redis://127.0.0.1:{port}"), false, false),
        (format!("redis://127.0.0.1:{port}"), true, false),
        (format!("rediss://127.0.0.1:{port}"), false, true),
    ] {
        let cfg = RedisConfig {
            url,
            cluster,
            connect_timeout: Duration::from_millis(300),
            response_timeout: Duration::from_millis(100),
            ..RedisConfig::default()
        };
        let started = Instant::now();
        let err = connect(&cfg)
            .await
            .expect_err("connect to a silent server succeeded");
        let took = started.elapsed();
        eprintln!("silent server (cluster={cluster}, tls={tls}) after {took:?}: {err}");
        assert!(
            took < Duration::from_millis(300 * 2 + 100 + 400),
            "cluster={cluster} tls={tls}: connect took {took:?}"
        );
        assert!(
            matches!(err, ConnectError::Timeout { .. }),
            "cluster={cluster} tls={tls}: {err}"
        );
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }
    task.abort();
}

/// The server answers at first, then freezes (SIGSTOP): every operation
/// fails within response_timeout instead of hanging, and after SIGCONT the
/// same store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_server_times_out_operations_then_recovers() {
    let server = Server::start(free_port());
    let cfg = RedisConfig {
        url: server.url(),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(150),
        ..RedisConfig::default()
    };
    let store = connect(&cfg).await.unwrap();
    let k = StoreKey::hash("fault", ["frozen"]);
    store
        .put(&k, Bytes::from_static(b"before"), &opts(60_000))
        .await
        .unwrap();

    server.signal("-STOP");
    let bound = Duration::from_millis(150 + 250);
    for round in 0..3 {
        let started = Instant::now();
        let get = store.get(&k).await;
        let put = store
            .put(&k, Bytes::from_static(b"during"), &opts(60_000))
            .await;
        let lock = store.try_lock(&k, Duration::from_secs(5)).await;
        let purge = store.purge_tag("fault").await;
        let permit = store
            .take_permit(&k, Rate::new(10.0, 1), Duration::ZERO)
            .await;
        let took = started.elapsed();
        for (what, err) in [
            ("get", get.err()),
            ("put", put.err()),
            ("lock", lock.err()),
            ("purge", purge.err()),
            ("permit", permit.err()),
        ] {
            let err =
                err.unwrap_or_else(|| panic!("round {round}: {what} worked on a frozen server"));
            assert!(is_backend_error(&err), "{what}: {err}");
        }
        assert!(
            took < bound * 5,
            "round {round}: five operations took {took:?} on a frozen server"
        );
    }

    server.signal("-CONT");
    let started = Instant::now();
    loop {
        match store.get(&k).await {
            Ok(v) => {
                assert!(v.is_some());
                break;
            }
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(5),
                "no recovery after SIGCONT: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store
        .put(&k, Bytes::from_static(b"after"), &opts(60_000))
        .await
        .unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"after"))
    );
    server.stop();
}

/// Redis goes away and comes back on the same port: errors (fast) while it
/// is down, and the same store works again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_server_is_reconnected() {
    let port = free_port();
    let server = Server::start(port);
    let cfg = RedisConfig {
        url: server.url(),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(200),
        ..RedisConfig::default()
    };
    let store = connect(&cfg).await.unwrap();
    let k = StoreKey::hash("fault", ["restart"]);
    store
        .put(&k, Bytes::from_static(b"one"), &opts(60_000))
        .await
        .unwrap();
    server.stop();

    for _ in 0..5 {
        let started = Instant::now();
        let err = store.get(&k).await.expect_err("get worked with redis down");
        assert!(is_backend_error(&err), "{err}");
        let err = store
            .put(&k, Bytes::from_static(b"two"), &opts(60_000))
            .await
            .expect_err("put worked with redis down");
        assert!(is_backend_error(&err), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(2 * 200 + 200),
            "operations on a stopped redis took {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Back on the same port, empty (no persistence).
    let server = Server::start(port);
    let started = Instant::now();
    loop {
        match store
            .put(&k, Bytes::from_static(b"three"), &opts(60_000))
            .await
        {
            Ok(()) => break,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(5),
                "no reconnect within 5s of redis coming back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("reconnected {:?} after restart", started.elapsed());
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"three"))
    );
    let t = store
        .try_lock(&k, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(store.unlock(&k, &t).await.unwrap());
    assert_eq!(store.purge_tag("fault").await.unwrap(), 1);
    server.stop();
}

/// Start-up against nothing at all: a clear error naming the server.
#[tokio::test]
async fn nothing_listening_fails_clearly() {
    let port = free_port();
    let err = connect(&RedisConfig {
        url: format!("redis://127.0.0.1:{port}"),
        connect_timeout: Duration::from_millis(300),
        ..RedisConfig::default()
    })
    .await
    .expect_err("connected to nothing");
    eprintln!("nothing listening: {err}");
    let shown = err.to_string();
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert!(matches!(err, ConnectError::Connect { .. }), "{shown}");
}

/// A TCP relay to a real server that can turn every connection open so far
/// into a black hole (bytes go in, nothing comes back, no reset), while new
/// connections are relayed normally: a connection dropped silently by the
/// network, like an idle one behind Lambda's VPC networking.
struct Relay {
    port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = std::sync::Arc::new(AtomicU64::new(0));
        let gen = generation.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = gen.load(Ordering::SeqCst);
                let gen = gen.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let g1 = gen.clone();
                    let up = tokio::spawn(pump(cr, sw, born, g1));
                    let down = tokio::spawn(pump(sr, cw, born, gen));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Relay {
            port,
            generation,
            task,
        }
    }

    /// Every connection open now stops passing bytes, for ever.
    fn black_hole_open_connections(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    born: u64,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // Keep a black-holed connection open: no FIN, no reset.
                if generation.load(std::sync::atomic::Ordering::SeqCst) != born {
                    std::future::pending::<()>().await;
                }
                return;
            }
            Ok(n) => n,
        };
        if generation.load(std::sync::atomic::Ordering::SeqCst) != born {
            continue; // swallowed
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The connection goes silent (no reset): the store notices the missing
/// replies, even when the caller's tighter timeout (the proxy's guard)
/// abandons each call first, and replaces the connection by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silently_dropped_connection_is_replaced() {
    let server = Server::start(free_port());
    let relay = Relay::start(server.port).await;
    let store = connect(&RedisConfig {
        url: format!("redis://127.0.0.1:{}", relay.port),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(250),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    let k = StoreKey::hash("fault", ["silent"]);
    store
        .put(&k, Bytes::from_static(b"kept"), &opts(60_000))
        .await
        .unwrap();

    relay.black_hole_open_connections();
    // Like the proxy's guard: 50 ms per read, then the call is dropped.
    let guard = Duration::from_millis(50);
    let started = Instant::now();
    let mut failures = 0;
    loop {
        match tokio::time::timeout(guard, store.get(&k)).await {
            Ok(Ok(v)) => {
                assert_eq!(v, Some(Bytes::from_static(b"kept")));
                break;
            }
            Ok(Err(_)) | Err(_) => failures += 1,
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still no reply after {failures} tries and {:?}: the silent connection was never replaced",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "silent connection replaced after {failures} unanswered calls, {:?}",
        started.elapsed()
    );
    assert!(failures >= 1, "the black hole did not bite");
    assert!(failures <= 10, "{failures} failed calls before recovery");
    store
        .put(&k, Bytes::from_static(b"again"), &opts(60_000))
        .await
        .unwrap();
    drop(relay);
    server.stop();
}
