//! `tube relay` as a server: real processes over real sockets.
//!
//! These tests protect what a user of the built-in relay relies on: that Redis tools work with
//! it, that its password holds and never shows up in its log, that its memory bound holds,
//! and that no client, however broken or hostile, can take it down or starve the others.

mod common;

use common::{
    Proc, RelayKind, RelaySpec, TestRelay, blocked_clients, read_all, tube_bin, wait_until,
    write_all,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// A reply as the test reads it.
#[derive(Debug, Clone, PartialEq)]
enum R {
    Simple(String),
    Err(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Arr(Option<Vec<R>>),
}

impl R {
    fn text(&self) -> String {
        match self {
            R::Simple(s) | R::Err(s) => s.clone(),
            R::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        }
    }
}

/// A minimal RESP client, so that tests can send exactly what they mean, broken or not.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the relay");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        Self {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    fn send(&mut self, args: &[&[u8]]) {
        let mut v = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            v.extend_from_slice(a);
            v.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&v).expect("send a request");
    }

    fn cmd(&mut self, args: &[&str]) -> R {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send(&args);
        self.read().expect("a reply")
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches("\r\n").to_string())
    }

    fn read(&mut self) -> std::io::Result<R> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(1);
        let n = || rest.parse::<i64>().unwrap_or(0);
        Ok(match kind {
            "+" => R::Simple(rest.into()),
            "-" => R::Err(rest.into()),
            ":" => R::Int(n()),
            "_" => R::Bulk(None),
            "$" if n() < 0 => R::Bulk(None),
            "$" => {
                let mut b = vec![0; n() as usize + 2];
                self.r.read_exact(&mut b)?;
                b.truncate(b.len() - 2);
                R::Bulk(Some(b))
            }
            "*" | "%" if n() < 0 => R::Arr(None),
            "*" | "%" => {
                let items = if kind == "%" { 2 * n() } else { n() };
                R::Arr(Some(
                    (0..items).map(|_| self.read()).collect::<Result<_, _>>()?,
                ))
            }
            other => panic!("unexpected reply type {other:?} in {line:?}"),
        })
    }

    /// Whether the relay closed the connection (after any replies already sent).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.r.read_to_end(&mut rest).is_ok()
    }
}

/// The relay's process ID, from INFO (the harness keeps its child to itself).
fn relay_pid(port: u16) -> u32 {
    let info = Client::connect(port).cmd(&["INFO", "server"]).text();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO server has process_id")
}

/// (VmHWM, VmRSS) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (apt-get install -y redis-server provides it)");
    assert!(out.status.success(), "redis-cli {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn redis_cli_can_ping_read_info_and_inspect_tube_keys() {
    let relay = TestRelay::start(RelayKind::Tube);
    let out = write_all(&relay, "cam", b"hello from tube", &[]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);

    assert_eq!(redis_cli(relay.port, &["PING"]).trim(), "PONG");
    let info = redis_cli(relay.port, &["INFO"]);
    for field in [
        "redis_version:",
        "tube_version:",
        "connected_clients:",
        "used_memory:",
        "maxmemory:",
        "db0:keys=",
    ] {
        assert!(info.contains(field), "INFO lacks {field}:\n{info}");
    }
    let range = redis_cli(relay.port, &["XRANGE", "tube:{cam}:stream", "-", "+"]);
    assert!(range.starts_with("1-0\n"), "{range}");
    assert_eq!(
        redis_cli(relay.port, &["TYPE", "tube:{cam}:meta"]).trim(),
        "hash"
    );
    assert_eq!(
        redis_cli(relay.port, &["XLEN", "tube:{cam}:stream"]).trim(),
        "3"
    );
    let keys = redis_cli(relay.port, &["--scan", "--pattern", "tube:*"]);
    assert_eq!(keys.lines().count(), 2, "{keys}");
    // What redis-cli asks for when it starts interactively.
    redis_cli(relay.port, &["COMMAND", "DOCS"]);
    assert_eq!(
        redis_cli(relay.port, &["CONFIG", "GET", "maxmemory"])
            .lines()
            .next(),
        Some("maxmemory")
    );
}

