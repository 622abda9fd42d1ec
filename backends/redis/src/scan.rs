//! Listing the keys that hold values ([`CacheStore::scan_values`]): `SCAN`
//! with a `MATCH` on the value keys of this store's prefix. A cluster is
//! scanned one primary at a time (a `SCAN` cursor belongs to one node), in
//! a fixed order of their addresses; the page cursor is
//! `<primary index>:<SCAN cursor>`.
//!
//! [`CacheStore::scan_values`]: cachegate_store::CacheStore::scan_values

use cachegate_store::{ScanPage, StoreError, StoreKey};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;

use crate::conn::Conn;
use crate::{RedisStore, BACKEND};

/// Keys asked of the server per `SCAN` call (a hint: it may return more
/// or fewer).
const SCAN_COUNT: usize = 1000;

impl RedisStore {
    /// One page of the value keys (see the module documentation).
    pub(crate) async fn scan_page(&self, cursor: Option<&str>) -> Result<ScanPage, StoreError> {
        let (node, at) = match cursor {
            None => (0, 0),
            Some(c) => parse_cursor(c)
                .ok_or_else(|| StoreError::backend(BACKEND, format!("not a scan cursor: {c:?}")))?,
        };
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at)
            .arg("MATCH")
            .arg(format!("{}v:{{*", glob_escape(&self.prefix)))
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (reply, nodes) = match self.conn() {
            Conn::Single(mut c) => {
                let reply: Value = self.run("SCAN", cmd.query_async(&mut c)).await?;
                (reply, 1)
            }
            Conn::Cluster(mut c) => {
                let primaries = self.primaries(&mut c).await?;
                let Some((host, port)) = primaries.get(node).cloned() else {
                    return Ok(ScanPage::default());
                };
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let reply = self.run("SCAN", c.route_command(cmd, routing)).await?;
                (reply, primaries.len())
            }
        };
        let (next_at, raw): (u64, Vec<String>) = redis::from_redis_value(reply)
            .map_err(|e| StoreError::backend(BACKEND, format!("SCAN reply: {e}")))?;
        let value_prefix = format!("{}v:{{", self.prefix);
        let keys = raw
            .iter()
            .filter_map(|k| k.strip_prefix(&value_prefix)?.strip_suffix('}'))
            .filter_map(StoreKey::parse)
            .collect();
        let next = if next_at != 0 {
            Some(format!("{node}:{next_at}"))
        } else if node + 1 < nodes {
            Some(format!("{}:0", node + 1))
        } else {
            None
        };
        Ok(ScanPage { keys, next })
    }

    /// The cluster's primaries, `(host, port)` sorted, as `CLUSTER NODES`
    /// reports them (every Redis Cluster answers it).
    async fn primaries(
        &self,
        conn: &mut redis::cluster_async::ClusterConnection,
    ) -> Result<Vec<(String, u16)>, StoreError> {
        let reply = self
            .run(
                "CLUSTER NODES",
                conn.route_command(
                    redis::cmd("CLUSTER").arg("NODES").clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                ),
            )
            .await?;
        let text: String = redis::from_redis_value(reply)
            .map_err(|e| StoreError::backend(BACKEND, format!("CLUSTER NODES reply: {e}")))?;
        let mut primaries = primaries_of(&text);
        primaries.sort();
        Ok(primaries)
    }
}

/// The healthy primaries in a `CLUSTER NODES` reply: one line a node,
/// `<id> <ip:port@cport[,hostname]> <flags> ...`.
fn primaries_of(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_id, addr, flags) = (fields.next()?, fields.next()?, fields.next()?);
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            let addr = addr.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
        })
        .collect()
}

fn parse_cursor(c: &str) -> Option<(usize, u64)> {
    let (node, at) = c.split_once(':')?;
    Some((node.parse().ok()?, at.parse().ok()?))
}

/// `s` with the characters `MATCH` reads as a pattern escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_give_the_healthy_primaries() {
        let reply = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 0 1426238316232 5 connected
";
        let mut p = primaries_of(reply);
        p.sort();
        assert_eq!(
            p,
            vec![
                ("127.0.0.1".to_owned(), 30001),
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30003),
            ]
        );
    }

    #[test]
    fn cursors_and_patterns() {
        assert_eq!(parse_cursor("2:1234"), Some((2, 1234)));
        assert_eq!(parse_cursor("x"), None);
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
