//! The load driver behind `cachegate bench`: N workers share one request
//! budget (a count or a deadline), each keeps its own histograms (no lock on
//! the hot path), merged into one [`Report`] at the end.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, up to this many (one minute).
const MAX_MICROS: u64 = 60_000_000;

/// When a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this many requests in all.
    Requests(u64),
    /// When this much time has passed (requests in flight then are finished
    /// and counted).
    Duration(Duration),
}

/// One load run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Request `i` goes to `urls[i % urls.len()]`, so with `Stop::Requests`
    /// equal to `urls.len()` each URL is asked exactly once.
    pub urls: Vec<reqwest::Url>,
    pub headers: http::HeaderMap,
    pub concurrency: usize,
    pub stop: Stop,
    /// Whole-request timeout; connects are bounded separately.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Show a progress bar (only where stderr is a terminal).
    pub progress: bool,
}

/// p50/p90/p99/max of one group of responses, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The URL (or the first of several, with `keys`).
    pub url: String,
    pub keys: usize,
    pub concurrency: usize,
    pub elapsed_s: f64,
    /// Requests sent: `responses` plus the transport errors.
    pub requests: u64,
    /// Requests that got an HTTP response (of any status).
    pub responses: u64,
    /// Responses per second of wall time.
    pub throughput_rps: f64,
    /// Responses whose `X-Cache` starts with "HIT" (cachegate's `HIT`,
    /// CloudFront's `Hit from cloudfront`), over all responses. `STALE` is
    /// not counted as a hit.
    pub hit_ratio: f64,
    pub hits: u64,
    /// Response latency (request sent to body read) by `X-Cache` value;
    /// `-` collects responses without the header.
    pub by_x_cache: BTreeMap<String, Latency>,
    /// Every response together.
    pub all: Latency,
    /// Responses by status class: `2xx`, `3xx`, `4xx`, `5xx`.
    pub status: BTreeMap<String, u64>,
    /// `status_4xx`, `status_5xx`, and the transport failures `connect`,
    /// `timeout` and `other` (reset, bad body, ...).
    pub errors: BTreeMap<String, u64>,
    pub body_bytes: u64,
    /// The histograms behind `by_x_cache` (microseconds), for charts.
    #[serde(skip)]
    pub histograms: BTreeMap<String, Histogram<u64>>,
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[derive(Default)]
struct WorkerStats {
    by_x_cache: HashMap<String, Histogram<u64>>,
    status: HashMap<&'static str, u64>,
    errors: HashMap<&'static str, u64>,
    body_bytes: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// A client whose pool keeps one connection per worker.
pub fn client(w: &Workload) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(w.concurrency)
        .timeout(w.timeout)
        .connect_timeout(w.connect_timeout)
        .default_headers(w.headers.clone())
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

/// Run `w` and report. Fails only when the run cannot start (no URL, no client).
pub async fn run(w: &Workload) -> Result<Report, String> {
    if w.urls.is_empty() {
        return Err("bench: no URL".into());
    }
    let client = client(w)?;
    let concurrency = w.concurrency.max(1);
    let next = Arc::new(AtomicU64::new(0));
    let urls = Arc::new(w.urls.clone());
    let started = Instant::now();
    let deadline = match w.stop {
        Stop::Duration(d) => Some(started + d),
        Stop::Requests(_) => None,
    };
    let limit = match w.stop {
        Stop::Requests(n) => n,
        Stop::Duration(_) => u64::MAX,
    };

    let bar = (w.progress && std::io::stderr().is_terminal()).then(|| progress_bar(w.stop));
    let ticker = bar.clone().map(|bar| {
        let next = next.clone();
        let stop = w.stop;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (pos, done) = bar_position(stop, &next, started);
                bar.set_position(pos);
                if done {
                    break;
                }
            }
        })
    });

    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let urls = urls.clone();
        workers.push(tokio::spawn(async move {
            let mut stats = WorkerStats::default();
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let url = &urls[(i % urls.len() as u64) as usize];
                one_request(&client, url, &mut stats).await;
            }
            stats
        }));
    }
    let mut merged = WorkerStats::default();
    for worker in workers {
        let stats = worker.await.map_err(|e| format!("bench worker: {e}"))?;
        for (k, h) in stats.by_x_cache {
            merged
                .by_x_cache
                .entry(k)
                .or_insert_with(histogram)
                .add(&h)
                .expect("same histogram bounds");
        }
        for (k, n) in stats.status {
            *merged.status.entry(k).or_default() += n;
        }
        for (k, n) in stats.errors {
            *merged.errors.entry(k).or_default() += n;
        }
        merged.body_bytes += stats.body_bytes;
    }
    let elapsed = started.elapsed();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let mut all = histogram();
    for h in merged.by_x_cache.values() {
        all.add(h).expect("same histogram bounds");
    }
    let responses = all.len();
    let transport_errors: u64 = ["connect", "timeout", "other"]
        .iter()
        .filter_map(|k| merged.errors.get(k))
        .sum();
    let hits: u64 = merged
        .by_x_cache
        .iter()
        .filter(|(k, _)| k.to_ascii_uppercase().starts_with("HIT"))
        .map(|(_, h)| h.len())
        .sum();
    let histograms: BTreeMap<String, Histogram<u64>> = merged.by_x_cache.into_iter().collect();
    Ok(Report {
        url: w.urls[0].to_string(),
        keys: w.urls.len(),
        concurrency,
        elapsed_s: elapsed.as_secs_f64(),
        requests: responses + transport_errors,
        responses,
        throughput_rps: responses as f64 / elapsed.as_secs_f64().max(1e-9),
        hit_ratio: if responses == 0 {
            0.0
        } else {
            hits as f64 / responses as f64
        },
        hits,
        by_x_cache: histograms
            .iter()
            .map(|(k, h)| (k.clone(), Latency::of(h)))
            .collect(),
        all: Latency::of(&all),
        status: merged
            .status
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect(),
        errors: merged
            .errors
            .into_iter()
            .map(|(k, n)| (k.to_owned(), n))
            .collect(),
        body_bytes: merged.body_bytes,
        histograms,
    })
}

