//! The fault-injecting proxy of the test harness (`tests/common/faults.rs`), checked against
//! a tiny echo server and a real relay, so that reliability tests can trust what it does.

mod common;

use common::faults::{Direction, FaultProxy};
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// An echo server on 127.0.0.1 that counts its open connections; stops when dropped.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let acceptor = std::thread::spawn({
            let (stop, open, conns) = (stop.clone(), open.clone(), conns.clone());
            move || {
                let mut workers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            conns.lock().unwrap().push(s.try_clone().unwrap());
                            open.fetch_add(1, Ordering::SeqCst);
                            let open = open.clone();
                            workers.push(std::thread::spawn(move || {
                                let mut s = s;
                                let mut buf = vec![0u8; 64 * 1024];
                                while let Ok(n) = s.read(&mut buf) {
                                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                let _ = s.shutdown(Shutdown::Both);
                                open.fetch_sub(1, Ordering::SeqCst);
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                for s in conns.lock().unwrap().iter() {
                    let _ = s.shutdown(Shutdown::Both);
                }
                for w in workers {
                    let _ = w.join();
                }
            }
        });
        Self {
            port,
            stop,
            open,
            conns,
            acceptor: Some(acceptor),
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.acceptor.take().unwrap().join();
        drop(self.conns.lock().unwrap().drain(..));
    }
}

fn connect(proxy: &FaultProxy) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", proxy.port())).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Sends `msg` and reads the echo; returns the round-trip time.
fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let started = Instant::now();
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).expect("the echo");
    assert_eq!(got, msg);
    started.elapsed()
}

/// Sends `len` bytes through the echo while a thread reads them back; returns the time.
fn stream_through(s: &TcpStream, len: usize) -> Duration {
    let data = random_bytes(len, 3);
    let mut rd = s.try_clone().unwrap();
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        rd.read_exact(&mut got).expect("the echoed data");
        got
    });
    (&*s).write_all(&data).unwrap();
    let got = reader.join().unwrap();
    assert!(got == data, "echo differs");
    started.elapsed()
}

#[test]
fn forwards_bytes_both_ways_unchanged() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    let s = connect(&proxy);
    stream_through(&s, 4 << 20);
    assert_eq!(settled_count(&proxy, Direction::Up, 4 << 20), 4 << 20);
    assert_eq!(settled_count(&proxy, Direction::Down, 4 << 20), 4 << 20);
    assert_eq!(proxy.accepted(), 1);
}

/// The proxy counts a chunk once its write has returned, which may be after the far end read
/// it: waits (up to 5 s) for the count to reach `want`, and returns it.
fn settled_count(proxy: &FaultProxy, direction: Direction, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = proxy.forwarded(direction);
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn latency_delays_every_round_trip_by_twice_the_delay() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    let mut s = connect(&proxy);
    let direct = round_trip(&mut s, b"warm up");
    assert!(
        direct < Duration::from_millis(300),
        "{direct:?} without latency"
    );
    proxy.set_latency(Duration::from_millis(150));
    for _ in 0..3 {
        let rtt = round_trip(&mut s, b"ping");
        assert!(rtt >= Duration::from_millis(300), "{rtt:?}");
        assert!(rtt < Duration::from_secs(3), "{rtt:?}");
    }
    proxy.set_latency(Duration::ZERO);
    let rtt = round_trip(&mut s, b"ping");
    assert!(
        rtt < Duration::from_millis(300),
        "{rtt:?} after lifting the latency"
    );
}

#[test]
fn latency_does_not_limit_throughput() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    proxy.set_latency(Duration::from_millis(100));
    let s = connect(&proxy);
    // 16 MiB in chunks of at most 64 KiB: one chunk per delay would take over 25 s.
    let took = stream_through(&s, 16 << 20);
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(
        took < Duration::from_secs(8),
        "{took:?}: latency limited the throughput"
    );
}

#[test]
fn bandwidth_cap_paces_the_transfer() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    proxy.set_bandwidth(Some(1_000_000));
    let s = connect(&proxy);
    // Each direction is paced on its own and they overlap: about 0.6 s for 600 kB.
    let took = stream_through(&s, 600_000);
    assert!(took >= Duration::from_millis(500), "{took:?}: not capped");
    assert!(took < Duration::from_secs(5), "{took:?}");
    proxy.set_bandwidth(None);
    let took = stream_through(&s, 4 << 20);
    assert!(took < Duration::from_secs(3), "{took:?}: cap not lifted");
}

