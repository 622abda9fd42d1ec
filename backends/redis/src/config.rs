//! The `[redis]` section of the proxy's configuration.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// How to reach Redis. Read from the `[redis]` section of the figment
/// configuration, so every field also comes from the environment as
/// `CACHEGATE_REDIS__<FIELD>` (e.g. `CACHEGATE_REDIS__URL`,
/// `CACHEGATE_REDIS__PASSWORD`).
///
/// `Debug` never shows the password (neither the field nor one written into
/// the URL).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// The server: `redis://host:port[/db]`, or `rediss://host:port` for TLS
    /// in transit (ElastiCache "encryption in transit"). With `cluster =
    /// true`, the cluster's configuration endpoint or any node, or a
    /// comma-separated list of node URLs (all with the same scheme).
    /// Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// ACL user name (Redis 6+ / ElastiCache RBAC). Default: none (the
    /// `default` user, or a user name written in the URL).
    pub username: Option<String>,
    /// Password or ElastiCache AUTH token. Overrides one written in the URL.
    /// Redacted in `Debug`, logs and errors. Default: none.
    pub password: Option<String>,
    /// Redis Cluster (ElastiCache "cluster mode enabled"): use the cluster
    /// client, which follows the slot map and MOVED/ASK redirections.
    /// Default `false`.
    pub cluster: bool,
    /// Prefix of every key this deployment writes, so several deployments
    /// can share one Redis. Must not contain `{` or `}` (the key layout uses
    /// hash tags). Default `cachegate:`.
    pub key_prefix: String,
    /// Longest one connection attempt (TCP, TLS handshake, AUTH) may take,
    /// at start-up and on every reconnect. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest one command may wait for its reply (or for a reconnect in
    /// progress) before it fails. A backstop: the proxy's tighter per-call
    /// bounds (`[store] read_timeout`, `write_timeout`) apply on top. A put
    /// gets 1 ms more per 32 KiB of value (8 MiB: +256 ms).
    /// Default `250ms`.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Largest value (encoded record) stored; larger puts fail with
    /// `TooLarge` and the proxy does not cache them. Default `8MiB`.
    pub max_value_bytes: bytesize::ByteSize,
    /// PEM file with the CA certificate(s) that sign the server's
    /// certificate, for a private CA. Needs a `rediss://` URL. Default: none,
    /// the system's root certificates (enough for ElastiCache).
    pub ca_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            username: None,
            password: None,
            cluster: false,
            key_prefix: "cachegate:".into(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(250),
            max_value_bytes: bytesize::ByteSize::mib(8),
            ca_file: None,
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so a new field cannot be forgotten here.
        let RedisConfig {
            url,
            username,
            password,
            cluster,
            key_prefix,
            connect_timeout,
            response_timeout,
            max_value_bytes,
            ca_file,
        } = self;
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(url))
            .field("username", username)
            .field("password", &password.as_ref().map(|_| "<redacted>"))
            .field("cluster", cluster)
            .field("key_prefix", key_prefix)
            .field("connect_timeout", connect_timeout)
            .field("response_timeout", response_timeout)
            .field("max_value_bytes", max_value_bytes)
            .field("ca_file", ca_file)
            .finish()
    }
}

/// `url` (one URL or a comma-separated list) with any password written in
/// it replaced by `<redacted>`: `redis://user:secret@host` becomes
/// `redis://user:<redacted>@host`. Safe to log.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let Some(scheme_end) = one.find("://") else {
                return one.to_owned();
            };
            let rest = &one[scheme_end + 3..];
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let authority = &rest[..authority_end];
            let Some(at) = authority.rfind('@') else {
                return one.to_owned();
            };
            let userinfo = &authority[..at];
            let user = match userinfo.find(':') {
                Some(colon) => format!("{}:<redacted>", &userinfo[..colon]),
                None => userinfo.to_owned(),
            };
            format!("{}{}@{}", &one[..scheme_end + 3], user, &rest[at + 1..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("rediss://app:s3cr3t@h:6380/0"),
            "rediss://app:<redacted>@h:6380/0"
        );
        assert_eq!(
            redact_url("redis://:pw@a:1,redis://:pw@b:2"),
            "redis://:<redacted>@a:1,redis://:<redacted>@b:2"
        );
        assert_eq!(redact_url("redis://user@h"), "redis://user@h");
        // An '@' inside the password itself.
        assert_eq!(redact_url("redis://u:p@ss@h:1"), "redis://u:<redacted>@h:1");
    }

    #[test]
    fn debug_hides_the_password() {
        let cfg = RedisConfig {
            url: "redis://u:inurl-secret@h:1".into(),
            password: Some("field-secret".into()),
            ..RedisConfig::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
