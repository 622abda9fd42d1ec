use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cachegate::config::{Config, Role};
use cachegate::invalidate::PurgeRequest;
use cachegate::proxy::Mode;

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
    /// Check the configuration and print it (secrets redacted).
    Config,
    /// Remove entries from the shared cache (redis, dynamodb) by URL (all
    /// its Vary variants) or by tag; prints how many were removed. With
    /// edge.cloudfront_distribution_id set, also invalidates CloudFront
    /// (URLs as paths, tags as #tag) and prints the paths sent and their cost.
    Purge {
        /// A URL or path as clients request it, e.g. /items/1?lang=en (repeatable).
        #[arg(long = "url", value_name = "URL")]
        urls: Vec<String>,
        /// A route tag or surrogate key (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Mark the entries stale instead of removing them (answered stale
        /// within their stale-while-revalidate window while one request
        /// refreshes; without a window, a hard purge).
        #[arg(long)]
        soft: bool,
    },
    /// Load a URL and report throughput, hit ratio and latency by X-Cache;
    /// or, with --compare, run one workload through each backend locally.
    Bench(Box<cachegate::bench::BenchArgs>),
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(false).init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // Loading a URL needs no proxy configuration (and --compare builds its own).
    if let Some(Command::Bench(args)) = cli.command.take_if(|c| matches!(c, Command::Bench(_))) {
        return cachegate::bench::main(*args, cli.config.as_deref());
    }
    let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    init_tracing(in_lambda || !std::io::stderr().is_terminal());

    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cachegate: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let result: Result<(), String> = match cli.command {
            Some(Command::Config) => {
                println!("{config:#?}");
                Ok(())
            }
            Some(Command::Purge { urls, tags, soft }) => purge(&config, &urls, &tags, soft).await,
            Some(Command::Init) => cachegate::backend::init(&config).await.map_err(|e| e.to_string()),
            Some(Command::Serve { .. }) if config.role == Role::Invalidator => Err(
                "configuration key `role`: `invalidator` runs only as the Lambda function; \
                 `cachegate serve` needs role = \"proxy\""
                    .into(),
            ),
            Some(Command::Serve { listen }) => match cachegate::build_proxy(&config, Mode::Serve).await {
                Ok(proxy) => {
                    let listen = listen.unwrap_or(config.serve.listen);
                    cachegate::serve::run(proxy, listen, &config.serve, config.metrics.prometheus_listen)
                        .await
                        .map_err(|e| format!("serve: {e}"))
                }
                Err(e) => Err(e.to_string()),
            },
            Some(Command::Bench(_)) => unreachable!("bench runs before the configuration is loaded"),
            None if in_lambda => match cachegate::build_proxy(&config, Mode::Lambda).await {
                Ok(proxy) => match config.role {
                    Role::Proxy => cachegate::lambda::run(proxy).await,
                    Role::Invalidator => cachegate::invalidate::run(proxy).await,
                }
                .map_err(|e| format!("lambda: {e}")),
                Err(e) => Err(e.to_string()),
            },
            None => {
                eprintln!("cachegate: no subcommand (and not inside AWS Lambda); try `cachegate serve` or `cachegate --help`");
                return ExitCode::from(2);
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cachegate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn purge(
    config: &Config,
    urls: &[String],
    tags: &[String],
    soft: bool,
) -> Result<(), String> {
    if urls.is_empty() && tags.is_empty() {
        return Err("purge: name at least one --url or --tag".into());
    }
    if config.backend == cachegate::config::BackendKind::Memory {
        return Err("purge: the memory backend lives inside each cachegate process; \
                    purge it through `POST /_cachegate/purge` (serve.purge_token) or configure redis/dynamodb"
            .into());
    }
    let request = PurgeRequest {
        urls: urls.to_vec(),
        tags: tags.to_vec(),
        soft,
    };
    request.validate().map_err(|e| e.to_string())?;
    let proxy = cachegate::build_proxy(config, Mode::Serve)
        .await
        .map_err(|e| e.to_string())?;
    let report = cachegate::invalidate::purge(&proxy, &request)
        .await
        .map_err(|e| e.to_string())?;
    let did = if soft { "marked stale" } else { "removed" };
    for (url, n) in &report.urls {
        println!("url {url}: {did} {n}");
    }
    for (tag, n) in &report.tags {
        println!("tag {tag}: {did} {n}");
    }
    println!("{did} {} entries", report.removed);
    if let Some(edge) = &report.edge {
        println!("{}", edge.summary());
    }
    Ok(())
}
