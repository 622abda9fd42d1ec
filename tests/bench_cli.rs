//! `cachegate bench` as users run it: the built binary, which runs the
//! `cachegate-bench` binary next to it (tools/bench, built here first),
//! against a real upstream and a real `cachegate serve`, and `--compare`
//! through the real serve path per backend. The JSON report is checked
//! for what the upstream and the proxy actually did, never for speed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{cachegate, upstream};
use serde_json::Value;

/// `cachegate-bench` built next to the `cachegate` under test (the same
/// target directory and profile), once per test run: `cargo test` builds
/// only this package's binaries.
///
/// Built as `cargo test --workspace` (scripts/test) builds: every binary
/// and test target of the workspace, so dependencies get the features that
/// run unified (dev-dependencies' included) and nothing already built is
/// compiled again. `cargo build -p cachegate-bench` alone would rebuild some
/// 40 crates (the AWS SDKs among them) with other features: 0.4 GB more
/// disk and minutes of compiling in the middle of the test run.
fn bench_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cachegate = Path::new(env!("CARGO_BIN_EXE_cachegate"));
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .args([
                "build",
                "--workspace",
                "--bins",
                "--tests",
                "--manifest-path",
            ])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if cachegate.parent().and_then(Path::file_name) == Some("release".as_ref()) {
            cargo.arg("--release");
        }
        let out = cargo.output().expect("run cargo");
        assert!(
            out.status.success(),
            "cargo build --workspace --bins --tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let built = cachegate.with_file_name("cachegate-bench");
        assert!(built.is_file(), "{} was not built", built.display());
        built
    })
}

/// Run `cachegate bench ARGS --json` (blocking, from an empty directory so
/// no config file is picked up) and parse the JSON line it prints last.
fn bench(args: &[&str], env: &[(String, String)]) -> (Output, Value) {
    bench_binary();
    let out = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .env_remove("CACHEGATE_UPSTREAM__URL")
        .env_remove("CACHEGATE_BACKEND")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run cachegate bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON last ({e}); status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

async fn bench_async(args: Vec<String>, env: Vec<(String, String)>) -> (Output, Value) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bench(&args, &env)
    })
    .await
    .unwrap()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Every response is counted once, in its X-Cache group and in its status class.
