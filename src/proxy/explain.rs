//! `cachegate explain`: what the proxy would do with one request, and
//! why, without calling the upstream. It runs the request flow's own
//! phases ([`Proxy::admit`], the lookup, [`decide::serve_or_revalidate`])
//! so the answer cannot drift from what serving does; only the upstream
//! call is left out.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request};
use serde_json::{json, Map, Value};

use cachegate_store::{Entry, Record, UnixMillis};

use super::decide::{self, HitDecision, HitFacts};
use super::{Admission, Proxy, Trace};
use crate::key::{self, FORWARDED_ORIGIN};
use crate::routes::Rule;

impl Proxy {
    /// Explain `req` (a request as a client would send it; an absolute
    /// URI gives its scheme and `Host`): the canonical request, the route
    /// and its rule, the key and what it is made of, whether it would
    /// bypass the cache and why, and what is stored for it in the
    /// configured backend. Reads the cache; never calls the upstream.
    pub async fn explain(self: &Arc<Self>, req: Request<Bytes>) -> Value {
        let mut trace = Trace::default();
        let sent = json!({
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
        });
        let mut out = Map::new();
        out.insert("request".into(), sent);
        match self.admit(req, &mut trace) {
            Admission::Rejected((resp, _)) => {
                let body: Value = resp
                    .body()
                    .as_full()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                out.insert(
                    "decision".into(),
                    json!({
                        "action": "reject",
                        "status": resp.status().as_u16(),
                        "error": body,
                    }),
                );
            }
            Admission::Bypass(pass, why) => {
                out.insert(
                    "canonical".into(),
                    canonical(&pass.method, &pass.target, &pass.headers, &pass.rule),
                );
                out.insert("route".into(), route(&pass.rule));
                out.insert(
                    "decision".into(),
                    json!({
                        "action": "bypass",
                        "reason": why.as_str(),
                        "detail": bypass_detail(why),
                    }),
                );
            }
            Admission::Cache(miss) => {
                out.insert(
                    "canonical".into(),
                    canonical(&miss.method, &miss.target, &miss.headers, &miss.rule),
                );
                out.insert("route".into(), route(&miss.rule));
                let key_headers = keyed_names(&miss.rule);
                let mut parts = Map::new();
                parts.insert("method".into(), json!("GET (HEAD is served from GET)"));
                parts.insert(
                    "path_and_query".into(),
                    json!(miss.target.path_and_query.as_str()),
                );
                parts.insert("route".into(), json!(miss.rule.name.as_str()));
                let origin: Vec<String> = FORWARDED_ORIGIN
                    .iter()
                    .map(|h| h.as_str().to_owned())
                    .collect();
                parts.insert(
                    "forwarded_origin".into(),
                    header_values(&origin, &miss.headers, &miss.rule),
                );
                parts.insert(
                    "key_headers".into(),
                    header_values(&key_headers, &miss.headers, &miss.rule),
                );
                let (stored, miss) = self.look_up(miss, &mut trace).await;
                let now = miss.arrived_at;
                let mut key = Map::new();
                key.insert("primary".into(), json!(miss.primary.digest()));
                key.insert("parts".into(), Value::Object(parts));
                let vary = self.vary_of(&miss.primary).await;
                if let Some(names) = &vary {
                    key.insert(
                        "variant".into(),
                        json!({
                            "vary": names,
                            "values": header_values(names, &miss.headers, &miss.rule),
                            "key": key::variant_key(&miss.primary, names, &miss.headers).digest(),
                        }),
                    );
                }
                out.insert("key".into(), Value::Object(key));
                let facts = HitFacts {
                    now,
                    shareable_only: miss.policy.shareable_only,
                    background: self.settings.background.available(),
                    refresh_ahead: self.settings.refresh_ahead,
                };
                let decision = decide::serve_or_revalidate(stored.as_deref(), facts, || false);
                let mut d = Map::new();
                let (action, detail) = hit_action(decision, miss.policy.range);
                d.insert("action".into(), json!(action));
                d.insert("detail".into(), json!(detail));
                d.insert("store_answer".into(), json!(miss.policy.store));
                if let Some(personal) = miss.policy.shareable_only {
                    d.insert(
                        "personal".into(),
                        json!(format!(
                            "the request carries a {} the route does not key on: only answers the upstream marks public or s-maxage are shared with it",
                            personal.bypass().as_str()
                        )),
                    );
                }
                out.insert("decision".into(), Value::Object(d));
                let backend = self.cache.backend_name();
                let stored_view = match (&stored, trace.backend_error) {
                    (Some(s), _) => entry_view(&s.entry, now),
                    (None, true) => {
                        json!({ "found": false, "error": "the backend could not be read (a miss while it lasts)" })
                    }
                    (None, false) if backend == "memory" => json!({
                        "found": false,
                        "note": "the memory backend lives inside each serving process; this command has its own, empty one. Use redis or dynamodb to see stored entries here."
                    }),
                    (None, false) => json!({ "found": false }),
                };
                out.insert("backend".into(), json!(backend));
                out.insert("stored".into(), stored_view);
            }
        }
        Value::Object(out)
    }

