//! What each request did, told three ways: a structured log event (always),
//! a CloudWatch Embedded Metric Format line on stdout (under Lambda, so hit
//! rate per backend is a CloudWatch graph without an agent), and Prometheus
//! counters and histograms (serve mode, on an opt-in listener).
//!
//! Nothing here reads headers or query strings: the log carries the path,
//! the key hash and timings, never an Authorization value, a cookie or a
//! query parameter that may hold a token.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use cachegate_store::tiered::CacheStats;

use crate::config::{MetricsConfig, Mode};

/// The id of the request being handled, put in the request's extensions
/// by the adapter (Lambda's request id; in serve mode the client's
/// `X-Request-Id`, when it sent one).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What one request did, as the handler saw it.
#[derive(Debug)]
pub struct RequestRecord<'a> {
    pub request_id: Option<&'a str>,
    pub method: &'a Method,
    /// The path only (queries may carry credentials); `None` when the
    /// access log is off, so the hit path copies nothing for it.
    pub path: Option<&'a str>,
    /// The matching route pattern, `*` for none.
    pub route: &'a str,
    /// Hex hash of the primary cache key, when the request had one.
    pub key: Option<&'a str>,
    pub status: StatusCode,
    /// The `X-Cache` value (`HIT`, `MISS`, `STALE`, `BYPASS`), or `ERROR`
    /// for a response the proxy produced itself.
    pub cache_status: &'a str,
    pub cache_time: Option<Duration>,
    pub upstream_time: Option<Duration>,
    pub total_time: Duration,
    /// The cache lookup failed (error, timeout, open breaker) and the
    /// request was served as a miss.
    pub backend_error: bool,
}

/// Where request records go; one per process.
pub struct Telemetry {
    backend: &'static str,
    emf_namespace: Option<String>,
    prometheus: Option<Prometheus>,
}

impl Telemetry {
    /// EMF on when configured (default: under Lambda); Prometheus counters
    /// kept only when a listener will expose them.
    pub fn new(
        config: &MetricsConfig,
        mode: Mode,
        backend: &'static str,
        stats: Arc<CacheStats>,
    ) -> Self {
        let emf = config.emf.unwrap_or(mode == Mode::Lambda);
        let prometheus = (mode == Mode::Serve && config.prometheus_listen.is_some())
            .then(|| Prometheus::new(backend, stats));
        Telemetry {
            backend,
            emf_namespace: emf.then(|| config.namespace.clone()),
            prometheus,
        }
    }

    /// Whether the access log is on, so callers copy what only it needs.
    pub fn logs_access(&self) -> bool {
        tracing::enabled!(target: "cachegate::access", tracing::Level::INFO)
    }

