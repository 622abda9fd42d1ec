//! From a client request to the upstream URL and the cache key.
//!
//! The invariant: the key is computed from exactly what is sent upstream
//! (method, path, query) plus the request header values the route or the
//! response's `Vary` names. Whatever the client writes, two requests share a
//! key only if the upstream would see the same request. So:
//! - dot segments (`/a/../b`, `/a/%2e%2e/b`) are resolved against `/`
//!   before the upstream base path is prefixed: a path can never climb out
//!   of the base path, and `/a/../b` *is* `/b`;
//! - other percent-escapes are kept as sent (`/items/1%2F..` is its own
//!   key, `/%41` is not `/A`), and case is kept (`/ITEMS/1` is not `/items/1`);
//! - `/items/1/` and `/items/1;x` are their own keys (upstreams may differ);
//! - the query is parsed as form data, ignored parameters are dropped, the
//!   rest sorted by name (a stable sort: the order of repeated names is kept,
//!   as it can matter), and re-encoded canonically (`+` and `%20` agree);
//!   that canonical query is also what the upstream receives;
//! - the scheme, host and authority of the request never reach the key or
//!   the upstream URL: the upstream comes from configuration only.

use http::HeaderMap;
use reqwest::Url;

use cachegate_store::StoreKey;

/// A request resolved against the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL sent upstream.
    pub url: Url,
    /// `path?query` as sent upstream: what the key and the URL tag name.
    pub path_and_query: String,
}

impl Target {
    /// Resolve a request target (origin-form `path?query`, or an absolute
    /// form whose scheme and authority are dropped) against `base`.
    pub fn resolve(
        base: &Url,
        request_path: &str,
        request_query: Option<&str>,
        ignored: &[String],
    ) -> Target {
        // Resolve dot segments relative to `/` on a scratch URL first.
        let mut scratch = Url::parse("http://scratch.invalid/").expect("literal URL");
        scratch.set_path(request_path);
        let mut url = base.clone();
        let prefix = base.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{}", scratch.path()));
        url.set_query(canonical_query(request_query.unwrap_or(""), ignored).as_deref());
        url.set_fragment(None);
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        Target {
            url,
            path_and_query,
        }
    }

    /// The tag every entry of this URL carries, so a purge by URL removes
    /// all of its `Vary` variants.
    pub fn url_tag(&self) -> String {
        format!("url:{}", self.path_and_query)
    }

    /// The key of this URL before `Vary`: the method the cache serves it
    /// from (HEAD is served from GET), the target, and the values of the
    /// route's key headers.
    pub fn primary_key(&self, key_headers: &[String], headers: &HeaderMap) -> StoreKey {
        let mut parts: Vec<Vec<u8>> =
            vec![b"GET".to_vec(), self.path_and_query.as_bytes().to_vec()];
        push_header_values(&mut parts, key_headers, headers);
        StoreKey::hash("response", parts)
    }
}

/// The key of one `Vary` variant under a primary key. Requests that differ
/// only in how they write a list select the same variant (RFC 9111 §4.1
/// lets a cache normalise): the values of a field are one comma-separated
/// list, members trimmed; for the content-negotiation fields, whose
/// members are case-insensitive tokens whose order carries no meaning of
/// its own (preference is `q=`), members are also lower-cased and sorted,
/// so `Accept-Encoding: gzip, br` selects what `br,GZIP` stored.
pub fn variant_key(primary: &StoreKey, vary: &[String], headers: &HeaderMap) -> StoreKey {
    const UNORDERED_CASE_INSENSITIVE: &[&str] = &[
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
    ];
    let mut parts: Vec<Vec<u8>> = vec![primary.as_str().as_bytes().to_vec()];
    for name in vary {
        let values: Vec<&[u8]> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        parts.push(name.as_bytes().to_vec());
        if values.is_empty() {
            // Absent is not the same as present and empty.
            parts.push(b"absent".to_vec());
            continue;
        }
        let mut members: Vec<Vec<u8>> = values
            .iter()
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|m| m.trim_ascii().to_vec())
            .filter(|m| !m.is_empty())
            .collect();
        if UNORDERED_CASE_INSENSITIVE.contains(&name.as_str()) {
            for m in &mut members {
                m.make_ascii_lowercase();
                // `gzip ; q=0.5` is `gzip;q=0.5`.
                m.retain(|b| !b.is_ascii_whitespace());
            }
            members.sort();
            members.dedup();
        }
        parts.push((members.len() as u64).to_be_bytes().to_vec());
        parts.extend(members);
    }
    StoreKey::hash("variant", parts)
}

