//! The outcome of one request: one typed value, decided where the request
//! flow decides it and rendered once, by [`Outcome::render`] into `X-Cache`,
//! `Cache-Status` (RFC 9211) and `Server-Timing`, and by [`Outcome::label`]
//! into the access log and the metrics. Nothing downstream parses headers
//! back.

use std::fmt::Write as _;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::error_code::ErrorCode;
use crate::policy::{Bypass, NotStorable};
use crate::upstream::Hold;

/// RFC 9211 `fwd`: why the upstream was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Nothing was stored for this request.
    UriMiss,
    /// The cache could not be asked (down, timed out, breaker open).
    Miss,
    /// A stored entry was stale.
    Stale,
}

impl Forward {
    pub fn as_str(self) -> &'static str {
        match self {
            Forward::UriMiss => "uri-miss",
            Forward::Miss => "miss",
            Forward::Stale => "stale",
        }
    }
}

/// How a miss was answered by a fetch that another request made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collapsed {
    /// Another request of this process fetched it.
    InProcess,
    /// Another instance held the fetch lock and stored it.
    OtherInstance,
    /// It was stored between this request's lookup and its fetch.
    StoredMeanwhile,
}

/// The refresh behind a stale-while-revalidate answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Another request (or instance) is refreshing.
    InProgress,
    /// This request started a background refresh (serve mode).
    Background,
}

/// What the upstream did when a stale entry answered instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// It answered with this (server error) status.
    Status(u16),
    /// It could not be reached or timed out: the error's code.
    Error(ErrorCode),
    /// It was not asked: its breaker is open, or it asked us to back off.
    NotAsked(Hold),
}

/// What happened to a request, cache-wise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Answered from a fresh entry with `ttl` seconds of freshness left.
    Hit { ttl: u64 },
    /// Answered stale within stale-while-revalidate, `stale_for` seconds
    /// past its freshness.
    StaleWhileRevalidate { stale_for: u64, refresh: Refresh },
    /// The upstream failed; answered stale within stale-if-error.
    StaleIfError {
        stale_for: u64,
        failure: UpstreamFailure,
    },
    /// A miss answered by another request's fetch.
    Collapsed { fwd: Forward, how: Collapsed },
    /// The upstream was asked and answered `status`.
    Fetched {
        fwd: Forward,
        status: u16,
        /// The answer was stored.
        stored: bool,
        /// A 304 refreshed the stale entry we held.
        revalidated: bool,
        /// The cache lookup failed (the answer says so).
        cache_down: bool,
        /// Why the answer was not stored, when policy refused it.
        not_stored: Option<NotStorable>,
    },
    /// The request did not use the cache; the upstream answered `status`.
    Bypass { status: u16, why: Bypass },
    /// The upstream could not be reached or timed out and nothing stale
    /// could answer: a JSON error. `fwd` is `None` for a bypassed request.
    UpstreamFailed {
        fwd: Option<Forward>,
        code: ErrorCode,
    },
    /// The upstream may not be called now (breaker open, or a back-off it
    /// asked for) and nothing stale could answer: 503 with `Retry-After`.
    /// `bypass` for a request that does not use the cache.
    Held { hold: Hold, bypass: bool },
    /// Refused before any cache or upstream work (e.g. `CONNECT`).
    Rejected,
    /// The answer could not be returned through Lambda (its payload
    /// limit, [`crate::lambda_payload::MAX_PAYLOAD_BYTES`]): the client got 502.
    /// `fwd` and `fwd_status` when the upstream was asked (`None`: from
    /// the cache); `bypass` for a request that does not use the cache.
    TooLargeForLambda {
        fwd: Option<Forward>,
        fwd_status: Option<u16>,
        bypass: bool,
    },
}

/// The outcome of one request and the time it spent waiting for the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub kind: Kind,
    /// Time spent waiting for the upstream, for `Server-Timing`.
    pub upstream_time: Option<Duration>,
}

impl Outcome {
    pub fn new(kind: Kind) -> Self {
        Outcome {
            kind,
            upstream_time: None,
        }
    }

    pub fn timed(upstream_time: Duration, kind: Kind) -> Self {
        Outcome {
            kind,
            upstream_time: Some(upstream_time),
        }
    }

