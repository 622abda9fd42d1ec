//! Purging a tag: its sorted set's candidates, worked through in batches
//! (see the crate docs for why each candidate is checked).

use cachegate_store::{StoreError, StoreKey, UnixMillis};

use crate::scripts::{FORGET, PURGE_ONE};
use crate::RedisStore;

/// Candidates read from a tag set per round while purging.
pub(crate) const PURGE_BATCH: usize = 256;

impl RedisStore {
    /// The first candidates of a tag set, with their scores as Redis
    /// wrote them.
    pub(crate) async fn read_members(
        &self,
        set: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn();
        self.run(
            "ZRANGE",
            redis::cmd("ZRANGE")
                .arg(set)
                .arg(0)
                .arg(PURGE_BATCH - 1)
                .arg("WITHSCORES")
                .query_async(&mut conn),
        )
        .await
    }

    /// Drop treated candidates from the set, unless a put re-recorded one
    /// meanwhile (its score moved).
    pub(crate) async fn forget_members(
        &self,
        set: &str,
        members: &[(String, String)],
    ) -> Result<(), StoreError> {
        let mut forget = FORGET.key(set);
        for (member, score) in members {
            forget.arg(member).arg(score);
        }
        let mut conn = self.conn();
        self.run("forget", forget.invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    pub(crate) async fn purge_batch(
        &self,
        field: &[u8],
        members: &[(String, String)],
        now: UnixMillis,
    ) -> Result<u64, StoreError> {
        let calls = members.iter().map(|(member, _)| {
            let mut conn = self.conn();
            async move {
                // Members are our own StoreKeys; anything else is not ours.
                let Some(key) = StoreKey::parse(member) else {
                    return Ok(0);
                };
                let vkey = self.value_key(&key);
                self.run(
                    "purge",
                    PURGE_ONE
                        .key(vkey)
                        .arg(field)
                        .arg(now)
                        .invoke_async::<u64>(&mut conn),
                )
                .await
            }
        });
        let results = futures_util::future::join_all(calls).await;
        let mut removed = 0;
        for r in results {
            removed += r?;
        }
        Ok(removed)
    }
}
