//! The behaviour every backend must show, run against its real server.
//!
//! Each function takes a store and panics on the first deviation. Backend
//! crates run all of them with one line:
//!
//! ```ignore
//! cachegate_store::conformance_tests!(async { make_store().await });
//! ```
//!
//! Every function works in its own random key namespace, so runs can share
//! one server (and leftovers of an earlier run never interfere).
//!
//! Tests of what only some backends can do are gated on the backend's
//! [`Capabilities`](crate::Capabilities), as OpenDAL's behaviour tests are:
//! on a backend that declares it cannot, such a test checks that the
//! backend indeed does not (the trait's "unsupported" answer), says on its
//! output that the rest was not applicable, and stops there. A declared
//! capability is therefore always exercised, and an undeclared one is
//! never silently claimed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::coherence::{LOG_CLOCK_SLACK, LOG_READ_MAX};
use crate::guard::{GuardConfig, GuardedStore};
use crate::tiered::TieredCache;
use crate::{
    now_millis, CacheStore, Entry, Permit, PurgeFeed, PurgeListener, PurgeLogEntry, PurgeNotice,
    PutOptions, Rate, Read, Record, Seen, StoreError, StoreKey, VaryIndex, WriteId,
};

/// Largest value the suite writes, even if a backend advertises more
/// (memory: bounded by its capacity; a 6 MB Lambda response is the most
/// the proxy ever stores).
pub const LARGE_VALUE_CAP: usize = 6 * 1024 * 1024;

fn ns() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn key(ns: &str, name: &str) -> StoreKey {
    StoreKey::hash("conformance", [ns, name])
}

fn opts(ttl_ms: u64, tags: &[&str]) -> PutOptions {
    PutOptions {
        expires_at: now_millis() + ttl_ms,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

/// A tag unique to this run, so purges never touch another run's data.
fn tag(ns: &str, name: &str) -> String {
    format!("{name}-{ns}")
}

fn entry(body: Bytes, fresh_ms: u64, stale_ms: u64, tags: Vec<String>) -> Entry {
    let now = now_millis();
    Entry {
        status: 200,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/octet-stream"),
            ),
            (
                "x-binary".into(),
                Bytes::from_static(&[0x00, 0xff, 0x7f, 0x80]),
            ),
            ("etag".into(), Bytes::from_static(b"\"v1\"")),
        ],
        body,
        born_at: now - 1500,
        stored_at: now,
        fresh_until: now + fresh_ms,
        stale_while_revalidate_until: now + fresh_ms + stale_ms / 2,
        stale_if_error_until: now + fresh_ms + stale_ms,
        keep_until: now + fresh_ms,
        tags,
    }
}

fn binary_body(len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
}

/// The proxy's record layer over `store`, with no L1, so it reads exactly
/// what the backend returns.
fn records<S: CacheStore + Clone>(store: &S) -> TieredCache {
    let guard = GuardConfig {
        read_timeout: Duration::from_secs(10),
        write_timeout: Duration::from_secs(10),
        ..GuardConfig::default()
    };
    let cache = TieredCache::new(GuardedStore::new(Arc::new(store.clone()), guard), None);
    // The embedded store is read as the proxy reads it: directly, each
    // value decoded once and the decoded record shared by later reads.
    match (store as &dyn std::any::Any).downcast_ref::<crate::memory::MemoryStore>() {
        Some(memory) => cache.with_memory_main(memory.clone()),
        None => cache,
    }
}

/// Bytes and records round-trip exactly: binary bodies, binary header
/// values, times and tags.
pub async fn round_trip<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "raw");
    let value = binary_body(4096);
    store
        .put(&k, value.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(value));

    let cache = records(store);
    let rk = key(&ns, "record");
    let e = entry(binary_body(1000), 60_000, 60_000, vec![tag(&ns, "t")]);
    cache.put(&rk, &Record::Entry(e.clone())).await.unwrap();
    let got = cache.get(&rk).await;
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(got.into_record(), Some(Record::Entry(e)));

    let vk = key(&ns, "vary");
    let v = Record::VaryIndex(VaryIndex {
        headers: vec!["accept".into(), "accept-language".into()],
        expires_at: now_millis() + 60_000,
    });
    cache.put(&vk, &v).await.unwrap();
    assert_eq!(cache.get(&vk).await.into_record(), Some(v));

    let empty = key(&ns, "empty");
    store
        .put(&empty, Bytes::new(), &opts(60_000, &[]))
        .await
        .unwrap();
    assert_eq!(store.get(&empty).await.unwrap(), Some(Bytes::new()));
}

pub async fn missing_key_is_none<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    assert_eq!(store.get(&key(&ns, "never-written")).await.unwrap(), None);
    assert!(!store.delete(&key(&ns, "never-written")).await.unwrap());
}

