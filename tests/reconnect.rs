//! Connection faults mid-stream: cuts, stalls, relay restarts and data the relay loses. A
//! writer and its readers must come back and go on with nothing lost, repeated or
//! reordered, report exactly what the relay lost, and give up clearly when the relay stays
//! away longer than `--retry-for`.

mod common;

use common::faults::{Direction, FaultProxy};
use common::*;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

/// A `tube` command that reaches `relay` through `proxy`.
fn via(relay: &TestRelay, proxy: &FaultProxy, args: &[&str]) -> Command {
    let mut c = relay.tube(args);
    c.env("TUBE_URL", proxy.url());
    c
}

/// The offset the channel's (single) reader last reported: the bytes it has fetched.
fn reader_offset(admin: &mut redis::Connection, channel: &str) -> Option<u64> {
    let ids: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("tube:{{{channel}}}:readers"))
        .query(admin)
        .ok()?;
    let id = ids.first()?;
    let pos: Option<String> = redis::cmd("GET")
        .arg(format!("tube:{{{channel}}}:reader:{id}"))
        .query(admin)
        .ok()?;
    pos?.split_once(' ')?.1.parse().ok()
}

/// The byte from which a reader says the relay lost `channel`'s data.
fn lost_at(stderr: &str, channel: &str) -> usize {
    let prefix = format!("data lost on channel {channel}: missing from byte ");
    let at = stderr
        .find(&prefix)
        .unwrap_or_else(|| panic!("no loss reported: {stderr}"));
    let rest = &stderr[at + prefix.len()..];
    rest[..rest.find(':').expect("a colon after the byte")]
        .parse()
        .expect("a byte offset")
}

/// Lines that announce an outage.
fn outages(stderr: &str) -> usize {
    stderr.matches("; reconnecting for up to").count()
}

/// Waits for the writer and for the reader whose output `hashed` hashes; checks that both
/// exit 0 and that the output is `data`. Returns their outputs.
fn assert_exact(
    writer: Proc,
    reader: Proc,
    hashed: std::thread::JoinHandle<([u8; 32], u64)>,
    data: &[u8],
    limit: Duration,
) -> (Output, Output) {
    let w = writer.wait(limit);
    let r = reader.wait(limit);
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let (digest, len) = hashed.join().unwrap();
    assert_eq!(len, data.len() as u64);
    assert_eq!(digest, sha256(data), "the output differs from the input");
    (w, r)
}

/// Starts a reader (with `--retry-for retry`) and a writer of 64 KiB records on `channel`,
/// writes `first`, and stops the reader (SIGSTOP) once it has fetched all of it.
fn stopped_reader(relay: &TestRelay, channel: &str, first: &[u8], retry: &str) -> (Proc, Proc) {
    let reader = Proc::spawn(relay.tube(&["read", channel, "--retry-for", retry]));
    wait_registered(relay, channel);
    let mut writer = Proc::spawn(relay.tube(&["write", channel, "--chunk-size", "64k"]));
    writer.stdin().write_all(first).unwrap();
    writer.stdin().flush().unwrap();
    let mut admin = relay.admin();
    wait_until(Duration::from_secs(20), "the first part read", || {
        reader_offset(&mut admin, channel) == Some(first.len() as u64)
    });
    reader.signal(libc::SIGSTOP);
    (reader, writer)
}

/// Feeds `data` to the process's stdin from a thread, then closes it.
fn feed(proc: &mut Proc, data: std::sync::Arc<Vec<u8>>) -> std::thread::JoinHandle<()> {
    let mut stdin = proc.child.stdin.take().expect("stdin");
    std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    })
}

