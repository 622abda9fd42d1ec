//! The one binary encoding of what backends store, shared by all of them.
//!
//! Layout: `b"CG"`, a format version byte, a kind byte, a CRC-32 of the
//! payload (little endian), then the payload in postcard. The magic and the
//! checksum turn foreign or truncated bytes into a [`DecodeError`] (a miss
//! for the proxy) instead of a wrong answer; the version byte lets a newer
//! build ignore what an older one wrote.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{is_expired, UnixMillis};

const MAGIC: &[u8; 2] = b"CG";
/// Bump on any incompatible change to the payload structs below.
pub const FORMAT_VERSION: u8 = 2;
const KIND_ENTRY: u8 = 1;
const KIND_VARY_INDEX: u8 = 2;
const KIND_PURGE_MARK: u8 = 3;
const KIND_UPSTREAM_HOLD: u8 = 4;
const HEADER_LEN: usize = 2 + 1 + 1 + 4;

/// A stored response with its freshness and stale windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub status: u16,
    /// Response headers as received (lower-case names), minus hop-by-hop
    /// headers and the ones the proxy computes on the way out (`Age`).
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    /// When the response's age was zero: the time it was received minus
    /// the age it already had (RFC 9111 §4.2.3). `Age` is `now - born_at`.
    pub born_at: UnixMillis,
    /// When this process stored it.
    pub stored_at: UnixMillis,
    /// Fresh before this instant.
    pub fresh_until: UnixMillis,
    /// May be served stale while one request refreshes it, until this instant.
    pub stale_while_revalidate_until: UnixMillis,
    /// May be served stale when the upstream fails, until this instant.
    pub stale_if_error_until: UnixMillis,
    /// Kept (stale, never served without asking the upstream) until this
    /// instant so that it can be revalidated with its validators (RFC 9111
    /// §4.3.1) instead of refetched; `fresh_until` when it has none.
    pub keep_until: UnixMillis,
    /// Tags a purge can remove this entry by (route tags, surrogate keys,
    /// and the URL tag the proxy adds).
    pub tags: Vec<String>,
}

impl Entry {
    /// After this the entry is useless for every purpose; backends keep it
    /// exactly this long.
    pub fn expires_at(&self) -> UnixMillis {
        self.fresh_until
            .max(self.stale_while_revalidate_until)
            .max(self.stale_if_error_until)
            .max(self.keep_until)
    }
    pub fn is_fresh(&self, now: UnixMillis) -> bool {
        now < self.fresh_until
    }
    /// Age in whole seconds, as the `Age` header wants it.
    pub fn age_secs(&self, now: UnixMillis) -> u64 {
        now.saturating_sub(self.born_at) / 1000
    }
    /// Freshness left in whole seconds (rounded down: never promise more).
    pub fn fresh_secs_left(&self, now: UnixMillis) -> u64 {
        self.fresh_until.saturating_sub(now) / 1000
    }
    /// The length of the body decoded, for an entry stored as gzip (one
    /// `Content-Encoding: gzip`): its trailer's ISIZE (RFC 1952 §2.3.1,
    /// the length modulo 2^32, which no stored answer reaches). A client
    /// that does not take gzip is sent this many bytes, and the memory
    /// store counts them for the decoded copy the proxy may keep beside
    /// the entry. `None` for other entries.
    pub fn gzip_decoded_len(&self) -> Option<usize> {
        let mut codings = self.headers.iter().filter(|(n, _)| n == "content-encoding");
        let (_, coding) = codings.next()?;
        let gzip = coding.trim_ascii().eq_ignore_ascii_case(b"gzip")
            || coding.trim_ascii().eq_ignore_ascii_case(b"x-gzip");
        if !gzip || codings.next().is_some() || self.body.len() < 18 {
            return None;
        }
        let trailer: [u8; 4] = self.body[self.body.len() - 4..].try_into().ok()?;
        Some(u32::from_le_bytes(trailer) as usize)
    }
    /// First value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// Stored under a URL's primary key when its response carries `Vary`: names
/// the request headers whose values pick the variant key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaryIndex {
    /// Lower-case header names, sorted and de-duplicated.
    pub headers: Vec<String>,
    pub expires_at: UnixMillis,
}

/// Left under a tag's marker key by a purge: a fetch that started before
/// `purged_at` must not store its (older) response under that tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeMark {
    pub purged_at: UnixMillis,
    pub expires_at: UnixMillis,
}

