//! The core pipe, end to end: the real `tube` binary against real relays.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

fn transfer_is_byte_exact(kind: RelayKind, len: usize) {
    let relay = TestRelay::start(kind);
    let data = random_bytes(len, len as u64);
    let w = write_all(&relay, "bytes", &data, &[]);
    assert_eq!(w.code(), Some(0), "writer failed: {}", w.stderr);
    let r = read_all(&relay, "bytes", &[]);
    assert_eq!(r.code(), Some(0), "reader failed: {}", r.stderr);
    assert_eq!(r.stdout.len(), data.len());
    assert_eq!(sha256(&r.stdout), sha256(&data));
    assert!(
        w.stderr.is_empty() && r.stderr.is_empty(),
        "unexpected stderr: {} {}",
        w.stderr,
        r.stderr
    );
}

/// Streams `len` pseudo-random bytes through a writer and a concurrent reader, hashing both
/// sides without holding the data in memory.
fn large_transfer_is_byte_exact(kind: RelayKind, len: u64) {
    let relay = TestRelay::start(kind);
    let (reader, hashed) = Proc::spawn_hashing(relay.tube(&["read", "big"]));
    let mut writer = Proc::spawn(relay.tube(&["write", "big"]));
    let mut stdin = writer.child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut sent = 0u64;
        let mut seed = 1;
        while sent < len {
            let block = random_bytes((len - sent).min(1 << 20) as usize, seed);
            seed += 1;
            h.update(&block);
            stdin.write_all(&block).unwrap();
            sent += block.len() as u64;
        }
        <[u8; 32]>::from(h.finalize())
    });
    let sent_hash = feeder.join().unwrap();
    let w = writer.wait(Duration::from_secs(300));
    assert_eq!(w.code(), Some(0), "writer failed: {}", w.stderr);
    let r = reader.wait(Duration::from_secs(300));
    assert_eq!(r.code(), Some(0), "reader failed: {}", r.stderr);
    let (got_hash, got_len) = hashed.join().unwrap();
    assert_eq!(got_len, len);
    assert_eq!(got_hash, sent_hash);
}