    /// This outcome once its answer turned out too large to return through
    /// Lambda. Error answers (small JSON bodies) are left as they are.
    pub fn too_large_for_lambda(self) -> Outcome {
        let (fwd, fwd_status, bypass) = match self.kind {
            Kind::Fetched { fwd, status, .. } => (Some(fwd), Some(status), false),
            Kind::Collapsed { fwd, .. } => (Some(fwd), None, false),
            Kind::Bypass { status, .. } => (None, Some(status), true),
            Kind::Hit { .. } | Kind::StaleWhileRevalidate { .. } | Kind::StaleIfError { .. } => {
                (None, None, false)
            }
            Kind::UpstreamFailed { .. }
            | Kind::Held { .. }
            | Kind::Rejected
            | Kind::TooLargeForLambda { .. } => return self,
        };
        Outcome {
            kind: Kind::TooLargeForLambda {
                fwd,
                fwd_status,
                bypass,
            },
            ..self
        }
    }

    /// The `X-Cache` value; `None` for a request that was refused outright.
    pub fn x_cache(&self) -> Option<&'static str> {
        Some(match self.kind {
            Kind::Hit { .. } => "HIT",
            Kind::StaleWhileRevalidate { .. } | Kind::StaleIfError { .. } => "STALE",
            Kind::Fetched {
                revalidated: true, ..
            } => "HIT",
            Kind::Collapsed { .. } | Kind::Fetched { .. } => "MISS",
            Kind::UpstreamFailed { fwd: Some(_), .. } | Kind::Held { bypass: false, .. } => "MISS",
            Kind::TooLargeForLambda { bypass: true, .. } => "BYPASS",
            Kind::TooLargeForLambda { fwd: Some(_), .. } => "MISS",
            Kind::TooLargeForLambda { fwd: None, .. } => "HIT",
            Kind::Bypass { .. }
            | Kind::UpstreamFailed { fwd: None, .. }
            | Kind::Held { bypass: true, .. } => "BYPASS",
            Kind::Rejected => return None,
        })
    }

    /// The label of this outcome in the access log and the metrics:
    /// the `X-Cache` value, or `ERROR` for answers that are errors of ours.
    pub fn label(&self) -> &'static str {
        match self.kind {
            Kind::UpstreamFailed { .. }
            | Kind::Held { .. }
            | Kind::Rejected
            | Kind::TooLargeForLambda { .. } => "ERROR",
            _ => self.x_cache().unwrap_or("ERROR"),
        }
    }

    /// The RFC 9211 parameters after the cache's name; `None` when the
    /// request was refused outright.
    pub fn cache_status(&self) -> Option<String> {
        let mut s = String::with_capacity(64);
        s.push_str("cachegate; ");
        match self.kind {
            Kind::Hit { ttl } => {
                s.push_str("hit; ttl=");
                s.push_str(itoa::Buffer::new().format(ttl));
            }
            Kind::StaleWhileRevalidate { stale_for, refresh } => {
                let refresh = match refresh {
                    Refresh::InProgress => "refresh in progress",
                    Refresh::Background => "background refresh",
                };
                let _ = write!(
                    s,
                    "hit; ttl=-{stale_for}; detail=\"stale-while-revalidate; {refresh}\""
                );
            }
            Kind::StaleIfError { stale_for, failure } => {
                stale_if_error_status(&mut s, stale_for, failure)
            }
            Kind::Collapsed { fwd, how } => {
                let _ = write!(s, "fwd={}; collapsed", fwd.as_str());
                match how {
                    Collapsed::InProcess => {}
                    Collapsed::OtherInstance => s.push_str("; detail=other-instance"),
                    Collapsed::StoredMeanwhile => s.push_str("; detail=stored-meanwhile"),
                }
            }
            Kind::Fetched {
                fwd,
                status,
                stored,
                revalidated: _,
                cache_down,
                not_stored,
            } => {
                let _ = write!(s, "fwd={}; fwd-status={status}", fwd.as_str());
                if stored {
                    s.push_str("; stored");
                }
                if let Some(why) = not_stored {
                    let _ = write!(s, "; detail={}", why.as_str());
                } else if cache_down {
                    s.push_str("; detail=cache-unavailable");
                }
            }
            Kind::Bypass { status, why } => {
                let _ = write!(
                    s,
                    "fwd=bypass; fwd-status={status}; detail={}",
                    why.as_str()
                );
            }
            Kind::UpstreamFailed { fwd, code } => {
                let fwd = fwd.map_or("bypass", Forward::as_str);
                let _ = write!(s, "fwd={fwd}; detail={code}");
            }
            Kind::Held { hold, bypass: _ } => {
                // Neither a hit nor forwarded: only why.
                let _ = write!(s, "detail={}", hold.detail());
            }
            Kind::TooLargeForLambda {
                fwd,
                fwd_status,
                bypass,
            } => too_large_for_lambda_status(&mut s, fwd, fwd_status, bypass),
            Kind::Rejected => return None,
        }
        Some(s)
    }

    /// Write `X-Cache`, `Cache-Status` and `Server-Timing` (the cache
    /// lookup's time and backend when there was one, the upstream's time
    /// when it was called; one header value, since Lambda's response
    /// formats keep one value per name).
    pub fn render(&self, headers: &mut HeaderMap, lookup: Option<(Duration, &str)>) {
        if let Some(x) = self.x_cache() {
            headers.insert(X_CACHE, HeaderValue::from_static(x));
        }
        if let Some(v) = self.cache_status().and_then(header_value) {
            headers.insert(CACHE_STATUS, v);
        }
        let mut timing = String::with_capacity(64);
        if let Some((d, backend)) = lookup {
            timing.push_str("cache;dur=");
            push_ms(&mut timing, d);
            timing.push_str(";desc=\"");
            timing.push_str(backend);
            timing.push('"');
        }
        if let Some(d) = self.upstream_time {
            if !timing.is_empty() {
                timing.push_str(", ");
            }
            timing.push_str("upstream;dur=");
            push_ms(&mut timing, d);
        }
        if !timing.is_empty() {
            if let Some(v) = header_value(timing) {
                headers.insert(SERVER_TIMING, v);
            }
        }
    }
}

