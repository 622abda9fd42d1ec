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

/// Each error names the key as the file writes it and the environment
/// variable that sets it (a list entry's is its whole list's).
#[test]
fn bad_values_stop_start_up_naming_the_key_and_its_variable() {
    let up = ("CACHEGATE_UPSTREAM__URL", "http://127.0.0.1:9");
    for (env, key, variable) in [
        // Nothing sets the one key without a default.
        (vec![], "upstream.url", "CACHEGATE_UPSTREAM__URL"),
        (
            vec![up, ("CACHEGATE_UPSTREAM__TIMEOUT", "banana")],
            "upstream.timeout",
            "CACHEGATE_UPSTREAM__TIMEOUT",
        ),
        (
            vec![("CACHEGATE_UPSTREAM__URL", "ftp://x")],
            "upstream.url",
            "CACHEGATE_UPSTREAM__URL",
        ),
        (
            vec![("CACHEGATE_UPSTREAM__URL", "not a url")],
            "upstream.url",
            "CACHEGATE_UPSTREAM__URL",
        ),
        (
            vec![up, ("CACHEGATE_BACKEND", "memcached")],
            "backend",
            "CACHEGATE_BACKEND",
        ),
        (
            vec![up, ("CACHEGATE_CACHE__DEFAULT_TTL", "-3")],
            "cache.default_ttl",
            "CACHEGATE_CACHE__DEFAULT_TTL",
        ),
        (
            vec![up, ("CACHEGATE_MEMORY__CAPACITY", "12")],
            "memory.capacity",
            "CACHEGATE_MEMORY__CAPACITY",
        ),
        (
            vec![up, ("CACHEGATE_CACHE__TYPO", "1")],
            "cache.typo",
            "CACHEGATE_CACHE__TYPO",
        ),
        (
            vec![up, ("CACHEGATE_EDGE__CACHE_TAG_HEADER", "Cache Tag")],
            "edge.cache_tag_header",
            "CACHEGATE_EDGE__CACHE_TAG_HEADER",
        ),
        (
            vec![
                up,
                ("CACHEGATE_SERVE__TRUSTED_PROXIES", "[\"10.0.0.0/33\"]"),
            ],
            "serve.trusted_proxies",
            "CACHEGATE_SERVE__TRUSTED_PROXIES",
        ),
        (
            vec![
                up,
                ("CACHEGATE_CACHE__INVALIDATING_METHODS", "[\"BAD METHOD\"]"),
            ],
            "cache.invalidating_methods",
            "CACHEGATE_CACHE__INVALIDATING_METHODS",
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
            "CACHEGATE_ROUTES",
        ),
        (
            vec![up, ("CACHEGATE_ROUTES", "[{path=\"items\"}]")],
            "routes[0].path",
            "CACHEGATE_ROUTES",
        ),
        (
            vec![
                up,
                ("CACHEGATE_ROUTES", "[{path=\"/a/{x}\"},{path=\"/a/{y}\"}]"),
            ],
            "routes[1].path",
            "CACHEGATE_ROUTES",
        ),
        (
            vec![up, ("CACHEGATE_ROUTES", "[{ttl=\"1s\"}]")],
            "routes[0].path",
            "CACHEGATE_ROUTES",
        ),
        (
            vec![up, ("CACHEGATE_UPSTREAM__HEADERS", "{host=\"x\"}")],
            "upstream.headers",
            "CACHEGATE_UPSTREAM__HEADERS",
        ),
        (
            vec![
                up,
                ("CACHEGATE_UPSTREAM__HEADERS", "{x-k=\"secretsmanager:\"}"),
            ],
            "upstream.headers",
            "CACHEGATE_UPSTREAM__HEADERS",
        ),
        (
            vec![
                up,
                ("CACHEGATE_ROUTES", "[{path=\"/a\", key_headers=[\"a b\"]}]"),
            ],
            "routes[0].key_headers",
            "CACHEGATE_ROUTES",
        ),
        (
            vec![
                up,
                ("CACHEGATE_ROUTES", "[{path=\"/a\", key_query=[\"\"]}]"),
            ],
            "routes[0].key_query",
            "CACHEGATE_ROUTES",
        ),
        (
            vec![
                up,
                (
                    "CACHEGATE_ROUTES",
                    "[{path=\"/a\", key_query=[\"q\"], ignored_query_params=[\"q\"]}]",
                ),
            ],
            "routes[0].key_query",
            "CACHEGATE_ROUTES",
        ),
        (
            vec![
                up,
                ("CACHEGATE_CACHE__CREDENTIAL_HEADERS", "[\"x api key\"]"),
            ],
            "cache.credential_headers",
            "CACHEGATE_CACHE__CREDENTIAL_HEADERS",
        ),
        (
            vec![
                up,
                (
                    "CACHEGATE_CACHE__CREDENTIAL_HEADERS",
                    "[\"X-Api-Key\", \"Cookie\"]",
                ),
            ],
            "cache.credential_headers",
            "CACHEGATE_CACHE__CREDENTIAL_HEADERS",
        ),
        (
            vec![up, ("CACHEGATE_UPSTREAM__PATH_EQUIVALENCE", "loose")],
            "upstream.path_equivalence",
            "CACHEGATE_UPSTREAM__PATH_EQUIVALENCE",
        ),
        (
            // One path to an upstream lenient about case (issue 24).
            vec![
                up,
                ("CACHEGATE_ROUTES", "[{path=\"/a/{x}\"},{path=\"/A/{y}\"}]"),
            ],
            "routes[1].path",
            "CACHEGATE_ROUTES",
        ),
    ] {
        let (code, _, stderr) = run(&env, &["serve", "--listen", "127.0.0.1:0"]);
        assert_eq!(code, 2, "{env:?}: {stderr}");
        let named = format!("configuration key `{key}` ({variable}): ");
        assert!(
            stderr.contains(&named),
            "{env:?}: error does not say {named:?}: {stderr}"
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
            (
                "CACHEGATE_UPSTREAM__HEADERS",
                "{x-api-key=\"hunter3-literal\", x-token=\"env:UPSTREAM_TOKEN\"}",
            ),
        ],
        &["config"],
    );
    assert_eq!(code, 0, "{stderr}");
    for secret in ["hunter2-secret", "hunter3-literal"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}"
        );
    }
    // A literal header is named as left out; a reference is not a secret.
    assert!(stdout.contains("# x-api-key = \"<redacted>\""), "{stdout}");
    assert!(
        stdout.contains("x-token = \"env:UPSTREAM_TOKEN\""),
        "{stdout}"
    );
}

