//! The DynamoDB backend of cachegate: a [`CacheStore`] over one table.
//!
//! # Table
//!
//! Fixed schema (the SAM template and `cachegate init` create exactly this):
//! partition key `pk` (S), sort key `sk` (S), TTL attribute `ttl` (N, epoch
//! seconds), on-demand (`PAY_PER_REQUEST`) billing. Everything else is
//! decided by this crate.
//!
//! # Item layout
//!
//! `<key>` is a [`StoreKey`] as text (`cg1:` + 64 hex digits); `<tag hash>`
//! is the digest of [`StoreKey::for_tag`] (64 hex digits), so any tag
//! string (empty, long, any characters) fits.
//!
//! | item        | `pk`              | `sk`                   | other attributes |
//! |-------------|-------------------|------------------------|------------------|
//! | value       | `<key>`           | `v`                    | `exp` N (expiry, unix millis), `ttl` N, `enc` S (`raw` \| `zstd`), `len` N (bytes before compression), then either `val` B (the whole stored value) or `gen` S + `nch` N (chunk generation and count); `tags` SS (`<tag hash>` of each tag of this value; absent when none) |
//! | chunk       | `<key>`           | `c#<gen>#<n>` (`n` zero-padded, from 0) | `val` B (piece `n` of the stored value), `ttl` N |
//! | tag member  | `tag#<tag hash>`  | `<key>`                | `exp` N, `ttl` N, `w` S (id of the write that recorded it) |
//! | lock        | `lock#<key>`      | `l`                    | `own` S (owner token), `exp` N (unix millis), `ttl` N |
//!
//! - **Expiry.** `ttl` is `exp` rounded up to whole seconds, so DynamoDB's
//!   TTL deletes every item eventually; it does so lazily (often hours
//!   later) and local servers never do, so every read checks `exp` itself.
//! - **Size.** Values are compressed with zstd (kept raw when that does not
//!   make them smaller). A stored value up to [`INLINE_MAX`] bytes sits in
//!   the value item; a larger one is cut into chunk items of [`CHUNK_BYTES`]
//!   (DynamoDB rejects items over 400 KB). Chunks of a new generation (a
//!   random id) are written *before* the value item that names them, and
//!   chunks are never modified, so a reader that sees a value item finds
//!   exactly its chunks (read together with strongly consistent
//!   BatchGetItem calls of up to 40 keys: one call for any value up to the
//!   default 6 MiB), or, when a rewriter already removed them, none: it
//!   then re-reads the value item (up to 3 times, then a miss) and never
//!   returns a mix. A put first tries its value item conditioned on
//!   `attribute_not_exists(gen)`, so replacing an unchunked value costs one
//!   write and returns nothing; only when that fails does it write again
//!   returning the old (chunked, so small) item, whose chunks it deletes.
//!   Delete and purge delete the chunks of what they removed. Chunks of a
//!   writer that died before its value item (or whose clean-up failed)
//!   expire through `ttl`.
//! - **Tags.** A put records each tag's member item *before* its value
//!   item. [`CacheStore::purge_tag`] Queries `pk = tag#<tag hash>` (never a
//!   Scan) and deletes each member's value item with the condition
//!   `contains(tags, <tag hash>)`, so a key re-stored without the tag survives;
//!   it then deletes the member item only if no put recorded it again
//!   meanwhile (condition on `w`). Member items left behind by overwrites
//!   are harmless and expire through `ttl`.
//! - **Lock.** A conditional put (`attribute_not_exists(pk) OR exp <= now`)
//!   with a random owner token (and `ReturnValuesOnConditionCheckFailure`,
//!   so a put the SDK retried after it had been applied is recognised as
//!   ours); release is a delete conditioned on the token and on the lock
//!   not having expired. `lock#` keeps locks apart from values.
//!
//! Every SDK call is bounded by [`DynamoConfig::operation_timeout`], retries
//! included (standard retry mode, at most 3 attempts of at most half the
//! timeout each, backoff from a twentieth of it); a timeout becomes
//! [`StoreError::Timeout`], throttling and other service errors
//! [`StoreError::Backend`]. Chunked puts, deletes and purges make several
//! calls, each so bounded.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, DeleteRequest, KeySchemaElement, KeyType,
    KeysAndAttributes, ReturnValue, ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
    TableStatus as SdkTableStatus, TimeToLiveSpecification, TimeToLiveStatus, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use bytes::{Bytes, BytesMut};
