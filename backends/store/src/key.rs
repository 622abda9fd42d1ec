//! Store keys: fixed-length, versioned hashes that are safe in every backend.

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};

use sha2::{Digest, Sha256};

/// Bumped whenever what goes into a key or the record layout changes, so a
/// new build never reads entries written by an older one.
pub const KEY_VERSION: &str = "cg1";

/// A hashed cache key: `cg1:` followed by 64 hex digits.
///
/// Built only by hashing length-prefixed parts, so no choice of path, query
/// or header values can make two different part lists collide by
/// concatenation (`["a/b", "c"]` and `["a", "b/c"]` hash differently).
///
/// Shared (`Arc<str>`): a key is cloned into traces, locks and the memory
/// tier on every request, and a clone is a reference count, not a copy.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey(Arc<str>);

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
        .then(|| StoreKey(s.into()))
    }
}

/// [`StoreKey::hash`] one part at a time, for callers whose parts are
/// not one list (the request path builds its key from borrowed header
/// values, with no copy of them). The same parts give the same key.
///
/// The parts are gathered (each length-prefixed) and the key is the
/// SHA-256 of those bytes, looked up first in [`KEY_MEMO`]: a request
/// repeated within a while (every hit) finds its key there by a fast hash
/// and a full comparison of the bytes, and pays for no SHA-256. Without
/// the CPU's SHA extensions (Intel server parts before Ice Lake, and
/// valgrind) the digest was a fifth of a memory hit's instructions.
pub struct KeyHasher {
    material: Vec<u8>,
}

impl KeyHasher {
    pub fn new(domain: &str) -> Self {
        let mut h = KeyHasher {
            // Room for a request's parts (path, query, route, forwarded
            // origin, key headers) without growing.
            material: Vec::with_capacity(KeyMemo::MAX_MATERIAL),
        };
        h.part(KEY_VERSION.as_bytes());
        h.part(domain.as_bytes());
        h
    }

    /// Add one part, length-prefixed.
    pub fn part(&mut self, part: &[u8]) -> &mut Self {
        self.material
            .extend_from_slice(&(part.len() as u64).to_be_bytes());
        self.material.extend_from_slice(part);
        self
    }

    pub fn finish(self) -> StoreKey {
        KEY_MEMO.key_of(&self.material)
    }
}

/// The key of `material` (length-prefixed parts) computed: SHA-256, hex.
fn digest_key(material: &[u8]) -> StoreKey {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(material);
    let mut s = String::with_capacity(KEY_VERSION.len() + 1 + 64);
    s.push_str(KEY_VERSION);
    s.push(':');
    // By table: formatting each byte with `{:02x}` was a fifth of a
    // memory hit's instructions.
    for b in digest {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    StoreKey(s.into())
}

/// The keys computed lately, by the bytes they were computed from.
///
/// A fixed table of slots, each the last material hashed to it (by xxh3
/// with a per-process random seed) and its key: a lookup compares the
/// whole material, so a slot shared by two requests only costs one of
/// them a SHA-256, never gives it the other's key. Bounded whatever
/// clients send: at most [`KeyMemo::SLOTS`] entries of at most
/// [`KeyMemo::MAX_MATERIAL`] bytes (longer material is always digested),
/// about 650 KB at most. A slot another thread holds is not waited for.
struct KeyMemo {
    seed: u64,
    slots: Box<[Mutex<Option<Remembered>>]>,
}

/// One slot's content: the material and the key computed from it.
type Remembered = (Box<[u8]>, StoreKey);

/// The process's key memo ([`KeyHasher::finish`] reads it).
static KEY_MEMO: LazyLock<KeyMemo> = LazyLock::new(KeyMemo::new);

impl KeyMemo {
    const SLOTS: usize = 1024;
    const MAX_MATERIAL: usize = 512;

    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut seed = std::hash::RandomState::new().build_hasher();
        seed.write_u64(0x6367_6b65_796d_656d);
        KeyMemo {
            seed: seed.finish(),
            slots: (0..Self::SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// The key of `material`: remembered, or computed and remembered.
    fn key_of(&self, material: &[u8]) -> StoreKey {
        if material.len() > Self::MAX_MATERIAL {
            return digest_key(material);
        }
        let hash = xxhash_rust::xxh3::xxh3_64_with_seed(material, self.seed);
        let slot = &self.slots[hash as usize % Self::SLOTS];
        if let Ok(held) = slot.try_lock() {
            if let Some((known, key)) = held.as_ref() {
                if **known == *material {
                    return key.clone();
                }
            }
        }
        let key = digest_key(material);
        if let Ok(mut held) = slot.try_lock() {
            *held = Some((material.into(), key.clone()));
        }
        key
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

    /// The memo gives exactly the key the digest gives, remembered or not:
    /// far more materials than slots (so slots are overwritten by others
    /// over and over), asked in turn from four threads, each checked
    /// against the digest computed directly; and material too long to
    /// remember, twice.
    #[test]
    fn the_memo_never_answers_another_materials_key() {
        let memo = Arc::new(KeyMemo::new());
        let materials: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..5 * KeyMemo::SLOTS)
                .map(|i| {
                    let mut h = KeyHasher::new("response");
                    h.part(format!("/items/{}", i % 2_000).as_bytes());
                    h.part(&[(i / 2_000) as u8]);
                    h.material
                })
                .collect(),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (memo, materials) = (memo.clone(), materials.clone());
                std::thread::spawn(move || {
                    for round in 0..3 {
                        for (i, m) in materials.iter().enumerate() {
                            if (i + t + round) % 3 == 0 {
                                assert_eq!(memo.key_of(m), digest_key(m), "material {i}");
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let long = vec![b'x'; KeyMemo::MAX_MATERIAL + 1];
        assert_eq!(memo.key_of(&long), digest_key(&long));
        assert_eq!(memo.key_of(&long), digest_key(&long));
        // And it remembers: a material asked again is found in its slot.
        let m = &materials[7];
        memo.key_of(m);
        let slot = &memo.slots
            [xxhash_rust::xxh3::xxh3_64_with_seed(m, memo.seed) as usize % KeyMemo::SLOTS];
        assert_eq!(
            slot.lock().unwrap().as_ref().map(|(k, _)| &**k),
            Some(&m[..])
        );
    }
}
