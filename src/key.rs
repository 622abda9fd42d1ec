//! From the canonical request ([`crate::request`]) to the upstream URL and
//! the cache key.
//!
//! The invariant: the key is computed from exactly what is sent upstream
//! (method, path, query, the forwarded origin) plus the route and the
//! request header values the route or the response's `Vary` names.
//! Whatever the client writes, two requests share a key only if the
//! upstream would see the same request. So:
//! - the path is the canonical one ([`crate::request::canonical_path`]):
//!   dot segments resolved against `/` before the upstream base path is
//!   prefixed (a path can never climb out of the base path), unreserved
//!   escapes decoded (`/%61` is `/a`), other escapes kept (`/items/1%2F`
//!   is its own key) and case kept (`/ITEMS/1` is not `/items/1`);
//! - `/items/1/` and `/items/1;x` are their own keys (upstreams may differ);
//! - the query keeps the bytes the client sent: split on `&`, empty
//!   pieces and ignored parameters dropped, the rest sorted by name (a
//!   stable sort: the order of repeated names is kept, as it can matter).
//!   Nothing is decoded and re-encoded, so `q=a+b` and `q=a%20b`, or two
//!   different non-UTF-8 escapes, are different keys, and the upstream
//!   receives the client's bytes;
//! - the scheme, host and authority of the request never reach the upstream
//!   URL: the upstream comes from configuration only. The client-facing
//!   origin is sent as `X-Forwarded-Host`/`-Proto`, so it is in the key;
//! - the route's identity is in the key: an entry stored under one
//!   route's rule is never answered under another's.

use http::header::HeaderName;
use http::HeaderMap;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::Url;

use cachegate_store::{KeyHasher, StoreKey};

/// The prefix of the URL tag every entry carries ([`Target::url_tag`]):
/// `url:` and the upstream path and query. The edge purges such tags as
/// paths, not as tags.
pub const URL_TAG_PREFIX: &str = "url:";

/// The prefix of the tag a purge by path prefix hands the edge: `url-prefix:`
/// and the upstream path prefix. No entry carries it; the edge sends it as
/// one wildcard path (`/items/*`) rather than a path per stored URL.
pub const URL_PREFIX_TAG_PREFIX: &str = "url-prefix:";

/// The response's `Vary` names select what a key includes; the policy
/// owns how they are read.
pub use crate::policy::headers::vary_names;
pub use crate::policy::rule::QueryFilter;

/// A request resolved against the upstream.
///
/// The key and the URL tag read `path_and_query`; the URL sent upstream is
/// built from it and the base only when something calls upstream or shows
/// it ([`Target::url`]): a hit needs no URL, and building one (a copy of
/// the base, a path and a query each parsed again) was a tenth of a memory
/// hit. The URL parser leaves a canonical path and query as they are, so
/// the URL carries exactly `path_and_query` (checked for random targets
/// here and for any bytes by `fuzz/fuzz_targets/key.rs`); and were it ever
/// to rewrite one, it would still be a function of `path_and_query`: two
/// requests sent upstream differently could never share a key.
#[derive(Debug, Clone)]
pub struct Target {
    /// `path?query` as sent upstream: what the key and the URL tag name.
    pub path_and_query: String,
    /// Where the path ends in `path_and_query`.
    path_len: usize,
    base: Url,
    url: std::sync::OnceLock<Url>,
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.path_and_query == other.path_and_query && self.base == other.base
    }
}

impl Eq for Target {}

impl Target {
    /// Resolve a request target against `base`. `request_path` is
    /// canonicalised ([`crate::request::canonical_path`]) on the way; one
    /// the proxy would refuse is `Err`.
    pub fn resolve(
        base: &Url,
        request_path: &str,
        request_query: Option<&str>,
        query: QueryFilter<'_>,
    ) -> Result<Target, crate::request::Rejected> {
        let path = crate::request::canonical_path(request_path)?;
        Ok(Self::from_canonical(base, &path, request_query, query))
    }

