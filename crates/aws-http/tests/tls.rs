//! The connector over TLS, as it talks to AWS endpoints: rustls with ring
//! (the provider this crate installs) and the system's root certificates,
//! which `SSL_CERT_FILE` points at a test CA here. The server is
//! tokio-rustls on loopback with a certificate for `localhost` signed by
//! that CA. One test in this binary, because the variable is process-wide.

use std::sync::Arc;
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use cachegate_aws_http::ReqwestHttpClient;
use http_body_util::BodyExt;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A server on loopback presenting `chain` for `key`, answering one
/// request per connection with 200 and `{"ok":true}`.
async fn https_server(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that rejects the certificate ends the handshake.
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tls.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}")
                    .await
                    .unwrap();
                tls.shutdown().await.ok();
            });
        }
    });
    port
}

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
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("cachegate-aws-http-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    // Read by rustls-native-certs when the connector's client is built.
    std::env::set_var("SSL_CERT_FILE", &ca_file);

    let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let trusted = https_server(vec![leaf.der().clone()], key()).await;
    // The same name and key, but signed by nobody the system trusts.
    let stranger = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&leaf_key)
        .unwrap();
    let untrusted = https_server(vec![stranger.der().clone()], key()).await;

    let settings = HttpConnectorSettings::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(2))
        .build();
    let connector = ReqwestHttpClient::default().connector(&settings);
    let resp = connector.call(get(trusted)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{\"ok\":true}");

    let err = connector.call(get(untrusted)).await.unwrap_err();
    assert!(
        format!("{:?}", err).to_lowercase().contains("certificate"),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
