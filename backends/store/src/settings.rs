//! The settings of the shared backends, `[redis]` and `[dynamodb]`, and
//! their checks. They live here, in the crate every build has, rather than
//! in the backend crates, so the proxy validates (and prints) both sections
//! when its configuration loads, whichever backends this build compiles in;
//! the backend crates re-export them and read them when they connect.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// A setting that cannot work: `key` is its full name (`redis.key_prefix`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key `{key}`: {problem}")]
pub struct SettingError {
    pub key: &'static str,
    pub problem: String,
}

fn bad<T>(key: &'static str, problem: impl Into<String>) -> Result<T, SettingError> {
    Err(SettingError {
        key,
        problem: problem.into(),
    })
}

/// Serializes a size so that it reads back exactly: `8MiB`, `64KiB`, or
/// the number of bytes (bytesize's own `Display` rounds to one decimal).
pub fn exact_bytes<S: Serializer>(size: &bytesize::ByteSize, s: S) -> Result<S::Ok, S::Error> {
    let n = size.as_u64();
    const KIB: u64 = 1024;
    match n {
        0 => s.serialize_str("0B"),
        n if n % (KIB * KIB * KIB) == 0 => {
            s.serialize_str(&format!("{}GiB", n / (KIB * KIB * KIB)))
        }
        n if n % (KIB * KIB) == 0 => s.serialize_str(&format!("{}MiB", n / (KIB * KIB))),
        n if n % KIB == 0 => s.serialize_str(&format!("{}KiB", n / KIB)),
        n => s.serialize_str(&format!("{n}B")),
    }
}

// ---------------------------------------------------------------------------
// [redis]

/// URL schemes the Redis client takes (`valkey` are its aliases).
const REDIS_SCHEMES: &[&str] = &["redis", "rediss", "valkey", "valkeys", "redis+unix", "unix"];

/// How to reach Redis. Read from the `[redis]` section of the figment
/// configuration, so every field also comes from the environment as
/// `CACHEGATE_REDIS__<FIELD>` (e.g. `CACHEGATE_REDIS__URL`,
/// `CACHEGATE_REDIS__PASSWORD`).
///
/// `Debug` never shows the password (neither the field nor one written into
/// the URL).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password or ElastiCache AUTH token. Overrides one written in the URL.
    /// Redacted in `Debug`, logs and errors. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    #[serde(serialize_with = "exact_bytes")]
    pub max_value_bytes: bytesize::ByteSize,
    /// PEM file with the CA certificate(s) that sign the server's
    /// certificate, for a private CA. Needs a `rediss://` URL. Default: none,
    /// the system's root certificates (enough for ElastiCache).
    #[serde(skip_serializing_if = "Option::is_none")]
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

