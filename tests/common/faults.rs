//! A fault-injecting TCP proxy for tests: put it between tube and a relay, then cut, stall,
//! slow down or refuse connections while traffic flows.
//!
//! Everything runs on plain threads inside the test process and only ever touches
//! 127.0.0.1. Dropping the proxy stops its listener, closes every connection and joins every
//! thread, so no port stays open after a test.
//!
//! Each connection is forwarded by four threads: per direction, a reader that takes chunks
//! off one socket and stamps them with the time they may leave, and a sender that writes
//! them to the other socket when due. Latency therefore delays every chunk without limiting
//! throughput (the reader keeps reading while earlier chunks wait), and a bandwidth cap paces
//! the sender alone.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest chunk read from a socket at once.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction at most (so at most 16 MiB in flight per direction).
const QUEUE: usize = 256;
/// How often the acceptor looks for new connections and for a change of its orders.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// How long connecting to the upstream relay may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// Which way data flows through a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (tube) to the relay.
    Up,
    /// From the relay to the client.
    Down,
}

/// The faults currently applied; shared by every thread of the proxy.
#[derive(Debug, Default)]
struct Faults {
    /// Nothing is read or written until then.
    stall_until: Option<Instant>,
    /// New connections are refused (the listener is closed) until then.
    refuse_until: Option<Instant>,
    /// Added to every chunk, each way.
    latency: Duration,
    /// Bytes per second per connection and direction; `None` is unlimited.
    bandwidth: Option<u64>,
    /// Set when the proxy is dropped.
    stopped: bool,
}

/// One forwarded connection: both sockets, so that it can be cut from outside.
struct Link {
    client: TcpStream,
    upstream: TcpStream,
    cut: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Link {
    fn close(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }

    fn finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }
}

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    /// Woken whenever `faults` changes, so that waiting threads re-check at once.
    changed: Condvar,
    links: Mutex<HashMap<u64, Link>>,
    accepted: AtomicU64,
    refused: AtomicU64,
    forwarded_up: AtomicU64,
    forwarded_down: AtomicU64,
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn links(&self) -> MutexGuard<'_, HashMap<u64, Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.faults());
        self.changed.notify_all();
    }

    /// Waits until `until` (or the proxy stops); returns the lock again.
    fn wait_until<'a>(
        &'a self,
        mut guard: MutexGuard<'a, Faults>,
        until: Instant,
    ) -> MutexGuard<'a, Faults> {
        while !guard.stopped {
            let now = Instant::now();
            if now >= until {
                break;
            }
            guard = self
                .changed
                .wait_timeout(guard, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        guard
    }

    /// Waits until `until` or the next change of the faults, whichever comes first.
    fn wait_for_change<'a>(
        &'a self,
        guard: MutexGuard<'a, Faults>,
        until: Instant,
    ) -> MutexGuard<'a, Faults> {
        let left = until.saturating_duration_since(Instant::now());
        self.changed
            .wait_timeout(guard, left)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Blocks while a stall is in force (re-checking whenever the faults change, so that
    /// `resume` takes effect at once). Returns false once the proxy stops or `cut` is set.
    fn pass_stall(&self, cut: &AtomicBool) -> bool {
        let mut guard = self.faults();
        loop {
            if guard.stopped || cut.load(Ordering::SeqCst) {
                return false;
            }
            match guard.stall_until {
                Some(until) if until > Instant::now() => {
                    guard = self.wait_for_change(guard, until);
                }
                _ => return true,
            }
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of a relay port, with faults a test can switch on and
/// off while traffic flows. Stops when dropped.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 that forwards to `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from((Ipv4Addr::LOCALHOST, upstream_port)),
            faults: Mutex::new(Faults::default()),
            changed: Condvar::new(),
            links: Mutex::new(HashMap::new()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            forwarded_up: AtomicU64::new(0),
            forwarded_down: AtomicU64::new(0),
        });
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn({
                let shared = shared.clone();
                move || accept_loop(listener, port, &shared)
            })
            .expect("spawn the proxy's acceptor");
        Self {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A relay URL that goes through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes both sides of every open connection now. Data still queued in the proxy is
    /// dropped. New connections are accepted as before.
    pub fn cut(&self) {
        for link in self.shared.links().values() {
            link.close();
        }
        self.shared.changed.notify_all();
    }

    /// Stops forwarding anything, either way, for `duration`; connections stay open. A
    /// stall that is already in force is extended, never shortened.
    pub fn stall(&self, duration: Duration) {
        let until = Instant::now() + duration;
        self.shared.update(|f| {
            f.stall_until = Some(f.stall_until.map_or(until, |u| u.max(until)));
        });
    }

    /// Ends any stall now.
    pub fn resume(&self) {
        self.shared.update(|f| f.stall_until = None);
    }

    /// Delays every chunk by `delay` each way (a round trip costs twice that). Chunks
    /// already queued keep the delay they were given.
    pub fn set_latency(&self, delay: Duration) {
        self.shared.update(|f| f.latency = delay);
    }

    /// Caps each connection to `bytes_per_second` in each direction; `None` lifts the cap.
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        assert_ne!(bytes_per_second, Some(0), "a bandwidth of 0 is a stall");
        self.shared.update(|f| f.bandwidth = bytes_per_second);
    }

    /// Refuses new connections (the listening socket is closed, so connecting fails with
    /// "connection refused") for `duration`. Open connections are not affected.
    ///
    /// The port is bound again afterwards; should another process have taken it meanwhile,
    /// the proxy stays closed and [`FaultProxy::listening`] says so.
    pub fn refuse_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        self.shared.update(|f| f.refuse_until = Some(until));
    }

    /// Whether a connection made now would be accepted (false while refusing).
    pub fn listening(&self) -> bool {
        TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            Duration::from_secs(1),
        )
        .is_ok()
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.shared
            .links()
            .values()
            .filter(|l| !l.cut.load(Ordering::SeqCst) && !l.finished())
            .count()
    }

    /// Connections accepted since the proxy started.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connection attempts refused (or dropped because the relay was unreachable).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Bytes delivered so far in one direction, over all connections.
    pub fn forwarded(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Up => self.shared.forwarded_up.load(Ordering::SeqCst),
            Direction::Down => self.shared.forwarded_down.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.update(|f| f.stopped = true);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // The acceptor has stopped: no link can be added any more.
        let links: Vec<Link> = self.shared.links().drain().map(|(_, l)| l).collect();
        for link in &links {
            link.close();
        }
        for link in links {
            for t in link.threads {
                let _ = t.join();
            }
        }
    }
}

