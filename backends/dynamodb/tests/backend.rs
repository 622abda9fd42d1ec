//! DynamoDB-specific behaviour beyond the conformance suite: chunked
//! values, expiry checked on read, table set-up, and a server that stops.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cachegate_dynamodb::aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use cachegate_dynamodb::{DynamoConfig, DynamoStore, TableError, TtlState, CHUNK_BYTES};
use cachegate_store::{now_millis, CacheStore, Permit, PutOptions, Rate, StoreError, StoreKey};

fn key(name: &str) -> StoreKey {
    StoreKey::hash("dynamodb-test", [uuid(), name.to_string()])
}

fn uuid() -> String {
    format!("{:x}-{:x}", now_millis(), rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

fn opts(ttl_ms: u64, tags: &[&str]) -> PutOptions {
    PutOptions {
        expires_at: now_millis() + ttl_ms,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

/// Every item under partition `pk`, by sort key.
async fn items(store: &DynamoStore, pk: &str) -> HashMap<String, HashMap<String, AttributeValue>> {
    let mut all = HashMap::new();
    let mut start = None;
    loop {
        let out = store
            .client()
            .query()
            .table_name(store.table())
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(pk.into()))
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("query");
        for item in out.items.unwrap_or_default() {
            let sk = item["sk"].as_s().unwrap().clone();
            all.insert(sk, item);
        }
        match out.last_evaluated_key {
            Some(k) if !k.is_empty() => start = Some(k),
            _ => return all,
        }
    }
}

fn chunk_count(items: &HashMap<String, HashMap<String, AttributeValue>>) -> usize {
    items.keys().filter(|sk| sk.starts_with("c#")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompressible_2mb_value_round_trips_in_chunks() {
    let store = common::store().await;
    let k = key("big");
    let value = common::noise(2_000_000, 1);
    store
        .put(&k, value.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    let got = store.get(&k).await.unwrap().expect("2 MB value missing");
    assert_eq!(got.len(), value.len());
    assert!(got == value, "2 MB value came back different");

    let stored = items(&store, k.as_str()).await;
    let v = &stored["v"];
    assert!(!v.contains_key("val"), "a 2 MB value was stored inline");
    assert_eq!(v["enc"].as_s().unwrap(), "raw", "noise should be kept raw");
    let expected = 2_000_000usize.div_ceil(CHUNK_BYTES);
    assert_eq!(v["nch"].as_n().unwrap(), &expected.to_string());
    assert_eq!(chunk_count(&stored), expected);

    // A compressible value of the same size is stored inline, compressed.
    let text = Bytes::from("cachegate ".repeat(200_000));
    store
        .put(&k, text.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(text));
    let stored = items(&store, k.as_str()).await;
    assert_eq!(stored["v"]["enc"].as_s().unwrap(), "zstd");
    assert!(stored["v"].contains_key("val"));
    assert_eq!(chunk_count(&stored), 0, "replaced chunks were not deleted");

    // Delete removes the chunks with the value.
    store.put(&k, value, &opts(60_000, &[])).await.unwrap();
    assert!(store.delete(&k).await.unwrap());
    assert!(items(&store, k.as_str()).await.is_empty());
}

/// A budget is one item `rate#<key>` / `r` holding the TAT (unix
/// microseconds) and a `ttl` past it, so DynamoDB removes idle ones; the
/// value item of the same key is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_item_layout() {
    let store = common::store().await;
    let k = key("budget");
    store
        .put(&k, Bytes::from_static(b"v"), &opts(60_000, &[]))
        .await
        .unwrap();
    let before = now_millis() * 1000;
    assert_eq!(
        store
            .take_permit(&k, Rate::new(10.0, 3), Duration::ZERO)
            .await
            .unwrap(),
        Permit::Granted {
            wait: Duration::ZERO
        }
    );
    let after = now_millis() * 1000 + 1000;
    let budget = items(&store, &format!("rate#{}", k.as_str())).await;
    assert_eq!(budget.len(), 1, "{budget:?}");
    let item = &budget["r"];
    let tat: u64 = item["tat"].as_n().unwrap().parse().unwrap();
    assert!(
        (before + 100_000..=after + 100_000).contains(&tat),
        "tat {tat} not one emission after {before}..{after}"
    );
    let ttl: u64 = item["ttl"].as_n().unwrap().parse().unwrap();
    assert!(
        ttl * 1_000_000 > tat && ttl * 1_000_000 <= tat + 70_000_000,
        "ttl {ttl} s for tat {tat} µs"
    );
    let mut names: Vec<&str> = item.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["pk", "sk", "tat", "ttl"]);
    let value = items(&store, k.as_str()).await;
    assert_eq!(value.len(), 1);
    assert_eq!(store.get(&k).await.unwrap(), Some(Bytes::from_static(b"v")));
}

/// Separately connected stores (separate SDK clients, standing for
/// instances) share one budget and together never exceed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_budget_shared_by_separate_clients() {
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(common::store().await);
    }
    cachegate_store::conformance::permit_rate_holds_across(&stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_items_still_in_the_table_are_not_returned() {
    let store = common::store().await;

    // Written by the store with a short life; the server never deletes it.
    let k = key("short");
    store
        .put(&k, Bytes::from_static(b"short-lived"), &opts(800, &[]))
        .await
        .unwrap();
    let chunked = key("short-chunked");
    store
        .put(&chunked, common::noise(800_000, 2), &opts(800, &[]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(items(&store, k.as_str()).await.contains_key("v"));
    assert!(items(&store, chunked.as_str()).await.contains_key("v"));
    assert_eq!(store.get(&k).await.unwrap(), None, "expired value returned");
    assert_eq!(store.get(&chunked).await.unwrap(), None);
    assert!(
        !store.delete(&k).await.unwrap(),
        "expired value counted as deleted"
    );

    // Written by hand, as an item the table's TTL has not removed yet:
    // `ttl` in the past and `exp` in the past.
    let raw = key("raw");
    let past = now_millis() - 5_000;
    let item = HashMap::from([
        ("pk".to_string(), AttributeValue::S(raw.as_str().into())),
        ("sk".to_string(), AttributeValue::S("v".into())),
        ("exp".to_string(), AttributeValue::N(past.to_string())),
        (
            "ttl".to_string(),
            AttributeValue::N((past / 1000).to_string()),
        ),
        ("enc".to_string(), AttributeValue::S("raw".into())),
        ("len".to_string(), AttributeValue::N("3".into())),
        (
            "val".to_string(),
            AttributeValue::B(cachegate_dynamodb::aws_sdk_dynamodb::primitives::Blob::new(
                b"old".to_vec(),
            )),
        ),
    ]);
    store
        .client()
        .put_item()
        .table_name(store.table())
        .set_item(Some(item.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        store.get(&raw).await.unwrap(),
        None,
        "expired raw item returned"
    );

    // The same item with a future `exp` is read: the layout is what the
    // hand-written item says it is.
    let mut live = item;
    let future = now_millis() + 60_000;
    live.insert("exp".into(), AttributeValue::N(future.to_string()));
    live.insert(
        "ttl".into(),
        AttributeValue::N((future / 1000 + 1).to_string()),
    );
    store
        .client()
        .put_item()
        .table_name(store.table())
        .set_item(Some(live))
        .send()
        .await
        .unwrap();
    assert_eq!(
        store.get(&raw).await.unwrap(),
        Some(Bytes::from_static(b"old"))
    );

    // The `ttl` attribute the table's TTL deletes by: epoch seconds, at or
    // after the expiry.
    let t = key("ttl-attr");
    let o = opts(60_000, &[]);
    store.put(&t, Bytes::from_static(b"x"), &o).await.unwrap();
    let stored = items(&store, t.as_str()).await;
    let ttl: u64 = stored["v"]["ttl"].as_n().unwrap().parse().unwrap();
    assert!(ttl * 1000 >= o.expires_at && ttl * 1000 < o.expires_at + 1000);
}

/// A reader racing a rewriter of a chunked value gets one whole value or
/// the other, never a mix; replaced chunk generations are cleaned up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_reader_racing_rewriter_never_sees_a_mix() {
    let store = common::store().await;
    let k = key("raced");
    let a = common::noise(900_000, 3);
    let b = common::noise(900_000, 4);
    store.put(&k, a.clone(), &opts(60_000, &[])).await.unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let whole = Arc::new(AtomicUsize::new(0));
    let misses = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (store, k, a, b) = (store.clone(), k.clone(), a.clone(), b.clone());
        let (done, whole, misses) = (done.clone(), whole.clone(), misses.clone());
        readers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                match store.get(&k).await.unwrap() {
                    Some(v) => {
                        assert!(v == a || v == b, "reader got a mix of two values");
                        whole.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for i in 0..24 {
        let v = if i % 2 == 0 { b.clone() } else { a.clone() };
        store.put(&k, v, &opts(60_000, &[])).await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let (whole, misses) = (
        whole.load(Ordering::Relaxed),
        misses.load(Ordering::Relaxed),
    );
    eprintln!("racing reads: {whole} whole values, {misses} misses");
    assert!(whole > 0, "no read completed while rewriting");
    assert!(
        misses <= whole,
        "too many misses: {misses} vs {whole} reads"
    );
    assert_eq!(store.get(&k).await.unwrap(), Some(a.clone()));

    let stored = items(&store, k.as_str()).await;
    let gen = stored["v"]["gen"].as_s().unwrap().clone();
    let stale: Vec<_> = stored
        .keys()
        .filter(|sk| sk.starts_with("c#") && !sk.starts_with(&format!("c#{gen}#")))
        .collect();
    assert!(stale.is_empty(), "stale chunk generations left: {stale:?}");
    assert_eq!(chunk_count(&stored), 900_000usize.div_ceil(CHUNK_BYTES));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_chunked_values_and_member_items() {
    let store = common::store().await;
    let tag = format!("purge-{}", uuid());
    let big = key("big");
    let small = key("small");
    store
        .put(&big, common::noise(700_000, 5), &opts(60_000, &[&tag]))
        .await
        .unwrap();
    store
        .put(
            &small,
            Bytes::from_static(b"s"),
            &opts(60_000, &[&tag, "other"]),
        )
        .await
        .unwrap();
    let members = format!("tag#{}", StoreKey::for_tag(&tag).digest());
    assert_eq!(items(&store, &members).await.len(), 2);
    assert_eq!(store.purge_tag(&tag).await.unwrap(), 2);
    assert!(
        items(&store, big.as_str()).await.is_empty(),
        "chunks left after purge"
    );
    assert_eq!(store.get(&small).await.unwrap(), None);
    assert!(
        items(&store, &members).await.is_empty(),
        "member items left"
    );

    // Any tag string works: the table only ever sees its hash.
    let long = format!("{}-{}", "x".repeat(5_000), uuid());
    let odd = format!("ünï cödé\t\"{}\"\0", uuid());
    let k = key("odd-tags");
    store
        .put(
            &k,
            Bytes::from_static(b"o"),
            &opts(60_000, &[&long, &odd, &odd]),
        )
        .await
        .unwrap();
    assert_eq!(store.purge_tag(&odd).await.unwrap(), 1);
    assert_eq!(store.get(&k).await.unwrap(), None);
    store
        .put(&k, Bytes::from_static(b"o"), &opts(60_000, &[&long]))
        .await
        .unwrap();
    assert_eq!(store.purge_tag(&odd).await.unwrap(), 0);
    assert_eq!(store.purge_tag(&long).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_size_limit_is_advertised_and_enforced() {
    let cfg = DynamoConfig {
        max_value_bytes: 1024 * 1024,
        ..common::config()
    };
    let store = common::store_with(&cfg).await;
    let caps = store.capabilities();
    assert_eq!(caps.name, "dynamodb");
    assert!(caps.shared);
    assert_eq!(caps.max_value_bytes, 1024 * 1024);
    let k = key("limit");
    let at_limit = common::noise(1024 * 1024, 6);
    store
        .put(&k, at_limit.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(at_limit));
    match store
        .put(&k, common::noise(1024 * 1024 + 1, 7), &opts(60_000, &[]))
        .await
    {
        Err(StoreError::TooLarge {
            backend: "dynamodb",
            size,
            limit,
        }) => {
            assert_eq!((size, limit), (1024 * 1024 + 1, 1024 * 1024));
        }
        other => panic!("over the limit: {other:?}"),
    }
    assert_eq!(DynamoConfig::default().max_value_bytes, 6 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_table_is_idempotent_under_concurrency_and_checks_the_schema() {
    let table = format!("cg-init-{}", uuid());
    let cfg = DynamoConfig {
        table: table.clone(),
        ..common::config()
    };
    let store = common::store_at(&common::endpoint(), &cfg).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move { s.ensure_table().await }));
    }
    let mut created = 0;
    for t in tasks {
        let status = t.await.unwrap().expect("concurrent ensure_table");
        assert_eq!(status.table, table);
        created += status.created as usize;
        assert!(
            matches!(
                status.ttl,
                TtlState::Enabled | TtlState::EnabledNow | TtlState::Unsupported(_)
            ),
            "{:?}",
            status.ttl
        );
    }
    assert_eq!(created, 1, "table created {created} times");
    let again = store.ensure_table().await.unwrap();
    assert!(!again.created);
    let k = key("after-init");
    store
        .put(&k, Bytes::from_static(b"ok"), &opts(60_000, &[]))
        .await
        .unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"ok"))
    );

    // A table with another key schema is refused, not used.
    let other = format!("cg-wrong-{}", uuid());
    store
        .client()
        .create_table()
        .table_name(&other)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let wrong = common::store_at(
        &common::endpoint(),
        &DynamoConfig {
            table: other,
            ..common::config()
        },
    )
    .await;
    match wrong.ensure_table().await {
        Err(TableError::Schema { found, .. }) => assert!(found.contains("id"), "{found}"),
        other => panic!("wrong schema accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_unusable_with_the_init_hint() {
    let cfg = DynamoConfig {
        table: format!("cg-missing-{}", uuid()),
        ..common::config()
    };
    let store = common::store_at(&common::endpoint(), &cfg).await;
    let k = key("nowhere");
    for r in [
        store.get(&k).await.map(drop),
        store
            .put(&k, Bytes::from_static(b"x"), &opts(60_000, &["t"]))
            .await,
        store.delete(&k).await.map(drop),
        store.try_lock(&k, Duration::from_secs(1)).await.map(drop),
        store.purge_tag("t").await.map(drop),
    ] {
        // A table that does not exist cannot be fixed by retrying: said
        // shortly, with what to do.
        match r {
            Err(StoreError::Unusable {
                backend: "dynamodb",
                message,
            }) => {
                assert!(message.contains("does not exist"), "{message}");
                assert!(message.contains("run `cachegate init`"), "{message}");
                assert!(message.len() < 300, "{message}");
            }
            other => panic!("missing table: {other:?}"),
        }
    }
}

/// A dynalite of the test's own, killed on drop.
struct OwnServer {
    child: Child,
    endpoint: String,
}

impl OwnServer {
    fn start() -> Self {
        let bin = std::env::var("CACHEGATE_TEST_DYNALITE").unwrap_or_else(|_| {
            panic!(
                "CACHEGATE_TEST_DYNALITE is not set: start the services with \
                 `source scripts/lib.sh; source scripts/services/dynamodb.sh; start_dynamodb`"
            )
        });
        let port = cachegate_test_net::free_port();
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--createTableMs", "50"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        cachegate_test_net::wait_listening(
            &mut child,
            port,
            "own dynalite",
            Duration::from_secs(20),
        );
        OwnServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every operation of `store` fails (no panic) within `bound`.
async fn all_fail_within(store: &DynamoStore, bound: Duration, what: &str) {
    let k = key("down");
    let started = Instant::now();
    let results: Vec<(&str, Result<(), StoreError>)> = vec![
        ("get", store.get(&k).await.map(drop)),
        (
            "put",
            store
                .put(&k, Bytes::from_static(b"x"), &opts(60_000, &["t"]))
                .await,
        ),
        ("delete", store.delete(&k).await.map(drop)),
        (
            "try_lock",
            store.try_lock(&k, Duration::from_secs(5)).await.map(drop),
        ),
        ("purge_tag", store.purge_tag("t").await.map(drop)),
        (
            "take_permit",
            store
                .take_permit(&k, Rate::new(10.0, 1), Duration::ZERO)
                .await
                .map(drop),
        ),
    ];
    let took = started.elapsed();
    for (op, r) in results {
        match r {
            Err(StoreError::Timeout {
                backend: "dynamodb",
                ..
            })
            | Err(StoreError::Backend {
                backend: "dynamodb",
                ..
            }) => {}
            other => panic!("{what}: {op} did not fail: {other:?}"),
        }
    }
    // Six operations, each bounded by the operation timeout.
    assert!(
        took < bound * 6 + Duration::from_secs(2),
        "{what}: took {took:?}"
    );
}

/// `cachegate init` is not held to the data plane's operation timeout
/// (tens of milliseconds in production): table management on a server
/// that stalls for a second still succeeds, while a read in the same stall
/// gives up within its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_management_outlasts_the_operation_timeout() {
    let server = OwnServer::start();
    let timeout = Duration::from_millis(100);
    let store = common::store_at(
        &server.endpoint,
        &DynamoConfig {
            table: "cachegate-slow-init".into(),
            operation_timeout: timeout,
            ..DynamoConfig::default()
        },
    )
    .await;
    server.signal("-STOP");
    let init = tokio::spawn({
        let store = store.clone();
        async move { store.ensure_table().await }
    });
    let started = Instant::now();
    assert!(
        store.get(&key("during-the-stall")).await.is_err(),
        "a read answered by a stopped server"
    );
    assert!(started.elapsed() < Duration::from_millis(1000));
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(started.elapsed())).await;
    server.signal("-CONT");
    let status = init
        .await
        .unwrap()
        .expect("ensure_table gave up on a server that stalled for a second");
    assert!(status.created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_mid_way_gives_errors_within_the_timeout() {
    let server = OwnServer::start();
    let timeout = Duration::from_millis(600);
    let cfg = DynamoConfig {
        table: "cachegate-stop".into(),
        operation_timeout: timeout,
        ..DynamoConfig::default()
    };
    let store = common::store_at(&server.endpoint, &cfg).await;
    // Set-up with patience (a loaded machine); the timeout applies after.
    let setup = common::store_at(
        &server.endpoint,
        &DynamoConfig {
            operation_timeout: Duration::from_secs(10),
            ..cfg.clone()
        },
    )
    .await;
    setup.ensure_table().await.unwrap();
    let k = key("before");
    let big = common::noise(500_000, 8);
    setup
        .put(&k, big.clone(), &opts(60_000, &[]))
        .await
        .unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(big.clone()));

    // Frozen (accepts connections, never answers): every call times out.
    server.signal("-STOP");
    let started = Instant::now();
    match store.get(&k).await {
        Err(StoreError::Timeout {
            backend: "dynamodb",
            after,
        }) => assert_eq!(after, timeout),
        other => panic!("frozen server: {other:?}"),
    }
    assert!(
        started.elapsed() < timeout + Duration::from_millis(1500),
        "get on a frozen server took {:?}",
        started.elapsed()
    );
    all_fail_within(&store, timeout, "frozen server").await;

    // Thawed: the same store works again.
    server.signal("-CONT");
    let started = Instant::now();
    loop {
        match store.get(&k).await {
            Ok(v) => {
                assert_eq!(v, Some(big.clone()));
                break;
            }
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(15),
                "no recovery after the server came back: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Killed (connections refused): errors, quickly.
    drop(server);
    all_fail_within(&store, timeout, "killed server").await;
}
