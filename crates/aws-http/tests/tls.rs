//! The connector over TLS, as it talks to AWS endpoints: rustls with ring
//! (the provider this crate installs) and the system's root certificates,
//! which `SSL_CERT_FILE` points at a generated CA here. One test in this
//! binary, because the variable is process-wide.

use std::time::Duration;

use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use cachegate_aws_http::ReqwestHttpClient;
use cachegate_test_tls::TestCa;
use http_body_util::BodyExt;

const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

fn get(port: u16) -> HttpRequest {
    let req = http::Request::builder()
        .method("GET")
        .uri(format!("https://localhost:{port}/"))
        .body(SdkBody::empty())
        .unwrap();
    HttpRequest::try_from(req).unwrap()
}

#[tokio::test]
async fn https_with_the_system_roots_and_only_them() {
    let ca = TestCa::new();
    let trusted = ca.trusted_server(ANSWER).await;
    let stranger = ca.stranger_server(ANSWER).await;
    let dir = std::env::temp_dir().join(format!("cachegate-aws-http-tls-{}", std::process::id()));
    // Read by rustls-native-certs when the connector's client is built.
    std::env::set_var("SSL_CERT_FILE", ca.write_pem(&dir));

    let settings = HttpConnectorSettings::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(2))
        .build();
    let connector = ReqwestHttpClient::default().connector(&settings);
    let resp = connector.call(get(trusted)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{\"ok\":true}");

    let err = connector.call(get(stranger)).await.unwrap_err();
    assert!(
        format!("{err:?}").to_lowercase().contains("certificate"),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