/// A value is gone after its expiry; a response is still there, stale,
/// within its stale window and gone after it.
pub async fn expiry_and_stale_window<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "short");
    store
        .put(&k, Bytes::from_static(b"x"), &opts(1_200, &[]))
        .await
        .unwrap();
    assert!(store.get(&k).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    assert_eq!(
        store.get(&k).await.unwrap(),
        None,
        "value served past its expiry"
    );

    let cache = records(store);
    let rk = key(&ns, "stale");
    cache
        .put(
            &rk,
            &Record::Entry(entry(binary_body(10), 500, 1_600, vec![])),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    match cache.get(&rk).await.into_record() {
        Some(Record::Entry(e)) => {
            assert!(!e.is_fresh(now_millis()), "still fresh past fresh_until")
        }
        other => panic!("entry within its stale window not returned: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(
        cache.get(&rk).await.into_record(),
        None,
        "entry served past its stale window"
    );

    // Already expired at put time: never readable.
    let past = key(&ns, "past");
    let gone = PutOptions {
        expires_at: now_millis().saturating_sub(1),
        tags: vec![],
    };
    store
        .put(&past, Bytes::from_static(b"x"), &gone)
        .await
        .unwrap();
    assert_eq!(store.get(&past).await.unwrap(), None);
}

pub async fn delete_removes<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "d");
    let other = key(&ns, "other");
    store
        .put(&k, Bytes::from_static(b"1"), &opts(60_000, &[]))
        .await
        .unwrap();
    store
        .put(&other, Bytes::from_static(b"2"), &opts(60_000, &[]))
        .await
        .unwrap();
    assert!(store.delete(&k).await.unwrap());
    assert_eq!(store.get(&k).await.unwrap(), None);
    assert!(
        !store.delete(&k).await.unwrap(),
        "second delete reported a value"
    );
    assert_eq!(
        store.get(&other).await.unwrap(),
        Some(Bytes::from_static(b"2"))
    );
}

pub async fn overwrite_replaces<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "o");
    store
        .put(&k, binary_body(3000), &opts(60_000, &[]))
        .await
        .unwrap();
    store
        .put(&k, Bytes::from_static(b"short"), &opts(60_000, &[]))
        .await
        .unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"short"))
    );
    // A shorter expiry on overwrite wins too.
    store
        .put(&k, Bytes::from_static(b"brief"), &opts(800, &[]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(store.get(&k).await.unwrap(), None);
}

/// The write id of a read that returned `value`.
fn current(value: &Bytes, read: Read) -> Option<WriteId> {
    match read {
        Read::Current(Some((got, write))) if got == value => write,
        other => panic!("expected the current value, got {other:?}"),
    }
}

/// A backend that names writes answers a read naming the write the key
/// holds with `Unchanged` (from any clone: another instance), and with
/// what the key holds after anything else: another write (even of the same
/// bytes), a delete, expiry, or a write id it never issued. One that does
/// not name writes reads as `get` does and never answers `Unchanged`.
/// Through the proxy's record layer (prepared reads, no L1), a read of an
/// unchanged value reuses the record decoded before, and an overwrite by
/// another instance is seen at once.
pub async fn reads_since_a_write<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "since");
    let one = binary_body(5000);
    store
        .put(&k, one.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    if !store.capabilities().write_ids {
        let never = WriteId::generate();
        let read = store
            .get_since(
                &k,
                Some(Seen {
                    write: &never,
                    len: 5000,
                }),
            )
            .await;
        assert_eq!(read.unwrap(), Read::Current(Some((one, None))));
        return not_applicable(store, "reads_since_a_write", "write_ids");
    }
    let other = store.clone();
    // The length is a hint (a backend may choose how to ask by it): the
    // answers are the same for a small and a large one.
    for len in [16, 1 << 20] {
        let k = key(&ns, &format!("since-{len}"));
        let seen = |write| Some(Seen { write, len });
        store
            .put(&k, one.clone(), &opts(60_000, &[]))
            .await
            .unwrap();
        let w1 = current(&one, store.get_since(&k, None).await.unwrap()).expect("no write id");
        for s in [store, &other] {
            assert_eq!(s.get_since(&k, seen(&w1)).await.unwrap(), Read::Unchanged);
        }
        let never = WriteId::generate();
        let again = current(&one, store.get_since(&k, seen(&never)).await.unwrap());
        assert_eq!(again.as_ref(), Some(&w1), "one write, two ids");

        // The same bytes again are another write.
        store
            .put(&k, one.clone(), &opts(60_000, &[]))
            .await
            .unwrap();
        let w2 = current(&one, store.get_since(&k, seen(&w1)).await.unwrap()).expect("no id");
        assert_ne!(w1, w2, "two writes share an id");
        let two = Bytes::from_static(b"two");
        other
            .put(&k, two.clone(), &opts(60_000, &[]))
            .await
            .unwrap();
        let w3 = current(&two, store.get_since(&k, seen(&w2)).await.unwrap()).expect("no id");
        store.delete(&k).await.unwrap();
        let gone = store.get_since(&k, seen(&w3)).await.unwrap();
        assert_eq!(gone, Read::Current(None));

        let brief = key(&ns, &format!("brief-{len}"));
        store
            .put(&brief, two.clone(), &opts(600, &[]))
            .await
            .unwrap();
        let w = current(&two, store.get_since(&brief, None).await.unwrap()).expect("no id");
        tokio::time::sleep(Duration::from_millis(800)).await;
        let expired = store.get_since(&brief, seen(&w)).await.unwrap();
        assert_eq!(expired, Read::Current(None));
    }

    // The record layer: the kept decoded record while the write is current.
    let cache =
        records(store).with_prepared_reads(crate::memory::MemoryStore::new(1 << 20, 1 << 16));
    let rk = key(&ns, "record");
    let e = entry(binary_body(3000), 60_000, 0, vec![]);
    cache.put(&rk, &Record::Entry(e.clone())).await.unwrap();
    let first = cache.get(&rk).await.found.expect("stored record not read");
    let second = cache.get(&rk).await.found.expect("stored record not read");
    assert!(
        Arc::ptr_eq(&first, &second),
        "an unchanged value decoded again"
    );
    assert!(second.write().is_some());
    let newer = entry(binary_body(2000), 60_000, 0, vec![]);
    records(&other)
        .put(&rk, &Record::Entry(newer.clone()))
        .await
        .unwrap();
    let third = cache.get(&rk).await;
    assert_eq!(third.into_record(), Some(Record::Entry(newer)));
    other.delete(&rk).await.unwrap();
    assert!(
        cache.get(&rk).await.found.is_none(),
        "a deleted value still read"
    );
}

