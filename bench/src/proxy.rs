//! A TCP forwarder that makes a loopback link look long: every chunk it reads is written out
//! `delay` later, in each direction, without limiting bandwidth.
//!
//! Each direction has a reader task that keeps reading (stamping every chunk with its due
//! time) while earlier chunks wait in a queue, and a writer task that sleeps until each chunk
//! is due. So the link has a fixed latency and the bandwidth of loopback, like a long fat
//! pipe. The queue is bounded by bytes (far above delay x loopback bandwidth), so a stalled
//! consumer still pushes back instead of growing memory without end.

use anyhow::{Context, Result, bail};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

/// Bytes in flight per direction at most: 256 MiB over 25 ms is 10 GB/s, beyond loopback.
const MAX_IN_FLIGHT: usize = 256 << 20;
/// Largest chunk read at once.
const READ_CHUNK: usize = 256 << 10;

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Delay added in each direction, in milliseconds.
    #[arg(long)]
    pub delay_ms: u64,
    /// LISTEN=UPSTREAM address pairs, e.g. 127.0.0.1:7001=127.0.0.1:7000.
    #[arg(long = "map", required = true)]
    pub maps: Vec<String>,
}

/// The `delay-proxy` subcommand: serves until killed.
pub fn run(args: &ProxyArgs) -> Result<()> {
    let delay = Duration::from_millis(args.delay_ms);
    let mut pairs = Vec::new();
    for m in &args.maps {
        let Some((listen, upstream)) = m.split_once('=') else {
            bail!("{m:?} is not LISTEN=UPSTREAM");
        };
        pairs.push((listen.to_string(), upstream.to_string()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut servers = Vec::new();
        for (listen, upstream) in pairs {
            let listener = TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            servers.push(tokio::spawn(serve(listener, upstream, delay)));
        }
        for s in servers {
            s.await??;
        }
        Ok(())
    })
}

async fn serve(listener: TcpListener, upstream: String, delay: Duration) -> Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(client, &upstream, delay).await {
                eprintln!("delay-proxy: {e:#}");
            }
        });
    }
}

async fn forward(client: TcpStream, upstream: &str, delay: Duration) -> Result<()> {
    let server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("cannot connect to {upstream}"))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(direction(cr, sw, delay));
    let down = tokio::spawn(direction(sr, cw, delay));
    // A direction ends at its end of file (passed on after the delay) or on an error; the
    // connection ends when both have.
    let _ = up.await;
    let _ = down.await;
    Ok(())
}

/// One direction of a connection: read continuously, write each chunk when it is due.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let reading = {
        let budget = budget.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                // An error ends the direction like an end of file.
                let n = from.read(&mut buf).await.unwrap_or_default();
                let due = Instant::now() + delay;
                if n == 0 {
                    let _ = tx.send((due, None));
                    return;
                }
                match budget.acquire_many(n as u32).await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
                if tx.send((due, Some(buf[..n].to_vec()))).is_err() {
                    return;
                }
            }
        })
    };
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        match chunk {
            Some(data) => {
                if to.write_all(&data).await.is_err() {
                    break;
                }
                budget.add_permits(data.len());
            }
            None => {
                let _ = to.shutdown().await;
                break;
            }
        }
    }
    reading.abort();
}
