//! The wire: finding whole requests in the input, and writing replies.
//!
//! Requests are decoded by `redis-protocol`, which hands out `Bytes` views into the input
//! buffer (no copy). Before it runs, [`scan`] walks only the length headers of the request:
//! that enforces Redis's limits and error messages (which a generic decoder does not know),
//! refuses anything but arrays of bulk strings (so no nesting can reach the decoder), and
//! tells the connection how long an incomplete request will be, so that a large payload gets
//! one buffer of exactly its size.
//!
//! Replies are written by [`Out`], a queue of byte segments: small items are copied into a
//! shared buffer, large values are queued as the `Bytes` the data set holds and go out with
//! vectored writes, never copied.

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;

/// Longest inline request or header line (Redis's `PROTO_INLINE_MAX_SIZE`).
pub(crate) const MAX_INLINE: usize = 64 * 1024;
/// Longest bulk string (Redis's default `proto-max-bulk-len`).
pub(crate) const MAX_BULK: i64 = 512 * 1024 * 1024;
/// Most arguments in one request.
pub(crate) const MAX_MULTIBULK: i64 = 1024 * 1024;
/// Limits before a client has authenticated, as Redis has them.
const UNAUTH_MULTIBULK: i64 = 10;
const UNAUTH_BULK: i64 = 16384;

/// A request the relay cannot read; the connection is closed after the error is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("ERR Protocol error: too big inline request")]
    InlineTooBig,
    #[error("ERR Protocol error: too big mbulk count string")]
    MultibulkLineTooBig,
    #[error("ERR Protocol error: too big bulk count string")]
    BulkLineTooBig,
    #[error("ERR Protocol error: invalid multibulk length")]
    MultibulkLength,
    #[error("ERR Protocol error: invalid bulk length")]
    BulkLength,
    #[error("ERR Protocol error: unauthenticated multibulk length")]
    UnauthMultibulk,
    #[error("ERR Protocol error: unauthenticated bulk length")]
    UnauthBulk,
    #[error("ERR Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    #[error("ERR Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("ERR Protocol error: {0}")]
    Decoder(String),
}

/// What the start of the input holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scan {
    /// A whole multibulk request of this many bytes.
    Multibulk(usize),
    /// A whole inline request: the line's length including its newline.
    Inline(usize),
    /// An empty request (`*0`, `*-1`, a blank line) of this many bytes, to skip.
    Skip(usize),
    /// More input is needed; `need` is a lower bound on the request's length when known.
    Incomplete { need: Option<usize> },
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    memchr_crlf(&buf[from..]).map(|i| from + i)
}

fn memchr_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// Parses a length the way the decoder does (so the two always agree on framing).
fn parse_len(s: &[u8]) -> Option<i64> {
    std::str::from_utf8(s).ok()?.parse::<i64>().ok()
}

/// Looks at the headers of the first request in `buf` without decoding it.
///
/// # Errors
/// A [`ProtocolError`] worded as Redis words it.
pub(crate) fn scan(buf: &[u8], authenticated: bool) -> Result<Scan, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(Scan::Incomplete { need: None });
    };
    if first != b'*' {
        // Over-long lines fail whether or not their end has arrived, so that how the input
        // was cut never changes the outcome.
        return match buf.iter().position(|&c| c == b'\n') {
            Some(nl)
                if nl <= MAX_INLINE
                    && buf[..nl].iter().all(|c| matches!(c, b' ' | b'\r' | b'\t')) =>
            {
                Ok(Scan::Skip(nl + 1))
            }
            Some(nl) if nl <= MAX_INLINE => Ok(Scan::Inline(nl + 1)),
            None if buf.len() <= MAX_INLINE => Ok(Scan::Incomplete { need: None }),
            _ => Err(ProtocolError::InlineTooBig),
        };
    }
    let end = match find_crlf(buf, 1) {
        Some(end) if end <= MAX_INLINE => end,
        None if buf.len() <= MAX_INLINE => return Ok(Scan::Incomplete { need: None }),
        _ => return Err(ProtocolError::MultibulkLineTooBig),
    };
    let count = parse_len(&buf[1..end]).ok_or(ProtocolError::MultibulkLength)?;
    if count > MAX_MULTIBULK {
        return Err(ProtocolError::MultibulkLength);
    }
    if !authenticated && count > UNAUTH_MULTIBULK {
        return Err(ProtocolError::UnauthMultibulk);
    }
    let mut pos = end + 2;
    if count <= 0 {
        return Ok(Scan::Skip(pos));
    }
    for _ in 0..count {
        let Some(&kind) = buf.get(pos) else {
            return Ok(Scan::Incomplete {
                need: Some(pos + 4),
            });
        };
        if kind != b'$' {
            return Err(ProtocolError::ExpectedBulk(char::from(kind)));
        }
        let end = match find_crlf(buf, pos + 1) {
            Some(end) if end - pos <= MAX_INLINE => end,
            None if buf.len() - pos <= MAX_INLINE => return Ok(Scan::Incomplete { need: None }),
            _ => return Err(ProtocolError::BulkLineTooBig),
        };
        let len = parse_len(&buf[pos + 1..end]).ok_or(ProtocolError::BulkLength)?;
        if !(0..=MAX_BULK).contains(&len) {
            return Err(ProtocolError::BulkLength);
        }
        if !authenticated && len > UNAUTH_BULK {
            return Err(ProtocolError::UnauthBulk);
        }
        // Both values are bounded above, so this cannot overflow.
        pos = end + 2 + len as usize + 2;
        if pos > buf.len() {
            return Ok(Scan::Incomplete { need: Some(pos) });
        }
    }
    Ok(Scan::Multibulk(pos))
}

