//! Connecting at start-up: the settings checked, TLS, authentication, and
//! errors that say what failed without the password.

use std::sync::Arc;
use std::time::Duration;

use cachegate_store::settings::{redact_url, RedisConfig};
use cachegate_store::{Capabilities, PurgeFeed};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::{
    Client, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind,
    TlsCertificates,
};

use crate::conn::{Conn, Factory, Shared};
use crate::{RedisStore, BACKEND};

/// Why [`connect`] failed. Messages name what failed (which setting, which
/// server) and never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis.{field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("redis.ca_file: cannot read {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("redis at {target}: authentication failed{user}: {message}")]
    Auth {
        target: String,
        user: String,
        message: String,
    },
    #[error("redis at {target}: no answer within {after:?} (connect_timeout); is it reachable, and is TLS (rediss://) right for it?")]
    Timeout { target: String, after: Duration },
    #[error("redis at {target}: {message}")]
    Connect { target: String, message: String },
}

/// The URL(s) of `cfg` with passwords redacted, for messages.
fn describe_target(cfg: &RedisConfig) -> String {
    redact_url(cfg.url.trim())
}

fn node_urls(cfg: &RedisConfig) -> Result<Vec<String>, ConnectError> {
    let urls: Vec<String> = cfg
        .url
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(ConnectError::Config {
            field: "url",
            message: "is empty".into(),
        });
    }
    if urls.len() > 1 && !cfg.cluster {
        return Err(ConnectError::Config {
            field: "url",
            message: "a list of several URLs needs redis.cluster = true".into(),
        });
    }
    Ok(urls)
}

fn connection_info(url: &str, cfg: &RedisConfig) -> Result<ConnectionInfo, ConnectError> {
    let info = url
        .into_connection_info()
        .map_err(|e| ConnectError::Config {
            field: "url",
            // The parser's messages never echo the URL; neither do we (it may
            // hold a password), only its redacted form.
            message: format!("{}: {}", redact_url(url), e),
        })?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &cfg.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &cfg.password {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings))
}

