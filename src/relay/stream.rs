//! Streams: entry IDs, appends, ranges and trims, with Redis 7's rules.
//!
//! Entries live in a `BTreeMap` keyed by ID: appends go to the end, ranges are ordered scans,
//! and deletes in the middle (XDEL) stay cheap. Field values are `Bytes` that usually point
//! straight into the buffer the request was read into, so a payload is never copied.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;

/// Bytes counted for one entry besides its fields: the map node, the ID, the field vector.
pub(crate) const ENTRY_OVERHEAD: usize = 64;
/// Bytes counted for each field or value besides its own length.
pub(crate) const FIELD_OVERHEAD: usize = 16;
/// Bytes counted for an empty stream.
pub(crate) const STREAM_OVERHEAD: usize = 96;

/// A stream entry ID, `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    pub fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// The next ID in order, `None` after the last possible one.
    pub fn next(self) -> Option<StreamId> {
        if self.seq < u64::MAX {
            Some(StreamId::new(self.ms, self.seq + 1))
        } else if self.ms < u64::MAX {
            Some(StreamId::new(self.ms + 1, 0))
        } else {
            None
        }
    }

    /// The previous ID in order, `None` before 0-0.
    pub fn prev(self) -> Option<StreamId> {
        if self.seq > 0 {
            Some(StreamId::new(self.ms, self.seq - 1))
        } else if self.ms > 0 {
            Some(StreamId::new(self.ms - 1, u64::MAX))
        } else {
            None
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Redis's message for any unparsable ID.
pub(crate) const INVALID_ID: &str = "ERR Invalid stream ID specified as stream command argument";

/// Parses a decimal `u64` the way Redis's `string2ull` does: digits only, no sign or spaces.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// What an ID argument said, before it is resolved against a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdArg {
    /// `ms-seq`, or `ms` with the missing sequence filled in.
    Exact(StreamId),
    /// `ms-*`: the next sequence within `ms`.
    AutoSeq(u64),
}

/// Parses `ms-seq`, `ms`, `-` and `+` (and `ms-*` when `allow_auto_seq`), as Redis's
/// `streamGenericParseIDOrReply`. `strict` refuses `-` and `+` (exclusive ranges, XADD).
pub(crate) fn parse_id(
    s: &[u8],
    missing_seq: u64,
    strict: bool,
    allow_auto_seq: bool,
) -> Result<IdArg, &'static str> {
    if s.len() > 127 {
        return Err(INVALID_ID);
    }
    match s {
        b"-" if !strict => return Ok(IdArg::Exact(StreamId::MIN)),
        b"+" if !strict => return Ok(IdArg::Exact(StreamId::MAX)),
        _ => {}
    }
    let (ms, seq) = match s.iter().position(|&c| c == b'-') {
        Some(dash) => (&s[..dash], Some(&s[dash + 1..])),
        None => (s, None),
    };
    let ms = parse_u64(ms).ok_or(INVALID_ID)?;
    match seq {
        None => Ok(IdArg::Exact(StreamId::new(ms, missing_seq))),
        Some(b"*") if allow_auto_seq => Ok(IdArg::AutoSeq(ms)),
        Some(seq) => Ok(IdArg::Exact(StreamId::new(
            ms,
            parse_u64(seq).ok_or(INVALID_ID)?,
        ))),
    }
}

/// Parses an ID that must be exact (no `ms-*`).
pub(crate) fn parse_exact_id(
    s: &[u8],
    missing_seq: u64,
    strict: bool,
) -> Result<StreamId, &'static str> {
    match parse_id(s, missing_seq, strict, false)? {
        IdArg::Exact(id) => Ok(id),
        IdArg::AutoSeq(_) => Err(INVALID_ID),
    }
}

/// The ID an XADD asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewId {
    /// `*`: the current time, or after the last entry.
    Auto,
    /// `ms-*`.
    AutoSeq(u64),
    /// An explicit ID.
    Exact(StreamId),
}

/// Why an append was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AppendError {
    #[error("ERR The ID specified in XADD must be greater than 0-0")]
    Zero,
    #[error("ERR The ID specified in XADD is equal or smaller than the target stream top item")]
    NotGreater,
    #[error("ERR The stream has exhausted the last possible ID, unable to add more items")]
    Exhausted,
}

/// How a trim chooses what goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trim {
    /// Keep at most this many entries.
    MaxLen(u64),
    /// Drop entries with smaller IDs.
    MinId(StreamId),
}

/// One entry's fields and values, alternating.
pub(crate) type Fields = Box<[Bytes]>;

/// A stream and its bookkeeping, which outlives the entries it describes.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    entries: BTreeMap<StreamId, Fields>,
    /// The last ID ever generated: deletes and trims never lower it.
    last_id: StreamId,
    /// The largest ID deleted by XDEL or a trim.
    max_deleted: StreamId,
    /// Entries ever added.
    entries_added: u64,
    /// Bytes counted for this stream (see the overhead constants).
    mem: usize,
}

