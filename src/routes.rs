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
    /// Freshness by status (negative caching), ahead of `ttl`; sorted.
    pub status_ttl: Vec<(u16, Duration)>,
    pub override_upstream: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// With the route's placeholders filled in from the request path.
    pub tags: Vec<String>,
    /// What a successful unsafe request on the route purges, placeholders
    /// filled in.
    pub invalidate_tags: Vec<String>,
    pub ignored_query_params: Vec<String>,
    /// Lower case, sorted, de-duplicated.
    pub key_headers: Vec<String>,
    pub edge_ttl: Option<Duration>,
    pub store_set_cookie_responses: bool,
    /// Store 400, 413, 414 and 431 answers (`cache.store_request_errors`).
    pub store_request_errors: bool,
    pub honor_client_no_cache: bool,
    pub max_entry_bytes: usize,
    /// How long a stale entry with validators is kept to be revalidated.
    pub keep_for_revalidation: Duration,
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

    /// The configured freshness for a response with `status` and none of
    /// its own: the route's `status_ttl` for it, else `ttl` for the
    /// statuses RFC 9110 §15.1 calls heuristically cacheable.
    pub fn ttl_for(&self, status: http::StatusCode) -> Option<Duration> {
        match self.status_ttl.iter().find(|(s, _)| *s == status.as_u16()) {
            Some((_, ttl)) => Some(*ttl),
            None if crate::policy::response::heuristically_cacheable(status) => self.ttl,
            None => None,
        }
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
    router: matchit::Router<Route>,
    default: Arc<Rule>,
}

/// A route's rule, and whether its tags name placeholders of its path
/// (then each request gets its own copy of the rule with them filled in).
#[derive(Debug, Clone)]
struct Route {
    rule: Arc<Rule>,
    templated: bool,
}

/// The `{name}` placeholders of a tag template, checked against the
/// parameters of the route pattern.
fn check_template(tag: &str, params: &[&str], key: &str) -> Result<bool, ConfigError> {
    let mut rest = tag;
    let mut templated = false;
    while let Some(open) = rest.find(['{', '}']) {
        let after = &rest[open..];
        let close = after.find('}').filter(|_| after.starts_with('{'));
        let Some(close) = close else {
            return Err(invalid_key(
                key,
                format!("`{tag}`: a `{{` or `}}` that is not part of a {{placeholder}}"),
            ));
        };
        let name = &after[1..close];
        if !params.contains(&name) {
            return Err(invalid_key(
                key,
                format!(
                    "`{tag}` names {{{name}}}, which the route's path does not have (it has: {})",
                    if params.is_empty() {
                        "none".to_owned()
                    } else {
                        params.join(", ")
                    }
                ),
            ));
        }
        templated = true;
        rest = &after[close + 1..];
    }
    Ok(templated)
}

/// The parameter names of a route pattern (`{id}`, `{*rest}`).
fn pattern_params(pattern: &str) -> Vec<&str> {
    pattern
        .split('{')
        .skip(1)
        .filter_map(|p| p.split_once('}'))
        .map(|(name, _)| name.trim_start_matches('*'))
        .collect()
}

/// One pass over the template, so a value that itself looks like a
/// placeholder is never filled in again.
fn fill(template: &str, params: &matchit::Params) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').expect("checked at start-up");
        out.push_str(params.get(&after[..close]).unwrap_or_default());
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

