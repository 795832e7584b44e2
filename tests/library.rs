//! The library API: `tube::Writer` as `AsyncWrite`, `tube::Reader` as `AsyncRead`.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tube::{Channel, EndStatus, Error, ReadOptions, Reader, RelayConfig, WriteOptions, Writer};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn setup(kind: RelayKind, name: &str) -> (TestRelay, RelayConfig, Channel) {
    let relay = TestRelay::start(kind);
    let config = RelayConfig::from_url(&relay.url()).unwrap();
    let channel = Channel::new(name, tube::DEFAULT_PREFIX).unwrap();
    (relay, config, channel)
}

relay_tests! {
    fn async_write_and_async_read_round_trip(kind) {
        let (_relay, config, channel) = setup(kind, "lib");
        runtime().block_on(async {
            // The examples of `Writer` and `Reader`, run against a real relay.
            let mut writer = Writer::start(&config, &channel, WriteOptions::default()).await.unwrap();
            let reader = tokio::spawn({
                let (config, channel) = (config.clone(), channel.clone());
                async move {
                    let mut reader = Reader::open(&config, &channel, ReadOptions::default()).await.unwrap();
                    let mut all = Vec::new();
                    reader.read_to_end(&mut all).await.map(|_| all)
                }
            });
            let data = random_bytes(3 << 20, 21);
            writer.write_all(&data).await.unwrap();
            writer.shutdown().await.unwrap();
            let summary = writer.summary().unwrap();
            assert_eq!(summary.bytes, data.len() as u64);
            assert_eq!(summary.status, EndStatus::Complete);
            assert_eq!(reader.await.unwrap().unwrap(), data);
        });
    }

    fn flush_makes_data_visible_to_readers_at_once(kind) {
        let (_relay, config, channel) = setup(kind, "prompt");
        runtime().block_on(async {
            let mut writer = Writer::start(&config, &channel, WriteOptions::default()).await.unwrap();
            let mut reader = Reader::open(&config, &channel, ReadOptions::default()).await.unwrap();
            writer.write_all(b"ping").await.unwrap();
            writer.flush().await.unwrap();
            let chunk = tokio::time::timeout(Duration::from_secs(5), reader.next_chunk()).await.unwrap().unwrap();
            assert_eq!(chunk.as_deref(), Some(&b"ping"[..]));
            writer.send(bytes::Bytes::from_static(b"pong")).await.unwrap();
            let summary = writer.finish().await.unwrap();
            assert_eq!(summary.records, 2);
            assert_eq!(reader.next_chunk().await.unwrap().as_deref(), Some(&b"pong"[..]));
            assert_eq!(reader.next_chunk().await.unwrap(), None);
        });
    }

    fn an_interrupted_session_is_an_error_for_async_read(kind) {
        let (_relay, config, channel) = setup(kind, "cut");
        runtime().block_on(async {
            let mut writer = Writer::start(&config, &channel, WriteOptions::default()).await.unwrap();
            writer.write_all(b"half").await.unwrap();
            let summary = writer.interrupt().await.unwrap();
            assert_eq!(summary.status, EndStatus::Interrupted);
            let mut reader = Reader::open(&config, &channel, ReadOptions::default()).await.unwrap();
            let mut got = Vec::new();
            let err = reader.read_to_end(&mut got).await.unwrap_err();
            assert_eq!(got, b"half");
            let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>()).expect("a tube::Error inside");
            assert!(matches!(inner, Error::Interrupted { bytes: 4, .. }), "{inner}");
        });
    }

    fn a_dropped_writer_ends_its_session_as_interrupted(kind) {
        let (_relay, config, channel) = setup(kind, "dropped");
        runtime().block_on(async {
            let mut writer = Writer::start(&config, &channel, WriteOptions::default()).await.unwrap();
            writer.write_all(b"abc").await.unwrap();
            drop(writer);
            let mut reader = Reader::open(&config, &channel, ReadOptions::default()).await.unwrap();
            assert_eq!(reader.next_chunk().await.unwrap().as_deref(), Some(&b"abc"[..]));
            let err = reader.next_chunk().await.unwrap_err();
            assert!(matches!(err, Error::Interrupted { .. }), "{err}");
            // The lease was released: a new writer may start at once.
            let again = Writer::start(&config, &channel, WriteOptions::default()).await.unwrap();
            assert_eq!(again.session(), 2);
            again.finish().await.unwrap();
        });
    }

    fn small_chunk_sizes_split_large_writes(kind) {
        let (_relay, config, channel) = setup(kind, "small");
        runtime().block_on(async {
            let opts = WriteOptions { chunk_size: 1000, window: 3, ..WriteOptions::default() };
            let mut writer = Writer::start(&config, &channel, opts).await.unwrap();
            let data = random_bytes(100_000, 2);
            writer.send(bytes::Bytes::from(data.clone())).await.unwrap();
            let summary = writer.finish().await.unwrap();
            let payload = 1000 - tube::writer::RECORD_OVERHEAD;
            assert_eq!(summary.records, 100_000u64.div_ceil(payload as u64));
            let mut reader = Reader::open(&config, &channel, ReadOptions::default()).await.unwrap();
            let mut got = Vec::new();
            while let Some(chunk) = reader.next_chunk().await.unwrap() {
                assert!(chunk.len() <= payload);
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, data);
        });
    }
}
