//! Purging by URL and tag, shared by `cachegate purge` and the invalidator
//! (the Lambda function in the `invalidator` role, fed by EventBridge and
//! SQS; event shapes in docs/invalidation.md).
//!
//! A purge request is `{"urls": [...], "tags": [...]}`. Every URL is
//! resolved to its URL tag before anything is purged, so a request with one
//! bad URL purges nothing and can be fixed and sent again as a whole.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::edge::{Dispatch, EdgeReport};
use crate::proxy::Proxy;
pub use crate::purge_request::{PurgeError, PurgeRequest, MAX_ITEMS, MAX_ITEM_BYTES};

/// How many entries each URL and tag removed. Serialises as
/// `{"urls": {"/a": 1}, "tags": {"t": 3}, "removed": 4}`, the same shape
/// serve's purge endpoint answers; with an edge configured, also
/// `"edge": {"paths": [...], "status": "sent", ...}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PurgeReport {
    pub urls: BTreeMap<String, u64>,
    pub tags: BTreeMap<String, u64>,
    /// By path prefix (`/` for `all`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prefixes: BTreeMap<String, u64>,
    pub removed: u64,
    /// What CloudFront was asked to invalidate ([`crate::edge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<EdgeReport>,
}

/// Purge what `request` names from the shared cache and then from the
/// edge, if one is configured, waiting for CloudFront's answer (the CLI
/// and the invalidator). URLs are resolved exactly as a request for them
/// would be (routes' ignored query parameters included), all before the
/// first purge. Purging is idempotent, so a request that failed half way
/// can be sent again whole.
pub async fn purge(proxy: &Proxy, request: &PurgeRequest) -> Result<PurgeReport, PurgeError> {
    purge_with(proxy, request, Dispatch::Now).await
}

/// [`purge`], with the edge invalidation sent as `dispatch` says: serve's
/// purge endpoint hands it to the batching task.
pub async fn purge_with(
    proxy: &Proxy,
    request: &PurgeRequest,
    dispatch: Dispatch,
) -> Result<PurgeReport, PurgeError> {
    let (mut report, purged) = purge_backend(proxy, request).await?;
    if let Some(edge) = proxy.edge() {
        report.edge = edge
            .invalidate(&purged, dispatch)
            .await
            .map_err(|e| PurgeError::Edge {
                removed: report.removed,
                message: e.to_string(),
            })?;
    }
    Ok(report)
}

/// The shared cache's half of a purge: the report, and the tags purged
/// (URL tags included) for the edge.
async fn purge_backend(
    proxy: &Proxy,
    request: &PurgeRequest,
) -> Result<(PurgeReport, Vec<String>), PurgeError> {
    request.validate()?;
    let mut targets: Vec<PurgeTarget> = Vec::new();
    for url in &request.urls {
        let tag = proxy
            .url_tag(url)
            .map_err(|e| PurgeError::Invalid(format!("url {e}")))?;
        targets.push(PurgeTarget {
            kind: Named::Url,
            named: url,
            tag,
        });
    }
    for tag in &request.tags {
        targets.push(PurgeTarget {
            kind: Named::Tag,
            named: tag,
            tag: tag.clone(),
        });
    }
    // Prefixes last: their URLs are found by reading the whole cache, so
    // every other item is resolved (and a bad one refused) before that.
    let all = "/".to_owned();
    let prefixes = request.prefixes.iter().chain(request.all.then_some(&all));
    for prefix in prefixes {
        let tags = proxy
            .stored_url_tags_under(prefix)
            .await
            .map_err(|e| PurgeError::Store {
                what: format!("prefix {prefix}"),
                message: e,
            })?;
        if tags.is_empty() {
            targets.push(PurgeTarget {
                kind: Named::Prefix,
                named: prefix,
                tag: String::new(),
            });
        }
        for tag in tags {
            targets.push(PurgeTarget {
                kind: Named::Prefix,
                named: prefix,
                tag,
            });
        }
    }
    let mut report = PurgeReport::default();
    let mut purged = Vec::with_capacity(targets.len());
    // The edge gets one wildcard per prefix, not a path per stored URL:
    // what the edge holds under it may be more than this cache still has.
    for prefix in request.prefixes.iter().chain(request.all.then_some(&all)) {
        purged.push(
            proxy
                .url_prefix_tag(prefix)
                .map_err(|e| PurgeError::Invalid(format!("prefix {e}")))?,
        );
    }
    for target in targets {
        let counts = match target.kind {
            Named::Url => &mut report.urls,
            Named::Tag => &mut report.tags,
            Named::Prefix => &mut report.prefixes,
        };
        if target.tag.is_empty() {
            // A prefix nothing is stored under: reported as 0.
            counts.entry(target.named.clone()).or_default();
            continue;
        }
        let n = proxy
            .purge_tag(&target.tag, request.soft)
            .await
            .map_err(|e| PurgeError::Store {
                what: format!("{} {}", target.kind.as_str(), target.named),
                message: e.to_string(),
            })?;
        // A URL or tag named twice removes nothing the second time.
        *counts.entry(target.named.clone()).or_default() += n;
        report.removed += n;
        if target.kind != Named::Prefix {
            purged.push(target.tag);
        }
    }
    Ok((report, purged))
}