impl RouteTable {
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
            status_ttl: Vec::new(),
            override_upstream: false,
            stale_while_revalidate: global.stale_while_revalidate,
            stale_if_error: global.stale_if_error,
            tags: Vec::new(),
            invalidate_tags: Vec::new(),
            ignored_query_params: global.ignored_query_params.clone(),
            key_headers: lower_sorted(&global.key_headers, &[]),
            edge_ttl: global.edge_max_ttl,
            store_set_cookie_responses: global.store_set_cookie_responses,
            store_request_errors: global.store_request_errors,
            honor_client_no_cache: global.honor_client_no_cache,
            max_entry_bytes: global.max_entry_bytes.as_u64() as usize,
            keep_for_revalidation: global.keep_for_revalidation,
            key_cookies: Vec::new(),
            ignore_cookies: false,
        };
        let mut router = matchit::Router::new();
        for (i, r) in routes.iter().enumerate() {
            let params = pattern_params(&r.path);
            let mut templated = false;
            for (field, tags) in [("tags", &r.tags), ("invalidate_tags", &r.invalidate_tags)] {
                for tag in tags {
                    let key = format!("routes[{i}].{field}");
                    if tag.trim().is_empty() {
                        return Err(invalid_key(key, "an empty tag"));
                    }
                    templated |= check_template(tag, &params, &key)?;
                }
            }
            let mut ignored = base.ignored_query_params.clone();
            ignored.extend(r.ignored_query_params.iter().cloned());
            let rule = Rule {
                name: r.path.clone(),
                cache: r.cache,
                ttl: r.ttl.or(base.ttl),
                status_ttl: status_ttls(i, r)?,
                override_upstream: r.override_upstream,
                stale_while_revalidate: r
                    .stale_while_revalidate
                    .unwrap_or(base.stale_while_revalidate),
                stale_if_error: r.stale_if_error.unwrap_or(base.stale_if_error),
                tags: r.tags.clone(),
                invalidate_tags: r.invalidate_tags.clone(),
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
            let route = Route {
                rule: Arc::new(rule),
                templated,
            };
            router.insert(r.path.clone(), route).map_err(|e| {
                invalid_key(format!("routes[{i}].path"), format!("`{}`: {e}", r.path))
            })?;
        }
        Ok(RouteTable {
            router,
            default: Arc::new(base),
        })
    }

    /// The rule of a request path, its tags' placeholders filled in from
    /// the path as the request has it (percent-escapes kept).
    pub fn rule_for(&self, path: &str) -> Arc<Rule> {
        match self.router.at(path) {
            Ok(m) if m.value.templated => {
                let rule = &m.value.rule;
                Arc::new(Rule {
                    tags: rule.tags.iter().map(|t| fill(t, &m.params)).collect(),
                    invalidate_tags: rule
                        .invalidate_tags
                        .iter()
                        .map(|t| fill(t, &m.params))
                        .collect(),
                    ..Rule::clone(rule)
                })
            }
            Ok(m) => m.value.rule.clone(),
            Err(_) => self.default.clone(),
        }
    }
}

/// `status_ttl` keys are status codes written as strings (TOML keys).
fn status_ttls(i: usize, r: &RouteConfig) -> Result<Vec<(u16, Duration)>, ConfigError> {
    let mut v = Vec::with_capacity(r.status_ttl.len());
    for (status, ttl) in &r.status_ttl {
        let code = status
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c) && *c != 206 && *c != 304)
            .ok_or_else(|| {
                invalid_key(
                    format!("routes[{i}].status_ttl"),
                    format!("`{status}` is not a storable status code (200-599, not 206 or 304)"),
                )
            })?;
        v.push((code, **ttl));
    }
    v.sort();
    Ok(v)
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
            tags: vec!["route".into()],
            invalidate_tags: vec![],
            ignored_query_params: vec![],
            key_headers: vec!["Accept-Language".into()],
            edge_ttl: None,
            status_ttl: Default::default(),
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
    fn placeholders_in_tags_take_the_request_paths_values() {
        let mut posts = route("/posts/{id}");
        posts.tags = vec!["posts".into(), "post-{id}".into()];
        posts.invalidate_tags = vec!["posts".into(), "post-{id}".into(), "{id}-{id}".into()];
        let mut files = route("/users/{user}/files/{*path}");
        files.tags = vec!["files-{user}:{path}".into()];
        let t =
            RouteTable::build(&[posts, files, route("/plain")], &CacheConfig::default()).unwrap();
        let r = t.rule_for("/posts/1");
        assert_eq!(r.tags, vec!["posts", "post-1"]);
        assert_eq!(r.invalidate_tags, vec!["posts", "post-1", "1-1"]);
        assert_eq!(r.name, "/posts/{id}");
        assert_eq!(t.rule_for("/posts/a%20b").tags, vec!["posts", "post-a%20b"]);
        assert_eq!(
            t.rule_for("/users/u1/files/a/b.txt").tags,
            vec!["files-u1:a/b.txt"]
        );
        assert_eq!(t.rule_for("/plain").tags, vec!["route"]);
    }

    #[test]
    fn a_placeholder_the_path_lacks_names_the_key() {
        for (tags, invalidate, key, needle) in [
            (vec!["item-{idd}"], vec![], "routes[0].tags", "{idd}"),
            (
                vec![],
                vec!["x-{id"],
                "routes[0].invalidate_tags",
                "placeholder",
            ),
            (
                vec![],
                vec!["x}"],
                "routes[0].invalidate_tags",
                "placeholder",
            ),
            (vec![], vec![" "], "routes[0].invalidate_tags", "empty"),
        ] {
            let mut r = route("/items/{id}");
            r.tags = tags.into_iter().map(String::from).collect();
            r.invalidate_tags = invalidate.into_iter().map(String::from).collect();
            let err = RouteTable::build(&[r], &CacheConfig::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(needle), "{err}");
        }
    }

    #[test]
    fn conflicting_patterns_name_the_route() {
        let err = RouteTable::build(&[route("/a/{x}"), route("/a/{y}")], &CacheConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes[1].path"), "{err}");
    }
}