/// The bar's position: requests sent (count mode) or milliseconds passed
/// (duration mode); and whether the run is over.
fn bar_position(stop: Stop, next: &AtomicU64, started: Instant) -> (u64, bool) {
    match stop {
        Stop::Requests(n) => {
            let sent = next.load(Ordering::Relaxed).min(n);
            (sent, sent >= n)
        }
        Stop::Duration(d) => {
            let ms = started.elapsed().as_millis() as u64;
            let len = d.as_millis() as u64;
            (ms.min(len), ms >= len)
        }
    }
}

fn progress_bar(stop: Stop) -> indicatif::ProgressBar {
    let (len, template) = match stop {
        Stop::Requests(n) => (n, "{bar:40} {pos}/{len} requests {per_sec} {eta}"),
        Stop::Duration(d) => (d.as_millis() as u64, "{bar:40} {elapsed}/{duration}"),
    };
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

async fn one_request(client: &reqwest::Client, url: &reqwest::Url, stats: &mut WorkerStats) {
    let start = Instant::now();
    let result = async {
        let resp = client.get(url.clone()).send().await?;
        let status = resp.status();
        let x_cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_owned());
        let body = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, x_cache, body.len()))
    }
    .await;
    let micros = (start.elapsed().as_micros() as u64).clamp(1, MAX_MICROS);
    match result {
        Ok((status, x_cache, len)) => {
            let key = x_cache.unwrap_or_else(|| "-".to_owned());
            stats
                .by_x_cache
                .entry(key)
                .or_insert_with(histogram)
                .saturating_record(micros);
            let class = match status.as_u16() {
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "1xx",
            };
            *stats.status.entry(class).or_default() += 1;
            if status.is_client_error() {
                *stats.errors.entry("status_4xx").or_default() += 1;
            } else if status.is_server_error() {
                *stats.errors.entry("status_5xx").or_default() += 1;
            }
            stats.body_bytes += len as u64;
        }
        Err(e) => {
            let kind = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "other"
            };
            *stats.errors.entry(kind).or_default() += 1;
        }
    }
}

/// The report as a table for people.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({} key{}), concurrency {}: {} requests in {:.2}s",
        r.url,
        r.keys,
        if r.keys == 1 { "" } else { "s" },
        r.concurrency,
        r.requests,
        r.elapsed_s
    );
    let _ = writeln!(
        out,
        "throughput {:.0} req/s, hit ratio {:.1}% ({} of {} responses)",
        r.throughput_rps,
        r.hit_ratio * 100.0,
        r.hits,
        r.responses
    );
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "X-Cache", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let rows = r
        .by_x_cache
        .iter()
        .map(|(k, l)| (k.as_str(), l))
        .chain(std::iter::once(("all", &r.all)));
    for (k, l) in rows {
        let _ = writeln!(
            out,
            "{:<10} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            k, l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
    }
    let status: Vec<String> = r.status.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(out, "status: {}", none_if_empty(&status));
    let errors: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(out, "errors: {}", none_if_empty(&errors));
    out
}

fn none_if_empty(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}
