//! The reading end of a channel.
//!
//! A fetch task keeps one `XREAD` outstanding while the caller consumes what the previous one
//! returned (behind a distant relay: many, see `Fetcher::read_ahead` and `Fetcher::tail`),
//! checks every record (sequence, offset, length, digest) and hands payloads over through a
//! bounded queue, so a slow consumer holds the fetcher back instead of growing memory. The
//! reader registers itself on the channel and keeps reporting the last record it fetched:
//! that is what allows the writer to trim, and what holds it back.

use crate::channel::Channel;
use crate::client::{COMMAND_TIMEOUT, Conn, RelayConfig};
use crate::crypto::{Sealer, Secret};
use crate::error::{Error, Result};
use crate::link::{Answer, Frame, Link};
use crate::record::{self, Begin, Body, EndStatus};
use crate::session::{self, lease_value};
use crate::writer::{MAX_CHUNK_SIZE, Position, unix_ms};
use bytes::{Buf, Bytes};
use redis::Value;
use redis_protocol::resp2::types::BytesFrame;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

/// How long one blocking read waits on the relay before the reader checks the writer's lease.
const BLOCK: Duration = Duration::from_millis(1000);
/// How long a reader's registration lives without renewal: a reader that dies stops holding
/// the writer back after this long.
pub const READER_LEASE: Duration = Duration::from_secs(12);
/// How often a reader renews its registration.
const READER_HEARTBEAT: Duration = Duration::from_secs(2);

/// Default bytes asked for in one read from the relay.
pub const DEFAULT_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Where a reader starts in the channel's latest session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartAt {
    /// At the session's first byte; an error if the relay no longer holds it.
    #[default]
    Start,
    /// At the oldest byte the relay still holds.
    Oldest,
    /// At the newest data: only what is written from now on.
    Now,
}

/// How a reader reads.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Go on into later sessions instead of ending with the first one, like `tail -F`.
    pub follow: bool,
    /// Where to start.
    pub from: StartAt,
    /// Bytes to ask for in one read from the relay; bounds the reader's memory.
    pub batch_bytes: usize,
    /// The secret of encrypted sessions. With a secret, sessions that are not encrypted are
    /// refused: the relay could have forged them.
    pub secret: Option<Secret>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            follow: false,
            from: StartAt::Start,
            batch_bytes: DEFAULT_BATCH_BYTES,
            secret: None,
        }
    }
}

/// A reader's progress, for display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderProgress {
    /// Bytes read in the current session.
    pub bytes: u64,
    /// Bytes skipped because the relay no longer held them (live sessions only).
    pub skipped: u64,
    /// How far behind the writer the reader is, in bytes, as of the writer's last report.
    pub lag: Option<u64>,
}

#[derive(Debug, Default)]
struct Shared {
    bytes: AtomicU64,
    skipped: AtomicU64,
    /// Writer's bytes written minus ours, plus one; 0 when unknown.
    lag: AtomicU64,
    position: Mutex<Option<Position>>,
    session: AtomicU64,
    /// Set before the registration is removed: a heartbeat after the removal would bring it
    /// back, for a reader that is gone.
    leaving: AtomicBool,
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
    heartbeat: JoinHandle<()>,
    shared: Arc<Shared>,
    registration: Registration,
    /// Whether [`Reader::close`] removed the registration already.
    closed: bool,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
        self.stop_heartbeat();
        if self.closed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let registration = self.registration.clone();
            rt.spawn(async move { registration.remove().await });
        }
    }
}

/// A reader's entry on the channel: an ID in the readers hash and a position key.
#[derive(Clone)]
struct Registration {
    conn: Conn,
    channel: Channel,
    id: String,
}

impl Registration {
    /// Deletes the registration at once; best effort, and not worth waiting for a lost relay.
    async fn remove(self) {
        let mut conn = self.conn.fragile();
        let mut pipe = redis::pipe();
        pipe.cmd("DEL")
            .arg(self.channel.reader_key(&self.id))
            .ignore();
        pipe.cmd("HDEL")
            .arg(self.channel.readers_key())
            .arg(&self.id)
            .ignore();
        let _: Result<()> = conn.pipe(&pipe).await;
    }