/// Splits the first `len` bytes (a request [`scan`] found whole) off `buf` and decodes them
/// into arguments that share the buffer's memory.
///
/// # Errors
/// When the decoder disagrees with [`scan`], which would be a bug in one of them.
pub(crate) fn decode_multibulk(
    buf: &mut BytesMut,
    len: usize,
) -> Result<Vec<Bytes>, ProtocolError> {
    use redis_protocol::resp2::{decode::decode_bytes_mut, types::BytesFrame};
    let disagree = |what: &str| ProtocolError::Decoder(format!("the request decoder {what}"));
    // Only the scanned request is given to the decoder, so it cannot read past it.
    let mut request = buf.split_to(len);
    match decode_bytes_mut(&mut request) {
        Ok(Some((BytesFrame::Array(items), used, _))) if used == len => items
            .into_iter()
            .map(|item| match item {
                BytesFrame::BulkString(b) => Ok(b),
                _ => Err(disagree("found a non-bulk item")),
            })
            .collect(),
        Ok(_) => Err(disagree("framed the request differently")),
        Err(e) => Err(ProtocolError::Decoder(e.details().to_string())),
    }
}

/// Splits an inline request (`PING`, `SET "a b" c`) off `buf` into its arguments, with
/// Redis's quoting rules (`sdssplitargs`).
///
/// # Errors
/// [`ProtocolError::UnbalancedQuotes`].
pub(crate) fn decode_inline(buf: &mut BytesMut, len: usize) -> Result<Vec<Bytes>, ProtocolError> {
    let line = buf.split_to(len);
    let mut line = &line[..len - 1];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    split_args(line).ok_or(ProtocolError::UnbalancedQuotes)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Redis's `sdssplitargs`: words separated by spaces, with "double" (escapes allowed) and
/// 'single' quotes; `None` for unbalanced quotes or a closing quote not followed by a space.
pub(crate) fn split_args(line: &[u8]) -> Option<Vec<Bytes>> {
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            return Some(args);
        }
        let mut cur = Vec::new();
        let (mut inq, mut insq) = (false, false);
        loop {
            let c = line.get(i).copied();
            if inq {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(i + 1) == Some(&b'x') => {
                        match (
                            line.get(i + 2).and_then(|&c| hex(c)),
                            line.get(i + 3).and_then(|&c| hex(c)),
                        ) {
                            (Some(h), Some(l)) => {
                                cur.push(h * 16 + l);
                                i += 3;
                            }
                            _ => cur.push(b'\\'),
                        }
                    }
                    Some(b'\\') if i + 1 < line.len() => {
                        i += 1;
                        cur.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            other => other,
                        });
                    }
                    Some(b'"') => {
                        if line.get(i + 1).is_some_and(|c| !c.is_ascii_whitespace()) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(c) => cur.push(c),
                }
            } else if insq {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(i + 1) == Some(&b'\'') => {
                        i += 1;
                        cur.push(b'\'');
                    }
                    Some(b'\'') => {
                        if line.get(i + 1).is_some_and(|c| !c.is_ascii_whitespace()) {
                            return None;
                        }
                        i += 1;
                        break;
                    }
                    Some(c) => cur.push(c),
                }
            } else {
                match c {
                    None => break,
                    Some(c) if c.is_ascii_whitespace() => break,
                    Some(b'"') => inq = true,
                    Some(b'\'') => insq = true,
                    Some(c) => cur.push(c),
                }
            }
            i += 1;
        }
        args.push(Bytes::from(cur));
    }
}

