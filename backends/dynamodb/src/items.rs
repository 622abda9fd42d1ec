//! The table's items as Rust types (see the crate docs for the layout),
//! and the keys and attributes they are addressed by.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use cachegate_store::{is_expired, now_millis, StoreError, StoreKey, UnixMillis};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::BACKEND;

pub(crate) const VALUE_SK: &str = "v";
pub(crate) const LOCK_SK: &str = "l";
pub(crate) const PERMIT_SK: &str = "r";

/// How the stored bytes relate to the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Encoding {
    Raw,
    Zstd,
}

/// The value item (`sk = "v"`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ValueItem {
    pub(crate) pk: String,
    pub(crate) sk: String,
    pub(crate) exp: UnixMillis,
    pub(crate) ttl: u64,
    pub(crate) enc: Encoding,
    pub(crate) len: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) val: Option<ByteBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) nch: Option<u32>,
    #[serde(
        default,
        with = "serde_dynamo::string_set",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) tags: Vec<String>,
}

/// One piece of a chunked value (`sk = "c#<gen>#<n>"`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChunkItem {
    pub(crate) pk: String,
    pub(crate) sk: String,
    pub(crate) val: ByteBuf,
    pub(crate) ttl: u64,
}

/// A tag's member (`pk = "tag#<tag hash>"`, `sk = <key>`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MemberItem {
    pub(crate) pk: String,
    pub(crate) sk: String,
    pub(crate) exp: UnixMillis,
    pub(crate) ttl: u64,
    pub(crate) w: String,
}

/// A lock (`pk = "lock#<key>"`, `sk = "l"`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LockItem {
    pub(crate) pk: String,
    pub(crate) sk: String,
    pub(crate) own: String,
    pub(crate) exp: UnixMillis,
    pub(crate) ttl: u64,
}

/// A rate budget (`pk = "rate#<key>"`, `sk = "r"`), written by UpdateItem.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PermitItem {
    pub(crate) pk: String,
    pub(crate) sk: String,
    /// The theoretical arrival time: unix microseconds, writers' clocks.
    pub(crate) tat: u64,
    pub(crate) ttl: u64,
}

pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) fn to_item<T: Serialize>(v: &T) -> Result<Item, StoreError> {
    serde_dynamo::to_item(v).map_err(|e| StoreError::backend(BACKEND, format!("encode item: {e}")))
}

pub(crate) fn from_item<T: for<'de> Deserialize<'de>>(
    item: Item,
    what: &str,
) -> Result<T, StoreError> {
    serde_dynamo::from_item(item)
        .map_err(|e| StoreError::backend(BACKEND, format!("malformed {what} item: {e}")))
}

pub(crate) fn key_of(pk: &str, sk: &str) -> Item {
    HashMap::from([
        ("pk".to_string(), AttributeValue::S(pk.to_string())),
        ("sk".to_string(), AttributeValue::S(sk.to_string())),
    ])
}

pub(crate) fn chunk_sk(gen: &str, n: u32) -> String {
    format!("c#{gen}#{n:05}")
}

pub(crate) fn tag_hash(tag: &str) -> String {
    StoreKey::for_tag(tag).digest().to_string()
}

pub(crate) fn tag_pk(tag: &str) -> String {
    format!("tag#{}", tag_hash(tag))
}

pub(crate) fn lock_pk(key: &StoreKey) -> String {
    format!("lock#{}", key.as_str())
}

pub(crate) fn permit_pk(key: &StoreKey) -> String {
    format!("rate#{}", key.as_str())
}

/// `exp` (unix millis) rounded up to epoch seconds, for the TTL attribute.
pub(crate) fn ttl_secs(exp: UnixMillis) -> u64 {
    exp.div_ceil(1000)
}

pub(crate) fn num(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

/// Whether the item a delete returned (`ReturnValues: ALL_OLD`) held a
/// value that was still live: its `exp` is in the future.
pub(crate) fn was_live(old: Option<&Item>) -> bool {
    old.and_then(|a| match a.get("exp") {
        Some(AttributeValue::N(n)) => n.parse::<u64>().ok(),
        _ => None,
    })
    .is_some_and(|exp| !is_expired(exp, now_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn key_namespaces_are_apart() {
        let k = StoreKey::hash("t", ["x"]);
        assert_ne!(lock_pk(&k), k.as_str());
        assert_ne!(permit_pk(&k), k.as_str());
        assert_ne!(permit_pk(&k), lock_pk(&k));
        assert!(tag_pk("a").starts_with("tag#"));
        assert_eq!(chunk_sk("g", 7), "c#g#00007");
    }
}
