//! Sequential get/put latency of `RedisStore` against a running Redis, for
//! comparison with `redis-benchmark -t get -c 1 -d SIZE` on the same server.
//!
//!   cargo run --profile bench -p cachegate-redis --example latency -- \
//!       redis://127.0.0.1:6379 [value bytes, default 1024] [requests, default 20000]
//!
//! Prints p50/p99/max in microseconds for get (hit), get (miss) and put.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachegate_redis::{connect, RedisConfig};
use cachegate_store::{now_millis, CacheStore, PutOptions, StoreKey};

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_micros();
    println!(
        "{name:<10} n={:<6} p50={:>5}us p99={:>5}us max={:>6}us",
        samples.len(),
        at(0.50),
        at(0.99),
        samples.last().unwrap().as_micros()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: latency REDIS_URL [SIZE] [N]");
    let size: usize = args.next().map_or(1024, |s| s.parse().unwrap());
    let n: usize = args.next().map_or(20_000, |s| s.parse().unwrap());
    let store = connect(&RedisConfig {
        url,
        cluster: false,
        ..RedisConfig::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let key = StoreKey::hash("latency", ["hit"]);
    let value = Bytes::from(vec![b'x'; size]);
    let opts = PutOptions {
        expires_at: now_millis() + 600_000,
        tags: vec!["latency".into()],
    };
    store.put(&key, value.clone(), &opts).await.unwrap();
    for _ in 0..1000 {
        store.get(&key).await.unwrap();
    }
    let (mut hits, mut misses, mut puts) = (Vec::new(), Vec::new(), Vec::new());
    let missing = StoreKey::hash("latency", ["miss"]);
    for _ in 0..n {
        let t = Instant::now();
        assert!(store.get(&key).await.unwrap().is_some());
        hits.push(t.elapsed());
        let t = Instant::now();
        assert!(store.get(&missing).await.unwrap().is_none());
        misses.push(t.elapsed());
    }
    for _ in 0..n / 4 {
        let t = Instant::now();
        store.put(&key, value.clone(), &opts).await.unwrap();
        puts.push(t.elapsed());
    }
    println!("value {size} bytes, sequential, one connection");
    summary("get hit", hits);
    summary("get miss", misses);
    summary("put+1 tag", puts);
    store.purge_tag("latency").await.unwrap();
}
