//! The key normaliser: `Target::resolve` and `canonical_query` on any
//! path and query a client can send.
//!
//! Input: the request path, then `\n`, then the raw query (any bytes; not
//! UTF-8 is replaced, as only `&str` reaches the normaliser).
#![no_main]

use cachegate::key::{canonical_query, Target};
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use reqwest::Url;

const BASES: &[&str] = &[
    "https://api.example.com/v1",
    "https://api.example.com/v1/",
    "https://api.example.com",
    "http://127.0.0.1:8080/a/b%20c/",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (path, query) = match text.split_once('\n') {
        Some((p, q)) => (p, Some(q)),
        None => (&*text, None),
    };
    let ignored = vec!["utm_source".to_string(), "fbclid".to_string()];

    if let Some(q) = query {
        let once = canonical_query(q, &ignored);
        if let Some(c) = &once {
            assert!(!c.is_empty(), "an empty canonical query must be None");
            // Canonical means a fixed point.
            assert_eq!(
                canonical_query(c, &ignored).as_ref(),
                Some(c),
                "query {q:?}"
            );
            assert!(
                !c.contains('#') && !c.contains(' '),
                "unescaped byte in {c:?}"
            );
        }
    }

    for base in BASES {
        let base = Url::parse(base).expect("literal base");
        let prefix = base.path().trim_end_matches('/');
        let t = Target::resolve(&base, path, query, &ignored);
        let url = &t.url;

        // The upstream comes from configuration only.
        assert_eq!(url.scheme(), base.scheme());
        assert_eq!(url.host_str(), base.host_str());
        assert_eq!(url.port(), base.port());
        assert_eq!(url.username(), "");
        assert_eq!(url.password(), None);
        assert_eq!(url.fragment(), None, "fragment sent upstream for {path:?}");

        // Always under the base path, with no dot segment left to climb out.
        let rest = url
            .path()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{:?} left base {prefix:?} for {path:?}", url.path()));
        assert!(rest.starts_with('/'), "{rest:?} not below {prefix:?}");
        for seg in rest.split('/') {
            let s = seg.to_ascii_lowercase().replace("%2e", ".");
            assert!(
                s != "." && s != "..",
                "dot segment {seg:?} in {:?} from {path:?}",
                url.path()
            );
        }

        // What is keyed is what is sent.
        let sent = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        assert_eq!(t.path_and_query, sent);
        if let Some(q) = url.query() {
            assert_eq!(canonical_query(q, &ignored).as_deref(), Some(q));
        }

        // Resolving what was resolved changes nothing: one canonical form,
        // so one key, however the client spelled it.
        let again = Target::resolve(&base, rest, url.query(), &ignored);
        assert_eq!(again, t, "not stable for {path:?} {query:?}");
        let none = HeaderMap::new();
        assert_eq!(again.primary_key(&[], &none), t.primary_key(&[], &none));
    }
});