#[test]
fn auth_is_required_checked_and_never_logged() {
    let password = "s3cret-relay-pw";
    let relay = TestRelay::start_with(
        RelayKind::Tube,
        RelaySpec {
            password: Some(password.into()),
            extra: vec!["-vvv".into()],
            ..Default::default()
        },
    );
    let mut c = Client::connect(relay.port);
    assert_eq!(
        c.cmd(&["GET", "x"]),
        R::Err("NOAUTH Authentication required.".into())
    );
    let wrongpass = R::Err("WRONGPASS invalid username-password pair or user is disabled.".into());
    assert_eq!(c.cmd(&["AUTH", "nope"]), wrongpass);
    assert_eq!(c.cmd(&["AUTH", "default", "nope"]), wrongpass);
    assert_eq!(c.cmd(&["AUTH", "someone", password]), wrongpass);
    assert_eq!(c.cmd(&["HELLO", "3", "AUTH", "default", "nope"]), wrongpass);
    assert!(
        c.cmd(&["HELLO", "3"])
            .text()
            .starts_with("NOAUTH HELLO must be called")
    );
    assert_eq!(
        c.cmd(&["PING"]),
        R::Err("NOAUTH Authentication required.".into())
    );
    let hello = c.cmd(&["HELLO", "3", "AUTH", "default", password]);
    assert!(
        matches!(&hello, R::Arr(Some(items)) if items.len() == 14),
        "{hello:?}"
    );
    assert_eq!(c.cmd(&["PING"]), R::Simple("PONG".into()));

    let mut d = Client::connect(relay.port);
    assert_eq!(d.cmd(&["AUTH", password]), R::Simple("OK".into()));
    assert_eq!(
        d.cmd(&["CLIENT", "SETNAME", "probe"]),
        R::Simple("OK".into())
    );
    assert_eq!(
        d.cmd(&["CLIENT", "GETNAME"]),
        R::Bulk(Some(b"probe".to_vec()))
    );

    // tube itself logs in with TUBE_PASSWORD.
    let data = common::random_bytes(100_000, 3);
    let w = write_all(&relay, "locked", &data, &[]);
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    let r = read_all(&relay, "locked", &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, data);

    drop((c, d));
    let log = relay.log();
    assert!(
        log.contains("client connected"),
        "the log is at trace level:\n{log}"
    );
    assert!(
        !log.contains(password),
        "the password appears in the relay's log:\n{log}"
    );
}

#[test]
fn refuses_non_loopback_without_password() {
    let mut cmd = Command::new(tube_bin());
    cmd.args(["relay", "--listen", "0.0.0.0:0"])
        .env_remove("TUBE_RELAY_PASSWORD");
    let out = Proc::spawn(cmd).wait(Duration::from_secs(10));
    assert_ne!(out.code(), Some(0));
    assert!(out.stderr.contains("without a password"), "{}", out.stderr);
}

#[test]
fn port_in_use_says_a_redis_may_be_there() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cmd = Command::new(tube_bin());
    cmd.args(["relay", "--listen", &format!("127.0.0.1:{port}")]);
    let out = Proc::spawn(cmd).wait(Duration::from_secs(10));
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr.contains("may already be running"),
        "{}",
        out.stderr
    );
}

#[test]
fn writes_past_max_memory_are_refused_and_deletes_still_work() {
    let relay = TestRelay::start_with(
        RelayKind::Tube,
        RelaySpec {
            extra: vec!["--max-memory".into(), "2M".into()],
            ..Default::default()
        },
    );
    let oom = "OOM command not allowed when used memory > 'maxmemory'.";
    let mut c = Client::connect(relay.port);
    let value = "v".repeat(64 * 1024);
    let mut stored = 0;
    let refused = loop {
        match c.cmd(&["SET", &format!("k{stored}"), &value]) {
            R::Simple(_) => stored += 1,
            other => break other,
        }
        assert!(stored < 100, "2 MiB cannot hold 100 values of 64 KiB");
    };
    assert_eq!(refused, R::Err(oom.into()));
    assert!(stored >= 20, "only {stored} values fit");
    assert_eq!(c.cmd(&["XADD", "s", "*", "f", &value]), R::Err(oom.into()));
    let info = c.cmd(&["INFO", "memory"]).text();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(used <= 2 << 20, "used_memory {used} is past the bound");
    // Deletes and reads still work, and free room for writes.
    assert_eq!(c.cmd(&["DEL", "k0", "k1"]), R::Int(2));
    assert_eq!(c.cmd(&["GET", "k2"]).text().len(), value.len());
    assert_eq!(c.cmd(&["SET", "k0", &value]), R::Simple("OK".into()));
    assert_eq!(c.cmd(&["PING"]), R::Simple("PONG".into()));

    // A tube session that does not fit fails with a message that says why.
    let data = common::random_bytes(4 << 20, 9);
    let w = write_all(&relay, "big", &data, &[]);
    assert_ne!(w.code(), Some(0));
    assert!(w.stderr.contains("OOM"), "{}", w.stderr);
    assert_eq!(
        Client::connect(relay.port).cmd(&["PING"]),
        R::Simple("PONG".into())
    );
}

