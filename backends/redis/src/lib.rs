//! The Redis backend of cachegate: [`CacheStore`] on a standalone Redis or
//! Valkey (plain or TLS, AUTH token or ACL user) or on a Redis Cluster
//! (ElastiCache cluster mode).
//!
//! One [`RedisStore`] per process, made at start-up by [`connect`]; clones
//! share one multiplexed connection (a `ConnectionManager`, or the cluster
//! client's connections), which reconnects by itself after a drop, and is
//! replaced when it goes silent (see `Shared` for why that is needed). Every
//! command is bounded by [`RedisConfig::response_timeout`] and every
//! connection attempt by [`RedisConfig::connect_timeout`]; the proxy's
//! breaker (`cachegate_store::guard`) sits on top.
//!
//! # Key layout
//!
//! With `P` the configured `key_prefix` and `K` a [`StoreKey`]
//! (`cg1:<64 hex>`):
//!
//! | key           | type | holds |
//! |---------------|------|-------|
//! | `P` `v:{K}`   | hash | `b`: the value bytes; `e`: `expires_at` (decimal unix ms); `w`: the put's [`WriteId`] (16 bytes); one field `t:<tag>` per tag the value carries |
//! | `P` `l:{K}`   | string | a lock: the owner's token, `SET NX PX` |
//! | `P` `r:{K}`   | string | a rate budget's TAT: decimal unix microseconds of the server's `TIME`, expiring [`PERMIT_SLACK_MS`] after it (see [`CacheStore::take_permit`]) |
//! | `P` `t:{T}`   | sorted set | one tag's members: the `K`s stored with it, scored by their `expires_at`; `T` = [`StoreKey::for_tag`] |
//!
//! Every command touches exactly one key (multi-key work is done as several
//! single-key commands or single-key scripts), so it all works in cluster
//! mode without cross-slot errors. The `{…}` hash tags still pin a value and
//! its lock to the same slot, and keep a prefix from deciding the slot.
//!
//! # Why the tags live inside the value's hash
//!
//! A purge must remove exactly the keys whose *current* value carries the
//! tag: a key stored with tag `a` and later overwritten without it must
//! survive a purge of `a`. Keeping the value and its tag list in one hash,
//! written by one script, makes "which tags does the current value carry"
//! exact and atomic: an overwrite replaces both at once, and there is no
//! second per-key record that could drift from the value or outlive it
//! (it expires with the value, by Redis's own TTL). The tag's sorted set is
//! only a candidate list; the purge checks each candidate's `t:<tag>` field
//! and deletes it in the same single-key script. Candidates that were
//! overwritten, deleted or expired cost one cheap script call and are
//! dropped from the set.
//!
//! Write order: a put adds the key to its tags' sets first and writes the
//! value second. If it dies in between, the set has a stale candidate
//! (harmless); the other order could leave a tagged value no purge finds.
//! Each tag set expires no earlier than the longest-lived value in it
//! (its TTL only grows) and drops members whose values have expired on each
//! put, so sets of long-lived busy tags do not grow without bound.
//!
//! # Expiry
//!
//! Values get a relative Redis TTL (`PEXPIRE expires_at - now`), so Redis
//! evicts them by itself whatever its own clock says, and reads also check
//! the stored `expires_at` against the local clock, so a value is never
//! returned past its `expires_at` even in the milliseconds before Redis
//! drops it.

mod conn;
mod connect;
mod pubsub;
mod purge;
mod scan;
mod scripts;

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cachegate_store::rate::max_wait_us;
use cachegate_store::shared::{prepare_put, PutPlan};
use cachegate_store::{
    is_expired, now_millis, CacheStore, Capabilities, LockToken, Permit, PurgeListener,
    PurgeNotice, PutOptions, Rate, Read, Seen, StoreError, StoreKey, UnixMillis, WriteId,
};
use redis::Client;

pub use cachegate_store::settings::{redact_url, RedisConfig};
pub use connect::{capabilities, connect, ConnectError};

