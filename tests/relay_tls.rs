//! `tube relay` over TLS: real processes over real sockets.
//!
//! These tests protect what someone who exposes the built-in relay with TLS relies on: that
//! tube and Redis tools reach it with `rediss://`, that a wrong CA, a missing client
//! certificate or a wrong password are refused with a message a person can act on, and that
//! no client, plaintext or silent, can take the relay down or hold a connection open.

mod common;

use common::certs::Pki;
use common::{
    Output, Proc, RelayKind, RelaySpec, TestRelay, assert_tls_failure, random_bytes, run_fed,
    sha256, tube_bin,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A `tube relay` that speaks TLS with the PKI's server certificate; with `require_client`,
/// clients need a certificate from the PKI's CA.
fn tube_tls(pki: &Pki, require_client: bool, password: Option<&str>) -> TestRelay {
    let mut extra = vec![
        "--tls-cert".into(),
        p(&pki.server_cert),
        "--tls-key".into(),
        p(&pki.server_key),
    ];
    if require_client {
        extra.extend(["--tls-ca".into(), p(&pki.ca)]);
    }
    TestRelay::start_with(
        RelayKind::Tube,
        RelaySpec {
            extra,
            password: password.map(Into::into),
            tls: true,
        },
    )
}

/// A `tube` command against `relay` over TLS, trusting `ca`, with extra arguments.
fn tls_tube(relay: &TestRelay, ca: &Path, args: &[&str]) -> Command {
    let url = format!("rediss://127.0.0.1:{}", relay.port);
    let ca = p(ca);
    let mut all = args.to_vec();
    all.extend(["--url", &url, "--tls-ca", &ca]);
    relay.tube(&all)
}

/// Writes `data` into `channel` and reads it back, both over TLS.
fn round_trip(relay: &TestRelay, ca: &Path, channel: &str, extra: &[&str], data: &[u8]) {
    let mut args = vec!["write", channel];
    args.extend_from_slice(extra);
    let w = run_fed(tls_tube(relay, ca, &args), data);
    assert_eq!(w.code(), Some(0), "writer: {}", w.stderr);
    args[0] = "read";
    let r = run_fed(tls_tube(relay, ca, &args), b"");
    assert_eq!(r.code(), Some(0), "reader: {}", r.stderr);
    assert_eq!(r.stdout.len(), data.len());
    assert_eq!(sha256(&r.stdout), sha256(data), "the bytes differ");
}
#[test]
fn tube_write_and_read_round_trip_byte_exact_over_tls() {
    let pki = Pki::new();
    let relay = tube_tls(&pki, false, None);
    // Large enough that replies outgrow the socket buffer and rustls holds records back.
    round_trip(&relay, &pki.ca, "tls", &[], &random_bytes(6 << 20, 71));
    round_trip(&relay, &pki.ca, "tiny", &[], b"x");
    // The certificate's host name is verified as well as its address.
    let url = format!("rediss://localhost:{}", relay.port);
    let r = run_fed(
        relay.tube(&["read", "tiny", "--url", &url, "--tls-ca", &p(&pki.ca)]),
        b"",
    );
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, b"x");
}

#[test]
fn a_reader_blocked_on_the_tls_relay_gets_each_piece_as_it_is_written() {
    let pki = Pki::new();
    let relay = tube_tls(&pki, false, None);
    // The reader waits in blocking reads over TLS, before the writer and between pieces.
    let reader = Proc::spawn(tls_tube(&relay, &pki.ca, &["read", "live"]));
    std::thread::sleep(Duration::from_millis(300));
    let mut writer = Proc::spawn(tls_tube(&relay, &pki.ca, &["write", "live"]));
    let pieces = [
        b"first;".to_vec(),
        random_bytes(300_000, 73),
        b";last".to_vec(),
    ];
    for piece in &pieces {
        writer.stdin().write_all(piece).unwrap();
        writer.stdin().flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let w = writer.wait(Duration::from_secs(30));
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    let r = reader.wait(Duration::from_secs(30));
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, pieces.concat());
}

