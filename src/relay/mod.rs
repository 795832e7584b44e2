//! `tube relay`: a built-in relay that speaks the Redis protocol for the commands tube uses.
//!
//! # Layout
//! - [`serve`] accepts connections until its shutdown future completes; one task per client.
//! - `conn`: a client's loop: read, find whole requests, run them, write replies.
//! - `wire`: request framing (with `redis-protocol`) and the reply queue.
//! - `cmd`: the command table and each command's semantics, as Redis 7 has them.
//! - `db`, `stream`: the data set (strings, hashes, streams), expiry and memory accounting.
//! - `glob`: Redis's glob patterns.
//! - `tls`: the TLS listener's configuration ([`RelayTls`]) and its handshake.
//!
//! All data lives in one `State` behind a mutex: commands are short, and a single lock keeps
//! the semantics simple (every command is atomic, as in Redis). Payloads are never copied:
//! they stay in the buffer they were read into, shared as `Bytes` by the stream and by the
//! replies that send them on.
//!
//! Memory is bounded three ways: the data set by `max_memory` (writes past it get Redis's OOM
//! error), the input buffers of all clients together by a budget, and each client's pending
//! replies by a soft limit after which it is not read until its replies are written.

mod cmd;
mod conn;
mod db;
mod glob;
mod stream;
mod tls;
mod wire;

pub use tls::{HANDSHAKE_TIMEOUT, RelayTls};

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Most clients connected at once, as Redis's default `maxclients`.
pub const MAX_CLIENTS: usize = 10_000;

/// How the relay runs.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// Password clients must give with AUTH or HELLO; `None` allows everyone.
    pub password: Option<String>,
    /// Bytes of data the relay may hold; writes beyond it fail with an OOM error.
    pub max_memory: usize,
    /// Speak TLS only, with this configuration (from [`RelayTls::server_config`]); `None`
    /// serves plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A default memory bound: a quarter of the machine's memory, at most 1 GiB.
///
/// Reads `MemTotal` from `/proc/meminfo`; where that is missing, 256 MiB.
pub fn default_max_memory() -> usize {
    const CAP: usize = 1 << 30;
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map(|kb| kb.saturating_mul(1024));
    match total {
        Some(bytes) if bytes > 0 => (bytes / 4).min(CAP),
        _ => 256 << 20,
    }
}

/// The input-buffer budget for a data bound: a quarter of it, between 32 and 256 MiB.
///
/// Half-sent requests are held in input buffers until they are complete; without a shared
/// bound, many clients each sending half of a large value could take any amount of memory.
pub fn input_budget(max_memory: usize) -> usize {
    (max_memory / 4).clamp(32 << 20, 256 << 20)
}

/// Bytes that all connections together may hold in input buffers beyond a small allowance
/// each.
#[derive(Debug)]
pub(crate) struct Budget {
    total: usize,
    used: AtomicUsize,
    /// Signalled when bytes are given back, for connections waiting for some.
    freed: Notify,
}

impl Budget {
    pub fn new(total: usize) -> Self {
        Self {
            total,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Takes `n` bytes if they are free.
    pub fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= self.total)
            })
            .is_ok()
    }

    pub fn give(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    state: Mutex<cmd::State>,
    /// The password's BLAKE3 hash: compared in constant time, never logged.
    password: Option<blake3::Hash>,
    budget: Arc<Budget>,
    /// Cancelled when the relay stops; every connection watches it.
    shutdown: CancellationToken,
}