/// Acquire, contend, owner-only release, expiry; locks never touch values.
pub async fn lock_semantics<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "lock");
    let first = store
        .try_lock(&k, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("free lock not taken");
    assert_eq!(
        store.try_lock(&k, Duration::from_secs(30)).await.unwrap(),
        None,
        "held lock taken twice"
    );
    let stranger = crate::LockToken::generate();
    assert!(
        !store.unlock(&k, &stranger).await.unwrap(),
        "released by a non-owner"
    );
    assert_eq!(
        store.try_lock(&k, Duration::from_secs(30)).await.unwrap(),
        None
    );
    assert!(store.unlock(&k, &first).await.unwrap());
    assert!(!store.unlock(&k, &first).await.unwrap(), "released twice");
    let second = store
        .try_lock(&k, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("released lock not retaken");
    assert_ne!(first, second);
    assert!(store.unlock(&k, &second).await.unwrap());

    // Expiry: a holder that dies does not block others for ever, and once
    // someone else holds it the late holder cannot release it.
    let e = key(&ns, "expiring");
    let old = store
        .try_lock(&e, Duration::from_millis(600))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let new = store
        .try_lock(&e, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("expired lock not retaken");
    assert!(
        !store.unlock(&e, &old).await.unwrap(),
        "expired holder released the new holder's lock"
    );
    assert_eq!(
        store.try_lock(&e, Duration::from_secs(30)).await.unwrap(),
        None
    );
    assert!(store.unlock(&e, &new).await.unwrap());

    // A lock and a value under the same key are independent.
    let v = key(&ns, "value-and-lock");
    store
        .put(&v, Bytes::from_static(b"kept"), &opts(60_000, &[]))
        .await
        .unwrap();
    let t = store
        .try_lock(&v, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("lock beside a value");
    assert_eq!(
        store.get(&v).await.unwrap(),
        Some(Bytes::from_static(b"kept"))
    );
    assert!(store.unlock(&v, &t).await.unwrap());
    assert_eq!(
        store.get(&v).await.unwrap(),
        Some(Bytes::from_static(b"kept"))
    );
}

/// Exactly one of many concurrent contenders gets a free lock.
pub async fn lock_is_exclusive_under_contention<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "contended");
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let s = store.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            s.try_lock(&k, Duration::from_secs(30)).await.unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += t.await.unwrap().is_some() as usize;
    }
    assert_eq!(winners, 1, "{winners} contenders took the same lock");
}

/// Purge removes exactly the values carrying the tag.
pub async fn purge_by_tag<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let (a, b) = (tag(&ns, "a"), tag(&ns, "b"));
    let only_a = key(&ns, "only-a");
    let both = key(&ns, "both");
    let only_b = key(&ns, "only-b");
    let none = key(&ns, "none");
    let retagged = key(&ns, "retagged");
    let v = Bytes::from_static(b"v");
    store
        .put(&only_a, v.clone(), &opts(60_000, &[&a]))
        .await
        .unwrap();
    store
        .put(&both, v.clone(), &opts(60_000, &[&a, &b]))
        .await
        .unwrap();
    store
        .put(&only_b, v.clone(), &opts(60_000, &[&b]))
        .await
        .unwrap();
    store
        .put(&none, v.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    // Stored with tag a, then overwritten without it: a purge of a must spare it.
    store
        .put(&retagged, v.clone(), &opts(60_000, &[&a]))
        .await
        .unwrap();
    store
        .put(&retagged, v.clone(), &opts(60_000, &[&b]))
        .await
        .unwrap();

    assert_eq!(
        store.purge_tag(&a).await.unwrap(),
        2,
        "purge count of tag a"
    );
    assert_eq!(store.get(&only_a).await.unwrap(), None);
    assert_eq!(store.get(&both).await.unwrap(), None);
    assert_eq!(store.get(&only_b).await.unwrap(), Some(v.clone()));
    assert_eq!(store.get(&none).await.unwrap(), Some(v.clone()));
    assert_eq!(store.get(&retagged).await.unwrap(), Some(v.clone()));
    assert_eq!(
        store.purge_tag(&a).await.unwrap(),
        0,
        "second purge found values"
    );
    assert_eq!(store.purge_tag(&tag(&ns, "unknown")).await.unwrap(), 0);

    // Values stored under a tag after a purge are purged by the next one.
    store
        .put(&only_a, v.clone(), &opts(60_000, &[&a]))
        .await
        .unwrap();
    assert_eq!(store.purge_tag(&a).await.unwrap(), 1);
    assert_eq!(store.get(&only_a).await.unwrap(), None);
}

/// Values up to the advertised limit round-trip; larger ones are refused
/// with `TooLarge`, never truncated or silently dropped.
pub async fn large_values<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let limit = store.capabilities().max_value_bytes;
    let size = limit.min(LARGE_VALUE_CAP);
    let big = binary_body(size);
    let k = key(&ns, "big");
    store
        .put(&k, big.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    let got = store.get(&k).await.unwrap().expect("large value missing");
    assert_eq!(got.len(), big.len());
    assert!(got == big, "large value came back different");

    if limit < LARGE_VALUE_CAP {
        let over = key(&ns, "over");
        match store
            .put(&over, binary_body(limit + 1), &opts(60_000, &[]))
            .await
        {
            Err(StoreError::TooLarge { .. }) => {}
            other => panic!("value over the advertised limit: {other:?}"),
        }
        assert_eq!(store.get(&over).await.unwrap(), None);
    }
}