    /// [`Registration::remove`] while the reader's connection may be held by a blocking read
    /// (up to a second): also over a new connection, whichever is answered first.
    async fn remove_now(self) {
        let fresh = {
            let this = self.clone();
            async move {
                match this.conn.relay().connect().await {
                    Ok(conn) => Registration { conn, ..this }.remove().await,
                    Err(_) => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            () = fresh => {}
            () = self.remove() => {}
        }
    }

    /// Also keeps the readers hash from outliving its readers: on a channel without a writer
    /// (whose heartbeat sets the channel's expiry) nothing else would remove the entry of a
    /// reader that was killed.
    fn register(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("HSET")
            .arg(self.channel.readers_key())
            .arg(&self.id)
            .arg(unix_ms())
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(self.channel.readers_key())
            .arg(READER_LEASE.as_millis() as u64)
            .ignore();
    }

    fn report(&self, pipe: &mut redis::Pipeline, position: &Position) {
        pipe.cmd("SET")
            .arg(self.channel.reader_key(&self.id))
            .arg(position.encode())
            .arg("PX")
            .arg(READER_LEASE.as_millis() as u64)
            .ignore();
    }
}

impl Reader {
    /// Connects, checks the channel and starts fetching; the reader registers with its first
    /// read.
    ///
    /// # Errors
    /// Connection errors; [`Error::ForeignKey`] when the channel's keys are not tube's.
    pub async fn open(relay: &RelayConfig, channel: &Channel, opts: ReadOptions) -> Result<Self> {
        let mut conn = relay.connect().await?;
        // The channel's check is one round trip: it tells how far the relay is, too.
        let inspected = std::time::Instant::now();
        let state = session::inspect(&mut conn, channel).await?;
        let rtt = inspected.elapsed();
        let latest = state.latest_session;
        // Just before the latest session's begin record.
        let mut last = (
            latest.saturating_sub(1),
            if latest > 0 { u64::MAX } else { 0 },
        );
        let mut join_mid_session = false;
        match opts.from {
            StartAt::Start => {}
            StartAt::Oldest if latest > 0 => {
                if let Some((s, q)) =
                    session::first_entry(&mut conn, channel, &record::entry_id(latest, 0), false)
                        .await?
                    && q > 0
                {
                    last = (s, q - 1);
                    join_mid_session = true;
                }
            }
            StartAt::Now if latest > 0 => {
                // Everything after the newest record: the next data record opens the session
                // mid-way, or, if the session is over, the next session's begin record comes.
                if let Some(newest) = session::first_entry(&mut conn, channel, "+", true).await? {
                    last = newest;
                    join_mid_session = true;
                }
            }
            StartAt::Oldest | StartAt::Now => {}
        }
        // From here on a lost relay is waited for, not a failure.
        let conn = conn.resilient();
        let registration = Registration {
            conn: conn.clone(),
            channel: channel.clone(),
            id: hex(&rand::random::<[u8; 8]>()),
        };
        let position = Position {
            session: last.0,
            seq: last.1,
            offset: 0,
        };
        // The registration goes with the first read (see `Fetcher::registration_update`),
        // which the relay runs after it: a round trip sooner to the first byte.
        let shared = Arc::new(Shared {
            position: Mutex::new(Some(position)),
            ..Shared::default()
        });
        let (tx, rx) = mpsc::channel(16);
        let fetcher = Fetcher {
            // No connection has the registration yet.
            generation: u64::MAX,
            conn,
            retry_for: relay.retry_for(),
            lease_missing_since: None,
            channel: channel.clone(),
            follow: opts.follow,
            join_mid_session,
            awaiting: (latest > 0 && opts.from != StartAt::Now).then_some(latest),
            tx,
            last_id: record::entry_id(last.0, last.1),
            reported: Some(position),
            session: None,
            count: 16,
            behind: false,
            ahead: Ahead::default(),
            relay: relay.clone(),
            rtt,
            tailing: false,
            tail_retry: None,
            last_report: Instant::now(),
            tail_window: 0,
            report_bytes: 0,
            batch_bytes: opts.batch_bytes.max(1),
            secret: opts.secret,
            shared: shared.clone(),
            registration: registration.clone(),
        };
        Ok(Self {
            rx,
            current: Bytes::new(),
            finished: false,
            task: tokio::spawn(fetcher.run()),
            heartbeat: tokio::spawn(heartbeat(registration.clone(), shared.clone())),
            shared,
            registration,
            closed: false,
        })
    }

    /// Progress so far.
    pub fn progress(&self) -> ReaderProgress {
        self.progress_handle()()
    }

    /// A function that returns the progress, for a display that outlives borrows.
    pub fn progress_handle(&self) -> impl Fn() -> ReaderProgress + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || ReaderProgress {
            bytes: shared.bytes.load(Ordering::Relaxed),
            skipped: shared.skipped.load(Ordering::Relaxed),
            lag: shared.lag.load(Ordering::Relaxed).checked_sub(1),
        }
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

    /// Stops reading and removes the reader's registration from the relay at once (rather
    /// than when it expires).
    pub async fn close(mut self) {
        self.stop_heartbeat();
        self.closed = true;
        if self.finished {
            // The fetch task ended the stream and is removing the registration now.
            let _ = (&mut self.task).await;
            return;
        }
        self.task.abort();
        self.registration.clone().remove_now().await;
    }

    /// Stops the heartbeat for good, before the registration is removed. The flag covers a
    /// heartbeat running on another thread, which the abort reaches only at its next pause.
    fn stop_heartbeat(&self) {
        self.heartbeat.abort();
        self.shared.leaving.store(true, Ordering::Relaxed);
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

/// What is wrong with an `XREAD` answer.
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    /// Not arrays of streams, entries and fields as `XREAD` answers.
    Shape,
    /// The entry with this ID does not hold a record in its one field.
    NotRecord(String),
}

/// The entries of an `XREAD` answer in RESP2 (arrays of streams, each its name and its
/// entries, each an ID and its fields), with their records as they lie in the read buffer,
/// not copied.
fn xread_entries(streams: Vec<BytesFrame>) -> std::result::Result<Vec<(String, Bytes)>, Malformed> {
    let mut out = Vec::new();
    for stream in streams {
        let BytesFrame::Array(mut name_entries) = stream else {
            return Err(Malformed::Shape);
        };
        if name_entries.len() != 2 {
            return Err(Malformed::Shape);
        }
        let Some(BytesFrame::Array(entries)) = name_entries.pop() else {
            return Err(Malformed::Shape);
        };
        for entry in entries {
            let BytesFrame::Array(mut pair) = entry else {
                return Err(Malformed::Shape);
            };
            if pair.len() != 2 {
                return Err(Malformed::Shape);
            }
            let (fields, id) = (pair.pop().expect("two"), pair.pop().expect("two"));
            let id = match id {
                BytesFrame::BulkString(id) | BytesFrame::SimpleString(id) => {
                    String::from_utf8(id.to_vec()).map_err(|_| Malformed::Shape)?
                }
                _ => return Err(Malformed::Shape),
            };
            let record = match fields {
                BytesFrame::Array(mut f)
                    if f.len() == 2
                        && matches!(&f[0], BytesFrame::BulkString(name) if name == record::FIELD) =>
                {
                    match f.pop() {
                        Some(BytesFrame::BulkString(v)) => Some(v),
                        _ => None,
                    }
                }
                _ => None,
            };
            match record {
                Some(record) => out.push((id, record)),
                None => return Err(Malformed::NotRecord(id)),
            }
        }
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keeps the reader's registration alive and learns how far behind the writer it is.
async fn heartbeat(registration: Registration, shared: Arc<Shared>) {
    let mut conn = registration.conn.clone();
    let channel = registration.channel.clone();
    loop {
        tokio::time::sleep(READER_HEARTBEAT).await;
        if shared.leaving.load(Ordering::Relaxed) {
            return;
        }
        let position = *shared.position.lock().expect("not poisoned");
        let mut pipe = redis::pipe();
        if let Some(p) = &position {
            registration.report(&mut pipe, p);
        }
        registration.register(&mut pipe);
        pipe.cmd("HMGET")
            .arg(channel.meta_key())
            .arg("session")
            .arg("written");
        match conn.pipe::<((Option<u64>, Option<u64>),)>(&pipe).await {
            Ok(((Some(session), Some(written)),)) => {
                let lag = if session == shared.session.load(Ordering::Relaxed) {
                    written.saturating_sub(shared.bytes.load(Ordering::Relaxed)) + 1
                } else {
                    0
                };
                shared.lag.store(lag, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("reader heartbeat failed: {e}"),
        }
    }
}

struct SessionState {
    id: u64,
    lease: String,
    next_seq: u64,
    bytes: u64,
    max_payload: usize,
    live: bool,
    /// False once bytes were skipped: the digest can no longer be checked.
    whole: bool,
    hasher: record::Digest,
    /// The session key, when the session is sealed.
    sealer: Option<Arc<Sealer>>,
}

enum Step {
    Continue,
    Done,
}

/// A read-ahead request's answer and when it arrived.
type Answered = (Instant, Result<Vec<Value>>);

/// Most reads a tail keeps waiting on the relay.
const MAX_TAIL: u64 = 256;
/// Most bytes of replies a tail keeps waiting for on a near relay, where the reads need
/// only cover the reader's own pauses, not a round trip.
const NEAR_TAIL_BYTES: u64 = 4 << 20;
/// What an `XREAD` answer of one record adds to the record: the arrays, the stream's name
/// (at most a few hundred bytes), the ID and the field.
const MAX_ANSWER_OVERHEAD: usize = 1024;
/// How long a reader waits before it tries again to open a tail connection that failed.
const TAIL_RETRY: Duration = Duration::from_secs(10);
/// Least time between two reports of the position: the writer looks at it every few
/// milliseconds at most.
const REPORT_GAP: Duration = Duration::from_millis(2);
/// Longest a reader that follows a session keeps its progress to itself while that stays
/// under [`Fetcher::report_bytes`]: the writer needs it only to free room in its budget, and
/// each report costs the relay and the reader a wake-up.
const REPORT_EVERY: Duration = Duration::from_millis(50);

/// Bytes asked for in one read-ahead request: small enough that the window slides smoothly.
const RANGE_BYTES: u64 = 1 << 20;
/// The most a reader reads ahead when the channel sets no budget.
const MAX_AHEAD_BYTES: u64 = 32 << 20;
/// An answer that arrives this soon after its request shows the link keeps up: the reader
/// may ask for more at once.
const PROMPT: Duration = Duration::from_secs(1);
/// An answer this late shows requests queue on a slow link: ask for less at once, so that
/// none comes near the command timeout.
const QUEUED: Duration = Duration::from_secs(4);

/// How far a reader behind a distant relay reads ahead.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ahead {
    /// Records per request.
    range: u64,
    /// Records in flight at most: what the reply room the writer keeps free on the relay
    /// holds, since every answer may sit there at once. 0: the reader never reads ahead.
    max: u64,
    /// Records in flight allowed now: it starts at one batch and grows while answers come
    /// back promptly.
    limit: u64,
    /// Whether read-ahead was used yet (it is logged once).
    announced: bool,
}

impl Ahead {
    fn new(max_backlog: u64, max_payload: usize, batch: u64) -> Self {
        let cost = crate::writer::reply_cost(max_payload);
        let room = match max_backlog {
            0 => MAX_AHEAD_BYTES,
            budget => crate::writer::reply_room(budget).min(MAX_AHEAD_BYTES),
        };
        let max = room / cost;
        if max < 2 {
            return Self::default();
        }
        let range = (RANGE_BYTES / cost).clamp(1, max / 2);
        Self {
            range,
            max,
            limit: batch.clamp(range, max),
            announced: false,
        }
    }

    /// Widens the window by one request after a prompt answer (doubling it every round
    /// trip, as long as the link keeps up), halves it after a late one.
    fn adjust(&mut self, took: Duration) {
        if took < PROMPT {
            self.limit = (self.limit + self.range).min(self.max);
        } else if took > QUEUED {
            self.limit = (self.limit / 2).max(self.range);
        }
    }
}

struct Fetcher {
    conn: Conn,
    /// The connection the reader last registered on: a new one may reach a relay that lost
    /// the registration.
    generation: u64,
    /// How long a writer may be away (its lease lapsed) before the reader takes it as gone:
    /// as long as a writer keeps reconnecting.
    retry_for: Duration,
    lease_missing_since: Option<Instant>,
    channel: Channel,
    follow: bool,
    /// The first session may be joined in the middle (`--from oldest` / `--from now`).
    join_mid_session: bool,
    /// The session the reader starts in, until one of its records arrives: the relay counts
    /// it, so its records should be there.
    awaiting: Option<u64>,
    tx: mpsc::Sender<Result<Event>>,
    /// Stream ID of the last entry handled: the next read starts after it.
    last_id: String,
    /// The position last sent to the relay.
    reported: Option<Position>,
    session: Option<SessionState>,
    count: usize,
    /// Whether the last read returned a full batch.
    behind: bool,
    ahead: Ahead,
    relay: RelayConfig,
    /// The round trip to the relay, as the channel's check took it.
    rtt: Duration,
    /// Whether the reader caught up with the writer of a distant relay's open session and
    /// should follow it with [`Fetcher::tail`].
    tailing: bool,
    /// No tail connection is tried again before this, after one could not be opened.
    tail_retry: Option<Instant>,
    /// When the position was last sent on its own (while tailing).
    last_report: Instant,
    /// Reads kept waiting on the relay while following the session; 0 when the replies
    /// they may hold do not fit the room the writer keeps free.
    tail_window: u64,
    /// Progress, in bytes, that a following reader reports at once. On a near relay a
    /// sixteenth of the budget, so that a writer waiting for room never waits on a report
    /// for long; on a distant one every record, since the writer learns of it a round trip
    /// late all the same.
    report_bytes: u64,
    batch_bytes: usize,
    secret: Option<Secret>,
    shared: Arc<Shared>,
    registration: Registration,
}

impl Fetcher {
    async fn run(mut self) {
        let event = match self.fetch().await {
            Ok(()) => Ok(Event::Eof),
            Err(e) => Err(e),
        };
        // The consumer finishes its output while the relay forgets this reader.
        let _ = self.tx.send(event).await;
        self.shared.leaving.store(true, Ordering::Relaxed);
        self.registration.clone().remove().await;
    }

    async fn fetch(&mut self) -> Result<()> {
        loop {
            if self.behind && self.ahead.max > 0 {
                self.behind = false;
                if let Step::Done = self.read_ahead().await? {
                    return Ok(());
                }
                // The read-ahead ends where the reader caught up.
                self.tailing = true;
                continue;
            }
            if self.tailing && self.tail_window > 0 {
                self.tailing = false;
                if let Step::Done = self.tail().await? {
                    return Ok(());
                }
                continue;
            }
            let entries = self.read(Some(BLOCK)).await?;
            // A full batch means more is probably waiting.
            self.behind = entries.len() >= self.batch();
            if entries.is_empty() {
                if self.session.is_none() && self.session_lost().await? {
                    continue;
                }
                if self.writer_gone().await? {
                    // The end record may have landed just before the lease was released.
                    let late = self.read(None).await?;
                    if late.is_empty() {
                        self.vanished().await?;
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
            if !self.behind {
                self.tailing = true;
                // Caught up: let the consumer take what just arrived before the next request
                // goes out, so a message reaches stdout first. (Behind, fetch first.)
                tokio::task::yield_now().await;
            }
        }
    }

    /// Whether the relay is far enough (a round trip of 2 ms or more) for read-ahead to pay.
    fn far(&self) -> bool {
        self.rtt >= crate::client::DISTANT
    }

    async fn handle_all(&mut self, entries: Vec<(String, Value)>) -> Result<Step> {
        for (id, fields) in entries {
            if let Step::Done = self.handle(id, fields).await? {
                return Ok(Step::Done);
            }
        }
        Ok(Step::Continue)
    }

    /// Streams the open session from a distant relay, where one batch per round trip would
    /// cap the rate at batch / round trip: keeps several `XRANGE` requests for the next
    /// records in flight (their IDs are dense, `SESSION-SEQ`, so they can be named before
    /// they are read) and issues the next as each answer is handled, so the link stays busy
    /// while the consumer takes the data. Returns at the first short answer, which means the
    /// reader caught up (or records were trimmed, or the session ended): the requests still
    /// in flight are dropped and [`Fetcher::tail`] takes over from the last record handled.
    async fn read_ahead(&mut self) -> Result<Step> {
        debug_assert!(self.ahead.max > 0, "called only with a read-ahead window");
        let (Some(state), Some((s, q))) = (
            &self.session,
            record::parse_entry_id(self.last_id.as_bytes()),
        ) else {
            return Ok(Step::Continue);
        };
        if state.id != s {
            return Ok(Step::Continue);
        }
        if !self.ahead.announced {
            self.ahead.announced = true;
            tracing::debug!(
                "behind a distant relay: reading ahead up to {} records, {} per request",
                self.ahead.max,
                self.ahead.range
            );
        }
        let range = self.ahead.range;
        // Each request: when it was issued, the records it asked for, and its answer with
        // when that arrived.
        let mut pending: VecDeque<(Instant, u64, AbortOnDropHandle<Answered>)> = VecDeque::new();
        let mut next = q.saturating_add(1);
        let mut in_flight = 0;
        loop {
            while in_flight + range <= self.ahead.limit.max(range) {
                let mut pipe = redis::pipe();
                let position = self.registration_update(&mut pipe);
                // The report rides with the request; a request that fails takes the reader
                // down or is sent again with it.
                self.reported = position;
                pipe.cmd("XRANGE")
                    .arg(self.channel.stream_key())
                    .arg(record::entry_id(s, next))
                    .arg(record::entry_id(s, next.saturating_add(range - 1)));
                let mut conn = self.conn.clone();
                // An answer waits for those ahead of it; the window keeps that under
                // `QUEUED`, well within twice the usual timeout.
                let deadline = COMMAND_TIMEOUT * 2;
                let task = tokio::spawn(async move {
                    let reply = conn.pipe_unbounded::<Vec<Value>>(&pipe, deadline).await;
                    (Instant::now(), reply)
                });
                pending.push_back((Instant::now(), range, AbortOnDropHandle::new(task)));
                next = next.saturating_add(range);
                in_flight += range;
            }
            let (issued, asked, task) = pending.pop_front().expect("a request is in flight");
            in_flight -= asked;
            let (arrived, replies) = task.await.map_err(|e| Error::Io(io::Error::other(e)))?;
            let mut replies = replies?;
            let took = arrived - issued;
            let mut entries = Vec::new();
            if let Some(reply) = replies.pop() {
                self.parse_entries(reply, &mut entries)?;
            }
            let full = entries.len() as u64 >= asked;
            if let Step::Done = self.handle_all(entries).await? {
                return Ok(Step::Done);
            }
            if !full {
                return Ok(Step::Continue);
            }
            self.ahead.adjust(took);
        }
    }

    /// Follows the open session once the reader has caught up: keeps a blocking read for
    /// each of the next records waiting on the relay (`XREAD COUNT 1 BLOCK 0` after the
    /// record before it: the IDs are dense, so every read names its record), on a
    /// connection of their own, which the relay serves in order. Each record then leaves the
    /// relay as it lands, instead of waiting there for the reader's next request (a round
    /// trip on a distant relay). On a near relay the reader says nothing to the relay per
    /// record either (see `refill` below and [`Fetcher::report_bytes`]), so that per record
    /// the relay wakes once, for the append. The position goes out on the main
    /// connection, since the tail connection answers nothing else before its reads.
    ///
    /// Returns, dropping that connection and the reads waiting on it, when the session ends,
    /// when an answer is not the record it asked for (trimmed records, a new session), on any
    /// failure, and when nothing came for a while and the writer is gone or the record is on
    /// the relay all the same. A blocking read then takes over from the last record handled.
    async fn tail(&mut self) -> Result<Step> {
        let (Some(state), Some((s, q))) = (
            &self.session,
            record::parse_entry_id(self.last_id.as_bytes()),
        ) else {
            return Ok(Step::Continue);
        };
        if state.id != s || self.tail_retry.is_some_and(|t| Instant::now() < t) {
            return Ok(Step::Continue);
        }
        let max_answer = state.max_payload + MAX_ANSWER_OVERHEAD;
        let mut link = match Link::open(&self.relay).await {
            Ok(link) => link.waiting(max_answer),
            Err(e) => {
                tracing::debug!("no connection for reading ahead: {e}");
                self.tail_retry = Some(Instant::now() + TAIL_RETRY);
                return Ok(Step::Continue);
            }
        };
        let window = self.tail_window;
        // The reads are topped up once no more than this many wait: on a distant relay after
        // each answer, since the window only just covers the round trip; on a near one once
        // half of them were answered, so that the relay hears from the reader once per half
        // window rather than once per record.
        let refill = if self.far() {
            window.saturating_sub(1)
        } else {
            window / 2
        };
        tracing::debug!("following the session with {window} reads waiting on the relay");
        let key = self.channel.stream_key();
        let tick = BLOCK.max(self.rtt * 4);
        // The next record to ask for, and the next to arrive.
        let mut next = q.saturating_add(1);
        let mut want = next;
        self.report_now();
        let mut reads = Vec::new();
        loop {
            if next - want <= refill {
                while next - want < window {
                    let after = record::entry_id(s, next - 1);
                    reads.push(Frame::command(&[
                        b"XREAD",
                        b"COUNT",
                        b"1",
                        b"BLOCK",
                        b"0",
                        b"STREAMS",
                        key.as_bytes(),
                        after.as_bytes(),
                    ]));
                    next += 1;
                }
                link.send_all(&reads).await;
                reads.clear();
            }
            let report = self.report_due();
            let answer = tokio::select! {
                answer = link.answer() => answer,
                () = tokio::time::sleep_until(report.unwrap_or_else(Instant::now).into()), if report.is_some() => {
                    self.report_now();
                    continue;
                }
                () = tokio::time::sleep(tick) => {
                    if self.tail_stalled(s, want).await? {
                        return Ok(Step::Continue);
                    }
                    continue;
                }
            };
            let entries = match answer {
                Ok(Answer::Array(streams)) => {
                    xread_entries(streams).map_err(|m| self.malformed(m))?
                }
                Ok(other) => {
                    tracing::debug!("reading ahead stopped: the relay answered {other:?}");
                    return Ok(Step::Continue);
                }
                Err(e) => {
                    tracing::debug!("reading ahead stopped: {e}");
                    return Ok(Step::Continue);
                }
            };
            let expected = record::entry_id(s, want);
            let aligned = entries.len() == 1 && entries[0].0 == expected;
            for (id, raw) in entries {
                if let Step::Done = self.handle_record(id, raw).await? {
                    return Ok(Step::Done);
                }
            }
            if !aligned || self.session.as_ref().is_none_or(|st| st.id != s) {
                return Ok(Step::Continue);
            }
            want += 1;
            if self.report_due().is_some_and(|due| due <= Instant::now()) {
                self.report_now();
            }
        }
    }

    /// When the position should next go out while following a session; `None` when the
    /// relay has it already. Progress of [`Fetcher::report_bytes`] goes out as soon as the
    /// gap allows (the writer may be waiting for that room, and send nothing until it comes);
    /// less waits [`REPORT_EVERY`].
    fn report_due(&self) -> Option<Instant> {
        let position = (*self.shared.position.lock().expect("not poisoned"))?;
        let unreported = match self.reported {
            Some(r) if r == position => return None,
            Some(r) if r.session == position.session => position.offset.saturating_sub(r.offset),
            _ => u64::MAX,
        };
        Some(if unreported >= self.report_bytes {
            self.last_report + REPORT_GAP
        } else {
            self.last_report + REPORT_EVERY
        })
    }

    /// After a while without an answer on the tail connection: whether to give it up, because
    /// the writer is gone, or because the record it waits for (or a later one) is on the relay
    /// and yet did not come, so the connection no longer delivers.
    async fn tail_stalled(&mut self, s: u64, want: u64) -> Result<bool> {
        if self.writer_gone().await? {
            return Ok(true);
        }
        let from = record::entry_id(s, want);
        let later = session::first_entry(&mut self.conn, &self.channel, &from, false).await?;
        Ok(later.is_some())
    }

    /// Sends the reader's position on its own, now, unless one went out very recently.
    fn report_now(&mut self) {
        if self.last_report.elapsed() < REPORT_GAP {
            return;
        }
        let mut pipe = redis::pipe();
        let position = self.registration_update(&mut pipe);
        if pipe.is_empty() {
            return;
        }
        self.conn.send_unanswered(&pipe);
        self.reported = position;
        self.last_report = Instant::now();
    }

    /// Adds to `pipe` what the relay should know of this reader: its position when that
    /// changed, and its whole registration on a new connection. Returns the position.
    fn registration_update(&mut self, pipe: &mut redis::Pipeline) -> Option<Position> {
        let position = *self.shared.position.lock().expect("not poisoned");
        let generation = self.conn.generation();
        if generation != self.generation {
            self.generation = generation;
            self.reported = None;
            self.registration.register(pipe);
        }
        if position != self.reported
            && let Some(p) = &position
        {
            self.registration.report(pipe, p);
        }
        position
    }

    /// Records asked for in one read. Behind a distant relay, as many as the read-ahead
    /// window holds: a reader that keeps up with the writer reads once per round trip, and
    /// gets all that arrived meanwhile.
    fn batch(&self) -> usize {
        self.count.max(self.ahead.limit as usize)
    }

    /// Reads the next entries; reports the reader's position in the same round trip.
    async fn read(&mut self, block: Option<Duration>) -> Result<Vec<(String, Value)>> {
        let mut pipe = redis::pipe();
        let position = self.registration_update(&mut pipe);
        let cmd = pipe.cmd("XREAD");
        cmd.arg("COUNT").arg(self.batch());
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(self.channel.stream_key())
            .arg(&self.last_id);
        let (reply,): (Value,) = self
            .conn
            .pipe_unbounded(&pipe, block.unwrap_or_default() + COMMAND_TIMEOUT)
            .await?;
        self.reported = position;
        self.parse_xread(reply)
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt {
            channel: self.channel.name().into(),
            offset: self.session.as_ref().map_or(0, |s| s.bytes),
            detail,
        }
    }

    /// The error for an `XREAD` answer that is not what tube wrote.
    fn malformed(&self, m: Malformed) -> Error {
        self.corrupt(match m {
            Malformed::Shape => "the relay's XREAD answer has an unexpected shape".into(),
            Malformed::NotRecord(id) => format!("stream entry {id} is not a tube record"),
        })
    }

    fn parse_xread(&self, reply: Value) -> Result<Vec<(String, Value)>> {
        let shape = || self.malformed(Malformed::Shape);
        let streams = match reply {
            Value::Nil => return Ok(Vec::new()),
            Value::Array(streams) => streams
                .into_iter()
                .map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => Ok(kv.pop().expect("two items")),
                    _ => Err(shape()),
                })
                .collect::<Result<Vec<_>>>()?,
            Value::Map(kv) => kv.into_iter().map(|(_, v)| v).collect(),
            _ => return Err(shape()),
        };
        let mut out = Vec::new();
        for entries in streams {
            self.parse_entries(entries, &mut out)?;
        }
        Ok(out)
    }

    /// Appends the entries of one stream (an XRANGE answer, or one stream of an XREAD
    /// answer) to `out`.
    fn parse_entries(&self, entries: Value, out: &mut Vec<(String, Value)>) -> Result<()> {
        let shape = || self.corrupt("the relay's answer has an unexpected shape".into());
        let Value::Array(entries) = entries else {
            return Err(shape());
        };
        for entry in entries {
            let Value::Array(mut pair) = entry else {
                return Err(shape());
            };
            if pair.len() != 2 {
                return Err(shape());
            }
            let fields = pair.pop().expect("two items");
            let id = match pair.pop().expect("two items") {
                Value::BulkString(id) => String::from_utf8(id).map_err(|_| shape())?,
                Value::SimpleString(id) => id,
                _ => return Err(shape()),
            };
            out.push((id, fields));
        }
        Ok(())
    }

    /// When the reader waits for a session the relay says exists (its meta hash counts it)
    /// but holds no record of it and no writer holds the channel, the records were deleted or
    /// the relay lost them: say so instead of waiting forever. In follow mode the reader then
    /// waits for the next session. Returns whether the loss was reported and waiting goes on.
    async fn session_lost(&mut self) -> Result<bool> {
        let Some(s) = self.awaiting else {
            return Ok(false);
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.channel.stream_key())
            .arg(record::entry_id(s, 0))
            .arg("+")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("EXISTS").arg(self.channel.writer_key());
        let (first, writer): (Vec<(String, Value)>, u64) = self.conn.pipe(&pipe).await?;
        if !first.is_empty() || writer > 0 {
            return Ok(false);
        }
        self.awaiting = None;
        self.session_failed(self.lost(format!(
            "session {s} is no longer on the relay: its records were deleted, or the relay lost them"
        )))?;
        Ok(true)
    }

    /// Whether the writer of the session being read is gone: another writer holds the
    /// lease, the writer released it saying the session ended, or nobody has held it for
    /// `retry_for` (a writer that lost the relay takes its lease back when it returns).
    async fn writer_gone(&mut self) -> Result<bool> {
        let Some(session) = &self.session else {
            return Ok(false);
        };
        let id = session.id;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.channel.writer_key());
        pipe.cmd("HGET").arg(self.channel.meta_key()).arg("ended");
        let (lease, ended): (Option<String>, Option<u64>) = self.conn.pipe(&pipe).await?;
        match lease {
            Some(l) if l == session.lease => {
                self.lease_missing_since = None;
                Ok(false)
            }
            Some(_) => Ok(true),
            // The writer ended the session on purpose: no need to wait for it.
            None if ended.is_some_and(|e| e >= id) => Ok(true),
            None => {
                let since = *self.lease_missing_since.get_or_insert_with(Instant::now);
                if since.elapsed() < self.retry_for {
                    tracing::debug!("the writer's lease lapsed; waiting for it to come back");
                }
                Ok(since.elapsed() >= self.retry_for)
            }
        }
    }

    /// Ends the open session, whose writer is gone without an end record: it vanished, or
    /// the relay lost the end of the session (then the newest record the reader handled is
    /// not on the relay any more).
    async fn vanished(&mut self) -> Result<()> {
        let newest = session::newest_entry(&mut self.conn, &self.channel).await?;
        let last = record::parse_entry_id(self.last_id.as_bytes());
        let err = if newest.is_some() && newest >= last {
            Error::WriterVanished {
                channel: self.channel.name().into(),
                bytes: self.session.as_ref().map_or(0, |s| s.bytes),
            }
        } else {
            self.lost(format!(
                "the relay no longer holds record {} or anything after it: it was restarted \
                 without persistence, flushed, or the channel was deleted",
                self.last_id
            ))
        };
        self.lease_missing_since = None;
        self.session = None;
        self.session_failed(err)
    }

    fn lost(&self, detail: String) -> Error {
        Error::Lost {
            channel: self.channel.name().into(),
            offset: self.session.as_ref().map_or(0, |s| s.bytes),
            detail,
        }
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

    fn set_position(&self, s: u64, q: u64) {
        let offset = self.shared.bytes.load(Ordering::Relaxed);
        *self.shared.position.lock().expect("not poisoned") = Some(Position {
            session: s,
            seq: q,
            offset,
        });
    }

    async fn handle(&mut self, id: String, fields: Value) -> Result<Step> {
        let raw = match fields {
            Value::Array(mut f)
                if f.len() == 2 && f[0] == Value::BulkString(record::FIELD.into()) =>
            {
                match f.pop() {
                    Some(Value::BulkString(v)) => Bytes::from(v),
                    _ => return Err(self.malformed(Malformed::NotRecord(id))),
                }
            }
            _ => return Err(self.malformed(Malformed::NotRecord(id))),
        };
        self.handle_record(id, raw).await
    }

    /// Handles the record `raw`, stored under stream ID `id`.
    async fn handle_record(&mut self, id: String, raw: Bytes) -> Result<Step> {
        let Some((s, q)) = record::parse_entry_id(id.as_bytes()) else {
            return Err(self.corrupt(format!("stream entry {id} does not have a tube ID")));
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
        self.awaiting = None;
        let step =
            match rec.body {
                Body::Begin(begin) => {
                    if q != 0 {
                        return Err(self.corrupt(format!("begin record at {s}-{q}")));
                    }
                    if let Some(old) = self.session.take() {
                        if old.id >= s {
                            return Err(self
                                .corrupt(format!("session {s} begins after session {}", old.id)));
                        }
                        // A new session began before the old one ended: its writer died.
                        self.session_failed(Error::WriterVanished {
                            channel: self.channel.name().into(),
                            bytes: old.bytes,
                        })?;
                    }
                    self.begin(s, &begin, 0).await?;
                    Step::Continue
                }
                Body::Data(data) => {
                    self.ensure_session(s, q, data.offset).await?;
                    self.data(s, q, data).await?
                }
                Body::End(end) => {
                    self.ensure_session(s, q, end.total_len).await?;
                    if self.session.as_ref().is_some_and(|st| st.sealer.is_some()) {
                        return Err(self
                            .corrupt(format!("record {s}-{q} is not sealed in a sealed session")));
                    }
                    self.end(s, q, end)?
                }
                Body::SealedEnd(sealed) => {
                    let joined_here = self.session.as_ref().is_none_or(|st| st.id != s);
                    self.ensure_session(s, q, 0).await?;
                    let header = record::end_header(s, q, true);
                    let end = self
                        .opener(s, q)?
                        .open(q, &header, &sealed)
                        .ok_or_else(|| self.tampered(s, q))?;
                    let end = record::decode_end_payload(&end).map_err(|source| Error::Decode {
                        channel: self.channel.name().into(),
                        source,
                    })?;
                    if joined_here {
                        // Joined at the very end: nothing of the session was seen.
                        self.session.as_mut().expect("joined").bytes = end.total_len;
                    }
                    self.end(s, q, end)?
                }
            };
        self.set_position(s, q);
        Ok(step)
    }

    /// Ends session `s` with its end record `q`: checks length and digest.
    fn end(&mut self, s: u64, q: u64, end: record::End) -> Result<Step> {
        let state = self.expect(s, q, None)?;
        let bytes = state.bytes;
        if end.total_len != bytes {
            return Err(self.corrupt(format!(
                "the writer sent {} bytes but the stream ends after {bytes}",
                end.total_len
            )));
        }
        if state.whole && state.hasher.finish() != end.digest {
            return Err(self.corrupt("the stream's digest does not match".into()));
        }
        self.session = None;
        Ok(match end.status {
            EndStatus::Complete if self.follow => Step::Continue,
            EndStatus::Complete => Step::Done,
            EndStatus::Interrupted => {
                self.session_failed(Error::Interrupted {
                    channel: self.channel.name().into(),
                    bytes,
                })?;
                Step::Continue
            }
        })
    }

    /// The open session's key, for a sealed record `s-q`.
    fn opener(&self, s: u64, q: u64) -> Result<Arc<Sealer>> {
        self.session
            .as_ref()
            .and_then(|st| st.sealer.clone())
            .ok_or_else(|| {
                self.corrupt(format!("record {s}-{q} is sealed in a session that is not"))
            })
    }

    fn tampered(&self, s: u64, q: u64) -> Error {
        self.corrupt(format!(
            "record {s}-{q} fails authentication: it was altered, or does not belong at this \
             place, session or channel"
        ))
    }

    async fn data(&mut self, s: u64, q: u64, data: record::Data) -> Result<Step> {
        let state = self.expect(s, q, Some(data.offset))?;
        let limit = state.max_payload;
        let sealed_session = state.sealer.is_some();
        let mut data = data;
        if data.sealed {
            if data.payload.len() > limit + crate::crypto::TAG_LEN {
                return Err(
                    self.corrupt(format!("record {s}-{q} is larger than the writer's limit"))
                );
            }
            let mut flags = record::FLAG_SEALED;
            if data.zstd {
                flags |= record::FLAG_ZSTD;
            }
            let header = record::data_prefix(s, q, data.offset, flags);
            let opened = self
                .opener(s, q)?
                .open(q, &header, &data.payload)
                .ok_or_else(|| self.tampered(s, q))?;
            data.payload = Bytes::from(opened);
        } else if sealed_session {
            return Err(self.corrupt(format!("record {s}-{q} is not sealed in a sealed session")));
        }
        let payload = if data.zstd {
            match zstd::bulk::decompress(&data.payload, limit) {
                Ok(p) => Bytes::from(p),
                Err(e) => {
                    return Err(self.corrupt(format!("record {s}-{q} does not decompress: {e}")));
                }
            }
        } else {
            data.payload
        };
        if payload.len() > limit {
            return Err(self.corrupt(format!(
                "record {s}-{q} holds {} bytes, more than the writer's limit of {limit}",
                payload.len(),
            )));
        }
        let state = self.session.as_mut().expect("checked by expect");
        state.hasher.update(&payload);
        state.bytes += payload.len() as u64;
        state.next_seq = q + 1;
        self.shared.bytes.store(state.bytes, Ordering::Relaxed);
        if payload.is_empty() {
            return Ok(Step::Continue);
        }
        if self.tx.send(Ok(Event::Data(payload))).await.is_err() {
            // The reader was dropped: nobody wants more.
            return Ok(Step::Done);
        }
        Ok(Step::Continue)
    }

    /// The state of session `s`, checking that `s-q` (at byte `offset`, for data) comes next.
    /// In a live session a jump forward is a skip, reported; anywhere else it is data loss.
    fn expect(&mut self, s: u64, q: u64, offset: Option<u64>) -> Result<&mut SessionState> {
        let Some(state) = &self.session else {
            unreachable!("a session is joined before its records are handled");
        };
        let (id, next, bytes, live) = (state.id, state.next_seq, state.bytes, state.live);
        if id != s || q < next {
            return Err(self.corrupt(format!(
                "expected record {}, found {s}-{q}",
                record::entry_id(id, next)
            )));
        }
        if q > next {
            let lost_to = offset.unwrap_or(bytes);
            if !live {
                return Err(self.lost(format!(
                    "expected record {}, found {s}-{q}: the relay lost the records between, or \
                     they were trimmed before this reader fetched them",
                    record::entry_id(id, next)
                )));
            }
            let skipped = lost_to.saturating_sub(bytes);
            tracing::warn!(
                "fell behind the writer of {}: skipped {skipped} bytes (from byte {bytes} to {lost_to})",
                self.channel
            );
            self.shared.skipped.fetch_add(skipped, Ordering::Relaxed);
            let state = self.session.as_mut().expect("checked above");
            state.bytes = lost_to;
            state.next_seq = q;
            state.whole = false;
        }
        let state = self.session.as_mut().expect("checked above");
        if let Some(offset) = offset
            && offset != state.bytes
        {
            let at = state.bytes;
            return Err(self.corrupt(format!(
                "record {s}-{q} starts at byte {offset}, expected byte {at}"
            )));
        }
        Ok(self.session.as_mut().expect("checked above"))
    }

    /// Makes session `s` the open session for its record `q` at byte `offset`.
    async fn ensure_session(&mut self, s: u64, q: u64, offset: u64) -> Result<()> {
        if let Some(open) = &self.session {
            if open.id == s {
                return Ok(());
            }
            if open.id > s {
                return Err(self.corrupt(format!("record {s}-{q} follows session {}", open.id)));
            }
            // A later session's records while this one never ended: its writer died.
            let old = self.session.take().expect("checked above");
            self.session_failed(Error::WriterVanished {
                channel: self.channel.name().into(),
                bytes: old.bytes,
            })?;
        }
        self.join(s, q, offset).await
    }

    /// Joins session `s` at record `q` (byte `offset`) without having seen its begin
    /// record, when that is allowed: with `--from oldest/now`, or in a live session.
    async fn join(&mut self, s: u64, q: u64, offset: u64) -> Result<()> {
        let begin = self.meta_begin(s).await?;
        let first_session = self.join_mid_session;
        self.join_mid_session = false;
        let Some(begin) = begin.filter(|b| first_session || b.live) else {
            return Err(self.lost(format!(
                "the start of session {s} is no longer on the relay (it was trimmed to stay \
                 within the channel's backlog bound); use --from oldest to read from the oldest \
                 byte still held"
            )));
        };
        if offset > 0 && !first_session {
            tracing::warn!(
                "joined session {s} of {} at byte {offset}: the bytes before it are gone",
                self.channel
            );
            self.shared.skipped.fetch_add(offset, Ordering::Relaxed);
        }
        self.begin(s, &begin, offset).await?;
        let state = self.session.as_mut().expect("just begun");
        state.next_seq = q;
        state.whole = false;
        Ok(())
    }

    /// The begin record of session `s` as the meta hash keeps it, if it is that session's.
    async fn meta_begin(&mut self, s: u64) -> Result<Option<Begin>> {
        let raw: Option<Vec<u8>> = self
            .conn
            .query(redis::cmd("HGET").arg(self.channel.meta_key()).arg("begin"))
            .await?;
        let Some(raw) = raw else { return Ok(None) };
        match record::decode(Bytes::from(raw)) {
            Ok(record::Record {
                session,
                body: Body::Begin(b),
                ..
            }) if session == s => Ok(Some(b)),
            Ok(_) => Ok(None),
            Err(source) => Err(Error::Decode {
                channel: self.channel.name().into(),
                source,
            }),
        }
    }

    async fn begin(&mut self, id: u64, begin: &Begin, offset: u64) -> Result<()> {
        let max_payload = match begin.max_payload as usize {
            0 => MAX_CHUNK_SIZE,
            n => n.min(MAX_CHUNK_SIZE),
        };
        let sealer = match (&begin.seal, &self.secret) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::NotEncrypted {
                    channel: self.channel.name().into(),
                });
            }
            (Some(_), None) => {
                return Err(Error::KeyRequired {
                    channel: self.channel.name().into(),
                });
            }
            (Some(params), Some(secret)) => {
                let context = record::seal_context(id, begin, self.channel.name());
                let (secret, params, name) = (
                    secret.clone(),
                    params.clone(),
                    self.channel.name().to_owned(),
                );
                // Argon2id takes a quarter second of CPU: not on the async threads.
                let sealer = tokio::task::spawn_blocking(move || {
                    Sealer::open_session(&secret, &params, &context, &name)
                })
                .await
                .map_err(|e| Error::Io(io::Error::other(e)))??;
                Some(Arc::new(sealer))
            }
        };
        // Replies are copies of held records while the relay sends them: stay within the
        // part of the channel's budget the writer keeps free for them.
        self.count = crate::writer::reader_batch(begin.max_backlog, max_payload, self.batch_bytes);
        let ahead = Ahead::new(begin.max_backlog, max_payload, self.count as u64);
        if self.far() {
            self.tail_window = ahead.max.min(MAX_TAIL);
            self.report_bytes = 0;
            self.ahead = ahead;
        } else {
            let near = NEAR_TAIL_BYTES / crate::writer::reply_cost(max_payload);
            self.tail_window = ahead.max.min(near.max(2));
            self.report_bytes = match begin.max_backlog {
                0 => MAX_AHEAD_BYTES,
                budget => budget,
            } / 16;
        }
        self.session = Some(SessionState {
            id,
            lease: lease_value(&begin.token),
            next_seq: 1,
            bytes: offset,
            max_payload,
            live: begin.live,
            whole: offset == 0,
            hasher: record::Digest::new(),
            sealer,
        });
        self.shared.session.store(id, Ordering::Relaxed);
        self.shared.bytes.store(offset, Ordering::Relaxed);
        tracing::debug!(channel = self.channel.name(), session = id, "session found");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{DEFAULT_CHUNK_SIZE, RECORD_OVERHEAD, reply_cost};

    #[test]
    fn read_ahead_fits_the_reply_room_in_requests_of_about_a_mebibyte() {
        let payload = DEFAULT_CHUNK_SIZE - RECORD_OVERHEAD;
        let cost = reply_cost(payload);
        let ahead = Ahead::new(64 << 20, payload, 15);
        // Five sixteenths of the 64 MiB budget are the reply room.
        assert_eq!(ahead.max, (20 << 20) / cost);
        assert!(ahead.max * cost <= 20 << 20);
        assert_eq!(ahead.range, (1 << 20) / cost);
        assert_eq!(ahead.limit, 15, "it starts at one batch");
        // Without a budget, the reader's own bound holds.
        assert_eq!(Ahead::new(0, payload, 15).max, MAX_AHEAD_BYTES / cost);
        // Room for less than two records: no read-ahead at all.
        assert_eq!(Ahead::new(1 << 20, payload, 1).max, 0);
        // Records larger than a request still go one per request.
        assert_eq!(Ahead::new(64 << 20, 4 << 20, 1).range, 1);
    }

    #[test]
    fn the_window_grows_while_answers_are_prompt_and_halves_when_they_queue() {
        let mut ahead = Ahead {
            range: 3,
            max: 20,
            limit: 9,
            announced: false,
        };
        ahead.adjust(Duration::from_millis(60));
        assert_eq!(ahead.limit, 12);
        for _ in 0..10 {
            ahead.adjust(Duration::from_millis(60));
        }
        assert_eq!(ahead.limit, 20, "never beyond the reply room");
        ahead.adjust(Duration::from_secs(2));
        assert_eq!(ahead.limit, 20, "a middling answer changes nothing");
        ahead.adjust(Duration::from_secs(5));
        assert_eq!(ahead.limit, 10);
        for _ in 0..10 {
            ahead.adjust(Duration::from_secs(5));
        }
        assert_eq!(ahead.limit, 3, "never below one request");
    }

    /// A stream entry: its ID and its fields, names and values.
    type Entry = (String, Vec<(Vec<u8>, Vec<u8>)>);

    /// An `XREAD` answer on the wire, as a Redis-protocol server sends it in RESP2.
    fn xread_answer(key: &[u8], entries: &[Entry]) -> Vec<u8> {
        fn bulk(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        let mut out = b"*1\r\n*2\r\n".to_vec();
        bulk(&mut out, key);
        out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
        for (id, fields) in entries {
            out.extend_from_slice(b"*2\r\n");
            bulk(&mut out, id.as_bytes());
            out.extend_from_slice(format!("*{}\r\n", fields.len() * 2).as_bytes());
            for (name, value) in fields {
                bulk(&mut out, name);
                bulk(&mut out, value);
            }
        }
        out
    }

    fn decode(wire: Vec<u8>) -> std::result::Result<Vec<(String, Bytes)>, Malformed> {
        let mut buf = bytes::BytesMut::from(&wire[..]);
        let (frame, _, _) = redis_protocol::resp2::decode::decode_bytes_mut(&mut buf)
            .expect("valid RESP2")
            .expect("a whole frame");
        assert!(buf.is_empty(), "one frame");
        match frame {
            BytesFrame::Array(streams) => xread_entries(streams),
            other => panic!("not an array: {other:?}"),
        }
    }

    proptest::proptest! {
        /// Every entry of an answer comes out with its ID and its record, in order.
        #[test]
        fn xread_answers_give_their_entries(
            records in proptest::collection::vec(
                (0u64..1 << 40, 0u64..1 << 40, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)),
                0..6,
            ),
        ) {
            let entries: Vec<_> = records
                .iter()
                .map(|(s, q, r)| (format!("{s}-{q}"), vec![(b"r".to_vec(), r.clone())]))
                .collect();
            let got = decode(xread_answer(b"tube:{c}:stream", &entries)).expect("well formed");
            let want: Vec<_> = records
                .iter()
                .map(|(s, q, r)| (format!("{s}-{q}"), Bytes::from(r.clone())))
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn xread_answers_that_are_not_records_are_refused() {
        let other_field = vec![("1-1".to_string(), vec![(b"x".to_vec(), b"v".to_vec())])];
        assert_eq!(
            decode(xread_answer(b"k", &other_field)),
            Err(Malformed::NotRecord("1-1".into()))
        );
        let two_fields = vec![(
            "1-2".to_string(),
            vec![
                (b"r".to_vec(), b"v".to_vec()),
                (b"r".to_vec(), b"w".to_vec()),
            ],
        )];
        assert_eq!(
            decode(xread_answer(b"k", &two_fields)),
            Err(Malformed::NotRecord("1-2".into()))
        );
        // A stream without its name, and an entry that is not an array.
        assert_eq!(
            decode(b"*1\r\n*1\r\n*0\r\n".to_vec()),
            Err(Malformed::Shape)
        );
        assert_eq!(
            decode(b"*1\r\n*2\r\n$1\r\nk\r\n*1\r\n:5\r\n".to_vec()),
            Err(Malformed::Shape)
        );
    }
}