/// Left by the instance that was told to back off (a 429, or a 503 with
/// `Retry-After`): until `until`, no instance sharing the backend calls
/// the upstream for what the cache may answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamHold {
    pub until: UnixMillis,
    /// The status that asked for it (429 or 503).
    pub status: u16,
}

/// Everything a backend can hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Entry(Entry),
    VaryIndex(VaryIndex),
    PurgeMark(PurgeMark),
    UpstreamHold(UpstreamHold),
}

impl Record {
    pub fn expires_at(&self) -> UnixMillis {
        match self {
            Record::Entry(e) => e.expires_at(),
            Record::VaryIndex(v) => v.expires_at,
            Record::PurgeMark(m) => m.expires_at,
            Record::UpstreamHold(h) => h.until,
        }
    }
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        is_expired(self.expires_at(), now)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a cachegate record (bad magic or too short)")]
    Foreign,
    #[error("record format version {0} is not {FORMAT_VERSION}")]
    Version(u8),
    #[error("record checksum mismatch (truncated or corrupted)")]
    Checksum,
    #[error("record payload does not decode: {0}")]
    Payload(String),
}

#[derive(Serialize)]
struct EntryOut<'a> {
    status: u16,
    headers: Vec<(&'a str, &'a serde_bytes::Bytes)>,
    body: &'a serde_bytes::Bytes,
    times: [UnixMillis; 6],
    tags: &'a [String],
}

#[derive(Deserialize)]
struct EntryIn<'a> {
    status: u16,
    #[serde(borrow)]
    headers: Vec<(String, &'a serde_bytes::Bytes)>,
    #[serde(borrow)]
    body: &'a serde_bytes::Bytes,
    times: [UnixMillis; 6],
    tags: Vec<String>,
}

impl Record {
    pub fn encode(&self) -> Bytes {
        let (kind, payload) = match self {
            Record::Entry(e) => (
                KIND_ENTRY,
                postcard::to_allocvec(&EntryOut {
                    status: e.status,
                    headers: e
                        .headers
                        .iter()
                        .map(|(n, v)| (n.as_str(), serde_bytes::Bytes::new(v)))
                        .collect(),
                    body: serde_bytes::Bytes::new(&e.body),
                    times: [
                        e.born_at,
                        e.stored_at,
                        e.fresh_until,
                        e.stale_while_revalidate_until,
                        e.stale_if_error_until,
                        e.keep_until,
                    ],
                    tags: &e.tags,
                }),
            ),
            Record::VaryIndex(v) => (KIND_VARY_INDEX, postcard::to_allocvec(v)),
            Record::PurgeMark(m) => (KIND_PURGE_MARK, postcard::to_allocvec(m)),
            Record::UpstreamHold(h) => (KIND_UPSTREAM_HOLD, postcard::to_allocvec(h)),
        };
        // Serialising owned, in-memory structs into a Vec cannot fail.
        let payload = payload.expect("postcard serialisation into a Vec");
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.push(kind);
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Bytes::from(out)
    }

