//! The upstream call for a miss (conditional when a stale entry has
//! validators) and storing what policy says may be stored: a body still
//! arriving is stored when it ends, and meanwhile streams to the client
//! that asked ([`ClientSink`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

use cachegate_store::{now_millis, Entry, Record, StoreError, StoreKey, UnixMillis, VaryIndex};

use super::body::{ResponseBody, Tee, TeeEnd};
use super::decide::{self, Answer};
use super::encoding;
use super::guard::Caller;
use super::outcome::{Forward, Kind, Outcome};
use super::{Fetched, Proxy, Stored};
use crate::key::{self, Target};
use crate::policy::compression::{self, ClientAccept};
use crate::policy::{self, Freshness, NotStorable, RequestPolicy, ResponseFacts};
use crate::routes::Rule;
use crate::upstream::{BodyReader, UpstreamBody, UpstreamError, UpstreamResponse};

/// Everything a fetch needs to know about the request it serves.
#[derive(Debug, Clone)]
pub(super) struct MissCtx {
    /// The client's own `Accept-Encoding`, when the upstream is asked for
    /// gzip instead (`cache.compression`); `None`: the client's value went
    /// upstream as it was.
    pub(super) accept: Option<Arc<ClientAccept>>,
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
    /// Where the head of an answer goes when its body streams to the
    /// client while it is stored; `None`: the body is read whole first.
    pub(super) sink: Option<Arc<ClientSink>>,
}

/// The head of an answer being stored, for the client whose request
/// fetched it, with its body streaming.
pub(super) struct Streamed {
    /// The entry as it will be stored, without its body.
    pub(super) stored: Arc<Stored>,
    pub(super) outcome: Outcome,
    /// The `Set-Cookie` fields kept out of the stored copy.
    pub(super) own: HeaderMap,
    pub(super) body: ResponseBody,
    /// The upstream's `Content-Length`, which the stream is held to.
    pub(super) content_length: Option<usize>,
}

/// The one-time channel a fetch sends a [`Streamed`] head through.
pub(super) struct ClientSink(Mutex<Option<tokio::sync::oneshot::Sender<Streamed>>>);

impl ClientSink {
    pub(super) fn new() -> (ClientSink, tokio::sync::oneshot::Receiver<Streamed>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (ClientSink(Mutex::new(Some(tx))), rx)
    }

    /// The sender, once: a second fetch for the same request (a refetch
    /// after a 304 for another validator) finds it taken only if the
    /// first streamed, which it never does before returning.
    fn take(&self) -> Option<tokio::sync::oneshot::Sender<Streamed>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for ClientSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSink")
    }
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

/// A storable answer with its body read (or, streaming, not yet).
struct Whole {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// An entry made from an answer, before it is written.
struct Made {
    entry: Entry,
    headers: HeaderMap,
    own: HeaderMap,
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
        let target = miss.target.url().clone();
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
        self.keep_answer(miss, answer, &exchange).await
    }