fn entry_mem(fields: &[Bytes]) -> usize {
    ENTRY_OVERHEAD
        + fields
            .iter()
            .map(|f| f.len() + FIELD_OVERHEAD)
            .sum::<usize>()
}

impl Stream {
    pub fn new() -> Self {
        Self {
            mem: STREAM_OVERHEAD,
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn mem(&self) -> usize {
        self.mem
    }

    pub fn last_id(&self) -> StreamId {
        self.last_id
    }

    pub fn max_deleted(&self) -> StreamId {
        self.max_deleted
    }

    pub fn entries_added(&self) -> u64 {
        self.entries_added
    }

    pub fn first(&self) -> Option<(&StreamId, &Fields)> {
        self.entries.first_key_value()
    }

    pub fn last(&self) -> Option<(&StreamId, &Fields)> {
        self.entries.last_key_value()
    }

    /// The ID an append would get, or why it would be refused; `now_ms` is the clock.
    pub fn resolve_new_id(&self, id: NewId, now_ms: u64) -> Result<StreamId, AppendError> {
        let last = self.last_id;
        match id {
            NewId::Exact(id) if id == StreamId::MIN => Err(AppendError::Zero),
            NewId::Exact(id) if id <= last => Err(AppendError::NotGreater),
            NewId::Exact(id) => Ok(id),
            NewId::AutoSeq(ms) if ms < last.ms => Err(AppendError::NotGreater),
            NewId::AutoSeq(ms) if ms == last.ms => match last.seq.checked_add(1) {
                Some(seq) => Ok(StreamId::new(ms, seq)),
                None => Err(AppendError::NotGreater),
            },
            NewId::AutoSeq(ms) => Ok(StreamId::new(ms, 0)),
            NewId::Auto if now_ms > last.ms => Ok(StreamId::new(now_ms, 0)),
            NewId::Auto => last.next().ok_or(AppendError::Exhausted),
        }
    }

    /// Appends an entry whose ID came from [`Stream::resolve_new_id`]; returns bytes added.
    pub fn append(&mut self, id: StreamId, fields: Fields) -> usize {
        let added = entry_mem(&fields);
        self.entries.insert(id, fields);
        self.last_id = id;
        self.entries_added += 1;
        self.mem += added;
        added
    }

    /// Entries with `start <= id <= end`, in order or reversed, at most `count`.
    pub fn range(
        &self,
        start: StreamId,
        end: StreamId,
        rev: bool,
        count: Option<usize>,
    ) -> Vec<(StreamId, &Fields)> {
        if start > end {
            return Vec::new();
        }
        let limit = count.unwrap_or(usize::MAX);
        let iter = self.entries.range(start..=end).map(|(id, f)| (*id, f));
        if rev {
            iter.rev().take(limit).collect()
        } else {
            iter.take(limit).collect()
        }
    }

    /// Deletes the entries with these IDs; returns (entries deleted, bytes freed).
    pub fn delete(&mut self, ids: &[StreamId]) -> (usize, usize) {
        let (mut n, mut freed) = (0, 0);
        for id in ids {
            if let Some(fields) = self.entries.remove(id) {
                n += 1;
                freed += entry_mem(&fields);
                self.max_deleted = self.max_deleted.max(*id);
            }
        }
        self.mem -= freed;
        (n, freed)
    }

    /// Removes entries from the front as `trim` says, at most `limit` of them (0: no limit);
    /// returns (entries removed, bytes freed).
    pub fn trim(&mut self, trim: Trim, limit: usize) -> (usize, usize) {
        let (mut n, mut freed) = (0, 0);
        let limit = if limit == 0 { usize::MAX } else { limit };
        while n < limit {
            let len = self.entries.len() as u64;
            let Some(first) = self.entries.first_entry() else {
                break;
            };
            let remove = match trim {
                Trim::MaxLen(max) => len > max,
                Trim::MinId(min) => *first.key() < min,
            };
            if !remove {
                break;
            }
            let (id, fields) = first.remove_entry();
            self.max_deleted = self.max_deleted.max(id);
            freed += entry_mem(&fields);
            n += 1;
        }
        self.mem -= freed;
        (n, freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: &str) -> Fields {
        vec![
            Bytes::from_static(b"f"),
            Bytes::copy_from_slice(v.as_bytes()),
        ]
        .into_boxed_slice()
    }

    fn id(ms: u64, seq: u64) -> StreamId {
        StreamId::new(ms, seq)
    }

    #[test]
    fn ids_parse_like_redis() {
        assert_eq!(parse_id(b"5-3", 0, false, true), Ok(IdArg::Exact(id(5, 3))));
        assert_eq!(parse_id(b"5", 0, false, true), Ok(IdArg::Exact(id(5, 0))));
        assert_eq!(
            parse_id(b"5", u64::MAX, false, true),
            Ok(IdArg::Exact(id(5, u64::MAX)))
        );
        assert_eq!(parse_id(b"5-*", 0, true, true), Ok(IdArg::AutoSeq(5)));
        assert_eq!(
            parse_id(b"-", 0, false, false),
            Ok(IdArg::Exact(StreamId::MIN))
        );
        assert_eq!(
            parse_id(b"+", 0, false, false),
            Ok(IdArg::Exact(StreamId::MAX))
        );
        for bad in [&b"-"[..], b"+"] {
            assert_eq!(parse_id(bad, 0, true, false), Err(INVALID_ID));
        }
        for bad in [
            &b""[..],
            b"a",
            b"1-",
            b"-1",
            b"1-2-3",
            b"+1",
            b" 1",
            b"5-*",
            b"18446744073709551616",
        ] {
            assert_eq!(parse_id(bad, 0, false, false), Err(INVALID_ID), "{bad:?}");
        }
    }

    #[test]
    fn explicit_ids_must_grow_and_start_above_zero() {
        let mut s = Stream::new();
        assert_eq!(
            s.resolve_new_id(NewId::Exact(id(0, 0)), 0),
            Err(AppendError::Zero)
        );
        s.append(id(5, 1), fields("a"));
        assert_eq!(
            s.resolve_new_id(NewId::Exact(id(5, 1)), 0),
            Err(AppendError::NotGreater)
        );
        assert_eq!(
            s.resolve_new_id(NewId::Exact(id(4, 9)), 0),
            Err(AppendError::NotGreater)
        );
        assert_eq!(s.resolve_new_id(NewId::Exact(id(5, 2)), 0), Ok(id(5, 2)));
        assert_eq!(s.resolve_new_id(NewId::AutoSeq(5), 0), Ok(id(5, 2)));
        assert_eq!(s.resolve_new_id(NewId::AutoSeq(6), 0), Ok(id(6, 0)));
        assert_eq!(
            s.resolve_new_id(NewId::AutoSeq(4), 0),
            Err(AppendError::NotGreater)
        );
        // The clock behind the last ID: `*` continues after it.
        assert_eq!(s.resolve_new_id(NewId::Auto, 3), Ok(id(5, 2)));
        assert_eq!(s.resolve_new_id(NewId::Auto, 9), Ok(id(9, 0)));
    }

    #[test]
    fn last_id_survives_deletes_and_trims() {
        let mut s = Stream::new();
        for q in 1..=5 {
            s.append(id(1, q), fields("x"));
        }
        assert_eq!(s.delete(&[id(1, 5), id(7, 7)]).0, 1);
        assert_eq!(s.last_id(), id(1, 5));
        assert_eq!(s.max_deleted(), id(1, 5));
        assert_eq!(
            s.resolve_new_id(NewId::Exact(id(1, 5)), 0),
            Err(AppendError::NotGreater)
        );
        assert_eq!(s.trim(Trim::MaxLen(0), 0).0, 4);
        assert_eq!(s.len(), 0);
        assert_eq!(s.last_id(), id(1, 5));
        assert_eq!(s.entries_added(), 5);
        assert_eq!(s.mem(), STREAM_OVERHEAD);
    }

    #[test]
    fn trims_respect_limit_and_minid() {
        let mut s = Stream::new();
        for q in 1..=10 {
            s.append(id(q, 0), fields("x"));
        }
        assert_eq!(s.trim(Trim::MaxLen(2), 3).0, 3);
        assert_eq!(s.len(), 7);
        assert_eq!(s.trim(Trim::MinId(id(6, 0)), 0).0, 2);
        assert_eq!(s.first().map(|(i, _)| *i), Some(id(6, 0)));
        assert_eq!(s.trim(Trim::MinId(id(6, 0)), 0).0, 0);
    }

    #[test]
    fn ranges_are_inclusive_ordered_and_counted() {
        let mut s = Stream::new();
        for q in 1..=5 {
            s.append(id(q, 0), fields("x"));
        }
        let ids =
            |v: Vec<(StreamId, &Fields)>| v.into_iter().map(|(i, _)| i.ms).collect::<Vec<_>>();
        assert_eq!(ids(s.range(id(2, 0), id(4, 0), false, None)), [2, 3, 4]);
        assert_eq!(
            ids(s.range(StreamId::MIN, StreamId::MAX, true, Some(2))),
            [5, 4]
        );
        assert_eq!(
            ids(s.range(id(4, 0), id(2, 0), false, None)),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn next_and_prev_carry_across_ms() {
        assert_eq!(id(1, u64::MAX).next(), Some(id(2, 0)));
        assert_eq!(id(2, 0).prev(), Some(id(1, u64::MAX)));
        assert_eq!(StreamId::MAX.next(), None);
        assert_eq!(StreamId::MIN.prev(), None);
    }
}