relay_tests! {
    fn any_sequence_of_cuts_and_stalls_leaves_the_stream_exact(kind) {
        any_connection_faults_leave_the_stream_exact(kind);
    }

    fn twenty_cuts_in_256_mib_change_nothing(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        let size = 256usize << 20;
        let data = std::sync::Arc::new(random_bytes(size, 71));
        let (reader, hashed) = Proc::spawn_hashing(via(&relay, &proxy, &["read", "cuts"]));
        wait_registered(&relay, "cuts");
        let mut writer = Proc::spawn(via(&relay, &proxy, &["write", "cuts"]));
        let feeder = feed(&mut writer, data.clone());
        // Cut every connection when the bytes sent towards the relay pass each of 20 random
        // points (resent bytes count too, so every point is passed before the writer ends).
        let mut rng = rand::rngs::StdRng::seed_from_u64(72);
        let mut points: Vec<u64> =
            (0..20).map(|_| rng.random_range(size as u64 / 50..size as u64 * 49 / 50)).collect();
        points.sort_unstable();
        let started = Instant::now();
        for p in &points {
            while proxy.forwarded(Direction::Up) < *p {
                assert!(started.elapsed() < Duration::from_secs(240), "stuck before byte {p}");
                std::thread::sleep(Duration::from_micros(500));
            }
            proxy.cut();
        }
        feeder.join().unwrap();
        let (w, r) = assert_exact(writer, reader, hashed, &data, Duration::from_secs(240));
        // Each outage is announced once (the writer's two connections may each notice one).
        for (who, out) in [("writer", &w), ("reader", &r)] {
            let n = outages(&out.stderr);
            assert!((1..=2 * points.len()).contains(&n), "{who} announced {n} outages:\n{}", out.stderr);
        }
    }

    fn a_cut_while_the_session_is_being_set_up_changes_nothing(kind) {
        // The session's description and begin record go out on the appends' connection,
        // unanswered, with the first appends right behind: cut them all on the way.
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(100));
        let data = std::sync::Arc::new(random_bytes(1 << 20, 74));
        let (reader, hashed) = Proc::spawn_hashing(relay.tube(&["read", "setup"]));
        wait_registered(&relay, "setup");
        let mut writer = Proc::spawn(via(&relay, &proxy, &["write", "setup"]));
        let feeder = feed(&mut writer, data.clone());
        let mut admin = relay.admin();
        wait_until(Duration::from_secs(20), "the writer's lease", || {
            redis::cmd("EXISTS").arg("tube:{setup}:writer").query::<bool>(&mut admin).unwrap()
        });
        // The lease's answer reaches the writer 100 ms after the relay set it, and what the
        // writer sends then reaches the relay 100 ms later.
        std::thread::sleep(Duration::from_millis(150));
        proxy.cut();
        proxy.set_latency(Duration::ZERO);
        feeder.join().unwrap();
        let (w, _) = assert_exact(writer, reader, hashed, &data, Duration::from_secs(60));
        // The description was lost on the way (it cannot land sooner than 200 ms after the
        // lease) and written again after the reconnect.
        assert!(
            w.stderr.contains("does not hold the description of session 1 of setup; writing it again"),
            "{}",
            w.stderr
        );
    }

    fn a_five_second_stall_is_waited_out(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        let data = random_bytes(8 << 20, 73);
        let half = data.len() / 2;
        let reader = Proc::spawn(via(&relay, &proxy, &["read", "stall"]));
        wait_registered(&relay, "stall");
        let mut writer = Proc::spawn(via(&relay, &proxy, &["write", "stall"]));
        writer.stdin().write_all(&data[..half]).unwrap();
        writer.stdin().flush().unwrap();
        let mut admin = relay.admin();
        wait_until(Duration::from_secs(20), "the first half read", || {
            reader_offset(&mut admin, "stall") == Some(half as u64)
        });
        proxy.stall(Duration::from_secs(5));
        let stalled = Instant::now();
        writer.stdin().write_all(&data[half..]).unwrap();
        writer.close_stdin();
        let w = writer.wait(Duration::from_secs(60));
        let r = reader.wait(Duration::from_secs(60));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(stalled.elapsed() >= Duration::from_secs(5), "the stall did not hold the transfer");
        assert!(r.stdout == data, "the output differs from the input");
        // Shorter than the command timeout: waited out on the same connections.
        assert_eq!(outages(&w.stderr) + outages(&r.stderr), 0, "{}\n{}", w.stderr, r.stderr);
    }

    fn a_stall_longer_than_the_command_timeout_replaces_the_connections(kind) {
        // The stalled connections' requests are delivered when the stall ends, after the
        // new connections have sent them again: the stream IDs make the late copies no-ops.
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        let data = random_bytes(16 << 20, 78);
        let (reader, hashed) = Proc::spawn_hashing(via(&relay, &proxy, &["read", "long"]));
        wait_registered(&relay, "long");
        let mut writer = Proc::spawn(via(&relay, &proxy, &["write", "long"]));
        writer.stdin().write_all(&data[..4 << 20]).unwrap();
        writer.stdin().flush().unwrap();
        let mut admin = relay.admin();
        wait_until(Duration::from_secs(20), "the first part on the relay", || {
            stored_payload(&mut admin, "long") == 4 << 20
        });
        // Writes queued while stalled: the relay gets them only when the stall ends.
        proxy.stall(Duration::from_secs(20));
        let feeder = feed(&mut writer, std::sync::Arc::new(data[4 << 20..].to_vec()));
        feeder.join().unwrap();
        let (w, _) = assert_exact(writer, reader, hashed, &data, Duration::from_secs(90));
        assert!(w.stderr.contains("timed out") || w.stderr.contains("timeout"), "{}", w.stderr);
        assert!(w.stderr.contains("reconnected"), "{}", w.stderr);
    }

    fn a_relay_restarted_without_its_data_is_reported_from_the_exact_byte(kind) {
        lost_mid_session(kind, Disaster::Restart);
    }

    fn a_flushed_relay_is_reported_from_the_exact_byte(kind) {
        lost_mid_session(kind, Disaster::Flush);
    }

    fn a_deleted_stream_is_reported_from_the_exact_byte(kind) {
        lost_mid_session(kind, Disaster::DeleteStream);
    }

    fn a_finished_session_the_relay_lost_is_reported_not_called_vanished(kind) {
        let relay = TestRelay::start(kind);
        // The second part is more than one read's worth, so the relay cannot have handed all
        // of it to the stopped reader.
        let data = random_bytes(10 << 20, 75);
        let first = 1 << 20;
        let (reader, mut writer) = stopped_reader(&relay, "gone", &data[..first], "2s");
        writer.stdin().write_all(&data[first..]).unwrap();
        writer.close_stdin();
        assert_eq!(writer.wait(Duration::from_secs(30)).code(), Some(0));
        let mut relay = relay;
        relay.restart();
        reader.signal(libc::SIGCONT);
        let r = reader.wait(Duration::from_secs(60));
        assert_eq!(r.code(), Some(6), "{}", r.stderr);
        let at = lost_at(&r.stderr, "gone");
        assert!((first..data.len()).contains(&at), "lost from byte {at}: {}", r.stderr);
        assert!(r.stdout == data[..at], "the reader wrote {} bytes, lost from {at}", r.stdout.len());
        assert!(r.stderr.contains("the relay no longer holds record"), "{}", r.stderr);
    }

    fn a_relay_down_longer_than_retry_for_is_a_clear_error(kind) {
        let mut relay = TestRelay::start(kind);
        let reader = Proc::spawn(relay.tube(&["read", "down", "--retry-for", "2s"]));
        wait_registered(&relay, "down");
        let mut writer = Proc::spawn(relay.tube(&["write", "down", "--retry-for", "2s"]));
        writer.stdin().write_all(&[7u8; 100_000]).unwrap();
        writer.stdin().flush().unwrap();
        let mut admin = relay.admin();
        wait_until(Duration::from_secs(20), "the data read", || {
            reader_offset(&mut admin, "down") == Some(100_000)
        });
        relay.kill();
        let killed = Instant::now();
        writer.stdin().write_all(&[8u8; 100_000]).unwrap();
        let w = writer.wait_open(Duration::from_secs(30));
        let r = reader.wait(Duration::from_secs(30));
        assert!(killed.elapsed() < Duration::from_secs(25), "took {:?}", killed.elapsed());
        for (who, out) in [("writer", &w), ("reader", &r)] {
            assert_eq!(out.code(), Some(1), "{who}: {}", out.stderr);
            assert!(
                out.stderr.contains("could not reconnect within 2 s"),
                "{who}: {}",
                out.stderr
            );
            assert_eq!(outages(&out.stderr), 1, "{who} should say it once:\n{}", out.stderr);
            assert!(!out.stderr.contains("panicked"), "{who}: {}", out.stderr);
        }
    }
}