#[test]
fn a_client_trusting_another_ca_fails_with_a_tls_error() {
    let pki = Pki::new();
    let other = Pki::new();
    let relay = tube_tls(&pki, false, None);
    assert_tls_failure(&run_fed(tls_tube(&relay, &other.ca, &["read", "x"]), b""));
    // The relay keeps serving clients that trust it.
    round_trip(&relay, &pki.ca, "after", &[], b"still here");
}

#[test]
fn with_tls_ca_the_relay_requires_a_client_certificate_from_that_ca() {
    let pki = Pki::new();
    let other = Pki::new();
    let relay = tube_tls(&pki, true, None);
    // With TLS 1.3 the client learns of the refusal only after its side of the handshake,
    // as a closed connection (as with redis-server): the failure is one line and status 1.
    let without = run_fed(tls_tube(&relay, &pki.ca, &["write", "mtls"]), b"x");
    assert_eq!(without.code(), Some(1), "{}", without.stderr);
    assert_eq!(without.stderr.lines().count(), 1, "{}", without.stderr);
    // A certificate from a CA the relay does not know is refused too.
    let (cert, key) = (p(&other.client_cert), p(&other.client_key));
    let foreign = run_fed(
        tls_tube(
            &relay,
            &pki.ca,
            &["write", "mtls", "--tls-cert", &cert, "--tls-key", &key],
        ),
        b"x",
    );
    assert_eq!(foreign.code(), Some(1), "{}", foreign.stderr);
    let (cert, key) = (p(&pki.client_cert), p(&pki.client_key));
    round_trip(
        &relay,
        &pki.ca,
        "mtls",
        &["--tls-cert", &cert, "--tls-key", &key],
        b"client certified",
    );
}

#[test]
fn tls_and_a_password_work_together_and_a_wrong_password_is_refused() {
    let pki = Pki::new();
    let relay = tube_tls(&pki, false, Some("s3cret pass"));
    round_trip(&relay, &pki.ca, "both", &[], &random_bytes(100_000, 72));
    let mut wrong = tls_tube(&relay, &pki.ca, &["read", "both"]);
    wrong.env("TUBE_PASSWORD", "not it");
    let out = run_fed(wrong, b"");
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("refused the credentials"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("not it"), "{}", out.stderr);
    let mut none = tls_tube(&relay, &pki.ca, &["read", "both"]);
    none.env_remove("TUBE_PASSWORD");
    let out = run_fed(none, b"");
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    // Plaintext with the right password is refused as well (its AUTH gets the TLS refusal).
    let out = run_fed(relay.tube(&["read", "both"]), b"");
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    round_trip(&relay, &pki.ca, "both", &[], b"after");
}

#[test]
fn plaintext_to_the_tls_port_fails_clearly_and_the_relay_keeps_serving() {
    let pki = Pki::new();
    let relay = tube_tls(&pki, false, None);
    for _ in 0..2 {
        // TUBE_URL is redis:// here.
        let out = run_fed(relay.tube(&["read", "plain"]), b"");
        assert_eq!(out.code(), Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("rediss://"), "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    }
    // A raw Redis client is told the same in its own protocol.
    let mut sock = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut reply = String::new();
    sock.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("-ERR") && reply.contains("rediss://"),
        "{reply:?}"
    );
    round_trip(&relay, &pki.ca, "plain", &[], b"served after plaintext");
}

#[test]
fn a_connection_that_never_completes_the_handshake_is_closed() {
    let pki = Pki::new();
    let relay = tube_tls(&pki, false, None);
    let start = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    // A lone handshake byte, then nothing: a slowloris.
    let mut slow = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    slow.write_all(&[0x16]).unwrap();
    for sock in [&mut silent, &mut slow] {
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        // Closed by the relay: the end of the stream (or a reset), not the read timeout.
        match sock.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "the relay kept the connection open: {e}"
            ),
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "{took:?}"
    );
    round_trip(&relay, &pki.ca, "after", &[], b"ok");
}