/// Concurrent writers to one key leave one whole value, never a mix;
/// concurrent writers to many keys all land.
pub async fn concurrent_writers<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let shared = key(&ns, "shared");
    let values: Vec<Bytes> = (0..16u8).map(|i| Bytes::from(vec![i; 64 * 1024])).collect();
    let mut tasks = Vec::new();
    for v in values.clone() {
        let s = store.clone();
        let k = shared.clone();
        tasks.push(tokio::spawn(async move {
            s.put(&k, v, &opts(60_000, &[])).await.unwrap()
        }));
    }
    for (i, v) in values.iter().enumerate() {
        let s = store.clone();
        let k = key(&ns, &format!("k{i}"));
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            s.put(&k, v, &opts(60_000, &[])).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = store
        .get(&shared)
        .await
        .unwrap()
        .expect("value missing after concurrent writes");
    assert!(
        values.contains(&got),
        "concurrent writes left a mixed value"
    );
    for (i, v) in values.iter().enumerate() {
        assert_eq!(
            store
                .get(&key(&ns, &format!("k{i}")))
                .await
                .unwrap()
                .as_ref(),
            Some(v)
        );
    }
}

/// Foreign, truncated, bit-flipped and older-format values read back as
/// misses through the record layer, and a later put overwrites them.
pub async fn corrupt_values_are_misses<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let cache = records(store);
    let good = Record::Entry(entry(binary_body(300), 60_000, 0, vec![])).encode();
    let mut flipped = good.to_vec();
    flipped[20] ^= 0x55;
    let mut older = good.to_vec();
    older[2] = 0;
    let cases: [(&str, Bytes); 5] = [
        (
            "foreign",
            Bytes::from_static(b"{\"status\":200,\"body\":\"hello\"}"),
        ),
        ("empty", Bytes::new()),
        ("truncated", good.slice(..good.len() / 2)),
        ("flipped", Bytes::from(flipped)),
        ("older-format", Bytes::from(older)),
    ];
    let before = cache
        .stats()
        .corrupt
        .load(std::sync::atomic::Ordering::Relaxed);
    for (name, bytes) in cases {
        let k = key(&ns, name);
        store.put(&k, bytes, &opts(60_000, &[])).await.unwrap();
        let got = cache.get(&k).await;
        assert_eq!(got.record(), None, "{name} value decoded as a record");
        assert!(
            got.error.is_none(),
            "{name} value reported as a backend error: {:?}",
            got.error
        );
        let fresh = Record::Entry(entry(binary_body(20), 60_000, 0, vec![]));
        cache.put(&k, &fresh).await.unwrap();
        assert_eq!(
            cache.get(&k).await.into_record(),
            Some(fresh),
            "{name} value not overwritten"
        );
    }
    let after = cache
        .stats()
        .corrupt
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - before, 5, "corrupt values not counted");
}

fn granted(p: Permit) -> Option<Duration> {
    match p {
        Permit::Granted { wait } => Some(wait),
        Permit::Denied { .. } => None,
    }
}

fn denied(p: Permit) -> Duration {
    match p {
        Permit::Denied { retry_in } => retry_in,
        Permit::Granted { wait } => panic!("granted (wait {wait:?}) where the budget was spent"),
    }
}

/// A fresh budget hands out its burst at once, then nothing with
/// `max_wait` 0; with a `max_wait` beyond the next slot, a wait of about
/// one emission. Budgets of different keys are apart.
pub async fn permit_burst_then_wait<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "burst");
    // One a second: the whole sequence below fits in its first second
    // however loaded the machine.
    let rate = Rate::new(1.0, 5);
    let started = std::time::Instant::now();
    for i in 0..5 {
        let p = store.take_permit(&k, rate, Duration::ZERO).await.unwrap();
        assert_eq!(
            p,
            Permit::Granted {
                wait: Duration::ZERO
            },
            "burst permit {i}"
        );
    }
    let retry_in = denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap());
    assert!(
        retry_in > Duration::ZERO && retry_in <= Duration::from_secs(1),
        "retry_in {retry_in:?} with one permit a second"
    );
    // Not within 100 ms either: the next slot is about a second away.
    let short = Duration::from_millis(100);
    let retry_short = denied(store.take_permit(&k, rate, short).await.unwrap());
    let wait = granted(
        store
            .take_permit(&k, rate, Duration::from_secs(5))
            .await
            .unwrap(),
    )
    .expect("a slot within max_wait denied");
    let elapsed = started.elapsed();
    assert!(
        wait <= Duration::from_secs(1) && wait + elapsed >= Duration::from_millis(990),
        "wait {wait:?} for the slot one second after the burst ({elapsed:?} in)"
    );
    assert!(
        retry_short + short <= retry_in + Duration::from_millis(1),
        "retry_in with max_wait {short:?} ({retry_short:?}) vs with 0 ({retry_in:?})"
    );
    // That slot is taken now: the one after is a second later still.
    let next = granted(
        store
            .take_permit(&k, rate, Duration::from_secs(5))
            .await
            .unwrap(),
    )
    .expect("second waiting permit");
    assert!(
        next >= wait + Duration::from_millis(900),
        "waits {wait:?} then {next:?}: not spaced by the emission"
    );

    let other = key(&ns, "other");
    assert_eq!(
        store
            .take_permit(&other, rate, Duration::ZERO)
            .await
            .unwrap(),
        Permit::Granted {
            wait: Duration::ZERO
        },
        "another key's budget was spent"
    );
    assert!(
        store
            .take_permit(&k, Rate::new(0.0, 1), Duration::ZERO)
            .await
            .is_err(),
        "a rate of 0 accepted"
    );
}

