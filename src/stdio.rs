//! stdin and stdout for the binary.
//!
//! Reads and writes go straight to file descriptors 0 and 1 (duplicated), with no buffer in
//! between: data moves as soon as it can, and large blocks cost one system call. Pipes are
//! read and written on the caller's thread when that cannot block, so that a small message
//! wakes no other thread; otherwise threads of their own do the blocking reads and writes.

use bytes::{Bytes, BytesMut};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::Interest;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// stdin for the writer. Data is gathered into a piece of at most a record's payload until
/// the writer takes it: at once when the writer is idle, so that a small message goes out
/// alone; while the writer is busy, the piece keeps growing, so that under load a record is
/// one full read buffer, never copied and never sharing its memory with another record.
///
/// A pipe is read on the caller's thread when the runtime reports it readable, so a small
/// message reaches the sender without waking another thread; anything else (a file, a
/// terminal) is read by a thread of its own, since a blocking read cannot be cancelled (the
/// process exits without waiting for that thread).
pub enum Stdin {
    /// A pipe, read when readable.
    Pipe(PipeStdin),
    /// Reads handed over by the stdin thread: each is a piece of its own.
    Thread {
        rx: mpsc::Receiver<io::Result<Bytes>>,
        piece: Option<Bytes>,
    },
}

impl Stdin {
    /// Opens stdin (a duplicate of file descriptor 0) for pieces of at most `chunk` bytes.
    ///
    /// # Errors
    /// stdin is a directory (found before the session starts, so that the channel's latest
    /// session is not replaced), or cannot be duplicated.
    pub fn open(chunk: usize) -> io::Result<Self> {
        let input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
        if input.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "stdin is a directory",
            ));
        }
        if grow_pipe(&input).is_some() {
            // Left in blocking mode (other processes may share the pipe): see `PipeStdin`.
            return Ok(Self::Pipe(PipeStdin {
                rx: pipe::Receiver::from_file_unchecked(input)?,
                piece: BytesMut::new(),
                chunk,
            }));
        }
        let rx = read_on_thread(input, chunk)?;
        Ok(Self::Thread { rx, piece: None })
    }

    /// Reads more into the piece, waiting until there is something to read; `false` at the
    /// end of input. Call it only while [`Stdin::is_full`] is false. Cancel-safe.
    pub async fn fill(&mut self) -> io::Result<bool> {
        match self {
            Self::Pipe(p) => p.fill().await,
            Self::Thread { rx, piece } => match rx.recv().await {
                Some(Ok(read)) => {
                    *piece = Some(read);
                    Ok(true)
                }
                Some(Err(e)) => Err(e),
                None => Ok(false),
            },
        }
    }

    /// Whether the piece can take no more: it holds a record's payload, or reaches the end
    /// of its buffer.
    pub fn is_full(&self) -> bool {
        match self {
            Self::Pipe(p) => p.is_full(),
            Self::Thread { piece, .. } => piece.is_some(),
        }
    }

    /// Whether there is data to take.
    pub fn is_empty(&self) -> bool {
        match self {
            Self::Pipe(p) => p.piece.is_empty(),
            Self::Thread { piece, .. } => piece.is_none(),
        }
    }

    /// Takes the piece gathered so far; `None` when there is none. Without waiting, a piece
    /// the stdin thread has already read is taken when nothing was gathered.
    pub fn take(&mut self) -> Option<Bytes> {
        match self {
            Self::Pipe(p) => p.take(),
            Self::Thread { rx, piece } => piece
                .take()
                .or_else(|| rx.try_recv().ok().and_then(Result::ok)),
        }
    }
}

/// A pipe on stdin, read when the runtime reports it readable. The descriptor stays in
/// blocking mode, since the pipe may be shared with other processes that do not expect
/// otherwise: a read takes only what the pipe holds, or happens once the pipe has no writer
/// left, so that it returns at once.
pub struct PipeStdin {
    rx: pipe::Receiver,
    /// The piece being gathered, in a buffer of one record that pieces are cut from one
    /// after the other: small messages share it, and under load a record is one whole
    /// buffer. (Buffers of several records cost the writer more memory on a long link,
    /// measured.) An empty piece starts a new buffer when the read at hand does not fit.
    piece: BytesMut,
    chunk: usize,
}