impl RedisConfig {
    /// Checks what can be checked without a server: the URL(s) and their
    /// scheme, the key prefix, the time bounds, the value limit, the CA file.
    pub fn validate(&self) -> Result<(), SettingError> {
        let urls: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return bad("redis.url", "is empty");
        }
        if urls.len() > 1 && !self.cluster {
            return bad(
                "redis.url",
                "a list of several URLs needs redis.cluster = true",
            );
        }
        let mut tls = None;
        for url in &urls {
            let Some((scheme, rest)) = url.split_once("://") else {
                return bad(
                    "redis.url",
                    format!(
                        "`{}` is not a URL (redis://host:port or rediss://host:port)",
                        redact_url(url)
                    ),
                );
            };
            if !REDIS_SCHEMES.contains(&scheme) {
                return bad(
                    "redis.url",
                    format!(
                        "scheme `{scheme}` in `{}`: must be redis:// or rediss:// (TLS)",
                        redact_url(url)
                    ),
                );
            }
            let is_unix = scheme.ends_with("unix");
            if !is_unix
                && rest
                    .rsplit('@')
                    .next()
                    .is_none_or(|h| h.starts_with([':', '/']) || h.is_empty())
            {
                return bad("redis.url", format!("`{}` has no host", redact_url(url)));
            }
            let this_tls = matches!(scheme, "rediss" | "valkeys");
            if tls.is_some_and(|t| t != this_tls) {
                return bad("redis.url", "mixes TLS (rediss://) and plain URLs");
            }
            tls = Some(this_tls);
        }
        if self.cluster && urls.iter().any(|u| u.contains("unix://")) {
            return bad(
                "redis.url",
                "a cluster cannot be reached over a Unix socket",
            );
        }
        if self.key_prefix.contains(['{', '}']) {
            return bad(
                "redis.key_prefix",
                "must not contain '{' or '}' (keys use Redis Cluster hash tags)",
            );
        }
        if self.connect_timeout.is_zero() {
            return bad("redis.connect_timeout", "must be more than 0s");
        }
        if self.response_timeout.is_zero() {
            return bad("redis.response_timeout", "must be more than 0s");
        }
        if self.max_value_bytes.as_u64() == 0 {
            return bad("redis.max_value_bytes", "must be more than 0");
        }
        if usize::try_from(self.max_value_bytes.as_u64()).is_err() {
            return bad("redis.max_value_bytes", "too large for this platform");
        }
        if self.ca_file.is_some() && tls != Some(true) {
            return bad("redis.ca_file", "is set but redis.url is not rediss://");
        }
        if self.username.as_deref() == Some("") {
            return bad(
                "redis.username",
                "is empty (leave it unset for the default user)",
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// [dynamodb]

/// zstd's compression levels (`ZSTD_minCLevel()..=ZSTD_maxCLevel()`, zstd
/// 1.5); the dynamodb crate checks this against the library it links.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -(1 << 17)..=22;

/// Settings of the DynamoDB backend: the `[dynamodb]` section of the
/// configuration (env `CACHEGATE_DYNAMODB__<FIELD>`). Region, credentials
/// and endpoint come from the AWS SDK's own sources (`AWS_REGION`,
/// `AWS_ENDPOINT_URL_DYNAMODB`, the credential chain).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoConfig {
    /// Name of the table. Default `cachegate`. Env `CACHEGATE_DYNAMODB__TABLE`.
    pub table: String,
    /// Strongly consistent reads of value items (twice the read cost; a
    /// value written by another instance is seen at once instead of within
    /// about a second). Chunks are always read consistently. Default `false`.
    pub consistent_read: bool,
    /// Longest one DynamoDB call may take, retries included; a call that
    /// takes longer fails with a timeout. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// Largest value (bytes before compression) the backend accepts; larger
    /// puts fail with `TooLarge`. Default `6291456` (6 MiB, the Lambda
    /// response limit).
    pub max_value_bytes: usize,
    /// zstd compression level (1 fastest .. 19 smallest; negative levels
    /// are faster still). Default `3`.
    pub compression_level: i32,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig {
            table: "cachegate".into(),
            consistent_read: false,
            operation_timeout: Duration::from_secs(1),
            max_value_bytes: 6 * 1024 * 1024,
            compression_level: 3,
        }
    }
}

impl DynamoConfig {
    /// Checks the table name (DynamoDB's rules), the time bound, the value
    /// limit and the compression level.
    pub fn validate(&self) -> Result<(), SettingError> {
        // DynamoDB table names: 3-255 of [a-zA-Z0-9_.-].
        if !(3..=255).contains(&self.table.len())
            || !self
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return bad(
                "dynamodb.table",
                format!(
                    "`{}`: must be 3 to 255 characters of a-z, A-Z, 0-9, `_`, `-`, `.`",
                    self.table
                ),
            );
        }
        if self.operation_timeout.is_zero() {
            return bad("dynamodb.operation_timeout", "must be more than 0s");
        }
        if self.max_value_bytes == 0 {
            return bad("dynamodb.max_value_bytes", "must be more than 0");
        }
        if !ZSTD_LEVELS.contains(&self.compression_level) {
            return bad(
                "dynamodb.compression_level",
                format!(
                    "{} is outside zstd's {}..={}",
                    self.compression_level,
                    ZSTD_LEVELS.start(),
                    ZSTD_LEVELS.end()
                ),
            );
        }
        Ok(())
    }
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
    fn redis_settings_name_the_bad_key() {
        assert_eq!(RedisConfig::default().validate(), Ok(()));
        let key = |cfg: RedisConfig| match cfg.validate() {
            Err(e) => e.key,
            Ok(()) => panic!("accepted: {cfg:?}"),
        };
        let d = RedisConfig::default;
        assert_eq!(
            key(RedisConfig {
                key_prefix: "a{b".into(),
                ..d()
            }),
            "redis.key_prefix"
        );
        assert_eq!(
            key(RedisConfig {
                url: "http://h:1".into(),
                ..d()
            }),
            "redis.url"
        );
        assert_eq!(
            key(RedisConfig {
                url: "h:6379".into(),
                ..d()
            }),
            "redis.url"
        );
        assert_eq!(
            key(RedisConfig {
                url: "redis://a:1,redis://b:1".into(),
                ..d()
            }),
            "redis.url"
        );
        assert_eq!(
            key(RedisConfig {
                url: "redis://a:1,rediss://b:1".into(),
                cluster: true,
                ..d()
            }),
            "redis.url"
        );
        assert_eq!(
            key(RedisConfig {
                connect_timeout: Duration::ZERO,
                ..d()
            }),
            "redis.connect_timeout"
        );
        assert_eq!(
            key(RedisConfig {
                response_timeout: Duration::ZERO,
                ..d()
            }),
            "redis.response_timeout"
        );
        assert_eq!(
            key(RedisConfig {
                max_value_bytes: bytesize::ByteSize::b(0),
                ..d()
            }),
            "redis.max_value_bytes"
        );
        assert_eq!(
            key(RedisConfig {
                ca_file: Some("ca.pem".into()),
                ..d()
            }),
            "redis.ca_file"
        );
        let ok = RedisConfig {
            url: "rediss://u:p@h:6380/0,rediss://g:1".into(),
            cluster: true,
            ca_file: Some("ca.pem".into()),
            ..d()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn dynamodb_settings_name_the_bad_key() {
        assert_eq!(DynamoConfig::default().validate(), Ok(()));
        let key = |cfg: DynamoConfig| match cfg.validate() {
            Err(e) => e.key,
            Ok(()) => panic!("accepted: {cfg:?}"),
        };
        let d = DynamoConfig::default;
        for table in ["ab", "has space", "a/b", &"x".repeat(256)] {
            assert_eq!(
                key(DynamoConfig {
                    table: table.into(),
                    ..d()
                }),
                "dynamodb.table"
            );
        }
        assert_eq!(
            key(DynamoConfig {
                operation_timeout: Duration::ZERO,
                ..d()
            }),
            "dynamodb.operation_timeout"
        );
        assert_eq!(
            key(DynamoConfig {
                max_value_bytes: 0,
                ..d()
            }),
            "dynamodb.max_value_bytes"
        );
        assert_eq!(
            key(DynamoConfig {
                compression_level: 23,
                ..d()
            }),
            "dynamodb.compression_level"
        );
        assert_eq!(
            DynamoConfig {
                table: "My_table.v-2".into(),
                compression_level: -5,
                ..d()
            }
            .validate(),
            Ok(())
        );
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
