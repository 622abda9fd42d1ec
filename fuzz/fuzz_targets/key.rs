//! The key normaliser: `canonical_path`, `lenient_path`, `Target` and
//! `canonical_query` on any path and query a client can send.
//!
//! Input: the request path, then `\n`, then the raw query, optionally then
//! `\n` and a second path and query (`path2\nquery2`) compared with the
//! first (not UTF-8 is replaced, as only `&str` reaches the normaliser).
#![no_main]

use cachegate::key::{canonical_query, QueryFilter, Target};
use cachegate::request::{canonical_path, canonical_path_rewritten, lenient_path};
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
    let mut parts = text.splitn(4, '\n');
    let (path, query) = (parts.next().unwrap_or(""), parts.next());
    let other = match (parts.next(), parts.next()) {
        (Some(p), q) => Some((p, q)),
        _ => None,
    };
    let ignored = vec!["utm_source".to_string(), "fbclid".to_string()];

    if let Some(q) = query {
        let once = canonical_query(q, QueryFilter::ignoring(&ignored));
        if let Some(c) = &once {
            assert!(!c.is_empty(), "an empty canonical query must be None");
            // Canonical means a fixed point.
            assert_eq!(
                canonical_query(c, QueryFilter::ignoring(&ignored)).as_ref(),
                Some(c),
                "query {q:?}"
            );
            // Bytes are kept: every kept piece is a piece of the input, as
            // the URL parser sends it (what a query may not hold raw is
            // percent-encoded; every other byte is the client's).
            let as_sent = |p: &str| {
                p.bytes()
                    .map(|b| {
                        if b.is_ascii_graphic() && !matches!(b, b'"' | b'#' | b'<' | b'>' | b'\'') {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect::<String>()
            };
            for piece in c.split('&') {
                assert!(
                    q.split('&').any(|p| as_sent(p) == piece),
                    "{piece:?} not sent in {q:?}"
                );
            }
        }
        // With an allowlist (a route's `key_query`): a fixed point too, and
        // every kept piece is one the unrestricted query kept, with an
        // allowed name.
        let only = vec!["a".to_string(), "q".to_string()];
        let allow = QueryFilter {
            ignored: &ignored,
            only: Some(&only),
        };
        if let Some(c) = canonical_query(q, allow) {
            assert_eq!(canonical_query(&c, allow).as_ref(), Some(&c), "query {q:?}");
            let all = once.as_deref().unwrap_or("");
            for piece in c.split('&') {
                assert!(
                    all.split('&').any(|p| p == piece),
                    "{piece:?} not in {all:?}"
                );
            }
        }
    }

    let Ok(canonical) = canonical_path(path) else {
        return;
    };
    // A path taken as canonical as sent is what the general rewrite makes
    // of it.
    if canonical == path {
        assert_eq!(
            canonical_path_rewritten(path).as_deref().ok(),
            Some(path),
            "the shortcut disagrees with the rewrite"
        );
    }
    // Normalising twice changes nothing.
    assert_eq!(
        canonical_path(&canonical).as_deref().ok(),
        Some(canonical.as_str())
    );

    // The lenient reading (route choice only) is a fixed point, with no
    // `//`, `;params`, backslash or all-dot segment left in it.
    if let Ok(form) = lenient_path(&canonical) {
        assert!(form.starts_with('/'), "{form:?}");
        assert_eq!(lenient_path(&form).as_deref().ok(), Some(form.as_str()));
        assert!(
            !form.contains(['\\', ';']) && !form.contains("//"),
            "{form:?}"
        );
        for seg in form.split('/').skip(1) {
            let seg = seg.trim();
            assert!(
                seg.is_empty() || !seg.bytes().all(|b| b == b'.'),
                "{seg:?} in {form:?} from {path:?}"
            );
        }
    }

    for base in BASES {
        let base = Url::parse(base).expect("literal base");
        let prefix = base.path().trim_end_matches('/');
        let t = Target::from_canonical(&base, &canonical, query, QueryFilter::ignoring(&ignored));
        let url = t.url();

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
        assert_eq!(rest, canonical, "the URL parser changed the canonical path");
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

        // Resolving what was resolved changes nothing: one canonical form,
        // so one key, however the client spelled it.
        let again = Target::resolve(&base, rest, url.query(), QueryFilter::ignoring(&ignored))
            .expect("canonical again");
        assert_eq!(again, t, "not stable for {path:?} {query:?}");
        let none = HeaderMap::new();
        assert_eq!(
            again.primary_key("*", &[], &none),
            t.primary_key("*", &[], &none)
        );

        // Two requests the upstream sees differently never share a key.
        if let Some((p2, q2)) = other {
            if let Ok(t2) = Target::resolve(&base, p2, q2, QueryFilter::ignoring(&ignored)) {
                if t2.primary_key("*", &[], &none) == t.primary_key("*", &[], &none) {
                    assert_eq!(t2.url(), t.url(), "{path:?} and {p2:?} share a key");
                }
            }
        }
    }
});
