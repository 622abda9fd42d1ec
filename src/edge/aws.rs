//! The AWS half of the edge (feature `edge`): the CloudFront client that
//! creates invalidations (retried on throttling), the SQS queue a Lambda
//! proxy hands its writes' purges to, and serve's batching task.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_cloudfront::error::ProvideErrorMetadata;

use crate::config::EdgeConfig;

use super::{
    cost_usd, Dispatch, EdgeError, EdgeItems, EdgeReport, EdgeStatus, Runs, MAX_PATHS_PER_CALL,
};
use crate::key::{URL_PREFIX_TAG_PREFIX, URL_TAG_PREFIX};

/// Where this process's invalidations go.
pub(super) struct Sinks {
    cloudfront: Option<Arc<CloudFront>>,
    queue: Option<Queue>,
    /// Serve's batching task; `None` elsewhere.
    batcher: Option<tokio::sync::mpsc::UnboundedSender<EdgeItems>>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks")
            .field(
                "distribution",
                &self.cloudfront.as_ref().map(|c| &c.distribution_id),
            )
            .field("queue", &self.queue.as_ref().map(|q| &q.url))
            .field("batched", &self.batcher.is_some())
            .finish()
    }
}

impl Sinks {
    /// The SDK clients (no request is made) and, in serve mode, the
    /// batching task.
    pub(super) async fn build(config: &EdgeConfig, runs: Runs) -> Result<Sinks, EdgeError> {
        let sdk = || async {
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .http_client(cachegate_aws_http::https_client())
                .load()
                .await
        };
        let cloudfront = match (&config.cloudfront_distribution_id, runs) {
            // The Lambda proxy never calls CloudFront.
            (Some(_), Runs::LambdaProxy) => None,
            (Some(id), _) => Some(Arc::new(CloudFront::new(
                &sdk().await,
                id,
                config.max_attempts,
            ))),
            (None, _) => None,
        };
        let queue = match (&config.invalidation_queue_url, runs) {
            // The invalidator reads this queue: sending to it would loop.
            (_, Runs::Direct) => None,
            (Some(url), _) => Some(Queue {
                client: aws_sdk_sqs::Client::new(&sdk().await),
                url: url.clone(),
            }),
            (None, _) => None,
        };
        if runs == Runs::LambdaProxy
            && config.cloudfront_distribution_id.is_some()
            && queue.is_none()
        {
            return Err(EdgeError::Config(crate::config::invalid(
                "edge.invalidation_queue_url",
                "the proxy in Lambda sends CloudFront invalidations to the invalidator's queue \
                 (it never calls CloudFront on a request's path): set it, or unset \
                 edge.cloudfront_distribution_id",
            )));
        }
        let batcher = match (&cloudfront, &queue, runs) {
            (Some(cf), None, Runs::Serve) => Some(spawn_batcher(cf.clone(), config.batch_window)),
            _ => None,
        };
        Ok(Sinks {
            cloudfront,
            queue,
            batcher,
        })
    }

    /// Send `items` (what purging `tags` removed) the way `dispatch` says.
    pub(super) async fn invalidate(
        &self,
        items: EdgeItems,
        tags: &[String],
        base_prefix: &str,
        dispatch: Dispatch,
    ) -> Result<Option<EdgeReport>, EdgeError> {
        match (dispatch, &self.batcher, &self.queue, &self.cloudfront) {
            (Dispatch::Background, Some(tx), _, _) => {
                let report = EdgeReport::new(&items, EdgeStatus::Batched);
                // The task runs as long as the process; a send can only
                // fail while it shuts down.
                let _ = tx.send(items);
                Ok(Some(report))
            }
            (Dispatch::Background, None, Some(queue), _) => {
                queue.send(tags, base_prefix).await?;
                Ok(Some(EdgeReport::new(&items, EdgeStatus::Queued)))
            }
            (_, _, _, Some(cf)) => {
                let id = cf.invalidate(&items.items).await?;
                let mut report = EdgeReport::new(&items, EdgeStatus::Sent);
                report.invalidation_id = id;
                Ok(Some(report))
            }
            (Dispatch::Now, _, Some(queue), None) => {
                queue.send(tags, base_prefix).await?;
                Ok(Some(EdgeReport::new(&items, EdgeStatus::Queued)))
            }
            _ => Ok(None),
        }
    }
}

/// The background task of `cachegate serve`: everything submitted within
/// `window` of the first item becomes one call (deduplicated).
fn spawn_batcher(
    cloudfront: Arc<CloudFront>,
    window: Duration,
) -> tokio::sync::mpsc::UnboundedSender<EdgeItems> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<EdgeItems>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = first.items;
            let deadline = tokio::time::Instant::now() + window;
            while let Ok(Some(more)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                batch.extend(more.items);
            }
            match cloudfront.invalidate(&batch).await {
                Ok(id) => tracing::info!(
                    paths = batch.len(),
                    invalidation = id.as_deref().unwrap_or("?"),
                    usd_beyond_free_tier = cost_usd(batch.len()),
                    "CloudFront invalidation sent"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, paths = ?batch, "CloudFront invalidation failed; the edge keeps these until their TTL")
                }
            }
        }
    });
    tx
}

