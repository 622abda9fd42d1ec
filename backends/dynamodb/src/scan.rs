//! Listing the keys that hold values ([`CacheStore::scan_values`]): a
//! `Scan` of the table for value items (`sk = "v"`), their `pk` only. The
//! page cursor is the `pk` of the last item DynamoDB evaluated (every
//! `LastEvaluatedKey` of this table is a `pk` and an `sk`; both go in the
//! cursor, `sk` after the first `\n`). A Scan reads, and is billed for,
//! the whole table: it is for operators (purges by prefix), never the
//! request path.
//!
//! [`CacheStore::scan_values`]: cachegate_store::CacheStore::scan_values

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use cachegate_store::{now_millis, ScanPage, StoreError, StoreKey};

use crate::{DynamoStore, BACKEND};

impl DynamoStore {
    /// One page of the value keys (see the module documentation).
    pub(crate) async fn scan_page(&self, cursor: Option<&str>) -> Result<ScanPage, StoreError> {
        let start = match cursor {
            None => None,
            Some(c) => Some(start_key(c).ok_or_else(|| {
                StoreError::backend(BACKEND, format!("not a scan cursor: {c:?}"))
            })?),
        };
        let out = self
            .inner
            .client
            .scan()
            .table_name(&self.inner.table)
            // Strongly consistent, as every read of this store: a value
            // removed a moment ago is not listed.
            .consistent_read(true)
            .filter_expression("#sk = :v AND #exp > :now")
            .projection_expression("#pk")
            .expression_attribute_names("#pk", "pk")
            .expression_attribute_names("#sk", "sk")
            .expression_attribute_names("#exp", "exp")
            .expression_attribute_values(":v", AttributeValue::S("v".into()))
            .expression_attribute_values(":now", AttributeValue::N(now_millis().to_string()))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| self.sdk_err("Scan (value keys)", e))?;
        let keys = out
            .items
            .unwrap_or_default()
            .iter()
            .filter_map(|item| {
                item.get("pk")?
                    .as_s()
                    .ok()
                    .and_then(|pk| StoreKey::parse(pk))
            })
            .collect();
        let next = out
            .last_evaluated_key
            .filter(|k| !k.is_empty())
            .and_then(|k| {
                let pk = k.get("pk")?.as_s().ok()?;
                let sk = k.get("sk")?.as_s().ok()?;
                Some(format!("{pk}\n{sk}"))
            });
        Ok(ScanPage { keys, next })
    }
}

/// The `ExclusiveStartKey` a cursor names.
fn start_key(cursor: &str) -> Option<HashMap<String, AttributeValue>> {
    let (pk, sk) = cursor.split_once('\n')?;
    Some(HashMap::from([
        ("pk".to_owned(), AttributeValue::S(pk.to_owned())),
        ("sk".to_owned(), AttributeValue::S(sk.to_owned())),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_a_start_key() {
        let k = start_key("tag#ab\ncg1:00").unwrap();
        assert_eq!(k["pk"].as_s().unwrap(), "tag#ab");
        assert_eq!(k["sk"].as_s().unwrap(), "cg1:00");
        assert!(start_key("no newline").is_none());
    }
}
