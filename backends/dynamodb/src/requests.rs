//! The two requests several operations make, written once: a PutItem on
//! the table, and a Query read page after page.

use aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use cachegate_store::StoreError;

use crate::items::Item;
use crate::DynamoStore;

impl DynamoStore {
    /// A PutItem of `item` on the table; callers add conditions and what
    /// to return.
    pub(crate) fn put_request(&self, item: Item) -> PutItemFluentBuilder {
        self.inner
            .client
            .put_item()
            .table_name(&self.inner.table)
            .set_item(Some(item))
    }

    /// An unconditional PutItem of `item` (`op` names it in errors).
    pub(crate) async fn put_one(&self, item: Item, op: &'static str) -> Result<(), StoreError> {
        self.put_request(item)
            .send()
            .await
            .map(drop)
            .map_err(|e| self.sdk_err(op, e))
    }

    /// Every item a Query on the table finds, strongly consistent (a write
    /// of a moment ago is seen), page after page (DynamoDB ends a page at
    /// 1 MB of items), at most `max` when given. `query` adds the key
    /// condition; `op` names the Query in errors.
    pub(crate) async fn query_all(
        &self,
        op: &'static str,
        max: Option<usize>,
        query: impl Fn(QueryFluentBuilder) -> QueryFluentBuilder,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items: Vec<Item> = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut request = query(self.inner.client.query())
                .table_name(&self.inner.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            if let Some(max) = max {
                let left = max.saturating_sub(items.len());
                request = request.limit(i32::try_from(left).unwrap_or(i32::MAX));
            }
            let out = request.send().await.map_err(|e| self.sdk_err(op, e))?;
            items.extend(out.items.unwrap_or_default());
            let full = max.is_some_and(|max| items.len() >= max);
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() && !full => start = Some(k),
                _ => return Ok(items),
            }
        }
    }
}
