//! What an upstream answer announces about its request quota, so calls can
//! be held to it before the upstream has to say 429. Three spellings are
//! read, the first present wins:
//!
//! - `RateLimit` (IETF HTTPAPI draft, draft-ietf-httpapi-ratelimit-headers
//!   -08 and later): a Structured Field List of quota policies, each an
//!   Item (the policy's name) with `r` (requests remaining) and `t`
//!   (seconds until the quota resets); `RateLimit-Policy` names each
//!   policy's quota `q` and window `w`.
//! - The earlier drafts' `RateLimit-Remaining` and `RateLimit-Reset`
//!   (delta seconds), with `RateLimit-Limit`.
//! - The widespread `X-RateLimit-Remaining` and `X-RateLimit-Reset`, with
//!   `X-RateLimit-Limit`. Their reset is delta seconds, Unix seconds (GitHub)
//!   or Unix milliseconds, told apart by size.
//!
//! Malformed values are ignored (the answer then announces nothing): a
//! quota misread would hold calls back for no reason. Pure code: the clock
//! comes in.

use std::time::Duration;

use cachegate_store::UnixMillis;
use http::HeaderMap;

/// Longest reset honoured: a quota announced to reset further out is read
/// as resetting in this long (a misconfigured upstream must not silence
/// calls for days).
pub const MAX_RESET: Duration = Duration::from_secs(3600);

/// A quota as one answer announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// Requests left before the quota resets.
    pub remaining: u64,
    /// Until the quota resets (at most [`MAX_RESET`]).
    pub reset_in: Duration,
    /// The quota per window, when announced.
    pub limit: Option<u64>,
}

impl Announced {
    /// The steady rate that spends what is left by the reset: requests
    /// a second.
    pub fn rate_per_second(&self) -> f64 {
        self.remaining as f64 / self.reset_in.as_secs_f64().max(1.0)
    }
}

/// The quota `headers` announce, received at `now`; with several policies
/// (the draft's list), the one that allows the lowest rate until its reset.
pub fn announced(headers: &HeaderMap, now: UnixMillis) -> Option<Announced> {
    if headers.contains_key("ratelimit") {
        return structured(headers);
    }
    let pair = |remaining: &str, reset: &str, limit: &str| -> Option<Announced> {
        let remaining = integer(headers, remaining)?;
        let reset = integer(headers, reset)?;
        Some(Announced {
            remaining,
            reset_in: reset_in(reset, now)?,
            limit: integer(headers, limit),
        })
    };
    if headers.contains_key("ratelimit-remaining") {
        return pair("ratelimit-remaining", "ratelimit-reset", "ratelimit-limit").map(|mut a| {
            // The earlier drafts' reset is always delta seconds.
            a.reset_in = Duration::from_secs(integer(headers, "ratelimit-reset").unwrap_or(0))
                .min(MAX_RESET);
            a
        });
    }
    pair(
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-limit",
    )
}

/// The first integer of a header (`100`, or `100, 100;w=60` as some
/// `RateLimit-Limit` values list policies); `None` when absent or not one.
fn integer(headers: &HeaderMap, name: &str) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?;
    let first = v.split([',', ';']).next()?.trim();
    first.parse().ok()
}

/// A reset value as delta seconds, Unix seconds or Unix milliseconds.
fn reset_in(value: u64, now: UnixMillis) -> Option<Duration> {
    const UNIX_SECONDS: u64 = 1_000_000_000; // 2001: no delta is this long
    const UNIX_MILLIS: u64 = 1_000_000_000_000;
    let ms = if value >= UNIX_MILLIS {
        value.saturating_sub(now)
    } else if value >= UNIX_SECONDS {
        (value * 1000).saturating_sub(now)
    } else {
        value.saturating_mul(1000)
    };
    Some(Duration::from_millis(ms).min(MAX_RESET))
}

