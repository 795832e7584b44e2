//! Bad input of every kind, tried against the real binary: each case must end with one clear
//! line on stderr (no panic, no backtrace), a documented exit status, nothing on stdout but
//! data, and no damage to other channels. `docs/RELIABILITY.md` lists the cases.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tube::record::{self, Begin};

/// Exit statuses from the README.
const FAILED: i32 = 1;
const INTERRUPTED: i32 = 3;
const VANISHED: i32 = 4;
const CORRUPT: i32 = 5;
const BY_SIGTERM: i32 = 143;

/// A `tube` command that reaches no relay unless told to, and would print a backtrace if it
/// panicked.
fn tube(args: &[&str]) -> Command {
    let mut c = Command::new(tube_bin());
    c.args(args)
        .env_remove("TUBE_URL")
        .env_remove("TUBE_PASSWORD")
        .env_remove("TUBE_PREFIX")
        .env_remove("TUBE_LOG")
        .env("RUST_BACKTRACE", "1");
    c
}

/// The same, pointed at `relay`.
fn tube_at(relay: &TestRelay, args: &[&str]) -> Command {
    let mut c = relay.tube(args);
    c.env("RUST_BACKTRACE", "1");
    c
}

fn run(cmd: Command) -> Output {
    Proc::spawn(cmd).wait(Duration::from_secs(30))
}

/// Runs `cmd` with the given stdin and stdout; stderr is collected.
fn run_with(mut cmd: Command, stdin: Stdio, stdout: Stdio) -> Output {
    cmd.stdin(stdin).stdout(stdout).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tube");
    let mut err = child.stderr.take().unwrap();
    let collector = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tube did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: Vec::new(),
        stderr: collector.join().unwrap(),
    }
}

/// Whether stderr shows a panic or a backtrace.
fn assert_no_panic(out: &Output) {
    for sign in ["panicked", "RUST_BACKTRACE", "stack backtrace", "backtrace"] {
        assert!(
            !out.stderr.contains(sign),
            "{sign:?} on stderr:\n{}",
            out.stderr
        );
    }
}

