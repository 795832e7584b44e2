//! Security: TLS to the relay, authentication, redaction, end-to-end encryption, and what a
//! relay that tampers with records can and cannot do.

mod common;

use common::certs::Pki;
use common::*;
use std::path::Path;

fn redis_tls(pki: &Pki, require_client_cert: bool) -> TestRelay {
    let p = |p: &Path| p.display().to_string();
    TestRelay::start_with(
        RelayKind::Redis,
        RelaySpec {
            tls: true,
            extra: vec![
                "--tls-cert-file".into(),
                p(&pki.server_cert),
                "--tls-key-file".into(),
                p(&pki.server_key),
                "--tls-ca-cert-file".into(),
                p(&pki.ca),
                "--tls-auth-clients".into(),
                if require_client_cert { "yes" } else { "no" }.into(),
            ],
            ..Default::default()
        },
    )
}

/// A `tube` command against `relay` over TLS, with extra arguments.
fn tls_tube(relay: &TestRelay, args: &[&str]) -> std::process::Command {
    let url = format!("rediss://127.0.0.1:{}", relay.port);
    let mut all = args.to_vec();
    all.extend(["--url", &url]);
    relay.tube(&all)
}

#[test]
fn tls_with_a_trusted_ca_round_trips() {
    let pki = Pki::new();
    let relay = redis_tls(&pki, false);
    let ca = pki.ca.display().to_string();
    let data = random_bytes(2 << 20, 61);
    let w = run_fed(tls_tube(&relay, &["write", "tls", "--tls-ca", &ca]), &data);
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    let r = run_fed(tls_tube(&relay, &["read", "tls", "--tls-ca", &ca]), b"");
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert_eq!(sha256(&r.stdout), sha256(&data));
}

#[test]
fn tls_with_an_untrusted_certificate_fails_clearly() {
    let pki = Pki::new();
    let other = Pki::new();
    let relay = redis_tls(&pki, false);
    for args in [
        vec!["read", "x", "--tls-ca", other.ca.to_str().unwrap()],
        // The system roots do not know the test CA either.
        vec!["read", "x"],
    ] {
        assert_tls_failure(&run_fed(tls_tube(&relay, &args), b""));
    }
}

#[test]
fn a_required_client_certificate_is_given_with_tls_cert_and_key() {
    let pki = Pki::new();
    let relay = redis_tls(&pki, true);
    let ca = pki.ca.display().to_string();
    let without = run_fed(tls_tube(&relay, &["write", "mtls", "--tls-ca", &ca]), b"x");
    assert_eq!(without.code(), Some(1), "{}", without.stderr);
    assert!(
        without.stderr.contains("TLS") && without.stderr.contains("--tls-cert"),
        "the message points at the missing client certificate: {}",
        without.stderr
    );
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );
    let with = run_fed(
        tls_tube(
            &relay,
            &[
                "write",
                "mtls",
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
        ),
        b"client certified",
    );
    assert_eq!(with.code(), Some(0), "{}", with.stderr);
    let r = run_fed(
        tls_tube(
            &relay,
            &[
                "read",
                "mtls",
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
        ),
        b"",
    );
    assert_eq!(r.stdout, b"client certified");
}

#[test]
fn tls_insecure_works_and_warns_every_time() {
    let pki = Pki::new();
    let relay = redis_tls(&pki, false);
    for _ in 0..2 {
        let out = run_fed(tls_tube(&relay, &["write", "lax", "--tls-insecure"]), b"x");
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        assert!(
            out.stderr.contains("--tls-insecure") && out.stderr.contains("not verified"),
            "{}",
            out.stderr
        );
    }
    // TLS options on a plain URL are a mistake worth saying.
    let plain = run_fed(relay.tube(&["read", "lax", "--tls-insecure"]), b"");
    assert_eq!(plain.code(), Some(1));
    assert!(plain.stderr.contains("rediss://"), "{}", plain.stderr);
}

#[test]
fn acl_users_log_in_with_a_password_file_and_stay_in_their_prefix() {
    let relay = TestRelay::start(RelayKind::Redis);
    let mut admin = relay.admin();
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "alice",
                "on",
                ">alice-pass-77",
                "~tube:*",
                "+@all",
            ][..],
        )
        .query(&mut admin)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "alice-pass-77\n").unwrap();
    let url = format!("redis://alice@127.0.0.1:{}", relay.port);
    let pw_arg = pw.display().to_string();
    let w = run_fed(
        relay.tube(&["write", "acl", "--url", &url, "--password-file", &pw_arg]),
        b"as alice",
    );
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
    let r = run_fed(
        relay.tube(&["read", "acl", "--url", &url, "--password-file", &pw_arg]),
        b"",
    );
    assert_eq!(r.stdout, b"as alice");
    // Outside the prefix the ACL refuses, and tube says so in one line.
    let out = run_fed(
        relay.tube(&[
            "write",
            "acl",
            "--prefix",
            "other:",
            "--url",
            &url,
            "--password-file",
            &pw_arg,
        ]),
        b"x",
    );
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("NOPERM") || out.stderr.contains("refused"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    std::fs::write(&pw, "not-alices\n").unwrap();
    let bad = run_fed(
        relay.tube(&["read", "acl", "--url", &url, "--password-file", &pw_arg]),
        b"",
    );
    assert_eq!(bad.code(), Some(1));
    assert!(
        bad.stderr.contains("refused the credentials"),
        "{}",
        bad.stderr
    );
    assert!(!bad.stderr.contains("not-alices"));
}

