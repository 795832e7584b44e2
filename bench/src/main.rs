//! tube-bench: measures tube against a plain pipe and a socat relay chain, in one run.
//!
//! `tube-bench` (or `tube-bench run`) builds tube in release mode, starts its own servers on
//! free loopback ports and measures throughput, one-way latency and peak memory for every
//! case, then prints a table with each tube figure as a ratio to the socat chain, PASS/FAIL
//! per target, and writes CSV, JSON and a PNG chart to `bench/out/`.
//!
//! # Layout
//! - [`harness`]: the cases, how each is wired up, and the measurement loop.
//! - [`procs`]: child processes that are killed on drop, and the peak-RSS wrapper.
//! - [`tools`]: the data generator and checker, the latency sender and receiver.
//! - [`proxy`]: a TCP forwarder that delays every chunk without limiting bandwidth.
//! - [`report`]: statistics, targets, the table, CSV and JSON.
//! - [`chart`]: the PNG.
//!
//! The helper subcommands (`wrap`, `gen`, `sink`, `lat-send`, `lat-recv`, `delay-proxy`) are
//! the same binary run as a child; they are hidden from `--help`.

mod chart;
mod harness;
mod procs;
mod proxy;
mod report;
mod tools;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "tube-bench",
    about = "Benchmark tube against a pipe and a socat relay chain"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the benchmark (the default).
    Run(RunArgs),
    #[command(hide = true)]
    Wrap(procs::WrapArgs),
    #[command(hide = true)]
    Gen(tools::DataArgs),
    #[command(hide = true)]
    Sink(tools::DataArgs),
    #[command(hide = true)]
    LatSend(tools::LatSendArgs),
    #[command(hide = true)]
    LatRecv(tools::LatRecvArgs),
    #[command(hide = true)]
    DelayProxy(proxy::ProxyArgs),
}

/// What the benchmark run measures and where it puts the results.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// Bytes moved in each throughput run (suffixes k, M, G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Throughput runs per case; the table shows the median and the range.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Messages in each latency run.
    #[arg(long, default_value_t = 1000)]
    pub messages: u32,
    /// Bytes per latency message (at least 16).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(16..=65536))]
    pub message_size: u32,
    /// Latency messages per second.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub rate: u32,
    /// Latency runs per case, interleaved across cases; their samples are pooled.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub latency_runs: u32,
    /// Delay the proxy adds in each direction, in milliseconds.
    #[arg(long, default_value_t = 25)]
    pub delay_ms: u64,
    /// Only run cases whose name contains one of these (comma separated), e.g. `socat,redis`.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Skip the latency measurements.
    #[arg(long)]
    pub no_latency: bool,
    /// Skip the throughput measurements.
    #[arg(long)]
    pub no_throughput: bool,
    /// Largest time one run of one case may take, in seconds; 0 picks one from --size.
    #[arg(long, default_value_t = 0)]
    pub timeout: u64,
    /// Memory bound given to `tube relay --max-memory`; 0 picks one that holds a whole run.
    #[arg(long, default_value = "0", value_parser = parse_size_or_zero)]
    pub relay_max_memory: u64,
    /// Extra arguments for every `tube write` (one string, split at spaces), to try settings,
    /// e.g. "--window 64 --chunk-size 1M".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub write_args: String,
    /// Use this tube binary instead of building one with `cargo build --release`.
    #[arg(long)]
    pub tube: Option<PathBuf>,
    /// Where results go.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    match parse_size_or_zero(s)? {
        0 => Err(format!("{s:?} must be more than zero")),
        n => Ok(n),
    }
}

fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    tube::units::parse_size(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => harness::run(cli.run),
        Some(Command::Run(args)) => harness::run(args),
        Some(Command::Wrap(args)) => return procs::wrap(args),
        Some(Command::Gen(args)) => tools::generate(&args),
        Some(Command::Sink(args)) => tools::sink(&args),
        Some(Command::LatSend(args)) => tools::lat_send(&args),
        Some(Command::LatRecv(args)) => tools::lat_recv(&args),
        Some(Command::DelayProxy(args)) => proxy::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tube-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert!(parse_size("0").is_err());
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert!(parse_size("3x").is_err());
    }
}
