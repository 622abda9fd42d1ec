//! The upstream call for a miss (conditional when a stale entry has
//! validators) and storing what policy says may be stored.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use cachegate_store::{now_millis, Entry, Record, StoreError, StoreKey, UnixMillis, VaryIndex};

use super::guard::Caller;
use super::outcome::{Forward, Kind, Outcome, UpstreamFailure};
use super::{Fetched, Proxy};
use crate::key::{self, Target};
use crate::policy::{self, NotStorable, RequestPolicy, ResponseFacts};
use crate::routes::Rule;
use crate::upstream::{UpstreamError, UpstreamResponse};

/// Everything a fetch needs to know about the request it serves.
#[derive(Debug, Clone)]
pub(super) struct MissCtx {
    pub(super) primary: StoreKey,
    pub(super) target: Target,
    pub(super) method: Method,
    pub(super) headers: HeaderMap,
    pub(super) rule: Arc<Rule>,
    pub(super) policy: RequestPolicy,
    /// RFC 9211 `fwd` value: why the upstream is asked.
    pub(super) fwd: Forward,
    pub(super) cache_down: bool,
    /// When the request arrived (after its lookup).
    pub(super) arrived_at: UnixMillis,
    /// A client waits for the request budget; a background refresh does not.
    pub(super) caller: Caller,
}

impl MissCtx {
    /// Whether an entry that turned up while this miss waited, or just
    /// before it fetched, may answer it: one stored after the stale entry
    /// it started from (any, without one); for a request that may not be
    /// answered from what was stored before it (a client `no-cache` the
    /// route honours), one stored after it arrived.
    pub(super) fn may_take(&self, entry: &Entry, stale: Option<&Entry>) -> bool {
        if !self.policy.lookup {
            return entry.stored_at >= self.arrived_at;
        }
        stale.is_none_or(|s| entry.stored_at > s.stored_at)
    }
}

impl Proxy {
    /// Call the upstream (conditionally if we hold a stale entry with
    /// validators) and store what may be stored.
    pub(super) async fn fetch(
        &self,
        miss: &MissCtx,
        stale: Option<Entry>,
    ) -> Result<Fetched, UpstreamError> {
        let MissCtx {
            primary,
            target,
            method,
            headers: client_headers,
            rule,
            policy,
            fwd,
            cache_down,
            arrived_at: _,
            caller,
        } = miss;
        let (policy, cache_down) = (*policy, *cache_down);
        let mut headers = client_headers.clone();
        policy::headers::prepare_request_headers(&mut headers);
        policy::headers::strip_unkeyed_routing_headers(&mut headers, &rule.key_headers);
        // We answer the client's conditionals ourselves; upstream gets ours.
        policy::conditional::upstream_conditionals(&mut headers, stale.as_ref());
        let request_time = now_millis();
        let sent_at = std::time::Instant::now();
        // The upstream may be off limits (its breaker open, a back-off it
        // asked for, the budget spent): then it is not called at all.
        let sent = self
            .send_upstream(
                method.clone(),
                target.url.clone(),
                headers,
                Bytes::new(),
                *caller,
            )
            .await;
        let response_time = now_millis();
        let upstream_time = sent_at.elapsed();
        // 6. Upstream failed, refused us (429), or may not be called: a
        // stale entry within stale-if-error answers. Otherwise an error is
        // relayed, or, a server error with explicit freshness, stored like
        // any answer (RFC 9111 §3).
        let failed = match &sent {
            Ok(r) => r.status.is_server_error() || r.status == StatusCode::TOO_MANY_REQUESTS,
            Err(_) => true,
        };
        let stale = match stale {
            Some(s) if failed && response_time < s.stale_if_error_until => {
                let stale_for = response_time.saturating_sub(s.fresh_until) / 1000;
                let outcome = match &sent {
                    Ok(r) => Outcome::timed(
                        upstream_time,
                        Kind::StaleIfError {
                            stale_for,
                            failure: UpstreamFailure::Status(r.status.as_u16()),
                        },
                    ),
                    Err(UpstreamError::Held { hold, .. }) => Outcome::new(Kind::StaleIfError {
                        stale_for,
                        failure: UpstreamFailure::NotAsked(*hold),
                    }),
                    Err(e) => Outcome::timed(
                        upstream_time,
                        Kind::StaleIfError {
                            stale_for,
                            failure: UpstreamFailure::Error(e.code()),
                        },
                    ),
                };
                return Ok(Fetched::Entry(Arc::new(s), outcome));
            }
            other => other,
        };
        let resp = sent?;

        // A 304 to our conditional request refreshes the stale entry its
        // validator selects (RFC 9111 §4.3.4); one naming another
        // validator is about another representation: ask again, without
        // a condition, for the whole of it.
        let stored_headers = stale.as_ref().map(super::respond::header_map_of);
        if let (StatusCode::NOT_MODIFIED, Some(stored)) = (resp.status, &stored_headers) {
            if !policy::conditional::not_modified_selects(stored, &resp.headers) {
                return Box::pin(self.fetch(miss, None)).await;
            }
        }
        let (status, mut resp_headers, body, inherited_tags) = match (resp.status, stale) {
            (StatusCode::NOT_MODIFIED, Some(s)) => {
                let merged = policy::conditional::merge_not_modified(
                    stored_headers.unwrap_or_default(),
                    &resp.headers,
                );
                (
                    StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK),
                    merged,
                    s.body.clone(),
                    Some(s.tags),
                )
            }
            _ => (resp.status, resp.headers.clone(), resp.body.clone(), None),
        };
        let revalidated = inherited_tags.is_some();
        let mut tags = inherited_tags.unwrap_or_default();
        tags.extend(policy::headers::surrogate_keys(
            &resp_headers,
            &self.settings.surrogate_key_headers,
        ));
        policy::headers::hide_surrogate_keys(
            &mut resp_headers,
            &self.settings.surrogate_key_headers,
            self.settings.expose_surrogate_keys,
        );

