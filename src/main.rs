//! The `tube` command: parse arguments, set up logging, run, map the outcome to an exit code.

mod cli;
mod progress;
mod stdio;

use clap::Parser;
use cli::{
    Cli, Command, Common, KeygenArgs, LsArgs, ReadArgs, RelayArgs, RmArgs, SecretArgs, StatArgs,
    WriteArgs,
};
use progress::{Progress, Snapshot};
use std::io;
use std::io::IsTerminal;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tube::{Channel, Error, ReadOptions, Reader, RelayConfig, WriteOptions, Writer};

/// The allocator. Records are 256 KiB: glibc's malloc hands blocks that large out with `mmap`
/// and gives them back with `munmap`, so every record cost fresh pages and a page fault per
/// 4 KiB, in the writer, the reader and the relay alike. jemalloc keeps them in its size
/// classes and returns memory gradually; it also held less than mimalloc on long links.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status when the session read was interrupted by its writer.
const EXIT_INTERRUPTED: u8 = 3;
/// Exit status when the writer vanished mid-session.
const EXIT_VANISHED: u8 = 4;
/// Exit status when the stream is corrupt (gap, reorder, bad record, digest mismatch).
const EXIT_CORRUPT: u8 = 5;
/// Exit status when the relay lost data the reader had not read yet.
const EXIT_LOST: u8 = 6;
/// How long a reader stopped by a signal waits for the relay to take its registration back.
const DEREGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.common);
    let runtime = match runtime(&cli.command) {
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

/// The async runtime for `command`. `tube write` and `tube read` run on one thread: their
/// tasks (the caller's loop, the sender or fetcher, the client library's connection driver)
/// hand every record on to the next, and on one thread a hand-off is a function call rather
/// than a wake-up of another thread. stdin and stdout have threads of their own anyway. The
/// relay serves many clients and gets two worker threads.
fn runtime(command: &Command) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::Relay(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all().build()
}

fn exit_status(e: &Error) -> u8 {
    match e {
        Error::Corrupt { .. } | Error::Decode { .. } => EXIT_CORRUPT,
        Error::Interrupted { .. } => EXIT_INTERRUPTED,
        Error::WriterVanished { .. } => EXIT_VANISHED,
        Error::Lost { .. } => EXIT_LOST,
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
    let mut relay = RelayConfig::from_url(&common.url)?.with_retry_for(common.retry_for);
    let password = match &common.password_file {
        Some(path) => Some(first_line(path, "password file")?),
        None => std::env::var("TUBE_PASSWORD")
            .ok()
            .map(zeroize::Zeroizing::new),
    };
    if let Some(pw) = password.filter(|pw| !pw.is_empty()) {
        relay = relay.with_password(&pw);
    }
    let tls_given = common.tls_ca.is_some() || common.tls_cert.is_some() || common.tls_insecure;
    if relay.is_tls() || tls_given {
        let read = |path: &std::path::PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| {
                Error::Io(io::Error::new(
                    e.kind(),
                    format!("reading the {what} {}: {e}", path.display()),
                ))
            })
        };
        let client_pem = match (&common.tls_cert, &common.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert, "certificate")?, read(key, "key")?)),
            _ => None,
        };
        if common.tls_insecure {
            tracing::warn!(
                "--tls-insecure: the relay's certificate is not verified; anyone on the path can read and alter this connection"
            );
        }
        relay = relay.with_tls(tube::TlsOptions {
            ca_pem: common
                .tls_ca
                .as_ref()
                .map(|p| read(p, "CA file"))
                .transpose()?,
            client_pem,
            insecure: common.tls_insecure,
        })?;
    }
    Ok(relay)
}

/// The first line of a file that holds a secret; the secret never appears in errors.
fn first_line(path: &std::path::Path, what: &str) -> Result<zeroize::Zeroizing<String>, Error> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        Error::Io(io::Error::new(
            e.kind(),
            format!("reading the {what} {}: {e}", path.display()),
        ))
    })?);
    Ok(zeroize::Zeroizing::new(
        text.lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches('\r')
            .to_owned(),
    ))
}

