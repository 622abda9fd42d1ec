//! A shared backend that cannot be used as configured: requests still
//! answer (fail open), and the cause is logged once, saying what kind of
//! failure it is, never once per request. Against the real servers
//! scripts/test starts (dynalite, redis-server).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{backend_env, client, free_port, lines_of, need, upstream};

/// `cachegate serve` with its stderr collected; killed on drop.
struct Serve {
    child: Child,
    url: String,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(upstream_url: &str, env: &[(String, String)]) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("CACHEGATE_UPSTREAM__URL", upstream_url)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cachegate");
    let stderr = lines_of(child.stderr.take().unwrap());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = match line.trim().strip_prefix("cachegate listening on ") {
        Some(url) => url.to_owned(),
        None => {
            let _ = child.kill();
            let logged: Vec<String> = stderr.try_iter().collect();
            panic!("cachegate did not start: {line:?}\n{}", logged.join("\n"));
        }
    };
    Serve { child, url, stderr }
}

/// Sends GETs for `how_long`, each for a path of its own (every one a miss
/// that reaches the backend if the breaker lets it), checks each answers
/// 200 from the upstream, and returns everything logged meanwhile.
async fn requests_for(cg: &mut Serve, how_long: Duration) -> (usize, Vec<String>) {
    let http = client();
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < how_long {
        let url = format!(
            "{}/setup-{}-{sent}?cc=max-age%3D60",
            cg.url,
            std::process::id()
        );
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {sent} did not fail open");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last log lines through the pipe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    (sent, cg.stderr.try_iter().collect())
}

fn mentioning<'a>(lines: &'a [String], needle: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.contains(needle)).collect()
}

/// A DynamoDB table nobody created: one log line with the hint to run
/// `cachegate init` (not the SDK's kilobyte per request), and every request
/// answered from the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dynamodb_table_is_reported_once_with_the_init_hint() {
    let up = upstream().await;
    // backend_env names a table of this process; nothing creates it here.
    let env: Vec<(String, String)> = backend_env("dynamodb", "never-created")
        .into_iter()
        .filter(|(k, _)| k != "CACHEGATE_STORE__FAILURE_THRESHOLD")
        .collect();
    let mut cg = serve(&up.url, &env);
    let (sent, logged) = requests_for(&mut cg, Duration::from_secs(3)).await;
    assert!(sent >= 20, "only {sent} requests in 3 s");
    let hints = mentioning(&logged, "run `cachegate init`");
    assert_eq!(
        hints.len(),
        1,
        "{sent} requests; logged:\n{}",
        logged.join("\n")
    );
    assert!(hints[0].contains("does not exist"), "{}", hints[0]);
    assert!(
        logged.iter().all(|l| l.len() < 1024),
        "a log line of a kilobyte or more:\n{}",
        logged.join("\n")
    );
    assert_eq!(
        up.state.answered.load(std::sync::atomic::Ordering::SeqCst),
        sent
    );
}

/// Redis refuses the credentials (WRONGPASS): reported once at start-up as
/// permanent, requests answered from the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_redis_credentials_are_reported_once_as_permanent() {
    let up = upstream().await;
    let env = vec![
        ("CACHEGATE_BACKEND".to_owned(), "redis".to_owned()),
        (
            "CACHEGATE_REDIS__URL".to_owned(),
            need("CACHEGATE_TEST_REDIS_URL"),
        ),
        (
            "CACHEGATE_REDIS__USERNAME".to_owned(),
            "no-such-user".to_owned(),
        ),
        (
            "CACHEGATE_REDIS__PASSWORD".to_owned(),
            "wrong-password".to_owned(),
        ),
    ];
    let mut cg = serve(&up.url, &env);
    let (sent, logged) = requests_for(&mut cg, Duration::from_secs(2)).await;
    let reports = mentioning(&logged, "authentication failed");
    assert_eq!(
        reports.len(),
        1,
        "{sent} requests; logged:\n{}",
        logged.join("\n")
    );
    assert!(reports[0].contains("permanent"), "{}", reports[0]);
    assert!(
        !logged.iter().any(|l| l.contains("wrong-password")),
        "password logged"
    );
}

/// Redis not listening at all: transient, retried every second, and the
/// retries that fail the same way log nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_reported_once_as_transient_while_retrying() {
    let up = upstream().await;
    let env = vec![
        ("CACHEGATE_BACKEND".to_owned(), "redis".to_owned()),
        (
            "CACHEGATE_REDIS__URL".to_owned(),
            format!("redis://127.0.0.1:{}", free_port()),
        ),
    ];
    let mut cg = serve(&up.url, &env);
    // Long enough for two or three reconnect attempts.
    let (sent, logged) = requests_for(&mut cg, Duration::from_millis(3500)).await;
    let reports = mentioning(&logged, "127.0.0.1");
    assert_eq!(
        reports.len(),
        1,
        "{sent} requests; logged:\n{}",
        logged.join("\n")
    );
    assert!(reports[0].contains("transient"), "{}", reports[0]);
}
