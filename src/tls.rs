//! The one TLS crypto provider of the binary: rustls with ring.
//!
//! Every TLS user in cachegate (reqwest to the upstream, the AWS SDK
//! clients, the Redis backend) runs on rustls with ring. aws-lc-rs, the
//! default of reqwest's `rustls` feature and of the SDK's
//! `default-https-client`, made the function binary about 2 MB larger for
//! the same TLS; two providers in one binary would be worse still.

/// Makes ring rustls's process-wide default provider, unless one is
/// installed already. reqwest (`rustls-no-provider`) builds its clients
/// from that default; call this before building one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The HTTPS client for AWS SDK configurations: rustls with ring, the
/// system's root certificates. Set it on every SDK config or loader: with
/// the SDK's `default-https-client` feature off there is no default.
#[cfg(feature = "edge")]
pub fn aws_https_client() -> aws_sdk_sqs::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}