/// A denial reserves nothing: however many calls were denied, the call
/// after `retry_in` is granted, and takes exactly the one freed slot.
pub async fn permit_denied_reserves_nothing<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "denied");
    // One a second: the denials below all fall within that second.
    let rate = Rate::new(1.0, 1);
    assert!(granted(store.take_permit(&k, rate, Duration::ZERO).await.unwrap()).is_some());
    let mut retry_in = Duration::ZERO;
    for _ in 0..10 {
        retry_in = denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap());
        assert!(
            retry_in <= Duration::from_secs(1),
            "retry_in {retry_in:?} beyond one emission (1 s)"
        );
    }
    tokio::time::sleep(retry_in + Duration::from_millis(20)).await;
    assert_eq!(
        store.take_permit(&k, rate, Duration::ZERO).await.unwrap(),
        Permit::Granted {
            wait: Duration::ZERO
        },
        "denied calls pushed the budget back"
    );
    denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap());
}

/// Callers willing to wait are queued one emission apart: the go-time
/// (its call's `now` + its wait) of the i-th is i emissions after the
/// first's, which went at once. Seen from here, a call's `now` lies
/// between sending it and its answer, so each go-time is known to within
/// that call's round trip.
pub async fn permit_waits_are_spaced<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "queue");
    let rate = Rate::new(10.0, 1);
    let emission = 0.1;
    let max_wait = Duration::from_secs(10);
    let slack = 0.001; // microsecond rounding and clock granularity
    let start = std::time::Instant::now();
    // (earliest, latest) go-time of the previous call, seconds from `start`.
    let mut previous: Option<(f64, f64)> = None;
    for i in 0..8u32 {
        let sent = start.elapsed().as_secs_f64();
        let wait = granted(store.take_permit(&k, rate, max_wait).await.unwrap())
            .unwrap_or_else(|| panic!("call {i} denied with max_wait {max_wait:?}"))
            .as_secs_f64();
        let answered = start.elapsed().as_secs_f64();
        let slot = emission * f64::from(i);
        assert!(
            wait <= slot + slack && wait + answered + slack >= slot,
            "call {i}: wait {wait:.4} s, answered {answered:.4} s in (its slot {slot:.1} s)"
        );
        let go = (sent + wait, answered + wait);
        if let Some((earliest, latest)) = previous {
            assert!(
                go.0 - latest <= emission + slack && go.1 - earliest + slack >= emission,
                "call {i} goes at {go:?} s, the one before at {:?} s: not one emission apart",
                (earliest, latest)
            );
        } else {
            assert_eq!(wait, 0.0, "the first call of a fresh budget waited");
        }
        previous = Some(go);
    }
    // Eight slots are reserved ahead: a caller that will not wait is
    // turned away until they have gone by.
    let retry_in = denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap()).as_secs_f64();
    let answered = start.elapsed().as_secs_f64();
    assert!(
        retry_in <= 0.8 + slack && retry_in + answered + slack >= 0.8,
        "retry_in {retry_in:.4} s, answered {answered:.4} s in"
    );
}

/// Many concurrent callers never get more than the rate allows:
/// over the run's elapsed time `T`, at most `burst + T × per_second`
/// grants (the go-time of each is its call: `max_wait` 0). And the slots
/// are not left unused either (a loose lower bound).
pub async fn permit_rate_holds_under_contention<S: CacheStore + Clone>(store: &S) {
    permit_rate_holds_across(std::slice::from_ref(store)).await
}

/// [`permit_rate_holds_under_contention`] with the eight callers spread
/// over `stores`: separately connected stores of one shared backend stand
/// for separate instances (backend crates call it from their own tests).
pub async fn permit_rate_holds_across<S: CacheStore + Clone>(stores: &[S]) {
    assert!(!stores.is_empty());
    let ns = ns();
    let k = key(&ns, "contended");
    let rate = Rate::new(50.0, 10);
    let run_for = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = stores[i % stores.len()].clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let (mut grants, mut calls) = (0u64, 0u64);
            while started.elapsed() < run_for {
                calls += 1;
                match s.take_permit(&k, rate, Duration::ZERO).await.unwrap() {
                    Permit::Granted { wait } => {
                        assert_eq!(wait, Duration::ZERO, "max_wait 0 granted a wait");
                        grants += 1;
                    }
                    // At most one emission (20 ms), plus, for a backend
                    // on the client's clock, the age of its `now` when
                    // another caller's step landed first.
                    Permit::Denied { retry_in } => {
                        assert!(retry_in <= Duration::from_millis(120), "{retry_in:?}");
                    }
                }
            }
            (grants, calls)
        }));
    }
    let (mut grants, mut calls) = (0, 0);
    for t in tasks {
        let (g, c) = t.await.unwrap();
        grants += g;
        calls += c;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = f64::from(rate.burst) + elapsed * rate.per_second;
    assert!(
        grants as f64 <= allowed,
        "{grants} grants in {elapsed:.3} s: more than burst + T × rate = {allowed:.1} ({calls} calls)"
    );
    assert!(
        grants as f64 >= f64::from(rate.burst) + elapsed * rate.per_second / 3.0,
        "only {grants} grants of {allowed:.1} in {elapsed:.3} s ({calls} calls)"
    );
}

