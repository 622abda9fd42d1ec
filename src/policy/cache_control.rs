//! `Cache-Control` parsing (RFC 9111 §5.2), for requests and responses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderMap;

/// Parsed `Cache-Control` directives (request or response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    /// RFC 9111 §5.2.2.3: store only if the status's caching rules are known.
    pub must_understand: bool,
    /// A value was not a list of directives and was read as `no-store`
    /// ([`CacheControl::parse_field`]). That reading is a guess made to
    /// fail safe, so `must-understand` elsewhere does not lift it.
    pub malformed: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

impl CacheControl {
    /// Parse every `Cache-Control` value of `headers`. Unknown directives
    /// are ignored; a malformed delta for a freshness directive counts as 0
    /// (stale), per RFC 9111 §4.2.1, and `no-cache="x"` / `private="x"`
    /// are treated as their unqualified, stricter forms.
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        Self::parse_field(headers, http::header::CACHE_CONTROL)
    }

    /// The directives cachegate obeys for its own storing (RFC 9213): the
    /// first of `Cachegate-Cache-Control` (for cachegate only), then
    /// `CDN-Cache-Control` (for every CDN-like cache of the operator), that
    /// the response carries and that parses ([`targeted_field`]) replaces
    /// `Cache-Control` entirely; otherwise `Cache-Control`.
    pub fn for_storing(headers: &HeaderMap) -> CacheControl {
        Self::targeted_directives(headers).unwrap_or_else(|| Self::parse(headers))
    }

    /// Whether the directives cachegate stores by come from a targeted
    /// field rather than `Cache-Control`.
    pub fn targeted(headers: &HeaderMap) -> bool {
        Self::targeted_directives(headers).is_some()
    }

    fn targeted_directives(headers: &HeaderMap) -> Option<CacheControl> {
        [CACHEGATE_CACHE_CONTROL, CDN_CACHE_CONTROL]
            .into_iter()
            .find_map(|name| targeted_field(headers, name))
    }

    /// Parse every value of the field `name` (`Cache-Control`, or a
    /// targeted field like `CDN-Cache-Control`, RFC 9213, same syntax).
    ///
    /// A value that is not a list of directives (RFC 9111 §5.2, RFC 9110
    /// §5.6: `token [ "=" ( token / quoted-string ) ]`, comma-separated) —
    /// a missing comma (`private max-age=60`), a stray `;`, an unclosed
    /// quote, bytes that are not visible ASCII — is read as `no-store`: a
    /// sender that meant `private` must not be stored because a
    /// character was off. Each such value is counted
    /// ([`malformed_count`]) and logged at debug level.
    pub fn parse_field(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(name) {
            let Some(directives) = value.to_str().ok().and_then(directives) else {
                MALFORMED.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(value = ?value, "malformed cache directives; read as no-store");
                cc.no_store = true;
                cc.malformed = true;
                // `private` anywhere in it is honoured too (it also keeps
                // the answer out of shared caches downstream).
                if value
                    .as_bytes()
                    .windows(7)
                    .any(|w| w.eq_ignore_ascii_case(b"private"))
                {
                    cc.private = true;
                }
                continue;
            };
            for (name, arg) in directives {
                let arg = arg.as_deref();
                let delta = || arg.and_then(delta_seconds).unwrap_or(0);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "must-understand" => cc.must_understand = true,
                    "max-age" => cc.max_age = Some(min_opt(cc.max_age, delta())),
                    "s-maxage" => cc.s_maxage = Some(min_opt(cc.s_maxage, delta())),
                    "stale-while-revalidate" => cc.stale_while_revalidate = Some(delta()),
                    "stale-if-error" => cc.stale_if_error = Some(delta()),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// A targeted cache-control field (RFC 9213 §2.1): a Structured Field
/// Dictionary (RFC 9651 §3.2), every line of it read as one. `None` — the
/// field is ignored as a whole, as if absent — when it is absent, empty,
/// does not parse, or gives a directive cachegate knows a value of the
/// wrong type (`max-age=?1`, `no-store=5`, `max-age=-1`, `max-age=1.5`):
/// RFC 9213 §2.1, "a cache that cannot parse it MUST ignore it"; then
/// the next field (or `Cache-Control`) applies. Known directives:
/// integers for the delta-seconds ones, booleans for the others; `?0`
/// means absent. `private` and `no-cache` may also carry a string or
/// inner list (the qualified forms of RFC 9111), read as their
/// unqualified, stricter forms as in `Cache-Control`. Parameters and
/// unknown directives are ignored.
pub fn targeted_field(headers: &HeaderMap, name: &str) -> Option<CacheControl> {
    let mut lines = Vec::new();
    for v in headers.get_all(name) {
        lines.push(v.to_str().ok()?);
    }
    let dict: sfv::Dictionary = sfv::Parser::new(&lines.join(",")).parse().ok()?;
    if dict.is_empty() {
        return None;
    }
    let mut cc = CacheControl::default();
    for (key, member) in &dict {
        let item = match member {
            sfv::ListEntry::Item(item) => Some(&item.bare_item),
            sfv::ListEntry::InnerList(_) => None,
        };
        let delta = || -> Option<u64> {
            let n = i64::from(item?.as_integer()?);
            Some(u64::try_from(n).ok()?.min(MAX_DELTA_SECONDS))
        };
        let flag = || item?.as_boolean();
        // The qualified forms: a String (RFC 9213 maps quoted-string to
        // String) or an inner list of them.
        let flag_or_qualified = || match item {
            None => Some(true),
            Some(b) if b.as_string().is_some() => Some(true),
            Some(b) => b.as_boolean(),
        };
        match key.as_str() {
            "max-age" => cc.max_age = Some(delta()?),
            "s-maxage" => cc.s_maxage = Some(delta()?),
            "stale-while-revalidate" => cc.stale_while_revalidate = Some(delta()?),
            "stale-if-error" => cc.stale_if_error = Some(delta()?),
            "no-store" => cc.no_store = flag()?,
            "no-cache" => cc.no_cache = flag_or_qualified()?,
            "private" => cc.private = flag_or_qualified()?,
            "public" => cc.public = flag()?,
            "must-revalidate" => cc.must_revalidate = flag()?,
            "proxy-revalidate" => cc.proxy_revalidate = flag()?,
            "must-understand" => cc.must_understand = flag()?,
            _ => {}
        }
    }
    Some(cc)
}

/// RFC 9213's field for every CDN-like cache the operator runs.
pub const CDN_CACHE_CONTROL: &str = "cdn-cache-control";
/// The RFC 9213 §2.1-style field for cachegate alone: obeyed, then removed
/// from what goes out.
pub const CACHEGATE_CACHE_CONTROL: &str = "cachegate-cache-control";

/// RFC 9111 §1.2.2: a delta-seconds value too large to represent, or any
/// calculation with it that would overflow, counts as 2^31 seconds.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// `1*DIGIT`, capped at [`MAX_DELTA_SECONDS`]; `None` when not digits.
pub(crate) fn delta_seconds(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u64>()
            .map_or(MAX_DELTA_SECONDS, |d| d.min(MAX_DELTA_SECONDS)),
    )
}

/// Whole milliseconds of a configured duration, saturating (a TTL of
/// centuries must not wrap around to a short one).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Conflicting duplicates: keep the smaller (fresher-for-less) value.
fn min_opt(old: Option<u64>, new: u64) -> u64 {
    old.map_or(new, |o| o.min(new))
}

/// Split on commas that are not inside a quoted string (a backslash
/// escapes the next character inside one); for rewriting a field member by
/// member, after [`CacheControl::parse_field`] has checked its syntax.
pub(crate) fn split_directives(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty())
}

static MALFORMED: AtomicU64 = AtomicU64::new(0);

/// How many malformed cache-directive values this process has read as
/// `no-store` (exported as the `cachegate_malformed_cache_control` metric).
pub fn malformed_count() -> u64 {
    MALFORMED.load(Ordering::Relaxed)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value as `(name, argument)` pairs, the argument of a quoted
/// string unescaped; `None` when it is not `#cache-directive`. Empty list
/// elements are allowed (RFC 9110 §5.6.1.2).
fn directives(value: &str) -> Option<Vec<(&str, Option<String>)>> {
    let b = value.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    loop {
        ows(&mut i);
        if i == b.len() {
            return Some(out);
        }
        if b[i] == b',' {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_tchar(b[i]) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let name = &value[start..i];
        let mut arg = None;
        if i < b.len() && b[i] == b'=' {
            i += 1;
            if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut text = String::new();
                loop {
                    match b.get(i)? {
                        b'"' => {
                            i += 1;
                            break;
                        }
                        b'\\' => {
                            let c = *b.get(i + 1)?;
                            if !(c == b'\t' || c == b' ' || c.is_ascii_graphic()) {
                                return None;
                            }
                            text.push(c as char);
                            i += 2;
                        }
                        &c if c == b'\t' || c == b' ' || c.is_ascii_graphic() => {
                            text.push(c as char);
                            i += 1;
                        }
                        _ => return None,
                    }
                }
                arg = Some(text);
            } else {
                let start = i;
                while i < b.len() && is_tchar(b[i]) {
                    i += 1;
                }
                if i == start {
                    return None;
                }
                arg = Some(value[start..i].to_owned());
            }
        }
        out.push((name, arg));
        ows(&mut i);
        match b.get(i) {
            None => return Some(out),
            Some(b',') => i += 1,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cc(v: &str) -> CacheControl {
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_str(v).unwrap());
        CacheControl::parse(&h)
    }

    #[test]
    fn malformed_lists_are_no_store() {
        let before = malformed_count();
        for v in [
            "private max-age=60",
            "max-age=60, private;",
            "max-age=60 public",
            "max-age=\"60",
            "max-age=, public",
            "=60",
            "max-age = 60",
            "public; max-age=60",
        ] {
            assert!(cc(v).no_store, "{v:?} was not read as no-store");
        }
        assert!(malformed_count() >= before + 8);
    }

    #[test]
    fn quoted_strings_with_escapes_keep_what_follows() {
        let c = cc(r#"ext="a\"b", private"#);
        assert!(c.private && !c.no_store, "{c:?}");
        let c = cc(r#"no-cache="set-cookie, x", max-age=60"#);
        assert!(c.no_cache && !c.no_store && c.max_age == Some(60), "{c:?}");
        let c = cc("max-age=60,, public ,");
        assert!(c.public && !c.no_store && c.max_age == Some(60), "{c:?}");
        let c = cc("MAX-AGE=5,PRIVATE");
        assert!(c.private && c.max_age == Some(5));
    }

    fn targeted(lines: &[&str]) -> Option<CacheControl> {
        let mut h = HeaderMap::new();
        for v in lines {
            h.append(CDN_CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        targeted_field(&h, CDN_CACHE_CONTROL)
    }

    /// RFC 9213 §2.1: a targeted field is a Structured Field Dictionary
    /// (RFC 9651 §3.2), ignored as a whole when it cannot be parsed or a
    /// directive has the wrong type.
    #[test]
    fn targeted_fields_are_structured_dictionaries() {
        let cc = targeted(&["max-age=60, stale-if-error=30", "public"]).unwrap();
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.stale_if_error, Some(30));
        assert!(cc.public && !cc.no_store);
        let cc = targeted(&["no-store, private=?0, x-ext=(a b);p=1"]).unwrap();
        assert!(cc.no_store && !cc.private, "?0 is absent");
        let cc = targeted(&[r#"private="set-cookie", no-cache=("a" "b")"#]).unwrap();
        assert!(
            cc.private && cc.no_cache,
            "qualified forms read unqualified"
        );
        assert_eq!(
            targeted(&["max-age=99999999999"]).unwrap().max_age,
            Some(MAX_DELTA_SECONDS)
        );
        for ignored in [
            "",
            "private max-age=60",
            "max-age=60;",
            "max-age=\"60\"",
            "max-age=60.5",
            "max-age=-1",
            "max-age=?1",
            "max-age=(60)",
            "no-store=5",
            "public=\"yes\"",
            "MAX-AGE=60",
            "max-age=60,,",
        ] {
            assert_eq!(targeted(&[ignored]), None, "{ignored:?}");
        }
        // Cache-Control syntax that is also a valid Dictionary reads the same.
        let cc = targeted(&["max-age=60, no-cache=\"a, b\""]).unwrap();
        assert!(cc.no_cache && cc.max_age == Some(60));
    }

    #[test]
    fn an_ignored_targeted_field_falls_back_to_cache_control() {
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static("max-age=30"));
        h.insert(CDN_CACHE_CONTROL, HeaderValue::from_static("max-age=?1"));
        assert!(!CacheControl::targeted(&h));
        assert_eq!(CacheControl::for_storing(&h).max_age, Some(30));
        h.insert(
            CACHEGATE_CACHE_CONTROL,
            HeaderValue::from_static("max-age=5"),
        );
        assert_eq!(CacheControl::for_storing(&h).max_age, Some(5));
        h.insert(
            CACHEGATE_CACHE_CONTROL,
            HeaderValue::from_static("max-age=5 x"),
        );
        h.insert(CDN_CACHE_CONTROL, HeaderValue::from_static("max-age=7"));
        assert_eq!(CacheControl::for_storing(&h).max_age, Some(7));
    }
}
