//! Build the configured cache: the backend, its guard, and the L1.

use std::sync::Arc;

#[cfg(any(feature = "redis", feature = "dynamodb"))]
use std::time::Duration;

use cachegate_store::guard::GuardedStore;
#[cfg(any(feature = "redis", feature = "dynamodb"))]
use cachegate_store::lazy::{Connect, ConnectFailure, LazyStore};
use cachegate_store::memory::MemoryStore;
use cachegate_store::tiered::{L1Config, TieredCache};
use cachegate_store::CacheStore;
#[cfg(any(feature = "redis", feature = "dynamodb"))]
use cachegate_store::Capabilities;

use crate::config::{BackendKind, Config};

/// Why the configured backend could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend `{0}` is not compiled into this build (enable the cargo feature `{0}`)")]
    NotBuilt(&'static str),
    #[error("{0}")]
    Connect(String),
    /// Something outside cachegate's own configuration that the backend
    /// needs and does not have (no AWS region): start-up stops, exit 2.
    #[error("{0}")]
    Setup(String),
}

/// Largest entry the memory store takes: bounded by the entry limit and a
/// fraction of its capacity, so one entry cannot evict everything.
fn memory_store(config: &Config) -> MemoryStore {
    let capacity = config.memory.capacity.as_u64();
    let max_value = (config.cache.max_entry_bytes.as_u64() + 64 * 1024).min(capacity / 8) as usize;
    MemoryStore::new(capacity, max_value)
}

/// The cache the proxy uses, per `config.backend`.
pub async fn build_cache(config: &Config) -> Result<TieredCache, BackendError> {
    let main: Arc<dyn CacheStore> = match config.backend {
        BackendKind::Memory => {
            let store = memory_store(config);
            let guarded = GuardedStore::new(Arc::new(store.clone()), config.store.clone());
            return Ok(TieredCache::new(guarded, None)
                .with_memory_main(store)
                .with_soft_purge_window(config.cache.stale_while_revalidate));
        }
        BackendKind::Redis => connect_redis(config).await?,
        BackendKind::Dynamodb => connect_dynamodb(config).await?,
    };
    let l1 = (!config.cache.l1_ttl.is_zero()).then(|| L1Config {
        store: memory_store(config),
        ttl: config.cache.l1_ttl,
        check_every: config.cache.l1_check,
    });
    // With the L1 off, `memory.capacity` bounds the decoded copies kept
    // beside the reads instead: a hit whose value has not changed in the
    // backend is not decoded (nor its gzip body inflated) again.
    Ok(
        TieredCache::new(GuardedStore::new(main, config.store.clone()), l1)
            .with_prepared_reads(memory_store(config))
            .with_soft_purge_window(config.cache.stale_while_revalidate),
    )
}

