//! The Lua scripts of the backend. Each touches exactly one key
//! (`KEYS[1]`), so they all work on a cluster.

use std::sync::LazyLock;

use redis::Script;

/// Replace a value: its bytes, expiry, write id and tag fields, with a
/// relative TTL. ARGV: bytes, expires_at, ttl_ms, write id, then one
/// `t:<tag>` field name per tag.
pub(crate) static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'b', ARGV[1], 'e', ARGV[2], 'w', ARGV[4])
for i = 5, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], '1')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// Read a value unless it is still the write ARGV[1] names: `{e}` when
/// the hash's write id is ARGV[1] (the value is not sent), else
/// `{e, w, b}` (each nil when absent). The caller checks `e` either way.
/// A value written before write ids has no `w`: it is always sent.
pub(crate) static READ_SINCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'e', 'w')
if r[2] and r[2] == ARGV[1] then return {r[1]} end
return {r[1], r[2], redis.call('HGET', KEYS[1], 'b')}
",
    )
});

/// Delete a value; 1 if it was there and live at ARGV[1] (now).
pub(crate) static DELETE: LazyLock<Script> = LazyLock::new(|| {
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
pub(crate) static TAG_ADD: LazyLock<Script> = LazyLock::new(|| {
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
pub(crate) static PURGE_ONE: LazyLock<Script> = LazyLock::new(|| {
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
pub(crate) static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
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
pub(crate) static FORGET: LazyLock<Script> = LazyLock::new(|| {
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

/// One GCRA step of a rate budget (see `cachegate_store::rate`) on the
/// server's clock, so the instances' clocks do not matter. `KEYS[1]`
/// holds the TAT (decimal unix microseconds, server time). ARGV:
/// emission, tolerance, max_wait (µs), expiry slack (ms). Returns
/// `{1, wait}` after storing the new TAT (expiring `slack` after it, so an
/// idle budget vanishes), or `{0, retry_in}` having stored nothing.
/// Written with `%.0f`: `tostring` would round a 16-digit number.
pub(crate) static TAKE_PERMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '') or now
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance + max_wait then
  return {0, ahead - tolerance - max_wait}
end
local new_tat = tat + emission
local px = math.floor((new_tat - now) / 1000) + tonumber(ARGV[4])
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', px)
local wait = ahead - tolerance
if wait < 0 then wait = 0 end
return {1, wait}
",
    )
});

pub(crate) fn tag_field(tag: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + tag.len());
    f.extend_from_slice(b"t:");
    f.extend_from_slice(tag.as_bytes());
    f
}
