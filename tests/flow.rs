//! Flow control, live mode, retention and channel management, against real relays.

mod common;

use common::faults::FaultProxy;
use common::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

/// Feeds `data` to a process's stdin from a thread.
fn feed(p: &mut Proc, data: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut stdin = p.child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    })
}

/// The most bytes any reader of `channel` has reported as read (readers report with their
/// requests).
fn reported_offset(admin: &mut redis::Connection, channel: &str) -> u64 {
    let ids: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("tube:{{{channel}}}:readers"))
        .query(admin)
        .unwrap_or_default();
    ids.keys()
        .filter_map(|id| {
            redis::cmd("GET")
                .arg(format!("tube:{{{channel}}}:reader:{id}"))
                .query::<Option<String>>(admin)
                .ok()
                .flatten()
        })
        .filter_map(|p| {
            p.split_once(' ')
                .and_then(|(_, offset)| offset.parse().ok())
        })
        .max()
        .unwrap_or(0)
}

/// Starts a reader of `channel` behind `proxy` (with `-vv` and `extra`) and a writer (behind
/// the proxy too when `far_writer`), writes `first`, and waits until the reader reported all
/// of it: it has caught up and follows the writer.
fn caught_up(
    relay: &TestRelay,
    proxy: &FaultProxy,
    channel: &str,
    extra: &[&str],
    far_writer: bool,
    first: &[u8],
) -> (Proc, Proc) {
    let mut r = relay.tube(&[&["read", channel, "-vv"], extra].concat());
    r.env("TUBE_URL", proxy.url());
    let r = Proc::spawn(r);
    let mut w = relay.tube(&["write", channel]);
    if far_writer {
        w.env("TUBE_URL", proxy.url());
    }
    let mut w = Proc::spawn(w);
    w.stdin().write_all(first).unwrap();
    w.stdin().flush().unwrap();
    let mut admin = relay.admin();
    wait_until(Duration::from_secs(30), "the reader to catch up", || {
        reported_offset(&mut admin, channel) >= first.len() as u64
    });
    (r, w)
}