/// A budget and a value (and a lock) under the same key are apart:
/// permits leave the value alone, and storing or deleting the value
/// neither refills nor spends the budget.
pub async fn permit_beside_a_value<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let k = key(&ns, "value-and-permit");
    let rate = Rate::new(0.5, 2);
    store
        .put(&k, Bytes::from_static(b"kept"), &opts(60_000, &[]))
        .await
        .unwrap();
    for _ in 0..2 {
        assert!(granted(store.take_permit(&k, rate, Duration::ZERO).await.unwrap()).is_some());
    }
    denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap());
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"kept"))
    );
    store
        .put(&k, Bytes::from_static(b"again"), &opts(60_000, &[]))
        .await
        .unwrap();
    denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap());
    assert!(store.delete(&k).await.unwrap());
    denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap());
    assert_eq!(store.get(&k).await.unwrap(), None);
    let t = store
        .try_lock(&k, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("lock beside a spent budget");
    denied(store.take_permit(&k, rate, Duration::ZERO).await.unwrap());
    assert!(store.unlock(&k, &t).await.unwrap());

    // And a budget beside a value that is already there.
    let fresh = key(&ns, "permit-then-value");
    assert!(granted(
        store
            .take_permit(&fresh, rate, Duration::ZERO)
            .await
            .unwrap()
    )
    .is_some());
    assert_eq!(
        store.get(&fresh).await.unwrap(),
        None,
        "a permit left a value"
    );
    assert!(
        !store.delete(&fresh).await.unwrap(),
        "a permit left a value"
    );
}

/// Says on the test's output that the rest of `test` does not apply to
/// this backend, and why (only the capability's absence was checked).
fn not_applicable<S: CacheStore>(store: &S, test: &str, lacks: &str) {
    eprintln!(
        "conformance::{test}: not applicable to {}: {lacks} (checked that it is absent)",
        store.capabilities().name
    );
}

/// What a backend declares fits together: a shared store tells the other
/// instances' L1s of purges (or they would keep purged entries), a local
/// one has nobody to tell; clones declare the same.
pub async fn capabilities_are_consistent<S: CacheStore + Clone>(store: &S) {
    let caps = store.capabilities().clone();
    assert!(!caps.name.is_empty(), "no backend name");
    assert!(caps.max_value_bytes > 0, "max_value_bytes is 0");
    assert_eq!(
        caps.shared,
        caps.purge_feed != PurgeFeed::Local,
        "{caps:?}: a shared store needs a purge feed, a local one has none"
    );
    assert_eq!(
        store.clone().capabilities(),
        &caps,
        "a clone declares other capabilities"
    );
}

fn sorted(keys: Vec<StoreKey>) -> Vec<StoreKey> {
    let set: BTreeSet<StoreKey> = keys.iter().cloned().collect();
    assert_eq!(set.len(), keys.len(), "a key listed twice: {keys:?}");
    set.into_iter().collect()
}

/// [`CacheStore::tag_members`] lists the keys stored with a tag, each
/// once, and no key stored without it; an unknown tag has none.
/// Gated on [`Capabilities::lists_tag_members`](crate::Capabilities).
pub async fn tag_members_lists_candidates<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let (a, b) = (tag(&ns, "a"), tag(&ns, "b"));
    if !store.capabilities().lists_tag_members {
        assert!(
            store.tag_members(&a).await.is_err(),
            "declares no tag listing, yet answers one (a soft purge would trust it)"
        );
        not_applicable(store, "tag_members_lists_candidates", "no tag listing");
        return;
    }
    assert_eq!(
        store.tag_members(&a).await.unwrap(),
        Vec::<StoreKey>::new(),
        "a tag nothing was stored with has members"
    );
    let v = Bytes::from_static(b"v");
    let only_a = key(&ns, "only-a");
    let both = key(&ns, "both");
    let only_b = key(&ns, "only-b");
    let untagged = key(&ns, "untagged");
    let twice = key(&ns, "twice");
    let retagged = key(&ns, "retagged");
    for (k, tags) in [
        (&only_a, vec![a.as_str()]),
        (&both, vec![a.as_str(), b.as_str()]),
        (&only_b, vec![b.as_str()]),
        (&untagged, vec![]),
        (&twice, vec![a.as_str()]),
        (&twice, vec![a.as_str()]),
        (&retagged, vec![a.as_str()]),
        (&retagged, vec![b.as_str()]),
    ] {
        store.put(k, v.clone(), &opts(60_000, &tags)).await.unwrap();
    }
    let of_a = sorted(store.tag_members(&a).await.unwrap());
    // `retagged` may still be listed under a: a candidate list, not the truth.
    let without_retagged: Vec<StoreKey> =
        of_a.iter().filter(|k| **k != retagged).cloned().collect();
    assert_eq!(
        without_retagged,
        sorted(vec![only_a.clone(), both.clone(), twice.clone()]),
        "members of tag a"
    );
    assert_eq!(
        sorted(store.tag_members(&b).await.unwrap()),
        sorted(vec![both.clone(), only_b.clone(), retagged.clone()]),
        "members of tag b"
    );

    // After a purge, whatever is still listed is an old candidate, never a
    // key the tag's listing did not have.
    assert_eq!(store.purge_tag(&a).await.unwrap(), 3);
    for k in store.tag_members(&a).await.unwrap() {
        assert!(of_a.contains(&k), "{k:?} listed under a after its purge");
        if k != retagged {
            assert_eq!(
                store.get(&k).await.unwrap(),
                None,
                "{k:?} survived the purge"
            );
        }
    }
    assert_eq!(store.get(&retagged).await.unwrap(), Some(v.clone()));
    assert_eq!(store.get(&untagged).await.unwrap(), Some(v));
}

