//! The writing end of a channel: one session, from its begin record to its end record.
//!
//! Data flows: caller -> bounded queue -> sender task -> pipelined `XADD`s on one connection.
//! The sender keeps up to `window` appends in flight, so a distant relay costs one round trip
//! per window rather than per record. A second connection renews the writer's lease, so that
//! renewals never queue behind megabytes of data.

use crate::channel::Channel;
use crate::client::{Conn, RelayConfig};
use crate::error::{Error, Result};
use crate::record::{self, Begin, End, EndStatus};
use crate::session::{self, lease_value};
use bytes::{BufMut, Bytes, BytesMut};
use redis::{RedisResult, RedisWrite, ToRedisArgs, Value};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, PollSender};

/// How long a writer's lease lasts without renewal. A writer killed without a chance to
/// clean up frees its channel after this long.
pub const LEASE: Duration = Duration::from_secs(8);
/// How often the lease is renewed: several renewals fit in one lease, so one slow round trip
/// does not lose it.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// Default largest payload of one record.
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;
/// Default number of appends in flight.
pub const DEFAULT_WINDOW: usize = 16;
/// Largest record payload accepted by [`WriteOptions`]; readers refuse larger records.
pub const MAX_CHUNK_SIZE: usize = 16 * 1024 * 1024;

/// How a writer sends.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Largest payload of one record. Data that arrives while appends are in flight is
    /// coalesced up to this size; data never waits for more data.
    pub chunk_size: usize,
    /// Appends in flight at most.
    pub window: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            window: DEFAULT_WINDOW,
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
}

impl Writer {
    /// Takes the channel's lease and starts a new session.
    ///
    /// # Errors
    /// [`Error::Busy`] when another writer is alive on the channel; [`Error::ForeignKey`] when
    /// the channel's keys are not tube's; connection errors.
    pub async fn start(relay: &RelayConfig, channel: &Channel, opts: WriteOptions) -> Result<Self> {
        let chunk_size = opts.chunk_size.clamp(1, MAX_CHUNK_SIZE);
        let window = opts.window.clamp(1, crate::client::PIPELINE_BUFFER / 2);
        let mut ctl = relay.connect().await?;
        if session::inspect(&mut ctl, channel).await?.lease.is_some() {
            return Err(Error::Busy {
                channel: channel.name().into(),
            });
        }
        let token: [u8; 16] = rand::random();
        let lease = lease_value(&token);
        let took: Option<String> = ctl
            .query(
                redis::cmd("SET")
                    .arg(channel.writer_key())
                    .arg(&lease)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE.as_millis() as u64),
            )
            .await?;
        if took.is_none() {
            return Err(Error::Busy {
                channel: channel.name().into(),
            });
        }
        let begun = async {
            let session = next_session(&mut ctl, channel).await?;
            let begin = Begin {
                token,
                started_ms: unix_ms(),
                max_payload: chunk_size as u32,
            };
            let _: Value = ctl
                .query(&xadd(
                    channel,
                    session,
                    0,
                    &record::encode_begin(session, &begin)[..],
                ))
                .await?;
            let data = relay.connect().await?;
            Ok::<_, Error>((session, data))
        }
        .await;
        let (session, data) = match begun {
            Ok(v) => v,
            Err(e) => {
                release_lease(&mut ctl, channel, &lease).await;
                return Err(e);
            }
        };
        tracing::debug!(channel = channel.name(), session, "session started");

        let (lost_tx, lost_rx) = watch::channel(None);
        let stop = CancellationToken::new();
        tokio::spawn(heartbeat(
            ctl.clone(),
            channel.writer_key(),
            lease.clone(),
            lost_tx,
            stop.clone(),
        ));
        let (tx, rx) = mpsc::channel(8);
        let sender = Sender {
            rx,
            data,
            ctl,
            channel: channel.clone(),
            session,
            lease,
            chunk_size,
            window,
            lost: lost_rx,
            stop_heartbeat: stop,
        };
        Ok(Self {
            tx: PollSender::new(tx),
            task: Some(tokio::spawn(sender.run())),
            chunk_size,
            flushing: None,
            finishing: false,
            summary: None,
            session,
        })
    }

    /// The session number this writer writes.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Queues `data` for sending without copying it. Waits while the queue is full, which is
    /// how a slow relay holds back the producer.
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