        let storable = if *method == Method::HEAD {
            Err(NotStorable::Head)
        } else if !policy.store {
            Err(NotStorable::ClientNoStore)
        } else if policy.shareable_only && !policy::explicitly_shareable(&resp_headers) {
            Err(NotStorable::Cookie)
        } else if self.settings.mode == crate::config::Mode::Lambda
            && !crate::lambda::entry_fits(&resp_headers, &body)
        {
            // Lambda could never return it.
            Err(NotStorable::TooLarge)
        } else {
            policy::response_policy(
                ResponseFacts {
                    status,
                    headers: &resp_headers,
                    body_len: body.len(),
                    request_time,
                    response_time,
                },
                rule,
            )
        };
        let fwd_status = resp.status.as_u16();
        let mut freshness = match storable {
            Ok(f) => f,
            Err(why) => {
                let outcome = Outcome::timed(
                    upstream_time,
                    Kind::Fetched {
                        fwd: *fwd,
                        status: fwd_status,
                        stored: false,
                        revalidated,
                        cache_down,
                        not_stored: Some(why),
                    },
                );
                return Ok(Fetched::Relay(
                    UpstreamResponse {
                        status,
                        headers: resp_headers,
                        body,
                    },
                    outcome,
                ));
            }
        };

        if self.settings.ttl_jitter > 0.0 {
            policy::response::jitter_freshness(
                &mut freshness,
                response_time,
                self.settings.ttl_jitter,
                fastrand::f64(),
            );
        }
        policy::headers::cap_tags(
            &mut tags,
            self.settings.max_tags_per_entry,
            rule.tags.len() + 1,
        );
        tags.extend(rule.tags.iter().cloned());
        tags.push(target.url_tag());
        tags.sort();
        tags.dedup();
        // The cookie goes to the client whose request fetched it, never
        // into the stored copy.
        let mut own = HeaderMap::new();
        if freshness.strip_set_cookie {
            for v in resp_headers.get_all(http::header::SET_COOKIE) {
                own.append(http::header::SET_COOKIE, v.clone());
            }
        }
        let entry = Entry {
            status: status.as_u16(),
            headers: policy::headers::stored_headers(&resp_headers, freshness.strip_set_cookie),
            body,
            born_at: freshness.born_at,
            stored_at: response_time,
            fresh_until: freshness.fresh_until,
            stale_while_revalidate_until: freshness.stale_while_revalidate_until,
            stale_if_error_until: freshness.stale_if_error_until,
            keep_until: freshness.keep_until,
            tags,
        };
        let vary = key::vary_names(&resp_headers).unwrap_or_default();
        let stored = if self.purged_since(&entry.tags, request_time).await {
            // A purge ran while this response was on its way: it may be
            // older than what the purge made room for.
            false
        } else {
            self.store(primary, &vary, client_headers, &entry).await
        };
        let outcome = Outcome::timed(
            upstream_time,
            Kind::Fetched {
                fwd: *fwd,
                status: fwd_status,
                stored,
                revalidated,
                cache_down,
                not_stored: None,
            },
        );
        if own.is_empty() {
            Ok(Fetched::Entry(Arc::new(entry), outcome))
        } else {
            Ok(Fetched::Own(Arc::new(entry), outcome, own))
        }
    }

    /// Whether any of `tags` was purged at or after `since` (the purge
    /// marks live as long as a fetch lock, the longest a fetch can take).
    pub(super) async fn purged_since(&self, tags: &[String], since: UnixMillis) -> bool {
        for tag in tags {
            if let Some(Record::PurgeMark(m)) = self
                .cache
                .get(&super::purge::purge_mark_key(tag))
                .await
                .record
            {
                if m.purged_at >= since {
                    return true;
                }
            }
        }
        false
    }

    /// Write the entry (and a Vary index when it varies). Failures are
    /// logged and counted; the response goes out regardless.
    pub(super) async fn store(
        &self,
        primary: &StoreKey,
        vary: &[String],
        client_headers: &HeaderMap,
        entry: &Entry,
    ) -> bool {
        let key = if vary.is_empty() {
            primary.clone()
        } else {
            let index = Record::VaryIndex(VaryIndex {
                headers: vary.to_vec(),
                expires_at: entry.expires_at(),
            });
            if let Err(e) = self.cache.put(primary, &index).await {
                tracing::warn!(error = %e, "storing the Vary index failed");
                return false;
            }
            key::variant_key(primary, vary, client_headers)
        };
        match self.cache.put(&key, &Record::Entry(entry.clone())).await {
            Ok(()) => true,
            Err(e @ StoreError::CircuitOpen { .. }) => {
                tracing::debug!(error = %e, "not stored: cache skipped");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "storing the response failed; served without caching");
                false
            }
        }
    }
}
