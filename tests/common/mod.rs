//! Test harness: real relays on free ports, the real `tube` binary, deadlines everywhere.
//!
//! Every test starts its own relay (a `redis-server` or a `tube relay`) and stops it when the
//! guard drops; nothing here touches the shared server on port 6379.
#![allow(dead_code)]

pub mod certs;
pub mod faults;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Which relay a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    /// A real `redis-server`.
    Redis,
    /// tube's built-in relay.
    Tube,
}

/// A relay process, killed when dropped. Its log is printed if the test failed.
pub struct TestRelay {
    pub kind: RelayKind,
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    password: Option<String>,
    spec: RelaySpec,
}

/// Options for starting a relay.
#[derive(Default, Clone)]
pub struct RelaySpec {
    pub password: Option<String>,
    /// Extra arguments for the relay process.
    pub extra: Vec<String>,
    /// The relay listens with TLS only (the extra arguments configure it); readiness is
    /// then judged by the process staying up once the port accepts.
    pub tls: bool,
}

/// The command that runs a relay of `kind` on `port`, keeping its files and log in `dir`.
fn relay_command(kind: RelayKind, spec: &RelaySpec, port: u16, dir: &std::path::Path) -> Command {
    let log = dir.join("relay.log");
    match kind {
        RelayKind::Redis => {
            let mut c = Command::new("redis-server");
            if spec.tls {
                c.args(["--port", "0", "--tls-port", &port.to_string()]);
            } else {
                c.args(["--port", &port.to_string()]);
            }
            c.args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir)
                .arg("--logfile")
                .arg(&log);
            if let Some(pw) = &spec.password {
                c.args(["--requirepass", pw]);
            }
            c.args(&spec.extra);
            c.stdout(Stdio::null()).stderr(Stdio::null());
            c
        }
        RelayKind::Tube => {
            let mut c = Command::new(tube_bin());
            c.args(["relay", "--listen", &format!("127.0.0.1:{port}")]);
            c.args(&spec.extra);
            c.env_remove("TUBE_RELAY_PASSWORD");
            if let Some(pw) = &spec.password {
                c.env("TUBE_RELAY_PASSWORD", pw);
            }
            let logf = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("log file");
            c.stdout(Stdio::null()).stderr(logf);
            c
        }
    }
}

