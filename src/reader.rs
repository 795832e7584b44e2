//! The reading end of a channel.
//!
//! A fetch task keeps one `XREAD` outstanding while the caller consumes what the previous one
//! returned, checks every record (sequence, length, digest) and hands payloads over through a
//! bounded queue, so a slow consumer holds the fetcher back instead of growing memory.

use crate::channel::Channel;
use crate::client::{COMMAND_TIMEOUT, Conn, RelayConfig};
use crate::error::{Error, Result};
use crate::record::{self, Begin, Body, EndStatus};
use crate::session::{self, lease_value};
use crate::writer::MAX_CHUNK_SIZE;
use bytes::{Buf, Bytes};
use redis::Value;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long one blocking read waits on the relay before the reader checks the writer's lease.
const BLOCK: Duration = Duration::from_millis(1000);

/// Default bytes asked for in one read from the relay.
pub const DEFAULT_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// How a reader reads.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Go on into later sessions instead of ending with the first one, like `tail -F`.
    pub follow: bool,
    /// Bytes to ask for in one read from the relay; bounds the reader's memory.
    pub batch_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            follow: false,
            batch_bytes: DEFAULT_BATCH_BYTES,
        }
    }
}

enum Event {
    Data(Bytes),
    Eof,
}

/// Reads a channel; an [`AsyncRead`].
///
/// Without `follow`, it reads the channel's latest session (waiting for one if there is none)
/// and ends when that session ends. A session that did not end cleanly, or whose records do not
/// add up, ends the reader with an error after everything before the fault was returned.
///
/// # Examples
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::AsyncReadExt;
/// let relay = tube::RelayConfig::from_url("redis://127.0.0.1:6379")?;
/// let channel = tube::Channel::new("cam1", tube::DEFAULT_PREFIX)?;
/// let mut reader = tube::Reader::open(&relay, &channel, tube::ReadOptions::default()).await?;
/// let mut all = Vec::new();
/// reader.read_to_end(&mut all).await?; // fails if the stream arrived incomplete
/// # Ok(()) }
/// ```
pub struct Reader {
    rx: mpsc::Receiver<Result<Event>>,
    current: Bytes,
    finished: bool,
    task: JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reader {
    /// Connects, checks the channel and starts fetching.
    ///
    /// # Errors
    /// Connection errors; [`Error::ForeignKey`] when the channel's keys are not tube's.
    pub async fn open(relay: &RelayConfig, channel: &Channel, opts: ReadOptions) -> Result<Self> {
        let mut conn = relay.connect().await?;
        let state = session::inspect(&mut conn, channel).await?;
        let last_id = if state.latest_session > 0 {
            // Just before the latest session's begin record.
            format!("{}-{}", state.latest_session - 1, u64::MAX)
        } else {
            "0-0".to_string()
        };
        let (tx, rx) = mpsc::channel(16);
        let batch_bytes = opts.batch_bytes.max(1);
        let fetcher = Fetcher {
            conn,
            channel: channel.clone(),
            follow: opts.follow,
            tx,
            last_id,
            session: None,
            count: 16,
            batch_bytes,
        };
        Ok(Self {
            rx,
            current: Bytes::new(),
            finished: false,
            task: tokio::spawn(fetcher.run()),
        })
    }

    /// The next piece of the stream, without copying it; `None` at the end of the session.
    ///
    /// # Errors
    /// [`Error::WriterVanished`], [`Error::Interrupted`], [`Error::Corrupt`] and
    /// [`Error::Decode`] when the stream is incomplete or damaged (everything before the
    /// fault has been returned); connection errors.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        if !self.current.is_empty() {
            return Ok(Some(std::mem::take(&mut self.current)));
        }
        if self.finished {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Ok(Event::Data(b))) => Ok(Some(b)),
            other => self.end(other),
        }
    }

    fn end(&mut self, event: Option<Result<Event>>) -> Result<Option<Bytes>> {
        self.finished = true;
        match event {
            Some(Ok(Event::Eof)) => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(Event::Data(_))) => unreachable!("data is handled by the caller"),
            None => Err(Error::Io(io::Error::other(
                "the reader's fetch task stopped",
            ))),
        }
    }
}

impl AsyncRead for Reader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.current.is_empty() {
                let n = self.current.len().min(buf.remaining());
                buf.put_slice(&self.current[..n]);
                self.current.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.finished {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(Event::Data(b))) => self.current = b,
                other => {
                    if let Err(e) = self.end(other) {
                        return Poll::Ready(Err(io::Error::other(e)));
                    }
                }
            }
        }
    }
}