    /// Decode bytes read from a backend. The body is a zero-copy slice of `buf`.
    pub fn decode(buf: &Bytes) -> Result<Record, DecodeError> {
        if buf.len() < HEADER_LEN || &buf[..2] != MAGIC {
            return Err(DecodeError::Foreign);
        }
        if buf[2] != FORMAT_VERSION {
            return Err(DecodeError::Version(buf[2]));
        }
        let kind = buf[3];
        let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
        let payload = &buf[HEADER_LEN..];
        if crc32fast::hash(payload) != crc {
            return Err(DecodeError::Checksum);
        }
        let bad = |e: postcard::Error| DecodeError::Payload(e.to_string());
        match kind {
            KIND_ENTRY => {
                let (e, rest): (EntryIn, _) = postcard::take_from_bytes(payload).map_err(bad)?;
                if !rest.is_empty() {
                    return Err(DecodeError::Payload("trailing bytes".into()));
                }
                let [born_at, stored_at, fresh_until, swr, sie, keep_until] = e.times;
                Ok(Record::Entry(Entry {
                    status: e.status,
                    headers: e
                        .headers
                        .into_iter()
                        .map(|(n, v)| (n, buf.slice_ref(v.as_ref())))
                        .collect(),
                    body: buf.slice_ref(e.body.as_ref()),
                    born_at,
                    stored_at,
                    fresh_until,
                    stale_while_revalidate_until: swr,
                    stale_if_error_until: sie,
                    keep_until,
                    tags: e.tags,
                }))
            }
            KIND_VARY_INDEX => {
                let (v, rest): (VaryIndex, _) = postcard::take_from_bytes(payload).map_err(bad)?;
                if !rest.is_empty() {
                    return Err(DecodeError::Payload("trailing bytes".into()));
                }
                Ok(Record::VaryIndex(v))
            }
            KIND_PURGE_MARK => {
                let (m, rest): (PurgeMark, _) = postcard::take_from_bytes(payload).map_err(bad)?;
                if !rest.is_empty() {
                    return Err(DecodeError::Payload("trailing bytes".into()));
                }
                Ok(Record::PurgeMark(m))
            }
            KIND_UPSTREAM_HOLD => {
                let (h, rest): (UpstreamHold, _) =
                    postcard::take_from_bytes(payload).map_err(bad)?;
                if !rest.is_empty() {
                    return Err(DecodeError::Payload("trailing bytes".into()));
                }
                Ok(Record::UpstreamHold(h))
            }
            other => Err(DecodeError::Payload(format!("unknown record kind {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            status: 200,
            headers: vec![
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
                ("x-bin".into(), Bytes::from_static(&[0xff, 0x00, 0x80])),
            ],
            body: Bytes::from((0..=255u8).collect::<Vec<_>>()),
            born_at: 1_000,
            stored_at: 2_000,
            fresh_until: 62_000,
            stale_while_revalidate_until: 92_000,
            stale_if_error_until: 3_662_000,
            keep_until: 7_262_000,
            tags: vec!["items".into()],
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let r = Record::Entry(sample());
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let v = Record::VaryIndex(VaryIndex {
            headers: vec!["accept".into()],
            expires_at: 5,
        });
        assert_eq!(Record::decode(&v.encode()).unwrap(), v);
        let m = Record::PurgeMark(PurgeMark {
            purged_at: 3,
            expires_at: 9,
        });
        assert_eq!(Record::decode(&m.encode()).unwrap(), m);
        let h = Record::UpstreamHold(UpstreamHold {
            until: 7,
            status: 429,
        });
        assert_eq!(Record::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn damaged_bytes_are_errors_not_garbage() {
        let enc = Record::Entry(sample()).encode();
        assert_eq!(
            Record::decode(&Bytes::from_static(b"{\"json\":1}")),
            Err(DecodeError::Foreign)
        );
        assert_eq!(
            Record::decode(&enc.slice(..enc.len() - 1)),
            Err(DecodeError::Checksum)
        );
        let mut flipped = enc.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            Record::decode(&Bytes::from(flipped)),
            Err(DecodeError::Checksum)
        );
        let mut old = enc.to_vec();
        old[2] = 0;
        assert_eq!(
            Record::decode(&Bytes::from(old)),
            Err(DecodeError::Version(0))
        );
        for cut in 0..enc.len() {
            assert!(
                Record::decode(&enc.slice(..cut)).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
    }

    #[test]
    fn expiry_is_the_longest_window() {
        let mut e = sample();
        assert_eq!(e.expires_at(), 7_262_000, "kept for revalidation");
        e.keep_until = e.fresh_until;
        assert_eq!(e.expires_at(), 3_662_000);
        assert!(e.is_fresh(61_999));
        assert!(!e.is_fresh(62_000));
        assert_eq!(e.age_secs(11_000), 10);
        assert_eq!(e.fresh_secs_left(60_500), 1);
    }

    #[test]
    fn a_gzip_entry_knows_its_decoded_length_from_its_trailer() {
        let mut body = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        body.extend_from_slice(&[0; 4]); // deflate data, then the CRC
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&1_048_596u32.to_le_bytes());
        let entry = |encoding: &[&str], body: &[u8]| Entry {
            headers: encoding
                .iter()
                .map(|e| {
                    (
                        "content-encoding".to_owned(),
                        Bytes::copy_from_slice(e.as_bytes()),
                    )
                })
                .collect(),
            body: Bytes::copy_from_slice(body),
            ..Entry::default()
        };
        assert_eq!(entry(&["gzip"], &body).gzip_decoded_len(), Some(1_048_596));
        assert_eq!(
            entry(&[" GZIP "], &body).gzip_decoded_len(),
            Some(1_048_596)
        );
        assert_eq!(entry(&[], &body).gzip_decoded_len(), None);
        assert_eq!(entry(&["br"], &body).gzip_decoded_len(), None);
        assert_eq!(entry(&["gzip", "br"], &body).gzip_decoded_len(), None);
        assert_eq!(entry(&["gzip"], &body[..10]).gzip_decoded_len(), None);
    }
}