use conn::Shared;
use connect::send_allowance;
use scripts::{tag_field, DELETE, PUT, READ_SINCE, TAG_ADD, TAKE_PERMIT, UNLOCK};

const BACKEND: &str = "redis";

/// Tag-set members whose values expired longer ago than this are dropped
/// on the next put to the set. The slack covers clock differences between
/// the instances that write (scores are their clocks' `expires_at`).
const TAG_TRIM_SLACK_MS: u64 = 60_000;
/// Extra lifetime of a tag set beyond its longest-lived member.
const TAG_TTL_SLACK_MS: u64 = 60_000;
/// How long a rate budget's key outlives its TAT. Past the TAT the budget
/// is as good as absent; the slack only spares a budget in use from being
/// re-created every emission.
pub const PERMIT_SLACK_MS: u64 = 1_000;
/// From this size of the value a reader holds, a read naming its write
/// runs [`READ_SINCE`], which sends the value only if the key holds
/// another write now; below it, a plain HMGET sends the value along (a
/// Lua call costs Redis more than a few KiB on the wire: 1 KB hits were
/// 19 % slower through the script, 64 KB ones 58 % faster;
/// docs/benchmarks.md, "Reads that name a write").
const CHECKED_READ_MIN_BYTES: usize = 8 * 1024;
/// Longest Redis TTL set (ten years); `expires_at` further out is still
/// stored and checked exactly, Redis just evicts by this bound.
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A [`CacheStore`] on Redis. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
    /// Where purge subscriptions go: the server, or each configured node
    /// of a cluster in turn (see [`RedisStore::watch_purges`]).
    subscribe_via: Arc<[Client]>,
    /// The purge channel: `P` `purges`.
    channel: Arc<str>,
    connect_timeout: Duration,
    prefix: Arc<str>,
    target: Arc<str>,
    cluster: bool,
    response_timeout: Duration,
    caps: Capabilities,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.target)
            .field(
                "mode",
                if self.cluster {
                    &"cluster"
                } else {
                    &"standalone"
                },
            )
            .field("key_prefix", &self.prefix)
            .field("response_timeout", &self.response_timeout)
            .field("max_value_bytes", &self.caps.max_value_bytes)
            .finish()
    }
}

impl RedisStore {
    fn value_key(&self, key: &StoreKey) -> String {
        format!("{}v:{{{}}}", self.prefix, key.as_str())
    }

    fn lock_key(&self, key: &StoreKey) -> String {
        format!("{}l:{{{}}}", self.prefix, key.as_str())
    }

    fn permit_key(&self, key: &StoreKey) -> String {
        format!("{}r:{{{}}}", self.prefix, key.as_str())
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}t:{{{}}}", self.prefix, StoreKey::for_tag(tag).as_str())
    }

    /// A round trip to the server (for `cachegate init` and health checks).
    /// In cluster mode, PING goes to every primary.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let reply: String = self
            .run("PING", redis::cmd("PING").query_async(&mut conn))
            .await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(StoreError::backend(
                BACKEND,
                format!("PING answered {reply:?}"),
            ))
        }
    }

    /// Where this store points (URLs with any password redacted).
    pub fn target(&self) -> &str {
        &self.target
    }
}