/// A header value that takes the string's buffer (`Bytes` from a `String`
/// copies nothing; `HeaderValue::from_str` would copy it), and accepts
/// what `from_str` accepts: visible ASCII, spaces and tabs.
fn header_value(s: String) -> Option<HeaderValue> {
    s.is_ascii()
        .then(|| HeaderValue::from_maybe_shared(bytes::Bytes::from(s)).ok())
        .flatten()
}

const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Milliseconds with three decimals (`0.412`), from whole microseconds:
/// formatting an `f64` with a precision cost more than the rest of the
/// header on every hit, and a `u128` with `{:03}` padding still 2,000
/// instructions; the decimals are three digits written out.
fn push_ms(out: &mut String, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    out.push_str(itoa::Buffer::new().format(micros / 1000));
    let frac = (micros % 1000) as u32;
    out.push('.');
    for digit in [frac / 100, frac / 10 % 10, frac % 10] {
        out.push(char::from(b'0' + digit as u8));
    }
}

/// `Cache-Status` of a stale-if-error answer: one `detail` per entry
/// (RFC 9211 §2), the stale use and, when the upstream did not answer, why.
fn stale_if_error_status(s: &mut String, stale_for: u64, failure: UpstreamFailure) {
    let _ = match failure {
        UpstreamFailure::Status(code) => write!(
            s,
            "fwd=stale; fwd-status={code}; ttl=-{stale_for}; detail=stale-if-error"
        ),
        UpstreamFailure::Error(code) => write!(
            s,
            "fwd=stale; ttl=-{stale_for}; detail=\"stale-if-error; {code}\""
        ),
        // Not forwarded: a hit on a stale entry, and why.
        UpstreamFailure::NotAsked(hold) => {
            write!(s, "hit; ttl=-{stale_for}; detail={}", hold.detail())
        }
    };
}