#[test]
fn protocol_errors_are_answered_then_the_connection_closes() {
    let relay = TestRelay::start(RelayKind::Tube);
    let cases: [(&[u8], &str); 4] = [
        (
            b"*1\r\n$99999999999\r\n",
            "ERR Protocol error: invalid bulk length",
        ),
        (b"*2\r\n:1\r\n", "ERR Protocol error: expected '$', got ':'"),
        (b"*x\r\n", "ERR Protocol error: invalid multibulk length"),
        (
            b"PING \"unbalanced\r\n",
            "ERR Protocol error: unbalanced quotes in request",
        ),
    ];
    for (input, want) in cases {
        let mut c = Client::connect(relay.port);
        c.w.write_all(input).unwrap();
        assert_eq!(c.read().unwrap(), R::Err(want.into()));
        assert!(c.closed());
    }
    // Inline commands, as typed into telnet, work.
    let mut c = Client::connect(relay.port);
    c.w.write_all(b"PING\r\nECHO \"a b\"\r\n").unwrap();
    assert_eq!(c.read().unwrap(), R::Simple("PONG".into()));
    assert_eq!(c.read().unwrap(), R::Bulk(Some(b"a b".to_vec())));
    assert_eq!(
        c.cmd(&["NOSUCH", "x"]),
        R::Err("ERR unknown command 'NOSUCH', with args beginning with: 'x' ".into())
    );
    assert_eq!(
        c.cmd(&["GET"]),
        R::Err("ERR wrong number of arguments for 'get' command".into())
    );
}

#[test]
fn bad_clients_cannot_take_the_relay_down_or_its_memory_up() {
    let relay = TestRelay::start_with(
        RelayKind::Tube,
        RelaySpec {
            extra: vec!["--max-memory".into(), "64M".into()],
            ..Default::default()
        },
    );
    let port = relay.port;
    let pid = relay_pid(port);
    let (_, base_rss) = memory_kib(pid);

    // Some data for the greedy client to ask for.
    let mut setup = Client::connect(port);
    let value = "x".repeat(4096);
    for _ in 0..100 {
        assert!(matches!(
            setup.cmd(&["XADD", "s", "*", "f", &value]),
            R::Bulk(Some(_))
        ));
    }
    setup.cmd(&["SET", "k", &value]);

    // 2,000 idle connections.
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("an idle connection"))
        .collect();

    // 300 clients that announce 8 MiB values, send 1 MiB of each and stop there.
    let half_senders: Vec<std::thread::JoinHandle<TcpStream>> = (0..300)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let head = format!("*3\r\n$3\r\nSET\r\n$4\r\nh{i:03}\r\n$8388608\r\n");
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&vec![b'h'; 1 << 20]);
                s
            })
        })
        .collect();

    // A client that pipelines requests and never reads a reply.
    let greedy = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.extend_from_slice(b"*4\r\n$6\r\nXRANGE\r\n$1\r\ns\r\n$1\r\n-\r\n$1\r\n+\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        }
        let mut sent = 0usize;
        // Until the relay stops reading it (its replies are not read).
        while sent < 200 << 20 && s.write_all(&batch).is_ok() {
            sent += batch.len();
        }
        (s, sent)
    });

    // Malformed and absurd requests along the way.
    for input in [
        &b"*1\r\n$99999999999\r\n"[..],
        b"*3\r\n*1\r\n*1\r\n",
        b"\x00\xff garbage\r\n",
    ] {
        let mut c = Client::connect(port);
        c.w.write_all(input).unwrap();
        let _ = c.read();
    }

    let half_senders: Vec<TcpStream> = half_senders
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let (greedy_sock, greedy_sent) = greedy.join().unwrap();

    // Meanwhile, a well-behaved client is served, and a tube session goes through.
    let mut good = Client::connect(port);
    assert_eq!(good.cmd(&["PING"]), R::Simple("PONG".into()));
    let data = common::random_bytes(2 << 20, 5);
    let w = write_all(&relay, "good", &data, &[]);
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    let r = read_all(&relay, "good", &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, data);

    let info = good.cmd(&["INFO", "clients"]).text();
    let connected: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let (hwm, rss) = memory_kib(pid);
    eprintln!(
        "relay memory under bad clients: baseline VmRSS {base_rss} KiB, VmHWM {hwm} KiB, VmRSS {rss} KiB; \
         {connected} clients connected; the greedy client got {greedy_sent} bytes of requests in"
    );
    // 300 half-sent 8 MiB values would be 2.4 GiB unbounded; the input budget for a 64 MiB
    // relay is 32 MiB, plus a small allowance per client.
    assert!(hwm < 160 * 1024, "peak RSS {hwm} KiB");
    assert!(connected >= 2000, "idle clients were dropped: {connected}");
    drop((idle, half_senders, greedy_sock, good, setup));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = Client::connect(port).cmd(&["CLIENT", "LIST"]).text();
        if list.lines().count() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "clients left behind:\n{list}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn blocked_readers_are_woken_by_appends() {
    let relay = TestRelay::start(RelayKind::Tube);
    let port = relay.port;
    let reader = std::thread::spawn(move || {
        let mut c = Client::connect(port);
        let started = Instant::now();
        let r = c.cmd(&["XREAD", "BLOCK", "0", "STREAMS", "late", "0-0"]);
        (r, started.elapsed())
    });
    let mut w = Client::connect(port);
    wait_blocked(&relay, 1);
    assert_eq!(
        w.cmd(&["XADD", "late", "7-1", "f", "v"]),
        R::Bulk(Some(b"7-1".to_vec()))
    );
    let (r, _) = reader.join().unwrap();
    let R::Arr(Some(streams)) = r else {
        panic!("XREAD answered {r:?}")
    };
    assert_eq!(streams.len(), 1);
    // A timeout answers a null array.
    assert_eq!(
        w.cmd(&["XREAD", "BLOCK", "50", "STREAMS", "late", "$"]),
        R::Arr(None)
    );
}

