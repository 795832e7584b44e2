//! Command-line arguments, converted into the library's plain configuration before any work.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// A tube between two Unix pipes: pipe bytes between hosts through a Redis-protocol relay.
///
/// Both ends connect to a relay they can both reach (a Redis server, or `tube relay`), so
/// neither needs to accept connections: NAT and firewalls stay closed.
#[derive(Debug, Parser)]
#[command(name = "tube", version, about, long_about = None)]
#[command(
    after_help = "Exit status: 0 success; 1 error; 2 usage error; 3 the session was \
interrupted by its writer; 4 the writer vanished; 5 the stream is corrupt; 130/143 tube itself \
was stopped by SIGINT/SIGTERM."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
#[command(next_help_heading = "Relay connection and output")]
pub struct Common {
    /// Relay URL: redis://[user[:password]@]host[:port][/db], rediss://… for TLS, or
    /// unix:///path/to/socket. A password is better given in TUBE_PASSWORD or
    /// --password-file than on the command line.
    #[arg(long, global = true, env = "TUBE_URL", default_value = tube::DEFAULT_URL, hide_env_values = true)]
    pub url: String,
    /// File whose first line is the relay password (instead of TUBE_PASSWORD or the URL).
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// PEM file of the certificates to trust for a rediss:// relay (default: the system's).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for relays that require one (with --tls-key).
    #[arg(long, global = true, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, global = true, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Do not verify the relay's certificate. Anyone on the path can then read and alter the
    /// connection: only for tests.
    #[arg(long, global = true)]
    pub tls_insecure: bool,
    /// How long to keep reconnecting when the relay is lost mid-stream (0: give up at once).
    /// The first connection is not retried.
    #[arg(long, global = true, value_parser = humantime::parse_duration, default_value = "60s", value_name = "DURATION")]
    pub retry_for: std::time::Duration,
    /// Prefix of every key tube writes on the relay.
    #[arg(long, global = true, env = "TUBE_PREFIX", default_value = tube::DEFAULT_PREFIX)]
    pub prefix: String,
    /// More log output on stderr (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy stdin into a channel, as one session; ends when stdin ends.
    Write(WriteArgs),
    /// Copy a channel to stdout: its latest session, or every session with --follow.
    Read(ReadArgs),
    /// Print a new random key for end-to-end encryption (--key-file on both ends).
    Keygen(KeygenArgs),
    /// Delete a channel and everything tube keeps of it on the relay.
    Rm(RmArgs),
    /// List channels: writer, mode, sessions, bytes, readers, last activity.
    Ls(LsArgs),
    /// Show one channel in detail, with its readers and their lag.
    Stat(StatArgs),
    /// Run a relay, for when there is no Redis at hand.
    ///
    /// A server that speaks the Redis protocol for the commands tube uses, keeping data in
    /// memory. Clients must give the password from --password-file or TUBE_RELAY_PASSWORD, if
    /// one is set.
    Relay(RelayArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "TLS: with --tls-cert FILE --tls-key FILE (the relay's certificate chain \
and its key, PEM) the relay accepts TLS only; clients connect with rediss://. Adding --tls-ca FILE \
requires every client to present a certificate signed by a CA in FILE. A password \
(TUBE_RELAY_PASSWORD or --password-file) is still checked over TLS."
)]
pub struct RelayArgs {
    /// Address to listen on. The default is loopback only; use 0.0.0.0:6379 to serve others.
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub listen: String,
    /// Listen on a non-loopback address without a password.
    #[arg(long)]
    pub allow_no_password: bool,
    /// Most bytes of data the relay holds; writes past it are refused (suffixes k, M, G).
    /// Default: a quarter of physical memory, at most 1G.
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<usize>,
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Channel name (up to 200 bytes; no control characters or braces).
    pub channel: String,
    /// Largest record, as stored on the relay: data read while earlier appends are in flight
    /// is joined up to this size (suffixes k, M: 256k, 1M; 128 bytes to 16M).
    #[arg(long, value_parser = parse_size, default_value = "256k")]
    pub chunk_size: usize,
    /// Appends in flight at most; more keeps distant relays busy.
    #[arg(long, default_value_t = tube::writer::DEFAULT_WINDOW as u16, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub window: u16,
    /// Most bytes of appends in flight (suffixes k, M). The writer holds them until the relay
    /// has them. Default: 4M to a relay under 2 ms away, else sized from the round trip, up
    /// to a quarter of --max-backlog and at most 32M.
    #[arg(long, value_parser = parse_size_u64)]
    pub max_in_flight: Option<u64>,
    /// Most bytes the relay holds for this channel (suffixes k, M, G). When it is full, the
    /// writer waits for readers (reliable) or drops the oldest data (--live).
    #[arg(long, value_parser = parse_size_u64, default_value = "64M")]
    pub max_backlog: u64,
    /// Never wait for readers: the relay keeps only the newest --max-backlog bytes and slow
    /// readers skip ahead. For live video; not for files.
    #[arg(long)]
    pub live: bool,
    /// Delete the channel's keys after this long without activity (e.g. 90s, 30m, 24h).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub ttl: std::time::Duration,
    /// Compress records: zstd or zstd:LEVEL (1-22, default 3). Readers need no flag.
    #[arg(long, value_parser = parse_compress, value_name = "zstd[:LEVEL]")]
    pub compress: Option<i32>,
    #[command(flatten)]
    pub progress: ProgressArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
}