impl Shared {
    /// Locks the state. A panic while it was held cannot leave it half-changed in a way that
    /// matters more than stopping would, so a poisoned lock is used as it is.
    pub fn lock(&self) -> MutexGuard<'_, cmd::State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Milliseconds since the Unix epoch: the clock of expiry and of stream IDs.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves clients on `listener` until `shutdown` completes.
///
/// On shutdown the relay stops accepting, lets each connection finish the reply it is
/// writing, and returns once every connection has closed (or after a few seconds).
///
/// With `opts.tls`, every client must complete a TLS handshake within [`HANDSHAKE_TIMEOUT`];
/// one that fails it, or speaks plaintext, is dropped (logged at debug level).
///
/// # Errors
/// Accept errors that are not per-connection.
pub async fn serve(
    listener: TcpListener,
    opts: RelayOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let budget = Arc::new(Budget::new(input_budget(opts.max_memory)));
    let shared = Arc::new(Shared {
        state: Mutex::new(cmd::State::new(opts.max_memory, port, budget.clone())),
        password: opts.password.as_deref().map(|p| blake3::hash(p.as_bytes())),
        budget,
        shutdown: CancellationToken::new(),
    });
    tracing::debug!(
        max_memory = opts.max_memory,
        input_budget = input_budget(opts.max_memory),
        auth = shared.password.is_some(),
        tls = opts.tls.is_some(),
        "relay ready"
    );
    let tls = opts.tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(sweep_expired(shared.clone()));
    // Each connection holds a clone; when all are dropped, every connection has finished.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (sock, addr) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait for some to close.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let id = {
            let mut st = shared.lock();
            st.total_connections += 1;
            if st.clients.len() >= MAX_CLIENTS {
                st.rejected_connections += 1;
                None
            } else {
                let id = st.next_client_id;
                st.next_client_id += 1;
                st.clients.insert(
                    id,
                    cmd::ClientInfo {
                        addr: addr.to_string(),
                        created: Some(std::time::Instant::now()),
                        proto: 2,
                        ..Default::default()
                    },
                );
                Some(id)
            }
        };
        let Some(id) = id else {
            tracing::warn!(%addr, "refusing a client: {MAX_CLIENTS} are connected");
            // A TLS client could not read a plaintext reason: it is just closed.
            if tls.is_none() {
                tokio::spawn(conn::refuse(sock));
            }
            continue;
        };
        let (shared, done, tls) = (shared.clone(), done_tx.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => conn::run(shared, conn::Tcp(Arc::new(sock)), addr, id).await,
                // The handshake runs here, not in the accept loop, so that a slow client
                // delays nobody else.
                Some(acceptor) => match tls::accept(&acceptor, sock, &shared.shutdown).await {
                    Ok(stream) => conn::run(shared, stream, addr, id).await,
                    Err(why) => {
                        shared.lock().clients.remove(&id);
                        tracing::debug!(id, %addr, "client dropped: {why}");
                    }
                },
            }
            drop(done);
        });
    }
    tracing::info!("relay stopping");
    shared.shutdown.cancel();
    drop(done_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await;
    Ok(())
}

/// Removes expired keys that nobody reads (the active half of expiry).
async fn sweep_expired(shared: Arc<Shared>) {
    const BATCH: usize = 1000;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Bounded batches under the lock, so a mass expiry never stalls the clients.
        for _ in 0..20 {
            if shared.lock().ks.sweep(unix_ms(), BATCH) < BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Finds every request in `input` as a connection would, for the fuzz target and benches:
/// the arguments of each request, or the protocol error that would close the connection.
#[doc(hidden)]
pub fn parse_requests(input: &[u8]) -> Result<Vec<Vec<bytes::Bytes>>, String> {
    let mut buf = bytes::BytesMut::from(input);
    let mut out = Vec::new();
    loop {
        let found = wire::scan(&buf, true).map_err(|e| e.to_string())?;
        let args = match found {
            wire::Scan::Multibulk(n) => wire::decode_multibulk(&mut buf, n),
            wire::Scan::Inline(n) => wire::decode_inline(&mut buf, n),
            wire::Scan::Skip(n) => {
                let _ = buf.split_to(n);
                continue;
            }
            wire::Scan::Incomplete { .. } => return Ok(out),
        }
        .map_err(|e| e.to_string())?;
        out.push(args);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_memory_is_a_quarter_capped_at_a_gib() {
        let m = default_max_memory();
        assert!(m > 0 && m <= 1 << 30);
    }

    #[test]
    fn budget_never_overcommits() {
        let b = Budget::new(100);
        assert!(b.try_take(60));
        assert!(!b.try_take(41));
        assert!(b.try_take(40));
        b.give(100);
        assert_eq!(b.used(), 0);
    }
}
