//! Per-route rules resolved against the global cache settings, and the
//! table that finds the rule of a request path.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{invalid_key, CacheConfig, ConfigError, RouteConfig};

/// The effective rule of one request: route settings with the global ones
/// filled in. Pure data, read by the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The route pattern, or `*` for the global defaults (for logs and metrics).
    pub name: String,
    pub cache: bool,
    pub ttl: Option<Duration>,
    pub override_upstream: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub tags: Vec<String>,
    pub ignored_query_params: Vec<String>,
    /// Lower case, sorted, de-duplicated.
    pub key_headers: Vec<String>,
    pub edge_ttl: Option<Duration>,
    pub store_set_cookie_responses: bool,
    pub honor_client_no_cache: bool,
    pub max_entry_bytes: usize,
    /// Cookie names whose values are part of the key (`key_cookies`).
    pub key_cookies: Vec<String>,
    /// Requests with `Cookie` use the cache like any other (`ignore_cookies`).
    pub ignore_cookies: bool,
}

impl Rule {
    /// Whether requests carrying `Authorization` may use the cache (each
    /// credential then has its own keys).
    pub fn keys_on_authorization(&self) -> bool {
        self.key_headers.iter().any(|h| h == "authorization")
    }

    /// Whether a request carrying `Cookie` may use the cache whatever the
    /// upstream answers: the route keys on the cookies, or says they do
    /// not matter.
    pub fn cookies_are_keyed(&self) -> bool {
        self.ignore_cookies
            || !self.key_cookies.is_empty()
            || self.key_headers.iter().any(|h| h == "cookie")
    }
}

/// Finds the rule of a request path.
#[derive(Debug, Clone)]
pub struct RouteTable {
    router: matchit::Router<Arc<Rule>>,
    default: Arc<Rule>,
}

impl RouteTable {
    /// Validates the patterns only (used by config validation).
    pub fn new(routes: &[RouteConfig]) -> Result<Self, ConfigError> {
        Self::build(routes, &CacheConfig::default())
    }

    pub fn build(routes: &[RouteConfig], global: &CacheConfig) -> Result<Self, ConfigError> {
        let lower_sorted = |a: &[String], b: &[String]| {
            let mut v: Vec<String> = a.iter().chain(b).map(|s| s.to_ascii_lowercase()).collect();
            v.sort();
            v.dedup();
            v
        };
        let base = Rule {
            name: "*".into(),
            cache: true,
            ttl: global.default_ttl,
            override_upstream: false,
            stale_while_revalidate: global.stale_while_revalidate,
            stale_if_error: global.stale_if_error,
            tags: Vec::new(),
            ignored_query_params: global.ignored_query_params.clone(),
            key_headers: lower_sorted(&global.key_headers, &[]),
            edge_ttl: global.edge_max_ttl,
            store_set_cookie_responses: global.store_set_cookie_responses,
            honor_client_no_cache: global.honor_client_no_cache,
            max_entry_bytes: global.max_entry_bytes.as_u64() as usize,
            key_cookies: Vec::new(),
            ignore_cookies: false,
        };
        let mut router = matchit::Router::new();
        for (i, r) in routes.iter().enumerate() {
            let mut ignored = base.ignored_query_params.clone();
            ignored.extend(r.ignored_query_params.iter().cloned());
            let rule = Rule {
                name: r.path.clone(),
                cache: r.cache,
                ttl: r.ttl.or(base.ttl),
                override_upstream: r.override_upstream,
                stale_while_revalidate: r
                    .stale_while_revalidate
                    .unwrap_or(base.stale_while_revalidate),
                stale_if_error: r.stale_if_error.unwrap_or(base.stale_if_error),
                tags: r.tags.clone(),
                ignored_query_params: ignored,
                key_headers: lower_sorted(&base.key_headers, &r.key_headers),
                edge_ttl: r.edge_ttl.or(base.edge_ttl),
                key_cookies: {
                    let mut c = r.key_cookies.clone();
                    c.sort();
                    c.dedup();
                    c
                },
                ignore_cookies: r.ignore_cookies,
                ..base.clone()
            };
            router.insert(r.path.clone(), Arc::new(rule)).map_err(|e| {
                invalid_key(format!("routes[{i}].path"), format!("`{}`: {e}", r.path))
            })?;
        }
        Ok(RouteTable {
            router,
            default: Arc::new(base),
        })
    }

    pub fn rule_for(&self, path: &str) -> Arc<Rule> {
        match self.router.at(path) {
            Ok(m) => m.value.clone(),
            Err(_) => self.default.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            cache: true,
            ttl: Some(Duration::from_secs(7)),
            override_upstream: false,
            stale_while_revalidate: None,
            stale_if_error: None,
            tags: vec![path.into()],
            ignored_query_params: vec![],
            key_headers: vec!["Accept-Language".into()],
            edge_ttl: None,
            key_cookies: vec![],
            ignore_cookies: false,
        }
    }

    #[test]
    fn most_specific_route_wins_and_defaults_fill_in() {
        let global = CacheConfig {
            key_headers: vec!["x-tenant".into()],
            ..CacheConfig::default()
        };
        let t = RouteTable::build(
            &[
                route("/items/{id}"),
                route("/items/special"),
                route("/static/{*rest}"),
            ],
            &global,
        )
        .unwrap();
        assert_eq!(t.rule_for("/items/special").name, "/items/special");
        assert_eq!(t.rule_for("/items/3").name, "/items/{id}");
        assert_eq!(t.rule_for("/static/a/b.css").name, "/static/{*rest}");
        let other = t.rule_for("/other");
        assert_eq!(other.name, "*");
        assert_eq!(other.ttl, None);
        assert_eq!(
            t.rule_for("/items/3").key_headers,
            vec!["accept-language", "x-tenant"]
        );
    }

    #[test]
    fn conflicting_patterns_name_the_route() {
        let err = RouteTable::build(&[route("/a/{x}"), route("/a/{y}")], &CacheConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes[1].path"), "{err}");
    }
}
