//! The invalidator role for real: the built binary as a Lambda function
//! under cargo-lambda's runtime API emulator, invoked with the EventBridge
//! and SQS events in tests/fixtures/, purging a shared backend (a real Redis
//! and a real DynamoDB-compatible server, started by scripts/test) that a
//! `cachegate serve` process is answering from. Missing services or a
//! missing cargo-lambda fail these tests; they never skip.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{backend_env, describe, Killed};

/// `cachegate ARGS` to completion, from an empty directory.
fn cachegate_cli(args: &[&str], env: &[(String, String)]) -> Output {
    common::cli("http://127.0.0.1:9", env, args)
}

/// The runtime API emulator and the binary in the invalidator role
/// attached to it.
struct Invalidator {
    // Fields drop in order: the function goes before the emulator it talks to.
    function: std::sync::Mutex<Killed>,
    _emulator: common::Logged,
    port: u16,
}

fn invalidator(upstream_url: &str, env: &[(String, String)]) -> Invalidator {
    let (emulator, port) = common::lambda_emulator();
    let function = common::lambda_function(port, upstream_url)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("CACHEGATE_ROLE", "invalidator")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .unwrap();
    Invalidator {
        function: std::sync::Mutex::new(Killed(function)),
        _emulator: emulator,
        port,
    }
}

