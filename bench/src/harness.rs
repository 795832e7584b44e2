//! The cases, how each one is wired, and the measurement loop.
//!
//! Every run of every case gets fresh servers on free loopback ports, so state never leaks
//! from one run into the next and each server's peak RSS belongs to one run. Throughput runs
//! are interleaved (run 1 of every case, then run 2, ...), so that a burst of load from other
//! work on the machine spreads over all cases instead of hitting one.

use crate::RunArgs;
use crate::procs::{Proc, Spawner, free_port, listening, wait_listening};
use crate::report::{self, CaseResult, LatencyStats, ThroughputRun};
use crate::tools::DataKind;
use anyhow::{Context, Result, bail};
use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// socat's buffer size in the relay chain: the "128 KiB buffers" of the reference relay.
const SOCAT_BUFFER: &str = "131072";

/// A measured configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// (a) the producer piped straight into the consumer.
    Pipe,
    /// (b) writer -> socat -> socat relay -> socat -> reader: the limit of any relay.
    Socat,
    /// (c) tube through redis-server.
    TubeRedis,
    /// (d) tube through `tube relay`.
    TubeRelay,
    /// (e) tube through redis-server with `--compress zstd`, on compressible data.
    TubeZstd,
    /// (f) the socat chain with the delay proxy on both links.
    SocatDelay,
    /// (f) tube through redis-server with the delay proxy on both connections.
    TubeDelay,
    /// (f) [`Case::TubeDelay`] with `tube write --max-backlog 256M`: on a long link the
    /// channel's backlog budget bounds throughput (bandwidth x delay must fit in it).
    TubeDelayWide,
}

impl Case {
    pub const ALL: [Case; 8] = [
        Case::Pipe,
        Case::Socat,
        Case::TubeRedis,
        Case::TubeRelay,
        Case::TubeZstd,
        Case::SocatDelay,
        Case::TubeDelay,
        Case::TubeDelayWide,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::Pipe => "pipe",
            Case::Socat => "socat",
            Case::TubeRedis => "tube-redis",
            Case::TubeRelay => "tube-relay",
            Case::TubeZstd => "tube-zstd",
            Case::SocatDelay => "socat-delay",
            Case::TubeDelay => "tube-redis-delay",
            Case::TubeDelayWide => "tube-redis-delay-256m",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Case::Pipe => "(a) plain pipe",
            Case::Socat => "(b) socat chain, 2 hops",
            Case::TubeRedis => "(c) tube via redis-server",
            Case::TubeRelay => "(d) tube via tube relay",
            Case::TubeZstd => "(e) tube --compress zstd",
            Case::SocatDelay => "(f) socat chain +25ms",
            Case::TubeDelay => "(f) tube redis +25ms",
            Case::TubeDelayWide => "(f) tube redis +25ms 256M",
        }
    }

    /// The case its ratios are taken against.
    pub fn baseline(self) -> Option<Case> {
        match self {
            Case::Pipe | Case::Socat | Case::SocatDelay => None,
            Case::TubeRedis | Case::TubeRelay | Case::TubeZstd => Some(Case::Socat),
            Case::TubeDelay | Case::TubeDelayWide => Some(Case::SocatDelay),
        }
    }

    pub fn is_tube(self) -> bool {
        matches!(
            self,
            Case::TubeRedis
                | Case::TubeRelay
                | Case::TubeZstd
                | Case::TubeDelay
                | Case::TubeDelayWide
        )
    }

    /// Whether its writer and reader count in the endpoint RSS targets: not the wide-backlog
    /// case, which holds more in flight by design.
    pub fn in_rss_targets(self) -> bool {
        self.is_tube() && self != Case::TubeDelayWide
    }

    fn delayed(self) -> bool {
        matches!(
            self,
            Case::SocatDelay | Case::TubeDelay | Case::TubeDelayWide
        )
    }

    /// Arguments its `tube write` gets on top of `--write-args`.
    fn write_args(self) -> &'static [&'static str] {
        match self {
            Case::TubeZstd => &["--compress", "zstd"],
            Case::TubeDelayWide => &["--max-backlog", "256M"],
            _ => &[],
        }
    }

    fn data(self) -> DataKind {
        match self {
            Case::TubeZstd => DataKind::Text,
            _ => DataKind::Random,
        }
    }
}

/// What the whole run knows before it measures anything.
struct Ctx {
    args: RunArgs,
    tube: PathBuf,
    socat: PathBuf,
    redis: PathBuf,
    out: PathBuf,
    relay_max_memory: u64,
    /// Ports handed out in this run, never handed out twice.
    used_ports: HashSet<u16>,
    timeout: Duration,
}