/// The invalidator's SQS queue, fed by a Lambda proxy.
struct Queue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl Queue {
    /// One message per write: a purge request (`{"urls": [...], "tags": [...]}`)
    /// for what the write purged. The invalidator purges the shared backend
    /// once more (idempotent) and then CloudFront.
    async fn send(&self, tags: &[String], base_prefix: &str) -> Result<(), EdgeError> {
        let mut request = crate::purge_request::PurgeRequest::default();
        for tag in tags {
            if let Some(upstream) = tag.strip_prefix(URL_TAG_PREFIX) {
                if let Some(path) = upstream.strip_prefix(base_prefix) {
                    request.urls.push(path.to_owned());
                }
            } else if let Some(upstream) = tag.strip_prefix(URL_PREFIX_TAG_PREFIX) {
                if let Some(path) = upstream.strip_prefix(base_prefix) {
                    request.prefixes.push(path.to_owned());
                }
            } else {
                request.tags.push(tag.clone());
            }
        }
        let body = serde_json::to_string(&request).expect("plain struct");
        self.client
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| EdgeError::Queue(describe(&e)))?;
        Ok(())
    }
}

/// A CloudFront distribution and the client that invalidates it.
struct CloudFront {
    client: aws_sdk_cloudfront::Client,
    distribution_id: String,
    max_attempts: u32,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(20);

impl CloudFront {
    fn new(sdk: &aws_config::SdkConfig, distribution_id: &str, max_attempts: u32) -> CloudFront {
        // CloudFront is global; its API signs for us-east-1 whatever the
        // process's region. Retries are ours (below): the SDK's would not
        // know TooManyInvalidationsInProgress.
        let mut conf = aws_sdk_cloudfront::config::Builder::from(sdk)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            );
        if sdk.region().is_none() {
            conf = conf.region(aws_config::Region::from_static("us-east-1"));
        }
        CloudFront {
            client: aws_sdk_cloudfront::Client::from_conf(conf.build()),
            distribution_id: distribution_id.to_owned(),
            max_attempts,
        }
    }

    /// One `CreateInvalidation` per [`MAX_PATHS_PER_CALL`] items, each
    /// retried on throttling. Returns the (last) invalidation id.
    async fn invalidate(&self, items: &BTreeSet<String>) -> Result<Option<String>, EdgeError> {
        let items: Vec<String> = items.iter().cloned().collect();
        let mut last = None;
        for chunk in items.chunks(MAX_PATHS_PER_CALL) {
            last = self.create_invalidation(chunk).await?;
        }
        Ok(last)
    }

    async fn create_invalidation(&self, paths: &[String]) -> Result<Option<String>, EdgeError> {
        use aws_sdk_cloudfront::types::{InvalidationBatch, Paths};
        let err = |message: String| EdgeError::CloudFront {
            distribution: self.distribution_id.clone(),
            message,
        };
        let batch = InvalidationBatch::builder()
            // Unique per batch, kept across its retries: CloudFront answers
            // a repeated reference with the invalidation it already made.
            .caller_reference(format!("cachegate-{}", uuid::Uuid::new_v4()))
            .paths(
                Paths::builder()
                    .quantity(paths.len() as i32)
                    .set_items(Some(paths.to_vec()))
                    .build()
                    .map_err(|e| err(e.to_string()))?,
            )
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut backoff = BACKOFF_FIRST;
        let mut attempt = 1;
        loop {
            let sent = self
                .client
                .create_invalidation()
                .distribution_id(&self.distribution_id)
                .invalidation_batch(batch.clone())
                .send()
                .await;
            match sent {
                Ok(out) => return Ok(out.invalidation().map(|i| i.id().to_owned())),
                Err(e) if attempt < self.max_attempts && retryable(&e) => {
                    // Equal jitter: half the backoff, plus up to as much again.
                    let half = backoff / 2;
                    let wait = half + half.mul_f64(fastrand::f64());
                    tracing::info!(
                        error = %describe(&e),
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        "CloudFront CreateInvalidation throttled or failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    attempt += 1;
                }
                Err(e) => {
                    return Err(err(format!(
                        "{} (after {attempt} attempt{})",
                        describe(&e),
                        if attempt == 1 { "" } else { "s" }
                    )))
                }
            }
        }
    }
}

/// Throttling, and failures that say nothing about the request itself
/// (connection, timeout, a 5xx).
fn retryable<E: ProvideErrorMetadata>(
    e: &aws_sdk_cloudfront::error::SdkError<E, aws_sdk_cloudfront::config::http::HttpResponse>,
) -> bool {
    use aws_sdk_cloudfront::error::SdkError;
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => {
            matches!(
                s.err().code(),
                Some(
                    "TooManyInvalidationsInProgress"
                        | "Throttling"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                        | "ServiceUnavailable"
                        | "InternalError"
                )
            ) || s.raw().status().as_u16() >= 500
        }
        _ => false,
    }
}

/// The error code and message, or the error chain when there is none.
fn describe<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    e: &aws_sdk_cloudfront::error::SdkError<E, R>,
) -> String {
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            s
        }
    }
}