use cachegate_store::coherence::{LOG_READ_MAX, LOG_RETENTION};
use cachegate_store::{
    is_expired, now_millis, CacheStore, Capabilities, LockToken, PurgeFeed, PurgeLogEntry,
    PurgeNotice, PutOptions, StoreError, StoreKey, UnixMillis,
};
use futures_util::{stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

pub use aws_config;
pub use aws_sdk_dynamodb;

/// The backend's name in logs, metrics, errors and `Cache-Status`.
pub const BACKEND: &str = "dynamodb";

/// Largest stored (compressed) value kept inside the value item itself.
/// DynamoDB's item limit is 400 KB, attribute names and other attributes
/// included; this leaves room for them.
pub const INLINE_MAX: usize = 350 * 1024;

/// Size of one chunk item's piece of a larger stored value.
pub const CHUNK_BYTES: usize = 350 * 1024;

/// Total bytes of tag hashes one value may carry (they live in the value
/// item): about 250 tags.
const MAX_TAG_BYTES: usize = 16 * 1024;

/// Chunk keys read per BatchGetItem (at most 100 keys, 16 MB per response).
const BATCH_GET_KEYS: usize = 40;
/// Items per BatchWriteItem (DynamoDB's limit).
const BATCH_WRITE_ITEMS: usize = 25;
/// Chunk puts, member puts and purge deletes in flight at once.
const PARALLEL_WRITES: usize = 8;

const VALUE_SK: &str = "v";
const LOCK_SK: &str = "l";

pub use cachegate_store::settings::DynamoConfig;

/// Why [`connect`] could not make a store.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid [dynamodb] configuration: {0}")]
    InvalidConfig(String),
    #[error("no AWS region configured (set AWS_REGION or a profile region)")]
    NoRegion,
}

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

/// The DynamoDB store. Cloning shares the client and its connection pool;
/// build it once per process with [`connect`].
#[derive(Clone)]
pub struct DynamoStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    table: String,
    consistent_read: bool,
    operation_timeout: Duration,
    compression_level: i32,
    caps: Capabilities,
}

impl fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table", &self.inner.table)
            .field("consistent_read", &self.inner.consistent_read)
            .field("operation_timeout", &self.inner.operation_timeout)
            .field("max_value_bytes", &self.inner.caps.max_value_bytes)
            .finish()
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
    let sdk = loader.load().await;
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
            caps: Capabilities {
                name: BACKEND,
                max_value_bytes: cfg.max_value_bytes,
                shared: true,
                purge_feed: PurgeFeed::Log,
            },
        }),
    })
}

// ---------------------------------------------------------------------------
// Items

/// How the stored bytes relate to the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    Raw,
    Zstd,
}

/// The value item (`sk = "v"`).
#[derive(Debug, Serialize, Deserialize)]
struct ValueItem {
    pk: String,
    sk: String,
    exp: UnixMillis,
    ttl: u64,
    enc: Encoding,
    len: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    val: Option<ByteBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nch: Option<u32>,
    #[serde(
        default,
        with = "serde_dynamo::string_set",
        skip_serializing_if = "Vec::is_empty"
    )]
    tags: Vec<String>,
}

/// One piece of a chunked value (`sk = "c#<gen>#<n>"`).
#[derive(Debug, Serialize, Deserialize)]
struct ChunkItem {
    pk: String,
    sk: String,
    val: ByteBuf,
    ttl: u64,
}

/// A tag's member (`pk = "tag#<tag hash>"`, `sk = <key>`).
#[derive(Debug, Serialize, Deserialize)]
struct MemberItem {
    pk: String,
    sk: String,
    exp: UnixMillis,
    ttl: u64,
    w: String,
}

/// One purge in the purge log (`pk = "purge-log"`, `sk =
/// "<at, 16 digits>#<id>"`): what other instances' L1s read.
#[derive(Debug, Serialize, Deserialize)]
struct PurgeLogItem {
    pk: String,
    sk: String,
    /// The purged tag itself (not its hash): readers drop it from their L1.
    tag: String,
    soft: bool,
    exp: UnixMillis,
    ttl: u64,
}

const PURGE_LOG_PK: &str = "purge-log";

fn purge_log_sk(at: UnixMillis, id: &str) -> String {
    format!("{at:016}#{id}")
}

/// A lock (`pk = "lock#<key>"`, `sk = "l"`).
#[derive(Debug, Serialize, Deserialize)]
struct LockItem {
    pk: String,
    sk: String,
    own: String,
    exp: UnixMillis,
    ttl: u64,
}

type Item = HashMap<String, AttributeValue>;

