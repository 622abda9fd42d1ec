//! The request flow's decisions, pure (no I/O, no clock: times come in).
//! Each phase of [`super::Proxy`]'s flow asks one of these and acts on its
//! typed answer, as pingora-cache's `revalidate_or_stale` and
//! `handle_stale_if_error` do; whether a response may be stored is
//! [`crate::policy::response_policy`]'s.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use cachegate_store::{Entry, UnixMillis};

use super::outcome::{Kind, Outcome, Refresh, UpstreamFailure};
use super::Stored;
use crate::policy;
use crate::upstream::{UpstreamError, UpstreamResponse};

/// What a lookup's result lets this request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HitDecision {
    /// Nothing stored: fetch.
    Miss,
    /// Stored for requests without cookies and not marked shareable; this
    /// request carries cookies and may be personal: pass it through.
    CookiePass,
    /// Fresh: answer it, `ttl` seconds of freshness left; `refresh_ahead`
    /// when the hit falls in the last part of its freshness.
    Fresh { ttl: u64, refresh_ahead: bool },
    /// Stale within stale-while-revalidate: answer stale; the refresh is
    /// another request's, or one started after this response.
    StaleWhileRevalidate(Refresh),
    /// Stale within stale-while-revalidate where nothing may run after the
    /// response: this request refreshes inline, and answers stale if
    /// another instance holds the fetch lock.
    RefreshInline,
    /// Past its stale windows: revalidate (or refetch) before answering.
    Revalidate,
}

/// What [`serve_or_revalidate`] weighs besides the entry.
#[derive(Debug, Clone, Copy)]
pub(super) struct HitFacts {
    pub(super) now: UnixMillis,
    /// The request may only take answers marked shareable
    /// ([`policy::RequestPolicy::shareable_only`]).
    pub(super) shareable_only: bool,
    /// Work can run after the response (`Background::available`).
    pub(super) background: bool,
    /// `cache.refresh_ahead`.
    pub(super) refresh_ahead: f64,
}

/// Fresh, stale within stale-while-revalidate, or to be revalidated.
/// `fetching` says whether this process is already fetching the key; it
/// is asked only for an entry within stale-while-revalidate.
pub(super) fn serve_or_revalidate(
    stored: Option<&Stored>,
    facts: HitFacts,
    fetching: impl FnOnce() -> bool,
) -> HitDecision {
    let Some(stored) = stored else {
        return HitDecision::Miss;
    };
    if facts.shareable_only && !policy::explicitly_shareable(&stored.headers) {
        return HitDecision::CookiePass;
    }
    let (entry, now) = (&stored.entry, facts.now);
    if entry.is_fresh(now) {
        let refresh_ahead = facts.background
            && policy::response::refresh_ahead_due(
                entry.stored_at,
                entry.fresh_until,
                now,
                facts.refresh_ahead,
            );
        return HitDecision::Fresh {
            ttl: entry.fresh_secs_left(now),
            refresh_ahead,
        };
    }
    if now < entry.stale_while_revalidate_until {
        return if fetching() {
            HitDecision::StaleWhileRevalidate(Refresh::InProgress)
        } else if facts.background {
            HitDecision::StaleWhileRevalidate(Refresh::Background)
        } else {
            HitDecision::RefreshInline
        };
    }
    HitDecision::Revalidate
}

/// Whether the upstream failed (a server error, a 429 refusing us, no
/// answer, or not asked at all) while `stale` may still hide failures
/// (stale-if-error, RFC 5861 §4): then the outcome it is answered with.
pub(super) fn stale_if_error(
    stale: &Entry,
    sent: &Result<UpstreamResponse, UpstreamError>,
    response_time: UnixMillis,
    upstream_time: Duration,
) -> Option<Outcome> {
    let failed = match sent {
        Ok(r) => r.status.is_server_error() || r.status == StatusCode::TOO_MANY_REQUESTS,
        Err(_) => true,
    };
    if !failed || response_time >= stale.stale_if_error_until {
        return None;
    }
    let stale_for = response_time.saturating_sub(stale.fresh_until) / 1000;
    let kind = |failure| Kind::StaleIfError { stale_for, failure };
    Some(match sent {
        Ok(r) => Outcome::timed(
            upstream_time,
            kind(UpstreamFailure::Status(r.status.as_u16())),
        ),
        Err(UpstreamError::Held { hold, .. }) => {
            Outcome::new(kind(UpstreamFailure::NotAsked(*hold)))
        }
        Err(e) => Outcome::timed(upstream_time, kind(UpstreamFailure::Error(e.code()))),
    })
}

/// The upstream's answer as it will be stored or relayed.
#[derive(Debug, Clone)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// The revalidated entry's tags, when a 304 refreshed it.
    pub(super) inherited_tags: Option<Vec<String>>,
}

/// A 304 to our conditional request refreshes the stale entry (RFC 9111
/// §4.3.4): its status and body, its headers updated with the 304's.
/// Anything else is the answer itself.
pub(super) fn revalidate(resp: UpstreamResponse, stale: Option<&Stored>) -> Answer {
    match stale {
        Some(s) if resp.status == StatusCode::NOT_MODIFIED => Answer {
            status: StatusCode::from_u16(s.entry.status).unwrap_or(StatusCode::OK),
            headers: policy::conditional::merge_not_modified(s.headers.clone(), &resp.headers),
            body: s.entry.body.clone(),
            inherited_tags: Some(s.entry.tags.clone()),
        },
        _ => Answer {
            status: resp.status,
            headers: resp.headers,
            body: resp.body,
            inherited_tags: None,
        },
    }
}

/// An entry's tags: `tags` (inherited and the upstream's surrogate keys)
/// capped at `max` with room left for the route's tags and the URL tag,
/// which purging by URL needs; then those; sorted, without duplicates.
pub(super) fn assemble_tags(
    mut tags: Vec<String>,
    route_tags: &[String],
    url_tag: String,
    max: usize,
) -> Vec<String> {
    policy::headers::cap_tags(&mut tags, max, route_tags.len() + 1);
    tags.extend(route_tags.iter().cloned());
    tags.push(url_tag);
    tags.sort();
    tags.dedup();
    tags
}

/// The `Set-Cookie` fields of an answer stored without them: they go to
/// the client whose request fetched it, never into the stored copy.
pub(super) fn own_set_cookies(headers: &HeaderMap, stored_without: bool) -> HeaderMap {
    let mut own = HeaderMap::new();
    if stored_without {
        for v in headers.get_all(http::header::SET_COOKIE) {
            own.append(http::header::SET_COOKIE, v.clone());
        }
    }
    own
}
