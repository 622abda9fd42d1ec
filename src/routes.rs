//! Per-route rules resolved against the global cache settings, and the
//! table that finds the rule of a request path.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{
    header_names, invalid, CacheConfig, ConfigError, PathEquivalence, RouteConfig,
};
use crate::policy::rule::lower_sorted_unique;
pub use crate::policy::Rule;
use crate::request::{lenient_path, Rejected};

/// Finds the rule of a request path.
#[derive(Debug, Clone)]
pub struct RouteTable {
    router: matchit::Router<Route>,
    /// The same patterns in their lenient form ([`lenient_path`]), to the
    /// route's index; `None` when the upstream reads paths strictly
    /// (`upstream.path_equivalence`).
    lenient: Option<matchit::Router<usize>>,
    default: Arc<Rule>,
}

/// A route's rule, and whether its tags name placeholders of its path
/// (then each request gets its own copy of the rule with them filled in).
#[derive(Debug, Clone)]
struct Route {
    rule: Arc<Rule>,
    templated: bool,
    /// Its place in `routes`.
    index: usize,
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
    /// The table for the configured routes in front of an upstream that
    /// reads paths leniently (the default of `upstream.path_equivalence`).
    pub fn build(routes: &[RouteConfig], global: &CacheConfig) -> Result<Self, ConfigError> {
        Self::build_for(routes, global, PathEquivalence::default())
    }

