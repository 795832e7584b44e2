//! The writing end of a channel: one session, from its begin record to its end record.
//!
//! Data flows: caller -> bounded queue -> sender task -> pipelined `XADD`s on one connection
//! ([`crate::link`], which sends each payload as it came, without copies).
//! The sender keeps up to `window` appends in flight (and a number of bytes sized from the
//! measured round trip), so a distant relay costs one round trip per window rather than per
//! record. A second connection renews the writer's lease and keeps
//! the channel's keys alive, so that renewals never queue behind megabytes of data.
//!
//! The relay holds at most `max_backlog` bytes of the channel. To append past that, the
//! sender trims the oldest records, but in a reliable session only records every live reader
//! has already fetched: otherwise it waits, and the wait travels back to the producer.

use crate::channel::Channel;
use crate::client::{Conn, RelayConfig};
use crate::crypto::{Sealer, Secret};
use crate::error::{Error, Result};
use crate::link::{Answer, Frame, Link};
use crate::record::{self, Begin, End, EndStatus};
use crate::session::{self, lease_value};
use bytes::{BufMut, Bytes, BytesMut};
use redis::{FromRedisValue, ToRedisArgs, Value};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, PollSender};
use tokio_util::task::AbortOnDropHandle;

/// The slowest reader's position and the IDs of the live readers.
type PolledReaders = Result<(Option<Position>, Vec<String>)>;

/// How long a writer's lease lasts without renewal. A writer killed without a chance to
/// clean up frees its channel after this long.
pub const LEASE: Duration = Duration::from_secs(8);
/// How often the lease is renewed: several renewals fit in one lease, so one slow round trip
/// does not lose it.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// Default largest payload of one record.
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;
/// Default number of appends in flight.
pub const DEFAULT_WINDOW: usize = 256;
/// Most bytes of appends in flight to a nearby relay (round trip under 2 ms): acknowledgements
/// come back at once, and more would only hold memory.
pub const WINDOW_BYTES: u64 = 4 * 1024 * 1024;
/// Most bytes of appends in flight to a distant relay: sized for about 640 MB/s over the
/// measured round trip, up to this much. The writer holds these bytes until the relay has
/// them, so this is also most of its memory on a long link (`--max-in-flight` caps it).
pub const MAX_WINDOW_BYTES: u64 = 32 * 1024 * 1024;

/// The bytes in flight that keep a relay `rtt` away busy, within the channel's reply room
/// (five sixteenths of the budget `max_backlog`, 0 for none): the appends in flight and the
/// reads waiting on the relay each cover a round trip of the same rate. More would buy
/// little: a record stays in the backlog from its append until the writer learns that every
/// reader fetched it, two round trips at least, so the backlog itself holds the rate below
/// about a third of the budget per round trip. The default budget of 64M thus keeps a writer
/// on a long link near 20M in flight, which is most of its memory (about 30 MiB in all).
fn window_bytes(rtt: Duration, max_backlog: u64) -> u64 {
    if rtt < crate::client::DISTANT {
        return WINDOW_BYTES;
    }
    let most = match max_backlog {
        0 => MAX_WINDOW_BYTES,
        budget => reply_room(budget).clamp(WINDOW_BYTES, MAX_WINDOW_BYTES),
    };
    let want = (rtt.as_secs_f64() * 640e6) as u64;
    want.clamp(WINDOW_BYTES, most)
}
/// Largest record size accepted by [`WriteOptions`]; readers refuse larger records.
pub const MAX_CHUNK_SIZE: usize = 16 * 1024 * 1024;
/// Bytes a stored data record takes beyond its payload: tube's own prefix plus what a Redis
/// stream entry adds around its value (listpack header, entry fields, lengths). Payloads are
/// sized so that a whole entry fits `chunk_size`: a 256 KiB record then fills a 256 KiB
/// allocation instead of spilling into the next size class, a quarter larger.
pub const RECORD_OVERHEAD: usize = 64;
/// The part of a channel's memory budget kept free for replies in flight: while the relay
/// sends a reader its batch, the batch is a copy of held records, so records are held only
/// up to eleven sixteenths of the budget. Readers use half of this room per read (see
/// [`reader_batch`]), leaving the rest for the connections' own buffers; behind a distant
/// relay, where a round trip of reads must be in flight to keep the rate, all of it. Five
/// sixteenths rather than a quarter: through a 25 ms-each-way proxy, 1 GiB with the default
/// budget moved 277 MB/s against 265, with less memory on the relay (the backlog is what
/// stays there).
pub fn reply_room(max_backlog: u64) -> u64 {
    max_backlog / 16 * 5
}

/// How many records a reader asks for at once so that its reply fits the room the writer
/// keeps free: a reply costs each record's stored size plus the relay's reply block around
/// it (16 KiB on Redis).
pub fn reader_batch(max_backlog: u64, max_payload: usize, batch_bytes: usize) -> usize {
    let per_record = reply_cost(max_payload);
    let room = match max_backlog {
        0 => batch_bytes as u64,
        budget => (reply_room(budget) / 2).min(batch_bytes as u64),
    };
    ((room / per_record) as usize).clamp(1, 1024)
}

/// What one record of `max_payload` bytes costs the relay while it is in a reply.
pub fn reply_cost(max_payload: usize) -> u64 {
    const REPLY_BLOCK: usize = 16 * 1024;
    let record = max_payload + RECORD_OVERHEAD;
    // Smaller records share reply blocks; larger ones each get their own, and the bytes
    // that follow a record start another.
    let block = if record >= REPLY_BLOCK {
        REPLY_BLOCK
    } else {
        0
    };
    stored_size(record) + block as u64
}

/// The memory a stored entry of `len` bytes takes on the relay: Redis rounds each stream node
/// up to its allocator's size class (four classes per doubling), so the backlog is counted in
/// those units to make `max_backlog` a bound on the relay's memory, not just on payload.
pub fn stored_size(len: usize) -> u64 {
    let len = len.max(16) as u64;
    let spacing = (1u64 << (63 - (len - 1).leading_zeros())) / 4;
    let spacing = spacing.max(16);
    len.div_ceil(spacing) * spacing + NODE_OVERHEAD
}

/// What a stream node costs beyond its listpack (measured on Redis 7: about 230 bytes for an
/// entry large enough to get a node of its own).
const NODE_OVERHEAD: u64 = 256;

/// Smallest record size accepted.
pub const MIN_CHUNK_SIZE: usize = 2 * RECORD_OVERHEAD;
/// Default bound of the bytes the relay holds for one channel.
pub const DEFAULT_MAX_BACKLOG: u64 = 64 * 1024 * 1024;
/// Default time after which an idle channel's keys expire.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// How old the readers' positions may be when the writer decides what to trim.
const READERS_STALE: Duration = Duration::from_millis(500);
/// Longest pause between looks at the readers' positions while waiting for them.
const MAX_READER_POLL: Duration = Duration::from_millis(200);
/// Shortest pause between looks at the readers' positions.
const MIN_READER_POLL: Duration = Duration::from_millis(5);
/// Most looks at the readers' positions under way at once, on a distant relay.
const MAX_LOOKS: usize = 8;