struct SessionState {
    id: u64,
    lease: String,
    next_seq: u64,
    bytes: u64,
    max_payload: usize,
    hasher: blake3::Hasher,
}

enum Step {
    Continue,
    Done,
}

struct Fetcher {
    conn: Conn,
    channel: Channel,
    follow: bool,
    tx: mpsc::Sender<Result<Event>>,
    /// Stream ID of the last entry handled: the next read starts after it.
    last_id: String,
    session: Option<SessionState>,
    count: usize,
    batch_bytes: usize,
}

impl Fetcher {
    async fn run(mut self) {
        let event = match self.fetch().await {
            Ok(()) => Ok(Event::Eof),
            Err(e) => Err(e),
        };
        let _ = self.tx.send(event).await;
    }

    async fn fetch(&mut self) -> Result<()> {
        loop {
            let entries = self.read(Some(BLOCK)).await?;
            if entries.is_empty() {
                if self.writer_gone().await? {
                    // The end record may have landed just before the lease was released.
                    let late = self.read(None).await?;
                    if late.is_empty() {
                        self.vanished()?;
                        continue;
                    }
                    if let Step::Done = self.handle_all(late).await? {
                        return Ok(());
                    }
                }
                continue;
            }
            if let Step::Done = self.handle_all(entries).await? {
                return Ok(());
            }
        }
    }

    async fn handle_all(&mut self, entries: Vec<(String, Value)>) -> Result<Step> {
        for (id, fields) in entries {
            if let Step::Done = self.handle(id, fields).await? {
                return Ok(Step::Done);
            }
        }
        Ok(Step::Continue)
    }