fn check_counts_add_up(report: &Value) {
    let responses = n(&report["responses"]);
    let by_group: u64 = report["by_x_cache"]
        .as_object()
        .unwrap()
        .values()
        .map(|l| n(&l["count"]))
        .sum();
    assert_eq!(by_group, responses, "X-Cache groups: {report}");
    assert_eq!(n(&report["all"]["count"]), responses);
    let by_status: u64 = report["status"].as_object().unwrap().values().map(n).sum();
    assert_eq!(by_status, responses, "status classes: {report}");
    let transport: u64 = ["connect", "timeout", "other"]
        .iter()
        .map(|k| report["errors"][k].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(n(&report["requests"]), responses + transport);
    let hits = report["by_x_cache"]["HIT"]["count"].as_u64().unwrap_or(0);
    assert_eq!(n(&report["hits"]), hits);
    if responses > 0 {
        let ratio = report["hit_ratio"].as_f64().unwrap();
        assert!((ratio - hits as f64 / responses as f64).abs() < 1e-9);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_url_reports_what_the_proxy_and_upstream_did() {
    let up = upstream().await;
    let cg = cachegate(&up.url, &[]);
    let url = format!("{}/items/{{key}}?cc=public,max-age=3600", cg.url);

    // Cold: one request per key, one at a time: every one a miss.
    let (out, cold) = bench_async(
        [&url, "--keys", "5", "--requests", "5", "--concurrency", "1"]
            .map(String::from)
            .to_vec(),
        vec![],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    check_counts_add_up(&cold);
    assert_eq!(n(&cold["requests"]), 5);
    assert_eq!(n(&cold["by_x_cache"]["MISS"]["count"]), 5);
    assert_eq!(cold["hit_ratio"].as_f64(), Some(0.0));
    let upstream_calls = |up: &common::TestUpstream| {
        (0..5)
            .map(|k| up.state.hits(&format!("/items/{k}")))
            .sum::<usize>()
    };
    assert_eq!(upstream_calls(&up), 5);

    // Warm, concurrent, with a header: all hits, the upstream not asked again.
    let (out, warm) = bench_async(
        [
            &url,
            "--keys",
            "5",
            "--requests",
            "200",
            "--concurrency",
            "4",
            "-H",
            "X-Bench-Run: warm",
        ]
        .map(String::from)
        .to_vec(),
        vec![],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    check_counts_add_up(&warm);
    assert_eq!(n(&warm["requests"]), 200);
    assert_eq!(n(&warm["responses"]), 200);
    assert_eq!(n(&warm["status"]["2xx"]), 200);
    assert_eq!(warm["errors"].as_object().unwrap().len(), 0, "{warm}");
    assert_eq!(n(&warm["hits"]), 200 - (upstream_calls(&up) as u64 - 5));
    assert_eq!(warm["hit_ratio"].as_f64(), Some(1.0));
    assert_eq!(n(&warm["body_bytes"]) % 200, 0, "same body for every hit");
    assert!(n(&warm["body_bytes"]) >= 200 * 800);
    // The table went to stderr, the JSON alone to stdout.
    assert!(String::from_utf8_lossy(&out.stderr).contains("hit ratio 100.0%"));

    // A header given with -H reaches the upstream on a miss.
    let (_, _) = bench_async(
        [
            &format!("{}/headers?cc=no-store", cg.url),
            "--requests",
            "1",
            "-H",
            "Accept-Language: fr",
        ]
        .map(String::from)
        .to_vec(),
        vec![],
    )
    .await;
    assert_eq!(up.state.last("/headers").headers["accept-language"], "fr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_errors_by_kind() {
    let up = upstream().await;
    // Six 503s in a row would open the upstream breaker at five: this test
    // is about what bench counts, so every request must reach the upstream.
    let cg = cachegate(&up.url, &[("CACHEGATE_UPSTREAM__MIN_CALLS", "0")]);

    let (out, report) = bench_async(
        [
            &format!("{}/broken?status=503", cg.url),
            "--requests",
            "6",
            "--concurrency",
            "2",
        ]
        .map(String::from)
        .to_vec(),
        vec![],
    )
    .await;
    assert!(
        out.status.success(),
        "responses, even 5xx, are a run: {out:?}"
    );
    check_counts_add_up(&report);
    assert_eq!(n(&report["errors"]["status_5xx"]), 6);
    assert_eq!(n(&report["status"]["5xx"]), 6);
    assert_eq!(up.state.hits("/broken"), 6, "a 503 is not cached");

    // Nothing listens on a free port: connect errors, and a failed run
    // since nothing answered.
    let closed = format!("127.0.0.1:{}", cachegate_test_net::free_port());
    let (out, report) = bench_async(
        [&format!("http://{closed}/x"), "--requests", "3"]
            .map(String::from)
            .to_vec(),
        vec![],
    )
    .await;
    assert!(!out.status.success());
    check_counts_add_up(&report);
    assert_eq!(n(&report["requests"]), 3);
    assert_eq!(n(&report["responses"]), 0);
    assert_eq!(n(&report["errors"]["connect"]), 3, "{report}");
}

/// `--compare` for `backends` with a tiny workload; returns the runs.
fn compare(backends: &str, env: &[(String, String)]) -> Vec<Value> {
    let dir = tempdir();
    let chart = dir.join("compare.svg");
    let (out, json) = bench(
        &[
            "--compare",
            backends,
            "--keys",
            "8",
            "--requests",
            "120",
            "--concurrency",
            "3",
            "--upstream-latency",
            "20ms",
            "--chart",
            chart.to_str().unwrap(),
        ],
        env,
    );
    assert!(
        out.status.success(),
        "{out:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["keys"], 8);
    assert_eq!(json["body_bytes"], 1024);
    let svg = std::fs::read_to_string(&chart).expect("chart written");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    let runs = json["backends"].as_array().unwrap().clone();
    let names: Vec<&str> = runs
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(names.join(","), backends);
    for run in &runs {
        let name = run["backend"].as_str().unwrap();
        assert!(svg.contains(name), "chart has no line for {name}");
        // Warming asked the upstream once per key, and every warm request
        // waited for it (the synthetic upstream sleeps 20 ms).
        assert_eq!(n(&run["upstream_calls_warm"]), 8, "{name}: {run}");
        assert_eq!(n(&run["warm"]["by_x_cache"]["MISS"]["count"]), 8, "{name}");
        assert!(run["warm"]["all"]["p50_ms"].as_f64().unwrap() >= 20.0);
        check_counts_add_up(&run["warm"]);
        // Measuring: every request a hit, the upstream never asked.
        let report = &run["report"];
        check_counts_add_up(report);
        assert_eq!(n(&report["requests"]), 120, "{name}");
        assert_eq!(n(&report["hits"]), 120, "{name}: {report}");
        assert_eq!(n(&run["upstream_calls_measure"]), 0, "{name}");
        assert!(n(&report["body_bytes"]) == 120 * 1024, "{name}");
    }
    runs
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cachegate-bench-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn compare_memory() {
    compare("memory", &[]);
}

#[test]
fn compare_redis_and_dynamodb() {
    // Both backends' settings at once; --compare picks the backend itself.
    // The shared harness keeps store bounds loose: this counts, it does not time.
    let env: Vec<(String, String)> = common::backend_env("redis", "bench")
        .into_iter()
        .chain(common::backend_env("dynamodb", "bench"))
        .filter(|(k, _)| k != "CACHEGATE_BACKEND")
        .collect();
    compare("redis,dynamodb", &env);
}

/// `cachegate bench --help` is cachegate-bench's help, under the name
/// users typed.
#[test]
fn bench_help_is_the_bench_binarys() {
    bench_binary();
    let out = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .args(["bench", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(help.contains("Usage: cachegate bench"), "{help}");
    assert!(help.contains("--compare"), "{help}");
}

/// Without cachegate-bench next to it or on PATH, `cachegate bench` says
/// how to build it and exits 2.
#[test]
fn bench_without_the_bench_binary_says_how_to_build_it() {
    let dir = tempdir().join("lone");
    std::fs::create_dir_all(&dir).unwrap();
    let lone = dir.join("cachegate");
    std::fs::copy(env!("CARGO_BIN_EXE_cachegate"), &lone).unwrap();
    let out = Command::new(&lone)
        .args(["bench", "http://127.0.0.1:9/"])
        .env("PATH", &dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cargo build --release -p cachegate-bench"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