#[test]
fn sigterm_stops_the_relay_gracefully() {
    let mut last = String::new();
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(tube_bin());
        cmd.args(["relay", "--listen", &format!("127.0.0.1:{port}")])
            .env_remove("TUBE_RELAY_PASSWORD");
        let mut relay = Proc::spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            && relay.running()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !relay.running() {
            last = relay.wait(Duration::from_secs(5)).stderr;
            continue;
        }
        // A client blocked for ever does not hold the shutdown up.
        let mut blocked = Client::connect(port);
        blocked.send(&[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"s", b"$"]);
        assert_eq!(
            Client::connect(port).cmd(&["PING"]),
            R::Simple("PONG".into())
        );
        relay.signal(15);
        let out = relay.wait(Duration::from_secs(10));
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        return;
    }
    panic!("the relay did not start: {last}");
}

/// The stream name and entries (ID, payload of field `f`) of an XREAD answer of one stream, in
/// RESP2 or RESP3 form.
fn xread_one(r: &R) -> (String, Vec<(String, Vec<u8>)>) {
    let R::Arr(Some(top)) = r else {
        panic!("XREAD answered {r:?}")
    };
    let (key, entries) = match top.as_slice() {
        // RESP3: a map of one stream.
        [key @ R::Bulk(_), R::Arr(Some(entries))] => (key.text(), entries),
        // RESP2: an array of [stream, entries].
        [R::Arr(Some(pair))] => match pair.as_slice() {
            [key, R::Arr(Some(entries))] => (key.text(), entries),
            other => panic!("XREAD stream {other:?}"),
        },
        other => panic!("XREAD answered {other:?}"),
    };
    let entries = entries
        .iter()
        .map(|e| match e {
            R::Arr(Some(pair)) => match pair.as_slice() {
                [id, R::Arr(Some(fields))] => match fields.as_slice() {
                    [R::Bulk(Some(f)), R::Bulk(Some(v))] if f == b"f" => (id.text(), v.clone()),
                    other => panic!("entry fields {other:?}"),
                },
                other => panic!("entry {other:?}"),
            },
            other => panic!("entry {other:?}"),
        })
        .collect();
    (key, entries)
}

fn wait_blocked(relay: &TestRelay, n: u64) {
    let mut admin = relay.admin();
    wait_until(Duration::from_secs(10), "readers to block", || {
        blocked_clients(&mut admin) == n
    });
}

