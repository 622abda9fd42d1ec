//! cachegate: a caching proxy for REST APIs.
//!
//! - [`config`]: figment configuration (defaults < TOML < `CACHEGATE_*`).
//! - [`resolved`]: the configuration with its values parsed, once.
//! - [`request`]: the canonical request, built once before anything reads it.
//! - [`key`]: canonical request -> upstream URL and cache key.
//! - [`policy`]: what may be cached and for how long (pure, RFC 9111).
//! - [`routes`]: per-route rules.
//! - [`proxy`]: the request flow, top to bottom.
//! - [`serve`] and [`lambda`]: thin adapters over [`proxy::Proxy::handle`].
//! - [`background`]: work after a response (serve, and Lambda's
//!   after-response extension).
//! - [`edge`]: CloudFront in front: cache tags on responses, invalidations.
//! - [`purge_request`]: what a purge names, and why one fails.
//! - [`invalidate`]: purging by URL and tag (`cachegate purge`) and the
//!   invalidator role's Lambda handler (EventBridge, SQS).
//! - [`tls`]: the one TLS crypto provider (rustls + ring).
//! - [`output`]: the command line's output, quiet on a closed pipe.

pub mod backend;
pub mod background;
pub mod config;
pub mod edge;
pub mod error_code;
pub mod invalidate;
pub mod key;
pub mod lambda;
pub mod lambda_payload;
pub mod output;
pub mod policy;
pub mod proxy;
pub mod purge_request;
pub mod request;
pub mod resolved;
pub mod routes;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use config::Mode;
use proxy::Proxy;
use resolved::ResolvedConfig;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    /// The upstream client's TLS could not be set up (no usable roots).
    #[error("upstream client: {0}")]
    Client(String),
    #[error(transparent)]
    Edge(#[from] edge::EdgeError),
    /// A value of `upstream.headers` could not be read.
    #[error("{0}")]
    OwnHeaders(String),
}

impl StartError {
    /// The process's exit status for this error: 2 for a configuration or
    /// setup that cannot work (as for a bad configuration key), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_)
            | StartError::Backend(backend::BackendError::NotBuilt(_))
            | StartError::Backend(backend::BackendError::Setup(_)) => 2,
            _ => 1,
        }
    }
}

/// Build the proxy for `config`: routes, cache backend, upstream client.
/// Work after a response is spawned in serve mode and done inline under
/// Lambda; [`build_proxy_with`] chooses.
pub async fn build_proxy(config: &ResolvedConfig, mode: Mode) -> Result<Arc<Proxy>, StartError> {
    let background = match mode {
        Mode::Serve => background::Background::Spawned,
        Mode::Lambda => background::Background::Inline,
    };
    build_proxy_with(config, mode, background).await
}

/// [`build_proxy`], with work after a response run as `background` says.
pub async fn build_proxy_with(
    config: &ResolvedConfig,
    mode: Mode,
    background: background::Background,
) -> Result<Arc<Proxy>, StartError> {
    let cache = backend::build_cache(config).await?;
    let own_headers = upstream::own_headers::OwnHeaders::load(
        config.own_headers.clone(),
        config.upstream.headers_refresh,
    )
    .await
    .map_err(StartError::OwnHeaders)?;
    // Lambda answers whole: bodies are read whole there; serve streams.
    let upstream = upstream::Upstream::new(&config.upstream)?
        .with_own_headers(own_headers.clone())
        .buffered(mode == Mode::Lambda);
    let header_strings =
        |names: &[http::HeaderName]| names.iter().map(|h| h.as_str().to_owned()).collect();
    let settings = proxy::Settings {
        mode,
        background,
        coalesce_wait: config.cache.coalesce_wait,
        // A fetch lock outlives the longest upstream call its holder can make.
        lock_ttl: config.upstream.timeout + std::time::Duration::from_secs(1),
        surrogate_key_headers: header_strings(&config.surrogate_key_headers),
        expose_surrogate_keys: config.cache.expose_surrogate_keys,
        expose_key: config.cache.expose_key,
        edge_key_headers: config.edge_key_headers.as_deref().map(header_strings),
        routing_headers: header_strings(&config.routing_headers),
        forwarding: request::Forwarding {
            trusted: config.trusted_proxies.clone(),
        },
        invalidating_methods: config.invalidating_methods.clone(),
        max_tags_per_entry: config.cache.max_tags_per_entry,
        refresh_ahead: config.cache.refresh_ahead,
        ttl_jitter: config.cache.ttl_jitter,
        compression: config.cache.compression == config::Compression::Gzip,
        max_response_bytes: config.upstream.max_response_bytes.as_u64() as usize,
        guard: proxy::GuardSettings::from_config(&config.upstream),
    };
    let telemetry = telemetry::Telemetry::new(
        &config.metrics,
        mode,
        cache.backend_name(),
        cache.stats().clone(),
    );
    let runs = match (mode, config.role) {
        (Mode::Serve, _) => edge::Runs::Serve,
        (Mode::Lambda, config::Role::Proxy) => edge::Runs::LambdaProxy,
        (Mode::Lambda, config::Role::Invalidator) => edge::Runs::Direct,
    };
    let edge = edge::Edge::build(
        &config.edge,
        config.cache_tag_header.clone(),
        &config.upstream_url,
        runs,
    )
    .await?;
    Ok(Arc::new(
        Proxy::new(
            config.upstream_url.clone(),
            config.routes.clone(),
            cache,
            upstream,
            settings,
            telemetry,
        )
        .with_edge(edge)
        .with_own_headers(own_headers),
    ))
}
