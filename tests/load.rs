//! Load: many channels at once through one relay, and many idle readers.
//!
//! Each test loads the whole machine, so they run one at a time (see [`alone`]); their
//! bounds have headroom for a shared, noisy 2-core machine, and they print what they measured.

mod common;

use common::*;
use sha2::Digest;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

/// Channels of the hundred-channel test.
const CHANNELS: usize = 100;
/// Bytes each of its writers sends.
const PER_CHANNEL: u64 = 16 * MIB;
/// Its writers' `--max-backlog`: see `hundred_channels`.
const BACKLOG: u64 = 4 * MIB;

/// Readers of the idle test, and the channels they wait on (two readers each).
const IDLE_READERS: usize = 1000;
const IDLE_CHANNELS: usize = IDLE_READERS / 2;
/// How long the idle test watches the waiting readers.
const WINDOW: Duration = Duration::from_secs(5);

/// Serialises the tests of this file: two of them at once would measure each other.
fn alone() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Raises this process's soft limit on open files to at least `want` (children inherit
/// it: the relay needs a descriptor per connection). Many shells start with 1,024; the
/// hard limit is usually far higher. Fails the test, saying so, when it is not.
#[allow(unsafe_code)]
fn ensure_open_files(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        if lim.rlim_cur >= want {
            return;
        }
        assert!(
            lim.rlim_max >= want,
            "this test needs {want} open files; the hard limit is {} (raise it: ulimit -Hn)",
            lim.rlim_max
        );
        lim.rlim_cur = want;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
    }
}

/// Feeds `len` bytes of pseudo-random data, distinct for each `seed`, to a process's stdin
/// from a thread, a mebibyte at a time; returns their SHA-256, or `None` if the process
/// stopped taking them.
fn feed_random(p: &mut Proc, len: u64, seed: u64) -> JoinHandle<Option<[u8; 32]>> {
    let mut stdin = p.child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let mut h = sha2::Sha256::new();
        let mut sent = 0u64;
        let mut block = 0u64;
        while sent < len {
            let data = random_bytes((len - sent).min(MIB) as usize, (seed << 32) | block);
            h.update(&data);
            stdin.write_all(&data).ok()?;
            sent += data.len() as u64;
            block += 1;
        }
        Some(h.finalize().into())
    })
}

/// Samples the relay's `used_memory` and RSS every 100 ms until stopped; returns the peaks.
struct MemorySampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, u64)>,
}