/// The draft's `RateLimit` list, with `RateLimit-Policy` for the limits.
fn structured(headers: &HeaderMap) -> Option<Announced> {
    let list = |name: &str| -> Option<sfv::List> {
        let mut lines = Vec::new();
        for v in headers.get_all(name) {
            lines.push(v.to_str().ok()?);
        }
        sfv::Parser::new(&lines.join(",")).parse().ok()
    };
    let policies = list("ratelimit-policy").unwrap_or_default();
    let limit_of = |name: &sfv::BareItem| -> Option<u64> {
        policies.iter().find_map(|entry| match entry {
            sfv::ListEntry::Item(item) if &item.bare_item == name => {
                let q = i64::from(item.params.get("q")?.as_integer()?);
                u64::try_from(q).ok()
            }
            _ => None,
        })
    };
    let mut tightest: Option<Announced> = None;
    for entry in list("ratelimit")? {
        let sfv::ListEntry::Item(item) = entry else {
            return None;
        };
        let param = |key: &str| -> Option<u64> {
            u64::try_from(i64::from(item.params.get(key)?.as_integer()?)).ok()
        };
        let remaining = param("r")?;
        let reset = param("t")?;
        let a = Announced {
            remaining,
            reset_in: Duration::from_secs(reset).min(MAX_RESET),
            limit: limit_of(&item.bare_item),
        };
        if tightest.is_none_or(|t| a.rate_per_second() < t.rate_per_second()) {
            tightest = Some(a);
        }
    }
    tightest
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = 1_700_000_000_000;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn read(pairs: &[(&str, &str)]) -> Option<Announced> {
        announced(&headers(pairs), NOW)
    }

    #[test]
    fn the_drafts_structured_fields() {
        let a = read(&[
            (
                "RateLimit-Policy",
                r#""burst";q=100;w=60, "daily";q=1000;w=86400"#,
            ),
            ("RateLimit", r#""burst";r=40;t=30, "daily";r=5;t=40000"#),
        ])
        .unwrap();
        // daily: 5 left over an hour (capped) is the lower rate.
        assert_eq!(a.remaining, 5);
        assert_eq!(a.reset_in, MAX_RESET);
        assert_eq!(a.limit, Some(1000));
        let a = read(&[("RateLimit", r#"default;r=0;t=12"#)]).unwrap();
        assert_eq!(
            (a.remaining, a.reset_in, a.limit),
            (0, Duration::from_secs(12), None)
        );
        // Malformed or missing parameters: nothing announced.
        for bad in [
            r#""p";r=5"#,
            r#""p";r=-1;t=5"#,
            r#""p";r=5;t=1.5"#,
            "(a b);r=1;t=1",
            "r=5, t=",
        ] {
            assert_eq!(read(&[("RateLimit", bad)]), None, "{bad}");
        }
    }

    #[test]
    fn the_earlier_drafts_and_the_x_headers() {
        let a = read(&[
            ("RateLimit-Limit", "100, 100;w=60"),
            ("RateLimit-Remaining", "7"),
            ("RateLimit-Reset", "20"),
        ])
        .unwrap();
        assert_eq!(
            (a.remaining, a.reset_in, a.limit),
            (7, Duration::from_secs(20), Some(100))
        );
        // X-RateLimit-Reset as delta seconds, Unix seconds, Unix millis.
        for (reset, secs) in [("30", 30), ("1700000045", 45), ("1700000050000", 50)] {
            let a = read(&[
                ("X-RateLimit-Limit", "60"),
                ("X-RateLimit-Remaining", "3"),
                ("X-RateLimit-Reset", reset),
            ])
            .unwrap();
            assert_eq!(a.reset_in, Duration::from_secs(secs), "{reset}");
            assert_eq!((a.remaining, a.limit), (3, Some(60)));
        }
        // A reset in the past is now; a far one is capped.
        let a = read(&[
            ("X-RateLimit-Remaining", "0"),
            ("X-RateLimit-Reset", "1600000000"),
        ])
        .unwrap();
        assert_eq!(a.reset_in, Duration::ZERO);
        let a = read(&[
            ("X-RateLimit-Remaining", "0"),
            ("X-RateLimit-Reset", "999999"),
        ])
        .unwrap();
        assert_eq!(a.reset_in, MAX_RESET);
        // Either half missing or not a number: nothing.
        assert_eq!(read(&[("X-RateLimit-Remaining", "3")]), None);
        assert_eq!(
            read(&[("X-RateLimit-Remaining", "x"), ("X-RateLimit-Reset", "3")]),
            None
        );
        assert_eq!(read(&[]), None);
    }

    #[test]
    fn the_rate_spends_what_is_left_by_the_reset() {
        let a = Announced {
            remaining: 10,
            reset_in: Duration::from_secs(5),
            limit: None,
        };
        assert_eq!(a.rate_per_second(), 2.0);
        let soon = Announced {
            remaining: 3,
            reset_in: Duration::from_millis(200),
            limit: None,
        };
        assert_eq!(
            soon.rate_per_second(),
            3.0,
            "a reset under a second counts as one"
        );
    }
}
