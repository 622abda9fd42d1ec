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
//! | `P` `v:{K}`   | hash | `b`: the value bytes; `e`: `expires_at` (decimal unix ms); one field `t:<tag>` per tag the value carries |
//! | `P` `l:{K}`   | string | a lock: the owner's token, `SET NX PX` |
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

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cachegate_store::{
    is_expired, now_millis, CacheStore, Capabilities, LockToken, PurgeFeed, PurgeListener,
    PurgeNotice, PutOptions, StoreError, StoreKey, UnixMillis,
};
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    Script, ServerErrorKind, TlsCertificates, Value,
};

pub use cachegate_store::settings::{redact_url, RedisConfig};

const BACKEND: &str = "redis";

/// Tag-set members whose values expired longer ago than this are dropped
/// on the next put to the set. The slack covers clock differences between
/// the instances that write (scores are their clocks' `expires_at`).
const TAG_TRIM_SLACK_MS: u64 = 60_000;
/// Extra lifetime of a tag set beyond its longest-lived member.
const TAG_TTL_SLACK_MS: u64 = 60_000;
/// Longest Redis TTL set (ten years); `expires_at` further out is still
/// stored and checked exactly, Redis just evicts by this bound.
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;
/// Candidates read from a tag set per round while purging.
const PURGE_BATCH: usize = 256;

/// Why [`connect`] failed. Messages name what failed (which setting, which
/// server) and never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis.{field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("redis.ca_file: cannot read {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("redis at {target}: authentication failed{user}: {message}")]
    Auth {
        target: String,
        user: String,
        message: String,
    },
    #[error("redis at {target}: no answer within {after:?} (connect_timeout); is it reachable, and is TLS (rediss://) right for it?")]
    Timeout { target: String, after: Duration },
    #[error("redis at {target}: {message}")]
    Connect { target: String, message: String },
}

/// The connection every clone of a [`RedisStore`] shares.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Makes a fresh connection of the configured kind without waiting for it
/// (it connects on first use).
enum Factory {
    Single {
        client: Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: ClusterClient,
        config: ClusterConfig,
    },
}

impl Factory {
    fn fresh(&self) -> Result<Conn, RedisError> {
        match self {
            Factory::Single { client, config } => {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(Conn::Single)
            }
            Factory::Cluster { client, config } => Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(config.clone()),
            )),
        }
    }
}

/// Commands in a row that got no reply at all before a fresh connection
/// replaces the current one.
const STALL_LIMIT: u32 = 2;
/// At most one replacement per this interval.
const MIN_REPLACE_INTERVAL: Duration = Duration::from_secs(1);

/// What every clone of a [`RedisStore`] shares.
///
/// The connection manager reconnects by itself when the connection fails
/// (reset, refused, closed), but not when it goes silent: a reply that
/// never comes is a timeout, which it retries on the same socket. That is
/// what a connection dropped without a reset looks like, e.g. one that sat
/// idle in a frozen Lambda execution environment past the 350 s idle limit
/// of Lambda's VPC networking. So commands that get no reply (they time out
/// here, or the caller's own timeout drops them first) are counted, and
/// after [`STALL_LIMIT`] in a row with no reply in between the connection is
/// replaced by a fresh one.
struct Shared {
    conn: RwLock<Conn>,
    factory: Factory,
    stalled: AtomicU32,
    last_replaced: Mutex<Option<Instant>>,
}

impl Shared {
    fn conn(&self) -> Conn {
        if self.stalled.load(Ordering::Relaxed) >= STALL_LIMIT {
            self.replace_connection();
        }
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace_connection(&self) {
        let mut last = self.last_replaced.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < MIN_REPLACE_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        let stalled = self.stalled.swap(0, Ordering::Relaxed);
        match self.factory.fresh() {
            Ok(fresh) => {
                *self.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                tracing::warn!(
                    backend = BACKEND,
                    unanswered = stalled,
                    "redis connection stopped answering; replaced it with a fresh one"
                );
            }
            Err(e) => tracing::warn!(
                backend = BACKEND,
                error = %e,
                "redis connection stopped answering and a fresh one could not be made"
            ),
        }
    }
}

/// Counts a command as unanswered unless it is marked answered before it
/// is dropped (which also covers the caller's timeout dropping it).
struct InFlight<'a> {
    shared: &'a Shared,
    answered: bool,
}

