//! The connection every clone of a [`RedisStore`] shares, how it is
//! replaced when it goes silent, and how each command is bounded.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use cachegate_store::StoreError;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::{RedisStore, BACKEND};

/// The connection every clone of a [`RedisStore`] shares.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Makes a fresh connection of the configured kind without waiting for it
/// (it connects on first use).
pub(crate) enum Factory {
    Single {
        client: Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: ClusterClient,
        config: ClusterConfig,
    },
}

impl Factory {
    fn fresh(&self) -> Result<Conn, RedisError> {
        match self {
            Factory::Single { client, config } => {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(Conn::Single)
            }
            Factory::Cluster { client, config } => Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(config.clone()),
            )),
        }
    }
}

/// Commands in a row that got no reply at all before a fresh connection
/// replaces the current one.
const STALL_LIMIT: u32 = 2;
/// At most one replacement per this interval.
const MIN_REPLACE_INTERVAL: Duration = Duration::from_secs(1);

/// What every clone of a [`RedisStore`] shares.
///
/// The connection manager reconnects by itself when the connection fails
/// (reset, refused, closed), but not when it goes silent: a reply that
/// never comes is a timeout, which it retries on the same socket. That is
/// what a connection dropped without a reset looks like, e.g. one that sat
/// idle in a frozen Lambda execution environment past the 350 s idle limit
/// of Lambda's VPC networking. So commands that get no reply (they time out
/// here, or the caller's own timeout drops them first) are counted, and
/// after [`STALL_LIMIT`] in a row with no reply in between the connection is
/// replaced by a fresh one.
pub(crate) struct Shared {
    conn: RwLock<Conn>,
    factory: Factory,
    stalled: AtomicU32,
    last_replaced: Mutex<Option<Instant>>,
}

impl Shared {
    pub(crate) fn new(conn: Conn, factory: Factory) -> Self {
        Shared {
            conn: RwLock::new(conn),
            factory,
            stalled: AtomicU32::new(0),
            last_replaced: Mutex::new(None),
        }
    }

    fn conn(&self) -> Conn {
        if self.stalled.load(Ordering::Relaxed) >= STALL_LIMIT {
            self.replace_connection();
        }
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace_connection(&self) {
        let mut last = self.last_replaced.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < MIN_REPLACE_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        let stalled = self.stalled.swap(0, Ordering::Relaxed);
        match self.factory.fresh() {
            Ok(fresh) => {
                *self.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                tracing::warn!(
                    backend = BACKEND,
                    unanswered = stalled,
                    "redis connection stopped answering; replaced it with a fresh one"
                );
            }
            Err(e) => tracing::warn!(
                backend = BACKEND,
                error = %e,
                "redis connection stopped answering and a fresh one could not be made"
            ),
        }
    }
}

/// Counts a command as unanswered unless it is marked answered before it
/// is dropped (which also covers the caller's timeout dropping it).
struct InFlight<'a> {
    shared: &'a Shared,
    answered: bool,
}

impl InFlight<'_> {
    fn answered(mut self) {
        self.answered = true;
        self.shared.stalled.store(0, Ordering::Relaxed);
    }
    /// Failed without a reply from the server, but not by silence (refused,
    /// reset): the connection manager reconnects by itself.
    fn failed_fast(mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.shared.stalled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A Redis error as a store error. Redis error texts name the command and
/// the server's reply, never credentials.
pub(crate) fn backend_err(err: RedisError) -> StoreError {
    if err.is_timeout() {
        return StoreError::Backend {
            backend: BACKEND,
            message: format!("timed out: {err}"),
        };
    }
    StoreError::backend(BACKEND, err)
}

impl RedisStore {
    pub(crate) fn conn(&self) -> Conn {
        self.shared.conn()
    }

    /// One command (or script call), bounded by the response timeout, which
    /// also covers waiting for a reconnect in progress.
    pub(crate) async fn run<T, F>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        self.run_within(what, self.response_timeout, op).await
    }

    pub(crate) async fn run_within<T, F>(
        &self,
        what: &'static str,
        limit: Duration,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        let in_flight = InFlight {
            shared: &self.shared,
            answered: false,
        };
        match tokio::time::timeout(limit, op).await {
            Ok(Ok(v)) => {
                in_flight.answered();
                Ok(v)
            }
            Ok(Err(e)) => {
                if e.is_timeout() {
                    drop(in_flight);
                } else if e.is_io_error() || e.is_connection_dropped() {
                    in_flight.failed_fast();
                } else {
                    // The server replied, with an error.
                    in_flight.answered();
                }
                Err(backend_err(e))
            }
            Err(_) => {
                drop(in_flight);
                Err(StoreError::Backend {
                    backend: BACKEND,
                    message: format!("{what}: no reply within {limit:?} (response_timeout)"),
                })
            }
        }
    }
}
