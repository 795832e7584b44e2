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
    let (tx, rx) = mpsc::channel(4);
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = BytesMut::new();
            loop {
                if buf.capacity() < chunk {
                    buf = BytesMut::with_capacity(chunk.max(64 * 1024) * 4);
                }
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
                buf.clear();
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
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let handle = tokio::task::spawn_blocking(move || {
        while let Some(piece) = rx.blocking_recv() {
            output.write_all(&piece)?;
        }
        output.flush()
    });
    Ok((tx, handle))
}