    /// The request headers the Vary index under `primary` names, if one
    /// is stored there.
    async fn vary_of(&self, primary: &cachegate_store::StoreKey) -> Option<Vec<String>> {
        match self.cache.get(primary).await.into_record() {
            Some(Record::VaryIndex(v)) => Some(v.headers),
            _ => None,
        }
    }
}

/// The request as it would go upstream.
fn canonical(
    method: &http::Method,
    target: &key::Target,
    headers: &HeaderMap,
    rule: &Rule,
) -> Value {
    let mut h = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| shown_value(name.as_str(), v.as_bytes(), rule))
            .collect();
        h.insert(name.as_str().to_owned(), Value::Array(values));
    }
    json!({
        "method": method.as_str(),
        "upstream_url": target.url().as_str(),
        "path_and_query": target.path_and_query,
        "headers": h,
    })
}

/// The rule that applies, as configured and filled in with the defaults.
fn route(rule: &Rule) -> Value {
    let secs = |d: Option<std::time::Duration>| {
        d.map(|d| humantime_serde::re::humantime::format_duration(d).to_string())
    };
    json!({
        "pattern": rule.name,
        "cache": rule.cache,
        "ttl": secs(rule.ttl),
        "override_upstream": rule.override_upstream,
        "stale_while_revalidate": secs(Some(rule.stale_while_revalidate)),
        "stale_if_error": secs(Some(rule.stale_if_error)),
        "edge_ttl": secs(rule.edge_ttl),
        "key_headers": rule.key_headers,
        "key_cookies": rule.key_cookies,
        "ignore_cookies": rule.ignore_cookies,
        "key_query": rule.key_query,
        "ignored_query_params": rule.ignored_query_params,
        "tags": rule.tags,
        "max_entry_bytes": rule.max_entry_bytes,
    })
}

/// The header names the primary key reads besides the target.
fn keyed_names(rule: &Rule) -> Vec<String> {
    let mut names = rule.key_headers.clone();
    if !rule.key_cookies.is_empty() {
        names.push(http::header::COOKIE.as_str().to_owned());
    }
    names
}

/// Each named header's values as the key reads them (`null` when absent).
fn header_values(names: &[String], headers: &HeaderMap, rule: &Rule) -> Value {
    let mut m = Map::new();
    for name in names {
        let values: Vec<Value> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| shown_value(name, v.as_bytes(), rule))
            .collect();
        let v = if values.is_empty() {
            Value::Null
        } else {
            Value::Array(values)
        };
        m.insert(name.clone(), v);
    }
    Value::Object(m)
}

/// A header value fit to print: credentials (`Authorization`, `Cookie`,
/// the configured credential headers) are never shown, only their size.
fn shown_value(name: &str, value: &[u8], rule: &Rule) -> Value {
    let secret = matches!(name, "authorization" | "proxy-authorization" | "cookie")
        || rule.credential_headers.iter().any(|c| c.as_str() == name);
    if secret {
        json!(format!("<redacted, {} bytes>", value.len()))
    } else {
        json!(String::from_utf8_lossy(value))
    }
}

fn bypass_detail(why: crate::policy::Bypass) -> &'static str {
    use crate::policy::Bypass;
    match why {
        Bypass::Method => {
            "not GET or HEAD: forwarded; a success invalidates the URL (RFC 9111 §4.4)"
        }
        Bypass::Authorization => {
            "carries Authorization and the route does not key on it (RFC 9111 §3.5)"
        }
        Bypass::Route => "the route says cache = false",
        Bypass::Body => "a GET or HEAD with a body",
        Bypass::Upgrade => "asks for a protocol upgrade",
        Bypass::Range => "a Range no fresh stored response answers",
        Bypass::Cookie => "carries Cookie and the route does not key on cookies",
        Bypass::Credential => {
            "carries a credential header (cache.credential_headers) the route does not key on"
        }
    }
}