/// A connection fault, applied when the bytes sent towards the relay pass a point.
#[derive(Debug, Clone)]
enum ConnFault {
    Cut,
    Stall(Duration),
}

/// Property: any sequence of cuts and stalls, at any points of a transfer, yields exactly the
/// stream that was written (and both ends exit 0).
fn any_connection_faults_leave_the_stream_exact(kind: RelayKind) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let relay = TestRelay::start(kind);
    let case = std::sync::atomic::AtomicU32::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 6,
        failure_persistence: None,
        ..Config::default()
    });
    let fault = prop_oneof![
        Just(ConnFault::Cut),
        (50u64..2_000).prop_map(|ms| ConnFault::Stall(Duration::from_millis(ms))),
    ];
    let strategy = (
        1usize..(6 << 20),
        proptest::collection::vec((0u64..1_000, fault), 1..6),
    );
    runner
        .run(&strategy, |(len, mut faults)| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let channel = format!("f{n}");
            let proxy = FaultProxy::start(relay.port);
            let data = std::sync::Arc::new(random_bytes(len, u64::from(n)));
            let (reader, hashed) = Proc::spawn_hashing(via(&relay, &proxy, &["read", &channel]));
            wait_registered(&relay, &channel);
            let mut writer = Proc::spawn(via(
                &relay,
                &proxy,
                &["write", &channel, "--chunk-size", "64k"],
            ));
            let feeder = feed(&mut writer, data.clone());
            faults.sort_by_key(|(at, _)| *at);
            let started = Instant::now();
            for (permille, f) in &faults {
                let at = len as u64 * permille / 1_000;
                while proxy.forwarded(Direction::Up) < at
                    && started.elapsed() < Duration::from_secs(60)
                {
                    std::thread::sleep(Duration::from_micros(500));
                }
                match f {
                    ConnFault::Cut => proxy.cut(),
                    ConnFault::Stall(d) => proxy.stall(*d),
                }
            }
            feeder.join().unwrap();
            let w = writer.wait(Duration::from_secs(120));
            let r = reader.wait(Duration::from_secs(120));
            let (digest, got) = hashed.join().unwrap();
            prop_assert_eq!(w.code(), Some(0), "{:?}: {}", faults, w.stderr);
            prop_assert_eq!(r.code(), Some(0), "{:?}: {}", faults, r.stderr);
            prop_assert_eq!(got, len as u64, "{:?}", faults);
            prop_assert!(digest == sha256(&data), "{:?}: the output differs", faults);
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_redis_restarted_with_persistence_loses_nothing() {
    let spec = RelaySpec {
        extra: ["--appendonly", "yes", "--appendfsync", "always"]
            .map(String::from)
            .to_vec(),
        ..RelaySpec::default()
    };
    let mut relay = TestRelay::start_with(RelayKind::Redis, spec);
    let data = random_bytes(8 << 20, 76);
    let half = data.len() / 2;
    let reader = Proc::spawn(relay.tube(&["read", "kept"]));
    wait_registered(&relay, "kept");
    let mut writer = Proc::spawn(relay.tube(&["write", "kept"]));
    writer.stdin().write_all(&data[..half]).unwrap();
    writer.stdin().flush().unwrap();
    let mut admin = relay.admin();
    wait_until(
        Duration::from_secs(20),
        "the first half on the relay",
        || stored_payload(&mut admin, "kept") == half as u64,
    );
    relay.restart();
    writer.stdin().write_all(&data[half..]).unwrap();
    writer.close_stdin();
    let w = writer.wait(Duration::from_secs(60));
    let r = reader.wait(Duration::from_secs(60));
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.stdout == data, "the output differs from the input");
    assert!(
        r.stderr.contains("reconnected to the relay"),
        "{}",
        r.stderr
    );
}

