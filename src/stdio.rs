//! stdin and stdout for the binary, on threads of their own.
//!
//! Reads and writes go straight to file descriptors 0 and 1 (duplicated), with no buffer in
//! between: data moves as soon as it can, and large blocks cost one system call. stdin lives
//! on a plain thread because a blocking read cannot be cancelled; the process exits without
//! waiting for it.

use bytes::{Bytes, BytesMut};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use tokio::sync::mpsc;

/// Starts reading stdin in pieces of at most `chunk` bytes. The receiver yields each read as
/// soon as it returns, then closes at end of input.
pub fn read_stdin(chunk: usize) -> io::Result<mpsc::Receiver<io::Result<Bytes>>> {
    let mut input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    // Found before the session starts, so that the channel's latest session is not replaced.
    if input.metadata()?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "stdin is a directory",
        ));
    }
    grow_pipe(&input);
    let (tx, rx) = mpsc::channel(4);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = BytesMut::new();
            loop {
                if buf.capacity() < chunk {
                    buf = BytesMut::with_capacity(chunk.max(64 * 1024) * 4);
                }
                // What the last read did not fill is still zeroed and stays in `buf`: only the
                // bytes handed on are zeroed again.
                buf.resize(chunk, 0);
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                };
                let piece = buf.split_to(n).freeze();
                if tx.blocking_send(Ok(piece)).is_err() {
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// Starts a stdout writer. Send it pieces; drop the sender and await the handle to learn how
/// writing ended.
pub fn write_stdout() -> io::Result<(mpsc::Sender<Bytes>, tokio::task::JoinHandle<io::Result<()>>)>
{
    let mut output = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    grow_pipe(&output);
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let handle = tokio::task::spawn_blocking(move || {
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
            write_all_vectored(&mut output, &batch)?;
            batch.clear();
        }
        output.flush()
    });
    Ok((tx, handle))
}

/// Size asked for a pipe on stdin or stdout.
const PIPE_SIZE: usize = 1 << 20;

/// Enlarges `file`'s pipe, if it is one, so that reads and writes move more per system call
/// and wake the other side less often. Best effort: the pipe stays as it is when the system
/// refuses (`fs.pipe-max-size`, the per-user pipe budget).
fn grow_pipe(file: &File) {
    use std::os::unix::fs::FileTypeExt;
    let is_pipe = file.metadata().is_ok_and(|m| m.file_type().is_fifo());
    if is_pipe && rustix::pipe::fcntl_getpipe_size(file).is_ok_and(|n| n < PIPE_SIZE) {
        let _ = rustix::pipe::fcntl_setpipe_size(file, PIPE_SIZE);
    }
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
