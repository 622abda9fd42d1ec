//! Test support (a dev-dependency only): a CA generated for the test, and
//! an HTTPS server on loopback presenting a certificate for `localhost`,
//! either signed by that CA or by no one. Tests hand the CA to the code
//! under test as its system roots (`SSL_CERT_FILE`, which
//! rustls-native-certs reads).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and one server key, with certificates for `localhost`.
pub struct TestCa {
    ca: Certificate,
    ca_key: KeyPair,
    key: KeyPair,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        TestCa {
            ca,
            ca_key,
            key: KeyPair::generate().unwrap(),
        }
    }

    /// Writes the CA certificate (PEM) into `dir`; the path is what
    /// `SSL_CERT_FILE` should name.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).unwrap();
        path
    }

    /// A server on loopback whose certificate this CA signed.
    pub async fn trusted_server(&self, response: &'static [u8]) -> u16 {
        let leaf = localhost()
            .signed_by(&self.key, &self.ca, &self.ca_key)
            .unwrap();
        https_server(leaf.der().clone(), self.private_key(), response).await
    }

    /// A server on loopback with the same name and key, but a certificate
    /// nobody signed.
    pub async fn stranger_server(&self, response: &'static [u8]) -> u16 {
        let leaf = localhost().self_signed(&self.key).unwrap();
        https_server(leaf.der().clone(), self.private_key(), response).await
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }
}

fn localhost() -> CertificateParams {
    CertificateParams::new(vec!["localhost".to_owned()]).unwrap()
}

/// Serves HTTPS on a loopback port: every request on a connection (kept
/// alive) gets `response`, a whole HTTP/1.1 response.
async fn https_server(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    response: &'static [u8],
) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = acceptor.accept(sock).await else {
                    return; // the client refused the certificate
                };
                let mut pending = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if conn.write_all(response).await.is_err() {
                            return;
                        }
                    }
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    port
}
