//! Record decoding on arbitrary input: what a relay, trusted by nobody, can hand a reader.
//!
//! Decoding must never panic, and whatever decodes must encode back to the same bytes, so
//! that no two different byte strings mean the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tube::record::{self, Body};

fuzz_target!(|data: &[u8]| {
    let Ok(rec) = record::decode(bytes::Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = match &rec.body {
        Body::Data(d) => {
            let mut flags = 0;
            if d.zstd {
                flags |= record::FLAG_ZSTD;
            }
            if d.sealed {
                flags |= record::FLAG_SEALED;
            }
            let mut buf = record::data_prefix(rec.session, rec.seq, d.offset, flags);
            buf.extend_from_slice(&d.payload);
            buf.freeze()
        }
        Body::End(end) => record::encode_end(rec.session, rec.seq, end),
        Body::SealedEnd(p) => record::encode_sealed_end(rec.session, rec.seq, p),
        // Begin records skip unknown optional options: they need not round-trip.
        Body::Begin(_) => return,
    };
    assert_eq!(&again[..], data, "a decoded record encodes back to its bytes");
});
