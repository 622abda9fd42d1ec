//! Corrupt cache data in the real shared backends (the redis-server and the
//! DynamoDB-compatible server scripts/test starts): foreign bytes,
//! truncated records, records of another encoding version and malformed
//! backend items, written straight into the server under the key the proxy
//! uses. Through `cachegate serve` each is a miss answered by the upstream
//! (never a 5xx), and the next fill overwrites it.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use cachegate_store::{Entry, Record, StoreKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{cachegate, get, upstream};

fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through scripts/test, which starts the services")
    })
}

const QUERY: &str = "cc=max-age%3D60";

/// The key the proxy stores `path?QUERY` under (no base path, no key
/// headers, the default route), for a plain-HTTP request whose `Host` was
/// `host` (cachegate's `X-Forwarded-Host`, part of the key), computed by
/// the proxy's own key code.
fn primary_key(path: &str, host: Option<&str>) -> StoreKey {
    let base = reqwest::Url::parse("http://upstream.invalid").unwrap();
    let target =
        cachegate::key::Target::resolve(&base, path, Some(QUERY), Default::default()).unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host.parse().unwrap());
    }
    target.primary_key("*", &[], &headers)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A record as the proxy would write it, to damage.
fn good_record() -> Bytes {
    let now = now_ms();
    Record::Entry(Entry {
        status: 200,
        headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(b"FORGED BODY that must never be served"),
        born_at: now,
        stored_at: now,
        fresh_until: now + 600_000,
        stale_while_revalidate_until: now + 600_000,
        stale_if_error_until: now + 600_000,
        keep_until: now + 600_000,
        tags: vec![],
    })
    .encode()
}

/// Damaged record bytes, by name.
fn damaged_records() -> Vec<(&'static str, Vec<u8>)> {
    let good = good_record().to_vec();
    let mut old_version = good.clone();
    old_version[2] = 0;
    let mut new_version = good.clone();
    new_version[2] = 200;
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x55;
    let mut unknown_kind = good.clone();
    unknown_kind[3] = 77;
    vec![
        (
            "foreign json",
            br#"{"status":200,"body":"FORGED"}"#.to_vec(),
        ),
        ("foreign binary", (0..=255u8).rev().collect()),
        ("empty", Vec::new()),
        ("magic only", b"CG".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("truncated header", good[..6].to_vec()),
        ("older version", old_version),
        ("newer version", new_version),
        ("bit flip", flipped),
        ("unknown kind", unknown_kind),
    ]
}

/// Every answer to a corrupt entry: the upstream's 200, then a hit on what
/// that fill stored.
async fn assert_miss_then_overwritten(cg: &common::Cachegate, path: &str, case: &str) {
    let url = format!("{}{path}?{QUERY}", cg.url);
    let first = get(&url).await;
    assert_eq!(first.status, 200, "{case}: {:?}", first.body);
    assert_eq!(first.x_cache(), "MISS", "{case}");
    assert!(
        !String::from_utf8_lossy(&first.body).contains("FORGED"),
        "{case}: served the forged body"
    );
    assert_eq!(first.json()["path"], path, "{case}");
    let second = get(&url).await;
    assert_eq!(
        second.x_cache(),
        "HIT",
        "{case}: the fill did not overwrite"
    );
    assert_eq!(second.body, first.body, "{case}");
}

// ---------------------------------------------------------------------------
// Redis, spoken to directly in RESP (so any type and any bytes can be put
// where the proxy looks).

struct Resp {
    s: tokio::net::TcpStream,
}

impl Resp {
    async fn connect() -> Resp {
        let url = need("CACHEGATE_TEST_REDIS_URL");
        let addr = url.trim_start_matches("redis://").trim_end_matches('/');
        Resp {
            s: tokio::net::TcpStream::connect(addr).await.unwrap(),
        }
    }

    /// One command; the reply's first line and, for a bulk string, its bytes.
    async fn cmd(&mut self, args: &[&[u8]]) -> (String, Option<Vec<u8>>) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.s.write_all(&out).await.unwrap();
        let mut line = Vec::new();
        loop {
            let b = self.s.read_u8().await.unwrap();
            line.push(b);
            if line.ends_with(b"\r\n") {
                break;
            }
        }
        let line = String::from_utf8(line).unwrap().trim_end().to_owned();
        assert!(!line.starts_with('-'), "redis error: {line}");
        if let Some(n) = line.strip_prefix('$') {
            let n: i64 = n.parse().unwrap();
            if n < 0 {
                return (line, None);
            }
            let mut buf = vec![0u8; n as usize + 2];
            self.s.read_exact(&mut buf).await.unwrap();
            buf.truncate(n as usize);
            return (line, Some(buf));
        }
        (line, None)
    }
}

