//! The `tube` command: parse arguments, set up logging, run, map the outcome to an exit code.

mod cli;
mod stdio;

use clap::Parser;
use cli::{Cli, Command, Common, ReadArgs, RelayArgs, WriteArgs};
use std::io;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tube::{Channel, Error, ReadOptions, Reader, RelayConfig, WriteOptions, Writer};

/// Exit status when the session read was interrupted by its writer.
const EXIT_INTERRUPTED: u8 = 3;
/// Exit status when the writer vanished mid-session.
const EXIT_VANISHED: u8 = 4;
/// Exit status when the stream is corrupt (gap, reorder, bad record, digest mismatch).
const EXIT_CORRUPT: u8 = 5;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.common);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tube: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // The stdin thread may still be blocked in read(): do not wait for it.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tube: {e}");
            ExitCode::from(exit_status(&e))
        }
    }
}

fn exit_status(e: &Error) -> u8 {
    match e {
        Error::Interrupted { .. } => EXIT_INTERRUPTED,
        Error::WriterVanished { .. } => EXIT_VANISHED,
        Error::Corrupt { .. } | Error::Decode { .. } => EXIT_CORRUPT,
        _ => 1,
    }
}

fn init_logging(common: &Common) {
    use tracing_subscriber::EnvFilter;
    let level = if common.quiet {
        "error"
    } else {
        match common.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_env("TUBE_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(filter)
        .without_time()
        .with_target(false)
        .init();
}

fn relay_config(common: &Common) -> Result<RelayConfig, Error> {
    let relay = RelayConfig::from_url(&common.url)?;
    Ok(match std::env::var("TUBE_PASSWORD") {
        Ok(pw) if !pw.is_empty() => relay.with_password(&pw),
        _ => relay,
    })
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Write(args) => write(&cli.common, args).await,
        Command::Read(args) => read(&cli.common, args).await,
        Command::Relay(args) => relay(args).await,
    }
}

/// Which signal stopped us, as the conventional exit status 128 + signal number.
fn watch_signals() -> io::Result<(
    CancellationToken,
    std::sync::Arc<std::sync::atomic::AtomicU8>,
)> {
    use std::sync::atomic::{AtomicU8, Ordering};
    let token = CancellationToken::new();
    let status = std::sync::Arc::new(AtomicU8::new(0));
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let (t, s) = (token.clone(), status.clone());
    tokio::spawn(async move {
        loop {
            let code = tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            };
            if t.is_cancelled() {
                // A second signal: stop waiting for the relay.
                std::process::exit(i32::from(code));
            }
            s.store(code, Ordering::SeqCst);
            t.cancel();
        }
    });
    Ok((token, status))
}

async fn write(common: &Common, args: WriteArgs) -> Result<ExitCode, Error> {
    let relay = relay_config(common)?;
    let channel = Channel::new(&args.channel, &common.prefix)?;
    let (stop, signal_status) = watch_signals()?;
    let opts = WriteOptions {
        chunk_size: args.chunk_size,
        window: usize::from(args.window),
    };
    let mut input = stdio::read_stdin(opts.chunk_size)?;
    let mut writer = tokio::select! {
        w = Writer::start(&relay, &channel, opts) => w?,
        _ = stop.cancelled() => return Ok(signal_exit(&signal_status)),
    };
    loop {
        let piece = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            piece = input.recv() => piece,
        };
        match piece {
            None => {
                let summary = writer.finish().await?;
                tracing::info!(
                    "session {} of {channel}: {} bytes in {} records",
                    summary.session,
                    summary.bytes,
                    summary.records
                );
                return Ok(ExitCode::SUCCESS);
            }
            Some(Ok(data)) => {
                tokio::select! {
                    sent = writer.send(data) => sent?,
                    _ = stop.cancelled() => break,
                }
            }
            Some(Err(e)) => {
                let _ = writer.interrupt().await;
                return Err(Error::Io(io::Error::new(
                    e.kind(),
                    format!("reading stdin: {e}"),
                )));
            }
        }
    }
    // Stopped by a signal: send what was already read, then mark the session interrupted.
    while let Ok(Ok(data)) = input.try_recv() {
        writer.send(data).await?;
    }
    let summary = writer.interrupt().await?;
    tracing::warn!(
        "interrupted: session {} of {channel} ends after {} bytes",
        summary.session,
        summary.bytes
    );
    Ok(signal_exit(&signal_status))
}

fn signal_exit(status: &std::sync::atomic::AtomicU8) -> ExitCode {
    ExitCode::from(status.load(std::sync::atomic::Ordering::SeqCst).max(1))
}

async fn read(common: &Common, args: ReadArgs) -> Result<ExitCode, Error> {
    let relay = relay_config(common)?;
    let channel = Channel::new(&args.channel, &common.prefix)?;
    let (stop, signal_status) = watch_signals()?;
    let opts = ReadOptions {
        follow: args.follow,
        ..ReadOptions::default()
    };
    let mut reader = tokio::select! {
        r = Reader::open(&relay, &channel, opts) => r?,
        _ = stop.cancelled() => return Ok(signal_exit(&signal_status)),
    };
    let (output, written) = stdio::write_stdout()?;
    let outcome = loop {
        let next = tokio::select! {
            next = reader.next_chunk() => next,
            _ = stop.cancelled() => return Ok(signal_exit(&signal_status)),
        };
        match next {
            Ok(Some(data)) => {
                if output.send(data).await.is_err() {
                    // The writing thread stopped: its result says why.
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    drop(output);
    // Everything received is written out before any stream error is reported.
    match written.await {
        Ok(Ok(())) => {}
        // `| head -c 100`: the consumer has all it wants. Quietly done, as Unix tools are.
        Ok(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => {
            return Err(Error::Io(io::Error::new(
                e.kind(),
                format!("writing stdout: {e}"),
            )));
        }
        Err(e) => return Err(Error::Io(io::Error::other(e))),
    }
    outcome.map(|()| ExitCode::SUCCESS)
}

async fn relay(args: RelayArgs) -> Result<ExitCode, Error> {
    let password = match (&args.password_file, std::env::var("TUBE_RELAY_PASSWORD")) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Io(io::Error::new(
                    e.kind(),
                    format!("reading the password file {}: {e}", path.display()),
                ))
            })?;
            Some(text.lines().next().unwrap_or_default().to_string())
        }
        (None, Ok(pw)) => Some(pw),
        (None, Err(_)) => None,
    }
    .filter(|pw| !pw.is_empty());
    let listener = tokio::net::TcpListener::bind(&args.listen).await.map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::AddrInUse {
            format!(
                " (a Redis server may already be running there; tube can use it directly: --url redis://{})",
                args.listen
            )
        } else {
            String::new()
        };
        Error::Io(io::Error::new(
            e.kind(),
            format!("cannot listen on {}: {e}{hint}", args.listen),
        ))
    })?;
    let local = listener.local_addr()?;
    if password.is_none() && !local.ip().is_loopback() && !args.allow_no_password {
        return Err(Error::Io(io::Error::other(format!(
            "refusing to listen on {local} without a password: set TUBE_RELAY_PASSWORD or \
             --password-file, or pass --allow-no-password"
        ))));
    }
    let opts = tube::relay::RelayOptions {
        password,
        max_memory: args
            .max_memory
            .unwrap_or_else(tube::relay::default_max_memory),
    };
    tracing::info!("relay listening on {local}");
    let (stop, _) = watch_signals()?;
    tube::relay::serve(listener, opts, async move { stop.cancelled().await }).await?;
    Ok(ExitCode::SUCCESS)
}