/// How a writer sends.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Largest record as the relay stores it, headers included. Data that arrives while
    /// appends are in flight is coalesced up to this size; data never waits for more data.
    /// A power of two wastes nothing in the relay's allocator.
    pub chunk_size: usize,
    /// Appends in flight at most (and never more bytes than the round trip calls for).
    pub window: usize,
    /// Most bytes of appends in flight; `None` sizes it from the measured round trip.
    pub max_in_flight: Option<u64>,
    /// The channel's memory budget on the relay: the records it holds plus one reader's reply
    /// in flight stay within it (one record more at worst).
    pub max_backlog: u64,
    /// Live session: never wait for readers; the relay keeps only the newest data.
    pub live: bool,
    /// The channel's keys expire after this long without activity.
    pub ttl: Duration,
    /// Compress records with zstd at this level; a record that does not shrink is sent as is.
    pub zstd_level: Option<i32>,
    /// Seal every record with a key derived from this secret (end-to-end encryption).
    pub secret: Option<Secret>,
}

impl WriteOptions {
    /// The largest payload of one record: the record size less what headers take.
    pub fn max_payload(&self) -> usize {
        self.chunk_size.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE) - RECORD_OVERHEAD
    }
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            window: DEFAULT_WINDOW,
            max_in_flight: None,
            max_backlog: DEFAULT_MAX_BACKLOG,
            live: false,
            ttl: DEFAULT_TTL,
            zstd_level: None,
            secret: None,
        }
    }
}

/// What a finished session amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The session number on its channel.
    pub session: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Data records appended.
    pub records: u64,
    /// How the session ended.
    pub status: EndStatus,
}

/// A writer's progress, for display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterProgress {
    /// Bytes accepted into the session so far.
    pub bytes: u64,
    /// Bytes of records the relay holds for the channel.
    pub held: u64,
    /// Whether the writer is waiting for readers to make room.
    pub waiting: bool,
}

#[derive(Debug, Default)]
struct Shared {
    bytes: AtomicU64,
    held: AtomicU64,
    waiting: AtomicBool,
}

enum Msg {
    Data(Bytes),
    Flush(oneshot::Sender<()>),
    Finish(EndStatus),
}

/// Writes one session of a channel; an [`AsyncWrite`].
///
/// Shut it down (or call [`Writer::finish`]) to end the session: only then do readers see a
/// complete stream. Dropping a writer without that ends the session as interrupted.
///
/// # Examples
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::AsyncWriteExt;
/// let relay = tube::RelayConfig::from_url("redis://127.0.0.1:6379")?;
/// let channel = tube::Channel::new("cam1", tube::DEFAULT_PREFIX)?;
/// let mut writer = tube::Writer::start(&relay, &channel, tube::WriteOptions::default()).await?;
/// writer.write_all(b"hello").await?;
/// writer.shutdown().await?; // appends the end record and waits for the relay
/// # Ok(()) }
/// ```
pub struct Writer {
    tx: PollSender<Msg>,
    task: Option<JoinHandle<Result<Summary>>>,
    chunk_size: usize,
    flushing: Option<oneshot::Receiver<()>>,
    finishing: bool,
    summary: Option<Summary>,
    session: u64,
    shared: Arc<Shared>,
}

impl Writer {
    /// Takes the channel's lease and starts a new session. The session's description is sent
    /// but not waited for: the first data follows it at once, and a relay that refuses it
    /// fails the writer's next call.
    ///
    /// # Errors
    /// [`Error::Busy`] when another writer is alive on the channel; [`Error::ForeignKey`] when
    /// the channel's keys are not tube's; connection errors.
    pub async fn start(relay: &RelayConfig, channel: &Channel, opts: WriteOptions) -> Result<Self> {
        // From here on `chunk_size` is the largest payload.
        let chunk_size = opts.max_payload();
        let window = opts.window.clamp(1, crate::client::PIPELINE_BUFFER / 2);
        let ttl_ms = opts.ttl.as_millis().clamp(1000, u128::from(u64::MAX)) as u64;
        // The appends' connection is opened, and the round trip measured on it, while the
        // session is set up on the other: on a distant relay each round trip saved is a
        // round trip sooner to the first byte.
        let link = AbortOnDropHandle::new(tokio::spawn(open_link(relay.clone())));
        let mut ctl = relay.connect().await?;
        let token: [u8; 16] = rand::random();
        let lease = lease_value(&token);
        let (session, held_before) = match take_lease(&mut ctl, channel, &lease).await {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                return Err(Error::Busy {
                    channel: channel.name().into(),
                });
            }
            Err(e) => {
                // The lease may have been taken before an answer could not be read.
                release_lease(&mut ctl, channel, &lease, None).await;
                return Err(e);
            }
        };
        let begun = async {
            let mut begin = Begin {
                token,
                started_ms: unix_ms(),
                max_payload: chunk_size as u32,
                live: opts.live,
                max_backlog: opts.max_backlog,
                seal: None,
            };
            let sealer = match &opts.secret {
                Some(secret) => {
                    let context = record::seal_context(session, &begin, channel.name());
                    let secret = secret.clone();
                    // Argon2id takes a quarter second of CPU: not on the async threads.
                    let (sealer, params) =
                        tokio::task::spawn_blocking(move || Sealer::create(&secret, &context))
                            .await
                            .map_err(|e| Error::Io(io::Error::other(e)))??;
                    begin.seal = Some(params);
                    Some(Arc::new(sealer))
                }
                None => None,
            };
            let keys = SessionKeys {
                channel: channel.clone(),
                session,
                lease: lease.clone(),
                begin: record::encode_begin(session, &begin),
                live: opts.live,
                ttl_ms,
            };
            // The session's description and begin record go on the appends' connection, in
            // order ahead of the first append, which can then follow them without waiting
            // for their answers: the relay serves one connection's commands in order, so no
            // reader can find data before the description of its session. Their answers
            // are checked with the appends'.
            let mut pipe = redis::pipe();
            keys.set_meta(&mut pipe);
            pipe.cmd("HSET")
                .arg(channel.meta_key())
                .arg("written")
                .arg(0)
                .arg("rate")
                .arg(0);
            let request = |seq, cmd: &redis::Cmd| Request {
                seq,
                bytes: 0,
                frame: Frame::packed(cmd.get_packed_command()),
            };
            let mut setup: Vec<Request> = pipe.cmd_iter().map(|cmd| request(None, cmd)).collect();
            setup.push(request(
                Some(0),
                &xadd(channel, session, 0, &keys.begin[..]),
            ));
            setup.push(request(
                None,
                redis::cmd("PEXPIRE").arg(channel.stream_key()).arg(ttl_ms),
            ));
            let (mut link, rtt) = link.await.map_err(|e| Error::Io(io::Error::other(e)))??;
            for request in &setup {
                link.send(&request.frame).await;
            }
            let window_bytes = match opts.max_in_flight {
                Some(bytes) => bytes.max(1),
                None => window_bytes(rtt, opts.max_backlog),
            };
            let begin_size = stored_size(keys.begin.len() + RECORD_OVERHEAD);
            Ok::<_, Error>((
                keys,
                held_before,
                begin_size,
                (link, setup),
                sealer,
                window_bytes,
                rtt,
            ))
        }
        .await;
        let (keys, held_before, begin_len, (link, setup), sealer, window_bytes, rtt) = match begun {
            Ok(v) => v,
            Err(e) => {
                release_lease(&mut ctl, channel, &lease, None).await;
                return Err(e);
            }
        };
        let session = keys.session;
        tracing::debug!(channel = channel.name(), session, "session started");
        // From here on a lost relay is waited for, not a failure.
        let ctl = ctl.resilient();