relay_tests! {
    fn empty_stream_round_trips(kind) { transfer_is_byte_exact(kind, 0) }
    fn one_byte_round_trips(kind) { transfer_is_byte_exact(kind, 1) }
    fn odd_size_round_trips(kind) { transfer_is_byte_exact(kind, 65535) }
    fn one_mebibyte_round_trips(kind) { transfer_is_byte_exact(kind, 1 << 20) }
    fn quarter_gibibyte_streams_byte_exact(kind) { large_transfer_is_byte_exact(kind, 256 << 20) }

    fn many_small_pipelined_records_stay_in_order(kind) {
        // Thousands of appends in flight at once: none may overtake another.
        let relay = TestRelay::start(kind);
        // Written before any reader comes: it must fit the default backlog.
        let data = random_bytes(24 << 20, 48);
        let w = write_all(&relay, "small", &data, &["--chunk-size", "4k", "--window", "64"]);
        assert_eq!(w.code(), Some(0), "writer failed: {}", w.stderr);
        let r = read_all(&relay, "small", &[]);
        assert_eq!(r.code(), Some(0), "reader failed: {}", r.stderr);
        assert_eq!(sha256(&r.stdout), sha256(&data));
    }

    fn every_key_lives_under_the_prefix_and_one_hash_tag(kind) {
        let relay = TestRelay::start(kind);
        let mut w = Proc::spawn(relay.tube(&["write", "--prefix", "lab:", "probe"]));
        w.stdin().write_all(b"data").unwrap();
        let mut admin = relay.admin();
        wait_until(Duration::from_secs(10), "the session", || {
            redis::cmd("EXISTS").arg("lab:{probe}:stream").query::<u64>(&mut admin).unwrap_or(0) == 1
        });
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).unwrap();
        keys.sort();
        assert_eq!(keys, ["lab:{probe}:meta", "lab:{probe}:stream", "lab:{probe}:writer"]);
        assert_eq!(w.wait(Duration::from_secs(10)).code(), Some(0));
        let r = read_all(&relay, "probe", &["--prefix", "lab:"]);
        assert_eq!(r.stdout, b"data");
        // Under the default prefix the channel does not exist: the reader waits for it.
        let mut other = Proc::spawn(relay.tube(&["read", "probe"]));
        std::thread::sleep(Duration::from_millis(500));
        assert!(other.running());
    }

    fn reader_started_before_writer_waits_for_it(kind) {
        let relay = TestRelay::start(kind);
        let reader = Proc::spawn(relay.tube(&["read", "early"]));
        std::thread::sleep(Duration::from_millis(300));
        let data = random_bytes(300_000, 7);
        let w = write_all(&relay, "early", &data, &[]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = reader.wait(Duration::from_secs(30));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, data);
    }

    fn reader_joining_a_running_session_gets_it_from_the_first_byte(kind) {
        let relay = TestRelay::start(kind);
        let mut writer = Proc::spawn(relay.tube(&["write", "mid"]));
        writer.stdin().write_all(b"first part;").unwrap();
        wait_for_session(&relay, "mid");
        std::thread::sleep(Duration::from_millis(200));
        let reader = Proc::spawn(relay.tube(&["read", "mid"]));
        std::thread::sleep(Duration::from_millis(200));
        writer.stdin().write_all(b"second part").unwrap();
        let w = writer.wait(Duration::from_secs(30));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = reader.wait(Duration::from_secs(30));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, b"first part;second part");
    }

    fn reader_after_the_session_ended_gets_the_latest_session(kind) {
        let relay = TestRelay::start(kind);
        assert_eq!(write_all(&relay, "late", b"old session", &[]).code(), Some(0));
        assert_eq!(write_all(&relay, "late", b"new session", &[]).code(), Some(0));
        let r = read_all(&relay, "late", &[]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, b"new session");
    }

    fn three_concurrent_readers_each_get_the_whole_stream(kind) {
        let relay = TestRelay::start(kind);
        let readers: Vec<_> = (0..3).map(|_| Proc::spawn(relay.tube(&["read", "fan"]))).collect();
        let data = random_bytes(5 << 20, 3);
        let w = write_all(&relay, "fan", &data, &[]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        for r in readers {
            let out = r.wait(Duration::from_secs(60));
            assert_eq!(out.code(), Some(0), "{}", out.stderr);
            assert_eq!(sha256(&out.stdout), sha256(&data));
        }
    }

    fn follow_goes_on_into_later_sessions(kind) {
        let relay = TestRelay::start(kind);
        let mut reader = Proc::spawn(relay.tube(&["read", "--follow", "tail"]));
        assert_eq!(write_all(&relay, "tail", b"one\n", &[]).code(), Some(0));
        assert_eq!(write_all(&relay, "tail", b"two\n", &[]).code(), Some(0));
        std::thread::sleep(Duration::from_millis(500));
        assert!(reader.running(), "--follow must not end with a session");
        reader.signal(libc::SIGINT);
        let r = reader.wait(Duration::from_secs(10));
        assert_eq!(r.stdout, b"one\ntwo\n");
        assert_eq!(r.code(), Some(130));
    }

    fn second_writer_is_refused_while_the_first_lives(kind) {
        let relay = TestRelay::start(kind);
        let mut first = Proc::spawn(relay.tube(&["write", "solo"]));
        first.stdin().write_all(b"x").unwrap();
        wait_for_session(&relay, "solo");
        let second = write_all(&relay, "solo", b"intruder", &[]);
        assert_eq!(second.code(), Some(1));
        assert!(second.stderr.contains("solo") && second.stderr.contains("writer"), "{}", second.stderr);
        let w = first.wait(Duration::from_secs(10));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = read_all(&relay, "solo", &[]);
        assert_eq!(r.stdout, b"x");
    }

    fn killed_writer_frees_the_channel_and_its_reader_reports_the_loss(kind) {
        let relay = TestRelay::start(kind);
        let mut writer = Proc::spawn(relay.tube(&["write", "cam"]));
        // A reader waits --retry-for for a writer whose lease lapsed (it may be reconnecting).
        let reader = Proc::spawn(relay.tube(&["read", "cam", "--retry-for", "2s"]));
        let data = random_bytes(1_234_567, 11);
        writer.stdin().write_all(&data).unwrap();
        writer.stdin().flush().unwrap();
        // Wait until the relay holds all of it, then kill the writer without warning.
        let mut admin = relay.admin();
        wait_until(Duration::from_secs(20), "the data on the relay", || {
            stored_payload(&mut admin, "cam") == data.len() as u64
        });
        writer.signal(libc::SIGKILL);
        let killed = Instant::now();
        // The channel is free again within 10 s of the kill (the lease lapses after 8 s).
        let mut retry = 0;
        loop {
            let w = write_all(&relay, "cam", b"again", &[]);
            if w.code() == Some(0) {
                break;
            }
            retry += 1;
            assert!(killed.elapsed() < Duration::from_secs(10), "channel not freed: {}", w.stderr);
            std::thread::sleep(Duration::from_millis(250 + retry));
        }
        assert!(killed.elapsed() < Duration::from_secs(10));
        // The reader learns it from the new writer's lease or session, or after its
        // --retry-for, whichever comes first.
        let r = reader.wait(Duration::from_secs(30));
        assert_eq!(r.code(), Some(4), "{}", r.stderr);
        assert!(r.stderr.contains("writer of cam vanished after 1234567 bytes"), "{}", r.stderr);
        assert_eq!(sha256(&r.stdout), sha256(&data));
    }

    fn sigterm_on_the_writer_interrupts_the_session(kind) {
        let relay = TestRelay::start(kind);
        let mut writer = Proc::spawn(relay.tube(&["write", "stop"]));
        let reader = Proc::spawn(relay.tube(&["read", "stop"]));
        writer.stdin().write_all(b"partial data").unwrap();
        writer.stdin().flush().unwrap();
        let mut admin = relay.admin();
        wait_until(Duration::from_secs(10), "the data on the relay", || {
            redis::cmd("XLEN").arg("tube:{stop}:stream").query::<u64>(&mut admin).unwrap_or(0) >= 2
        });
        writer.signal(libc::SIGTERM);
        let w = writer.wait_open(Duration::from_secs(10));
        assert_eq!(w.code(), Some(143), "{}", w.stderr);
        let r = reader.wait(Duration::from_secs(10));
        assert_eq!(r.stdout, b"partial data");
        assert_eq!(r.code(), Some(3), "{}", r.stderr);
        assert!(r.stderr.contains("interrupted after 12 bytes"), "{}", r.stderr);
    }

    fn reader_whose_stdout_closes_early_exits_quietly(kind) {
        let relay = TestRelay::start(kind);
        let data = random_bytes(8 << 20, 5);
        assert_eq!(write_all(&relay, "head", &data, &[]).code(), Some(0));
        let cmd = format!("{} read head | head -c 100 > /dev/null; echo \"${{PIPESTATUS[0]}}\"", tube_bin().display());
        let mut sh = std::process::Command::new("bash");
        sh.args(["-c", &cmd]).env("TUBE_URL", relay.url());
        let out = Proc::spawn(sh).wait(Duration::from_secs(30));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{}", out.stderr);
        assert!(out.stderr.is_empty(), "unexpected stderr: {}", out.stderr);
    }

    fn a_gap_in_the_stream_is_an_error(kind) {
        let relay = TestRelay::start(kind);
        let data = random_bytes(1 << 20, 9);
        assert_eq!(write_all(&relay, "gap", &data, &["--chunk-size", "64k"]).code(), Some(0));
        let mut admin = relay.admin();
        // Records follow the pipe's reads, so count the bytes before the gap as stored.
        let before: Vec<Entry> = redis::cmd("XRANGE").arg("tube:{gap}:stream").arg("1-1").arg("1-4").query(&mut admin).unwrap();
        let prefix: usize = before.iter().map(|(_, f)| f[0].1.len() - 28).sum();
        let removed: u64 = redis::cmd("XDEL").arg("tube:{gap}:stream").arg("1-5").query(&mut admin).unwrap();
        assert_eq!(removed, 1);
        let r = read_all(&relay, "gap", &[]);
        assert_eq!(r.code(), Some(6), "{}", r.stderr);
        assert!(r.stderr.contains("expected record 1-5, found 1-6"), "{}", r.stderr);
        assert!(r.stderr.contains(&format!("data lost on channel gap: missing from byte {prefix}:")), "{}", r.stderr);
        assert_eq!(r.stdout, &data[..prefix], "everything before the gap is written out");
    }

    fn a_session_whose_records_were_deleted_is_reported_not_awaited(kind) {
        let relay = TestRelay::start(kind);
        assert_eq!(write_all(&relay, "gone", b"soon lost", &[]).code(), Some(0));
        let mut admin = relay.admin();
        let _: () = redis::cmd("DEL").arg("tube:{gone}:stream").query(&mut admin).unwrap();
        let r = read_all(&relay, "gone", &[]);
        assert_eq!(r.code(), Some(6), "{}", r.stderr);
        assert!(r.stderr.contains("session 1 is no longer on the relay"), "{}", r.stderr);
        assert!(r.stdout.is_empty());
    }

    fn a_flipped_byte_fails_the_digest(kind) {
        let relay = TestRelay::start(kind);
        assert_eq!(write_all(&relay, "flip", b"0123456789", &[]).code(), Some(0));
        let mut admin = relay.admin();
        // Rebuild the stream with one payload byte changed (entries keep their IDs).
        let entries: Vec<Entry> =
            redis::cmd("XRANGE").arg("tube:{flip}:stream").arg("-").arg("+").query(&mut admin).unwrap();
        let _: () = redis::cmd("DEL").arg("tube:{flip}:stream").query(&mut admin).unwrap();
        for (id, fields) in entries {
            let mut value = fields[0].1.clone();
            if id == "1-1" {
                value[28] ^= 1; // the first payload byte, after the 28-byte data prefix
            }
            let _: String = redis::cmd("XADD").arg("tube:{flip}:stream").arg(&id).arg("r").arg(value).query(&mut admin).unwrap();
        }
        let r = read_all(&relay, "flip", &[]);
        assert_eq!(r.code(), Some(5), "{}", r.stderr);
        assert!(r.stderr.contains("digest does not match"), "{}", r.stderr);
    }

    fn foreign_keys_are_refused_and_left_alone(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        let _: () = redis::cmd("SET").arg("tube:{mine}:stream").arg("someone's data").query(&mut admin).unwrap();
        let w = write_all(&relay, "mine", b"data", &[]);
        assert_eq!(w.code(), Some(1));
        assert!(w.stderr.contains("tube:{mine}:stream") && w.stderr.contains("not tube's"), "{}", w.stderr);
        let r = read_all(&relay, "mine", &[]);
        assert_eq!(r.code(), Some(1));
        assert!(r.stderr.contains("not tube's"), "{}", r.stderr);
        let kept: String = redis::cmd("GET").arg("tube:{mine}:stream").query(&mut admin).unwrap();
        assert_eq!(kept, "someone's data");
        let _: () = redis::cmd("RPUSH").arg("tube:{other}:meta").arg("x").query(&mut admin).unwrap();
        let w = write_all(&relay, "other", b"data", &[]);
        assert!(w.stderr.contains("tube:{other}:meta"), "{}", w.stderr);
    }

    fn wrong_password_is_a_clear_error_that_never_shows_the_password(kind) {
        let relay = TestRelay::start_with(kind, RelaySpec { password: Some("right-horse-battery".into()), ..Default::default() });
        let mut cmd = relay.tube(&["write", "locked"]);
        cmd.env("TUBE_PASSWORD", "wrong-staple-secret");
        let started = Instant::now();
        let out = Proc::spawn(cmd).wait(Duration::from_secs(20));
        assert_eq!(out.code(), Some(1));
        assert!(started.elapsed() < Duration::from_secs(6));
        assert!(out.stderr.contains("refused the credentials"), "{}", out.stderr);
        assert!(!out.stderr.contains("wrong-staple-secret"), "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
        // The same with the password in the URL.
        let mut cmd = relay.tube(&["read", "locked", "--url", &format!("redis://:url-secret-pw@127.0.0.1:{}", relay.port)]);
        cmd.env_remove("TUBE_PASSWORD");
        let out = Proc::spawn(cmd).wait(Duration::from_secs(20));
        assert_eq!(out.code(), Some(1));
        assert!(!out.stderr.contains("url-secret-pw"), "{}", out.stderr);
        // And the right one works.
        assert_eq!(write_all(&relay, "locked", b"ok", &[]).code(), Some(0));
    }
}

#[test]
fn unreachable_relay_is_a_clear_error_within_seconds() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = std::process::Command::new(tube_bin());
    cmd.args([
        "read",
        "x",
        "--url",
        &format!("redis://user:topsecret@127.0.0.1:{port}"),
    ]);
    let started = Instant::now();
    let out = Proc::spawn(cmd).wait(Duration::from_secs(20));
    assert_eq!(out.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(
        out.stderr
            .starts_with(&format!("tube: cannot reach the relay at 127.0.0.1:{port}")),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("topsecret"));
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

#[test]
fn a_server_that_is_not_redis_is_named_as_such() {
    // One service that greets first (like SSH) and one that never answers.
    for greeting in [Some(&b"SSH-2.0-OpenSSH_9.2\r\n"[..]), None] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if let Some(g) = greeting {
                s.write_all(g).unwrap();
            }
            std::thread::sleep(Duration::from_secs(8));
        });
        let mut cmd = std::process::Command::new(tube_bin());
        cmd.args(["write", "x", "--url", &format!("redis://127.0.0.1:{port}")]);
        let started = Instant::now();
        let out = Proc::spawn(cmd).wait(Duration::from_secs(20));
        assert_eq!(out.code(), Some(1), "{}", out.stderr);
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{:?}",
            started.elapsed()
        );
        assert!(
            out.stderr.contains("does not answer like a Redis server"),
            "{}",
            out.stderr
        );
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        server.join().unwrap();
    }
}