/// `Cache-Status` of an answer Lambda could not carry: what the cache
/// did (forwarded, bypassed, or a hit), then why the client got a 502.
fn too_large_for_lambda_status(
    s: &mut String,
    fwd: Option<Forward>,
    fwd_status: Option<u16>,
    bypass: bool,
) {
    match (fwd, bypass) {
        (Some(fwd), _) => {
            let _ = write!(s, "fwd={}; ", fwd.as_str());
        }
        (None, true) => s.push_str("fwd=bypass; "),
        (None, false) => s.push_str("hit; "),
    }
    if let Some(status) = fwd_status {
        let _ = write!(s, "fwd-status={status}; ");
    }
    s.push_str("detail=response_too_large_for_lambda");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_have_three_decimals() {
        for (micros, ms) in [
            (0, "0.000"),
            (7, "0.007"),
            (45, "0.045"),
            (999, "0.999"),
            (1_000, "1.000"),
            (12_050, "12.050"),
            (3_600_000_001, "3600000.001"),
        ] {
            let mut s = String::new();
            push_ms(&mut s, Duration::from_micros(micros));
            assert_eq!(s, ms);
        }
    }

    #[test]
    fn one_value_renders_every_header() {
        let o = Outcome::timed(
            Duration::from_millis(12),
            Kind::Fetched {
                fwd: Forward::UriMiss,
                status: 200,
                stored: true,
                revalidated: false,
                cache_down: false,
                not_stored: None,
            },
        );
        let mut h = HeaderMap::new();
        o.render(&mut h, Some((Duration::from_micros(412), "redis")));
        assert_eq!(h["x-cache"], "MISS");
        assert_eq!(
            h["cache-status"],
            "cachegate; fwd=uri-miss; fwd-status=200; stored"
        );
        assert_eq!(
            h["server-timing"],
            "cache;dur=0.412;desc=\"redis\", upstream;dur=12.000"
        );
        assert_eq!(o.label(), "MISS");
    }

    #[test]
    fn errors_carry_cache_status_and_label_error() {
        let o = Outcome::new(Kind::UpstreamFailed {
            fwd: Some(Forward::UriMiss),
            code: ErrorCode::UpstreamTimeout,
        });
        let mut h = HeaderMap::new();
        o.render(&mut h, None);
        assert_eq!(h["x-cache"], "MISS");
        assert_eq!(
            h["cache-status"],
            "cachegate; fwd=uri-miss; detail=upstream_timeout"
        );
        assert!(h.get("server-timing").is_none());
        assert_eq!(o.label(), "ERROR");
        let rejected = Outcome::new(Kind::Rejected);
        let mut h = HeaderMap::new();
        rejected.render(&mut h, None);
        assert!(h.is_empty());
    }

    #[test]
    fn stale_if_error_has_one_detail() {
        let render = |failure| {
            Outcome::new(Kind::StaleIfError {
                stale_for: 3,
                failure,
            })
            .cache_status()
            .unwrap()
        };
        let s = render(UpstreamFailure::Error(ErrorCode::UpstreamTimeout));
        assert_eq!(
            s,
            "cachegate; fwd=stale; ttl=-3; detail=\"stale-if-error; upstream_timeout\""
        );
        let s = render(UpstreamFailure::Status(503));
        assert_eq!(
            s,
            "cachegate; fwd=stale; fwd-status=503; ttl=-3; detail=stale-if-error"
        );
        for s in [
            s,
            render(UpstreamFailure::Error(ErrorCode::UpstreamUnreachable)),
        ] {
            assert_eq!(s.matches("detail=").count(), 1, "{s}");
        }
    }

    #[test]
    fn an_answer_too_large_for_lambda_is_an_error_that_says_what_the_cache_did() {
        let fetched = Outcome::new(Kind::Fetched {
            fwd: Forward::UriMiss,
            status: 200,
            stored: false,
            revalidated: false,
            cache_down: false,
            not_stored: Some(NotStorable::TooLarge),
        })
        .too_large_for_lambda();
        assert_eq!(fetched.x_cache(), Some("MISS"));
        assert_eq!(fetched.label(), "ERROR");
        assert_eq!(
            fetched.cache_status().unwrap(),
            "cachegate; fwd=uri-miss; fwd-status=200; detail=response_too_large_for_lambda"
        );
        let hit = Outcome::new(Kind::Hit { ttl: 5 }).too_large_for_lambda();
        assert_eq!(hit.x_cache(), Some("HIT"));
        assert_eq!(
            hit.cache_status().unwrap(),
            "cachegate; hit; detail=response_too_large_for_lambda"
        );
        let bypass = Outcome::new(Kind::Bypass {
            status: 200,
            why: Bypass::Method,
        })
        .too_large_for_lambda();
        assert_eq!(bypass.x_cache(), Some("BYPASS"));
        assert_eq!(
            bypass.cache_status().unwrap(),
            "cachegate; fwd=bypass; fwd-status=200; detail=response_too_large_for_lambda"
        );
    }

    #[test]
    fn a_revalidated_entry_is_a_hit() {
        let o = Outcome::new(Kind::Fetched {
            fwd: Forward::Stale,
            status: 304,
            stored: true,
            revalidated: true,
            cache_down: false,
            not_stored: None,
        });
        assert_eq!(o.x_cache(), Some("HIT"));
    }
}
