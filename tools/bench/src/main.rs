//! `cachegate-bench`, run as `cachegate bench`: load against a URL with
//! latency split by `X-Cache` ([`load`]), and `--compare`: the same
//! workload through the real serve path once per backend, side by side,
//! with an SVG chart ([`compare`], [`chart`]).
//!
//! A binary of its own so that the function that runs in Lambda does not
//! carry the load generator, the histograms and the chart renderer;
//! `cachegate bench ARGS` runs this binary with ARGS.

mod chart;
mod compare;
mod load;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cachegate::config::BackendKind;
use clap::Parser;
use load::{Stop, Workload};

/// Load a URL and report throughput, hit ratio and latency by X-Cache;
/// or, with --compare, run one workload through each backend locally.
#[derive(Parser)]
#[command(name = "cachegate bench", bin_name = "cachegate bench", version)]
struct Cli {
    /// Configuration file (TOML) for --compare's proxies. Default:
    /// config/cachegate.toml if it exists.
    #[arg(long, env = "CACHEGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    args: BenchArgs,
}

/// Arguments of `cachegate bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The URL to load (a deployed API, a local `cachegate serve`, ...).
    /// With `{key}` in it, requests cycle through `--keys` values 0..N.
    #[arg(required_unless_present = "compare", conflicts_with = "compare")]
    pub url: Option<String>,
    /// Instead of a URL: run the same workload through an in-process proxy
    /// for each of these backends (comma-separated: memory,redis,dynamodb)
    /// in front of an in-process synthetic upstream. Backend endpoints come
    /// from the usual configuration (file, CACHEGATE_*, AWS_*).
    #[arg(long, value_delimiter = ',', value_parser = parse_backend)]
    pub compare: Option<Vec<BackendKind>>,
    /// Requests in flight at once (one pooled connection each).
    #[arg(short, long, default_value_t = 32)]
    pub concurrency: usize,
    /// Stop after this many requests.
    #[arg(short = 'n', long, conflicts_with = "duration")]
    pub requests: Option<u64>,
    /// Stop after this long (e.g. 30s, 2m). Default: 10s, unless --requests.
    #[arg(short, long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Distinct keys: values of `{key}` in the URL; with --compare, distinct
    /// upstream paths (each warmed once before measuring). Default: 100.
    #[arg(long)]
    pub keys: Option<usize>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Also print the report as JSON, on the last line of stdout (the
    /// table then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// --compare: how long the synthetic upstream takes to answer.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub upstream_latency: Duration,
    /// --compare: where to write the SVG chart of the hit latency distributions.
    #[arg(long, default_value = "target/bench-compare.svg")]
    pub chart: PathBuf,
    /// --compare: keep the configured in-process L1 in front of redis and
    /// dynamodb. Off by default, so their hits measure the backend itself.
    #[arg(long)]
    pub l1: bool,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    match s.trim() {
        "memory" => Ok(BackendKind::Memory),
        "redis" => Ok(BackendKind::Redis),
        "dynamodb" => Ok(BackendKind::Dynamodb),
        other => Err(format!(
            "unknown backend `{other}` (memory, redis, dynamodb)"
        )),
    }
}

impl BenchArgs {
    fn stop(&self) -> Stop {
        match (self.requests, self.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, Some(d)) => Stop::Duration(d),
            (None, None) => Stop::Duration(Duration::from_secs(10)),
        }
    }

    fn header_map(&self) -> Result<http::HeaderMap, String> {
        let mut map = http::HeaderMap::new();
        for h in &self.headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| format!("header `{h}`: expected `Name: value`"))?;
            let name = http::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("header `{h}`: `{}` is not a header name", name.trim()))?;
            let value = http::HeaderValue::from_str(value.trim())
                .map_err(|_| format!("header `{}`: the value is not a valid header value", name))?;
            map.append(name, value);
        }
        Ok(map)
    }

    fn workload(&self, urls: Vec<reqwest::Url>) -> Result<Workload, String> {
        if self.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        Ok(Workload {
            urls,
            headers: self.header_map()?,
            concurrency: self.concurrency,
            stop: self.stop(),
            timeout: self.timeout,
            connect_timeout: self.timeout.min(Duration::from_secs(5)),
            progress: true,
        })
    }
}

/// The URLs of `bench URL`: `{key}` replaced by 0..keys, or the URL alone.
fn target_urls(url: &str, keys: Option<usize>) -> Result<Vec<reqwest::Url>, String> {
    let parse = |u: &str| reqwest::Url::parse(u).map_err(|e| format!("`{u}` is not a URL: {e}"));
    if url.contains("{key}") {
        let n = keys.unwrap_or(100);
        if n == 0 {
            return Err("--keys must be at least 1".into());
        }
        (0..n)
            .map(|i| parse(&url.replace("{key}", &i.to_string())))
            .collect()
    } else if keys.is_some_and(|k| k != 1) {
        Err("--keys needs `{key}` in the URL, where the key number goes".into())
    } else {
        Ok(vec![parse(url)?])
    }
}

/// Needs no proxy configuration unless comparing backends.
fn main() -> ExitCode {
    let Cli { config, args } = Cli::parse();
    let config_file = config.as_deref();
    // Warnings only unless RUST_LOG says otherwise: the in-process proxies of
    // --compare would otherwise log every request and measure the logging.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match (&args.compare, &args.url) {
            (Some(backends), _) => compare::run(&args, backends, config_file).await,
            (None, Some(url)) => run_url(&args, url).await,
            (None, None) => Err("bench: give a URL or --compare BACKENDS".into()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cachegate::output::eprintln(&format!("cachegate bench: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// The table on stdout; with `--json`, the table on stderr and the report
/// as one JSON line on stdout (last, for scripts).
fn print_report(table: &str, report: &impl serde::Serialize, json: bool) -> Result<(), String> {
    if json {
        cachegate::output::eprint(table);
        cachegate::output::println(&serde_json::to_string(report).map_err(|e| e.to_string())?);
    } else {
        cachegate::output::print(table);
    }
    Ok(())
}

async fn run_url(args: &BenchArgs, url: &str) -> Result<(), String> {
    let workload = args.workload(target_urls(url, args.keys)?)?;
    let report = load::run(&workload).await?;
    print_report(&load::render(&report), &report, args.json)?;
    if report.responses == 0 {
        return Err(format!(
            "bench: no request got a response ({} errors)",
            report.error_count()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_placeholder_expands_to_each_key() {
        let urls = target_urls("http://h/items/{key}?x=1", Some(3)).unwrap();
        let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            urls,
            [
                "http://h/items/0?x=1",
                "http://h/items/1?x=1",
                "http://h/items/2?x=1"
            ]
        );
        assert!(target_urls("http://h/items", Some(3)).is_err());
        assert_eq!(target_urls("http://h/items", None).unwrap().len(), 1);
    }

    #[test]
    fn headers_parse_or_name_the_bad_one() {
        let args = BenchArgs {
            url: Some("http://h/".into()),
            compare: None,
            concurrency: 1,
            requests: None,
            duration: None,
            headers: vec!["Accept-Language: en".into(), "x-a:b".into()],
            keys: None,
            timeout: Duration::from_secs(1),
            json: false,
            upstream_latency: Duration::ZERO,
            chart: PathBuf::new(),
            l1: false,
        };
        let map = args.header_map().unwrap();
        assert_eq!(map["accept-language"], "en");
        assert_eq!(map["x-a"], "b");
        let bad = BenchArgs {
            headers: vec!["no colon".into()],
            ..args
        };
        assert!(bad.header_map().unwrap_err().contains("no colon"));
    }
}