impl Invalidator {
    /// `cargo lambda invoke` with `data` (`--data-file PATH` or
    /// `--data-ascii JSON`): Ok(the function's answer) or Err(what the
    /// invoke printed for a function error).
    fn invoke(&self, data: &[&str]) -> Result<Value, String> {
        let mut child = common::lambda_invoke(self.port)
            .args(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The emulator holds an invocation until a function takes it: never
        // wait on a function that is gone, nor forever.
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if let Some(status) = self.function.lock().unwrap().0.try_wait().unwrap() {
                let _ = child.kill();
                panic!("the invalidator exited ({status}); its stderr is above");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("cargo lambda invoke got no answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            // cargo-lambda wraps the error message in a box of its own.
            let said = describe(&out).replace('│', " ");
            return Err(said.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        Ok(serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("the invoke answer is not JSON ({e})\n{}", describe(&out))))
    }

    fn invoke_fixture(&self, name: &str) -> Result<Value, String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        self.invoke(&["--data-file", path.to_str().unwrap()])
    }
}

async fn x_cache(url: &str) -> String {
    let r = common::get(url).await;
    assert_eq!(r.status, 200, "{url}: {:?}", r.body);
    r.x_cache().to_owned()
}

async fn purge_through_events(backend: &str) {
    let env = backend_env(backend, "inval");
    let init = cachegate_cli(&["init"], &env);
    assert!(init.status.success(), "cachegate init\n{}", describe(&init));

    let up = common::upstream().await;
    let mut serve_env: Vec<(&str, &str)> =
        env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // Without an L1 every request reads the shared backend, so what the
    // invalidator removed shows at once (with one, on DynamoDB, within cache.l1_check).
    serve_env.push(("CACHEGATE_CACHE__L1_TTL", "0s"));
    serve_env.push(("CACHEGATE_CACHE__DEFAULT_TTL", "300s"));
    let proxy = common::cachegate(&up.url, &serve_env);
    let url = |p: &str| format!("{}{p}", proxy.url);

    // The fixtures name these URLs and tags.
    let article1 = url("/articles/1");
    let article2 = url("/articles/2");
    let article3 = url("/articles/3");
    let sports = url("/scores/7?surrogate=sports");
    let weather = url("/forecast/berlin?surrogate=weather");
    let markets = url("/markets/dax?surrogate=markets");
    let all = [&article1, &article2, &article3, &sports, &weather, &markets];
    for u in all {
        assert_eq!(x_cache(u).await, "MISS", "{u}");
        assert_eq!(x_cache(u).await, "HIT", "{u}");
    }

    let inv = invalidator(&up.url, &env);

    // EventBridge: /articles/1 by URL and everything tagged `sports`.
    // The emulator holds the invocation until the new process asks for it.
    let report = inv
        .invoke_fixture("eventbridge_purge.json")
        .unwrap_or_else(|e| panic!("{backend}: the EventBridge event failed\n{e}"));
    assert_eq!(
        report,
        json!({"urls": {"/articles/1": 1}, "tags": {"sports": 1}, "removed": 2}),
        "{backend}"
    );
    assert_eq!(x_cache(&article1).await, "MISS", "{backend}: purged by URL");
    assert_eq!(x_cache(&sports).await, "MISS", "{backend}: purged by tag");
    for u in [&article2, &article3, &weather, &markets] {
        assert_eq!(x_cache(u).await, "HIT", "{backend}: {u} was not named");
    }

    // SQS: one good record (/articles/2 and tag `weather`) and two bad
    // ones (a string where a list belongs; not JSON). Only the bad ones
    // come back, and the good one is purged regardless.
    let response = inv
        .invoke_fixture("sqs_purge.json")
        .unwrap_or_else(|e| panic!("{backend}: the SQS event failed\n{e}"));
    assert_eq!(
        response,
        json!({"batchItemFailures": [
            {"itemIdentifier": "2e1424d4-f796-459a-8184-9c92662be6da"},
            {"itemIdentifier": "9c0e5a7f-3d44-4a1b-b0f2-6f1de2c3a8b9"},
        ]}),
        "{backend}"
    );
    assert_eq!(x_cache(&article2).await, "MISS", "{backend}: purged by URL");
    assert_eq!(x_cache(&weather).await, "MISS", "{backend}: purged by tag");
    for u in [&article3, &markets] {
        assert_eq!(
            x_cache(u).await,
            "HIT",
            "{backend}: {u} was named only by a malformed record"
        );
    }
    // Entries stored again after the purges are cached as usual.
    assert_eq!(x_cache(&article1).await, "HIT", "{backend}");

    // A bad EventBridge detail fails the invocation with a clear error
    // (Lambda retries it and then hands it to the on-failure destination).
    let err = inv
        .invoke(&[
            "--data-ascii",
            r#"{"detail-type": "Purge", "source": "cachegate", "detail": {"url": ["/articles/3"]}}"#,
        ])
        .expect_err("a detail with an unknown field was accepted");
    assert!(
        err.contains("InvalidPurgeRequest") && err.contains("unknown field `url`"),
        "{backend}: {err}"
    );
    let err = inv
        .invoke(&["--data-ascii", r#"{"hello": "world"}"#])
        .expect_err("an unrecognised event was accepted");
    assert!(err.contains("unrecognised event"), "{backend}: {err}");

    // A direct invocation (`aws lambda invoke --payload`) takes the
    // request itself, and the function is still serving after the errors.
    let report = inv
        .invoke(&["--data-ascii", r#"{"tags": ["markets"]}"#])
        .unwrap_or_else(|e| panic!("{backend}: direct invocation failed\n{e}"));
    assert_eq!(
        report,
        json!({"urls": {}, "tags": {"markets": 1}, "removed": 1}),
        "{backend}"
    );
    assert_eq!(x_cache(&markets).await, "MISS", "{backend}");
    assert_eq!(x_cache(&article3).await, "HIT", "{backend}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_purges_from_eventbridge_and_sqs_events() {
    purge_through_events("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_purges_from_eventbridge_and_sqs_events() {
    purge_through_events("dynamodb").await;
}

/// The role is checked at start-up like every other key.
#[test]
fn a_bad_role_stops_start_up_naming_the_key() {
    let env = vec![("CACHEGATE_ROLE".to_owned(), "purger".to_owned())];
    let out = cachegate_cli(&["config"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr.contains("configuration key `role`") && stderr.contains("purger"),
        "{stderr}"
    );
}

#[test]
fn the_invalidator_refuses_the_memory_backend() {
    let env = vec![
        ("CACHEGATE_ROLE".to_owned(), "invalidator".to_owned()),
        ("CACHEGATE_BACKEND".to_owned(), "memory".to_owned()),
    ];
    let out = cachegate_cli(&["config"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr.contains("configuration key `role`") && stderr.contains("`memory`"),
        "{stderr}"
    );
    // The same configuration with a shared backend is accepted.
    let env = vec![
        ("CACHEGATE_ROLE".to_owned(), "invalidator".to_owned()),
        ("CACHEGATE_BACKEND".to_owned(), "redis".to_owned()),
    ];
    let out = cachegate_cli(&["config"], &env);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("role = \"invalidator\""));
}

#[test]
fn serve_refuses_the_invalidator_role() {
    let env = vec![
        ("CACHEGATE_ROLE".to_owned(), "invalidator".to_owned()),
        ("CACHEGATE_BACKEND".to_owned(), "redis".to_owned()),
    ];
    let out = cachegate_cli(&["serve", "--listen", "127.0.0.1:0"], &env);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`invalidator` runs only as the Lambda"),
        "{}",
        describe(&out)
    );
}
