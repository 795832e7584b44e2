//! The on-relay record format, version 1 (see `docs/PROTOCOL.md`).
//!
//! Every stream entry holds one field, `r`, whose value is one record: a fixed 20-byte header
//! and a payload. The stream ID of the entry is `SESSION-SEQ`, the same two numbers the
//! header carries, so a retried append can never land twice or out of order: the relay
//! refuses an ID that is not greater than the last one.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Protocol version written in every record header.
pub const VERSION: u8 = 1;
/// Highest first byte read as a newer protocol version rather than as something that is not
/// a record (so that garbage is not reported as "upgrade tube").
const MAX_PLAUSIBLE_VERSION: u8 = 15;
/// Bytes of the fixed record header.
pub const HEADER_LEN: usize = 20;
/// Name of the single field of each stream entry.
pub const FIELD: &str = "r";
/// Length of the whole-stream digest carried by the end record (XXH3-128).
pub const DIGEST_LEN: usize = 16;
/// Begin-record option tags at or above this value must be understood by a reader; lower
/// ones may be skipped. This lets later versions add hints without breaking old readers,
/// and add features old readers must refuse.
pub const CRITICAL_TAG: u8 = 0x80;

/// Data record flag: the payload is a zstd frame.
pub const FLAG_ZSTD: u8 = 0x01;
/// Data and end record flag: the payload is sealed (see [`crate::crypto`]); the record's
/// header is its associated data.
pub const FLAG_SEALED: u8 = 0x02;
/// Bytes a data record carries before its payload: the header and the byte offset.
pub const DATA_PREFIX_LEN: usize = HEADER_LEN + 8;

const TAG_TOKEN: u8 = 0x01;
const TAG_STARTED: u8 = 0x02;
const TAG_MAX_PAYLOAD: u8 = 0x03;
const TAG_LIVE: u8 = 0x04;
const TAG_MAX_BACKLOG: u8 = 0x05;
/// Critical: the session is sealed; the value is [`crate::crypto::SealParams`].
const TAG_SEAL: u8 = 0x81;

/// Record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// First record of a session (sequence 0): who writes and how.
    Begin = 1,
    /// A piece of the byte stream.
    Data = 2,
    /// Last record of a session: how it ended, total length, digest.
    End = 3,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EndStatus {
    /// The writer's input ended: the stream is complete.
    Complete = 0,
    /// The writer was stopped (SIGINT/SIGTERM) before its input ended.
    Interrupted = 1,
}

/// What a begin record says about its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// Random token of the writer; the writer's lease holds the same value while it lives.
    pub token: [u8; 16],
    /// When the session started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Largest data payload (before compression) the writer will append, so readers can
    /// size their batches and refuse absurd records.
    pub max_payload: u32,
    /// Live session: the writer never waits for readers and the relay keeps only the newest
    /// data, so readers may skip.
    pub live: bool,
    /// The channel's memory budget on the relay (0: not given); readers size their reads
    /// from it.
    pub max_backlog: u64,
    /// How the session is sealed, if it is.
    pub seal: Option<crate::crypto::SealParams>,
}

/// What an end record says about its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// Whether the input ended or the writer was interrupted.
    pub status: EndStatus,
    /// Total payload bytes of the session.
    pub total_len: u64,
    /// [`Digest`] of the whole session's bytes.
    pub digest: [u8; DIGEST_LEN],
}

/// The digest of a session's bytes that its end record carries: XXH3-128, big-endian.
///
/// It catches what the per-record checks cannot (a payload changed in place, by a relay or a
/// disk). It is not a defence against a relay that means harm: an unkeyed digest of any kind
/// can be recomputed by whoever rewrites the data, so sealed sessions rely on their per-record
/// AEAD instead. A non-cryptographic hash is enough for this and costs a quarter of BLAKE3's
/// CPU on each end, where the digest was a fifth to a third of all the work per byte.
#[derive(Clone, Default)]
pub struct Digest(xxhash_rust::xxh3::Xxh3);