#[test]
fn bad_channel_names_are_refused_before_connecting() {
    let long = "x".repeat(201);
    for (name, why) in [
        ("", "empty"),
        ("a\nb", "control character"),
        ("a{b}", "brace"),
        (long.as_str(), "201 bytes"),
    ] {
        let mut cmd = std::process::Command::new(tube_bin());
        // Nothing listens on port 1: the name must be refused before any connection.
        cmd.args(["write", name, "--url", "redis://127.0.0.1:1"]);
        let out = Proc::spawn(cmd).wait(Duration::from_secs(10));
        assert_eq!(out.code(), Some(1));
        assert!(
            out.stderr.contains("invalid channel name") && out.stderr.contains(why),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn malformed_urls_are_refused_without_showing_the_password() {
    for url in [
        "http://u:pw-one@host",
        "redis://:pw-two@host:notaport",
        "localhost:6379",
    ] {
        let mut cmd = std::process::Command::new(tube_bin());
        cmd.args(["read", "x", "--url", url]);
        let out = Proc::spawn(cmd).wait(Duration::from_secs(10));
        assert_eq!(out.code(), Some(1));
        assert!(out.stderr.contains("invalid relay URL"), "{}", out.stderr);
        assert!(
            !out.stderr.contains("pw-one") && !out.stderr.contains("pw-two"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn unix_socket_urls_reach_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock");
    let relay = TestRelay::start_with(
        RelayKind::Redis,
        RelaySpec {
            extra: vec!["--unixsocket".into(), sock.display().to_string()],
            ..Default::default()
        },
    );
    wait_until(Duration::from_secs(5), "the socket", || sock.exists());
    let url = format!("unix://{}", sock.display());
    let data = random_bytes(100_000, 4);
    let mut w = relay.tube(&["write", "sock", "--url", &url]);
    w.env_remove("TUBE_URL");
    let mut w = Proc::spawn(w);
    w.stdin().write_all(&data).unwrap();
    assert_eq!(w.wait(Duration::from_secs(20)).code(), Some(0));
    // Read it back over TCP: the same relay, the same channel.
    let r = read_all(&relay, "sock", &[]);
    assert_eq!(r.stdout, data);
}

/// A URL naming a user and a database: both of the writer's connections log in as that user
/// and use that database, and so does the reader.
#[test]
fn a_user_and_a_database_in_the_url_are_used_by_every_connection() {
    let relay = TestRelay::start_with(
        RelayKind::Redis,
        RelaySpec {
            // The default user needs a password of its own, so that only the named user's
            // password lets tube in.
            password: Some("admin-pw".into()),
            extra: [
                "--user",
                "streamer",
                "on",
                ">s3cret-pw",
                "~*",
                "&*",
                "+@all",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        },
    );
    let url = format!("redis://streamer@127.0.0.1:{}/3", relay.port);
    let data = random_bytes(3 << 20, 9);
    let tube = |args: &[&str]| {
        let mut c = relay.tube(args);
        c.env("TUBE_URL", &url).env("TUBE_PASSWORD", "s3cret-pw");
        c
    };
    let w = run_fed(tube(&["write", "acl"]), &data);
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    let r = Proc::spawn(tube(&["read", "acl"])).wait(Duration::from_secs(60));
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert_eq!(sha256(&r.stdout), sha256(&data));
    let mut admin = redis::Client::open(format!(
        "redis://streamer:s3cret-pw@127.0.0.1:{}/3",
        relay.port
    ))
    .and_then(|c| c.get_connection())
    .expect("admin connection");
    assert_eq!(stored_payload(&mut admin, "acl"), data.len() as u64);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).expect("KEYS");
    assert!(!keys.is_empty());
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query(&mut admin)
        .expect("SELECT");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).expect("KEYS");
    assert!(keys.is_empty(), "keys in database 0: {keys:?}");
}
