//! AUTH, TLS, key prefix, TTLs and limits against the servers
//! scripts/services/redis.sh starts. A missing server is a failure, never a
//! skip.

use std::time::Duration;

use bytes::Bytes;
use cachegate_redis::{connect, ConnectError, RedisConfig};
use cachegate_store::{now_millis, CacheStore, Permit, PutOptions, Rate, StoreError, StoreKey};

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the Redis servers that \
             scripts/services/redis.sh starts (run scripts/test or backends/redis/test.sh)"
        )
    })
}

fn unique(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), now_millis())
}

fn opts(ttl_ms: u64, tags: &[&str]) -> PutOptions {
    PutOptions {
        expires_at: now_millis() + ttl_ms,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

/// A raw connection for looking at what the store wrote.
async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn password_right_and_wrong() {
    let url = required_env("CACHEGATE_TEST_REDIS_AUTH_URL");
    let password = required_env("CACHEGATE_TEST_REDIS_PASSWORD");

    let good = RedisConfig {
        url: url.clone(),
        password: Some(password.clone()),
        ..RedisConfig::default()
    };
    assert!(
        !format!("{good:?}").contains(&password),
        "Debug shows the password"
    );
    let store = connect(&good).await.expect("right password rejected");
    store.ping().await.unwrap();
    let k = StoreKey::hash("test", [unique("auth")]);
    store
        .put(&k, Bytes::from_static(b"authed"), &opts(10_000, &[]))
        .await
        .unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"authed"))
    );
    assert!(!format!("{store:?}").contains(&password));

    // A wrong password: a clear error, no panic, no password in it.
    let wrong_password = format!("{password}-but-wrong");
    let wrong = RedisConfig {
        password: Some(wrong_password.clone()),
        ..good.clone()
    };
    let started = std::time::Instant::now();
    let err = connect(&wrong).await.expect_err("wrong password accepted");
    let shown = format!("{err} / {err:?}");
    eprintln!("wrong password: {err}");
    assert!(matches!(err, ConnectError::Auth { .. }), "{shown}");
    assert!(!shown.contains(&password), "password in error: {shown}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "wrong password took {:?} to report",
        started.elapsed()
    );

    // The password in the URL instead of the field: also never echoed.
    let in_url = RedisConfig {
        url: url.replacen("redis://", &format!("redis://:{wrong_password}@"), 1),
        ..RedisConfig::default()
    };
    let err = connect(&in_url).await.expect_err("wrong password accepted");
    let shown = format!("{err} / {err:?} / {in_url:?}");
    assert!(!shown.contains(&wrong_password), "{shown}");

    // No password at all.
    let none = RedisConfig {
        url,
        ..RedisConfig::default()
    };
    let err = connect(&none).await.expect_err("no password accepted");
    eprintln!("no password: {err}");
    assert!(matches!(err, ConnectError::Auth { .. }), "{err}");
    assert!(err.to_string().contains("no redis.password"), "{err}");
}

