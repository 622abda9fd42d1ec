//! Table management for `cachegate init`: create the table, wait until it
//! is ACTIVE, check its key schema and enable TTL.

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TableStatus as SdkTableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use aws_sdk_dynamodb::Client;

use crate::DynamoStore;

/// Why [`DynamoStore::ensure_table`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("table `{table}`: {op}: {message}")]
    Sdk {
        table: String,
        op: &'static str,
        message: String,
    },
    #[error("table `{table}` exists with another key schema: {found} (expected pk (S) HASH, sk (S) RANGE)")]
    Schema { table: String, found: String },
    #[error("table `{table}` not ACTIVE after {waited:?} (status {status})")]
    NotActive {
        table: String,
        waited: Duration,
        status: String,
    },
}

/// What [`DynamoStore::ensure_table`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStatus {
    pub table: String,
    /// True when this call created the table.
    pub created: bool,
    pub ttl: TtlState,
}

/// The table's TTL setting after [`DynamoStore::ensure_table`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtlState {
    /// TTL on `ttl` was already enabled (or being enabled).
    Enabled,
    /// This call enabled TTL on `ttl`.
    EnabledNow,
    /// The server has no TTL API (dynalite): expired items stay in the
    /// table; reads still never return them.
    Unsupported(String),
    /// TTL is set up differently (another attribute) and was left alone:
    /// expired items stay in the table; reads still never return them.
    Other(String),
}