    pub fn record(&self, r: &RequestRecord<'_>) {
        tracing::info!(
            target: "cachegate::access",
            request_id = r.request_id,
            method = %r.method,
            path = r.path,
            route = r.route,
            key = r.key,
            status = r.status.as_u16(),
            cache = r.cache_status,
            backend = self.backend,
            backend_error = r.backend_error,
            cache_ms = r.cache_time.map(ms),
            upstream_ms = r.upstream_time.map(ms),
            total_ms = ms(r.total_time),
        );
        if let Some(ns) = &self.emf_namespace {
            let line = emf_line(ns, self.backend, r, now_epoch_millis());
            // One write per line: Lambda's log capture splits on newlines.
            // A closed stdout must not fail the request.
            use std::io::Write;
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
        if let Some(p) = &self.prometheus {
            p.record(r);
        }
    }

    /// The Prometheus text exposition, when enabled.
    pub fn prometheus_text(&self) -> Option<String> {
        let p = self.prometheus.as_ref()?;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &p.registry)
            .expect("writing to a String cannot fail");
        Some(out)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn now_epoch_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One CloudWatch EMF document for one request: dimensions backend and
/// route; counts as 0/1 so CloudWatch sums give rates; latencies in ms.
pub fn emf_line(namespace: &str, backend: &str, r: &RequestRecord<'_>, timestamp: u64) -> String {
    let is = |s: &str| u8::from(r.cache_status == s);
    let mut metrics = vec![
        serde_json::json!({"Name": "Hit", "Unit": "Count"}),
        serde_json::json!({"Name": "Miss", "Unit": "Count"}),
        serde_json::json!({"Name": "Stale", "Unit": "Count"}),
        serde_json::json!({"Name": "Bypass", "Unit": "Count"}),
        serde_json::json!({"Name": "Error", "Unit": "Count"}),
        serde_json::json!({"Name": "BackendError", "Unit": "Count"}),
    ];
    let mut doc = serde_json::json!({
        "backend": backend,
        "route": r.route,
        "Hit": is("HIT"),
        "Miss": is("MISS"),
        "Stale": is("STALE"),
        "Bypass": is("BYPASS"),
        "Error": is("ERROR"),
        "BackendError": u8::from(r.backend_error),
        "status": r.status.as_u16(),
    });
    if let Some(id) = r.request_id {
        doc["requestId"] = id.into();
    }
    for (name, value) in [
        ("CacheLatency", r.cache_time),
        ("UpstreamLatency", r.upstream_time),
    ] {
        if let Some(d) = value {
            metrics.push(serde_json::json!({"Name": name, "Unit": "Milliseconds"}));
            doc[name] = ms(d).into();
        }
    }
    doc["_aws"] = serde_json::json!({
        "Timestamp": timestamp,
        "CloudWatchMetrics": [{
            "Namespace": namespace,
            "Dimensions": [["backend", "route"]],
            "Metrics": metrics,
        }],
    });
    doc.to_string()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    backend: &'static str,
    route: String,
    cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    backend: &'static str,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: &'static str,
}

struct Prometheus {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    backend_errors: Family<BackendLabels, Counter>,
    cache_seconds: Family<BackendLabels, Histogram>,
    upstream_seconds: Family<RouteLabels, Histogram>,
    backend: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~26 s: memory hits at the bottom, slow upstreams at the top.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

impl Prometheus {
    fn new(backend: &'static str, stats: Arc<CacheStats>) -> Self {
        let mut registry = Registry::with_prefix("cachegate");
        let requests = Family::<RequestLabels, Counter>::default();
        let backend_errors = Family::<BackendLabels, Counter>::default();
        let cache_seconds = Family::<BackendLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> _,
        );
        let upstream_seconds =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "requests",
            "Requests by backend, route and cache status (X-Cache)",
            requests.clone(),
        );
        registry.register(
            "backend_errors",
            "Cache lookups that failed (error, timeout, open breaker) and were served as misses",
            backend_errors.clone(),
        );
        registry.register(
            "cache_lookup_seconds",
            "Time spent looking up the cache",
            cache_seconds.clone(),
        );
        registry.register(
            "upstream_seconds",
            "Time spent waiting for the upstream",
            upstream_seconds.clone(),
        );
        registry.register_collector(Box::new(StoreCounters { backend, stats }));
        Prometheus {
            registry,
            requests,
            backend_errors,
            cache_seconds,
            upstream_seconds,
            backend,
        }
    }

    fn record(&self, r: &RequestRecord<'_>) {
        self.requests
            .get_or_create(&RequestLabels {
                backend: self.backend,
                route: r.route.to_owned(),
                cache: r.cache_status.to_owned(),
            })
            .inc();
        let backend = BackendLabels {
            backend: self.backend,
        };
        if r.backend_error {
            self.backend_errors.get_or_create(&backend).inc();
        }
        if let Some(d) = r.cache_time {
            self.cache_seconds
                .get_or_create(&backend)
                .observe(d.as_secs_f64());
        }
        if let Some(d) = r.upstream_time {
            self.upstream_seconds
                .get_or_create(&RouteLabels {
                    backend: self.backend,
                    route: r.route.to_owned(),
                })
                .observe(d.as_secs_f64());
        }
    }
}

/// The store's own counters (kept by the tiered cache for every backend),
/// read at scrape time.
#[derive(Debug)]
struct StoreCounters {
    backend: &'static str,
    stats: Arc<CacheStats>,
}

impl Collector for StoreCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = BackendLabels {
            backend: self.backend,
        };
        for (name, help, value) in [
            (
                "corrupt_entries",
                "Stored values that did not decode (foreign, truncated, older format), served as misses",
                &self.stats.corrupt,
            ),
            (
                "entries_too_large",
                "Responses not stored because they exceed the backend's limit",
                &self.stats.too_large,
            ),
            (
                "store_errors",
                "Backend operations that failed, timed out or met an open breaker",
                &self.stats.backend_errors,
            ),
        ] {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            let mut metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric.encode_family(&labels)?)?;
        }
        let counter = ConstCounter::new(crate::policy::cache_control::malformed_count());
        let mut metric = encoder.encode_descriptor(
            "malformed_cache_control",
            "Cache-Control / CDN-Cache-Control values that did not parse and were read as no-store",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric.encode_family(&labels)?)?;
        let counter = ConstCounter::new(crate::edge::write_paths_dropped());
        let mut metric = encoder.encode_descriptor(
            "edge_write_paths_dropped",
            "CloudFront paths writes would have invalidated past edge.write_paths_per_hour (the edge keeps them until their TTL)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric.encode_family(&labels)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(cache_status: &'a str, method: &'a Method) -> RequestRecord<'a> {
        RequestRecord {
            request_id: Some("req-1"),
            method,
            path: Some("/items/1"),
            route: "/items/{id}",
            key: Some("cg1:abc"),
            status: StatusCode::OK,
            cache_status,
            cache_time: Some(Duration::from_micros(1500)),
            upstream_time: None,
            total_time: Duration::from_millis(2),
            backend_error: false,
        }
    }

    #[test]
    fn emf_document_declares_what_it_carries() {
        let get = Method::GET;
        let line = emf_line(
            "cachegate",
            "redis",
            &record("HIT", &get),
            1_700_000_000_000,
        );
        let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(doc["_aws"]["Timestamp"], 1_700_000_000_000u64);
        assert_eq!(directive["Namespace"], "cachegate");
        assert_eq!(
            directive["Dimensions"][0],
            serde_json::json!(["backend", "route"])
        );
        // Every declared metric and dimension is present at the top level.
        for m in directive["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(doc.get(name).is_some(), "{name} declared but missing");
        }
        assert_eq!(doc["backend"], "redis");
        assert_eq!(doc["route"], "/items/{id}");
        assert_eq!(doc["Hit"], 1);
        assert_eq!(doc["Miss"], 0);
        assert_eq!(doc["CacheLatency"], 1.5);
        // No upstream call, no upstream metric (a 0 would skew averages).
        assert!(doc.get("UpstreamLatency").is_none());
        assert!(!directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["Name"] == "UpstreamLatency"));
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn prometheus_counts_by_route_and_status() {
        let stats = Arc::new(CacheStats::default());
        stats.corrupt.fetch_add(2, Ordering::Relaxed);
        let config = MetricsConfig {
            prometheus_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..MetricsConfig::default()
        };
        let t = Telemetry::new(&config, Mode::Serve, "memory", stats);
        assert!(
            t.emf_namespace.is_none(),
            "EMF is for Lambda unless asked for"
        );
        let get = Method::GET;
        t.record(&record("HIT", &get));
        t.record(&record("HIT", &get));
        t.record(&RequestRecord {
            upstream_time: Some(Duration::from_millis(30)),
            backend_error: true,
            ..record("MISS", &get)
        });
        let text = t.prometheus_text().unwrap();
        assert!(
            text.contains(
                r#"cachegate_requests_total{backend="memory",route="/items/{id}",cache="HIT"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"cachegate_requests_total{backend="memory",route="/items/{id}",cache="MISS"} 1"#
        ));
        assert!(text.contains(r#"cachegate_backend_errors_total{backend="memory"} 1"#));
        assert!(text.contains(
            r#"cachegate_upstream_seconds_count{backend="memory",route="/items/{id}"} 1"#
        ));
        assert!(text.contains(r#"cachegate_cache_lookup_seconds_count{backend="memory"} 3"#));
        assert!(
            text.contains(r#"cachegate_corrupt_entries_total{backend="memory"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn prometheus_is_off_unless_a_listener_is_configured() {
        let t = Telemetry::new(
            &MetricsConfig::default(),
            Mode::Serve,
            "memory",
            Arc::default(),
        );
        assert!(t.prometheus_text().is_none());
        let lambda = Telemetry::new(
            &MetricsConfig::default(),
            Mode::Lambda,
            "memory",
            Arc::default(),
        );
        assert!(lambda.emf_namespace.is_some());
    }
}