/// The background half of a [`Writer`].
struct Sender {
    rx: mpsc::Receiver<Msg>,
    data: Conn,
    ctl: Conn,
    channel: Channel,
    session: u64,
    lease: String,
    chunk_size: usize,
    window: usize,
    lost: watch::Receiver<Option<String>>,
    stop_heartbeat: CancellationToken,
}

type Append = Pin<Box<dyn Future<Output = RedisResult<Value>> + Send>>;

impl Sender {
    async fn run(mut self) -> Result<Summary> {
        let outcome = self.pump().await;
        self.stop_heartbeat.cancel();
        release_lease(&mut self.ctl, &self.channel, &self.lease).await;
        match &outcome {
            Ok(s) => tracing::debug!(channel = self.channel.name(), ?s, "session ended"),
            Err(e) => tracing::debug!(channel = self.channel.name(), %e, "writer failed"),
        }
        outcome
    }

    async fn pump(&mut self) -> Result<Summary> {
        let mut inflight: VecDeque<(u64, Append)> = VecDeque::new();
        let mut peeked: Option<Msg> = None;
        let mut seq = 1u64;
        let mut bytes = 0u64;
        let mut hasher = blake3::Hasher::new();
        let status = loop {
            let msg = if inflight.len() < self.window && peeked.is_some() {
                peeked.take()
            } else {
                tokio::select! {
                    biased;
                    changed = self.lost.changed() => {
                        let reason = self.lost.borrow().clone();
                        if let (Ok(()), Some(reason)) = (changed, reason) {
                            return Err(Error::LeaseLost { channel: self.channel.name().into(), reason });
                        }
                        continue;
                    }
                    acked = async { let front = inflight.front_mut().expect("non-empty"); (front.0, (&mut front.1).await) }, if !inflight.is_empty() => {
                        inflight.pop_front();
                        self.check_ack(acked.0, acked.1)?;
                        continue;
                    }
                    msg = self.rx.recv(), if inflight.len() < self.window => msg,
                }
            };
            match msg {
                None => break EndStatus::Interrupted,
                Some(Msg::Finish(status)) => break status,
                Some(Msg::Flush(done)) => {
                    self.drain(&mut inflight).await?;
                    let _ = done.send(());
                }
                Some(Msg::Data(first)) => {
                    let payload = self.coalesce(first, &mut peeked);
                    hasher.update(&payload);
                    bytes += payload.len() as u64;
                    let cmd = xadd(
                        &self.channel,
                        self.session,
                        seq,
                        RecordArg {
                            session: self.session,
                            seq,
                            payload,
                        },
                    );
                    inflight.push_back((seq, issue(self.data.raw(), cmd).await));
                    seq += 1;
                }
            }
        };
        self.drain(&mut inflight).await?;
        let end = End {
            status,
            total_len: bytes,
            digest: *hasher.finalize().as_bytes(),
        };
        let reply: Value = self
            .data
            .query(&xadd(
                &self.channel,
                self.session,
                seq,
                &record::encode_end(self.session, seq, &end)[..],
            ))
            .await?;
        self.check_ack(seq, Ok(reply))?;
        Ok(Summary {
            session: self.session,
            bytes,
            records: seq - 1,
            status,
        })
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

    async fn drain(&mut self, inflight: &mut VecDeque<(u64, Append)>) -> Result<()> {
        while let Some((seq, append)) = inflight.pop_front() {
            let reply = append.await;
            self.check_ack(seq, reply)?;
        }
        Ok(())
    }

    fn check_ack(&self, seq: u64, reply: RedisResult<Value>) -> Result<()> {
        let want = record::entry_id(self.session, seq);
        match reply {
            Ok(Value::BulkString(id)) if id == want.as_bytes() => Ok(()),
            Ok(other) => Err(Error::Relay {
                addr: self.data.addr().into(),
                reason: format!("XADD of {want} was answered with {other:?}"),
            }),
            Err(e) => Err(self.data.error(&e)),
        }
    }
}

/// Sends one append and returns the future of its reply, after the request has entered the
/// connection's queue. Appends must reach the relay in sequence order: queuing each one
/// before the next is built guarantees that.
async fn issue(mut conn: redis::aio::MultiplexedConnection, cmd: redis::Cmd) -> Append {
    // The first poll puts the request into the connection's queue (which has room for more
    // than a window of requests), so the order of requests is the order of these calls.
    // `unconstrained`: tokio's cooperative budget could otherwise make that first poll return
    // Pending without queuing anything, and a later append would overtake this one.
    let mut fut: Append = Box::pin(tokio::task::unconstrained(async move {
        conn.send_packed_command(&cmd).await
    }));
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(reply) => Box::pin(std::future::ready(reply)),
        Poll::Pending => fut,
    }
}