        let shared = Arc::new(Shared::default());
        let (lost_tx, lost_rx) = oneshot::channel();
        let stop = CancellationToken::new();
        tokio::spawn(
            Heartbeat {
                ctl: ctl.clone(),
                keys: keys.clone(),
                shared: shared.clone(),
            }
            .run(lost_tx, stop.clone()),
        );
        let mut held = VecDeque::new();
        if held_before > 0 {
            held.push_back(Held {
                upto: (session - 1, u64::MAX),
                bytes: held_before,
            });
        }
        held.push_back(Held {
            upto: (session, 0),
            bytes: begin_len,
        });
        // Data waiting for the sender: on a long link the window is full most of the time and
        // whatever waits here is memory only (two pieces rather than eight: 1.8 MiB less,
        // loopback throughput unchanged).
        let (tx, rx) = mpsc::channel(2);
        let sender = Sender {
            rx,
            link,
            setup,
            relay: relay.clone(),
            ctl,
            channel: channel.clone(),
            session,
            keys,
            chunk_size,
            window,
            in_flight: 0,
            window_bytes,
            max_backlog: opts
                .max_backlog
                .saturating_sub(reply_room(opts.max_backlog))
                .max(1),
            live: opts.live,
            zstd_level: opts.zstd_level,
            sealer,
            held_total: held.iter().map(|h| h.bytes).sum(),
            held,
            readers: None,
            readers_seen: Instant::now(),
            known_readers: Vec::new(),
            covered: 0,
            looks: Looks::new(rtt),
            lost: lost_rx,
            stop_heartbeat: stop,
            shared: shared.clone(),
        };
        shared.held.store(sender.held_total, Ordering::Relaxed);
        Ok(Self {
            tx: PollSender::new(tx),
            task: Some(tokio::spawn(sender.run())),
            chunk_size,
            flushing: None,
            finishing: false,
            summary: None,
            session,
            shared,
        })
    }

    /// The session number this writer writes.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Progress so far.
    pub fn progress(&self) -> WriterProgress {
        self.progress_handle()()
    }

    /// A function that returns the progress, for a display that outlives borrows.
    pub fn progress_handle(&self) -> impl Fn() -> WriterProgress + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || WriterProgress {
            bytes: shared.bytes.load(Ordering::Relaxed),
            held: shared.held.load(Ordering::Relaxed),
            waiting: shared.waiting.load(Ordering::Relaxed),
        }
    }

    /// Queues `data` for sending without copying it. Waits while the queue is full, which is
    /// how a slow relay or slow readers hold back the producer.
    ///
    /// # Errors
    /// The error that stopped the writer, if it has stopped.
    pub async fn send(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let sent = match self.tx.get_ref() {
            Some(tx) => tx.send(Msg::Data(data)).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.failure().await)
        }
    }

    /// Waits until [`Writer::send`] takes data without waiting, and says so; `false` when
    /// the writer has stopped (the next call says why). A producer that gathers data
    /// meanwhile sends it in fewer, fuller records, none of them copied.
    pub async fn ready(&self) -> bool {
        match self.tx.get_ref() {
            Some(tx) => tx.reserve().await.is_ok(),
            None => false,
        }
    }

    /// Resolves when the writer has stopped by itself, which only a failure does: a
    /// producer waiting for input learns of it without sending more. The error comes from
    /// the next call.
    pub async fn stopped(&self) {
        if let Some(tx) = self.tx.get_ref() {
            tx.closed().await;
        }
    }

    /// Ends the session as complete: appends the end record and waits until the relay has
    /// acknowledged everything.
    ///
    /// # Errors
    /// The error that stopped the writer, if any.
    pub async fn finish(self) -> Result<Summary> {
        self.end(EndStatus::Complete).await
    }

    /// Ends the session as interrupted: what was queued is still sent, then an end record
    /// marks the session as cut short, so readers fail rather than take it for complete.
    ///
    /// # Errors
    /// The error that stopped the writer, if any.
    pub async fn interrupt(self) -> Result<Summary> {
        self.end(EndStatus::Interrupted).await
    }

    async fn end(mut self, status: EndStatus) -> Result<Summary> {
        if let Some(s) = self.summary.take() {
            return Ok(s);
        }
        if let Some(tx) = self.tx.get_ref() {
            let _ = tx.send(Msg::Finish(status)).await;
        }
        self.tx.close();
        self.join().await
    }

    async fn join(&mut self) -> Result<Summary> {
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(Error::Io(io::Error::other(format!(
                    "writer task failed: {e}"
                ))))
            }),
            None => Err(Error::Closed("writer")),
        }
    }

    async fn failure(&mut self) -> Error {
        match self.join().await {
            Err(e) => e,
            Ok(_) => Error::Closed("writer"),
        }
    }

    /// The summary of the session, once the writer has been shut down.
    pub fn summary(&self) -> Option<&Summary> {
        self.summary.as_ref()
    }

    fn poll_failure(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(io::Error::other(Error::Closed("writer")));
        };
        let result = ready!(Pin::new(task).poll(cx));
        self.task = None;
        Poll::Ready(match result {
            Ok(Err(e)) => io::Error::other(e),
            Ok(Ok(_)) => io::Error::other(Error::Closed("writer")),
            Err(e) => io::Error::other(format!("writer task failed: {e}")),
        })
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.finishing {
            return Poll::Ready(Err(io::Error::other(Error::Closed("writer"))));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            return self.poll_failure(cx).map(Err);
        }
        let n = buf.len().min(self.chunk_size);
        if self
            .tx
            .send_item(Msg::Data(Bytes::copy_from_slice(&buf[..n])))
            .is_err()
        {
            return self.poll_failure(cx).map(Err);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finishing {
            return Poll::Ready(Ok(()));
        }
        if self.flushing.is_none() {
            if ready!(self.tx.poll_reserve(cx)).is_err() {
                return self.poll_failure(cx).map(Err);
            }
            let (done, wait) = oneshot::channel();
            if self.tx.send_item(Msg::Flush(done)).is_err() {
                return self.poll_failure(cx).map(Err);
            }
            self.flushing = Some(wait);
        }
        let wait = self.flushing.as_mut().expect("set above");
        let acked = ready!(Pin::new(wait).poll(cx)).is_ok();
        self.flushing = None;
        if acked {
            Poll::Ready(Ok(()))
        } else {
            self.poll_failure(cx).map(Err)
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.summary.is_some() {
            return Poll::Ready(Ok(()));
        }
        if !self.finishing {
            if ready!(self.tx.poll_reserve(cx)).is_err() {
                return self.poll_failure(cx).map(Err);
            }
            if self.tx.send_item(Msg::Finish(EndStatus::Complete)).is_err() {
                return self.poll_failure(cx).map(Err);
            }
            self.finishing = true;
            self.tx.close();
        }
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(Err(io::Error::other(Error::Closed("writer"))));
        };
        let result = ready!(Pin::new(task).poll(cx));
        self.task = None;
        match result {
            Ok(Ok(summary)) => {
                self.summary = Some(summary);
                Poll::Ready(Ok(()))
            }
            Ok(Err(e)) => Poll::Ready(Err(io::Error::other(e))),
            Err(e) => Poll::Ready(Err(io::Error::other(format!("writer task failed: {e}")))),
        }
    }
}

/// Records the relay holds, oldest first: trimming everything up to `upto` frees `bytes`.
struct Held {
    /// Stream ID `(session, seq)` of the last entry of this span.
    upto: (u64, u64),
    bytes: u64,
}

/// A request in flight on the data connection, kept until the relay answers so that it can
/// be sent again on a new connection.
struct Request {
    /// The sequence number of an append; `None` for a trim.
    seq: Option<u64>,
    /// Bytes the append adds to the relay's memory.
    bytes: u64,
    frame: Frame,
}

/// What a reply says about its request.
enum Outcome {
    Done,
    /// The connection failed: the request may or may not have reached the relay.
    Failed(Error),
    /// The relay already holds an entry at or past this append's ID.
    Taken(u64),
}