impl MemorySampler {
    fn start(relay: &TestRelay) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut admin = relay.admin();
        let pid = relay.pid();
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut used, mut rss) = (0, 0);
            while !done.load(Ordering::Relaxed) {
                // The relay goes away when the test fails: stop quietly then.
                let Ok(info) = redis::cmd("INFO").arg("memory").query::<String>(&mut admin) else {
                    break;
                };
                let now = info
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("INFO memory has used_memory");
                used = used.max(now);
                rss = rss.max(proc_rss(pid).map_or(0, |(r, _)| r));
                std::thread::sleep(Duration::from_millis(100));
            }
            (used, rss)
        });
        Self { stop, thread }
    }

    fn peaks(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Resources a set of processes used: RSS and private RSS summed, CPU time summed.
#[derive(Debug, Clone, Copy)]
struct Usage {
    rss: u64,
    anon: u64,
    cpu: Duration,
    alive: usize,
}

fn usage(pids: &[u32]) -> Usage {
    let mut u = Usage {
        rss: 0,
        anon: 0,
        cpu: Duration::ZERO,
        alive: 0,
    };
    for &pid in pids {
        if let (Some((rss, anon)), Some(cpu)) = (proc_rss(pid), proc_cpu_precise(pid)) {
            u.rss += rss;
            u.anon += anon;
            u.cpu += cpu;
            u.alive += 1;
        }
    }
    u
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// 100 channels at once, each with a writer of 16 MiB and two readers, through one relay:
/// every reader's output must be its writer's input, byte for byte.
fn hundred_channels(kind: RelayKind) {
    let _alone = alone();
    ensure_open_files(4 * 3 * CHANNELS as u64 + 256);
    let relay = TestRelay::start(kind);
    let mut admin = relay.admin();
    let name = |c: usize| format!("load-{c}");
    let started = Instant::now();
    // Readers first, and registered before any writer starts. A reader that finds no session
    // waits for the first and reads it from its first byte; once registered, the writer
    // trims nothing it has not fetched. A reader started after its writer instead would race
    // the trimming of a session bigger than the backlog: it could find the first records
    // gone (and fail, as documented) depending on timing.
    let readers: Vec<_> = (0..CHANNELS)
        .flat_map(|c| [c, c])
        .map(|c| (c, Proc::spawn_hashing(relay.tube(&["read", &name(c)]))))
        .collect();
    wait_until(
        Duration::from_secs(60),
        "two registered readers per channel",
        || (0..CHANNELS).all(|c| registered_readers(&mut admin, &name(c)) == 2),
    );
    let sampler = MemorySampler::start(&relay);
    let baseline = used_memory(&mut admin);
    // `--max-backlog 4M`: with the default 64M, nothing of a 16 MiB session is ever trimmed,
    // so the relay would hold all 1.6 GiB at the end, more than `tube relay`'s default
    // `--max-memory` (a quarter of RAM, at most 1 GiB) allows. With 4M, the relay's memory is
    // bounded by the channels' budgets and the writers wait for their readers: backpressure
    // on 100 channels at once.
    let backlog = format!("{}M", BACKLOG / MIB);
    let writing = Instant::now();
    let mut writers = Vec::new();
    let mut feeders = Vec::new();
    for c in 0..CHANNELS {
        let mut w = Proc::spawn(relay.tube(&["write", &name(c), "--max-backlog", &backlog]));
        feeders.push(feed_random(&mut w, PER_CHANNEL, c as u64 + 1));
        writers.push(w);
    }
    // A writer exits once its feeder is done and everything is on the relay.
    for (c, w) in writers.into_iter().enumerate() {
        let out = w.wait(Duration::from_secs(300));
        assert_eq!(out.code(), Some(0), "writer of {}: {}", name(c), out.stderr);
        assert!(
            out.stderr.is_empty(),
            "writer of {}: {}",
            name(c),
            out.stderr
        );
    }
    let sent: Vec<[u8; 32]> = feeders
        .into_iter()
        .map(|f| f.join().unwrap().expect("every writer took all its input"))
        .collect();
    for (c, (reader, hashed)) in readers {
        let out = reader.wait(Duration::from_secs(300));
        assert_eq!(out.code(), Some(0), "reader of {}: {}", name(c), out.stderr);
        assert!(
            out.stderr.is_empty(),
            "reader of {}: {}",
            name(c),
            out.stderr
        );
        let (hash, len) = hashed.join().unwrap();
        assert_eq!(len, PER_CHANNEL, "bytes out of {}", name(c));
        assert_eq!(hash, sent[c], "the output of {} is not its input", name(c));
    }
    let (elapsed, moving) = (started.elapsed(), writing.elapsed());
    let (peak_used, peak_rss) = sampler.peaks();
    let grown = peak_used.saturating_sub(baseline);
    eprintln!(
        "{kind:?}: {CHANNELS} channels x {} MiB, 2 readers each: {:.1} s in all, {:.1} s from \
         the first writer; relay peak used_memory +{:.1} MiB, peak RSS {:.1} MiB",
        PER_CHANNEL / MIB,
        elapsed.as_secs_f64(),
        moving.as_secs_f64(),
        mib(grown),
        mib(peak_rss),
    );
    // Each channel's budget covers its records and one reply in flight; a record may
    // exceed it by one (see DESIGN.md, Bounded relay memory). Sampling can miss the peak,
    // not exceed it.
    let bound = CHANNELS as u64 * (BACKLOG + 256 * 1024);
    assert!(
        grown <= bound,
        "the relay's data grew by {grown} bytes, over the channels' budgets of {bound}"
    );
}

/// 1,000 readers waiting on channels that have no writer: the relay holds one connection
/// per reader, and neither the relay nor the readers grow or spin while they wait. Then
/// writers on three of the channels show the readers were waiting, not wedged, and SIGTERM
/// stops all the others cleanly, leaving nothing of them on the relay.
fn thousand_idle_readers(kind: RelayKind) {
    let _alone = alone();
    // Three pipes here per reader, a connection each in the relay, and some to spare.
    ensure_open_files(4 * IDLE_READERS as u64 + 256);
    let relay = TestRelay::start(kind);
    let mut admin = relay.admin();
    let relay_pid = relay.pid();
    let name = |c: usize| format!("idle-{c}");
    // The admin connection above is the only other client.
    let others = 1;
    assert_eq!(
        info_field(&mut admin, "clients", "connected_clients"),
        others
    );
    let (relay_rss_before, _) = proc_rss(relay_pid).unwrap();
    let spawning = Instant::now();
    let mut readers: Vec<(usize, Proc)> = (0..IDLE_READERS)
        .map(|i| {
            let c = i % IDLE_CHANNELS;
            (c, Proc::spawn(relay.tube(&["read", &name(c)])))
        })
        .collect();
    let pids: Vec<u32> = readers.iter().map(|(_, p)| p.child.id()).collect();
    // A reader has registered (its channel's readers hash and its own position key exist)
    // once it is connected and about to wait.
    wait_until(Duration::from_secs(180), "every reader registered", || {
        let keys: usize = redis::cmd("DBSIZE").query(&mut admin).unwrap();
        keys == IDLE_CHANNELS + IDLE_READERS
    });
    let ready = spawning.elapsed();
    // Past every reader's first heartbeats (every 2 s) and timed-out blocking reads (every
    // 1 s): what a waiting reader costs once is in place before the window.
    std::thread::sleep(Duration::from_secs(5));

    let conns_before = info_field(&mut admin, "stats", "total_connections_received");
    let relay_cpu_before = proc_cpu(relay_pid).unwrap();
    let readers_before = usage(&pids);
    let window = Instant::now();
    let (mut fewest, mut most) = (u64::MAX, 0);
    let (mut relay_rss_low, mut relay_rss_peak) = (u64::MAX, 0);
    while window.elapsed() < WINDOW {
        let connected = info_field(&mut admin, "clients", "connected_clients");
        fewest = fewest.min(connected);
        most = most.max(connected);
        let (rss, _) = proc_rss(relay_pid).unwrap();
        relay_rss_low = relay_rss_low.min(rss);
        relay_rss_peak = relay_rss_peak.max(rss);
        std::thread::sleep(Duration::from_millis(100));
    }
    let relay_cpu = proc_cpu(relay_pid).unwrap() - relay_cpu_before;
    let readers_after = usage(&pids);
    let span = window.elapsed().as_secs_f64();
    let conns_during = info_field(&mut admin, "stats", "total_connections_received") - conns_before;
    let readers_cpu = readers_after.cpu.saturating_sub(readers_before.cpu);
    let n = IDLE_READERS as u64;
    eprintln!(
        "{kind:?}: {IDLE_READERS} readers on {IDLE_CHANNELS} channels registered in {:.1} s; \
         over {span:.1} s: relay connections {fewest}..={most} ({conns_during} new), relay RSS \
         {:.1} MiB before the readers, {:.1}..={:.1} MiB with them, relay CPU {:.1}% of a \
         core; readers RSS {:.1} MiB ({:.2} MiB each, private {:.2} MiB each, private \
         {:+.2} MiB in all over the window), readers CPU {:.1}% of a core together",
        ready.as_secs_f64(),
        mib(relay_rss_before),
        mib(relay_rss_low),
        mib(relay_rss_peak),
        100.0 * relay_cpu.as_secs_f64() / span,
        mib(readers_after.rss),
        mib(readers_after.rss / n),
        mib(readers_after.anon / n),
        (readers_after.anon as f64 - readers_before.anon as f64) / MIB as f64,
        100.0 * readers_cpu.as_secs_f64() / span,
    );
    // Every reader alive and connected through the window, each on one connection: its
    // fetches, heartbeats and registration share one multiplexed connection.
    assert_eq!(
        readers_after.alive, IDLE_READERS,
        "readers exited while waiting"
    );
    assert_eq!(
        (fewest, most),
        (n + others, n + others),
        "one connection per reader, all the time"
    );
    assert_eq!(conns_during, 0, "no reconnecting while idle");
    // Relay memory. Measured with 1,000 waiting readers: redis-server +8 to +11 MiB,
    // `tube relay` +22 to +25 MiB, creeping on to +34 MiB over ten minutes (not a leak per
    // request: see RELIABILITY.md, Load). 64 KiB per reader is 2.5 times the most seen
    // here. Within the window, either relay rose by 1.2 to 3.5 MiB; 8 MiB still
    // catches a leak of a kilobyte per request (about 1,500 requests a second).
    let relay_grown = relay_rss_peak.saturating_sub(relay_rss_before);
    assert!(
        relay_grown <= n * 64 * 1024,
        "the relay grew by {:.1} MiB for {n} idle readers",
        mib(relay_grown)
    );
    assert!(
        relay_rss_peak - relay_rss_low <= 8 * MIB,
        "the relay's RSS moved from {:.1} to {:.1} MiB while idle",
        mib(relay_rss_low),
        mib(relay_rss_peak)
    );
    // Reader memory. A waiting reader measured 7.3 MiB of RSS, mostly the binary's pages,
    // and 0.8 MiB private; 16 and 4 leave room for a different build or allocator. Over
    // the window, private memory grew by about 4 KiB per reader; 64 KiB is the bound.
    assert!(
        readers_after.rss <= n * 16 * MIB && readers_after.anon <= n * 4 * MIB,
        "readers' RSS {:.1} MiB, private {:.1} MiB",
        mib(readers_after.rss),
        mib(readers_after.anon)
    );
    assert!(
        readers_after.anon <= readers_before.anon + n * 64 * 1024,
        "the readers' private memory grew from {:.1} to {:.1} MiB while idle",
        mib(readers_before.anon),
        mib(readers_after.anon)
    );
    // CPU. Waiting costs a blocking read per second and a heartbeat every two: measured
    // 5-6% of a core for `tube relay`, 3% for redis-server, 12-15% for all readers.
    assert!(
        relay_cpu.as_secs_f64() < 0.5 * span,
        "the relay used {relay_cpu:?} of CPU in {span:.1} s of idle readers"
    );
    assert!(
        readers_cpu.as_secs_f64() < 1.0 * span,
        "the idle readers used {readers_cpu:?} of CPU in {span:.1} s"
    );

    // Writers on three of the channels: their readers get the data byte-exact.
    let woken = [0, IDLE_CHANNELS / 2, IDLE_CHANNELS - 1];
    for &c in &woken {
        let data = random_bytes(MIB as usize, 1000 + c as u64);
        let w = write_all(&relay, &name(c), &data, &[]);
        assert_eq!(w.code(), Some(0), "writer of {}: {}", name(c), w.stderr);
        let (mine, rest): (Vec<_>, Vec<_>) = readers.into_iter().partition(|(rc, _)| *rc == c);
        readers = rest;
        assert_eq!(mine.len(), 2);
        for (_, r) in mine {
            let out = r.wait(Duration::from_secs(30));
            assert_eq!(out.code(), Some(0), "reader of {}: {}", name(c), out.stderr);
            assert_eq!(sha256(&out.stdout), sha256(&data), "reader of {}", name(c));
        }
    }

    // SIGTERM to all the others: each stops with 143 (README, Exit status), having written
    // nothing, and takes its registration back.
    assert_eq!(readers.len(), IDLE_READERS - 2 * woken.len());
    for (_, r) in &readers {
        r.signal(libc::SIGTERM);
    }
    for (c, r) in readers {
        let out = r.wait_open(Duration::from_secs(30));
        assert_eq!(
            out.code(),
            Some(143),
            "reader of {}: {}",
            name(c),
            out.stderr
        );
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "reader of {}: {}",
            name(c),
            out.stderr
        );
    }
    // The relay is left with the admin connection and the written channels' sessions:
    // nothing of the readers, which no writer will ever come to clean up.
    assert_eq!(
        info_field(&mut admin, "clients", "connected_clients"),
        others
    );
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).unwrap();
    keys.sort();
    let mut expected: Vec<String> = woken
        .iter()
        .flat_map(|&c| ["meta", "stream"].map(|k| format!("tube:{{{}}}:{k}", name(c))))
        .collect();
    expected.sort();
    assert_eq!(keys, expected, "keys left on the relay");
}

