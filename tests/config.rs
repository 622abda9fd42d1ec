//! Start-up configuration errors name the key and stop the process.

use std::process::Command;

fn run(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachegate"));
    cmd.args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("CACHEGATE_BACKEND");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_values_stop_start_up_naming_the_key() {
    let up = ("CACHEGATE_UPSTREAM__URL", "http://127.0.0.1:9");
    for (env, key) in [
        (vec![], "upstream"),
        (
            vec![up, ("CACHEGATE_UPSTREAM__TIMEOUT", "banana")],
            "upstream.timeout",
        ),
        (vec![("CACHEGATE_UPSTREAM__URL", "ftp://x")], "upstream.url"),
        (
            vec![("CACHEGATE_UPSTREAM__URL", "not a url")],
            "upstream.url",
        ),
        (vec![up, ("CACHEGATE_BACKEND", "memcached")], "backend"),
        (
            vec![up, ("CACHEGATE_CACHE__DEFAULT_TTL", "-3")],
            "cache.default_ttl",
        ),
        (
            vec![up, ("CACHEGATE_MEMORY__CAPACITY", "12")],
            "memory.capacity",
        ),
        (vec![up, ("CACHEGATE_CACHE__TYPO", "1")], "typo"),
        (
            vec![up, ("CACHEGATE_EDGE__CACHE_TAG_HEADER", "Cache Tag")],
            "edge.cache_tag_header",
        ),
        (
            vec![
                up,
                (
                    "CACHEGATE_ROUTES",
                    "[{path=\"/a/{id}\", invalidate_tags=[\"a-{ids}\"]}]",
                ),
            ],
            "routes[0].invalidate_tags",
        ),
        (
            vec![up, ("CACHEGATE_ROUTES", "[{path=\"items\"}]")],
            "routes[0].path",
        ),
        (
            vec![
                up,
                ("CACHEGATE_ROUTES", "[{path=\"/a/{x}\"},{path=\"/a/{y}\"}]"),
            ],
            "routes[1].path",
        ),
    ] {
        let (code, _, stderr) = run(&env, &["serve", "--listen", "127.0.0.1:0"]);
        assert_eq!(code, 2, "{env:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{env:?}: error does not name `{key}`: {stderr}"
        );
    }
}

#[test]
fn the_shipped_config_file_is_valid_and_documents_the_defaults() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/cachegate.toml");
    let (code, stdout, stderr) = run(
        &[("CACHEGATE_UPSTREAM__URL", "https://api.example.com")],
        &["--config", file, "config"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("api.example.com"));
    // Every value in the file is the built-in default: the effective
    // configuration is the same with and without it.
    let (code, defaults, stderr) = run(
        &[("CACHEGATE_UPSTREAM__URL", "https://api.example.com")],
        &["--config", "/dev/null", "config"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout, defaults,
        "config/cachegate.toml differs from the defaults"
    );
    let (code, _, stderr) = run(
        &[("CACHEGATE_UPSTREAM__URL", "https://api.example.com")],
        &["--config", "/nonexistent.toml", "config"],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent.toml"), "{stderr}");
}

#[test]
fn secrets_never_print() {
    let (code, stdout, stderr) = run(
        &[
            ("CACHEGATE_UPSTREAM__URL", "https://api.example.com"),
            ("CACHEGATE_REDIS__PASSWORD", "hunter2-secret"),
        ],
        &["config"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains("hunter2-secret") && !stderr.contains("hunter2-secret"),
        "{stdout}"
    );
}