/// The writer's looks at its readers' positions. On a distant relay several are under way,
/// spaced a fraction of the round trip apart, so that a reader's progress is known a one-way
/// trip after the relay learns it rather than up to a round trip later.
struct Looks {
    pending: VecDeque<AbortOnDropHandle<PolledReaders>>,
    /// Earliest time for the next look.
    next: Instant,
    pause: Duration,
    /// The pause while readers move: a quarter of the round trip, at least `MIN_READER_POLL`.
    base: Duration,
    /// When the slowest reader was last seen to move.
    moved: Instant,
    /// How long the readers may seem still before the looks slow down.
    still: Duration,
}

impl Looks {
    fn new(rtt: Duration) -> Self {
        let base = (rtt / 4).max(MIN_READER_POLL);
        Self {
            pending: VecDeque::new(),
            next: Instant::now(),
            pause: base,
            base,
            moved: Instant::now(),
            still: (rtt * 4).max(Duration::from_millis(250)),
        }
    }

    /// Keeps the pace while readers move; backs off, up to `MAX_READER_POLL`, while they
    /// seem stopped (a reader paused by its consumer), so the relay is not asked for nothing.
    fn found(&mut self, moved: bool) {
        if moved {
            self.moved = Instant::now();
            self.pause = self.base;
            self.next = self.next.min(Instant::now() + self.base);
        } else if self.moved.elapsed() > self.still {
            self.pause = (self.pause * 2).min(MAX_READER_POLL.max(self.base));
        }
    }
}

/// The background half of a [`Writer`].
struct Sender {
    rx: mpsc::Receiver<Msg>,
    /// Carries the appends and trims.
    link: Link,
    /// The session's setup, sent on `link` and not answered yet.
    setup: Vec<Request>,
    relay: RelayConfig,
    /// Everything else: readers' positions, and putting the session back after an outage.
    ctl: Conn,
    channel: Channel,
    session: u64,
    keys: SessionKeys,
    chunk_size: usize,
    window: usize,
    /// Bytes of the appends in flight.
    in_flight: u64,
    /// Most bytes of appends in flight.
    window_bytes: u64,
    max_backlog: u64,
    live: bool,
    zstd_level: Option<i32>,
    sealer: Option<Arc<Sealer>>,
    held: VecDeque<Held>,
    held_total: u64,
    /// Position of the slowest live reader as last seen; `None` when none is registered.
    readers: Option<(u64, u64)>,
    readers_seen: Instant,
    /// The readers registered at the last look.
    known_readers: Vec<String>,
    /// Bytes at the front of `held` that the readers, as last seen, have fetched.
    covered: u64,
    looks: Looks,
    /// Why the heartbeat stopped, if it failed.
    lost: oneshot::Receiver<Error>,
    stop_heartbeat: CancellationToken,
    shared: Arc<Shared>,
}

impl Sender {
    async fn run(mut self) -> Result<Summary> {
        let outcome = self.pump().await;
        self.stop_heartbeat.cancel();
        // Best effort. After a success the relay has just answered; after a failure it is
        // not worth waiting for.
        let mut last = redis::pipe();
        self.stats(&mut last);
        let ended = Some((self.session, last));
        let lease = &self.keys.lease;
        if outcome.is_ok() {
            // One round trip asks both whether the relay still describes the session and
            // whose the lease is.
            let mut conn = self.ctl.clone();
            let mut ask = redis::pipe();
            ask.cmd("HEXISTS").arg(self.channel.meta_key()).arg("begin");
            ask.cmd("GET").arg(self.channel.writer_key());
            if let Ok((kept, current)) = conn.pipe::<(bool, Option<String>)>(&ask).await {
                if !kept {
                    let _ = self.keys.rewrite(&mut conn).await;
                }
                end_lease(&mut conn, &self.channel, lease, current, ended).await;
            }
        } else {
            release_lease(&mut self.ctl.fragile(), &self.channel, lease, ended).await;
        }
        match &outcome {
            Ok(s) => tracing::debug!(channel = self.channel.name(), ?s, "session ended"),
            Err(e) => tracing::debug!(channel = self.channel.name(), %e, "writer failed"),
        }
        outcome
    }

    async fn pump(&mut self) -> Result<Summary> {
        let mut inflight: VecDeque<Request> = std::mem::take(&mut self.setup).into();
        let mut peeked: Option<Msg> = None;
        // The next record, encoded and waiting for room on the relay.
        let mut ready_record: Option<(RecordArg, u64)> = None;
        let mut seq = 1u64;
        let mut bytes = 0u64;
        let mut hasher = record::Digest::new();
        let status = loop {
            let room = inflight.len() < self.window && self.in_flight < self.window_bytes;
            if room {
                if let Some((record, size)) = ready_record.take() {
                    if self.held_total + size > self.max_backlog
                        && self.readers_seen.elapsed() > READERS_STALE
                    {
                        // Trimming depends on who reads: look again before deciding.
                        if self.looks.pending.is_empty() {
                            self.look();
                        }
                        ready_record = Some((record, size));
                    } else {
                        let room = self.make_room(size);
                        let (Room::Free(trim) | Room::Wait(trim)) = room;
                        if let Some(upto) = trim {
                            let trim = self.xtrim(upto);
                            self.send(&mut inflight, None, 0, trim).await;
                        }
                        if let Room::Free(_) = room {
                            let rseq = record.seq;
                            self.push_held((self.session, rseq), size);
                            let frame = record.frame(&self.channel);
                            self.send(&mut inflight, Some(rseq), size, frame).await;
                            self.shared.waiting.store(false, Ordering::Relaxed);
                            continue;
                        }
                        self.shared.waiting.store(true, Ordering::Relaxed);
                        ready_record = Some((record, size));
                    }
                } else if let Some(msg) = peeked.take() {
                    match self.accept(msg, &mut peeked, &mut inflight).await? {
                        Accepted::Record(payload) => {
                            hasher.update(&payload);
                            let offset = bytes;
                            bytes += payload.len() as u64;
                            self.shared.bytes.store(bytes, Ordering::Relaxed);
                            ready_record = Some(self.encode(seq, offset, payload));
                            seq += 1;
                        }
                        Accepted::Nothing => {}
                        Accepted::End(status) => break status,
                    }
                    continue;
                }
            }
            // Look at the readers while waiting for them, and before that, once more than
            // half the backlog is not known to be fetched: then, on a distant relay, what
            // they fetched is known about when it is needed, a trip after they said so.
            let waiting_for_readers = ready_record.is_some() && room;
            let want_look = waiting_for_readers
                || (!self.live
                    && self.held_total.saturating_sub(self.covered) > self.max_backlog / 2);
            let may_look = want_look && self.looks.pending.len() < MAX_LOOKS;
            tokio::select! {
                biased;
                Ok(e) = &mut self.lost => return Err(e),
                answer = self.link.answer(), if !inflight.is_empty() => {
                    let request = inflight.pop_front().expect("non-empty");
                    self.settle(request, answer, &mut inflight).await?;
                }
                looked = async {
                    match self.looks.pending.front_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                }, if !self.looks.pending.is_empty() => {
                    self.looks.pending.pop_front();
                    let (slowest, known) =
                        looked.map_err(|e| Error::Io(io::Error::other(e)))??;
                    self.seen(slowest.map(|p| (p.session, p.seq)), known);
                }
                _ = tokio::time::sleep_until(self.looks.next.into()), if may_look => {
                    self.look();
                }
                msg = self.rx.recv(), if room && ready_record.is_none() && peeked.is_none() => {
                    peeked = Some(msg.map_or(Msg::Finish(EndStatus::Interrupted), |m| m));
                }
            }
        };
        self.drain(&mut inflight).await?;
        let end = End {
            status,
            total_len: bytes,
            digest: hasher.finish(),
        };
        let end = match &self.sealer {
            Some(sealer) => {
                let header = record::end_header(self.session, seq, true);
                let sealed = sealer.seal(seq, &header, &record::end_payload(&end));
                record::encode_sealed_end(self.session, seq, &sealed)
            }
            None => record::encode_end(self.session, seq, &end),
        };
        let end_size = stored_size(end.len() + RECORD_OVERHEAD);
        let key = self.channel.stream_key();
        let id = record::entry_id(self.session, seq);
        let frame = Frame::command(&[
            b"XADD",
            key.as_bytes(),
            id.as_bytes(),
            record::FIELD.as_bytes(),
            &end,
        ]);
        self.send(&mut inflight, Some(seq), 0, frame).await;
        self.drain(&mut inflight).await?;
        self.push_held((self.session, seq), end_size);
        Ok(Summary {
            session: self.session,
            bytes,
            records: seq - 1,
            status,
        })
    }

