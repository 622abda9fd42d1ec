//! Shared by the integration tests: a store on the server that
//! `scripts/services/dynamodb.sh` started. Without that server the tests
//! fail (never skip).

#![allow(dead_code)]

use std::time::Duration;

use cachegate_dynamodb::aws_config::{self, BehaviorVersion, Region};
use cachegate_dynamodb::aws_sdk_dynamodb::config::Credentials;
use cachegate_dynamodb::{connect_with, DynamoConfig, DynamoStore};

/// Table shared by the conformance and backend tests (each test works in
/// its own random key namespace).
pub const TABLE: &str = "cachegate-test";

pub fn endpoint() -> String {
    std::env::var("CACHEGATE_TEST_DYNAMODB_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "CACHEGATE_TEST_DYNAMODB_ENDPOINT is not set: start the server with \
             `source scripts/lib.sh; source scripts/services/dynamodb.sh; start_dynamodb` \
             (or run scripts/test)"
        )
    })
}

/// Generous time bounds: the tests share two cores with other builds.
pub fn config() -> DynamoConfig {
    DynamoConfig {
        table: TABLE.into(),
        operation_timeout: Duration::from_secs(10),
        ..DynamoConfig::default()
    }
}

/// A store on `endpoint` with a fixed region and dummy static credentials.
pub async fn store_at(endpoint: &str, cfg: &DynamoConfig) -> DynamoStore {
    let loader = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "cachegatetest",
            "cachegatetest",
            None,
            None,
            "cachegate-test",
        ));
    connect_with(cfg, loader).await.expect("connect")
}

/// A store on the shared test table, created if missing (idempotent and
/// safe when many tests do it at once).
pub async fn store_with(cfg: &DynamoConfig) -> DynamoStore {
    let store = store_at(&endpoint(), cfg).await;
    store.ensure_table().await.expect("ensure_table");
    store
}

pub async fn store() -> DynamoStore {
    store_with(&config()).await
}

/// `len` bytes no compressor can shrink (xorshift64*), distinct per `seed`.
pub fn noise(len: usize, seed: u64) -> bytes::Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out.into()
}
