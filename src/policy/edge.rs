//! The `Cache-Control` sent to the next cache out (CloudFront, browsers).

use crate::routes::Rule;

pub fn edge_cache_control(fresh_secs_left: u64, rule: &Rule) -> String {
    let cap = rule.edge_ttl.map_or(u64::MAX, |d| d.as_secs());
    let ttl = fresh_secs_left.min(cap);
    if rule.keys_on_authorization() {
        format!("private, max-age={ttl}")
    } else {
        format!("public, max-age={ttl}, s-maxage={ttl}")
    }
}
