use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cachegate::config::{Mode, Role};
use cachegate::invalidate::PurgeRequest;
use cachegate::resolved::ResolvedConfig;

/// jemalloc instead of glibc's malloc: allocation and freeing were a tenth
/// of a memory hit's CPU time (the hit path allocates per request: hyper's
/// and the header maps' buffers), and glibc keeps more of what a churning
/// memory store frees. Measured in docs/benchmarks.md ("The allocator").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A caching proxy for REST APIs: in front of a slow or rate-limited API,
/// it answers repeated GETs from a cache (memory, Redis or DynamoDB).
///
/// Without a subcommand and with AWS_LAMBDA_RUNTIME_API set (inside AWS
/// Lambda), it runs as the Lambda function.
#[derive(Parser)]
#[command(name = "cachegate", version)]
struct Cli {
    /// Configuration file (TOML). Default: config/cachegate.toml if it exists.
    #[arg(long, global = true, env = "CACHEGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy as an HTTP server.
    Serve {
        /// Address to listen on (overrides serve.listen; default 127.0.0.1:3000).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Prepare the configured backend: create the DynamoDB table with TTL
    /// if missing; check that Redis answers.
    Init,
    /// Check the configuration and print it as TOML that `--config` reads
    /// back (secrets left out, each named in a comment).
    Config,
    /// Remove entries from the shared cache (redis, dynamodb) by URL (all
    /// its Vary variants), by tag, by path prefix or all of them; prints
    /// how many were removed. With
    /// edge.cloudfront_distribution_id set, also invalidates CloudFront
    /// (URLs as paths, tags as #tag) and prints the paths sent and their cost.
    Purge {
        /// A URL or path as clients request it, e.g. /items/1?lang=en (repeatable).
        #[arg(long = "url", value_name = "URL")]
        urls: Vec<String>,
        /// A route tag or surrogate key (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Every stored URL whose path starts with PREFIX (repeatable;
        /// `/items/`). Reads the whole shared cache to find them.
        #[arg(long = "prefix", value_name = "PREFIX")]
        prefixes: Vec<String>,
        /// Everything stored (the prefix `/`).
        #[arg(long)]
        all: bool,
        /// Mark the entries stale instead of removing them (answered stale
        /// within their stale-while-revalidate window while one request
        /// refreshes; without a window, a hard purge).
        #[arg(long)]
        soft: bool,
    },
    /// Show what the proxy would do with a request, without calling the
    /// upstream: the canonical request, the route and its rules, the cache
    /// key and what it is made of, whether it would bypass the cache and
    /// why, and the entry stored for it in the configured backend.
    /// Credentials are never printed.
    Explain {
        /// The URL as clients address cachegate (`https://api.example.com/items/1?lang=en`):
        /// its scheme and host are part of the key. A bare path has neither.
        url: String,
        /// A request header, `Name: value` (repeatable), as the client sends it.
        #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// The method (default GET).
        #[arg(short = 'X', long = "request", default_value = "GET")]
        method: String,
        /// Print JSON (for scripts) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load a URL and report throughput, hit ratio and latency by X-Cache;
    /// or, with --compare, run one workload through each backend locally.
    /// Runs the separate `cachegate-bench` binary (`cachegate bench --help`
    /// shows its options).
    #[command(disable_help_flag = true)]
    Bench {
        /// Passed to cachegate-bench as they are.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// Logs to stderr at the levels of `RUST_LOG`: a default level and
/// `target=level` directives (`warn`, `info,cachegate=debug`). `Targets`
/// rather than `EnvFilter`: span and field filters are not needed here,
/// and `EnvFilter`'s regex engine was 0.14 MB of the function binary.
fn init_tracing(json: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    // Without RUST_LOG: info, but not the SDK's warning that instance
    // metadata had no region. Off EC2 that lookup always fails (twice, in
    // two long lines); when no region is found anywhere the backend stops
    // start-up saying so and which variable to set.
    let default = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("aws_config::imds::region", LevelFilter::ERROR);
    let (targets, bad) = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => match parse_rust_log(&value) {
            Ok(targets) => (targets, None),
            Err(e) => (default, Some((value, e))),
        },
        _ => (default, None),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_current_span(false).boxed()
    } else {
        fmt.boxed()
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(targets))
        .init();
    if let Some((value, e)) = bad {
        tracing::warn!(rust_log = %value, error = %e, "RUST_LOG not understood; logging at info");
    }
}

/// `RUST_LOG` as [`Targets`], except that a directive without `=` must be
/// a level. `Targets` reads any other word alone as a target to log at
/// every level and turns everything else off, so `RUST_LOG=verbose` (a
/// level misspelt, far likelier than a target named `verbose`) would
/// silence every line without a word.
fn parse_rust_log(value: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::LevelFilter;
    let not_a_level = value
        .split(',')
        .map(str::trim)
        .find(|d| !d.is_empty() && !d.contains('=') && d.parse::<LevelFilter>().is_err());
    if let Some(word) = not_a_level {
        return Err(format!(
            "`{word}` is not a level (trace, debug, info, warn, error, off); \
             a target takes one after `=`, as in `{word}=debug`"
        ));
    }
    value.parse().map_err(|e| format!("{e}"))
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // Loading a URL needs no proxy configuration (and --compare builds its own).
    if let Some(Command::Bench { args }) =
        cli.command.take_if(|c| matches!(c, Command::Bench { .. }))
    {
        return run_bench(&args, cli.config.as_deref());
    }
    let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    init_tracing(in_lambda || !std::io::stderr().is_terminal());

    let config = match ResolvedConfig::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            cachegate::output::eprintln(&format!("cachegate: {e}"));
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let result: Result<(), Failed> = match cli.command {
            Some(Command::Config) => config
                .to_toml()
                .map(|text| cachegate::output::print(&text))
                .map_err(Failed::from),
            Some(Command::Explain { url, headers, method, json }) => {
                explain(&config, &url, &headers, &method, json).await.map_err(Failed::from)
            }
            Some(Command::Purge { urls, tags, prefixes, all, soft }) => {
                let request = PurgeRequest { urls, tags, prefixes, all, soft };
                purge(&config, request).await.map_err(Failed::from)
            }
            // Judged as at start-up: a setup that cannot work (no AWS
            // region) exits 2, as `serve` does.
            Some(Command::Init) => cachegate::backend::init(&config).await.map_err(|e| {
                let e = cachegate::StartError::from(e);
                Failed(e.to_string(), e.exit_code())
            }),
            Some(Command::Serve { .. }) if config.role == Role::Invalidator => Err(Failed(
                cachegate::config::invalid(
                    "role",
                    "`invalidator` runs only as the Lambda function; `cachegate serve` needs role = \"proxy\"",
                )
                .to_string(),
                2,
            )),
            Some(Command::Serve { listen }) => match cachegate::build_proxy(&config, Mode::Serve).await {
                Ok(proxy) => {
                    let listen = listen.unwrap_or(config.serve.listen);
                    cachegate::serve::run(proxy, listen, &config.serve, config.metrics.prometheus_listen)
                        .await
                        .map_err(|e| Failed::from(format!("serve: {e}")))
                }
                Err(e) => Err(Failed(e.to_string(), e.exit_code())),
            },
            Some(Command::Bench { .. }) => unreachable!("bench runs before the configuration is loaded"),
            None if in_lambda => {
                // Registered during init, before the runtime's first event.
                let extension = match config.role {
                    Role::Proxy => cachegate::lambda::AfterResponseExtension::register().await,
                    Role::Invalidator => None,
                };
                let background = extension
                    .as_ref()
                    .map_or(cachegate::background::Background::Inline, |e| e.background());
                match cachegate::build_proxy_with(&config, Mode::Lambda, background).await {
                    Ok(proxy) => match config.role {
                        Role::Proxy => cachegate::lambda::run(proxy, extension).await,
                        Role::Invalidator => cachegate::invalidate::run(proxy).await,
                    }
                    .map_err(|e| Failed::from(format!("lambda: {e}"))),
                    Err(e) => Err(Failed(e.to_string(), e.exit_code())),
                }
            }
            None => {
                cachegate::output::eprintln("cachegate: no subcommand (and not inside AWS Lambda); try `cachegate serve` or `cachegate --help`");
                return ExitCode::from(2);
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failed(e, code)) => {
                cachegate::output::eprintln(&format!("cachegate: {e}"));
                ExitCode::from(code)
            }
        }
    })
}

/// A command's failure: the message and the exit status (2 for a
/// configuration or setup that cannot work, 1 otherwise).
struct Failed(String, u8);

impl From<String> for Failed {
    fn from(message: String) -> Self {
        Failed(message, 1)
    }
}

async fn explain(
    config: &ResolvedConfig,
    url: &str,
    headers: &[String],
    method: &str,
    json: bool,
) -> Result<(), String> {
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("explain: `{method}` is not an HTTP method"))?;
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("explain: `{url}` is neither a URL nor a path: {e}"))?;
    if uri.path_and_query().is_none() && uri.authority().is_none() {
        return Err(format!("explain: `{url}` has no path"));
    }
    let mut req = http::Request::builder().method(method).uri(uri);
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("explain: header `{h}` is not `Name: value`"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("explain: `{}` is not a header name", name.trim()))?;
        let value = http::HeaderValue::from_str(value.trim())
            .map_err(|_| format!("explain: the value of `{name}` is not a header value"))?;
        req = req.header(name, value);
    }
    let req = req
        .body(bytes::Bytes::new())
        .map_err(|e| format!("explain: {e}"))?;
    let proxy = cachegate::build_proxy(config, Mode::Serve)
        .await
        .map_err(|e| e.to_string())?;
    let explained = proxy.explain(req).await;
    let text = if json {
        serde_json::to_string_pretty(&explained).map_err(|e| e.to_string())? + "\n"
    } else {
        cachegate::proxy::render_explanation(&explained)
    };
    cachegate::output::print(&text);
    Ok(())
}