    /// The table for the configured routes, each checked (patterns,
    /// overlaps, tag templates, header names; for a lenient upstream also
    /// patterns that read as one path to it) with the global `[cache]`
    /// settings filled in.
    pub fn build_for(
        routes: &[RouteConfig],
        global: &CacheConfig,
        paths: PathEquivalence,
    ) -> Result<Self, ConfigError> {
        header_names("cache.key_headers", &global.key_headers)?;
        let base = Rule::global(global);
        let mut router = matchit::Router::new();
        let mut lenient = (paths == PathEquivalence::Lenient).then(LenientPatterns::default);
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
                index: i,
            };
            router
                .insert(r.path.clone(), route)
                .map_err(|e| invalid(format!("routes[{i}].path"), format!("`{}`: {e}", r.path)))?;
            if let Some(lenient) = &mut lenient {
                lenient.insert(i, &r.path)?;
            }
        }
        Ok(RouteTable {
            router,
            lenient: lenient.map(|l| l.router),
            default: Arc::new(base),
        })
    }

    /// The rule of a canonical request path
    /// ([`crate::request::canonical_path`]), as [`Self::rule_for`]; and
    /// for an upstream that reads paths leniently, `Err` (400
    /// `ambiguous_path`) when its lenient form ([`lenient_path`]) has dot
    /// segments or falls under another route (or none where the path has
    /// one): that upstream may serve one route's resource under the other
    /// route's rule.
    pub fn rule_for_request(&self, canonical: &str) -> Result<Arc<Rule>, Rejected> {
        let found = self.router.at(canonical);
        if let Some(lenient) = &self.lenient {
            let form = lenient_path(canonical)?;
            let as_sent = found.as_ref().ok().map(|m| m.value.index);
            let as_read = lenient.at(&form).ok().map(|m| *m.value);
            if as_sent != as_read {
                return Err(crate::request::ambiguous(format!(
                    "the path `{canonical}` reads as `{form}` to servers that are lenient about \
                     case, slashes, `;params` or escapes, and that path has other caching rules"
                )));
            }
        }
        Ok(self.rule_of(found))
    }

    /// The rule of a request path, its tags' placeholders filled in from
    /// the path as the request has it (percent-escapes kept). Matches the
    /// path as given, however the upstream reads it.
    pub fn rule_for(&self, path: &str) -> Arc<Rule> {
        self.rule_of(self.router.at(path))
    }

    fn rule_of(
        &self,
        found: Result<matchit::Match<'_, '_, &Route>, matchit::MatchError>,
    ) -> Arc<Rule> {
        match found {
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

/// The route patterns in their lenient form, with the pattern each came
/// from, so a collision names both routes.
#[derive(Default)]
struct LenientPatterns {
    router: matchit::Router<usize>,
    forms: std::collections::HashMap<String, usize>,
}

impl LenientPatterns {
    fn insert(&mut self, i: usize, pattern: &str) -> Result<(), ConfigError> {
        let key = format!("routes[{i}].path");
        let form = lenient_path(pattern).map_err(|r| invalid(&key, r.message))?;
        let why = |other: String| {
            invalid(
                &key,
                format!(
                    "`{pattern}` reads as `{form}` to an upstream that is lenient about case, \
                     slashes, `;params` and escapes, which overlaps {other}: set \
                     upstream.path_equivalence = \"strict\" if the upstream reads paths as \
                     RFC 3986 does, or keep one of them"
                ),
            )
        };
        match self.router.insert(form.clone(), i) {
            Ok(()) => {
                self.forms.insert(form, i);
                Ok(())
            }
            Err(matchit::InsertError::Conflict { with }) => Err(why(match self.forms.get(&with) {
                Some(j) => format!("routes[{j}]"),
                None => format!("`{with}`"),
            })),
            Err(e) => Err(why(e.to_string())),
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

    /// The routes of issue 24's measurements: a tenant route keyed on
    /// `x-tenant`, an uncached admin route, a long-lived assets route.
    fn issue_24_routes() -> Vec<RouteConfig> {
        let mut tenant = route("/t/{*rest}");
        tenant.key_headers = vec!["x-tenant".into()];
        let mut admin = route("/admin/{*rest}");
        admin.cache = false;
        let mut assets = route("/assets/{*rest}");
        assets.ignore_cookies = true;
        vec![tenant, admin, assets]
    }

    /// The rule each spelling gets: the plain spelling's, or `Err` when a
    /// lenient origin could read it as another route's path.
    fn rule_name(t: &RouteTable, raw: &str) -> Result<String, &'static str> {
        let canonical = crate::request::canonical_path(raw).map_err(|r| r.code.as_str())?;
        t.rule_for_request(&canonical)
            .map(|r| r.name.clone())
            .map_err(|r| r.code.as_str())
    }

    /// Issue 24: before, each spelling below fell to the default rule
    /// (no `x-tenant` in the key, no `cache = false`, the assets rule on
    /// `/account`).
    #[test]
    fn no_spelling_reaches_another_routes_rule() {
        let t = RouteTable::build(&issue_24_routes(), &CacheConfig::default()).unwrap();
        let same = |raw: &str, name: &str| assert_eq!(rule_name(&t, raw), Ok(name.into()), "{raw}");
        let refused = |raw: &str| assert_eq!(rule_name(&t, raw), Err("ambiguous_path"), "{raw}");
        for raw in [
            "/t/data",
            "/t//data",
            "/t/data;x",
            "/t/DATA",
            "/t/a%2Fb",
            "/t/data/",
            "/%74/data",
        ] {
            same(raw, "/t/{*rest}");
        }
        for raw in [
            "//t/data",
            "/T/data",
            "/t;x/data",
            "/t%2Fdata",
            "/%2574/data",
            "/%EF%BD%94/data",
            "/t%5Cdata",
        ] {
            refused(raw);
        }
        // Fifteen spellings of /admin/users: cache = false, or refused.
        for raw in [
            "/admin/users",
            "/admin//users",
            "/admin/users;x",
            "/admin/users/",
            "/%61dmin/users",
            "/admin/./users",
            "/x/../admin/users",
        ] {
            same(raw, "/admin/{*rest}");
        }
        for raw in [
            "//admin/users",
            "/Admin/users",
            "/ADMIN/USERS",
            "/admin;x/users",
            "/admin%2Fusers",
            "/admin%2fusers",
            "/%2561dmin/users",
            "/%EF%BD%81dmin/users",
        ] {
            refused(raw);
        }
        // Dot segments only a lenient origin resolves.
        for raw in [
            "/assets/%252e%252e/account",
            "/assets/..%252Faccount",
            "/assets/%EF%BC%8E%EF%BC%8E/account",
        ] {
            refused(raw);
        }
        // No route either way: the default rule, whatever the spelling.
        same("/Other//Path;x", "*");
        same("/account", "*");
    }

    /// The rule comes from the canonical path: placeholders keep the
    /// request's case and escapes, as before.
    #[test]
    fn placeholders_read_the_canonical_path() {
        let mut posts = route("/posts/{id}");
        posts.tags = vec!["post-{id}".into()];
        let t = RouteTable::build(&[posts], &CacheConfig::default()).unwrap();
        let r = t.rule_for_request("/posts/AbC%20d").unwrap();
        assert_eq!(r.tags, vec!["post-AbC%20d"]);
        assert_eq!(
            t.rule_for_request("/posts/AbC;v=1").unwrap().tags,
            vec!["post-AbC;v=1"]
        );
    }

    /// `upstream.path_equivalence = "strict"`: the canonical path alone
    /// picks the rule, as before, and nothing above is refused.
    #[test]
    fn a_strict_upstream_matches_the_canonical_path_alone() {
        let t = RouteTable::build_for(
            &issue_24_routes(),
            &CacheConfig::default(),
            PathEquivalence::Strict,
        )
        .unwrap();
        for (raw, name) in [
            ("/t/data", "/t/{*rest}"),
            ("//t/data", "*"),
            ("/T/data", "*"),
            ("/t%2Fdata", "*"),
            ("/%2574/data", "*"),
            ("/assets/%252e%252e/account", "/assets/{*rest}"),
            ("/Admin/users", "*"),
        ] {
            assert_eq!(rule_name(&t, raw), Ok(name.into()), "{raw}");
        }
    }

    /// Patterns one lenient path reads as one are refused at start-up,
    /// naming both routes; a strict upstream keeps them apart.
    #[test]
    fn patterns_a_lenient_upstream_reads_as_one_name_both_routes() {
        for (a, b) in [
            ("/items/{id}", "/Items/{id}"),
            ("/items", "/items/"),
            ("/a/b", "/a//b"),
            ("/a/{x}", "/a;v/{y}"),
        ] {
            let routes = [route(a), route(b)];
            let err = RouteTable::build(&routes, &CacheConfig::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("routes[1].path")
                    && err.contains("routes[0]")
                    && err.contains("CACHEGATE_ROUTES")
                    && err.contains("upstream.path_equivalence"),
                "{err}"
            );
            RouteTable::build_for(&routes, &CacheConfig::default(), PathEquivalence::Strict)
                .unwrap();
        }
        let err = RouteTable::build(&[route("/a/%252e%252e/b")], &CacheConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes[0].path"), "{err}");
    }

    #[test]
    fn conflicting_patterns_name_the_route() {
        let err = RouteTable::build(&[route("/a/{x}"), route("/a/{y}")], &CacheConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("routes[1].path"), "{err}");
    }
}
