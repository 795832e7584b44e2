//! The ends of every measured pipeline: a data generator and a checker for throughput, a
//! timestamping sender and a receiver for latency.
//!
//! All of them write and read file descriptors 0 and 1 directly (duplicated into a `File`):
//! Rust's `stdout()` is line-buffered, which would split and delay binary data.

use anyhow::{Context, Result, bail, ensure};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Bytes of the pattern that the generator repeats and the checker compares against. Larger
/// than any compressor's window at the levels tube would use, so repetition cannot be found.
const PATTERN_LEN: usize = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum DataKind {
    /// Random bytes: incompressible.
    Random,
    /// Log-like text lines: compressible, as a real log or CSV stream would be.
    Text,
}

#[derive(Debug, clap::Args)]
pub struct DataArgs {
    /// Bytes to write (gen) or expect (sink).
    #[arg(long)]
    pub size: u64,
    /// Seed of the pattern; gen and sink must agree.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = DataKind::Random)]
    pub kind: DataKind,
}

/// splitmix64: a tiny, fast generator; quality is ample for test data.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The repeating pattern of a data stream.
pub fn pattern(kind: DataKind, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(PATTERN_LEN + 256);
    match kind {
        DataKind::Random => {
            while out.len() < PATTERN_LEN {
                out.extend_from_slice(&rng.next().to_le_bytes());
            }
        }
        DataKind::Text => {
            const LEVELS: [&str; 4] = ["INFO", "INFO", "DEBUG", "WARN"];
            const MODULES: [&str; 5] = ["writer", "reader", "relay", "client", "session"];
            const WORDS: [&str; 6] = ["appended", "acked", "fetched", "renewed", "opened", "sent"];
            let mut ms = 1_763_960_000_000u64;
            while out.len() < PATTERN_LEN {
                ms += rng.below(40);
                let line = format!(
                    "{}.{:03} {} tube::{} channel=cam{} session={} seq={} bytes={} took_us={} {}\n",
                    ms / 1000,
                    ms % 1000,
                    LEVELS[rng.below(4) as usize],
                    MODULES[rng.below(5) as usize],
                    rng.below(8),
                    rng.below(1000),
                    rng.below(1_000_000),
                    rng.below(262_145),
                    rng.below(5000),
                    WORDS[rng.below(6) as usize],
                );
                out.extend_from_slice(line.as_bytes());
            }
        }
    }
    out.truncate(PATTERN_LEN);
    out
}

fn stdout_file() -> io::Result<File> {
    Ok(File::from(io::stdout().as_fd().try_clone_to_owned()?))
}

fn stdin_file() -> io::Result<File> {
    Ok(File::from(io::stdin().as_fd().try_clone_to_owned()?))
}

/// The `gen` subcommand: makes the pattern, waits for stdin to end (the harness's start
/// signal; at once when stdin is /dev/null), then writes `size` bytes of the pattern to stdout.
pub fn generate(args: &DataArgs) -> Result<()> {
    let pat = pattern(args.kind, args.seed);
    let mut out = stdout_file()?;
    let mut go = [0u8; 64];
    let mut start = stdin_file()?;
    while start.read(&mut go)? > 0 {}
    drop(start);
    let mut left = args.size;
    let mut pos = 0usize;
    while left > 0 {
        // 1 MiB writes: large enough to cost few system calls, small enough to stream.
        let n = (pat.len() - pos).min(1 << 20).min(left as usize);
        match out.write_all(&pat[pos..pos + n]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => bail!("the consumer went away"),
            Err(e) => return Err(e.into()),
        }
        left -= n as u64;
        pos = (pos + n) % pat.len();
    }
    Ok(())
}

/// The `sink` subcommand: reads stdin to its end and checks it is exactly `size` bytes of the
/// pattern. This catches truncation and corruption in every case, socat included.
pub fn sink(args: &DataArgs) -> Result<()> {
    let pat = pattern(args.kind, args.seed);
    let mut input = stdin_file()?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        ensure!(
            total + n as u64 <= args.size,
            "more than the {} bytes sent arrived",
            args.size
        );
        let mut done = 0;
        while done < n {
            let pos = ((total + done as u64) % pat.len() as u64) as usize;
            let m = (n - done).min(pat.len() - pos);
            if buf[done..done + m] != pat[pos..pos + m] {
                let off = buf[done..done + m]
                    .iter()
                    .zip(&pat[pos..pos + m])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                bail!(
                    "byte {} differs from what was sent",
                    total + (done + off) as u64
                );
            }
            done += m;
        }
        total += n as u64;
    }
    ensure!(
        total == args.size,
        "{total} bytes arrived, {} were sent",
        args.size
    );
    Ok(())
}