impl InFlight<'_> {
    fn answered(mut self) {
        self.answered = true;
        self.shared.stalled.store(0, Ordering::Relaxed);
    }
    /// Failed without a reply from the server, but not by silence (refused,
    /// reset): the connection manager reconnects by itself.
    fn failed_fast(mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.stalled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

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

// --- scripts (each touches exactly one key: KEYS[1]) ---

/// Replace a value: its bytes, expiry and tag fields, with a relative TTL.
/// ARGV: bytes, expires_at, ttl_ms, then one `t:<tag>` field name per tag.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'b', ARGV[1], 'e', ARGV[2])
for i = 4, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], '1')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// Delete a value; 1 if it was there and live at ARGV[1] (now).
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local e = redis.call('HGET', KEYS[1], 'e')
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
if e and tonumber(e) > tonumber(ARGV[1]) then return 1 end
return 0
",
    )
});

/// Add a member to a tag's set. ARGV: member, its expires_at, now - trim
/// slack (members expired before it are dropped), the set's minimum TTL.
/// A member's score only grows, and so does the set's TTL: the set outlives
/// every value recorded in it.
static TAG_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not old) or tonumber(old) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
",
    )
});

/// Delete a value if its current version carries the tag field ARGV[1];
/// 1 if a live (expires_at > ARGV[2]) value was removed.
static PURGE_ONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local e = redis.call('HGET', KEYS[1], 'e')
redis.call('DEL', KEYS[1])
if e and tonumber(e) > tonumber(ARGV[2]) then return 1 end
return 0
",
    )
});

/// Release a lock only if ARGV[1] (the token) still holds it.
static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Remove treated members from a tag set, each only if its score is still
/// the one read (ARGV: member, score, member, score, ...).
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
",
    )
});

fn tag_field(tag: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + tag.len());
    f.extend_from_slice(b"t:");
    f.extend_from_slice(tag.as_bytes());
    f
}

/// A Redis error as a store error. Redis error texts name the command and
/// the server's reply, never credentials.
fn backend_err(err: RedisError) -> StoreError {
    if err.is_timeout() {
        return StoreError::Backend {
            backend: BACKEND,
            message: format!("timed out: {err}"),
        };
    }
    StoreError::backend(BACKEND, err)
}

impl RedisStore {
    fn value_key(&self, key: &StoreKey) -> String {
        format!("{}v:{{{}}}", self.prefix, key.as_str())
    }