/// The end-to-end encryption secret. The key can also come from TUBE_KEY and the passphrase
/// from TUBE_PASSPHRASE.
#[derive(Debug, Args)]
#[command(next_help_heading = "End-to-end encryption")]
pub struct SecretArgs {
    /// Encrypt end to end with the key in FILE (made by `tube keygen -o FILE`).
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// Encrypt end to end with a key stretched from the passphrase in FILE's first line.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Progress display on stderr.
#[derive(Debug, Args)]
pub struct ProgressArgs {
    /// Show bytes, rate, elapsed time and backlog/lag on stderr (default when stderr is a
    /// terminal).
    #[arg(long, overrides_with = "no_progress")]
    pub progress: bool,
    /// Do not show progress.
    #[arg(long)]
    pub no_progress: bool,
}

impl ProgressArgs {
    /// Whether to show progress, given whether stderr is a terminal.
    pub fn enabled(&self, stderr_is_terminal: bool) -> bool {
        !self.no_progress && (self.progress || stderr_is_terminal)
    }
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Channel name.
    pub channel: String,
    /// Delete even while a writer is alive (its session then fails).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only channels whose names match this glob pattern (*, ?, [abc]).
    #[arg(default_value = "*")]
    pub pattern: String,
    /// Print JSON (one array) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatArgs {
    /// Channel name.
    pub channel: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Channel name.
    pub channel: String,
    /// Go on into later sessions instead of ending with the first, like `tail -F`.
    #[arg(short, long)]
    pub follow: bool,
    /// Where to start: `start` of the latest session (an error if the relay no longer holds
    /// it), the `oldest` byte still held, or `now` (only new data).
    #[arg(long, value_enum, default_value = "start")]
    pub from: From,
    #[command(flatten)]
    pub progress: ProgressArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write the key to FILE (created with mode 0600; never overwritten) instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum From {
    Start,
    Oldest,
    Now,
}

impl From {
    pub fn start_at(self) -> tube::StartAt {
        match self {
            Self::Start => tube::StartAt::Start,
            Self::Oldest => tube::StartAt::Oldest,
            Self::Now => tube::StartAt::Now,
        }
    }
}

/// Parses `zstd` or `zstd:LEVEL` into a zstd level.
fn parse_compress(s: &str) -> Result<i32, String> {
    let (algo, level) = s.split_once(':').unwrap_or((s, "3"));
    if algo != "zstd" {
        return Err(format!(
            "unknown compression {algo:?} (supported: zstd, zstd:LEVEL)"
        ));
    }
    match level.parse::<i32>() {
        Ok(l) if (1..=22).contains(&l) => Ok(l),
        _ => Err(format!("zstd level {level:?} is not a number from 1 to 22")),
    }
}

fn parse_size_u64(s: &str) -> Result<u64, String> {
    parse_size(s).map(|v| v as u64)
}

/// Parses a nonzero byte size that fits memory: `65536`, `64k`, `1M`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    tube::units::parse_size(s)?
        .try_into()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(
            parse_size("0").is_err(),
            "a record or buffer of zero bytes makes no sense"
        );
        assert!(parse_size("12q").is_err());
    }

    #[test]
    fn compression_parses() {
        assert_eq!(parse_compress("zstd"), Ok(3));
        assert_eq!(parse_compress("zstd:19"), Ok(19));
        assert!(parse_compress("zstd:0").is_err());
        assert!(parse_compress("gzip").is_err());
    }

    #[test]
    fn progress_defaults_to_the_terminal() {
        let p = |progress, no_progress| ProgressArgs {
            progress,
            no_progress,
        };
        assert!(p(false, false).enabled(true));
        assert!(!p(false, false).enabled(false));
        assert!(p(true, false).enabled(false));
        assert!(!p(false, true).enabled(true));
    }
}