/// The case failed as documented: exit status `code`, one line on stderr that starts with
/// `tube: ` and says `needle`, nothing on stdout.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    assert_no_panic(out);
    assert_eq!(
        out.code(),
        Some(code),
        "exit status; stderr:\n{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "one line:\n{}", out.stderr);
    assert!(out.stderr.starts_with("tube: "), "{}", out.stderr);
    assert!(
        out.stderr.contains(needle),
        "expected {needle:?} in:\n{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "stdout: {} bytes", out.stdout.len());
}

/// A channel written before a case, to check afterwards that the case did not damage it.
struct Bystander(Vec<u8>);

impl Bystander {
    const NAME: &str = "bystander";

    fn write(relay: &TestRelay) -> Self {
        let data = random_bytes(300_000, 99);
        let w = write_all(relay, Self::NAME, &data, &[]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        Self(data)
    }

    fn assert_intact(&self, relay: &TestRelay) {
        let r = read_all(relay, Self::NAME, &[]);
        assert_eq!(r.code(), Some(0), "bystander: {}", r.stderr);
        assert!(r.stdout == self.0, "the bystander channel changed");
    }
}

/// Every key of the relay with its type and contents, to check that a case changed nothing.
fn snapshot(admin: &mut redis::Connection, pattern: &str) -> Vec<(String, String, String)> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(admin).unwrap();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let kind: String = redis::cmd("TYPE").arg(&k).query(admin).unwrap();
            let mut cmd = match kind.as_str() {
                "string" => redis::cmd("GET"),
                "list" => redis::cmd("LRANGE"),
                "hash" => redis::cmd("HGETALL"),
                "stream" => redis::cmd("XRANGE"),
                other => panic!("unexpected type {other}"),
            };
            cmd.arg(&k);
            match kind.as_str() {
                "list" => {
                    cmd.arg(0).arg(-1);
                }
                "stream" => {
                    cmd.arg("-").arg("+");
                }
                _ => {}
            }
            let v: redis::Value = cmd.query(admin).unwrap();
            (k, kind, format!("{v:?}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Where the relay is: URLs, ports, names, services that are not Redis.
// ---------------------------------------------------------------------------------------

#[test]
fn malformed_urls_are_refused_with_the_expected_form() {
    let urls = [
        "",
        "redis://",
        "rediss://",
        "unix://",
        "redis://host:99999",
        "redis://host:-1",
        "redis://[::1",
        "redis://host/not-a-db",
        "http://relay.example:80",
        "localhost:6379",
        "redis//127.0.0.1:6379",
    ];
    for url in urls {
        for via_env in [false, true] {
            let mut cmd = if via_env {
                let mut c = tube(&["read", "x"]);
                c.env("TUBE_URL", url);
                c
            } else {
                tube(&["read", "x", "--url", url])
            };
            if url.is_empty() && via_env {
                // An empty TUBE_URL is as good as none: tube would try the default relay.
                cmd.env_remove("TUBE_URL");
                continue;
            }
            let out = run(cmd);
            assert_fails(&out, FAILED, "invalid relay URL");
            assert!(out.stderr.contains("expected redis://"), "{}", out.stderr);
        }
    }
}

#[test]
fn nothing_listening_on_the_port_is_a_clear_error_within_seconds() {
    let port = free_port();
    for cmd in ["write", "read", "ls", "stat", "rm"] {
        let args: &[&str] = if cmd == "ls" { &[cmd] } else { &[cmd, "x"] };
        let mut c = tube(args);
        c.env("TUBE_URL", format!("redis://127.0.0.1:{port}"));
        let started = Instant::now();
        let out = run(c);
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{cmd}: {:?}",
            started.elapsed()
        );
        assert_fails(
            &out,
            FAILED,
            &format!("cannot reach the relay at 127.0.0.1:{port}: connection refused"),
        );
    }
}

#[test]
fn a_relay_name_that_does_not_resolve_is_a_clear_error() {
    let out = run(tube(&[
        "write",
        "x",
        "--url",
        "redis://no-such-relay.invalid:6379",
    ]));
    assert_fails(
        &out,
        FAILED,
        "cannot reach the relay at no-such-relay.invalid:6379",
    );
}

/// How a fake service on the relay's port behaves.
#[derive(Clone, Copy, Debug)]
enum Service {
    /// Reads the request and answers like an HTTP server.
    Http,
    /// Sends bytes that are no protocol at all and stays connected.
    Garbage,
    /// Accepts and closes at once.
    Closes,
}

/// A service that is not Redis, on a free port of 127.0.0.1; stops when dropped.
struct NotRedis {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotRedis {
    fn start(kind: Service) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut open: Vec<TcpStream> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    s.set_nonblocking(false).unwrap();
                    match kind {
                        Service::Http => {
                            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                            let mut buf = [0u8; 1024];
                            let _ = s.read(&mut buf);
                            let _ = s.write_all(
                                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n\
                                  Content-Length: 11\r\nConnection: close\r\n\r\nBad Request",
                            );
                        }
                        Service::Garbage => {
                            let _ = s.write_all(&[0x00, 0xff, 0x13, b'g', 0xfe, 0x80, b'\r']);
                            open.push(s);
                        }
                        Service::Closes => drop(s),
                    }
                }
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NotRedis {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.take().unwrap().join();
    }
}

#[test]
fn services_that_are_not_redis_are_named_as_such() {
    for kind in [Service::Http, Service::Garbage, Service::Closes] {
        let service = NotRedis::start(kind);
        for cmd in ["write", "read"] {
            let mut c = tube(&[cmd, "x"]);
            c.env("TUBE_URL", format!("redis://127.0.0.1:{}", service.port));
            let started = Instant::now();
            let out = run(c);
            assert!(
                started.elapsed() < Duration::from_secs(7),
                "{kind:?} {cmd}: {:?}",
                started.elapsed()
            );
            assert_fails(
                &out,
                FAILED,
                &format!(
                    "127.0.0.1:{} does not answer like a Redis server",
                    service.port
                ),
            );
        }
    }
}

#[test]
fn channel_names_with_nul_or_a_megabyte_are_refused_by_the_library() {
    for (name, why) in [
        ("a\0b".to_string(), "control character '\\0'"),
        ("\0".to_string(), "control character"),
        ("x".repeat(1 << 20), "1048576 bytes long"),
        ("é".repeat(101), "202 bytes long"),
    ] {
        let err = tube::Channel::new(&name, tube::DEFAULT_PREFIX).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, tube::Error::InvalidChannel { .. }), "{err:?}");
        assert!(text.contains(why), "{text}");
        assert!(!text.contains('\0') && !text.contains('\n'), "{text:?}");
        assert!(text.len() < 300, "message of {} bytes", text.len());
    }
}

relay_tests! {
    fn channel_names_with_control_characters_are_refused_by_the_cli(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        let mut admin = relay.admin();
        let before = snapshot(&mut admin, "*");
        // argv cannot carry NUL; one argument can carry up to 128 KiB.
        let long = "y".repeat(100_000);
        for (name, why) in [
            ("a\nb", "'\\n'"),
            ("line\r", "'\\r'"),
            ("tab\there", "'\\t'"),
            ("\x01", "'\\u{1}'"),
            ("\x1b[31mred", "'\\u{1b}'"),
            ("del\x7f", "'\\u{7f}'"),
            ("", "it is empty"),
            ("a{b}", "brace"),
            (long.as_str(), "100000 bytes long"),
        ] {
            for cmd in ["write", "read", "stat", "rm"] {
                let out = run(tube_at(&relay, &[cmd, name]));
                assert_fails(&out, FAILED, "invalid channel name");
                assert!(out.stderr.contains(why), "{cmd} {name:?}: {}", out.stderr);
                assert!(out.stderr.len() < 300, "{} bytes of stderr", out.stderr.len());
            }
        }
        assert_eq!(snapshot(&mut admin, "*"), before, "a refused name changed the relay");
        bystander.assert_intact(&relay);
    }

    fn a_wrong_password_is_refused_clearly(kind) {
        let relay = TestRelay::start_with(kind, RelaySpec { password: Some("right-pw-123".into()), ..Default::default() });
        let bystander = Bystander::write(&relay);
        for cmd in ["write", "read", "ls"] {
            let args: &[&str] = if cmd == "ls" { &[cmd] } else { &[cmd, Bystander::NAME] };
            let mut none = tube_at(&relay, args);
            none.env_remove("TUBE_PASSWORD");
            let out = run(none);
            assert_fails(&out, FAILED, "refused the credentials");
            let mut wrong = tube_at(&relay, args);
            wrong.env("TUBE_PASSWORD", "wrong-pw-456");
            let out = run(wrong);
            assert_fails(&out, FAILED, "refused the credentials");
            assert!(!out.stderr.contains("wrong-pw-456"), "{}", out.stderr);
        }
        bystander.assert_intact(&relay);
    }

    fn a_password_for_a_relay_without_one_is_refused_clearly(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        let mut cmd = tube_at(&relay, &["write", Bystander::NAME]);
        cmd.env("TUBE_PASSWORD", "unneeded-pw");
        let out = run(cmd);
        assert_fails(&out, FAILED, "refused the credentials");
        assert!(!out.stderr.contains("unneeded-pw"), "{}", out.stderr);
        bystander.assert_intact(&relay);
    }

    fn foreign_keys_of_the_channels_name_are_refused_and_left_alone(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        let mut admin = relay.admin();
        let q = |admin: &mut redis::Connection, args: &[&str]| {
            let mut c = redis::cmd(args[0]);
            for a in &args[1..] {
                c.arg(*a);
            }
            let _: redis::Value = c.query(admin).unwrap();
        };
        q(&mut admin, &["SET", "tube:{str}:stream", "someone's string"]);
        q(&mut admin, &["RPUSH", "tube:{list}:stream", "a", "b"]);
        q(&mut admin, &["HSET", "tube:{hash}:meta", "owner", "someone", "session", "3"]);
        q(&mut admin, &["SET", "tube:{lease}:writer", "not a lease"]);
        q(&mut admin, &["XADD", "tube:{entries}:stream", "*", "temp", "21.5"]);
        q(&mut admin, &["XADD", "tube:{entries}:stream", "*", "temp", "21.7"]);
        for (channel, key, what) in [
            ("str", "tube:{str}:stream", "holds a string"),
            ("list", "tube:{list}:stream", "holds a list"),
            ("hash", "tube:{hash}:meta", "hash without tube's fields"),
            ("lease", "tube:{lease}:writer", "not a tube lease"),
            ("entries", "tube:{entries}:stream", "stream"),
        ] {
            let pattern = format!("tube:{{{channel}}}:*");
            let before = snapshot(&mut admin, &pattern);
            let w = write_all(&relay, channel, b"must not land", &[]);
            assert_fails(&w, FAILED, &format!("key {key} exists and is not tube's"));
            assert!(w.stderr.contains(what), "{}", w.stderr);
            let r = run(tube_at(&relay, &["read", channel]));
            assert_fails(&r, FAILED, &format!("key {key} exists and is not tube's"));
            for cmd in ["stat", "rm"] {
                let out = run(tube_at(&relay, &[cmd, channel]));
                assert_fails(&out, FAILED, &format!("key {key} exists and is not tube's"));
            }
            assert_eq!(snapshot(&mut admin, &pattern), before, "{channel}: the foreign key was touched");
        }
        // tube's own stream whose meta hash was lost is still tube's.
        assert_eq!(write_all(&relay, "lost", b"first", &[]).code(), Some(0));
        q(&mut admin, &["DEL", "tube:{lost}:meta"]);
        let w = write_all(&relay, "lost", b"second", &[]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = read_all(&relay, "lost", &[]);
        assert_eq!((r.code(), r.stdout.as_slice()), (Some(0), &b"second"[..]), "{}", r.stderr);
        bystander.assert_intact(&relay);
    }

    fn a_channel_of_a_newer_protocol_is_refused_by_both_ends(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        let mut admin = relay.admin();
        hand_written_session(&mut admin, "future", "2", &[]);
        let before = snapshot(&mut admin, "tube:{future}:*");
        let expected = "channel future uses tube protocol 2; this tube speaks protocol 1: upgrade tube";
        assert_fails(&run(tube_at(&relay, &["read", "future"])), FAILED, expected);
        assert_fails(&write_all(&relay, "future", b"x", &[]), FAILED, expected);
        assert_eq!(snapshot(&mut admin, "tube:{future}:*"), before);
        bystander.assert_intact(&relay);
    }

    fn hand_written_records_in_the_wrong_format_fail_the_reader_clearly(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        let mut admin = relay.admin();
        let good = |seq| record::encode_data(1, seq, 0, false, b"hello").to_vec();
        let with = |mut v: Vec<u8>, at: usize, byte: u8| {
            v[at] = byte;
            v
        };
        let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
            ("garbage", "r", b"this value is plainly not a tube record".to_vec(), "bad record on channel garbage: record is malformed: it is not a tube record"),
            ("empty", "r", Vec::new(), "bad record on channel empty: record is truncated"),
            ("field", "data", good(1), "stream entry 1-1 is not a tube record"),
            ("short", "r", vec![1, 2, 0, 0, 0, 0, 0, 1], "bad record on channel short: record is truncated"),
            ("kind", "r", with(good(1), 1, 9), "bad record on channel kind: record has unknown kind 9"),
            ("flag", "r", with(good(1), 2, 0x80), "bad record on channel flag: record has unknown flags 0x80"),
            ("reserved", "r", with(good(1), 3, 1), "reserved header byte is not zero"),
            ("moved", "r", good(7), "record 1-7 is stored under stream ID 1-1"),
            ("version", "r", with(good(1), 0, 2), "bad record on channel version: record has protocol version 2, this tube reads version 1: upgrade tube"),
        ];
        for (channel, field, value, expected) in cases {
            hand_written_session(&mut admin, channel, "1", &[("1-1", field, value)]);
            let r = run(tube_at(&relay, &["read", channel]));
            assert_fails(&r, CORRUPT, expected);
            // A new session on the same channel is read as usual.
            let w = write_all(&relay, channel, b"fresh", &[]);
            assert_eq!(w.code(), Some(0), "{channel}: {}", w.stderr);
            let r = run(tube_at(&relay, &["read", channel]));
            assert_eq!(r.code(), Some(0), "{channel}: {}", r.stderr);
            assert_eq!(r.stdout, b"fresh");
        }
        bystander.assert_intact(&relay);
    }

    fn stdin_that_is_a_directory_is_refused_before_the_session_starts(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        assert_eq!(write_all(&relay, "dir", b"previous session", &[]).code(), Some(0));
        let dir = tempfile::tempdir().unwrap();
        let stdin = std::fs::File::open(dir.path()).unwrap();
        let out = run_with(tube_at(&relay, &["write", "dir"]), stdin.into(), Stdio::null());
        assert_fails(&out, FAILED, "stdin is a directory");
        // The channel's latest session is still the previous one, untouched.
        let r = read_all(&relay, "dir", &[]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, b"previous session");
        bystander.assert_intact(&relay);
    }

    fn closed_stdin_is_empty_input(kind) {
        // The Rust runtime opens /dev/null in place of a closed standard descriptor, so
        // `<&-` is the same as `</dev/null`: an empty session.
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        let script = format!("exec {} write closed <&-", tube_bin().display());
        let mut sh = Command::new("bash");
        sh.args(["-c", &script]).env("TUBE_URL", relay.url());
        let out = run(sh);
        assert_no_panic(&out);
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        assert!(out.stderr.is_empty(), "{}", out.stderr);
        let r = read_all(&relay, "closed", &[]);
        assert_eq!((r.code(), r.stdout.len()), (Some(0), 0), "{}", r.stderr);
        bystander.assert_intact(&relay);
    }

    fn stdout_closed_early_ends_the_reader_quietly(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        let data = random_bytes(4 << 20, 8);
        assert_eq!(write_all(&relay, "head", &data, &[]).code(), Some(0));
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        let script = format!(
            "RUST_BACKTRACE=1 {} read head | head -c 10 > {}; echo \"${{PIPESTATUS[0]}}\"",
            tube_bin().display(),
            first.display()
        );
        let mut sh = Command::new("bash");
        sh.args(["-c", &script]).env("TUBE_URL", relay.url());
        let out = run(sh);
        assert_no_panic(&out);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{}", out.stderr);
        assert!(out.stderr.is_empty(), "{}", out.stderr);
        assert_eq!(std::fs::read(&first).unwrap(), &data[..10]);
        // A closed descriptor is /dev/null to a Rust program: the data is read and dropped.
        let script = format!("exec {} read head >&-", tube_bin().display());
        let mut sh = Command::new("bash");
        sh.args(["-c", &script]).env("TUBE_URL", relay.url());
        let out = run(sh);
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        bystander.assert_intact(&relay);
    }

    fn stdout_on_a_full_device_is_a_clear_error(kind) {
        let relay = TestRelay::start(kind);
        let bystander = Bystander::write(&relay);
        assert_eq!(write_all(&relay, "full", &random_bytes(1 << 20, 2), &[]).code(), Some(0));
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let out = run_with(tube_at(&relay, &["read", "full"]), Stdio::null(), full.into());
        assert_fails(&out, FAILED, "writing stdout: No space left on device");
        // Nothing about the channel changed: it reads back whole.
        let r = read_all(&relay, "full", &[]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(r.stdout.len(), 1 << 20);
        bystander.assert_intact(&relay);
    }
}

/// Writes a session by hand: the meta hash with protocol `proto`, a good begin record, then
/// `entries` (ID, field, value) as given.
fn hand_written_session(
    admin: &mut redis::Connection,
    channel: &str,
    proto: &str,
    entries: &[(&str, &str, Vec<u8>)],
) {
    let begin = record::encode_begin(
        1,
        &Begin {
            token: [7; 16],
            started_ms: 1,
            max_payload: 1024,
            live: false,
            max_backlog: 0,
            seal: None,
        },
    );
    let meta = format!("tube:{{{channel}}}:meta");
    let stream = format!("tube:{{{channel}}}:stream");
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("proto")
        .arg(proto)
        .arg("session")
        .arg(1)
        .arg("begin")
        .arg(&begin[..])
        .arg("mode")
        .arg("reliable")
        .query(admin)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("1-0")
        .arg("r")
        .arg(&begin[..])
        .query(admin)
        .unwrap();
    for (id, field, value) in entries {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg(*id)
            .arg(*field)
            .arg(&value[..])
            .query(admin)
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Signals at random points of a transfer.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Writer,
    Reader,
}

/// Sends `sig` to the writer or the reader once the relay holds a random part of the data,
/// checks what each side reports, then that the channel works again and the bystander is
/// whole.
fn signal_mid_transfer(kind: RelayKind, target: Target, sig: i32, seed: u64) {
    let relay = TestRelay::start(kind);
    let bystander = Bystander::write(&relay);
    let channel = "sig";
    let data = random_bytes(3 << 20, seed);
    let point = rand::rngs::StdRng::seed_from_u64(seed).random_range(1..data.len());
    let at = format!("signal {sig} to the {target:?} at byte {point} (seed {seed})");
    let mut writer = Proc::spawn(tube_at(&relay, &["write", channel, "--chunk-size", "64k"]));
    // A reader waits --retry-for for a writer whose lease lapsed (it may be reconnecting).
    let reader = Proc::spawn(tube_at(&relay, &["read", channel, "--retry-for", "2s"]));
    let mut admin = relay.admin();
    // The reader handles signals once it has registered.
    wait_registered(&relay, channel);
    writer.stdin().write_all(&data[..point]).unwrap();
    writer.stdin().flush().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the first part on the relay",
        || stored_payload(&mut admin, channel) == point as u64,
    );
    let target_proc = match target {
        Target::Writer => &writer,
        Target::Reader => &reader,
    };
    target_proc.signal(sig);
    let signalled = Instant::now();
    match (target, sig) {
        (_, libc::SIGPIPE) => {
            // tube ignores SIGPIPE (a closed pipe is an error from write, handled there).
            writer.stdin().write_all(&data[point..]).unwrap();
            let w = writer.wait(Duration::from_secs(60));
            assert_eq!(w.code(), Some(0), "{at}: {}", w.stderr);
            let r = reader.wait(Duration::from_secs(60));
            assert_eq!(r.code(), Some(0), "{at}: {}", r.stderr);
            assert!(r.stdout == data, "{at}: not byte-exact");
        }
        (Target::Writer, libc::SIGTERM) => {
            let w = writer.wait_open(Duration::from_secs(20));
            assert_eq!(w.code(), Some(BY_SIGTERM), "{at}: {}", w.stderr);
            assert_no_panic(&w);
            let r = reader.wait(Duration::from_secs(20));
            assert!(
                r.stdout == data[..point],
                "{at}: the reader wrote {} bytes",
                r.stdout.len()
            );
            assert_fails(
                &Output {
                    stdout: Vec::new(),
                    ..r
                },
                INTERRUPTED,
                &format!("writer of sig was interrupted after {point} bytes"),
            );
        }
        (Target::Writer, libc::SIGKILL) => {
            let w = writer.wait_open(Duration::from_secs(20));
            assert_eq!(w.code(), None, "{at}: killed");
            let r = reader.wait(Duration::from_secs(30));
            assert!(
                r.stdout == data[..point],
                "{at}: the reader wrote {} bytes",
                r.stdout.len()
            );
            assert_fails(
                &Output {
                    stdout: Vec::new(),
                    ..r
                },
                VANISHED,
                &format!("writer of sig vanished after {point} bytes"),
            );
        }
        (Target::Reader, libc::SIGTERM | libc::SIGKILL) => {
            let r = reader.wait_open(Duration::from_secs(20));
            let want = if sig == libc::SIGTERM {
                Some(BY_SIGTERM)
            } else {
                None
            };
            assert_eq!(r.code(), want, "{at}: {}", r.stderr);
            assert_no_panic(&r);
            assert!(
                data.starts_with(&r.stdout),
                "{at}: the reader's output is not a prefix"
            );
            // The writer goes on undisturbed and a new reader gets everything.
            writer.stdin().write_all(&data[point..]).unwrap();
            let w = writer.wait(Duration::from_secs(60));
            assert_eq!(w.code(), Some(0), "{at}: {}", w.stderr);
            let again = read_all(&relay, channel, &[]);
            assert_eq!(again.code(), Some(0), "{at}: {}", again.stderr);
            assert!(again.stdout == data, "{at}: not byte-exact");
        }
        _ => unreachable!("no expectations for {at}"),
    }
    if target == Target::Writer && sig == libc::SIGTERM {
        // The interrupted session's stdout: exactly what the relay held.
        let r = read_all(&relay, channel, &[]);
        assert!(r.stdout == data[..point], "{at}: {} bytes", r.stdout.len());
    }
    // The channel works again (a killed writer's lease expires within 8 s).
    let deadline = signalled + Duration::from_secs(15);
    loop {
        let w = write_all(&relay, channel, b"usable again", &[]);
        if w.code() == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{at}: channel still busy: {}",
            w.stderr
        );
        assert!(
            w.stderr.contains("already has a live writer"),
            "{at}: {}",
            w.stderr
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let r = read_all(&relay, channel, &[]);
    assert_eq!(
        (r.code(), r.stdout.as_slice()),
        (Some(0), &b"usable again"[..]),
        "{at}: {}",
        r.stderr
    );
    bystander.assert_intact(&relay);
}

mod signals {
    use super::*;

    relay_tests! {
        fn sigpipe_to_the_writer_is_ignored(kind) { signal_mid_transfer(kind, Target::Writer, libc::SIGPIPE, 1) }
        fn sigpipe_to_the_reader_is_ignored(kind) { signal_mid_transfer(kind, Target::Reader, libc::SIGPIPE, 2) }
        fn sigterm_to_the_writer_interrupts_the_session_cleanly(kind) { signal_mid_transfer(kind, Target::Writer, libc::SIGTERM, 3) }
        fn sigterm_to_the_reader_stops_it_and_spares_the_writer(kind) { signal_mid_transfer(kind, Target::Reader, libc::SIGTERM, 4) }
        fn sigkill_to_the_writer_is_reported_by_the_reader_and_frees_the_channel(kind) { signal_mid_transfer(kind, Target::Writer, libc::SIGKILL, 5) }
        fn sigkill_to_the_reader_spares_the_writer(kind) { signal_mid_transfer(kind, Target::Reader, libc::SIGKILL, 6) }
    }
}
