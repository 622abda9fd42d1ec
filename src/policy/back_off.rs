//! What an upstream answer says about calling the upstream again: a 429,
//! or a 503 with `Retry-After`, asks to hold off (RFC 6585 §4, RFC 9110
//! §10.2.3; whom it holds back, the guard decides from the request's
//! credentials); gateway failures (502, 503, 504, like timeouts) count
//! towards the breaker of the endpoint that answered. Other answers, a 500
//! among them, say nothing about the upstream: one request's error must
//! not stop calls to it. Pure code: the clock comes in.

use std::time::Duration;

use cachegate_store::UnixMillis;
use http::{HeaderMap, StatusCode};

use super::date::parse_http_date;

/// What one upstream answer (or failure) tells the guard in front of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// It answered for itself: neither a gateway failure nor a request to
    /// back off (a 500 is this request's error, not the upstream's state).
    Answered,
    /// A gateway failure (502, 503, 504), a timeout or no connection: one
    /// more towards the breaker.
    Failure,
    /// Hold off for this long (already capped), asked for with this status.
    BackOff { wait: Duration, status: u16 },
}

/// How long to hold off when the answer says so without a usable
/// `Retry-After`, and the most any `Retry-After` may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackOffRules {
    pub default_wait: Duration,
    pub max_wait: Duration,
}

/// Classify an upstream answer with `status` and `headers`, received at `now`.
pub fn signal_of(
    status: StatusCode,
    headers: &HeaderMap,
    now: UnixMillis,
    rules: BackOffRules,
) -> Signal {
    let asked = retry_after(headers, now);
    let wait = match (status, asked) {
        (StatusCode::TOO_MANY_REQUESTS, asked) => asked.unwrap_or(rules.default_wait),
        (StatusCode::SERVICE_UNAVAILABLE, Some(asked)) => asked,
        (s, _) if is_gateway_failure(s) => return Signal::Failure,
        _ => return Signal::Answered,
    };
    Signal::BackOff {
        wait: wait.min(rules.max_wait),
        status: status.as_u16(),
    }
}

/// 502, 503 and 504: the upstream (or the gateway in front of it) could
/// not answer, whatever was asked.
pub fn is_gateway_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// The wait a `Retry-After` asks for (RFC 9110 §10.2.3): delay-seconds or
/// an HTTP date (a date in the past asks for none). `None` when absent,
/// repeated with different values, or neither form: a malformed value is
/// no instruction, and the caller's default applies.
pub fn retry_after(headers: &HeaderMap, now: UnixMillis) -> Option<Duration> {
    let mut values = headers.get_all(http::header::RETRY_AFTER).iter();
    let first = values.next()?;
    if values.any(|v| v != first) {
        return None;
    }
    let v = first.to_str().ok()?.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Longer than any cap anyone would set: saturate rather than fail.
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs.min(u32::MAX as u64)));
    }
    let at = parse_http_date(v)?;
    Some(Duration::from_millis(at.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const NOW: UnixMillis = 1_700_000_000_000; // Tue, 14 Nov 2023 22:13:20 GMT
    const RULES: BackOffRules = BackOffRules {
        default_wait: Duration::from_secs(1),
        max_wait: Duration::from_secs(300),
    };

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(http::header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn sig(status: u16, values: &[&str]) -> Signal {
        signal_of(
            StatusCode::from_u16(status).unwrap(),
            &with(values),
            NOW,
            RULES,
        )
    }

    fn back_off(secs: u64, status: u16) -> Signal {
        Signal::BackOff {
            wait: Duration::from_secs(secs),
            status,
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(
            retry_after(&with(&["120"]), NOW),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(&with(&[" 0 "]), NOW), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&with(&["Tue, 14 Nov 2023 22:13:50 GMT"]), NOW),
            Some(Duration::from_secs(30))
        );
        // A date already past asks for no wait.
        assert_eq!(
            retry_after(&with(&["Tue, 14 Nov 2023 22:00:00 GMT"]), NOW),
            Some(Duration::ZERO)
        );
        // Absurdly large numbers saturate instead of being ignored.
        assert!(retry_after(&with(&["99999999999999999999999"]), NOW).unwrap() > RULES.max_wait);
    }

    #[test]
    fn malformed_retry_after_is_no_instruction() {
        for bad in ["", "-5", "1.5", "5s", "soon", "0x10", "+3"] {
            assert_eq!(retry_after(&with(&[bad]), NOW), None, "{bad:?}");
        }
        assert_eq!(
            retry_after(&with(&["5", "6"]), NOW),
            None,
            "conflicting values"
        );
        assert_eq!(
            retry_after(&with(&["5", "5"]), NOW),
            Some(Duration::from_secs(5))
        );
        assert_eq!(retry_after(&HeaderMap::new(), NOW), None);
    }

    #[test]
    fn statuses_classify() {
        assert_eq!(sig(200, &[]), Signal::Answered);
        assert_eq!(sig(304, &[]), Signal::Answered);
        assert_eq!(sig(404, &[]), Signal::Answered);
        // A Retry-After on a redirect or a 200 is not a request to back off.
        assert_eq!(sig(301, &["60"]), Signal::Answered);
        // One endpoint's error is not the upstream's state.
        assert_eq!(sig(500, &[]), Signal::Answered);
        assert_eq!(sig(501, &[]), Signal::Answered);
        assert_eq!(sig(502, &["10"]), Signal::Failure);
        assert_eq!(sig(504, &[]), Signal::Failure);
        assert_eq!(sig(503, &[]), Signal::Failure);
        assert_eq!(sig(503, &["10"]), back_off(10, 503));
        assert_eq!(sig(429, &["7"]), back_off(7, 429));
        // 429 without (or with an unreadable) Retry-After: the default wait.
        assert_eq!(sig(429, &[]), back_off(1, 429));
        assert_eq!(sig(429, &["later"]), back_off(1, 429));
        // 503 with an unreadable Retry-After is a plain failure.
        assert_eq!(sig(503, &["later"]), Signal::Failure);
    }

    #[test]
    fn waits_are_capped() {
        assert_eq!(sig(429, &["86400"]), back_off(300, 429));
        assert_eq!(
            sig(503, &["Fri, 01 Jan 2100 00:00:00 GMT"]),
            back_off(300, 503)
        );
    }
}
