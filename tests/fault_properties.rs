//! Property: whatever a relay does to a session's records, a reader either returns exactly the
//! stream that was written or reports an error; with a key, it also never returns a byte that
//! was not written, in that place.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::AsyncReadExt;
use tube::{Channel, ReadOptions, Reader, RelayConfig, Secret, WriteOptions, Writer};

/// Something a relay can do to the entries of a stream.
#[derive(Debug, Clone)]
enum Fault {
    Drop(usize),
    Swap(usize, usize),
    Replay { from: usize, to: usize },
    Flip { entry: usize, byte: usize },
    Truncate(usize),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        any::<usize>().prop_map(Fault::Drop),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Fault::Swap(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(from, to)| Fault::Replay { from, to }),
        (any::<usize>(), any::<usize>()).prop_map(|(entry, byte)| Fault::Flip { entry, byte }),
        (1usize..4).prop_map(Fault::Truncate),
    ]
}

fn apply(entries: &mut Vec<(String, Vec<u8>)>, fault: &Fault) {
    let n = entries.len();
    if n == 0 {
        return;
    }
    match *fault {
        Fault::Drop(i) => {
            entries.remove(i % n);
        }
        Fault::Swap(a, b) => {
            let (a, b) = (a % n, b % n);
            let va = entries[a].1.clone();
            entries[a].1 = entries[b].1.clone();
            entries[b].1 = va;
        }
        Fault::Replay { from, to } => {
            let v = entries[from % n].1.clone();
            entries[to % n].1 = v;
        }
        Fault::Flip { entry, byte } => {
            let v = &mut entries[entry % n].1;
            let i = byte % v.len();
            v[i] ^= 0x01;
        }
        Fault::Truncate(k) => entries.truncate(n.saturating_sub(k)),
    }
}

fn check_property(kind: RelayKind, sealed: bool) {
    let relay = TestRelay::start(kind);
    let config = RelayConfig::from_url(&relay.url()).unwrap();
    let secret = sealed.then(|| Secret::parse_key(&Secret::generate_key_text()).unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let case = std::sync::atomic::AtomicU32::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..60_000),
        proptest::collection::vec(fault(), 0..3),
    );
    runner
        .run(&strategy, |(data, faults)| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let channel = Channel::new(&format!("p{n}"), tube::DEFAULT_PREFIX).unwrap();
            let (got, outcome) = runtime.block_on(async {
                let opts = WriteOptions {
                    chunk_size: 4096,
                    secret: secret.clone(),
                    ..WriteOptions::default()
                };
                let mut w = Writer::start(&config, &channel, opts).await.unwrap();
                w.send(bytes::Bytes::from(data.clone())).await.unwrap();
                w.finish().await.unwrap();
                let mut admin = relay.admin();
                let key = channel.stream_key();
                let entries: Vec<Entry> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query(&mut admin)
                    .unwrap();
                let mut entries: Vec<(String, Vec<u8>)> = entries
                    .into_iter()
                    .map(|(id, mut f)| (id, f.remove(0).1))
                    .collect();
                let original = entries.clone();
                for f in &faults {
                    apply(&mut entries, f);
                }
                let changed = entries != original;
                let _: () = redis::cmd("DEL").arg(&key).query(&mut admin).unwrap();
                for (id, v) in &entries {
                    let _: String = redis::cmd("XADD")
                        .arg(&key)
                        .arg(id)
                        .arg("r")
                        .arg(v)
                        .query(&mut admin)
                        .unwrap();
                }
                let opts = ReadOptions {
                    secret: secret.clone(),
                    ..ReadOptions::default()
                };
                let mut reader = Reader::open(&config, &channel, opts).await.unwrap();
                let mut got = Vec::new();
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    reader.read_to_end(&mut got),
                )
                .await;
                (got, read.map(|r| r.map(|_| changed)))
            });
            match outcome {
                Err(_) => prop_assert!(false, "the reader hung"),
                // A clean end: the stream must be exactly what was written. (A fault may
                // leave the stream as it was, e.g. swapping a record with itself.)
                Ok(Ok(_)) => prop_assert!(
                    got == data,
                    "a damaged stream passed as complete: {faults:?}"
                ),
                Ok(Err(_)) => {
                    if sealed {
                        prop_assert!(
                            data.starts_with(&got),
                            "unauthentic bytes written out: {faults:?}"
                        );
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

relay_tests! {
    fn any_tampering_yields_the_exact_stream_or_an_error(kind) {
        check_property(kind, false);
    }

    fn any_tampering_with_sealed_records_yields_only_authentic_bytes(kind) {
        check_property(kind, true);
    }
}