#[test]
fn passwords_appear_in_no_output_even_at_trace_level() {
    let secret = "zebra-pass-4411";
    let relay = TestRelay::start_with(
        RelayKind::Redis,
        RelaySpec {
            password: Some(secret.into()),
            ..Default::default()
        },
    );
    let url = format!("redis://default:{secret}@127.0.0.1:{}", relay.port);
    let mut outputs = Vec::new();
    for args in [
        vec!["write", "red", "-vvv"],
        vec!["read", "red", "-vvv"],
        vec!["stat", "red", "--json", "-vvv"],
        vec!["ls", "--json", "-vvv"],
    ] {
        // Once from TUBE_PASSWORD, once from the URL.
        outputs.push(run_fed(relay.tube(&args), b"payload"));
        let mut with_url = args.clone();
        with_url.extend(["--url", &url]);
        let mut c = relay.tube(&with_url);
        c.env_remove("TUBE_PASSWORD");
        outputs.push(run_fed(c, b""));
    }
    // And failures: a wrong password and an unreachable relay, with the password in the URL.
    for url in [
        format!("redis://:{secret}x@127.0.0.1:{}", relay.port),
        format!("redis://:{secret}@127.0.0.1:1"),
    ] {
        let mut c = relay.tube(&["read", "red", "--url", &url]);
        c.env_remove("TUBE_PASSWORD");
        outputs.push(run_fed(c, b""));
    }
    assert!(
        outputs
            .iter()
            .any(|o| o.stderr.contains("TRACE") || o.stderr.contains("DEBUG"))
    );
    for o in &outputs {
        assert!(!o.stderr.contains(secret), "stderr: {}", o.stderr);
        assert!(!String::from_utf8_lossy(&o.stdout).contains(secret));
    }
}