/// One URL, tag or prefix a purge names, and a tag it purges (a prefix
/// purges the URL tag of each stored URL under it).
struct PurgeTarget<'a> {
    kind: Named,
    /// As the request named it: the report counts by it.
    named: &'a String,
    /// Empty for a prefix nothing is stored under.
    tag: String,
}

/// What a purge request named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    Url,
    Tag,
    Prefix,
}

impl Named {
    fn as_str(self) -> &'static str {
        match self {
            Named::Url => "url",
            Named::Tag => "tag",
            Named::Prefix => "prefix",
        }
    }
}

// ---------------------------------------------------------------------------
// The invalidator: Lambda events in, purges out
// ---------------------------------------------------------------------------

/// An SQS event (`{"Records": [...]}`), as Lambda's SQS event source mapping
/// delivers it; only the fields the invalidator reads.
#[derive(Debug, Deserialize)]
struct SqsEvent {
    #[serde(rename = "Records")]
    records: Vec<SqsRecord>,
}

#[derive(Debug, Deserialize)]
struct SqsRecord {
    #[serde(rename = "messageId")]
    message_id: String,
    #[serde(rename = "eventSource", default)]
    event_source: Option<String>,
    #[serde(default)]
    body: Option<String>,
}

/// Lambda's partial batch response: the messages listed go back to the
/// queue (and, after the queue's maxReceiveCount, to its dead-letter
/// queue); the others are deleted. Needs `ReportBatchItemFailures` on the
/// event source mapping.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SqsBatchResponse {
    pub batch_item_failures: Vec<BatchItemFailure>,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchItemFailure {
    pub item_identifier: String,
}

/// Why an invocation failed as a whole (Lambda then retries an
/// asynchronous invocation, such as one from EventBridge, and finally hands
/// it to the function's on-failure destination).
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("{0}")]
    Purge(#[from] PurgeError),
    #[error(
        "unrecognised event: expected an EventBridge event (`detail-type`, `detail`), \
         an SQS event (`Records`) or {{\"urls\": [...], \"tags\": [...]}}"
    )]
    Unrecognised,
    #[error("malformed {kind} event: {message}")]
    Malformed { kind: &'static str, message: String },
}

impl From<InvokeError> for lambda_http::lambda_runtime::Diagnostic {
    fn from(e: InvokeError) -> Self {
        let error_type = match &e {
            InvokeError::Purge(PurgeError::Invalid(_)) => "InvalidPurgeRequest",
            InvokeError::Purge(PurgeError::Store { .. }) => "PurgeFailed",
            InvokeError::Purge(PurgeError::Edge { .. }) => "EdgeInvalidationFailed",
            InvokeError::Unrecognised | InvokeError::Malformed { .. } => "UnrecognisedEvent",
        };
        lambda_http::lambda_runtime::Diagnostic {
            error_type: error_type.into(),
            error_message: e.to_string(),
        }
    }
}

