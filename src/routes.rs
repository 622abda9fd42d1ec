//! Per-route rules resolved against the global cache settings, and the
//! table that finds the rule of a request path.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{header_names, invalid, CacheConfig, ConfigError, RouteConfig};
use crate::policy::rule::lower_sorted_unique;
pub use crate::policy::Rule;

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
            return Err(invalid(
                key,
                format!("`{tag}`: a `{{` or `}}` that is not part of a {{placeholder}}"),
            ));
        };
        let name = &after[1..close];
        if !params.contains(&name) {
            return Err(invalid(
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
    /// The table for the configured routes, each checked (patterns,
    /// overlaps, tag templates, header names) with the global `[cache]`
    /// settings filled in.
    pub fn build(routes: &[RouteConfig], global: &CacheConfig) -> Result<Self, ConfigError> {
        header_names("cache.key_headers", &global.key_headers)?;
        let base = Rule::global(global);
        let mut router = matchit::Router::new();
        for (i, r) in routes.iter().enumerate() {
            header_names(&format!("routes[{i}].key_headers"), &r.key_headers)?;
            let params = pattern_params(&r.path);
            let mut templated = false;
            for (field, tags) in [("tags", &r.tags), ("invalidate_tags", &r.invalidate_tags)] {
                for tag in tags {
                    let key = format!("routes[{i}].{field}");
                    if tag.trim().is_empty() {
                        return Err(invalid(key, "an empty tag"));
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
                key_query: key_query(i, r)?,
                key_headers: lower_sorted_unique(base.key_headers.iter().chain(&r.key_headers)),
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
            router
                .insert(r.path.clone(), route)
                .map_err(|e| invalid(format!("routes[{i}].path"), format!("`{}`: {e}", r.path)))?;
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

/// A route's `key_query`, sorted and de-duplicated: names must be
/// non-empty, and one the route also ignores is a contradiction.
fn key_query(i: usize, r: &RouteConfig) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(names) = &r.key_query else {
        return Ok(None);
    };
    let key = || format!("routes[{i}].key_query");
    let mut names = names.clone();
    names.sort();
    names.dedup();
    for name in &names {
        if name.is_empty() {
            return Err(invalid(key(), "an empty parameter name"));
        }
        if r.ignored_query_params.contains(name) {
            return Err(invalid(
                key(),
                format!("`{name}` is kept here and ignored by routes[{i}].ignored_query_params"),
            ));
        }
    }
    Ok(Some(names))
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
                invalid(
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

    #[test]
    fn key_query_is_sorted_and_checked() {
        let global = CacheConfig::default();
        let mut r = route("/search");
        r.key_query = Some(vec!["q".into(), "page".into(), "q".into()]);
        let table = RouteTable::build(&[r.clone()], &global).unwrap();
        let rule = table.rule_for("/search");
        assert_eq!(
            rule.key_query.as_deref(),
            Some(&["page".into(), "q".into()][..])
        );
        assert!(rule.query_filter().keeps("q"));
        assert!(!rule.query_filter().keeps("utm_id"));
        assert_eq!(table.rule_for("/other").key_query, None);
        r.key_query = Some(vec!["".into()]);
        let err = RouteTable::build(&[r.clone()], &global).unwrap_err();
        assert!(err.to_string().contains("routes[0].key_query"), "{err}");
        r.key_query = Some(vec!["q".into()]);
        r.ignored_query_params = vec!["q".into()];
        let err = RouteTable::build(&[r], &global).unwrap_err();
        assert!(err.to_string().contains("kept here and ignored"), "{err}");
    }

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
            key_query: None,
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