/// Run the binary and wait at most 30 s: a setting that wrongly passes
/// would otherwise leave `serve` running and the test hanging.
fn run_bounded(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachegate"));
    cmd.args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("CACHEGATE_BACKEND")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{env:?}: still running after 30 s (the setting was accepted)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code().unwrap_or(-1), stderr)
}

/// Every backend section is checked when the configuration loads, with
/// whichever backend is chosen (here the memory one, so nothing is
/// contacted): a bad value stops `serve` with exit 2 naming its key.
#[test]
fn bad_backend_settings_stop_start_up_naming_the_key() {
    let up = ("CACHEGATE_UPSTREAM__URL", "http://127.0.0.1:9");
    for (setting, value, key) in [
        ("CACHEGATE_REDIS__KEY_PREFIX", "a{b", "redis.key_prefix"),
        ("CACHEGATE_REDIS__KEY_PREFIX", "a}", "redis.key_prefix"),
        (
            "CACHEGATE_REDIS__CONNECT_TIMEOUT",
            "0s",
            "redis.connect_timeout",
        ),
        (
            "CACHEGATE_REDIS__RESPONSE_TIMEOUT",
            "0s",
            "redis.response_timeout",
        ),
        ("CACHEGATE_REDIS__URL", "http://127.0.0.1:6379", "redis.url"),
        ("CACHEGATE_REDIS__URL", "127.0.0.1:6379", "redis.url"),
        (
            "CACHEGATE_REDIS__URL",
            "redis://a:1,redis://b:1",
            "redis.url",
        ),
        (
            "CACHEGATE_REDIS__MAX_VALUE_BYTES",
            "0",
            "redis.max_value_bytes",
        ),
        ("CACHEGATE_REDIS__CA_FILE", "/tmp/ca.pem", "redis.ca_file"),
        ("CACHEGATE_DYNAMODB__TABLE", "ab", "dynamodb.table"),
        ("CACHEGATE_DYNAMODB__TABLE", "no/slash", "dynamodb.table"),
        (
            "CACHEGATE_DYNAMODB__OPERATION_TIMEOUT",
            "0s",
            "dynamodb.operation_timeout",
        ),
        (
            "CACHEGATE_DYNAMODB__COMPRESSION_LEVEL",
            "23",
            "dynamodb.compression_level",
        ),
        (
            "CACHEGATE_DYNAMODB__MAX_VALUE_BYTES",
            "0",
            "dynamodb.max_value_bytes",
        ),
        ("CACHEGATE_STORE__READ_TIMEOUT", "0s", "store.read_timeout"),
        (
            "CACHEGATE_STORE__WRITE_TIMEOUT",
            "0s",
            "store.write_timeout",
        ),
        (
            "CACHEGATE_STORE__FAILURE_THRESHOLD",
            "0",
            "store.failure_threshold",
        ),
        ("CACHEGATE_STORE__OPEN_FOR", "0s", "store.open_for"),
        ("CACHEGATE_CACHE__COMPRESSION", "zstd", "cache.compression"),
        (
            "CACHEGATE_UPSTREAM__CONNECT_TIMEOUT",
            "0s",
            "upstream.connect_timeout",
        ),
        (
            "CACHEGATE_UPSTREAM__FAILURE_RATE",
            "0",
            "upstream.failure_rate",
        ),
        (
            "CACHEGATE_UPSTREAM__FAILURE_RATE",
            "101",
            "upstream.failure_rate",
        ),
        (
            "CACHEGATE_UPSTREAM__FAILURE_WINDOW",
            "0s",
            "upstream.failure_window",
        ),
        ("CACHEGATE_UPSTREAM__OPEN_FOR", "0s", "upstream.open_for"),
    ] {
        for backend in ["memory", "redis", "dynamodb"] {
            let env = [up, ("CACHEGATE_BACKEND", backend), (setting, value)];
            let (code, stderr) = run_bounded(&env, &["serve", "--listen", "127.0.0.1:0"]);
            assert_eq!(code, 2, "{env:?}: {stderr}");
            assert!(
                stderr.contains(&format!("configuration key `{key}`")),
                "{env:?}: error does not name `{key}`: {stderr}"
            );
        }
    }
}