    /// Handles one message from the caller.
    async fn accept(
        &mut self,
        msg: Msg,
        peeked: &mut Option<Msg>,
        inflight: &mut VecDeque<Request>,
    ) -> Result<Accepted> {
        match msg {
            Msg::Finish(status) => Ok(Accepted::End(status)),
            Msg::Flush(done) => {
                self.drain(inflight).await?;
                let _ = done.send(());
                Ok(Accepted::Nothing)
            }
            Msg::Data(first) => Ok(Accepted::Record(self.coalesce(first, peeked))),
        }
    }

    /// Builds a record for `payload`: compressed when that makes it smaller, then sealed
    /// when the session is encrypted.
    fn encode(&self, seq: u64, offset: u64, payload: Bytes) -> (RecordArg, u64) {
        let (mut payload, mut flags) = match self.zstd_level {
            Some(level) => match zstd::bulk::compress(&payload, level) {
                Ok(packed) if packed.len() < payload.len() => {
                    (Bytes::from(packed), record::FLAG_ZSTD)
                }
                _ => (payload, 0),
            },
            None => (payload, 0),
        };
        if let Some(sealer) = &self.sealer {
            flags |= record::FLAG_SEALED;
            let header = record::data_prefix(self.session, seq, offset, flags);
            payload = Bytes::from(sealer.seal(seq, &header, &payload));
        }
        let size = stored_size(RECORD_OVERHEAD + payload.len());
        let record = RecordArg {
            session: self.session,
            seq,
            offset,
            flags,
            payload,
        };
        (record, size)
    }

    /// Decides whether a record of `size` bytes fits: trims what may be trimmed and says
    /// up to where, and whether the record may go now or must wait for readers.
    fn make_room(&mut self, size: u64) -> Room {
        let mut trim = None;
        while self.held_total + size > self.max_backlog {
            let Some(front) = self.held.front() else {
                break;
            };
            if !self.live && !self.may_trim(front.upto) {
                return Room::Wait(trim);
            }
            trim = Some(front.upto);
            self.held_total -= front.bytes;
            self.covered = self.covered.saturating_sub(front.bytes);
            self.held.pop_front();
        }
        self.shared.held.store(self.held_total, Ordering::Relaxed);
        Room::Free(trim)
    }

    /// Whether no live reader still needs the records up to `upto`.
    fn may_trim(&self, upto: (u64, u64)) -> bool {
        match self.readers {
            Some(slowest) => upto <= slowest,
            // Nobody reads: older sessions make room for this one, but this session is kept
            // whole for the reader that comes later.
            None => upto.0 < self.session,
        }
    }

    fn push_held(&mut self, id: (u64, u64), size: u64) {
        self.held.push_back(Held {
            upto: id,
            bytes: size,
        });
        self.held_total += size;
        self.shared.held.store(self.held_total, Ordering::Relaxed);
    }

    fn xtrim(&self, upto: (u64, u64)) -> Frame {
        let min_id = if upto.1 == u64::MAX {
            record::entry_id(upto.0 + 1, 0)
        } else {
            record::entry_id(upto.0, upto.1 + 1)
        };
        let key = self.channel.stream_key();
        Frame::command(&[b"XTRIM", key.as_bytes(), b"MINID", b"=", min_id.as_bytes()])
    }

    /// Starts reading the live readers' positions; forgets readers whose position key
    /// expired.
    fn look(&mut self) {
        let (mut ctl, channel) = (self.ctl.clone(), self.channel.clone());
        let known = self.known_readers.clone();
        self.looks
            .pending
            .push_back(AbortOnDropHandle::new(tokio::spawn(async move {
                let (slowest, live) = reader_positions(&mut ctl, &channel, true, &known).await?;
                Ok((slowest, live.into_keys().collect()))
            })));
        self.looks.next = Instant::now() + self.looks.pause;
    }

    /// Takes in the readers as a look found them.
    fn seen(&mut self, slowest: Option<(u64, u64)>, known: Vec<String>) {
        self.looks.found(slowest != self.readers);
        self.readers = slowest;
        self.known_readers = known;
        self.readers_seen = Instant::now();
        self.covered = self
            .held
            .iter()
            .take_while(|h| self.may_trim(h.upto))
            .map(|h| h.bytes)
            .sum();
    }

    /// Adds the channel's final statistics for its meta hash to `pipe`.
    fn stats(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("HSET")
            .arg(self.channel.meta_key())
            .arg("written")
            .arg(self.shared.bytes.load(Ordering::Relaxed))
            .arg("held")
            .arg(self.held_total)
            .arg("rate")
            .arg(0)
            .arg("active")
            .arg(unix_ms())
            .ignore();
    }