/// Values at least this long are queued by reference instead of copied.
const SHARE_AT: usize = 1024;
/// How many segments one vectored write takes at most.
const MAX_IOV: usize = 64;

/// Replies waiting to be written: a queue of segments.
#[derive(Debug)]
pub(crate) struct Out {
    /// Whole segments, oldest first.
    segs: VecDeque<Bytes>,
    /// Small items being gathered; becomes a segment when a shared value follows it.
    cur: BytesMut,
    /// Bytes queued in total (segments and `cur`).
    len: usize,
    /// RESP version of the connection: 2 or 3.
    pub proto: u8,
}

impl Default for Out {
    fn default() -> Self {
        Self::new()
    }
}

impl Out {
    pub fn new() -> Self {
        Self {
            segs: VecDeque::new(),
            cur: BytesMut::new(),
            len: 0,
            proto: 2,
        }
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn raw(&mut self, b: &[u8]) {
        if self.cur.capacity() - self.cur.len() < b.len() {
            self.cur.reserve(b.len().max(4096));
        }
        self.cur.put_slice(b);
        self.len += b.len();
    }

    fn line(&mut self, prefix: u8, n: i64) {
        let num = itoa_buf(n);
        let digits = &num.buf[num.start..];
        let mut tmp = [0u8; 24];
        tmp[0] = prefix;
        tmp[1..=digits.len()].copy_from_slice(digits);
        tmp[digits.len() + 1..digits.len() + 3].copy_from_slice(b"\r\n");
        self.raw(&tmp[..digits.len() + 3]);
    }

    pub fn simple(&mut self, s: &str) {
        self.raw(b"+");
        self.raw(s.as_bytes());
        self.raw(b"\r\n");
    }

    pub fn ok(&mut self) {
        self.raw(b"+OK\r\n");
    }

    /// An error reply; `msg` starts with its code (`ERR`, `WRONGTYPE`...). Newlines, which
    /// would break the protocol, become spaces, as Redis does.
    pub fn error(&mut self, msg: &str) {
        self.raw(b"-");
        let clean: Vec<u8> = msg
            .bytes()
            .map(|c| if c == b'\r' || c == b'\n' { b' ' } else { c })
            .collect();
        self.raw(&clean);
        self.raw(b"\r\n");
    }

    pub fn int(&mut self, n: i64) {
        self.line(b':', n);
    }

    /// A bulk string, copied.
    pub fn bulk(&mut self, b: &[u8]) {
        self.line(b'$', b.len() as i64);
        self.raw(b);
        self.raw(b"\r\n");
    }

    /// Ends the segment being gathered, so that what is queued next goes after it.
    fn seal(&mut self) {
        if !self.cur.is_empty() {
            self.segs.push_back(self.cur.split().freeze());
        }
    }

    /// A bulk string from the data set: large ones are queued without copying.
    pub fn bulk_shared(&mut self, b: &Bytes) {
        if b.len() < SHARE_AT {
            return self.bulk(b);
        }
        self.line(b'$', b.len() as i64);
        self.seal();
        self.segs.push_back(b.clone());
        self.len += b.len();
        self.raw(b"\r\n");
    }

    pub fn null(&mut self) {
        if self.proto >= 3 {
            self.raw(b"_\r\n");
        } else {
            self.raw(b"$-1\r\n");
        }
    }

    pub fn null_array(&mut self) {
        if self.proto >= 3 {
            self.raw(b"_\r\n");
        } else {
            self.raw(b"*-1\r\n");
        }
    }

    pub fn array(&mut self, n: usize) {
        self.line(b'*', n as i64);
    }

    /// A map of `n` pairs: a flat array of 2n items in RESP2.
    pub fn map(&mut self, n: usize) {
        if self.proto >= 3 {
            self.line(b'%', n as i64);
        } else {
            self.line(b'*', 2 * n as i64);
        }
    }

    /// A verbatim text reply (INFO): a bulk string in RESP2.
    pub fn verbatim(&mut self, text: &str) {
        if self.proto >= 3 {
            self.line(b'=', text.len() as i64 + 4);
            self.raw(b"txt:");
        } else {
            self.line(b'$', text.len() as i64);
        }
        self.raw(text.as_bytes());
        self.raw(b"\r\n");
    }

    /// Moves everything queued in `other` to the end of this queue.
    pub fn append(&mut self, other: &mut Out) {
        if other.is_empty() {
            return;
        }
        self.seal();
        other.seal();
        self.segs.append(&mut other.segs);
        self.len += std::mem::take(&mut other.len);
    }

    /// The segments to write next, at most [`MAX_IOV`] of them.
    pub fn slices(&mut self) -> Vec<IoSlice<'_>> {
        self.seal();
        self.segs
            .iter()
            .take(MAX_IOV)
            .map(|b| IoSlice::new(b))
            .collect()
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.segs.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
        if self.len == 0 && self.cur.capacity() > 64 * 1024 {
            // A burst of small replies is over: do not keep its buffer per idle client.
            self.cur = BytesMut::new();
        }
    }
}