/// Tags are any strings: the empty one, spaces, `{}` and `#`, non-ASCII, a
/// thousand characters. Each lists and purges only its own keys. A value
/// that expired is no longer counted by a purge, listed or not.
pub async fn tags_of_any_shape<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    let v = Bytes::from_static(b"v");
    let lists = store.capabilities().lists_tag_members;
    let odd = format!("{{slot}} #:/ \u{e9}\u{1f600} \"q\",{ns}");
    let long = format!("{}{ns}", "x".repeat(1000));
    // The empty tag is the same for every run on a shared server; nothing
    // below counts on being the only one using it.
    let shapes = [String::new(), odd, long];
    let keys: Vec<StoreKey> = (0..shapes.len())
        .map(|i| key(&ns, &format!("shape-{i}")))
        .collect();
    for (k, t) in keys.iter().zip(&shapes) {
        store.put(k, v.clone(), &opts(60_000, &[t])).await.unwrap();
    }
    let untagged = key(&ns, "untagged");
    store
        .put(&untagged, v.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    for (i, (k, t)) in keys.iter().zip(&shapes).enumerate() {
        if lists {
            let members = store.tag_members(t).await.unwrap();
            assert!(members.contains(k), "tag {i} does not list its key");
            for other in keys.iter().chain([&untagged]).filter(|o| *o != k) {
                assert!(!members.contains(other), "tag {i} lists another key");
            }
        }
        assert!(
            store.purge_tag(t).await.unwrap() >= 1,
            "tag {i} purged nothing"
        );
        assert_eq!(store.get(k).await.unwrap(), None, "tag {i}: key survived");
    }
    assert_eq!(store.get(&untagged).await.unwrap(), Some(v.clone()));

    let t = tag(&ns, "expiring");
    let short = key(&ns, "short-lived");
    store
        .put(&short, v.clone(), &opts(600, &[&t]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    if lists {
        let members = store.tag_members(&t).await.unwrap();
        assert!(members.iter().all(|k| *k == short), "{members:?}");
    }
    assert_eq!(
        store.purge_tag(&t).await.unwrap(),
        0,
        "an expired value counted as purged"
    );
}

/// Records what a purge subscription tells it.
#[derive(Default)]
struct Recorder {
    notices: Mutex<Vec<PurgeNotice>>,
    subscribed: Mutex<Vec<bool>>,
}

#[async_trait]
impl PurgeListener for Recorder {
    async fn purged(&self, notice: PurgeNotice) {
        self.notices.lock().unwrap().push(notice);
    }
    async fn subscribed(&self, live: bool) {
        self.subscribed.lock().unwrap().push(live);
    }
}

impl Recorder {
    fn watching<S: CacheStore>(store: &S) -> (Arc<Recorder>, Arc<dyn PurgeListener>) {
        let recorder = Arc::new(Recorder::default());
        let listener: Arc<dyn PurgeListener> = recorder.clone();
        store.watch_purges(Arc::downgrade(&listener));
        (recorder, listener)
    }

    /// How many times each of `notices` was delivered.
    fn counts(&self, notices: &[PurgeNotice]) -> Vec<usize> {
        let got = self.notices.lock().unwrap();
        notices
            .iter()
            .map(|n| got.iter().filter(|g| *g == n).count())
            .collect()
    }
}

async fn wait_until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Two purges of this run to announce: a hard one of a plain tag, and a
/// soft one of a tag with non-ASCII, braces, `#` and a comma.
fn two_notices(ns: &str, name: &str) -> [PurgeNotice; 2] {
    [
        PurgeNotice {
            tag: tag(ns, name),
            soft: false,
        },
        PurgeNotice {
            tag: format!("\u{e9} {{x}} #soft,{ns}"),
            soft: true,
        },
    ]
}

/// [`PurgeFeed::Push`]: a purge announced through one instance reaches
/// every watcher, its own and another instance's (`other`: a separately
/// connected store of the same backend), each exactly once and as sent.
/// Watching says when the subscription is live. Other feeds: watching
/// never calls the listener.
pub async fn purge_push_reaches_other_instances<S: CacheStore + Clone>(store: &S, other: &S) {
    let notices = two_notices(&ns(), "pushed");
    let (here, _here) = Recorder::watching(store);
    if store.capabilities().purge_feed != PurgeFeed::Push {
        store.announce_purge(&notices[0]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            here.subscribed.lock().unwrap().is_empty() && here.notices.lock().unwrap().is_empty(),
            "watch_purges called the listener of a backend that does not push"
        );
        not_applicable(store, "purge_push_reaches_other_instances", "no push feed");
        return;
    }
    let (there, _there) = Recorder::watching(other);
    for r in [&here, &there] {
        assert!(
            wait_until(Duration::from_secs(10), || r
                .subscribed
                .lock()
                .unwrap()
                .contains(&true))
            .await,
            "subscription not live within 10 s"
        );
    }
    store.announce_purge(&notices[0]).await.unwrap();
    other.announce_purge(&notices[1]).await.unwrap();
    for (name, r) in [("this", &here), ("another", &there)] {
        assert!(
            wait_until(Duration::from_secs(5), || !r.counts(&notices).contains(&0)).await,
            "{name} instance's watcher heard {:?} of {notices:?}",
            r.counts(&notices)
        );
    }
    // Nothing arrives twice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(here.counts(&notices), [1, 1]);
    assert_eq!(there.counts(&notices), [1, 1]);
}

/// [`PurgeFeed::Log`]: a purge announced through any instance is read back
/// by every instance, as sent, from a `since` at or before it; the read is
/// oldest first, holds nothing logged before `since`, gives each purge an
/// id of its own and the same id on every read. Other feeds: announcing
/// succeeds and the log reads empty.
pub async fn purge_log_reads_since<S: CacheStore + Clone>(store: &S, other: &S) {
    let notices = two_notices(&ns(), "logged");
    if store.capabilities().purge_feed != PurgeFeed::Log {
        store.announce_purge(&notices[0]).await.unwrap();
        assert_eq!(
            store.read_purge_log(0).await.unwrap(),
            Vec::new(),
            "a backend without a purge log read one"
        );
        not_applicable(store, "purge_log_reads_since", "no purge log");
        return;
    }
    let before = now_millis();
    other.announce_purge(&notices[0]).await.unwrap();
    store.announce_purge(&notices[1]).await.unwrap();
    let after = now_millis();
    let since = before.saturating_sub(LOG_CLOCK_SLACK.as_millis() as u64);
    let mut first_read = None;
    for (name, reader) in [("this", store), ("another", other)] {
        let log = reader.read_purge_log(since).await.unwrap();
        assert!(log.len() < LOG_READ_MAX, "{} entries", log.len());
        assert!(log.iter().all(|e| e.at >= since), "an entry before since");
        assert!(
            log.windows(2).all(|w| w[0].at <= w[1].at),
            "{name} instance's read is not oldest first"
        );
        // Each purge once; the first no later than the second (logged in
        // the same millisecond, they may come in either order).
        let ours: Vec<&PurgeLogEntry> = notices
            .iter()
            .map(|n| {
                let found: Vec<_> = log.iter().filter(|e| e.notice == *n).collect();
                assert_eq!(
                    found.len(),
                    1,
                    "{name} instance's read has {n:?} {} times",
                    found.len()
                );
                found[0]
            })
            .collect();
        assert!(ours[0].at <= ours[1].at, "{name} instance's read: {ours:?}");
        for e in &ours {
            assert!(
                (before..=after).contains(&e.at),
                "logged at {} outside {before}..={after}",
                e.at
            );
        }
        assert!(!ours[0].id.is_empty() && ours[0].id != ours[1].id, "ids");
        let ids: Vec<String> = ours.iter().map(|e| e.id.clone()).collect();
        match &first_read {
            None => first_read = Some((ids, ours[1].at)),
            Some((first, _)) => assert_eq!(&ids, first, "ids differ between reads"),
        }
    }
    let (_, second_at) = first_read.unwrap();
    // `since` is inclusive: a read from the second's time has it.
    let from_second = store.read_purge_log(second_at).await.unwrap();
    assert!(from_second.iter().all(|e| e.at >= second_at));
    assert!(from_second.iter().any(|e| e.notice == notices[1]));
    let later = store.read_purge_log(after + 1).await.unwrap();
    assert!(
        !later.iter().any(|e| notices.contains(&e.notice)),
        "a read from after both purges has them"
    );
}

/// Every key of a full [`CacheStore::scan_values`], page after page.
async fn scan_all<S: CacheStore>(store: &S) -> BTreeSet<StoreKey> {
    let mut keys = BTreeSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let page = store.scan_values(cursor.as_deref()).await.unwrap();
        keys.extend(page.keys);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return keys,
        }
    }
    panic!("a scan that never ends");
}