    fn lock_key(&self, key: &StoreKey) -> String {
        format!("{}l:{{{}}}", self.prefix, key.as_str())
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}t:{{{}}}", self.prefix, StoreKey::for_tag(tag).as_str())
    }

    fn conn(&self) -> Conn {
        self.shared.conn()
    }

    /// One command (or script call), bounded by the response timeout, which
    /// also covers waiting for a reconnect in progress.
    async fn run<T, F>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        self.run_within(what, self.response_timeout, op).await
    }

    async fn run_within<T, F>(
        &self,
        what: &'static str,
        limit: Duration,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        let in_flight = InFlight {
            shared: &self.shared,
            answered: false,
        };
        match tokio::time::timeout(limit, op).await {
            Ok(Ok(v)) => {
                in_flight.answered();
                Ok(v)
            }
            Ok(Err(e)) => {
                if e.is_timeout() {
                    drop(in_flight);
                } else if e.is_io_error() || e.is_connection_dropped() {
                    in_flight.failed_fast();
                } else {
                    // The server replied, with an error.
                    in_flight.answered();
                }
                Err(backend_err(e))
            }
            Err(_) => {
                drop(in_flight);
                Err(StoreError::Backend {
                    backend: BACKEND,
                    message: format!("{what}: no reply within {limit:?} (response_timeout)"),
                })
            }
        }
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

    /// The first candidates of a tag set, with their scores as Redis
    /// wrote them.
    async fn read_members(&self, set: &str) -> Result<Vec<(String, String)>, StoreError> {
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
    async fn forget_members(
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

    async fn purge_batch(
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

#[async_trait]
impl CacheStore for RedisStore {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        let mut conn = self.conn();
        let (value, expires_at): (Option<Bytes>, Option<UnixMillis>) = self
            .run(
                "HMGET",
                redis::cmd("HMGET")
                    .arg(self.value_key(key))
                    .arg("b")
                    .arg("e")
                    .query_async(&mut conn),
            )
            .await?;
        match (value, expires_at) {
            (Some(v), Some(e)) if !is_expired(e, now_millis()) => Ok(Some(v)),
            _ => Ok(None),
        }
    }

    async fn put(&self, key: &StoreKey, value: Bytes, opts: &PutOptions) -> Result<(), StoreError> {
        if value.len() > self.caps.max_value_bytes {
            return Err(StoreError::TooLarge {
                backend: BACKEND,
                size: value.len(),
                limit: self.caps.max_value_bytes,
            });
        }
        let now = now_millis();
        let vkey = self.value_key(key);
        if is_expired(opts.expires_at, now) {
            // Dead on arrival: whatever was there is replaced by nothing.
            let mut conn = self.conn();
            self.run(
                "DEL",
                redis::cmd("DEL").arg(&vkey).query_async::<i64>(&mut conn),
            )
            .await?;
            return Ok(());
        }
        let ttl_ms = (opts.expires_at - now).min(MAX_TTL_MS);

        // Tags first (see the crate docs for why this order).
        let mut tags: Vec<&str> = opts.tags.iter().map(String::as_str).collect();
        tags.sort_unstable();
        tags.dedup();
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
        put.arg(value.as_ref()).arg(opts.expires_at).arg(ttl_ms);
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
        tokio::spawn(keep_subscribed(
            self.subscribe_via.clone(),
            self.channel.clone(),
            listener,
            self.connect_timeout.max(self.response_timeout),
        ));
    }
}

/// How often the purge subscription's connection is pinged.
const SUBSCRIPTION_PING_EVERY: Duration = Duration::from_secs(1);

/// Classic pub/sub on one channel rather than sharded (SSUBSCRIBE): every
/// node of a cluster delivers every PUBLISH, so a subscription through any
/// node (the configuration endpoint's, or the next one after a failover)
/// hears every purge, with no slot to follow. Purges are rare next to
/// requests, so the cluster bus carrying each to every node costs nothing
/// that matters.
async fn keep_subscribed(
    via: Arc<[Client]>,
    channel: Arc<str>,
    listener: Weak<dyn PurgeListener>,
    limit: Duration,
) {
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(20);
    loop {
        if listener.strong_count() == 0 {
            return;
        }
        let client = &via[attempt % via.len()];
        attempt += 1;
        let made = tokio::time::timeout(limit, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&*channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        let pubsub = match made {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {limit:?}"),
                };
                tracing::debug!(
                    backend = BACKEND,
                    error,
                    "purge subscription failed; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        let Some(l) = listener.upgrade() else { return };
        l.subscribed(true).await;
        drop(l);
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(SUBSCRIPTION_PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Some(l) = listener.upgrade() else { return };
                    match PurgeNotice::decode(msg.get_payload_bytes()) {
                        Some(notice) => l.purged(notice).await,
                        // Not ours (someone else publishing on the channel):
                        // flushing is the safe reading of it.
                        None => l.subscribed(true).await,
                    }
                }
                _ = ping.tick() => {
                    if listener.strong_count() == 0 {
                        return;
                    }
                    let pong = tokio::time::timeout(limit, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        let Some(l) = listener.upgrade() else { return };
        tracing::warn!(
            backend = BACKEND,
            "redis purge subscription lost; subscribing again"
        );
        l.subscribed(false).await;
    }
}

// --- connecting ---

/// The URL(s) of `cfg` with passwords redacted, for messages.
fn describe_target(cfg: &RedisConfig) -> String {
    redact_url(cfg.url.trim())
}

fn node_urls(cfg: &RedisConfig) -> Result<Vec<String>, ConnectError> {
    let urls: Vec<String> = cfg
        .url
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(ConnectError::Config {
            field: "url",
            message: "is empty".into(),
        });
    }
    if urls.len() > 1 && !cfg.cluster {
        return Err(ConnectError::Config {
            field: "url",
            message: "a list of several URLs needs redis.cluster = true".into(),
        });
    }
    Ok(urls)
}

fn connection_info(url: &str, cfg: &RedisConfig) -> Result<ConnectionInfo, ConnectError> {
    let info = url
        .into_connection_info()
        .map_err(|e| ConnectError::Config {
            field: "url",
            // The parser's messages never echo the URL; neither do we (it may
            // hold a password), only its redacted form.
            message: format!("{}: {}", redact_url(url), e),
        })?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &cfg.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &cfg.password {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings))
}

fn tls_certificates(
    cfg: &RedisConfig,
    urls: &[String],
) -> Result<Option<TlsCertificates>, ConnectError> {
    let tls = urls
        .iter()
        .any(|u| u.starts_with("rediss://") || u.starts_with("valkeys://"));
    if tls {
        // rustls needs a process-wide crypto provider when more than one is
        // compiled in; install ours unless someone already did.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let Some(path) = &cfg.ca_file else {
        return Ok(None);
    };
    if !tls {
        return Err(ConnectError::Config {
            field: "ca_file",
            message: "is set but redis.url is not rediss://".into(),
        });
    }
    let pem = std::fs::read(path).map_err(|source| ConnectError::CaFile {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A failed connection attempt as a [`ConnectError`] naming what failed.
fn connect_error(err: RedisError, cfg: &RedisConfig, target: &str) -> ConnectError {
    let auth = err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.kind(), ErrorKind::Server(ServerErrorKind::NoPerm))
        || err
            .code()
            .is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH");
    if auth {
        return ConnectError::Auth {
            target: target.to_owned(),
            user: cfg
                .username
                .as_ref()
                .map(|u| format!(" as user {u:?}"))
                .unwrap_or_default(),
            message: if cfg.password.is_none() {
                format!("{err} (no redis.password configured)")
            } else {
                err.to_string()
            },
        };
    }
    // The cluster client wraps the node's I/O error in its own message.
    if err.is_timeout() || err.to_string().contains("timed out") {
        return ConnectError::Timeout {
            target: target.to_owned(),
            after: cfg.connect_timeout,
        };
    }
    let mut message = err.to_string();
    if message.contains("certificate") && cfg.ca_file.is_none() {
        message.push_str(" (for a private CA, set redis.ca_file)");
    }
    ConnectError::Connect {
        target: target.to_owned(),
        message,
    }
}

/// Connects to the Redis (or Redis Cluster) of `cfg` and checks it answers,
/// within `connect_timeout` (a few attempts' worth at most). Call it once at
/// start-up and share the store: it reconnects by itself later.
pub async fn connect(cfg: &RedisConfig) -> Result<RedisStore, ConnectError> {
    cfg.validate().map_err(|e| ConnectError::Config {
        field: e.key.strip_prefix("redis.").unwrap_or(e.key),
        message: e.problem,
    })?;
    let max_value_bytes = cfg.max_value_bytes.as_u64() as usize;
    let urls = node_urls(cfg)?;
    let target = describe_target(cfg);
    let certs = tls_certificates(cfg, &urls)?;
    let infos = urls
        .iter()
        .map(|u| connection_info(u, cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let subscribe_via = infos
        .iter()
        .map(|info| match &certs {
            Some(certs) => Client::build_with_tls(info.clone(), certs.clone()),
            None => Client::open(info.clone()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Config {
            field: "url",
            message: e.to_string(),
        })?;

    // The whole start-up is bounded too: the libraries' own retries could
    // otherwise add up to several connect timeouts.
    let overall = cfg.connect_timeout * 2 + cfg.response_timeout;
    let (conn, factory) = tokio::time::timeout(overall, open(cfg, infos, certs, &target))
        .await
        .map_err(|_| ConnectError::Timeout {
            target: target.clone(),
            after: cfg.connect_timeout,
        })??;

    let store = RedisStore {
        shared: Arc::new(Shared {
            conn: RwLock::new(conn),
            factory,
            stalled: AtomicU32::new(0),
            last_replaced: Mutex::new(None),
        }),
        subscribe_via: subscribe_via.into(),
        channel: format!("{}purges", cfg.key_prefix).into(),
        connect_timeout: cfg.connect_timeout,
        cluster: cfg.cluster,
        prefix: cfg.key_prefix.as_str().into(),
        target: target.as_str().into(),
        response_timeout: cfg.response_timeout,
        caps: Capabilities {
            name: BACKEND,
            max_value_bytes,
            shared: true,
            purge_feed: PurgeFeed::Push,
        },
    };
    // One real command, so a server that accepts connections but refuses
    // our commands (NOAUTH, ACL, not a cluster) fails start-up clearly.
    let mut conn = store.conn();
    match tokio::time::timeout(
        cfg.connect_timeout + cfg.response_timeout,
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(connect_error(e, cfg, &target)),
        Err(_) => {
            return Err(ConnectError::Timeout {
                target,
                after: cfg.connect_timeout,
            })
        }
    }
    tracing::info!(backend = BACKEND, target = %target, cluster = cfg.cluster, "connected to redis");
    Ok(store)
}

/// Extra time a put of `len` bytes gets on top of the response timeout.
fn send_allowance(len: u64) -> Duration {
    Duration::from_millis(len / 32_768)
}

/// The redis library's own per-command timeout: the response timeout plus
/// the allowance of the largest put. Each command is bounded more tightly
/// by [`RedisStore::run`]; this is the second line.
fn library_response_timeout(cfg: &RedisConfig) -> Duration {
    cfg.response_timeout + send_allowance(cfg.max_value_bytes.as_u64())
}

async fn open(
    cfg: &RedisConfig,
    infos: Vec<ConnectionInfo>,
    certs: Option<TlsCertificates>,
    target: &str,
) -> Result<(Conn, Factory), ConnectError> {
    if cfg.cluster {
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(cfg.connect_timeout)
            .response_timeout(library_response_timeout(cfg))
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if let Some(user) = &cfg.username {
            builder = builder.username(user);
        }
        if let Some(password) = &cfg.password {
            builder = builder.password(password);
        }
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        let client = builder.build().map_err(|e| ConnectError::Config {
            field: "url",
            message: e.to_string(),
        })?;
        // Both timeouts again: a ClusterConfig replaces the builder's.
        let config = ClusterConfig::new()
            .set_connection_timeout(cfg.connect_timeout)
            .set_response_timeout(library_response_timeout(cfg));
        let conn = client
            .get_async_connection_with_config(config.clone())
            .await
            .map_err(|e| connect_error(e, cfg, target))?;
        return Ok((Conn::Cluster(conn), Factory::Cluster { client, config }));
    }

    let info = infos
        .into_iter()
        .next()
        .expect("node_urls returns at least one");
    let client = match certs {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    }
    .map_err(|e| ConnectError::Config {
        field: "url",
        message: e.to_string(),
    })?;

    // One plain attempt first, for a clear error: the connection manager
    // retries every failure (a wrong password too) with backoff.
    let probe_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cfg.connect_timeout))
        .set_response_timeout(Some(cfg.connect_timeout));
    let probe = client
        .get_multiplexed_async_connection_with_config(&probe_config)
        .await
        .map_err(|e| connect_error(e, cfg, target))?;
    drop(probe);

    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.connect_timeout))
        .set_response_timeout(Some(library_response_timeout(cfg)))
        // Reconnects happen in the background while requests fail fast on
        // their own timeout; keep each reconnect round short so the next
        // request after an outage starts a fresh one soon.
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500));
    let manager = ConnectionManager::new_with_config(client.clone(), config.clone())
        .await
        .map_err(|e| connect_error(e, cfg, target))?;
    Ok((Conn::Single(manager), Factory::Single { client, config }))
}