async fn purge(config: &ResolvedConfig, request: PurgeRequest) -> Result<(), String> {
    if request.urls.is_empty()
        && request.tags.is_empty()
        && request.prefixes.is_empty()
        && !request.all
    {
        return Err("purge: name at least one --url, --tag or --prefix, or --all".into());
    }
    if config.backend == cachegate::config::BackendKind::Memory {
        return Err("purge: the memory backend lives inside each cachegate process; \
                    purge it through `POST /_cachegate/purge` (serve.purge_token) or configure redis/dynamodb"
            .into());
    }
    let soft = request.soft;
    request.validate().map_err(|e| e.to_string())?;
    let proxy = cachegate::build_proxy(config, Mode::Serve)
        .await
        .map_err(|e| e.to_string())?;
    let report = cachegate::invalidate::purge(&proxy, &request)
        .await
        .map_err(|e| e.to_string())?;
    let did = if soft { "marked stale" } else { "removed" };
    for (url, n) in &report.urls {
        cachegate::output::println(&format!("url {url}: {did} {n}"));
    }
    for (tag, n) in &report.tags {
        cachegate::output::println(&format!("tag {tag}: {did} {n}"));
    }
    for (prefix, n) in &report.prefixes {
        cachegate::output::println(&format!("prefix {prefix}: {did} {n}"));
    }
    cachegate::output::println(&format!("{did} {} entries", report.removed));
    if let Some(edge) = &report.edge {
        cachegate::output::println(&edge.summary());
    }
    Ok(())
}