fn accept_loop(listener: TcpListener, port: u16, shared: &Arc<Shared>) {
    let mut listener = Some(listener);
    let mut next_id = 0u64;
    loop {
        let guard = shared.faults();
        if guard.stopped {
            return;
        }
        let refusing = guard.refuse_until.is_some_and(|u| u > Instant::now());
        if refusing {
            // Closing the listener makes the kernel refuse connections outright.
            listener = None;
            let until = guard.refuse_until.expect("refusing");
            drop(shared.wait_for_change(guard, until));
            continue;
        }
        if listener.is_none() {
            // The refusal is over: listen on the same port again.
            match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                Ok(l) if l.set_nonblocking(true).is_ok() => listener = Some(l),
                _ => {
                    // Someone else holds the port now; retry until the proxy is dropped.
                    let retry = Instant::now() + Duration::from_millis(50);
                    drop(shared.wait_until(guard, retry));
                    continue;
                }
            }
        }
        drop(guard);
        prune(shared);
        match listener.as_ref().expect("listening").accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                next_id += 1;
                if let Some(link) = open_link(client, shared) {
                    shared.links().insert(next_id, link);
                } else {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                }
            }
            Err(_) => {
                // Nothing pending (or a passing error such as too many open files): wait a
                // little, or less if the orders change.
                let guard = shared.faults();
                if !guard.stopped {
                    drop(
                        shared
                            .changed
                            .wait_timeout(guard, ACCEPT_POLL)
                            .unwrap_or_else(|e| e.into_inner()),
                    );
                }
            }
        }
    }
}

