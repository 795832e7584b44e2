//! Load: many channels at once through one relay, and many idle readers.
//!
//! Each test loads the whole machine, so they run one at a time (see [`alone`]); their
//! bounds have headroom for a shared, noisy 2-core machine, and they print what they measured.

mod common;

use common::*;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Serialises the tests of this file: two of them at once would measure each other.
fn alone() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn registered_readers(admin: &mut redis::Connection, channel: &str) -> usize {
    redis::cmd("HLEN")
        .arg(format!("tube:{{{channel}}}:readers"))
        .query::<usize>(admin)
        .unwrap_or(0)
}

/// A waiting reader stopped by SIGTERM removes its registration before it exits. It used
/// to leave its entry in the channel's readers hash, which has no expiry until a writer
/// comes: on a channel that never gets one, for ever.
fn sigterm_takes_a_waiting_readers_registration_back(kind: RelayKind) {
    let _alone = alone();
    let relay = TestRelay::start(kind);
    let mut admin = relay.admin();
    let reader = Proc::spawn(relay.tube(&["read", "gone"]));
    wait_until(Duration::from_secs(10), "the reader's registration", || {
        registered_readers(&mut admin, "gone") == 1
    });
    reader.signal(libc::SIGTERM);
    let out = reader.wait_open(Duration::from_secs(10));
    assert_eq!(out.code(), Some(143), "{}", out.stderr);
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).unwrap();
    assert!(keys.is_empty(), "left on the relay: {keys:?}");
}

relay_tests! {
    fn a_waiting_reader_stopped_by_sigterm_leaves_nothing_on_the_relay(kind) {
        sigterm_takes_a_waiting_readers_registration_back(kind)
    }
}
