//! The stored-entry codec: `Record::decode` of any bytes a backend may
//! hand back (foreign, truncated, corrupted, hostile) never panics, and
//! `encode` then `decode` of any record gives the record back.
//!
//! The same input is used twice: as the bytes to decode, and as the
//! source of an arbitrary record to round-trip.
#![no_main]

use bytes::Bytes;
use cachegate_store::record::FORMAT_VERSION;
use cachegate_store::{DecodeError, Entry, PurgeMark, Record, VaryIndex};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn bytes(u: &mut Unstructured) -> Result<Bytes> {
    Ok(Bytes::copy_from_slice(u.arbitrary::<&[u8]>()?))
}

fn record(u: &mut Unstructured) -> Result<Record> {
    Ok(match u.int_in_range(0..=2)? {
        0 => Record::Entry(Entry {
            status: u.arbitrary()?,
            headers: {
                let mut headers = Vec::new();
                for _ in 0..u.arbitrary_len::<(String, &[u8])>()? {
                    headers.push((u.arbitrary()?, bytes(u)?));
                }
                headers
            },
            body: bytes(u)?,
            born_at: u.arbitrary()?,
            stored_at: u.arbitrary()?,
            fresh_until: u.arbitrary()?,
            stale_while_revalidate_until: u.arbitrary()?,
            stale_if_error_until: u.arbitrary()?,
            keep_until: u.arbitrary()?,
            tags: u.arbitrary()?,
        }),
        1 => Record::VaryIndex(VaryIndex {
            headers: u.arbitrary()?,
            expires_at: u.arbitrary()?,
        }),
        _ => Record::PurgeMark(PurgeMark {
            purged_at: u.arbitrary()?,
            expires_at: u.arbitrary()?,
        }),
    })
}

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    match Record::decode(&buf) {
        Ok(r) => {
            assert_eq!(&data[..2], b"CG");
            assert_eq!(data[2], FORMAT_VERSION);
            // Whatever decodes re-encodes to something that decodes the same.
            assert_eq!(Record::decode(&r.encode()).as_ref(), Ok(&r));
            if let Record::Entry(e) = &r {
                let _ = (e.expires_at(), e.age_secs(u64::MAX), e.fresh_secs_left(0));
                let _ = e.is_fresh(u64::MAX);
            }
            let _ = r.is_expired(0);
        }
        Err(DecodeError::Foreign) => assert!(data.len() < 8 || &data[..2] != b"CG"),
        Err(DecodeError::Version(v)) => assert_ne!(v, FORMAT_VERSION),
        Err(_) => {}
    }

    let mut u = Unstructured::new(data);
    if let Ok(r) = record(&mut u) {
        let enc = r.encode();
        assert_eq!(Record::decode(&enc), Ok(r.clone()));
        // Every strict prefix is rejected, never misread.
        for cut in [0, 1, 7, 8, enc.len() / 2, enc.len() - 1] {
            if cut < enc.len() {
                assert!(Record::decode(&enc.slice(..cut)).is_err(), "prefix {cut}");
            }
        }
    }
});
