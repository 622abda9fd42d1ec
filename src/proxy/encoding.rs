//! Compressed entries, the byte work: compress an answer's whole body for
//! storing, and decode a gzip body (whole or streaming) for a client that
//! does not take gzip. What may be compressed, and who is sent what, is
//! decided in `policy::compression`.
//!
//! gzip only, with flate2's default Rust backend (miniz_oxide): a full
//! brotli encoder would add far more to the function binary, which is
//! already over its size goal. Stored `br` (from an upstream) is relayed
//! to clients that accept it and is not decoded here.

use std::io::{Read, Write};

use bytes::Bytes;
use flate2::{read::GzDecoder, write, write::GzEncoder, Compression};
use futures_util::StreamExt;
use http::{HeaderMap, Response, StatusCode};

use super::body::{BodyStream, ResponseBody};
use crate::policy::compression::{self, ClientAccept};
use crate::upstream::UpstreamError;

/// gzip level for stored entries: 1. On a 1 MB JSON list (benches/compression,
/// miniz_oxide) level 6 stored 10.2 % of the bytes in 29.7 ms, level 1
/// 18.7 % in 2.7 ms; a miss, whose client waits, pays this, and 18.7 % is
/// well within what is asked (a quarter).
const LEVEL: u32 = 1;

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

/// The answer's body gzip-compressed and its headers marked so
/// ([`policy::compression::mark_compressed`]), when it may be
/// ([`policy::compression::may_compress`]) and gets smaller; otherwise
/// left as it came.
pub fn compress_answer(status: StatusCode, headers: &mut HeaderMap, body: &mut Bytes) {
    if !compression::may_compress(status, headers, body.len(), compression::MIN_COMPRESS_BYTES) {
        return;
    }
    if let Some(packed) = gzip(body) {
        *body = Bytes::from(packed);
        compression::mark_compressed(headers);
    }
}

/// A gzip response made fit for a client that does not take gzip
/// ([`ClientAccept::must_decode`]): its body decoded (at most `limit`
/// bytes), whole or as it streams, and its headers marked so. A whole
/// body that does not decode is an error for the caller to answer.
pub fn fit_to_client(
    resp: &mut Response<ResponseBody>,
    client: &ClientAccept,
    limit: usize,
) -> Result<(), DecodeError> {
    // A range of gzip bytes does not decode alone (cachegate forwards a
    // `Range` it cannot answer with the client's own `Accept-Encoding`).
    if !client.must_decode(resp.headers()) || resp.status() == StatusCode::PARTIAL_CONTENT {
        if compression::coding_of(resp.headers()) == Some(compression::Coding::Gzip) {
            // Sent as gzip because this client takes it; another is sent
            // it decoded: a cache in front must key on `Accept-Encoding`,
            // whether or not the upstream said so.
            compression::vary_on_accept_encoding(resp.headers_mut());
        }
        return Ok(());
    }
    let body = std::mem::take(resp.body_mut());
    *resp.body_mut() = match body {
        ResponseBody::Full(b) if b.is_empty() => ResponseBody::Full(b),
        ResponseBody::Full(b) => ResponseBody::Full(Bytes::from(gunzip(&b, limit)?)),
        ResponseBody::Streaming(stream) => ResponseBody::Streaming(gunzip_stream(stream, limit)),
    };
    compression::mark_decoded(resp.headers_mut());
    Ok(())
}