/// A clock both processes share: CLOCK_MONOTONIC is system-wide on Linux (unlike `Instant`,
/// whose values cannot be compared across processes), and never jumps.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

const MAGIC: &[u8; 4] = b"TBLM";

#[derive(Debug, clap::Args)]
pub struct LatSendArgs {
    #[arg(long)]
    pub count: u32,
    #[arg(long)]
    pub size: u32,
    /// Messages per second.
    #[arg(long)]
    pub rate: u32,
    /// Wait this long before the first message, so that both ends are connected.
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
}

/// The `lat-send` subcommand: `count` messages of `size` bytes at `rate` per second, each with
/// its sequence number and the CLOCK_MONOTONIC time at which it was written, one write each.
pub fn lat_send(args: &LatSendArgs) -> Result<()> {
    ensure!(args.size >= 16, "messages need at least 16 bytes");
    let mut out = stdout_file()?;
    std::thread::sleep(Duration::from_millis(args.warmup_ms));
    let period = Duration::from_secs(1) / args.rate;
    let start = Instant::now();
    let mut msg = vec![0u8; args.size as usize];
    msg[..4].copy_from_slice(MAGIC);
    for (i, b) in msg.iter_mut().enumerate().skip(16) {
        *b = b'a' + (i % 26) as u8;
    }
    for seq in 0..args.count {
        // An absolute schedule: a late message does not push back the ones after it.
        let due = start + period * seq;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        msg[4..8].copy_from_slice(&seq.to_le_bytes());
        msg[8..16].copy_from_slice(&monotonic_ns().to_le_bytes());
        out.write_all(&msg).context("cannot write a message")?;
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct LatRecvArgs {
    #[arg(long)]
    pub count: u32,
    #[arg(long)]
    pub size: u32,
    /// Where the one-way latencies go, in nanoseconds, one per line.
    #[arg(long)]
    pub out: PathBuf,
}

/// The `lat-recv` subcommand: reads messages as they arrive and records, for each, the time
/// from its sender's timestamp to the return of the read that completed it.
pub fn lat_recv(args: &LatRecvArgs) -> Result<()> {
    let size = args.size as usize;
    let mut input = stdin_file()?;
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::with_capacity(2 * size);
    let mut samples: Vec<u64> = Vec::with_capacity(args.count as usize);
    let mut expect = 0u32;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let now = monotonic_ns();
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / size * size;
        for msg in pending[..whole].chunks_exact(size) {
            ensure!(&msg[..4] == MAGIC, "message {expect} is garbled");
            let seq = u32::from_le_bytes(msg[4..8].try_into().expect("4 bytes"));
            ensure!(seq == expect, "message {seq} arrived when {expect} was due");
            let sent = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
            samples.push(now.saturating_sub(sent));
            expect += 1;
        }
        pending.drain(..whole);
    }
    ensure!(pending.is_empty(), "the stream ended inside a message");
    ensure!(
        expect == args.count,
        "{expect} messages arrived, {} were sent",
        args.count
    );
    let text: String = samples.iter().map(|s| format!("{s}\n")).collect();
    std::fs::write(&args.out, text).with_context(|| format!("cannot write {}", args.out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_deterministic_and_differ_by_seed() {
        assert_eq!(
            pattern(DataKind::Random, 3)[..64],
            pattern(DataKind::Random, 3)[..64]
        );
        assert_ne!(
            pattern(DataKind::Random, 3)[..64],
            pattern(DataKind::Random, 4)[..64]
        );
        assert_eq!(pattern(DataKind::Text, 1).len(), PATTERN_LEN);
    }

    #[test]
    fn text_is_text() {
        let p = pattern(DataKind::Text, 1);
        assert!(p[..4096].iter().all(|b| b.is_ascii()));
        assert!(p[..4096].contains(&b'\n'));
    }
}