/// A waiting reader stopped by SIGTERM removes its registration before it exits; one killed
/// with SIGKILL leaves it to expire, 12 s after its last heartbeat. Either used to leave its
/// entry in the channel's readers hash, which had no expiry until a writer came: on a channel
/// that never gets one, for ever.
fn a_stopped_waiting_reader_leaves_nothing(kind: RelayKind, sig: i32) {
    let _alone = alone();
    let relay = TestRelay::start(kind);
    let mut admin = relay.admin();
    let keys = |admin: &mut redis::Connection| -> Vec<String> {
        redis::cmd("KEYS").arg("*").query(admin).unwrap()
    };
    if sig == libc::SIGKILL {
        let reader = Proc::spawn(relay.tube(&["read", "gone"]));
        wait_registered(&relay, "gone");
        reader.signal(sig);
        let _ = reader.wait_open(Duration::from_secs(10));
        wait_until(
            Duration::from_secs(25),
            "the registration to expire",
            || keys(&mut admin).is_empty(),
        );
        return;
    }
    // The reader's connection is held by a blocking read of up to a second; leaving must not
    // queue behind it. Three tries at different points of that second: a reader that waited
    // for the read would pass them all about one time in sixteen.
    for pause in [150, 450, 750] {
        let reader = Proc::spawn(relay.tube(&["read", "gone"]));
        wait_registered(&relay, "gone");
        std::thread::sleep(Duration::from_millis(pause));
        let signalled = Instant::now();
        reader.signal(sig);
        let out = reader.wait_open(Duration::from_secs(10));
        let took = signalled.elapsed();
        assert_eq!(out.code(), Some(143), "{}", out.stderr);
        let left = keys(&mut admin);
        assert!(left.is_empty(), "left on the relay: {left:?}");
        assert!(
            took < Duration::from_millis(400),
            "exited {took:?} after the signal"
        );
    }
}

relay_tests! {
    fn a_killed_waiting_readers_registration_expires(kind) {
        a_stopped_waiting_reader_leaves_nothing(kind, libc::SIGKILL)
    }
    fn a_hundred_channels_at_once_each_arrive_byte_exact(kind) { hundred_channels(kind) }
    fn a_thousand_idle_readers_hold_one_connection_each_and_stay_bounded(kind) {
        thousand_idle_readers(kind)
    }
    fn a_waiting_reader_stopped_by_sigterm_leaves_nothing_on_the_relay(kind) {
        a_stopped_waiting_reader_leaves_nothing(kind, libc::SIGTERM)
    }
}
