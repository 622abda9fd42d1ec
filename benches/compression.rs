//! The cost of compressed entries (#26 item 1): gzip of a JSON answer when
//! it is stored (paid once per store) and gunzip when it is served to a
//! client that cannot take gzip (paid per such hit), at 1 KB, 64 KB and 1 MB.
//!
//! `cargo bench --bench compression`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use cachegate::proxy::encoding::{gunzip, gzip};

/// A JSON list answer of `n` bytes or a little more.
fn json(n: usize) -> Vec<u8> {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < n {
        s.push_str(&format!(
            r#"{{"id":{i},"title":"item number {i}","author":"user{}","price":{}.{:02}}},"#,
            i % 97,
            (i * 7919) % 1000,
            i % 100
        ));
        i += 1;
    }
    s.pop();
    s.push(']');
    s.into_bytes()
}

fn compression(c: &mut Criterion) {
    for (name, size) in [("1KB", 1 << 10), ("64KB", 64 << 10), ("1MB", 1 << 20)] {
        let body = json(size);
        let packed = gzip(&body).expect("JSON compresses");
        let mut group = c.benchmark_group(format!("compression/{name}"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function("gzip", |b| b.iter(|| gzip(&body)));
        group.bench_function("gunzip", |b| b.iter(|| gunzip(&packed, body.len())));
        group.finish();
    }
}

criterion_group!(benches, compression);
criterion_main!(benches);