/// How often a backend that was unreachable at start-up is tried again.
#[cfg(any(feature = "redis", feature = "dynamodb"))]
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Connect now if possible; otherwise start without the cache (every
/// operation a miss) and keep trying in the background of requests. A cache
/// that is down when a Lambda instance starts must not fail the instance.
/// The failure is logged here, once, saying whether it is permanent (fix
/// the setup) or transient (it is retried); the retries log only a change.
#[cfg(any(feature = "redis", feature = "dynamodb"))]
async fn connect_or_defer(caps: Capabilities, connect: Connect) -> Arc<dyn CacheStore> {
    match connect().await {
        Ok(store) => store,
        Err(failure) => {
            let lazy = LazyStore::new(
                caps.clone(),
                connect,
                RECONNECT_EVERY,
                Some(failure.clone()),
            );
            tracing::error!(
                backend = caps.name,
                error = %failure.message,
                failure = failure.kind(),
                retry_every = ?lazy.retry_after(&failure),
                "cache backend unreachable at start-up; serving without it until it connects"
            );
            Arc::new(lazy)
        }
    }
}

#[cfg(feature = "redis")]
fn redis_failure(e: cachegate_redis::ConnectError) -> ConnectFailure {
    use cachegate_redis::ConnectError as E;
    let permanent = matches!(e, E::Config { .. } | E::CaFile { .. } | E::Auth { .. });
    ConnectFailure {
        message: e.to_string(),
        permanent,
    }
}

#[cfg(feature = "redis")]
async fn connect_redis(config: &Config) -> Result<Arc<dyn CacheStore>, BackendError> {
    let cfg = config.redis.clone();
    let caps = cachegate_redis::capabilities(&cfg);
    let connect: Connect = Arc::new(move || {
        let cfg = cfg.clone();
        Box::pin(async move {
            let store = cachegate_redis::connect(&cfg)
                .await
                .map_err(redis_failure)?;
            Ok(Arc::new(store) as Arc<dyn CacheStore>)
        })
    });
    Ok(connect_or_defer(caps, connect).await)
}

#[cfg(not(feature = "redis"))]
async fn connect_redis(_: &Config) -> Result<Arc<dyn CacheStore>, BackendError> {
    Err(BackendError::NotBuilt("redis"))
}

#[cfg(feature = "dynamodb")]
fn dynamodb_failure(e: cachegate_dynamodb::ConnectError) -> ConnectFailure {
    // Making the client contacts nothing: every failure here is setup.
    ConnectFailure::permanent(e.to_string())
}

#[cfg(feature = "dynamodb")]
async fn connect_dynamodb(config: &Config) -> Result<Arc<dyn CacheStore>, BackendError> {
    let cfg = config.dynamodb.clone();
    let caps = cachegate_dynamodb::capabilities(&cfg);
    // Making the client reads the region from the SDK's sources (env,
    // profile, instance metadata) and contacts no table; without a region
    // no call can work, so start-up stops and says so.
    let first = match cachegate_dynamodb::connect(&cfg).await {
        Ok(store) => return Ok(Arc::new(store)),
        Err(e @ cachegate_dynamodb::ConnectError::NoRegion) => {
            return Err(BackendError::Setup(format!("dynamodb: {e}")))
        }
        Err(e) => dynamodb_failure(e),
    };
    let connect: Connect = Arc::new(move || {
        let cfg = cfg.clone();
        Box::pin(async move {
            let store = cachegate_dynamodb::connect(&cfg)
                .await
                .map_err(dynamodb_failure)?;
            Ok(Arc::new(store) as Arc<dyn CacheStore>)
        })
    });
    tracing::error!(backend = caps.name, error = %first.message, failure = first.kind(), "cache backend unusable at start-up; serving without it");
    Ok(Arc::new(LazyStore::new(
        caps,
        connect,
        RECONNECT_EVERY,
        Some(first),
    )))
}

#[cfg(not(feature = "dynamodb"))]
async fn connect_dynamodb(_: &Config) -> Result<Arc<dyn CacheStore>, BackendError> {
    Err(BackendError::NotBuilt("dynamodb"))
}

/// `cachegate init`: make the configured backend ready and say what was done.
pub async fn init(config: &Config) -> Result<(), BackendError> {
    match config.backend {
        BackendKind::Memory => {
            crate::output::println("memory backend: nothing to prepare");
            Ok(())
        }
        BackendKind::Redis => init_redis(config).await,
        BackendKind::Dynamodb => init_dynamodb(config).await,
    }
}

#[cfg(feature = "redis")]
async fn init_redis(config: &Config) -> Result<(), BackendError> {
    let store = cachegate_redis::connect(&config.redis)
        .await
        .map_err(|e| BackendError::Connect(format!("redis: {e}")))?;
    store
        .ping()
        .await
        .map_err(|e| BackendError::Connect(format!("redis: {e}")))?;
    crate::output::println(&format!("redis backend: {} answers", store.target()));
    Ok(())
}

#[cfg(not(feature = "redis"))]
async fn init_redis(_: &Config) -> Result<(), BackendError> {
    Err(BackendError::NotBuilt("redis"))
}

#[cfg(feature = "dynamodb")]
async fn init_dynamodb(config: &Config) -> Result<(), BackendError> {
    let store = cachegate_dynamodb::connect(&config.dynamodb)
        .await
        .map_err(|e| match e {
            // As at start-up (`connect_dynamodb`): no call can work.
            cachegate_dynamodb::ConnectError::NoRegion => {
                BackendError::Setup(format!("dynamodb: {e}"))
            }
            _ => BackendError::Connect(format!("dynamodb: {e}")),
        })?;
    let status = store
        .ensure_table()
        .await
        .map_err(|e| BackendError::Connect(format!("dynamodb: {e}")))?;
    crate::output::println(&format!(
        "dynamodb backend: table `{}`: {status:?}",
        config.dynamodb.table
    ));
    Ok(())
}

#[cfg(not(feature = "dynamodb"))]
async fn init_dynamodb(_: &Config) -> Result<(), BackendError> {
    Err(BackendError::NotBuilt("dynamodb"))
}