    /// Joins queued data into one payload of at most `chunk_size` bytes. Only data already
    /// waiting is taken: nothing waits for more.
    fn coalesce(&mut self, mut first: Bytes, peeked: &mut Option<Msg>) -> Bytes {
        if first.len() >= self.chunk_size {
            let head = first.split_to(self.chunk_size);
            if !first.is_empty() {
                *peeked = Some(Msg::Data(first));
            }
            return head;
        }
        let mut joined: Option<BytesMut> = None;
        let mut total = first.len();
        while total < self.chunk_size {
            match self.rx.try_recv() {
                Ok(Msg::Data(mut more)) => {
                    let take = more.len().min(self.chunk_size - total);
                    let part = more.split_to(take);
                    let buf = joined.get_or_insert_with(|| {
                        let mut b = BytesMut::with_capacity(self.chunk_size);
                        b.put_slice(&first);
                        b
                    });
                    buf.put_slice(&part);
                    total += take;
                    if !more.is_empty() {
                        *peeked = Some(Msg::Data(more));
                        break;
                    }
                }
                Ok(other) => {
                    *peeked = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        joined.map_or(first, BytesMut::freeze)
    }

    /// Sends a request on the data connection and keeps it until its answer.
    async fn send(
        &mut self,
        inflight: &mut VecDeque<Request>,
        seq: Option<u64>,
        bytes: u64,
        frame: Frame,
    ) {
        let request = Request { seq, bytes, frame };
        self.resend(inflight, request).await;
    }

    async fn resend(&mut self, inflight: &mut VecDeque<Request>, request: Request) {
        self.in_flight += request.bytes;
        self.link.send(&request.frame).await;
        inflight.push_back(request);
    }

    /// Waits for every request in flight to be answered.
    async fn drain(&mut self, inflight: &mut VecDeque<Request>) -> Result<()> {
        while !inflight.is_empty() {
            let answer = self.link.answer().await;
            let request = inflight.pop_front().expect("non-empty");
            self.settle(request, answer, inflight).await?;
        }
        Ok(())
    }

    /// Takes the reply of the oldest request in flight; after a connection failure, gets the
    /// relay back and sends again what it does not hold.
    async fn settle(
        &mut self,
        request: Request,
        answer: Result<Answer>,
        inflight: &mut VecDeque<Request>,
    ) -> Result<()> {
        self.in_flight -= request.bytes;
        match self.check_answer(&request, answer)? {
            Outcome::Done => Ok(()),
            Outcome::Taken(seq) if self.landed().await?.is_some_and(|l| l >= seq) => Ok(()),
            Outcome::Taken(seq) => Err(Error::Relay {
                addr: self.relay.addr().into(),
                reason: format!(
                    "the relay refused record {} as out of order",
                    record::entry_id(self.session, seq)
                ),
            }),
            Outcome::Failed(failure) => {
                let mut pending = vec![request];
                pending.extend(inflight.drain(..));
                self.recover(failure, pending, inflight).await
            }
        }
    }

    /// Reconnects after `failure`, makes sure the session is still this writer's and on the
    /// relay, and sends again the `pending` requests whose records the relay does not hold.
    /// Appends name their IDs, so one that did land is not stored twice.
    async fn recover(
        &mut self,
        failure: Error,
        pending: Vec<Request>,
        inflight: &mut VecDeque<Request>,
    ) -> Result<()> {
        self.in_flight = 0;
        let relay = self.relay.clone();
        self.link = relay.reopen(failure, || Link::open(&relay)).await?;
        self.keys.hold_lease(&mut self.ctl).await?;
        self.keys.restore(&mut self.ctl).await?;
        let landed = self.landed().await?;
        // The next record the relay does not hold: 0, the begin record, if it holds none.
        let next = landed.map_or(0, |l| l + 1);
        if let Some(first) = pending.iter().find_map(|r| r.seq)
            && next < first
        {
            tracing::warn!(
                "the relay at {} lost records {} to {} of {}, which it had stored: readers that \
                 had not read them will report the missing bytes",
                self.relay.addr(),
                record::entry_id(self.session, next),
                record::entry_id(self.session, first - 1),
                self.channel
            );
        }
        for request in pending {
            if request.seq.is_some_and(|seq| seq < next) {
                continue;
            }
            self.resend(inflight, request).await;
        }
        Ok(())
    }

    /// The sequence number of this session's newest record on the relay (`None` when the
    /// relay holds none of them, not even the begin record): everything up to it has
    /// landed, since appends land in order.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when a later session has begun.
    async fn landed(&mut self) -> Result<Option<u64>> {
        match session::newest_entry(&mut self.ctl, &self.channel).await? {
            Some((s, _)) if s > self.session => Err(Error::LeaseLost {
                channel: self.channel.name().into(),
                reason: format!("session {s} has begun on the channel"),
            }),
            Some((s, q)) if s == self.session => Ok(Some(q)),
            _ => Ok(None),
        }
    }

    fn check_answer(&self, request: &Request, answer: Result<Answer>) -> Result<Outcome> {
        let relay_error = |reason: String| Error::Relay {
            addr: self.relay.addr().into(),
            reason,
        };
        match (request.seq, answer) {
            (Some(seq), Ok(Answer::Bulk(id)))
                if id == record::entry_id(self.session, seq).as_bytes() =>
            {
                Ok(Outcome::Done)
            }
            (None, Ok(Answer::Int(_))) => Ok(Outcome::Done),
            (_, Err(e @ Error::Connection { .. })) => Ok(Outcome::Failed(e)),
            (_, Err(e)) => Err(e),
            // Still reading its data back from disk after a restart: as good as away.
            (_, Ok(Answer::Refused(e))) if e.starts_with("LOADING") => {
                Ok(Outcome::Failed(Error::Connection {
                    addr: self.relay.addr().into(),
                    reason: e,
                }))
            }
            (Some(seq), Ok(Answer::Refused(e))) if e.contains("equal or smaller") => {
                Ok(Outcome::Taken(seq))
            }
            (_, Ok(Answer::Refused(e))) => Err(relay_error(e)),
            (_, Ok(other)) => Err(relay_error(format!("unexpected answer {other:?}"))),
        }
    }
}

enum Accepted {
    Record(Bytes),
    Nothing,
    End(EndStatus),
}

#[derive(Clone, Copy)]
enum Room {
    /// The record fits (after trimming up to the ID given, if any).
    Free(Option<(u64, u64)>),
    /// The record must wait for readers (after trimming up to the ID given, if any).
    Wait(Option<(u64, u64)>),
}

/// A reader's position as it reports it: the last record it fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub session: u64,
    pub seq: u64,
    pub offset: u64,
}

impl Position {
    pub(crate) fn encode(&self) -> String {
        format!("{}-{} {}", self.session, self.seq, self.offset)
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (id, offset) = s.split_once(' ')?;
        let (session, seq) = record::parse_entry_id(id.as_bytes())?;
        Some(Self {
            session,
            seq,
            offset: offset.parse().ok()?,
        })
    }
}

/// The live readers' positions and the slowest of them. With `forget`, readers whose
/// position key has expired are removed from the registry.
///
/// The positions of the `known` readers (those seen last time) are asked for with the list,
/// so that when no reader came or went it takes one round trip, not two: on a distant relay
/// a writer waiting for its readers waits that long for each look.
pub(crate) async fn reader_positions(
    ctl: &mut Conn,
    channel: &Channel,
    forget: bool,
    known: &[String],
) -> Result<(Option<Position>, HashMap<String, Position>)> {
    let mut pipe = redis::pipe();
    pipe.cmd("HGETALL").arg(channel.readers_key());
    for id in known {
        pipe.cmd("GET").arg(channel.reader_key(id));
    }
    let mut replies: Vec<Value> = ctl.pipe(&pipe).await?;
    let shape = |e: redis::ParsingError| ctl.error(&e.into());
    let guessed: Vec<Option<String>> = replies
        .drain(1..)
        .map(|v| Option::<String>::from_redis_value(v).map_err(shape))
        .collect::<Result<_>>()?;
    let ids: HashMap<String, String> = match replies.pop() {
        Some(v) => HashMap::from_redis_value(v).map_err(shape)?,
        None => HashMap::new(),
    };
    let mut values: HashMap<String, Option<String>> = known
        .iter()
        .cloned()
        .zip(guessed)
        .filter(|(id, _)| ids.contains_key(id))
        .collect();
    let new: Vec<&String> = ids.keys().filter(|id| !values.contains_key(*id)).collect();
    if !new.is_empty() {
        let mut pipe = redis::pipe();
        for id in &new {
            pipe.cmd("GET").arg(channel.reader_key(id));
        }
        let got: Vec<Option<String>> = ctl.pipe(&pipe).await?;
        values.extend(new.into_iter().cloned().zip(got));
    }
    let mut live = HashMap::new();
    let mut dead = Vec::new();
    for (id, value) in values {
        match value.as_deref().and_then(Position::parse) {
            Some(p) => {
                live.insert(id, p);
            }
            None => dead.push(id),
        }
    }
    if forget && !dead.is_empty() {
        let _: Result<i64> = ctl
            .query(redis::cmd("HDEL").arg(channel.readers_key()).arg(&dead))
            .await;
    }
    Ok((live.values().min().copied(), live))
}

/// A data record on its way to the relay.
struct RecordArg {
    session: u64,
    seq: u64,
    offset: u64,
    flags: u8,
    payload: Bytes,
}

impl RecordArg {
    /// The record's `XADD`: its prefix goes in the frame's head, the payload is sent as is.
    fn frame(self, channel: &Channel) -> Frame {
        let mut prefix = BytesMut::with_capacity(record::DATA_PREFIX_LEN);
        record::encode_data_prefix(&mut prefix, self.session, self.seq, self.offset, self.flags);
        let key = channel.stream_key();
        let id = record::entry_id(self.session, self.seq);
        Frame::with_body(
            &[
                b"XADD",
                key.as_bytes(),
                id.as_bytes(),
                record::FIELD.as_bytes(),
            ],
            &prefix,
            self.payload,
        )
    }
}

fn xadd(channel: &Channel, session: u64, seq: u64, record: impl ToRedisArgs) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(channel.stream_key())
        .arg(record::entry_id(session, seq))
        .arg(record::FIELD)
        .arg(record);
    cmd
}

/// Opens the appends' connection and measures the round trip on it with a PING.
async fn open_link(relay: RelayConfig) -> Result<(Link, Duration)> {
    let mut link = Link::open(&relay).await?;
    let pinged = Instant::now();
    link.send(&Frame::command(&[b"PING"])).await;
    match link.answer().await? {
        Answer::Simple(pong) if pong == "PONG" => Ok((link, pinged.elapsed())),
        other => Err(Error::Relay {
            addr: relay.addr().into(),
            reason: format!("PING was answered with {other:?}"),
        }),
    }
}

/// Takes the writer's lease and, in the same round trip, reads what picks the next session:
/// `None` when another writer holds the lease. The number is one past both the meta counter
/// and the newest session in the stream, so that a meta hash lost on its own cannot make IDs
/// go backwards; it is read after the lease is taken, so no other writer can move it before
/// the begin record lands. Also returns the bytes the relay holds of earlier sessions, as the
/// last writer recorded them.
async fn take_lease(ctl: &mut Conn, channel: &Channel, lease: &str) -> Result<Option<(u64, u64)>> {
    // The channel's keys are checked in the same round trip: if they turn out not to be
    // tube's, the lease just taken is given back.
    let mut pipe = redis::pipe();
    session::inspection(&mut pipe, channel);
    pipe.cmd("SET")
        .arg(channel.writer_key())
        .arg(lease)
        .arg("NX")
        .arg("PX")
        .arg(LEASE.as_millis() as u64);
    pipe.cmd("XREVRANGE")
        .arg(channel.stream_key())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
    pipe.cmd("HMGET")
        .arg(channel.meta_key())
        .arg("session")
        .arg("held");
    let (ts, tm, tw, fields, current, took, last, meta): (
        Value,
        Value,
        Value,
        Value,
        Value,
        Value,
        Value,
        Value,
    ) = ctl.pipe(pipe.ignore_errors()).await?;
    let state = session::inspected(ctl, channel, [ts, tm, tw, fields, current]).await?;
    if state.lease.is_some() {
        return Ok(None);
    }
    let shape = |e: redis::RedisError| ctl.error(&e);
    let took: Option<String> = redis::from_redis_value(took).map_err(|e| shape(e.into()))?;
    if took.is_none() {
        return Ok(None);
    }
    let last: Vec<(String, Value)> = redis::from_redis_value(last).map_err(|e| shape(e.into()))?;
    let (counted, held): (Option<u64>, Option<u64>) =
        redis::from_redis_value(meta).map_err(|e| shape(e.into()))?;
    let last_session = last
        .first()
        .and_then(|(id, _)| record::parse_entry_id(id.as_bytes()))
        .map_or(0, |(s, _)| s);
    let held = if last.is_empty() {
        0
    } else {
        held.unwrap_or(0)
    };
    Ok(Some((counted.unwrap_or(0).max(last_session) + 1, held)))
}

/// Deletes the lease if it is still ours. Best effort: a lease left behind expires anyway.
/// With `ended`, also runs its pipeline (the writer's last words on the channel, which are
/// not its to say once another writer holds the lease) and marks that session as ended on
/// purpose, so that readers need not wait for a writer that might be reconnecting.
async fn release_lease(
    ctl: &mut Conn,
    channel: &Channel,
    lease: &str,
    ended: Option<(u64, redis::Pipeline)>,
) {
    let current: Result<Option<String>> =
        ctl.query(redis::cmd("GET").arg(channel.writer_key())).await;
    if let Ok(current) = current {
        end_lease(ctl, channel, lease, current, ended).await;
    }
}

/// [`release_lease`] once the lease's `current` holder is known.
async fn end_lease(
    ctl: &mut Conn,
    channel: &Channel,
    lease: &str,
    current: Option<String>,
    ended: Option<(u64, redis::Pipeline)>,
) {
    if current.as_deref() != Some(lease) {
        return;
    }
    let mut pipe = match ended {
        Some((session, mut last)) => {
            last.cmd("HSET")
                .arg(channel.meta_key())
                .arg("ended")
                .arg(session)
                .ignore();
            last
        }
        None => redis::pipe(),
    };
    pipe.cmd("DEL").arg(channel.writer_key()).ignore();
    let _: Result<()> = ctl.pipe(&pipe).await;
}

/// What a writer needs to hold its session, and to put it back on a relay that lost it.
#[derive(Clone)]
struct SessionKeys {
    channel: Channel,
    session: u64,
    lease: String,
    /// The session's begin record.
    begin: Bytes,
    live: bool,
    ttl_ms: u64,
}

impl SessionKeys {
    /// The meta hash's fields that describe the session.
    fn set_meta(&self, pipe: &mut redis::Pipeline) {
        let meta = self.channel.meta_key();
        pipe.cmd("HSETNX")
            .arg(&meta)
            .arg("proto")
            .arg(session::META_PROTO)
            .ignore();
        pipe.cmd("HSET")
            .arg(&meta)
            .arg("session")
            .arg(self.session)
            .arg("begin")
            .arg(&self.begin[..])
            .arg("mode")
            .arg(if self.live { "live" } else { "reliable" })
            .arg("ttl")
            .arg(self.ttl_ms)
            .arg("active")
            .arg(unix_ms())
            .ignore();
        pipe.cmd("PEXPIRE").arg(&meta).arg(self.ttl_ms).ignore();
    }

