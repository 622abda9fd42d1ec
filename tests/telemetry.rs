//! What a running `cachegate serve` tells about its requests: the JSON
//! access log on stderr, Prometheus text on the opt-in metrics listener,
//! and CloudWatch EMF lines on stdout when asked for (the Lambda default;
//! tests/lambda_emulator.rs checks it under the Lambda runtime).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Running {
    child: Child,
    url: String,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(upstream: &str, env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachegate"));
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("CACHEGATE_UPSTREAM__URL", upstream)
        .env("CACHEGATE_BACKEND", "memory")
        .env("RUST_LOG", "info")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = common::lines_of(child.stdout.take().unwrap());
    let stderr = common::lines_of(child.stderr.take().unwrap());
    let first = stdout.recv_timeout(Duration::from_secs(20)).unwrap();
    let url = first
        .strip_prefix("cachegate listening on ")
        .unwrap_or_else(|| panic!("cachegate did not start: {first:?}"))
        .to_owned();
    Running {
        child,
        url,
        stdout,
        stderr,
    }
}

/// Lines received so far and within `wait` more, parsed as JSON.
fn json_lines(rx: &mpsc::Receiver<String>, wait: Duration) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Ok(line) = rx.recv_timeout(wait) {
        if let Ok(v) = serde_json::from_str(&line) {
            out.push(v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_and_prometheus_metrics() {
    let up = common::upstream().await;
    let metrics_port = common::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let cg = start(
        &up.url,
        &[
            ("CACHEGATE_METRICS__PROMETHEUS_LISTEN", &metrics_addr),
            (
                "CACHEGATE_ROUTES",
                // The cookie is there to be kept out of the log; the route
                // says it does not change answers, so the request is cached.
                r#"[{path = "/items/{id}", ttl = "60s", ignore_cookies = true}]"#,
            ),
        ],
    );
    let secret = "Bearer sekrit-token-value";
    let url = format!("{}/items/7?api_key=hush&cc=max-age%3D60", cg.url);
    for want in ["MISS", "HIT"] {
        let r = common::send(
            common::client()
                .get(&url)
                .header("x-request-id", "abc-123")
                .header("cookie", "session=cookie-value"),
        )
        .await;
        assert_eq!(r.x_cache(), want);
    }
    // Authorization bypasses the cache; it must not show up anywhere either.
    common::send(common::client().get(&url).header("authorization", secret)).await;

    let log = json_lines(&cg.stderr, Duration::from_millis(500));
    let access: Vec<_> = log
        .iter()
        .filter(|l| l["target"] == "cachegate::access")
        .collect();
    assert_eq!(access.len(), 3, "one access line per request: {log:#?}");
    let hit = &access[1]["fields"];
    assert_eq!(hit["cache"], "HIT");
    assert_eq!(hit["status"], 200);
    assert_eq!(hit["method"], "GET");
    assert_eq!(hit["path"], "/items/7");
    assert_eq!(hit["route"], "/items/{id}");
    assert_eq!(hit["backend"], "memory");
    assert_eq!(hit["request_id"], "abc-123");
    assert_eq!(hit["key"].as_str().unwrap().len(), 64, "the key hash");
    assert!(hit["cache_ms"].as_f64().is_some());
    assert!(access[0]["fields"]["upstream_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(access[2]["fields"]["cache"], "BYPASS");
    let all = log
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for leak in ["sekrit", "cookie-value", "hush"] {
        assert!(!all.contains(leak), "`{leak}` reached the log:\n{all}");
    }

    let text = common::client()
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        r#"cachegate_requests_total{backend="memory",route="/items/{id}",cache="HIT"} 1"#,
        r#"cachegate_requests_total{backend="memory",route="/items/{id}",cache="MISS"} 1"#,
        r#"cachegate_requests_total{backend="memory",route="/items/{id}",cache="BYPASS"} 1"#,
        r#"cachegate_upstream_seconds_count{backend="memory",route="/items/{id}"} 2"#,
        r#"cachegate_corrupt_entries_total{backend="memory"} 0"#,
    ] {
        assert!(text.contains(want), "missing {want} in:\n{text}");
    }
    // The metrics live on their own port only.
    let proxied = common::get(&format!("{}/metrics", cg.url)).await;
    assert!(!proxied.body.starts_with(b"# HELP"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emf_lines_on_stdout_when_enabled() {
    let up = common::upstream().await;
    let cg = start(
        &up.url,
        &[
            ("CACHEGATE_METRICS__EMF", "true"),
            ("CACHEGATE_METRICS__NAMESPACE", "cachegate-test"),
        ],
    );
    let url = format!("{}/emf?cc=max-age%3D60", cg.url);
    common::get(&url).await;
    common::get(&url).await;
    let docs = json_lines(&cg.stdout, Duration::from_millis(500));
    assert_eq!(docs.len(), 2, "{docs:#?}");
    assert_eq!(
        docs[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"],
        "cachegate-test"
    );
    assert_eq!(
        (docs[0]["Miss"].clone(), docs[0]["Hit"].clone()),
        (1.into(), 0.into())
    );
    assert_eq!(
        (docs[1]["Miss"].clone(), docs[1]["Hit"].clone()),
        (0.into(), 1.into())
    );
    assert_eq!(docs[1]["route"], "*");
    assert!(docs[0]["UpstreamLatency"].as_f64().is_some());
    assert!(docs[1].get("UpstreamLatency").is_none());
}

#[test]
fn a_bad_metrics_namespace_stops_start_up_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(["config"])
        .env("CACHEGATE_UPSTREAM__URL", "http://127.0.0.1:9")
        .env("CACHEGATE_METRICS__NAMESPACE", "AWS/Lambda")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics.namespace"), "{err}");
}

/// `RUST_LOG` takes a level and `target=level` directives; a value that
/// does not parse is warned about and `info` used, so what is logged never
/// changes silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_directives_and_a_value_that_does_not_parse() {
    let up = common::upstream().await;
    // The (target, level) of each line logged by a proxy started with
    // `rust_log` that answered one request; and the lines themselves.
    let logged = |rust_log: &'static str| {
        let cg = start(&up.url, &[("RUST_LOG", rust_log)]);
        let url = format!("{}/log?cc=max-age%3D60", cg.url);
        async move {
            common::get(&url).await;
            let log = json_lines(&cg.stderr, Duration::from_millis(500));
            let seen: Vec<(String, String)> = log
                .iter()
                .map(|l| (l["target"].to_string(), l["level"].to_string()))
                .collect();
            (seen, log)
        }
    };
    let has = |seen: &[(String, String)], target: &str, level: &str| {
        seen.contains(&(format!("{target:?}"), format!("{level:?}")))
    };

    // The access log alone: the start-up line (info, cachegate::serve) is not.
    let (seen, log) = logged("warn,cachegate::access=info").await;
    assert!(has(&seen, "cachegate::access", "INFO"), "{log:#?}");
    assert!(!has(&seen, "cachegate::serve", "INFO"), "{log:#?}");

    // Everything at info but the access log.
    let (seen, log) = logged("info,cachegate::access=off").await;
    assert!(has(&seen, "cachegate::serve", "INFO"), "{log:#?}");
    assert!(
        !seen.iter().any(|(t, _)| t == "\"cachegate::access\""),
        "{log:#?}"
    );

    // Not a level: a warning naming the value, then info as the default.
    // A word alone that is not a level (`verbose`) is one too, though
    // `Targets` would read it as a target and silence everything else.
    for bad in ["cachegate=loud", "verbose", "warn,chatty"] {
        let (seen, log) = logged(bad).await;
        let warned = log
            .iter()
            .any(|l| l["level"] == "WARN" && l["fields"]["rust_log"] == bad);
        assert!(warned, "RUST_LOG={bad}: {log:#?}");
        assert!(
            has(&seen, "cachegate::access", "INFO"),
            "RUST_LOG={bad}: {log:#?}"
        );
    }
}