/// Formats an integer without allocating.
struct NumBuf {
    buf: [u8; 20],
    start: usize,
}

fn itoa_buf(n: i64) -> NumBuf {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    NumBuf { buf, start: i }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(args: &[Vec<u8>]) -> Vec<u8> {
        let mut v = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            v.extend_from_slice(a);
            v.extend_from_slice(b"\r\n");
        }
        v
    }

    /// Feeds `input` in the given pieces and returns every request found, as the connection
    /// loop would.
    fn feed(input: &[u8], cuts: &[usize]) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.push(input.len());
        points.sort_unstable();
        for p in points {
            buf.extend_from_slice(&input[at..p.max(at)]);
            at = p.max(at);
            loop {
                match scan(&buf, true)? {
                    Scan::Multibulk(n) => out.push(decode_multibulk(&mut buf, n)?),
                    Scan::Inline(n) => out.push(decode_inline(&mut buf, n)?),
                    Scan::Skip(n) => {
                        let _ = buf.split_to(n);
                    }
                    Scan::Incomplete { .. } => break,
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn redis_limits_and_messages() {
        assert_eq!(scan(b"$99999999999\r\n", true), Ok(Scan::Inline(14)));
        assert_eq!(
            scan(b"*1\r\n$99999999999\r\n", true),
            Err(ProtocolError::BulkLength)
        );
        assert_eq!(scan(b"*1\r\n$-5\r\n", true), Err(ProtocolError::BulkLength));
        assert_eq!(scan(b"*x\r\n", true), Err(ProtocolError::MultibulkLength));
        assert_eq!(
            scan(b"*2\r\n:1\r\n", true),
            Err(ProtocolError::ExpectedBulk(':'))
        );
        assert_eq!(scan(b"*20\r\n", false), Err(ProtocolError::UnauthMultibulk));
        assert_eq!(
            scan(b"*1\r\n$20000\r\n", false),
            Err(ProtocolError::UnauthBulk)
        );
        assert_eq!(scan(b"*0\r\n", true), Ok(Scan::Skip(4)));
        assert_eq!(scan(b"*-1\r\n", true), Ok(Scan::Skip(5)));
        assert_eq!(scan(b"\r\n", true), Ok(Scan::Skip(2)));
        assert_eq!(
            scan(b"*1\r\n$300000\r\nab", true),
            Ok(Scan::Incomplete {
                need: Some(13 + 300_002)
            })
        );
        assert_eq!(
            scan(&vec![b'a'; MAX_INLINE + 1], true),
            Err(ProtocolError::InlineTooBig)
        );
        let mut long = b"*1".to_vec();
        long.extend(vec![b'1'; MAX_INLINE + 1]);
        assert_eq!(scan(&long, true), Err(ProtocolError::MultibulkLineTooBig));
        assert_eq!(
            ProtocolError::BulkLength.to_string(),
            "ERR Protocol error: invalid bulk length"
        );
    }

    #[test]
    fn inline_requests_split_like_redis() {
        let args = |s: &str| {
            split_args(s.as_bytes()).map(|v| v.iter().map(|b| b.to_vec()).collect::<Vec<_>>())
        };
        assert_eq!(
            args("set  a \"b c\\n\" 'd\\'e'"),
            Some(vec![
                b"set".to_vec(),
                b"a".to_vec(),
                b"b c\n".to_vec(),
                b"d'e".to_vec()
            ])
        );
        assert_eq!(
            args("get \"\\x41\""),
            Some(vec![b"get".to_vec(), b"A".to_vec()])
        );
        assert_eq!(args("get \"a"), None);
        assert_eq!(args("get \"a\"b"), None);
        assert_eq!(feed(b"PING\r\nECHO hi\n", &[]).unwrap().len(), 2);
    }

    #[test]
    fn shared_values_are_not_copied() {
        let big = Bytes::from(vec![7u8; 4096]);
        let mut out = Out::new();
        out.array(1);
        out.bulk_shared(&big);
        let slices = out.slices();
        assert!(slices.iter().any(|s| s.as_ptr() == big.as_ptr()));
        let total: usize = slices.iter().map(|s| s.len()).sum();
        assert_eq!(total, out.len());
    }

    /// Everything queued, written out in small steps, as a slow socket would take it.
    fn written(out: &mut Out) -> Vec<u8> {
        let mut bytes = Vec::new();
        while !out.is_empty() {
            let step: Vec<u8> = out
                .slices()
                .iter()
                .flat_map(|s| s.to_vec())
                .take(700)
                .collect();
            out.advance(step.len());
            bytes.extend(step);
        }
        bytes
    }

    /// What an append leaves of a blocked reader's answer goes before that reader's next
    /// replies, shared values and all, wherever the first write stopped.
    #[test]
    fn appended_replies_keep_their_order() {
        let (a, b) = (Bytes::from(vec![1u8; 2000]), Bytes::from(vec![2u8; 3000]));
        let queue = |out: &mut Out, first: &Bytes, n: i64| {
            out.int(n);
            out.bulk_shared(first);
            out.ok();
        };
        for written_first in [0, 1, 700, 2010, 2015] {
            let mut rest = Out::new();
            queue(&mut rest, &a, 1);
            let mut expected = Out::new();
            queue(&mut expected, &a, 1);
            let all_of_it = written(&mut expected);
            let _ = rest.slices();
            rest.advance(written_first);
            let mut out = Out::new();
            out.append(&mut rest);
            assert!(rest.is_empty());
            queue(&mut out, &b, 2);
            let mut then = Out::new();
            queue(&mut then, &b, 2);
            let mut want = all_of_it[written_first..].to_vec();
            want.extend(written(&mut then));
            assert_eq!(out.len(), want.len());
            assert_eq!(written(&mut out), want, "after {written_first} bytes");
        }
    }

    #[test]
    fn out_encodes_resp2_and_resp3() {
        let mut out = Out::new();
        out.map(1);
        out.int(-42);
        out.null();
        out.proto = 3;
        out.map(1);
        out.null();
        let bytes: Vec<u8> = out.slices().iter().flat_map(|s| s.to_vec()).collect();
        assert_eq!(bytes, b"*2\r\n:-42\r\n$-1\r\n%1\r\n_\r\n");
    }

    proptest! {
        #[test]
        fn split_requests_parse_the_same(
            reqs in prop::collection::vec(prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6), 1..5),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut input = Vec::new();
            for r in &reqs {
                input.extend(encode(r));
            }
            let got = feed(&input, &cuts).unwrap();
            let got: Vec<Vec<Vec<u8>>> = got.iter().map(|r| r.iter().map(|b| b.to_vec()).collect()).collect();
            prop_assert_eq!(got, reqs);
        }

        #[test]
        fn a_cut_never_changes_the_meaning(input in prop::collection::vec(prop_oneof![
                Just(b"*2\r\n".to_vec()), Just(b"$3\r\nabc\r\n".to_vec()), Just(b"PING\r\n".to_vec()),
                Just(b"\r\n".to_vec()), prop::collection::vec(any::<u8>(), 0..3),
            ], 0..20), cut in any::<usize>()) {
            let input: Vec<u8> = input.concat();
            if let Ok(all) = feed(&input, &[]) {
                let cut = cut % (input.len() + 1);
                let head = feed(&input[..cut], &[]).expect("a prefix of valid input is valid");
                prop_assert_eq!(&all[..head.len()], &head[..]);
            }
        }

        #[test]
        fn garbage_never_panics(input in prop::collection::vec(any::<u8>(), 0..512), cuts in prop::collection::vec(any::<usize>(), 0..4)) {
            let _ = feed(&input, &cuts);
        }

        #[test]
        fn garbage_in_resp_shape_never_panics(
            parts in prop::collection::vec(prop_oneof![
                Just(b"*".to_vec()), Just(b"$".to_vec()), Just(b"\r\n".to_vec()), Just(b"-1".to_vec()),
                Just(b"3".to_vec()), Just(b"99999999999".to_vec()), Just(b":".to_vec()), Just(b"\"".to_vec()),
                prop::collection::vec(any::<u8>(), 0..4),
            ], 0..40),
        ) {
            let input: Vec<u8> = parts.concat();
            let _ = feed(&input, &[]);
        }
    }
}
