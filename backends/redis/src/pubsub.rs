//! The purge channel's subscription, kept by a task of its own.

use std::sync::{Arc, Weak};
use std::time::Duration;

use cachegate_store::{PurgeListener, PurgeNotice};
use futures_util::StreamExt;
use redis::{Client, RedisError, Value};

use crate::BACKEND;

/// How often the purge subscription's connection is pinged.
const SUBSCRIPTION_PING_EVERY: Duration = Duration::from_secs(1);

/// Classic pub/sub on one channel rather than sharded (SSUBSCRIBE): every
/// node of a cluster delivers every PUBLISH, so a subscription through any
/// node (the configuration endpoint's, or the next one after a failover)
/// hears every purge, with no slot to follow. Purges are rare next to
/// requests, so the cluster bus carrying each to every node costs nothing
/// that matters.
pub(crate) async fn keep_subscribed(
    via: Arc<[Client]>,
    channel: Arc<str>,
    listener: Weak<dyn PurgeListener>,
    limit: Duration,
) {
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(20);
    loop {
        if listener.strong_count() == 0 {
            return;
        }
        let client = &via[attempt % via.len()];
        attempt += 1;
        let made = tokio::time::timeout(limit, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&*channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        let pubsub = match made {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {limit:?}"),
                };
                tracing::debug!(
                    backend = BACKEND,
                    error,
                    "purge subscription failed; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        let Some(l) = listener.upgrade() else { return };
        l.subscribed(true).await;
        drop(l);
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(SUBSCRIPTION_PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Some(l) = listener.upgrade() else { return };
                    match PurgeNotice::decode(msg.get_payload_bytes()) {
                        Some(notice) => l.purged(notice).await,
                        // Not ours (someone else publishing on the channel):
                        // flushing is the safe reading of it.
                        None => l.subscribed(true).await,
                    }
                }
                _ = ping.tick() => {
                    if listener.strong_count() == 0 {
                        return;
                    }
                    let pong = tokio::time::timeout(limit, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        let Some(l) = listener.upgrade() else { return };
        tracing::warn!(
            backend = BACKEND,
            "redis purge subscription lost; subscribing again"
        );
        l.subscribed(false).await;
    }
}