/// What a request now would get, from the flow's own decision.
fn hit_action(decision: HitDecision, range: bool) -> (&'static str, String) {
    match decision {
        HitDecision::Miss => ("miss", "nothing stored for this request: the upstream is asked and the answer stored if it may be".into()),
        HitDecision::PersonalPass(p) => ("bypass", format!("what is stored is not marked shareable and the request carries a {}: passed through", p.bypass().as_str())),
        HitDecision::Fresh { ttl, .. } if range => ("hit", format!("fresh for {ttl}s more: the range is cut from the stored response")),
        HitDecision::Fresh { ttl, refresh_ahead } => ("hit", format!("fresh for {ttl}s more{}", if refresh_ahead { "; a refresh-ahead starts" } else { "" })),
        HitDecision::StaleWhileRevalidate(_) | HitDecision::RefreshInline => ("stale", "stale within stale-while-revalidate: answered stale while one request refreshes".into()),
        HitDecision::Revalidate => ("revalidate", "stale: revalidated (or refetched) with the upstream before answering; served stale if it fails within stale-if-error".into()),
    }
}

/// The stored entry: status, age, freshness and the windows left, tags,
/// size.
fn entry_view(entry: &Entry, now: UnixMillis) -> Value {
    let left = |until: UnixMillis| until.saturating_sub(now) / 1000;
    json!({
        "found": true,
        "status": entry.status,
        "age_s": entry.age_secs(now),
        "fresh": entry.is_fresh(now),
        "fresh_for_s": left(entry.fresh_until),
        "stale_while_revalidate_left_s": left(entry.stale_while_revalidate_until),
        "stale_if_error_left_s": left(entry.stale_if_error_until),
        "kept_for_revalidation_s": left(entry.keep_until),
        "stored_at_ms": entry.stored_at,
        "body_bytes": entry.body.len(),
        "content_type": entry.header("content-type").map(String::from_utf8_lossy),
        "content_encoding": entry.header("content-encoding").map(String::from_utf8_lossy),
        "etag": entry.header("etag").map(String::from_utf8_lossy),
        "last_modified": entry.header("last-modified").map(String::from_utf8_lossy),
        "cache_control": entry.header("cache-control").map(String::from_utf8_lossy),
        "vary": entry.header("vary").map(String::from_utf8_lossy),
        "tags": entry.tags,
    })
}

/// `value` as indented `key: value` lines, for people.
pub fn render_text(value: &Value) -> String {
    fn walk(v: &Value, indent: usize, out: &mut String) {
        let pad = "  ".repeat(indent);
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match v {
                        Value::Object(inner) if !inner.is_empty() => {
                            out.push_str(&format!("{pad}{k}:\n"));
                            walk(v, indent + 1, out);
                        }
                        _ => out.push_str(&format!("{pad}{k}: {}\n", scalar(v))),
                    }
                }
            }
            other => out.push_str(&format!("{pad}{}\n", scalar(other))),
        }
    }
    fn scalar(v: &Value) -> String {
        match v {
            Value::Null => "-".into(),
            Value::String(s) => s.clone(),
            Value::Array(a) => {
                let items: Vec<String> = a.iter().map(scalar).collect();
                format!("[{}]", items.join(", "))
            }
            Value::Object(m) if m.is_empty() => "{}".into(),
            other => other.to_string(),
        }
    }
    // The top level in the order a request flows; inner keys sorted.
    const ORDER: [&str; 7] = [
        "request",
        "canonical",
        "route",
        "decision",
        "key",
        "backend",
        "stored",
    ];
    let mut out = String::new();
    match value {
        Value::Object(m) => {
            let mut names: Vec<&String> = m.keys().collect();
            names.sort_by_key(|k| ORDER.iter().position(|o| o == k).unwrap_or(ORDER.len()));
            for k in names {
                let mut one = Map::new();
                one.insert(k.clone(), m[k].clone());
                walk(&Value::Object(one), 0, &mut out);
            }
        }
        other => walk(other, 0, &mut out),
    }
    out
}