/// Name, number of values, then each value (trimmed): unambiguous because
/// every part is length-prefixed when hashed and the count fixes the shape.
fn push_header_values(parts: &mut Vec<Vec<u8>>, names: &[String], headers: &HeaderMap) {
    for name in names {
        let values: Vec<&[u8]> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| v.as_bytes().trim_ascii())
            .collect();
        parts.push(name.as_bytes().to_vec());
        parts.push((values.len() as u64).to_be_bytes().to_vec());
        parts.extend(values.into_iter().map(<[u8]>::to_vec));
    }
}

/// Parse, drop ignored names, stable-sort by name, re-encode. `None` when empty.
pub fn canonical_query(raw: &str, ignored: &[String]) -> Option<String> {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
        .filter(|(k, _)| !ignored.iter().any(|i| i == k))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    Some(
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish(),
    )
}

/// The `Vary` header names of a response: lower case, sorted, de-duplicated.
/// `None` for `Vary: *` (never storable).
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for v in headers.get_all(http::header::VARY) {
        for name in v.to_str().unwrap_or("*").split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name == "*" {
                return None;
            }
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names.sort();
    names.dedup();
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn base() -> Url {
        Url::parse("https://api.example.com/v1").unwrap()
    }

    fn target(path: &str, query: Option<&str>) -> Target {
        Target::resolve(&base(), path, query, &["utm_source".to_string()])
    }

    fn key(path: &str, query: Option<&str>) -> StoreKey {
        target(path, query).primary_key(&[], &HeaderMap::new())
    }

    #[test]
    fn dot_segments_resolve_and_never_leave_the_base_path() {
        assert_eq!(
            target("/a/../b", None).url.as_str(),
            "https://api.example.com/v1/b"
        );
        assert_eq!(target("/a/%2e%2e/b", None).url.path(), "/v1/b");
        assert_eq!(target("/../../admin", None).url.path(), "/v1/admin");
        assert_eq!(target("/%2e%2e/admin", None).url.path(), "/v1/admin");
        assert_eq!(key("/a/../b", None), key("/b", None));
    }

    #[test]
    fn lookalike_paths_get_their_own_keys() {
        let k = key("/items/1", None);
        for other in [
            "/items/1/",
            "/items/1;x",
            "/items/1%2F..",
            "/ITEMS/1",
            "/items/%31",
            "/items/1%252F",
        ] {
            assert_ne!(key(other, None), k, "{other} shares the key of /items/1");
            // And what is keyed is what is sent.
            assert!(target(other, None).url.path().starts_with("/v1/"));
        }
        assert_eq!(target("/items/1%2F..", None).url.path(), "/v1/items/1%2F..");
    }

    #[test]
    fn query_is_canonical() {
        assert_eq!(key("/s", Some("b=2&a=1")), key("/s", Some("a=1&b=2")));
        assert_eq!(key("/s", Some("q=a+b")), key("/s", Some("q=a%20b")));
        assert_eq!(key("/s", Some("a=1&utm_source=x")), key("/s", Some("a=1")));
        assert_eq!(key("/s", Some("utm_source=x")), key("/s", None));
        assert_eq!(key("/s", Some("")), key("/s", None));
        // Repeated names keep their order: it can change the answer.
        assert_ne!(key("/s", Some("a=1&a=2")), key("/s", Some("a=2&a=1")));
        assert_ne!(key("/s", Some("a=1")), key("/s", Some("a=2")));
        // Encoded separators stay data, never structure.
        assert_ne!(key("/s", Some("a=1%26b%3D2")), key("/s", Some("a=1&b=2")));
        assert_eq!(
            target("/s", Some("b=2&a=1&utm_source=x")).url.query(),
            Some("a=1&b=2")
        );
        assert_eq!(target("/s", Some("q=a%20b")).path_and_query, "/v1/s?q=a+b");
    }

    #[test]
    fn path_and_query_cannot_be_confused() {
        // A `?` escaped into the path is not a query.
        assert_ne!(key("/s%3Fa=1", None), key("/s", Some("a=1")));
    }

    #[test]
    fn key_headers_split_keys_and_cannot_be_confused() {
        let t = target("/x", None);
        let names = vec!["accept-language".to_string(), "x-tenant".to_string()];
        let mut a = HeaderMap::new();
        a.insert("accept-language", HeaderValue::from_static("en"));
        a.insert("x-tenant", HeaderValue::from_static("1"));
        let mut b = HeaderMap::new();
        b.insert("accept-language", HeaderValue::from_static("en"));
        b.insert("x-tenant", HeaderValue::from_static("2"));
        assert_ne!(t.primary_key(&names, &a), t.primary_key(&names, &b));
        // Header values cannot spill into each other's place.
        let mut c = HeaderMap::new();
        c.append("accept-language", HeaderValue::from_static("en"));
        c.append("accept-language", HeaderValue::from_static("x-tenant"));
        let mut d = HeaderMap::new();
        d.insert("accept-language", HeaderValue::from_static("en"));
        assert_ne!(t.primary_key(&names, &c), t.primary_key(&names, &d));
        // Surrounding white space is not significant.
        let mut e = HeaderMap::new();
        e.insert("accept-language", HeaderValue::from_static(" en "));
        e.insert("x-tenant", HeaderValue::from_static("1"));
        assert_eq!(t.primary_key(&names, &a), t.primary_key(&names, &e));
        // Without key headers, headers do not matter.
        assert_eq!(t.primary_key(&[], &a), t.primary_key(&[], &b));
    }

    #[test]
    fn vary_variants_normalise_lists() {
        let primary = key("/x", None);
        let vk = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, HeaderValue::from_static(v));
            }
            variant_key(&primary, &["accept-encoding".into(), "x-tenant".into()], &h)
        };
        let base = vk(&[("accept-encoding", "gzip, br"), ("x-tenant", "a")]);
        for same in [
            &[("accept-encoding", "br,gzip"), ("x-tenant", "a")][..],
            &[("accept-encoding", "BR, Gzip"), ("x-tenant", " a ")],
            &[
                ("accept-encoding", "gzip"),
                ("accept-encoding", "br"),
                ("x-tenant", "a"),
            ],
            &[("accept-encoding", "gzip, br, gzip"), ("x-tenant", "a")],
        ] {
            assert_eq!(vk(same), base, "{same:?}");
        }
        for other in [
            &[("accept-encoding", "gzip"), ("x-tenant", "a")][..],
            &[("accept-encoding", "gzip, br"), ("x-tenant", "A")],
            &[("accept-encoding", "gzip, br")],
            &[("accept-encoding", "gzip, br"), ("x-tenant", "")],
        ] {
            assert_ne!(vk(other), base, "{other:?}");
        }
        // Absent and empty are different requests.
        assert_ne!(
            vk(&[("accept-encoding", "gzip, br")]),
            vk(&[("accept-encoding", "gzip, br"), ("x-tenant", "")])
        );
    }

    #[test]
    fn vary_parsing() {
        let mut h = HeaderMap::new();
        h.append("vary", HeaderValue::from_static("Accept-Encoding, accept"));
        h.append("vary", HeaderValue::from_static("ACCEPT"));
        assert_eq!(
            vary_names(&h),
            Some(vec!["accept".into(), "accept-encoding".into()])
        );
        h.append("vary", HeaderValue::from_static("*"));
        assert_eq!(vary_names(&h), None);
        assert_eq!(vary_names(&HeaderMap::new()), Some(vec![]));
    }
}