/// A data record as one command argument, written straight into the command buffer.
struct RecordArg {
    session: u64,
    seq: u64,
    payload: Bytes,
}

impl ToRedisArgs for RecordArg {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut header = BytesMut::with_capacity(record::HEADER_LEN);
        record::encode_data_header(&mut header, self.session, self.seq);
        let mut w = out.writer_for_next_arg();
        // Writing into the command's own buffer cannot fail.
        let _ = io::Write::write_all(&mut w, &header);
        let _ = io::Write::write_all(&mut w, &self.payload);
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

/// Picks the next session number: one past both the meta counter and the newest session in
/// the stream, so that a meta hash lost on its own cannot make IDs go backwards.
async fn next_session(ctl: &mut Conn, channel: &Channel) -> Result<u64> {
    let last: Vec<(String, Value)> = ctl
        .query(
            redis::cmd("XREVRANGE")
                .arg(channel.stream_key())
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    let last_session = last
        .first()
        .and_then(|(id, _)| record::parse_entry_id(id.as_bytes()))
        .map_or(0, |(s, _)| s);
    let mut pipe = redis::pipe();
    pipe.cmd("HSETNX")
        .arg(channel.meta_key())
        .arg("proto")
        .arg(session::META_PROTO)
        .ignore();
    pipe.cmd("HINCRBY")
        .arg(channel.meta_key())
        .arg("session")
        .arg(1);
    let (mut session,): (u64,) = ctl.pipe(&pipe).await?;
    if session <= last_session {
        session = last_session + 1;
        let _: i64 = ctl
            .query(
                redis::cmd("HSET")
                    .arg(channel.meta_key())
                    .arg("session")
                    .arg(session),
            )
            .await?;
    }
    Ok(session)
}

/// Deletes the lease if it is still ours. Best effort: a lease left behind expires anyway.
async fn release_lease(ctl: &mut Conn, channel: &Channel, lease: &str) {
    let key = channel.writer_key();
    let current: Result<Option<String>> = ctl.query(redis::cmd("GET").arg(&key)).await;
    if matches!(current, Ok(Some(ref v)) if v == lease) {
        let _: Result<i64> = ctl.query(redis::cmd("DEL").arg(&key)).await;
    }
}

async fn heartbeat(
    mut ctl: Conn,
    key: String,
    lease: String,
    lost: watch::Sender<Option<String>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PEXPIRE")
            .arg(&key)
            .arg(LEASE.as_millis() as u64)
            .ignore();
        pipe.cmd("GET").arg(&key);
        let held: Result<(Option<String>,)> = ctl.pipe(&pipe).await;
        match held {
            Ok((Some(v),)) if v == lease => {}
            Ok((found,)) => {
                let reason = match found {
                    None => "the lease expired or was deleted".to_string(),
                    Some(_) => "another writer holds it now".to_string(),
                };
                let _ = lost.send(Some(reason));
                return;
            }
            Err(e) => tracing::warn!("could not renew the writer lease: {e}"),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
