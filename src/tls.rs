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