/// One invocation of the invalidator. EventBridge events and direct
/// invocations answer the [`PurgeReport`]; SQS events answer the
/// [`SqsBatchResponse`] naming the records that failed (each record's report
/// is logged).
pub async fn handle_event(proxy: &Proxy, event: Value) -> Result<Value, InvokeError> {
    let Value::Object(fields) = &event else {
        return Err(InvokeError::Unrecognised);
    };
    if fields.contains_key("Records") {
        let sqs: SqsEvent = serde_json::from_value(event).map_err(|e| InvokeError::Malformed {
            kind: "SQS",
            message: e.to_string(),
        })?;
        let response = handle_sqs(proxy, sqs).await;
        return Ok(serde_json::to_value(response).expect("plain struct"));
    }
    let request = if fields.contains_key("detail-type") {
        let detail = fields
            .get("detail")
            .cloned()
            .ok_or_else(|| InvokeError::Malformed {
                kind: "EventBridge",
                message: "no `detail`".into(),
            })?;
        PurgeRequest::from_value(detail)?
    } else if fields.contains_key("urls") || fields.contains_key("tags") {
        PurgeRequest::from_value(event)?
    } else {
        return Err(InvokeError::Unrecognised);
    };
    let report = purge(proxy, &request).await?;
    tracing::info!(
        removed = report.removed,
        urls = ?report.urls,
        tags = ?report.tags,
        "purged"
    );
    Ok(serde_json::to_value(report).expect("plain struct"))
}

/// Each record on its own in the shared cache: a malformed or failing
/// record is reported back (and retried by SQS) without holding up the
/// others. The edge gets one invalidation for the whole batch (SQS's
/// batching window gathers the writes of a second into one call); if it
/// fails, every record that named something is retried.
async fn handle_sqs(proxy: &Proxy, event: SqsEvent) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    let mut for_edge: Vec<(String, Vec<String>)> = Vec::new();
    for record in event.records {
        let outcome = match (&record.event_source, &record.body) {
            (Some(source), _) if source != "aws:sqs" => Err(PurgeError::Invalid(format!(
                "eventSource `{source}`, not aws:sqs"
            ))),
            (_, None) => Err(PurgeError::Invalid("a record without a body".into())),
            (_, Some(body)) => match PurgeRequest::from_json(body.as_bytes()) {
                Ok(request) => purge_backend(proxy, &request).await,
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok((report, purged)) => {
                tracing::info!(
                    message_id = %record.message_id,
                    removed = report.removed,
                    urls = ?report.urls,
                    tags = ?report.tags,
                    "purged"
                );
                for_edge.push((record.message_id, purged));
            }
            Err(e) => {
                tracing::warn!(message_id = %record.message_id, error = %e, "purge message failed; SQS will deliver it again");
                response.batch_item_failures.push(BatchItemFailure {
                    item_identifier: record.message_id,
                });
            }
        }
    }
    if let Some(edge) = proxy.edge() {
        let tags: Vec<String> = for_edge
            .iter()
            .flat_map(|(_, t)| t.iter().cloned())
            .collect();
        match edge.invalidate(&tags, Dispatch::Now).await {
            Ok(Some(report)) => tracing::info!(
                paths = report.paths.len(),
                invalidation = report.invalidation_id.as_deref().unwrap_or("?"),
                usd_beyond_free_tier = report.usd_beyond_free_tier,
                skipped = ?report.skipped,
                "CloudFront invalidation sent"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "CloudFront invalidation failed; SQS will deliver the batch's messages again");
                response
                    .batch_item_failures
                    .extend(for_edge.into_iter().map(|(id, _)| BatchItemFailure {
                        item_identifier: id,
                    }));
            }
        }
    }
    response
}

/// Run the invalidator's Lambda runtime loop until the environment ends it.
pub async fn run(proxy: Arc<Proxy>) -> Result<(), lambda_http::Error> {
    use lambda_http::lambda_runtime::{self, service_fn, LambdaEvent};
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let proxy = proxy.clone();
        async move { handle_event(&proxy, event.payload).await }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_response_has_lambdas_field_names() {
        let r = SqsBatchResponse {
            batch_item_failures: vec![BatchItemFailure {
                item_identifier: "m-1".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": "m-1"}]})
        );
    }
}