    /// Decide whether the upstream's answer may be stored, and store it if so.
    async fn keep_answer(
        &self,
        miss: &MissCtx,
        mut answer: Answer,
        exchange: &Exchange,
    ) -> Result<Fetched, UpstreamError> {
        let names = &self.settings.surrogate_key_headers;
        let mut tags = answer.inherited_tags.take().unwrap_or_default();
        tags.extend(policy::headers::surrogate_keys(&answer.headers, names));
        let expose = self.settings.expose_surrogate_keys;
        policy::headers::hide_surrogate_keys(&mut answer.headers, names, expose);
        if let UpstreamBody::Full(body) = &mut answer.body {
            // A whole body (Lambda) is stored, and may be sent, compressed:
            // the limits below hold for what is kept.
            if self.settings.compression {
                encoding::compress_answer(answer.status, &mut answer.headers, body);
            }
        }
        let compressible = self.will_compress(answer.status, &answer.headers, None);
        let facts = ResponseFacts {
            status: answer.status,
            headers: &answer.headers,
            // A streamed body without a length is held to the limit as
            // it is read ([`Tee::run`]); one that will be compressed, by
            // the smallest it could be stored in.
            body_len: answer
                .body
                .known_len()
                .map(|n| {
                    if compressible {
                        n / compression::RAW_PER_STORED
                    } else {
                        n
                    }
                })
                .unwrap_or(0),
            request_time: exchange.request_time,
            response_time: exchange.response_time,
            request: miss.policy,
        };
        // Under Lambda the body is whole (`Upstream::buffered`).
        let lambda_body = match &answer.body {
            UpstreamBody::Full(b) if self.settings.mode == crate::config::Mode::Lambda => Some(b),
            _ => None,
        };
        let verdict =
            if lambda_body.is_some_and(|b| !crate::lambda_payload::entry_fits(facts.headers, b)) {
                // Lambda could never return it.
                Err(NotStorable::TooLarge)
            } else {
                policy::response_policy(facts, &miss.rule)
            };
        let freshness = match verdict {
            Ok(freshness) => freshness,
            Err(why) => {
                // Relayed as it arrives; whoever waits for this key is
                // released now, at the head.
                let relayed = UpstreamResponse {
                    status: answer.status,
                    headers: answer.headers,
                    body: answer.body,
                };
                return Ok(Fetched::Relay(
                    relayed,
                    exchange.outcome(miss, false, Some(why)),
                ));
            }
        };
        let Answer {
            status,
            headers,
            body,
            ..
        } = answer;
        let reader = match body {
            UpstreamBody::Full(body) => {
                let answer = Whole {
                    status,
                    headers,
                    body,
                };
                return Ok(self
                    .store_answer(miss, answer, tags, freshness, exchange)
                    .await);
            }
            UpstreamBody::Streaming(reader) => reader,
        };
        match miss.sink.as_ref().and_then(|s| s.take()) {
            Some(sink) => {
                let answer = Whole {
                    status,
                    headers,
                    body: Bytes::new(),
                };
                self.store_streaming(miss, answer, reader, sink, tags, freshness, exchange)
                    .await
            }
            None => {
                // Nobody to stream to (a refresh, a HEAD): read it whole.
                let limit = miss.rule.max_entry_bytes;
                let body = UpstreamBody::Streaming(reader).collect().await?;
                let mut answer = Whole {
                    status,
                    headers,
                    body,
                };
                if self.settings.compression {
                    encoding::compress_answer(answer.status, &mut answer.headers, &mut answer.body);
                }
                if answer.body.len() > limit {
                    let relayed = UpstreamResponse {
                        status: answer.status,
                        headers: answer.headers,
                        body: answer.body.into(),
                    };
                    let why = Some(NotStorable::TooLarge);
                    return Ok(Fetched::Relay(relayed, exchange.outcome(miss, false, why)));
                }
                Ok(self
                    .store_answer(miss, answer, tags, freshness, exchange)
                    .await)
            }
        }
    }

