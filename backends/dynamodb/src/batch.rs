//! Multi-item reads and writes: a chunked value's pieces (BatchGetItem),
//! batched deletes (BatchWriteItem) and parallel puts.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, KeysAndAttributes, WriteRequest};
use bytes::{Bytes, BytesMut};
use cachegate_store::{StoreError, StoreKey};
use futures_util::{stream, StreamExt, TryStreamExt};

use crate::items::{chunk_sk, from_item, key_of, ChunkItem, Item};
use crate::{DynamoStore, BACKEND};

/// Chunk keys read per BatchGetItem (at most 100 keys, 16 MB per response).
pub(crate) const BATCH_GET_KEYS: usize = 40;
/// Items per BatchWriteItem (DynamoDB's limit).
pub(crate) const BATCH_WRITE_ITEMS: usize = 25;
/// Chunk puts, member puts and purge deletes in flight at once.
pub(crate) const PARALLEL_WRITES: usize = 8;

impl DynamoStore {
    /// All chunks of `gen`, in order, or `None` when any is missing (the
    /// generation was replaced and removed since its value item was read).
    pub(crate) async fn read_chunks(
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
    pub(crate) async fn delete_keys(&self, keys: Vec<Item>) -> Result<(), StoreError> {
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
    pub(crate) async fn drop_chunks_of(&self, key: &str, old: Option<Item>, keep: Option<&str>) {
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

    pub(crate) async fn put_items(&self, items: Vec<Item>) -> Result<(), StoreError> {
        stream::iter(
            items
                .into_iter()
                .map(|item| async move { self.put_one(item, "PutItem").await }),
        )
        .buffer_unordered(PARALLEL_WRITES)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
    }
}