    /// Makes sure the writer still holds the channel's lease, taking it back when it lapsed
    /// (the relay was out of reach longer than the lease, or lost it) and nobody else took it.
    async fn hold_lease(&self, conn: &mut Conn) -> Result<()> {
        let current: Option<String> = conn
            .query(redis::cmd("GET").arg(self.channel.writer_key()))
            .await?;
        self.keep_lease(conn, current).await
    }

    /// [`SessionKeys::hold_lease`] once the lease's `current` holder is known.
    async fn keep_lease(&self, conn: &mut Conn, current: Option<String>) -> Result<()> {
        let key = self.channel.writer_key();
        let lost = |reason: &str| Error::LeaseLost {
            channel: self.channel.name().into(),
            reason: reason.into(),
        };
        match current {
            Some(v) if v == self.lease => return Ok(()),
            Some(_) => return Err(lost("another writer holds it now")),
            None => {}
        }
        let _: Option<String> = conn
            .query(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&self.lease)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE.as_millis() as u64),
            )
            .await?;
        // Read back rather than trust the answer: a repeated SET answers nil though it took.
        let current: Option<String> = conn.query(redis::cmd("GET").arg(&key)).await?;
        if current.as_deref() != Some(self.lease.as_str()) {
            return Err(lost("another writer took it while this one was away"));
        }
        tracing::warn!("took back the writer lease of {}", self.channel);
        Ok(())
    }

    /// Puts the session's meta hash and begin record back when the relay lost them, so that
    /// readers can find the session again (and see what is missing from it).
    async fn restore(&self, conn: &mut Conn) -> Result<()> {
        let kept: bool = conn
            .query(
                redis::cmd("HEXISTS")
                    .arg(self.channel.meta_key())
                    .arg("begin"),
            )
            .await?;
        if kept {
            return Ok(());
        }
        self.rewrite(conn).await
    }

    /// Writes the session's meta hash and begin record again, which the relay does not hold:
    /// it lost them, or a connection failed before they landed.
    async fn rewrite(&self, conn: &mut Conn) -> Result<()> {
        tracing::warn!(
            "the relay at {} does not hold the description of session {} of {}; writing it again",
            conn.addr(),
            self.session,
            self.channel
        );
        let mut pipe = redis::pipe();
        self.set_meta(&mut pipe);
        let () = conn.pipe(&pipe).await?;
        // Fails when later records of the session are still there, which is as good.
        let _: Result<Value> = conn
            .query(&xadd(&self.channel, self.session, 0, &self.begin[..]))
            .await;
        Ok(())
    }
}