relay_tests! {
    fn a_reader_behind_a_distant_relay_reads_ahead_then_keeps_up_with_the_live_writer(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(50));
        let mut admin = relay.admin();
        let data = random_bytes(24 << 20, 41);
        let (first, rest) = data.split_at(8 << 20);
        // A small budget: the writer waits for the reader's reports through the long link
        // too, and the reader's window is small enough to slide many times.
        let mut w = relay.tube(&["write", "ahead", "--max-backlog", "16M"]);
        w.env("TUBE_URL", proxy.url());
        let mut w = Proc::spawn(w);
        w.stdin().write_all(first).unwrap();
        wait_until(Duration::from_secs(30), "the first part on the relay", || {
            held_bytes(&mut admin, "ahead") >= first.len() as u64
        });
        // The reader starts behind: it reads ahead, runs into the end of what was written,
        // then waits for the writer and follows it.
        let mut r = relay.tube(&["read", "ahead", "-vv"]);
        r.env("TUBE_URL", proxy.url());
        let r = Proc::spawn(r);
        wait_until(Duration::from_secs(30), "the reader to catch up", || {
            reported_offset(&mut admin, "ahead") >= first.len() as u64
        });
        // From a thread: a writer whose reader failed waits for it and takes no more.
        let feeder = feed(&mut w, rest.to_vec());
        let r = r.wait(Duration::from_secs(60));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact ({} of {} bytes)", r.stdout.len(), data.len());
        assert!(r.stderr.contains("reading ahead"), "read-ahead was not used: {}", r.stderr);
        let w = w.wait(Duration::from_secs(60));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        feeder.join().unwrap();
    }

    fn a_reader_that_caught_up_with_a_distant_relay_follows_it_with_reads_waiting_there(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(25));
        let mut admin = relay.admin();
        let data = random_bytes(12 << 20, 43);
        let (first, rest) = data.split_at(4 << 20);
        let (r, mut w) = caught_up(&relay, &proxy, "tail", &[], true, first);
        // A pause of several of the reader's checks: its reads wait on, for the records that
        // come after it.
        std::thread::sleep(Duration::from_millis(2500));
        assert!(blocked_clients(&mut admin) >= 1, "no read waits on the relay");
        w.stdin().write_all(rest).unwrap();
        let w = w.wait(Duration::from_secs(60));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        // Its reads still waiting on the relay do not hold up its exit.
        let r = r.wait(Duration::from_secs(10));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact ({} of {} bytes)", r.stdout.len(), data.len());
        assert!(
            r.stderr.contains("reads waiting on the relay"),
            "the reader did not follow the writer: {}",
            r.stderr
        );
        // Leaving, it closed their connection: nothing waits on the relay for it any more.
        wait_until(Duration::from_secs(10), "the reader's reads to go", || {
            blocked_clients(&mut admin) == 0
        });
    }

    fn a_writer_killed_while_a_distant_reader_follows_it_is_reported_as_vanished(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(20));
        let data = random_bytes(3 << 20, 45);
        let (r, w) = caught_up(&relay, &proxy, "tail-kill", &["--retry-for", "2s"], false, &data);
        w.signal(libc::SIGKILL);
        // The lease lapses after 8 s; the reader then waits its --retry-for.
        let r = r.wait(Duration::from_secs(40));
        assert_eq!(r.code(), Some(4), "{}", r.stderr);
        assert!(r.stderr.contains("vanished after 3145728 bytes"), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact ({} of {} bytes)", r.stdout.len(), data.len());
        assert!(r.stderr.contains("reads waiting on the relay"), "{}", r.stderr);
    }

    fn a_cut_while_following_a_distant_relay_loses_and_repeats_nothing(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(20));
        let mut admin = relay.admin();
        let data = random_bytes(8 << 20, 44);
        let (first, rest) = data.split_at(2 << 20);
        // The writer is near; only the reader's connections are cut.
        let (r, mut w) = caught_up(&relay, &proxy, "tail-cut", &[], false, first);
        wait_until(Duration::from_secs(10), "its reads to wait on the relay", || {
            blocked_clients(&mut admin) >= 1
        });
        let before = proxy.accepted();
        proxy.cut();
        w.stdin().write_all(rest).unwrap();
        let w = w.wait(Duration::from_secs(60));
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = r.wait(Duration::from_secs(60));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact ({} of {} bytes)", r.stdout.len(), data.len());
        assert!(proxy.accepted() > before, "the reader did not connect again");
    }

    fn a_connection_cut_while_reading_ahead_loses_and_repeats_nothing(kind) {
        let relay = TestRelay::start(kind);
        let data = random_bytes(12 << 20, 42);
        let w = write_all(&relay, "cut-ahead", &data, &["--max-backlog", "64M"]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(20));
        // Slow enough that the cut lands while requests are in flight.
        proxy.set_bandwidth(Some(4 << 20));
        let mut admin = relay.admin();
        let mut r = relay.tube(&["read", "cut-ahead", "-vv"]);
        r.env("TUBE_URL", proxy.url());
        let r = Proc::spawn(r);
        wait_until(Duration::from_secs(30), "the reader to be under way", || {
            reported_offset(&mut admin, "cut-ahead") >= 2 << 20
        });
        proxy.cut();
        proxy.set_bandwidth(None);
        let r = r.wait(Duration::from_secs(60));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact ({} of {} bytes)", r.stdout.len(), data.len());
        assert!(r.stderr.contains("reading ahead"), "read-ahead was not used: {}", r.stderr);
        assert!(proxy.accepted() >= 2, "the connection was not cut");
    }

    fn max_in_flight_bounds_the_bytes_awaiting_the_relay(kind) {
        let relay = TestRelay::start(kind);
        let proxy = FaultProxy::start(relay.port);
        proxy.set_latency(Duration::from_millis(50));
        let data = random_bytes(4 << 20, 21);
        let mut w = relay.tube(&[
            "write", "capped", "--max-in-flight", "128k", "--chunk-size", "64k",
        ]);
        w.env("TUBE_URL", proxy.url());
        let started = Instant::now();
        let out = run_fed(w, &data);
        let took = started.elapsed();
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        // 4 MiB with at most 128 KiB awaiting an answer is at least 32 round trips of 100 ms.
        // (Uncapped, the writer would send it all in its first round trip.)
        assert!(took >= Duration::from_millis(3200), "took only {took:?}");
        let r = read_all(&relay, "capped", &[]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(r.stdout == data, "not byte-exact");
    }

    fn memory_stays_bounded_while_a_reader_is_ten_times_slower(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        let bound = 4 * MIB;
        let record = 64 * 1024;
        let data = random_bytes(24 * MIB as usize, 31);
        let baseline = used_memory(&mut admin);
        // The reader drains 6 MB/s; the writer could go a hundred times faster.
        let (reader, consumed) = Proc::spawn_throttled(relay.tube(&["read", "slow"]), 6_000_000);
        let mut writer = Proc::spawn(relay.tube(&["write", "slow", "--max-backlog", "4M", "--chunk-size", "64k"]));
        let feeder = feed(&mut writer, data.clone());
        let done = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new((0u64, 0u64)));
        let sampler = {
            let (done, peaks) = (done.clone(), peaks.clone());
            let mut admin = relay.admin();
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    // MEMORY USAGE, not XRANGE: a reply of megabytes would itself
                    // inflate the relay's memory while it is sent.
                    let used = used_memory(&mut admin).saturating_sub(baseline);
                    let held: u64 = redis::cmd("MEMORY")
                        .arg("USAGE")
                        .arg("tube:{slow}:stream")
                        .arg("SAMPLES")
                        .arg(0)
                        .query::<Option<u64>>(&mut admin)
                        .unwrap()
                        .unwrap_or(0);
                    let mut p = peaks.lock().unwrap();
                    *p = (p.0.max(held), p.1.max(used));
                    drop(p);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let w = writer.wait(Duration::from_secs(60));
        feeder.join().unwrap();
        let r = reader.wait(Duration::from_secs(60));
        done.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(sha256(&consumed.join().unwrap()), sha256(&data));
        let (held, used) = *peaks.lock().unwrap();
        eprintln!("{kind:?}: peak channel bytes {held}, peak used memory above baseline {used} (bound {bound})");
        assert!(held <= bound + record, "the channel held {held} bytes");
        assert!(used <= bound + record, "the relay grew by {used} bytes");
    }

    fn without_readers_the_writer_waits_and_a_late_reader_gets_everything(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        let data = random_bytes(3 * MIB as usize, 32);
        let mut writer = Proc::spawn(relay.tube(&["write", "held", "--max-backlog", "1M", "--chunk-size", "64k"]));
        let feeder = feed(&mut writer, data.clone());
        std::thread::sleep(Duration::from_millis(1500));
        assert!(writer.running(), "the writer must wait for a reader once the bound is full");
        assert!(held_bytes(&mut admin, "held") <= MIB, "the bound holds while waiting");
        let r = read_all(&relay, "held", &[]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(sha256(&r.stdout), sha256(&data), "the late reader gets the session from its first byte");
        assert_eq!(writer.wait(Duration::from_secs(30)).code(), Some(0));
        feeder.join().unwrap();
    }

    fn a_reader_that_exits_leaves_no_registration_behind(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        let reader = Proc::spawn(relay.tube(&["read", "done"]));
        wait_until(Duration::from_secs(10), "the reader", || registered_readers(&mut admin, "done") == 1);
        let w = write_all(&relay, "done", b"the whole session", &[]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = reader.wait(Duration::from_secs(10));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, b"the whole session");
        // Removed before the reader exits, not left to expire.
        assert_eq!(registered_readers(&mut admin, "done"), 0);
        let positions: Vec<String> = redis::cmd("KEYS").arg("tube:{done}:reader:*").query(&mut admin).unwrap();
        assert!(positions.is_empty(), "{positions:?}");
    }

    fn a_dead_reader_stops_holding_the_writer_back(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        let data = random_bytes(4 * MIB as usize, 33);
        let live = Proc::spawn(relay.tube(&["read", "dead"]));
        let doomed = Proc::spawn(relay.tube(&["read", "dead"]));
        wait_until(Duration::from_secs(10), "two registered readers", || registered_readers(&mut admin, "dead") == 2);
        doomed.signal(libc::SIGKILL);
        let killed = Instant::now();
        let w = write_all(&relay, "dead", &data, &["--max-backlog", "1M", "--chunk-size", "64k"]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let waited = killed.elapsed();
        eprintln!("{kind:?}: the writer finished {waited:?} after the reader died");
        assert!(waited < Duration::from_secs(15), "held back for {waited:?}");
        let r = live.wait(Duration::from_secs(30));
        assert_eq!(sha256(&r.stdout), sha256(&data));
    }

    fn live_writers_never_wait_and_slow_readers_skip_and_say_so(kind) {
        let relay = TestRelay::start(kind);
        let data = random_bytes(16 * MIB as usize, 34);
        let (reader, consumed) = Proc::spawn_throttled(relay.tube(&["read", "cam"]), 2_000_000);
        wait_until(Duration::from_secs(10), "the reader", || registered_readers(&mut relay.admin(), "cam") == 1);
        let started = Instant::now();
        let w = write_all(&relay, "cam", &data, &["--live", "--max-backlog", "1M", "--chunk-size", "64k"]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        // At the reader's pace, 16 MiB would take 8 s: a writer that waited would not be done.
        assert!(started.elapsed() < Duration::from_secs(5), "the live writer took {:?}", started.elapsed());
        let r = reader.wait(Duration::from_secs(60));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        let got = consumed.join().unwrap();
        let skipped: u64 = r.stderr.lines()
            .filter_map(|l| l.split("skipped ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(skipped > 0, "a slow live reader must skip: {}", r.stderr);
        assert_eq!(got.len() as u64 + skipped, data.len() as u64, "every byte is either read or reported skipped");
        assert!(data.ends_with(&got[got.len() - 1000..]), "the reader ends with the newest data");
    }

    fn a_reliable_reader_never_skips(kind) {
        let relay = TestRelay::start(kind);
        let data = random_bytes(6 * MIB as usize, 35);
        let (reader, consumed) = Proc::spawn_throttled(relay.tube(&["read", "file"]), 4_000_000);
        wait_until(Duration::from_secs(10), "the reader", || registered_readers(&mut relay.admin(), "file") == 1);
        let w = write_all(&relay, "file", &data, &["--max-backlog", "1M", "--chunk-size", "64k"]);
        assert_eq!(w.code(), Some(0), "{}", w.stderr);
        let r = reader.wait(Duration::from_secs(60));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert!(!r.stderr.contains("skipped"), "{}", r.stderr);
        assert_eq!(sha256(&consumed.join().unwrap()), sha256(&data));
    }

    fn from_now_starts_with_new_data(kind) {
        let relay = TestRelay::start(kind);
        let mut writer = Proc::spawn(relay.tube(&["write", "now"]));
        writer.stdin().write_all(b"old data;").unwrap();
        wait_until(Duration::from_secs(10), "the first record", || held_bytes(&mut relay.admin(), "now") > 70);
        let reader = Proc::spawn(relay.tube(&["read", "now", "--from", "now"]));
        wait_until(Duration::from_secs(10), "the reader", || registered_readers(&mut relay.admin(), "now") == 1);
        writer.stdin().write_all(b"new data").unwrap();
        assert_eq!(writer.wait(Duration::from_secs(10)).code(), Some(0));
        let r = reader.wait(Duration::from_secs(10));
        assert_eq!(r.code(), Some(0), "{}", r.stderr);
        assert_eq!(r.stdout, b"new data");
    }

    fn a_trimmed_session_start_fails_clearly_and_from_oldest_reads_what_is_left(kind) {
        let relay = TestRelay::start(kind);
        let data = random_bytes(4 * MIB as usize, 36);
        let first = Proc::spawn(relay.tube(&["read", "trim"]));
        wait_until(Duration::from_secs(10), "the reader", || registered_readers(&mut relay.admin(), "trim") == 1);
        assert_eq!(write_all(&relay, "trim", &data, &["--max-backlog", "1M", "--chunk-size", "64k"]).code(), Some(0));
        assert_eq!(first.wait(Duration::from_secs(30)).stdout.len(), data.len());
        let late = read_all(&relay, "trim", &[]);
        assert_eq!(late.code(), Some(6), "{}", late.stderr);
        assert!(late.stderr.contains("missing from byte 0") && late.stderr.contains("--from oldest"), "{}", late.stderr);
        assert!(late.stdout.is_empty());
        let oldest = read_all(&relay, "trim", &["--from", "oldest"]);
        assert_eq!(oldest.code(), Some(0), "{}", oldest.stderr);
        assert!(!oldest.stdout.is_empty() && oldest.stdout.len() <= MIB as usize);
        assert!(data.ends_with(&oldest.stdout), "--from oldest gives the tail of the session");
    }

    fn idle_channels_expire_after_their_ttl(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        assert_eq!(write_all(&relay, "brief", b"gone soon", &["--ttl", "2s"]).code(), Some(0));
        let ttl: i64 = redis::cmd("PTTL").arg("tube:{brief}:stream").query(&mut admin).unwrap();
        assert!(ttl > 0 && ttl <= 2000, "PTTL {ttl}");
        wait_until(Duration::from_secs(6), "expiry", || {
            redis::cmd("EXISTS").arg("tube:{brief}:stream").arg("tube:{brief}:meta").query::<u64>(&mut admin).unwrap() == 0
        });
        // The default is a day.
        assert_eq!(write_all(&relay, "lasting", b"x", &[]).code(), Some(0));
        let ttl: i64 = redis::cmd("PTTL").arg("tube:{lasting}:meta").query(&mut admin).unwrap();
        assert!(ttl > 86_000_000 && ttl <= 86_400_000, "PTTL {ttl}");
    }

    fn rm_deletes_a_channel_but_not_under_a_live_writer(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        let mut writer = Proc::spawn(relay.tube(&["write", "doomed"]));
        writer.stdin().write_all(b"x").unwrap();
        wait_for_session(&relay, "doomed");
        let refused = Proc::spawn(relay.tube(&["rm", "doomed"])).wait(Duration::from_secs(10));
        assert_eq!(refused.code(), Some(1));
        assert!(refused.stderr.contains("live writer") && refused.stderr.contains("--force"), "{}", refused.stderr);
        assert_eq!(writer.wait(Duration::from_secs(10)).code(), Some(0));
        let _: () = redis::cmd("SET").arg("tube:{keep}:stream").arg("not tube's").query(&mut admin).unwrap();
        let ok = Proc::spawn(relay.tube(&["rm", "doomed"])).wait(Duration::from_secs(10));
        assert_eq!(ok.code(), Some(0), "{}", ok.stderr);
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).unwrap();
        assert_eq!(keys, ["tube:{keep}:stream"]);
        let missing = Proc::spawn(relay.tube(&["rm", "doomed"])).wait(Duration::from_secs(10));
        assert_eq!(missing.code(), Some(1));
        assert!(missing.stderr.contains("no channel named doomed"), "{}", missing.stderr);
        // --force deletes under a live writer.
        let mut writer = Proc::spawn(relay.tube(&["write", "forced"]));
        writer.stdin().write_all(b"x").unwrap();
        wait_for_session(&relay, "forced");
        let forced = Proc::spawn(relay.tube(&["rm", "--force", "forced"])).wait(Duration::from_secs(10));
        assert_eq!(forced.code(), Some(0), "{}", forced.stderr);
        let n: u64 = redis::cmd("EXISTS").arg("tube:{forced}:stream").query(&mut admin).unwrap();
        assert_eq!(n, 0);
    }

    fn stat_and_ls_report_the_real_state(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        assert_eq!(write_all(&relay, "stats", &random_bytes(5000, 1), &[]).code(), Some(0));
        let follower = Proc::spawn(relay.tube(&["read", "--follow", "stats"]));
        let data = random_bytes(100_000, 2);
        wait_until(Duration::from_secs(10), "the reader", || registered_readers(&mut admin, "stats") == 1);
        assert_eq!(write_all(&relay, "stats", &data, &["--live"]).code(), Some(0));
        assert_eq!(write_all(&relay, "other", b"x", &[]).code(), Some(0));
        let _: () = redis::cmd("SET").arg("tube:{fake}:meta").arg("a string").query(&mut admin).unwrap();
        // The follower has read everything once it reports 100000 bytes of session 2.
        let json = |args: &[&str]| -> serde_json::Value {
            let out = Proc::spawn(relay.tube(args)).wait(Duration::from_secs(10));
            assert_eq!(out.code(), Some(0), "{}", out.stderr);
            serde_json::from_slice(&out.stdout).unwrap()
        };
        wait_until(Duration::from_secs(10), "the follower's report", || {
            json(&["stat", "stats", "--json"])["readers"][0]["bytes"] == 100_000
        });
        let s = json(&["stat", "stats", "--json"]);
        assert_eq!(s["channel"], "stats");
        assert_eq!(s["writer_alive"], false);
        assert_eq!(s["mode"], "live");
        assert_eq!(s["sessions"], 2);
        assert_eq!(s["bytes_written"], 100_000);
        let held = held_bytes(&mut admin, "stats");
        let reported = s["bytes_held"].as_u64().unwrap();
        assert!(reported >= held && reported <= held + 64 * 1024, "held {reported} vs {held} stored");
        assert_eq!(s["readers"].as_array().unwrap().len(), 1);
        assert_eq!(s["readers"][0]["session"], 2);
        assert_eq!(s["readers"][0]["lag"], 0);
        assert!(s["expires_in_ms"].as_u64().unwrap() > 86_000_000);
        let l = json(&["ls", "--json"]);
        let names: Vec<&str> = l.as_array().unwrap().iter().map(|c| c["channel"].as_str().unwrap()).collect();
        assert_eq!(names, ["other", "stats"], "only tube's channels, by name");
        let l = json(&["ls", "st*", "--json"]);
        assert_eq!(l.as_array().unwrap().len(), 1);
        assert_eq!(l[0]["readers"].as_array().unwrap().len(), 1);
        let table = Proc::spawn(relay.tube(&["ls"])).wait(Duration::from_secs(10));
        let text = String::from_utf8(table.stdout).unwrap();
        assert!(text.starts_with("CHANNEL") && text.contains("stats") && text.contains("live"), "{text}");
        let missing = Proc::spawn(relay.tube(&["stat", "nothing"])).wait(Duration::from_secs(10));
        assert_eq!(missing.code(), Some(1));
        drop(follower);
    }

    fn compression_round_trips_text_and_random_data(kind) {
        let relay = TestRelay::start(kind);
        let mut admin = relay.admin();
        let text: Vec<u8> = (0..200_000).flat_map(|i| format!("line {i}: the quick brown fox\n").into_bytes()).collect();
        let random = random_bytes(2 * MIB as usize, 37);
        for (name, data) in [("text", &text), ("random", &random)] {
            let w = write_all(&relay, name, data, &["--compress", "zstd:3"]);
            assert_eq!(w.code(), Some(0), "{}", w.stderr);
            let r = read_all(&relay, name, &[]);
            assert_eq!(r.code(), Some(0), "{}", r.stderr);
            assert_eq!(sha256(&r.stdout), sha256(data));
        }
        let stored_text = held_bytes(&mut admin, "text");
        let stored_random = held_bytes(&mut admin, "random");
        eprintln!("{kind:?}: text {} -> {stored_text} bytes, random {} -> {stored_random}", text.len(), random.len());
        assert!(stored_text * 5 < text.len() as u64, "text is stored compressed");
        assert!(stored_random >= random.len() as u64, "random data is stored as is");
        assert!(stored_random < random.len() as u64 + 64 * 1024, "and does not grow beyond headers");
    }
}

#[test]
fn progress_is_shown_on_a_terminal() {
    let relay = TestRelay::start(RelayKind::Redis);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::write(&input, random_bytes(3 * MIB as usize, 38)).unwrap();
    // `script` gives the command a pseudo-terminal for stdin, stdout and stderr.
    let run = |cmd: &str| {
        let mut c = std::process::Command::new("script");
        c.args(["-qfec", cmd, "/dev/null"])
            .env("TUBE_URL", relay.url());
        Proc::spawn(c).wait(Duration::from_secs(30))
    };
    let tube = tube_bin().display().to_string();
    let w = run(&format!("{tube} write prog < {}", input.display()));
    assert_eq!(w.code(), Some(0), "{}", String::from_utf8_lossy(&w.stdout));
    let shown = String::from_utf8_lossy(&w.stdout);
    assert!(
        shown.contains("MiB") && shown.contains("/s") && shown.contains("backlog"),
        "{shown}"
    );
    let r = run(&format!("{tube} read prog > /dev/null"));
    let shown = String::from_utf8_lossy(&r.stdout);
    assert!(shown.contains("MiB") && shown.contains("/s"), "{shown}");
    // --no-progress turns it off.
    let q = run(&format!("{tube} read --no-progress prog > /dev/null"));
    assert!(!String::from_utf8_lossy(&q.stdout).contains("MiB"));
}

/// A reader that follows a session tells the relay where it is a few times a second, and
/// asks for records several at a time, not after every record: each request wakes the relay
/// and the reader. Counted with the relay's keyspace notifications and its count of reads
/// from sockets, which only redis-server has.
#[test]
fn a_following_reader_talks_to_the_relay_a_few_times_a_second() {
    let relay = TestRelay::start(RelayKind::Redis);
    let mut admin = relay.admin();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("K$")
        .exec(&mut admin)
        .unwrap();
    let mut sub = redis::Client::open(relay.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut sub = sub.as_pubsub();
    sub.psubscribe("__keyspace@0__:tube:{paced}:reader:*")
        .unwrap();
    sub.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();

    let reader = Proc::spawn(relay.tube(&["read", "paced"]));
    wait_registered(&relay, "paced");
    let socket_reads =
        |admin: &mut redis::Connection| info_field(admin, "stats", "total_reads_processed");
    let reads_before = socket_reads(&mut admin);
    let mut writer = Proc::spawn(relay.tube(&["write", "paced"]));
    // Each message its own record: the writer sends at once what it has.
    const MESSAGES: usize = 200;
    let mut sent = Vec::new();
    for i in 0..MESSAGES {
        let msg = format!("message {i:04}\n");
        writer.stdin().write_all(msg.as_bytes()).unwrap();
        writer.stdin().flush().unwrap();
        sent.extend_from_slice(msg.as_bytes());
        std::thread::sleep(Duration::from_millis(5));
    }
    writer.close_stdin();
    let w = writer.wait(Duration::from_secs(30));
    let r = reader.wait(Duration::from_secs(30));
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(r.stdout == sent, "the output differs from the input");
    let socket_reads = socket_reads(&mut admin) - reads_before;
    let records = record_values(&mut admin, "paced").len();
    assert!(
        records >= MESSAGES / 2,
        "{records} records for {MESSAGES} messages"
    );

    let mut reports = 0;
    while let Ok(msg) = sub.get_message() {
        if msg.get_payload::<String>().unwrap() == "set" {
            reports += 1;
        }
    }
    eprintln!("{reports} position reports and {socket_reads} socket reads for {records} records");
    // Each append is a read of its own; the reader's requests add a few more.
    assert!(
        socket_reads as usize * 2 <= records * 3,
        "the relay read from its sockets {socket_reads} times for {records} records"
    );
    assert!(
        reports >= 2,
        "the reader reported its position {reports} times"
    );
    assert!(
        reports * 4 <= records,
        "the reader reported its position {reports} times for {records} records"
    );
}