/// An ACL user (ElastiCache RBAC): user name + password; a key prefix
/// outside the user's key patterns fails per operation (NOPERM), as a
/// backend error, not at start-up and never as a panic.
#[tokio::test]
async fn acl_user() {
    let url = required_env("CACHEGATE_TEST_REDIS_AUTH_URL");
    let user = required_env("CACHEGATE_TEST_REDIS_USERNAME");
    let password = required_env("CACHEGATE_TEST_REDIS_PASSWORD");
    let cfg = RedisConfig {
        url,
        username: Some(user.clone()),
        password: Some(password.clone()),
        key_prefix: "cgacl:".into(),
        ..RedisConfig::default()
    };
    let store = connect(&cfg).await.expect("ACL user rejected");
    let k = StoreKey::hash("test", [unique("acl")]);
    let tag = unique("acl-tag");
    store
        .put(&k, Bytes::from_static(b"acl"), &opts(10_000, &[&tag]))
        .await
        .unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"acl"))
    );
    let t = store.try_lock(&k, Duration::from_secs(5)).await.unwrap();
    assert!(store.unlock(&k, &t.unwrap()).await.unwrap());
    assert_eq!(store.purge_tag(&tag).await.unwrap(), 1);

    let outside = connect(&RedisConfig {
        key_prefix: "cachegate:".into(),
        ..cfg.clone()
    })
    .await
    .expect("ACL user rejected");
    let err = outside.get(&k).await.expect_err("key outside the ACL read");
    assert!(
        matches!(
            err,
            StoreError::Backend {
                backend: "redis",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no permissions"), "{err}");
    assert!(!err.to_string().contains(&password));

    let err = connect(&RedisConfig {
        username: Some(format!("{user}-nobody")),
        ..cfg
    })
    .await
    .expect_err("unknown user accepted");
    eprintln!("unknown ACL user: {err}");
    assert!(matches!(err, ConnectError::Auth { .. }), "{err}");
    assert!(err.to_string().contains("-nobody"), "{err}");
    assert!(!err.to_string().contains(&password));
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let url = required_env("CACHEGATE_TEST_REDIS_TLS_URL");
    let ca = required_env("CACHEGATE_TEST_REDIS_TLS_CA");
    assert!(url.starts_with("rediss://"), "{url}");

    let cfg = RedisConfig {
        url: url.clone(),
        ca_file: Some(ca.into()),
        ..RedisConfig::default()
    };
    let store = connect(&cfg).await.expect("TLS connect");
    let k = StoreKey::hash("test", [unique("tls")]);
    let body = Bytes::from((0..=255u8).cycle().take(100_000).collect::<Vec<_>>());
    store
        .put(&k, body.clone(), &opts(10_000, &["tls-tag"]))
        .await
        .unwrap();
    assert_eq!(store.get(&k).await.unwrap(), Some(body));
    assert!(store.delete(&k).await.unwrap());

    // The system roots do not know the test CA: refused, clearly.
    let untrusted = RedisConfig {
        url: url.clone(),
        ..RedisConfig::default()
    };
    let err = connect(&untrusted)
        .await
        .expect_err("untrusted certificate accepted");
    eprintln!("untrusted CA: {err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    // Plain text to the TLS port: fails within the timeouts, no hang.
    let plain = RedisConfig {
        url: url.replacen("rediss://", "redis://", 1),
        connect_timeout: Duration::from_millis(500),
        ..RedisConfig::default()
    };
    let started = std::time::Instant::now();
    let err = connect(&plain)
        .await
        .expect_err("plain text to a TLS port worked");
    eprintln!("plain text to the TLS port: {err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A CA file that is not there.
    let missing = RedisConfig {
        url,
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..RedisConfig::default()
    };
    let err = connect(&missing).await.expect_err("missing CA file");
    assert!(matches!(err, ConnectError::CaFile { .. }), "{err}");
}

/// Values carry a Redis TTL (Redis evicts by itself), tag sets live at
/// least as long as their values, and everything sits under the prefix.
#[tokio::test]
async fn keys_prefix_and_ttls() {
    let url = required_env("CACHEGATE_TEST_REDIS_URL");
    let prefix = format!("{}:", unique("cgtest-prefix"));
    let store = connect(&RedisConfig {
        url: url.clone(),
        key_prefix: prefix.clone(),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    let other = connect(&RedisConfig {
        url: url.clone(),
        key_prefix: format!("{prefix}other:"),
        ..RedisConfig::default()
    })
    .await
    .unwrap();

    let k = StoreKey::hash("test", ["prefixed"]);
    let tag = unique("tag");
    store
        .put(&k, Bytes::from_static(b"mine"), &opts(30_000, &[&tag]))
        .await
        .unwrap();
    assert_eq!(other.get(&k).await.unwrap(), None, "prefixes share values");
    assert_eq!(
        other.purge_tag(&tag).await.unwrap(),
        0,
        "prefixes share tags"
    );
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"mine"))
    );

    let mut conn = raw(&url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let value_key = format!("{prefix}v:{{{}}}", k.as_str());
    assert!(keys.contains(&value_key), "{keys:?}");
    assert_eq!(keys.len(), 2, "one value and one tag set: {keys:?}");
    let tag_key = keys.iter().find(|k| **k != value_key).unwrap();
    let value_ttl: i64 = redis::cmd("PTTL")
        .arg(&value_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let tag_ttl: i64 = redis::cmd("PTTL")
        .arg(tag_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (25_000..=30_000).contains(&value_ttl),
        "value TTL {value_ttl}"
    );
    assert!(
        tag_ttl >= value_ttl,
        "tag set {tag_ttl} < value {value_ttl}"
    );

    // A shorter-lived value under the same tag never shortens the set's TTL.
    let k2 = StoreKey::hash("test", ["prefixed-2"]);
    store
        .put(&k2, Bytes::from_static(b"brief"), &opts(1_000, &[&tag]))
        .await
        .unwrap();
    let tag_ttl_after: i64 = redis::cmd("PTTL")
        .arg(tag_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(tag_ttl_after >= value_ttl - 1_000, "{tag_ttl_after}");

    // The lock lives under the prefix too, with its TTL.
    let token = store
        .try_lock(&k, Duration::from_secs(7))
        .await
        .unwrap()
        .unwrap();
    let lock_ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}l:{{{}}}", k.as_str()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((5_000..=7_000).contains(&lock_ttl), "lock TTL {lock_ttl}");
    assert!(store.unlock(&k, &token).await.unwrap());

    assert_eq!(store.purge_tag(&tag).await.unwrap(), 2);
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "left after purge: {left:?}");
}

/// A rate budget is one key under the prefix holding the TAT in the
/// server's microseconds (`TIME`), expiring `PERMIT_SLACK_MS` after it, so
/// an idle budget vanishes; a TAT the server's clock puts in the future
/// is honoured whatever the client's clock says.
#[tokio::test]
async fn permit_key_on_the_servers_clock() {
    let url = required_env("CACHEGATE_TEST_REDIS_URL");
    let prefix = format!("{}:", unique("cgtest-permit"));
    let store = connect(&RedisConfig {
        url: url.clone(),
        key_prefix: prefix.clone(),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    let mut conn = raw(&url).await;
    let server_micros = |t: (u64, u64)| t.0 * 1_000_000 + t.1;

    let k = StoreKey::hash("test", ["budget"]);
    let budget_key = format!("{prefix}r:{{{}}}", k.as_str());
    let rate = Rate::new(20.0, 1);
    let before: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    assert_eq!(
        store.take_permit(&k, rate, Duration::ZERO).await.unwrap(),
        Permit::Granted {
            wait: Duration::ZERO
        }
    );
    let after: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let tat: String = redis::cmd("GET")
        .arg(&budget_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let tat: u64 = tat.parse().unwrap_or_else(|_| panic!("TAT {tat:?}"));
    assert!(
        (server_micros(before) + 50_000..=server_micros(after) + 50_000).contains(&tat),
        "TAT {tat} not one emission after the server's TIME {before:?}..{after:?}"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&budget_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let slack = cachegate_redis::PERMIT_SLACK_MS as i64;
    assert!(
        (slack - 100..=slack + 50).contains(&ttl),
        "budget TTL {ttl}"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        keys,
        std::slice::from_ref(&budget_key),
        "a permit wrote other keys"
    );
    tokio::time::sleep(Duration::from_millis(slack as u64 + 200)).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&budget_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "idle budget still stored");

    // A TAT ten seconds ahead of the server's clock: denied for about
    // nine (tolerance 1 s at 1/s, burst 2), however the client's clock runs.
    let now: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let ahead = server_micros(now) + 10_000_000;
    let _: () = redis::cmd("SET")
        .arg(&budget_key)
        .arg(ahead.to_string())
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    match store
        .take_permit(&k, Rate::new(1.0, 2), Duration::ZERO)
        .await
        .unwrap()
    {
        Permit::Denied { retry_in } => assert!(
            retry_in > Duration::from_millis(8_500) && retry_in <= Duration::from_secs(9),
            "retry_in {retry_in:?}"
        ),
        other => panic!("{other:?} with the budget 10 s ahead"),
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&budget_key)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Separately connected stores (standing for instances) share one budget
/// and together never get more than it allows, on a server and on a
/// cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_budget_shared_by_separate_connections() {
    for (url, cluster) in [
        (required_env("CACHEGATE_TEST_REDIS_URL"), false),
        (required_env("CACHEGATE_TEST_REDIS_CLUSTER_URL"), true),
    ] {
        let mut stores = Vec::new();
        for _ in 0..4 {
            let cfg = RedisConfig {
                url: url.clone(),
                cluster,
                key_prefix: "cgtest:servers:".into(),
                ..RedisConfig::default()
            };
            stores.push(connect(&cfg).await.unwrap());
        }
        cachegate_store::conformance::permit_rate_holds_across(&stores).await;
    }
}

#[tokio::test]
async fn values_over_the_limit_are_refused() {
    let store = connect(&RedisConfig {
        url: required_env("CACHEGATE_TEST_REDIS_URL"),
        max_value_bytes: bytesize::ByteSize::kib(64),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(store.capabilities().max_value_bytes, 64 * 1024);
    assert_eq!(store.capabilities().name, "redis");
    assert!(store.capabilities().shared);
    let k = StoreKey::hash("test", [unique("big")]);
    store
        .put(&k, Bytes::from(vec![7u8; 64 * 1024]), &opts(10_000, &[]))
        .await
        .unwrap();
    match store
        .put(
            &k,
            Bytes::from(vec![8u8; 64 * 1024 + 1]),
            &opts(10_000, &[]),
        )
        .await
    {
        Err(StoreError::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (64 * 1024 + 1, 64 * 1024))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from(vec![7u8; 64 * 1024]))
    );
}

/// Two stores (two processes, two Lambda instances) on one Redis see each
/// other's values, locks and purges.
#[tokio::test]
async fn shared_between_stores() {
    for (url, cluster) in [
        (required_env("CACHEGATE_TEST_REDIS_URL"), false),
        (required_env("CACHEGATE_TEST_REDIS_CLUSTER_URL"), true),
    ] {
        let cfg = RedisConfig {
            url,
            cluster,
            ..RedisConfig::default()
        };
        let a = connect(&cfg).await.unwrap();
        let b = connect(&cfg).await.unwrap();
        let k = StoreKey::hash("test", [unique("shared")]);
        let tag = unique("shared-tag");
        a.put(&k, Bytes::from_static(b"from a"), &opts(10_000, &[&tag]))
            .await
            .unwrap();
        assert_eq!(
            b.get(&k).await.unwrap(),
            Some(Bytes::from_static(b"from a"))
        );
        let t = a.try_lock(&k, Duration::from_secs(10)).await.unwrap();
        assert!(t.is_some());
        assert!(b
            .try_lock(&k, Duration::from_secs(10))
            .await
            .unwrap()
            .is_none());
        assert_eq!(b.purge_tag(&tag).await.unwrap(), 1);
        assert_eq!(a.get(&k).await.unwrap(), None);
        assert!(a.unlock(&k, &t.unwrap()).await.unwrap());
    }
}

#[tokio::test]
async fn cluster_accepts_one_node_or_a_list() {
    let urls = required_env("CACHEGATE_TEST_REDIS_CLUSTER_URL");
    let first = urls.split(',').next().unwrap().to_owned();
    // One node is enough: the client discovers the rest (like an
    // ElastiCache configuration endpoint).
    let store = connect(&RedisConfig {
        url: first,
        cluster: true,
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    store.ping().await.unwrap();
    // Keys spread over every slot range.
    for i in 0..64 {
        let k = StoreKey::hash("test", [unique("spread"), i.to_string()]);
        store
            .put(
                &k,
                Bytes::from(vec![i as u8; 10]),
                &opts(10_000, &["spread"]),
            )
            .await
            .unwrap();
        assert_eq!(
            store.get(&k).await.unwrap(),
            Some(Bytes::from(vec![i as u8; 10]))
        );
    }
    // A list without cluster = true is a configuration error.
    let err = connect(&RedisConfig {
        url: urls,
        ..RedisConfig::default()
    })
    .await
    .expect_err("list accepted without cluster");
    assert!(
        matches!(err, ConnectError::Config { field: "url", .. }),
        "{err}"
    );
}

#[tokio::test]
async fn configuration_errors_name_the_setting() {
    let err = connect(&RedisConfig {
        key_prefix: "a{b}:".into(),
        ..RedisConfig::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("redis.key_prefix"), "{err}");
    let err = connect(&RedisConfig {
        url: "http://example.com".into(),
        ..RedisConfig::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("redis.url"), "{err}");
    let err = connect(&RedisConfig {
        url: "redis://127.0.0.1:1".into(),
        ca_file: Some("/tmp/ca.pem".into()),
        ..RedisConfig::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("redis.ca_file"), "{err}");
}

#[test]
fn config_from_serde() {
    let cfg: RedisConfig = serde_json::from_value(serde_json::json!({
        "url": "rediss://cfg.example.cache.amazonaws.com:6379",
        "username": "app",
        "password": "token",
        "cluster": true,
        "key_prefix": "api1:",
        "connect_timeout": "300ms",
        "response_timeout": "40ms",
        "max_value_bytes": "1MiB",
        "ca_file": "/etc/ca.pem"
    }))
    .unwrap();
    assert_eq!(cfg.connect_timeout, Duration::from_millis(300));
    assert_eq!(cfg.response_timeout, Duration::from_millis(40));
    assert_eq!(cfg.max_value_bytes.as_u64(), 1024 * 1024);
    assert!(cfg.cluster);
    let defaults: RedisConfig = serde_json::from_value(serde_json::json!({})).unwrap();
    assert_eq!(defaults, RedisConfig::default());
    assert_eq!(defaults.url, "redis://127.0.0.1:6379");
    assert_eq!(defaults.key_prefix, "cachegate:");
    assert_eq!(defaults.max_value_bytes.as_u64(), 8 * 1024 * 1024);
    let err = serde_json::from_value::<RedisConfig>(serde_json::json!({"urll": "x"})).unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
}

/// A purge cut short by the caller's timeout loses nothing: the next purge
/// finds every value still tagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_purge_is_resumed() {
    let store = connect(&RedisConfig {
        url: required_env("CACHEGATE_TEST_REDIS_URL"),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    let tag = unique("big-tag");
    let n = 1_500u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let store = store.clone();
            let tag = tag.clone();
            set.spawn(async move {
                let k = StoreKey::hash("test", [tag.clone(), i.to_string()]);
                store
                    .put(&k, Bytes::from_static(b"x"), &opts(60_000, &[&tag]))
                    .await
                    .unwrap();
            });
        }
        set.join_all().await;
    }
    // Cut off after a few milliseconds, like the guard's purge timeout.
    let partial = tokio::time::timeout(Duration::from_millis(5), store.purge_tag(&tag)).await;
    assert!(
        partial.is_err(),
        "1500 values purged in 5ms; make the test bigger"
    );
    let rest = store.purge_tag(&tag).await.unwrap();
    assert!(rest > 0 && rest <= n, "{rest}");
    for i in 0..n {
        let k = StoreKey::hash("test", [tag.clone(), i.to_string()]);
        assert_eq!(store.get(&k).await.unwrap(), None, "value {i} survived");
    }
    assert_eq!(store.purge_tag(&tag).await.unwrap(), 0);
}

#[tokio::test]
async fn far_future_expiry() {
    let store = connect(&RedisConfig {
        url: required_env("CACHEGATE_TEST_REDIS_URL"),
        ..RedisConfig::default()
    })
    .await
    .unwrap();
    let k = StoreKey::hash("test", [unique("forever")]);
    let opts = PutOptions {
        expires_at: u64::MAX,
        tags: vec![unique("forever-tag")],
    };
    store
        .put(&k, Bytes::from_static(b"long"), &opts)
        .await
        .unwrap();
    assert_eq!(
        store.get(&k).await.unwrap(),
        Some(Bytes::from_static(b"long"))
    );
    let t = store
        .try_lock(&k, Duration::MAX)
        .await
        .unwrap()
        .expect("lock with a huge ttl");
    assert!(store.unlock(&k, &t).await.unwrap());
    assert_eq!(store.purge_tag(&opts.tags[0]).await.unwrap(), 1);
}