/// Renews the lease, keeps the channel's keys from expiring, and publishes statistics.
struct Heartbeat {
    ctl: Conn,
    keys: SessionKeys,
    shared: Arc<Shared>,
}

impl Heartbeat {
    async fn run(mut self, lost: oneshot::Sender<Error>, stop: CancellationToken) {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            let bytes = self.shared.bytes.load(Ordering::Relaxed);
            let rate = (bytes - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
            last = (Instant::now(), bytes);
            let renewed = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.beat(bytes, rate) => r,
            };
            if let Err(e) = renewed {
                let _ = lost.send(e);
                return;
            }
        }
    }

    async fn beat(&mut self, bytes: u64, rate: f64) -> Result<()> {
        let channel = &self.keys.channel;
        let key = channel.writer_key();
        let mut pipe = redis::pipe();
        pipe.cmd("PEXPIRE")
            .arg(&key)
            .arg(LEASE.as_millis() as u64)
            .ignore();
        pipe.cmd("GET").arg(&key);
        for k in [
            channel.stream_key(),
            channel.meta_key(),
            channel.readers_key(),
        ] {
            pipe.cmd("PEXPIRE").arg(k).arg(self.keys.ttl_ms).ignore();
        }
        // Only into a meta hash that is there: one the relay lost is restored whole below.
        pipe.cmd("HEXISTS").arg(channel.meta_key()).arg("begin");
        let (lease, meta): (Option<String>, bool) = self.ctl.pipe(&pipe).await?;
        if lease.as_deref() != Some(self.keys.lease.as_str()) {
            self.keys.keep_lease(&mut self.ctl, lease).await?;
        }
        if !meta {
            self.keys.rewrite(&mut self.ctl).await?;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(channel.meta_key())
            .arg("written")
            .arg(bytes)
            .arg("held")
            .arg(self.shared.held.load(Ordering::Relaxed))
            .arg("rate")
            .arg(rate as u64)
            .arg("active")
            .arg(unix_ms())
            .ignore();
        self.ctl.pipe(&pipe).await
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_sizes_follow_the_allocators_size_classes() {
        let n = NODE_OVERHEAD;
        assert_eq!(stored_size(1), 16 + n);
        assert_eq!(stored_size(100), 112 + n);
        assert_eq!(stored_size(4096), 4096 + n);
        assert_eq!(stored_size(4097), 5120 + n);
        assert_eq!(stored_size(65536), 65536 + n);
        assert_eq!(stored_size(65537), 81920 + n);
        assert_eq!(stored_size(262_144), 262_144 + n);
        assert_eq!(stored_size(18_000), 20_480 + n);
    }

    #[test]
    fn looks_at_the_readers_keep_pace_while_they_move_and_back_off_while_they_stand() {
        let near = Looks::new(Duration::from_micros(100));
        assert_eq!(near.pause, MIN_READER_POLL);
        let mut far = Looks::new(Duration::from_millis(50));
        assert_eq!(
            far.base,
            Duration::from_micros(12_500),
            "a quarter of the round trip"
        );
        // Still for less than `still`: a reader between two reads, keep the pace.
        far.found(false);
        assert_eq!(far.pause, far.base);
        // Still for longer: slow down, doubling, up to the longest pause.
        far.moved = Instant::now() - far.still - Duration::from_millis(1);
        far.found(false);
        assert_eq!(far.pause, far.base * 2);
        for _ in 0..10 {
            far.found(false);
        }
        assert_eq!(far.pause, MAX_READER_POLL);
        // A reader moves: back to the pace at once, and the next look comes no later.
        far.next = Instant::now() + MAX_READER_POLL;
        far.found(true);
        assert_eq!(far.pause, far.base);
        assert!(far.next <= Instant::now() + far.base);
    }

    #[test]
    fn the_window_grows_with_the_round_trip_within_the_reply_room() {
        let wide = 1 << 30;
        assert_eq!(window_bytes(Duration::from_micros(100), wide), WINDOW_BYTES);
        assert_eq!(window_bytes(Duration::from_millis(30), wide), 19_200_000);
        assert_eq!(
            window_bytes(Duration::from_millis(500), wide),
            MAX_WINDOW_BYTES
        );
        assert_eq!(
            window_bytes(Duration::from_millis(500), 0),
            MAX_WINDOW_BYTES
        );
        let default = DEFAULT_MAX_BACKLOG;
        assert_eq!(window_bytes(Duration::from_millis(10), default), 6_400_000);
        assert_eq!(window_bytes(Duration::from_millis(50), default), 20 << 20);
        assert_eq!(
            window_bytes(Duration::from_millis(50), 256 << 20),
            32_000_000
        );
        // A small budget never shrinks the window below what a nearby relay gets.
        assert_eq!(
            window_bytes(Duration::from_millis(50), 1 << 20),
            WINDOW_BYTES
        );
    }

    #[test]
    fn reader_batches_fit_the_reply_room() {
        // 64 KiB records in a 4 MiB budget: 640 KiB for replies of 80 KiB each.
        assert_eq!(reader_batch(4 << 20, 65536 - RECORD_OVERHEAD, 4 << 20), 7);
        // The default: 256 KiB records, 64 MiB budget, 4 MiB batches.
        assert_eq!(
            reader_batch(64 << 20, DEFAULT_CHUNK_SIZE - RECORD_OVERHEAD, 4 << 20),
            15
        );
        // Never less than one record.
        assert_eq!(reader_batch(1024, 1 << 20, 4 << 20), 1);
        // Small records pack into shared reply blocks: 1 MiB of 1,064-byte records, each
        // counted at its 1,280-byte size class and node overhead.
        assert_eq!(reader_batch(0, 1000, 1 << 20), (1 << 20) / (1280 + 256));
    }

    #[test]
    fn reader_positions_order_by_stream_id() {
        let p = |s, q, o| Position {
            session: s,
            seq: q,
            offset: o,
        };
        assert!(p(1, u64::MAX, 0) < p(2, 0, 0));
        assert!(p(2, 3, 900) < p(2, 4, 0));
        assert_eq!(Position::parse(&p(7, 8, 9).encode()), Some(p(7, 8, 9)));
        assert_eq!(Position::parse("7-8"), None);
    }
}
