//! Store keys: fixed-length, versioned hashes that are safe in every backend.

use std::fmt;

use sha2::{Digest, Sha256};

/// Bumped whenever what goes into a key or the record layout changes, so a
/// new build never reads entries written by an older one.
pub const KEY_VERSION: &str = "cg1";

/// A hashed cache key: `cg1:` followed by 64 hex digits.
///
/// Built only by hashing length-prefixed parts, so no choice of path, query
/// or header values can make two different part lists collide by
/// concatenation (`["a/b", "c"]` and `["a", "b/c"]` hash differently).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(String);

impl StoreKey {
    /// Hash `parts` under a `domain` (what the key names: "response",
    /// "variant", "tag", "lock", ...). Different domains never collide.
    pub fn hash<I, P>(domain: &str, parts: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut h = Sha256::new();
        feed(&mut h, KEY_VERSION.as_bytes());
        feed(&mut h, domain.as_bytes());
        for p in parts {
            feed(&mut h, p.as_ref());
        }
        let digest = h.finalize();
        let mut s = String::with_capacity(KEY_VERSION.len() + 1 + 64);
        s.push_str(KEY_VERSION);
        s.push(':');
        for b in digest {
            use fmt::Write;
            let _ = write!(s, "{b:02x}");
        }
        StoreKey(s)
    }

    /// The key a value-less namespace (a tag's member set) is kept under.
    pub fn for_tag(tag: &str) -> Self {
        Self::hash("tag", [tag])
    }

    /// The digest part without the version prefix (64 hex digits).
    pub fn digest(&self) -> &str {
        &self.0[KEY_VERSION.len() + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Re-read a key previously produced by [`StoreKey::as_str`] (for
    /// backends that keep keys in tag sets). Rejects anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let digest = s.strip_prefix(KEY_VERSION)?.strip_prefix(':')?;
        (digest.len() == 64
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| StoreKey(s.to_owned()))
    }
}

fn feed(h: &mut Sha256, part: &[u8]) {
    h.update((part.len() as u64).to_be_bytes());
    h.update(part);
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({})", &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenation_cannot_collide() {
        assert_ne!(
            StoreKey::hash("response", ["a/b", "c"]),
            StoreKey::hash("response", ["a", "b/c"])
        );
        assert_ne!(
            StoreKey::hash("response", ["ab"]),
            StoreKey::hash("variant", ["ab"])
        );
    }

    #[test]
    fn keys_are_fixed_length_and_parse_back() {
        let k = StoreKey::hash("response", ["GET", "/items/1"]);
        assert_eq!(k.as_str().len(), 3 + 1 + 64);
        assert_eq!(StoreKey::parse(k.as_str()), Some(k.clone()));
        assert_eq!(StoreKey::parse("cg0:abc"), None);
        assert_eq!(StoreKey::parse(&format!("{}x", k.as_str())), None);
    }
}