/// The binary `cachegate bench` runs: built from tools/bench, kept out of
/// this one so the function that runs in Lambda does not carry the load
/// generator, histograms and chart renderer.
const BENCH_BINARY: &str = "cachegate-bench";

/// `cachegate bench ARGS`: run `cachegate-bench ARGS` (the one next to this
/// executable, else the one on PATH) in place of this process, so its
/// output, exit status and signals are the user's.
fn run_bench(args: &[std::ffi::OsString], config: Option<&std::path::Path>) -> ExitCode {
    use std::os::unix::process::CommandExt;

    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(BENCH_BINARY))
        .filter(|p| p.is_file());
    let program = beside
        .clone()
        .unwrap_or_else(|| PathBuf::from(BENCH_BINARY));
    let mut command = std::process::Command::new(&program);
    command.args(args);
    if let Some(config) = config {
        command.env("CACHEGATE_CONFIG", config);
    }
    // Only returns on failure.
    let e = command.exec();
    if e.kind() == std::io::ErrorKind::NotFound && beside.is_none() {
        cachegate::output::eprintln(&format!(
            "cachegate: `cachegate bench` runs the separate `{BENCH_BINARY}` binary (kept out of \
             the function binary), and there is none next to this executable or on PATH. \
             Build it with `cargo build --release -p {BENCH_BINARY}` (it lands next to \
             target/release/cachegate) or install it with `cargo install --path tools/bench`."
        ));
    } else {
        cachegate::output::eprintln(&format!("cachegate: cannot run {}: {e}", program.display()));
    }
    ExitCode::from(2)
}