fn to_item<T: Serialize>(v: &T) -> Result<Item, StoreError> {
    serde_dynamo::to_item(v).map_err(|e| StoreError::backend(BACKEND, format!("encode item: {e}")))
}

fn from_item<T: for<'de> Deserialize<'de>>(item: Item, what: &str) -> Result<T, StoreError> {
    serde_dynamo::from_item(item)
        .map_err(|e| StoreError::backend(BACKEND, format!("malformed {what} item: {e}")))
}

fn key_of(pk: &str, sk: &str) -> Item {
    HashMap::from([
        ("pk".to_string(), AttributeValue::S(pk.to_string())),
        ("sk".to_string(), AttributeValue::S(sk.to_string())),
    ])
}

fn chunk_sk(gen: &str, n: u32) -> String {
    format!("c#{gen}#{n:05}")
}

fn tag_hash(tag: &str) -> String {
    StoreKey::for_tag(tag).digest().to_string()
}

fn tag_pk(tag: &str) -> String {
    format!("tag#{}", tag_hash(tag))
}

fn lock_pk(key: &StoreKey) -> String {
    format!("lock#{}", key.as_str())
}

/// `exp` (unix millis) rounded up to epoch seconds, for the TTL attribute.
fn ttl_secs(exp: UnixMillis) -> u64 {
    exp.div_ceil(1000)
}

fn num(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

// ---------------------------------------------------------------------------
// Errors

impl DynamoStore {
    fn sdk_err<E, R>(&self, op: &'static str, e: SdkError<E, R>) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        if let SdkError::TimeoutError(_) = e {
            return StoreError::Timeout {
                backend: BACKEND,
                after: self.inner.operation_timeout,
            };
        }
        // Errors no retry can fix: said shortly, with what to do (the SDK's
        // full context runs to a kilobyte and says neither).
        let table = &self.inner.table;
        let unusable = match e.code() {
            Some("ResourceNotFoundException") => Some(format!(
                "{op}: table `{table}` does not exist (in this region and endpoint): \
                 run `cachegate init` to create it, or set dynamodb.table"
            )),
            Some(
                code @ ("UnrecognizedClientException"
                | "InvalidSignatureException"
                | "AccessDeniedException"
                | "MissingAuthenticationTokenException"),
            ) => Some(format!(
                "{op}: credentials refused ({code}: {}); check the AWS credentials and the \
                 IAM policy for table `{table}`",
                e.message().unwrap_or("no message")
            )),
            _ => None,
        };
        match unusable {
            Some(message) => StoreError::Unusable {
                backend: BACKEND,
                message,
            },
            None => StoreError::backend(BACKEND, format!("{op}: {}", DisplayErrorContext(&e))),
        }
    }
}

/// True when `e` is a failed condition of a conditional write.
fn condition_failed<E, R>(e: &SdkError<E, R>) -> bool
where
    E: ProvideErrorMetadata,
{
    e.as_service_error()
        .is_some_and(|s| s.code() == Some("ConditionalCheckFailedException"))
}

// ---------------------------------------------------------------------------
// Compression

fn compress(value: &[u8], level: i32) -> Result<(Encoding, Vec<u8>), StoreError> {
    if value.is_empty() {
        return Ok((Encoding::Raw, Vec::new()));
    }
    let z = zstd::bulk::compress(value, level)
        .map_err(|e| StoreError::backend(BACKEND, format!("zstd compress: {e}")))?;
    Ok(if z.len() < value.len() {
        (Encoding::Zstd, z)
    } else {
        (Encoding::Raw, value.to_vec())
    })
}

