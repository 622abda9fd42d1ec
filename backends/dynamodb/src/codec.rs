//! The stored bytes of a value: zstd when that makes them smaller, raw
//! otherwise, and the blocking pool for large ones.

use bytes::Bytes;
use cachegate_store::StoreError;

use crate::items::Encoding;
use crate::BACKEND;

pub(crate) fn compress(value: &[u8], level: i32) -> Result<(Encoding, Vec<u8>), StoreError> {
    if value.is_empty() {
        return Ok((Encoding::Raw, Vec::new()));
    }
    let z = zstd::bulk::compress(value, level)
        .map_err(|e| StoreError::backend(BACKEND, format!("zstd compress: {e}")))?;
    Ok(if z.len() < value.len() {
        (Encoding::Zstd, z)
    } else {
        (Encoding::Raw, value.to_vec())
    })
}

pub(crate) fn decompress(
    enc: Encoding,
    stored: Bytes,
    len: u64,
    limit: usize,
) -> Result<Bytes, StoreError> {
    let bad = |m: String| StoreError::backend(BACKEND, format!("malformed value item: {m}"));
    let len = usize::try_from(len).map_err(|_| bad(format!("len {len}")))?;
    match enc {
        Encoding::Raw if stored.len() == len => Ok(stored),
        Encoding::Raw => Err(bad(format!("{} bytes, len says {len}", stored.len()))),
        Encoding::Zstd => {
            // Never allocate more than a value could legitimately be.
            if len > limit.max(64 * 1024 * 1024) {
                return Err(bad(format!("len {len} over any limit")));
            }
            let out = zstd::bulk::decompress(&stored, len).map_err(|e| bad(e.to_string()))?;
            if out.len() != len {
                return Err(bad(format!(
                    "{} bytes decompressed, len says {len}",
                    out.len()
                )));
            }
            Ok(Bytes::from(out))
        }
    }
}

/// Runs CPU-heavy work on the blocking pool when it is large enough to
/// stall other tasks.
pub(crate) async fn cpu<T: Send + 'static>(
    big: bool,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    if big {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::backend(BACKEND, format!("compression task: {e}")))?
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_round_trip_and_incompressible_kept_raw() {
        let text = Bytes::from("hello ".repeat(10_000));
        let (enc, z) = compress(&text, 3).unwrap();
        assert_eq!(enc, Encoding::Zstd);
        assert!(z.len() < text.len() / 10);
        assert_eq!(
            decompress(enc, Bytes::from(z), text.len() as u64, 1 << 20).unwrap(),
            text
        );
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (enc, raw) = compress(&noise, 3).unwrap();
        assert_eq!(enc, Encoding::Raw);
        assert_eq!(raw, noise);
        assert!(decompress(Encoding::Zstd, Bytes::from_static(b"junk"), 4, 100).is_err());
    }
}