#[test]
fn cut_closes_both_sides_and_new_connections_still_work() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    let mut s = connect(&proxy);
    round_trip(&mut s, b"before");
    wait_until(Duration::from_secs(5), "the echo connection", || {
        echo.open() == 1
    });
    proxy.cut();
    // The client sees the end of the connection...
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the client's side is still open after a cut: {other:?}"),
    }
    // ...and so does the server.
    wait_until(Duration::from_secs(5), "the server side to close", || {
        echo.open() == 0
    });
    wait_until(Duration::from_secs(5), "the proxy to forget it", || {
        proxy.open_connections() == 0
    });
    let mut again = connect(&proxy);
    round_trip(&mut again, b"after");
    assert_eq!(proxy.accepted(), 2);
}

#[test]
fn stall_holds_data_back_and_keeps_the_connection_open() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    let mut s = connect(&proxy);
    round_trip(&mut s, b"before");
    proxy.stall(Duration::from_millis(600));
    let started = Instant::now();
    s.write_all(b"held").unwrap();
    // Nothing comes back while the stall lasts.
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("data passed a stall: {other:?}"),
    }
    assert_eq!(
        proxy.forwarded(Direction::Up),
        6,
        "forwarded during the stall"
    );
    // Afterwards it arrives on the same connection.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"held");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(proxy.accepted(), 1);
    // resume() ends a stall early.
    proxy.stall(Duration::from_secs(60));
    s.write_all(b"next").unwrap();
    proxy.resume();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"next");
}

#[test]
fn refusing_fails_new_connections_and_spares_open_ones() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    let mut open = connect(&proxy);
    round_trip(&mut open, b"before");
    proxy.refuse_for(Duration::from_millis(800));
    let refused_at = Instant::now();
    wait_until(Duration::from_secs(5), "connections to be refused", || {
        matches!(
            TcpStream::connect(("127.0.0.1", proxy.port())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused
        )
    });
    round_trip(&mut open, b"still open");
    wait_until(
        Duration::from_secs(5),
        "connections to be accepted again",
        || proxy.listening(),
    );
    assert!(
        refused_at.elapsed() >= Duration::from_millis(700),
        "{:?}",
        refused_at.elapsed()
    );
    let mut s = connect(&proxy);
    round_trip(&mut s, b"after");
}

#[test]
fn dropping_the_proxy_closes_its_port_and_connections() {
    let echo = Echo::start();
    let proxy = FaultProxy::start(echo.port);
    proxy.set_latency(Duration::from_secs(30));
    let port = proxy.port();
    let mut s = connect(&proxy);
    s.write_all(b"queued behind a long delay").unwrap();
    let started = Instant::now();
    drop(proxy);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drop waited for the delay"
    );
    let mut buf = [0u8; 8];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "connection left open"
    );
    let e = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    wait_until(Duration::from_secs(5), "the server side to close", || {
        echo.open() == 0
    });
}

#[test]
fn a_relay_that_is_down_is_a_dropped_connection() {
    // Nothing listens upstream: the proxy accepts, fails to connect on, and closes.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proxy = FaultProxy::start(port);
    let mut s = connect(&proxy);
    let mut buf = [0u8; 8];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    wait_until(Duration::from_secs(5), "the proxy to count it", || {
        proxy.refused() == 1
    });
}

relay_tests! {
    fn a_relay_100_ms_away_each_way_still_gets_every_byte_in_order(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(100));
        let data = random_bytes(12 << 20, 18);
        let mut w = relay.tube(&["write", "far"]);
        w.env("TUBE_URL", proxy.url());
        let mut w = Proc::spawn(w);
        w.stdin().write_all(&data).unwrap();
        let w = w.wait(Duration::from_secs(120));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        // The reader starts behind: it catches up by reading ahead several batches per round
        // trip (the path only a distant relay takes).
        let mut r = relay.tube(&["read", "far", "-vv"]);
        r.env("TUBE_URL", proxy.url());
        let r = Proc::spawn(r).wait(Duration::from_secs(120));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact");
        assert!(r.stderr.contains("reading ahead"), "read-ahead was not used: {}", r.stderr);
    }

    fn tube_moves_data_byte_exact_through_a_slow_proxy(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(20));
        let data = random_bytes(3 << 20, 17);
        let mut w = relay.tube(&["write", "slow"]);
        w.env("TUBE_URL", proxy.url());
        let mut w = Proc::spawn(w);
        let mut r = relay.tube(&["read", "slow"]);
        r.env("TUBE_URL", proxy.url());
        let r = Proc::spawn(r);
        w.stdin().write_all(&data).unwrap();
        let w = w.wait(Duration::from_secs(60));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = r.wait(Duration::from_secs(60));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact");
        assert!(proxy.forwarded(Direction::Up) > data.len() as u64);
        assert!(proxy.forwarded(Direction::Down) > data.len() as u64);
    }
}