/// Forgets connections whose threads have all ended.
fn prune(shared: &Shared) {
    let mut links = shared.links();
    let done: Vec<u64> = links
        .iter()
        .filter(|(_, l)| l.finished())
        .map(|(id, _)| *id)
        .collect();
    for id in done {
        if let Some(link) = links.remove(&id) {
            for t in link.threads {
                let _ = t.join();
            }
        }
    }
}

fn open_link(client: TcpStream, shared: &Arc<Shared>) -> Option<Link> {
    client.set_nonblocking(false).ok()?;
    let _ = client.set_nodelay(true);
    let upstream = TcpStream::connect_timeout(&shared.upstream, UPSTREAM_TIMEOUT).ok()?;
    let _ = upstream.set_nodelay(true);
    let cut = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(4);
    for (from, to, direction) in [
        (&client, &upstream, Direction::Up),
        (&upstream, &client, Direction::Down),
    ] {
        let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE);
        let (from_r, from_s) = (from.try_clone().ok()?, from.try_clone().ok()?);
        let (to_s, to_r) = (to.try_clone().ok()?, to.try_clone().ok()?);
        let (s1, c1) = (shared.clone(), cut.clone());
        threads.push(
            std::thread::Builder::new()
                .name("proxy-read".into())
                .spawn(move || read_side(from_r, &to_r, tx, &s1, &c1))
                .ok()?,
        );
        let (s2, c2) = (shared.clone(), cut.clone());
        threads.push(
            std::thread::Builder::new()
                .name("proxy-send".into())
                .spawn(move || send_side(rx, to_s, &from_s, direction, &s2, &c2))
                .ok()?,
        );
    }
    Some(Link {
        client,
        upstream,
        cut,
        threads,
    })
}

/// Reads chunks off `from` and queues them with the time they are due at the other end.
fn read_side(
    mut from: TcpStream,
    to: &TcpStream,
    queue: SyncSender<(Instant, Vec<u8>)>,
    shared: &Shared,
    cut: &AtomicBool,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if !shared.pass_stall(cut) {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return, // the queue closes; the sender ends the other side's writes
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                // A reset: pass it on as a cut of the whole connection.
                cut.store(true, Ordering::SeqCst);
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                shared.changed.notify_all();
                return;
            }
        };
        let due = Instant::now() + shared.faults().latency;
        if queue.send((due, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

/// Writes queued chunks to `to` when they are due, within the bandwidth cap.
fn send_side(
    queue: Receiver<(Instant, Vec<u8>)>,
    mut to: TcpStream,
    from: &TcpStream,
    direction: Direction,
    shared: &Shared,
    cut: &AtomicBool,
) {
    let counter = match direction {
        Direction::Up => &shared.forwarded_up,
        Direction::Down => &shared.forwarded_down,
    };
    // Earliest time the next byte may leave under the bandwidth cap.
    let mut next_slot = Instant::now();
    let fail = |to: &TcpStream| {
        cut.store(true, Ordering::SeqCst);
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
        shared.changed.notify_all();
    };
    while let Ok((due, chunk)) = queue.recv() {
        drop(shared.wait_until(shared.faults(), due));
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if !shared.pass_stall(cut) {
                return;
            }
            let rate = shared.faults().bandwidth;
            let piece = match rate {
                // Pieces of 10 ms worth keep the pace smooth.
                Some(rate) => {
                    let now = Instant::now();
                    if next_slot > now {
                        drop(shared.wait_until(shared.faults(), next_slot));
                        continue; // the stall or the rate may have changed meanwhile
                    }
                    next_slot = next_slot.max(now);
                    let n = rest.len().min((rate / 100).max(1) as usize);
                    next_slot += Duration::from_secs_f64(n as f64 / rate as f64);
                    n
                }
                None => rest.len(),
            };
            if cut.load(Ordering::SeqCst) || to.write_all(&rest[..piece]).is_err() {
                fail(&to);
                return;
            }
            counter.fetch_add(piece as u64, Ordering::SeqCst);
            rest = &rest[piece..];
        }
    }
    // The source ended cleanly: pass the end on, keeping the other direction open.
    let _ = to.shutdown(Shutdown::Write);
}
