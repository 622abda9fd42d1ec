//! The configuration as it runs. [`Config`] is what was read (plain values
//! checked); every value that needs parsing is parsed here, once, into the
//! type the proxy, the edge and the request reader use as they are — the
//! way object_store's builders turn what was configured into a store that
//! cannot be invalid. A configuration that resolves is one that runs: the
//! route table here is the one the proxy serves with.

use std::ops::Deref;
use std::path::Path;

use figment::Figment;
use http::{HeaderName, Method};
use ipnet::IpNet;
use reqwest::Url;

use crate::config::{header_names, Config, ConfigError};
use crate::policy::edge::edge_key_headers;
use crate::routes::RouteTable;

/// [`Config`] and its parsed values. Dereferences to the [`Config`] for
/// the plain ones.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    config: Config,
    /// `upstream.url`: http(s), with a host, no query or fragment.
    pub upstream_url: Url,
    /// `routes`, with the `[cache]` settings filled in, matched as
    /// `upstream.path_equivalence` says the upstream reads paths.
    pub routes: RouteTable,
    /// `serve.trusted_proxies` (a bare address is a one-address range).
    pub trusted_proxies: Vec<IpNet>,
    /// `cache.invalidating_methods`.
    pub invalidating_methods: Vec<Method>,
    /// `cache.surrogate_key_headers`.
    pub surrogate_key_headers: Vec<HeaderName>,
    /// `cache.routing_headers`.
    pub routing_headers: Vec<HeaderName>,
    /// `edge.key_headers`, or what the edge keys on when it is unset
    /// (`None`: no edge that needs telling; see `policy::edge::edge_key_headers`).
    pub edge_key_headers: Option<Vec<HeaderName>>,
    /// `edge.cache_tag_header`.
    pub cache_tag_header: HeaderName,
    /// `upstream.headers`, each name checked and source parsed.
    pub own_headers: Vec<(HeaderName, crate::config::OwnHeaderSource)>,
}

impl ResolvedConfig {
    /// Load (defaults, `file`, `CACHEGATE_*`), check and resolve.
    pub fn load(file: Option<&Path>) -> Result<ResolvedConfig, ConfigError> {
        Self::resolve(Config::load(file)?)
    }

    pub fn from_figment(fig: Figment) -> Result<ResolvedConfig, ConfigError> {
        Self::resolve(Config::from_figment(fig)?)
    }

    /// Parse what `config` holds as text; the first value that does not
    /// parse is the error, naming its key.
    pub fn resolve(config: Config) -> Result<ResolvedConfig, ConfigError> {
        Ok(ResolvedConfig {
            upstream_url: config.upstream.base_url()?,
            trusted_proxies: config.serve.trusted_proxy_nets()?,
            invalidating_methods: config.cache.invalidating_method_list()?,
            surrogate_key_headers: header_names(
                "cache.surrogate_key_headers",
                &config.cache.surrogate_key_headers,
            )?,
            routing_headers: header_names("cache.routing_headers", &config.cache.routing_headers)?,
            edge_key_headers: edge_key_headers(
                config.edge.key_headers.as_deref(),
                config.edge.is_configured(),
            )
            .map(|names| header_names("edge.key_headers", &names))
            .transpose()?,
            cache_tag_header: config.edge.cache_tag_header_name()?,
            own_headers: config.upstream.headers.parse()?,
            routes: RouteTable::build_for(
                &config.routes,
                &config.cache,
                config.upstream.path_equivalence,
            )?,
            config,
        })
    }

    /// The configuration as read.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl Deref for ResolvedConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}