impl PipeStdin {
    fn take(&mut self) -> Option<Bytes> {
        (!self.piece.is_empty()).then(|| self.piece.split().freeze())
    }

    fn is_full(&self) -> bool {
        let piece = &self.piece;
        piece.len() >= self.chunk || (!piece.is_empty() && piece.capacity() == piece.len())
    }

    async fn fill(&mut self) -> io::Result<bool> {
        loop {
            let closed = self.rx.ready(Interest::READABLE).await?.is_read_closed();
            let (rx, piece, chunk) = (&self.rx, &mut self.piece, self.chunk);
            // Inside `try_io`, so that "would block" forgets only readiness seen before the
            // pipe was found empty.
            let read = rx.try_io(|| {
                let unread = usize::try_from(rustix::io::ioctl_fionread(rx)?).unwrap_or(chunk);
                if unread == 0 && !closed {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let want = unread.clamp(1, chunk - piece.len());
                if piece.is_empty() && piece.capacity() < want {
                    *piece = BytesMut::with_capacity(chunk);
                }
                // Within the piece's buffer, so that taking the piece never copies.
                let room = want.min(piece.capacity() - piece.len());
                debug_assert!(room > 0, "filled only while not full");
                read_onto(piece, room, |b| Ok(rustix::io::read(rx, b)?))
            });
            match read {
                Ok(n) => return Ok(n > 0),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Appends at most `want` bytes read with `read` to `buf`; the count read, 0 at the end of
/// input. The bytes are zeroed before the read, since a read may fill fewer.
fn read_onto(
    buf: &mut BytesMut,
    want: usize,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    let len = buf.len();
    buf.resize(len + want, 0);
    let n = read(&mut buf[len..]);
    buf.truncate(len + *n.as_ref().unwrap_or(&0));
    n
}

/// Reads at most `want` bytes with `read` into `buf` and splits them off; `None` at the end
/// of input. What a read does not fill is still zeroed and stays in `buf`: only the bytes
/// handed on are zeroed again.
fn read_piece(
    buf: &mut BytesMut,
    want: usize,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<Option<Bytes>> {
    if buf.capacity() < want {
        *buf = BytesMut::with_capacity(want.max(64 * 1024) * 4);
    }
    if buf.len() < want {
        buf.resize(want, 0);
    }
    match read(&mut buf[..want])? {
        0 => Ok(None),
        n => Ok(Some(buf.split_to(n).freeze())),
    }
}

/// Starts reading `input` on a thread. The receiver yields each read as soon as it returns,
/// then closes at end of input.
fn read_on_thread(mut input: File, chunk: usize) -> io::Result<mpsc::Receiver<io::Result<Bytes>>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = BytesMut::new();
            loop {
                let piece = match read_piece(&mut buf, chunk, |b| input.read(b)) {
                    Ok(Some(piece)) => piece,
                    Ok(None) => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                };
                if tx.blocking_send(Ok(piece)).is_err() {
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// stdout for the reader. A piece goes out at once on the caller's thread when stdout is a
/// pipe with room for it, so that the write cannot block: a small message then reaches the
/// consumer without waking another thread. Otherwise (a full pipe, a file, a terminal) it is
/// handed to a thread of its own, which batches what is queued into vectored writes, so a
/// stalled consumer never blocks the caller. Bytes leave in the order they were sent.
pub struct Stdout {
    file: Arc<File>,
    /// Capacity of stdout's pipe; `None` when stdout is not a pipe.
    pipe: Option<usize>,
    /// Pieces handed to the thread and not yet written: while there are any, pieces must
    /// queue behind them.
    queued: Arc<AtomicUsize>,
    tx: mpsc::Sender<Bytes>,
    thread: tokio::task::JoinHandle<io::Result<()>>,
    /// The error of a write on the caller's thread.
    failed: Option<io::Error>,
}

impl Stdout {
    /// Opens stdout (a duplicate of file descriptor 1).
    pub fn open() -> io::Result<Self> {
        let file = Arc::new(File::from(io::stdout().as_fd().try_clone_to_owned()?));
        let pipe = grow_pipe(&file);
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = mpsc::channel::<Bytes>(8);
        let (output, done) = (file.clone(), queued.clone());
        let thread = tokio::task::spawn_blocking(move || {
            let mut batch: Vec<Bytes> = Vec::with_capacity(MAX_BATCH);
            while let Some(piece) = rx.blocking_recv() {
                // Whatever else is already queued goes out in the same system call.
                batch.push(piece);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                write_all_vectored(&mut &*output, &batch)?;
                done.fetch_sub(batch.len(), Ordering::AcqRel);
                batch.clear();
            }
            Ok(())
        });
        Ok(Self {
            file,
            pipe,
            queued,
            tx,
            thread,
            failed: None,
        })
    }

    /// Writes `piece`, or queues it for the writing thread. Returns `false` once writing has
    /// failed; [`Stdout::finish`] then says why.
    pub async fn send(&mut self, piece: Bytes) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.queued.load(Ordering::Acquire) == 0 && self.has_room(piece.len()) {
            return match write_all_vectored(&mut &*self.file, &[piece]) {
                Ok(()) => true,
                Err(e) => {
                    self.failed = Some(e);
                    false
                }
            };
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.tx.send(piece).await.is_ok()
    }

    /// Whether stdout is a pipe that takes `len` more bytes without blocking. A pipe holds
    /// its bytes in pages, which writes may fill only partly (at worst about half): count
    /// what is unread twice, and a few pages of slack.
    fn has_room(&self, len: usize) -> bool {
        let Some(size) = self.pipe else {
            return false;
        };
        rustix::io::ioctl_fionread(&*self.file).is_ok_and(|unread| {
            let unread = usize::try_from(unread).unwrap_or(usize::MAX);
            unread
                .saturating_mul(2)
                .saturating_add(len)
                .saturating_add(3 * PAGE)
                <= size
        })
    }

    /// Waits until everything sent is written; the first error of writing, if any.
    pub async fn finish(self) -> io::Result<()> {
        drop(self.tx);
        let threaded = self.thread.await.map_err(io::Error::other)?;
        match self.failed {
            Some(e) => Err(e),
            None => threaded,
        }
    }
}

/// A pipe's unit of storage.
const PAGE: usize = 4096;

/// Size asked for a pipe on stdin or stdout.
const PIPE_SIZE: usize = 1 << 20;

/// Enlarges `file`'s pipe, if it is one, so that reads and writes move more per system call
/// and wake the other side less often. Best effort: the pipe stays as it is when the system
/// refuses (`fs.pipe-max-size`, the per-user pipe budget).
/// Returns the pipe's size, or `None` when `file` is not a pipe.
fn grow_pipe(file: &File) -> Option<usize> {
    use std::os::unix::fs::FileTypeExt;
    if !file.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        return None;
    }
    let size = rustix::pipe::fcntl_getpipe_size(file).ok()?;
    if size >= PIPE_SIZE {
        return Some(size);
    }
    Some(rustix::pipe::fcntl_setpipe_size(file, PIPE_SIZE).unwrap_or(size))
}

/// Pieces written with one vectored write at most.
const MAX_BATCH: usize = 16;

/// Writes every byte of `pieces`, in order, with as few system calls as the kernel allows.
fn write_all_vectored(out: &mut impl Write, pieces: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match out.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `step` bytes per call, like a full pipe.
    struct Trickle {
        got: Vec<u8>,
        step: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            let mut left = self.step;
            for b in bufs {
                let n = b.len().min(left);
                self.got.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Ok(self.step - left)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn pipe_stdin(chunk: usize) -> (PipeStdin, File) {
        let (rx, tx) = rustix::pipe::pipe().unwrap();
        let stdin = PipeStdin {
            rx: pipe::Receiver::from_file_unchecked(File::from(rx)).unwrap(),
            piece: BytesMut::new(),
            chunk,
        };
        (stdin, File::from(tx))
    }

    /// Writes `data` into the pipe and reads it into the piece (stdin has not ended).
    async fn feed(input: &mut PipeStdin, tx: &mut File, data: &[u8]) {
        tx.write_all(data).unwrap();
        assert!(input.fill().await.unwrap());
    }

    #[tokio::test]
    async fn reads_gather_into_one_piece_until_taken_and_pieces_share_a_buffer() {
        let (mut input, mut tx) = pipe_stdin(100);
        let mut taken = Vec::new();
        feed(&mut input, &mut tx, b"hello ").await;
        feed(&mut input, &mut tx, b"world").await;
        assert_eq!(
            &input.piece[..],
            b"hello world",
            "both reads make one piece"
        );
        taken.push(input.take().unwrap());
        // 89 bytes are left in the buffer: a read of 100 starts a new one.
        feed(&mut input, &mut tx, &[7; 150]).await;
        assert_eq!(
            input.piece.len(),
            100,
            "a piece stops at a record's payload"
        );
        assert!(input.is_full(), "a record's payload fills a piece");
        taken.push(input.take().unwrap());
        assert!(input.fill().await.unwrap());
        assert_eq!(input.piece.len(), 50);
        taken.push(input.take().unwrap());
        // Small pieces follow one another in the same buffer.
        for message in [&b"a"[..], b"bc", b"def"] {
            feed(&mut input, &mut tx, message).await;
            let piece = input.take().unwrap();
            let last = taken.last().unwrap();
            assert_eq!(piece.as_ptr(), last.as_ptr().wrapping_add(last.len()));
            taken.push(piece);
        }
        // 44 bytes left: a piece that reaches the end of the buffer is full.
        feed(&mut input, &mut tx, &[8; 30]).await;
        feed(&mut input, &mut tx, &[8; 30]).await;
        assert_eq!(input.piece.len(), 44);
        let last = taken.last().unwrap();
        assert_eq!(input.piece.as_ptr(), last.as_ptr().wrapping_add(last.len()));
        assert!(input.is_full());
        taken.push(input.take().unwrap());
        // An empty piece whose buffer has less room than the read starts a new buffer.
        feed(&mut input, &mut tx, &[9; 20]).await;
        assert_eq!(
            input.piece.len(),
            36,
            "the 16 left over and what came since"
        );
        assert!(input.piece.capacity() >= 100);
        taken.push(input.take().unwrap());
        let want = [
            &b"hello world"[..],
            &[7; 150],
            b"abcdef",
            &[8; 60],
            &[9; 20],
        ]
        .concat();
        assert_eq!(taken.concat(), want, "every byte once, in order");
    }

    #[tokio::test]
    async fn the_end_of_input_is_found_after_the_last_read() {
        let (mut input, mut tx) = pipe_stdin(100);
        tx.write_all(b"last").unwrap();
        drop(tx);
        assert!(input.fill().await.unwrap());
        assert!(!input.fill().await.unwrap());
        assert_eq!(&input.piece[..], b"last");
    }

    #[test]
    fn vectored_writes_keep_every_byte_in_order_across_short_writes() {
        let pieces: Vec<Bytes> = (0..10u8)
            .map(|i| Bytes::from(vec![i; 100 + usize::from(i)]))
            .collect();
        let want: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        for step in [1, 7, 99, 100, 101, 4096] {
            let mut out = Trickle {
                got: Vec::new(),
                step,
            };
            write_all_vectored(&mut out, &pieces).unwrap();
            assert_eq!(out.got, want, "step {step}");
        }
    }
}
