//! Making a [`DynamoStore`]: the SDK client with the timeouts and retries
//! of the settings.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use cachegate_store::{Capabilities, PurgeFeed};

use crate::{DynamoConfig, DynamoStore, Inner, BACKEND};

/// Why [`connect`] could not make a store.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid [dynamodb] configuration: {0}")]
    InvalidConfig(String),
    #[error("no AWS region configured (set AWS_REGION or a profile region)")]
    NoRegion,
}

/// What a DynamoDB store of `cfg` can do: the one declaration, read by
/// [`connect_with`] and by whoever needs it before a store exists (a store
/// that connects later).
pub fn capabilities(cfg: &DynamoConfig) -> Capabilities {
    Capabilities {
        name: BACKEND,
        max_value_bytes: cfg.max_value_bytes,
        shared: true,
        purge_feed: PurgeFeed::Log,
        lists_tag_members: true,
        scans_values: true,
        write_ids: false,
    }
}

/// A store on `cfg.table` with the AWS SDK's default configuration chain
/// (region, credentials, `AWS_ENDPOINT_URL_DYNAMODB`). Makes no request.
pub async fn connect(cfg: &DynamoConfig) -> Result<DynamoStore, ConnectError> {
    connect_with(
        cfg,
        aws_config::defaults(aws_config::BehaviorVersion::latest()),
    )
    .await
}

/// Like [`connect`], from a given SDK configuration loader (tests set the
/// endpoint, region and credentials on it). Timeouts and retries are
/// always taken from `cfg`.
pub async fn connect_with(
    cfg: &DynamoConfig,
    loader: aws_config::ConfigLoader,
) -> Result<DynamoStore, ConnectError> {
    cfg.validate()
        .map_err(|e| ConnectError::InvalidConfig(e.to_string()))?;
    let sdk = loader
        .http_client(cachegate_aws_http::https_client())
        .load()
        .await;
    if sdk.region().is_none() {
        return Err(ConnectError::NoRegion);
    }
    let op = cfg.operation_timeout;
    // Each attempt may use half the budget, so one retry still fits after
    // a hung attempt; the operation timeout caps everything.
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .operation_timeout(op)
        .operation_attempt_timeout(op / 2)
        .connect_timeout(op / 2)
        .build();
    let retries = aws_config::retry::RetryConfig::standard()
        .with_max_attempts(3)
        .with_initial_backoff((op / 20).max(Duration::from_millis(1)))
        .with_max_backoff((op / 4).max(Duration::from_millis(1)));
    let conf = aws_sdk_dynamodb::config::Builder::from(&sdk)
        .timeout_config(timeouts)
        .retry_config(retries)
        .build();
    Ok(DynamoStore {
        inner: Arc::new(Inner {
            client: Client::from_conf(conf),
            table: cfg.table.clone(),
            consistent_read: cfg.consistent_read,
            operation_timeout: op,
            compression_level: cfg.compression_level,
            caps: capabilities(cfg),
        }),
    })
}
