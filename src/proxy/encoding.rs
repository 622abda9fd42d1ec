//! Compressed entries (issue #26 item 1), the byte work: compress an
//! answer's whole body for storing, and decode a stored body for a client
//! that cannot take its coding. What may be compressed, and what a client
//! is sent, is decided in `policy::compression`. Not yet called from the
//! flow.
//!
//! gzip only, with flate2's default Rust backend (miniz_oxide): a full
//! brotli encoder would add far more to the function binary, which is
//! already over its size goal. Stored `br` (from an upstream) is relayed
//! to clients that accept it and is not decoded here.

use std::io::{Read, Write};

use flate2::{read::GzDecoder, write::GzEncoder, Compression};

/// gzip level for stored entries: 6, zlib's default, a good ratio for JSON
/// at a cost paid once per store, not per hit.
const LEVEL: u32 = 6;

/// `body` gzip-compressed, or `None` when compressing does not make it
/// smaller (then the entry is stored as the upstream sent it).
pub fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        Compression::new(LEVEL),
    );
    encoder.write_all(body).ok()?;
    let out = encoder.finish().ok()?;
    (out.len() < body.len()).then_some(out)
}

/// Why a stored body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Not valid gzip (a corrupt entry): treat as a miss.
    Corrupt,
    /// Decodes to more than the limit given: a bomb, or more than may be
    /// sent; treat as a miss.
    TooLarge,
}

/// The gzip `body` decoded, at most `limit` bytes of output.
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let mut decoder = GzDecoder::new(body).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|_| DecodeError::Corrupt)?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

/// A strong `ETag` (`"x"`) made weak (`W/"x"`) for a body whose coding
/// cachegate changed (RFC 9110 §8.8.3: the bytes are no longer the ones
/// the strong validator named); a weak one is kept.
pub fn weaken_etag(etag: &[u8]) -> Vec<u8> {
    if etag.starts_with(b"W/") {
        return etag.to_vec();
    }
    let mut out = b"W/".to_vec();
    out.extend_from_slice(etag);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSON array of objects like a REST list answer, `n` bytes or a
    /// little more.
    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[");
        let mut i = 0u64;
        while s.len() < n {
            s.push_str(&format!(
                r#"{{"id":{i},"title":"item number {i}","author":"user{}","tags":["a","b{}"],"price":{}.{:02},"active":{}}},"#,
                i % 97,
                i % 13,
                (i * 7919) % 1000,
                i % 100,
                i % 2 == 0
            ));
            i += 1;
        }
        s.pop();
        s.push(']');
        s.into_bytes()
    }

    #[test]
    fn a_1_mb_json_answer_gzips_to_at_most_a_quarter_and_back() {
        let body = json(1 << 20);
        let packed = gzip(&body).unwrap();
        eprintln!("1 MB JSON: {} -> {} bytes gzip", body.len(), packed.len());
        assert!(
            packed.len() * 4 <= body.len(),
            "{} of {} bytes",
            packed.len(),
            body.len()
        );
        assert_eq!(gunzip(&packed, body.len()).unwrap(), body);
    }

    #[test]
    fn incompressible_bodies_are_left_alone() {
        // Random bytes (like an already-compressed body) do not shrink.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let noise: Vec<u8> = (0..64 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(gzip(&noise), None);
    }

    #[test]
    fn decoding_is_bounded_and_checks_its_input() {
        let bomb = gzip(&vec![b' '; 10 << 20]).unwrap();
        assert!(bomb.len() < 64 << 10);
        assert_eq!(gunzip(&bomb, 1 << 20), Err(DecodeError::TooLarge));
        assert_eq!(
            gunzip(b"not gzip at all", 1 << 20),
            Err(DecodeError::Corrupt)
        );
        let mut cut = gzip(&json(64 << 10)).unwrap();
        cut.truncate(cut.len() / 2);
        assert_eq!(gunzip(&cut, 1 << 20), Err(DecodeError::Corrupt));
    }

    #[test]
    fn strong_etags_become_weak() {
        assert_eq!(weaken_etag(br#""abc""#), br#"W/"abc""#.to_vec());
        assert_eq!(weaken_etag(br#"W/"abc""#), br#"W/"abc""#.to_vec());
    }
}