impl DynamoStore {
    /// `cachegate init`: creates the table (on-demand, `pk`/`sk`) when
    /// missing, waits until it is ACTIVE and enables TTL on `ttl`. Safe to
    /// run concurrently and repeatedly. A server without the TTL API
    /// (dynalite) is reported in [`TtlState::Unsupported`] with a warning.
    pub async fn ensure_table(&self) -> Result<TableStatus, TableError> {
        let table = self.inner.table.clone();
        let sdk = |op: &'static str, message: String| TableError::Sdk {
            table: table.clone(),
            op,
            message,
        };
        // The control plane answers in seconds, not the data plane's
        // milliseconds that `operation_timeout` is sized for.
        let client = &control_plane_client(&self.inner.client);
        let mut created = false;
        let described = client.describe_table().table_name(&table).send().await;
        let desc = match described {
            Ok(out) => out.table,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                let pk = |name: &str, kt: KeyType| {
                    KeySchemaElement::builder()
                        .attribute_name(name)
                        .key_type(kt)
                        .build()
                };
                let attr = |name: &str| {
                    AttributeDefinition::builder()
                        .attribute_name(name)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                };
                let req = client
                    .create_table()
                    .table_name(&table)
                    .billing_mode(BillingMode::PayPerRequest)
                    .key_schema(
                        pk("pk", KeyType::Hash).map_err(|e| sdk("CreateTable", e.to_string()))?,
                    )
                    .key_schema(
                        pk("sk", KeyType::Range).map_err(|e| sdk("CreateTable", e.to_string()))?,
                    )
                    .attribute_definitions(
                        attr("pk").map_err(|e| sdk("CreateTable", e.to_string()))?,
                    )
                    .attribute_definitions(
                        attr("sk").map_err(|e| sdk("CreateTable", e.to_string()))?,
                    );
                match req.send().await {
                    Ok(out) => {
                        created = true;
                        tracing::info!(table = %table, "dynamodb: table created");
                        out.table_description
                    }
                    // Someone else created it meanwhile.
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_resource_in_use_exception()) =>
                    {
                        None
                    }
                    Err(e) => return Err(sdk("CreateTable", DisplayErrorContext(&e).to_string())),
                }
            }
            Err(e) => return Err(sdk("DescribeTable", DisplayErrorContext(&e).to_string())),
        };

        if let Some(schema) = desc.as_ref().map(|d| d.key_schema()) {
            if !schema.is_empty() {
                check_schema(&table, schema)?;
            }
        }

        // Wait until ACTIVE (CreateTable returns CREATING).
        let start = Instant::now();
        let limit = Duration::from_secs(120);
        let mut status = desc.and_then(|d| d.table_status);
        loop {
            if status == Some(SdkTableStatus::Active) {
                break;
            }
            if start.elapsed() > limit {
                return Err(TableError::NotActive {
                    table: table.clone(),
                    waited: limit,
                    status: status.map_or("unknown".into(), |s| s.as_str().to_string()),
                });
            }
            if status.is_some() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let out = client
                .describe_table()
                .table_name(&table)
                .send()
                .await
                .map_err(|e| sdk("DescribeTable", DisplayErrorContext(&e).to_string()))?;
            if let Some(d) = out.table {
                check_schema(&table, d.key_schema())?;
                status = d.table_status.or(Some(SdkTableStatus::Creating));
            } else {
                status = Some(SdkTableStatus::Creating);
            }
        }

        let ttl = self.ensure_ttl(client).await?;
        if let TtlState::Unsupported(m) | TtlState::Other(m) = &ttl {
            tracing::warn!(
                table = %table,
                "dynamodb: TTL not enabled on `ttl` ({m}); expired items stay in the table (reads never return them)"
            );
        }
        Ok(TableStatus {
            table: self.inner.table.clone(),
            created,
            ttl,
        })
    }

    async fn ensure_ttl(&self, client: &Client) -> Result<TtlState, TableError> {
        let table = &self.inner.table;
        let unsupported = |code: Option<&str>| {
            matches!(
                code,
                Some("UnknownOperationException") | Some("UnrecognizedClientException")
            )
        };
        let current = match client
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
        {
            Ok(out) => out.time_to_live_description,
            Err(e) if unsupported(e.code()) => {
                return Ok(TtlState::Unsupported(
                    "server has no DescribeTimeToLive".into(),
                ))
            }
            Err(e) => {
                return Err(TableError::Sdk {
                    table: table.clone(),
                    op: "DescribeTimeToLive",
                    message: DisplayErrorContext(&e).to_string(),
                })
            }
        };
        if let Some(d) = &current {
            let on = matches!(
                d.time_to_live_status,
                Some(TimeToLiveStatus::Enabled) | Some(TimeToLiveStatus::Enabling)
            );
            match d.attribute_name.as_deref() {
                Some("ttl") if on => return Ok(TtlState::Enabled),
                Some(other) if on => {
                    return Ok(TtlState::Other(format!(
                        "TTL is enabled on attribute `{other}`"
                    )))
                }
                _ => {}
            }
            if d.time_to_live_status == Some(TimeToLiveStatus::Disabling) {
                return Ok(TtlState::Other(
                    "TTL is being disabled; run init again later".into(),
                ));
            }
        }
        let spec = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name("ttl")
            .build()
            .map_err(|e| TableError::Sdk {
                table: table.clone(),
                op: "UpdateTimeToLive",
                message: e.to_string(),
            })?;
        match client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(spec)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(table = %table, "dynamodb: TTL enabled on `ttl`");
                Ok(TtlState::EnabledNow)
            }
            Err(e) if unsupported(e.code()) => Ok(TtlState::Unsupported(format!(
                "UpdateTimeToLive: {}",
                e.code().unwrap_or("unsupported")
            ))),
            // A concurrent init enabled it first.
            Err(e)
                if e.code() == Some("ValidationException")
                    && e.message().is_some_and(|m| m.contains("already enabled")) =>
            {
                Ok(TtlState::Enabled)
            }
            Err(e) => Err(TableError::Sdk {
                table: table.clone(),
                op: "UpdateTimeToLive",
                message: DisplayErrorContext(&e).to_string(),
            }),
        }
    }
}

/// `client` with timeouts for table management (`cachegate init`): the
/// same endpoint, region, credentials and retries.
fn control_plane_client(client: &Client) -> Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .operation_timeout(Duration::from_secs(30))
        .operation_attempt_timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .build();
    Client::from_conf(
        client
            .config()
            .to_builder()
            .timeout_config(timeouts)
            .build(),
    )
}

fn check_schema(table: &str, schema: &[KeySchemaElement]) -> Result<(), TableError> {
    let has = |name: &str, kt: KeyType| {
        schema
            .iter()
            .any(|k| k.attribute_name() == name && *k.key_type() == kt)
    };
    if schema.len() == 2 && has("pk", KeyType::Hash) && has("sk", KeyType::Range) {
        return Ok(());
    }
    let found = schema
        .iter()
        .map(|k| format!("{} {}", k.attribute_name(), k.key_type().as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    Err(TableError::Schema {
        table: table.to_string(),
        found,
    })
}