fn tls_certificates(
    cfg: &RedisConfig,
    urls: &[String],
) -> Result<Option<TlsCertificates>, ConnectError> {
    let tls = urls
        .iter()
        .any(|u| u.starts_with("rediss://") || u.starts_with("valkeys://"));
    if tls {
        // rustls needs a process-wide crypto provider when more than one is
        // compiled in; install ours unless someone already did.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(path) = &cfg.ca_file else {
        return Ok(None);
    };
    if !tls {
        return Err(ConnectError::Config {
            field: "ca_file",
            message: "is set but redis.url is not rediss://".into(),
        });
    }
    let pem = std::fs::read(path).map_err(|source| ConnectError::CaFile {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A failed connection attempt as a [`ConnectError`] naming what failed.
fn connect_error(err: RedisError, cfg: &RedisConfig, target: &str) -> ConnectError {
    let auth = err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.kind(), ErrorKind::Server(ServerErrorKind::NoPerm))
        || err
            .code()
            .is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH");
    if auth {
        return ConnectError::Auth {
            target: target.to_owned(),
            user: cfg
                .username
                .as_ref()
                .map(|u| format!(" as user {u:?}"))
                .unwrap_or_default(),
            message: if cfg.password.is_none() {
                format!("{err} (no redis.password configured)")
            } else {
                err.to_string()
            },
        };
    }
    // The cluster client wraps the node's I/O error in its own message.
    if err.is_timeout() || err.to_string().contains("timed out") {
        return ConnectError::Timeout {
            target: target.to_owned(),
            after: cfg.connect_timeout,
        };
    }
    let mut message = err.to_string();
    if message.contains("certificate") && cfg.ca_file.is_none() {
        message.push_str(" (for a private CA, set redis.ca_file)");
    }
    ConnectError::Connect {
        target: target.to_owned(),
        message,
    }
}

/// What a Redis store of `cfg` can do: the one declaration, read by
/// [`connect`] and by whoever needs it before a connection exists (a
/// store that connects later).
pub fn capabilities(cfg: &RedisConfig) -> Capabilities {
    Capabilities {
        name: BACKEND,
        max_value_bytes: cfg.max_value_bytes.as_u64() as usize,
        shared: true,
        purge_feed: PurgeFeed::Push,
        lists_tag_members: true,
        scans_values: true,
        write_ids: true,
    }
}

/// Connects to the Redis (or Redis Cluster) of `cfg` and checks it answers,
/// within `connect_timeout` (a few attempts' worth at most). Call it once at
/// start-up and share the store: it reconnects by itself later.
pub async fn connect(cfg: &RedisConfig) -> Result<RedisStore, ConnectError> {
    cfg.validate().map_err(|e| ConnectError::Config {
        field: e.key.strip_prefix("redis.").unwrap_or(e.key),
        message: e.problem,
    })?;
    let urls = node_urls(cfg)?;
    let target = describe_target(cfg);
    let certs = tls_certificates(cfg, &urls)?;
    let infos = urls
        .iter()
        .map(|u| connection_info(u, cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let subscribe_via = infos
        .iter()
        .map(|info| match &certs {
            Some(certs) => Client::build_with_tls(info.clone(), certs.clone()),
            None => Client::open(info.clone()),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Config {
            field: "url",
            message: e.to_string(),
        })?;

    // The whole start-up is bounded too: the libraries' own retries could
    // otherwise add up to several connect timeouts.
    let overall = cfg.connect_timeout * 2 + cfg.response_timeout;
    let (conn, factory) = tokio::time::timeout(overall, open(cfg, infos, certs, &target))
        .await
        .map_err(|_| ConnectError::Timeout {
            target: target.clone(),
            after: cfg.connect_timeout,
        })??;

    let store = RedisStore {
        shared: Arc::new(Shared::new(conn, factory)),
        subscribe_via: subscribe_via.into(),
        channel: format!("{}purges", cfg.key_prefix).into(),
        connect_timeout: cfg.connect_timeout,
        cluster: cfg.cluster,
        prefix: cfg.key_prefix.as_str().into(),
        target: target.as_str().into(),
        response_timeout: cfg.response_timeout,
        caps: capabilities(cfg),
    };
    // One real command, so a server that accepts connections but refuses
    // our commands (NOAUTH, ACL, not a cluster) fails start-up clearly.
    let mut conn = store.conn();
    match tokio::time::timeout(
        cfg.connect_timeout + cfg.response_timeout,
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(connect_error(e, cfg, &target)),
        Err(_) => {
            return Err(ConnectError::Timeout {
                target,
                after: cfg.connect_timeout,
            })
        }
    }
    tracing::info!(backend = BACKEND, target = %target, cluster = cfg.cluster, "connected to redis");
    Ok(store)
}

/// Extra time a put of `len` bytes gets on top of the response timeout.
pub(crate) fn send_allowance(len: u64) -> Duration {
    Duration::from_millis(len / 32_768)
}

/// The redis library's own per-command timeout: the response timeout plus
/// the allowance of the largest put. Each command is bounded more tightly
/// by [`RedisStore::run`]; this is the second line.
fn library_response_timeout(cfg: &RedisConfig) -> Duration {
    cfg.response_timeout + send_allowance(cfg.max_value_bytes.as_u64())
}

async fn open(
    cfg: &RedisConfig,
    infos: Vec<ConnectionInfo>,
    certs: Option<TlsCertificates>,
    target: &str,
) -> Result<(Conn, Factory), ConnectError> {
    if cfg.cluster {
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(cfg.connect_timeout)
            .response_timeout(library_response_timeout(cfg))
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(200);
        if let Some(user) = &cfg.username {
            builder = builder.username(user);
        }
        if let Some(password) = &cfg.password {
            builder = builder.password(password);
        }
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        let client = builder.build().map_err(|e| ConnectError::Config {
            field: "url",
            message: e.to_string(),
        })?;
        // Both timeouts again: a ClusterConfig replaces the builder's.
        let config = ClusterConfig::new()
            .set_connection_timeout(cfg.connect_timeout)
            .set_response_timeout(library_response_timeout(cfg));
        let conn = client
            .get_async_connection_with_config(config.clone())
            .await
            .map_err(|e| connect_error(e, cfg, target))?;
        return Ok((Conn::Cluster(conn), Factory::Cluster { client, config }));
    }

    let info = infos
        .into_iter()
        .next()
        .expect("node_urls returns at least one");
    let client = match certs {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    }
    .map_err(|e| ConnectError::Config {
        field: "url",
        message: e.to_string(),
    })?;

    // One plain attempt first, for a clear error: the connection manager
    // retries every failure (a wrong password too) with backoff.
    let probe_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cfg.connect_timeout))
        .set_response_timeout(Some(cfg.connect_timeout));
    let probe = client
        .get_multiplexed_async_connection_with_config(&probe_config)
        .await
        .map_err(|e| connect_error(e, cfg, target))?;
    drop(probe);

    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.connect_timeout))
        .set_response_timeout(Some(library_response_timeout(cfg)))
        // Reconnects happen in the background while requests fail fast on
        // their own timeout; keep each reconnect round short so the next
        // request after an outage starts a fresh one soon.
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500));
    let manager = ConnectionManager::new_with_config(client.clone(), config.clone())
        .await
        .map_err(|e| connect_error(e, cfg, target))?;
    Ok((Conn::Single(manager), Factory::Single { client, config }))
}
