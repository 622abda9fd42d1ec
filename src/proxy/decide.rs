//! The request flow's decisions, pure (no I/O, no clock: times come in).
//! Each phase of [`super::Proxy`]'s flow asks one of these and acts on its
//! typed answer, as pingora-cache's `revalidate_or_stale` and
//! `handle_stale_if_error` do; whether a response may be stored is
//! [`crate::policy::response_policy`]'s.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use cachegate_store::{Entry, UnixMillis};

use super::outcome::{Kind, Outcome, Refresh, UpstreamFailure};
use super::Stored;
use crate::policy;
use crate::upstream::{UpstreamBody, UpstreamError, UpstreamResponse};

/// What a lookup's result lets this request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HitDecision {
    /// Nothing stored: fetch.
    Miss,
    /// Stored for anonymous requests and not marked shareable; this
    /// request says who the client is (cookies, a credential) and its
    /// answer may be personal: pass it through.
    PersonalPass(policy::Personal),
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
    pub(super) shareable_only: Option<policy::Personal>,
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
    if let Some(personal) = facts.shareable_only {
        if !policy::explicitly_shareable(&stored.headers) {
            return HitDecision::PersonalPass(personal);
        }
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
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: UpstreamBody,
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
            body: UpstreamBody::Full(s.entry.body.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_code::ErrorCode;
    use crate::upstream::Hold;
    use bytes::Bytes;
    use http::HeaderValue;

    /// Stored at 0, fresh for 100 s, then 10 s of stale-while-revalidate
    /// and 60 s of stale-if-error.
    fn stored(headers: &[(&str, &str)]) -> Stored {
        Stored::read(Entry {
            status: 200,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body: Bytes::from_static(b"stored body"),
            born_at: 0,
            stored_at: 0,
            fresh_until: 100_000,
            stale_while_revalidate_until: 110_000,
            stale_if_error_until: 160_000,
            keep_until: 160_000,
            tags: vec!["url:/a".into()],
        })
    }

    fn facts(now: UnixMillis) -> HitFacts {
        HitFacts {
            now,
            shareable_only: None,
            background: true,
            refresh_ahead: 0.1,
        }
    }

    fn not_asked() -> bool {
        panic!("only an entry within stale-while-revalidate asks about fetches in flight")
    }

    #[test]
    fn fresh_entries_are_served_and_refreshed_ahead_in_their_last_part() {
        let s = stored(&[]);
        assert_eq!(
            serve_or_revalidate(Some(&s), facts(50_000), not_asked),
            HitDecision::Fresh {
                ttl: 50,
                refresh_ahead: false
            }
        );
        assert_eq!(
            serve_or_revalidate(Some(&s), facts(95_000), not_asked),
            HitDecision::Fresh {
                ttl: 5,
                refresh_ahead: true
            }
        );
        let nothing_after = HitFacts {
            background: false,
            ..facts(95_000)
        };
        assert_eq!(
            serve_or_revalidate(Some(&s), nothing_after, not_asked),
            HitDecision::Fresh {
                ttl: 5,
                refresh_ahead: false
            },
            "no refresh-ahead where nothing runs after the response"
        );
        assert_eq!(
            serve_or_revalidate(None, facts(0), not_asked),
            HitDecision::Miss
        );
    }

    #[test]
    fn stale_within_swr_is_served_while_one_refresh_runs() {
        let s = stored(&[]);
        assert_eq!(
            serve_or_revalidate(Some(&s), facts(105_000), || true),
            HitDecision::StaleWhileRevalidate(Refresh::InProgress)
        );
        assert_eq!(
            serve_or_revalidate(Some(&s), facts(105_000), || false),
            HitDecision::StaleWhileRevalidate(Refresh::Background)
        );
        let nothing_after = HitFacts {
            background: false,
            ..facts(105_000)
        };
        assert_eq!(
            serve_or_revalidate(Some(&s), nothing_after, || false),
            HitDecision::RefreshInline
        );
        // Past the window (the end is exclusive): revalidate first.
        for now in [110_000, 150_000] {
            assert_eq!(
                serve_or_revalidate(Some(&s), facts(now), not_asked),
                HitDecision::Revalidate,
                "{now}"
            );
        }
    }

    /// A request carrying cookies or a credential the route does not key
    /// on takes only answers marked shareable (RFC 9111 §3.5's rule for
    /// `Authorization`), and its pass says which it was.
    #[test]
    fn a_personal_request_takes_only_what_is_marked_shareable() {
        for personal in [policy::Personal::Cookie, policy::Personal::Credential] {
            let asked = HitFacts {
                shareable_only: Some(personal),
                ..facts(50_000)
            };
            let plain = stored(&[("cache-control", "max-age=100")]);
            assert_eq!(
                serve_or_revalidate(Some(&plain), asked, not_asked),
                HitDecision::PersonalPass(personal)
            );
            let past_swr = HitFacts {
                now: 150_000,
                ..asked
            };
            assert_eq!(
                serve_or_revalidate(Some(&plain), past_swr, not_asked),
                HitDecision::PersonalPass(personal),
                "not revalidated for it either"
            );
            for shareable in ["public, max-age=100", "s-maxage=100"] {
                let s = stored(&[("cache-control", shareable)]);
                assert!(
                    matches!(
                        serve_or_revalidate(Some(&s), asked, not_asked),
                        HitDecision::Fresh { .. }
                    ),
                    "{personal:?} {shareable}"
                );
            }
        }
    }

    fn answered(status: u16) -> Result<UpstreamResponse, UpstreamError> {
        Ok(UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new().into(),
        })
    }

    #[test]
    fn stale_if_error_answers_failures_within_its_window() {
        let s = stored(&[]).entry;
        let took = Duration::from_millis(7);
        let sie = |sent, at| stale_if_error(&s, &sent, at, took);
        let used = sie(answered(503), 130_000).expect("a 503 within the window");
        assert_eq!(
            used,
            Outcome::timed(
                took,
                Kind::StaleIfError {
                    stale_for: 30,
                    failure: UpstreamFailure::Status(503)
                }
            )
        );
        assert!(sie(answered(429), 130_000).is_some(), "429 refuses us");
        for status in [200, 304, 404] {
            assert_eq!(
                sie(answered(status), 130_000),
                None,
                "{status} is an answer"
            );
        }
        assert_eq!(sie(answered(503), 160_000), None, "past the window");
        let timeout = Err(UpstreamError::Timeout(Duration::from_secs(1)));
        assert_eq!(
            sie(timeout, 130_000).map(|o| o.kind),
            Some(Kind::StaleIfError {
                stale_for: 30,
                failure: UpstreamFailure::Error(ErrorCode::UpstreamTimeout)
            })
        );
        let held = Err(UpstreamError::Held {
            hold: Hold::BreakerOpen(crate::upstream::BreakerScope::Endpoint),
            retry_in: Duration::from_secs(5),
        });
        let used = sie(held, 130_000).expect("not asked, within the window");
        assert_eq!(
            used.kind,
            Kind::StaleIfError {
                stale_for: 30,
                failure: UpstreamFailure::NotAsked(Hold::BreakerOpen(
                    crate::upstream::BreakerScope::Endpoint
                ))
            }
        );
        assert_eq!(used.upstream_time, None, "the upstream was not waited for");
    }

    #[test]
    fn a_304_refreshes_the_stale_entry() {
        let s = stored(&[
            ("content-type", "application/json"),
            ("cache-control", "max-age=1"),
            ("etag", "\"a\""),
        ]);
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", HeaderValue::from_static("max-age=60"));
        headers.insert("content-length", HeaderValue::from_static("0"));
        let not_modified = UpstreamResponse {
            status: StatusCode::NOT_MODIFIED,
            headers,
            body: Bytes::new().into(),
        };
        let a = revalidate(not_modified, Some(&s));
        assert_eq!(a.status, StatusCode::OK);
        assert!(
            matches!(&a.body, UpstreamBody::Full(b) if b == &Bytes::from_static(b"stored body"))
        );
        assert_eq!(a.headers["cache-control"], "max-age=60", "the 304's wins");
        assert_eq!(a.headers["content-type"], "application/json", "kept");
        assert_eq!(a.headers["etag"], "\"a\"");
        assert!(a.headers.get("content-length").is_none(), "the 304's own");
        assert_eq!(a.inherited_tags, Some(vec!["url:/a".to_string()]));
        // Anything else, or a 304 with nothing to refresh, is itself.
        let fresh = revalidate(answered(200).unwrap(), Some(&s));
        assert_eq!((fresh.status, fresh.inherited_tags), (StatusCode::OK, None));
        assert_eq!(fresh.body.known_len(), Some(0));
        let bare = revalidate(answered(304).unwrap(), None);
        assert_eq!(bare.status, StatusCode::NOT_MODIFIED);
        assert_eq!(bare.inherited_tags, None);
    }

    #[test]
    fn tags_keep_room_for_the_route_and_the_url() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let route = strings(&["r1", "r2"]);
        // At most 5: 2 for the route, 1 for the URL, 2 surrogate keys.
        let tags = assemble_tags(strings(&["k1", "k2", "k3"]), &route, "url:/a".into(), 5);
        assert_eq!(tags, strings(&["k1", "k2", "r1", "r2", "url:/a"]));
        // Duplicates do not take room; a key that is also a route tag is one tag.
        let tags = assemble_tags(strings(&["k1", "k1", "r1"]), &route, "url:/a".into(), 5);
        assert_eq!(tags, strings(&["k1", "r1", "r2", "url:/a"]));
        // A cap below what the route needs keeps the route's and the URL's.
        let tags = assemble_tags(strings(&["k1"]), &route, "url:/a".into(), 1);
        assert_eq!(tags, strings(&["r1", "r2", "url:/a"]));
    }

    #[test]
    fn set_cookies_go_only_to_the_client_that_fetched() {
        let mut h = HeaderMap::new();
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        let own = own_set_cookies(&h, true);
        let values: Vec<_> = own.get_all("set-cookie").iter().collect();
        assert_eq!(values, ["a=1", "b=2"]);
        assert!(own_set_cookies(&h, false).is_empty(), "stored with them");
    }
}
