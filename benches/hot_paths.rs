//! Micro-benchmarks of the per-byte work on tube's data path.
//!
//! - record encode/decode (`tube::record`), at the default record size and at a small
//!   message size;
//! - building the `XADD` request as the writer sends it (header + payload packed into the
//!   Redis client's command buffer);
//! - parsing an `XREAD` reply with the Redis client's parser, as the reader receives it;
//! - the session digest as the writer and the reader use it, one incremental `update` per
//!   record, beside BLAKE3.
//!
//! Run with `cargo bench --bench hot_paths`; add `-- --quick` for a fast pass.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tube::record;

/// tube's default record payload and a small message.
const SIZES: [usize; 2] = [256 * 1024, 200];

fn payload(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("record/encode_data");
    for n in SIZES {
        let p = payload(n);
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &p, |b, p| {
            b.iter(|| {
                record::encode_data(
                    black_box(7),
                    black_box(42),
                    black_box(0),
                    false,
                    black_box(p),
                )
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("record/decode_data");
    for n in SIZES {
        let raw = record::encode_data(7, 42, 0, false, &payload(n));
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &raw, |b, raw| {
            // `Bytes::clone` is a reference count: decoding itself must not copy the payload.
            b.iter(|| record::decode(black_box(raw.clone())).expect("valid"))
        });
    }
    g.finish();
}

fn xadd_command(session: u64, seq: u64, p: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg("tube:{bench}:stream")
        .arg(record::entry_id(session, seq))
        .arg(record::FIELD)
        .arg(&record::encode_data(session, seq, 0, false, p)[..]);
    cmd
}

fn pack_xadd(c: &mut Criterion) {
    let mut g = c.benchmark_group("writer/pack_xadd");
    for n in SIZES {
        let p = payload(n);
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &p, |b, p| {
            b.iter(|| xadd_command(7, black_box(42), p).get_packed_command())
        });
    }
    g.finish();
}

/// An XREAD reply (RESP2) holding `count` records of `n` bytes.
fn xread_reply(count: usize, n: usize) -> Vec<u8> {
    let p = payload(n);
    let mut out = format!("*1\r\n*2\r\n$19\r\ntube:{{bench}}:stream\r\n*{count}\r\n").into_bytes();
    for seq in 1..=count as u64 {
        let id = record::entry_id(7, seq);
        let rec = record::encode_data(7, seq, 0, false, &p);
        out.extend_from_slice(
            format!(
                "*2\r\n${}\r\n{id}\r\n*2\r\n$1\r\nr\r\n${}\r\n",
                id.len(),
                rec.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&rec);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn parse_xread(c: &mut Criterion) {
    let mut g = c.benchmark_group("reader/parse_xread");
    // The reader asks for about 4 MiB per XREAD: 16 records of 256 KiB, or many small ones.
    for (count, n) in [(16, 256 * 1024), (64, 200)] {
        let reply = xread_reply(count, n);
        g.throughput(Throughput::Bytes((count * n) as u64));
        g.bench_with_input(BenchmarkId::new(format!("{count}x"), n), &reply, |b, r| {
            b.iter(|| redis::parse_redis_value(black_box(r)).expect("valid"))
        });
    }
    g.finish();
}

/// The session digest that tube uses, beside BLAKE3, which it used before: the figures
/// behind the choice (docs/DESIGN.md).
fn digest(c: &mut Criterion) {
    digest_group(c, "digest/xxh3_128_update", record::Digest::new, |h, p| {
        h.update(p);
    });
    digest_group(c, "digest/blake3_update", blake3::Hasher::new, |h, p| {
        h.update(p);
    });
}

/// One incremental `update` per record of each size, with a hasher made by `new`.
fn digest_group<H>(c: &mut Criterion, name: &str, new: fn() -> H, update: fn(&mut H, &[u8])) {
    let mut g = c.benchmark_group(name);
    for n in SIZES {
        let p = Bytes::from(payload(n));
        g.throughput(Throughput::Bytes(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &p, |b, p| {
            let mut h = new();
            b.iter(|| update(&mut h, black_box(p)));
        });
    }
    g.finish();
}

criterion_group!(benches, encode, decode, pack_xadd, parse_xread, digest);
criterion_main!(benches);