/// A gzip stream decoded as it arrives, chunk by chunk, at most `limit`
/// bytes of output; what does not decode (a cut-off or corrupt stream, a
/// wrong CRC) ends the stream with an error.
fn gunzip_stream(input: BodyStream, limit: usize) -> BodyStream {
    enum State {
        Running(Box<write::GzDecoder<Vec<u8>>>, usize, BodyStream),
        Done,
    }
    let start = State::Running(Box::new(write::GzDecoder::new(Vec::new())), 0, input);
    Box::pin(futures_util::stream::unfold(
        start,
        move |state| async move {
            let State::Running(mut decoder, mut sent, mut input) = state else {
                return None;
            };
            loop {
                let (wrote, last) = match input.next().await {
                    Some(Ok(chunk)) => (decoder.write_all(&chunk), false),
                    Some(Err(e)) => return Some((Err(e), State::Done)),
                    // The end: the trailer is checked (CRC, length).
                    None => (decoder.try_finish(), true),
                };
                if let Err(e) = wrote {
                    let e = UpstreamError::Other(format!(
                        "the upstream's gzip body does not decode: {e}"
                    ));
                    return Some((Err(e), State::Done));
                }
                let out = std::mem::take(decoder.get_mut());
                sent += out.len();
                if sent > limit {
                    return Some((Err(UpstreamError::TooLarge { limit }), State::Done));
                }
                if last {
                    return (!out.is_empty()).then(|| (Ok(Bytes::from(out)), State::Done));
                }
                if !out.is_empty() {
                    return Some((Ok(Bytes::from(out)), State::Running(decoder, sent, input)));
                }
            }
        },
    ))
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
        let mut rng = fastrand::Rng::with_seed(7);
        let noise: Vec<u8> = (0..64 << 10).map(|_| rng.u8(..)).collect();
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

    fn chunks(body: &[u8], size: usize) -> BodyStream {
        let parts: Vec<Result<Bytes, UpstreamError>> = body
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Box::pin(futures_util::stream::iter(parts))
    }

    async fn drain(mut s: BodyStream) -> Result<Vec<u8>, UpstreamError> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_gzip_stream_decodes_chunk_by_chunk_and_is_checked_to_its_end() {
        let body = json(256 << 10);
        let packed = gzip(&body).unwrap();
        for size in [1, 7, 4096, packed.len()] {
            let got = drain(gunzip_stream(chunks(&packed, size), body.len())).await;
            assert_eq!(got.unwrap(), body, "chunks of {size}");
        }
        // Cut off: the missing trailer is an error, not a short body.
        let cut = &packed[..packed.len() - 6];
        assert!(drain(gunzip_stream(chunks(cut, 4096), body.len()))
            .await
            .is_err());
        // A wrong CRC.
        let mut bad = packed.clone();
        let n = bad.len();
        bad[n - 8] ^= 0xff;
        assert!(drain(gunzip_stream(chunks(&bad, 4096), body.len()))
            .await
            .is_err());
        // Not gzip at all.
        assert!(
            drain(gunzip_stream(chunks(b"plain text, not gzip", 4), 1 << 20))
                .await
                .is_err()
        );
        // A bomb stops at the limit.
        let bomb = gzip(&vec![b' '; 8 << 20]).unwrap();
        match drain(gunzip_stream(chunks(&bomb, 4096), 1 << 20)).await {
            Err(UpstreamError::TooLarge { limit }) => assert_eq!(limit, 1 << 20),
            other => panic!("{:?}", other.map(|b| b.len())),
        }
    }

    #[test]
    fn only_what_may_be_compressed_is_and_its_headers_say_so() {
        let body = json(64 << 10);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("content-length", body.len().into());
        let mut b = Bytes::from(body.clone());
        compress_answer(StatusCode::OK, &mut headers, &mut b);
        assert_eq!(headers["content-encoding"], "gzip");
        assert!(headers.get("content-length").is_none());
        assert_eq!(gunzip(&b, body.len()).unwrap(), body);
        // Already gzip: left alone.
        let before = b.clone();
        compress_answer(StatusCode::OK, &mut headers, &mut b);
        assert_eq!(b, before);
        // An image: left alone.
        let mut png = HeaderMap::new();
        png.insert("content-type", "image/png".parse().unwrap());
        let mut b = Bytes::from(body.clone());
        compress_answer(StatusCode::OK, &mut png, &mut b);
        assert_eq!(b.len(), body.len());
        assert!(png.get("content-encoding").is_none());
    }

    #[tokio::test]
    async fn a_client_that_does_not_take_gzip_gets_it_decoded() {
        let body = json(64 << 10);
        let packed = Bytes::from(gzip(&body).unwrap());
        let gzip_response = |b: ResponseBody| {
            let mut r = Response::new(b);
            r.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            r.headers_mut().insert("etag", "\"e\"".parse().unwrap());
            r
        };
        let mut accept = HeaderMap::new();
        accept.insert("accept-encoding", "gzip, br".parse().unwrap());
        let takes = ClientAccept::of(&accept);
        let plain = ClientAccept::of(&HeaderMap::new());

        let mut r = gzip_response(ResponseBody::Full(packed.clone()));
        fit_to_client(&mut r, &takes, 1 << 20).unwrap();
        assert_eq!(r.body().as_full().unwrap(), &packed, "sent as stored");
        assert_eq!(
            r.headers()["vary"],
            "accept-encoding",
            "whatever the upstream said"
        );

        let mut r = gzip_response(ResponseBody::Full(packed.clone()));
        fit_to_client(&mut r, &plain, 1 << 20).unwrap();
        assert_eq!(r.body().as_full().unwrap().as_ref(), &body[..]);
        assert!(r.headers().get("content-encoding").is_none());
        assert_eq!(r.headers()["etag"], "W/\"e\"");
        assert_eq!(r.headers()["vary"], "accept-encoding");

        let mut r = gzip_response(ResponseBody::Streaming(chunks(&packed, 1000)));
        fit_to_client(&mut r, &plain, 1 << 20).unwrap();
        let ResponseBody::Streaming(s) = std::mem::take(r.body_mut()) else {
            panic!("a stream stays a stream")
        };
        assert_eq!(drain(s).await.unwrap(), body);

        let mut r = gzip_response(ResponseBody::Full(Bytes::from_static(b"not gzip")));
        assert_eq!(
            fit_to_client(&mut r, &plain, 1 << 20),
            Err(DecodeError::Corrupt)
        );
    }
}