/// An append answers a blocked reader from its own connection; that answer must still come
/// after the replies the reader's connection owed before it and before those after it, whole,
/// once, in the reader's protocol, whether the reader's socket takes it at once or not.
#[test]
fn answers_to_blocked_reads_keep_their_place_among_the_replies() {
    let relay = TestRelay::start(RelayKind::Tube);
    let port = relay.port;
    let mut w = Client::connect(port);
    // A reply a reader asked for before it blocked and left unread, so that when it blocks its
    // socket is full or nearly. (Below the relay's limit of pending replies, which would stop
    // it from running the requests after it until the reader reads.)
    let mut unread_values = vec![Vec::new()];
    let value = vec![b'b'; 200 * 1024];
    w.send(&[b"SET", b"big", &value]);
    assert_eq!(w.read().unwrap(), R::Simple("OK".into()));
    unread_values.push(value);
    let mut n = 0;
    for proto in [2, 3] {
        for size in [1, 200, 60 * 1024, 300 * 1024] {
            for big in &unread_values {
                n += 1;
                let (s, other) = (format!("s{n}"), format!("o{n}"));
                let mut r = Client::connect(port);
                if proto == 3 {
                    let R::Arr(Some(_)) = r.cmd(&["HELLO", "3"]) else {
                        panic!("HELLO 3 refused")
                    };
                }
                let mut pipelined: Vec<Vec<&[u8]>> = Vec::new();
                if !big.is_empty() {
                    pipelined.push(vec![b"GET", b"big"]);
                }
                pipelined.push(vec![b"SET", b"k", b"v"]);
                pipelined.push(vec![
                    b"XREAD",
                    b"BLOCK",
                    b"0",
                    b"STREAMS",
                    s.as_bytes(),
                    other.as_bytes(),
                    b"$",
                    b"$",
                ]);
                pipelined.push(vec![b"PING"]);
                for args in &pipelined {
                    r.send(args);
                }
                wait_blocked(&relay, 1);
                let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
                w.send(&[b"XADD", s.as_bytes(), b"5-1", b"f", &payload]);
                assert_eq!(w.read().unwrap(), R::Bulk(Some(b"5-1".to_vec())));
                let case = format!("RESP{proto}, {size} bytes, {} unread before", big.len());
                if !big.is_empty() {
                    assert!(r.read().unwrap() == R::Bulk(Some(big.clone())), "{case}");
                }
                assert_eq!(r.read().unwrap(), R::Simple("OK".into()), "{case}");
                let (key, entries) = xread_one(&r.read().unwrap());
                assert_eq!(key, s, "{case}");
                assert_eq!(entries, vec![("5-1".to_string(), payload)], "{case}");
                assert_eq!(r.read().unwrap(), R::Simple("PONG".into()), "{case}");
                // Answered once: an append on its other stream finds nobody waiting.
                w.cmd(&["XADD", &other, "5-1", "f", "v"]);
                assert_eq!(r.cmd(&["PING"]), R::Simple("PONG".into()), "{case}");
                wait_blocked(&relay, 0);
            }
        }
    }
}

/// A reader that blocks again after each answer gets every append once and in order, small
/// ones (answered by the append) and large ones (by the reader's own connection) alike, while
/// several readers wait on the same stream.
#[test]
fn blocked_readers_get_every_append_once_and_in_order() {
    let relay = TestRelay::start(RelayKind::Tube);
    let port = relay.port;
    let sizes: Vec<usize> = (0..300u64)
        .map(|i| match i * 7919 % 10 {
            0 => 150 * 1024,
            1 | 2 => 20 * 1024,
            _ => 1 + (i * 31 % 500) as usize,
        })
        .collect();
    let total = sizes.len();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                let mut last = "0-0".to_string();
                let mut got = Vec::new();
                while got.len() < total {
                    let r = c.cmd(&["XREAD", "BLOCK", "0", "STREAMS", "s", &last]);
                    let (_, entries) = xread_one(&r);
                    last = entries.last().expect("an answer has entries").0.clone();
                    got.extend(entries);
                }
                got
            })
        })
        .collect();
    let mut w = Client::connect(port);
    wait_blocked(&relay, 3);
    let mut sent = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let id = format!("1-{}", i + 1);
        let payload: Vec<u8> = (0..*size)
            .map(|b| (b as u64 * 13 + i as u64) as u8)
            .collect();
        w.send(&[b"XADD", b"s", id.as_bytes(), b"f", &payload]);
        assert_eq!(w.read().unwrap(), R::Bulk(Some(id.clone().into_bytes())));
        sent.push((id, payload));
    }
    for reader in readers {
        let got = reader.join().unwrap();
        assert_eq!(got.len(), sent.len());
        for (g, s) in got.iter().zip(&sent) {
            assert!(g == s, "entry {} differs", s.0);
        }
    }
}