    async fn read(&mut self, block: Option<Duration>) -> Result<Vec<(String, Value)>> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(self.count);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(self.channel.stream_key())
            .arg(&self.last_id);
        let reply: Value = self
            .conn
            .query_unbounded(&cmd, block.unwrap_or_default() + COMMAND_TIMEOUT)
            .await?;
        self.parse_xread(reply)
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            channel: self.channel.name().into(),
            offset: self.session.as_ref().map_or(0, |s| s.bytes),
            detail,
        }
    }

    fn parse_xread(&self, reply: Value) -> Result<Vec<(String, Value)>> {
        let streams = match reply {
            Value::Nil => return Ok(Vec::new()),
            Value::Array(streams) => streams
                .into_iter()
                .map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => Ok(kv.pop().expect("two items")),
                    _ => Err(()),
                })
                .collect::<std::result::Result<Vec<_>, ()>>(),
            Value::Map(kv) => Ok(kv.into_iter().map(|(_, v)| v).collect()),
            _ => Err(()),
        }
        .map_err(|()| self.corrupt("the relay's XREAD answer has an unexpected shape".into()))?;
        let mut out = Vec::new();
        for entries in streams {
            let Value::Array(entries) = entries else {
                return Err(self.corrupt("the relay's XREAD answer has an unexpected shape".into()));
            };
            for entry in entries {
                match entry {
                    Value::Array(mut pair) if pair.len() == 2 => {
                        let fields = pair.pop().expect("two items");
                        let id = match pair.pop().expect("two items") {
                            Value::BulkString(id) => String::from_utf8(id)
                                .map_err(|_| self.corrupt("a stream ID is not text".into()))?,
                            Value::SimpleString(id) => id,
                            _ => return Err(self.corrupt("a stream ID is not text".into())),
                        };
                        out.push((id, fields));
                    }
                    _ => {
                        return Err(
                            self.corrupt("the relay's XREAD answer has an unexpected shape".into())
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether the writer of the session being read no longer holds the lease.
    async fn writer_gone(&mut self) -> Result<bool> {
        let Some(session) = &self.session else {
            return Ok(false);
        };
        let lease: Option<String> = self
            .conn
            .query(redis::cmd("GET").arg(self.channel.writer_key()))
            .await?;
        Ok(lease.as_deref() != Some(session.lease.as_str()))
    }

    fn vanished(&mut self) -> Result<()> {
        let session = self.session.take().expect("checked by writer_gone");
        let err = Error::WriterVanished {
            channel: self.channel.name().into(),
            bytes: session.bytes,
        };
        self.session_failed(err)
    }

    /// In follow mode a failed session is reported and the reader waits for the next one;
    /// otherwise the failure ends the reader.
    fn session_failed(&mut self, err: Error) -> Result<()> {
        if self.follow {
            tracing::warn!("{err}; waiting for the next session");
            Ok(())
        } else {
            Err(err)
        }
    }

    async fn handle(&mut self, id: String, fields: Value) -> Result<Step> {
        let Some((s, q)) = record::parse_entry_id(id.as_bytes()) else {
            return Err(self.corrupt(format!("stream entry {id} does not have a tube ID")));
        };
        let raw = match fields {
            Value::Array(mut f)
                if f.len() == 2 && f[0] == Value::BulkString(record::FIELD.into()) =>
            {
                match f.pop() {
                    Some(Value::BulkString(v)) => Bytes::from(v),
                    _ => {
                        return Err(self.corrupt(format!("stream entry {id} is not a tube record")));
                    }
                }
            }
            _ => return Err(self.corrupt(format!("stream entry {id} is not a tube record"))),
        };
        let rec = record::decode(raw).map_err(|source| Error::Decode {
            channel: self.channel.name().into(),
            source,
        })?;
        if rec.session != s || rec.seq != q {
            return Err(self.corrupt(format!(
                "record {}-{} is stored under stream ID {id}",
                rec.session, rec.seq
            )));
        }
        self.last_id = id;
        match rec.body {
            Body::Begin(begin) => {
                if q != 0 {
                    return Err(self.corrupt(format!("begin record at {s}-{q}")));
                }
                if let Some(old) = self.session.take() {
                    if old.id >= s {
                        return Err(
                            self.corrupt(format!("session {s} begins after session {}", old.id))
                        );
                    }
                    // A new session began before the old one ended: its writer died.
                    self.session_failed(Error::WriterVanished {
                        channel: self.channel.name().into(),
                        bytes: old.bytes,
                    })?;
                }
                self.begin(s, &begin);
                Ok(Step::Continue)
            }
            Body::Data(payload) => {
                let limit = self.expect(s, q)?.max_payload;
                if payload.len() > limit {
                    return Err(self.corrupt(format!(
                        "record {s}-{q} holds {} bytes, more than the writer's limit of {limit}",
                        payload.len(),
                    )));
                }
                let expected = self.expect(s, q)?;
                expected.hasher.update(&payload);
                expected.bytes += payload.len() as u64;
                expected.next_seq += 1;
                if self.tx.send(Ok(Event::Data(payload))).await.is_err() {
                    // The reader was dropped: nobody wants more.
                    return Ok(Step::Done);
                }
                Ok(Step::Continue)
            }
            Body::End(end) => {
                let state = self.expect(s, q)?;
                let bytes = state.bytes;
                if end.total_len != bytes {
                    return Err(self.corrupt(format!(
                        "the writer sent {} bytes but {bytes} arrived",
                        end.total_len
                    )));
                }
                if *state.hasher.finalize().as_bytes() != end.digest {
                    return Err(self.corrupt("the stream's digest does not match".into()));
                }
                self.session = None;
                match end.status {
                    EndStatus::Complete if self.follow => Ok(Step::Continue),
                    EndStatus::Complete => Ok(Step::Done),
                    EndStatus::Interrupted => {
                        self.session_failed(Error::Interrupted {
                            channel: self.channel.name().into(),
                            bytes,
                        })?;
                        Ok(Step::Continue)
                    }
                }
            }
        }
    }

    /// The state of session `s`, checking that `s-q` is its next record.
    fn expect(&mut self, s: u64, q: u64) -> Result<&mut SessionState> {
        let Some(state) = &self.session else {
            return Err(self.corrupt(format!(
                "record {s}-{q} has no begin record before it: the start of session {s} is no longer on the relay"
            )));
        };
        if state.id != s || state.next_seq != q {
            let want = record::entry_id(state.id, state.next_seq);
            return Err(self.corrupt(format!("expected record {want}, found {s}-{q}")));
        }
        Ok(self.session.as_mut().expect("checked above"))
    }

    fn begin(&mut self, id: u64, begin: &Begin) {
        let max_payload = match begin.max_payload as usize {
            0 => MAX_CHUNK_SIZE,
            n => n.min(MAX_CHUNK_SIZE),
        };
        self.count = (self.batch_bytes / max_payload).clamp(1, 1024);
        self.session = Some(SessionState {
            id,
            lease: lease_value(&begin.token),
            next_seq: 1,
            bytes: 0,
            max_payload,
            hasher: blake3::Hasher::new(),
        });
        tracing::debug!(channel = self.channel.name(), session = id, "session found");
    }
}