    /// Resolve an already canonical path (and a query as sent) against `base`.
    pub fn from_canonical(
        base: &Url,
        canonical_path: &str,
        request_query: Option<&str>,
        query: QueryFilter<'_>,
    ) -> Target {
        let prefix = base.path().trim_end_matches('/');
        let query = canonical_query(request_query.unwrap_or(""), query);
        let query_len = query.as_ref().map_or(0, |q| q.len() + 1);
        let mut path_and_query =
            String::with_capacity(prefix.len() + canonical_path.len() + query_len);
        path_and_query.push_str(prefix);
        path_and_query.push_str(canonical_path);
        let path_len = path_and_query.len();
        if let Some(q) = &query {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Target {
            path_and_query,
            path_len,
            base: base.clone(),
            url: std::sync::OnceLock::new(),
        }
    }

    /// The URL sent upstream: the base's scheme and authority with
    /// `path_and_query`, built on first use.
    pub fn url(&self) -> &Url {
        self.url.get_or_init(|| {
            let (path, query) = self.path_and_query.split_at(self.path_len);
            let mut url = self.base.clone();
            url.set_path(path);
            url.set_query(query.strip_prefix('?'));
            url.set_fragment(None);
            url
        })
    }

    /// The tag every entry of this URL carries, so a purge by URL removes
    /// all of its `Vary` variants.
    pub fn url_tag(&self) -> String {
        format!("{URL_TAG_PREFIX}{}", self.path_and_query)
    }

    /// The key of this URL before `Vary`: the method the cache serves it
    /// from (HEAD is served from GET), the target, the route it was stored
    /// under, the forwarded origin the upstream is told, and the values of
    /// the route's key headers.
    pub fn primary_key(
        &self,
        route: &str,
        key_headers: &[String],
        headers: &HeaderMap,
    ) -> StoreKey {
        let mut h = KeyHasher::new("response");
        h.part(b"GET")
            .part(self.path_and_query.as_bytes())
            .part(route.as_bytes());
        hash_header_values(&mut h, &FORWARDED_ORIGIN, headers);
        hash_header_values(&mut h, key_headers, headers);
        h.finish()
    }
}

/// The `Vary` names that select a variant of a response: its own, less
/// `Accept-Encoding` when cachegate asks the upstream for gzip in place of
/// every client's value (`compression`): every request that uses the cache
/// then sends the upstream the same `Accept-Encoding`, so it tells no two
/// of them apart, and the client's own value only decides what it is sent
/// ([`crate::policy::compression::ClientAccept`]). A response varying on
/// nothing else is stored under the primary key: one lookup a hit, not a
/// `Vary` index and then the variant. `None` for `Vary: *`.
pub fn variant_names(response: &HeaderMap, compression: bool) -> Option<Vec<String>> {
    let mut names = vary_names(response)?;
    if compression {
        names.retain(|n| n != http::header::ACCEPT_ENCODING.as_str());
    }
    Some(names)
}

/// The request headers cachegate sets that tell the upstream the
/// client-facing origin: part of every key, since upstreams build
/// absolute URLs from them.
pub(crate) const FORWARDED_ORIGIN: [HeaderName; 2] = [
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
];

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
fn hash_header_values<N: AsRef<str>>(h: &mut KeyHasher, names: &[N], headers: &HeaderMap)
where
    for<'a> &'a N: http::header::AsHeaderName,
{
    for name in names {
        let values = headers.get_all(name);
        h.part(name.as_ref().as_bytes())
            .part(&(values.iter().count() as u64).to_be_bytes());
        for v in values {
            h.part(v.as_bytes().trim_ascii());
        }
    }
}

/// The query as sent, split on `&`: empty pieces and parameters whose
/// (form-decoded) name `filter` does not keep dropped, the rest
/// stable-sorted by their name's bytes and joined again. No byte of a kept
/// piece changes. `None` when nothing is left.
pub fn canonical_query(raw: &str, filter: QueryFilter<'_>) -> Option<String> {
    fn name_of(piece: &str) -> &str {
        piece.split('=').next().unwrap_or("")
    }
    // Sorted as sent: the URL parser percent-encodes what a query may not
    // hold raw, and sorting the raw bytes would order `\u{e9}` after `b`
    // but send `%C3%A9` before it (a second pass would then reorder).
    let mut pieces: Vec<std::borrow::Cow<'_, str>> = raw
        .split('&')
        .filter(|p| !p.is_empty())
        .map(as_sent)
        .filter(|p| {
            // Borrowed unless the name has something to decode.
            let decoded = form_urlencoded::parse(name_of(p).as_bytes())
                .next()
                .map(|(k, _)| k)
                .unwrap_or_default();
            filter.keeps(&decoded)
        })
        .collect();
    if pieces.is_empty() {
        return None;
    }
    pieces.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    Some(pieces.join("&"))
}

/// What the URL parser percent-encodes in the query of an http(s) URL
/// (WHATWG special-query set): controls, space, `"`, `#`, `<`, `>`, `'`
/// (and every non-ASCII byte).
const SPECIAL_QUERY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'\'');

