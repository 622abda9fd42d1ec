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
        let mut h = KeyHasher::new(domain);
        for p in parts {
            h.part(p.as_ref());
        }
        h.finish()
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

/// [`StoreKey::hash`] one part at a time, for callers whose parts are
/// not one list (the request path builds its key from borrowed header
/// values, with no copy of them). The same parts give the same key.
pub struct KeyHasher(Sha256);

impl KeyHasher {
    pub fn new(domain: &str) -> Self {
        let mut h = KeyHasher(Sha256::new());
        h.part(KEY_VERSION.as_bytes());
        h.part(domain.as_bytes());
        h
    }

    /// Add one part, length-prefixed.
    pub fn part(&mut self, part: &[u8]) -> &mut Self {
        self.0.update((part.len() as u64).to_be_bytes());
        self.0.update(part);
        self
    }

    pub fn finish(self) -> StoreKey {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = self.0.finalize();
        let mut s = String::with_capacity(KEY_VERSION.len() + 1 + 64);
        s.push_str(KEY_VERSION);
        s.push(':');
        // By table: formatting each byte with `{:02x}` was a fifth of a
        // memory hit's instructions.
        for b in digest {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 0xf) as usize] as char);
        }
        StoreKey(s)
    }
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

    /// Keys are stored: a change to how they are spelled would orphan
    /// every entry (the digest computed independently, with Python's
    /// hashlib over the same length-prefixed parts).
    #[test]
    fn keys_keep_their_spelling() {
        let k = StoreKey::hash("response", ["GET", "/items/1"]);
        assert_eq!(
            k.as_str(),
            "cg1:542466efd7dbbce377e50e7973c0a88122f9c734cd946b14e80d20082c510db3"
        );
        let mut h = KeyHasher::new("response");
        h.part(b"GET").part(b"/items/1");
        assert_eq!(h.finish(), k);
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