/// The end-to-end secret from the flags or the environment, if any.
fn secret(args: &SecretArgs) -> Result<Option<tube::Secret>, Error> {
    if let Some(path) = &args.key_file {
        return tube::Secret::parse_key(&first_line(path, "key file")?).map(Some);
    }
    if let Some(path) = &args.passphrase_file {
        return tube::Secret::passphrase(&first_line(path, "passphrase file")?).map(Some);
    }
    if let Ok(key) = std::env::var("TUBE_KEY") {
        let key = zeroize::Zeroizing::new(key);
        return tube::Secret::parse_key(&key).map(Some);
    }
    if let Ok(p) = std::env::var("TUBE_PASSPHRASE") {
        let p = zeroize::Zeroizing::new(p);
        return tube::Secret::passphrase(&p).map(Some);
    }
    Ok(None)
}

fn keygen(args: KeygenArgs) -> Result<ExitCode, Error> {
    use std::io::Write;
    let key = tube::Secret::generate_key_text();
    match &args.output {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    Error::Io(io::Error::new(
                        e.kind(),
                        format!("creating {}: {e}", path.display()),
                    ))
                })?;
            writeln!(file, "{}", *key)?;
        }
        None => print_stdout(&key).map(|_| ())?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        Command::Write(args) => write(&cli.common, args).await,
        Command::Read(args) => read(&cli.common, args).await,
        Command::Keygen(args) => keygen(args),
        Command::Rm(args) => rm(&cli.common, args).await,
        Command::Ls(args) => ls(&cli.common, args).await,
        Command::Stat(args) => stat(&cli.common, args).await,
        Command::Relay(args) => relay(&cli.common, args).await,
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
        max_in_flight: args.max_in_flight,
        max_backlog: args.max_backlog,
        live: args.live,
        ttl: args.ttl,
        zstd_level: args.compress,
        secret: secret(&args.secret)?,
    };
    let mut input = stdio::Stdin::open(opts.max_payload())?;
    let writer = tokio::select! {
        w = Writer::start(&relay, &channel, opts) => w?,
        _ = stop.cancelled() => return Ok(signal_exit(&signal_status)),
    };
    let progress = args.progress.enabled(io::stderr().is_terminal()).then(|| {
        let shared = writer.progress_handle();
        Progress::start(move || {
            let p = shared();
            let waiting = if p.waiting {
                ", waiting for readers"
            } else {
                ""
            };
            Snapshot {
                bytes: p.bytes,
                note: format!("backlog {}{waiting}", progress::bytes(p.held)),
            }
        })
    });
    let outcome = pump_stdin(writer, &mut input, &stop, &channel).await;
    if let Some(p) = progress {
        p.finish();
    }
    match outcome? {
        Pumped::Done => Ok(ExitCode::SUCCESS),
        Pumped::Stopped => Ok(signal_exit(&signal_status)),
    }
}

enum Pumped {
    Done,
    Stopped,
}

