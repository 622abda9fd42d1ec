//! The effective rule of one request: pure data, read by the policy.
//! [`crate::routes`] builds one per configured route from the
//! configuration; [`Rule::global`] is the rule of paths no route matches.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};

use crate::config::CacheConfig;

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
    /// The route's `key_query`: when set, the only query parameters kept
    /// (in the key and in the upstream call alike); sorted, de-duplicated.
    pub key_query: Option<Vec<String>>,
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
    /// Request headers that identify a client (`cache.credential_headers`),
    /// parsed (lower case) once for every rule.
    pub credential_headers: Arc<[HeaderName]>,
}

/// Which query parameters of a request are kept, in the key and in the
/// upstream call alike (the key is what goes upstream): none that is
/// ignored, and, when an allowlist is set, only those it names. Names are
/// compared form-decoded and case-sensitively, as servers read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryFilter<'a> {
    /// `cache.ignored_query_params` and the route's own.
    pub ignored: &'a [String],
    /// The route's `key_query`, when it has one.
    pub only: Option<&'a [String]>,
}

impl<'a> QueryFilter<'a> {
    /// Drop `ignored`, keep every other parameter.
    pub fn ignoring(ignored: &'a [String]) -> Self {
        QueryFilter {
            ignored,
            only: None,
        }
    }

    /// Whether the parameter named `name` (form-decoded) is kept.
    pub fn keeps(&self, name: &str) -> bool {
        !self.ignored.iter().any(|i| i == name)
            && self.only.is_none_or(|only| only.iter().any(|o| o == name))
    }
}

impl Rule {
    /// The query parameters this rule keeps.
    pub fn query_filter(&self) -> QueryFilter<'_> {
        QueryFilter {
            ignored: &self.ignored_query_params,
            only: self.key_query.as_deref(),
        }
    }

    /// The name of [`Rule::global`]: paths no route matches.
    pub const fn global_name() -> &'static str {
        "*"
    }

    /// The rule of a path no route matches: the global `[cache]` settings.
    pub fn global(global: &CacheConfig) -> Rule {
        Rule {
            name: Self::global_name().into(),
            cache: true,
            ttl: global.default_ttl,
            status_ttl: Vec::new(),
            override_upstream: false,
            stale_while_revalidate: global.stale_while_revalidate,
            stale_if_error: global.stale_if_error,
            tags: Vec::new(),
            invalidate_tags: Vec::new(),
            ignored_query_params: global.ignored_query_params.clone(),
            key_query: None,
            key_headers: lower_sorted_unique(global.key_headers.iter()),
            edge_ttl: global.edge_max_ttl,
            store_set_cookie_responses: global.store_set_cookie_responses,
            store_request_errors: global.store_request_errors,
            honor_client_no_cache: global.honor_client_no_cache,
            max_entry_bytes: global.max_entry_bytes.as_u64() as usize,
            keep_for_revalidation: global.keep_for_revalidation,
            key_cookies: Vec::new(),
            ignore_cookies: false,
            // Names the configuration check has refused never get here.
            credential_headers: global
                .credential_headers
                .iter()
                .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                .collect(),
        }
    }

    /// Whether requests carrying `Authorization` may use the cache (each
    /// credential then has its own keys).
    pub fn keys_on_authorization(&self) -> bool {
        self.key_headers.iter().any(|h| h == "authorization")
    }

    /// The credential headers (`cache.credential_headers`) `headers`
    /// carries that the rule does not key on: each makes the answer
    /// possibly personal (see [`super::request::Personal::Credential`]).
    pub fn unkeyed_credentials<'a>(
        &'a self,
        headers: &'a HeaderMap,
    ) -> impl Iterator<Item = &'a HeaderName> + 'a {
        // Most requests carry none: a pass over their few names compared
        // with the list settles that without hashing each of the list's
        // sixteen names for a lookup (a twentieth of a memory hit).
        let carries_one = headers
            .keys()
            .any(|name| self.credential_headers.contains(name));
        self.credential_headers.iter().filter(move |name| {
            carries_one
                && headers.contains_key(*name)
                && !self.key_headers.iter().any(|k| k == name.as_str())
        })
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

/// Header names as rules keep them: lower case, sorted, de-duplicated.
pub fn lower_sorted_unique<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = names.map(|s| s.to_ascii_lowercase()).collect();
    v.sort();
    v.dedup();
    v
}