fn key_file(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let out = std::process::Command::new(tube_bin())
        .args(["keygen", "-o"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    path.display().to_string()
}

/// Rewrites a channel's stream entry by entry; `edit` gets the entries in order and returns
/// the ones to store (ID and record value).
fn rewrite(
    relay: &TestRelay,
    channel: &str,
    edit: impl FnOnce(Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)>,
) {
    let mut admin = relay.admin();
    let key = format!("tube:{{{channel}}}:stream");
    let entries: Vec<Entry> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query(&mut admin)
        .unwrap();
    let entries = entries
        .into_iter()
        .map(|(id, mut f)| (id, f.remove(0).1))
        .collect();
    let _: () = redis::cmd("DEL").arg(&key).query(&mut admin).unwrap();
    for (id, value) in edit(entries) {
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg(&id)
            .arg("r")
            .arg(value)
            .query(&mut admin)
            .unwrap();
    }
}

fn sealed_session(relay: &TestRelay, channel: &str, key: &str, data: &[u8]) {
    let w = run_fed(
        relay.tube(&["write", channel, "--key-file", key, "--chunk-size", "4k"]),
        data,
    );
    assert_eq!(w.code(), Some(0), "{}", w.stderr);
}

relay_tests! {
    fn encrypted_records_hide_the_data_and_read_back_with_the_key(kind) {
        let relay = TestRelay::start(kind);
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "k");
        let text: Vec<u8> = (0..2000).flat_map(|i| format!("the baby monitor frame {i}\n").into_bytes()).collect();
        for extra in [&[][..], &["--compress", "zstd"][..]] {
            let mut args = vec!["write", "sealed", "--key-file", &key];
            args.extend_from_slice(extra);
            assert_eq!(run_fed(relay.tube(&args), &text).code(), Some(0));
            let stored: Vec<u8> = {
                let mut admin = relay.admin();
                let entries: Vec<Entry> = redis::cmd("XRANGE").arg("tube:{sealed}:stream").arg("-").arg("+").query(&mut admin).unwrap();
                entries.into_iter().flat_map(|(_, f)| f.into_iter().flat_map(|(_, v)| v)).collect()
            };
            for window in text.chunks_exact(12) {
                assert!(!stored.windows(window.len()).any(|w| w == window), "plaintext {:?} is on the relay", String::from_utf8_lossy(window));
            }
            let r = run_fed(relay.tube(&["read", "sealed", "--key-file", &key]), b"");
            assert_eq!(r.code(), Some(0), "{}", r.stderr);
            assert_eq!(r.stdout, text);
        }
        // A passphrase works the same way, from the environment.
        let mut w = relay.tube(&["write", "phrase"]);
        w.env("TUBE_PASSPHRASE", "correct horse battery");
        assert_eq!(run_fed(w, b"by passphrase").code(), Some(0));
        let mut r = relay.tube(&["read", "phrase"]);
        r.env("TUBE_PASSPHRASE", "correct horse battery");
        assert_eq!(run_fed(r, b"").stdout, b"by passphrase");
        let mut r = relay.tube(&["read", "phrase"]);
        r.env("TUBE_PASSPHRASE", "wrong horse");
        let wrong = run_fed(r, b"");
        assert_eq!(wrong.code(), Some(1));
        assert!(wrong.stdout.is_empty());
    }

    fn a_wrong_or_missing_key_fails_without_writing_anything(kind) {
        let relay = TestRelay::start(kind);
        let dir = tempfile::tempdir().unwrap();
        let (key, other) = (key_file(dir.path(), "k"), key_file(dir.path(), "other"));
        sealed_session(&relay, "locked", &key, b"private");
        let wrong = run_fed(relay.tube(&["read", "locked", "--key-file", &other]), b"");
        assert_eq!(wrong.code(), Some(1));
        assert!(wrong.stderr.contains("wrong key for channel locked"), "{}", wrong.stderr);
        assert!(wrong.stdout.is_empty());
        let none = run_fed(relay.tube(&["read", "locked"]), b"");
        assert_eq!(none.code(), Some(1));
        assert!(none.stderr.contains("is encrypted"), "{}", none.stderr);
        assert!(none.stdout.is_empty());
        // A reader with a key refuses a session that is not sealed: the relay could forge it.
        assert_eq!(run_fed(relay.tube(&["write", "open"]), b"forged?").code(), Some(0));
        let forged = run_fed(relay.tube(&["read", "open", "--key-file", &key]), b"");
        assert_eq!(forged.code(), Some(1));
        assert!(forged.stderr.contains("not encrypted"), "{}", forged.stderr);
        assert!(forged.stdout.is_empty());
    }

    fn tampering_with_sealed_records_is_always_detected(kind) {
        let relay = TestRelay::start(kind);
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "k");
        let data = random_bytes(40_000, 62);
        // (name, edit, expected exit status)
        type Edit = Box<dyn FnOnce(Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)>>;
        let other = {
            sealed_session(&relay, "elsewhere", &key, &random_bytes(40_000, 63));
            let mut admin = relay.admin();
            let e: Vec<Entry> = redis::cmd("XRANGE").arg("tube:{elsewhere}:stream").arg("1-1").arg("1-1").query(&mut admin).unwrap();
            e[0].1[0].1.clone()
        };
        let cases: Vec<(&str, Edit, i32)> = vec![
            ("flip a byte", Box::new(|mut e| { let last = e[1].1.len() - 1; e[1].1[last] ^= 1; e }), 5),
            ("drop a record", Box::new(|mut e| { e.remove(2); e }), 6),
            ("swap two", Box::new(|mut e| { let (a, b) = (e[1].1.clone(), e[2].1.clone()); e[1].1 = b; e[2].1 = a; e }), 5),
            ("replay one", Box::new(|mut e| { e[3].1 = e[2].1.clone(); e }), 5),
            ("truncate before the end", Box::new(|mut e| { e.truncate(e.len() - 2); e }), 4),
            ("copy from another channel", Box::new(move |mut e| { e[1].1 = other; e }), 5),
            ("alter the session header", Box::new(|mut e| { let n = e[0].1.len(); e[0].1[n - 20] ^= 1; e }), 1),
        ];
        for (i, (name, edit, status)) in cases.into_iter().enumerate() {
            let channel = format!("t{i}");
            sealed_session(&relay, &channel, &key, &data);
            rewrite(&relay, &channel, edit);
            let r = run_fed(relay.tube(&["read", &channel, "--key-file", &key]), b"");
            assert_eq!(r.code(), Some(status), "{name}: {}", r.stderr);
            assert!(data.starts_with(&r.stdout), "{name}: only authentic bytes are written out");
            assert!(r.stdout.len() < data.len(), "{name}: the stream is not passed off as complete");
        }
    }
}