impl Ctx {
    fn port(&mut self) -> Result<u16> {
        for _ in 0..100 {
            let p = free_port()?;
            if self.used_ports.insert(p) {
                return Ok(p);
            }
        }
        bail!("no unused free port")
    }
}

/// The entry point of `tube-bench run`.
pub fn run(args: RunArgs) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench package has no parent directory")?
        .to_path_buf();
    let out = args.out.clone().unwrap_or_else(|| root.join("bench/out"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let logs = out.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    let tube = match &args.tube {
        Some(t) => t.clone(),
        None => build_tube(&root)?,
    };
    let socat = find_program("socat", "apt-get install -y socat")?;
    let redis = find_program("redis-server", "apt-get install -y redis-server")?;
    let timeout = match args.timeout {
        0 => {
            Duration::from_secs(20) + Duration::from_secs_f64(args.size as f64 / (10 << 20) as f64)
        }
        s => Duration::from_secs(s),
    };
    let relay_max_memory = match args.relay_max_memory {
        // Holds a whole run: the writer does not trim, so the relay keeps the session.
        0 => args.size + args.size / 4 + (64 << 20),
        n => n,
    };
    let mut ctx = Ctx {
        tube,
        socat,
        redis,
        out: out.clone(),
        relay_max_memory,
        used_ports: HashSet::new(),
        timeout,
        args,
    };

    let named = |c: &Case| {
        ctx.args
            .only
            .iter()
            .any(|o| c.name().contains(&o.to_lowercase()))
    };
    let cases: Vec<Case> = Case::ALL
        .into_iter()
        .filter(|c| {
            ctx.args.only.is_empty()
                || named(c)
                // Ratios need their baseline.
                || Case::ALL.iter().any(|t| t.baseline() == Some(*c) && named(t))
        })
        .collect();
    let mut results: Vec<CaseResult> = cases.iter().map(|c| CaseResult::new(*c)).collect();

    // What this tube can do.
    let zstd = supports_zstd(&ctx.tube)?;
    for r in &mut results {
        if r.case == Case::TubeZstd && !zstd {
            r.unavailable = Some("tube write has no --compress flag yet".into());
        }
        // tube write refuses a flag given twice, and the case is about its own value.
        if r.case == Case::TubeDelayWide
            && ctx
                .args
                .write_args
                .split_whitespace()
                .any(|a| a == "--max-backlog" || a.starts_with("--max-backlog="))
        {
            r.unavailable = Some("--write-args sets --max-backlog itself".into());
        }
    }
    if cases.contains(&Case::TubeRelay)
        && let Err(e) = probe_relay(&mut ctx)
    {
        let r = results
            .iter_mut()
            .find(|r| r.case == Case::TubeRelay)
            .expect("listed");
        r.unavailable = Some(format!("{e:#}"));
    }

    eprintln!(
        "tube-bench: {} per throughput run, {} runs, timeout {} s per run; tube {}",
        report::human_bytes(ctx.args.size),
        ctx.args.runs,
        ctx.timeout.as_secs(),
        ctx.tube.display()
    );
    if !ctx.args.no_throughput {
        for run in 0..ctx.args.runs {
            for r in results.iter_mut().filter(|r| r.unavailable.is_none()) {
                let started = Instant::now();
                let sample = throughput_run(&mut ctx, r.case, run);
                match &sample {
                    Ok(s) => eprintln!(
                        "  throughput {:<21} run {}: {:8.1} MB/s",
                        r.case.name(),
                        run + 1,
                        s.mb_per_s
                    ),
                    Err(e) => eprintln!(
                        "  throughput {:<21} run {}: FAILED after {:.1} s: {e:#}",
                        r.case.name(),
                        run + 1,
                        started.elapsed().as_secs_f64()
                    ),
                }
                r.throughput_runs.push(sample.map_err(|e| format!("{e:#}")));
            }
        }
    }
    if !ctx.args.no_latency {
        // Interleaved like the throughput runs: a burst of load on the machine lands on every
        // case's samples, not on one case's tail.
        let mut samples: Vec<Vec<u64>> = vec![Vec::new(); results.len()];
        let mut errors: Vec<Option<String>> = vec![None; results.len()];
        for run in 0..ctx.args.latency_runs {
            for (i, r) in results.iter_mut().enumerate() {
                if r.unavailable.is_some() || errors[i].is_some() {
                    continue;
                }
                match latency_run(&mut ctx, r.case, run) {
                    Ok((s, cpu)) => {
                        r.latency_cpu_s.push(cpu);
                        let one = LatencyStats::from_ns(&s);
                        eprintln!(
                            "  latency    {:<21} run {}: p50 {:.3} ms, p99 {:.3} ms",
                            r.case.name(),
                            run + 1,
                            one.p50_ms,
                            one.p99_ms
                        );
                        samples[i].extend(s);
                    }
                    Err(e) => errors[i] = Some(format!("{e:#}")),
                }
            }
        }
        for ((r, samples), error) in results.iter_mut().zip(samples).zip(errors) {
            if r.unavailable.is_some() {
                continue;
            }
            match error {
                None => {
                    let s = LatencyStats::from_ns(&samples);
                    eprintln!(
                        "  latency    {:<21} all runs: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                        r.case.name(),
                        s.p50_ms,
                        s.p99_ms,
                        s.max_ms
                    );
                    r.latency = Some(Ok(s));
                }
                Some(e) => {
                    eprintln!("  latency    {:<21} FAILED: {e}", r.case.name());
                    r.latency = Some(Err(e));
                }
            }
        }
    }

    let summary = report::Summary::new(&ctx.args, ctx.relay_max_memory, results);
    let table = summary.table();
    println!("{table}");
    summary.write_files(&ctx.out)?;
    crate::chart::draw(&summary, &ctx.out.join("chart.png"))?;
    println!(
        "results: {}, {}, {} (child logs in {})",
        ctx.out.join("results.csv").display(),
        ctx.out.join("results.json").display(),
        ctx.out.join("chart.png").display(),
        logs.display()
    );
    Ok(())
}

/// Builds the tube binary in release mode and returns its path.
fn build_tube(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("tube-bench: building tube (cargo build --release --bin tube)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "tube",
            "--bin",
            "tube",
        ])
        .current_dir(root)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("building tube failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let tube = target.join("release/tube");
    if !tube.is_file() {
        bail!("{} was not built", tube.display());
    }
    Ok(tube)
}

fn find_program(name: &str, install: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not installed ({install}; bench/run.sh does it)"))
}

/// Whether `tube write` has the `--compress` flag (it comes with a later feature).
fn supports_zstd(tube: &Path) -> Result<bool> {
    let out = Command::new(tube)
        .args(["write", "--help"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", tube.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(help.contains("--compress") && help.contains("zstd"))
}

/// Checks that `tube relay` answers PING, so that an unfinished relay is reported as n/a
/// rather than as a failure in every run.
fn probe_relay(ctx: &mut Ctx) -> Result<()> {
    let sp = Spawner::new(ctx.out.join("logs/probe-relay"))?;
    let port = ctx.port()?;
    let mut relay = relay_server(ctx, &sp, port)?;
    wait_listening(&mut relay, port, Instant::now() + Duration::from_secs(5))
        .context("tube relay is not usable yet")?;
    ping(port, Duration::from_secs(2)).context("tube relay does not answer PING")?;
    relay.stop()?;
    Ok(())
}

/// Sends PING with the Redis protocol and expects PONG.
fn ping(port: u16, timeout: Duration) -> Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        let n = s.read(&mut buf).context("no answer")?;
        if n == 0 {
            bail!("connection closed");
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() > 1024 {
            break;
        }
    }
    if !got.starts_with(b"+PONG") {
        bail!("answered {:?}", String::from_utf8_lossy(&got));
    }
    Ok(())
}

fn redis_server(ctx: &Ctx, sp: &Spawner, port: u16) -> Result<Proc> {
    let dir = sp.dir.join("redis");
    std::fs::create_dir_all(&dir)?;
    let args: Vec<OsString> = vec![
        "--port".into(),
        port.to_string().into(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        "".into(),
        "--appendonly".into(),
        "no".into(),
        "--dir".into(),
        dir.into(),
    ];
    sp.command("relay", &ctx.redis, &args, true).spawn()
}

fn relay_server(ctx: &Ctx, sp: &Spawner, port: u16) -> Result<Proc> {
    let args: Vec<OsString> = vec![
        "relay".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}").into(),
        "--max-memory".into(),
        ctx.relay_max_memory.to_string().into(),
    ];
    sp.command("relay", &ctx.tube, &args, true).spawn()
}

/// How to know that the reading end is ready, so that the clock can start.
enum Ready {
    /// A port that starts listening once the reader is connected (the socat relay listens
    /// for the writer only after it has accepted the reader).
    Listening(u16),
    /// Nothing to observe: give the reader this long to connect.
    Settle(Duration),
}

type Endpoint = (PathBuf, Vec<OsString>);

/// The servers of one run of one case and the commands of its two ends.
struct Topology {
    /// Started in order; the first one is the relay whose peak RSS is reported.
    servers: Vec<Proc>,
    writer: Option<Endpoint>,
    reader: Option<Endpoint>,
    ready: Ready,
}

fn setup(ctx: &mut Ctx, case: Case, sp: &Spawner, channel: &str) -> Result<Topology> {
    let boot = Instant::now() + Duration::from_secs(10);
    let delay = |ctx: &mut Ctx, servers: &mut Vec<Proc>, upstreams: &[u16]| -> Result<Vec<u16>> {
        let mut args: Vec<OsString> = vec![
            "delay-proxy".into(),
            "--delay-ms".into(),
            ctx.args.delay_ms.to_string().into(),
        ];
        let mut ports = Vec::new();
        for up in upstreams {
            let p = ctx.port()?;
            args.push("--map".into());
            args.push(format!("127.0.0.1:{p}=127.0.0.1:{up}").into());
            ports.push(p);
        }
        let mut proxy = sp.helper("proxy", &args, true).spawn()?;
        for p in &ports {
            wait_listening(&mut proxy, *p, boot)?;
        }
        servers.push(proxy);
        Ok(ports)
    };
    match case {
        Case::Pipe => Ok(Topology {
            servers: Vec::new(),
            writer: None,
            reader: None,
            ready: Ready::Settle(Duration::ZERO),
        }),
        Case::Socat | Case::SocatDelay => {
            let into = ctx.port()?;
            let outof = ctx.port()?;
            // The relay takes the reader first (port `outof`), then listens for the writer;
            // -U: data flows from the second address (the writer) to the first.
            let args: Vec<OsString> = vec![
                "-U".into(),
                "-b".into(),
                SOCAT_BUFFER.into(),
                format!("TCP-LISTEN:{outof},bind=127.0.0.1,reuseaddr,nodelay").into(),
                format!("TCP-LISTEN:{into},bind=127.0.0.1,reuseaddr,nodelay").into(),
            ];
            let mut middle = sp.command("relay", &ctx.socat, &args, true).spawn()?;
            wait_listening(&mut middle, outof, boot)?;
            let mut servers = vec![middle];
            let (w, r) = if case.delayed() {
                let ports = delay(ctx, &mut servers, &[into, outof])?;
                (ports[0], ports[1])
            } else {
                (into, outof)
            };
            let writer: Vec<OsString> = vec![
                "-u".into(),
                "-b".into(),
                SOCAT_BUFFER.into(),
                "STDIN".into(),
                format!("TCP:127.0.0.1:{w},nodelay").into(),
            ];
            let reader: Vec<OsString> = vec![
                "-u".into(),
                "-b".into(),
                SOCAT_BUFFER.into(),
                format!("TCP:127.0.0.1:{r},nodelay").into(),
                "STDOUT".into(),
            ];
            Ok(Topology {
                servers,
                writer: Some((ctx.socat.clone(), writer)),
                reader: Some((ctx.socat.clone(), reader)),
                ready: Ready::Listening(into),
            })
        }
        Case::TubeRedis
        | Case::TubeRelay
        | Case::TubeZstd
        | Case::TubeDelay
        | Case::TubeDelayWide => {
            let port = ctx.port()?;
            let mut server = if case == Case::TubeRelay {
                relay_server(ctx, sp, port)?
            } else {
                redis_server(ctx, sp, port)?
            };
            wait_listening(&mut server, port, boot)?;
            ping(port, Duration::from_secs(5))
                .with_context(|| format!("the relay on port {port} does not answer PING"))?;
            let mut servers = vec![server];
            let (url_port, settle) = if case.delayed() {
                (
                    delay(ctx, &mut servers, &[port])?[0],
                    Duration::from_millis(1500),
                )
            } else {
                (port, Duration::from_millis(300))
            };
            let url = format!("redis://127.0.0.1:{url_port}");
            let common = |cmd: &str| -> Vec<OsString> {
                vec![
                    "--url".into(),
                    url.clone().into(),
                    "-q".into(),
                    cmd.into(),
                    channel.into(),
                ]
            };
            let mut writer = common("write");
            writer.extend(ctx.args.write_args.split_whitespace().map(OsString::from));
            writer.extend(case.write_args().iter().map(OsString::from));
            Ok(Topology {
                servers,
                writer: Some((ctx.tube.clone(), writer)),
                reader: Some((ctx.tube.clone(), common("read"))),
                ready: Ready::Settle(settle),
            })
        }
    }
}

fn wait_ready(ready: &Ready, servers: &mut [Proc], deadline: Instant) -> Result<()> {
    match ready {
        Ready::Settle(d) => std::thread::sleep(*d),
        Ready::Listening(port) => loop {
            if listening(*port) {
                break;
            }
            for s in servers.iter_mut() {
                s.check_running()?;
            }
            if Instant::now() >= deadline {
                bail!("the reader did not connect (port {port} never listened)");
            }
            std::thread::sleep(Duration::from_millis(2));
        },
    }
    Ok(())
}

/// Stops the servers; returns the relay's peak RSS and CPU time, known once it has exited.
fn stop_servers(servers: &mut [Proc]) -> Result<(Option<u64>, Option<f64>)> {
    for s in servers.iter_mut().rev() {
        s.stop()?;
    }
    let relay = servers.first();
    Ok((
        relay.and_then(Proc::peak_rss_kib),
        relay.and_then(Proc::cpu_secs),
    ))
}

/// Waits for every process in `procs` until the deadline; fails naming the first one still
/// running, or the first one that failed.
fn finish(procs: &mut [&mut Proc], deadline: Instant, what: &str) -> Result<()> {
    for p in procs.iter_mut() {
        if p.wait_until(deadline)?.is_none() {
            bail!(
                "timed out: {} still running after the {what} deadline",
                p.name
            );
        }
    }
    for p in procs.iter_mut() {
        p.check_success()?;
    }
    Ok(())
}

fn throughput_run(ctx: &mut Ctx, case: Case, run: u32) -> Result<ThroughputRun> {
    let sp = Spawner::new(
        ctx.out
            .join(format!("logs/throughput-{}-{}", case.name(), run + 1)),
    )?;
    let channel = format!("bench-{}-{}", case.name(), run + 1);
    let mut topo = setup(ctx, case, &sp, &channel)?;
    let data: Vec<OsString> = vec![
        "--size".into(),
        ctx.args.size.to_string().into(),
        "--seed".into(),
        (u64::from(run) + 1).to_string().into(),
        "--kind".into(),
        match case.data() {
            DataKind::Random => "random",
            DataKind::Text => "text",
        }
        .into(),
    ];
    let with = |cmd: &str| -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![cmd.into()];
        v.extend(data.iter().cloned());
        v
    };
    // The generator makes its pattern, then waits for its stdin to close: the start signal.
    let mut generator = sp
        .helper("gen", &with("gen"), false)
        .stdin(Stdio::piped())
        .stdout_piped()
        .spawn()?;
    let go = generator.take_stdin();
    let produced = generator.take_stdout().context("gen has no stdout")?;
    let (mut reader, mut writer, mut sink, produced) = match (&topo.reader, &topo.writer) {
        (Some(r), Some(_)) => {
            let mut reader = sp
                .command("reader", &r.0, &r.1, true)
                .stdout_piped()
                .spawn()?;
            let out = reader.take_stdout().context("reader has no stdout")?;
            let sink = sp.helper("sink", &with("sink"), false).stdin(out).spawn()?;
            (Some(reader), None, sink, Some(produced))
        }
        _ => {
            let sink = sp
                .helper("sink", &with("sink"), false)
                .stdin(produced)
                .spawn()?;
            (None, None, sink, None)
        }
    };
    let deadline = Instant::now() + ctx.timeout;
    // Patterns are made and the reader is connected before the clock starts.
    std::thread::sleep(Duration::from_millis(200));
    wait_ready(&topo.ready, &mut topo.servers, deadline)?;
    let t0 = Instant::now();
    if let (Some(w), Some(produced)) = (&topo.writer, produced) {
        writer = Some(
            sp.command("writer", &w.0, &w.1, true)
                .stdin(produced)
                .spawn()?,
        );
    }
    drop(go);
    {
        let mut ends: Vec<&mut Proc> = Vec::new();
        ends.extend(reader.as_mut());
        ends.push(&mut sink);
        finish(&mut ends, deadline, "run")?;
    }
    let t1 = [reader.as_ref(), Some(&sink)]
        .into_iter()
        .flatten()
        .filter_map(Proc::exited_at)
        .max()
        .expect("the sink has exited");
    {
        let mut rest: Vec<&mut Proc> = vec![&mut generator];
        rest.extend(writer.as_mut());
        finish(
            &mut rest,
            deadline.max(Instant::now() + Duration::from_secs(5)),
            "run",
        )?;
    }
    let (relay_kib, relay_cpu) = stop_servers(&mut topo.servers)?;
    let secs = (t1 - t0).as_secs_f64();
    Ok(ThroughputRun {
        secs,
        mb_per_s: ctx.args.size as f64 / 1e6 / secs,
        writer_rss_kib: writer.as_ref().and_then(Proc::peak_rss_kib),
        reader_rss_kib: reader.as_ref().and_then(Proc::peak_rss_kib),
        relay_rss_kib: relay_kib,
        writer_cpu_s: writer.as_ref().and_then(Proc::cpu_secs),
        reader_cpu_s: reader.as_ref().and_then(Proc::cpu_secs),
        relay_cpu_s: relay_cpu,
    })
}

/// One latency run of `case`: the samples, and the CPU seconds of the writer, the reader and
/// the relay (`None` where the case has no such process).
fn latency_run(ctx: &mut Ctx, case: Case, run: u32) -> Result<(Vec<u64>, [Option<f64>; 3])> {
    let sp = Spawner::new(
        ctx.out
            .join(format!("logs/latency-{}-{}", case.name(), run + 1)),
    )?;
    let channel = format!("lat-{}-{}", case.name(), run + 1);
    let mut topo = setup(ctx, case, &sp, &channel)?;
    let warmup_ms: u64 = if case.delayed() { 3000 } else { 1000 };
    let a = &ctx.args;
    let samples = sp.dir.join("latency.ns");
    let send: Vec<OsString> = vec![
        "lat-send".into(),
        "--count".into(),
        a.messages.to_string().into(),
        "--size".into(),
        a.message_size.to_string().into(),
        "--rate".into(),
        a.rate.to_string().into(),
        "--warmup-ms".into(),
        warmup_ms.to_string().into(),
    ];
    let recv: Vec<OsString> = vec![
        "lat-recv".into(),
        "--count".into(),
        a.messages.to_string().into(),
        "--size".into(),
        a.message_size.to_string().into(),
        "--out".into(),
        samples.clone().into(),
    ];
    let budget = Duration::from_millis(warmup_ms)
        + Duration::from_secs_f64(f64::from(a.messages) / f64::from(a.rate))
        + Duration::from_secs(30);
    let deadline = Instant::now() + budget;
    let mut procs: Vec<Proc> = Vec::new();
    match (&topo.reader, &topo.writer) {
        (Some(r), Some(w)) => {
            let mut reader = sp
                .command("reader", &r.0, &r.1, true)
                .stdout_piped()
                .spawn()?;
            let out = reader.take_stdout().context("reader has no stdout")?;
            procs.push(sp.helper("lat-recv", &recv, false).stdin(out).spawn()?);
            procs.push(reader);
            // The socat relay listens for the writer only once the reader is in.
            if let Ready::Listening(_) = topo.ready {
                wait_ready(&topo.ready, &mut topo.servers, deadline)?;
            }
            let mut sender = sp.helper("lat-send", &send, false).stdout_piped().spawn()?;
            let input = sender.take_stdout().context("lat-send has no stdout")?;
            procs.push(
                sp.command("writer", &w.0, &w.1, true)
                    .stdin(input)
                    .spawn()?,
            );
            procs.push(sender);
        }
        _ => {
            let mut sender = sp.helper("lat-send", &send, false).stdout_piped().spawn()?;
            let input = sender.take_stdout().context("lat-send has no stdout")?;
            procs.push(sp.helper("lat-recv", &recv, false).stdin(input).spawn()?);
            procs.push(sender);
        }
    }
    {
        let mut all: Vec<&mut Proc> = procs.iter_mut().collect();
        finish(&mut all, deadline, "latency run")?;
    }
    let (_, relay_cpu) = stop_servers(&mut topo.servers)?;
    let cpu = |name: &str| {
        procs
            .iter()
            .find(|p| p.name == name)
            .and_then(Proc::cpu_secs)
    };
    let cpu = [cpu("writer"), cpu("reader"), relay_cpu];
    let text = std::fs::read_to_string(&samples)
        .with_context(|| format!("cannot read {}", samples.display()))?;
    let samples = text
        .lines()
        .map(|l| l.parse::<u64>().context("bad latency sample"))
        .collect::<Result<Vec<u64>>>()?;
    Ok((samples, cpu))
}
