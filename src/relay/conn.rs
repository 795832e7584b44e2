//! One client's connection: read, find whole requests, run them, write the replies.
//!
//! The loop is sequential, as Redis's is for one client: every request in the input buffer is
//! run before the replies are written with one vectored write, so a pipelining client costs
//! one system call per batch in each direction.
//!
//! Memory per client is bounded: an idle client holds no buffer at all; a request being
//! received holds at most a small allowance unless the shared input budget grants more; a
//! large request is read into one buffer of exactly its size, which the stored value then
//! keeps (no copy, no slack); replies stop being produced once a soft limit is pending.
//!
//! The same loop serves plain TCP and TLS ([`Transport`]). Over TLS the vectored writes still
//! gather the reply segments without joining them first, but encryption necessarily copies
//! each byte once into rustls's record buffer; and rustls holds its own buffers per
//! connection, idle or not.

use super::cmd::{self, BlockSpec, Client, Config, Flow};
use super::wire::{self, Out, Scan};
use super::{Shared, unix_ms};
use bytes::{BufMut, BytesMut};
use std::future::Future;
use std::io;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Bytes read at a time when the size of what comes is unknown.
const READ_CHUNK: usize = 16 * 1024;
/// Input a client may hold without drawing on the shared budget.
const FREE_INPUT: usize = 16 * 1024;
/// Requests at least this large get a buffer of their own, of exactly their size.
const OWN_BUFFER_AT: usize = 64 * 1024;
/// Most bytes read in one go into a large request.
const MAX_READ: usize = 4 << 20;
/// Pending reply bytes after which no more requests are run until they are written.
const OUT_SOFT_LIMIT: usize = 256 * 1024;
/// A write that makes no progress for this long means the client stopped reading.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// A request left half-sent for this long is abandoned with its connection.
const READ_STALL: Duration = Duration::from_secs(60);
/// How long a client waits for input budget before it is disconnected.
const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// A client's byte stream: plain TCP, or TLS over TCP.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    /// Waits until a read may return something, holding no buffer meanwhile (an idle client
    /// costs no input buffer). May wake with nothing to read.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_;

    /// Reads what can be read now, without waiting: `WouldBlock` if nothing can.
    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize>;

    /// The socket, when other tasks may write to it directly (see [`cmd::Armed`]).
    fn direct(&self) -> Option<Arc<TcpStream>> {
        None
    }
}