/// Waits until the relay just spawned serves `port`; `None` (and the child killed) if it
/// does not within 10 s.
fn await_relay(
    kind: RelayKind,
    child: std::io::Result<Child>,
    port: u16,
    spec: &RelaySpec,
) -> Option<Child> {
    let mut child = match child {
        Ok(c) => c,
        Err(e) if kind == RelayKind::Redis && e.kind() == std::io::ErrorKind::NotFound => {
            panic!(
                "redis-server is not installed: run `apt-get install -y redis-server` (CI's .ci/run does)"
            )
        }
        Err(e) => panic!("cannot start {kind:?} relay: {e}"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Another test may have taken the same free port a moment earlier: the relay that
        // answers must be this one, by its process ID.
        if serves(port, child.id(), spec.password.as_deref(), spec.tls) {
            return Some(child);
        }
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the relay on `port` is the process `pid` and answers.
fn serves(port: u16, pid: u32, password: Option<&str>, tls: bool) -> bool {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        return false;
    }
    if tls {
        std::thread::sleep(Duration::from_millis(100));
        return true;
    }
    let url = format!("redis://127.0.0.1:{port}");
    let Ok(mut info) = redis::IntoConnectionInfo::into_connection_info(url) else {
        return false;
    };
    if let Some(pw) = password {
        let r = info.redis_settings().clone().set_password(pw);
        info = info.set_redis_settings(r);
    }
    let answer: Option<String> = redis::Client::open(info)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .and_then(|mut c| redis::cmd("INFO").arg("server").query(&mut c))
        .ok();
    answer.is_some_and(|info| {
        info.lines()
            .any(|l| l.trim() == format!("process_id:{pid}"))
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

pub fn tube_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tube"))
}

impl TestRelay {
    pub fn start(kind: RelayKind) -> Self {
        Self::start_with(kind, RelaySpec::default())
    }

    pub fn start_with(kind: RelayKind, spec: RelaySpec) -> Self {
        // A port found free can be taken before the relay binds it: try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let child = relay_command(kind, &spec, port, dir.path()).spawn();
            if let Some(child) = await_relay(kind, child, port, &spec) {
                return Self {
                    kind,
                    port,
                    child: Some(child),
                    dir,
                    password: spec.password.clone(),
                    spec,
                };
            }
            last_log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
        }
        panic!("the {kind:?} relay did not start; its log:\n{last_log}");
    }

    /// Kills the relay and starts it again on the same port and directory, as a crash and
    /// restart would: connections drop, and the data is gone unless the relay persists it.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let child = relay_command(self.kind, &self.spec, self.port, self.dir.path()).spawn();
            if let Some(child) = await_relay(self.kind, child, self.port, &self.spec) {
                self.child = Some(child);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not restart:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The relay's URL, without credentials (tests pass the password in TUBE_PASSWORD).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A synchronous admin connection to inspect or tamper with the relay's keys.
    pub fn admin(&self) -> redis::Connection {
        let mut info = redis::IntoConnectionInfo::into_connection_info(self.url()).unwrap();
        if let Some(pw) = &self.password {
            let r = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(r);
        }
        redis::Client::open(info)
            .and_then(|c| c.get_connection())
            .expect("admin connection to the relay")
    }

    /// A `tube` command pointed at this relay.
    pub fn tube(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tube_bin());
        c.args(args)
            .env("TUBE_URL", self.url())
            .env_remove("TUBE_PASSWORD")
            .env_remove("TUBE_PREFIX")
            .env_remove("TUBE_LOG");
        if let Some(pw) = &self.password {
            c.env("TUBE_PASSWORD", pw);
        }
        c
    }

    /// The relay's process ID, for reading its memory and CPU time from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the relay is running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }

    /// Kills the relay at once (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {:?} relay log ----\n{}", self.kind, self.log());
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A running `tube` process with its output collected in the background.
pub struct Proc {
    pub child: Child,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// What a finished process left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Reads a child's stderr to the end on a thread of its own.
fn collect(mut err: std::process::ChildStderr) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    })
}

impl Proc {
    /// Spawns with piped stdin, stdout and stderr, both outputs collected by threads.
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tube");
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        Self {
            child,
            stdout: Some(std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = out.read_to_end(&mut v);
                v
            })),
            stderr: Some(collect(err)),
        }
    }

    /// Spawns with stdout going to a hashing thread (for large transfers).
    pub fn spawn_hashing(mut cmd: Command) -> (Self, std::thread::JoinHandle<([u8; 32], u64)>) {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tube");
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let hasher = std::thread::spawn(move || {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                }
            }
            (h.finalize().into(), n)
        });
        let p = Self {
            child,
            stdout: None,
            stderr: Some(collect(err)),
        };
        (p, hasher)
    }

    pub fn stdin(&mut self) -> &mut std::process::ChildStdin {
        self.child.stdin.as_mut().expect("stdin is open")
    }

    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    pub fn signal(&self, sig: i32) {
        let rc = unsafe_kill(self.child.id() as i32, sig);
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Waits for the process to exit, killing it and failing the test after `limit`.
    pub fn wait(mut self, limit: Duration) -> Output {
        self.close_stdin();
        self.wait_open(limit)
    }

    /// Waits for the process to exit without closing its stdin first (after a signal, so
    /// that the end of input does not race with it).
    pub fn wait_open(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self.stderr.take().unwrap().join().unwrap_or_default();
                panic!("tube did not exit within {limit:?}; its stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Output {
            status,
            stdout: self
                .stdout
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[allow(unsafe_code)]
fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) }
}

/// Runs `cmd` to completion with `input` on its stdin (fed from a thread, so a process
/// that writes while it reads cannot deadlock).
pub fn run_fed(cmd: Command, input: &[u8]) -> Output {
    let mut p = Proc::spawn(cmd);
    let mut stdin = p.child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = p.wait(Duration::from_secs(120));
    feeder.join().unwrap();
    out
}

/// Runs `tube write CHANNEL` with `data` on stdin to completion.
pub fn write_all(relay: &TestRelay, channel: &str, data: &[u8], extra: &[&str]) -> Output {
    let mut args = vec!["write", channel];
    args.extend_from_slice(extra);
    run_fed(relay.tube(&args), data)
}

/// Asserts a client failed with one line about TLS and exit status 1.
pub fn assert_tls_failure(out: &Output) {
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("tube: TLS with the relay at 127.0.0.1:"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

/// Runs `tube read CHANNEL` to completion.
pub fn read_all(relay: &TestRelay, channel: &str, extra: &[&str]) -> Output {
    let mut args = vec!["read", channel];
    args.extend_from_slice(extra);
    Proc::spawn(relay.tube(&args)).wait(Duration::from_secs(120))
}

/// Waits until `cond` holds, failing the test after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Clients of the relay waiting in a blocking read.
pub fn blocked_clients(admin: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("clients").query(admin).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO clients tells blocked_clients")
}

/// Waits until the channel's latest session has a begin record (the writer is running).
pub fn wait_for_session(relay: &TestRelay, channel: &str) {
    let mut admin = relay.admin();
    let key = format!("tube:{{{channel}}}:stream");
    wait_until(Duration::from_secs(10), "the writer's session", || {
        redis::cmd("XLEN")
            .arg(&key)
            .query::<u64>(&mut admin)
            .unwrap_or(0)
            > 0
    });
}

/// Defines each test once per relay kind: `mod redis` and `mod tube_relay`.
#[macro_export]
macro_rules! relay_tests {
    ($(fn $name:ident($relay:ident) $body:block)*) => {
        mod redis_server {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let $relay = $crate::common::RelayKind::Redis;
                    $body
                }
            )*
        }
        mod tube_relay {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let $relay = $crate::common::RelayKind::Tube;
                    $body
                }
            )*
        }
    };
}