#[test]
fn redis_cli_pings_the_tls_relay() {
    let pki = Pki::new();
    let supported = Command::new("redis-cli")
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--tls"))
        .unwrap_or(false);
    if !supported {
        eprintln!(
            "SKIPPED: this redis-cli has no --tls support; the redis-cli TLS check did not run"
        );
        return;
    }
    let ping = |relay: &TestRelay, extra: &[String]| {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &relay.port.to_string()])
            .args(["--tls", "--cacert", &p(&pki.ca)])
            .args(extra)
            .arg("PING")
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
            + &String::from_utf8_lossy(&out.stderr)
    };
    let relay = tube_tls(&pki, false, None);
    assert_eq!(ping(&relay, &[]), "PONG");
    let mtls = tube_tls(&pki, true, None);
    let client = [
        "--cert".to_string(),
        p(&pki.client_cert),
        "--key".into(),
        p(&pki.client_key),
    ];
    assert_eq!(ping(&mtls, &client), "PONG");
    assert_ne!(ping(&mtls, &[]), "PONG");
}

/// Runs `tube relay` with `args` and expects it to fail at once.
fn relay_fails(args: &[&str]) -> Output {
    let mut cmd = Command::new(tube_bin());
    cmd.arg("relay")
        .args(args)
        .env_remove("TUBE_RELAY_PASSWORD")
        .env_remove("TUBE_URL");
    let out = Proc::spawn(cmd).wait(Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    out
}

#[test]
fn unreadable_or_invalid_tls_files_stop_the_relay_with_one_line() {
    let pki = Pki::new();
    let bogus = pki.dir.path().join("bogus.pem");
    std::fs::write(&bogus, "this is not PEM\n").unwrap();
    let missing = pki.dir.path().join("missing.pem");
    let listen = ["--listen", "127.0.0.1:0"];
    let cases: [(Vec<String>, &str); 6] = [
        (
            vec![
                "--tls-cert".into(),
                p(&missing),
                "--tls-key".into(),
                p(&pki.server_key),
            ],
            "missing.pem",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&bogus),
                "--tls-key".into(),
                p(&pki.server_key),
            ],
            "bogus.pem",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&pki.server_cert),
                "--tls-key".into(),
                p(&bogus),
            ],
            "bogus.pem",
        ),
        (
            // The client's key does not belong to the server's certificate.
            vec![
                "--tls-cert".into(),
                p(&pki.server_cert),
                "--tls-key".into(),
                p(&pki.client_key),
            ],
            "do not go together",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&pki.server_cert),
                "--tls-key".into(),
                p(&pki.server_key),
                "--tls-ca".into(),
                p(&bogus),
            ],
            "bogus.pem",
        ),
        (vec!["--tls-ca".into(), p(&pki.ca)], "--tls-cert"),
    ];
    for (args, expect) in cases {
        let mut all: Vec<&str> = listen.to_vec();
        all.extend(args.iter().map(String::as_str));
        let out = relay_fails(&all);
        assert!(out.stderr.starts_with("tube: "), "{}", out.stderr);
        assert!(out.stderr.contains(expect), "{args:?}: {}", out.stderr);
    }
    let out = relay_fails(&["--listen", "127.0.0.1:0", "--tls-insecure"]);
    assert!(out.stderr.contains("--tls-insecure"), "{}", out.stderr);
}

#[test]
fn tls_does_not_lift_the_password_rule_for_non_loopback_addresses() {
    let pki = Pki::new();
    let out = relay_fails(&[
        "--listen",
        "0.0.0.0:0",
        "--tls-cert",
        &p(&pki.server_cert),
        "--tls-key",
        &p(&pki.server_key),
    ]);
    assert!(out.stderr.contains("without a password"), "{}", out.stderr);
}