/// [`CacheStore::scan_values`] lists every key holding a value, and never
/// a lock, a permit, a tag's list or a removed value. Gated on
/// [`Capabilities::scans_values`](crate::Capabilities).
pub async fn scan_lists_values<S: CacheStore + Clone>(store: &S) {
    let ns = ns();
    if !store.capabilities().scans_values {
        assert!(
            store.scan_values(None).await.is_err(),
            "declares no scan, yet answers one"
        );
        not_applicable(store, "scan_lists_values", "no key listing");
        return;
    }
    let v = Bytes::from_static(b"v");
    let t = tag(&ns, "scan");
    let kept: Vec<StoreKey> = (0..25).map(|i| key(&ns, &format!("kept-{i}"))).collect();
    for k in &kept {
        store.put(k, v.clone(), &opts(60_000, &[&t])).await.unwrap();
    }
    let removed = key(&ns, "removed");
    store
        .put(&removed, v.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    assert!(store.delete(&removed).await.unwrap());
    let expired = key(&ns, "expired");
    store
        .put(&expired, v.clone(), &opts(50, &[]))
        .await
        .unwrap();
    let locked = key(&ns, "locked");
    store
        .try_lock(&locked, Duration::from_secs(30))
        .await
        .unwrap();
    let limited = key(&ns, "limited");
    store
        .take_permit(&limited, Rate::new(10.0, 5), Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let all = scan_all(store).await;
    for k in &kept {
        assert!(all.contains(k), "a stored key missing from the scan");
    }
    for (k, what) in [
        (&removed, "a removed value"),
        (&locked, "a lock"),
        (&limited, "a permit"),
    ] {
        assert!(!all.contains(k), "the scan lists {what}");
    }
    // An expired value may still be listed (a server collects expired
    // keys lazily); reading it finds nothing, which is all a purge needs.
    assert_eq!(store.get(&expired).await.unwrap(), None);
    store.purge_tag(&t).await.unwrap();
    let after = scan_all(store).await;
    assert!(
        kept.iter().all(|k| !after.contains(k)),
        "purged values still listed"
    );
}

/// Runs every conformance function as its own `#[tokio::test]`.
/// `$make` is an expression evaluating to a future of the store.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            round_trip,
            missing_key_is_none,
            expiry_and_stale_window,
            delete_removes,
            overwrite_replaces,
            lock_semantics,
            lock_is_exclusive_under_contention,
            purge_by_tag,
            large_values,
            concurrent_writers,
            corrupt_values_are_misses,
            permit_burst_then_wait,
            permit_denied_reserves_nothing,
            permit_waits_are_spaced,
            permit_rate_holds_under_contention,
            permit_beside_a_value,
            capabilities_are_consistent,
            reads_since_a_write,
            tag_members_lists_candidates,
            scan_lists_values,
            tags_of_any_shape
        );
        // Two stores made separately: two instances of one backend.
        $crate::conformance_tests!(@pair $make;
            purge_push_reaches_other_instances,
            purge_log_reads_since
        );
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make.await;
                $crate::conformance::$name(&store).await;
            }
        )*
    };
    (@pair $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $make.await;
                let other = $make.await;
                $crate::conformance::$name(&store, &other).await;
            }
        )*
    };
}