/// A query piece as the URL parser sends it for an http(s) URL: every
/// byte as the client sent it but those [`SPECIAL_QUERY`] escapes.
fn as_sent(piece: &str) -> std::borrow::Cow<'_, str> {
    utf8_percent_encode(piece, SPECIAL_QUERY).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// With compression every cache-using request asks the upstream for
    /// gzip: `Accept-Encoding` selects no variant, other names still do.
    #[test]
    fn accept_encoding_selects_no_variant_under_compression() {
        let mut h = HeaderMap::new();
        h.insert("vary", "Accept-Encoding".parse().unwrap());
        assert_eq!(variant_names(&h, true), Some(vec![]));
        assert_eq!(
            variant_names(&h, false),
            Some(vec!["accept-encoding".to_owned()])
        );
        h.append("vary", "accept-language, ACCEPT-ENCODING".parse().unwrap());
        assert_eq!(
            variant_names(&h, true),
            Some(vec!["accept-language".to_owned()])
        );
        h.insert("vary", "accept-encoding, *".parse().unwrap());
        assert_eq!(variant_names(&h, true), None, "Vary: * is never stored");
    }

    /// The bytes a query piece is sent (and keyed) with: pinned, since a
    /// change would change every key with such a byte in its query.
    #[test]
    fn query_pieces_are_escaped_byte_for_byte_as_before() {
        assert_eq!(
            as_sent(&crate::request::every_ascii_byte()),
            r##"%01%02%03%04%05%06%07%08%09%0A%0B%0C%0D%0E%0F%10%11%12%13%14%15%16%17%18%19%1A%1B%1C%1D%1E%1F%20!%22%23$%&%27()*+,-./0123456789:;%3C=%3E?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\]^_`abcdefghijklmnopqrstuvwxyz{|}~%7F%C3%A9"##
        );
        assert!(matches!(as_sent("a=b&c"), std::borrow::Cow::Borrowed(_)));
    }

    fn base() -> Url {
        Url::parse("https://api.example.com/v1").unwrap()
    }

    fn target(path: &str, query: Option<&str>) -> Target {
        Target::resolve(
            &base(),
            path,
            query,
            QueryFilter::ignoring(&["utm_source".to_string()]),
        )
        .unwrap()
    }

    fn key(path: &str, query: Option<&str>) -> StoreKey {
        target(path, query).primary_key("*", &[], &HeaderMap::new())
    }

    #[test]
    fn dot_segments_resolve_and_never_leave_the_base_path() {
        assert_eq!(
            target("/a/../b", None).url().as_str(),
            "https://api.example.com/v1/b"
        );
        assert_eq!(target("/a/%2e%2e/b", None).url().path(), "/v1/b");
        assert_eq!(target("/../../admin", None).url().path(), "/v1/admin");
        assert_eq!(target("/%2e%2e/admin", None).url().path(), "/v1/admin");
        assert_eq!(key("/a/../b", None), key("/b", None));
        assert_eq!(key("/items/%31", None), key("/items/1", None));
    }

    #[test]
    fn lookalike_paths_get_their_own_keys() {
        let k = key("/items/1", None);
        for other in [
            "/items/1/",
            "/items/1;x",
            "/items/1%2F",
            "/ITEMS/1",
            "/items/1%252F",
        ] {
            assert_ne!(key(other, None), k, "{other} shares the key of /items/1");
            // And what is keyed is what is sent.
            assert!(target(other, None).url().path().starts_with("/v1/"));
        }
        assert_eq!(target("/items/1%2f", None).url().path(), "/v1/items/1%2F");
        assert!(Target::resolve(&base(), "/items/1%2F..", None, QueryFilter::default()).is_err());
    }

    #[test]
    fn the_route_is_part_of_the_key() {
        let t = target("/account", None);
        let none = HeaderMap::new();
        assert_ne!(
            t.primary_key("/assets/{*rest}", &[], &none),
            t.primary_key("*", &[], &none)
        );
    }

    #[test]
    fn query_bytes_are_kept_as_sent() {
        assert_eq!(key("/s", Some("b=2&a=1")), key("/s", Some("a=1&b=2")));
        assert_ne!(key("/s", Some("q=a+b")), key("/s", Some("q=a%20b")));
        assert_ne!(key("/s", Some("id=%E9t%E9")), key("/s", Some("id=%E8t%E8")));
        assert_eq!(
            target("/s", Some("id=%E9t%E9")).url().query(),
            Some("id=%E9t%E9")
        );
        assert_eq!(key("/s", Some("a=1&utm_source=x")), key("/s", Some("a=1")));
        assert_eq!(
            key("/s", Some("a=1&utm%5Fsource=x")),
            key("/s", Some("a=1"))
        );
        assert_eq!(key("/s", Some("utm_source=x")), key("/s", None));
        assert_eq!(key("/s", Some("")), key("/s", None));
        assert_eq!(key("/s", Some("a=1&&b=2&")), key("/s", Some("a=1&b=2")));
        // Repeated names keep their order: it can change the answer.
        assert_ne!(key("/s", Some("a=1&a=2")), key("/s", Some("a=2&a=1")));
        assert_ne!(key("/s", Some("a=1")), key("/s", Some("a=2")));
        // Encoded separators stay data, never structure.
        assert_ne!(key("/s", Some("a=1%26b%3D2")), key("/s", Some("a=1&b=2")));
        assert_eq!(
            target("/s", Some("b=2&a=1&utm_source=x")).url().query(),
            Some("a=1&b=2")
        );
        assert_eq!(
            target("/s", Some("q=a%20b")).path_and_query,
            "/v1/s?q=a%20b"
        );
        assert_eq!(target("/s", Some("q=a+b")).path_and_query, "/v1/s?q=a+b");
    }

    #[test]
    fn an_allowlist_keeps_only_the_named_parameters() {
        let ignored = ["utm_source".to_string()];
        let only = ["page".to_string(), "q".to_string()];
        let filter = QueryFilter {
            ignored: &ignored,
            only: Some(&only),
        };
        let q = |raw: &str| canonical_query(raw, filter);
        assert_eq!(q("q=a&_=17&utm_id=1").as_deref(), Some("q=a"));
        assert_eq!(q("page=2&x=1&q=a").as_deref(), Some("page=2&q=a"));
        // Names are read form-decoded (as servers read them), bytes kept.
        assert_eq!(q("%71=a%20b").as_deref(), Some("%71=a%20b"));
        assert_eq!(q("Q=a").as_deref(), None, "names are case-sensitive");
        assert_eq!(q("x=1&y=2"), None);
        // Ignoring still wins over the allowlist.
        let both = ["q".to_string()];
        let filter = QueryFilter {
            ignored: &both,
            only: Some(&both),
        };
        assert_eq!(canonical_query("q=a", filter), None);
        // An empty allowlist keeps nothing.
        let filter = QueryFilter {
            ignored: &[],
            only: Some(&[]),
        };
        assert_eq!(canonical_query("q=a&b=1", filter), None);
        // Canonical is a fixed point with an allowlist too.
        let filter = QueryFilter {
            ignored: &ignored,
            only: Some(&only),
        };
        let once = canonical_query("q=b&page=1&q=a&z=0", filter).unwrap();
        assert_eq!(once, "page=1&q=b&q=a");
        assert_eq!(canonical_query(&once, filter).as_deref(), Some(&*once));
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
        assert_ne!(
            t.primary_key("*", &names, &a),
            t.primary_key("*", &names, &b)
        );
        // Header values cannot spill into each other's place.
        let mut c = HeaderMap::new();
        c.append("accept-language", HeaderValue::from_static("en"));
        c.append("accept-language", HeaderValue::from_static("x-tenant"));
        let mut d = HeaderMap::new();
        d.insert("accept-language", HeaderValue::from_static("en"));
        assert_ne!(
            t.primary_key("*", &names, &c),
            t.primary_key("*", &names, &d)
        );
        // Surrounding white space is not significant.
        let mut e = HeaderMap::new();
        e.insert("accept-language", HeaderValue::from_static(" en "));
        e.insert("x-tenant", HeaderValue::from_static("1"));
        assert_eq!(
            t.primary_key("*", &names, &a),
            t.primary_key("*", &names, &e)
        );
        // Without key headers, headers do not matter.
        assert_eq!(t.primary_key("*", &[], &a), t.primary_key("*", &[], &b));
        // The forwarded origin always does.
        let mut f = HeaderMap::new();
        f.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        assert_ne!(t.primary_key("*", &[], &a), t.primary_key("*", &[], &f));
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

    /// Random paths and queries from an alphabet of the bytes that matter
    /// (a deterministic generator, so a failure reproduces): normalising
    /// twice gives the same path and key; the URL sent upstream carries
    /// exactly the canonical path; and two requests that share a key are
    /// sent upstream identically. `fuzz/fuzz_targets/key.rs` checks the
    /// same on any bytes.
    #[test]
    fn normalisation_properties_hold_for_random_targets() {
        use crate::request::canonical_path;
        const ALPHABET: &[&str] = &[
            "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%25", "%41", "%7e", "a", "B",
            ";", ";x", "=", "&", "?", "+", "%20", " ", "~", "\u{e9}", "%E9", "%zz", "%", ":", "@",
        ];
        let base = reqwest::Url::parse("https://api.example.com/v1").unwrap();
        let none = HeaderMap::new();
        let mut random = crate::request::Xorshift(0x9E37_79B9_7F4A_7C15);
        let mut by_key = std::collections::HashMap::new();
        for _ in 0..8_000 {
            let path = random.path(ALPHABET, 8);
            let query = [
                "a=1&b=2", "b=2&a=1", "q=a+b", "q=a%20b", "id=%E9", "id=%E8", "",
            ][(random.next() % 7) as usize];
            let Ok(canonical) = canonical_path(&path) else {
                continue;
            };
            assert_eq!(canonical_path(&canonical).unwrap(), canonical, "{path:?}");
            let t = Target::from_canonical(&base, &canonical, Some(query), QueryFilter::default());
            assert_eq!(t.url().path(), format!("/v1{canonical}"), "{path:?}");
            // What is keyed is what is sent.
            let sent = match t.url().query() {
                Some(q) => format!("{}?{q}", t.url().path()),
                None => t.url().path().to_owned(),
            };
            assert_eq!(t.path_and_query, sent, "{path:?} {query:?}");
            let again = Target::resolve(&base, &canonical, t.url().query(), QueryFilter::default())
                .unwrap();
            let key = t.primary_key("*", &[], &none);
            assert_eq!(again.primary_key("*", &[], &none), key, "{path:?}");
            if let Some(url) = by_key.insert(key, t.url().clone()) {
                assert_eq!(&url, t.url(), "two upstream URLs share a key");
            }
        }
        assert!(
            by_key.len() > 400,
            "the generator produced too few valid paths"
        );
    }
}