#[derive(Debug, Clone, Copy)]
enum Disaster {
    /// The relay restarts with nothing.
    Restart,
    /// FLUSHALL.
    Flush,
    /// The channel's stream key is deleted.
    DeleteStream,
}

/// The relay loses records a stopped reader has not read while the writer goes on: the
/// reader writes out exactly what it had and names the first missing byte; the writer
/// carries on.
fn lost_mid_session(kind: RelayKind, disaster: Disaster) {
    let mut relay = TestRelay::start(kind);
    // The second part is more than the reader asks for at once (one read's worth, or the
    // reads a following reader keeps waiting), so the relay cannot have handed all of it to
    // the stopped reader.
    let data = random_bytes(12 << 20, 74);
    let (a1, a2) = (1 << 20, 10 << 20);
    let (reader, mut writer) = stopped_reader(&relay, "lossy", &data[..a1], "10s");
    let mut admin = relay.admin();
    writer.stdin().write_all(&data[a1..a2]).unwrap();
    writer.stdin().flush().unwrap();
    wait_until(
        Duration::from_secs(20),
        "the second part on the relay",
        || stored_payload(&mut admin, "lossy") == a2 as u64,
    );
    match disaster {
        Disaster::Restart => relay.restart(),
        Disaster::Flush => redis::cmd("FLUSHALL").exec(&mut admin).unwrap(),
        Disaster::DeleteStream => redis::cmd("DEL")
            .arg("tube:{lossy}:stream")
            .exec(&mut admin)
            .unwrap(),
    }
    reader.signal(libc::SIGCONT);
    writer.stdin().write_all(&data[a2..]).unwrap();
    writer.close_stdin();
    let w = writer.wait(Duration::from_secs(60));
    let r = reader.wait(Duration::from_secs(60));
    assert_eq!(w.code(), Some(0), "{disaster:?}: {}", w.stderr);
    assert_eq!(r.code(), Some(6), "{disaster:?}: {}", r.stderr);
    // The relay may have answered a read of the stopped reader with a little of the second
    // part before the loss: the reader names the byte where its data ends.
    let at = lost_at(&r.stderr, "lossy");
    assert!(
        (a1..a2).contains(&at),
        "{disaster:?}: lost from byte {at}: {}",
        r.stderr
    );
    assert!(
        r.stdout == data[..at],
        "{disaster:?}: the reader wrote {} bytes, lost from {at}",
        r.stdout.len()
    );
    // The channel still works.
    let again = random_bytes(10_000, 77);
    let w = write_all(&relay, "lossy", &again, &[]);
    assert_eq!(w.code(), Some(0), "{disaster:?}: {}", w.stderr);
    assert_eq!(read_all(&relay, "lossy", &[]).stdout, again);
}