impl Digest {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(&self) -> [u8; DIGEST_LEN] {
        self.0.digest128().to_be_bytes()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Digest").finish_non_exhaustive()
    }
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Session number (the high part of the entry's stream ID).
    pub session: u64,
    /// Sequence number within the session: 0 for begin, then 1, 2, ...
    pub seq: u64,
    /// What the record carries.
    pub body: Body,
}

/// The kind-specific part of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// See [`Begin`].
    Begin(Begin),
    /// A piece of the stream.
    Data(Data),
    /// See [`End`].
    End(End),
    /// An end record whose payload is sealed: open it, then [`decode_end_payload`].
    SealedEnd(Bytes),
}

/// A piece of the stream as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// Position of the piece's first byte in the session's stream.
    pub offset: u64,
    /// Whether `payload` is a zstd frame holding the piece.
    pub zstd: bool,
    /// Whether `payload` is sealed.
    pub sealed: bool,
    /// The bytes, compressed when `zstd` is set.
    pub payload: Bytes,
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its fixed parts.
    Truncated,
    /// Written by a newer protocol version.
    Version(u8),
    /// A kind this version does not know.
    Kind(u8),
    /// Flag bits this version does not know.
    Flags(u8),
    /// A begin record option that must be understood but is not.
    CriticalOption(u8),
    /// Anything else malformed.
    Malformed(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("record is truncated"),
            Self::Version(v) => write!(
                f,
                "record has protocol version {v}, this tube reads version {VERSION}: upgrade tube"
            ),
            Self::Kind(k) => write!(f, "record has unknown kind {k}"),
            Self::Flags(x) => write!(f, "record has unknown flags {x:#04x}"),
            Self::CriticalOption(t) => write!(
                f,
                "session uses feature {t:#04x} that this tube does not support: upgrade tube"
            ),
            Self::Malformed(what) => write!(f, "record is malformed: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The stream ID of a record: `SESSION-SEQ`.
pub fn entry_id(session: u64, seq: u64) -> String {
    format!("{session}-{seq}")
}

/// Parses a stream ID of the form `MS-SEQ`.
pub fn parse_entry_id(id: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(id).ok()?;
    let (a, b) = s.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn header(buf: &mut BytesMut, kind: Kind, flags: u8, session: u64, seq: u64) {
    buf.put_u8(VERSION);
    buf.put_u8(kind as u8);
    buf.put_u8(flags);
    buf.put_u8(0); // reserved
    buf.put_u64(session);
    buf.put_u64(seq);
}

/// Encodes a begin record.
pub fn encode_begin(session: u64, begin: &Begin) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + 40);
    header(&mut buf, Kind::Begin, 0, session, 0);
    put_option(&mut buf, TAG_TOKEN, &begin.token);
    put_option(&mut buf, TAG_STARTED, &begin.started_ms.to_be_bytes());
    put_option(&mut buf, TAG_MAX_PAYLOAD, &begin.max_payload.to_be_bytes());
    put_option(&mut buf, TAG_LIVE, &[u8::from(begin.live)]);
    put_option(&mut buf, TAG_MAX_BACKLOG, &begin.max_backlog.to_be_bytes());
    if let Some(seal) = &begin.seal {
        put_option(&mut buf, TAG_SEAL, &seal.encode());
    }
    buf.freeze()
}

fn put_option(buf: &mut BytesMut, tag: u8, value: &[u8]) {
    buf.put_u8(tag);
    buf.put_u16(u16::try_from(value.len()).expect("option fits u16"));
    buf.put_slice(value);
}

/// The bound key context of a session: its begin record without the seal option, and the
/// channel's name. Everything in it is authenticated by the session key.
pub fn seal_context(session: u64, begin: &Begin, channel: &str) -> Vec<u8> {
    let plain = Begin {
        seal: None,
        ..begin.clone()
    };
    let mut v = encode_begin(session, &plain).to_vec();
    v.extend_from_slice(channel.as_bytes());
    v
}

/// Writes the fixed part of a data record ([`DATA_PREFIX_LEN`] bytes); the payload follows.
/// `flags` are [`FLAG_ZSTD`] and [`FLAG_SEALED`].
pub fn encode_data_prefix(buf: &mut BytesMut, session: u64, seq: u64, offset: u64, flags: u8) {
    header(buf, Kind::Data, flags, session, seq);
    buf.put_u64(offset);
}

/// The fixed part of a data record, on its own (the associated data of a sealed record).
pub fn data_prefix(session: u64, seq: u64, offset: u64, flags: u8) -> BytesMut {
    let mut buf = BytesMut::with_capacity(DATA_PREFIX_LEN);
    encode_data_prefix(&mut buf, session, seq, offset, flags);
    buf
}

/// Encodes a data record in one buffer.
pub fn encode_data(session: u64, seq: u64, offset: u64, zstd: bool, payload: &[u8]) -> Bytes {
    let flags = if zstd { FLAG_ZSTD } else { 0 };
    let mut buf = BytesMut::with_capacity(DATA_PREFIX_LEN + payload.len());
    encode_data_prefix(&mut buf, session, seq, offset, flags);
    buf.put_slice(payload);
    buf.freeze()
}

/// The header of an end record (the associated data when it is sealed).
pub fn end_header(session: u64, seq: u64, sealed: bool) -> BytesMut {
    let mut buf = BytesMut::with_capacity(HEADER_LEN);
    header(
        &mut buf,
        Kind::End,
        if sealed { FLAG_SEALED } else { 0 },
        session,
        seq,
    );
    buf
}

/// The payload of an end record.
pub fn end_payload(end: &End) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 8 + DIGEST_LEN);
    v.push(end.status as u8);
    v.extend_from_slice(&end.total_len.to_be_bytes());
    v.extend_from_slice(&end.digest);
    v
}

