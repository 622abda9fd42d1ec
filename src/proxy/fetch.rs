//! The upstream call for a miss (conditional when a stale entry has
//! validators) and storing what policy says may be stored.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use cachegate_store::{now_millis, Entry, Record, StoreError, StoreKey, UnixMillis, VaryIndex};

use super::decide::{self, Answer};
use super::guard::Caller;
use super::outcome::{Forward, Kind, Outcome};
use super::{Fetched, Proxy, Stored};
use crate::key::{self, Target};
use crate::policy::{self, Freshness, NotStorable, RequestPolicy, ResponseFacts};
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
    pub(super) fn may_take(&self, found: &Stored, stale: Option<&Stored>) -> bool {
        if !self.policy.lookup {
            return found.entry.stored_at >= self.arrived_at;
        }
        stale.is_none_or(|s| found.entry.stored_at > s.entry.stored_at)
    }
}

/// One exchange with the upstream, timed.
struct Exchange {
    /// What the upstream said: `status` is what it answered, before a 304
    /// became the entry it refreshed.
    status: u16,
    revalidated: bool,
    /// When the request was sent and the response received (RFC 9111 §4.2.3).
    request_time: UnixMillis,
    response_time: UnixMillis,
    upstream_time: Duration,
}

impl Exchange {
    fn outcome(&self, miss: &MissCtx, stored: bool, not_stored: Option<NotStorable>) -> Outcome {
        Outcome::timed(
            self.upstream_time,
            Kind::Fetched {
                fwd: miss.fwd,
                status: self.status,
                stored,
                revalidated: self.revalidated,
                cache_down: miss.cache_down,
                not_stored,
            },
        )
    }
}

impl Proxy {
    /// Call the upstream (conditionally if we hold a stale entry with
    /// validators); answer stale if it failed and stale-if-error allows;
    /// otherwise store what policy says may be stored.
    pub(super) async fn fetch(
        &self,
        miss: &MissCtx,
        stale: Option<Arc<Stored>>,
    ) -> Result<Fetched, UpstreamError> {
        let mut headers = miss.headers.clone();
        policy::headers::prepare_request_headers(&mut headers);
        policy::headers::strip_unkeyed_routing_headers(
            &mut headers,
            &self.settings.routing_headers,
            &miss.rule.key_headers,
        );
        // We answer the client's conditionals ourselves; upstream gets ours.
        policy::conditional::upstream_conditionals(
            &mut headers,
            stale.as_deref().map(|s| &s.entry),
        );
        let request_time = now_millis();
        let sent_at = std::time::Instant::now();
        // The upstream may be off limits (its breaker open, a back-off it
        // asked for, the budget spent): then it is not called at all.
        let target = miss.target.url.clone();
        let sent = self
            .send_upstream(
                miss.method.clone(),
                target,
                headers,
                Bytes::new(),
                miss.caller,
                super::guard::Scope::of(&miss.rule, &miss.target),
            )
            .await;
        let response_time = now_millis();
        let upstream_time = sent_at.elapsed();
        if let Some(s) = &stale {
            if let Some(outcome) =
                decide::stale_if_error(&s.entry, &sent, response_time, upstream_time)
            {
                return Ok(Fetched::Entry(s.clone(), outcome));
            }
        }
        // Otherwise an error is relayed, or, a server error with explicit
        // freshness, stored like any answer (RFC 9111 §3).
        let resp = sent?;
        // A 304 to our conditional request refreshes the stale entry its
        // validator selects (RFC 9111 §4.3.4); one naming another
        // validator is about another representation: ask again, without
        // a condition, for the whole of it.
        if let (StatusCode::NOT_MODIFIED, Some(s)) = (resp.status, &stale) {
            if !policy::conditional::not_modified_selects(&s.headers, &resp.headers) {
                return Box::pin(self.fetch(miss, None)).await;
            }
        }
        let status = resp.status.as_u16();
        let answer = decide::revalidate(resp, stale.as_deref());
        let exchange = Exchange {
            status,
            revalidated: answer.inherited_tags.is_some(),
            request_time,
            response_time,
            upstream_time,
        };
        Ok(self.keep_answer(miss, answer, &exchange).await)
    }

    /// Decide whether the upstream's answer may be stored, and store it if so.
    async fn keep_answer(
        &self,
        miss: &MissCtx,
        mut answer: Answer,
        exchange: &Exchange,
    ) -> Fetched {
        let names = &self.settings.surrogate_key_headers;
        let mut tags = answer.inherited_tags.take().unwrap_or_default();
        tags.extend(policy::headers::surrogate_keys(&answer.headers, names));
        let expose = self.settings.expose_surrogate_keys;
        policy::headers::hide_surrogate_keys(&mut answer.headers, names, expose);
        let facts = ResponseFacts {
            status: answer.status,
            headers: &answer.headers,
            body_len: answer.body.len(),
            request_time: exchange.request_time,
            response_time: exchange.response_time,
            request: miss.policy,
        };
        let verdict = if self.settings.mode == crate::config::Mode::Lambda
            && !crate::lambda_payload::entry_fits(facts.headers, &answer.body)
        {
            // Lambda could never return it.
            Err(NotStorable::TooLarge)
        } else {
            policy::response_policy(facts, &miss.rule)
        };
        match verdict {
            Ok(freshness) => {
                self.store_answer(miss, answer, tags, freshness, exchange)
                    .await
            }
            Err(why) => {
                let relayed = UpstreamResponse {
                    status: answer.status,
                    headers: answer.headers,
                    body: answer.body,
                };
                Fetched::Relay(relayed, exchange.outcome(miss, false, Some(why)))
            }
        }
    }

    /// Make the entry of a storable answer and write it, unless a purge
    /// ran while it was on its way.
    async fn store_answer(
        &self,
        miss: &MissCtx,
        answer: Answer,
        tags: Vec<String>,
        mut freshness: Freshness,
        exchange: &Exchange,
    ) -> Fetched {
        let response_time = exchange.response_time;
        if self.settings.ttl_jitter > 0.0 {
            let jitter = self.settings.ttl_jitter;
            policy::response::jitter_freshness(
                &mut freshness,
                response_time,
                jitter,
                fastrand::f64(),
            );
        }
        let max_tags = self.settings.max_tags_per_entry;
        let tags = decide::assemble_tags(tags, &miss.rule.tags, miss.target.url_tag(), max_tags);
        let strip = freshness.strip_set_cookie;
        let own = decide::own_set_cookies(&answer.headers, strip);
        let headers = policy::headers::stored_headers(&answer.headers, strip);
        let entry = Entry {
            status: answer.status.as_u16(),
            headers: super::respond::entry_headers(&headers),
            body: answer.body,
            born_at: freshness.born_at,
            stored_at: response_time,
            fresh_until: freshness.fresh_until,
            stale_while_revalidate_until: freshness.stale_while_revalidate_until,
            stale_if_error_until: freshness.stale_if_error_until,
            keep_until: freshness.keep_until,
            tags,
        };
        let vary = key::vary_names(&headers).unwrap_or_default();
        // A purge that ran while this response was on its way: it may be
        // older than what the purge made room for.
        let purged = self.purged_since(&entry.tags, exchange.request_time).await;
        let stored = !purged
            && self
                .store(&miss.primary, &vary, &miss.headers, &entry)
                .await;
        let outcome = exchange.outcome(miss, stored, None);
        let stored = Arc::new(Stored { entry, headers });
        if own.is_empty() {
            Fetched::Entry(stored, outcome)
        } else {
            Fetched::Own(stored, outcome, own)
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