#[tokio::test]
async fn corrupt_redis_entries_are_misses_and_are_overwritten() {
    let prefix = format!("corrupt-{}:", std::process::id());
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_BACKEND", "redis"),
            ("CACHEGATE_REDIS__URL", &need("CACHEGATE_TEST_REDIS_URL")),
            ("CACHEGATE_REDIS__KEY_PREFIX", &prefix),
            // Every read goes to Redis, not to this process's copy.
            ("CACHEGATE_CACHE__L1_TTL", "0s"),
        ],
    );
    let mut redis = Resp::connect().await;
    let future = (now_ms() + 600_000).to_string();
    let host = common::TEST_HOST.to_owned();
    let value_key =
        |path: &str| format!("{prefix}v:{{{}}}", primary_key(path, Some(&host)).as_str());

    // Damaged record bytes in an otherwise well-formed value hash.
    let mut cases: Vec<(String, Vec<Vec<u8>>)> = damaged_records()
        .into_iter()
        .map(|(name, bytes)| {
            (
                name.to_owned(),
                vec![
                    b"HSET".to_vec(),
                    b"b".to_vec(),
                    bytes,
                    b"e".to_vec(),
                    future.clone().into_bytes(),
                ],
            )
        })
        .collect();
    // Well-formed records the proxy must not trust blindly.
    let vary_junk = Record::VaryIndex(cachegate_store::VaryIndex {
        headers: vec!["\n bad name".into(), "x-nothing".into()],
        expires_at: now_ms() + 600_000,
    })
    .encode();
    cases.push((
        "vary index with junk names".into(),
        vec![
            b"HSET".to_vec(),
            b"b".to_vec(),
            vary_junk.to_vec(),
            b"e".to_vec(),
            future.clone().into_bytes(),
        ],
    ));
    // The value hash itself malformed.
    cases.push((
        "expiry not a number".into(),
        vec![
            b"HSET".to_vec(),
            b"b".to_vec(),
            good_record().to_vec(),
            b"e".to_vec(),
            b"soon".to_vec(),
        ],
    ));
    cases.push((
        "no expiry field".into(),
        vec![b"HSET".to_vec(), b"b".to_vec(), good_record().to_vec()],
    ));
    cases.push((
        "a string, not a hash".into(),
        vec![b"SET".to_vec(), good_record().to_vec()],
    ));
    cases.push((
        "a list, not a hash".into(),
        vec![b"RPUSH".to_vec(), b"junk".to_vec()],
    ));

    for (i, (case, command)) in cases.iter().enumerate() {
        let path = format!("/corrupt-redis/{i}");
        let key = value_key(&path);
        // command[0] is the verb, the key goes second.
        let mut args: Vec<&[u8]> = vec![&command[0], key.as_bytes()];
        args.extend(command[1..].iter().map(Vec::as_slice));
        redis.cmd(&args).await;
        assert_miss_then_overwritten(&cg, &path, case).await;
        // What is there now is the proxy's own record.
        let (_, stored) = redis.cmd(&[b"HGET", key.as_bytes(), b"b"]).await;
        let stored = Bytes::from(stored.unwrap_or_else(|| panic!("{case}: nothing stored")));
        match Record::decode(&stored) {
            Ok(Record::Entry(e)) => assert!(!e.body.starts_with(b"FORGED"), "{case}"),
            other => panic!("{case}: stored {other:?}"),
        }
    }
    assert_eq!(
        up.state.answered.load(std::sync::atomic::Ordering::SeqCst),
        cases.len()
    );
}