fn decompress(enc: Encoding, stored: Bytes, len: u64, limit: usize) -> Result<Bytes, StoreError> {
    let bad = |m: String| StoreError::backend(BACKEND, format!("malformed value item: {m}"));
    let len = usize::try_from(len).map_err(|_| bad(format!("len {len}")))?;
    match enc {
        Encoding::Raw if stored.len() == len => Ok(stored),
        Encoding::Raw => Err(bad(format!("{} bytes, len says {len}", stored.len()))),
        Encoding::Zstd => {
            // Never allocate more than a value could legitimately be.
            if len > limit.max(64 * 1024 * 1024) {
                return Err(bad(format!("len {len} over any limit")));
            }
            let out = zstd::bulk::decompress(&stored, len).map_err(|e| bad(e.to_string()))?;
            if out.len() != len {
                return Err(bad(format!(
                    "{} bytes decompressed, len says {len}",
                    out.len()
                )));
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Runs CPU-heavy work on the blocking pool when it is large enough to
/// stall other tasks.
async fn cpu<T: Send + 'static>(
    big: bool,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    if big {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::backend(BACKEND, format!("compression task: {e}")))?
    } else {
        f()
    }
}

// ---------------------------------------------------------------------------
// Operations

impl DynamoStore {
    /// The SDK client (shared; for tests and tools that need raw access).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Reads the value item of `key`, unexpired.
    async fn read_value_item(&self, key: &StoreKey) -> Result<Option<ValueItem>, StoreError> {
        let out = self
            .inner
            .client
            .get_item()
            .table_name(&self.inner.table)
            .set_key(Some(key_of(key.as_str(), VALUE_SK)))
            .consistent_read(self.inner.consistent_read)
            .send()
            .await
            .map_err(|e| self.sdk_err("GetItem", e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let v: ValueItem = from_item(item, "value")?;
        Ok((!is_expired(v.exp, now_millis())).then_some(v))
    }

    /// All chunks of `gen`, in order, or `None` when any is missing (the
    /// generation was replaced and removed since its value item was read).
    async fn read_chunks(
        &self,
        key: &StoreKey,
        gen: &str,
        count: u32,
    ) -> Result<Option<Bytes>, StoreError> {
        let mut pieces: HashMap<String, Bytes> = HashMap::with_capacity(count as usize);
        let sks: Vec<String> = (0..count).map(|n| chunk_sk(gen, n)).collect();
        for batch in sks.chunks(BATCH_GET_KEYS) {
            let mut pending: Vec<Item> = batch.iter().map(|sk| key_of(key.as_str(), sk)).collect();
            let mut rounds = 0;
            while !pending.is_empty() {
                rounds += 1;
                if rounds > 1 {
                    // Unprocessed keys (throttling, 16 MB cap): back off a little.
                    tokio::time::sleep(Duration::from_millis(10 * rounds.min(10))).await;
                }
                let ka = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut pending)))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| StoreError::backend(BACKEND, format!("BatchGetItem: {e}")))?;
                let out = self
                    .inner
                    .client
                    .batch_get_item()
                    .request_items(&self.inner.table, ka)
                    .send()
                    .await
                    .map_err(|e| self.sdk_err("BatchGetItem", e))?;
                for item in out
                    .responses
                    .and_then(|mut r| r.remove(&self.inner.table))
                    .unwrap_or_default()
                {
                    let c: ChunkItem = from_item(item, "chunk")?;
                    pieces.insert(c.sk, Bytes::from(c.val.into_vec()));
                }
                if let Some(mut left) = out.unprocessed_keys {
                    if let Some(ka) = left.remove(&self.inner.table) {
                        pending = ka.keys;
                    }
                }
                if rounds > 50 && !pending.is_empty() {
                    return Err(StoreError::backend(
                        BACKEND,
                        "BatchGetItem: keys left unprocessed after 50 rounds",
                    ));
                }
            }
        }
        let mut whole = BytesMut::new();
        for sk in &sks {
            match pieces.remove(sk) {
                Some(p) => whole.extend_from_slice(&p),
                None => return Ok(None),
            }
        }
        Ok(Some(whole.freeze()))
    }

    /// Deletes items by key, best effort in batches (BatchWriteItem).
    async fn delete_keys(&self, keys: Vec<Item>) -> Result<(), StoreError> {
        for batch in keys.chunks(BATCH_WRITE_ITEMS) {
            let mut pending: Vec<WriteRequest> = batch
                .iter()
                .map(|k| {
                    DeleteRequest::builder()
                        .set_key(Some(k.clone()))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                })
                .collect::<Result<_, _>>()
                .map_err(|e| StoreError::backend(BACKEND, format!("BatchWriteItem: {e}")))?;
            let mut rounds = 0u64;
            while !pending.is_empty() {
                rounds += 1;
                if rounds > 1 {
                    tokio::time::sleep(Duration::from_millis(10 * rounds.min(10))).await;
                }
                if rounds > 50 {
                    return Err(StoreError::backend(
                        BACKEND,
                        "BatchWriteItem: items left unprocessed after 50 rounds",
                    ));
                }
                let out = self
                    .inner
                    .client
                    .batch_write_item()
                    .request_items(&self.inner.table, std::mem::take(&mut pending))
                    .send()
                    .await
                    .map_err(|e| self.sdk_err("BatchWriteItem", e))?;
                pending = out
                    .unprocessed_items
                    .and_then(|mut u| u.remove(&self.inner.table))
                    .unwrap_or_default();
            }
        }
        Ok(())
    }

    /// Removes the chunks of a replaced or deleted value item (if it had
    /// any), unless they are generation `keep` (the writer's own, seen again
    /// when the SDK retried a put that had already been applied). Failures
    /// are logged: the chunks then expire through `ttl`.
    async fn drop_chunks_of(&self, key: &str, old: Option<Item>, keep: Option<&str>) {
        let Some(old) = old else { return };
        let (Some(AttributeValue::S(gen)), Some(AttributeValue::N(n))) =
            (old.get("gen"), old.get("nch"))
        else {
            return;
        };
        if keep == Some(gen.as_str()) {
            return;
        }
        let Ok(n) = n.parse::<u32>() else { return };
        let keys = (0..n).map(|i| key_of(key, &chunk_sk(gen, i))).collect();
        if let Err(e) = self.delete_keys(keys).await {
            tracing::warn!(key = %key, gen = %gen, error = %e, "dynamodb: stale chunks not deleted; they expire through ttl");
        }
    }

    async fn put_items(&self, items: Vec<Item>) -> Result<(), StoreError> {
        stream::iter(items.into_iter().map(|item| async move {
            self.inner
                .client
                .put_item()
                .table_name(&self.inner.table)
                .set_item(Some(item))
                .send()
                .await
                .map(drop)
                .map_err(|e| self.sdk_err("PutItem", e))
        }))
        .buffer_unordered(PARALLEL_WRITES)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
    }

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

#[async_trait]
impl CacheStore for DynamoStore {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        // A rewriter may remove the chunks between our reads of the value
        // item and of its chunks: then read the (new) value item again.
        for _ in 0..3 {
            let Some(v) = self.read_value_item(key).await? else {
                return Ok(None);
            };
            let stored = match (v.val, v.gen, v.nch) {
                (Some(val), _, _) => Bytes::from(val.into_vec()),
                (None, Some(gen), Some(n)) => match self.read_chunks(key, &gen, n).await? {
                    Some(b) => b,
                    None => continue,
                },
                _ => {
                    return Err(StoreError::backend(
                        BACKEND,
                        "malformed value item: neither val nor gen/nch",
                    ))
                }
            };
            let limit = self.inner.caps.max_value_bytes;
            let (enc, len) = (v.enc, v.len);
            return cpu(stored.len() > 256 * 1024, move || {
                decompress(enc, stored, len, limit)
            })
            .await
            .map(Some);
        }
        tracing::debug!(%key, "dynamodb: value rewritten during every read attempt; a miss");
        Ok(None)
    }

    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        let limit = self.inner.caps.max_value_bytes;
        if value.len() > limit {
            return Err(StoreError::TooLarge {
                backend: BACKEND,
                size: value.len(),
                limit,
            });
        }
        if is_expired(opts.expires_at, now_millis()) {
            self.delete(key).await?;
            return Ok(());
        }
        let mut tags: Vec<String> = opts.tags.iter().map(|t| tag_hash(t)).collect();
        tags.sort();
        tags.dedup();
        let tag_bytes: usize = tags.iter().map(|t| t.len() + 1).sum();
        if tag_bytes > MAX_TAG_BYTES {
            return Err(StoreError::backend(
                BACKEND,
                format!(
                    "{} tags on one value; at most {}",
                    tags.len(),
                    MAX_TAG_BYTES / 65
                ),
            ));
        }
        let len = value.len() as u64;
        let level = self.inner.compression_level;
        let (enc, stored) = cpu(value.len() > 256 * 1024, move || compress(&value, level)).await?;

        let exp = opts.expires_at;
        let ttl = ttl_secs(exp);
        let pk = key.as_str().to_string();
        let write_id = uuid::Uuid::new_v4().simple().to_string();

        // What must exist before the value item: tag members and chunks.
        let mut before: Vec<Item> = Vec::new();
        for hash in &tags {
            before.push(to_item(&MemberItem {
                pk: format!("tag#{hash}"),
                sk: pk.clone(),
                exp,
                ttl,
                w: write_id.clone(),
            })?);
        }
        let mut item = ValueItem {
            pk: pk.clone(),
            sk: VALUE_SK.into(),
            exp,
            ttl,
            enc,
            len,
            val: None,
            gen: None,
            nch: None,
            tags,
        };
        let mut new_chunks = Vec::new();
        if stored.len() + tag_bytes <= INLINE_MAX {
            item.val = Some(ByteBuf::from(stored));
        } else {
            let gen = write_id.clone();
            let pieces: Vec<&[u8]> = stored.chunks(CHUNK_BYTES).collect();
            for (n, piece) in pieces.iter().enumerate() {
                let sk = chunk_sk(&gen, n as u32);
                new_chunks.push(key_of(&pk, &sk));
                before.push(to_item(&ChunkItem {
                    pk: pk.clone(),
                    sk,
                    val: ByteBuf::from(piece.to_vec()),
                    ttl,
                })?);
            }
            item.nch = Some(pieces.len() as u32);
            item.gen = Some(gen);
        }
        let value_item = to_item(&item)?;
        drop(item);

        if let Err(e) = self.put_items(before).await {
            if !new_chunks.is_empty() {
                let _ = self.delete_keys(new_chunks).await;
            }
            return Err(e);
        }
        // Usually the value item being replaced has no chunks: then a put
        // conditioned on exactly that is all it takes, and no old item
        // (up to INLINE_MAX bytes) travels back. Otherwise the put is made
        // again returning the old item (small: a chunked one has no `val`),
        // whose chunks are then removed. Every replaced value item with
        // chunks is returned to exactly one writer this way.
        let first = self
            .inner
            .client
            .put_item()
            .table_name(&self.inner.table)
            .set_item(Some(value_item.clone()))
            .condition_expression("attribute_not_exists(#gen)")
            .expression_attribute_names("#gen", "gen")
            .send()
            .await;
        let out = match first {
            Ok(_) => return Ok(()),
            Err(e) if condition_failed(&e) => {
                self.inner
                    .client
                    .put_item()
                    .table_name(&self.inner.table)
                    .set_item(Some(value_item))
                    .return_values(ReturnValue::AllOld)
                    .send()
                    .await
            }
            Err(e) => Err(e),
        };
        match out {
            Ok(out) => {
                self.drop_chunks_of(&pk, out.attributes, Some(&write_id))
                    .await;
                Ok(())
            }
            Err(e) => {
                if !new_chunks.is_empty() {
                    let _ = self.delete_keys(new_chunks).await;
                }
                Err(self.sdk_err("PutItem", e))
            }
        }
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let out = self
            .inner
            .client
            .delete_item()
            .table_name(&self.inner.table)
            .set_key(Some(key_of(key.as_str(), VALUE_SK)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| self.sdk_err("DeleteItem", e))?;
        let live = out
            .attributes
            .as_ref()
            .and_then(|a| match a.get("exp") {
                Some(AttributeValue::N(n)) => n.parse::<u64>().ok(),
                _ => None,
            })
            .is_some_and(|exp| !is_expired(exp, now_millis()));
        self.drop_chunks_of(key.as_str(), out.attributes, None)
            .await;
        Ok(live)
    }

    async fn try_lock(
        &self,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        let token = LockToken::generate();
        let now = now_millis();
        let exp = now.saturating_add(ttl.as_millis() as u64);
        let item = to_item(&LockItem {
            pk: lock_pk(key),
            sk: LOCK_SK.into(),
            own: token.as_str().to_string(),
            exp,
            ttl: ttl_secs(exp),
        })?;
        let out = self
            .inner
            .client
            .put_item()
            .table_name(&self.inner.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk) OR #exp <= :now")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#exp", "exp")
            .expression_attribute_values(":now", num(now))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match out {
            Ok(_) => Ok(Some(token)),
            // The holder is us when the SDK retried a put that had been
            // applied but whose answer was lost (DynamoDB returns the item
            // that failed the condition; servers without this return none).
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {
                let ours = match e.err() {
                    PutItemError::ConditionalCheckFailedException(c) => c
                        .item()
                        .and_then(|i| i.get("own"))
                        .is_some_and(|own| own.as_s().is_ok_and(|o| o == token.as_str())),
                    _ => false,
                };
                Ok(ours.then_some(token))
            }
            Err(e) => Err(self.sdk_err("PutItem (lock)", e)),
        }
    }

    async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let out = self
            .inner
            .client
            .delete_item()
            .table_name(&self.inner.table)
            .set_key(Some(key_of(&lock_pk(key), LOCK_SK)))
            .condition_expression("#own = :own AND #exp > :now")
            .expression_attribute_names("#own", "own")
            .expression_attribute_names("#exp", "exp")
            .expression_attribute_values(":own", AttributeValue::S(token.as_str().to_string()))
            .expression_attribute_values(":now", num(now_millis()))
            .send()
            .await;
        match out {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(self.sdk_err("DeleteItem (lock)", e)),
        }
    }

    async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
        let pk = tag_pk(tag);
        let members = self.query_members(&pk).await?;

        let tag_value = AttributeValue::S(tag_hash(tag));
        let removed: Vec<bool> = stream::iter(members.into_iter().map(|(member, w)| {
            let pk = pk.clone();
            let tag_value = tag_value.clone();
            async move {
                // Only if the CURRENT value still carries the tag.
                let out = self
                    .inner
                    .client
                    .delete_item()
                    .table_name(&self.inner.table)
                    .set_key(Some(key_of(&member, VALUE_SK)))
                    .condition_expression("contains(#tags, :tag)")
                    .expression_attribute_names("#tags", "tags")
                    .expression_attribute_values(":tag", tag_value)
                    .return_values(ReturnValue::AllOld)
                    .send()
                    .await;
                let live = match out {
                    Ok(out) => {
                        let live = out
                            .attributes
                            .as_ref()
                            .and_then(|a| match a.get("exp") {
                                Some(AttributeValue::N(n)) => n.parse::<u64>().ok(),
                                _ => None,
                            })
                            .is_some_and(|exp| !is_expired(exp, now_millis()));
                        self.drop_chunks_of(&member, out.attributes, None).await;
                        live
                    }
                    Err(e) if condition_failed(&e) => false,
                    Err(e) => return Err(self.sdk_err("DeleteItem (purge)", e)),
                };
                // Forget the membership unless a put recorded it again since.
                let out = self
                    .inner
                    .client
                    .delete_item()
                    .table_name(&self.inner.table)
                    .set_key(Some(key_of(&pk, &member)))
                    .condition_expression("#w = :w")
                    .expression_attribute_names("#w", "w")
                    .expression_attribute_values(":w", AttributeValue::S(w))
                    .send()
                    .await;
                match out {
                    Ok(_) => {}
                    Err(e) if condition_failed(&e) => {}
                    Err(e) => return Err(self.sdk_err("DeleteItem (tag member)", e)),
                }
                Ok(live)
            }
        }))
        .buffer_unordered(PARALLEL_WRITES)
        .try_collect()
        .await?;
        Ok(removed.into_iter().filter(|l| *l).count() as u64)
    }

    async fn tag_members(&self, tag: &str) -> Result<Vec<StoreKey>, StoreError> {
        let members = self.query_members(&tag_pk(tag)).await?;
        Ok(members
            .iter()
            .filter_map(|(member, _)| StoreKey::parse(member))
            .collect())
    }

    /// One log item per purge, kept [`LOG_RETENTION`].
    async fn announce_purge(&self, notice: &PurgeNotice) -> Result<(), StoreError> {
        let at = now_millis();
        let id = LockToken::generate();
        let exp = at + LOG_RETENTION.as_millis() as u64;
        let item = to_item(&PurgeLogItem {
            pk: PURGE_LOG_PK.into(),
            sk: purge_log_sk(at, id.as_str()),
            tag: notice.tag.clone(),
            soft: notice.soft,
            exp,
            ttl: ttl_secs(exp),
        })?;
        self.inner
            .client
            .put_item()
            .table_name(&self.inner.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| self.sdk_err("PutItem (purge log)", e))?;
        Ok(())
    }

    /// One Query (consistent: a purge logged a moment ago is seen), more
    /// only past 1 MB of items; at most [`LOG_READ_MAX`] entries.
    async fn read_purge_log(&self, since: UnixMillis) -> Result<Vec<PurgeLogEntry>, StoreError> {
        let mut entries = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .inner
                .client
                .query()
                .table_name(&self.inner.table)
                .key_condition_expression("#pk = :pk AND #sk >= :since")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_names("#sk", "sk")
                .expression_attribute_values(":pk", AttributeValue::S(PURGE_LOG_PK.into()))
                .expression_attribute_values(":since", AttributeValue::S(format!("{since:016}")))
                .consistent_read(true)
                .limit((LOG_READ_MAX - entries.len()) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.sdk_err("Query (purge log)", e))?;
            for item in out.items.unwrap_or_default() {
                let logged: PurgeLogItem = from_item(item, "purge log")?;
                let (at, id) = logged.sk.split_once('#').unwrap_or((&logged.sk, ""));
                entries.push(PurgeLogEntry {
                    at: at.parse().unwrap_or(0),
                    id: id.to_owned(),
                    notice: PurgeNotice {
                        tag: logged.tag,
                        soft: logged.soft,
                    },
                });
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() && entries.len() < LOG_READ_MAX => start = Some(k),
                _ => return Ok(entries),
            }
        }
    }
}