/// Plain TCP, shared with the appends that answer this client's blocked reads themselves.
pub(crate) struct Tcp(pub Arc<TcpStream>);

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let want = buf.remaining();
            let mut got = 0;
            // A read shorter than asked for emptied the socket. Saying "would block" to
            // `try_io` then forgets the readiness it came with, so the next read waits for new
            // data instead of asking the kernel once more only to find none, as tokio's own
            // `TcpStream` does. (Readiness that arrived meanwhile is kept.)
            let read = self.0.try_io(Interest::READABLE, || {
                got = self.0.try_read_buf(buf)?;
                if got > 0 && got < want {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match read {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shut = rustix::net::shutdown(&*self.0, rustix::net::Shutdown::Write);
        Poll::Ready(shut.map_err(io::Error::from))
    }
}

impl Transport for Tcp {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        self.0.readable()
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        self.0.try_read_buf(buf)
    }

    fn direct(&self) -> Option<Arc<TcpStream>> {
        Some(self.0.clone())
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    async fn readable(&self) -> io::Result<()> {
        let (tcp, tls) = self.get_ref();
        // Decrypted bytes (or the peer's close) may already wait inside rustls, where the
        // socket's readiness cannot tell.
        if !tls.wants_read() {
            return Ok(());
        }
        tcp.readable().await
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        // One poll of a read: reading is cancel safe, so a read that would wait is dropped
        // having taken nothing. Whatever TLS records it decrypted stay inside rustls.
        let mut cx = Context::from_waker(Waker::noop());
        let read = std::pin::pin!(self.read_buf(buf));
        match read.poll(&mut cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Why a connection ended, for the log.
#[derive(Debug)]
enum End {
    Eof,
    Quit,
    Shutdown,
    Protocol(String),
    Io(std::io::Error),
    WriteStalled,
    ReadStalled,
    NoBudget,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Eof => write!(f, "closed by the client"),
            End::Quit => write!(f, "QUIT"),
            End::Shutdown => write!(f, "relay shutting down"),
            End::Protocol(e) => write!(f, "protocol error: {e}"),
            End::Io(e) => write!(f, "{e}"),
            End::WriteStalled => write!(f, "the client stopped reading its replies"),
            End::ReadStalled => write!(f, "a request was left half-sent"),
            End::NoBudget => write!(f, "the relay's input buffers are full"),
        }
    }
}

/// Tells a client over the limit why it is refused, then closes.
pub(crate) async fn refuse(mut sock: TcpStream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sock.write_all(b"-ERR max number of clients reached\r\n"),
    )
    .await;
}

struct Conn<S> {
    shared: Arc<Shared>,
    sock: S,
    client: Client,
    buf: BytesMut,
    out: Out,
    /// Length of the request being received, when its headers tell.
    need: Option<usize>,
    /// Budget bytes this connection holds.
    held: usize,
}

/// Serves one client until it leaves, misbehaves, or the relay stops.
pub(crate) async fn run<S: Transport>(shared: Arc<Shared>, sock: S, addr: SocketAddr, id: u64) {
    tracing::debug!(id, %addr, "client connected");
    let authenticated = shared.password.is_none();
    let mut conn = Conn {
        shared: shared.clone(),
        sock,
        client: Client {
            id,
            db: 0,
            authenticated,
            name: None,
            notify: Arc::new(Notify::new()),
            woke: false,
        },
        buf: BytesMut::new(),
        out: Out::new(),
        need: None,
        held: 0,
    };
    let end = conn.serve().await;
    if !matches!(end, End::Io(_) | End::WriteStalled) {
        // Over TLS this says goodbye properly (close_notify); over TCP it sends the FIN that
        // closing would.
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.sock.shutdown()).await;
    }
    shared.budget.give(conn.held);
    shared.lock().clients.remove(&id);
    match &end {
        End::Protocol(_) | End::WriteStalled | End::ReadStalled | End::NoBudget => {
            tracing::info!(id, %addr, "client disconnected: {end}");
        }
        _ => tracing::debug!(id, %addr, "client disconnected: {end}"),
    }
}

impl<S: Transport> Conn<S> {
    async fn serve(&mut self) -> End {
        loop {
            match self.run_requests().await {
                Ok(()) => {}
                Err(end) => {
                    // Whatever was answered before the end (a protocol error's message, QUIT's
                    // OK) still goes out.
                    if !matches!(end, End::Io(_) | End::WriteStalled) {
                        let _ = self.flush().await;
                    }
                    return end;
                }
            }
            if std::mem::take(&mut self.client.woke) {
                // The readers this client's appends woke answer first: a blocked reader is
                // someone waiting for data, the appender only for its acknowledgement.
                tokio::task::yield_now().await;
            }
            if let Err(end) = self.flush().await {
                return end;
            }
            match self.read_more().await {
                Ok(0) => return End::Eof,
                Ok(_) => {}
                Err(end) => return end,
            }
        }
    }

    /// Runs every whole request in the buffer, until the pending replies reach their limit.
    async fn run_requests(&mut self) -> Result<(), End> {
        loop {
            if self.out.len() >= OUT_SOFT_LIMIT {
                self.flush().await?;
            }
            let found = match wire::scan(&self.buf, self.client.authenticated) {
                Ok(found) => found,
                Err(e) => return Err(self.protocol_error(e)),
            };
            let args = match found {
                Scan::Incomplete { need } => {
                    self.need = need;
                    return Ok(());
                }
                Scan::Skip(n) => {
                    let _ = self.buf.split_to(n);
                    continue;
                }
                Scan::Multibulk(n) => wire::decode_multibulk(&mut self.buf, n),
                Scan::Inline(n) => wire::decode_inline(&mut self.buf, n),
            };
            self.need = None;
            let args = match args {
                Ok(args) if args.is_empty() => continue,
                Ok(args) => args,
                Err(e) => return Err(self.protocol_error(e)),
            };
            let flow = {
                let password = self.shared.password;
                let cfg = Config {
                    password: password.as_ref(),
                };
                let mut st = self.shared.lock();
                cmd::execute(
                    &mut st,
                    &mut self.client,
                    &mut self.out,
                    &cfg,
                    &args,
                    unix_ms(),
                )
            };
            drop(args);
            match flow {
                Flow::Continue => {}
                Flow::Close => return Err(End::Quit),
                Flow::Block(spec) => self.wait_block(spec).await?,
            }
        }
    }

    fn protocol_error(&mut self, e: wire::ProtocolError) -> End {
        let msg = e.to_string();
        self.out.error(&msg);
        End::Protocol(msg)
    }

    /// Waits until a blocked XREAD can answer, times out, or the client goes away.
    async fn wait_block(&mut self, spec: BlockSpec) -> Result<(), End> {
        self.flush().await?;
        let shared = self.shared.clone();
        // Everything before the read is out: from now on an append may answer it itself.
        let armed = self.sock.direct().map(|sock| {
            Arc::new(cmd::Armed {
                sock,
                spec: spec.clone(),
                proto: self.out.proto,
            })
        });
        if let Some(armed) = &armed {
            shared.lock().arm(self.client.id, &spec, armed);
        }
        let notify = self.client.notify.clone();
        let deadline = spec.deadline.map(tokio::time::Instant::from_std);
        let result = loop {
            // Input that arrives meanwhile is kept for later, up to the free allowance; a
            // client that closes its end is noticed at once.
            let can_read = self.buf.len() < FREE_INPUT;
            let timed_out = tokio::select! {
                _ = notify.notified() => false,
                _ = sleep_until(deadline) => true,
                _ = shared.shutdown.cancelled() => break Err(End::Shutdown),
                ready = self.sock.readable(), if can_read => {
                    if let Err(e) = ready {
                        break Err(End::Io(e));
                    }
                    self.buf.reserve(READ_CHUNK);
                    match self.sock.try_read_buf(&mut self.buf) {
                        Ok(0) => break Err(End::Eof),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => break Err(End::Io(e)),
                    }
                    continue;
                }
            };
            let mut st = shared.lock();
            if cmd::retry_block(
                &mut st,
                &mut self.client,
                &mut self.out,
                &spec,
                armed.as_ref(),
                unix_ms(),
                timed_out,
            ) {
                break Ok(());
            }
        };
        if result.is_err() {
            let mut st = shared.lock();
            st.unblock(self.client.id, &spec);
            st.answered.remove(&self.client.id);
        }
        result
    }

    /// Writes every pending reply, segments gathered into vectored writes.
    async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        while !self.out.is_empty() {
            let written = {
                let slices = self.out.slices();
                tokio::time::timeout(WRITE_STALL, self.sock.write_vectored(&slices)).await
            };
            match written {
                Ok(Ok(0)) => return Err(End::Eof),
                Ok(Ok(n)) => self.out.advance(n),
                Ok(Err(e)) => return Err(End::Io(e)),
                Err(_) => return Err(End::WriteStalled),
            }
        }
        // TLS may hold encrypted records that the socket did not take yet: they must leave
        // before the client is waited on. For TCP this does nothing.
        match tokio::time::timeout(WRITE_STALL, self.sock.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Io(e)),
            Err(_) => Err(End::WriteStalled),
        }
    }

    /// Reads more input; `Ok(0)` at the end of the stream.
    async fn read_more(&mut self) -> Result<usize, End> {
        let shared = self.shared.clone();
        if self.buf.is_empty() {
            // Idle: hold no buffer while waiting.
            self.buf = BytesMut::new();
            self.settle_budget(0);
            tokio::select! {
                ready = self.sock.readable() => ready.map_err(End::Io)?,
                _ = shared.shutdown.cancelled() => return Err(End::Shutdown),
            }
        }
        let chunk = match self.need {
            // A large request is read to its end and no further, into its own buffer.
            Some(need) if need >= OWN_BUFFER_AT && need > self.buf.len() => {
                (need - self.buf.len()).min(MAX_READ)
            }
            _ => READ_CHUNK,
        };
        let own_buffer = self
            .need
            .filter(|&need| need >= OWN_BUFFER_AT && self.buf.capacity() < need);
        // A buffer of its own is allocated whole: the budget covers all of it.
        let want = own_buffer.unwrap_or(self.buf.len() + chunk);
        self.take_budget(want).await?;
        if let Some(need) = own_buffer {
            // One buffer of exactly the request's size: the payload stored from it then
            // carries no slack, and the bytes already read are copied once, not the whole.
            let mut own = BytesMut::with_capacity(need);
            own.extend_from_slice(&self.buf);
            self.buf = own;
        }
        if self.buf.capacity() - self.buf.len() < chunk {
            self.buf.reserve(chunk);
        }
        let stall = if self.buf.is_empty() {
            None
        } else {
            Some(tokio::time::Instant::now() + READ_STALL)
        };
        let mut limited = (&mut self.buf).limit(chunk);
        tokio::select! {
            read = self.sock.read_buf(&mut limited) => read.map_err(End::Io),
            _ = sleep_until(stall) => Err(End::ReadStalled),
            _ = shared.shutdown.cancelled() => Err(End::Shutdown),
        }
    }

    /// Makes the budget held match `want` bytes of input, waiting a while for it if needed.
    async fn take_budget(&mut self, want: usize) -> Result<(), End> {
        let target = want.saturating_sub(FREE_INPUT);
        if target <= self.held {
            self.settle_budget(want);
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + BUDGET_WAIT;
        loop {
            let budget = &self.shared.budget;
            let freed = budget.freed.notified();
            if budget.try_take(target - self.held) {
                self.held = target;
                return Ok(());
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep_until(deadline) => return Err(End::NoBudget),
                _ = self.shared.shutdown.cancelled() => return Err(End::Shutdown),
            }
        }
    }

    /// Gives back budget beyond what `want` bytes of input need.
    fn settle_budget(&mut self, want: usize) {
        let target = want.saturating_sub(FREE_INPUT);
        if self.held > target {
            self.shared.budget.give(self.held - target);
            self.held = target;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