/// Undecodable values are counted (the corrupt counter behind the metrics),
/// separately from backend failures.
#[tokio::test]
async fn corrupt_reads_are_counted() {
    use figment::providers::{Format, Toml};
    let prefix = format!("corrupt-count-{}:", std::process::id());
    let up = upstream().await;
    let toml = format!(
        "backend = \"redis\"\n[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n[cache]\nl1_ttl = \"0s\"\n",
        up.url,
        need("CACHEGATE_TEST_REDIS_URL")
    );
    let config = cachegate::resolved::ResolvedConfig::from_figment(
        figment::Figment::new().merge(Toml::string(&toml)),
    )
    .unwrap();
    let proxy: Arc<cachegate::proxy::Proxy> =
        cachegate::build_proxy(&config, cachegate::config::Mode::Serve)
            .await
            .unwrap();
    let mut redis = Resp::connect().await;
    let future = (now_ms() + 600_000).to_string();
    let damaged = damaged_records();
    for (i, (case, bytes)) in damaged.iter().enumerate() {
        let path = format!("/count/{i}");
        let key = format!("{prefix}v:{{{}}}", primary_key(&path, None).as_str());
        redis
            .cmd(&[
                b"HSET",
                key.as_bytes(),
                b"b",
                bytes,
                b"e",
                future.as_bytes(),
            ])
            .await;
        let req = http::Request::get(format!("{path}?{QUERY}"))
            .body(Bytes::new())
            .unwrap();
        let resp = proxy.handle(req).await;
        assert_eq!(resp.status(), 200, "{case}");
    }
    // Each damaged value is read at least once (a miss looks again before
    // it fetches, so twice here) and every read of one is counted.
    let stats = proxy.cache().stats();
    let corrupt = stats.corrupt.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        corrupt >= damaged.len() as u64,
        "{corrupt} corrupt reads counted for {} damaged values",
        damaged.len()
    );
    assert_eq!(
        stats
            .backend_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

// ---------------------------------------------------------------------------
// DynamoDB, written with the SDK the backend uses.

#[tokio::test]
async fn corrupt_dynamodb_items_are_misses_and_are_overwritten() {
    use cachegate_dynamodb::aws_sdk_dynamodb::primitives::Blob;
    use cachegate_dynamodb::aws_sdk_dynamodb::types::AttributeValue as A;

    let endpoint = need("CACHEGATE_TEST_DYNAMODB_ENDPOINT");
    let table = format!("cachegate-corrupt-{}", std::process::id());
    let env: Vec<(&str, &str)> = vec![
        ("CACHEGATE_BACKEND", "dynamodb"),
        ("AWS_ENDPOINT_URL_DYNAMODB", &endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("CACHEGATE_DYNAMODB__TABLE", &table),
        ("CACHEGATE_CACHE__L1_TTL", "0s"),
    ];
    use cachegate_dynamodb::aws_config::{self, BehaviorVersion, Region};
    use cachegate_dynamodb::aws_sdk_dynamodb::config::Credentials;
    let loader = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"));
    let store = cachegate_dynamodb::connect_with(
        &cachegate_dynamodb::DynamoConfig {
            table: table.clone(),
            operation_timeout: std::time::Duration::from_secs(10),
            ..Default::default()
        },
        loader,
    )
    .await
    .unwrap();
    store.ensure_table().await.unwrap();
    let client = store.client().clone();
    let up = upstream().await;
    let cg = cachegate(&up.url, &env);

    let exp = now_ms() + 600_000;
    let n = |v: u64| A::N(v.to_string());
    let s = |v: &str| A::S(v.to_owned());
    let b = |v: &[u8]| A::B(Blob::new(v.to_vec()));
    // Each case: the attributes of the value item besides pk/sk.
    let mut cases: Vec<(String, Vec<(&str, A)>)> = damaged_records()
        .into_iter()
        .filter(|(_, bytes)| !bytes.is_empty())
        .map(|(name, bytes)| {
            (
                name.to_owned(),
                vec![
                    ("exp", n(exp)),
                    ("ttl", n(exp / 1000)),
                    ("enc", s("raw")),
                    ("len", n(bytes.len() as u64)),
                    ("val", b(&bytes)),
                ],
            )
        })
        .collect();
    let good = good_record();
    cases.extend([
        (
            "zstd that is not zstd".to_owned(),
            vec![
                ("exp", n(exp)),
                ("ttl", n(exp / 1000)),
                ("enc", s("zstd")),
                ("len", n(good.len() as u64)),
                ("val", b(&good)),
            ],
        ),
        (
            "length disagrees".to_owned(),
            vec![
                ("exp", n(exp)),
                ("ttl", n(exp / 1000)),
                ("enc", s("raw")),
                ("len", n(good.len() as u64 + 1)),
                ("val", b(&good)),
            ],
        ),
        (
            "huge claimed length".to_owned(),
            vec![
                ("exp", n(exp)),
                ("ttl", n(exp / 1000)),
                ("enc", s("zstd")),
                ("len", n(1 << 40)),
                ("val", b(&good)),
            ],
        ),
        (
            "unknown encoding".to_owned(),
            vec![
                ("exp", n(exp)),
                ("ttl", n(exp / 1000)),
                ("enc", s("lz4")),
                ("len", n(good.len() as u64)),
                ("val", b(&good)),
            ],
        ),
        (
            "neither value nor chunks".to_owned(),
            vec![
                ("exp", n(exp)),
                ("ttl", n(exp / 1000)),
                ("enc", s("raw")),
                ("len", n(good.len() as u64)),
            ],
        ),
        (
            "chunks that do not exist".to_owned(),
            vec![
                ("exp", n(exp)),
                ("ttl", n(exp / 1000)),
                ("enc", s("raw")),
                ("len", n(good.len() as u64)),
                ("gen", s("nope")),
                ("nch", n(3)),
            ],
        ),
        (
            "attributes of the wrong type".to_owned(),
            vec![
                ("exp", s("soon")),
                ("ttl", s("later")),
                ("enc", n(1)),
                ("len", s("x")),
                ("val", s("not binary")),
            ],
        ),
    ]);
    for (i, (case, attrs)) in cases.into_iter().enumerate() {
        let path = format!("/corrupt-dynamo/{i}");
        let key = primary_key(&path, Some(common::TEST_HOST));
        let mut put = client
            .put_item()
            .table_name(&table)
            .item("pk", s(key.as_str()))
            .item("sk", s("v"));
        for (name, value) in attrs {
            put = put.item(name, value);
        }
        put.send().await.unwrap();
        assert_miss_then_overwritten(&cg, &path, &case).await;
        use cachegate_store::CacheStore;
        let stored = store
            .get(&key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{case}: nothing stored"));
        match Record::decode(&stored) {
            Ok(Record::Entry(e)) => assert!(!e.body.starts_with(b"FORGED"), "{case}"),
            other => panic!("{case}: stored {other:?}"),
        }
    }
}