async fn pump_stdin(
    mut writer: Writer,
    input: &mut stdio::Stdin,
    stop: &CancellationToken,
    channel: &Channel,
) -> Result<Pumped, Error> {
    let mut ended = false;
    loop {
        if ended && input.is_empty() {
            let summary = writer.finish().await?;
            tracing::info!(
                "session {} of {channel}: {} bytes in {} records",
                summary.session,
                summary.bytes,
                summary.records
            );
            return Ok(Pumped::Done);
        }
        // What was read goes to the writer as soon as it has room; until then, reading goes
        // on into the same piece.
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = writer.ready(), if !input.is_empty() => {
                let piece = input.take().expect("checked to be there");
                writer.send(piece).await?;
            }
            more = input.fill(), if !ended && !input.is_full() => match more {
                Ok(more) => ended = !more,
                Err(e) => {
                    let _ = writer.interrupt().await;
                    return Err(Error::Io(io::Error::new(
                        e.kind(),
                        format!("reading stdin: {e}"),
                    )));
                }
            },
            // The relay was lost for good while stdin was quiet.
            _ = writer.stopped(), if input.is_empty() => {
                writer.finish().await?;
                return Err(Error::Closed("writer"));
            }
        }
    }
    // Stopped by a signal: send what was already read, then mark the session interrupted.
    while let Some(data) = input.take() {
        writer.send(data).await?;
    }
    let summary = writer.interrupt().await?;
    tracing::warn!(
        "interrupted: session {} of {channel} ends after {} bytes",
        summary.session,
        summary.bytes
    );
    Ok(Pumped::Stopped)
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
        from: args.from.start_at(),
        secret: secret(&args.secret)?,
        ..ReadOptions::default()
    };
    let mut reader = tokio::select! {
        r = Reader::open(&relay, &channel, opts) => r?,
        _ = stop.cancelled() => return Ok(signal_exit(&signal_status)),
    };
    let mut output = stdio::Stdout::open()?;
    let progress = args.progress.enabled(io::stderr().is_terminal()).then(|| {
        let shared = reader.progress_handle();
        Progress::start(move || {
            let p = shared();
            let mut note = match p.lag {
                Some(lag) => format!("lag {}", progress::bytes(lag)),
                None => String::new(),
            };
            if p.skipped > 0 {
                note.push_str(&format!(", skipped {}", progress::bytes(p.skipped)));
            }
            Snapshot {
                bytes: p.bytes,
                note,
            }
        })
    });
    let outcome = loop {
        let next = tokio::select! {
            next = reader.next_chunk() => next,
            _ = stop.cancelled() => {
                // Deregister now rather than when the registration expires: a writer need not
                // wait for this reader, and a channel that never gets a writer (which would
                // clean up after it) keeps no trace of it. The reader's own connection may
                // be held by a blocking read for up to a second, so a new one is tried
                // beside it; a second signal exits at once.
                let _ = tokio::time::timeout(DEREGISTER_WAIT, reader.close()).await;
                return Ok(signal_exit(&signal_status));
            }
        };
        match next {
            Ok(Some(data)) => {
                if !output.send(data).await {
                    // Writing failed: `finish` says why.
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if let Some(p) = progress {
        p.finish();
    }
    // Everything received is written out before any stream error is reported.
    let closed = output.finish().await;
    reader.close().await;
    match closed {
        Ok(()) => {}
        // `| head -c 100`: the consumer has all it wants. Quietly done, as Unix tools are.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Err(e) => {
            return Err(Error::Io(io::Error::new(
                e.kind(),
                format!("writing stdout: {e}"),
            )));
        }
    }
    outcome.map(|()| ExitCode::SUCCESS)
}

async fn relay(common: &Common, args: RelayArgs) -> Result<ExitCode, Error> {
    let password = match (&common.password_file, std::env::var("TUBE_RELAY_PASSWORD")) {
        (Some(path), _) => Some(first_line(path, "password file")?.to_string()),
        (None, Ok(pw)) => Some(pw),
        (None, Err(_)) => None,
    }
    .filter(|pw| !pw.is_empty());
    // The TLS flags are the ones every command takes; for the relay they name its own
    // certificate and the CA of the client certificates it requires.
    if common.tls_insecure {
        return Err(Error::Io(io::Error::other(
            "--tls-insecure is for clients; the relay takes --tls-cert, --tls-key and --tls-ca",
        )));
    }
    let tls = match (&common.tls_cert, &common.tls_key) {
        (Some(cert), Some(key)) => Some(
            tube::relay::RelayTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: common.tls_ca.clone(),
            }
            .server_config()?,
        ),
        _ if common.tls_ca.is_some() => {
            return Err(Error::Io(io::Error::other(
                "--tls-ca makes the relay require client certificates, which needs TLS: \
                 give the relay's own --tls-cert and --tls-key too",
            )));
        }
        _ => None,
    };
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
        tls,
    };
    match (&opts.tls, &common.tls_ca) {
        (None, _) => tracing::info!("relay listening on {local}"),
        (Some(_), None) => tracing::info!("relay listening on {local} (TLS)"),
        (Some(_), Some(_)) => {
            tracing::info!("relay listening on {local} (TLS, client certificates required)")
        }
    }
    let (stop, _) = watch_signals()?;
    tube::relay::serve(listener, opts, async move { stop.cancelled().await }).await?;
    Ok(ExitCode::SUCCESS)
}