/// `cachegate ARGS` with backend = dynamodb and no AWS region anywhere the
/// SDK looks: no variable, no profile files, and instance metadata asked
/// on loopback port 9, where nothing listens (so the lookup fails as it does
/// off EC2, without leaving loopback). `RUST_LOG` unset, as a new user has
/// it. Returns the exit status and stderr.
fn without_a_region(args: &[&str]) -> (Option<i32>, String) {
    let home = std::env::temp_dir().join(format!(
        "cachegate-no-region-{}-{}",
        std::process::id(),
        args[0]
    ));
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cachegate"));
    cmd.args(args)
        .current_dir(&home)
        .env("HOME", &home)
        .env("CACHEGATE_UPSTREAM__URL", "http://127.0.0.1:9")
        .env("CACHEGATE_BACKEND", "dynamodb")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9");
    for var in [
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_EC2_METADATA_DISABLED",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&home);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// backend = dynamodb and no AWS region: start-up stops, exit 2, saying
/// what to set.
#[test]
fn dynamodb_without_a_region_stops_start_up() {
    let (code, stderr) = without_a_region(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("AWS_REGION"), "{stderr}");
}

/// `cachegate init` without a region fails as `serve` does: exit 2 (a
/// setup that cannot work, not a failure to retry) and the same message,
/// without the SDK's warnings about instance metadata before it.
#[test]
fn init_without_a_region_says_what_serve_says() {
    let (serve_code, serve) = without_a_region(&["serve", "--listen", "127.0.0.1:0"]);
    let (code, init) = without_a_region(&["init"]);
    assert_eq!(
        (code, serve_code),
        (Some(2), Some(2)),
        "init: {init}\nserve: {serve}"
    );
    assert_eq!(init, serve, "init and serve say different things");
    assert_eq!(
        init,
        "cachegate: dynamodb: no AWS region configured (set AWS_REGION or a profile region)\n"
    );
}

/// `cachegate config` prints TOML that `--config` reads back to the same
/// configuration: printed again from that file alone, the text is the same.
/// Secrets are not printed; each set one is a comment naming its variable.
#[test]
fn config_prints_toml_that_reads_back() {
    let settings = [
        ("CACHEGATE_UPSTREAM__URL", "https://api.example.com/v1"),
        ("CACHEGATE_UPSTREAM__TIMEOUT", "2500ms"),
        ("CACHEGATE_BACKEND", "redis"),
        (
            "CACHEGATE_REDIS__URL",
            "rediss://app:in-url-secret@cache.example:6380",
        ),
        ("CACHEGATE_REDIS__PASSWORD", "field-secret"),
        ("CACHEGATE_REDIS__CLUSTER", "true"),
        ("CACHEGATE_DYNAMODB__TABLE", "my.table"),
        ("CACHEGATE_DYNAMODB__COMPRESSION_LEVEL", "-3"),
        ("CACHEGATE_MEMORY__CAPACITY", "1500000"),
        ("CACHEGATE_CACHE__DEFAULT_TTL", "90s"),
        ("CACHEGATE_CACHE__KEY_HEADERS", "[\"accept-language\"]"),
        ("CACHEGATE_SERVE__PURGE_TOKEN", "a-long-enough-purge-token"),
        ("CACHEGATE_METRICS__EMF", "true"),
        (
            "CACHEGATE_ROUTES",
            "[{path=\"/items/{id}\", ttl=\"5m\", tags=[\"items\"]}, {path=\"/live\", cache=false}]",
        ),
    ];
    let (code, printed, stderr) = run(&settings, &["config"]);
    assert_eq!(code, 0, "{stderr}");
    for secret in ["in-url-secret", "field-secret", "a-long-enough-purge-token"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    for note in ["# password = ", "# url = ", "# purge_token = "] {
        assert!(printed.contains(note), "no `{note}` note:\n{printed}");
    }
    assert!(printed.contains("capacity = \"1500000B\""), "{printed}");

    let file = std::env::temp_dir().join(format!("cachegate-config-{}.toml", std::process::id()));
    std::fs::write(&file, &printed).unwrap();
    let file_arg = file.to_str().unwrap();
    // The file alone: everything but the secrets.
    let (code, again, stderr) = run(&[], &["--config", file_arg, "config"]);
    assert_eq!(code, 0, "{stderr}\n{printed}");
    let without_secret_notes = |text: &str| -> String {
        text.lines()
            .filter(|l| {
                !l.starts_with("# password")
                    && !l.starts_with("# url")
                    && !l.starts_with("# purge_token")
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let expected = without_secret_notes(&printed)
        .replace("[redis]\n", "[redis]\nurl = \"redis://127.0.0.1:6379\"\n");
    let again_sorted = {
        let mut l: Vec<&str> = again.lines().collect();
        l.sort();
        l
    };
    let expected_sorted = {
        let mut l: Vec<&str> = expected.lines().collect();
        l.sort();
        l
    };
    assert_eq!(
        again_sorted, expected_sorted,
        "read back:\n{again}\nprinted:\n{printed}"
    );
    // The file and the secrets again: exactly the first print.
    let secrets: Vec<_> = settings
        .iter()
        .copied()
        .filter(|(k, _)| {
            k.contains("PASSWORD") || k.contains("PURGE_TOKEN") || *k == "CACHEGATE_REDIS__URL"
        })
        .collect();
    let (code, again, stderr) = run(&secrets, &["--config", file_arg, "config"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again, printed);
    let _ = std::fs::remove_file(&file);
}

/// A reader that goes away (`cachegate config | head -1`) ends the command
/// quietly: no panic, exit 0.
#[test]
fn config_into_a_closed_pipe_exits_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cachegate"))
        .arg("config")
        .current_dir(std::env::temp_dir())
        .env("CACHEGATE_UPSTREAM__URL", "https://api.example.com")
        .env_remove("CACHEGATE_BACKEND")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the only read end before the process has loaded its
    // configuration: its first write meets a closed pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // The same through a shell pipeline, as users type it.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' config | head -1",
            env!("CARGO_BIN_EXE_cachegate")
        ))
        .current_dir(std::env::temp_dir())
        .env("CACHEGATE_UPSTREAM__URL", "https://api.example.com")
        .env_remove("CACHEGATE_BACKEND")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("# cachegate"));
}
