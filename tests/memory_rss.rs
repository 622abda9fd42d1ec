//! `memory.capacity` against the resident memory of the serve process
//! (issue 13): many entries with long URLs, and entries whose responses
//! name 500 surrogate keys. Not a pass/fail benchmark: it prints the
//! figures recorded in docs/hostile-input.md, and checks the bound the
//! issue set (1.5 × capacity plus the process's base). Run it alone:
//!
//! ```text
//! cargo test --test memory_rss -- --ignored --nocapture --test-threads 1
//! ```
//!
//! That runs the debug binary; with `CACHEGATE_TEST_SERVE_BIN=target/release/cachegate`
//! it runs the release build (the one the figures are quoted for).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{cachegate, client, upstream};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Fill a 32 MiB memory store with `n` distinct entries whose targets
/// `target(i)` builds, 16 requests at a time, and return (base, after) RSS.
async fn fill(n: usize, target: impl Fn(usize) -> String + Send + Sync + 'static) -> (u64, u64) {
    let up = upstream().await;
    let cg = cachegate(
        &up.url,
        &[
            ("CACHEGATE_MEMORY__CAPACITY", "32MiB"),
            ("CACHEGATE_SERVE__MAX_URI_BYTES", "16KiB"),
        ],
    );
    let base = rss_kib(cg.pid());
    let next = Arc::new(AtomicUsize::new(0));
    let target = Arc::new(target);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (next, target, url, client) =
                (next.clone(), target.clone(), cg.url.clone(), client());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = client
                        .get(format!("{url}{}", target(i)))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (base, rss_kib(cg.pid()))
}

fn report(case: &str, (base, after): (u64, u64)) {
    let capacity_kib = 32 * 1024;
    println!(
        "{case}: capacity 32 MiB, RSS at start {} MiB, after {} MiB ({:.2} x capacity above base)",
        base / 1024,
        after / 1024,
        (after - base) as f64 / capacity_kib as f64
    );
    assert!(
        after <= base + capacity_kib * 3 / 2,
        "{case}: RSS {after} KiB over 1.5 x capacity + base {base} KiB"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run alone, see the module docs"]
async fn rss_with_many_long_url_entries() {
    let pad = "p".repeat(6000);
    let figures = fill(20_000, move |i| {
        format!("/long/{i}/{pad}?cc=max-age%3D600&bin=16")
    })
    .await;
    report("20k entries with 6 KB URLs", figures);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run alone, see the module docs"]
async fn rss_with_500_tag_entries() {
    let figures = fill(8_000, |i| {
        let tags: Vec<String> = (0..500).map(|j| format!("tag-{i}-{j}")).collect();
        format!(
            "/tags/{i}?cc=max-age%3D600&bin=16&surrogate={}",
            tags.join("+")
        )
    })
    .await;
    report("8k entries with 500 surrogate keys", figures);
}