/// Encodes an end record whose payload is already sealed.
pub fn encode_sealed_end(session: u64, seq: u64, sealed_payload: &[u8]) -> Bytes {
    let mut buf = end_header(session, seq, true);
    buf.put_slice(sealed_payload);
    buf.freeze()
}

/// Encodes an end record.
pub fn encode_end(session: u64, seq: u64, end: &End) -> Bytes {
    let mut buf = end_header(session, seq, false);
    buf.put_slice(&end_payload(end));
    buf.freeze()
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Decodes one record. Never panics, whatever the input.
pub fn decode(raw: Bytes) -> Result<Record, DecodeError> {
    // A first byte far beyond this version is no version at all: text, or some other format.
    let unknown_version = |v: u8| {
        if v > VERSION && v <= MAX_PLAUSIBLE_VERSION {
            DecodeError::Version(v)
        } else {
            DecodeError::Malformed("it is not a tube record")
        }
    };
    if raw.len() < HEADER_LEN {
        return Err(match raw.first() {
            Some(&v) if v != VERSION => unknown_version(v),
            _ => DecodeError::Truncated,
        });
    }
    if raw[0] != VERSION {
        return Err(unknown_version(raw[0]));
    }
    let flags = raw[2];
    let known_flags = match raw[1] {
        k if k == Kind::Data as u8 => FLAG_ZSTD | FLAG_SEALED,
        k if k == Kind::End as u8 => FLAG_SEALED,
        _ => 0,
    };
    if flags & !known_flags != 0 {
        return Err(DecodeError::Flags(flags));
    }
    if raw[3] != 0 {
        return Err(DecodeError::Malformed("reserved header byte is not zero"));
    }
    let session = be_u64(&raw[4..12]);
    let seq = be_u64(&raw[12..20]);
    let body = match raw[1] {
        k if k == Kind::Begin as u8 => Body::Begin(decode_begin(&raw[HEADER_LEN..])?),
        k if k == Kind::Data as u8 => {
            if raw.len() < DATA_PREFIX_LEN {
                return Err(DecodeError::Truncated);
            }
            Body::Data(Data {
                offset: be_u64(&raw[HEADER_LEN..DATA_PREFIX_LEN]),
                zstd: flags & FLAG_ZSTD != 0,
                sealed: flags & FLAG_SEALED != 0,
                payload: raw.slice(DATA_PREFIX_LEN..),
            })
        }
        k if k == Kind::End as u8 && flags & FLAG_SEALED != 0 => {
            Body::SealedEnd(raw.slice(HEADER_LEN..))
        }
        k if k == Kind::End as u8 => Body::End(decode_end_payload(&raw[HEADER_LEN..])?),
        k => return Err(DecodeError::Kind(k)),
    };
    Ok(Record { session, seq, body })
}

fn decode_begin(mut p: &[u8]) -> Result<Begin, DecodeError> {
    let mut token = None;
    let mut started_ms = None;
    let mut max_payload = None;
    let mut live = false;
    let mut max_backlog = 0;
    let mut seal = None;
    while !p.is_empty() {
        if p.len() < 3 {
            return Err(DecodeError::Truncated);
        }
        let tag = p[0];
        let len = usize::from(u16::from_be_bytes([p[1], p[2]]));
        let value = p.get(3..3 + len).ok_or(DecodeError::Truncated)?;
        match tag {
            TAG_TOKEN => {
                token = Some(
                    value
                        .try_into()
                        .map_err(|_| DecodeError::Malformed("token is not 16 bytes"))?,
                )
            }
            TAG_STARTED if len == 8 => started_ms = Some(be_u64(value)),
            TAG_MAX_PAYLOAD if len == 4 => {
                max_payload = Some(u32::from_be_bytes(value.try_into().expect("4 bytes")))
            }
            TAG_LIVE if len == 1 => live = value[0] != 0,
            TAG_MAX_BACKLOG if len == 8 => max_backlog = be_u64(value),
            TAG_SEAL => {
                seal = Some(
                    crate::crypto::SealParams::decode(value)
                        .ok_or(DecodeError::Malformed("the session's seal option"))?,
                )
            }
            TAG_STARTED | TAG_MAX_PAYLOAD | TAG_LIVE | TAG_MAX_BACKLOG => {
                return Err(DecodeError::Malformed("begin option has the wrong length"));
            }
            t if t >= CRITICAL_TAG => return Err(DecodeError::CriticalOption(t)),
            _ => {} // an optional hint from a later version: skip it
        }
        p = &p[3 + len..];
    }
    Ok(Begin {
        token: token.ok_or(DecodeError::Malformed("begin record has no writer token"))?,
        started_ms: started_ms.unwrap_or(0),
        max_payload: max_payload.unwrap_or(0),
        live,
        max_backlog,
        seal,
    })
}

/// Decodes the payload of an end record (opened, if it was sealed).
pub fn decode_end_payload(p: &[u8]) -> Result<End, DecodeError> {
    if p.len() != 1 + 8 + DIGEST_LEN {
        return Err(DecodeError::Malformed("end record has the wrong length"));
    }
    let status = match p[0] {
        0 => EndStatus::Complete,
        1 => EndStatus::Interrupted,
        _ => return Err(DecodeError::Malformed("end record has an unknown status")),
    };
    Ok(End {
        status,
        total_len: be_u64(&p[1..9]),
        digest: p[9..].try_into().expect("checked length"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_digest_of_nothing_is_xxh3_128_of_nothing() {
        // The published XXH3-128 of the empty input, seed 0: pins the algorithm and the byte
        // order that the end record carries.
        assert_eq!(
            Digest::new().finish(),
            0x99aa06d3014798d86001c324468d497f_u128.to_be_bytes()
        );
    }

    #[test]
    fn data_record_layout_is_stable() {
        let r = encode_data(7, 9, 258, true, b"hi");
        #[rustfmt::skip]
        let want = [
            1, 2, 1, 0,                 // version, kind data, flag zstd, reserved
            0, 0, 0, 0, 0, 0, 0, 7,     // session
            0, 0, 0, 0, 0, 0, 0, 9,     // sequence
            0, 0, 0, 0, 0, 0, 1, 2,     // offset
            b'h', b'i',
        ];
        assert_eq!(&r[..], &want);
    }

    #[test]
    fn newer_versions_are_named() {
        let mut r = encode_data(1, 1, 0, false, b"x").to_vec();
        r[0] = 2;
        assert_eq!(decode(r.into()), Err(DecodeError::Version(2)));
    }

    #[test]
    fn garbage_is_not_mistaken_for_a_newer_version() {
        let not_tube = Err(DecodeError::Malformed("it is not a tube record"));
        assert_eq!(
            decode(Bytes::from_static(b"this is text, not a record")),
            not_tube
        );
        assert_eq!(decode(Bytes::from_static(b"text")), not_tube);
        assert_eq!(decode(Bytes::from_static(&[0; 32])), not_tube);
        assert_eq!(
            decode(Bytes::from_static(&[1, 2])),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(Bytes::from_static(&[3, 2])),
            Err(DecodeError::Version(3))
        );
    }

    #[test]
    fn unknown_optional_begin_options_are_skipped_and_critical_ones_refused() {
        let begin = Begin {
            token: [3; 16],
            started_ms: 5,
            max_payload: 1024,
            live: true,
            max_backlog: 1 << 20,
            seal: None,
        };
        let mut raw = encode_begin(4, &begin).to_vec();
        raw.extend_from_slice(&[0x10, 0, 2, 9, 9]);
        let rec = decode(raw.clone().into()).unwrap();
        assert_eq!(rec.body, Body::Begin(begin));
        raw.extend_from_slice(&[0x90, 0, 0]);
        assert_eq!(decode(raw.into()), Err(DecodeError::CriticalOption(0x90)));
    }

    #[test]
    fn entry_ids_round_trip() {
        assert_eq!(entry_id(3, 17), "3-17");
        assert_eq!(parse_entry_id(b"3-17"), Some((3, 17)));
        assert_eq!(parse_entry_id(b"3"), None);
        assert_eq!(parse_entry_id(b"a-1"), None);
    }

    proptest! {
        #[test]
        fn data_round_trips(session in 1u64.., seq in 1u64.., offset in any::<u64>(), zstd in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let rec = decode(encode_data(session, seq, offset, zstd, &payload)).unwrap();
            let data = Data { offset, zstd, sealed: false, payload: Bytes::from(payload) };
            prop_assert_eq!(rec, Record { session, seq, body: Body::Data(data) });
        }

        #[test]
        fn begin_round_trips(session in 1u64.., token in any::<[u8; 16]>(), started_ms in any::<u64>(), max_payload in any::<u32>(), live in any::<bool>(), max_backlog in any::<u64>()) {
            let begin = Begin { token, started_ms, max_payload, live, max_backlog, seal: None };
            let rec = decode(encode_begin(session, &begin)).unwrap();
            prop_assert_eq!(rec, Record { session, seq: 0, body: Body::Begin(begin) });
        }

        /// The writer hashes pieces as it read them and the reader as records arrive: any
        /// split of the same bytes must give the digest PROTOCOL.md defines (XXH3-128 of the
        /// whole, seed 0, big-endian).
        #[test]
        fn the_digest_does_not_depend_on_how_the_bytes_were_split(data in proptest::collection::vec(any::<u8>(), 0..4096), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
            at.sort_unstable();
            let mut d = Digest::new();
            let mut from = 0;
            for to in at.into_iter().chain([data.len()]) {
                d.update(&data[from..to]);
                from = to;
            }
            prop_assert_eq!(d.finish(), xxhash_rust::xxh3::xxh3_128(&data).to_be_bytes());
        }

        #[test]
        fn end_round_trips(session in 1u64.., seq in 1u64.., interrupted in any::<bool>(), total_len in any::<u64>(), digest in any::<[u8; DIGEST_LEN]>()) {
            let status = if interrupted { EndStatus::Interrupted } else { EndStatus::Complete };
            let end = End { status, total_len, digest };
            let rec = decode(encode_end(session, seq, &end)).unwrap();
            prop_assert_eq!(rec, Record { session, seq, body: Body::End(end) });
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Bytes::from(raw));
        }

        #[test]
        fn decoding_mutated_records_never_panics(pos in 0usize..64, byte in any::<u8>(), cut in 0usize..64) {
            let mut raw = encode_begin(1, &Begin { token: [1; 16], started_ms: 2, max_payload: 3, live: false, max_backlog: 4, seal: None }).to_vec();
            let len = raw.len();
            raw[pos % len] = byte;
            raw.truncate(len - cut % len);
            let _ = decode(Bytes::from(raw));
        }
    }
}