impl DynamoStore {
    /// Every member item of the tag set `pk`: (member key, write id).
    async fn query_members(&self, pk: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut members: Vec<(String, String)> = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .inner
                .client
                .query()
                .table_name(&self.inner.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", "pk")
                .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.sdk_err("Query (tag members)", e))?;
            for item in out.items.unwrap_or_default() {
                let m: MemberItem = from_item(item, "tag member")?;
                members.push((m.sk, m.w));
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(members),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c = DynamoConfig::default();
        assert_eq!(c.table, "cachegate");
        assert!(!c.consistent_read);
        assert_eq!(c.operation_timeout, Duration::from_secs(1));
        assert_eq!(c.max_value_bytes, 6 * 1024 * 1024);
        assert_eq!(c.compression_level, 3);
        assert!(c.validate().is_ok());
    }

    /// The settings check zstd's range without linking zstd; this is the
    /// range of the zstd this crate links.
    #[test]
    fn settings_know_zstds_levels() {
        assert_eq!(
            cachegate_store::settings::ZSTD_LEVELS,
            zstd::compression_level_range()
        );
    }

    #[test]
    fn config_from_settings() {
        let c: DynamoConfig = serde_json::from_str(
            r#"{"table": "my-cache", "consistent_read": true, "operation_timeout": "250ms",
                "max_value_bytes": 1048576, "compression_level": 9}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            DynamoConfig {
                table: "my-cache".into(),
                consistent_read: true,
                operation_timeout: Duration::from_millis(250),
                max_value_bytes: 1 << 20,
                compression_level: 9,
            }
        );
        let partial: DynamoConfig = serde_json::from_str(r#"{"table": "t2t"}"#).unwrap();
        assert_eq!(partial.operation_timeout, Duration::from_secs(1));
        assert!(serde_json::from_str::<DynamoConfig>(r#"{"tabel": "x"}"#).is_err());
        assert!(serde_json::from_str::<DynamoConfig>(r#"{"operation_timeout": 5}"#).is_err());
    }

    #[test]
    fn value_item_layout() {
        let item = to_item(&ValueItem {
            pk: "cg1:ab".into(),
            sk: VALUE_SK.into(),
            exp: 1_700_000_000_123,
            ttl: ttl_secs(1_700_000_000_123),
            enc: Encoding::Zstd,
            len: 3,
            val: Some(ByteBuf::from(vec![0u8, 255, 7])),
            gen: None,
            nch: None,
            tags: vec![tag_hash("a"), tag_hash("b")],
        })
        .unwrap();
        assert_eq!(item["ttl"], AttributeValue::N("1700000001".into()));
        assert_eq!(item["exp"], AttributeValue::N("1700000000123".into()));
        assert_eq!(item["enc"], AttributeValue::S("zstd".into()));
        assert!(
            matches!(item["val"], AttributeValue::B(_)),
            "{:?}",
            item["val"]
        );
        assert_eq!(
            item["tags"],
            AttributeValue::Ss(vec![tag_hash("a"), tag_hash("b")])
        );
        assert!(!item.contains_key("gen"));
        let back: ValueItem = from_item(item, "value").unwrap();
        assert_eq!(back.val.unwrap().into_vec(), vec![0u8, 255, 7]);

        let untagged = to_item(&ValueItem {
            pk: "k".into(),
            sk: VALUE_SK.into(),
            exp: 1,
            ttl: 1,
            enc: Encoding::Raw,
            len: 0,
            val: None,
            gen: Some("g".into()),
            nch: Some(2),
            tags: vec![],
        })
        .unwrap();
        assert!(
            !untagged.contains_key("tags"),
            "empty string sets are invalid"
        );
        let back: ValueItem = from_item(untagged, "value").unwrap();
        assert!(back.tags.is_empty());
    }

    #[test]
    fn compression_round_trip_and_incompressible_kept_raw() {
        let text = Bytes::from("hello ".repeat(10_000));
        let (enc, z) = compress(&text, 3).unwrap();
        assert_eq!(enc, Encoding::Zstd);
        assert!(z.len() < text.len() / 10);
        assert_eq!(
            decompress(enc, Bytes::from(z), text.len() as u64, 1 << 20).unwrap(),
            text
        );
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (enc, raw) = compress(&noise, 3).unwrap();
        assert_eq!(enc, Encoding::Raw);
        assert_eq!(raw, noise);
        assert!(decompress(Encoding::Zstd, Bytes::from_static(b"junk"), 4, 100).is_err());
    }

    #[test]
    fn key_namespaces_are_apart() {
        let k = StoreKey::hash("t", ["x"]);
        assert_ne!(lock_pk(&k), k.as_str());
        assert!(tag_pk("a").starts_with("tag#"));
        assert_eq!(chunk_sk("g", 7), "c#g#00007");
    }
}