    /// Store an answer whose body is still arriving while it streams to
    /// the client that asked: the head goes to `sink` at once, the entry
    /// is written when the body ends within the entry limit.
    #[allow(clippy::too_many_arguments)]
    async fn store_streaming(
        &self,
        miss: &MissCtx,
        head: Whole,
        reader: BodyReader,
        sink: tokio::sync::oneshot::Sender<Streamed>,
        tags: Vec<String>,
        freshness: Freshness,
        exchange: &Exchange,
    ) -> Result<Fetched, UpstreamError> {
        let content_length = reader.content_length();
        let compressible = self.will_compress(head.status, &head.headers, content_length);
        let made = self.make_entry(miss, head, tags, freshness, exchange);
        // A purge that ran while the head was on its way: relayed, not
        // stored (checked again before writing, for one during the body).
        if self
            .purged_since(&made.entry.tags, exchange.request_time)
            .await
        {
            let _ = sink.send(Streamed {
                stored: Arc::new(Stored::new(made.entry, made.headers)),
                outcome: exchange.outcome(miss, false, None),
                own: made.own,
                body: UpstreamBody::Streaming(reader).into(),
                content_length,
            });
            return Ok(Fetched::Sent { too_large: false });
        }
        let (tee, body) = Tee::new();
        // The client is told what is meant: stored, unless the body
        // outgrows the entry limit (a length announced beyond it was
        // refused before) or the store fails.
        let _ = sink.send(Streamed {
            stored: Arc::new(Stored::new(made.entry.clone(), made.headers.clone())),
            outcome: exchange.outcome(miss, true, None),
            own: made.own.clone(),
            body,
            content_length,
        });
        // What is stored must fit the entry limit; a body that will be
        // compressed may be read to a multiple of it.
        let limit = miss.rule.max_entry_bytes;
        let read_limit = if compressible {
            limit.saturating_mul(compression::RAW_PER_STORED)
        } else {
            limit
        };
        match tee.run(reader, read_limit).await? {
            TeeEnd::Kept(body, rest) => {
                let mut made = Made {
                    entry: Entry { body, ..made.entry },
                    ..made
                };
                if compressible {
                    self.compress_made(&mut made);
                }
                if made.entry.body.len() > limit {
                    rest.send();
                    return Ok(Fetched::Sent { too_large: true });
                }
                let fetched = self.write_made(miss, made, exchange).await;
                rest.send();
                Ok(fetched)
            }
            TeeEnd::TooLarge | TeeEnd::Abandoned => Ok(Fetched::Sent { too_large: true }),
        }
    }

    /// Make the entry of a storable answer and write it, unless a purge
    /// ran while it was on its way.
    async fn store_answer(
        &self,
        miss: &MissCtx,
        answer: Whole,
        tags: Vec<String>,
        freshness: Freshness,
        exchange: &Exchange,
    ) -> Fetched {
        let made = self.make_entry(miss, answer, tags, freshness, exchange);
        self.write_made(miss, made, exchange).await
    }

    /// The entry of a storable answer, its headers as a map, and the
    /// `Set-Cookie` fields that stay out of it.
    fn make_entry(
        &self,
        miss: &MissCtx,
        answer: Whole,
        tags: Vec<String>,
        mut freshness: Freshness,
        exchange: &Exchange,
    ) -> Made {
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
        let announced = answer
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let mut headers = policy::headers::stored_headers(&answer.headers, strip);
        if answer.body.is_empty() && self.will_compress(answer.status, &headers, announced) {
            // A body still arriving, to be compressed when it has: which
            // bytes a client gets depends on its `Accept-Encoding` from
            // this first answer on.
            compression::vary_on_accept_encoding(&mut headers);
        }
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
        Made {
            entry,
            headers,
            own,
        }
    }

    /// Whether an identity answer will be stored gzip-compressed, given
    /// its length when known (`cache.compression`).
    fn will_compress(&self, status: StatusCode, headers: &HeaderMap, len: Option<usize>) -> bool {
        self.settings.compression
            && compression::may_compress(
                status,
                headers,
                len.unwrap_or(usize::MAX),
                compression::MIN_COMPRESS_BYTES,
            )
    }

    /// A made entry's body compressed, now that it is whole, with its
    /// headers (both copies) marked so.
    fn compress_made(&self, made: &mut Made) {
        let status = StatusCode::from_u16(made.entry.status).unwrap_or(StatusCode::OK);
        encoding::compress_answer(status, &mut made.headers, &mut made.entry.body);
        made.entry.headers = super::respond::entry_headers(&made.headers);
    }

    /// Write a made entry, unless a purge ran while it was on its way.
    async fn write_made(&self, miss: &MissCtx, made: Made, exchange: &Exchange) -> Fetched {
        let Made {
            entry,
            headers,
            own,
        } = made;
        let vary = key::variant_names(&headers, self.settings.compression).unwrap_or_default();
        // A purge that ran while this response was on its way: it may be
        // older than what the purge made room for.
        let purged = self.purged_since(&entry.tags, exchange.request_time).await;
        let stored = !purged
            && self
                .store(&miss.primary, &vary, &miss.headers, &entry)
                .await;
        let outcome = exchange.outcome(miss, stored, None);
        let stored = Arc::new(Stored::new(entry, headers));
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
                .into_record()
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
