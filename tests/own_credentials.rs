//! cachegate's own upstream credentials (`upstream.headers`): values from
//! AWS Secrets Manager and SSM Parameter Store (moto's server, started by
//! scripts/test: CACHEGATE_TEST_MOTO_ENDPOINT; the SDK reaches it through
//! AWS_ENDPOINT_URL_SECRETS_MANAGER / _SSM with static credentials) and
//! the environment, set on every upstream call to a real loopback
//! upstream that checks them; a client's copy is dropped, answers are
//! shared across clients, and a rotated secret is picked up on the 401
//! that the old one gets. Missing services fail these tests; they never
//! skip.

mod common;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use http::{HeaderMap, StatusCode};

use common::{cachegate, client, get, need, send, serve_on_loopback};

/// One request as the upstream saw it: its path and its `x-api-key`,
/// `x-token` and `x-env` headers.
type Seen = (String, Option<String>, Option<String>, Option<String>);

/// An upstream that answers only requests carrying the current key.
#[derive(Default)]
struct Api {
    key: Mutex<String>,
    seen: Mutex<Vec<Seen>>,
}

async fn answer(
    State(api): State<Arc<Api>>,
    uri: http::Uri,
    headers: HeaderMap,
) -> (StatusCode, HeaderMap, String) {
    let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    let key = h("x-api-key");
    api.seen
        .lock()
        .unwrap()
        .push((uri.path().to_owned(), key.clone(), h("x-token"), h("x-env")));
    let mut out = HeaderMap::new();
    if key.as_deref() != Some(api.key.lock().unwrap().as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            out,
            "{\"error\":\"bad key\"}".into(),
        );
    }
    out.insert("cache-control", "public, max-age=60".parse().unwrap());
    (
        StatusCode::OK,
        out,
        format!("{{\"path\":\"{}\"}}", uri.path()),
    )
}

/// One AWS JSON-protocol call to moto (`target` is the `X-Amz-Target`).
async fn aws(moto: &str, target: &str, body: serde_json::Value) -> serde_json::Value {
    cachegate::tls::install_crypto_provider();
    let resp = reqwest::Client::new()
        .post(moto)
        .header("x-amz-target", target)
        .header("content-type", "application/x-amz-json-1.1")
        // moto reads the service from the credential scope.
        .header(
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=test/20260101/eu-west-1/{}/aws4_request, SignedHeaders=host, Signature=0",
                if target.starts_with("secretsmanager") { "secretsmanager" } else { "ssm" }
            ),
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{target}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn own_credentials_from_secrets_manager_ssm_and_env() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let id = std::process::id();
    let created = aws(
        &moto,
        "secretsmanager.CreateSecret",
        serde_json::json!({"Name": format!("cg-api-{id}"), "SecretString": "{\"key\":\"key-one\"}"}),
    )
    .await;
    let arn = created["ARN"].as_str().unwrap().to_owned();
    aws(
        &moto,
        "AmazonSSM.PutParameter",
        serde_json::json!({"Name": format!("/cg/{id}/token"), "Value": "token-one", "Type": "SecureString"}),
    )
    .await;

    let api = Arc::new(Api::default());
    *api.key.lock().unwrap() = "key-one".into();
    let app = axum::Router::new().fallback(answer).with_state(api.clone());
    let (up, _task) = serve_on_loopback(app).await;
    let headers = format!(
        "{{x-api-key=\"secretsmanager:{arn}#key\", x-token=\"ssm:/cg/{id}/token\", x-env=\"env:CG_OWN_ENV_VALUE\"}}"
    );
    let cg = cachegate(
        &up,
        &[
            ("CACHEGATE_UPSTREAM__HEADERS", &headers),
            ("CG_OWN_ENV_VALUE", "env-one"),
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER", &moto),
            ("AWS_ENDPOINT_URL_SSM", &moto),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ],
    );

    // Every source reaches the upstream; the answer is shared: a client
    // sending its own X-Api-Key gets the same entry (its copy is dropped,
    // so the request is neither personal nor forwarded with it).
    let first = get(&format!("{}/data", cg.url)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.x_cache(), "MISS");
    let other = send(
        client()
            .get(format!("{}/data", cg.url))
            .header("x-api-key", "a-clients-own-key"),
    )
    .await;
    assert_eq!(other.x_cache(), "HIT", "{}", other.header("cache-status"));
    let passed = send(
        client()
            .post(format!("{}/write", cg.url))
            .header("x-api-key", "a-clients-own-key")
            .body("x"),
    )
    .await;
    assert_eq!(passed.status, 200);
    {
        let seen = api.seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        for (path, key, token, env) in seen.iter() {
            assert_eq!(key.as_deref(), Some("key-one"), "{path}");
            assert_eq!(token.as_deref(), Some("token-one"), "{path}");
            assert_eq!(env.as_deref(), Some("env-one"), "{path}");
        }
    }

    // The secret rotates and the upstream takes only the new key: the
    // first call with the old one gets 401, cachegate reads the secret
    // again and sends the request once more; the client sees 200.
    aws(
        &moto,
        "secretsmanager.PutSecretValue",
        serde_json::json!({"SecretId": arn, "SecretString": "{\"key\":\"key-two\"}"}),
    )
    .await;
    *api.key.lock().unwrap() = "key-two".into();
    let rotated = get(&format!("{}/fresh", cg.url)).await;
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    let fresh: Vec<Option<String>> = api
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.0 == "/fresh")
        .map(|s| s.1.clone())
        .collect();
    assert_eq!(
        fresh,
        vec![Some("key-one".to_owned()), Some("key-two".to_owned())]
    );
    assert_eq!(get(&format!("{}/after", cg.url)).await.status, 200);
    assert_eq!(
        api.seen.lock().unwrap().last().unwrap().1.as_deref(),
        Some("key-two")
    );
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_stops_start_up_without_its_value() {
    let moto = need("CACHEGATE_TEST_MOTO_ENDPOINT");
    let out = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cachegate"))
            .args(["--config", "/dev/null", "serve", "--listen", "127.0.0.1:0"])
            .env("CACHEGATE_UPSTREAM__URL", "http://127.0.0.1:9")
            .env(
                "CACHEGATE_UPSTREAM__HEADERS",
                "{x-api-key=\"secretsmanager:cg-no-such-secret#key\", x-lit=\"literal-value-1234\"}",
            )
            .env("AWS_ENDPOINT_URL_SECRETS_MANAGER", &moto)
            .env("AWS_REGION", "eu-west-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..300 {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        child.kill().unwrap();
        panic!("cachegate started with a secret it cannot read");
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upstream.headers.x-api-key"), "{stderr}");
    assert!(stderr.contains("cg-no-such-secret"), "{stderr}");
    assert!(!stderr.contains("literal-value-1234"), "{stderr}");
}