#[async_trait]
impl CacheStore for RedisStore {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        match self.get_since(key, None).await? {
            Read::Current(value) => Ok(value.map(|(v, _)| v)),
            Read::Unchanged => Ok(None), // not for a read that names no write
        }
    }

    async fn get_since(&self, key: &StoreKey, seen: Option<Seen<'_>>) -> Result<Read, StoreError> {
        let mut conn = self.conn();
        let vkey = self.value_key(key);
        let (expires_at, write, value): (Option<UnixMillis>, Option<Bytes>, Option<Bytes>) =
            match seen {
                Some(seen) if seen.len >= CHECKED_READ_MIN_BYTES => {
                    let mut reply: Vec<Option<Bytes>> = self
                        .run(
                            "read since",
                            READ_SINCE
                                .key(vkey)
                                .arg(seen.write.as_bytes())
                                .invoke_async(&mut conn),
                        )
                        .await?;
                    let expires_at = match reply.first() {
                        Some(Some(e)) => std::str::from_utf8(e).ok().and_then(|e| e.parse().ok()),
                        _ => None,
                    };
                    if reply.len() == 1 {
                        return Ok(match expires_at {
                            Some(e) if !is_expired(e, now_millis()) => Read::Unchanged,
                            _ => Read::Current(None),
                        });
                    }
                    reply.resize(3, None);
                    let value = reply.pop().flatten();
                    let write = reply.pop().flatten();
                    (expires_at, write, value)
                }
                // Small (or nothing held): the value comes along with its
                // write id, a plain HMGET.
                _ => {
                    self.run(
                        "HMGET",
                        redis::cmd("HMGET")
                            .arg(vkey)
                            .arg("e")
                            .arg("w")
                            .arg("b")
                            .query_async(&mut conn),
                    )
                    .await?
                }
            };
        let (Some(value), Some(e)) = (value, expires_at) else {
            return Ok(Read::Current(None));
        };
        if is_expired(e, now_millis()) {
            return Ok(Read::Current(None));
        }
        let write = write.map(WriteId::from_stored);
        Ok(match (seen, write) {
            (Some(seen), Some(write)) if seen.write == &write => Read::Unchanged,
            (_, write) => Read::Current(Some((value, write))),
        })
    }

    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        let vkey = self.value_key(key);
        let (now, tags) = match prepare_put(&self.caps, value.len(), opts)? {
            PutPlan::Store(put) => (put.now, put.tags),
            PutPlan::Remove => {
                // Dead on arrival: whatever was there is replaced by nothing.
                let mut conn = self.conn();
                self.run(
                    "DEL",
                    redis::cmd("DEL").arg(&vkey).query_async::<i64>(&mut conn),
                )
                .await?;
                return Ok(());
            }
        };
        let ttl_ms = (opts.expires_at - now).min(MAX_TTL_MS);

        // Tags first (see the crate docs for why this order).
        // All tag sets at once (one round trip on the multiplexed
        // connection), each a single-key script in its own slot.
        let adds = tags.iter().map(|tag| {
            let mut conn = self.conn();
            let set = self.tag_key(tag);
            async move {
                self.run(
                    "tag add",
                    TAG_ADD
                        .key(set)
                        .arg(key.as_str())
                        .arg(opts.expires_at)
                        .arg(now.saturating_sub(TAG_TRIM_SLACK_MS))
                        .arg(ttl_ms.saturating_add(TAG_TTL_SLACK_MS))
                        .invoke_async::<i64>(&mut conn),
                )
                .await
            }
        });
        for added in futures_util::future::join_all(adds).await {
            added?;
        }

        let mut put = PUT.key(vkey);
        put.arg(value.as_ref())
            .arg(opts.expires_at)
            .arg(ttl_ms)
            .arg(WriteId::generate().as_bytes());
        for tag in &tags {
            put.arg(tag_field(tag));
        }
        let mut conn = self.conn();
        // A large value takes time to send: add 1 ms per 32 KiB (8 MiB:
        // +256 ms) to the backstop; the proxy's write timeout still applies.
        let limit = self.response_timeout + send_allowance(value.len() as u64);
        self.run_within("put", limit, put.invoke_async::<i64>(&mut conn))
            .await?;
        Ok(())
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let removed: i64 = self
            .run(
                "delete",
                DELETE
                    .key(self.value_key(key))
                    .arg(now_millis())
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(removed == 1)
    }

    async fn try_lock(
        &self,
        key: &StoreKey,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        let token = LockToken::generate();
        let ttl_ms = u64::try_from(ttl.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_TTL_MS);
        let mut conn = self.conn();
        let set: Option<String> = self
            .run(
                "SET NX",
                redis::cmd("SET")
                    .arg(self.lock_key(key))
                    .arg(token.as_str())
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(set.map(|_| token))
    }

    async fn unlock(&self, key: &StoreKey, token: &LockToken) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let released: i64 = self
            .run(
                "unlock",
                UNLOCK
                    .key(self.lock_key(key))
                    .arg(token.as_str())
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(released == 1)
    }

    /// One script call ([`TAKE_PERMIT`]): the step is atomic on the
    /// server and uses the server's clock; on a cluster the budget's one
    /// key lives on one primary (a failover to a replica whose clock is
    /// off by some milliseconds shifts the budget by as much, once).
    async fn take_permit(
        &self,
        key: &StoreKey,
        rate: Rate,
        max_wait: Duration,
    ) -> Result<Permit, StoreError> {
        rate.check(BACKEND)?;
        let mut conn = self.conn();
        let (granted, micros): (i64, u64) = self
            .run(
                "take permit",
                TAKE_PERMIT
                    .key(self.permit_key(key))
                    .arg(rate.emission_us())
                    .arg(rate.tolerance_us())
                    .arg(max_wait_us(max_wait))
                    .arg(PERMIT_SLACK_MS)
                    .invoke_async(&mut conn),
            )
            .await?;
        let d = Duration::from_micros(micros);
        Ok(if granted == 1 {
            Permit::Granted { wait: d }
        } else {
            Permit::Denied { retry_in: d }
        })
    }

    /// Works through the tag's candidates in batches: deletes each one
    /// whose current value still carries the tag, then drops the batch
    /// from the set. Cancellation-safe: a purge stopped half-way (the
    /// caller's timeout) leaves the untreated candidates in the set for the
    /// next purge, never loses them.
    async fn purge_tag(&self, tag: &str) -> Result<u64, StoreError> {
        let set = self.tag_key(tag);
        let field = tag_field(tag);
        let mut removed = 0;
        loop {
            let members = self.read_members(&set).await?;
            if members.is_empty() {
                return Ok(removed);
            }
            removed += self.purge_batch(&field, &members, now_millis()).await?;
            self.forget_members(&set, &members).await?;
        }
    }

    async fn tag_members(&self, tag: &str) -> Result<Vec<StoreKey>, StoreError> {
        let mut conn = self.conn();
        let members: Vec<String> = self
            .run(
                "ZRANGE",
                redis::cmd("ZRANGE")
                    .arg(self.tag_key(tag))
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(members.iter().filter_map(|m| StoreKey::parse(m)).collect())
    }

    async fn scan_values(
        &self,
        cursor: Option<&str>,
    ) -> Result<cachegate_store::ScanPage, StoreError> {
        self.scan_page(cursor).await
    }

    /// PUBLISH on the purge channel. On a cluster, a PUBLISH reaches the
    /// subscribers of every node (the cluster bus forwards it).
    async fn announce_purge(&self, notice: &PurgeNotice) -> Result<(), StoreError> {
        let mut conn = self.conn();
        self.run(
            "PUBLISH",
            redis::cmd("PUBLISH")
                .arg(&*self.channel)
                .arg(notice.encode())
                .query_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }

    /// A task of its own keeps one SUBSCRIBE connection to the purge
    /// channel, pinged every [`SUBSCRIPTION_PING_EVERY`] (a connection that
    /// went silent would otherwise look subscribed forever). It tells the
    /// listener when the subscription is made and when it is lost, and
    /// makes it again (on a cluster, through the next node) until the
    /// listener is dropped.
    fn watch_purges(&self, listener: Weak<dyn PurgeListener>) {
        tokio::spawn(pubsub::keep_subscribed(
            self.subscribe_via.clone(),
            self.channel.clone(),
            listener,
            self.connect_timeout.max(self.response_timeout),
        ));
    }
}
