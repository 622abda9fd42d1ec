//! The purge log: one item per purge (`pk = "purge-log"`), which the
//! other instances read to drop what it names from their L1s.

use aws_sdk_dynamodb::types::AttributeValue;
use cachegate_store::coherence::{LOG_READ_MAX, LOG_RETENTION};
use cachegate_store::{now_millis, LockToken, PurgeLogEntry, PurgeNotice, StoreError, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::items::{from_item, to_item, ttl_secs};
use crate::DynamoStore;

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

impl DynamoStore {
    /// One log item per purge, kept [`LOG_RETENTION`].
    pub(crate) async fn append_purge_log(&self, notice: &PurgeNotice) -> Result<(), StoreError> {
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
        self.put_one(item, "PutItem (purge log)").await
    }

    /// The purge log from `since`, oldest first: one Query (consistent:
    /// a purge logged a moment ago is seen), more only past 1 MB of items;
    /// at most [`LOG_READ_MAX`] entries.
    pub(crate) async fn query_purge_log(
        &self,
        since: UnixMillis,
    ) -> Result<Vec<PurgeLogEntry>, StoreError> {
        let items = self
            .query_all("Query (purge log)", Some(LOG_READ_MAX), |q| {
                q.key_condition_expression("#pk = :pk AND #sk >= :since")
                    .expression_attribute_names("#pk", "pk")
                    .expression_attribute_names("#sk", "sk")
                    .expression_attribute_values(":pk", AttributeValue::S(PURGE_LOG_PK.into()))
                    .expression_attribute_values(
                        ":since",
                        AttributeValue::S(format!("{since:016}")),
                    )
            })
            .await?;
        items
            .into_iter()
            .map(|item| {
                let logged: PurgeLogItem = from_item(item, "purge log")?;
                let (at, id) = logged.sk.split_once('#').unwrap_or((&logged.sk, ""));
                Ok(PurgeLogEntry {
                    at: at.parse().unwrap_or(0),
                    id: id.to_owned(),
                    notice: PurgeNotice {
                        tag: logged.tag,
                        soft: logged.soft,
                    },
                })
            })
            .collect()
    }
}
