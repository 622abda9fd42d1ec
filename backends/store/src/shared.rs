//! The checks every backend's [`CacheStore::put`](crate::CacheStore::put)
//! makes before it writes anything, written once so all backends agree:
//! the size limit, a value that is dead on arrival, and the tag list.

use crate::{is_expired, now_millis, Capabilities, PutOptions, StoreError, UnixMillis};

/// What a put has to do, decided by [`prepare_put`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutPlan<'a> {
    /// `expires_at` has already passed: whatever was stored under the key
    /// is replaced by nothing (the backend deletes it).
    Remove,
    /// Store the value.
    Store(PreparedPut<'a>),
}

/// A put that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPut<'a> {
    /// The time the checks used; backends derive relative TTLs from it.
    pub now: UnixMillis,
    /// The value's tags, sorted and without duplicates.
    pub tags: Vec<&'a str>,
}

/// Checks a put of `value_len` bytes with `opts` against `caps`: a value
/// over [`Capabilities::max_value_bytes`] is [`StoreError::TooLarge`], one
/// already expired is [`PutPlan::Remove`]; otherwise the tags to record,
/// sorted and deduplicated.
pub fn prepare_put<'a>(
    caps: &Capabilities,
    value_len: usize,
    opts: &'a PutOptions,
) -> Result<PutPlan<'a>, StoreError> {
    if value_len > caps.max_value_bytes {
        return Err(StoreError::TooLarge {
            backend: caps.name,
            size: value_len,
            limit: caps.max_value_bytes,
        });
    }
    let now = now_millis();
    if is_expired(opts.expires_at, now) {
        return Ok(PutPlan::Remove);
    }
    let mut tags: Vec<&str> = opts.tags.iter().map(String::as_str).collect();
    tags.sort_unstable();
    tags.dedup();
    Ok(PutPlan::Store(PreparedPut { now, tags }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PurgeFeed;

    fn caps(max_value_bytes: usize) -> Capabilities {
        Capabilities {
            name: "test",
            max_value_bytes,
            shared: false,
            purge_feed: PurgeFeed::Local,
            lists_tag_members: false,
            scans_values: false,
            write_ids: false,
        }
    }

    #[test]
    fn too_large_names_size_and_limit() {
        let opts = PutOptions {
            expires_at: now_millis() + 60_000,
            tags: vec![],
        };
        assert!(matches!(
            prepare_put(&caps(10), 10, &opts),
            Ok(PutPlan::Store(_))
        ));
        match prepare_put(&caps(10), 11, &opts) {
            Err(StoreError::TooLarge {
                backend: "test",
                size: 11,
                limit: 10,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expired_on_put_is_a_remove() {
        let now = now_millis();
        for expires_at in [0, now.saturating_sub(1)] {
            let opts = PutOptions {
                expires_at,
                tags: vec!["a".into()],
            };
            assert_eq!(prepare_put(&caps(10), 1, &opts).unwrap(), PutPlan::Remove);
        }
    }

    #[test]
    fn tags_sorted_and_deduplicated() {
        let opts = PutOptions {
            expires_at: now_millis() + 60_000,
            tags: vec!["b".into(), "a".into(), "b".into(), "".into()],
        };
        let PutPlan::Store(put) = prepare_put(&caps(10), 1, &opts).unwrap() else {
            panic!("live value not stored");
        };
        assert_eq!(put.tags, ["", "a", "b"]);
        assert!(put.now < opts.expires_at);
    }
}
