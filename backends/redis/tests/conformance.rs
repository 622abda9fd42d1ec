//! The shared conformance suite against a real redis-server and a real
//! 3-node Redis Cluster, both started by scripts/services/redis.sh (run
//! through scripts/test or backends/redis/test.sh). A missing server is a
//! failure, never a skip.

use cachegate_redis::{connect, RedisConfig, RedisStore};

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the Redis servers that \
             scripts/services/redis.sh starts (run scripts/test or backends/redis/test.sh)"
        )
    })
}

mod standalone {
    use super::*;

    async fn store() -> RedisStore {
        let cfg = RedisConfig {
            url: required_env("CACHEGATE_TEST_REDIS_URL"),
            key_prefix: "cgtest:conformance:".into(),
            ..RedisConfig::default()
        };
        connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("connect to standalone redis: {e}"))
    }

    cachegate_store::conformance_tests!(store());
}

mod cluster {
    use super::*;

    async fn store() -> RedisStore {
        let cfg = RedisConfig {
            url: required_env("CACHEGATE_TEST_REDIS_CLUSTER_URL"),
            cluster: true,
            key_prefix: "cgtest:conformance:".into(),
            ..RedisConfig::default()
        };
        connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("connect to redis cluster: {e}"))
    }

    cachegate_store::conformance_tests!(store());
}

mod tls {
    use super::*;

    async fn store() -> RedisStore {
        let cfg = RedisConfig {
            url: required_env("CACHEGATE_TEST_REDIS_TLS_URL"),
            ca_file: Some(required_env("CACHEGATE_TEST_REDIS_TLS_CA").into()),
            key_prefix: "cgtest:conformance:".into(),
            ..RedisConfig::default()
        };
        connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("connect to redis over TLS: {e}"))
    }

    cachegate_store::conformance_tests!(store());
}

/// ElastiCache as usually deployed: cluster mode with TLS in transit.
mod tls_cluster {
    use super::*;

    async fn store() -> RedisStore {
        let cfg = RedisConfig {
            url: required_env("CACHEGATE_TEST_REDIS_TLS_CLUSTER_URL"),
            cluster: true,
            ca_file: Some(required_env("CACHEGATE_TEST_REDIS_TLS_CA").into()),
            key_prefix: "cgtest:conformance:".into(),
            ..RedisConfig::default()
        };
        connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("connect to redis cluster over TLS: {e}"))
    }

    cachegate_store::conformance_tests!(store());
}