impl Proc {
    /// Spawns with stdout read by a thread at no more than `rate` bytes per second: a slow
    /// consumer downstream of `tube read`.
    pub fn spawn_throttled(
        mut cmd: Command,
        rate: u64,
    ) -> (Self, std::thread::JoinHandle<Vec<u8>>) {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tube");
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let consumer = std::thread::spawn(move || {
            let started = Instant::now();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                let due = Duration::from_secs_f64(got.len() as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            got
        });
        let p = Self {
            child,
            stdout: None,
            stderr: Some(collect(err)),
        };
        (p, consumer)
    }
}

/// A stream entry as the admin connection returns it: ID and field-value pairs.
pub type Entry = (String, Vec<(String, Vec<u8>)>);

/// The record values (`r` fields) the relay holds for a channel, oldest first.
pub fn record_values(admin: &mut redis::Connection, channel: &str) -> Vec<Vec<u8>> {
    let entries: Vec<Entry> = redis::cmd("XRANGE")
        .arg(format!("tube:{{{channel}}}:stream"))
        .arg("-")
        .arg("+")
        .query(admin)
        .unwrap_or_default();
    entries
        .into_iter()
        .flat_map(|(_, f)| f.into_iter().map(|(_, v)| v))
        .collect()
}

/// Payload bytes of the data records the relay holds for a channel (unsealed ones).
pub fn stored_payload(admin: &mut redis::Connection, channel: &str) -> u64 {
    record_values(admin, channel)
        .iter()
        .filter(|v| v.get(1) == Some(&2))
        .map(|v| v.len().saturating_sub(28) as u64)
        .sum()
}

/// Bytes of every record the relay holds for a channel (the sum of the `r` values).
pub fn held_bytes(admin: &mut redis::Connection, channel: &str) -> u64 {
    record_values(admin, channel)
        .iter()
        .map(|v| v.len() as u64)
        .sum()
}

/// The relay's `used_memory`, from `INFO memory`.
pub fn used_memory(admin: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("memory").query(admin).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO memory has used_memory")
}

/// A numeric field of the relay's `INFO SECTION` (`connected_clients` in `clients`, …).
pub fn info_field(admin: &mut redis::Connection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query(admin).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has no numeric {field}:\n{info}"))
}

/// A process's resident memory (`VmRSS`) and its private part (`RssAnon`), in bytes; `None`
/// once the process is gone.
pub fn proc_rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    Some((kib("VmRSS:")?, kib("RssAnon:")?))
}

/// The CPU time a process's live threads have used so far, to the nanosecond: the sum of
/// `se.sum_exec_runtime` in `/proc/PID/task/*/sched`; `None` once the process is gone.
///
/// For processes that use little CPU. `/proc/PID/stat` counts whole clock ticks (10 ms) of
/// the process's total, so a process that has used 5 ms in all shows 0 there however long
/// it is watched. The sched files need a kernel with `CONFIG_SCHED_DEBUG` (Debian's and
/// Ubuntu's have it; it is always on since Linux 6.15); without one this panics, saying so.
/// Threads that exited no longer count.
pub fn proc_cpu_precise(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = Duration::ZERO;
    for task in tasks {
        let Ok(task) = task else { continue };
        let text = match std::fs::read_to_string(task.path().join("sched")) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                panic!(
                    "{}/sched is missing: measuring small CPU times needs a kernel with \
                     CONFIG_SCHED_DEBUG",
                    task.path().display()
                )
            }
            // The thread or the process has just exited.
            Err(_) => continue,
        };
        let ms: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("se.sum_exec_runtime"))
            .and_then(|v| v.trim().trim_start_matches(':').trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no se.sum_exec_runtime in {}:\n{text}",
                    task.path().display()
                )
            });
        total += Duration::from_secs_f64(ms / 1000.0);
    }
    Some(total)
}

/// The CPU time a process has used so far (user plus system, all its threads, also those
/// that exited), in whole clock ticks; `None` once the process is gone.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / clock_ticks_per_second(),
    ))
}

#[allow(unsafe_code)]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks > 0, "sysconf(_SC_CLK_TCK) failed");
    ticks as f64
}

/// Readers registered on `channel`.
pub fn registered_readers(admin: &mut redis::Connection, channel: &str) -> usize {
    redis::cmd("HLEN")
        .arg(format!("tube:{{{channel}}}:readers"))
        .query::<usize>(admin)
        .unwrap_or(0)
}

/// Waits until a reader has registered on `channel` (from then on it handles signals and
/// holds the writer back).
pub fn wait_registered(relay: &TestRelay, channel: &str) {
    let mut admin = relay.admin();
    wait_until(Duration::from_secs(10), "the reader's registration", || {
        registered_readers(&mut admin, channel) > 0
    });
}
