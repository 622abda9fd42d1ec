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
//! | rate budget | `rate#<key>`      | `r`                    | `tat` N (theoretical arrival time, unix micros of the writers' clocks), `ttl` N (about a minute past `tat`) |
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
//! - **Rate budget.** [`CacheStore::take_permit`] makes the GCRA step on
//!   the client's clock as one UpdateItem conditioned on the step's case:
//!   a busy budget (`now <= tat <= now + tolerance + max_wait`) gets
//!   `tat = tat + emission` from DynamoDB itself, so concurrent grants never
//!   conflict; an idle one (no `tat`, or `tat < now`) gets `now + emission`.
//!   A failed condition says which case holds (from the item it returns, or
//!   a strongly consistent read): the other is tried, a bounded number of
//!   times, then an error; or the call is denied. A denial writes nothing.
//!   `rate#` keeps budgets apart from values and locks.
//!
//! Every SDK call is bounded by [`DynamoConfig::operation_timeout`], retries
//! included (standard retry mode, at most 3 attempts of at most half the
//! timeout each, backoff from a twentieth of it); a timeout becomes
//! [`StoreError::Timeout`], throttling and other service errors
//! [`StoreError::Backend`]. Chunked puts, deletes and purges make several
//! calls, each so bounded.

mod batch;
mod codec;
mod connect;
mod errors;
mod items;
mod permit;
mod purge_log;
mod requests;
mod scan;
mod table;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;
use bytes::Bytes;
use cachegate_store::shared::{prepare_put, PutPlan};
use cachegate_store::{
    is_expired, now_millis, CacheStore, Capabilities, LockToken, Permit, PurgeLogEntry,
    PurgeNotice, PutOptions, Rate, StoreError, StoreKey, UnixMillis,
};
use futures_util::{stream, StreamExt, TryStreamExt};
use serde_bytes::ByteBuf;

pub use aws_config;
pub use aws_sdk_dynamodb;

pub use cachegate_store::settings::DynamoConfig;
pub use connect::{capabilities, connect, connect_with, ConnectError};
pub use table::{TableError, TableStatus, TtlState};

use batch::PARALLEL_WRITES;
use codec::{compress, cpu, decompress};
use errors::condition_failed;
use items::{
    chunk_sk, from_item, key_of, lock_pk, num, tag_hash, tag_pk, to_item, ttl_secs, was_live,
    ChunkItem, Item, LockItem, MemberItem, ValueItem, LOCK_SK, VALUE_SK,
};

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

    /// Every member item of the tag set `pk`: (member key, write id).
    async fn query_members(&self, pk: &str) -> Result<Vec<(String, String)>, StoreError> {
        let items = self
            .query_all("Query (tag members)", None, |q| {
                q.key_condition_expression("#pk = :pk")
                    .expression_attribute_names("#pk", "pk")
                    .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
            })
            .await?;
        items
            .into_iter()
            .map(|item| {
                let m: MemberItem = from_item(item, "tag member")?;
                Ok((m.sk, m.w))
            })
            .collect()
    }
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
        let tags: Vec<String> = match prepare_put(&self.inner.caps, value.len(), opts)? {
            PutPlan::Store(put) => put.tags.into_iter().map(tag_hash).collect(),
            PutPlan::Remove => {
                self.delete(key).await?;
                return Ok(());
            }
        };
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
            .put_request(value_item.clone())
            .condition_expression("attribute_not_exists(#gen)")
            .expression_attribute_names("#gen", "gen")
            .send()
            .await;
        let out = match first {
            Ok(_) => return Ok(()),
            Err(e) if condition_failed(&e) => {
                self.put_request(value_item)
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
        let live = was_live(out.attributes.as_ref());
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
            .put_request(item)
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

    /// A conditional UpdateItem on the budget's item (see the crate docs).
    async fn take_permit(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError> {
        self.take_permit_step(key, rate, max_wait).await
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
                        let live = was_live(out.attributes.as_ref());
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

    async fn scan_values(
        &self,
        cursor: Option<&str>,
    ) -> Result<cachegate_store::ScanPage, StoreError> {
        self.scan_page(cursor).await
    }

    /// One log item per purge, kept [`LOG_RETENTION`](cachegate_store::coherence::LOG_RETENTION).
    async fn announce_purge(&self, notice: &PurgeNotice) -> Result<(), StoreError> {
        self.append_purge_log(notice).await
    }

    /// The purge log from `since` (see [`DynamoStore::query_purge_log`]).
    async fn read_purge_log(&self, since: UnixMillis) -> Result<Vec<PurgeLogEntry>, StoreError> {
        self.query_purge_log(since).await
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
}