async fn rm(common: &Common, args: RmArgs) -> Result<ExitCode, Error> {
    let relay = relay_config(common)?;
    let channel = Channel::new(&args.channel, &common.prefix)?;
    tube::admin::remove(&relay, &channel, args.force).await?;
    Ok(ExitCode::SUCCESS)
}

async fn ls(common: &Common, args: LsArgs) -> Result<ExitCode, Error> {
    let relay = relay_config(common)?;
    let channels = tube::admin::list(&relay, &common.prefix, &args.pattern).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&channels).map_err(io::Error::other)?
    } else {
        let now = tube::writer::unix_ms();
        let mut t = format!(
            "{:<24} {:<7} {:<8} {:>8} {:>10} {:>10} {:>7} {:>12}",
            "CHANNEL", "WRITER", "MODE", "SESSIONS", "WRITTEN", "HELD", "READERS", "LAST ACTIVE"
        );
        for c in &channels {
            t.push_str(&format!(
                "\n{:<24} {:<7} {:<8} {:>8} {:>10} {:>10} {:>7} {:>12}",
                c.channel,
                if c.writer_alive { "alive" } else { "-" },
                c.mode.as_deref().unwrap_or("-"),
                c.sessions,
                progress::bytes(c.bytes_written),
                progress::bytes(c.bytes_held),
                c.readers.len(),
                ago(now, c.last_activity_ms),
            ));
        }
        t
    };
    print_stdout(&text)
}

async fn stat(common: &Common, args: StatArgs) -> Result<ExitCode, Error> {
    let relay = relay_config(common)?;
    let channel = Channel::new(&args.channel, &common.prefix)?;
    let c = tube::admin::stat(&relay, &channel).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&c).map_err(io::Error::other)?
    } else {
        let now = tube::writer::unix_ms();
        let mut t = format!(
            "channel:      {}\nwriter:       {}\nmode:         {}\nsessions:     {}\n\
             written:      {} ({} bytes)\nheld:         {} ({} bytes)\nrate:         {}/s\n\
             last active:  {}\nexpires in:   {}\nreaders:      {}",
            c.channel,
            if c.writer_alive { "alive" } else { "none" },
            c.mode.as_deref().unwrap_or("-"),
            c.sessions,
            progress::bytes(c.bytes_written),
            c.bytes_written,
            progress::bytes(c.bytes_held),
            c.bytes_held,
            progress::bytes(c.rate),
            ago(now, c.last_activity_ms),
            c.expires_in_ms
                .map_or("never".into(), |ms| humantime::format_duration(
                    std::time::Duration::from_secs(ms / 1000)
                )
                .to_string()),
            c.readers.len(),
        );
        for r in &c.readers {
            let lag = r.lag.map_or("-".into(), progress::bytes);
            t.push_str(&format!(
                "\n  {}  session {}  at {}  lag {}",
                r.id,
                r.session,
                progress::bytes(r.bytes),
                lag
            ));
        }
        t
    };
    print_stdout(&text)
}

fn ago(now_ms: u64, then_ms: Option<u64>) -> String {
    match then_ms {
        Some(t) => format!("{}s ago", now_ms.saturating_sub(t) / 1000),
        None => "-".into(),
    }
}

fn print_stdout(text: &str) -> Result<ExitCode, Error> {
    use std::io::Write;
    let mut out = io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Error::Io(e)),
        _ => Ok(ExitCode::SUCCESS),
    }
}
